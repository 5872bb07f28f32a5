//! Result records and the closing summary.
//!
//! One JSON line per finished task:
//!
//! ```text
//! {"index":0,"status":"ok","attempts":1,"duration_ms":0.012,"params":0,"output":0}
//! {"index":3,"status":"failed","attempts":3,"duration_ms":1.5,"params":...,
//!  "error":{"kind":"crash","message":"..."},"endings":[{...},{...},{...}]}
//! ```
//!
//! (The second record is one line in the file.) `endings` lists every
//! attempt that did not succeed, oldest first; it is left out when there is
//! none. `duration_ms` is the plugin call time of the last attempt as the
//! worker measured it, or the time the supervisor saw it running when the
//! worker died.

use std::fmt;
use std::io::{self, Write};
use std::time::Duration;

use serde::Serialize;

/// How one attempt of a task ended, when it did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndingKind {
    /// The plugin returned a retryable error.
    Error,
    /// The plugin returned a permanent error; never retried.
    Permanent,
    /// The plugin panicked; the worker survived.
    Panic,
    /// The params did not decode into the plugin's type; never retried.
    BadParams,
    /// The worker died: killed by a signal, or exited.
    Crash,
    /// The task ran past `--timeout` and its worker was killed.
    Timeout,
    /// An allocation failed under `--memory-limit` and the worker died.
    OutOfMemory,
    /// The worker broke the protocol or vanished for another reason.
    Lost,
}

impl EndingKind {
    /// Whether another attempt may succeed.
    pub fn is_retryable(self) -> bool {
        !matches!(self, Self::Permanent | Self::BadParams)
    }

    /// The name used in records and the summary.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Permanent => "permanent",
            Self::Panic => "panic",
            Self::BadParams => "bad-params",
            Self::Crash => "crash",
            Self::Timeout => "timeout",
            Self::OutOfMemory => "out-of-memory",
            Self::Lost => "lost",
        }
    }
}

impl fmt::Display for EndingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ending {
    /// What kind of failure.
    pub kind: EndingKind,
    /// The plugin's message, or what happened to the worker.
    pub message: String,
}

/// A task that finished: succeeded, or failed for good.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    /// The task's position in the params stream.
    pub index: u64,
    /// The params as compact JSON.
    pub params: Vec<u8>,
    /// How many times the task was started.
    pub attempts: u32,
    /// The last attempt's duration.
    pub duration: Duration,
    /// `Ok(output JSON)`, or the ending that made the task fail.
    pub outcome: Result<Vec<u8>, Ending>,
    /// Every attempt that did not succeed, oldest first (the failing one
    /// included).
    pub endings: Vec<Ending>,
}

impl TaskRecord {
    /// Whether the task succeeded.
    pub fn is_ok(&self) -> bool {
        self.outcome.is_ok()
    }

    /// Appends the record as one JSON line.
    pub fn write_json_line(&self, out: &mut Vec<u8>) {
        let status = if self.is_ok() { "ok" } else { "failed" };
        let millis = self.duration.as_secs_f64() * 1000.0;
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            "{{\"index\":{},\"status\":\"{status}\",\"attempts\":{},\"duration_ms\":{:.3},\"params\":",
            self.index, self.attempts, millis
        );
        out.extend_from_slice(&self.params);
        match &self.outcome {
            Ok(output) => {
                out.extend_from_slice(b",\"output\":");
                if output.is_empty() {
                    out.extend_from_slice(b"null");
                } else {
                    out.extend_from_slice(output);
                }
            }
            Err(ending) => {
                out.extend_from_slice(b",\"error\":");
                serde_json::to_writer(&mut *out, ending).expect("endings serialize");
            }
        }
        if !self.endings.is_empty() {
            out.extend_from_slice(b",\"endings\":");
            serde_json::to_writer(&mut *out, &self.endings).expect("endings serialize");
        }
        out.extend_from_slice(b"}\n");
    }
}

/// Counts for the closing summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSummary {
    /// Tasks that succeeded.
    pub ok: u64,
    /// Tasks that failed for good.
    pub failed: u64,
    /// Attempts that were retried.
    pub retried: u64,
    /// Worker processes started.
    pub workers_started: u64,
    /// Tasks skipped because an earlier run finished them ok (`--resume`).
    pub skipped: u64,
    /// Tasks known to exist that never finished: the run stopped early.
    pub not_run: u64,
    /// Whether the records went to a results file; if not, the summary
    /// says how to get all of them.
    pub recorded: bool,
    /// Wall time of the run.
    pub wall: Duration,
    /// Sum of the plugin call times of the finished tasks' last attempts.
    pub task_time: Duration,
    /// The first failed tasks, up to [`RunSummary::FAILED_SHOWN`].
    pub first_failed: Vec<(u64, Ending)>,
}

