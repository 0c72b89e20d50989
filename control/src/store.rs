//! The tenant store: a state machine of [`Command`]s kept in sled.
//!
//! Each command is applied in order and flushed before `apply` returns, with
//! the applied index bumped in the same sled transaction, so a change that
//! was acknowledged survives `kill -9`. `apply` reads no clock; with the
//! cluster, an openraft log sits in front of it.
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
const APPLIED_KEY: &[u8] = b"applied_index";
const VAULT_CHECK_KEY: &[u8] = b"vault_check";
const VAULT_CHECK_PLAIN: &[u8] = b"supavisor vault check v1";
const VAULT_CHECK_AAD: &[u8] = b"vault-check";
const NONCE_LEN: usize = 12;
const RECORD_VERSION: u32 = 1;

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

    /// Applies one command, durably: the change and the new applied index
    /// are written in one transaction and flushed before this returns.
    /// Returns the new applied index and the tenant as it now is (passwords
    /// decrypted; `None` after `DeleteTenant`). A refused command
    /// (`NotFound`, `Invalid`) changes nothing, the index included.
    pub fn apply(&self, cmd: &Command) -> Result<(u64, Option<TenantSpec>), StoreError> {
        let _serial = self
            .apply_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (id, new_spec) = match cmd {
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
        };
        let record = match &new_spec {
            Some(spec) => Some(self.encode(id, spec)?),
            None => None,
        };
        let index = self.applied_index() + 1;
        let index_bytes = index.to_be_bytes();
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
        self.db.flush()?;
        self.applied.store(index, Ordering::Release);
        Ok((index, new_spec))
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
}
