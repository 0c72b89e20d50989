//! Prometheus text exposition of the shards' metric snapshots (`GET /metrics`,
//! `GET /metrics/{tenant}`), and a small parser of that format for tests.
//!
//! Each shard keeps its counters in its own cells; a scrape gathers one
//! [`ShardSnapshot`] per shard and [`encode`] sums the pools that share
//! (tenant, user, mode, db_name) across shards. The text is produced by
//! `prometheus-client` (a [`Collector`] of const metrics encoded with
//! [`prometheus_text::encode`], the Prometheus 0.0.4 format), never by
//! hand-built lines, so label values are escaped.
//!
//! Counter naming: `prometheus-client` appends `_total` to every series of a
//! `counter`-typed family, while Supavisor's dashboards query the bare names
//! (`supavisor_client_joins_ok`, ...). The monotonic counters are therefore
//! declared `untyped` (`MetricType::Unknown`), which the crate encodes under
//! the exact name; `rate()`/`increase()` work on untyped series the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use engine::metrics::{HistogramSnapshot, PoolSnapshot, ShardCounters, ShardSnapshot};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// `Content-Type` of what [`encode`] returns.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Labels of every per-pool series, in this order.
pub const POOL_LABELS: [&str; 4] = ["tenant", "user", "mode", "db_name"];

/// Prometheus text exposition of gathered shard snapshots. `tenant`: only that
/// tenant's series (engine-health series and `supavisor_tenants_active` are
/// left out then).
pub fn encode(shards: &[ShardSnapshot], tenant: Option<&str>) -> String {
    encode_nodes(&[NodeShards::Local(shards)], tenant)
}

