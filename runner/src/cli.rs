//! The command line, merged with `runner.toml`.
//!
//! [`Cli`] is what clap parsed; [`Settings`] is what the run uses, after
//! merging, in order of precedence: the command line, the file given with
//! `--config`, `runner.toml` in the work dir, and the defaults. A
//! `[tasks.NAME]` section of a file applies over that file's top level.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::config::{self, ConfigError, ConfigFile};
use crate::params::{ParamsError, ParamsSource};

/// Runs a task plugin on many params in parallel, each worker an isolated
/// process.
#[derive(Debug, Parser)]
#[command(name = "runner", version, max_term_width = 100)]
pub struct Cli {
    /// Task to run: `libNAME.so` or a crate folder `NAME/` in the work dir
    #[arg(long, value_name = "NAME")]
    pub task: Option<String>,

    /// Folder holding the task libraries and crates [default: plugins]
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,

    /// Params: a `.json` array, JSON Lines, or `-` for JSON Lines on stdin
    #[arg(long, value_name = "FILE|-", conflicts_with = "range")]
    pub params: Option<PathBuf>,

    /// Tasks START to END-1, each with its number as params
    #[arg(long, value_name = "START..END")]
    pub range: Option<String>,

    /// Most worker processes at once [default: available CPUs]
    #[arg(short = 'j', long, value_name = "N", value_parser = parse_workers)]
    pub max_parallel: Option<usize>,

    /// Time limit per attempt, such as 500ms, 60s or 2m [default: none]
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
    pub timeout: Option<Duration>,

    /// Extra attempts after a retryable failure [default: 2]
    #[arg(long, value_name = "N")]
    pub retries: Option<u32>,

    /// Time running tasks get after SIGINT or SIGTERM [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
    pub grace: Option<Duration>,

    /// Address-space limit per worker, such as 256M or 2G [default: none]
    #[arg(long, value_name = "SIZE", value_parser = config::parse_size)]
    pub memory_limit: Option<u64>,

    /// Write one JSON line per finished task to FILE, or `-` for stdout
    #[arg(long, value_name = "FILE|-")]
    pub results: Option<PathBuf>,

    /// Skip tasks that the results file already holds as ok; append the rest
    #[arg(long, requires = "results")]
    pub resume: bool,

    /// Read settings from FILE (over the work dir's runner.toml)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Drop what tasks print on stdout
    #[arg(short, long)]
    pub quiet: bool,

    /// Log more: -v for the run's events, -vv for every task, -vvv for every frame
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

fn parse_workers(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err(String::from("must be at least 1")),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("`{text}` is not a number: {e}")),
    }
}

/// The settings a run uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The task name.
    pub task: String,
    /// The work dir.
    pub work_dir: PathBuf,
    /// Where params come from.
    pub params: ParamsSource,
    /// Where records go; `-` is stdout.
    pub results: Option<PathBuf>,
    /// Workers.
    pub max_parallel: usize,
    /// Per-attempt time limit.
    pub timeout: Option<Duration>,
    /// Extra attempts.
    pub retries: u32,
    /// Grace period on SIGINT or SIGTERM.
    pub grace: Duration,
    /// Address-space limit per worker.
    pub memory_limit: Option<u64>,
    /// Drop task stdout.
    pub quiet: bool,
    /// Skip tasks the results file holds as ok, and append to it.
    pub resume: bool,
}

