//! Read replicas: which replica serves a read (smooth weighted round robin
//! over the healthy ones, the primary when none is), and which replicas are
//! healthy.
//!
//! A tenant's replicas are judged on the shard that serves the tenant. A
//! replica is banned for the tenant's `replica_ban_ms` when a connection to
//! it cannot be opened, when its health check fails, or when its replay lag
//! is over `max_replica_lag_ms`; its share goes to the others meanwhile. The
//! health check runs every [`CHECK_EVERY`] on a connection of one of the
//! replica's pools (so only for replicas some client has used): an idle
//! connection that died is noticed, a new one is opened if the pool has
//! room, and the lag query runs on it. A failure during a check extends the
//! ban, so a replica takes clients again one ban period after it is well.
//! Lag bans a replica when two checks in a row find it over the maximum.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::{ReplicaConfig, Replication, TenantConfig};
use crate::error::EngineError;
use crate::metrics::ReplicaSnapshot;
use crate::pool::{Pool, PooledConn};
use crate::shard::Shard;

/// How often each replica's health is checked.
pub const CHECK_EVERY: Duration = Duration::from_millis(500);
/// How long a health check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive checks over `max_replica_lag_ms` that ban a replica.
const LAG_STRIKES: u8 = 2;

/// Milliseconds the replica's replay is behind: 0 when it has replayed all
/// it received (an idle primary sends nothing to replay), else the age of
/// the last transaction it replayed. 0 on a server that is not in recovery.
pub const LAG_QUERY: &str = "SELECT (CASE \
     WHEN NOT pg_is_in_recovery() THEN 0 \
     WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
     ELSE greatest(0, coalesce(floor(extract(epoch FROM \
          clock_timestamp() - pg_last_xact_replay_timestamp()) * 1000), 0)) \
     END)::bigint::text";

/// One replica of a tenant on this shard.
#[derive(Debug)]
pub struct Member {
    pub config: ReplicaConfig,
    /// `host:port`, the replica pools' `key.replica`.
    pub name: String,
    /// Smooth weighted round robin state.
    current: Cell<i64>,
    banned_until: Cell<Option<Instant>>,
    lag_ms: Cell<Option<u64>>,
    bans: Cell<u64>,
    routed: Cell<u64>,
    last_error: RefCell<Option<String>>,
    /// A health check is running.
    checking: Cell<bool>,
    /// Consecutive checks that found the lag over the maximum.
    lag_strikes: Cell<u8>,
}

impl Member {
    fn new(config: ReplicaConfig) -> Member {
        Member {
            name: config.name(),
            config,
            current: Cell::new(0),
            banned_until: Cell::new(None),
            lag_ms: Cell::new(None),
            bans: Cell::new(0),
            routed: Cell::new(0),
            last_error: RefCell::new(None),
            checking: Cell::new(false),
            lag_strikes: Cell::new(0),
        }
    }

    pub fn healthy(&self, now: Instant) -> bool {
        self.banned_until.get().is_none_or(|t| t <= now)
    }
}

/// A tenant's replicas on this shard.
#[derive(Debug)]
pub struct ReplicaSet {
    pub members: Vec<Member>,
    settings: Replication,
}

impl ReplicaSet {
    /// The set for `replication`, keeping what `old` knew of the replicas
    /// that stay (their bans and counters).
    pub fn new(replication: &Replication, old: Option<&ReplicaSet>) -> ReplicaSet {
        let members = replication
            .replicas
            .iter()
            .map(|r| {
                let m = Member::new(r.clone());
                if let Some(prev) = old.and_then(|o| o.members.iter().find(|p| p.name == m.name)) {
                    m.banned_until.set(prev.banned_until.get());
                    m.lag_ms.set(prev.lag_ms.get());
                    m.bans.set(prev.bans.get());
                    m.routed.set(prev.routed.get());
                    *m.last_error.borrow_mut() = prev.last_error.borrow().clone();
                }
                m
            })
            .collect();
        ReplicaSet {
            members,
            settings: replication.clone(),
        }
    }

    pub fn settings(&self) -> &Replication {
        &self.settings
    }

