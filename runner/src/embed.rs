//! The pool as a library: start it, submit params, take results as they
//! end, wait for the end.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let mut pool = runner::Pool::builder("sha256")
//!     .work_dir("plugins")
//!     .max_parallel(8)
//!     .start()?;
//! pool.submit(&"Cargo.toml").await?;
//! pool.close();
//! while let Some(record) = pool.next_result().await {
//!     println!("{}: {:?}", record.index, record.output_json::<serde_json::Value>());
//! }
//! let summary = pool.finish().await?;
//! assert_eq!(summary.failed, 0);
//! # Ok(())
//! # }
//! ```
//!
//! # Caveats
//!
//! - Workers are started from the program's own executable by default, so
//!   its `main` must call [`run_if_worker`](crate::worker::run_if_worker)
//!   first thing; or point the pool at an installed `runner` with
//!   [`PoolBuilder::worker_executable`].
//! - The supervisor runs on a thread of its own, with its own event loop;
//!   the methods here work from any async runtime, and each has a blocking
//!   twin for plain threads. Workers get `SIGKILL` when that thread ends, so
//!   dropping the [`Pool`] without [`Pool::finish`] ends them too.
//! - The pool does not handle SIGINT and SIGTERM unless
//!   [`PoolBuilder::handle_signals`] says so: the program decides.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::params::{ParamsError, TaskParams};
use crate::plugin::{self, PluginError};
use crate::pool::{self, PoolError, PoolOptions, RecordSink};
use crate::results::{RunSummary, TaskRecord};
use crate::spawn::WorkerLimits;

