//! `supavisor`: run a pooler node, or `supavisor demo` for a first look.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use control::config::ConfigFile;

#[derive(Parser)]
#[command(
    name = "supavisor",
    version,
    about = "A multi-tenant PostgreSQL connection pooler"
)]
struct Cli {
    /// TOML configuration file; without it the embedded defaults are used.
    #[arg(long, short, env = "SUPAVISOR_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Start a throwaway PostgreSQL and the pooler in front of it; Ctrl-C cleans up.
    Demo,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Demo) => control::demo::run(),
        None => run_config(cli.config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("supavisor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_config(path: Option<PathBuf>) -> Result<(), String> {
    let file = match path {
        Some(p) => ConfigFile::load(&p).map_err(|e| e.to_string())?,
        None => ConfigFile::default(),
    };
    control::run::run(file, |r| {
        println!(
            "supavisor ready session={} transaction={} api={}",
            r.session, r.transaction, r.api
        );
        let _ = std::io::stdout().flush();
    })
}
