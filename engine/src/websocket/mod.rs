//! PostgreSQL clients over WebSocket (serverless drivers such as
//! `@neondatabase/serverless`): a listener of its own (`websocket_addr`),
//! the HTTP upgrade ([`upgrade`]), then a [`WsStream`] that carries the
//! protocol in binary frames ([`framed`]). Behind the framing the client is
//! an ordinary client of the engine.

use std::cell::Cell;
use std::rc::Rc;

pub mod framed;
pub mod upgrade;

pub use framed::{WsState, WsStream};

/// A shard's WebSocket counters.
#[derive(Debug, Default)]
pub struct WsCounters {
    /// WebSocket connections open on this shard (upgraded, not yet closed).
    pub open: Rc<Cell<u64>>,
    /// Upgrades answered 101.
    pub upgrades: Cell<u64>,
    /// Upgrades refused (bad request, TLS failure, timeout).
    pub rejected: Cell<u64>,
}
