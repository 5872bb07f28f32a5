//! The command line, merged with `runner.toml`.
//!
//! [`Cli`] is what clap parsed: a subcommand, or the options of a run
//! ([`RunArgs`]). [`Settings`] is what a run uses, after
//! merging, in order of precedence: the command line, the file given with
//! `--config`, `runner.toml` in the work dir, and the defaults. A
//! `[tasks.NAME]` section of a file applies over that file's top level.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{self, ConfigError, ConfigFile};
use crate::params::{ParamsError, ParamsSource};

/// Runs a task plugin on many params in parallel, each worker an isolated
/// process.
#[derive(Debug, Parser)]
#[command(
    name = "runner",
    version,
    max_term_width = 100,
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
        runner --task test --range 0..5000\n  \
        find . -type f | jq -R . | runner --task sha256 --params - --results out.jsonl\n  \
        runner list\n  \
        runner new my-task"
)]
pub struct Cli {
    /// What to do instead of a run
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The run's options
    #[command(flatten)]
    pub run: RunArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the tasks of a work dir, loading each in a worker to describe it
    List {
        /// Folder holding the task libraries and crates [default: plugins]
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
        /// Print JSON, one object per task, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Write a new plugin crate that builds and runs as it is
    New {
        /// The task's name: letters, digits, `-` and `_`, starting with a letter
        name: String,
        /// Folder to create the crate in [default: plugins]
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
        /// The plugin-api crate to depend on [default: the one this runner was built with]
        #[arg(long, value_name = "DIR")]
        plugin_api: Option<PathBuf>,
    },
    /// Print a shell completion script
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff)
    Man,
}

/// When to draw the progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ProgressMode {
    /// When stderr is a terminal
    #[default]
    Auto,
    /// Always, even into a pipe
    Always,
    /// Never
    Never,
}

/// The options of a run.
#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// Task to run: `libNAME.so` or a crate folder `NAME/` in the work dir
    #[arg(long, value_name = "NAME", help_heading = "Task")]
    pub task: Option<String>,

    /// Folder holding the task libraries and crates [default: plugins]
    #[arg(long, value_name = "DIR", help_heading = "Task")]
    pub work_dir: Option<PathBuf>,

    /// Params: a `.json` array, JSON Lines, or `-` for JSON Lines on stdin
    #[arg(
        long,
        value_name = "FILE|-",
        conflicts_with = "range",
        help_heading = "Params"
    )]
    pub params: Option<PathBuf>,

    /// Tasks START to END-1, each with its number as params
    #[arg(long, value_name = "START..END", help_heading = "Params")]
    pub range: Option<String>,

    /// Most worker processes at once [default: available CPUs]
    #[arg(short = 'j', long, value_name = "N", value_parser = parse_workers, help_heading = "Limits")]
    pub max_parallel: Option<usize>,

    /// Time limit per attempt, such as 500ms, 60s or 2m [default: none]
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration, help_heading = "Limits")]
    pub timeout: Option<Duration>,

    /// Extra attempts after a retryable failure [default: 2]
    #[arg(long, value_name = "N", help_heading = "Limits")]
    pub retries: Option<u32>,

    /// Time running tasks get after SIGINT or SIGTERM [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration, help_heading = "Limits")]
    pub grace: Option<Duration>,

    /// Address-space limit per worker, such as 256M or 2G [default: none]
    #[arg(long, value_name = "SIZE", value_parser = config::parse_size, help_heading = "Limits")]
    pub memory_limit: Option<u64>,

    /// Write one JSON line per finished task to FILE, or `-` for stdout
    #[arg(long, value_name = "FILE|-", help_heading = "Output")]
    pub results: Option<PathBuf>,

    /// Skip tasks that the results file already holds as ok; append the rest
    #[arg(long, requires = "results", help_heading = "Params")]
    pub resume: bool,

    /// Read settings from FILE (over the work dir's runner.toml)
    #[arg(long, value_name = "FILE", help_heading = "Task")]
    pub config: Option<PathBuf>,

    /// Run only the tasks whose index is K modulo N; `auto` reads a Slurm job array or a
    /// Kubernetes Indexed Job
    #[arg(long, value_name = "K/N|auto", help_heading = "Params")]
    pub shard: Option<String>,

    /// Drop what tasks print on stdout
    #[arg(short, long, help_heading = "Output")]
    pub quiet: bool,

    /// Prefix every line a task prints with its index
    #[arg(long, help_heading = "Output")]
    pub tag: bool,

    /// When to draw the progress bar on stderr
    #[arg(
        long,
        value_name = "WHEN",
        default_value = "auto",
        help_heading = "Output"
    )]
    pub progress: ProgressMode,

    /// Log more: -v for the run's events, -vv for every task, -vvv for every frame
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = "Output")]
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
    /// This run's share of the tasks.
    pub shard: Option<Shard>,
    /// Prefix task output with the task index.
    pub tag: bool,
    /// When to draw the progress bar.
    pub progress: ProgressMode,
}

/// One of N shards: the tasks whose index is `index` modulo `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// K, from 0.
    pub index: u64,
    /// N, at least 1.
    pub count: u64,
}

impl Shard {
    /// Whether the task with this index belongs to the shard.
    pub fn owns(self, task: u64) -> bool {
        task % self.count == self.index
    }

