//! The tenant store: a state machine of [`Command`]s kept in sled.
//!
//! Each command is applied in order, with the applied index written in the
//! same sled transaction. `apply` reads no clock. With the cluster, the store
//! is the raft state machine ([`cluster::AppMachine`]): it lives in the same
//! sled `Db` as the raft log, its applied index *is* the raft log index of
//! the last command it applied (refused commands included: a refusal is an
//! applied entry), and durability comes from the cluster's flush after each
//! applied batch. An entry at or below the store's index is skipped, so the
//! store may be ahead of the cluster's recorded applied index after a crash,
//! never behind it. (The index is kept under `meta/log_index`; the
//! `meta/applied_index` of stores written before the cluster is ignored.)
//!
//! Commands enter the raft log sealed ([`Store::seal_command`]): passwords
//! travel and rest in the log only as ciphertext, under the same vault key,
//! which every node of a cluster must share. Answers that go back through
//! the log ([`Store::decode_answer`]) never hold passwords.
//!
//! Passwords are encrypted at rest: each `db_password` is stored as
//! base64(nonce || ciphertext) of ChaCha20-Poly1305 under the key
//! SHA-256(vault key), with a random 12-byte nonce and the tenant id and db
//! user as associated data (a ciphertext moved to another user does not
//! decrypt). The nonce is the only randomness: replicas store different
//! bytes for the same logical state, and read back the same passwords. A
//! check value written on first open turns a wrong vault key into
//! [`StoreError::WrongVaultKey`] at open, never into garbage.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::model::{valid_id, Command, FieldError, TenantSpec, UserSpec};
use crate::plane::PlaneError;

const TENANTS_TREE: &str = "tenants";
const META_TREE: &str = "meta";
const APPLIED_KEY: &[u8] = b"log_index";
const VAULT_CHECK_KEY: &[u8] = b"vault_check";
const VAULT_CHECK_PLAIN: &[u8] = b"supavisor vault check v1";
const VAULT_CHECK_AAD: &[u8] = b"vault-check";
const NONCE_LEN: usize = 12;
const RECORD_VERSION: u32 = 1;
const SEALED_VERSION: u32 = 1;
const SNAPSHOT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store database: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt store record {key:?}: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("corrupt store record {key:?}: {why}")]
    Corrupt { key: String, why: &'static str },
    #[error("encoding a store record: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("the vault key (VAULT_ENC_KEY) must not be empty")]
    EmptyVaultKey,
    #[error(
        "wrong vault key (VAULT_ENC_KEY): the store at {path} was written with another key, \
         its passwords cannot be decrypted"
    )]
    WrongVaultKey { path: String },
    #[error(
        "cannot decrypt the password of user {db_user:?} of tenant {tenant:?}: \
         wrong vault key (VAULT_ENC_KEY) or corrupt data"
    )]
    Decrypt { tenant: String, db_user: String },
    #[error("encrypting a password failed")]
    Encrypt,
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid input")]
    Invalid(Vec<FieldError>),
}

impl StoreError {
    /// The command was refused because of what it asked (absent target,
    /// invalid fields): nothing is wrong with the store.
    pub fn is_client_error(&self) -> bool {
        matches!(self, StoreError::NotFound(_) | StoreError::Invalid(_))
    }
}

impl From<StoreError> for PlaneError {
    fn from(e: StoreError) -> PlaneError {
        match e {
            StoreError::NotFound(what) => PlaneError::NotFound(what),
            StoreError::Invalid(errors) => PlaneError::Invalid(errors),
            other => PlaneError::Internal(other.to_string()),
        }
    }
}

/// A command as it travels in the raft log: `cmd` serializes without
/// passwords (`db_password` is skip_serializing), they are in `passwords`,
/// sealed like the store's records (db user -> base64(nonce || ciphertext),
/// associated data: tenant id and db user).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealedCommand {
    v: u32,
    cmd: Command,
    passwords: BTreeMap<String, String>,
}

/// Why an applied command changed nothing, as it comes back through the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Refusal {
    NotFound(String),
    Invalid(Vec<FieldError>),
    /// The store itself failed on the node that answered (storage, or a
    /// vault key that does not open the command's passwords).
    Internal(String),
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Refusal {
        match e {
            StoreError::NotFound(what) => Refusal::NotFound(what),
            StoreError::Invalid(errors) => Refusal::Invalid(errors),
            other => Refusal::Internal(other.to_string()),
        }
    }
}