/// Why a pool could not start or did not end well.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The task could not be found, built or checked.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The runner's own executable could not be found.
    #[error("cannot find the executable to start workers from")]
    Executable(#[source] io::Error),
    /// Params could not be encoded as JSON.
    #[error("cannot encode params as JSON")]
    Encode(#[source] serde_json::Error),
    /// The pool stopped: it no longer takes params.
    #[error("the pool has stopped taking params")]
    Closed,
    /// The run stopped early; tasks that finished were delivered.
    #[error(transparent)]
    Run(#[from] PoolError),
    /// The supervisor thread failed.
    #[error("the pool's supervisor failed")]
    Supervisor(#[source] io::Error),
}

/// Sets up a [`Pool`]: the same options as the command line.
#[derive(Debug, Clone)]
pub struct PoolBuilder {
    task: String,
    work_dir: PathBuf,
    workers: Option<usize>,
    timeout: Option<Duration>,
    retries: Option<u32>,
    grace: Option<Duration>,
    memory_limit: Option<u64>,
    executable: Option<PathBuf>,
    handle_signals: bool,
}

impl PoolBuilder {
    /// The folder holding the task [default: `plugins`].
    pub fn work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.work_dir = dir.into();
        self
    }

    /// Most workers at once [default: available CPUs].
    pub fn max_parallel(mut self, workers: usize) -> Self {
        self.workers = Some(workers.max(1));
        self
    }

    /// Time limit of one attempt [default: none].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Extra attempts after a retryable failure [default: 2].
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = Some(retries);
        self
    }

    /// Time running tasks get on SIGINT or SIGTERM, when the pool handles
    /// them [default: 5 s].
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    /// Address-space limit of each worker, in bytes [default: none].
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// The executable started as a worker [default: this program, which
    /// must then call [`run_if_worker`](crate::worker::run_if_worker)].
    pub fn worker_executable(mut self, path: impl Into<PathBuf>) -> Self {
        self.executable = Some(path.into());
        self
    }

    /// Whether the pool stops on SIGINT and SIGTERM as the command line
    /// does [default: no].
    pub fn handle_signals(mut self, handle: bool) -> Self {
        self.handle_signals = handle;
        self
    }

    /// Finds (or builds) the task and starts the supervisor. Workers start
    /// as params arrive.
    ///
    /// # Errors
    ///
    /// When the task cannot be found, built or checked.
    pub fn start(self) -> Result<Pool, EmbedError> {
        let library = plugin::prepare(&self.work_dir, &self.task)?;
        let mut options = PoolOptions::new().map_err(EmbedError::Executable)?;
        if let Some(workers) = self.workers {
            options.workers = workers;
        }
        options.timeout = self.timeout.or(options.timeout);
        options.retries = self.retries.unwrap_or(options.retries);
        options.grace = self.grace.unwrap_or(options.grace);
        options.limits = WorkerLimits {
            memory: self.memory_limit,
        };
        if let Some(executable) = self.executable {
            options.executable = executable;
        }
        options.handle_signals = self.handle_signals;

        let (params_tx, params_rx) = mpsc::channel(1024);
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("runner-pool".into())
            .spawn(move || {
                let report = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .and_then(|runtime| {
                        let mut sink = ChannelSink(results_tx);
                        runtime.block_on(pool::run_pool(
                            &library, &options, params_rx, None, &mut sink,
                        ))
                    });
                let _ = done_tx.send(report);
            })
            .map_err(EmbedError::Supervisor)?;

        Ok(Pool {
            params: Some(params_tx),
            results: results_rx,
            done: Some(done_rx),
            next_index: 0,
        })
    }
}

/// Hands records to the [`Pool`] handle.
struct ChannelSink(mpsc::UnboundedSender<TaskRecord>);

impl RecordSink for ChannelSink {
    fn record(&mut self, record: &TaskRecord) -> io::Result<()> {
        // A handle that stopped listening still lets the run finish.
        let _ = self.0.send(record.clone());
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A running pool of workers for one task.
#[derive(Debug)]
pub struct Pool {
    /// `None` once closed: the supervisor sees the end of the params.
    params: Option<mpsc::Sender<Result<TaskParams, ParamsError>>>,
    results: mpsc::UnboundedReceiver<TaskRecord>,
    done: Option<oneshot::Receiver<io::Result<pool::PoolReport>>>,
    next_index: u64,
}

impl Pool {
    /// Starts setting up a pool for `task`.
    pub fn builder(task: impl Into<String>) -> PoolBuilder {
        PoolBuilder {
            task: task.into(),
            work_dir: PathBuf::from("plugins"),
            workers: None,
            timeout: None,
            retries: None,
            grace: None,
            memory_limit: None,
            executable: None,
            handle_signals: false,
        }
    }

    fn encode(&mut self, params: &impl Serialize) -> Result<TaskParams, EmbedError> {
        let json = serde_json::to_vec(params).map_err(EmbedError::Encode)?;
        let index = self.next_index;
        self.next_index += 1;
        Ok(TaskParams { index, json })
    }

    /// Queues one task; returns its index. Waits while the pool's queue is
    /// full.
    ///
    /// # Errors
    ///
    /// When the params do not encode, or the pool was closed or stopped.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a cancelled call queued nothing, though its index is
    /// spent.
    pub async fn submit(&mut self, params: &impl Serialize) -> Result<u64, EmbedError> {
        let task = self.encode(params)?;
        let index = task.index;
        let sender = self.params.as_ref().ok_or(EmbedError::Closed)?;
        sender
            .send(Ok(task))
            .await
            .map_err(|_| EmbedError::Closed)?;
        Ok(index)
    }

    /// [`Pool::submit`] for code outside an async runtime.
    ///
    /// # Errors
    ///
    /// As [`Pool::submit`].
    ///
    /// # Panics
    ///
    /// When called from inside an async runtime.
    pub fn submit_blocking(&mut self, params: &impl Serialize) -> Result<u64, EmbedError> {
        let task = self.encode(params)?;
        let index = task.index;
        let sender = self.params.as_ref().ok_or(EmbedError::Closed)?;
        sender
            .blocking_send(Ok(task))
            .map_err(|_| EmbedError::Closed)?;
        Ok(index)
    }

    /// Says that no more params come: the pool ends once the queued tasks
    /// have.
    pub fn close(&mut self) {
        self.params = None;
    }

    /// The next record of a finished task, in the order tasks end; `None`
    /// once the pool is closed and every task was delivered.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn next_result(&mut self) -> Option<TaskRecord> {
        self.results.recv().await
    }

    /// [`Pool::next_result`] for code outside an async runtime.
    ///
    /// # Panics
    ///
    /// When called from inside an async runtime.
    pub fn next_result_blocking(&mut self) -> Option<TaskRecord> {
        self.results.blocking_recv()
    }

    /// Closes the pool, waits for its end and returns the counts. Records
    /// not taken yet are dropped.
    ///
    /// # Errors
    ///
    /// When the run stopped early (a plugin that cannot load, say).
    pub async fn finish(mut self) -> Result<RunSummary, EmbedError> {
        self.close();
        let done = self
            .done
            .take()
            .expect("finish runs once, as it takes self");
        let report = done
            .await
            .map_err(|_| EmbedError::Supervisor(io::Error::other("the supervisor thread died")))?
            .map_err(EmbedError::Supervisor)?;
        match report.error {
            Some(error) => Err(error.into()),
            None => Ok(report.summary),
        }
    }
}

impl TaskRecord {
    /// The plugin's return value decoded into `T`; `None` for a failed
    /// task.
    ///
    /// # Errors
    ///
    /// When the output does not decode into `T`.
    pub fn output_json<T: serde::de::DeserializeOwned>(&self) -> Option<serde_json::Result<T>> {
        match &self.outcome {
            Ok(output) if output.is_empty() => Some(serde_json::from_slice(b"null")),
            Ok(output) => Some(serde_json::from_slice(output)),
            Err(_) => None,
        }
    }
}