    /// Parses `K/N`, or reads the shard of a cluster job for `auto`.
    ///
    /// `auto` takes, in order: Slurm's `SLURM_ARRAY_TASK_ID` and
    /// `SLURM_ARRAY_TASK_COUNT` (counting from `SLURM_ARRAY_TASK_MIN`), or
    /// Kubernetes' `JOB_COMPLETION_INDEX` with the count in
    /// `RUNNER_SHARD_COUNT`.
    ///
    /// # Errors
    ///
    /// A message naming what is missing or malformed.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let number = |name: &str| -> Result<Option<u64>, String> {
            env(name)
                .map(|v| {
                    v.trim()
                        .parse::<u64>()
                        .map_err(|_| format!("--shard auto: `{name}={v}` is not a number"))
                })
                .transpose()
        };
        let (index, count) = if text == "auto" {
            if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
                let count = number("SLURM_ARRAY_TASK_COUNT")?.ok_or(
                    "--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not",
                )?;
                // Arrays may start past 0 and step: `--array=1-7:2` has
                // the tasks 1, 3, 5 and 7, shards 0 to 3.
                let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
                let step = number("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
                let offset = id
                    .checked_sub(min)
                    .ok_or("--shard auto: SLURM_ARRAY_TASK_ID is below SLURM_ARRAY_TASK_MIN")?;
                if offset % step != 0 {
                    return Err(format!(
                        "--shard auto: SLURM_ARRAY_TASK_ID {id} is not on the array's step of \
                         {step} from {min}"
                    ));
                }
                (offset / step, count)
            } else if let Some(index) = number("JOB_COMPLETION_INDEX")? {
                let count = number("RUNNER_SHARD_COUNT")?.ok_or(
                    "--shard auto: JOB_COMPLETION_INDEX is set but RUNNER_SHARD_COUNT is not; \
                     set it to the job's completions",
                )?;
                (index, count)
            } else {
                return Err(String::from(
                    "--shard auto: no SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX in the \
                     environment; give --shard K/N",
                ));
            }
        } else {
            let (k, n) = text
                .split_once('/')
                .ok_or_else(|| format!("invalid --shard `{text}`: expected K/N, as in 0/4"))?;
            let k = k
                .trim()
                .parse()
                .map_err(|_| format!("invalid --shard `{text}`: K is not a number"))?;
            let n = n
                .trim()
                .parse()
                .map_err(|_| format!("invalid --shard `{text}`: N is not a number"))?;
            (k, n)
        };
        if count == 0 || index >= count {
            return Err(format!("invalid shard {index}/{count}: need 0 <= K < N"));
        }
        Ok(Self { index, count })
    }
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
    fn from_cli(cli: &RunArgs) -> Self {
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
    pub fn resolve(cli: &RunArgs) -> Result<Self, SettingsError> {
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
        // Below this a worker cannot even map itself and its plugin, and
        // every worker would die unborn, blamed on the plugin.
        const MIN_MEMORY: u64 = 16 << 20;
        if let Some(limit) = merged.memory_limit.filter(|&limit| limit < MIN_MEMORY) {
            return Err(SettingsError::Invalid(format!(
                "a memory limit of {limit} bytes is too small for a worker to start; \
                 give at least 16M"
            )));
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
            shard: cli
                .shard
                .as_deref()
                .map(|text| Shard::parse(text, |name| std::env::var(name).ok()))
                .transpose()
                .map_err(SettingsError::Invalid)?,
            tag: cli.tag,
            progress: cli.progress,
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

    fn cli(args: &[&str]) -> RunArgs {
        Cli::try_parse_from(std::iter::once("runner").chain(args.iter().copied()))
            .unwrap()
            .run
    }

    #[test]
    fn shards_parse_from_text_and_from_cluster_jobs() {
        let none = |_: &str| None;
        assert_eq!(Shard::parse("1/4", none), Ok(Shard { index: 1, count: 4 }));
        assert!(Shard::parse("4/4", none).is_err());
        assert!(Shard::parse("x", none).is_err());
        assert!(
            Shard::parse("auto", none)
                .unwrap_err()
                .contains("SLURM_ARRAY_TASK_ID")
        );

        let slurm = |name: &str| match name {
            "SLURM_ARRAY_TASK_ID" => Some("3".to_string()),
            "SLURM_ARRAY_TASK_COUNT" => Some("4".to_string()),
            "SLURM_ARRAY_TASK_MIN" => Some("1".to_string()),
            _ => None,
        };
        assert_eq!(
            Shard::parse("auto", slurm),
            Ok(Shard { index: 2, count: 4 })
        );

        let stepped = |name: &str| match name {
            "SLURM_ARRAY_TASK_ID" => Some("4".to_string()),
            "SLURM_ARRAY_TASK_COUNT" => Some("3".to_string()),
            "SLURM_ARRAY_TASK_MIN" => Some("0".to_string()),
            "SLURM_ARRAY_TASK_STEP" => Some("2".to_string()),
            _ => None,
        };
        assert_eq!(
            Shard::parse("auto", stepped),
            Ok(Shard { index: 2, count: 3 })
        );

        let k8s = |name: &str| match name {
            "JOB_COMPLETION_INDEX" => Some("0".to_string()),
            "RUNNER_SHARD_COUNT" => Some("2".to_string()),
            _ => None,
        };
        assert_eq!(Shard::parse("auto", k8s), Ok(Shard { index: 0, count: 2 }));
        assert!(Shard { index: 1, count: 4 }.owns(5));
        assert!(!Shard { index: 1, count: 4 }.owns(6));
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