impl From<Refusal> for PlaneError {
    fn from(r: Refusal) -> PlaneError {
        match r {
            Refusal::NotFound(what) => PlaneError::NotFound(what),
            Refusal::Invalid(errors) => PlaneError::Invalid(errors),
            Refusal::Internal(e) => PlaneError::Internal(e),
        }
    }
}

/// The whole store as a raft snapshot: records as stored (passwords sealed).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSnapshot {
    v: u32,
    applied: u64,
    tenants: BTreeMap<String, String>,
}

/// A tenant as kept in the `tenants` tree. `spec` serializes without
/// passwords (`db_password` is skip_serializing); they live, encrypted, in
/// `passwords` keyed by db user.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    v: u32,
    spec: TenantSpec,
    passwords: BTreeMap<String, String>,
}

/// The tenant store. `Send + Sync`; `apply` calls are serialized internally.
pub struct Store {
    db: sled::Db,
    tenants: sled::Tree,
    meta: sled::Tree,
    cipher: ChaCha20Poly1305,
    applied: AtomicU64,
    apply_lock: Mutex<()>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("applied", &self.applied_index())
            .finish_non_exhaustive()
    }
}

fn not_found_tenant(id: &str) -> StoreError {
    StoreError::NotFound(format!("tenant {id:?}"))
}

fn aad(tenant: &str, db_user: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(tenant.len() + db_user.len() + 1);
    a.extend_from_slice(tenant.as_bytes());
    a.push(0);
    a.extend_from_slice(db_user.as_bytes());
    a
}

