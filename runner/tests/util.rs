//! Running the binary, building fixtures, reading results.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Fails the test with the run's output attached.
macro_rules! check {
    ($run:expr, $cond:expr $(,)?) => {
        assert!($cond, "{}\n{}", stringify!($cond), $run.describe())
    };
    ($run:expr, $cond:expr, $($msg:tt)+) => {
        assert!($cond, "{}\n{}", format!($($msg)+), $run.describe())
    };
}

/// The repository's `plugins/` folder.
pub fn plugins_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins")
}

/// Builds the fixture plugins once per test run and returns their
/// libraries by crate name.
fn built_libraries() -> &'static Vec<(String, PathBuf)> {
    static LIBRARIES: OnceLock<Vec<(String, PathBuf)>> = OnceLock::new();
    LIBRARIES.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let output = Command::new(cargo)
            .args(["build", "--release", "--message-format=json"])
            .args([
                "-p",
                "test",
                "-p",
                "sha256",
                "-p",
                "faulty",
                "-p",
                "bad-abi",
                "-p",
                "load-crash",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::inherit())
            .output()
            .expect("cargo runs");
        assert!(
            output.status.success(),
            "building the fixture plugins failed"
        );
        let mut libraries = Vec::new();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let Ok(message) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if message["reason"] != "compiler-artifact" {
                continue;
            }
            // Plugins are known by their folder name, as `--task` knows them.
            let Some(folder) = message["manifest_path"]
                .as_str()
                .and_then(|m| Path::new(m).parent()?.file_name()?.to_str())
            else {
                continue;
            };
            for file in message["filenames"].as_array().into_iter().flatten() {
                if let Some(path) = file.as_str().filter(|f| f.ends_with(".so")) {
                    libraries.push((folder.to_string(), PathBuf::from(path)));
                }
            }
        }
        libraries
    })
}

/// A private work dir holding copies of the named plugins as
/// `libNAME.so`.
pub fn work_dir_with(plugins: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for plugin in plugins {
        let (_, path) = built_libraries()
            .iter()
            .find(|(name, _)| name == plugin)
            .unwrap_or_else(|| panic!("no built library for {plugin}"));
        std::fs::copy(path, dir.path().join(format!("lib{plugin}.so"))).expect("copy plugin");
    }
    dir
}

/// The outcome of one run of the binary.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub args: Vec<String>,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn describe(&self) -> String {
        let mut stdout = self.stdout.clone();
        if stdout.len() > 4000 {
            stdout.truncate(4000);
            stdout.push_str("...");
        }
        format!(
            "runner {}\nstatus: {}\nelapsed: {:?}\n--- stdout\n{stdout}\n--- stderr\n{}",
            self.args.join(" "),
            self.status,
            self.elapsed,
            self.stderr
        )
    }

    /// The pids of every worker the run started, from its debug log.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.stderr
            .lines()
            .filter_map(|line| line.split("spawned worker pid=").nth(1))
            .filter_map(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|d| d.parse().ok())
            })
            .collect()
    }

    /// Asserts that no process is left in any worker's process group.
    pub fn assert_no_leftovers(&self) {
        let pids = self.worker_pids();
        check!(self, !pids.is_empty(), "the run logged no worker pids");
        let groups: BTreeSet<u32> = pids.into_iter().collect();
        let alive = processes_in_groups(&groups);
        check!(
            self,
            alive.is_empty(),
            "processes left in worker groups: {alive:?}"
        );
    }
}

/// Every live (non-zombie) process whose process group is in `groups`.
pub fn processes_in_groups(groups: &BTreeSet<u32>) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state, ppid, pgrp, ...
        let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let fields: Vec<&str> = after.split_whitespace().collect();
        let (Some(state), Some(pgrp)) = (fields.first(), fields.get(2)) else {
            continue;
        };
        let pgrp: u32 = pgrp.parse().unwrap_or(0);
        if *state != "Z" && groups.contains(&pgrp) {
            found.push((pid, pgrp));
        }
    }
    found
}

/// A command for the binary under test, logging worker pids.
pub fn runner() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_runner"));
    command
        .env("RUNNER_LOG", "runner=debug")
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE");
    command
}

