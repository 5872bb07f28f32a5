//! Reading task parameters as a stream.
//!
//! Sources:
//!
//! - `--range A..B`: tasks `A` to `B - 1`, each with its number as params;
//! - a `.json` file: one JSON array, one element a task;
//! - any other file, or `-` for stdin: JSON Lines, one task's params a line.
//!   Blank lines are skipped; line numbers in errors count them.
//!
//! A file is checked whole before the first task is handed out, so a bad
//! line in it means no task runs. Stdin, and a path that is no regular file
//! (a pipe such as `<(...)`, a device), cannot be read twice: their lines are
//! checked as they arrive, and a bad one stops the run at that line.
//!
//! Params are read by a thread of their own and handed to the pool through
//! a bounded channel, so a file of any length costs only the channel's worth
//! of memory.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;
use tokio::sync::mpsc;

/// One task's params: an index and JSON bytes on a single line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskParams {
    /// The position of the task in the params stream.
    pub index: u64,
    /// The params as compact JSON, without newlines.
    pub json: Vec<u8>,
}

/// Where params come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamsSource {
    /// `--range start..end`.
    Range {
        /// First index.
        start: u64,
        /// One past the last index.
        end: u64,
    },
    /// A `.json` file holding one array.
    JsonArray(PathBuf),
    /// A JSON Lines file.
    JsonLines(PathBuf),
    /// JSON Lines on stdin.
    Stdin,
    /// JSON Lines from a pipe or device that can be read only once.
    Pipe(PathBuf),
}

/// A params problem, naming the place.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    /// The source could not be opened or read.
    #[error("cannot read params from {place}")]
    Read {
        /// The file, or "stdin".
        place: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A line is not one JSON value.
    #[error("{place} line {line}: not valid JSON: {message}")]
    Line {
        /// The file, or "stdin".
        place: String,
        /// The 1-based line number.
        line: u64,
        /// serde_json's message.
        message: String,
    },
    /// A `.json` file that is not an array of values.
    #[error("{place}: {message}")]
    Array {
        /// The file.
        place: String,
        /// serde_json's message, with line and column.
        message: String,
    },
    /// A malformed `--range`.
    #[error("invalid --range `{0}`: {1}")]
    Range(String, &'static str),
}

impl ParamsSource {
    /// Chooses the source for `--params PATH`: `-` is stdin, `.json` an
    /// array, anything else JSON Lines.
    pub fn from_path(path: &Path) -> Self {
        let regular = std::fs::metadata(path).map_or(true, |m| m.is_file());
        if path == Path::new("-") {
            Self::Stdin
        } else if !regular {
            Self::Pipe(path.to_path_buf())
        } else if path.extension().is_some_and(|e| e == "json") {
            Self::JsonArray(path.to_path_buf())
        } else {
            Self::JsonLines(path.to_path_buf())
        }
    }

    /// The file the params come from, if they come from one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::JsonArray(path) | Self::JsonLines(path) | Self::Pipe(path) => Some(path),
            Self::Range { .. } | Self::Stdin => None,
        }
    }

    /// Parses `A..B`.
    ///
    /// # Errors
    ///
    /// [`ParamsError::Range`] for anything but two integers with `A <= B`.
    pub fn parse_range(text: &str) -> Result<Self, ParamsError> {
        let bad = |why| ParamsError::Range(text.to_string(), why);
        let (a, b) = text
            .split_once("..")
            .ok_or_else(|| bad("expected START..END, as in 0..5000"))?;
        let start: u64 = a.trim().parse().map_err(|_| bad("START is not a number"))?;
        let end: u64 = b.trim().parse().map_err(|_| bad("END is not a number"))?;
        if start > end {
            return Err(bad("START is past END"));
        }
        Ok(Self::Range { start, end })
    }

    /// Checks a file source whole and counts its tasks; `None` for stdin.
    ///
    /// # Errors
    ///
    /// The first [`ParamsError`] in the file.
    pub fn validate(&self) -> Result<Option<u64>, ParamsError> {
        match self {
            Self::Range { start, end } => Ok(Some(end - start)),
            Self::JsonArray(path) => {
                let mut count = 0;
                read_array(path, |_| {
                    count += 1;
                    true
                })?;
                Ok(Some(count))
            }
            Self::JsonLines(path) => {
                let place = place_of(path);
                let file = open(path)?;
                let mut count = 0;
                read_lines(file, &place, |_| {
                    count += 1;
                    true
                })?;
                Ok(Some(count))
            }
            Self::Stdin | Self::Pipe(_) => Ok(None),
        }
    }

    /// Starts a thread that sends this source's params down a channel.
    ///
    /// Tasks for which `keep` returns `false` are left out (tasks a resumed
    /// run already finished). The channel ends after the last task, or
    /// after an error (sent as the last item). The thread stops early when
    /// the receiver is dropped.
    pub fn spawn_reader(
        self,
        capacity: usize,
        keep: impl Fn(&TaskParams) -> bool + Send + 'static,
    ) -> mpsc::Receiver<Result<TaskParams, ParamsError>> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        std::thread::Builder::new()
            .name("params".into())
            .spawn(move || {
                let sent = self.stream(|task| !keep(&task) || tx.blocking_send(Ok(task)).is_ok());
                if let Err(error) = sent {
                    let _ = tx.blocking_send(Err(error));
                }
            })
            .expect("the params thread can be started");
        rx
    }

    /// Calls `each` with every task's params until it returns `false`.
    ///
    /// # Errors
    ///
    /// The first [`ParamsError`] met.
    pub fn stream(&self, mut each: impl FnMut(TaskParams) -> bool) -> Result<(), ParamsError> {
        // A range's tasks are known by their numbers; the others' by their
        // position.
        if let Self::Range { start, end } = self {
            for i in *start..*end {
                let json = i.to_string().into_bytes();
                if !each(TaskParams { index: i, json }) {
                    break;
                }
            }
            return Ok(());
        }

        let mut index = 0;
        let mut next = |json: Vec<u8>| {
            let task = TaskParams { index, json };
            index += 1;
            each(task)
        };
        match self {
            Self::Range { .. } => Ok(()),
            Self::JsonArray(path) => read_array(path, next),
            Self::JsonLines(path) => read_lines(open(path)?, &place_of(path), next),
            Self::Stdin => read_lines(io::stdin().lock(), "stdin", next),
            Self::Pipe(path) => read_lines(open(path)?, &place_of(path), &mut next),
        }
    }
}

