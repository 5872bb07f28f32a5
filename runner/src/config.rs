//! The `runner.toml` model.
//!
//! Every key is optional; unknown keys are errors that name the key, and
//! values of the wrong type are errors that name the key and the line.
//!
//! ```toml
//! task = "sha256"
//! max-parallel = 8
//! timeout = "60s"
//! retries = 2
//! grace = "5s"
//! memory-limit = "1G"
//! params = "files.jsonl"   # relative to this file's folder
//! results = "out.jsonl"    # relative to this file's folder
//!
//! [tasks.sha256]           # applies only when running that task
//! timeout = "10s"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};

/// A duration written as people write them: `500ms`, `60s`, `2m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl de::Visitor<'_> for DurationVisitor {
            type Value = HumanDuration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration in quotes, such as \"500ms\", \"60s\" or \"2m\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                parse_duration(v).map(HumanDuration).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(DurationVisitor)
    }
}

/// A size in bytes: `256M`, `1G`, `512MiB`, `1000000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl de::Visitor<'_> for SizeVisitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"256M\" or a number of bytes")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// Parses a duration such as `500ms`, `60s` or `2m`.
///
/// # Errors
///
/// A message saying what is wrong with the text.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration such as 500ms, 60s or 2m: {e}"))
}

/// Parses a size such as `256M`, `1G`, `64KiB` or `1000` (bytes). Suffixes
/// are powers of 1024.
///
/// # Errors
///
/// A message saying what is wrong with the text.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a size such as 256M, 1G or 1000000");
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    number.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Settings that a `[tasks.NAME]` section may override.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TaskSection {
    /// Workers.
    pub max_parallel: Option<usize>,
    /// Per-attempt time limit.
    pub timeout: Option<HumanDuration>,
    /// Extra attempts after a retryable failure.
    pub retries: Option<u32>,
    /// Address-space limit per worker.
    pub memory_limit: Option<ByteSize>,
}

/// One `runner.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    /// The task to run.
    pub task: Option<String>,
    /// The work dir; only in a file given with `--config`.
    pub work_dir: Option<PathBuf>,
    /// Params file, relative to the config file's folder.
    pub params: Option<PathBuf>,
    /// `A..B`.
    pub range: Option<String>,
    /// Results file, relative to the config file's folder.
    pub results: Option<PathBuf>,
    /// Workers.
    pub max_parallel: Option<usize>,
    /// Per-attempt time limit.
    pub timeout: Option<HumanDuration>,
    /// Extra attempts after a retryable failure.
    pub retries: Option<u32>,
    /// Time running tasks get after SIGINT or SIGTERM.
    pub grace: Option<HumanDuration>,
    /// Address-space limit per worker.
    pub memory_limit: Option<ByteSize>,
    /// Per-task overrides.
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskSection>,
}

/// A config file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config `{}`", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid, or has unknown keys or wrong types.
    #[error("invalid config `{}`: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with line, column and key.
        message: String,
    },
}

/// "line L, column C, key K: message", on one line, from toml's error and
/// the text it was parsing.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    let Some(span) = error.span() else {
        return message.to_string();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.len() - line_start + 1;

    // Name the key when the error sits on a `key = value` line, with the
    // table it is in.
    let line_text = text[line_start..].lines().next().unwrap_or_default();
    let key = line_text
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|key| !key.is_empty() && !key.starts_with('['));
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match (key, table) {
        (Some(key), Some(table)) => {
            format!("line {line}, column {column}, key `{table}.{key}`: {message}")
        }
        (Some(key), None) => format!("line {line}, column {column}, key `{key}`: {message}"),
        (None, _) => format!("line {line}, column {column}: {message}"),
    }
}

