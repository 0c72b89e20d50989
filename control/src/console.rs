//! The admin console's commands (the shards speak its protocol, see
//! `engine::console`): who is an admin, and the answers — cluster-wide,
//! each row naming its node, with a warning for each node that did not
//! answer. Column names follow PgBouncer's where it has the same thing.

use std::sync::{Arc, OnceLock, Weak};

use engine::console::{Answer, Command, Failure, Reply, Show, HELP};
use engine::shard::ShardMsg;
use tokio::runtime::Handle;

use crate::api::TokenCheck;
use crate::node::Node;
use crate::plane::PlaneError;
use crate::report::{NodeReport, NodeResult, PeerAnswer, PeerQuery, PAUSE_TIMEOUT, PEER_TIMEOUT};

/// What the shards call for the console.
pub struct Hooks {
    node: OnceLock<Weak<Node>>,
    rt: Handle,
    /// API tokens (signed with `API_JWT_SECRET`) are the console's passwords.
    tokens: Option<TokenCheck>,
}

impl Hooks {
    /// `api_secret`: the API's JWT secret; without one nobody is an admin.
    pub fn new(rt: Handle, api_secret: Option<&str>) -> Hooks {
        Hooks {
            node: OnceLock::new(),
            rt,
            tokens: api_secret.and_then(TokenCheck::new),
        }
    }

    /// The node the commands run on (set once it exists).
    pub fn attach(&self, node: &Arc<Node>) {
        let _ = self.node.set(Arc::downgrade(node));
    }
}

impl engine::config::ConsoleHooks for Hooks {
    fn admit(&self, password: &str) -> bool {
        self.tokens
            .as_ref()
            .is_some_and(|t| t.verify(password).is_ok())
    }

    fn run(&self, command: Command, shard: usize, token: u64) {
        let node = self.node.get().and_then(Weak::upgrade);
        self.rt.spawn_blocking(move || {
            let Some(node) = node else { return };
            let reply = run(&node, command);
            if let Some(h) = node.shards.get(shard) {
                let _ = h.send(ShardMsg::Console {
                    token,
                    reply: Box::new(reply),
                });
            }
        });
    }
}

fn failure(sqlstate: &str, message: impl Into<String>) -> Failure {
    Failure {
        sqlstate: sqlstate.into(),
        message: message.into(),
    }
}

/// Runs a command (blocking: off the runtime's workers).
pub fn run(node: &Node, command: Command) -> Reply {
    match command {
        Command::Show(Show::Help) => Ok(Answer {
            columns: vec!["command".into()],
            rows: HELP
                .split("; ")
                .map(|c| vec![Some(c.to_string())])
                .collect(),
            tag: "SHOW".into(),
            ..Answer::default()
        }),
        Command::Show(what) => {
            let inspect = matches!(what, Show::Clients | Show::Servers);
            let reports = node.cluster_reports(inspect);
            let ok: Vec<&NodeReport> = reports
                .iter()
                .filter_map(|r| r.result.as_ref().ok())
                .collect();
            let mut answer = match what {
                Show::Pools => pools(&ok),
                Show::Clients => clients(&ok),
                Show::Servers => servers(&ok),
                Show::Stats => stats(&ok),
                Show::Tenants => tenants(&ok),
                Show::Replicas => replicas(&ok),
                Show::Version | Show::Help => version(&ok),
            };
            answer.notices = missing(&reports);
            answer.tag = "SHOW".into();
            Ok(answer)
        }
        Command::Pause(tenant) | Command::Resume(tenant)
            if matches!(node_tenant(node, &tenant), Ok(false)) =>
        {
            Err(failure(
                "3D000",
                format!("tenant \"{tenant}\" does not exist"),
            ))
        }
        Command::Pause(tenant) => {
            let results = node.ask_all(&PeerQuery::Pause { tenant }, PAUSE_TIMEOUT);
            let mut notices = missing(&results);
            for r in &results {
                if let Ok(PeerAnswer::Paused { busy }) = &r.result {
                    if *busy > 0 {
                        notices.push(format!(
                            "node {}: {busy} server connections still in use after the pause wait; new transactions wait",
                            r.node
                        ));
                    }
                }
            }
            Ok(command_tag("PAUSE", notices))
        }
        Command::Resume(tenant) => {
            let results = node.ask_all(&PeerQuery::Resume { tenant }, PEER_TIMEOUT);
            Ok(command_tag("RESUME", missing(&results)))
        }
        Command::Reload => {
            let results = node.ask_all(&PeerQuery::Reload, PEER_TIMEOUT);
            let mut notices = missing(&results);
            for r in &results {
                if let Ok(PeerAnswer::Reloaded(Err(e))) = &r.result {
                    notices.push(format!("node {}: reload failed: {e}", r.node));
                }
            }
            Ok(command_tag("RELOAD", notices))
        }
    }
}

