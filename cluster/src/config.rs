//! Configuration of a cluster node.

use std::fmt;

use crate::error::ClusterError;
use crate::types::NodeId;

/// How a node runs and finds its group.
#[derive(Clone)]
pub struct ClusterConfig {
    /// This node's id, unique in the group and stable across restarts.
    pub node_id: NodeId,
    /// host:port the node-to-node listener binds (port 0 picks one).
    pub listen: String,
    /// host:port other nodes use to reach this one; defaults to the bound address. The membership
    /// records it, so it must stay the same across restarts.
    pub advertise: Option<String>,
    /// Static initial voters (including or not this node). The lowest id initializes the group
    /// once; the others wait to be contacted.
    pub peers: Vec<(NodeId, String)>,
    /// Address of any member of an existing group to join through (ignored once initialized).
    pub join: Option<String>,
    /// With `join`: become a voter after catching up as a learner.
    pub join_as_voter: bool,
    /// Shared secret authenticating every node-to-node message.
    pub secret: String,
    /// How often a node heartbeats the leader.
    pub heartbeat_ms: u64,
    /// How long a silent owner keeps its claims before the leader releases them.
    pub claim_timeout_ms: u64,
    /// Raft heartbeat interval (below `election_timeout_min_ms`).
    pub raft_heartbeat_ms: u64,
    /// Raft election timeout, lower bound.
    pub election_timeout_min_ms: u64,
    /// Raft election timeout, upper bound.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries (and purge the log behind it).
    pub snapshot_logs: u64,
    /// Entries kept in the log behind the last snapshot.
    pub keep_logs: u64,
    /// How long a write or membership call keeps retrying across leader changes.
    pub write_timeout_ms: u64,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("node_id", &self.node_id)
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("peers", &self.peers)
            .field("join", &self.join)
            .field("join_as_voter", &self.join_as_voter)
            .field("secret", &"<redacted>")
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("claim_timeout_ms", &self.claim_timeout_ms)
            .field("raft_heartbeat_ms", &self.raft_heartbeat_ms)
            .field("election_timeout_min_ms", &self.election_timeout_min_ms)
            .field("election_timeout_max_ms", &self.election_timeout_max_ms)
            .field("snapshot_logs", &self.snapshot_logs)
            .field("keep_logs", &self.keep_logs)
            .field("write_timeout_ms", &self.write_timeout_ms)
            .finish()
    }
}

impl ClusterConfig {
    /// Defaults for a node: a group of one unless `peers` or `join` are set.
    pub fn new(node_id: NodeId, listen: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            node_id,
            listen: listen.into(),
            advertise: None,
            peers: Vec::new(),
            join: None,
            join_as_voter: true,
            secret: secret.into(),
            heartbeat_ms: 500,
            claim_timeout_ms: 3000,
            raft_heartbeat_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            snapshot_logs: 5000,
            keep_logs: 1000,
            write_timeout_ms: 5000,
        }
    }

    /// Check the settings against each other.
    pub fn validate(self) -> Result<Self, ClusterError> {
        if self.secret.len() < 8 {
            return Err(ClusterError::Config("secret must be at least 8 bytes"));
        }
        if self.raft_heartbeat_ms == 0 || self.raft_heartbeat_ms >= self.election_timeout_min_ms {
            return Err(ClusterError::Config(
                "raft_heartbeat_ms must be above 0 and below election_timeout_min_ms",
            ));
        }
        if self.election_timeout_min_ms >= self.election_timeout_max_ms {
            return Err(ClusterError::Config(
                "election_timeout_min_ms must be below election_timeout_max_ms",
            ));
        }
        if self.heartbeat_ms == 0 || self.heartbeat_ms * 2 >= self.claim_timeout_ms {
            return Err(ClusterError::Config(
                "heartbeat_ms must be above 0 and below claim_timeout_ms / 2",
            ));
        }
        if self.join.is_some() && !self.peers.is_empty() {
            return Err(ClusterError::Config("set either peers or join, not both"));
        }
        Ok(self)
    }

    pub(crate) fn raft_config(&self) -> Result<openraft::Config, ClusterError> {
        openraft::Config {
            cluster_name: "supavisor".into(),
            heartbeat_interval: self.raft_heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_logs),
            max_in_snapshot_log_to_keep: self.keep_logs,
            ..Default::default()
        }
        .validate()
        .map_err(|_| ClusterError::Config("openraft rejected the derived raft config"))
    }
}
