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
            | EngineError::Connect { .. } => Side::Server,
            EngineError::CheckoutTimeout(_) | EngineError::Timeout(_) => Side::Internal,
            EngineError::TooManyStatements(_) => Side::Client,
        }
    }

    /// May a new attempt succeed without anything changing on the client side?
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            EngineError::Connect { .. }
                | EngineError::ServerIo(_)
                | EngineError::CheckoutTimeout(_)
                | EngineError::Timeout(_)
        )
    }

    pub fn sqlstate(&self) -> &'static str {
        match self {
            EngineError::ClientIo(_) => "08006",
            EngineError::ClientProtocol(e) => e.sqlstate(),
            EngineError::ServerIo(_) | EngineError::ServerProtocol(_) => "08006",
            EngineError::Database(_) => "XX000",
            EngineError::UnsupportedServerAuth(_) => "28000",
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
