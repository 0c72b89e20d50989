//! Counters kept by each shard in its own cells (no atomics shared between
//! cores on the hot path), and the plain snapshots a scrape gathers.

use std::cell::Cell;
use std::time::Duration;

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
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
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

/// One pool on one shard, as gathered by a scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSnapshot {
    pub tenant: String,
    pub user: String,
    /// "transaction" | "session"
    pub mode: &'static str,
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
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardCounters {
    /// Connections this shard accepted and handed to another shard.
    pub handoffs_out: u64,
    /// Connections handed to this shard by others.
    pub handoffs_in: u64,
    /// Client tasks alive (logged-in clients).
    pub clients: u64,
    /// Tasks spawned on this shard since start.
    pub tasks_spawned: u64,
    /// Times the executor's lag probe woke more than 10 ms late.
    pub stalls: u64,
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
#[derive(Debug, Clone, PartialEq)]
pub struct ShardSnapshot {
    pub shard: usize,
    pub counters: ShardCounters,
    pub pools: Vec<PoolSnapshot>,
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
