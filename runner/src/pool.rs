//! The supervisor: dispatch, deadlines, retries and shutdown.
//!
//! # Theory of operation
//!
//! One event loop on one thread (a current-thread tokio runtime) owns all
//! state: the queue of tasks waiting for a worker, the workers, and the
//! deadlines. Nothing is shared between tasks and nothing polls; the loop
//! sleeps until one of these happens:
//!
//! ```text
//!  params thread ──bounded mpsc──▶ ┌────────────┐ ──unbounded mpsc──▶ frame writer ─▶ worker
//!  worker readers ──unbounded────▶ │ event loop │                                     │
//!  SIGINT / SIGTERM ─────────────▶ │  (Pool)    │ ──▶ results sink                    │
//!  earliest deadline (one sleep) ▶ └────────────┘                                     │
//!  worker stdout/stderr ──bounded mpsc──▶ output thread ◀──────── lines ──────────────┘
//! ```
//!
//! - Each worker has a reader task that decodes frames from its socket and
//!   forwards them as events, then, once the socket ends, waits for the
//!   process to exit and sends that too. Frames of one worker therefore
//!   always arrive before its exit.
//! - Each worker has a writer task fed by an unbounded channel; the loop
//!   never waits on a socket. The channel holds at most a window of tasks.
//! - Worker output is read line by line and written by one output thread,
//!   so lines never interleave mid-line.
//!
//! A worker gets a task only after its hello. When it dies, the task it was
//! running takes the ending (crash with the signal or exit code, timeout if
//! the loop killed it for its deadline, lost if it broke the protocol), and
//! is retried until its attempts are spent; tasks queued behind it on the
//! same worker go back to the queue unchanged. A dead worker is replaced
//! while work remains. Workers that die before their hello, again and
//! again, stop the run: the plugin cannot even load.
//!
//! On the first SIGINT or SIGTERM the loop stops dispatching, closes idle
//! workers and gives running tasks the grace period; then it kills their
//! process groups. A second signal kills at once.
//!
//! CAUTION: no `.await` in an event handler. Handlers run between two
//! `select!` wake-ups and must not wait on a worker, a file or a channel
//! with room for only a bounded number of items, or one slow worker stalls
//! every other.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use plugin_api::CallStatus;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::params::{ParamsError, TaskParams};
use crate::plugin::PluginLibrary;
use crate::protocol::{self, Hello, PROTOCOL_VERSION, TaskFrame, WorkerMessage};
use crate::results::{Ending, EndingKind, RunSummary, TaskRecord};
use crate::spawn::{self, WorkerLimits};
use crate::staging;

/// How much work, in mean task time, the pool queues on one worker beyond
/// the task it is running.
///
/// Sending tasks ahead saves a round trip per task, which is most of the
/// cost of a task that takes microseconds. It costs balance at the end of a
/// run (tasks wait behind others on one worker while another is idle), and
/// nothing else: a worker that dies charges only the task it was running,
/// and the ones queued behind it go back unchanged. Half a millisecond of
/// queued work per worker keeps both costs small: tasks of 1 µs go 64 at a
/// time (the default [`PoolOptions::max_window`]), tasks of 0.5 ms or more
/// one at a time.
pub const WINDOW_BUDGET: Duration = Duration::from_micros(500);

/// The least time a closed worker gets to exit (its plugin's teardown)
/// before it is killed, when a timeout is set.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The time a closed worker gets to exit when no timeout is set.
const CLOSE_GRACE_UNTIMED: Duration = Duration::from_secs(10);

/// How long a task may run with others sent ahead to its worker before
/// they are taken back.
const REVOKE_AFTER: Duration = Duration::from_millis(10);

/// How many task times the mean needs before the pool acts on it.
const TRUSTED_SAMPLES: u64 = 16;

/// About what starting a worker costs: fork, exec, loading the plugin.
const WORKER_START: Duration = Duration::from_millis(2);

/// The least time a worker's call runs, with tasks sent ahead of it,
/// before the supervisor looks into its reply buffer for held results.
const PEEK_DELAY_MIN: Duration = Duration::from_millis(2);

/// The most time between two looks into one worker's reply buffer.
const PEEK_DELAY_MAX: Duration = Duration::from_secs(1);

/// How many workers in a row may die before their hello before the run
/// stops.
const UNBORN_LIMIT: u32 = 3;

/// How long, after the last worker exited, output pipes held open by
/// escaped processes are still read.
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);

/// How long a worker whose socket ended may take to exit before the
/// socket counts as broken and the worker is killed.
const BROKEN_GRACE: Duration = Duration::from_millis(100);

/// How long the socket of a worker that exited is still read when a
/// process it started keeps the socket open.
const EXIT_DRAIN: Duration = Duration::from_millis(100);

/// Where the workers' stdout goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputMode {
    /// Task stdout to the runner's stdout, task stderr to its stderr.
    #[default]
    Normal,
    /// Both to the runner's stderr (stdout carries results).
    Stderr,
    /// Task stdout dropped; task stderr to the runner's stderr.
    Quiet,
}

/// Options of one pool run.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// The most workers alive at once.
    pub workers: usize,
    /// Per-attempt time limit.
    pub timeout: Option<Duration>,
    /// Extra attempts after a retryable failure.
    pub retries: u32,
    /// Time running tasks get after the first SIGINT or SIGTERM.
    pub grace: Duration,
    /// Limits applied to each worker.
    pub limits: WorkerLimits,
    /// The executable started as a worker (the runner itself by default).
    pub executable: PathBuf,
    /// Where task output goes.
    pub output: OutputMode,
    /// The most tasks sent ahead to one worker. The pool sends fewer when
    /// tasks are slow: see [`WINDOW_BUDGET`].
    pub max_window: usize,
    /// Whether SIGINT and SIGTERM are handled by the pool.
    pub handle_signals: bool,
    /// Whether every line of task output is prefixed with the task's index.
    pub tag: bool,
}

impl PoolOptions {
    /// Defaults: one worker per CPU, no timeout, 2 retries, 5 s grace.
    ///
    /// # Errors
    ///
    /// When the path of the running executable cannot be found.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            timeout: None,
            retries: 2,
            grace: Duration::from_secs(5),
            limits: WorkerLimits::default(),
            executable: worker_executable(std::env::current_exe()?),
            output: OutputMode::Normal,
            max_window: 64,
            handle_signals: true,
            tag: false,
        })
    }
}

/// The executable to start workers from: `runner-worker` next to the
/// `runner` binary when it is there (a smaller executable, so smaller
/// workers), the running executable itself otherwise.
fn worker_executable(current: PathBuf) -> PathBuf {
    let is_runner = current.file_name().is_some_and(|name| name == "runner");
    let sibling = current.with_file_name("runner-worker");
    if is_runner && sibling.is_file() {
        sibling
    } else {
        current
    }
}

/// Receives each finished task's record.
pub trait RecordSink {
    /// Takes one record.
    ///
    /// # Errors
    ///
    /// A write error stops the run.
    fn record(&mut self, record: &TaskRecord) -> io::Result<()>;