/// Bad usage or configuration, reported with exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A config file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A required setting is missing.
    #[error("{0}")]
    Missing(&'static str),
    /// A setting has a bad value.
    #[error("{0}")]
    Invalid(String),
    /// `--range` or params are malformed.
    #[error(transparent)]
    Params(#[from] ParamsError),
}

/// One layer of settings, from the command line or a file.
#[derive(Debug, Default)]
struct Layer {
    task: Option<String>,
    params: Option<PathBuf>,
    range: Option<String>,
    results: Option<PathBuf>,
    max_parallel: Option<usize>,
    timeout: Option<Duration>,
    retries: Option<u32>,
    grace: Option<Duration>,
    memory_limit: Option<u64>,
}

impl Layer {
    fn from_cli(cli: &Cli) -> Self {
        Self {
            task: cli.task.clone(),
            params: cli.params.clone(),
            range: cli.range.clone(),
            results: cli.results.clone(),
            max_parallel: cli.max_parallel,
            timeout: cli.timeout,
            retries: cli.retries,
            grace: cli.grace,
            memory_limit: cli.memory_limit,
        }
    }

    fn from_file(file: &ConfigFile, task: Option<&str>) -> Self {
        let section = task
            .and_then(|t| file.tasks.get(t))
            .cloned()
            .unwrap_or_default();
        Self {
            task: file.task.clone(),
            params: file.params.clone(),
            range: file.range.clone(),
            results: file.results.clone(),
            max_parallel: section.max_parallel.or(file.max_parallel),
            timeout: section.timeout.or(file.timeout).map(|d| d.0),
            retries: section.retries.or(file.retries),
            grace: file.grace.map(|d| d.0),
            memory_limit: section.memory_limit.or(file.memory_limit).map(|s| s.0),
        }
    }

    /// Fills what `self` leaves open from `lower`. Params and range count as
    /// one setting: a higher layer that names either hides both below.
    fn over(mut self, lower: Self) -> Self {
        if self.params.is_none() && self.range.is_none() {
            self.params = lower.params;
            self.range = lower.range;
        }
        Self {
            task: self.task.or(lower.task),
            params: self.params,
            range: self.range,
            results: self.results.or(lower.results),
            max_parallel: self.max_parallel.or(lower.max_parallel),
            timeout: self.timeout.or(lower.timeout),
            retries: self.retries.or(lower.retries),
            grace: self.grace.or(lower.grace),
            memory_limit: self.memory_limit.or(lower.memory_limit),
        }
    }
}

impl Settings {
    /// Merges the command line with the config files.
    ///
    /// # Errors
    ///
    /// A [`SettingsError`] naming the file, key or flag at fault.
    pub fn resolve(cli: &Cli) -> Result<Self, SettingsError> {
        let explicit = cli.config.as_deref().map(ConfigFile::load).transpose()?;
        let work_dir = cli
            .work_dir
            .clone()
            .or_else(|| explicit.as_ref().and_then(|c| c.work_dir.clone()))
            .unwrap_or_else(|| PathBuf::from("plugins"));

        let local_path = work_dir.join("runner.toml");
        let local = if local_path.is_file() {
            let file = ConfigFile::load(&local_path)?;
            if file.work_dir.is_some() {
                return Err(SettingsError::Invalid(format!(
                    "invalid config `{}`: `work-dir` can only be set in a file given with --config",
                    local_path.display()
                )));
            }
            Some(file)
        } else {
            None
        };

        // The task name decides which [tasks.NAME] sections apply, so find
        // it first.
        let task = cli
            .task
            .clone()
            .or_else(|| explicit.as_ref().and_then(|c| c.task.clone()))
            .or_else(|| local.as_ref().and_then(|c| c.task.clone()))
            .ok_or(SettingsError::Missing(
                "no task given: use --task NAME (see `runner --help`)",
            ))?;

        let mut merged = Layer::from_cli(cli);
        if let Some(file) = &explicit {
            merged = merged.over(Layer::from_file(file, Some(&task)));
        }
        if let Some(file) = &local {
            merged = merged.over(Layer::from_file(file, Some(&task)));
        }

        let params = match (&merged.params, &merged.range) {
            (Some(path), None) => ParamsSource::from_path(path),
            (None, Some(range)) => ParamsSource::parse_range(range)?,
            (Some(_), Some(_)) => {
                return Err(SettingsError::Invalid(String::from(
                    "a config file sets both `params` and `range`; keep one",
                )));
            }
            (None, None) => {
                return Err(SettingsError::Missing(
                    "no tasks given: use --params FILE, --params - (stdin) or --range START..END",
                ));
            }
        };
        let max_parallel = match merged.max_parallel {
            Some(0) => {
                return Err(SettingsError::Invalid(String::from(
                    "`max-parallel` must be at least 1",
                )));
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        if cli.resume && merged.results.as_deref() == Some(Path::new("-")) {
            return Err(SettingsError::Invalid(String::from(
                "--resume needs a results file, not stdout",
            )));
        }
        if cli.resume && merged.results.is_none() {
            return Err(SettingsError::Missing(
                "--resume needs --results FILE (the file of the run to resume)",
            ));
        }
        if merged.timeout == Some(Duration::ZERO) {
            return Err(SettingsError::Invalid(String::from(
                "a timeout of zero would kill every task; leave it out for no timeout",
            )));
        }

        Ok(Self {
            task,
            work_dir,
            params,
            results: merged.results,
            max_parallel,
            timeout: merged.timeout,
            retries: merged.retries.unwrap_or(2),
            grace: merged.grace.unwrap_or(Duration::from_secs(5)),
            memory_limit: merged.memory_limit,
            quiet: cli.quiet,
            resume: cli.resume,
        })
    }

    /// Whether records go to stdout.
    pub fn results_to_stdout(&self) -> bool {
        self.results.as_deref() == Some(Path::new("-"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("runner").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn zero_workers_is_refused_by_the_parser() {
        let err = Cli::try_parse_from(["runner", "--task", "t", "-j", "0"]).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
    }

    #[test]
    fn the_command_line_wins_over_files() {
        let dir = std::env::temp_dir().join(format!("runner-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("runner.toml"),
            "task = \"t\"\nretries = 7\nmax-parallel = 3\nrange = \"0..10\"\n\
             [tasks.t]\ntimeout = \"2s\"\n",
        )
        .unwrap();
        let extra = dir.join("extra.toml");
        std::fs::write(&extra, "retries = 5\n").unwrap();

        let work_dir = dir.to_str().unwrap();
        let s = Settings::resolve(&cli(&["--work-dir", work_dir, "-j", "9"])).unwrap();
        assert_eq!((s.task.as_str(), s.retries, s.max_parallel), ("t", 7, 9));
        assert_eq!(s.timeout, Some(Duration::from_secs(2)));
        assert_eq!(s.params, ParamsSource::Range { start: 0, end: 10 });

        let extra = extra.to_str().unwrap();
        let s = Settings::resolve(&cli(&["--work-dir", work_dir, "--config", extra])).unwrap();
        assert_eq!(s.retries, 5);

        let s = Settings::resolve(&cli(&["--work-dir", work_dir, "--params", "-"])).unwrap();
        assert_eq!(s.params, ParamsSource::Stdin);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
