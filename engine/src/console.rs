//! The admin console: a virtual database reached as tenant `supavisor`
//! (`psql "host=... port=6543 user=admin.supavisor dbname=supavisor"`).
//! The password is an API token (a JWT the control plane accepts, as for
//! the HTTP API); it travels as a cleartext password, so from an address
//! other than loopback the console takes TLS clients only.
//!
//! Simple queries only: `SHOW POOLS|CLIENTS|SERVERS|STATS|TENANTS|REPLICAS|
//! VERSION|HELP`, `PAUSE tenant`, `RESUME tenant`, `RELOAD`. The shard
//! speaks the protocol; the control plane runs the command (cluster-wide)
//! and answers with rows, which go out as RowDescription, DataRow,
//! CommandComplete and ReadyForQuery.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info};
use wire::backend::{
    encode_command_complete, encode_data_row, encode_empty_query, encode_error, encode_notice,
    encode_parameter_status, encode_ready_for_query, encode_row_description, Authentication,
};
use wire::frame::{split_frame, MAX_AUTH_FRAME_LEN};
use wire::frontend::{self, PASSWORD_TAG, QUERY_TAG, SYNC_TAG, TERMINATE_TAG};
use wire::startup::StartupMessage;
use wire::WireError;

use crate::accept::{for_log, refuse};
use crate::config::ConsoleHooks;
use crate::error::{EngineError, Refusal};
use crate::shard::Shard;
use crate::stream::Stream;

/// The tenant name that reaches the console.
pub const TENANT: &str = "supavisor";
/// The largest console query.
const MAX_QUERY: usize = 64 * 1024;
/// How long a command may take (PAUSE waits for running transactions).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A console command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(Show),
    /// New transactions of the tenant wait, its server connections close
    /// once their transactions end.
    Pause(String),
    Resume(String),
    /// Re-read the config file, as SIGHUP does (every node).
    Reload,
}

/// What `SHOW` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Pools,
    Clients,
    Servers,
    Stats,
    Tenants,
    Replicas,
    Version,
    Help,
}

/// The commands, for `SHOW HELP` and errors.
pub const HELP: &str =
    "SHOW POOLS | CLIENTS | SERVERS | STATS | TENANTS | REPLICAS | VERSION | HELP; \
     PAUSE tenant; RESUME tenant; RELOAD";

impl Command {
    /// The command in a query string; `Ok(None)` for an empty one.
    pub fn parse(sql: &str) -> Result<Option<Command>, String> {
        let text = sql.trim().trim_end_matches(';').trim();
        let words: Vec<&str> = text.split_whitespace().collect();
        let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
        let upper: Vec<&str> = upper.iter().map(String::as_str).collect();
        let bad = || format!("invalid command \"{}\": use {HELP}", for_log(text));
        let tenant = |name: &str| -> Result<String, String> {
            let name = name.trim_matches('"');
            if !name.is_empty()
                && name.len() <= 128
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                Ok(name.to_string())
            } else {
                Err(format!("invalid tenant name \"{}\"", for_log(name)))
            }
        };
        let cmd = match upper.as_slice() {
            [] => return Ok(None),
            ["SHOW", what] => Command::Show(match *what {
                "POOLS" => Show::Pools,
                "CLIENTS" => Show::Clients,
                "SERVERS" => Show::Servers,
                "STATS" => Show::Stats,
                "TENANTS" | "DATABASES" => Show::Tenants,
                "REPLICAS" => Show::Replicas,
                "VERSION" => Show::Version,
                "HELP" => Show::Help,
                _ => return Err(bad()),
            }),
            ["PAUSE", _] => Command::Pause(tenant(words[1])?),
            ["RESUME", _] => Command::Resume(tenant(words[1])?),
            ["PAUSE"] | ["RESUME"] => {
                return Err(format!("{} needs a tenant: {} tenant", upper[0], upper[0]))
            }
            ["RELOAD"] => Command::Reload,
            _ => return Err(bad()),
        };
        Ok(Some(cmd))
    }
}

/// A command's result: notices, then a result set when `columns` is not
/// empty, then the command tag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    pub notices: Vec<String>,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
    pub tag: String,
}

/// A command that failed: SQLSTATE and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub sqlstate: String,
    pub message: String,
}

pub type Reply = Result<Answer, Failure>;

