//! The crate's error type.

use openraft::error::{ClientWriteError, Fatal, InitializeError, RaftError};

use crate::types::{Node, NodeId};

/// Errors of the cluster crate (openraft's large errors are boxed).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Binding, connecting, reading or writing a node-to-node socket.
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    /// The sled database.
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    /// A message that could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(#[from] serde_json::Error),
    /// The peer does not share our cluster secret (or the message was tampered with).
    #[error("peer refused authentication")]
    Unauthorized,
    /// A frame longer than the protocol allows.
    #[error("frame of {0} bytes exceeds the limit")]
    FrameTooLarge(usize),
    /// The raft core stopped.
    #[error("raft stopped: {0}")]
    Fatal(Box<Fatal<NodeId>>),
    /// A write or membership change was refused by raft.
    #[error("raft write: {0}")]
    Write(Box<RaftError<NodeId, ClientWriteError<NodeId, Node>>>),
    /// Initializing the group failed.
    #[error("raft initialize: {0}")]
    Initialize(Box<RaftError<NodeId, InitializeError<NodeId, Node>>>),
    /// The remote node handled the call and reported this error.
    #[error("remote: {0}")]
    Remote(String),
    /// No leader was reachable before the deadline.
    #[error("no leader reachable before the deadline")]
    NoLeader,
    /// The call did not complete in time.
    #[error("timed out")]
    Timeout,
    /// The configuration is not usable.
    #[error("config: {0}")]
    Config(&'static str),
    /// The node has been shut down.
    #[error("node is shut down")]
    Shutdown,
}

impl ClusterError {
    /// Whether retrying the same call (possibly against another leader) can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClusterError::Io(_) | ClusterError::NoLeader | ClusterError::Timeout
        )
    }
}

impl From<Fatal<NodeId>> for ClusterError {
    fn from(e: Fatal<NodeId>) -> Self {
        ClusterError::Fatal(Box::new(e))
    }
}

impl From<RaftError<NodeId, ClientWriteError<NodeId, Node>>> for ClusterError {
    fn from(e: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> Self {
        ClusterError::Write(Box::new(e))
    }
}

impl From<RaftError<NodeId, InitializeError<NodeId, Node>>> for ClusterError {
    fn from(e: RaftError<NodeId, InitializeError<NodeId, Node>>) -> Self {
        ClusterError::Initialize(Box::new(e))
    }
}