    /// Hears that a task failed an attempt and goes back to the queue.
    fn retrying(&mut self, _index: u64) {}

    /// Makes the records taken so far durable; called after each batch of
    /// events.
    ///
    /// # Errors
    ///
    /// A write error stops the run.
    fn flush(&mut self) -> io::Result<()>;
}

/// Why a run stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The plugin refused to load in a worker.
    #[error("the plugin `{}` cannot be used: {message}", library.display())]
    PluginLoad {
        /// The library.
        library: PathBuf,
        /// What the worker reported.
        message: String,
    },
    /// Workers kept dying before they were ready.
    #[error(
        "the plugin `{}` kills its worker before it is ready ({count} workers in a row; \
         the last {status})", library.display()
    )]
    Unborn {
        /// The library.
        library: PathBuf,
        /// How many died in a row.
        count: u32,
        /// How the last one ended.
        status: String,
    },
    /// A worker process could not be started.
    #[error("cannot start a worker `{}`", executable.display())]
    Spawn {
        /// The executable.
        executable: PathBuf,
        /// The error from fork or exec.
        #[source]
        source: io::Error,
    },
    /// The params stream failed.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// Writing a record failed.
    #[error("cannot write results")]
    Results(#[source] io::Error),
    /// A worker spoke another protocol version.
    #[error("worker pid {pid} speaks protocol version {theirs}, this runner {PROTOCOL_VERSION}")]
    Protocol {
        /// The worker's pid.
        pid: u32,
        /// Its version.
        theirs: u32,
    },
}

/// What a finished run reports.
#[derive(Debug)]
pub struct PoolReport {
    /// The counts.
    pub summary: RunSummary,
    /// The signal that interrupted the run, if one did.
    pub interrupted: Option<i32>,
    /// The plugin as its first worker described it.
    pub plugin: Option<Hello>,
    /// The error that stopped the run early, if one did. Every task that
    /// finished before it is recorded.
    pub error: Option<PoolError>,
}

/// A task waiting for, or running on, a worker.
#[derive(Debug)]
struct Task {
    params: TaskParams,
    attempts: u32,
    endings: Vec<Ending>,
    /// When the task's frame went to its worker; unset while queued.
    sent_at: Option<Instant>,
}

/// Why the loop killed a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KillReason {
    /// The task with this frame number ran past this limit.
    Timeout(Duration, u64),
    /// It broke the protocol between tasks; what it had goes back unchanged.
    Retire(String),
    Shutdown,
}

/// The supervisor's view of one worker.
#[derive(Debug)]
struct WorkerSlot {
    /// Process id, also the process group id.
    pid: u32,
    /// Frames to the writer task. `None` once the worker is being closed:
    /// dropping the sender ends the writer, which shuts the socket, which
    /// makes the worker exit.
    frames: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// Whether the hello arrived. No task is sent before it.
    ready: bool,
    /// Tasks sent, oldest (running) first. The task at position `i` went
    /// out in the frame numbered `front_seq + i`.
    in_flight: VecDeque<Task>,
    /// The frame number of the front task in `in_flight`.
    front_seq: u64,
    /// The frame number the next task sent gets.
    next_seq: u64,
    /// How long after `running_since` to look into the reply buffer while
    /// tasks are sent ahead; doubles while a look finds nothing new.
    peek_delay: Duration,
    /// When to look into the reply buffer next (see `peek_at`).
    next_peek: Instant,
    /// When the loop closed this idle worker; one that does not exit in
    /// time (a plugin whose teardown hangs) is killed.
    closing_since: Option<Instant>,
    /// Set from sending a revoke until its answer: no task may be sent to
    /// the worker meanwhile, or the answer's count would not say which
    /// tasks were dropped.
    revoking: bool,
    /// When the front task started, as far as the supervisor can tell.
    running_since: Instant,
    /// Set when the loop killed the worker; decides the running task's
    /// ending when the exit arrives.
    killed: Option<KillReason>,
    /// What the reader saw when the socket ended, if it ended first.
    broken: Option<String>,
    /// Whether the loop killed the worker because its socket broke while
    /// it lived on.
    killed_for_broken: bool,
    /// The worker's reply buffer, read for answers it held when it died.
    staging: std::fs::File,
}

#[derive(Debug)]
enum WorkerEventKind {
    /// Every message that one read of the socket completed, in order.
    Messages(Vec<WorkerMessage>),
    Broken(String),
    Exited(io::Result<ExitStatus>),
}

#[derive(Debug)]
struct WorkerEvent {
    worker: u64,
    kind: WorkerEventKind,
}

/// Which of the runner's streams a line goes to.
#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Describes how a process ended, as "killed by signal 11 (SIGSEGV)" or
/// "exited with code 3".
pub fn describe_status(status: ExitStatus) -> String {
    if let Some(signal) = status.signal() {
        let core = if status.core_dumped() {
            ", core dumped"
        } else {
            ""
        };
        format!("killed by signal {signal} ({}{core})", signal_name(signal))
    } else if let Some(code) = status.code() {
        format!("exited with code {code}")
    } else {
        format!("ended with {status}")
    }
}

/// The conventional name of a signal number.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => "unknown signal",
    }
}

/// Runs every task from `params` on a pool of workers.
///
/// `total`, when known, keeps the pool from starting more workers than there
/// are tasks. Records reach `sink` as tasks finish, in the order they
/// finish.
///
/// # Errors
///
/// Only errors from before the first worker (setting up signal handlers).
/// Errors during the run come back in [`PoolReport::error`], after every
/// task that finished was recorded.
pub async fn run_pool(
    library: &PluginLibrary,
    options: &PoolOptions,
    params: mpsc::Receiver<Result<TaskParams, ParamsError>>,
    total: Option<u64>,
    sink: &mut dyn RecordSink,
) -> io::Result<PoolReport> {
    let mut supervisor = Supervisor::new(library, options, params, total, sink);
    supervisor.drive().await?;
    Ok(supervisor.finish().await)
}

struct Supervisor<'a> {
    library: &'a PluginLibrary,
    options: &'a PoolOptions,
    sink: &'a mut dyn RecordSink,
    params: Option<mpsc::Receiver<Result<TaskParams, ParamsError>>>,
    /// Tasks waiting for a worker; retries go to the front.
    queue: VecDeque<Task>,
    /// How many tasks to hold in the queue at most.
    queue_target: usize,
    /// The most workers this run needs.
    worker_target: usize,
    /// The most workers starting (spawned, not yet ready) at once.
    start_at_once: usize,
    workers: HashMap<u64, WorkerSlot>,
    next_worker: u64,
    events_tx: mpsc::UnboundedSender<WorkerEvent>,
    events_rx: mpsc::UnboundedReceiver<WorkerEvent>,
    output_tx: mpsc::Sender<(Stream, Vec<u8>)>,
    output_thread: Option<std::thread::JoinHandle<()>>,
    forwarders: Vec<JoinHandle<()>>,
    /// Set when the run must end early: no task is dispatched once it is.
    stopping: bool,
    grace_deadline: Option<Instant>,
    interrupted: Option<i32>,
    error: Option<PoolError>,
    unborn_streak: u32,
    plugin: Option<Hello>,
    summary: RunSummary,
    started: Instant,
    /// Mean plugin call time, as a moving average over recent tasks; `None`
    /// before the first task ends.
    mean_task: Option<Duration>,
    /// How many task times went into `mean_task`.
    samples: u64,
}

