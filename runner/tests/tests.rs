//! Integration tests: the real `runner` binary on the real plugin crates of
//! `plugins/`, with real processes, signals and files.

#[macro_use]
mod util;

// The main job end to end: the test and sha256 plugins.
mod main_job;
// Faults of a task: crashes, panics, timeouts, permanent errors.
mod faults;
// Bad input and bad plugins: refused before any task runs.
mod input;
// Faults around a task: signals, SIGKILL and resume, overwritten plugins,
// disks that fill up, and everything a plugin can do to its worker.
mod reliability;
// Where plugins may come from, and what a worker may see.
mod security;
// What a person sees: help, list, new, the summary, --tag, the progress bar,
// shards, and the pool as a library.
mod usability;
// Faults found by trying to break the runner.
mod regressions;
