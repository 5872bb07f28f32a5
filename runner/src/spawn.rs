//! Starting a worker: descriptors, process group, death signal, limits.
//!
//! A worker is the runner's own executable (or the one the pool was pointed
//! at) started with [`WORKER_ARG`], through
//! fork + exec. Between the two, in the child, `prepare_child` runs:
//!
//! 1. it moves the socket to [`WORKER_FD`], the plugin copy to
//!    [`LIBRARY_FD`] and the reply buffer to [`STAGING_FD`], and closes
//!    every other descriptor above stderr, so the worker inherits nothing
//!    but its own;
//! 2. it asks the kernel for a signal when the supervisor thread dies
//!    (`PR_SET_PDEATHSIG`, see [`death_signal`]), and exits at once if the
//!    supervisor is already gone;
//! 3. it applies the memory limit as `RLIMIT_AS`.
//!
//! The child also becomes the leader of a new process group, so that killing
//! the group kills whatever the plugin started, too.
//!
//! # Caveats
//!
//! The death signal fires when the *thread* that forked the child exits. The
//! pool forks from the thread that runs its event loop, which lives for the
//! whole run.
//!
//! A plugin can leave the group with `setsid` or by double-forking into a
//! new session; such processes are out of the runner's reach, and only the
//! end of their pipes tells the runner they exist.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;

use tokio::process::{Child, Command};

use crate::protocol::{LIBRARY_FD, WORKER_FD};
use crate::staging::{self, STAGING_FD};
use crate::worker::{TAG_ARG, WORKER_ARG};

/// Limits applied to each worker between fork and exec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerLimits {
    /// Address-space limit in bytes (`RLIMIT_AS`), if any.
    pub memory: Option<u64>,
}

/// A started worker process and the supervisor's end of its socket.
#[derive(Debug)]
pub struct SpawnedWorker {
    /// The child; its pid is also its process group id.
    pub child: Child,
    /// The supervisor's end of the protocol socket.
    pub socket: UnixStream,
    /// The worker's reply buffer (see [`crate::staging`]), read when the
    /// worker dies.
    pub staging: std::fs::File,
}

/// Starts one worker.
///
/// # Errors
///
/// When the socket pair cannot be made or the executable cannot be started.
pub fn spawn_worker(
    executable: &Path,
    library: &OwnedFd,
    limits: WorkerLimits,
    tag: bool,
) -> io::Result<SpawnedWorker> {
    let (ours, theirs) = UnixStream::pair()?;
    let staging = staging::create()?;

    let mut command = Command::new(executable);
    command
        .arg(WORKER_ARG)
        .args(tag.then_some(TAG_ARG))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);

    let socket_fd = theirs.as_raw_fd();
    let library_fd = library.as_raw_fd();
    let staging_fd = staging.as_raw_fd();
    // SAFETY: the getpid call happens here, in the parent, before fork.
    let parent = unsafe { libc::getpid() };
    let death_signal = death_signal();
    // SAFETY: `prepare_child` calls only async-signal-safe functions (fcntl,
    // dup2, close_range, prctl, getppid, setrlimit, _exit) and
    // touches no memory shared with other threads of the parent, which is
    // what a closure between fork and exec must respect.
    unsafe {
        command.pre_exec(move || {
            prepare_child(
                [socket_fd, library_fd, staging_fd],
                parent,
                death_signal,
                limits,
            )
        });
    }

    let child = command.spawn()?;
    drop(theirs);
    Ok(SpawnedWorker {
        child,
        socket: ours,
        staging,
    })
}

/// Runs in the child between fork and exec.
fn prepare_child(
    fds: [RawFd; 3],
    parent: libc::pid_t,
    death_signal: libc::c_int,
    limits: WorkerLimits,
) -> io::Result<()> {
    fn check(result: libc::c_int) -> io::Result<libc::c_int> {
        if result == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(result)
        }
    }

    // SAFETY: every call below is async-signal-safe and works only on this
    // child's own descriptors, limits and process attributes.
    unsafe {
        // Move the descriptors above the target numbers first, so that no
        // dup2 can overwrite another when one of them already sits on 3, 4
        // or 5.
        let mut high = [0; 3];
        for (slot, fd) in high.iter_mut().zip(fds) {
            *slot = check(libc::fcntl(fd, libc::F_DUPFD, 10))?;
        }
        for (fd, target) in high.into_iter().zip([WORKER_FD, LIBRARY_FD, STAGING_FD]) {
            check(libc::dup2(fd, target))?;
        }
        // Everything else the runner holds is close-on-exec already; this
        // also drops descriptors the runner itself inherited without that
        // flag.
        let first = (STAGING_FD + 1) as libc::c_uint;
        if libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, 0) == -1 {
            for fd in first as RawFd..1024 {
                libc::close(fd);
            }
        }

        check(libc::prctl(libc::PR_SET_PDEATHSIG, death_signal, 0, 0, 0))?;
        if libc::getppid() != parent {
            libc::_exit(1);
        }

        if let Some(bytes) = limits.memory {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            check(libc::setrlimit(libc::RLIMIT_AS, &limit))?;
        }
    }
    Ok(())
}

/// The signal a worker gets when its supervisor dies.
///
/// Not `SIGKILL`: the worker catches this one and kills its whole process
/// group with it, so that processes the plugin started die too (the death
/// signal itself is not inherited by them). Its default action, before the
/// worker installed its handler, also ends the worker. A realtime signal,
/// because no plugin has a reason to touch it.
pub fn death_signal() -> libc::c_int {
    libc::SIGRTMAX() - 1
}

/// Sends `SIGKILL` to a worker's whole process group.
///
/// Harmless when the group is already gone.
pub fn kill_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: `pgid` is the pid of a worker this pool spawned as the leader
    // of its own group; the group number stays reserved while any member
    // lives, and the caller only asks before it has handled that worker's
    // exit, or right after, to clear what it left behind.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}
