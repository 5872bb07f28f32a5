//! The `runner` command.

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use runner::cli::{Cli, Command, Settings};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // A worker is this same binary, re-executed; it must serve before
    // anything else starts.
    runner::worker::run_if_worker();

    let cli = Cli::parse();
    init_logging(cli.run.verbose);

    let result = match cli.command {
        None => Settings::resolve(&cli.run)
            .map_err(anyhow::Error::from)
            .and_then(|settings| runner::app::run(&settings)),
        Some(Command::List { work_dir, json }) => {
            runner::list::run(&work_dir.unwrap_or_else(|| "plugins".into()), json)
        }
        Some(Command::New {
            name,
            work_dir,
            plugin_api,
        }) => runner::scaffold::run(
            &name,
            &work_dir.unwrap_or_else(|| "plugins".into()),
            plugin_api.as_deref(),
        ),
        Some(Command::Completions { shell }) => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "runner", &mut script);
            runner::exit::write_stdout(&script)
                .map(|()| ExitCode::SUCCESS)
                .map_err(anyhow::Error::from)
        }
        Some(Command::Man) => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut page)
                .and_then(|()| runner::exit::write_stdout(&page))
                .map(|()| ExitCode::SUCCESS)
                .map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            // A closed stderr must not turn an error into a panic.
            runner::progress::suspend(|| {
                let _ = writeln!(io::stderr(), "error: {error:#}");
            });
            ExitCode::from(runner::exit::ERROR)
        }
    }
}

/// Log lines on stderr, with the progress bar lifted while each is written.
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        runner::progress::suspend(|| io::stderr().write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
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
        .with_writer(|| LogWriter)
        .with_ansi(io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .init();
}
