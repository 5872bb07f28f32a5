//! From a task name to a library the workers can load: lookup, cargo build,
//! checks and the run's private snapshot.
//!
//! Lookup in the work dir, in order:
//!
//! 1. the library file `libNAME.so` (also `libNAME_WITH_UNDERSCORES.so`,
//!    since cargo spells library files that way);
//! 2. the crate folder `NAME/` with a `Cargo.toml`, built with
//!    `cargo build --release`; the library's path comes from cargo's JSON
//!    messages, wherever the target dir is.
//!
//! The library found is copied once into a sealed memory file
//! (`memfd_create`), and every worker of the run loads that copy. A plugin
//! replaced on disk mid-run changes nothing for the run, and nothing is left
//! on disk when the runner dies.
//!
//! Nothing is loaded from a file or folder that other users may write: the
//! work dir and the library must belong to the current user (or root) and
//! must not be writable by group or others.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a task could not be turned into a loadable library.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The task name has characters other than letters, digits, `-`, `_`.
    #[error("invalid task name `{0}`: use letters, digits, `-` and `_` only (no paths)")]
    InvalidName(String),
    /// The work dir is missing or no directory.
    #[error(
        "cannot use work dir `{}`{} (set another with --work-dir DIR)",
        path.display(),
        relative_note(path)
    )]
    WorkDir {
        /// The work dir as given.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// Neither a library nor a crate folder exists.
    #[error(
        "no task `{name}` in `{}`; looked for {}; {}",
        work_dir.display(),
        looked.iter().map(|p| format!("`{}`", p.display())).collect::<Vec<_>>().join(", "),
        list_available(available)
    )]
    NotFound {
        /// The task name.
        name: String,
        /// The work dir.
        work_dir: PathBuf,
        /// Every path that was tried.
        looked: Vec<PathBuf>,
        /// The tasks the work dir does hold.
        available: Vec<String>,
    },
    /// A path is writable by others or owned by another user.
    #[error("refusing to load from `{path}`: it {problem}; {fix}")]
    Unsafe {
        /// The offending file or folder.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// How to fix it.
        fix: String,
    },
    /// A library file resolves to outside the work dir.
    #[error(
        "refusing to load `{path}`: it resolves to `{target}`, outside the work dir `{work_dir}`"
    )]
    OutsideWorkDir {
        /// The path found in the work dir.
        path: PathBuf,
        /// Where its links lead.
        target: PathBuf,
        /// The resolved work dir.
        work_dir: PathBuf,
    },
    /// The file is not an ELF shared library for this machine.
    #[error("`{path}` is not a plugin library: {reason}")]
    NotALibrary {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// Cargo could not be started or failed.
    #[error("cannot build the crate `{manifest}`: {reason}")]
    Build {
        /// The crate's manifest.
        manifest: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Reading the library or making its snapshot failed.
    #[error("cannot snapshot `{}`", path.display())]
    Snapshot {
        /// The library file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

fn relative_note(path: &Path) -> String {
    match std::env::current_dir() {
        Ok(cwd) if path.is_relative() => format!(", relative to `{}`", cwd.display()),
        _ => String::new(),
    }
}

fn list_available(available: &[String]) -> String {
    if available.is_empty() {
        String::from("the work dir holds no tasks")
    } else {
        format!("tasks in the work dir: {}", available.join(", "))
    }
}

/// The task names a work dir holds: `libNAME.so` files and crate folders.
pub fn available_tasks(work_dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(work_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            if let Some(task) = name.strip_prefix("lib").and_then(|n| n.strip_suffix(".so")) {
                return Some(task.to_string());
            }
            entry.path().join("Cargo.toml").is_file().then_some(name)
        })
        .filter(|name| validate_name(name).is_ok())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A plugin library ready for workers: a sealed in-memory copy.
#[derive(Debug)]
pub struct PluginLibrary {
    /// Where the library was found (or built).
    pub source: PathBuf,
    /// The sealed memory file holding its bytes.
    pub snapshot: OwnedFd,
}

/// Checks that a task name is a plain name.
///
/// # Errors
///
/// [`PluginError::InvalidName`] for an empty name or one with anything but
/// ASCII letters, digits, `-` and `_`.
pub fn validate_name(name: &str) -> Result<(), PluginError> {
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        Ok(())
    } else {
        Err(PluginError::InvalidName(name.escape_debug().to_string()))
    }
}

/// Finds, builds if need be, checks and snapshots the library for a task.
///
/// # Errors
///
/// Any [`PluginError`].
pub fn prepare(work_dir: &Path, name: &str) -> Result<PluginLibrary, PluginError> {
    let source = locate(work_dir, name)?;
    let snapshot = snapshot(&source)?;
    Ok(PluginLibrary { source, snapshot })
}

/// Finds, and builds if need be, the library for a task.
///
/// # Errors
///
/// Any [`PluginError`] but `Snapshot`.
pub fn locate(work_dir: &Path, name: &str) -> Result<PathBuf, PluginError> {
    validate_name(name)?;
    let resolved_dir = fs::canonicalize(work_dir)
        .and_then(|dir| {
            if dir.is_dir() {
                Ok(dir)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    "not a directory",
                ))
            }
        })
        .map_err(|source| PluginError::WorkDir {
            path: work_dir.to_path_buf(),
            source,
        })?;
    check_private(&resolved_dir)?;

    let mut looked = Vec::new();
    let mut file_names = vec![format!("lib{name}.so")];
    if name.contains('-') {
        file_names.push(format!("lib{}.so", name.replace('-', "_")));
    }
    for file_name in file_names {
        let candidate = work_dir.join(&file_name);
        if candidate.exists() {
            let target = fs::canonicalize(&candidate).map_err(|source| PluginError::Snapshot {
                path: candidate.clone(),
                source,
            })?;
            if !target.starts_with(&resolved_dir) {
                return Err(PluginError::OutsideWorkDir {
                    path: candidate,
                    target,
                    work_dir: resolved_dir,
                });
            }
            check_private(&target)?;
            return Ok(target);
        }
        looked.push(candidate);
    }

    let manifest = work_dir.join(name).join("Cargo.toml");
    if manifest.is_file() {
        let library = build_crate(&manifest)?;
        check_private(&library)?;
        return Ok(library);
    }
    looked.push(manifest);

    Err(PluginError::NotFound {
        name: name.to_string(),
        work_dir: work_dir.to_path_buf(),
        looked,
        available: available_tasks(work_dir),
    })
}

