//! Supavisor-rs control plane: configuration, process lifecycle, `demo`.

pub mod api;
pub mod config;
pub mod console;
pub mod ctl;
pub mod demo;
pub mod metrics;
pub mod model;
pub mod node;
pub mod pgtemp;
pub mod plane;
pub mod report;
pub mod run;
pub mod store;
pub mod tls;
