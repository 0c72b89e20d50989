//! `supavisorctl`: manage a Supavisor-rs node through its HTTP API.

use std::process::ExitCode;

use clap::Parser;
use control::ctl::{run, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("supavisorctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
