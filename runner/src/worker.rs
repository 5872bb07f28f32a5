//! The worker process: load the plugin, then serve task frames until the
//! supervisor closes the socket.
//!
//! The worker is the `runner` binary re-executed with a hidden argument (see
//! [`WORKER_ARG`]). It is plain blocking code on one thread: no async
//! runtime, no logging framework, one task at a time. The supervisor set up
//! its descriptors before exec: the socket on [`WORKER_FD`], the sealed copy
//! of the plugin on [`LIBRARY_FD`]; stdin, stdout and stderr belong to the
//! plugin.
//!
//! Exit statuses: 0 when the supervisor closed the socket, [`EXIT_LOAD`]
//! after a load failure was reported, [`EXIT_PROTOCOL`] when the socket broke
//! or carried something that is no frame, [`EXIT_OUT_OF_MEMORY`] when an
//! allocation failed under the memory limit.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::fs::File;
use std::io::{BufReader, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use plugin_api::{ABI_VERSION, DeclarationHeader, MAGIC, TaskDeclaration};

use crate::protocol::{
    self, FrameReader, Hello, LIBRARY_FD, PROTOCOL_VERSION, SupervisorMessage, WORKER_FD,
    WorkerMessage,
};
use crate::staging::{self, ReplyBuffer};

/// The first argument that turns the `runner` binary into a worker.
pub const WORKER_ARG: &str = "__runner-worker";

/// The argument after [`WORKER_ARG`] that makes the worker mark, on stdout
/// and stderr, where each task's output begins.
pub const TAG_ARG: &str = "--tag";

/// Exit status after a load failure was reported to the supervisor.
pub const EXIT_LOAD: i32 = 101;

/// Exit status when the protocol socket broke.
pub const EXIT_PROTOCOL: i32 = 102;

/// Exit status when the plugin aborted because an allocation failed under
/// the worker's memory limit.
pub const EXIT_OUT_OF_MEMORY: i32 = 103;

/// Turns an abort after a failed allocation into [`EXIT_OUT_OF_MEMORY`].
///
/// Rust's default allocation-error handler prints a line and calls
/// `abort()`; nothing between the failed `mmap` or `brk` and the abort
/// makes a failing system call, so `errno` still says `ENOMEM` when
/// `SIGABRT` arrives. Any other abort returns from this handler, and
/// `abort()` then kills the process with `SIGABRT` as usual.
extern "C" fn on_abort(_signal: libc::c_int) {
    // SAFETY: reading this thread's errno is async-signal-safe, and
    // `_exit` is too.
    unsafe {
        if *libc::__errno_location() == libc::ENOMEM {
            libc::_exit(EXIT_OUT_OF_MEMORY);
        }
    }
}

/// Kills the worker's whole process group, itself included, when the
/// supervisor died.
extern "C" fn on_supervisor_death(_signal: libc::c_int) {
    // SAFETY: kill is async-signal-safe; group 0 is this process's own.
    unsafe {
        libc::kill(0, libc::SIGKILL);
    }
}

/// Makes the death signal (see [`crate::spawn::death_signal`]) take the
/// whole process group along.
fn watch_for_supervisor_death() {
    // SAFETY: a zeroed sigaction is a valid starting value; the handler only
    // calls kill.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction =
            on_supervisor_death as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(crate::spawn::death_signal(), &action, std::ptr::null_mut());
    }
    // A supervisor that died before the handler was in place sent the
    // signal with its default action, which ended this process then.
}

/// Installs [`on_abort`] when the worker runs under a memory limit.
fn watch_for_out_of_memory() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let limited = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } == 0
        && limit.rlim_cur != libc::RLIM_INFINITY;
    if !limited {
        return;
    }
    // SAFETY: a zeroed sigaction is a valid starting value; the handler is
    // an `extern "C" fn(c_int)` that only does async-signal-safe work.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_abort as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGABRT, &action, std::ptr::null_mut());
    }
}