/// Runs `command` with `stdin` as input; fails the test past `limit`.
pub fn run_with_input(mut command: Command, stdin: Option<Vec<u8>>, limit: Duration) -> Run {
    let args = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn().expect("runner starts");

    let feeder = stdin.map(|bytes| {
        let mut pipe = child.stdin.take().expect("stdin was piped");
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = pipe.write_all(&bytes);
        })
    });
    let mut out_pipe = child.stdout.take().expect("stdout was piped");
    let mut err_pipe = child.stderr.take().expect("stderr was piped");
    let out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });

    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for runner") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("runner ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = started.elapsed();
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    Run {
        status,
        stdout: String::from_utf8_lossy(&out.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err.join().unwrap()).into_owned(),
        elapsed,
        args,
    }
}

/// Runs `command`; fails the test past `limit`.
pub fn run(command: Command, limit: Duration) -> Run {
    run_with_input(command, None, limit)
}

/// Reads a results file: one JSON value a line.
pub fn read_results(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("bad record {line:?}: {e}"))
        })
        .collect()
}

/// Records by index; fails on a duplicate index.
pub fn by_index(records: &[Value]) -> std::collections::BTreeMap<u64, Value> {
    let mut map = std::collections::BTreeMap::new();
    for record in records {
        let index = record["index"].as_u64().expect("index is a number");
        assert!(
            map.insert(index, record.clone()).is_none(),
            "index {index} recorded twice"
        );
    }
    map
}

/// Writes JSON Lines to `dir/name`.
pub fn write_lines(dir: &Path, name: &str, lines: &[Value]) -> PathBuf {
    let path = dir.join(name);
    let text: String = lines.iter().map(|v| format!("{v}\n")).collect();
    std::fs::write(&path, text).expect("write params");
    path
}

/// A runner started in the background, its output going to files.
pub struct Background {
    child: std::process::Child,
    started: Instant,
    out_path: PathBuf,
    err_path: PathBuf,
    args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Background {
    /// Starts `command` with stdout and stderr captured to files.
    pub fn start(mut command: Command) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let out_path = dir.path().join("stdout");
        let err_path = dir.path().join("stderr");
        let args = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        command
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap());
        let child = command.spawn().expect("runner starts");
        Self {
            child,
            started: Instant::now(),
            out_path,
            err_path,
            args,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` to the runner.
    pub fn signal(&self, signal: i32) {
        // SAFETY: the pid is our own child's, not yet waited for.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// What the runner wrote to stderr so far.
    pub fn stderr_so_far(&self) -> String {
        std::fs::read_to_string(&self.err_path).unwrap_or_default()
    }

    /// Waits until `cond` holds, or fails the test past `limit`.
    pub fn wait_until(&self, limit: Duration, what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + limit;
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; stderr so far:\n{}",
                self.stderr_so_far()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the runner to exit; kills it and fails past `limit`.
    pub fn wait(mut self, limit: Duration) -> Run {
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for runner") {
                break status;
            }
            if self.started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("runner ran past {limit:?}:\n{}", self.stderr_so_far());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Run {
            status,
            stdout: std::fs::read_to_string(&self.out_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.err_path).unwrap_or_default(),
            elapsed: self.started.elapsed(),
            args: self.args,
        }
    }
}

/// How many complete lines a file has.
pub fn count_lines(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

/// A `faulty` command over a params file in `work`, with results next to
/// it.
pub fn faulty_command(work: &Path, params: &[Value], extra: &[&str]) -> (Command, PathBuf) {
    let params = write_lines(work, "params.jsonl", params);
    let results = work.join("results.jsonl");
    (
        task_on_file("faulty", work, &params, &results, extra),
        results,
    )
}

/// A command running `task` of `work` on a params file, recording to
/// `results`, with `extra` options.
pub fn task_on_file(
    task: &str,
    work: &Path,
    params: &Path,
    results: &Path,
    extra: &[&str],
) -> Command {
    let mut command = runner();
    command
        .args(["--task", task])
        .args(extra)
        .arg("--params")
        .arg(params)
        .arg("--results")
        .arg(results)
        .arg("--work-dir")
        .arg(work);
    command
}
