//! What the nodes of a cluster tell each other for the cluster-wide views
//! (`/api/pools?scope=cluster`, `/metrics?scope=cluster`, the admin
//! console): questions and answers carried by the cluster's authenticated
//! node-to-node link (`ClusterNode::query`), JSON-encoded.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use engine::metrics::{ShardInspection, ShardSnapshot};
use engine::shard::ShardMsg;

use crate::model::LoadBalance;
use crate::node::Node;
use crate::plane::{ClusterPools, NodeAnswered, PlaneError, PoolView};

/// How long a cluster-wide view waits for each other node.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a PAUSE waits for a node (its shards wait up to 30 s for
/// running transactions).
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(40);
/// How long a node's shards may take to answer an inspection.
const INSPECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A question one node asks another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerQuery {
    /// Its pools, replicas and tenants; with `inspect`, its clients and
    /// server connections too.
    Report {
        inspect: bool,
    },
    /// PAUSE a tenant on that node (answered once its transactions ended,
    /// or after the pause wait).
    Pause {
        tenant: String,
    },
    Resume {
        tenant: String,
    },
    /// Re-read its config file (as SIGHUP).
    Reload,
}

/// The answer to a [`PeerQuery`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerAnswer {
    Report(Box<NodeReport>),
    /// Server connections of the tenant still in use when the pause wait ended.
    Paused {
        busy: usize,
    },
    /// Whether the tenant was paused there.
    Resumed {
        was_paused: bool,
    },
    /// The reload failed: why.
    Reloaded(Result<(), String>),
}

/// One node's view of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: u64,
    pub version: String,
    pub shards: Vec<ShardSnapshot>,
    /// Clients and server connections, when asked for.
    #[serde(default)]
    pub inspections: Vec<ShardInspection>,
    pub tenants: Vec<TenantSummary>,
}

/// A tenant as `SHOW TENANTS` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantSummary {
    pub id: String,
    pub db_host: String,
    pub db_port: u16,
    pub db_database: String,
    pub default_pool_size: usize,
    pub users: usize,
    /// `host:port*weight` of each replica.
    pub replicas: Vec<String>,
    /// "off" | "reads"
    pub load_balance: String,
    pub paused: bool,
}

impl NodeReport {
    /// Whether `tenant` is PAUSEd on this node.
    pub fn is_paused(&self, tenant: &str) -> bool {
        self.shards
            .iter()
            .any(|s| s.paused.iter().any(|t| t == tenant))
    }
}

/// One node's part of a cluster-wide view: its report, or why it is missing.
#[derive(Debug, Clone)]
pub struct NodeResult<T> {
    pub node: u64,
    pub result: Result<T, String>,
}