impl RunSummary {
    /// How many failed tasks the summary lists.
    pub const FAILED_SHOWN: usize = 10;

    /// Adds a finished task.
    pub fn count(&mut self, record: &TaskRecord) {
        self.task_time += record.duration;
        match &record.outcome {
            Ok(_) => self.ok += 1,
            Err(ending) => {
                self.failed += 1;
                if self.first_failed.len() < Self::FAILED_SHOWN {
                    self.first_failed.push((record.index, ending.clone()));
                }
            }
        }
    }

    /// Writes the human summary.
    ///
    /// # Errors
    ///
    /// When `out` fails.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let done = self.ok + self.failed;
        let secs = self.wall.as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let rate = if rate < 10.0 {
            format!("{rate:.1}")
        } else {
            format!("{rate:.0}")
        };
        let mean = if done > 0 {
            short_duration(self.task_time.as_secs_f64() / done as f64)
        } else {
            String::from("-")
        };
        writeln!(
            out,
            "{}: {} ok, {} failed, {} retried in {secs:.2}s ({rate} tasks/s, \
             mean task {mean}, {} started)",
            plural(done, "task", "tasks"),
            self.ok,
            self.failed,
            self.retried,
            plural(self.workers_started, "worker", "workers"),
        )?;
        if self.skipped > 0 {
            writeln!(
                out,
                "  {} skipped: ok in the results of an earlier run",
                plural(self.skipped, "task", "tasks")
            )?;
        }
        for (index, ending) in &self.first_failed {
            let message = for_terminal(&ending.message);
            writeln!(out, "  task {index} failed: {}: {message}", ending.kind)?;
        }
        if self.failed > self.first_failed.len() as u64 {
            let hint = if self.recorded {
                ""
            } else {
                "; --results FILE records them all"
            };
            writeln!(
                out,
                "  ... and {} more failed{hint}",
                plural(
                    self.failed - self.first_failed.len() as u64,
                    "task",
                    "tasks"
                ),
            )?;
        }
        if self.not_run > 0 {
            writeln!(
                out,
                "  {} not finished: the run stopped early",
                plural(self.not_run, "task", "tasks")
            )?;
        }
        Ok(())
    }
}

/// A plugin's message made safe to show on a terminal: control characters
/// escaped, and cut at 300 characters (the results file has it whole).
fn for_terminal(message: &str) -> String {
    const LIMIT: usize = 300;
    let mut shown = String::new();
    for (count, c) in message.chars().enumerate() {
        if count == LIMIT {
            shown.push_str(" [...]");
            break;
        }
        if c.is_control() {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    shown
}

/// A duration in the unit that shows it best: "12 ns", "4.2 µs", "3.1 ms",
/// "2.50 s".
fn short_duration(secs: f64) -> String {
    if secs < 1e-6 {
        format!("{:.0} ns", secs * 1e9)
    } else if secs < 1e-3 {
        format!("{:.1} µs", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.1} ms", secs * 1e3)
    } else {
        format!("{secs:.2} s")
    }
}

/// "1 task", "2 tasks".
fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_and_failed_records_are_one_json_line_each() {
        let ok = TaskRecord {
            index: 4,
            params: b"[4]".to_vec(),
            attempts: 2,
            duration: Duration::from_micros(1500),
            outcome: Ok(b"{\"x\":1}".to_vec()),
            endings: vec![Ending {
                kind: EndingKind::Crash,
                message: "worker 12 killed by SIGSEGV".into(),
            }],
        };
        let mut line = Vec::new();
        ok.write_json_line(&mut line);
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "{\"index\":4,\"status\":\"ok\",\"attempts\":2,\"duration_ms\":1.500,\
             \"params\":[4],\"output\":{\"x\":1},\"endings\":[{\"kind\":\"crash\",\
             \"message\":\"worker 12 killed by SIGSEGV\"}]}\n"
        );

        let ending = Ending {
            kind: EndingKind::Permanent,
            message: "no \"file\"".into(),
        };
        let failed = TaskRecord {
            index: 0,
            params: b"\"a\"".to_vec(),
            attempts: 1,
            duration: Duration::ZERO,
            outcome: Err(ending.clone()),
            endings: vec![ending],
        };
        let mut line = Vec::new();
        failed.write_json_line(&mut line);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["status"], "failed");
        assert_eq!(value["error"]["kind"], "permanent");
        assert_eq!(value["error"]["message"], "no \"file\"");
    }
}
