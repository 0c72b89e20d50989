//! The replicated state machine in sled.
//!
//! Tree `raft_sm` holds the claims (`c/<key>` -> owner id, big-endian) and the applied state
//! (`m/applied`, `m/membership`); each entry's claim change and applied log id are written in one
//! sled batch, and the database is flushed after every apply call, so a restart never has the
//! claims ahead of or behind the recorded applied index. Application commands go to the
//! [`AppMachine`], which skips indexes it has already applied. Tree `raft_snapshot` keeps the last
//! snapshot (application snapshot + claims, with its raft metadata) so a restarted node can serve it.

// openraft's storage traits return its own (large) StorageError; helpers return the same.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::types::{AppMachine, Node, NodeId, Request, Response, TypeConfig};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

const CLAIM_PREFIX: &[u8] = b"c/";
const APPLIED: &[u8] = b"m/applied";
const MEMBERSHIP: &[u8] = b"m/membership";
const CURRENT_SNAPSHOT: &[u8] = b"current";

/// Read-only view of the applied state, shared with [`crate::ClusterNode`].
#[derive(Clone)]
pub struct SmView {
    tree: sled::Tree,
}

impl SmView {
    /// The owner of `key`, if claimed.
    pub fn owner(&self, key: &str) -> Option<NodeId> {
        let v = self.tree.get(claim_key(key)).ok()??;
        decode_node(&v)
    }

    /// Every claim.
    pub fn claims(&self) -> BTreeMap<String, NodeId> {
        let mut out = BTreeMap::new();
        for (k, v) in self.tree.scan_prefix(CLAIM_PREFIX).flatten() {
            let (Ok(key), Some(node)) = (
                std::str::from_utf8(&k[CLAIM_PREFIX.len()..]),
                decode_node(&v),
            ) else {
                continue;
            };
            out.insert(key.to_string(), node);
        }
        out
    }

    /// The last applied log id.
    pub fn applied(&self) -> Option<LogId<NodeId>> {
        let v = self.tree.get(APPLIED).ok()??;
        serde_json::from_slice(&v).ok()
    }
}

fn claim_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(CLAIM_PREFIX.len() + key.len());
    k.extend_from_slice(CLAIM_PREFIX);
    k.extend_from_slice(key.as_bytes());
    k
}

fn decode_node(v: &[u8]) -> Option<NodeId> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

/// What a snapshot's data holds besides its raft metadata.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    app: Vec<u8>,
    claims: BTreeMap<String, NodeId>,
}

/// A snapshot as persisted in `raft_snapshot`.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// The state machine handed to openraft.
pub struct StateMachine {
    db: sled::Db,
    sm: sled::Tree,
    snapshots: sled::Tree,
    app: Arc<dyn AppMachine>,
    applied_tx: watch::Sender<u64>,
    snapshot_seq: Arc<AtomicU64>,
}

impl StateMachine {
    /// Open the state machine trees in `db`; `applied_tx` is told every new applied index.
    pub fn open(
        db: &sled::Db,
        app: Arc<dyn AppMachine>,
        applied_tx: watch::Sender<u64>,
    ) -> Result<Self, sled::Error> {
        let sm = Self {
            db: db.clone(),
            sm: db.open_tree("raft_sm")?,
            snapshots: db.open_tree("raft_snapshot")?,
            app,
            applied_tx,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
        };
        let applied = sm.view().applied().map(|l| l.index).unwrap_or(0);
        sm.applied_tx.send_replace(applied);
        Ok(sm)
    }

    /// A read-only view of the applied state.
    pub fn view(&self) -> SmView {
        SmView {
            tree: self.sm.clone(),
        }
    }

    fn membership(&self) -> Result<StoredMembership<NodeId, Node>, StorageIOError<NodeId>> {
        match self
            .sm
            .get(MEMBERSHIP)
            .map_err(|e| StorageIOError::read_state_machine(&e))?
        {
            None => Ok(StoredMembership::default()),
            Some(v) => {
                serde_json::from_slice(&v).map_err(|e| StorageIOError::read_state_machine(&e))
            }
        }
    }