/// Refuses a path that other users could have written.
fn check_private(path: &Path) -> Result<(), PluginError> {
    let meta = fs::metadata(path).map_err(|source| PluginError::Snapshot {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(PluginError::Unsafe {
            path: path.to_path_buf(),
            problem: format!(
                "belongs to user id {}, not to you ({me}) or root",
                meta.uid()
            ),
            fix: format!(
                "run `chown {me} {}` or use a work dir of your own",
                path.display()
            ),
        });
    }
    let mode = meta.mode();
    let group_writable = mode & 0o020 != 0 && !is_private_group(meta.gid(), meta.uid());
    if mode & 0o002 != 0 || group_writable {
        let who = if mode & 0o002 != 0 {
            "others"
        } else {
            "its group"
        };
        return Err(PluginError::Unsafe {
            path: path.to_path_buf(),
            problem: format!("is writable by {who} (mode {:o})", mode & 0o7777),
            fix: format!("run `chmod go-w {}`", path.display()),
        });
    }
    Ok(())
}

/// Whether group `gid` is the private group of user `uid`: the user's
/// primary group, named like the user, with no other listed member. Where
/// every user has such a group (umask 002), group write access gives no one
/// else write access, so it is allowed.
fn is_private_group(gid: u32, uid: u32) -> bool {
    let mut buf = vec![0u8; 16 * 1024];

    // SAFETY: a zeroed passwd is a valid out-parameter; getpwuid_r writes
    // into it and into `buf`, whose length is passed, and sets `result` to
    // null or to `pwd`.
    let (user, primary) = unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return false;
        }
        (
            std::ffi::CStr::from_ptr(pwd.pw_name).to_bytes().to_vec(),
            pwd.pw_gid,
        )
    };
    if primary != gid {
        return false;
    }

    // SAFETY: as above, for getgrgid_r; `gr_mem` is a null-terminated array
    // of C strings inside `buf`.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut result = std::ptr::null_mut();
        let rc = libc::getgrgid_r(
            gid,
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return false;
        }
        if std::ffi::CStr::from_ptr(grp.gr_name).to_bytes() != user.as_slice() {
            return false;
        }
        let mut member = grp.gr_mem;
        while !member.is_null() && !(*member).is_null() {
            if std::ffi::CStr::from_ptr(*member).to_bytes() != user.as_slice() {
                return false;
            }
            member = member.add(1);
        }
    }
    true
}