impl<'a> Supervisor<'a> {
    fn new(
        library: &'a PluginLibrary,
        options: &'a PoolOptions,
        params: mpsc::Receiver<Result<TaskParams, ParamsError>>,
        total: Option<u64>,
        sink: &'a mut dyn RecordSink,
    ) -> Self {
        let workers = options.workers.max(1);
        let worker_target = match total {
            Some(total) => workers.min(usize::try_from(total).unwrap_or(usize::MAX)),
            None => workers,
        };
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (output_tx, output_rx) = mpsc::channel(1024);
        let mode = options.output;
        let output_thread = std::thread::Builder::new()
            .name("output".into())
            .spawn(move || write_output(output_rx, mode))
            .expect("the output thread can be started");

        Self {
            library,
            options,
            sink,
            params: Some(params),
            queue: VecDeque::new(),
            queue_target: (workers * options.max_window.max(1)).max(64),
            worker_target,
            start_at_once: std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
            workers: HashMap::new(),
            next_worker: 0,
            events_tx,
            events_rx,
            output_tx,
            output_thread: Some(output_thread),
            forwarders: Vec::new(),
            stopping: false,
            grace_deadline: None,
            interrupted: None,
            error: None,
            unborn_streak: 0,
            plugin: None,
            summary: RunSummary::default(),
            started: Instant::now(),
            mean_task: None,
            samples: 0,
        }
    }

    /// The event loop.
    #[tracing::instrument(skip_all, name = "pool")]
    async fn drive(&mut self) -> io::Result<()> {
        let (mut sigint, mut sigterm) = if self.options.handle_signals {
            (
                Some(signal(SignalKind::interrupt())?),
                Some(signal(SignalKind::terminate())?),
            )
        } else {
            (None, None)
        };
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);

