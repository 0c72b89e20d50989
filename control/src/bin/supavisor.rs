//! `supavisor`: run a pooler node, or `supavisor demo` for a first look.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use control::config::ConfigFile;
use control::run::{Options, Stopped, HANDED_OVER_EXIT};

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
    /// Sled store directory, in place of the file's `[store] path` (the two
    /// processes of a graceful restart each need their own).
    #[arg(long, env = "SUPAVISOR_STORE")]
    store: Option<PathBuf>,
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
    raise_open_file_limit();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Demo) => control::demo::run().map(|()| Stopped::Shutdown),
        None => run_config(cli.config, cli.store),
    };
    match result {
        Ok(Stopped::Shutdown) => ExitCode::SUCCESS,
        Ok(Stopped::HandedOver) => ExitCode::from(HANDED_OVER_EXIT),
        Err(e) => {
            eprintln!("supavisor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_config(path: Option<PathBuf>, store: Option<PathBuf>) -> Result<Stopped, String> {
    let file = match &path {
        Some(p) => ConfigFile::load(p).map_err(|e| e.to_string())?,
        None => ConfigFile::default(),
    };
    let opts = Options {
        config_path: path,
        store_override: store,
    };
    control::run::run_node(file, &opts, |r| {
        let websocket = r
            .websocket
            .map(|w| format!(" websocket={w}"))
            .unwrap_or_default();
        println!(
            "supavisor ready session={} transaction={} api={}{websocket}",
            r.session, r.transaction, r.api
        );
        let _ = std::io::stdout().flush();
    })
}

/// Every client is a socket: the soft open-file limit goes up to the hard
/// one (systemd's `LimitNOFILE` sets both).
fn raise_open_file_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}
