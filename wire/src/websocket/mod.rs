//! The PostgreSQL protocol inside WebSocket binary frames (RFC 6455), as
//! serverless drivers such as `@neondatabase/serverless` speak it: the
//! HTTP/1.1 upgrade ([`handshake`]), the frame header codec ([`frame`]) and
//! an in-place deframer for the client's stream of frames ([`deframe`]).
//! No I/O here either: the engine feeds socket buffers in.

pub mod deframe;
pub mod frame;
pub mod handshake;

pub use deframe::Deframer;
pub use frame::FrameError;