    /// Apply one claim command: the batch to write and the response.
    fn apply_claims(
        &self,
        req: &Request,
        batch: &mut sled::Batch,
    ) -> Result<Response, sled::Error> {
        Ok(match req {
            Request::App(_) => Response::Empty,
            Request::Claim { key, node } => {
                let k = claim_key(key);
                match self.sm.get(&k)?.as_deref().and_then(decode_node) {
                    Some(owner) => Response::Owner(owner),
                    None => {
                        batch.insert(k, &node.to_be_bytes());
                        Response::Owner(*node)
                    }
                }
            }
            Request::Release { key, node } => {
                let k = claim_key(key);
                if self.sm.get(&k)?.as_deref().and_then(decode_node) == Some(*node) {
                    batch.remove(k);
                    Response::Released(1)
                } else {
                    Response::Released(0)
                }
            }
            Request::ReleaseNode { node } => {
                let mut n = 0;
                for item in self.sm.scan_prefix(CLAIM_PREFIX) {
                    let (k, v) = item?;
                    if decode_node(&v) == Some(*node) {
                        batch.remove(k);
                        n += 1;
                    }
                }
                Response::Released(n)
            }
        })
    }

    fn apply_entry(&self, entry: Entry<TypeConfig>) -> Result<Response, StorageIOError<NodeId>> {
        let log_id = entry.log_id;
        let err =
            |e: &dyn std::error::Error| StorageIOError::apply(log_id, openraft::AnyError::error(e));
        let mut batch = sled::Batch::default();
        let resp = match entry.payload {
            EntryPayload::Blank => Response::Empty,
            EntryPayload::Membership(m) => {
                let stored = StoredMembership::new(Some(log_id), m);
                batch.insert(
                    MEMBERSHIP,
                    serde_json::to_vec(&stored).map_err(|e| err(&e))?,
                );
                Response::Empty
            }
            EntryPayload::Normal(Request::App(cmd)) => {
                Response::App(self.app.apply(log_id.index, &cmd))
            }
            EntryPayload::Normal(req) => {
                self.apply_claims(&req, &mut batch).map_err(|e| err(&e))?
            }
        };
        batch.insert(
            APPLIED,
            serde_json::to_vec(&Some(log_id)).map_err(|e| err(&e))?,
        );
        self.sm.apply_batch(batch).map_err(|e| err(&e))?;
        Ok(resp)
    }

    fn read_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageIOError<NodeId>> {
        match self
            .snapshots
            .get(CURRENT_SNAPSHOT)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
        {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StorageIOError::read_snapshot(None, &e)),
        }
    }

    async fn save_snapshot(
        db: &sled::Db,
        tree: &sled::Tree,
        snap: &StoredSnapshot,
    ) -> Result<(), StorageIOError<NodeId>> {
        let sig = Some(snap.meta.signature());
        let bytes = serde_json::to_vec(snap)
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        tree.insert(CURRENT_SNAPSHOT, bytes)
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        db.flush_async()
            .await
            .map_err(|e| StorageIOError::write_snapshot(sig, &e))?;
        Ok(())
    }
}