/// Builds a crate folder with cargo in release mode and returns its cdylib.
fn build_crate(manifest: &Path) -> Result<PathBuf, PluginError> {
    let fail = |reason: String| PluginError::Build {
        manifest: manifest.to_path_buf(),
        reason,
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    tracing::debug!(manifest = %manifest.display(), "building plugin crate");

    let mut child = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--message-format=json-render-diagnostics",
        ])
        .arg("--manifest-path")
        .arg(manifest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run `{}`: {e}", Path::new(&cargo).display())))?;

    let manifest_dir = fs::canonicalize(manifest)
        .ok()
        .and_then(|m| m.parent().map(Path::to_path_buf));
    // Cargo's progress goes on to the runner's stderr, except its
    // "Finished" line, which on an up-to-date crate would be the only line
    // of every run.
    let stderr = child.stderr.take().expect("stderr was piped at spawn");
    let relay = std::thread::spawn(move || {
        let mut out = io::stderr();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !line.trim_start().starts_with("Finished ") {
                let _ = writeln!(out, "{line}");
            }
        }
    });

    let mut library = None;
    let stdout = child.stdout.take().expect("stdout was piped at spawn");
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| fail(format!("cannot read cargo's output: {e}")))?;
        if let Some(path) = cdylib_from_message(&line, manifest_dir.as_deref()) {
            library = Some(path);
        }
    }
    let status = child
        .wait()
        .map_err(|e| fail(format!("cannot wait for cargo: {e}")))?;
    let _ = relay.join();
    if !status.success() {
        return Err(fail(format!("cargo exited with {status}")));
    }
    library.ok_or_else(|| {
        fail(String::from(
            "the crate builds no cdylib; add `[lib] crate-type = [\"cdylib\"]` to its Cargo.toml",
        ))
    })
}

/// Picks the `.so` of a cdylib target out of one cargo JSON message.
fn cdylib_from_message(line: &str, manifest_dir: Option<&Path>) -> Option<PathBuf> {
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    if message["reason"] != "compiler-artifact" {
        return None;
    }
    let kinds = message["target"]["kind"].as_array()?;
    if !kinds.iter().any(|k| k == "cdylib") {
        return None;
    }
    if let Some(dir) = manifest_dir {
        let src = Path::new(message["target"]["src_path"].as_str()?);
        if !src.starts_with(dir) {
            return None;
        }
    }
    message["filenames"]
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str())
        .find(|f| f.ends_with(".so"))
        .map(PathBuf::from)
}

/// Checks the ELF header: a shared object for this machine's architecture.
fn check_elf(path: &Path, head: &[u8]) -> Result<(), PluginError> {
    let not = |reason: String| PluginError::NotALibrary {
        path: path.to_path_buf(),
        reason,
    };
    if head.len() < 20 || &head[..4] != b"\x7fELF" {
        return Err(not("it is not an ELF file".into()));
    }
    let e_type = u16::from_le_bytes([head[16], head[17]]);
    let e_machine = u16::from_le_bytes([head[18], head[19]]);
    const ET_DYN: u16 = 3;
    if e_type != ET_DYN {
        return Err(not(format!(
            "it is an ELF file of type {e_type}, not a shared object"
        )));
    }
    let (expected, arch) = native_machine();
    if e_machine != expected || head[4] != 2 || head[5] != 1 {
        return Err(not(format!(
            "it is built for another architecture (ELF machine {e_machine}, class {}), \
             and this runner is {arch}",
            head[4]
        )));
    }
    Ok(())
}

/// The ELF machine number and name of the running architecture.
fn native_machine() -> (u16, &'static str) {
    if cfg!(target_arch = "x86_64") {
        (62, "x86-64")
    } else if cfg!(target_arch = "aarch64") {
        (183, "aarch64")
    } else {
        (0, std::env::consts::ARCH)
    }
}

/// Copies a library into a sealed memory file.
fn snapshot(path: &Path) -> Result<OwnedFd, PluginError> {
    let fail = |source: io::Error| PluginError::Snapshot {
        path: path.to_path_buf(),
        source,
    };
    // A pipe or device would block or never end; only a file is a library.
    if !fs::metadata(path).map_err(fail)?.is_file() {
        return Err(PluginError::NotALibrary {
            path: path.to_path_buf(),
            reason: String::from("it is not a regular file"),
        });
    }
    let mut file = File::open(path).map_err(fail)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(fail)?;
    check_elf(path, &bytes)?;

    let name = CString::new("runner-plugin").expect("no NUL in a literal");
    // SAFETY: `name` is a valid C string; the call has no other inputs.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd == -1 {
        return Err(fail(io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut memfile = File::from(fd);
    memfile.write_all(&bytes).map_err(fail)?;

    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    if unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&memfile),
            libc::F_ADD_SEALS,
            seals,
        )
    } == -1
    {
        return Err(fail(io::Error::last_os_error()));
    }
    Ok(OwnedFd::from(memfile))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_pass_and_paths_do_not() {
        for good in ["test", "sha256", "my-task_2"] {
            validate_name(good).unwrap();
        }
        for bad in ["", "a/b", "..", "a\0b", "x y", "ü"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn elf_checks_name_the_problem() {
        let path = Path::new("x.so");
        let err = check_elf(path, b"hello world, not elf").unwrap_err();
        assert!(err.to_string().contains("not an ELF file"), "{err}");

        let mut head = vec![0u8; 64];
        head[..4].copy_from_slice(b"\x7fELF");
        head[4] = 2;
        head[5] = 1;
        head[16] = 3;
        head[18] = 40;
        let err = check_elf(path, &head).unwrap_err();
        assert!(err.to_string().contains("another architecture"), "{err}");
    }
}
