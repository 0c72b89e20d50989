//! Errors of the data plane, each knowing which SQLSTATE a client should see.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use wire::backend::{encode_error, ErrorFields, ERROR_RESPONSE_TAG};
use wire::WireError;

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("client i/o: {0}")]
    ClientIo(#[source] io::Error),
    #[error("server i/o: {0}")]
    ServerIo(#[source] io::Error),
    #[error("client protocol violation: {0}")]
    ClientProtocol(#[source] WireError),
    #[error("server protocol violation: {0}")]
    ServerProtocol(#[source] WireError),
    /// PostgreSQL refused the pooler's login (or failed a reset); its fields are relayed.
    #[error("database error {}: {}", .0.code().unwrap_or("?"), .0.message().unwrap_or("?"))]
    Database(ErrorFields),
    #[error("server asked for an unsupported authentication method: {0}")]
    UnsupportedServerAuth(String),
    /// TLS with the database failed (not retried: a certificate does not
    /// become valid by waiting).
    #[error("could not connect to the database at {addr}: {why}")]
    ServerTls { addr: String, why: String },
    #[error("could not connect to the database at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("timed out after {0:?} waiting for a server connection (pool_checkout_timeout)")]
    CheckoutTimeout(Duration),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("{0}")]
    Refused(Refusal),
    #[error("{0}")]
    TooManyStatements(String),
}

/// Why a fenced node's clients are closed (with [`Refusal::Cluster`], 08006).
pub const FENCED: &str =
    "this node no longer serves the pool (cluster lease lost or pool moved), reconnect";

/// A login the pooler refuses on its own account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    UnknownTenant(String),
    NoTenant,
    UnknownUser {
        user: String,
        tenant: String,
    },
    WrongPassword(String),
    TooManyClients {
        tenant: String,
        user: String,
    },
    Replication,
    ShuttingDown,
    /// The tenant was removed or terminated by an operator.
    Terminated,
    /// The user's stored secret cannot verify this kind of client login.
    AuthMismatch {
        user: String,
        why: String,
    },
    Busy,
    /// The tenant takes TLS clients only.
    SslRequired,
    /// The client's address is outside the tenant's allow list.
    AddressNotAllowed(String),
    /// Too many failed logins from this address for this user: wait.
    LoginBackoff {
        user: String,
        secs: u64,
    },
    IdleTimeout,
    IdleInTransactionTimeout,
    /// Pool ownership across the cluster: the reason.
    Cluster(String),
    /// The admin console refuses a client that is not an admin: why.
    NotAdmin(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::UnknownTenant(t) => {
                write!(f, "tenant or user not found: tenant \"{t}\" does not exist")
            }
            Refusal::NoTenant => write!(
                f,
                "no tenant given: connect as user.tenant or set options=reference=tenant"
            ),
            Refusal::UnknownUser { user, tenant } => write!(
                f,
                "tenant or user not found: user \"{user}\" does not exist for tenant \"{tenant}\""
            ),
            Refusal::WrongPassword(user) => {
                write!(f, "password authentication failed for user \"{user}\"")
            }
            Refusal::TooManyClients { tenant, user } => write!(
                f,
                "sorry, too many clients already (max_clients reached for {user}.{tenant})"
            ),
            Refusal::Replication => write!(f, "replication connections are not supported"),
            Refusal::ShuttingDown => write!(f, "the pooler is shutting down"),
            Refusal::AuthMismatch { user, why } => {
                write!(f, "user \"{user}\" cannot log in this way: {why}")
            }
            Refusal::Terminated => {
                write!(f, "terminating connection due to administrator command")
            }
            Refusal::Busy => write!(f, "the pooler is overloaded, try again"),
            Refusal::Cluster(why) => write!(f, "cluster: {why}"),
            Refusal::NotAdmin(why) => write!(f, "not an admin: {why}"),
            Refusal::SslRequired => write!(f, "SSL connection is required"),
            Refusal::AddressNotAllowed(addr) => {
                write!(f, "address not allowed: {addr} is not in the tenant's allow_list")
            }
            Refusal::IdleTimeout => {
                write!(f, "terminating connection due to idle-session timeout")
            }
            Refusal::IdleInTransactionTimeout => {
                write!(f, "terminating connection due to idle-in-transaction timeout")
            }
            Refusal::LoginBackoff { user, secs } => write!(
                f,
                "too many failed logins for user \"{user}\" from this address: try again in {secs} s"
            ),
        }
    }
}

impl EngineError {
    pub fn side(&self) -> Side {
        match self {
            EngineError::ClientIo(_) | EngineError::ClientProtocol(_) | EngineError::Refused(_) => {
                Side::Client
            }
            EngineError::ServerIo(_)
            | EngineError::ServerProtocol(_)
            | EngineError::Database(_)
            | EngineError::UnsupportedServerAuth(_)
            | EngineError::ServerTls { .. }
            | EngineError::Connect { .. } => Side::Server,
            EngineError::CheckoutTimeout(_) | EngineError::Timeout(_) => Side::Internal,
            EngineError::TooManyStatements(_) => Side::Client,
        }
    }

    /// The database is down, restarting or not accepting connections yet:
    /// a new connection may succeed in a moment.
    pub fn database_unavailable(&self) -> bool {
        match self {
            EngineError::Connect { .. } | EngineError::ServerIo(_) | EngineError::Timeout(_) => {
                true
            }
            // cannot_connect_now (starting up / shutting down / recovery),
            // admin_shutdown, crash_shutdown, too_many_connections.
            EngineError::Database(f) => {
                matches!(f.code(), Some("57P03" | "57P01" | "57P02" | "53300"))
            }
            _ => false,
        }
    }

    pub fn sqlstate(&self) -> &'static str {
        match self {
            EngineError::ClientIo(_) => "08006",
            EngineError::ClientProtocol(e) => e.sqlstate(),
            EngineError::ServerIo(_) | EngineError::ServerProtocol(_) => "08006",
            EngineError::Database(_) => "XX000",
            EngineError::UnsupportedServerAuth(_) => "28000",
            EngineError::ServerTls { .. } => "08006",
            EngineError::Connect { .. } => "08006",
            EngineError::CheckoutTimeout(_) => "53300",
            EngineError::Timeout(_) => "57014",
            EngineError::TooManyStatements(_) => "54000",
            EngineError::Refused(r) => match r {
                Refusal::UnknownTenant(_) | Refusal::NoTenant | Refusal::UnknownUser { .. } => {
                    "28000"
                }
                Refusal::WrongPassword(_) => "28P01",
                Refusal::AuthMismatch { .. } => "28000",
                Refusal::TooManyClients { .. } => "53300",
                Refusal::Replication => "08P01",
                Refusal::ShuttingDown | Refusal::Terminated => "57P01",
                Refusal::Busy => "53300",
                Refusal::SslRequired | Refusal::AddressNotAllowed(_) => "28000",
                Refusal::LoginBackoff { .. } => "28P01",
                Refusal::IdleTimeout => "57P05",
                Refusal::IdleInTransactionTimeout => "25P03",
                Refusal::Cluster(_) => "08006",
                Refusal::NotAdmin(_) => "28000",
            },
        }
    }

    /// The ErrorResponse a client gets for this error.
    pub fn encode(&self, severity: &str, buf: &mut BytesMut) {
        match self {
            EngineError::Database(fields) => fields.encode(ERROR_RESPONSE_TAG, buf),
            other => encode_error(severity, other.sqlstate(), &other.to_string(), buf),
        }
    }
}