impl Store {
    /// Opens (creating) the sled db at `path`. `vault_key`: any non-empty
    /// string; the AEAD key is SHA-256(vault_key).
    pub fn open(path: &Path, vault_key: &str) -> Result<Store, StoreError> {
        if vault_key.is_empty() {
            return Err(StoreError::EmptyVaultKey);
        }
        let key = Sha256::digest(vault_key.as_bytes());
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&key));
        let db = sled::open(path)?;
        let tenants = db.open_tree(TENANTS_TREE)?;
        let meta = db.open_tree(META_TREE)?;
        let applied = match meta.get(APPLIED_KEY)? {
            None => 0,
            Some(v) => {
                let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    key: "meta/applied_index".into(),
                    why: "not 8 bytes",
                })?;
                u64::from_be_bytes(bytes)
            }
        };
        let store = Store {
            db,
            tenants,
            meta,
            cipher,
            applied: AtomicU64::new(applied),
            apply_lock: Mutex::new(()),
        };
        match store.meta.get(VAULT_CHECK_KEY)? {
            Some(sealed) => {
                let plain = std::str::from_utf8(&sealed)
                    .ok()
                    .and_then(|s| store.open_sealed(s, VAULT_CHECK_AAD));
                if plain.as_deref() != Some(VAULT_CHECK_PLAIN) {
                    return Err(StoreError::WrongVaultKey {
                        path: path.display().to_string(),
                    });
                }
            }
            None => {
                let sealed = store.seal(VAULT_CHECK_PLAIN, VAULT_CHECK_AAD)?;
                store.meta.insert(VAULT_CHECK_KEY, sealed.as_bytes())?;
                store.db.flush()?;
            }
        }
        Ok(store)
    }

    /// The index of the last command applied (0 for a new store).
    pub fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// A tenant with its passwords decrypted.
    pub fn tenant(&self, id: &str) -> Result<Option<TenantSpec>, StoreError> {
        match self.tenants.get(id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => self.decode(id, &bytes).map(Some),
        }
    }

    /// Every tenant, sorted by id, passwords decrypted.
    pub fn tenants(&self) -> Result<Vec<(String, TenantSpec)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tenants.iter() {
            let (k, v) = item?;
            let id = String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt {
                key: format!("tenants/{}", String::from_utf8_lossy(&k)),
                why: "key is not UTF-8",
            })?;
            let spec = self.decode(&id, &v)?;
            out.push((id, spec));
        }
        Ok(out)
    }

    /// Applies one command locally (no cluster), durably: the change and the
    /// new applied index (the previous one + 1) are written in one
    /// transaction and flushed before this returns. Returns the new applied
    /// index and the tenant as it now is (passwords decrypted; `None` after
    /// `DeleteTenant`). A refused command (`NotFound`, `Invalid`) changes
    /// nothing, the index included.
    pub fn apply(&self, cmd: &Command) -> Result<(u64, Option<TenantSpec>), StoreError> {
        let _serial = self.lock_apply();
        let index = self.applied_index() + 1;
        let spec = self.apply_locked(index, cmd, false)?;
        self.db.flush()?;
        Ok((index, spec))
    }

    /// Applies the command of raft log entry `index` (see the module docs):
    /// `Ok(None)` when the entry was applied already. A refusal records the
    /// index too. Not flushed: the cluster flushes the shared `Db`.
    pub fn apply_at(&self, index: u64, cmd: &Command) -> Result<Option<TenantSpec>, StoreError> {
        let _serial = self.lock_apply();
        if index <= self.applied_index() {
            return Ok(None);
        }
        self.apply_locked(index, cmd, true)
    }

    fn lock_apply(&self) -> std::sync::MutexGuard<'_, ()> {
        self.apply_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn apply_locked(
        &self,
        index: u64,
        cmd: &Command,
        record_refusal: bool,
    ) -> Result<Option<TenantSpec>, StoreError> {
        let index_bytes = index.to_be_bytes();
        let change = self.change_of(cmd);
        let (id, new_spec) = match change {
            Ok(c) => c,
            Err(e) => {
                if record_refusal {
                    self.meta.insert(APPLIED_KEY, &index_bytes[..])?;
                    self.applied.store(index, Ordering::Release);
                }
                return Err(e);
            }
        };
        let record = match &new_spec {
            Some(spec) => Some(self.encode(id, spec)?),
            None => None,
        };
        (&self.tenants, &self.meta)
            .transaction(|(tenants, meta)| {
                match &record {
                    Some(bytes) => tenants.insert(id.as_bytes(), bytes.as_slice())?,
                    None => tenants.remove(id.as_bytes())?,
                };
                meta.insert(APPLIED_KEY, &index_bytes[..])?;
                Ok::<_, ConflictableTransactionError<Infallible>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Sled(e),
                TransactionError::Abort(never) => match never {},
            })?;
        self.applied.store(index, Ordering::Release);
        Ok(new_spec)
    }

    /// The tenant a command touches and its new state, or the refusal.
    fn change_of<'c>(&self, cmd: &'c Command) -> Result<(&'c str, Option<TenantSpec>), StoreError> {
        Ok(match cmd {
            Command::PutTenant { id, spec } => (id.as_str(), Some(self.put_tenant(id, spec)?)),
            Command::DeleteTenant { id } => {
                if !self.tenants.contains_key(id.as_bytes())? {
                    return Err(not_found_tenant(id));
                }
                (id.as_str(), None)
            }
            Command::PutUser { tenant, user } => {
                (tenant.as_str(), Some(self.put_user(tenant, user)?))
            }
            Command::DeleteUser { tenant, db_user } => {
                (tenant.as_str(), Some(self.delete_user(tenant, db_user)?))
            }
        })
    }

    /// The sled database, shared with the cluster's raft trees.
    pub fn db(&self) -> sled::Db {
        self.db.clone()
    }

    /// `cmd` as it enters the raft log: passwords sealed under the vault key.
    pub fn seal_command(&self, cmd: &Command) -> Result<Vec<u8>, StoreError> {
        let (tenant, users): (&str, Vec<&UserSpec>) = match cmd {
            Command::PutTenant { id, spec } => (id, spec.users.iter().collect()),
            Command::PutUser { tenant, user } => (tenant, vec![user]),
            Command::DeleteTenant { id } => (id, vec![]),
            Command::DeleteUser { tenant, .. } => (tenant, vec![]),
        };
        let mut passwords = BTreeMap::new();
        for u in users {
            if let Some(p) = &u.db_password {
                passwords.insert(
                    u.db_user.clone(),
                    self.seal(p.as_bytes(), &aad(tenant, &u.db_user))?,
                );
            }
        }
        let sealed = SealedCommand {
            v: SEALED_VERSION,
            cmd: cmd.clone(),
            passwords,
        };
        serde_json::to_vec(&sealed).map_err(StoreError::Encode)
    }

    /// The command of a log entry, passwords opened.
    fn unseal_command(&self, bytes: &[u8]) -> Result<Command, StoreError> {
        let sealed: SealedCommand =
            serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
                key: "raft log entry".into(),
                source,
            })?;
        if sealed.v != SEALED_VERSION {
            return Err(StoreError::Corrupt {
                key: "raft log entry".into(),
                why: "unknown command version",
            });
        }
        let mut cmd = sealed.cmd;
        let (tenant, users): (String, Vec<&mut UserSpec>) = match &mut cmd {
            Command::PutTenant { id, spec } => (id.clone(), spec.users.iter_mut().collect()),
            Command::PutUser { tenant, user } => (tenant.clone(), vec![user]),
            _ => (String::new(), vec![]),
        };
        for u in users {
            u.db_password = match sealed.passwords.get(&u.db_user) {
                None => None,
                Some(s) => Some(
                    self.open_sealed(s, &aad(&tenant, &u.db_user))
                        .and_then(|p| String::from_utf8(p).ok())
                        .ok_or_else(|| StoreError::Decrypt {
                            tenant: tenant.clone(),
                            db_user: u.db_user.clone(),
                        })?,
                ),
            };
        }
        Ok(cmd)
    }

    /// The answer of [`cluster::AppMachine::apply`] read back: the tenant
    /// as it now is (without passwords; `None` after a delete) or the refusal.
    pub fn decode_answer(answer: Result<Vec<u8>, String>) -> Result<Option<TenantSpec>, Refusal> {
        match answer {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Refusal::Internal(format!("undecodable answer: {e}"))),
            Err(text) => Err(serde_json::from_str(&text).unwrap_or(Refusal::Internal(text))),
        }
    }

    fn put_tenant(&self, id: &str, spec: &TenantSpec) -> Result<TenantSpec, StoreError> {
        let mut errors = Vec::new();
        if !valid_id(id) {
            errors.push(FieldError {
                field: "external_id".into(),
                message: "must be 1 to 128 characters of A-Z, a-z, 0-9, '_' and '-'".into(),
            });
        }
        errors.extend(spec.validate());
        let old = self.tenant(id)?;
        let mut new = spec.clone();
        errors.extend(new.merge_passwords(old.as_ref()));
        if errors.is_empty() {
            Ok(new)
        } else {
            Err(StoreError::Invalid(errors))
        }
    }

    fn put_user(&self, tenant: &str, user: &UserSpec) -> Result<TenantSpec, StoreError> {
        let old = self
            .tenant(tenant)?
            .ok_or_else(|| not_found_tenant(tenant))?;
        let mut new = old.clone();
        let at = match new.users.iter().position(|u| u.db_user == user.db_user) {
            Some(i) => {
                new.users[i] = user.clone();
                i
            }
            None => {
                new.users.push(user.clone());
                new.users.len() - 1
            }
        };
        let mut errors = new.validate();
        errors.extend(new.merge_passwords(Some(&old)));
        if errors.is_empty() {
            return Ok(new);
        }
        // Report the upserted user's fields as `user.<field>`, as the request named them.
        let prefix = format!("users[{at}].");
        for e in &mut errors {
            if let Some(rest) = e.field.strip_prefix(&prefix) {
                e.field = format!("user.{rest}");
            }
        }
        Err(StoreError::Invalid(errors))
    }

    fn delete_user(&self, tenant: &str, db_user: &str) -> Result<TenantSpec, StoreError> {
        let mut spec = self
            .tenant(tenant)?
            .ok_or_else(|| not_found_tenant(tenant))?;
        let before = spec.users.len();
        spec.users.retain(|u| u.db_user != db_user);
        if spec.users.len() == before {
            return Err(StoreError::NotFound(format!(
                "user {db_user:?} of tenant {tenant:?}"
            )));
        }
        // E.g. the last manager user of a tenant with require_user = false.
        let errors = spec.validate();
        if errors.is_empty() {
            Ok(spec)
        } else {
            Err(StoreError::Invalid(errors))
        }
    }

    fn encode(&self, id: &str, spec: &TenantSpec) -> Result<Vec<u8>, StoreError> {
        let mut passwords = BTreeMap::new();
        for u in &spec.users {
            if let Some(p) = &u.db_password {
                passwords.insert(
                    u.db_user.clone(),
                    self.seal(p.as_bytes(), &aad(id, &u.db_user))?,
                );
            }
        }
        let record = Record {
            v: RECORD_VERSION,
            spec: spec.clone(),
            passwords,
        };
        serde_json::to_vec(&record).map_err(StoreError::Encode)
    }

    fn decode(&self, id: &str, bytes: &[u8]) -> Result<TenantSpec, StoreError> {
        let record: Record =
            serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
                key: format!("tenants/{id}"),
                source,
            })?;
        if record.v != RECORD_VERSION {
            return Err(StoreError::Corrupt {
                key: format!("tenants/{id}"),
                why: "unknown record version",
            });
        }
        let mut spec = record.spec;
        for u in &mut spec.users {
            u.db_password = match record.passwords.get(&u.db_user) {
                None => None,
                Some(sealed) => {
                    let plain = self
                        .open_sealed(sealed, &aad(id, &u.db_user))
                        .and_then(|p| String::from_utf8(p).ok());
                    Some(plain.ok_or_else(|| StoreError::Decrypt {
                        tenant: id.to_string(),
                        db_user: u.db_user.clone(),
                    })?)
                }
            };
        }
        Ok(spec)
    }

    /// base64(nonce || ciphertext).
    fn seal(&self, plain: &[u8], aad: &[u8]) -> Result<String, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
            .map_err(|_| StoreError::Encrypt)?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(B64.encode(out))
    }

    /// The plaintext, or None when the data is malformed or does not
    /// authenticate under this key.
    fn open_sealed(&self, sealed: &str, aad: &[u8]) -> Option<Vec<u8>> {
        let raw = B64.decode(sealed).ok()?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .ok()
    }
}

