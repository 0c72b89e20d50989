//! Raft type configuration and the commands replicated through the log.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// A node's id in the raft group.
pub type NodeId = u64;

/// A member's address: `addr` is the host:port of its node-to-node (raft/peer) listener.
pub type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// openraft type configuration of the cluster.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The openraft handle of this configuration.
pub type Raft = openraft::Raft<TypeConfig>;

/// A command replicated through the raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// An application command, opaque to the cluster, applied through [`AppMachine`].
    App(Vec<u8>),
    /// Claim ownership of a pool key; the response is the owner after applying.
    Claim { key: String, node: NodeId },
    /// Release `key` if `node` owns it.
    Release { key: String, node: NodeId },
    /// Drop every claim held by `node`.
    ReleaseNode { node: NodeId },
}

/// The result of applying one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// What the application returned; a refusal is still an applied entry.
    App(Result<Vec<u8>, String>),
    /// The owner of the claimed key after applying.
    Owner(NodeId),
    /// How many claims were released.
    Released(usize),
    /// Blank and membership entries.
    Empty,
}

/// The application's replicated state machine (the control plane's tenant store).
///
/// `apply` is called with the raft log index of each committed [`Request::App`] entry, in order.
/// After a crash the same entry may be applied again: the implementation must skip indexes it
/// has already applied (keep its own applied index, persisted atomically with the state).
/// It must be deterministic: no clocks or randomness. Its state must be durable when `apply`
/// returns, or live in the same sled `Db` as the cluster (flushed after every applied batch):
/// entries at or below the cluster's recorded applied index are not applied again.
pub trait AppMachine: Send + Sync + 'static {
    /// Apply the command at log `index`. `Err` is a refusal that is still part of the log.
    fn apply(&self, index: u64, cmd: &[u8]) -> Result<Vec<u8>, String>;
    /// A complete serialized copy of the state (including its applied index).
    fn snapshot(&self) -> Vec<u8>;
    /// Replace the whole state by a snapshot taken with [`AppMachine::snapshot`].
    fn restore(&self, snapshot: &[u8]) -> Result<(), String>;
}

/// A small in-memory [`AppMachine`] for tests: `put KEY VALUE` and `del KEY` over a `BTreeMap`.
#[derive(Debug, Default)]
pub struct MemKv {
    inner: Mutex<MemKvState>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct MemKvState {
    applied: u64,
    kv: BTreeMap<String, String>,
}

impl MemKv {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<String> {
        self.lock().kv.get(key).cloned()
    }

    /// The highest log index applied.
    pub fn applied(&self) -> u64 {
        self.lock().applied
    }

    /// The whole map.
    pub fn all(&self) -> BTreeMap<String, String> {
        self.lock().kv.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemKvState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AppMachine for MemKv {
    fn apply(&self, index: u64, cmd: &[u8]) -> Result<Vec<u8>, String> {
        let mut st = self.lock();
        if index <= st.applied {
            return Ok(b"replayed".to_vec());
        }
        st.applied = index;
        let text = std::str::from_utf8(cmd).map_err(|e| e.to_string())?;
        let mut parts = text.splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("put"), Some(k), Some(v)) => {
                let old = st.kv.insert(k.to_string(), v.to_string());
                Ok(old.unwrap_or_default().into_bytes())
            }
            (Some("del"), Some(k), None) => match st.kv.remove(k) {
                Some(old) => Ok(old.into_bytes()),
                None => Err(format!("no key {k}")),
            },
            _ => Err(format!("bad command {text:?}")),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.lock()).unwrap_or_default()
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), String> {
        let st: MemKvState = serde_json::from_slice(snapshot).map_err(|e| e.to_string())?;
        *self.lock() = st;
        Ok(())
    }
}