fn place_of(path: &Path) -> String {
    format!("`{}`", path.display())
}

fn open(path: &Path) -> Result<File, ParamsError> {
    File::open(path).map_err(|source| ParamsError::Read {
        place: place_of(path),
        source,
    })
}

/// Reads JSON Lines, calling `each` with the compact bytes of every value.
fn read_lines(
    source: impl Read,
    place: &str,
    mut each: impl FnMut(Vec<u8>) -> bool,
) -> Result<(), ParamsError> {
    let mut reader = BufReader::with_capacity(256 * 1024, source);
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|source| ParamsError::Read {
                place: place.to_string(),
                source,
            })?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        if let Err(error) = std::str::from_utf8(text) {
            return Err(ParamsError::Line {
                place: place.to_string(),
                line: number,
                message: format!("not UTF-8 (bad byte at column {})", error.valid_up_to() + 1),
            });
        }
        if let Err(error) = serde_json::from_slice::<IgnoredAny>(text) {
            return Err(ParamsError::Line {
                place: place.to_string(),
                line: number,
                message: strip_position(&error),
            });
        }
        if !each(text.to_vec()) {
            return Ok(());
        }
    }
}

/// serde_json's message without its own "at line 1 column N" suffix, which
/// would be wrong for a line of a larger file.
fn strip_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(at) => format!("{} (column {})", &text[..at], error.column()),
        None => text,
    }
}

/// Whether a file holds nothing but whitespace.
fn only_whitespace(file: &mut File) -> io::Result<bool> {
    let mut buffer = [0u8; 4096];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(true);
        }
        if !buffer[..n].iter().all(u8::is_ascii_whitespace) {
            return Ok(false);
        }
    }
}

