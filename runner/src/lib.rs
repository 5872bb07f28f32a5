//! `runner`: a parallel task runner whose tasks are Rust `cdylib` plugins,
//! run in a pool of isolated worker processes.
//!
//! The binary is a thin layer over this library: [`cli`] merges the command
//! line with `runner.toml`, [`app`] turns the settings into a run, and
//! [`pool`] is the supervisor that a Rust program can also drive itself.
//! A program that embeds the pool and lets it start workers from its own
//! executable must call [`worker::run_if_worker`] first thing in `main`.

pub mod app;
pub mod cli;
pub mod config;
pub mod embed;
pub mod exit;
pub mod list;
pub mod params;
pub mod plugin;
pub mod pool;
pub mod progress;
pub mod protocol;
pub mod results;
pub mod resume;
pub mod scaffold;
pub mod spawn;
pub mod staging;
pub mod worker;

pub use embed::{EmbedError, Pool, PoolBuilder};
pub use results::{Ending, EndingKind, RunSummary, TaskRecord};
