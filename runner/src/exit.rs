//! Exit codes, in one place.
//!
//! | code    | meaning                                                   |
//! |---------|-----------------------------------------------------------|
//! | 0       | every task ok                                             |
//! | 1       | some task failed                                          |
//! | 2       | bad usage, config, input or plugin; or an I/O failure     |
//! | 128 + N | interrupted by signal N: 130 for SIGINT, 143 for SIGTERM  |

use std::process::ExitCode;

/// Some task failed.
pub const SOME_FAILED: u8 = 1;

/// The runner could not do its job.
pub const ERROR: u8 = 2;

/// The exit code after an interruption by `signal`.
pub fn interrupted(signal: i32) -> ExitCode {
    ExitCode::from(u8::try_from(128 + signal).unwrap_or(255))
}

/// Writes `bytes` to stdout; a reader that went away (`runner man | head`)
/// is no error, as for any Unix filter.
///
/// # Errors
///
/// Any other write error.
pub fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