/// Runs the worker if this process was started as one.
///
/// Call it first thing in `main`: a program that embeds the pool and points
/// it at its own executable must give the re-executed copy a chance to serve
/// before anything else starts (a runtime, logging, argument parsing).
pub fn run_if_worker() {
    let mut args = std::env::args_os();
    let _program = args.next();
    if args.next().is_some_and(|arg| arg == WORKER_ARG) {
        let tag = args.next().is_some_and(|arg| arg == TAG_ARG);
        let code = serve(tag);
        std::process::exit(code);
    }
}

/// The host side of [`plugin_api::Sink`]: appends the bytes to a `Vec<u8>`.
///
/// # Safety
///
/// `ctx` must point to a live `Vec<u8>` that nothing else borrows, and `ptr`
/// must be valid for `len` bytes (or `len` must be 0).
unsafe extern "C" fn collect(ctx: *mut c_void, ptr: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: the caller passes the `Vec<u8>` the worker handed to this call.
    let out = unsafe { &mut *ctx.cast::<Vec<u8>>() };
    // SAFETY: the plugin promises `ptr` is valid for `len` bytes.
    let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
    out.extend_from_slice(bytes);
}

/// A loaded plugin whose declaration passed the checks.
struct Plugin {
    declaration: &'static TaskDeclaration,
    state: *mut c_void,
}

/// Loads the library on [`LIBRARY_FD`], checks it and runs its setup.
fn load() -> Result<Plugin, String> {
    let path = format!("/proc/self/fd/{LIBRARY_FD}");

    // SAFETY: loading runs the plugin's static constructors. That is the
    // reason loading happens here, in a disposable worker, and never in the
    // supervisor: whatever the constructors do, they do to this process.
    let library = unsafe { libloading::Library::new(&path) }
        .map_err(|e| format!("cannot load the plugin library: {e}"))?;

    // SAFETY: the symbol is read as a pointer to its first bytes only; the
    // header is `#[repr(C)]` and shared by every ABI version, so reading it
    // is sound for any plugin that exports the symbol at all.
    let header: *const DeclarationHeader = unsafe {
        *library
            .get::<*const DeclarationHeader>(plugin_api::SYMBOL)
            .map_err(|e| {
                format!(
                    "the library exports no task declaration (`{}`); was it built with \
                     `plugin_api::export_task!`?: {e}",
                    String::from_utf8_lossy(plugin_api::SYMBOL)
                )
            })?
    };
    // SAFETY: `header` points into the loaded library's data, which stays
    // mapped because the library is never unloaded (it is leaked below).
    let header = unsafe { *header };
    if header.magic != MAGIC {
        return Err(format!(
            "the task declaration has the wrong magic tag {:?} (expected {:?})",
            String::from_utf8_lossy(&header.magic),
            String::from_utf8_lossy(&MAGIC),
        ));
    }
    if header.abi_version != ABI_VERSION {
        return Err(format!(
            "the plugin was built for plugin ABI version {}, but this runner speaks \
             version {ABI_VERSION}; rebuild the plugin against a matching `plugin-api`",
            header.abi_version
        ));
    }

    // SAFETY: the magic and ABI version match ours, so the symbol is a full
    // `TaskDeclaration` of this layout, and it lives as long as the library,
    // which is leaked and so lives until the process exits.
    let declaration: &'static TaskDeclaration = unsafe {
        let symbol = library
            .get::<*const TaskDeclaration>(plugin_api::SYMBOL)
            .map_err(|e| format!("cannot read the task declaration: {e}"))?;
        &**symbol
    };
    // Unloading a Rust library while its thread-locals or threads are alive
    // can crash the process, and the worker exits soon after it stops
    // serving anyway, so the library stays loaded for the worker's lifetime.
    std::mem::forget(library);

    let mut message = Vec::new();
    // SAFETY: `collect` and `message` are the sink pair the contract asks
    // for; `message` outlives the call.
    let state = unsafe { (declaration.setup)(collect, (&raw mut message).cast()) };
    if state.is_null() {
        return Err(format!(
            "the plugin's setup failed: {}",
            String::from_utf8_lossy(&message)
        ));
    }
    Ok(Plugin { declaration, state })
}

