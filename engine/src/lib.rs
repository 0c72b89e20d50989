//! Supavisor-rs data plane: thread-per-core glommio shards that accept
//! clients, authenticate them and splice their bytes onto pooled PostgreSQL
//! connections.

pub mod accept;
pub mod auth;
pub mod authquery;
pub mod buf;
pub mod client;
pub mod cluster;
pub mod config;
pub mod console;
pub mod error;
#[doc(hidden)]
pub mod fuzzcheck;
pub mod metrics;
pub mod oneshot;
pub mod park;
pub mod pool;
pub mod prepared;
pub mod readsql;
pub mod relay;
pub mod replica;
pub mod server;
pub mod settings;
pub mod shard;
pub mod stream;
pub mod tls;
pub mod websocket;

pub use config::{ClientAuth, Config, PoolMode, ProxyConfig, TenantConfig, UserConfig};
pub use error::EngineError;
pub use shard::{start, Running};