/// Encodes a question or an answer for the node-to-node link.
pub fn encode<T: Serialize>(value: &T) -> String {
    // Plain data: serializing cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

/// Decodes a question or an answer from the node-to-node link.
pub fn decode<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, String> {
    serde_json::from_str(text).map_err(|e| format!("undecodable message: {e}"))
}

impl Node {
    /// This node's report.
    pub fn report(&self, inspect: bool) -> Result<NodeReport, PlaneError> {
        let shards = self.gather()?;
        let inspections = if inspect { self.inspect()? } else { Vec::new() };
        let paused = |t: &str| shards.iter().any(|s| s.paused.iter().any(|p| p == t));
        let tenants = self
            .store
            .tenants()?
            .into_iter()
            .map(|(id, spec)| TenantSummary {
                paused: paused(&id),
                id,
                db_host: spec.db_host,
                db_port: spec.db_port,
                db_database: spec.db_database,
                default_pool_size: spec.default_pool_size,
                users: spec.users.len(),
                replicas: spec
                    .replicas
                    .iter()
                    .map(|r| format!("{}:{}*{}", r.host, r.port, r.weight))
                    .collect(),
                load_balance: match spec.load_balance {
                    LoadBalance::Off => "off".into(),
                    LoadBalance::Reads => "reads".into(),
                },
            })
            .collect();
        Ok(NodeReport {
            node: self.cluster.id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            shards,
            inspections,
            tenants,
        })
    }

    /// Every shard's clients and server connections.
    fn inspect(&self) -> Result<Vec<ShardInspection>, PlaneError> {
        let (tx, rx) = crossbeam_channel::bounded(self.shards.len());
        self.broadcast(|| ShardMsg::Inspect(tx.clone()))?;
        drop(tx);
        let deadline = Instant::now() + INSPECT_TIMEOUT;
        let mut out = Vec::with_capacity(self.shards.len());
        while out.len() < self.shards.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(s) => out.push(s),
                Err(_) => {
                    return Err(PlaneError::Unavailable(format!(
                        "{} of {} shards answered",
                        out.len(),
                        self.shards.len()
                    )))
                }
            }
        }
        out.sort_by_key(|s| s.shard);
        Ok(out)
    }

    /// PAUSE on this node's shards: the server connections still in use
    /// when they stopped waiting.
    fn pause_here(&self, tenant: &str) -> Result<usize, PlaneError> {
        let (tx, rx) = crossbeam_channel::bounded(self.shards.len());
        self.broadcast(|| ShardMsg::Pause {
            tenant: tenant.to_string(),
            reply: tx.clone(),
        })?;
        drop(tx);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut busy = 0;
        for answered in 0..self.shards.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            busy += rx.recv_timeout(left).map_err(|_| {
                PlaneError::Unavailable(format!(
                    "{answered} of {} shards confirmed the pause",
                    self.shards.len()
                ))
            })?;
        }
        Ok(busy)
    }

    /// RESUME on this node's shards: whether any had the tenant paused.
    fn resume_here(&self, tenant: &str) -> Result<bool, PlaneError> {
        let (tx, rx) = crossbeam_channel::bounded(self.shards.len());
        self.broadcast(|| ShardMsg::Resume {
            tenant: tenant.to_string(),
            reply: tx.clone(),
        })?;
        drop(tx);
        let deadline = Instant::now() + INSPECT_TIMEOUT;
        let mut was = false;
        for answered in 0..self.shards.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            was |= rx.recv_timeout(left).map_err(|_| {
                PlaneError::Unavailable(format!(
                    "{answered} of {} shards confirmed the resume",
                    self.shards.len()
                ))
            })?;
        }
        Ok(was)
    }

    /// This node's answer to another node's question (blocking: run it off
    /// the runtime's workers).
    pub fn answer_peer(&self, query: &PeerQuery) -> Result<PeerAnswer, String> {
        let e = |e: PlaneError| e.to_string();
        Ok(match query {
            PeerQuery::Report { inspect } => {
                PeerAnswer::Report(Box::new(self.report(*inspect).map_err(e)?))
            }
            PeerQuery::Pause { tenant } => PeerAnswer::Paused {
                busy: self.pause_here(tenant).map_err(e)?,
            },
            PeerQuery::Resume { tenant } => PeerAnswer::Resumed {
                was_paused: self.resume_here(tenant).map_err(e)?,
            },
            PeerQuery::Reload => PeerAnswer::Reloaded(self.reload_file()),
        })
    }

    /// Every member's answer to `query`, in node order: this node's
    /// computed here, the others' asked over the node-to-node link at once,
    /// each within `timeout` (blocking: run it off the runtime's workers).
    pub fn ask_all(&self, query: &PeerQuery, timeout: Duration) -> Vec<NodeResult<PeerAnswer>> {
        let me = self.cluster.id();
        let body = encode(query);
        let asked: Vec<(
            u64,
            tokio::task::JoinHandle<Result<String, cluster::ClusterError>>,
        )> = self
            .cluster
            .members()
            .into_keys()
            .filter(|id| *id != me)
            .map(|id| {
                let (cluster, body) = (self.cluster.clone(), body.clone());
                let ask = self
                    .rt
                    .spawn(async move { cluster.query(id, body, timeout).await });
                (id, ask)
            })
            .collect();
        let mut out = vec![NodeResult {
            node: me,
            result: self.answer_peer(query),
        }];
        for (node, ask) in asked {
            let result = match self.rt.block_on(ask) {
                Ok(Ok(text)) => decode::<Result<PeerAnswer, String>>(&text).and_then(|r| r),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("asking node {node}: {e}")),
            };
            out.push(NodeResult { node, result });
        }
        out.sort_by_key(|r| r.node);
        out
    }

    /// Every member's report (see [`Node::ask_all`]).
    pub fn cluster_reports(&self, inspect: bool) -> Vec<NodeResult<NodeReport>> {
        self.ask_all(&PeerQuery::Report { inspect }, PEER_TIMEOUT)
            .into_iter()
            .map(|r| NodeResult {
                node: r.node,
                result: r.result.and_then(|a| match a {
                    PeerAnswer::Report(report) => Ok(*report),
                    other => Err(format!("unexpected answer {other:?}")),
                }),
            })
            .collect()
    }
}

