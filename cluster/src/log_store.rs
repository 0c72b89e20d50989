//! The raft log in sled: trees `raft_log` (entries keyed by big-endian index, JSON values) and
//! `raft_log_meta` (vote, committed, last purged log id). Every write is flushed before openraft
//! is told it is durable.

// openraft's storage traits return its own (large) StorageError; helpers return the same.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::{NodeId, TypeConfig};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// The raft log store; cheap to clone (sled trees are shared handles).
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

impl LogStore {
    /// Open (or create) the log trees in `db`.
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(Self {
            db: db.clone(),
            log: db.open_tree("raft_log")?,
            meta: db.open_tree("raft_log_meta")?,
        })
    }

    fn get_meta<T: DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageIOError<NodeId>> {
        match self.meta.get(key).map_err(|e| StorageIOError::read(&e))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StorageIOError::read(&e)),
        }
    }

    async fn put_meta<T: Serialize>(
        &self,
        key: &[u8],
        value: &T,
    ) -> Result<(), StorageIOError<NodeId>> {
        let bytes = serde_json::to_vec(value).map_err(|e| StorageIOError::write(&e))?;
        self.meta
            .insert(key, bytes)
            .map_err(|e| StorageIOError::write(&e))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId<NodeId>>, StorageIOError<NodeId>> {
        match self.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            None => Ok(None),
            Some((_, v)) => {
                let e: Entry<TypeConfig> =
                    serde_json::from_slice(&v).map_err(|e| StorageIOError::read_logs(&e))?;
                Ok(Some(e.log_id))
            }
        }
    }
}

fn start_key(range: &impl RangeBounds<u64>) -> Option<[u8; 8]> {
    match range.start_bound() {
        Bound::Included(x) => Some(x.to_be_bytes()),
        Bound::Excluded(x) => x.checked_add(1).map(u64::to_be_bytes),
        Bound::Unbounded => Some(0u64.to_be_bytes()),
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let Some(start) = start_key(&range) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in self.log.range(start..) {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let idx = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|e| StorageIOError::read_logs(&e))?,
            );
            if !range.contains(&idx) {
                break;
            }
            out.push(serde_json::from_slice(&v).map_err(|e| StorageIOError::read_logs(&e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(LAST_PURGED)?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_meta(VOTE, vote).await?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        Ok(self.get_meta(VOTE)?)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.put_meta(COMMITTED, &committed).await?;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            batch.insert(&entry.log_id.index.to_be_bytes(), bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let flushed = self
            .db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(std::io::Error::other);
        callback.log_io_completed(flushed);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(log_id.index.to_be_bytes()..) {
            let (k, _) = item.map_err(|e| StorageIOError::write_logs(&e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Record the purge point first: a crash in between leaves extra entries, never a hole.
        self.put_meta(LAST_PURGED, &log_id).await?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=log_id.index.to_be_bytes()) {
            let (k, _) = item.map_err(|e| StorageIOError::write_logs(&e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
