//! Resuming from an earlier run's results file.
//!
//! `--resume` reads the results file before the run, and skips every task
//! whose index has an `ok` record with the same params. Everything else runs
//! again: tasks that failed, tasks that were running when the earlier run
//! died, tasks it never reached. New records are appended.
//!
//! A run killed while writing leaves a last line without its newline; that
//! line is cut off before appending, so the file stays one record a line. A
//! broken line anywhere else is an error that names it: the file is not a
//! results file, or was edited.
//!
//! Memory: 16 bytes per `ok` record, held for the run.

use std::fs::{File, OpenOptions};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::params::TaskParams;

/// The tasks an earlier run finished ok: `(index, hash of params)`, sorted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FinishedTasks {
    done: Vec<(u64, u64)>,
}

/// A results file that cannot be resumed from.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// Reading or truncating failed.
    #[error("cannot resume from `{}`", path.display())]
    Io {
        /// The results file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A complete line is not a record.
    #[error("cannot resume from `{}`: line {line} is not a results record: {message}", path.display())]
    Record {
        /// The results file.
        path: PathBuf,
        /// The 1-based line number.
        line: u64,
        /// serde_json's message.
        message: String,
    },
}

#[derive(Deserialize)]
struct Record<'a> {
    index: u64,
    status: &'a str,
    #[serde(borrow)]
    params: &'a RawValue,
}

/// The hash of a task's params as the results file holds them.
fn params_hash(json: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    json.hash(&mut hasher);
    hasher.finish()
}

impl FinishedTasks {
    /// How many tasks finished ok.
    pub fn len(&self) -> usize {
        self.done.len()
    }

    /// Whether none did.
    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    /// Whether `task` already ended ok with the same params.
    pub fn contains(&self, task: &TaskParams) -> bool {
        let key = (task.index, params_hash(&task.json));
        self.done.binary_search(&key).is_ok()
    }

    /// Reads a results file, cuts off a half-written last line, and opens
    /// it for appending. A missing file is an empty one.
    ///
    /// # Errors
    ///
    /// A [`ResumeError`] naming the file and, for a broken record, the line.
    pub fn load(path: &Path) -> Result<(Self, File), ResumeError> {
        let io_error = |source| ResumeError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io_error)?;

        let mut done = Vec::new();
        let mut reader = BufReader::new(&mut file);
        let mut line = Vec::new();
        let mut complete_len = 0u64;
        let mut number = 0u64;
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(io_error)?;
            if n == 0 {
                break;
            }
            number += 1;
            if line.last() != Some(&b'\n') {
                tracing::warn!(
                    path = %path.display(),
                    line = number,
                    "cutting off a half-written last record"
                );
                break;
            }
            complete_len += n as u64;
            let record: Record<'_> =
                serde_json::from_slice(&line).map_err(|e| ResumeError::Record {
                    path: path.to_path_buf(),
                    line: number,
                    message: e.to_string(),
                })?;
            if record.status == "ok" {
                done.push((record.index, params_hash(record.params.get().as_bytes())));
            }
        }
        drop(reader);
        file.set_len(complete_len).map_err(io_error)?;

        done.sort_unstable();
        done.dedup();
        Ok((Self { done }, file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_records_are_found_and_a_torn_last_line_is_cut() {
        let dir = std::env::temp_dir().join(format!("runner-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.jsonl");
        std::fs::write(
            &path,
            "{\"index\":0,\"status\":\"ok\",\"params\":{\"a\": 1},\"output\":1}\n\
             {\"index\":1,\"status\":\"failed\",\"params\":1}\n\
             {\"index\":2,\"status\":\"ok\",\"par",
        )
        .unwrap();
        let (finished, _) = FinishedTasks::load(&path).unwrap();
        assert_eq!(finished.len(), 1);
        let task = |index, json: &str| TaskParams {
            index,
            json: json.as_bytes().to_vec(),
        };
        assert!(finished.contains(&task(0, "{\"a\": 1}")));
        assert!(!finished.contains(&task(0, "{\"a\": 2}")));
        assert!(!finished.contains(&task(1, "1")));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("\"params\":1}\n"), "{text}");

        std::fs::write(&path, "not a record\n{}\n").unwrap();
        let err = FinishedTasks::load(&path).unwrap_err().to_string();
        assert!(err.contains("line 1 is not a results record"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
