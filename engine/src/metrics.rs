//! Counters kept by each shard in its own cells (no atomics shared between
//! cores on the hot path), and the plain snapshots a scrape gathers.

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Histogram bucket upper bounds, in seconds.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Connection-lifetime bucket upper bounds, in seconds.
pub const LIFETIME_BUCKETS: &[f64] = &[
    0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

/// A histogram in a shard's cells.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound plus the +Inf bucket; not cumulative.
    counts: Vec<Cell<u64>>,
    sum: Cell<f64>,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| Cell::new(0)).collect(),
            sum: Cell::new(0.0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.partition_point(|b| *b < secs);
        let c = &self.counts[i];
        c.set(c.get() + 1);
        self.sum.set(self.sum.get() + secs);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            counts: self.counts.iter().map(Cell::get).collect(),
            sum: self.sum.get(),
        }
    }
}

/// A gathered histogram: `counts[i]` observations fell in `(bounds[i-1], bounds[i]]`,
/// the last count is above every bound (+Inf). Not cumulative.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    #[serde(with = "known_bounds")]
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds another snapshot with the same bounds.
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
    }
}

pub fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get().wrapping_add(n));
}

/// Per-pool counters.
#[derive(Debug)]
pub struct PoolStats {
    pub joins_ok: Cell<u64>,
    pub joins_fail: Cell<u64>,
    pub client_recv: Cell<u64>,
    pub client_send: Cell<u64>,
    pub db_recv: Cell<u64>,
    pub db_send: Cell<u64>,
    pub queries: Cell<u64>,
    /// Named statements already prepared on the server connection used.
    pub prepared_hits: Cell<u64>,
    /// Named statements that had to be prepared (Parse sent or injected).
    pub prepared_misses: Cell<u64>,
    /// Statements closed to keep a server connection's cache bounded.
    pub prepared_evictions: Cell<u64>,
    /// New connections retried because the database was unreachable.
    pub reconnect_waits: Cell<u64>,
    pub query_duration: Histogram,
    pub checkout_duration: Histogram,
    pub client_connection_duration: Histogram,
}

impl Default for PoolStats {
    fn default() -> Self {
        PoolStats {
            joins_ok: Cell::new(0),
            joins_fail: Cell::new(0),
            client_recv: Cell::new(0),
            client_send: Cell::new(0),
            db_recv: Cell::new(0),
            db_send: Cell::new(0),
            queries: Cell::new(0),
            prepared_hits: Cell::new(0),
            prepared_misses: Cell::new(0),
            prepared_evictions: Cell::new(0),
            reconnect_waits: Cell::new(0),
            query_duration: Histogram::new(DURATION_BUCKETS),
            checkout_duration: Histogram::new(DURATION_BUCKETS),
            client_connection_duration: Histogram::new(LIFETIME_BUCKETS),
        }
    }
}

/// A pool mode's name (an alias, so that serde does not take the field
/// for text borrowed from the input).
pub type ModeName = &'static str;

/// One pool on one shard, as gathered by a scrape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSnapshot {
    pub tenant: String,
    pub user: String,
    /// "transaction" | "session"
    #[serde(with = "known_mode")]
    pub mode: ModeName,
    /// A replica's pool (`host:port`); `None`: the primary's, which also
    /// carries the client-side counters of every client of (tenant, user,
    /// mode) wherever its transactions ran.
    #[serde(default)]
    pub replica: Option<String>,
    /// PAUSEd from the admin console.
    #[serde(default)]
    pub paused: bool,
    pub db_name: String,
    pub pool_size: usize,
    pub server_connections: usize,
    pub idle: usize,
    pub checked_out: usize,
    pub clients: usize,
    pub waiting: usize,
    pub joins_ok: u64,
    pub joins_fail: u64,
    pub client_recv: u64,
    pub client_send: u64,
    pub db_recv: u64,
    pub db_send: u64,
    pub queries: u64,
    pub prepared_hits: u64,
    pub prepared_misses: u64,
    pub prepared_evictions: u64,
    pub reconnect_waits: u64,
    pub query_duration: HistogramSnapshot,
    pub checkout_duration: HistogramSnapshot,
    pub client_connection_duration: HistogramSnapshot,
}

impl PoolSnapshot {
    /// A (tenant, user, mode) that has no pool: only failed logins to report.
    pub fn empty(key: &crate::pool::PoolKey, db_name: String, joins_fail: u64) -> PoolSnapshot {
        let stats = PoolStats::default();
        PoolSnapshot {
            tenant: key.tenant.clone(),
            user: key.user.clone(),
            mode: key.mode.as_str(),
            replica: key.replica.clone(),
            paused: false,
            db_name,
            pool_size: 0,
            server_connections: 0,
            idle: 0,
            checked_out: 0,
            clients: 0,
            waiting: 0,
            joins_ok: 0,
            joins_fail,
            client_recv: 0,
            client_send: 0,
            db_recv: 0,
            db_send: 0,
            queries: 0,
            prepared_hits: 0,
            prepared_misses: 0,
            prepared_evictions: 0,
            reconnect_waits: 0,
            query_duration: stats.query_duration.snapshot(),
            checkout_duration: stats.checkout_duration.snapshot(),
            client_connection_duration: stats.client_connection_duration.snapshot(),
        }
    }
}

