//! Cluster membership, replicated configuration and pool ownership (openraft 0.9 + sled).
//!
//! A small raft group replicates [`Request`]s: opaque application commands (the control plane's
//! tenant store, behind [`AppMachine`]) and claims of pool keys. Because claims go through the log,
//! two nodes never both own a key. Nodes heartbeat the leader; the leader releases the claims of a
//! node silent for `claim_timeout_ms`, and each node's [`ClusterNode::lease_valid`] lets it fence
//! its own pools first (see [`liveness`]). A single node is a group of one over the same code.
//!
//! Modules: [`types`] (raft types, commands, the app trait), [`log_store`] and
//! [`state_machine`] (sled storage), [`rpc`] (authenticated framing), [`network`] (messages and
//! openraft's client), [`liveness`], `server` (the listener), [`node`] (the public handle), [`config`], [`error`].

pub mod config;
pub mod error;
pub mod liveness;
pub mod log_store;
pub mod network;
pub mod node;
pub mod rpc;
mod server;
pub mod state_machine;
pub mod types;

pub use config::ClusterConfig;
pub use error::ClusterError;
pub use node::{ClusterNode, ClusterStatus, NodeStatus, QueryHandler};
pub use types::{AppMachine, MemKv, Node, NodeId, Request, Response};
