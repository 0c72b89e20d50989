//! PostgreSQL frontend/backend protocol for Supavisor-rs.
//!
//! No I/O and no async here: decoders read from byte slices or `BytesMut`
//! (returning `Ok(None)` when a message is incomplete), encoders append to a
//! caller's `BytesMut`. The engine feeds socket buffers straight in.

pub mod backend;
pub mod error;
pub mod frame;
pub mod frontend;
#[doc(hidden)]
pub mod fuzzcheck;
pub mod md5;
pub mod scram;
pub mod startup;
pub mod websocket;

pub use error::{Result, WireError};
