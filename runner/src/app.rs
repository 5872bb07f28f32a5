//! The run, from resolved settings to an exit code.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;

use crate::cli::Settings;
use crate::exit;
use crate::params::TaskParams;
use crate::plugin;
use crate::pool::{self, OutputMode, PoolOptions, RecordSink};
use crate::progress::Progress;
use crate::results::TaskRecord;
use crate::resume::FinishedTasks;
use crate::spawn::WorkerLimits;

/// Writes records as JSON lines to a file or stdout.
///
/// A results file that exists is emptied only when the first record is
/// written, or when a run that wrote none ends well: a run that stops
/// before any task (a plugin that does not load) leaves it as it was.
pub struct ResultsWriter {
    out: BufWriter<Box<dyn Write>>,
    line: Vec<u8>,
    /// The file to empty before the first record, while that is pending.
    to_empty: Option<File>,
    /// A file this run created, removed if the run ends with nothing in it.
    created: Option<std::path::PathBuf>,
}

impl ResultsWriter {
    /// Opens the results file for a fresh run, checking that it can be
    /// written; `-` is stdout.
    ///
    /// # Errors
    ///
    /// When the file cannot be opened for writing.
    pub fn create(path: &Path) -> io::Result<Self> {
        if path == Path::new("-") {
            return Ok(Self::new(Box::new(io::stdout())));
        }
        let existed = path.exists();
        // Not truncated here: see `empty_once`.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut writer = Self::new(Box::new(file.try_clone()?));
        // Only a regular file has contents to empty; a device or pipe
        // (`/dev/full`, a FIFO) takes the records as they come.
        if file.metadata()?.is_file() {
            writer.to_empty = Some(file);
        }
        writer.created = (!existed).then(|| path.to_path_buf());
        Ok(writer)
    }

    /// Writes records to `out`.
    pub fn new(out: Box<dyn Write>) -> Self {
        Self {
            out: BufWriter::with_capacity(256 * 1024, out),
            line: Vec::with_capacity(1024),
            to_empty: None,
            created: None,
        }
    }

    fn empty_once(&mut self) -> io::Result<()> {
        if let Some(file) = self.to_empty.take() {
            file.set_len(0)?;
        }
        Ok(())
    }

    /// Ends the run's writing: a run that ended well empties a file it
    /// wrote nothing to; one that failed removes a file it created empty.
    ///
    /// # Errors
    ///
    /// When the file cannot be emptied.
    pub fn close(mut self, run_ok: bool) -> io::Result<()> {
        self.out.flush()?;
        if run_ok {
            self.empty_once()
        } else {
            if self.to_empty.is_some() {
                if let Some(path) = &self.created {
                    let _ = std::fs::remove_file(path);
                }
            }
            Ok(())
        }
    }
}

impl RecordSink for ResultsWriter {
    fn record(&mut self, record: &TaskRecord) -> io::Result<()> {
        self.empty_once()?;
        self.line.clear();
        record.write_json_line(&mut self.line);
        self.out.write_all(&self.line)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Counts records on the progress bar on their way to the real sink.
struct ProgressSink<'a> {
    inner: &'a mut dyn RecordSink,
    progress: &'a Progress,
}

impl RecordSink for ProgressSink<'_> {
    fn record(&mut self, record: &TaskRecord) -> io::Result<()> {
        self.progress.finished(record.is_ok());
        self.inner.record(record)
    }