/// Answers the other nodes' [`PeerQuery`]s.
pub struct PeerQueries(pub Weak<Node>);

impl cluster::QueryHandler for PeerQueries {
    fn answer(
        &self,
        body: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>> {
        let node = self.0.clone();
        Box::pin(async move {
            let query: PeerQuery = decode(&body)?;
            let answered = tokio::task::spawn_blocking(move || {
                let node: Arc<Node> = node.upgrade().ok_or("the node is stopping")?;
                node.answer_peer(&query)
            })
            .await
            .map_err(|e| format!("answering: {e}"))?;
            // The answer's own failure travels inside, so that the asker
            // tells "answered: no" from "could not ask".
            Ok(encode(&answered))
        })
    }
}

/// `/api/pools?scope=cluster` from the members' reports.
pub fn cluster_pools(reports: &[NodeResult<NodeReport>]) -> ClusterPools {
    let mut data = Vec::new();
    let mut nodes = Vec::new();
    for r in reports {
        nodes.push(NodeAnswered {
            node_id: r.node,
            ok: r.result.is_ok(),
            error: r.result.as_ref().err().cloned(),
        });
        let Ok(report) = &r.result else { continue };
        for shard in &report.shards {
            for p in shard.pools.iter().filter(|p| p.pool_size > 0) {
                data.push(PoolView {
                    node: report.node,
                    replica: p.replica.clone(),
                    tenant: p.tenant.clone(),
                    db_user: p.user.clone(),
                    mode: p.mode.to_string(),
                    shard: shard.shard,
                    pool_size: p.pool_size,
                    server_connections: p.server_connections,
                    idle: p.idle,
                    checked_out: p.checked_out,
                    clients: p.clients,
                    waiting: p.waiting,
                });
            }
        }
    }
    data.sort_by(|a, b| {
        (a.node, &a.tenant, &a.db_user, &a.mode, &a.replica)
            .cmp(&(b.node, &b.tenant, &b.db_user, &b.mode, &b.replica))
    });
    ClusterPools { data, nodes }
}

/// `/metrics?scope=cluster` from the members' reports.
pub fn cluster_metrics(reports: &[NodeResult<NodeReport>], tenant: Option<&str>) -> String {
    let nodes: Vec<crate::metrics::NodeShards<'_>> = reports
        .iter()
        .map(|r| match &r.result {
            Ok(report) => crate::metrics::NodeShards::Node(r.node, &report.shards),
            Err(_) => crate::metrics::NodeShards::Down(r.node),
        })
        .collect();
    crate::metrics::encode_nodes(&nodes, tenant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_and_answers_round_trip() {
        for q in [
            PeerQuery::Report { inspect: true },
            PeerQuery::Pause {
                tenant: "t1".into(),
            },
            PeerQuery::Reload,
        ] {
            assert_eq!(decode::<PeerQuery>(&encode(&q)), Ok(q));
        }
        let a = PeerAnswer::Report(Box::new(NodeReport {
            node: 2,
            version: "0.1.0".into(),
            shards: vec![],
            inspections: vec![],
            tenants: vec![TenantSummary {
                id: "t1".into(),
                db_host: "h".into(),
                db_port: 5432,
                db_database: "postgres".into(),
                default_pool_size: 3,
                users: 1,
                replicas: vec!["h2:5432*1".into()],
                load_balance: "reads".into(),
                paused: false,
            }],
        }));
        assert_eq!(decode::<PeerAnswer>(&encode(&a)), Ok(a));
        assert!(decode::<PeerQuery>("{\"Nope\":1}").is_err());
    }
}
