//! `runner new NAME`: a plugin crate that builds and runs as it is.
//!
//! The crate goes in `WORK_DIR/NAME/`: a `Cargo.toml` with
//! `crate-type = ["cdylib"]` and a path dependency on `plugin-api`, and a
//! `src/lib.rs` with an exported task and a unit test. Its params are
//! numbers, so `runner --task NAME --range 0..10` runs it at once.
//!
//! Inside this repository's `plugins/` the crate joins the workspace (its
//! members are `plugins/*`); anywhere else it is a workspace of its own,
//! with its own `target/`.

use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::plugin;

/// The `plugin-api` crate next to the runner's own sources, as built.
const BUILT_WITH_PLUGIN_API: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugin-api");

/// This repository's `plugins/` folder, as built.
const BUILT_WITH_PLUGINS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins");

/// Names a crate cannot have: Rust keywords, and crates of the standard
/// library that a `cdylib` of that name would shadow.
const RESERVED: &[&str] = &[
    "abstract",
    "alloc",
    "as",
    "async",
    "await",
    "become",
    "box",
    "break",
    "const",
    "continue",
    "core",
    "crate",
    "do",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "final",
    "fn",
    "for",
    "gen",
    "if",
    "impl",
    "in",
    "let",
    "loop",
    "macro",
    "match",
    "mod",
    "move",
    "mut",
    "override",
    "priv",
    "proc_macro",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "std",
    "struct",
    "super",
    "test",
    "trait",
    "true",
    "try",
    "type",
    "typeof",
    "unsafe",
    "unsized",
    "use",
    "virtual",
    "where",
    "while",
    "yield",
];

/// Writes the crate and says how to run it.
///
/// # Errors
///
/// A bad name, an existing folder, no `plugin-api` to depend on, or a
/// failed write.
pub fn run(name: &str, work_dir: &Path, plugin_api: Option<&Path>) -> anyhow::Result<ExitCode> {
    let dir = create(name, work_dir, plugin_api)?;
    let text = format!(
        "created the task `{name}` in `{}`\n\
         run it:  runner --task {name} --work-dir {} --range 0..10\n\
         test it: cargo test --manifest-path {}\n",
        dir.display(),
        work_dir.display(),
        dir.join("Cargo.toml").display()
    );
    crate::exit::write_stdout(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// Writes the crate `work_dir/name` and returns its folder.
///
/// # Errors
///
/// As [`run`].
pub fn create(name: &str, work_dir: &Path, plugin_api: Option<&Path>) -> anyhow::Result<PathBuf> {
    plugin::validate_name(name)?;
    let lib_name = name.replace('-', "_");
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        bail!("invalid task name `{name}`: a crate name starts with a letter");
    }
    if RESERVED.contains(&lib_name.as_str()) {
        bail!("invalid task name `{name}`: it is reserved in Rust; pick another");
    }
    if work_dir.exists() && !work_dir.is_dir() {
        bail!(
            "work dir `{}` is a file, not a folder; give another with --work-dir",
            work_dir.display()
        );
    }
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("cannot create work dir `{}`", work_dir.display()))?;
    let dir = work_dir.join(name);
    if dir.exists() {
        bail!(
            "`{}` exists already; pick another name or remove it",
            dir.display()
        );
    }

    let api = match plugin_api {
        Some(path) => path.to_path_buf(),
        None => PathBuf::from(BUILT_WITH_PLUGIN_API),
    };
    let api = std::fs::canonicalize(&api).with_context(|| {
        format!(
            "cannot find the plugin-api crate at `{}`; give its folder with --plugin-api DIR",
            api.display()
        )
    })?;
    if !api.join("Cargo.toml").is_file() {
        bail!(
            "`{}` holds no Cargo.toml; give the plugin-api folder with --plugin-api",
            api.display()
        );
    }

    let work_dir_abs = std::fs::canonicalize(work_dir)
        .with_context(|| format!("cannot resolve work dir `{}`", work_dir.display()))?;
    let in_this_workspace =
        std::fs::canonicalize(BUILT_WITH_PLUGINS).is_ok_and(|plugins| plugins == work_dir_abs);
    let crate_dir = work_dir_abs.join(name);
    let api_path = relative_path(&crate_dir, &api);

    let manifest = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
description = "A runner task"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
plugin-api = {{ path = "{api}" }}
serde = {{ version = "1", features = ["derive"] }}
{workspace}"#,
        api = api_path.display(),
        workspace = if in_this_workspace {
            ""
        } else {
            "\n# A workspace of its own, wherever the work dir is.\n[workspace]\n"
        },
    );
    let source = format!(
        r#"//! The `{name}` task. Run it with `runner --task {name} --range 0..10`.

use plugin_api::{{Permanent, export_task}};
use serde::Serialize;

/// What one task returns.
#[derive(Debug, PartialEq, Serialize)]
pub struct Output {{
    /// The task's params.
    pub n: u64,
    /// Their square.
    pub square: u64,
}}

/// Squares a number. Params are any JSON number that fits a `u64`; one too
/// big to square is a permanent error (trying again would not help).
pub fn run(n: u64) -> Result<Output, Permanent<String>> {{
    let square = n
        .checked_mul(n)
        .ok_or_else(|| Permanent(format!("{{n}} is too big to square")))?;
    Ok(Output {{ n, square }})
}}

export_task!(run);

#[cfg(test)]
mod tests {{
    use super::*;

    #[test]
    fn squares_and_refuses_overflow() {{
        assert_eq!(run(7).unwrap(), Output {{ n: 7, square: 49 }});
        assert!(run(u64::MAX).is_err());
    }}
}}
"#
    );

    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("cannot create `{}`", dir.display()))?;
    let write = |path: PathBuf, text: &str| {
        std::fs::write(&path, text).with_context(|| format!("cannot write `{}`", path.display()))
    };
    write(dir.join("Cargo.toml"), &manifest)?;
    write(dir.join("src/lib.rs"), &source)?;
    write(dir.join(".gitignore"), "target/\n")?;
    Ok(dir)
}

/// `to` relative to `from` when both are absolute; `to` itself otherwise.
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to_parts: Vec<Component> = to.components().collect();
    let common = from
        .iter()
        .zip(&to_parts)
        .take_while(|(a, b)| a == b)
        .count();
    if common == 0 {
        return to.to_path_buf();
    }
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for part in &to_parts[common..] {
        path.push(part);
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_to_the_common_folder() {
        assert_eq!(
            relative_path(Path::new("/a/b/plugins/x"), Path::new("/a/b/plugin-api")),
            PathBuf::from("../../plugin-api")
        );
        assert_eq!(
            relative_path(Path::new("/x/y"), Path::new("/x/y/z")),
            PathBuf::from("z")
        );
    }

    #[test]
    fn reserved_and_odd_names_are_refused() {
        let dir = std::env::temp_dir();
        for name in ["test", "fn", "9lives", "a/b"] {
            assert!(create(name, &dir, None).is_err(), "{name}");
        }
    }
}