        loop {
            self.fill_queue();
            self.dispatch();
            if self.is_done() {
                return Ok(());
            }

            let deadline = self.next_deadline();
            if let Some(deadline) = deadline {
                sleep.as_mut().reset(deadline.into());
            }
            let wants_params = self.wants_params();

            tokio::select! {
                Some(event) = self.events_rx.recv() => self.on_events(event),
                item = recv_params(&mut self.params), if wants_params => self.on_params(item),
                () = &mut sleep, if deadline.is_some() => self.on_deadline(),
                Some(()) = recv_signal(&mut sigint) => self.on_signal(libc::SIGINT),
                Some(()) = recv_signal(&mut sigterm) => self.on_signal(libc::SIGTERM),
            }
        }
    }

    /// Whether the loop has nothing left to wait for.
    fn is_done(&self) -> bool {
        self.workers.is_empty()
            && (self.stopping || (self.params.is_none() && self.queue.is_empty()))
    }

    /// Whether the loop should wait for params: it has room and nothing
    /// queued to hand out.
    fn wants_params(&self) -> bool {
        !self.stopping && self.params.is_some() && self.queue.is_empty()
    }

    /// Moves params that are already available into the queue.
    fn fill_queue(&mut self) {
        while !self.stopping && self.queue.len() < self.queue_target {
            let Some(params) = self.params.as_mut() else {
                return;
            };
            match params.try_recv() {
                Ok(item) => self.on_params(Some(item)),
                Err(mpsc::error::TryRecvError::Empty) => return,
                Err(mpsc::error::TryRecvError::Disconnected) => self.on_params(None),
            }
        }
    }

    fn on_params(&mut self, item: Option<Result<TaskParams, ParamsError>>) {
        match item {
            Some(Ok(params)) => self.queue.push_back(Task {
                params,
                attempts: 0,
                endings: Vec::new(),
                sent_at: None,
            }),
            // Tasks read before the bad line still run; no task after it
            // does, and the run then ends with the error.
            Some(Err(error)) => {
                tracing::debug!(%error, "params stream failed");
                self.params = None;
                self.error.get_or_insert(error.into());
            }
            None => {
                tracing::debug!("params stream ended");
                self.params = None;
            }
        }
    }

    /// Stops the run for `error`; kills the workers at once when `kill`.
    fn fail(&mut self, error: PoolError, kill: bool) {
        if self.error.is_none() {
            self.error = Some(error);
        }
        self.stopping = true;
        if kill {
            self.kill_all(KillReason::Shutdown);
        }
    }

    /// Hands queued tasks to workers with room, starts workers that are
    /// needed and closes workers that are not.
    fn dispatch(&mut self) {
        // Idle workers close once nothing can need them again: when the run
        // stops, or when no task is left and none is running that could
        // fail and come back for a retry.
        let drained = self.params.is_none() && self.queue.is_empty();
        if self.stopping || drained {
            let running = self.workers.values().any(|s| !s.in_flight.is_empty());
            if self.stopping || !running {
                for slot in self.workers.values_mut() {
                    if slot.in_flight.is_empty() && slot.frames.is_some() {
                        tracing::trace!(pid = slot.pid, "closing idle worker");
                        slot.frames = None;
                        slot.closing_since = Some(Instant::now());
                    }
                }
            }
            return;
        }

        // First one task for every ready worker with none, then tasks sent
        // ahead, so that no worker waits while another has a backlog.
        let window = self.window();
        for pass_window in [1, window] {
            for slot in self.workers.values_mut() {
                if !slot.ready || slot.killed.is_some() || slot.revoking {
                    continue;
                }
                let Some(frames) = &slot.frames else {
                    continue;
                };
                // Every task sent in this round goes in one buffer, and so
                // in one write.
                let mut batch = Vec::new();
                while slot.in_flight.len() < pass_window {
                    let Some(mut task) = self.queue.pop_front() else {
                        break;
                    };
                    task.attempts += 1;
                    protocol::encode_task(
                        &mut batch,
                        &TaskFrame {
                            id: slot.next_seq,
                            index: task.params.index,
                            params: &task.params.json,
                        },
                    );
                    slot.next_seq += 1;
                    let now = Instant::now();
                    task.sent_at = Some(now);
                    if slot.in_flight.is_empty() {
                        slot.running_since = now;
                        slot.front_seq = slot.next_seq - 1;
                        slot.peek_delay = PEEK_DELAY_MIN;
                        slot.next_peek = now + PEEK_DELAY_MIN;
                    }
                    tracing::debug!(task = task.params.index, pid = slot.pid, "dispatched");
                    slot.in_flight.push_back(task);
                }
                if !batch.is_empty() {
                    // A closed channel means the writer died with the
                    // socket; the reader reports that, and the tasks are
                    // settled when the worker's exit arrives.
                    let _ = frames.send(batch);
                }
            }
        }

        // A worker counts until its exit is handled, even once it is
        // closing or killed, so a plugin that kills its workers at once
        // cannot make the pool start more than its limit.
        //
        // Workers start as work waits for them: only while tasks are left in
        // the queue after every ready worker took what it can, and only a
        // few at a time. Slow tasks thus bring up all the workers allowed
        // within milliseconds, and a batch of tiny ones is done by the
        // first few before the rest would even have loaded the plugin.
        let live = self.workers.len();
        let starting = self
            .workers
            .values()
            .filter(|s| !s.ready && s.frames.is_some())
            .count();
        let ready = self.workers.values().filter(|s| s.ready).count();
        let waiting = if live == 0 && (!self.queue.is_empty() || self.params.is_some()) {
            self.queue.len().max(1)
        } else if self.queue_outlasts_a_start(ready) {
            self.queue.len()
        } else {
            0
        };
        let room = self.worker_target.saturating_sub(live);
        let startable = self.start_at_once.saturating_sub(starting);
        for _ in 0..room.min(startable).min(waiting) {
            if let Err(error) = self.spawn_worker() {
                self.fail(error, true);
                return;
            }
        }
    }

    fn spawn_worker(&mut self) -> Result<(), PoolError> {
        let spawned = spawn::spawn_worker(
            &self.options.executable,
            &self.library.snapshot,
            self.options.limits,
            self.options.tag,
        )
        .map_err(|source| PoolError::Spawn {
            executable: self.options.executable.clone(),
            source,
        })?;
        let mut child = spawned.child;
        let staging = spawned.staging;
        let pid = child.id().expect("a child that was just spawned has a pid");
        let id = self.next_worker;
        self.next_worker += 1;
        self.summary.workers_started += 1;
        tracing::debug!(pid, worker = id, "spawned worker");

        let stdout = child.stdout.take().expect("stdout was piped at spawn");
        let stderr = child.stderr.take().expect("stderr was piped at spawn");
        self.forwarders.push(tokio::spawn(forward_lines(
            stdout,
            Stream::Stdout,
            self.output_tx.clone(),
            self.options.tag,
        )));
        self.forwarders.push(tokio::spawn(forward_lines(
            stderr,
            Stream::Stderr,
            self.output_tx.clone(),
            self.options.tag,
        )));

        spawned
            .socket
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(spawned.socket))
            .map(|socket| {
                let (read_half, write_half) = socket.into_split();
                let (frames_tx, frames_rx) = mpsc::unbounded_channel();
                tokio::spawn(write_frames(write_half, frames_rx));
                tokio::spawn(read_worker(id, read_half, child, self.events_tx.clone()));
                self.workers.insert(
                    id,
                    WorkerSlot {
                        pid,
                        frames: Some(frames_tx),
                        ready: false,
                        in_flight: VecDeque::new(),
                        front_seq: 0,
                        next_seq: 0,
                        peek_delay: PEEK_DELAY_MIN,
                        next_peek: Instant::now(),
                        closing_since: None,
                        revoking: false,
                        running_since: Instant::now(),
                        killed: None,
                        broken: None,
                        killed_for_broken: false,
                        staging,
                    },
                );
            })
            .map_err(|source| PoolError::Spawn {
                executable: self.options.executable.clone(),
                source,
            })
    }

    /// Whether the queued tasks would keep the ready workers busy for
    /// longer than a new worker takes to start; if not, a new one would
    /// arrive to find the work done.
    fn queue_outlasts_a_start(&self, ready: usize) -> bool {
        let Some(mean) = self.mean_task.filter(|_| self.samples >= TRUSTED_SAMPLES) else {
            return true;
        };
        let queued = mean.saturating_mul(u32::try_from(self.queue.len()).unwrap_or(u32::MAX));
        queued > WORKER_START.saturating_mul(u32::try_from(ready.max(1)).unwrap_or(u32::MAX))
    }

    /// How many tasks a worker may have sent ahead right now.
    fn window(&self) -> usize {
        let max = self.options.max_window.max(1);
        match self.mean_task.filter(|_| self.samples >= TRUSTED_SAMPLES) {
            // Until enough tasks have ended, nothing is known of their
            // length: one tiny task first says little about the next.
            None => 1,
            Some(mean) => {
                let fits = WINDOW_BUDGET.as_nanos() / mean.as_nanos().max(1);
                usize::try_from(fits).unwrap_or(max).clamp(1, max)
            }
        }
    }

    /// Folds a finished call's time into the moving average.
    fn observe_task_time(&mut self, duration: Duration) {
        let before = self.window();
        self.samples += 1;
        self.mean_task = Some(match self.mean_task {
            None => duration,
            Some(mean) => (mean * 15 + duration) / 16,
        });
        let after = self.window();
        if before != after {
            tracing::trace!(window = after, mean = ?self.mean_task, "send window changed");
        }
    }

    /// The earliest moment the loop must act without an event.
    fn next_deadline(&self) -> Option<Instant> {
        let mut next = self.grace_deadline;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        };
        for slot in self.workers.values() {
            if slot.killed.is_some() {
                continue;
            }
            consider(self.timeout_at(slot));
            consider(peek_at(slot));
        }
        next
    }

    /// When the worker's running task (or, before its hello, its start)
    /// runs out of time; `None` without a timeout, or past the end of time.
    fn timeout_at(&self, slot: &WorkerSlot) -> Option<Instant> {
        // A closed worker exits at once unless its plugin's teardown hangs.
        if let Some(closing) = slot.closing_since.filter(|_| slot.in_flight.is_empty()) {
            let grace = match self.options.timeout {
                Some(timeout) => timeout.max(CLOSE_GRACE),
                None => CLOSE_GRACE_UNTIMED,
            };
            return closing.checked_add(grace);
        }
        let timeout = self.options.timeout?;
        let starting = !slot.ready && slot.frames.is_some();
        let running = slot.ready && !slot.in_flight.is_empty();
        if starting || running {
            slot.running_since.checked_add(timeout)
        } else {
            None
        }
    }

    fn on_deadline(&mut self) {
        let now = Instant::now();
        if self.grace_deadline.is_some_and(|d| d <= now) {
            tracing::warn!("grace period over; killing running tasks");
            self.grace_deadline = None;
            self.kill_all(KillReason::Shutdown);
        }

        let mut overdue = Vec::new();
        let mut peeks = Vec::new();
        for (&id, slot) in &self.workers {
            if slot.killed.is_some() {
                continue;
            }
            if self.timeout_at(slot).is_some_and(|at| at <= now) {
                overdue.push(id);
            } else if peek_at(slot).is_some_and(|at| at <= now) {
                peeks.push(id);
            }
        }

        for id in peeks {
            if self.settle_held_replies(id) == 0 {
                self.revoke_behind_a_slow_task(id, now);
                if let Some(slot) = self.workers.get_mut(&id) {
                    slot.peek_delay = (slot.peek_delay * 2).min(PEEK_DELAY_MAX);
                    slot.next_peek = now + slot.peek_delay;
                }
            }
        }

        self.kill_overdue(overdue, now);
        // Records settled here, from reply buffers, must not wait for the
        // next event to reach the file.
        if let Err(error) = self.sink.flush() {
            self.fail(PoolError::Results(error), true);
        }
    }

    /// Takes back the tasks sent ahead to a worker whose running task has
    /// run for [`REVOKE_AFTER`] or more, so that they do not wait behind it
    /// while other workers could run them. The long task also counts
    /// towards the mean task time, which shrinks the send window at once.
    fn revoke_behind_a_slow_task(&mut self, worker: u64, now: Instant) {
        let Some(slot) = self.workers.get_mut(&worker) else {
            return;
        };
        let running_for = now.saturating_duration_since(slot.running_since);
        if slot.revoking || slot.in_flight.len() < 2 || running_for < REVOKE_AFTER {
            return;
        }
        let Some(frames) = &slot.frames else {
            return;
        };
        let mut frame = Vec::new();
        protocol::encode_revoke(&mut frame, slot.front_seq + 1);
        if frames.send(frame).is_ok() {
            slot.revoking = true;
            tracing::debug!(
                pid = slot.pid,
                queued = slot.in_flight.len() - 1,
                "revoking tasks behind a slow one"
            );
        }
        self.observe_task_time(running_for);
    }

    /// Puts the tasks a worker dropped on a revoke back in the queue,
    /// uncharged and in their order.
    fn on_revoked(&mut self, worker: u64, dropped: u64) {
        let Some(slot) = self.workers.get_mut(&worker) else {
            return;
        };
        if !slot.revoking || dropped as usize > slot.in_flight.len() {
            self.retire(
                worker,
                format!("answered a revoke it was not sent ({dropped} dropped)"),
            );
            return;
        }
        slot.revoking = false;
        for _ in 0..dropped {
            let mut task = slot.in_flight.pop_back().expect("counted above");
            task.attempts -= 1;
            task.sent_at = None;
            self.queue.push_front(task);
        }
        // Frame numbers of dropped tasks were never answered, and are
        // given out again, so that `in_flight` stays numbered without gaps.
        slot.next_seq = slot.front_seq + slot.in_flight.len() as u64;
        tracing::debug!(pid = slot.pid, dropped, "revoked tasks back in the queue");
    }

    fn kill_overdue(&mut self, overdue: Vec<u64>, now: Instant) {
        // Only closed workers are overdue without a timeout.
        let timeout = self.options.timeout.unwrap_or_default();
        for id in overdue {
            // Results the worker held are not the running task's: settle
            // them first, so the timeout lands on the task that ran long,
            // and only if that one is overdue too.
            self.settle_held_replies(id);
            let Some(slot) = self.workers.get(&id) else {
                continue;
            };
            if slot.killed.is_some() || self.timeout_at(slot).is_none_or(|at| at > now) {
                continue;
            }
            let slot = self.workers.get_mut(&id).expect("looked up above");
            let task = slot.in_flight.front().map(|t| t.params.index);
            if slot.closing_since.is_some() && slot.in_flight.is_empty() {
                tracing::warn!(
                    pid = slot.pid,
                    "closed worker did not exit in time; killing it"
                );
                slot.killed = Some(KillReason::Shutdown);
                spawn::kill_group(slot.pid);
                continue;
            }
            if slot.ready {
                tracing::info!(pid = slot.pid, task, "task timed out; killing its worker");
            } else {
                tracing::warn!(
                    pid = slot.pid,
                    "worker not ready within the timeout; killing it"
                );
            }
            slot.killed = Some(KillReason::Timeout(timeout, slot.front_seq));
            spawn::kill_group(slot.pid);
        }
    }

    fn on_signal(&mut self, signal: i32) {
        if self.interrupted.is_some() {
            tracing::warn!(
                signal = signal_name(signal),
                "second signal; killing all workers"
            );
            self.kill_all(KillReason::Shutdown);
            return;
        }
        let running: usize = self
            .workers
            .values()
            .map(|s| s.in_flight.len().min(1))
            .sum();
        tracing::warn!(
            signal = signal_name(signal),
            running,
            grace = ?self.options.grace,
            "stopping: no new tasks; running tasks get the grace period"
        );
        self.interrupted = Some(signal);
        self.stopping = true;
        self.params = None;
        self.grace_deadline = Instant::now().checked_add(self.options.grace);
    }

    fn kill_all(&mut self, reason: KillReason) {
        for slot in self.workers.values_mut() {
            slot.frames = None;
            if slot.killed.is_none() {
                slot.killed = Some(reason.clone());
            }
            spawn::kill_group(slot.pid);
        }
    }

    /// Handles an event and every other one already waiting, then flushes
    /// the records once.
    fn on_events(&mut self, first: WorkerEvent) {
        self.on_event(first);
        for _ in 0..1024 {
            match self.events_rx.try_recv() {
                Ok(event) => self.on_event(event),
                Err(_) => break,
            }
        }
        if let Err(error) = self.sink.flush() {
            self.fail(PoolError::Results(error), true);
        }
    }

    fn on_event(&mut self, event: WorkerEvent) {
        match event.kind {
            WorkerEventKind::Messages(messages) => {
                for message in messages {
                    self.on_message(event.worker, message);
                }
            }
            WorkerEventKind::Broken(reason) => self.on_broken(event.worker, reason),
            WorkerEventKind::Exited(status) => self.on_exit(event.worker, status),
        }
    }

    fn on_message(&mut self, worker: u64, message: WorkerMessage) {
        match message {
            WorkerMessage::Hello(hello) => self.on_hello(worker, hello),
            // Only a worker that has not said hello can fail to load; one
            // that says so later is misbehaving, not the plugin unusable.
            WorkerMessage::LoadFailed(message) if self.is_ready(worker) => {
                self.retire(
                    worker,
                    format!("sent a load failure after its hello: {message}"),
                );
            }
            WorkerMessage::LoadFailed(message) => {
                let error = PoolError::PluginLoad {
                    library: self.library.source.clone(),
                    message,
                };
                self.fail(error, true);
            }
            WorkerMessage::Done(done) => self.on_done(worker, done),
            WorkerMessage::Revoked(dropped) => self.on_revoked(worker, dropped),
        }
    }

    fn is_ready(&self, worker: u64) -> bool {
        self.workers.get(&worker).is_some_and(|slot| slot.ready)
    }

    fn on_hello(&mut self, worker: u64, hello: Hello) {
        if self.is_ready(worker) {
            self.retire(worker, String::from("said hello twice"));
            return;
        }
        let Some(slot) = self.workers.get_mut(&worker) else {
            return;
        };
        if hello.protocol != PROTOCOL_VERSION {
            let error = PoolError::Protocol {
                pid: slot.pid,
                theirs: hello.protocol,
            };
            self.fail(error, true);
            return;
        }
        tracing::debug!(pid = slot.pid, "worker ready");
        slot.ready = true;
        slot.running_since = Instant::now();
        self.unborn_streak = 0;
        if self.plugin.is_none() {
            tracing::info!(
                plugin = %hello.name,
                version = %hello.version,
                abi = hello.abi_version,
                "plugin loaded"
            );
            self.plugin = Some(hello);
        }
    }

    fn on_done(&mut self, worker: u64, done: protocol::Done) {
        let Some(slot) = self.workers.get_mut(&worker) else {
            return;
        };
        if done.id < slot.front_seq {
            // Settled already, from the reply buffer.
            tracing::trace!(pid = slot.pid, seq = done.id, "answer seen twice");
            return;
        }
        if slot.in_flight.is_empty() || done.id != slot.front_seq {
            let reason = format!(
                "worker pid {} answered frame {} while running frame {}",
                slot.pid, done.id, slot.front_seq
            );
            self.retire(worker, reason);
            return;
        }
        let task = slot.in_flight.pop_front().expect("front was checked");
        slot.front_seq += 1;
        let duration = Duration::from_nanos(done.nanos);
        // The next task started when this one ended, or when its frame was
        // sent, whichever came later: not when this answer arrived, which
        // for answers held in a batch can be much later.
        let now = Instant::now();
        let ended = slot.running_since.checked_add(duration).unwrap_or(now);
        let next_sent = slot
            .in_flight
            .front()
            .and_then(|t| t.sent_at)
            .unwrap_or(now);
        slot.running_since = ended.max(next_sent).min(now);
        slot.peek_delay = PEEK_DELAY_MIN;
        slot.next_peek = slot.running_since + PEEK_DELAY_MIN;
        let pid = slot.pid;
        self.observe_task_time(duration);

        let message = || String::from_utf8_lossy(&done.payload).into_owned();
        let kind = match CallStatus::from_u32(done.status) {
            Some(CallStatus::Ok) => match checked_output(done.payload) {
                Ok(output) => {
                    self.finish_task(task, duration, Ok(output));
                    return;
                }
                Err(problem) => {
                    let message = format!("worker pid {pid} returned {problem}");
                    self.lose_to_a_broken_answer(worker, task, duration, message);
                    return;
                }
            },
            Some(CallStatus::Error) => EndingKind::Error,
            Some(CallStatus::PermanentError) => EndingKind::Permanent,
            Some(CallStatus::Panic) => EndingKind::Panic,
            Some(CallStatus::BadParams) => EndingKind::BadParams,
            None => {
                let message = format!("worker pid {pid} sent unknown call status {}", done.status);
                self.lose_to_a_broken_answer(worker, task, duration, message);
                return;
            }
        };
        let message = match kind {
            EndingKind::Panic => message(),
            EndingKind::BadParams => format!("params do not fit the task: {}", message()),
            _ => message(),
        };
        self.settle(task, duration, Ending { kind, message });
    }

    /// A task whose answer broke the protocol ends `lost`, and its worker
    /// is replaced.
    fn lose_to_a_broken_answer(
        &mut self,
        worker: u64,
        task: Task,
        duration: Duration,
        message: String,
    ) {
        let ending = Ending {
            kind: EndingKind::Lost,
            message: message.clone(),
        };
        self.settle(task, duration, ending);
        self.retire(worker, message);
    }

    fn on_broken(&mut self, worker: u64, reason: String) {
        let Some(slot) = self.workers.get_mut(&worker) else {
            return;
        };
        let expected = slot.frames.is_none() && slot.in_flight.is_empty();
        if !expected {
            tracing::debug!(pid = slot.pid, %reason, "worker socket ended");
            slot.broken = Some(reason);
            slot.frames = None;
            // The worker outlived its socket, and cannot serve without it:
            // end it, and whatever it started, so its exit arrives.
            slot.killed_for_broken = true;
            spawn::kill_group(slot.pid);
        }
    }

    /// Settles the answers a worker holds in its reply buffer: all of them
    /// for a dead worker, those that can be read consistently for a live
    /// one. Returns how many were settled.
    fn settle_held_replies(&mut self, worker: u64) -> usize {
        let Some(slot) = self.workers.get(&worker) else {
            return 0;
        };
        let bytes = match staging::peek(&slot.staging) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return 0,
            Err(error) => {
                tracing::warn!(pid = slot.pid, %error, "cannot read a worker's reply buffer");
                return 0;
            }
        };
        let mut frames = protocol::FrameAssembler::new();
        frames.buffer().extend_from_slice(&bytes);
        let mut settled = 0;
        while let Ok(Some(body)) = frames.next_frame() {
            let Ok(WorkerMessage::Done(done)) = protocol::decode_worker_message(body) else {
                break;
            };
            let Some(slot) = self.workers.get(&worker) else {
                break;
            };
            if done.id < slot.front_seq {
                continue;
            }
            if done.id != slot.front_seq || slot.in_flight.is_empty() {
                break;
            }
            settled += 1;
            self.on_done(worker, done);
        }
        if settled > 0 {
            tracing::trace!(worker, settled, "settled answers from a reply buffer");
        }
        settled
    }

    /// Replaces a worker that broke the protocol: it is killed, and the
    /// tasks it had are sent again, uncharged.
    fn retire(&mut self, worker: u64, reason: String) {
        let Some(slot) = self.workers.get_mut(&worker) else {
            return;
        };
        tracing::warn!(pid = slot.pid, %reason, "replacing a worker that broke the protocol");
        slot.frames = None;
        slot.killed.get_or_insert(KillReason::Retire(reason));
        spawn::kill_group(slot.pid);
    }

    fn on_exit(&mut self, worker: u64, status: io::Result<ExitStatus>) {
        let ran_for = self
            .workers
            .get(&worker)
            .map_or(Duration::ZERO, |slot| slot.running_since.elapsed());
        self.settle_held_replies(worker);
        let Some(mut slot) = self.workers.remove(&worker) else {
            return;
        };
        // Whatever the worker left in its group dies with it.
        spawn::kill_group(slot.pid);
        let pid = slot.pid;
        let described = match &status {
            Ok(status) => describe_status(*status),
            Err(error) => format!("could not be waited for: {error}"),
        };

        if !slot.ready {
            if !self.stopping {
                let described = match (&slot.killed, self.options.limits.memory) {
                    (Some(KillReason::Timeout(limit, _)), _) => format!(
                        "was not ready within the timeout of {}",
                        humantime::format_duration(*limit)
                    ),
                    (_, Some(limit)) => format!(
                        "{described} (is the memory limit of {} MiB too small?)",
                        limit >> 20
                    ),
                    (_, None) => described,
                };
                self.unborn_streak += 1;
                tracing::warn!(pid, status = %described, "worker died before it was ready");
                if self.unborn_streak >= UNBORN_LIMIT {
                    let error = PoolError::Unborn {
                        library: self.library.source.clone(),
                        count: self.unborn_streak,
                        status: described,
                    };
                    self.fail(error, true);
                }
            }
            return;
        }

        let Some(task) = slot.in_flight.pop_front() else {
            let clean = status.as_ref().is_ok_and(|s| s.success());
            if lost_socket(&status) {
                tracing::warn!(
                    pid,
                    "worker lost its protocol socket between tasks; replaced"
                );
            } else if !clean && slot.killed.is_none() {
                tracing::warn!(pid, status = %described, "idle worker died");
            } else {
                tracing::debug!(pid, status = %described, "worker exited");
            }
            return;
        };
        // Tasks sent behind the running one never started: back to the
        // queue, in their order, without an attempt charged.
        while let Some(mut waiting) = slot.in_flight.pop_back() {
            waiting.attempts -= 1;
            self.queue.push_front(waiting);
        }

        let ending = match slot.killed.take() {
            // The task that ran out of time finished after all, between the
            // decision and the kill (its answer came from the reply
            // buffer): the task after it did nothing wrong.
            Some(KillReason::Timeout(_, seq)) if seq != slot.front_seq => {
                let mut task = task;
                task.attempts -= 1;
                self.queue.push_front(task);
                return;
            }
            Some(KillReason::Timeout(limit, _)) => Ending {
                kind: EndingKind::Timeout,
                message: format!(
                    "ran past the timeout of {}; worker pid {pid} was killed",
                    humantime::format_duration(limit)
                ),
            },
            Some(KillReason::Shutdown) => {
                tracing::debug!(pid, task = task.params.index, "task killed at shutdown");
                return;
            }
            Some(KillReason::Retire(_)) => {
                let mut task = task;
                task.attempts -= 1;
                self.queue.push_front(task);
                return;
            }
            None => match slot.broken.take() {
                Some(reason) if slot.killed_for_broken || lost_socket(&status) => Ending {
                    kind: EndingKind::Lost,
                    message: format!("worker pid {pid} broke its protocol socket: {reason}"),
                },
                _ if out_of_memory(&status) => Ending {
                    kind: EndingKind::OutOfMemory,
                    message: match self.options.limits.memory {
                        Some(limit) => format!(
                            "worker pid {pid} ran out of memory: an allocation failed under \
                             the limit of {} MiB",
                            limit >> 20
                        ),
                        None => format!("worker pid {pid} ran out of memory"),
                    },
                },
                _ => Ending {
                    kind: EndingKind::Crash,
                    message: format!("worker pid {pid} {described}"),
                },
            },
        };
        tracing::info!(
            pid,
            task = task.params.index,
            ending = %ending.kind,
            message = %ending.message,
            "worker died running a task"
        );
        self.settle(task, ran_for, ending);
    }

    /// Retries a failed attempt or records the task as failed.
    fn settle(&mut self, mut task: Task, duration: Duration, ending: Ending) {
        let retry =
            ending.kind.is_retryable() && task.attempts <= self.options.retries && !self.stopping;
        task.endings.push(ending.clone());
        if retry {
            tracing::info!(
                task = task.params.index,
                attempt = task.attempts,
                ending = %ending.kind,
                "retrying"
            );
            self.summary.retried += 1;
            self.sink.retrying(task.params.index);
            self.queue.push_front(task);
        } else {
            self.finish_task(task, duration, Err(ending));
        }
    }

    fn finish_task(&mut self, task: Task, duration: Duration, outcome: Result<Vec<u8>, Ending>) {
        let record = TaskRecord {
            index: task.params.index,
            params: task.params.json,
            attempts: task.attempts,
            duration,
            outcome,
            endings: task.endings,
        };
        tracing::debug!(
            task = record.index,
            ok = record.is_ok(),
            attempts = record.attempts,
            "task finished"
        );
        self.summary.count(&record);
        if let Err(error) = self.sink.record(&record) {
            self.fail(PoolError::Results(error), true);
        }
    }

    /// Waits for output to drain and reports.
    async fn finish(mut self) -> PoolReport {
        if let Err(error) = self.sink.flush() {
            if self.error.is_none() {
                self.error = Some(PoolError::Results(error));
            }
        }
        let drain_until = tokio::time::Instant::now() + OUTPUT_DRAIN;
        for mut forwarder in std::mem::take(&mut self.forwarders) {
            if tokio::time::timeout_at(drain_until, &mut forwarder)
                .await
                .is_err()
            {
                tracing::debug!("output pipe held open past the end of its worker; dropped");
                forwarder.abort();
                // The aborted task drops its sender only once the runtime
                // gets to it; the output thread ends only when every sender
                // is gone.
                let _ = forwarder.await;
            }
        }
        let (closed_tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.output_tx, closed_tx));
        if let Some(thread) = self.output_thread.take() {
            // Task output is delivered in full, however slow its reader,
            // except after a signal: a reader that stopped reading must not
            // keep an interrupted runner alive.
            if self.interrupted.is_none() {
                let _ = thread.join();
            } else {
                let deadline = Instant::now() + OUTPUT_DRAIN;
                while !thread.is_finished() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if thread.is_finished() {
                    let _ = thread.join();
                }
            }
        }

        self.summary.wall = self.started.elapsed();
        PoolReport {
            summary: self.summary,
            interrupted: self.interrupted,
            plugin: self.plugin,
            error: self.error,
        }
    }
}