fn declared_str(raw: plugin_api::RawStr) -> String {
    // SAFETY: the declaration's strings point into the loaded library, which
    // is never unloaded.
    match unsafe { raw.as_str() } {
        Ok(s) => s.to_owned(),
        Err(_) => String::from("(not UTF-8)"),
    }
}

/// Writes the marker `\x1e<index>\n` to stdout and stderr, where the
/// supervisor reads it as "the lines after this are task `index`'s".
fn mark_task(index: u64) {
    let marker = format!("\x1e{index}\n");
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: writing a live buffer to a standard descriptor; a failure
        // (a closed descriptor) only loses the marker.
        unsafe {
            libc::write(fd, marker.as_ptr().cast(), marker.len());
        }
    }
}

/// How often, at most, a worker with tasks in hand asks its socket for
/// more frames.
const LOOK_EVERY: std::time::Duration = std::time::Duration::from_millis(1);

/// The most answers held back before they are sent.
const MAX_HELD: usize = 64;

/// Sends the held answers in one write and empties the buffer.
fn send_replies(writer: &mut impl Write, replies: &mut ReplyBuffer) -> std::io::Result<()> {
    if !replies.is_empty() {
        writer.write_all(replies.frames())?;
        replies.clear();
    }
    Ok(())
}

/// Serves frames; returns the process exit status.
fn serve(tag: bool) -> i32 {
    // SAFETY: the supervisor put a connected socket on WORKER_FD before exec
    // and nothing else in this process owns that descriptor.
    let socket = unsafe { UnixStream::from_raw_fd(WORKER_FD) };
    // The socket is never closed by this process: a plugin that closed it
    // already would make that close fail, and the standard library treats
    // such a failure as a fatal bug. It dies with the process.
    let socket = std::mem::ManuallyDrop::new(socket);
    // Programs a plugin executes must not inherit the socket.
    // SAFETY: fcntl on our own descriptor, with an integer argument.
    unsafe {
        libc::fcntl(WORKER_FD, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    // Both directions share the one descriptor: the plugin sees exactly
    // stdin, stdout, stderr and the socket, nothing else of the worker's.
    let mut writer = &*socket;
    let mut reader = FrameReader::new(BufReader::with_capacity(64 * 1024, &*socket));
    let mut frame = Vec::with_capacity(4096);

    watch_for_supervisor_death();
    watch_for_out_of_memory();
    let plugin = match load() {
        Ok(plugin) => plugin,
        Err(message) => {
            protocol::encode_worker_message(&mut frame, &WorkerMessage::LoadFailed(message));
            let _ = writer.write_all(&frame);
            return EXIT_LOAD;
        }
    };
    // SAFETY: the library file was handed over by the supervisor; its copy
    // on LIBRARY_FD is no longer needed once it is mapped.
    drop(unsafe { File::from_raw_fd(LIBRARY_FD) });

    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        abi_version: ABI_VERSION,
        pid: std::process::id(),
        name: declared_str(plugin.declaration.name),
        version: declared_str(plugin.declaration.version),
        description: declared_str(plugin.declaration.description),
    };
    protocol::encode_worker_message(&mut frame, &WorkerMessage::Hello(hello));
    if writer.write_all(&frame).is_err() {
        return EXIT_PROTOCOL;
    }
    frame.clear();

    let mut replies = match ReplyBuffer::map() {
        Ok(replies) => replies,
        Err(_) => return EXIT_PROTOCOL,
    };
    let mut held = 0usize;
    let mut body = Vec::with_capacity(4096);
    let mut output = Vec::with_capacity(4096);
    let mut pending: VecDeque<PendingTask> = VecDeque::new();
    let mut arena: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut last_look = Instant::now();
    loop {
        // Take in every frame that is already here before the next call, so
        // that a revoke is seen before the tasks it takes back start. With
        // nothing to do, wait for a frame.
        loop {
            // Asking the socket costs a system call; between tiny tasks it
            // is asked at most once a millisecond, which is soon enough for
            // a revoke, sent only after a task ran 10 ms.
            let waiting = reader.buffered() > 0
                || (last_look.elapsed() >= LOOK_EVERY && {
                    last_look = Instant::now();
                    staging::pending_input(&*socket) > 0
                });
            if !pending.is_empty() && !waiting {
                break;
            }
            match reader.read_body(&mut body) {
                Ok(true) => {}
                Ok(false) if pending.is_empty() => {
                    // SAFETY: the state came from setup and is dropped once,
                    // after the last call.
                    unsafe { (plugin.declaration.teardown)(plugin.state) };
                    return 0;
                }
                Ok(false) => break,
                Err(_) => return EXIT_PROTOCOL,
            }
            match protocol::decode_supervisor_message(&body) {
                Ok(SupervisorMessage::Task(task)) => {
                    // All pending params share one buffer, emptied when no
                    // task is pending: no allocation per task.
                    if pending.is_empty() {
                        arena.clear();
                    }
                    let start = arena.len();
                    arena.extend_from_slice(task.params);
                    pending.push_back(PendingTask {
                        id: task.id,
                        index: task.index,
                        params: start..arena.len(),
                    });
                }
                Ok(SupervisorMessage::Revoke(from)) => {
                    let keep = pending.iter().take_while(|t| t.id < from).count();
                    let dropped = (pending.len() - keep) as u64;
                    pending.truncate(keep);
                    // Answers held go first, so the supervisor settles them
                    // before it takes the dropped tasks back.
                    frame.clear();
                    protocol::encode_worker_message(&mut frame, &WorkerMessage::Revoked(dropped));
                    if send_replies(&mut writer, &mut replies).is_err()
                        || writer.write_all(&frame).is_err()
                    {
                        return EXIT_PROTOCOL;
                    }
                    held = 0;
                }
                Err(_) => return EXIT_PROTOCOL,
            }
        }
        let Some(task) = pending.pop_front() else {
            continue;
        };

        output.clear();
        if tag {
            mark_task(task.index);
        }
        let params = &arena[task.params.clone()];
        let started = Instant::now();
        // SAFETY: `state` came from this declaration's setup and is not torn
        // down; `params` is a live slice; `collect` and `output` are the sink
        // pair, and `output` outlives the call.
        let status = unsafe {
            (plugin.declaration.call)(
                plugin.state,
                params.as_ptr(),
                params.len(),
                collect,
                (&raw mut output).cast(),
            )
        };
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);

        // CAUTION: the answer is in the reply buffer, or sent, before the
        // next call starts. Kept only in this process, a crash in the next
        // call would take it along, and the supervisor would charge the
        // crash to this task, which succeeded.
        frame.clear();
        protocol::encode_done(&mut frame, task.id, status, nanos, &output);
        if !replies.fits(&frame) && send_replies(&mut writer, &mut replies).is_err() {
            return EXIT_PROTOCOL;
        }
        if replies.fits(&frame) {
            replies.push(&frame);
            held += 1;
        } else if writer.write_all(&frame).is_err() {
            return EXIT_PROTOCOL;
        }

        // Send when the worker would wait for its next task, and bound how
        // many answers wait: the supervisor counts time for timeouts from
        // the answers it sees.
        let more_input =
            !pending.is_empty() || reader.buffered() > 0 || staging::pending_input(&*socket) > 0;
        if !more_input || held >= MAX_HELD {
            if send_replies(&mut writer, &mut replies).is_err() {
                return EXIT_PROTOCOL;
            }
            held = 0;
        }
    }
}

/// A task read from the socket, not started yet.
struct PendingTask {
    id: u64,
    index: u64,
    /// Where its params sit in the worker's params buffer.
    params: std::ops::Range<usize>,
}