impl Answer {
    /// Appends the frames of this answer (without ReadyForQuery).
    pub fn encode(&self, out: &mut BytesMut) {
        for n in &self.notices {
            encode_notice("WARNING", "01000", n, out);
        }
        if !self.columns.is_empty() {
            let cols: Vec<&str> = self.columns.iter().map(String::as_str).collect();
            encode_row_description(&cols, out);
            for row in &self.rows {
                let vals: Vec<Option<&str>> = row.iter().map(|v| v.as_deref()).collect();
                encode_data_row(&vals, out);
            }
        }
        encode_command_complete(&self.tag, out);
    }
}

/// Serves a console client from its startup message on (the caller checked
/// that `hooks` exist and that the tenant is [`TENANT`]).
pub async fn serve(
    shard: &Rc<Shard>,
    hooks: Arc<dyn ConsoleHooks>,
    mut stream: Stream,
    msg: StartupMessage,
    leftover: Vec<u8>,
    peer: Option<SocketAddr>,
) {
    let user = msg.user().unwrap_or_default().to_string();
    let timeout = shard.config().proxy.client_startup_timeout;
    let login = glommio::timer::timeout(timeout, async {
        Ok(login(shard, hooks.as_ref(), &mut stream, &user, leftover, peer).await)
    })
    .await;
    let inbuf = match login {
        Ok(Ok(buf)) => buf,
        Ok(Err(e)) => {
            if !matches!(e, EngineError::ClientIo(_)) {
                info!(?peer, user = for_log(&user), error = %e, "admin console login refused");
                refuse(&mut stream, &e).await;
            }
            return;
        }
        Err(_) => {
            refuse(
                &mut stream,
                &EngineError::Timeout("client startup and authentication"),
            )
            .await;
            return;
        }
    };
    info!(?peer, user = for_log(&user), "admin console session");
    if let Err(e) = session(shard, &mut stream, inbuf).await {
        match e {
            EngineError::ClientIo(_) => debug!(?peer, "admin console client left"),
            e => refuse(&mut stream, &e).await,
        }
    }
}

fn not_admin() -> EngineError {
    EngineError::Refused(Refusal::NotAdmin(
        "the admin console takes an API token (a JWT signed with API_JWT_SECRET) as its password"
            .into(),
    ))
}

/// The password exchange; returns the bytes the client sent after it.
async fn login(
    shard: &Shard,
    hooks: &dyn ConsoleHooks,
    stream: &mut Stream,
    user: &str,
    leftover: Vec<u8>,
    peer: Option<SocketAddr>,
) -> Result<BytesMut, EngineError> {
    let loopback = peer.is_some_and(|p| {
        let ip = match p.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        };
        ip.is_loopback()
    });
    if !stream.is_tls() && !loopback {
        return Err(EngineError::Refused(Refusal::NotAdmin(
            "the admin console needs TLS from an address other than loopback (its password is a token)"
                .into(),
        )));
    }
    let ip = peer.map(|p| p.ip());
    if let Some(wait) = ip.and_then(|ip| shard.login_backoff(ip, TENANT, user)) {
        return Err(EngineError::Refused(Refusal::LoginBackoff {
            user: user.to_string(),
            secs: wait.as_secs().max(1),
        }));
    }
    let mut out = BytesMut::new();
    Authentication::CleartextPassword.encode(&mut out);
    stream
        .write_all(&out)
        .await
        .map_err(EngineError::ClientIo)?;
    let mut inbuf = BytesMut::from(&leftover[..]);
    let (tag, body) = crate::auth::read_client_frame(stream, &mut inbuf).await?;
    if tag != PASSWORD_TAG {
        return Err(EngineError::ClientProtocol(WireError::Protocol(format!(
            "expected a password message, got message type {:?}",
            tag as char
        ))));
    }
    let password = frontend::decode_password(&body).map_err(EngineError::ClientProtocol)?;
    let admitted = std::str::from_utf8(password).is_ok_and(|p| hooks.admit(p));
    if !admitted {
        if let Some(ip) = ip {
            shard.login_failed(ip, TENANT, user);
        }
        return Err(not_admin());
    }
    if let Some(ip) = ip {
        shard.login_ok(ip, TENANT, user);
    }
    let mut out = BytesMut::new();
    Authentication::Ok.encode(&mut out);
    let version = format!("{} (Supavisor-rs admin console)", env!("CARGO_PKG_VERSION"));
    for (k, v) in [
        ("server_version", version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", "supavisor"),
    ] {
        encode_parameter_status(k, v, &mut out);
    }
    encode_ready_for_query(b'I', &mut out);
    stream
        .write_all(&out)
        .await
        .map_err(EngineError::ClientIo)?;
    Ok(inbuf)
}