/// A plugin's output as it may go into a results line: one JSON value, on
/// one line. `export_task!` always produces that; a plugin that fills the
/// declaration by hand may not.
fn checked_output(output: Vec<u8>) -> Result<Vec<u8>, String> {
    if output.is_empty() {
        return Ok(output);
    }
    if let Err(error) = serde_json::from_slice::<serde::de::IgnoredAny>(&output) {
        return Err(format!("output that is not JSON ({error})"));
    }
    if output.contains(&b'\n') || output.contains(&b'\r') {
        let value: serde_json::Value = serde_json::from_slice(&output)
            .map_err(|e| format!("output that is not JSON ({e})"))?;
        return serde_json::to_vec(&value)
            .map_err(|e| format!("output that cannot be re-encoded ({e})"));
    }
    Ok(output)
}

/// When to look into the worker's reply buffer: only while it has tasks
/// sent ahead of the running one, whose results it may hold.
fn peek_at(slot: &WorkerSlot) -> Option<Instant> {
    (slot.ready && slot.in_flight.len() >= 2).then_some(slot.next_peek)
}

fn out_of_memory(status: &io::Result<ExitStatus>) -> bool {
    status
        .as_ref()
        .is_ok_and(|s| s.code() == Some(crate::worker::EXIT_OUT_OF_MEMORY))
}