/// Engine health of one shard.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardCounters {
    /// Connections this shard accepted and handed to another shard.
    pub handoffs_out: u64,
    /// Connections handed to this shard by others.
    pub handoffs_in: u64,
    /// Logged-in clients (parked ones included).
    pub clients: u64,
    /// Tasks spawned on this shard since start.
    pub tasks_spawned: u64,
    /// Times the executor's lag probe woke more than 10 ms late.
    pub stalls: u64,
    /// Idle clients parked now (no task, socket in the epoll set).
    #[serde(default)]
    pub parked: u64,
    /// Connections refused before a pool was chosen (unknown tenant, garbage...).
    pub refused: u64,
    /// WebSocket connections open (upgraded, not closed).
    pub websocket_open: u64,
    /// WebSocket upgrades answered 101 since start.
    pub websocket_upgrades: u64,
    /// WebSocket upgrades refused (bad request, TLS failure, timeout).
    pub websocket_rejected: u64,
}

/// Everything one shard reports to a scrape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardSnapshot {
    pub shard: usize,
    pub counters: ShardCounters,
    pub pools: Vec<PoolSnapshot>,
    /// Health of the replicas of the tenants this shard serves.
    #[serde(default)]
    pub replicas: Vec<ReplicaSnapshot>,
    /// Tenants PAUSEd on this shard.
    #[serde(default)]
    pub paused: Vec<String>,
}

/// One replica of one tenant, as its shard sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaSnapshot {
    pub tenant: String,
    /// `host:port`
    pub replica: String,
    pub weight: u32,
    /// Not banned: it takes clients.
    pub healthy: bool,
    /// How much longer the ban lasts (0 when healthy).
    pub banned_ms: u64,
    /// Replay lag at the last health check; `None`: not measured yet.
    pub lag_ms: Option<u64>,
    /// Times it was banned.
    pub bans: u64,
    /// Transactions (and session-mode clients) it served.
    pub routed: u64,
    /// Why it was last banned.
    pub last_error: Option<String>,
}

/// A logged-in client, for the admin console (`SHOW CLIENTS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub tenant: String,
    pub user: String,
    pub mode: String,
    /// "active" (a request running), "idle in transaction", "idle", "waiting".
    pub state: String,
    pub addr: Option<SocketAddr>,
    /// Unix seconds.
    pub connect_time: u64,
    /// The process id the pooler issued to it (its cancel key).
    pub pid: i32,
    pub application_name: String,
    /// Where its transactions go: "primary", "replicas" (it asked with
    /// `target_session_attrs`), "balanced" (`load_balance = "reads"`).
    pub reads: String,
}

/// A server connection, for the admin console (`SHOW SERVERS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub tenant: String,
    pub user: String,
    pub mode: String,
    /// `None`: the primary.
    pub replica: Option<String>,
    /// "idle" or "active".
    pub state: String,
    pub addr: SocketAddr,
    pub backend_pid: i32,
    /// Unix seconds.
    pub connect_time: u64,
}

/// Clients and server connections of one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInspection {
    pub shard: usize,
    pub clients: Vec<ClientInfo>,
    pub servers: Vec<ServerInfo>,
}

/// Histogram bounds cross the wire as numbers and come back as the
/// constant they equal.
mod known_bounds {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &&'static [f64], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(b.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<&'static [f64], D::Error> {
        let v = Vec::<f64>::deserialize(d)?;
        [super::DURATION_BUCKETS, super::LIFETIME_BUCKETS]
            .into_iter()
            .find(|b| *b == v.as_slice())
            .ok_or_else(|| serde::de::Error::custom("unknown histogram buckets"))
    }
}

/// A pool mode crosses the wire as its name.
mod known_mode {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &&'static str, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(m)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
        match String::deserialize(d)?.as_str() {
            "transaction" => Ok("transaction"),
            "session" => Ok("session"),
            other => Err(serde::de::Error::custom(format!(
                "unknown pool mode {other:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_merge() {
        let h = Histogram::new(DURATION_BUCKETS);
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(100));
        let mut s = h.snapshot();
        assert_eq!(s.count(), 3);
        assert_eq!(s.counts[0], 1);
        assert_eq!(s.counts[3], 1);
        assert_eq!(*s.counts.last().unwrap(), 1);
        let other = s.clone();
        s.merge(&other);
        assert_eq!(s.count(), 6);
    }
}