/// One node's part of a cluster-wide scrape.
pub enum NodeShards<'a> {
    /// A single node's own scrape: no `node` label.
    Local(&'a [ShardSnapshot]),
    /// A node of a cluster-wide scrape: every series carries `node`.
    Node(u64, &'a [ShardSnapshot]),
    /// A node that did not answer: `supavisor_cluster_node_up{node} 0`.
    Down(u64),
}

/// Prometheus text of several nodes' snapshots (a cluster-wide scrape,
/// `/metrics?scope=cluster`): each node's series carry its `node` label, and
/// `supavisor_cluster_node_up` says which nodes answered.
pub fn encode_nodes(nodes: &[NodeShards<'_>], tenant: Option<&str>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(Gathered::new(nodes, tenant))));
    let mut out = String::new();
    if let Err(e) = prometheus_text::encode(&mut out, &registry) {
        // Writing into a String cannot fail; a collector error would be a bug.
        tracing::error!("encoding metrics failed: {e}");
    }
    out
}

/// (node, tenant, user, mode, db_name)
type PoolKey = (Option<String>, String, String, &'static str, String);

/// (node, tenant, user, mode, replica)
type ReplicaPoolKey = (Option<String>, String, String, &'static str, String);

/// (node, tenant, replica)
type ReplicaKey = (Option<String>, String, String);

/// A replica pool summed over shards: (open, idle, checked out, waiting).
#[derive(Debug, Clone, Default)]
struct ReplicaPoolTotals {
    open: u64,
    idle: u64,
    checked_out: u64,
    waiting: u64,
}

/// A replica's health as its tenant's shard judges it.
#[derive(Debug, Clone, Default)]
struct ReplicaHealth {
    healthy: bool,
    lag_ms: Option<u64>,
    bans: u64,
    routed: u64,
}

/// One pool summed over all shards.
#[derive(Debug, Clone)]
struct PoolTotals {
    pool_size: u64,
    server_connections: u64,
    idle: u64,
    checked_out: u64,
    clients: u64,
    waiting: u64,
    joins_ok: u64,
    joins_fail: u64,
    client_recv: u64,
    client_send: u64,
    db_recv: u64,
    db_send: u64,
    queries: u64,
    prepared_hits: u64,
    prepared_misses: u64,
    prepared_evictions: u64,
    reconnect_waits: u64,
    query_duration: HistogramSnapshot,
    checkout_duration: HistogramSnapshot,
    client_connection_duration: HistogramSnapshot,
}

impl PoolTotals {
    fn from_pool(p: &PoolSnapshot) -> PoolTotals {
        PoolTotals {
            pool_size: p.pool_size as u64,
            server_connections: p.server_connections as u64,
            idle: p.idle as u64,
            checked_out: p.checked_out as u64,
            clients: p.clients as u64,
            waiting: p.waiting as u64,
            joins_ok: p.joins_ok,
            joins_fail: p.joins_fail,
            client_recv: p.client_recv,
            client_send: p.client_send,
            db_recv: p.db_recv,
            db_send: p.db_send,
            queries: p.queries,
            prepared_hits: p.prepared_hits,
            prepared_misses: p.prepared_misses,
            prepared_evictions: p.prepared_evictions,
            reconnect_waits: p.reconnect_waits,
            query_duration: p.query_duration.clone(),
            checkout_duration: p.checkout_duration.clone(),
            client_connection_duration: p.client_connection_duration.clone(),
        }
    }

    fn add(&mut self, p: &PoolSnapshot) {
        self.pool_size += p.pool_size as u64;
        self.server_connections += p.server_connections as u64;
        self.idle += p.idle as u64;
        self.checked_out += p.checked_out as u64;
        self.clients += p.clients as u64;
        self.waiting += p.waiting as u64;
        self.joins_ok = self.joins_ok.wrapping_add(p.joins_ok);
        self.joins_fail = self.joins_fail.wrapping_add(p.joins_fail);
        self.client_recv = self.client_recv.wrapping_add(p.client_recv);
        self.client_send = self.client_send.wrapping_add(p.client_send);
        self.db_recv = self.db_recv.wrapping_add(p.db_recv);
        self.db_send = self.db_send.wrapping_add(p.db_send);
        self.queries = self.queries.wrapping_add(p.queries);
        self.prepared_hits = self.prepared_hits.wrapping_add(p.prepared_hits);
        self.prepared_misses = self.prepared_misses.wrapping_add(p.prepared_misses);
        self.prepared_evictions = self.prepared_evictions.wrapping_add(p.prepared_evictions);
        self.reconnect_waits = self.reconnect_waits.wrapping_add(p.reconnect_waits);
        merge(&mut self.query_duration, &p.query_duration);
        merge(&mut self.checkout_duration, &p.checkout_duration);
        merge(
            &mut self.client_connection_duration,
            &p.client_connection_duration,
        );
    }
}

/// `HistogramSnapshot::merge` zips the counts; only merge like with like.
fn merge(into: &mut HistogramSnapshot, other: &HistogramSnapshot) {
    if into.bounds == other.bounds && into.counts.len() == other.counts.len() {
        into.merge(other);
    } else {
        tracing::warn!("not merging histograms with different buckets");
    }
}

/// What one scrape exposes, gathered from the snapshots.
#[derive(Debug)]
struct Gathered {
    pools: BTreeMap<PoolKey, PoolTotals>,
    replica_pools: BTreeMap<ReplicaPoolKey, ReplicaPoolTotals>,
    replicas: BTreeMap<ReplicaKey, ReplicaHealth>,
    /// Engine health per (node, shard); `None` for a per-tenant scrape.
    shards: Option<Vec<(Option<String>, String, ShardCounters)>>,
    /// Distinct tenants with at least one pool, per node; `None` for a
    /// per-tenant scrape.
    tenants_active: Option<Vec<(Option<String>, u64)>>,
    /// Nodes of a cluster-wide scrape and whether each answered.
    nodes_up: Vec<(String, bool)>,
}

impl Gathered {
    fn new(nodes: &[NodeShards<'_>], tenant: Option<&str>) -> Gathered {
        let mut g = Gathered {
            pools: BTreeMap::new(),
            replica_pools: BTreeMap::new(),
            replicas: BTreeMap::new(),
            shards: tenant.is_none().then(Vec::new),
            tenants_active: tenant.is_none().then(Vec::new),
            nodes_up: Vec::new(),
        };
        for n in nodes {
            let (node, shards) = match n {
                NodeShards::Local(s) => (None, *s),
                NodeShards::Node(id, s) => {
                    g.nodes_up.push((id.to_string(), true));
                    (Some(id.to_string()), *s)
                }
                NodeShards::Down(id) => {
                    g.nodes_up.push((id.to_string(), false));
                    continue;
                }
            };
            g.add_node(node, shards, tenant);
        }
        g
    }

    fn add_node(&mut self, node: Option<String>, shards: &[ShardSnapshot], tenant: Option<&str>) {
        let wanted = |t: &str| tenant.is_none_or(|want| want == t);
        for p in shards.iter().flat_map(|s| &s.pools) {
            if !wanted(&p.tenant) {
                continue;
            }
            if let Some(replica) = &p.replica {
                let key = (
                    node.clone(),
                    p.tenant.clone(),
                    p.user.clone(),
                    p.mode,
                    replica.clone(),
                );
                let t = self.replica_pools.entry(key).or_default();
                t.open += p.server_connections as u64;
                t.idle += p.idle as u64;
                t.checked_out += p.checked_out as u64;
                t.waiting += p.waiting as u64;
                continue;
            }
            let key = (
                node.clone(),
                p.tenant.clone(),
                p.user.clone(),
                p.mode,
                p.db_name.clone(),
            );
            match self.pools.get_mut(&key) {
                Some(t) => t.add(p),
                None => {
                    self.pools.insert(key, PoolTotals::from_pool(p));
                }
            }
        }
        for r in shards.iter().flat_map(|s| &s.replicas) {
            if !wanted(&r.tenant) {
                continue;
            }
            let key = (node.clone(), r.tenant.clone(), r.replica.clone());
            let h = self.replicas.entry(key).or_default();
            h.healthy = r.healthy;
            h.lag_ms = r.lag_ms;
            h.bans += r.bans;
            h.routed += r.routed;
        }
        if let Some(health) = &mut self.shards {
            let mut by_shard: Vec<&ShardSnapshot> = shards.iter().collect();
            by_shard.sort_by_key(|s| s.shard);
            health.extend(
                by_shard
                    .iter()
                    .map(|s| (node.clone(), s.shard.to_string(), s.counters.clone())),
            );
        }
        if let Some(active) = &mut self.tenants_active {
            // Real pools only: a snapshot that just carries failed joins has size 0.
            let tenants: BTreeSet<&str> = self
                .pools
                .iter()
                .filter(|(k, t)| k.0 == node && t.pool_size > 0)
                .map(|(k, _)| k.1.as_str())
                .collect();
            active.push((node, tenants.len() as u64));
        }
    }
}

/// A gathered histogram as a metric; buckets from the snapshot's bounds
/// (the encoder makes them cumulative and adds `+Inf`).
struct Hist<'a>(&'a HistogramSnapshot);

impl EncodeMetric for Hist<'_> {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        let h = self.0;
        let buckets: Vec<(f64, u64)> = h
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(h.counts.iter().copied())
            .collect();
        encoder.encode_histogram::<NoLabelSet>(h.sum, h.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// One family: its descriptor, then one series per label set.
fn family<L, M>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    series: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result
where
    L: EncodeLabelSet,
    M: EncodeMetric,
{
    let mut series = series.into_iter().peekable();
    if series.peek().is_none() {
        return Ok(());
    }
    let mut metric = enc.encode_descriptor(name, help, None, metric_type)?;
    for (labels, m) in series {
        m.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

#[derive(Debug)]
struct SnapshotCollector(Gathered);

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// `node` first when the scrape is cluster-wide.
fn with_node<'a>(node: &'a Option<String>, mut labels: Labels<'a>) -> Labels<'a> {
    if let Some(n) = node {
        labels.insert(0, ("node", n.as_str()));
    }
    labels
}

fn pool_labels(k: &PoolKey) -> Labels<'_> {
    with_node(
        &k.0,
        vec![
            (POOL_LABELS[0], k.1.as_str()),
            (POOL_LABELS[1], k.2.as_str()),
            (POOL_LABELS[2], k.3),
            (POOL_LABELS[3], k.4.as_str()),
        ],
    )
}

fn replica_pool_labels(k: &ReplicaPoolKey) -> Labels<'_> {
    with_node(
        &k.0,
        vec![
            ("tenant", k.1.as_str()),
            ("user", k.2.as_str()),
            ("mode", k.3),
            ("replica", k.4.as_str()),
        ],
    )
}

fn replica_labels(k: &ReplicaKey) -> Labels<'_> {
    with_node(
        &k.0,
        vec![("tenant", k.1.as_str()), ("replica", k.2.as_str())],
    )
}

/// Replica pools: (name, help, value).
type ReplicaPoolSeries = (&'static str, &'static str, fn(&ReplicaPoolTotals) -> u64);

const REPLICA_POOL_GAUGES: &[ReplicaPoolSeries] = &[
    (
        "supavisor_replica_connections_open",
        "Server connections open to a replica.",
        |t| t.open,
    ),
    (
        "supavisor_replica_connections_idle",
        "Idle server connections to a replica.",
        |t| t.idle,
    ),
    (
        "supavisor_replica_connections_checked_out",
        "Server connections to a replica checked out by clients.",
        |t| t.checked_out,
    ),
    (
        "supavisor_replica_waiting",
        "Clients waiting for a server connection to a replica.",
        |t| t.waiting,
    ),
];

/// Monotonic counters, exposed `untyped` so the name carries no `_total`
/// (see the module docs).
/// (name, help, value)
type PoolSeries = (&'static str, &'static str, fn(&PoolTotals) -> u64);
type PoolHistogram = (
    &'static str,
    &'static str,
    fn(&PoolTotals) -> &HistogramSnapshot,
);
/// (name, help, monotonic?, value)
type ShardSeries = (&'static str, &'static str, bool, fn(&ShardCounters) -> u64);

const POOL_COUNTERS: &[PoolSeries] = &[
    (
        "supavisor_client_joins_ok",
        "Client logins that reached a pool.",
        |t| t.joins_ok,
    ),
    (
        "supavisor_client_joins_fail",
        "Client logins that failed (authentication, limits).",
        |t| t.joins_fail,
    ),
    (
        "supavisor_client_network_recv",
        "Bytes received from clients.",
        |t| t.client_recv,
    ),
    (
        "supavisor_client_network_send",
        "Bytes sent to clients.",
        |t| t.client_send,
    ),
    (
        "supavisor_db_network_recv",
        "Bytes received from the database.",
        |t| t.db_recv,
    ),
    (
        "supavisor_db_network_send",
        "Bytes sent to the database.",
        |t| t.db_send,
    ),
    (
        "supavisor_client_queries_count",
        "Queries run by clients (ReadyForQuery sent).",
        |t| t.queries,
    ),
    (
        "supavisor_prepared_statements_hits",
        "Named statements found already prepared on the server connection (transaction mode).",
        |t| t.prepared_hits,
    ),
    (
        "supavisor_prepared_statements_misses",
        "Named statements that had to be prepared on a server connection (transaction mode).",
        |t| t.prepared_misses,
    ),
    (
        "supavisor_prepared_statements_evictions",
        "Statements closed to keep a server connection's cache bounded (transaction mode).",
        |t| t.prepared_evictions,
    ),
    (
        "supavisor_db_reconnect_waits",
        "New server connections retried because the database was unreachable (clients waited).",
        |t| t.reconnect_waits,
    ),
];

const POOL_HISTOGRAMS: &[PoolHistogram] = &[
    (
        "supavisor_client_query_duration",
        "Query duration in seconds.",
        |t| &t.query_duration,
    ),
    (
        "supavisor_pool_checkout_duration",
        "Time to check out a server connection, in seconds.",
        |t| &t.checkout_duration,
    ),
    (
        "supavisor_client_connection_duration",
        "Client connection lifetime in seconds.",
        |t| &t.client_connection_duration,
    ),
];

const POOL_GAUGES: &[PoolSeries] = &[
    (
        "supavisor_pool_connections_checked_out",
        "Server connections checked out by clients.",
        |t| t.checked_out,
    ),
    (
        "supavisor_pool_connections_idle",
        "Idle server connections.",
        |t| t.idle,
    ),
    (
        "supavisor_pool_connections_open",
        "Server connections open.",
        |t| t.server_connections,
    ),
    (
        "supavisor_pool_clients",
        "Clients connected to the pool.",
        |t| t.clients,
    ),
    (
        "supavisor_pool_waiting",
        "Clients waiting for a server connection.",
        |t| t.waiting,
    ),
    (
        "supavisor_pool_size",
        "Configured pool size (summed over shards).",
        |t| t.pool_size,
    ),
    (
        "supavisor_connections_active",
        "Active client connections.",
        |t| t.clients,
    ),
];

/// Engine health per shard: (name, help, monotonic?, value).
const SHARD_SERIES: &[ShardSeries] = &[
    (
        "supavisor_shard_handoffs_in",
        "Connections handed to this shard by others.",
        true,
        |c| c.handoffs_in,
    ),
    (
        "supavisor_shard_handoffs_out",
        "Connections this shard accepted and handed to another.",
        true,
        |c| c.handoffs_out,
    ),
    (
        "supavisor_shard_clients",
        "Logged-in clients on this shard (parked ones included).",
        false,
        |c| c.clients,
    ),
    (
        "supavisor_shard_tasks_spawned",
        "Tasks spawned on this shard since start.",
        true,
        |c| c.tasks_spawned,
    ),
    (
        "supavisor_shard_stalls",
        "Times this shard's executor was stalled by a task that did not yield.",
        true,
        |c| c.stalls,
    ),
    (
        "supavisor_shard_clients_parked",
        "Idle clients parked on this shard (no task; socket in the shard's epoll set).",
        false,
        |c| c.parked,
    ),
    (
        "supavisor_shard_refused",
        "Logins refused before a pool was chosen.",
        true,
        |c| c.refused,
    ),
    (
        "supavisor_websocket_clients",
        "WebSocket connections open on this shard (upgraded, not yet closed).",
        false,
        |c| c.websocket_open,
    ),
    (
        "supavisor_websocket_upgrades",
        "WebSocket upgrades answered 101 Switching Protocols.",
        true,
        |c| c.websocket_upgrades,
    ),
    (
        "supavisor_websocket_rejected",
        "WebSocket upgrades refused (bad request, TLS failure, startup timeout).",
        true,
        |c| c.websocket_rejected,
    ),
];

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let g = &self.0;
        for (name, help, get) in POOL_COUNTERS {
            family(
                &mut enc,
                name,
                help,
                MetricType::Unknown,
                g.pools
                    .iter()
                    .map(|(k, t)| (pool_labels(k), ConstCounter::new(get(t)))),
            )?;
        }
        for (name, help, get) in POOL_HISTOGRAMS {
            family(
                &mut enc,
                name,
                help,
                MetricType::Histogram,
                g.pools.iter().map(|(k, t)| (pool_labels(k), Hist(get(t)))),
            )?;
        }
        for (name, help, get) in POOL_GAUGES {
            family(
                &mut enc,
                name,
                help,
                MetricType::Gauge,
                g.pools
                    .iter()
                    .map(|(k, t)| (pool_labels(k), ConstGauge::new(get(t)))),
            )?;
        }
        for (name, help, get) in REPLICA_POOL_GAUGES {
            family(
                &mut enc,
                name,
                help,
                MetricType::Gauge,
                g.replica_pools
                    .iter()
                    .map(|(k, t)| (replica_pool_labels(k), ConstGauge::new(get(t)))),
            )?;
        }
        family(
            &mut enc,
            "supavisor_replica_healthy",
            "1 while a replica takes clients, 0 while it is banned.",
            MetricType::Gauge,
            g.replicas
                .iter()
                .map(|(k, h)| (replica_labels(k), ConstGauge::new(u64::from(h.healthy)))),
        )?;
        family(
            &mut enc,
            "supavisor_replica_lag_seconds",
            "Replay lag of a replica at its last health check.",
            MetricType::Gauge,
            g.replicas.iter().filter_map(|(k, h)| {
                let lag = h.lag_ms? as f64 / 1000.0;
                Some((replica_labels(k), ConstGauge::new(lag)))
            }),
        )?;
        family(
            &mut enc,
            "supavisor_replica_bans",
            "Times a replica was banned (connection refused, failed health check, lag).",
            MetricType::Unknown,
            g.replicas
                .iter()
                .map(|(k, h)| (replica_labels(k), ConstCounter::new(h.bans))),
        )?;
        family(
            &mut enc,
            "supavisor_replica_transactions",
            "Transactions (and session-mode clients) a replica served.",
            MetricType::Unknown,
            g.replicas
                .iter()
                .map(|(k, h)| (replica_labels(k), ConstCounter::new(h.routed))),
        )?;
        if let Some(active) = &g.tenants_active {
            family(
                &mut enc,
                "supavisor_tenants_active",
                "Tenants with at least one pool.",
                MetricType::Gauge,
                active
                    .iter()
                    .map(|(node, n)| (with_node(node, Vec::new()), ConstGauge::new(*n))),
            )?;
        }
        family(
            &mut enc,
            "supavisor_cluster_node_up",
            "Cluster-wide scrape: 1 when the node answered, 0 when it did not.",
            MetricType::Gauge,
            g.nodes_up
                .iter()
                .map(|(n, up)| ([("node", n.as_str())], ConstGauge::new(u64::from(*up)))),
        )?;
        if let Some(shards) = &g.shards {
            for (name, help, monotonic, get) in SHARD_SERIES {
                let series = shards
                    .iter()
                    .map(|(node, s, c)| (with_node(node, vec![("shard", s.as_str())]), get(c)));
                if *monotonic {
                    family(
                        &mut enc,
                        name,
                        help,
                        MetricType::Unknown,
                        series.map(|(l, v)| (l, ConstCounter::new(v))),
                    )?;
                } else {
                    family(
                        &mut enc,
                        name,
                        help,
                        MetricType::Gauge,
                        series.map(|(l, v)| (l, ConstGauge::new(v))),
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// One parsed sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// Whether every `(key, value)` of `want` is among this sample's labels.
    pub fn has_labels(&self, want: &[(&str, &str)]) -> bool {
        want.iter()
            .all(|(k, v)| self.labels.get(*k).map(String::as_str) == Some(*v))
    }
}

/// A line of the exposition format that could not be parsed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {why}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub why: &'static str,
    pub text: String,
}

/// Parses Prometheus text exposition; malformed lines are skipped (use
/// [`try_parse_text`] to see them). Comments (`# HELP`, `# TYPE`) are skipped.
pub fn parse_text(text: &str) -> Vec<Sample> {
    text.lines()
        .filter_map(|l| parse_line(l).ok().flatten())
        .collect()
}

/// Parses Prometheus text exposition, failing on the first malformed line.
pub fn try_parse_text(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        match parse_line(l) {
            Ok(Some(s)) => out.push(s),
            Ok(None) => {}
            Err(why) => {
                return Err(ParseError {
                    line: i + 1,
                    why,
                    text: l.to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// Sum of the values of the samples named `name` that carry all of `labels`
/// (0 when none do).
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && s.has_labels(labels))
        .map(|s| s.value)
        .sum()
}

/// The value of the one sample named `name` with all of `labels`, `None` when
/// there is no such sample or more than one.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut it = samples
        .iter()
        .filter(|s| s.name == name && s.has_labels(labels));
    match (it.next(), it.next()) {
        (Some(s), None) => Some(s.value),
        _ => None,
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    is_name_start(c) || c.is_ascii_digit()
}

/// Splits a leading metric or label name off `s`.
fn take_name(s: &str) -> Option<(&str, &str)> {
    if !s.starts_with(is_name_start) {
        return None;
    }
    let end = s.find(|c| !is_name_char(c)).unwrap_or(s.len());
    Some(s.split_at(end))
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

fn parse_line(line: &str) -> Result<Option<Sample>, &'static str> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let (name, mut rest) = take_name(line).ok_or("bad metric name")?;
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r.trim_start();
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let (key, r) = take_name(rest).ok_or("bad label name")?;
            let r = r.trim_start().strip_prefix('=').ok_or("expected '='")?;
            let r = r.trim_start().strip_prefix('"').ok_or("expected '\"'")?;
            let (val, r) = take_label_value(r)?;
            if labels.insert(key.to_string(), val).is_some() {
                return Err("duplicate label");
            }
            rest = r.trim_start();
            if let Some(r) = rest.strip_prefix(',') {
                rest = r.trim_start();
            } else if !rest.starts_with('}') {
                return Err("expected ',' or '}'");
            }
        }
    }
    if !rest.starts_with([' ', '\t']) {
        return Err("expected whitespace before the value");
    }
    let mut fields = rest.split_whitespace();
    let value = fields
        .next()
        .and_then(parse_value)
        .ok_or("bad sample value")?;
    // An optional timestamp (milliseconds) may follow.
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().map_err(|_| "bad timestamp")?;
    }
    if fields.next().is_some() {
        return Err("trailing garbage");
    }
    Ok(Some(Sample {
        name: name.to_string(),
        labels,
        value,
    }))
}

/// Reads an escaped label value after its opening quote; returns it unescaped
/// and the text after the closing quote.
fn take_label_value(s: &str) -> Result<(String, &str), &'static str> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => out.push('\\'),
                Some((_, '"')) => out.push('"'),
                Some((_, 'n')) => out.push('\n'),
                _ => return Err("bad escape in label value"),
            },
            '\n' => return Err("newline in label value"),
            c => out.push(c),
        }
    }
    Err("unterminated label value")
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::metrics::{Histogram, DURATION_BUCKETS, LIFETIME_BUCKETS};
    use std::time::Duration;

    const EVIL: &str = "ev\"il\\ten\nant";

    fn hist(bounds: &'static [f64], secs: &[f64]) -> HistogramSnapshot {
        let h = Histogram::new(bounds);
        for s in secs {
            h.observe(Duration::from_secs_f64(*s));
        }
        h.snapshot()
    }

    /// A pool whose counters are all `base`, gauges small multiples of `g`.
    fn pool(tenant: &str, user: &str, mode: &'static str, base: u64, g: usize) -> PoolSnapshot {
        PoolSnapshot {
            tenant: tenant.into(),
            user: user.into(),
            mode,
            replica: None,
            paused: false,
            db_name: "postgres".into(),
            pool_size: 10,
            server_connections: 3 * g,
            idle: g,
            checked_out: 2 * g,
            clients: 4 * g,
            waiting: g,
            joins_ok: base,
            joins_fail: base + 1,
            client_recv: base * 100,
            client_send: base * 200,
            db_recv: base * 300,
            db_send: base * 400,
            queries: base * 10,
            prepared_hits: base * 3,
            prepared_misses: base,
            prepared_evictions: 0,
            reconnect_waits: 0,
            query_duration: hist(DURATION_BUCKETS, &[0.0001, 0.003, 0.003, 100.0]),
            checkout_duration: hist(DURATION_BUCKETS, &[0.0002]),
            client_connection_duration: hist(LIFETIME_BUCKETS, &[5.0]),
        }
    }

    fn shards() -> Vec<ShardSnapshot> {
        vec![
            ShardSnapshot {
                shard: 0,
                counters: ShardCounters {
                    handoffs_out: 7,
                    handoffs_in: 1,
                    clients: 4,
                    tasks_spawned: 40,
                    stalls: 0,
                    parked: 0,
                    refused: 2,
                    websocket_open: 5,
                    websocket_upgrades: 9,
                    websocket_rejected: 1,
                },
                pools: vec![
                    pool("t1", "postgres", "transaction", 1, 1),
                    pool(EVIL, "u\"x", "session", 5, 2),
                ],
                replicas: vec![],
                paused: vec![],
            },
            ShardSnapshot {
                shard: 1,
                counters: ShardCounters {
                    handoffs_out: 0,
                    handoffs_in: 7,
                    clients: 3,
                    tasks_spawned: 30,
                    stalls: 1,
                    parked: 0,
                    refused: 0,
                    ..Default::default()
                },
                pools: vec![
                    pool("t1", "postgres", "transaction", 2, 3),
                    pool("t1", "postgres", "session", 3, 1),
                ],
                replicas: vec![],
                paused: vec![],
            },
        ]
    }

    const T1TX: &[(&str, &str)] = &[
        ("tenant", "t1"),
        ("user", "postgres"),
        ("mode", "transaction"),
        ("db_name", "postgres"),
    ];

    fn parsed(tenant: Option<&str>) -> (String, Vec<Sample>) {
        let text = encode(&shards(), tenant);
        let samples = match try_parse_text(&text) {
            Ok(s) => s,
            Err(e) => panic!("{e}\n{text}"),
        };
        (text, samples)
    }

    #[test]
    fn counters_keep_supavisor_names_and_sum_across_shards() {
        let (text, s) = parsed(None);
        let v = |name| value(&s, name, T1TX).unwrap_or_else(|| panic!("{name}\n{text}"));
        assert_eq!(v("supavisor_client_joins_ok"), 3.0);
        assert_eq!(v("supavisor_client_joins_fail"), 5.0);
        assert_eq!(v("supavisor_client_network_recv"), 300.0);
        assert_eq!(v("supavisor_client_network_send"), 600.0);
        assert_eq!(v("supavisor_db_network_recv"), 900.0);
        assert_eq!(v("supavisor_db_network_send"), 1200.0);
        assert_eq!(v("supavisor_client_queries_count"), 30.0);
        assert!(!text.contains("_total"), "{text}");
        assert!(
            text.contains("# TYPE supavisor_client_queries_count untyped\n"),
            "{text}"
        );
        // The session pool of t1 is its own series.
        assert_eq!(
            value(
                &s,
                "supavisor_client_queries_count",
                &[("mode", "session"), ("tenant", "t1")]
            ),
            Some(30.0)
        );
        // Every per-pool sample has exactly the four labels.
        for x in s.iter().filter(|x| x.name.starts_with("supavisor_client")) {
            let keys: Vec<&str> = x.labels.keys().map(String::as_str).collect();
            let want: &[&str] = if x.name.ends_with("_bucket") {
                &["db_name", "le", "mode", "tenant", "user"]
            } else {
                &["db_name", "mode", "tenant", "user"]
            };
            assert_eq!(keys, want, "{x:?}");
        }
    }

    #[test]
    fn gauges_sum_across_shards() {
        let (_, s) = parsed(None);
        let v = |name| value(&s, name, T1TX).unwrap();
        assert_eq!(v("supavisor_pool_size"), 20.0);
        assert_eq!(v("supavisor_pool_connections_open"), 12.0);
        assert_eq!(v("supavisor_pool_connections_idle"), 4.0);
        assert_eq!(v("supavisor_pool_connections_checked_out"), 8.0);
        assert_eq!(v("supavisor_pool_clients"), 16.0);
        assert_eq!(v("supavisor_connections_active"), 16.0);
        assert_eq!(v("supavisor_pool_waiting"), 4.0);
        assert_eq!(value(&s, "supavisor_tenants_active", &[]), Some(2.0));
        let t = s
            .iter()
            .find(|x| x.name == "supavisor_tenants_active")
            .unwrap();
        assert!(t.labels.is_empty());
    }

    #[test]
    fn histograms_are_cumulative_with_count_and_sum() {
        let (text, s) = parsed(None);
        let name = "supavisor_client_query_duration";
        // Two shards, each observed 0.0001, 0.003, 0.003, 100.
        assert_eq!(value(&s, &format!("{name}_count"), T1TX), Some(8.0));
        let sum = value(&s, &format!("{name}_sum"), T1TX).unwrap();
        assert!((sum - 2.0 * 100.0061).abs() < 1e-9, "{sum}");
        let mut buckets: Vec<(f64, f64)> = s
            .iter()
            .filter(|x| x.name == format!("{name}_bucket") && x.has_labels(T1TX))
            .map(|x| (parse_value(&x.labels["le"]).unwrap(), x.value))
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(buckets.len(), DURATION_BUCKETS.len() + 1, "{text}");
        for ((le, _), b) in buckets.iter().zip(DURATION_BUCKETS) {
            assert_eq!(le, b);
        }
        let at = |le: f64| buckets.iter().find(|b| b.0 == le).unwrap().1;
        assert_eq!(at(0.0005), 2.0);
        assert_eq!(at(0.001), 2.0);
        assert_eq!(at(0.0025), 2.0);
        assert_eq!(at(0.005), 6.0);
        assert_eq!(at(60.0), 6.0);
        assert_eq!(at(f64::INFINITY), 8.0);
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1));
        // Lifetime buckets are their own.
        let life = "supavisor_client_connection_duration_bucket";
        assert_eq!(
            s.iter()
                .filter(|x| x.name == life && x.has_labels(T1TX))
                .count(),
            LIFETIME_BUCKETS.len() + 1
        );
        assert_eq!(
            value(&s, life, &[T1TX, &[("le", "10")]].concat()),
            Some(2.0),
            "{text}"
        );
        assert!(text.contains("# TYPE supavisor_pool_checkout_duration histogram\n"));
    }

    #[test]
    fn label_values_are_escaped_and_round_trip() {
        let (text, s) = parsed(None);
        assert!(text.contains(r#"tenant="ev\"il\\ten\nant""#), "{text}");
        assert!(text.contains(r#"user="u\"x""#), "{text}");
        let evil = [("tenant", EVIL), ("user", "u\"x"), ("mode", "session")];
        assert_eq!(
            value(&s, "supavisor_client_queries_count", &evil),
            Some(50.0)
        );
        assert_eq!(value(&s, "supavisor_pool_clients", &evil), Some(8.0));
        // No line was broken by the newline inside the tenant id.
        assert_eq!(parse_text(&text).len(), s.len());
    }

    #[test]
    fn engine_health_per_shard() {
        let (text, s) = parsed(None);
        let v = |name, shard| value(&s, name, &[("shard", shard)]).unwrap();
        assert_eq!(v("supavisor_shard_handoffs_out", "0"), 7.0);
        assert_eq!(v("supavisor_shard_handoffs_in", "1"), 7.0);
        assert_eq!(v("supavisor_shard_clients", "0"), 4.0);
        assert_eq!(v("supavisor_shard_tasks_spawned", "1"), 30.0);
        assert_eq!(v("supavisor_shard_stalls", "1"), 1.0);
        assert_eq!(v("supavisor_shard_refused", "0"), 2.0);
        assert!(text.contains("# TYPE supavisor_shard_clients gauge\n"));
        assert!(text.contains("# TYPE supavisor_shard_stalls untyped\n"));
        assert_eq!(v("supavisor_websocket_clients", "0"), 5.0);
        assert_eq!(v("supavisor_websocket_upgrades", "0"), 9.0);
        assert_eq!(v("supavisor_websocket_rejected", "0"), 1.0);
        assert_eq!(v("supavisor_websocket_clients", "1"), 0.0);
        assert!(text.contains("# TYPE supavisor_websocket_clients gauge\n"));
    }

    #[test]
    fn tenant_filter_keeps_only_that_tenant() {
        let (text, s) = parsed(Some("t1"));
        assert!(!s.is_empty());
        for x in &s {
            assert_eq!(
                x.labels.get("tenant").map(String::as_str),
                Some("t1"),
                "{x:?}"
            );
        }
        assert!(!text.contains("supavisor_shard_"), "{text}");
        assert!(!text.contains("supavisor_tenants_active"), "{text}");
        assert_eq!(
            value(&s, "supavisor_client_queries_count", T1TX),
            Some(30.0)
        );
        let (_, evil) = parsed(Some(EVIL));
        assert!(evil.iter().all(|x| x.labels["tenant"] == EVIL));
        assert_eq!(sum(&evil, "supavisor_client_joins_ok", &[]), 5.0);
        // Unknown tenant: nothing (the API answers 404 before calling us).
        assert!(parse_text(&encode(&shards(), Some("nope"))).is_empty());
    }

    #[test]
    fn failed_joins_alone_do_not_make_a_tenant_active() {
        let mut sh = shards();
        let mut ghost = pool("ghost", "postgres", "transaction", 0, 0);
        ghost.pool_size = 0;
        ghost.joins_fail = 3;
        sh[1].pools.push(ghost);
        let s = try_parse_text(&encode(&sh, None)).unwrap();
        assert_eq!(value(&s, "supavisor_tenants_active", &[]), Some(2.0));
        let ghost = [("tenant", "ghost")];
        assert_eq!(value(&s, "supavisor_client_joins_fail", &ghost), Some(3.0));
    }

    /// Shard 1 of `shards()` also serves t1's replica 10.0.0.2:5432.
    fn with_replica() -> Vec<ShardSnapshot> {
        let mut sh = shards();
        let mut rp = pool("t1", "postgres", "transaction", 0, 1);
        rp.replica = Some("10.0.0.2:5432".into());
        rp.clients = 0;
        sh[1].pools.push(rp);
        sh[1].replicas.push(engine::metrics::ReplicaSnapshot {
            tenant: "t1".into(),
            replica: "10.0.0.2:5432".into(),
            weight: 2,
            healthy: false,
            banned_ms: 900,
            lag_ms: Some(1500),
            bans: 3,
            routed: 42,
            last_error: Some("connection refused".into()),
        });
        sh
    }

    #[test]
    fn replicas_have_series_of_their_own() {
        let text = encode(&with_replica(), None);
        let s = try_parse_text(&text).unwrap();
        let r = [("tenant", "t1"), ("replica", "10.0.0.2:5432")];
        assert_eq!(value(&s, "supavisor_replica_healthy", &r), Some(0.0));
        assert_eq!(value(&s, "supavisor_replica_lag_seconds", &r), Some(1.5));
        assert_eq!(value(&s, "supavisor_replica_bans", &r), Some(3.0));
        assert_eq!(value(&s, "supavisor_replica_transactions", &r), Some(42.0));
        let rp = [("mode", "transaction"), ("user", "postgres")];
        let rp = [&r[..], &rp[..]].concat();
        assert_eq!(
            value(&s, "supavisor_replica_connections_open", &rp),
            Some(3.0)
        );
        assert_eq!(
            value(&s, "supavisor_replica_connections_idle", &rp),
            Some(1.0)
        );
        assert_eq!(
            value(&s, "supavisor_replica_connections_checked_out", &rp),
            Some(2.0)
        );
        // The primary's series are those of before: the replica pool is not in them.
        assert_eq!(
            value(&s, "supavisor_pool_connections_open", T1TX),
            Some(12.0)
        );
        // Per tenant too.
        let t1 = try_parse_text(&encode(&with_replica(), Some("t1"))).unwrap();
        assert_eq!(value(&t1, "supavisor_replica_bans", &r), Some(3.0));
        assert!(try_parse_text(&encode(&with_replica(), Some(EVIL)))
            .unwrap()
            .iter()
            .all(|x| !x.name.starts_with("supavisor_replica")));
    }

    #[test]
    fn cluster_scrape_names_each_node() {
        let (one, two) = (shards(), with_replica());
        let text = encode_nodes(
            &[
                NodeShards::Node(1, &one),
                NodeShards::Node(2, &two),
                NodeShards::Down(3),
            ],
            None,
        );
        let s = try_parse_text(&text).unwrap();
        for (node, up) in [("1", 1.0), ("2", 1.0), ("3", 0.0)] {
            assert_eq!(
                value(&s, "supavisor_cluster_node_up", &[("node", node)]),
                Some(up),
                "{text}"
            );
        }
        let q = "supavisor_client_queries_count";
        assert_eq!(value(&s, q, &[&[("node", "1")], T1TX].concat()), Some(30.0));
        assert_eq!(value(&s, q, &[&[("node", "2")], T1TX].concat()), Some(30.0));
        assert_eq!(sum(&s, q, T1TX), 60.0);
        // Every series of a cluster scrape names its node.
        assert!(s.iter().all(|x| x.labels.contains_key("node")), "{text}");
        assert_eq!(
            value(&s, "supavisor_tenants_active", &[("node", "2")]),
            Some(2.0)
        );
        assert_eq!(
            value(
                &s,
                "supavisor_shard_clients",
                &[("node", "2"), ("shard", "1")]
            ),
            Some(3.0)
        );
        assert_eq!(
            value(&s, "supavisor_replica_bans", &[("node", "2")]),
            Some(3.0)
        );
    }

    #[test]
    fn snapshots_cross_the_wire() {
        let sh = with_replica();
        let json = serde_json::to_string(&sh).unwrap();
        let back: Vec<ShardSnapshot> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sh);
        // Unknown buckets or modes are refused, not guessed.
        let bad = json.replace("\"transaction\"", "\"statement\"");
        assert!(serde_json::from_str::<Vec<ShardSnapshot>>(&bad).is_err());
        let bad = json.replacen("0.0005", "0.0006", 1);
        assert!(serde_json::from_str::<Vec<ShardSnapshot>>(&bad).is_err());
    }

    #[test]
    fn empty_scrape() {
        let s = try_parse_text(&encode(&[], None)).unwrap();
        assert_eq!(
            s,
            vec![Sample {
                name: "supavisor_tenants_active".into(),
                labels: BTreeMap::new(),
                value: 0.0
            }]
        );
    }

    #[test]
    fn parser_handles_the_format() {
        let text = "# HELP a x\n# TYPE a counter\n\na 1\nb{x=\"1\",y=\"a\\\\b\\\"c\\nd\",} 2.5 1700000000000\n\
                    c{le=\"+Inf\"} +Inf\nd NaN\n  e{ } -3e-2\n";
        let s = try_parse_text(text).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].name, "a");
        assert_eq!(s[0].value, 1.0);
        assert_eq!(s[1].labels["y"], "a\\b\"c\nd");
        assert_eq!(s[1].value, 2.5);
        assert_eq!(s[2].value, f64::INFINITY);
        assert!(s[3].value.is_nan());
        assert_eq!(s[4].value, -0.03);
        for bad in [
            "1a 1",
            "a{x=\"1} 1",
            "a{x=\"\\q\"} 1",
            "a{x=1} 1",
            "a{x=\"1\"y=\"2\"} 1",
            "a",
            "a{x=\"1\"}1",
            "a one",
            "a 1 2 3",
            "a{x=\"1\",x=\"2\"} 1",
        ] {
            assert!(try_parse_text(bad).is_err(), "{bad:?}");
            assert!(parse_text(bad).is_empty(), "{bad:?}");
        }
        let e = try_parse_text("ok 1\nbad").unwrap_err();
        assert_eq!(e.line, 2);
    }
}
