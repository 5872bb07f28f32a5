//! The progress bar.
//!
//! Drawn on stderr when it is a terminal (or always, with
//! `--progress always`): tasks done of the total, failed and retried counts,
//! the rate and the time left; a spinner with counts and rate when the total
//! is not known (params streamed from stdin). Everything else that reaches
//! the terminal while the bar is up (task output, logs) goes through
//! [`suspend`], which lifts the bar for the write, so no line is drawn
//! over.

use std::io::{self, IsTerminal, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

use crate::cli::ProgressMode;

/// The bar of this process, once one is shown.
static BAR: OnceLock<ProgressBar> = OnceLock::new();

/// Runs `write` with the bar lifted off the terminal, if one is up.
pub fn suspend<T>(write: impl FnOnce() -> T) -> T {
    match BAR.get() {
        Some(bar) if !bar.is_hidden() => bar.suspend(write),
        _ => write(),
    }
}

/// Stderr as a terminal of 80 columns that understands ANSI cursor moves,
/// for `--progress always` where stderr is no terminal.
#[derive(Debug)]
struct PlainStderr;

impl PlainStderr {
    fn put(&self, text: &str) -> io::Result<()> {
        io::stderr().write_all(text.as_bytes())
    }
}

impl TermLike for PlainStderr {
    fn width(&self) -> u16 {
        80
    }

    fn move_cursor_up(&self, n: usize) -> io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}A"))
        } else {
            Ok(())
        }
    }

    fn move_cursor_down(&self, n: usize) -> io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}B"))
        } else {
            Ok(())
        }
    }

    fn move_cursor_right(&self, n: usize) -> io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}C"))
        } else {
            Ok(())
        }
    }

    fn move_cursor_left(&self, n: usize) -> io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}D"))
        } else {
            Ok(())
        }
    }

    fn write_line(&self, line: &str) -> io::Result<()> {
        self.put(&format!("{line}\n"))
    }

    fn write_str(&self, text: &str) -> io::Result<()> {
        self.put(text)
    }

    fn clear_line(&self) -> io::Result<()> {
        self.put("\r\x1b[2K")
    }

    fn flush(&self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// The run's progress display; does nothing when no bar is shown.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    failed: AtomicU64,
    retried: AtomicU64,
}

impl Progress {
    /// Shows a bar for `total` tasks (a spinner for `None`) if `mode` and
    /// the terminal allow.
    pub fn start(mode: ProgressMode, total: Option<u64>) -> Self {
        let show = match mode {
            ProgressMode::Never => false,
            ProgressMode::Always => true,
            ProgressMode::Auto => io::stderr().is_terminal(),
        };
        let bar = show.then(|| {
            let bar = match total {
                Some(total) => {
                    let style = ProgressStyle::with_template(
                        "{bar:30.cyan/blue} {pos}/{len} tasks {msg} {per_sec} eta {eta}",
                    )
                    .expect("the template is valid")
                    .progress_chars("=> ");
                    ProgressBar::new(total).with_style(style)
                }
                None => {
                    let style = ProgressStyle::with_template(
                        "{spinner} {pos} tasks {msg} {per_sec} {elapsed}",
                    )
                    .expect("the template is valid");
                    ProgressBar::new_spinner().with_style(style)
                }
            };
            // indicatif hides its own stderr target when stderr is no
            // terminal; `always` means drawing there too.
            let target = if mode == ProgressMode::Always && !io::stderr().is_terminal() {
                ProgressDrawTarget::term_like_with_hz(Box::new(PlainStderr), 10)
            } else {
                ProgressDrawTarget::stderr_with_hz(10)
            };
            bar.set_draw_target(target);
            bar.enable_steady_tick(Duration::from_millis(200));
            let _ = BAR.set(bar.clone());
            bar
        });
        let progress = Self {
            bar,
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
        };
        progress.refresh_message();
        progress
    }

    fn refresh_message(&self) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "({} failed, {} retried)",
                self.failed.load(Ordering::Relaxed),
                self.retried.load(Ordering::Relaxed)
            ));
        }
    }

    /// Counts a finished task.
    pub fn finished(&self, ok: bool) {
        if let Some(bar) = &self.bar {
            if !ok {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.refresh_message();
            }
            bar.inc(1);
        }
    }

    /// Counts a retried attempt.
    pub fn retried(&self) {
        if self.bar.is_some() {
            self.retried.fetch_add(1, Ordering::Relaxed);
            self.refresh_message();
        }
    }

    /// Removes the bar, so the summary takes its place.
    pub fn clear(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
