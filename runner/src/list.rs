//! `runner list`: every task of a work dir, described by its own plugin.
//!
//! Each library is loaded in a worker process, never in this one, so a
//! plugin that crashes while loading is listed with its error instead of
//! taking the listing down.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use tokio::io::AsyncReadExt;

use crate::plugin::{self, PluginError};
use crate::pool::describe_status;
use crate::protocol::{FrameAssembler, WorkerMessage, decode_worker_message};
use crate::spawn::{self, WorkerLimits};

/// How long a plugin may take to load before it is listed as hanging.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One task as the listing shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TaskListing {
    /// The name `--task` takes.
    pub name: String,
    /// `library` or `crate`.
    pub kind: &'static str,
    /// The library file or crate folder.
    pub path: PathBuf,
    /// The plugin's crate name, version, ABI version and description.
    #[serde(flatten)]
    pub plugin: Option<PluginInfo>,
    /// Why the plugin could not be built or loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a plugin says of itself in its worker's hello.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PluginInfo {
    /// The crate name.
    #[serde(rename = "crate")]
    pub crate_name: String,
    /// The crate version.
    pub version: String,
    /// The plugin ABI version.
    pub abi_version: u32,
    /// The crate description.
    pub description: String,
}

/// Lists the tasks of `work_dir`, as a table or as JSON.
///
/// # Errors
///
/// When the work dir cannot be used.
pub fn run(work_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let listings = list(work_dir)?;
    let mut out = String::new();
    if json {
        out = serde_json::to_string_pretty(&listings)?;
        out.push('\n');
    } else {
        out.push_str(&table(&listings));
    }
    crate::exit::write_stdout(out.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// Finds, builds, and probes every task of `work_dir`.
///
/// # Errors
///
/// When the work dir cannot be used.
pub fn list(work_dir: &Path) -> Result<Vec<TaskListing>, PluginError> {
    std::fs::read_dir(work_dir).map_err(|source| PluginError::WorkDir {
        path: work_dir.to_path_buf(),
        source,
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| PluginError::WorkDir {
            path: work_dir.to_path_buf(),
            source,
        })?;
    let executable = std::env::current_exe().ok();

    let mut listings = Vec::new();
    for name in plugin::available_tasks(work_dir) {
        let library_file = work_dir.join(format!("lib{name}.so"));
        let (kind, path) = if library_file.exists() {
            ("library", library_file)
        } else {
            ("crate", work_dir.join(&name))
        };
        let probed = plugin::prepare(work_dir, &name)
            .map_err(|e| format!("{:#}", anyhow::Error::from(e)))
            .and_then(|library| match &executable {
                Some(exe) => runtime.block_on(probe(exe, &library)),
                None => Err(String::from(
                    "cannot find the runner executable to probe with",
                )),
            });
        let (plugin, error) = match probed {
            Ok(info) => (Some(info), None),
            Err(error) => (None, Some(error)),
        };
        listings.push(TaskListing {
            name,
            kind,
            path,
            plugin,
            error,
        });
    }
    Ok(listings)
}

/// Loads a library in a worker and returns what its hello says.
async fn probe(executable: &Path, library: &plugin::PluginLibrary) -> Result<PluginInfo, String> {
    let spawned = spawn::spawn_worker(
        executable,
        &library.snapshot,
        WorkerLimits::default(),
        false,
    )
    .map_err(|e| format!("cannot start a worker: {e}"))?;
    let mut child = spawned.child;
    // What the plugin prints while loading is not part of the listing.
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        tokio::spawn(async move {
            let mut pipe = pipe;
            let _ = tokio::io::copy(&mut pipe, &mut tokio::io::sink()).await;
        });
    }
    spawned
        .socket
        .set_nonblocking(true)
        .map_err(|e| format!("cannot set up the worker socket: {e}"))?;
    let mut socket = tokio::net::UnixStream::from_std(spawned.socket)
        .map_err(|e| format!("cannot set up the worker socket: {e}"))?;

    let answer = tokio::time::timeout(PROBE_TIMEOUT, async {
        let mut frames = FrameAssembler::new();
        loop {
            if let Some(body) = frames.next_frame().map_err(|e| e.to_string())? {
                return match decode_worker_message(body).map_err(|e| e.to_string())? {
                    WorkerMessage::Hello(hello) => Ok(PluginInfo {
                        crate_name: hello.name,
                        version: hello.version,
                        abi_version: hello.abi_version,
                        description: hello.description,
                    }),
                    WorkerMessage::LoadFailed(message) => Err(message),
                    WorkerMessage::Done(_) | WorkerMessage::Revoked(_) => {
                        Err(String::from("the worker answered a task it never got"))
                    }
                };
            }
            let buffer = frames.buffer();
            buffer.reserve(4096);
            match socket.read_buf(buffer).await {
                Ok(0) => return Err(String::new()),
                Ok(_) => {}
                Err(e) => return Err(format!("worker socket failed: {e}")),
            }
        }
    })
    .await;
    drop(socket);

    let pid = child.id().unwrap_or(0);
    let answer = match answer {
        Ok(answer) => answer,
        Err(_) => {
            spawn::kill_group(pid);
            Err(format!(
                "the plugin did not finish loading within {}s",
                PROBE_TIMEOUT.as_secs()
            ))
        }
    };
    let status = child.wait().await;
    spawn::kill_group(pid);
    match answer {
        Err(message) if message.is_empty() => Err(match status {
            Ok(status) => format!(
                "its worker died while loading it: {}",
                describe_status(status)
            ),
            Err(e) => format!("its worker vanished while loading it: {e}"),
        }),
        other => other,
    }
}

/// The listing as an aligned table.
pub fn table(listings: &[TaskListing]) -> String {
    let rows: Vec<[String; 6]> = listings
        .iter()
        .map(|l| {
            let (version, abi, about) = match (&l.plugin, &l.error) {
                (Some(p), _) => (
                    p.version.clone(),
                    p.abi_version.to_string(),
                    p.description.clone(),
                ),
                (None, Some(e)) => ("-".into(), "-".into(), format!("error: {e}")),
                (None, None) => ("-".into(), "-".into(), String::new()),
            };
            [
                l.name.clone(),
                version,
                abi,
                l.kind.to_string(),
                l.path.display().to_string(),
                about,
            ]
        })
        .collect();
    let header = ["TASK", "VERSION", "ABI", "KIND", "PATH", "DESCRIPTION"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if listings.is_empty() {
        out.push_str("(no tasks: add a libNAME.so or a crate folder, or run `runner new NAME`)\n");
    }
    out
}