    /// The next healthy replica with a weight, by smooth weighted round
    /// robin (nginx's: each pick adds every weight to its member's credit,
    /// takes the member with the most, and charges it the total), so reads
    /// spread exactly by weight. `None`: no replica may serve.
    pub fn pick(&self, now: Instant) -> Option<usize> {
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, m) in self.members.iter().enumerate() {
            if m.config.weight == 0 || !m.healthy(now) {
                continue;
            }
            let w = i64::from(m.config.weight);
            m.current.set(m.current.get() + w);
            total += w;
            if best.is_none_or(|b| m.current.get() > self.members[b].current.get()) {
                best = Some(i);
            }
        }
        let b = best?;
        let m = &self.members[b];
        m.current.set(m.current.get() - total);
        Some(b)
    }

    /// Leaves a replica out for the ban period (counted once per ban).
    pub fn ban(&self, tenant: &str, i: usize, why: String) {
        let Some(m) = self.members.get(i) else {
            return;
        };
        let now = Instant::now();
        if m.healthy(now) {
            m.bans.set(m.bans.get() + 1);
            warn!(tenant, replica = %m.name, reason = %why, ban_ms = self.settings.ban.as_millis() as u64, "replica banned");
        }
        m.banned_until.set(Some(now + self.settings.ban));
        *m.last_error.borrow_mut() = Some(why);
    }

    pub fn snapshot(&self, tenant: &str) -> Vec<ReplicaSnapshot> {
        let now = Instant::now();
        self.members
            .iter()
            .map(|m| ReplicaSnapshot {
                tenant: tenant.to_string(),
                replica: m.name.clone(),
                weight: m.config.weight,
                healthy: m.healthy(now),
                banned_ms: m
                    .banned_until
                    .get()
                    .map_or(0, |t| t.saturating_duration_since(now).as_millis() as u64),
                lag_ms: m.lag_ms.get(),
                bans: m.bans.get(),
                routed: m.routed.get(),
                last_error: m.last_error.borrow().clone(),
            })
            .collect()
    }
}

/// Whether a client's transactions go to the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// Everything on the primary.
    Primary,
    /// Every transaction on a replica (`target_session_attrs=read-only`).
    Replicas,
    /// A transaction whose first batch is plain reads on a replica
    /// (`load_balance = "reads"`, transaction mode).
    Classify,
}

impl Reads {
    /// As `SHOW CLIENTS` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reads::Primary => "primary",
            Reads::Replicas => "replicas",
            Reads::Classify => "balanced",
        }
    }

    /// For a client of `tenant` whose startup asked for `target_session_attrs`.
    pub fn of(tenant: &TenantConfig, target: Option<&str>, transaction_mode: bool) -> Reads {
        if tenant.replication.replicas.is_empty() {
            return Reads::Primary;
        }
        match target.map(str::to_ascii_lowercase).as_deref() {
            Some("read-only" | "standby" | "prefer-standby") => Reads::Replicas,
            Some("read-write" | "primary") => Reads::Primary,
            _ if transaction_mode && tenant.replication.load_balance_reads => Reads::Classify,
            _ => Reads::Primary,
        }
    }
}

/// Whether a failed replica checkout says the replica is unwell (ban it and
/// try elsewhere) rather than busy.
fn unwell(e: &EngineError) -> bool {
    !matches!(e, EngineError::CheckoutTimeout(_))
}

/// A server connection for a read: from a healthy replica (weighted; one
/// that fails to connect is banned and the next is tried), else from the
/// primary.
pub async fn checkout_read(
    shard: &Shard,
    primary: &Rc<Pool>,
    wait: Duration,
) -> Result<PooledConn, EngineError> {
    let tenant = primary.tenant();
    if let Some(set) = shard.replica_set(&tenant) {
        for _ in 0..set.members.len() {
            let Some(i) = set.pick(Instant::now()) else {
                break;
            };
            let member = &set.members[i];
            let pool = shard.replica_pool(primary, &member.config);
            pool.follow(primary);
            match pool.checkout(wait).await {
                Ok(conn) => {
                    member.routed.set(member.routed.get() + 1);
                    return Ok(conn);
                }
                Err(e) if unwell(&e) => set.ban(&tenant.external_id, i, e.to_string()),
                Err(e) => return Err(e),
            }
        }
    }
    primary.checkout(wait).await
}

/// Checks the health of every replica of the tenants this shard serves that
/// has a pool here; runs every [`CHECK_EVERY`] for the shard's life.
pub async fn health_loop(shard: Rc<Shard>) {
    loop {
        glommio::timer::sleep(CHECK_EVERY).await;
        for (tenant, set, pools) in shard.replica_pools_to_check() {
            for (i, pool) in pools {
                let member = &set.members[i];
                if member.checking.replace(true) {
                    continue;
                }
                let (tenant, set) = (tenant.clone(), set.clone());
                shard.spawn(async move {
                    check(&tenant, &set, i, &pool).await;
                    set.members[i].checking.set(false);
                });
            }
        }
    }
}