/// Whether the worker exited because it lost its protocol socket.
fn lost_socket(status: &io::Result<ExitStatus>) -> bool {
    status
        .as_ref()
        .is_ok_and(|s| s.code() == Some(crate::worker::EXIT_PROTOCOL))
}

async fn recv_params(
    params: &mut Option<mpsc::Receiver<Result<TaskParams, ParamsError>>>,
) -> Option<Result<TaskParams, ParamsError>> {
    match params {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_signal(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// Writes queued frames to a worker; shuts the socket when the pool drops
/// the sender.
async fn write_frames(
    mut socket: tokio::net::unix::OwnedWriteHalf,
    mut frames: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    while let Some(frame) = frames.recv().await {
        if socket.write_all(&frame).await.is_err() {
            return;
        }
    }
    let _ = socket.shutdown().await;
}

/// Reads a worker's frames until its socket ends or the worker exits, then
/// reports its exit.
///
/// The two are raced because a process the plugin forked inherits the
/// worker's socket: when it outlives the worker, the socket never reaches
/// end-of-file. Once the worker has exited, whatever it wrote is already in
/// the socket buffer, so the reader drains for at most [`EXIT_DRAIN`] more.
async fn read_worker(
    worker: u64,
    mut socket: tokio::net::unix::OwnedReadHalf,
    mut child: tokio::process::Child,
    events: mpsc::UnboundedSender<WorkerEvent>,
) {
    let send = |kind| {
        let _ = events.send(WorkerEvent { worker, kind });
    };
    let mut frames = protocol::FrameAssembler::new();
    let mut exited = None;
    let mut drain_until = None;
    let reason = 'read: loop {
        let mut messages = Vec::new();
        let failure = loop {
            match frames.next_frame() {
                Ok(Some(body)) => match protocol::decode_worker_message(body) {
                    Ok(message) => messages.push(message),
                    Err(error) => break Some(format!("sent an undecodable frame: {error}")),
                },
                Ok(None) => break None,
                Err(error) => break Some(format!("sent a bad frame: {error}")),
            }
        };
        if !messages.is_empty() {
            send(WorkerEventKind::Messages(messages));
        }
        if let Some(reason) = failure {
            break 'read reason;
        }

        let room = frames.wanted(64 * 1024, 8 << 20);
        let buffer = frames.buffer();
        buffer.reserve(room);
        tokio::select! {
            read = socket.read_buf(buffer) => match read {
                Ok(0) if frames.has_partial() => break "closed its socket mid-frame".into(),
                Ok(0) => break String::from("closed its socket"),
                Ok(_) => {}
                Err(error) => break format!("socket failed: {error}"),
            },
            status = child.wait(), if exited.is_none() => {
                exited = Some(status);
                drain_until = Some(tokio::time::Instant::now() + EXIT_DRAIN);
            }
            () = sleep_until_some(drain_until) => {
                break String::from("exited; its socket is held open by a process it started");
            }
        }
    };
    // A socket that ends because its worker died says nothing the exit
    // status does not say better (a signal from outside, an exit code): the
    // worker gets a moment to be reaped before the socket counts as broken.
    if exited.is_none() {
        match tokio::time::timeout(BROKEN_GRACE, child.wait()).await {
            Ok(status) => exited = Some(status),
            Err(_) => send(WorkerEventKind::Broken(reason)),
        }
    }
    drop(socket);
    let status = match exited {
        Some(status) => status,
        None => child.wait().await,
    };
    send(WorkerEventKind::Exited(status));
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The byte that starts a task marker in a tagged worker's output.
const TAG_MARK: u8 = 0x1e;

/// Splits a task marker off the end of a line: a tagged worker writes
/// `\x1e<index>\n` to stdout and stderr before each task, and a partial
/// line the plugin left unfinished may come before it.
fn split_marker(line: &[u8]) -> Option<(&[u8], u64)> {
    let at = line.iter().rposition(|&b| b == TAG_MARK)?;
    let digits = line[at + 1..].strip_suffix(b"\n")?;
    let index = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((&line[..at], index))
}

/// Forwards a worker's output stream to the output thread, line by line;
/// with `tag`, each line gets the index of the task that printed it and a
/// tab in front.
async fn forward_lines(
    pipe: impl tokio::io::AsyncRead + Unpin,
    stream: Stream,
    output: mpsc::Sender<(Stream, Vec<u8>)>,
    tag: bool,
) {
    let mut reader = BufReader::with_capacity(64 * 1024, pipe);
    let mut current: Option<u64> = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        let mut text: &[u8] = &line;
        let mut next_task = None;
        if tag {
            if let Some((before, index)) = split_marker(&line) {
                text = before;
                next_task = Some(index);
            }
        }
        if !text.is_empty() {
            let mut out = Vec::with_capacity(text.len() + 12);
            if tag {
                match current {
                    Some(index) => out.extend_from_slice(index.to_string().as_bytes()),
                    None => out.push(b'-'),
                }
                out.push(b'\t');
            }
            out.extend_from_slice(text);
            if out.last() != Some(&b'\n') {
                out.push(b'\n');
            }
            if output.send((stream, out)).await.is_err() {
                return;
            }
        }
        if next_task.is_some() {
            current = next_task;
        }
    }
}

/// The output thread: writes whole lines to the runner's stdout and stderr.
///
/// Stdout is locked for the thread's lifetime only when task output goes
/// there; stderr is never held, since logs share it. Lines that are waiting
/// go out together, with the progress bar lifted once for all of them.
fn write_output(mut lines: mpsc::Receiver<(Stream, Vec<u8>)>, mode: OutputMode) {
    let mut out = (mode == OutputMode::Normal)
        .then(|| io::BufWriter::with_capacity(64 * 1024, io::stdout().lock()));
    let mut batch = Vec::new();
    while let Some(first) = lines.blocking_recv() {
        batch.push(first);
        while batch.len() < 4096 {
            match lines.try_recv() {
                Ok(line) => batch.push(line),
                Err(_) => break,
            }
        }
        crate::progress::suspend(|| {
            for (stream, line) in batch.drain(..) {
                match (stream, mode) {
                    (Stream::Stdout, OutputMode::Quiet) => {}
                    (Stream::Stdout, OutputMode::Normal) => {
                        // A closed stdout (`runner ... | head`) stops task
                        // output, not the run: the results still matter.
                        if out.as_mut().is_some_and(|o| o.write_all(&line).is_err()) {
                            out = None;
                        }
                    }
                    (Stream::Stdout, OutputMode::Stderr) | (Stream::Stderr, _) => {
                        if let Some(o) = out.as_mut() {
                            let _ = o.flush();
                        }
                        let _ = io::stderr().write_all(&line);
                    }
                }
            }
            if out.as_mut().is_some_and(|o| o.flush().is_err()) {
                out = None;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_split_off_partial_lines() {
        assert_eq!(split_marker(b"\x1e42\n"), Some((&b""[..], 42)));
        assert_eq!(split_marker(b"half\x1e7\n"), Some((&b"half"[..], 7)));
        assert_eq!(split_marker(b"plain line\n"), None);
        assert_eq!(split_marker(b"\x1enot a number\n"), None);
    }

    #[test]
    fn statuses_read_as_people_say_them() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            describe_status(ExitStatus::from_raw(11)),
            "killed by signal 11 (SIGSEGV)"
        );
        assert_eq!(
            describe_status(ExitStatus::from_raw(3 << 8)),
            "exited with code 3"
        );
    }
}
