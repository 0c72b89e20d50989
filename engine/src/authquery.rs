//! Users that are not configured but exist in the tenant's database
//! (`require_user = false`): their secret comes from the tenant's
//! `auth_query`, run as the manager user, and is cached per shard.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;
use wire::scram::ScramSecret;

use crate::config::{FetchedSecret, PoolMode, TenantConfig, UserConfig};
use crate::error::EngineError;
use crate::shard::Shard;

/// How long a fetched secret is trusted.
pub const TTL: Duration = Duration::from_secs(60);
/// A failed login re-queries at most this often per user.
pub const MIN_REFETCH: Duration = Duration::from_secs(1);
/// How long auth_query may run.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Cached {
    /// None: the role does not exist or has no usable secret.
    pub user: Option<Arc<UserConfig>>,
    pub fetched: Instant,
}

/// Parses `pg_authid.rolpassword`.
pub fn parse_secret(s: &str) -> Option<FetchedSecret> {
    if s.starts_with("SCRAM-SHA-256$") {
        return ScramSecret::parse(s).ok().map(FetchedSecret::Scram);
    }
    let is_md5 =
        s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| b.is_ascii_hexdigit());
    is_md5.then(|| FetchedSecret::Md5(s.to_string()))
}

/// The user's settings through auth_query: cached, or fetched now.
pub async fn lookup(
    shard: &Shard,
    tenant: &Arc<TenantConfig>,
    db_user: &str,
) -> Result<Option<Arc<UserConfig>>, EngineError> {
    let key = (tenant.external_id.clone(), db_user.to_string());
    if let Some(c) = shard.auth_cache.borrow().get(&key) {
        if c.fetched.elapsed() < TTL {
            return Ok(c.user.clone());
        }
    }
    let user = fetch(shard, tenant, db_user).await?;
    shard.auth_cache.borrow_mut().insert(
        key,
        Cached {
            user: user.clone(),
            fetched: Instant::now(),
        },
    );
    Ok(user)
}

/// After a failed password check: forget the cached secret (at most once per
/// `MIN_REFETCH` per user), so that the next login sees a changed password.
pub fn invalidate(shard: &Shard, tenant: &str, db_user: &str) {
    let key = (tenant.to_string(), db_user.to_string());
    let mut cache = shard.auth_cache.borrow_mut();
    if cache
        .get(&key)
        .is_some_and(|c| c.fetched.elapsed() >= MIN_REFETCH)
    {
        cache.remove(&key);
    }
}

async fn fetch(
    shard: &Shard,
    tenant: &Arc<TenantConfig>,
    db_user: &str,
) -> Result<Option<Arc<UserConfig>>, EngineError> {
    let Some(manager) = tenant.manager.as_ref().and_then(|m| tenant.users.get(m)) else {
        return Ok(None);
    };
    let pool = shard.pool(tenant, manager, PoolMode::Transaction);
    let mut conn = pool.checkout(manager.checkout_timeout).await?;
    let row = conn
        .query_row(&tenant.auth_query, &[db_user], QUERY_TIMEOUT)
        .await;
    let row = match row {
        Ok(r) => {
            pool.checkin(conn);
            r
        }
        Err(e) => {
            drop(conn);
            return Err(e);
        }
    };
    let secret = row
        .and_then(|cols| cols.into_iter().nth(1).flatten())
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| parse_secret(&s));
    debug!(tenant = %tenant.external_id, user = db_user, found = secret.is_some(), "auth_query");
    Ok(secret.map(|s| Arc::new(tenant.fetched_user(db_user, s))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_recognised() {
        assert!(matches!(
            parse_secret("md53175bce1d3201d16594cebf9d7eb3f9d"),
            Some(FetchedSecret::Md5(_))
        ));
        assert!(parse_secret("md5nothex").is_none());
        assert!(parse_secret("plaintext").is_none());
        let scram = ScramSecret::from_password("pw", b"saltsaltsalt", 4096).encode();
        assert!(matches!(
            parse_secret(&scram),
            Some(FetchedSecret::Scram(_))
        ));
    }
}