/// One health check of member `i` through `pool`.
async fn check(tenant: &str, set: &ReplicaSet, i: usize, pool: &Rc<Pool>) {
    let member = &set.members[i];
    // No wait: a pool whose every connection is serving clients is busy,
    // not ill, and is checked next time.
    let mut conn = match pool.checkout(Duration::ZERO).await {
        Ok(c) => c,
        Err(e) if !unwell(&e) => return,
        Err(e) => return set.ban(tenant, i, e.to_string()),
    };
    let lag = conn.query_row(LAG_QUERY, &[], CHECK_TIMEOUT).await;
    let lag = match lag {
        Ok(Some(row)) => row
            .first()
            .and_then(|c| c.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok()),
        Ok(None) => None,
        Err(e) => {
            drop(conn);
            return set.ban(tenant, i, format!("health check failed: {e}"));
        }
    };
    let was_healthy = member.healthy(Instant::now());
    member.lag_ms.set(lag);
    let max = set.settings.max_lag;
    match lag {
        // Twice in a row: right after an idle primary writes again, a
        // replica that has received the WAL but not replayed it yet looks
        // as far behind as the primary was idle, for a moment.
        Some(ms) if !max.is_zero() && ms > max.as_millis() as u64 => {
            let strikes = member.lag_strikes.get().saturating_add(1);
            member.lag_strikes.set(strikes);
            if strikes >= LAG_STRIKES {
                set.ban(
                    tenant,
                    i,
                    format!(
                        "replication lag {ms} ms is over max_replica_lag_ms ({})",
                        max.as_millis()
                    ),
                );
            }
        }
        Some(_) => member.lag_strikes.set(0),
        None => set.ban(tenant, i, "health check: no lag reported".into()),
    }
    if !was_healthy && member.healthy(Instant::now()) {
        info!(tenant, replica = %member.name, "replica healthy again");
    }
    pool.checkin(conn);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(weights: &[u32]) -> ReplicaSet {
        let replication = Replication {
            replicas: weights
                .iter()
                .enumerate()
                .map(|(i, w)| ReplicaConfig {
                    host: "127.0.0.1".into(),
                    port: 5000 + i as u16,
                    weight: *w,
                    pool_size: None,
                })
                .collect(),
            load_balance_reads: true,
            max_lag: Duration::from_secs(1),
            ban: Duration::from_secs(60),
        };
        ReplicaSet::new(&replication, None)
    }

    fn spread(s: &ReplicaSet, picks: usize) -> Vec<usize> {
        let mut n = vec![0; s.members.len()];
        for _ in 0..picks {
            n[s.pick(Instant::now()).unwrap()] += 1;
        }
        n
    }

    #[test]
    fn reads_spread_exactly_by_weight() {
        assert_eq!(spread(&set(&[3, 1]), 400), [300, 100]);
        assert_eq!(spread(&set(&[1, 1, 2]), 400), [100, 100, 200]);
        // Interleaved, not in runs: any 4 picks of 3:1 hold both.
        let s = set(&[3, 1]);
        let first: Vec<usize> = (0..4).map(|_| s.pick(Instant::now()).unwrap()).collect();
        assert!(first.contains(&1), "{first:?}");
        // Weight 0 takes nothing.
        assert_eq!(spread(&set(&[0, 2]), 10), [0, 10]);
        assert_eq!(set(&[0]).pick(Instant::now()), None);
    }

    #[test]
    fn a_banned_replica_gets_nothing_until_the_ban_ends() {
        let s = set(&[1, 1]);
        s.ban("t", 0, "refused".into());
        s.ban("t", 0, "refused again".into());
        assert_eq!(spread(&s, 10), [0, 10]);
        let snap = s.snapshot("t");
        assert!(!snap[0].healthy && snap[1].healthy);
        assert_eq!(snap[0].bans, 1, "one ban, extended");
        assert_eq!(snap[0].last_error.as_deref(), Some("refused again"));
        assert!(snap[0].banned_ms > 59_000);
        s.ban("t", 1, "refused".into());
        assert_eq!(
            s.pick(Instant::now()),
            None,
            "none healthy: the primary serves"
        );
        // The ban ends.
        assert!(s.members[0].healthy(Instant::now() + Duration::from_secs(61)));
        // A new configuration keeps what is known of replicas that stay.
        let mut r = s.settings().clone();
        r.replicas.remove(1);
        let again = ReplicaSet::new(&r, Some(&s));
        assert_eq!(again.members.len(), 1);
        assert!(!again.members[0].healthy(Instant::now()));
        assert_eq!(again.snapshot("t")[0].bans, 1);
    }

    fn tenant() -> TenantConfig {
        TenantConfig {
            external_id: "t".into(),
            db_host: "127.0.0.1".into(),
            db_port: 5432,
            db_database: "postgres".into(),
            client_auth: crate::config::ClientAuth::ScramSha256,
            users: Default::default(),
            require_user: true,
            auth_query: String::new(),
            manager: None,
            default_pool_size: 1,
            default_max_clients: 1,
            default_checkout_timeout: Duration::from_secs(1),
            enforce_ssl: false,
            sni_hostname: None,
            upstream_tls: None,
            allow_list: Vec::new(),
            timeouts: Default::default(),
            replication: Default::default(),
        }
    }

    #[test]
    fn who_reads_where() {
        let mut t = tenant();
        assert_eq!(Reads::of(&t, Some("read-only"), true), Reads::Primary);
        t.replication = set(&[1]).settings().clone();
        assert_eq!(Reads::of(&t, Some("read-only"), true), Reads::Replicas);
        assert_eq!(Reads::of(&t, Some("Standby"), false), Reads::Replicas);
        assert_eq!(Reads::of(&t, Some("read-write"), true), Reads::Primary);
        assert_eq!(Reads::of(&t, None, true), Reads::Classify);
        assert_eq!(Reads::of(&t, None, false), Reads::Primary);
        t.replication.load_balance_reads = false;
        assert_eq!(Reads::of(&t, None, true), Reads::Primary);
    }
}