fn refusal_text(r: Refusal) -> String {
    serde_json::to_string(&r).unwrap_or_else(|_| "refused".to_string())
}

/// The store as the cluster's state machine. Answers: JSON of the tenant as
/// it now is (passwords are never serialized), or JSON of a [`Refusal`].
impl cluster::AppMachine for Store {
    fn apply(&self, index: u64, cmd: &[u8]) -> Result<Vec<u8>, String> {
        let result = self
            .unseal_command(cmd)
            .and_then(|cmd| self.apply_at(index, &cmd));
        match result {
            Ok(spec) => serde_json::to_vec(&spec)
                .map_err(|e| refusal_text(Refusal::Internal(e.to_string()))),
            Err(e) => {
                if !e.is_client_error() {
                    tracing::error!(index, error = %e, "the tenant store failed to apply a log entry");
                    // The entry counts as applied (as a failure) on this node; the
                    // error is logged, and the node needs an operator (e.g. a
                    // wrong VAULT_ENC_KEY) rather than a replay.
                    let _serial = self.lock_apply();
                    if index > self.applied_index()
                        && self
                            .meta
                            .insert(APPLIED_KEY, &index.to_be_bytes()[..])
                            .is_ok()
                    {
                        self.applied.store(index, Ordering::Release);
                    }
                }
                Err(refusal_text(e.into()))
            }
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        let _serial = self.lock_apply();
        let mut tenants = BTreeMap::new();
        for (k, v) in self.tenants.iter().flatten() {
            if let (Ok(k), Ok(v)) = (String::from_utf8(k.to_vec()), String::from_utf8(v.to_vec())) {
                tenants.insert(k, v);
            }
        }
        let snap = StoreSnapshot {
            v: SNAPSHOT_VERSION,
            applied: self.applied_index(),
            tenants,
        };
        serde_json::to_vec(&snap).unwrap_or_default()
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), String> {
        let snap: StoreSnapshot = serde_json::from_slice(snapshot).map_err(|e| e.to_string())?;
        if snap.v != SNAPSHOT_VERSION {
            return Err(format!("unknown store snapshot version {}", snap.v));
        }
        // Every record must open under our vault key before anything is replaced.
        for (id, record) in &snap.tenants {
            self.decode(id, record.as_bytes())
                .map_err(|e| e.to_string())?;
        }
        let _serial = self.lock_apply();
        let mut batch = sled::Batch::default();
        for k in self.tenants.iter().keys().flatten() {
            if !snap
                .tenants
                .contains_key(String::from_utf8_lossy(&k).as_ref())
            {
                batch.remove(k);
            }
        }
        for (id, record) in &snap.tenants {
            batch.insert(id.as_bytes(), record.as_bytes());
        }
        self.tenants.apply_batch(batch).map_err(|e| e.to_string())?;
        self.meta
            .insert(APPLIED_KEY, &snap.applied.to_be_bytes()[..])
            .map_err(|e| e.to_string())?;
        self.db.flush().map_err(|e| e.to_string())?;
        self.applied.store(snap.applied, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "unit-test-vault-key";
    const SECRET: &str = "pw-Sup3rSecret-7f9a2c";

    fn user(name: &str, password: Option<&str>) -> UserSpec {
        UserSpec {
            db_user: name.into(),
            db_password: password.map(str::to_string),
            pool_size: Some(2),
            mode_type: "transaction".into(),
            max_clients: None,
            pool_checkout_timeout: None,
            is_manager: false,
        }
    }

    fn spec(users: Vec<UserSpec>) -> TenantSpec {
        TenantSpec {
            db_host: "127.0.0.1".into(),
            db_port: 5432,
            db_database: "postgres".into(),
            require_user: true,
            auth_query: None,
            default_pool_size: 2,
            default_max_clients: 100,
            default_pool_checkout_timeout: 1000,
            auth_type: "scram-sha-256".into(),
            users,
            ..TenantSpec::default()
        }
    }

    fn put(id: &str, s: TenantSpec) -> Command {
        Command::PutTenant {
            id: id.into(),
            spec: s,
        }
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(dir.path(), KEY).expect("open store")
    }

    #[test]
    fn apply_then_read_round_trips_and_lists_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        assert_eq!(store.applied_index(), 0);
        let s = spec(vec![user("postgres", Some(SECRET))]);
        let (i, got) = store.apply(&put("zeta", s.clone())).unwrap();
        assert_eq!(i, 1);
        assert_eq!(got.as_ref(), Some(&s));
        let (i, _) = store.apply(&put("acme", s.clone())).unwrap();
        assert_eq!(i, 2);
        assert_eq!(store.tenant("zeta").unwrap(), Some(s.clone()));
        assert_eq!(store.tenant("nope").unwrap(), None);
        let ids: Vec<String> = store.tenants().unwrap().into_iter().map(|t| t.0).collect();
        assert_eq!(ids, vec!["acme", "zeta"]);
        assert_eq!(store.applied_index(), 2);
    }

    #[test]
    fn state_and_index_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(vec![user("postgres", Some(SECRET))]);
        {
            let store = open(&dir);
            store.apply(&put("acme", s.clone())).unwrap();
            store.apply(&put("gone", s.clone())).unwrap();
            let (i, after) = store
                .apply(&Command::DeleteTenant { id: "gone".into() })
                .unwrap();
            assert_eq!((i, after), (3, None));
        }
        let store = open(&dir);
        assert_eq!(store.applied_index(), 3);
        assert_eq!(store.tenant("acme").unwrap(), Some(s));
        assert_eq!(store.tenant("gone").unwrap(), None);
        let (i, _) = store
            .apply(&Command::PutUser {
                tenant: "acme".into(),
                user: user("app", Some("x")),
            })
            .unwrap();
        assert_eq!(i, 4);
    }

    #[test]
    fn passwords_merge_on_put_tenant_and_put_user() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store
            .apply(&put("acme", spec(vec![user("postgres", Some(SECRET))])))
            .unwrap();
        // Update without the password keeps it; a new user without one is refused.
        let mut update = spec(vec![user("postgres", None)]);
        update.default_pool_size = 7;
        let (_, got) = store.apply(&put("acme", update)).unwrap();
        let got = got.unwrap();
        assert_eq!(got.default_pool_size, 7);
        assert_eq!(got.users[0].db_password.as_deref(), Some(SECRET));
        let err = store
            .apply(&put(
                "acme",
                spec(vec![user("postgres", None), user("new", None)]),
            ))
            .unwrap_err();
        match err {
            StoreError::Invalid(e) => {
                assert_eq!(e.len(), 1, "{e:?}");
                assert_eq!(e[0].field, "users[1].db_password");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        assert_eq!(store.applied_index(), 2, "a refused command is not applied");

        // PutUser: upsert keeps the password, a new user needs one.
        let mut u = user("postgres", None);
        u.pool_size = Some(9);
        let (_, got) = store
            .apply(&Command::PutUser {
                tenant: "acme".into(),
                user: u,
            })
            .unwrap();
        let got = got.unwrap();
        assert_eq!(got.users.len(), 1);
        assert_eq!(got.users[0].pool_size, Some(9));
        assert_eq!(got.users[0].db_password.as_deref(), Some(SECRET));
        match store.apply(&Command::PutUser {
            tenant: "acme".into(),
            user: user("app", None),
        }) {
            Err(StoreError::Invalid(e)) => assert_eq!(e[0].field, "user.db_password"),
            other => panic!("expected Invalid, got {other:?}"),
        }
        let (_, got) = store
            .apply(&Command::PutUser {
                tenant: "acme".into(),
                user: user("app", Some("apppw")),
            })
            .unwrap();
        let names: Vec<_> = got.unwrap().users.into_iter().map(|u| u.db_user).collect();
        assert_eq!(names, vec!["postgres", "app"]);
        assert_eq!(
            store.tenant("acme").unwrap().unwrap().users[1]
                .db_password
                .as_deref(),
            Some("apppw")
        );
    }

    #[test]
    fn invalid_specs_and_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut bad = spec(vec![user("postgres", Some(SECRET))]);
        bad.db_port = 0;
        bad.users[0].pool_size = Some(0);
        match store.apply(&put("bad id!", bad)) {
            Err(StoreError::Invalid(e)) => {
                let fields: Vec<_> = e.iter().map(|e| e.field.as_str()).collect();
                assert_eq!(fields, vec!["external_id", "db_port", "users[0].pool_size"]);
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        assert_eq!(store.applied_index(), 0);
        assert!(store.tenants().unwrap().is_empty());
    }

    #[test]
    fn absent_targets_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let nf = |r: Result<(u64, Option<TenantSpec>), StoreError>| match r {
            Err(StoreError::NotFound(what)) => what,
            other => panic!("expected NotFound, got {other:?}"),
        };
        assert_eq!(
            nf(store.apply(&Command::DeleteTenant { id: "x".into() })),
            "tenant \"x\""
        );
        nf(store.apply(&Command::PutUser {
            tenant: "x".into(),
            user: user("u", Some("p")),
        }));
        nf(store.apply(&Command::DeleteUser {
            tenant: "x".into(),
            db_user: "u".into(),
        }));
        store
            .apply(&put("x", spec(vec![user("postgres", Some(SECRET))])))
            .unwrap();
        assert_eq!(
            nf(store.apply(&Command::DeleteUser {
                tenant: "x".into(),
                db_user: "u".into(),
            })),
            "user \"u\" of tenant \"x\""
        );
        let (i, got) = store
            .apply(&Command::DeleteUser {
                tenant: "x".into(),
                db_user: "postgres".into(),
            })
            .unwrap();
        assert_eq!(i, 2);
        assert!(got.unwrap().users.is_empty());
        assert!(StoreError::NotFound(String::new()).is_client_error());
        assert!(matches!(
            PlaneError::from(StoreError::NotFound("t".into())),
            PlaneError::NotFound(_)
        ));
    }

    #[test]
    fn deleting_the_last_manager_of_an_open_tenant_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut m = user("manager", Some(SECRET));
        m.is_manager = true;
        let mut s = spec(vec![m]);
        s.require_user = false;
        store.apply(&put("open", s)).unwrap();
        assert!(matches!(
            store.apply(&Command::DeleteUser {
                tenant: "open".into(),
                db_user: "manager".into(),
            }),
            Err(StoreError::Invalid(_))
        ));
    }

    fn dir_bytes(path: &Path, out: &mut Vec<u8>) {
        for entry in std::fs::read_dir(path).unwrap() {
            let entry = entry.unwrap();
            let p = entry.path();
            if p.is_dir() {
                dir_bytes(&p, out);
            } else {
                out.extend(std::fs::read(&p).unwrap());
            }
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn no_plaintext_password_reaches_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(&dir);
            store
                .apply(&put("acme", spec(vec![user("postgres", Some(SECRET))])))
                .unwrap();
            store
                .apply(&put("acme", spec(vec![user("postgres", None)])))
                .unwrap();
            store
                .apply(&Command::PutUser {
                    tenant: "acme".into(),
                    user: user("app", Some(SECRET)),
                })
                .unwrap();
        }
        let mut bytes = Vec::new();
        dir_bytes(dir.path(), &mut bytes);
        assert!(contains(&bytes, b"acme"), "the store wrote its records");
        assert!(
            !contains(&bytes, SECRET.as_bytes()),
            "plaintext password found in the sled files"
        );
        // Readable back with the right key.
        let store = open(&dir);
        let got = store.tenant("acme").unwrap().unwrap();
        assert!(got
            .users
            .iter()
            .all(|u| u.db_password.as_deref() == Some(SECRET)));
    }

    #[test]
    fn a_wrong_vault_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(&dir);
            store
                .apply(&put("acme", spec(vec![user("postgres", Some(SECRET))])))
                .unwrap();
        }
        match Store::open(dir.path(), "another key") {
            Err(e @ StoreError::WrongVaultKey { .. }) => {
                assert!(e.to_string().contains("VAULT_ENC_KEY"), "{e}")
            }
            other => panic!("expected WrongVaultKey, got {other:?}"),
        }
        assert!(matches!(
            Store::open(dir.path(), ""),
            Err(StoreError::EmptyVaultKey)
        ));
        // A record whose password was sealed under another key fails to
        // decrypt rather than yielding garbage.
        let store = open(&dir);
        let other = Store {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&Sha256::digest(b"another key"))),
            db: store.db.clone(),
            tenants: store.tenants.clone(),
            meta: store.meta.clone(),
            applied: AtomicU64::new(0),
            apply_lock: Mutex::new(()),
        };
        match other.tenant("acme") {
            Err(StoreError::Decrypt { tenant, db_user }) => {
                assert_eq!((tenant.as_str(), db_user.as_str()), ("acme", "postgres"))
            }
            other => panic!("expected Decrypt, got {other:?}"),
        }
        // A ciphertext moved to another tenant does not decrypt either.
        let raw = store.tenants.get("acme").unwrap().unwrap();
        store.tenants.insert("copy", raw).unwrap();
        assert!(matches!(
            store.tenant("copy"),
            Err(StoreError::Decrypt { .. })
        ));
    }

    #[test]
    fn as_the_raft_state_machine() {
        use cluster::AppMachine;
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let put_cmd = put("acme", spec(vec![user("postgres", Some(SECRET))]));
        let sealed = store.seal_command(&put_cmd).unwrap();
        assert!(
            !contains(&sealed, SECRET.as_bytes()),
            "plaintext password in the log entry"
        );
        // Applied at its log index; the answer carries no password.
        let answer = AppMachine::apply(&store, 5, &sealed);
        assert!(!contains(answer.as_ref().unwrap(), SECRET.as_bytes()));
        let got = Store::decode_answer(answer).unwrap().unwrap();
        assert_eq!(got.users[0].db_password, None);
        assert_eq!(store.applied_index(), 5);
        assert_eq!(
            store.tenant("acme").unwrap().unwrap().users[0]
                .db_password
                .as_deref(),
            Some(SECRET)
        );
        // A replayed entry changes nothing.
        let del = store
            .seal_command(&Command::DeleteTenant { id: "acme".into() })
            .unwrap();
        assert_eq!(AppMachine::apply(&store, 5, &del), Ok(b"null".to_vec()));
        assert!(store.tenant("acme").unwrap().is_some());
        // A refusal is an applied entry, and comes back as what it was.
        let bad = store
            .seal_command(&Command::DeleteTenant { id: "nope".into() })
            .unwrap();
        match Store::decode_answer(AppMachine::apply(&store, 6, &bad)) {
            Err(Refusal::NotFound(what)) => assert_eq!(what, "tenant \"nope\""),
            other => panic!("expected NotFound, got {other:?}"),
        }
        assert_eq!(store.applied_index(), 6);
        let invalid = store
            .seal_command(&Command::PutUser {
                tenant: "acme".into(),
                user: user("new", None),
            })
            .unwrap();
        assert!(matches!(
            Store::decode_answer(AppMachine::apply(&store, 7, &invalid)),
            Err(Refusal::Invalid(_))
        ));
        // Another vault key cannot open the entry: an internal refusal, not garbage.
        let dir2 = tempfile::tempdir().unwrap();
        let other = Store::open(dir2.path(), "another key").unwrap();
        assert!(matches!(
            Store::decode_answer(AppMachine::apply(&other, 1, &sealed)),
            Err(Refusal::Internal(_))
        ));
        // Snapshot and restore into a fresh store with the same key.
        let snap = store.snapshot();
        assert!(!contains(&snap, SECRET.as_bytes()));
        let dir3 = tempfile::tempdir().unwrap();
        let copy = open(&dir3);
        copy.apply(&put("stale", spec(vec![user("postgres", Some("x"))])))
            .unwrap();
        copy.restore(&snap).unwrap();
        assert_eq!(copy.applied_index(), 7);
        let ids: Vec<String> = copy.tenants().unwrap().into_iter().map(|t| t.0).collect();
        assert_eq!(ids, vec!["acme"]);
        assert_eq!(
            copy.tenant("acme").unwrap().unwrap().users[0]
                .db_password
                .as_deref(),
            Some(SECRET)
        );
        assert!(
            other.restore(&snap).is_err(),
            "a snapshot under another key is refused"
        );
    }
}