/// Answers queries until the client leaves.
async fn session(shard: &Shard, stream: &mut Stream, mut buf: BytesMut) -> Result<(), EngineError> {
    // After an error in the extended protocol: skip until Sync.
    let mut skipping = false;
    loop {
        let Some((h, body)) = split_frame(&mut buf, MAX_QUERY.max(MAX_AUTH_FRAME_LEN))
            .map_err(EngineError::ClientProtocol)?
        else {
            let mut chunk = [0u8; 4096];
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(EngineError::ClientIo)?;
            if n == 0 {
                return Ok(());
            }
            buf.put_slice(&chunk[..n]);
            continue;
        };
        let mut out = BytesMut::new();
        match h.tag {
            TERMINATE_TAG => return Ok(()),
            QUERY_TAG => {
                let sql = frontend::decode_query(&body).map_err(EngineError::ClientProtocol)?;
                let sql = String::from_utf8_lossy(sql);
                match Command::parse(&sql) {
                    Ok(None) => encode_empty_query(&mut out),
                    Ok(Some(cmd)) => match shard.console_call(cmd, COMMAND_TIMEOUT).await {
                        Ok(answer) => answer.encode(&mut out),
                        Err(f) => encode_error("ERROR", &f.sqlstate, &f.message, &mut out),
                    },
                    Err(why) => encode_error("ERROR", "42601", &why, &mut out),
                }
                encode_ready_for_query(b'I', &mut out);
            }
            SYNC_TAG => {
                skipping = false;
                encode_ready_for_query(b'I', &mut out);
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {
                if !skipping {
                    skipping = true;
                    encode_error(
                        "ERROR",
                        "0A000",
                        "the admin console takes simple queries only",
                        &mut out,
                    );
                }
            }
            other => {
                return Err(EngineError::ClientProtocol(WireError::Protocol(format!(
                    "unexpected message type {:?} in the admin console",
                    other as char
                ))))
            }
        }
        if !out.is_empty() {
            stream
                .write_all(&out)
                .await
                .map_err(EngineError::ClientIo)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(
            Command::parse("show pools;"),
            Ok(Some(Command::Show(Show::Pools)))
        );
        assert_eq!(
            Command::parse("  SHOW   Clients "),
            Ok(Some(Command::Show(Show::Clients)))
        );
        assert_eq!(
            Command::parse("pause acme-1"),
            Ok(Some(Command::Pause("acme-1".into())))
        );
        assert_eq!(
            Command::parse("RESUME \"t_2\";"),
            Ok(Some(Command::Resume("t_2".into())))
        );
        assert_eq!(Command::parse("reload"), Ok(Some(Command::Reload)));
        assert_eq!(Command::parse(" ; "), Ok(None));
        for bad in [
            "SHOW",
            "SHOW NOPE",
            "SELECT 1",
            "PAUSE",
            "PAUSE a b",
            "PAUSE 'x'",
            "PAUSE a;b",
            "RESUME ../x",
        ] {
            assert!(Command::parse(bad).is_err(), "{bad}");
        }
        assert!(Command::parse("DROP TABLE x")
            .unwrap_err()
            .contains("SHOW POOLS"));
    }

    #[test]
    fn answers_encode_as_a_result_set() {
        let a = Answer {
            notices: vec!["node 2 did not answer".into()],
            columns: vec!["node".into(), "database".into()],
            rows: vec![vec![Some("1".into()), None]],
            tag: "SHOW".into(),
        };
        let mut out = BytesMut::new();
        a.encode(&mut out);
        let mut tags = Vec::new();
        while let Some((h, body)) = split_frame(&mut out, 1 << 20).unwrap() {
            tags.push(h.tag);
            if h.tag == b'D' {
                assert_eq!(
                    wire::backend::decode_data_row(&body).unwrap(),
                    [Some("1".to_string()), None]
                );
            }
        }
        assert_eq!(tags, b"NTDC");
        // A command without rows: the tag alone.
        let mut out = BytesMut::new();
        Answer {
            tag: "PAUSE".into(),
            ..Answer::default()
        }
        .encode(&mut out);
        assert_eq!(out[0], b'C');
    }
}
