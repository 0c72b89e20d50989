//! Supavisor-rs control plane: configuration, process lifecycle, `demo`.

pub mod config;
pub mod demo;
pub mod pgtemp;
pub mod run;
