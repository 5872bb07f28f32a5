//! A plugin that misbehaves on request, for testing the runner.
//!
//! The params are an object whose `do` key picks the behaviour:
//!
//! | `do`             | other keys        | what happens                                   |
//! |------------------|-------------------|------------------------------------------------|
//! | `ok`             | `value`           | returns `value` (default `null`)               |
//! | `error`          | `message`         | returns a retryable error                      |
//! | `permanent`      | `message`         | returns a permanent error                      |
//! | `panic`          | `message`         | panics                                         |
//! | `segfault`       |                   | writes through a null pointer                  |
//! | `abort`          |                   | calls `abort()`                                |
//! | `exit`           | `code`            | exits the process with `code`                  |
//! | `sleep`          | `ms`              | sleeps, then returns `value`                   |
//! | `spin`           |                   | loops forever                                  |
//! | `burn`           | `ms`              | keeps a core busy for `ms`, then returns `value` |
//! | `print`          | `bytes`           | prints `bytes` bytes in 64-byte lines          |
//! | `return`         | `bytes`           | returns a string of `bytes` bytes              |
//! | `stack-overflow` |                   | recurses without bound                         |
//! | `alloc`          |                   | allocates and touches memory without bound     |
//! | `orphan`         | `ms`              | forks a child that keeps stdout open and sleeps |
//! | `close-protocol` | `fd`              | closes that descriptor and returns            |
//! | `garbage`        | `fd`              | writes bytes that are no frame to that descriptor |
//! | `huge-frame`     | `fd`              | writes a frame header claiming 4 GiB          |
//! | `escape`         | `ms`, `pidfile`   | forks a child that calls `setsid` and sleeps   |
//! | `fork-hang`      |                   | forks a child that sleeps, then hangs itself   |
//! | `fds`            |                   | returns the worker's open descriptors          |
//!
//! The environment variable `FAULTY_SETUP` makes the per-worker setup
//! misbehave: `hang` sleeps for an hour, `fail` returns an error, `empty`
//! returns an error with no message. `FAULTY_TEARDOWN=hang` makes the
//! worker's state hang for an hour when it is dropped, as the worker ends.
//!
//! `write` writes the bytes given as hex in `hex` to descriptor `fd`, to
//! forge protocol frames.
//!
//! With `log` set to a file path, the task first appends `value` and a
//! newline to that file, so a test can count how often each task ran.
//!
//! With `once` set to a file path, the behaviour happens only when that file
//! does not exist yet (the plugin creates it first); otherwise the task
//! returns `value`. That makes "crash on the first attempt, succeed on the
//! second" one task.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use plugin_api::{Permanent, TaskError, export_task};
use serde::Deserialize;
use serde_json::Value;

/// One task's instructions.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    #[serde(rename = "do")]
    action: Action,
    #[serde(default)]
    value: Value,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    code: i32,
    #[serde(default)]
    ms: u64,
    #[serde(default)]
    bytes: usize,
    #[serde(default = "default_fd")]
    fd: i32,
    #[serde(default)]
    once: Option<PathBuf>,
    #[serde(default)]
    pidfile: Option<PathBuf>,
    #[serde(default)]
    log: Option<PathBuf>,
    #[serde(default)]
    hex: String,
}

fn default_fd() -> i32 {
    3
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Action {
    Ok,
    Error,
    Permanent,
    Panic,
    Segfault,
    Abort,
    Exit,
    Sleep,
    Spin,
    Burn,
    Print,
    Return,
    StackOverflow,
    Alloc,
    Orphan,
    CloseProtocol,
    Garbage,
    HugeFrame,
    Escape,
    ForkHang,
    Fds,
    Write,
}

#[inline(never)]
#[expect(unconditional_recursion, reason = "overflowing the stack is the point")]
fn recurse(depth: u64) -> u64 {
    let frame = [depth; 64];
    std::hint::black_box(&frame);
    recurse(depth + 1) + frame[0]
}

/// Forks a child that sleeps `ms`; returns its pid.
fn fork_sleeper(ms: u64, new_session: bool) -> i32 {
    // SAFETY: the child only calls async-signal-safe functions (setsid,
    // sleep through nanosleep, _exit) before it ends.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            if new_session {
                libc::setsid();
            }
            let time = libc::timespec {
                tv_sec: (ms / 1000) as libc::time_t,
                tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
            };
            libc::nanosleep(&time, std::ptr::null_mut());
            libc::_exit(0);
        }
        pid
    }
}