/// Builds a snapshot from state captured when the builder was made (while no apply ran).
pub struct SnapshotBuilder {
    db: sled::Db,
    snapshots: sled::Tree,
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let stored = StoredSnapshot {
            meta: self.meta.clone(),
            data: std::mem::take(&mut self.data),
        };
        StateMachine::save_snapshot(&self.db, &self.snapshots, &stored).await?;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>)> {
        Ok((self.view().applied(), self.membership()?))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let mut last = None;
        for entry in entries {
            last = Some(entry.log_id.index);
            out.push(self.apply_entry(entry)?);
        }
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        if let Some(index) = last {
            self.applied_tx.send_replace(index);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let last_log_id = self.view().applied();
        let last_membership = self.membership().unwrap_or_default();
        let data = SnapshotData {
            app: self.app.snapshot(),
            claims: self.view().claims(),
        };
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("--{seq}"),
        };
        SnapshotBuilder {
            db: self.db.clone(),
            snapshots: self.snapshots.clone(),
            meta: SnapshotMeta {
                last_log_id,
                last_membership,
                snapshot_id,
            },
            data: serde_json::to_vec(&data).unwrap_or_default(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let sig = Some(meta.signature());
        let bytes = snapshot.into_inner();
        let data: SnapshotData = serde_json::from_slice(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
        self.app.restore(&data.app).map_err(|e| {
            StorageIOError::write_snapshot(sig.clone(), openraft::AnyError::error(e))
        })?;
        let werr = |e: &dyn std::error::Error| {
            StorageIOError::write_snapshot(sig.clone(), openraft::AnyError::error(e))
        };
        let mut batch = sled::Batch::default();
        for item in self.sm.scan_prefix(CLAIM_PREFIX) {
            let (k, _) = item.map_err(|e| werr(&e))?;
            batch.remove(k);
        }
        for (key, node) in &data.claims {
            batch.insert(claim_key(key), &node.to_be_bytes());
        }
        batch.insert(
            APPLIED,
            serde_json::to_vec(&meta.last_log_id).map_err(|e| werr(&e))?,
        );
        batch.insert(
            MEMBERSHIP,
            serde_json::to_vec(&meta.last_membership).map_err(|e| werr(&e))?,
        );
        self.sm.apply_batch(batch).map_err(|e| werr(&e))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        };
        Self::save_snapshot(&self.db, &self.snapshots, &stored).await?;
        self.applied_tx
            .send_replace(meta.last_log_id.map(|l| l.index).unwrap_or(0));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(self.read_snapshot()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, RaftSnapshotBuilder};

    use super::*;
    use crate::types::MemKv;

    fn entry(index: u64, req: Request) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(req),
        }
    }

    fn open() -> (sled::Db, Arc<MemKv>, StateMachine) {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .expect("temp sled");
        let app = Arc::new(MemKv::default());
        let (tx, _rx) = watch::channel(0);
        let sm = StateMachine::open(&db, app.clone(), tx).expect("open sm");
        (db, app, sm)
    }

    fn claim(key: &str, node: NodeId) -> Request {
        Request::Claim {
            key: key.into(),
            node,
        }
    }

    #[tokio::test]
    async fn claims_release_and_release_node() {
        let (_db, _app, mut sm) = open();
        let out = sm
            .apply([
                entry(1, claim("t/u/transaction", 1)),
                entry(2, claim("t/u/transaction", 2)),
                entry(3, claim("t/u/session", 2)),
                entry(
                    4,
                    Request::Release {
                        key: "t/u/transaction".into(),
                        node: 2,
                    },
                ),
                entry(5, claim("x", 2)),
            ])
            .await
            .expect("apply");
        assert_eq!(
            out,
            vec![
                Response::Owner(1),
                Response::Owner(1),
                Response::Owner(2),
                Response::Released(0),
                Response::Owner(2)
            ]
        );
        let view = sm.view();
        assert_eq!(view.owner("t/u/transaction"), Some(1));
        let out = sm
            .apply([
                entry(6, Request::ReleaseNode { node: 2 }),
                entry(
                    7,
                    Request::Release {
                        key: "t/u/transaction".into(),
                        node: 1,
                    },
                ),
            ])
            .await
            .expect("apply");
        assert_eq!(out, vec![Response::Released(2), Response::Released(1)]);
        assert!(view.claims().is_empty());
        assert_eq!(view.applied().map(|l| l.index), Some(7));
    }

    #[tokio::test]
    async fn replay_is_idempotent_and_refusals_advance_the_index() {
        let (_db, app, mut sm) = open();
        let batch = || {
            [
                entry(1, Request::App(b"put a 1".to_vec())),
                entry(2, Request::App(b"del nope".to_vec())),
                entry(3, claim("k", 3)),
                entry(4, Request::App(b"put a 2".to_vec())),
            ]
        };
        let out = sm.apply(batch()).await.expect("apply");
        assert!(matches!(out[1], Response::App(Err(_))));
        assert_eq!(sm.view().applied().map(|l| l.index), Some(4));
        // A crash before the applied index was recorded re-applies the same entries.
        sm.apply(batch()).await.expect("replay");
        assert_eq!(app.get("a").as_deref(), Some("2"));
        assert_eq!(app.applied(), 4);
        assert_eq!(sm.view().claims(), BTreeMap::from([("k".to_string(), 3)]));
    }

    #[tokio::test]
    async fn snapshot_round_trip() {
        let (_db, _app, mut sm) = open();
        sm.apply([
            entry(1, Request::App(b"put a 1".to_vec())),
            entry(2, claim("k", 2)),
        ])
        .await
        .expect("apply");
        let mut builder = sm.get_snapshot_builder().await;
        let snap = builder.build_snapshot().await.expect("build");
        let current = sm
            .get_current_snapshot()
            .await
            .expect("read")
            .expect("persisted");
        assert_eq!(current.meta, snap.meta);

        let (_db2, app2, mut sm2) = open();
        sm2.apply([entry(1, claim("stale", 9))])
            .await
            .expect("apply");
        sm2.install_snapshot(&snap.meta, snap.snapshot)
            .await
            .expect("install");
        assert_eq!(app2.get("a").as_deref(), Some("1"));
        assert_eq!(sm2.view().claims(), BTreeMap::from([("k".to_string(), 2)]));
        assert_eq!(sm2.view().applied().map(|l| l.index), Some(2));
        let again = sm2
            .get_current_snapshot()
            .await
            .expect("read")
            .expect("saved");
        assert_eq!(again.meta, snap.meta);
    }
}