fn node_tenant(node: &Node, tenant: &str) -> Result<bool, PlaneError> {
    Ok(node.store.tenant(tenant)?.is_some())
}

fn command_tag(tag: &str, notices: Vec<String>) -> Answer {
    Answer {
        notices,
        tag: tag.into(),
        ..Answer::default()
    }
}

/// A warning for each node that did not answer.
fn missing<T>(results: &[NodeResult<T>]) -> Vec<String> {
    results
        .iter()
        .filter_map(|r| {
            r.result
                .as_ref()
                .err()
                .map(|e| format!("node {} did not answer: {e}", r.node))
        })
        .collect()
}

/// A table from column names and rows of displayable cells.
fn table(columns: &[&str], rows: Vec<Vec<Option<String>>>) -> Answer {
    Answer {
        columns: columns.iter().map(|c| c.to_string()).collect(),
        rows,
        ..Answer::default()
    }
}

fn cell(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

/// "primary" or the replica's `host:port`.
fn target(replica: &Option<String>) -> Option<String> {
    Some(replica.clone().unwrap_or_else(|| "primary".into()))
}

fn pools(reports: &[&NodeReport]) -> Answer {
    let mut rows = Vec::new();
    for r in reports {
        for s in &r.shards {
            for p in s.pools.iter().filter(|p| p.pool_size > 0) {
                rows.push(vec![
                    cell(r.node),
                    cell(&p.tenant),
                    cell(&p.user),
                    cell(p.mode),
                    target(&p.replica),
                    cell(p.clients.saturating_sub(p.waiting)),
                    cell(p.waiting),
                    cell(p.checked_out),
                    cell(p.idle),
                    cell(p.pool_size),
                    cell(s.shard),
                    cell(p.paused),
                ]);
            }
        }
    }
    rows.sort();
    table(
        &[
            "node",
            "database",
            "user",
            "pool_mode",
            "replica",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "pool_size",
            "shard",
            "paused",
        ],
        rows,
    )
}

fn clients(reports: &[&NodeReport]) -> Answer {
    let mut rows = Vec::new();
    for r in reports {
        for s in &r.inspections {
            for c in &s.clients {
                rows.push(vec![
                    cell(r.node),
                    cell("C"),
                    cell(&c.user),
                    cell(&c.tenant),
                    cell(&c.mode),
                    cell(&c.state),
                    c.addr.map(|a| a.ip().to_string()),
                    c.addr.map(|a| a.port().to_string()),
                    cell(utc(c.connect_time)),
                    cell(c.pid),
                    cell(&c.application_name),
                    cell(&c.reads),
                    cell(s.shard),
                ]);
            }
        }
    }
    rows.sort();
    table(
        &[
            "node",
            "type",
            "user",
            "database",
            "pool_mode",
            "state",
            "addr",
            "port",
            "connect_time",
            "pid",
            "application_name",
            "reads",
            "shard",
        ],
        rows,
    )
}

fn servers(reports: &[&NodeReport]) -> Answer {
    let mut rows = Vec::new();
    for r in reports {
        for s in &r.inspections {
            for c in &s.servers {
                rows.push(vec![
                    cell(r.node),
                    cell("S"),
                    cell(&c.user),
                    cell(&c.tenant),
                    cell(&c.mode),
                    target(&c.replica),
                    cell(&c.state),
                    cell(c.addr.ip()),
                    cell(c.addr.port()),
                    cell(utc(c.connect_time)),
                    cell(c.backend_pid),
                    cell(s.shard),
                ]);
            }
        }
    }
    rows.sort();
    table(
        &[
            "node",
            "type",
            "user",
            "database",
            "pool_mode",
            "replica",
            "state",
            "addr",
            "port",
            "connect_time",
            "remote_pid",
            "shard",
        ],
        rows,
    )
}

fn stats(reports: &[&NodeReport]) -> Answer {
    let mut rows = Vec::new();
    for r in reports {
        for s in &r.shards {
            for p in s.pools.iter().filter(|p| p.replica.is_none()) {
                let us = |secs: f64| (secs * 1e6).round() as u64;
                let count = p.query_duration.count();
                let query_us = us(p.query_duration.sum);
                rows.push(vec![
                    cell(r.node),
                    cell(&p.tenant),
                    cell(&p.user),
                    cell(p.mode),
                    cell(p.queries),
                    cell(p.client_recv),
                    cell(p.client_send),
                    cell(query_us),
                    cell(us(p.checkout_duration.sum)),
                    cell(query_us.checked_div(count).unwrap_or(0)),
                ]);
            }
        }
    }
    rows.sort();
    table(
        &[
            "node",
            "database",
            "user",
            "pool_mode",
            "total_query_count",
            "total_received",
            "total_sent",
            "total_query_time",
            "total_wait_time",
            "avg_query_time",
        ],
        rows,
    )
}

fn tenants(reports: &[&NodeReport]) -> Answer {
    let mut rows = Vec::new();
    for r in reports {
        for t in &r.tenants {
            rows.push(vec![
                cell(r.node),
                cell(&t.id),
                cell(&t.db_host),
                cell(t.db_port),
                cell(&t.db_database),
                cell(t.default_pool_size),
                cell(t.users),
                cell(t.replicas.join(",")),
                cell(&t.load_balance),
                cell(t.paused),
            ]);
        }
    }
    rows.sort();
    table(
        &[
            "node",
            "name",
            "host",
            "port",
            "database",
            "pool_size",
            "users",
            "replicas",
            "load_balance",
            "paused",
        ],
        rows,
    )
}

fn replicas(reports: &[&NodeReport]) -> Answer {
    let mut rows = Vec::new();
    for r in reports {
        for s in &r.shards {
            for x in &s.replicas {
                rows.push(vec![
                    cell(r.node),
                    cell(&x.tenant),
                    cell(&x.replica),
                    cell(x.weight),
                    cell(if x.healthy { "ok" } else { "banned" }),
                    cell(x.banned_ms),
                    x.lag_ms.map(|l| l.to_string()),
                    cell(x.bans),
                    cell(x.routed),
                    x.last_error.clone(),
                ]);
            }
        }
    }
    rows.sort();
    table(
        &[
            "node",
            "database",
            "replica",
            "weight",
            "state",
            "banned_ms",
            "lag_ms",
            "bans",
            "transactions",
            "last_error",
        ],
        rows,
    )
}

fn version(reports: &[&NodeReport]) -> Answer {
    let rows = reports
        .iter()
        .map(|r| vec![cell(r.node), cell(format!("Supavisor-rs {}", r.version))])
        .collect();
    table(&["node", "version"], rows)
}

/// `YYYY-MM-DD HH:MM:SS UTC` of Unix seconds.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::TenantSummary;
    use engine::metrics::{ClientInfo, ShardInspection, ShardSnapshot};

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_735_689_599), "2024-12-31 23:59:59 UTC");
        assert_eq!(utc(4_102_444_800), "2100-01-01 00:00:00 UTC");
    }

    fn report(node: u64) -> NodeReport {
        NodeReport {
            node,
            version: "0.1.0".into(),
            shards: vec![ShardSnapshot {
                shard: 0,
                counters: Default::default(),
                pools: vec![],
                replicas: vec![],
                paused: vec!["t1".into()],
            }],
            inspections: vec![ShardInspection {
                shard: 1,
                clients: vec![ClientInfo {
                    tenant: "t1".into(),
                    user: "app".into(),
                    mode: "transaction".into(),
                    state: "idle".into(),
                    addr: Some("127.0.0.1:40000".parse().unwrap()),
                    connect_time: 0,
                    pid: 7,
                    application_name: "psql".into(),
                    reads: "replicas".into(),
                }],
                servers: vec![],
            }],
            tenants: vec![TenantSummary {
                id: "t1".into(),
                db_host: "127.0.0.1".into(),
                db_port: 5432,
                db_database: "postgres".into(),
                default_pool_size: 5,
                users: 1,
                replicas: vec!["127.0.0.1:5433*2".into()],
                load_balance: "reads".into(),
                paused: true,
            }],
        }
    }

    #[test]
    fn tables_name_each_node() {
        let (a, b) = (report(1), report(2));
        let c = clients(&[&b, &a]);
        assert_eq!(
            c.columns[..6],
            ["node", "type", "user", "database", "pool_mode", "state"]
        );
        assert_eq!(c.rows.len(), 2);
        assert_eq!(c.rows[0][0].as_deref(), Some("1"), "sorted by node");
        assert_eq!(c.rows[0][6].as_deref(), Some("127.0.0.1"));
        assert_eq!(c.rows[0][7].as_deref(), Some("40000"));
        assert_eq!(c.rows[0][8].as_deref(), Some("1970-01-01 00:00:00 UTC"));
        let t = tenants(&[&a]);
        assert_eq!(t.rows[0][7].as_deref(), Some("127.0.0.1:5433*2"));
        assert_eq!(t.rows[0][9].as_deref(), Some("true"));
        let v = version(&[&a, &b]);
        assert_eq!(v.rows[1], [cell(2), cell("Supavisor-rs 0.1.0")]);
        let missing = missing(&[
            NodeResult::<()> {
                node: 3,
                result: Err("timed out".into()),
            },
            NodeResult {
                node: 1,
                result: Ok(()),
            },
        ]);
        assert_eq!(missing, ["node 3 did not answer: timed out"]);
    }
}
