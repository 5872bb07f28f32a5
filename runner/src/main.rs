//! The `runner` command.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use runner::cli::{Cli, Settings};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // A worker is this same binary, re-executed; it must serve before
    // anything else starts.
    runner::worker::run_if_worker();

    let cli = Cli::parse();
    init_logging(cli.verbose);

    let result = Settings::resolve(&cli)
        .map_err(anyhow::Error::from)
        .and_then(|settings| runner::app::run(&settings));
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(runner::exit::ERROR)
        }
    }
}

/// Logs go to stderr; `RUNNER_LOG` (or `RUST_LOG`) overrides `-v`.
fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = std::env::var("RUNNER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        .unwrap_or_else(|| EnvFilter::new(format!("runner={default}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .init();
}