fn open_descriptors() -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    fds.sort_unstable();
    // The directory listing itself holds one descriptor while it is read;
    // it is closed by now.
    fds.retain(|fd| {
        // SAFETY: F_GETFD only queries a descriptor number.
        unsafe { libc::fcntl(*fd, libc::F_GETFD) != -1 }
    });
    fds
}

fn write_fd(fd: i32, bytes: &[u8]) {
    // SAFETY: writing a valid buffer to a descriptor number is sound even if
    // the descriptor is closed; the call then fails with EBADF.
    unsafe {
        libc::write(fd, bytes.as_ptr().cast(), bytes.len());
    }
}

/// The per-worker state; its drop hangs when `FAULTY_TEARDOWN=hang`.
pub struct State {
    hang_on_drop: bool,
}

impl Drop for State {
    fn drop(&mut self) {
        if self.hang_on_drop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// The per-worker setup, steered by `FAULTY_SETUP`.
pub fn setup() -> Result<State, String> {
    let state = State {
        hang_on_drop: std::env::var("FAULTY_TEARDOWN").as_deref() == Ok("hang"),
    };
    match std::env::var("FAULTY_SETUP").as_deref() {
        Ok("hang") => {
            std::thread::sleep(Duration::from_secs(3600));
            Ok(state)
        }
        Ok("fail") => Err(String::from("FAULTY_SETUP asked setup to fail")),
        Ok("empty") => Err(String::new()),
        _ => Ok(state),
    }
}

fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// Does what `params` says.
pub fn run(_state: &mut State, params: Params) -> Result<Value, TaskError> {
    if let Some(log) = &params.log {
        let line = format!("{}\n", params.value);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut file| file.write_all(line.as_bytes()))
            .map_err(|e| TaskError::permanent(format!("cannot log to `{}`: {e}", log.display())))?;
    }
    if let Some(marker) = &params.once {
        if marker.exists() {
            return Ok(params.value);
        }
        std::fs::write(marker, b"").map_err(|e| {
            TaskError::permanent(format!("cannot create `{}`: {e}", marker.display()))
        })?;
    }

    let message = params
        .message
        .clone()
        .unwrap_or_else(|| "asked to fail".into());
    match params.action {
        Action::Ok => {}
        Action::Error => return Err(TaskError::retryable(message)),
        Action::Permanent => return Err(TaskError::permanent(Permanent(message).0)),
        Action::Panic => panic!("{message}"),
        Action::Segfault => {
            // SAFETY: none; this is the fault the runner must survive.
            unsafe { std::ptr::null_mut::<u64>().write_volatile(1) }
        }
        Action::Abort => std::process::abort(),
        Action::Exit => std::process::exit(params.code),
        Action::Sleep => std::thread::sleep(Duration::from_millis(params.ms)),
        Action::Spin => loop {
            std::hint::spin_loop();
        },
        Action::Burn => {
            let until = std::time::Instant::now() + Duration::from_millis(params.ms);
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        Action::Print => {
            let line = [b'x'; 63];
            let mut out = std::io::stdout().lock();
            let mut left = params.bytes;
            while left > 0 {
                let n = left.min(64);
                out.write_all(&line[..n - 1]).unwrap();
                out.write_all(b"\n").unwrap();
                left -= n;
            }
            out.flush().unwrap();
        }
        Action::Return => return Ok(Value::String("y".repeat(params.bytes))),
        Action::StackOverflow => return Ok(Value::from(recurse(0))),
        Action::Alloc => {
            let mut blocks = Vec::new();
            loop {
                let block = vec![1u8; 16 * 1024 * 1024];
                blocks.push(std::hint::black_box(block));
            }
        }
        Action::Orphan => {
            fork_sleeper(params.ms, false);
        }
        Action::Escape => {
            let pid = fork_sleeper(params.ms, true);
            if let Some(pidfile) = &params.pidfile {
                std::fs::write(pidfile, pid.to_string())
                    .map_err(|e| TaskError::permanent(format!("cannot write pidfile: {e}")))?;
            }
        }
        Action::ForkHang => {
            fork_sleeper(3_600_000, false);
            std::thread::sleep(Duration::from_secs(3600));
        }
        Action::Fds => return Ok(Value::from(open_descriptors())),
        Action::Write => write_fd(params.fd, &from_hex(&params.hex)),
        Action::CloseProtocol => {
            // SAFETY: closing a descriptor number is sound; this is the fault
            // under test.
            unsafe { libc::close(params.fd) };
        }
        Action::Garbage => write_fd(params.fd, b"this is not a frame, not even close\n"),
        Action::HugeFrame => write_fd(params.fd, &[0xff, 0xff, 0xff, 0xff, 4]),
    }
    Ok(params.value)
}

export_task!(run, setup = setup);