    fn retrying(&mut self, index: u64) {
        self.progress.retried();
        self.inner.retrying(index);
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Drops records; used when no `--results` is given.
struct NoResults;

impl RecordSink for NoResults {
    fn record(&mut self, _: &TaskRecord) -> io::Result<()> {
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Refuses a results file that is the params file: writing would destroy
/// the params before they are read.
fn check_distinct_files(settings: &Settings) -> anyhow::Result<()> {
    let (Some(results), Some(params)) = (&settings.results, settings.params.path()) else {
        return Ok(());
    };
    // The same file, by device and inode: through a symbolic link, a hard
    // link or another spelling of the path alike.
    let same = match (std::fs::metadata(results), std::fs::metadata(params)) {
        (Ok(a), Ok(b)) => {
            use std::os::unix::fs::MetadataExt;
            a.dev() == b.dev() && a.ino() == b.ino()
        }
        _ => false,
    };
    if same {
        anyhow::bail!(
            "--results `{}` is the params file; write the results somewhere else",
            results.display()
        );
    }
    Ok(())
}

/// Runs the task described by `settings`.
///
/// # Errors
///
/// Bad input, a plugin that cannot be found or built, or an I/O failure;
/// all of them mean exit code 2.
#[tracing::instrument(skip_all, fields(task = %settings.task))]
pub fn run(settings: &Settings) -> anyhow::Result<ExitCode> {
    // Check everything that can be checked before any task runs and before
    // the results file is touched: the name, the params, the plugin.
    plugin::validate_name(&settings.task)?;
    check_distinct_files(settings)?;
    let total = settings.params.validate()?;
    let library = plugin::prepare(&settings.work_dir, &settings.task)?;
    tracing::debug!(library = %library.source.display(), "plugin snapshot ready");

    let mut options = PoolOptions::new().context("cannot find the runner executable")?;
    options.workers = settings.max_parallel;
    options.timeout = settings.timeout;
    options.retries = settings.retries;
    options.grace = settings.grace;
    options.limits = WorkerLimits {
        memory: settings.memory_limit,
    };
    options.output = if settings.quiet {
        OutputMode::Quiet
    } else if settings.results_to_stdout() {
        OutputMode::Stderr
    } else {
        OutputMode::Normal
    };
    options.tag = settings.tag;

    // The tasks of this run: all of them, or this shard's share.
    let shard = settings.shard;
    let total = match (total, shard) {
        (Some(total), Some(shard)) => {
            Some(total / shard.count + u64::from(total % shard.count > shard.index))
        }
        (total, _) => total,
    };

    let mut finished = FinishedTasks::default();
    let mut file_sink = match &settings.results {
        Some(path) if settings.resume => {
            let (earlier, file) = FinishedTasks::load(path)?;
            tracing::info!(ok = earlier.len(), "resuming");
            finished = earlier;
            Some(ResultsWriter::new(Box::new(file)))
        }
        Some(path) => Some(
            ResultsWriter::create(path)
                .with_context(|| format!("cannot create results file `{}`", path.display()))?,
        ),
        None => None,
    };
    let mut no_sink = NoResults;
    let sink: &mut dyn RecordSink = match file_sink.as_mut() {
        Some(file_sink) => file_sink,
        None => &mut no_sink,
    };
    let skipped = Arc::new(AtomicU64::new(0));
    let keep = {
        let skipped = Arc::clone(&skipped);
        move |task: &TaskParams| {
            if shard.is_some_and(|shard| !shard.owns(task.index)) {
                return false;
            }
            let seen = finished.contains(task);
            if seen {
                skipped.fetch_add(1, Ordering::Relaxed);
            }
            !seen
        }
    };

    tracing::info!(
        task = %settings.task,
        workers = options.workers,
        tasks = total,
        timeout = ?options.timeout,
        retries = options.retries,
        memory_limit = options.limits.memory,
        shard = ?shard,
        "starting run"
    );
    let progress = Progress::start(settings.progress, total);
    let mut sink = ProgressSink {
        inner: sink,
        progress: &progress,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the event loop")?;
    let params = settings.params.clone().spawn_reader(4096, keep);
    let mut report = runtime
        .block_on(pool::run_pool(&library, &options, params, total, &mut sink))
        .context("cannot run the pool")?;
    progress.clear();
    if let Some(file_sink) = file_sink {
        let run_ok = report.error.is_none();
        if let Err(error) = file_sink.close(run_ok) {
            report.error.get_or_insert(pool::PoolError::Results(error));
        }
    }
    tracing::info!(
        ok = report.summary.ok,
        failed = report.summary.failed,
        retried = report.summary.retried,
        wall = ?report.summary.wall,
        "run finished"
    );
    let summary = &mut report.summary;
    summary.skipped = skipped.load(Ordering::Relaxed);
    summary.recorded = settings.results.is_some();
    if let Some(total) = total {
        summary.not_run = total.saturating_sub(summary.skipped + summary.ok + summary.failed);
    }

    let mut stderr = io::stderr().lock();
    let _ = report.summary.write_to(&mut stderr);
    if let Some(error) = report.error {
        return Err(error.into());
    }
    if let Some(signal) = report.interrupted {
        let _ = writeln!(stderr, "interrupted by {}", pool::signal_name(signal));
        return Ok(exit::interrupted(signal));
    }
    Ok(if report.summary.failed > 0 {
        ExitCode::from(exit::SOME_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}