/// Reads a `.json` file's array, calling `each` with every element.
fn read_array(path: &Path, each: impl FnMut(Vec<u8>) -> bool) -> Result<(), ParamsError> {
    struct Elements<F>(F);

    impl<'de, F: FnMut(Vec<u8>) -> bool> Visitor<'de> for Elements<F> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON array with one element per task")
        }

        fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
            while let Some(raw) = seq.next_element::<Box<RawValue>>()? {
                let text = raw.get().as_bytes();
                // An element may span lines in a pretty-printed file; a
                // results record must stay on one line.
                let json = if text.contains(&b'\n') || text.contains(&b'\r') {
                    let value: serde_json::Value =
                        serde_json::from_str(raw.get()).map_err(de::Error::custom)?;
                    serde_json::to_vec(&value).map_err(de::Error::custom)?
                } else {
                    text.to_vec()
                };
                if !(self.0)(json) {
                    // Drain nothing more: the consumer is gone.
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    return Ok(());
                }
            }
            Ok(())
        }
    }

    // An empty file is no tasks, as an empty JSON Lines file is.
    let mut file = open(path)?;
    if only_whitespace(&mut file).map_err(|source| ParamsError::Read {
        place: place_of(path),
        source,
    })? {
        return Ok(());
    }
    let file = open(path)?;
    let reader = BufReader::with_capacity(256 * 1024, file);
    let mut deserializer = serde_json::Deserializer::from_reader(reader);
    let array_error = |error: serde_json::Error| {
        if error.is_io() {
            ParamsError::Read {
                place: place_of(path),
                source: io::Error::other(error),
            }
        } else {
            ParamsError::Array {
                place: place_of(path),
                message: error.to_string(),
            }
        }
    };
    de::Deserializer::deserialize_seq(&mut deserializer, Elements(each)).map_err(array_error)?;
    deserializer.end().map_err(array_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(source: &ParamsSource) -> Result<Vec<String>, ParamsError> {
        let mut out = Vec::new();
        source.stream(|t| {
            out.push(String::from_utf8(t.json).unwrap());
            true
        })?;
        Ok(out)
    }

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("runner-params-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn ranges_parse_and_refuse_backwards() {
        assert_eq!(
            ParamsSource::parse_range("2..5").unwrap(),
            ParamsSource::Range { start: 2, end: 5 }
        );
        let err = ParamsSource::parse_range("5..2").unwrap_err().to_string();
        assert_eq!(err, "invalid --range `5..2`: START is past END");
        assert!(ParamsSource::parse_range("banana").is_err());
        let all = collect(&ParamsSource::Range { start: 3, end: 6 }).unwrap();
        assert_eq!(all, ["3", "4", "5"]);
    }

    #[test]
    fn json_lines_skip_blanks_and_name_the_bad_line() {
        let path = temp_file("a.jsonl", "1\n\n[2, 3]\n{\"a\": \"b\"}\r\n");
        let source = ParamsSource::from_path(&path);
        assert_eq!(collect(&source).unwrap(), ["1", "[2, 3]", "{\"a\": \"b\"}"]);

        let path = temp_file("b.jsonl", "1\n2\n3\n4\n5\n6\n{oops\n8\n");
        let err = ParamsSource::from_path(&path)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 7: not valid JSON"), "{err}");
    }

    #[test]
    fn json_arrays_stream_and_flatten_pretty_elements() {
        let path = temp_file("c.json", "[\n  {\n    \"x\": 1\n  },\n  \"two\"\n]\n");
        let source = ParamsSource::from_path(&path);
        assert_eq!(source.validate().unwrap(), Some(2));
        assert_eq!(collect(&source).unwrap(), ["{\"x\":1}", "\"two\""]);

        let path = temp_file("d.json", "{\"not\": \"an array\"}");
        let err = ParamsSource::from_path(&path)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("a JSON array"), "{err}");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn invalid_utf8_is_an_error_with_its_line() {
        let dir = std::env::temp_dir().join(format!("runner-params-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("e.jsonl");
        std::fs::write(&path, b"\"ok\"\n\"\xff\xfe\"\n").unwrap();
        let err = ParamsSource::from_path(&path)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    // Fuzz target: any bytes as JSON Lines give tasks or an error naming a
    // line, never a panic. A longer run:
    // `PROPTEST_CASES=200000 cargo test -p runner --lib fuzz_`.
    proptest::proptest! {
        #[test]
        fn fuzz_json_lines_reader(input in proptest::collection::vec(proptest::num::u8::ANY, 0..1024)) {
            let lines = input.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
            let mut tasks = 0u64;
            match read_lines(&input[..], "fuzz", |json| {
                tasks += 1;
                serde_json::from_slice::<IgnoredAny>(&json).is_ok()
            }) {
                Ok(()) => proptest::prop_assert!(tasks <= lines),
                Err(ParamsError::Line { line, .. }) => proptest::prop_assert!(line <= lines),
                Err(other) => proptest::prop_assert!(false, "unexpected error {other}"),
            }
        }

        #[test]
        fn fuzz_json_lines_of_values_round_trip(values in proptest::collection::vec(
            proptest::prelude::any::<(i64, String, bool)>(), 0..20,
        )) {
            let input: String = values
                .iter()
                .map(|v| format!("{}\n", serde_json::json!([v.0, v.1, v.2])))
                .collect();
            let mut seen = Vec::new();
            read_lines(input.as_bytes(), "fuzz", |json| {
                seen.push(serde_json::from_slice::<(i64, String, bool)>(&json).unwrap());
                true
            }).unwrap();
            proptest::prop_assert_eq!(seen, values);
        }
    }
}
