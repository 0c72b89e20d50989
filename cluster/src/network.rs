//! The messages of the node-to-node link and openraft's network client over it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::error::ClusterError;
use crate::rpc::Client;
use crate::types::{Node, NodeId, Request, Response, TypeConfig};

/// A request on the node-to-node link.
#[derive(Debug, Serialize, Deserialize)]
pub enum Rpc {
    /// Raft: replicate entries / heartbeat.
    Append(AppendEntriesRequest<TypeConfig>),
    /// Raft: ask for a vote.
    Vote(VoteRequest<NodeId>),
    /// Raft: one chunk of a snapshot.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// Leader only: write a command (forwarded by a follower).
    Write(Request),
    /// Leader only: `node` is alive.
    Heartbeat { node: NodeId },
    /// Leader only: add a node as learner, and as voter if `voter`.
    AddNode {
        id: NodeId,
        addr: String,
        voter: bool,
    },
    /// Leader only: release a node's claims and remove it from the membership.
    Leave { id: NodeId },
    /// Leader only: milliseconds since each node was last seen.
    LastSeen,
    /// Any node: are you reachable? (answered with `Ack`; see `ClusterNode::gate_elections`).
    Ping,
    /// Any node: a question for the application (its own encoding), answered with `Query`
    /// (see `ClusterNode::query`).
    Query(String),
}

/// The reply to an [`Rpc`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// The applied response of a write and its log index.
    Written {
        index: u64,
        response: Response,
    },
    /// Heartbeat acknowledged by a leader that confirmed its quorum `quorum_age_ms` ago and has
    /// applied the log up to `applied` (the sender's lease needs that much applied too).
    Alive {
        quorum_age_ms: u64,
        #[serde(default)]
        applied: u64,
    },
    /// Add node or leave done.
    Ack,
    /// Milliseconds since each node was last seen by the leader.
    LastSeen(BTreeMap<NodeId, u64>),
    /// This node is not the leader; the leader it knows of, if any.
    NotLeader(Option<(NodeId, String)>),
    /// A transient refusal (e.g. a membership change still in progress): try again shortly.
    Busy(String),
    /// The call was handled and failed.
    Error(String),
    /// The application's answer to a `Query`.
    Query(String),
}

/// Encode, send and decode one call.
pub async fn call(
    client: &Client,
    addr: &str,
    rpc: &Rpc,
    timeout: Duration,
) -> Result<Reply, ClusterError> {
    let body = serde_json::to_vec(rpc)?;
    let reply = client.call(addr, &body, timeout).await?;
    Ok(serde_json::from_slice(&reply)?)
}

/// Makes a [`PeerConn`] per replication target.
pub struct NetworkFactory {
    pub(crate) client: Arc<Client>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConn;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerConn {
        PeerConn {
            client: self.client.clone(),
            target,
            node: node.clone(),
        }
    }
}

/// openraft's view of one peer.
pub struct PeerConn {
    client: Arc<Client>,
    target: NodeId,
    node: Node,
}

fn transport_err<E: std::error::Error>(e: ClusterError) -> RPCError<NodeId, Node, E> {
    match e {
        ClusterError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        e => RPCError::Network(NetworkError::new(&e)),
    }
}

impl PeerConn {
    async fn send<E: std::error::Error>(
        &self,
        rpc: &Rpc,
        option: &RPCOption,
    ) -> Result<Reply, RPCError<NodeId, Node, E>> {
        call(&self.client, &self.node.addr, rpc, option.hard_ttl())
            .await
            .map_err(transport_err)
    }

    fn unexpected<E: std::error::Error>(&self, reply: Reply) -> RPCError<NodeId, Node, E> {
        let e = ClusterError::Remote(format!(
            "unexpected reply from node {}: {reply:?}",
            self.target
        ));
        RPCError::Network(NetworkError::new(&e))
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RPCError<NodeId, Node, E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            e,
        ))
    }
}

impl RaftNetwork<TypeConfig> for PeerConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self.send(&Rpc::Append(rpc), &option).await? {
            Reply::Append(r) => r.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.send(&Rpc::Snapshot(rpc), &option).await? {
            Reply::Snapshot(r) => r.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self.send(&Rpc::Vote(rpc), &option).await? {
            Reply::Vote(r) => r.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(other)),
        }
    }
}