/// "line L, key `K`" for the line that sets `key` (in `[table]` when given).
fn place_of_key(text: &str, table: Option<&str>, key: &str) -> String {
    let mut current: Option<String> = None;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            current = Some(
                line.trim_matches(|c| c == '[' || c == ']')
                    .trim()
                    .to_string(),
            );
            continue;
        }
        let Some((name, _)) = line.split_once('=') else {
            continue;
        };
        if name.trim() == key && current.as_deref() == table {
            let shown = match table {
                Some(table) => format!("{table}.{key}"),
                None => key.to_string(),
            };
            return format!("line {}, key `{shown}`", number + 1);
        }
    }
    format!("key `{key}`")
}

impl ConfigFile {
    /// Checks the values the types allow but a run does not.
    fn check_values(&self, text: &str) -> Result<(), String> {
        let sections = std::iter::once((None, self.max_parallel, self.timeout)).chain(
            self.tasks
                .iter()
                .map(|(name, t)| (Some(format!("tasks.{name}")), t.max_parallel, t.timeout)),
        );
        for (table, max_parallel, timeout) in sections {
            if max_parallel == Some(0) {
                let place = place_of_key(text, table.as_deref(), "max-parallel");
                return Err(format!("{place}: must be at least 1"));
            }
            if timeout.is_some_and(|t| t.0.is_zero()) {
                let place = place_of_key(text, table.as_deref(), "timeout");
                return Err(format!(
                    "{place}: a timeout of zero would kill every task; leave it out for none"
                ));
            }
        }
        if let Some(range) = &self.range {
            if let Err(error) = crate::params::ParamsSource::parse_range(range) {
                let place = place_of_key(text, None, "range");
                let message = error
                    .to_string()
                    .replace("invalid --range", "invalid range");
                return Err(format!("{place}: {message}"));
            }
            if self.params.is_some() {
                let place = place_of_key(text, None, "range");
                return Err(format!("{place}: `params` is set too; keep one of the two"));
            }
        }
        Ok(())
    }

    /// Reads and parses a config file; relative paths in it are made
    /// relative to the file's folder.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the file (and the line and key for a parse
    /// error).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: describe_toml_error(&text, &e),
        })?;

        config
            .check_values(&text)
            .map_err(|message| ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            })?;

        let base = path.parent().unwrap_or(Path::new("."));
        for field in [
            &mut config.params,
            &mut config.results,
            &mut config.work_dir,
        ] {
            if let Some(p) = field.as_mut() {
                if p.is_relative() && p != Path::new("-") {
                    *p = base.join(&*p);
                }
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_as_people_write_them() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("banana").unwrap_err().contains("`banana`"));
    }

    #[test]
    fn toml_errors_are_one_line_with_line_and_column() {
        let text = "retries = 1\n  bogus = 2\n";
        let error = toml::from_str::<ConfigFile>(text).unwrap_err();
        let message = describe_toml_error(text, &error);
        let expected = "line 2, column 3, key `bogus`: unknown field `bogus`";
        assert!(message.starts_with(expected), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let err = toml::from_str::<ConfigFile>("retries = 1\nbogus = 2\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("bogus") && text.contains("line 2"), "{text}");

        let err = toml::from_str::<ConfigFile>("timeout = 5\n").unwrap_err();
        assert!(err.to_string().contains("timeout"), "{err}");

        let err = toml::from_str::<ConfigFile>("[tasks.x]\nfoo = 1\n").unwrap_err();
        assert!(err.to_string().contains("foo"), "{err}");
    }

    #[test]
    fn a_full_file_parses() {
        let config: ConfigFile = toml::from_str(
            "task = \"t\"\nmax-parallel = 3\ntimeout = \"1s\"\nmemory-limit = \"1G\"\n\
             [tasks.t]\nretries = 0\n",
        )
        .unwrap();
        assert_eq!(config.max_parallel, Some(3));
        assert_eq!(config.timeout, Some(HumanDuration(Duration::from_secs(1))));
        assert_eq!(config.memory_limit, Some(ByteSize(1 << 30)));
        assert_eq!(config.tasks["t"].retries, Some(0));
    }
}
