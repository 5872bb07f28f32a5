use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::{by_index, read_results, runner, work_dir_with, write_lines};

/// Compares `actual` with the snapshot file `name`; `UPDATE_SNAPSHOTS=1`
/// rewrites the file instead.
fn assert_snapshot(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "no snapshot {}: {e}; run with UPDATE_SNAPSHOTS=1",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{name} changed; run with UPDATE_SNAPSHOTS=1 to accept\n--- expected\n{expected}\n--- actual\n{actual}"
    );
}

#[test]
fn help_reads_as_recorded() {
    for (flag, snapshot) in [("-h", "help-short.txt"), ("--help", "help-long.txt")] {
        let mut command = runner();
        command.arg(flag).env("COLUMNS", "100");
        let run = crate::util::run(command, Duration::from_secs(10));
        check!(run, run.code() == Some(0));
        assert_snapshot(snapshot, &run.stdout);
    }
}

#[test]
fn list_describes_every_task_and_survives_a_broken_one() {
    let work = work_dir_with(&["test", "sha256", "bad-abi", "load-crash"]);
    let mut command = runner();
    command
        .current_dir(work.path())
        .args(["list", "--work-dir", "."]);
    let run = crate::util::run(command, Duration::from_secs(60));
    check!(run, run.code() == Some(0));
    assert_snapshot("list.txt", &run.stdout);

    let mut command = runner();
    command
        .args(["list", "--json", "--work-dir"])
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(60));
    check!(run, run.code() == Some(0));
    let listing: Value = serde_json::from_str(&run.stdout).unwrap();
    let dir = work.path().display().to_string();
    let expected = json!([
        {
            "name": "bad-abi", "kind": "library", "path": format!("{dir}/libbad-abi.so"),
            "error": "the plugin was built for plugin ABI version 999, but this runner speaks \
                      version 1; rebuild the plugin against a matching `plugin-api`"
        },
        {
            "name": "load-crash", "kind": "library", "path": format!("{dir}/libload-crash.so"),
            "error": "its worker died while loading it: killed by signal 11 (SIGSEGV)"
        },
        {
            "name": "sha256", "kind": "library", "path": format!("{dir}/libsha256.so"),
            "crate": "sha256", "version": "0.1.0", "abi_version": 1,
            "description": "SHA-256 digest and size of a file; params are its path"
        },
        {
            "name": "test", "kind": "library", "path": format!("{dir}/libtest.so"),
            "crate": "test", "version": "0.1.0", "abi_version": 1,
            "description": "Prints its params on a line and returns them"
        }
    ]);
    check!(run, listing == expected, "{listing:#}");
}

#[test]
fn the_summary_lists_failed_tasks_with_their_endings() {
    let work = work_dir_with(&["faulty"]);
    let params = write_lines(
        work.path(),
        "p.jsonl",
        &[
            json!({"do": "ok"}),
            json!({"do": "permanent", "message": "no such thing"}),
            json!({"do": "exit", "code": 4}),
        ],
    );
    let mut command = runner();
    command
        .args(["--task", "faulty", "--retries", "1", "-j", "1", "--params"])
        .arg(&params)
        .arg("--work-dir")
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(30));
    check!(run, run.code() == Some(1));
    let summary: Vec<&str> = run
        .stderr
        .lines()
        .skip_while(|l| !l.starts_with("3 tasks:"))
        .collect();
    check!(run, summary.len() == 3, "{summary:?}");
    check!(
        run,
        summary[0].starts_with("3 tasks: 1 ok, 2 failed, 1 retried in ")
    );
    check!(run, summary[0].ends_with(" workers started)"));
    check!(
        run,
        summary[1] == "  task 1 failed: permanent: no such thing"
    );
    let crash = summary[2];
    check!(
        run,
        crash.starts_with("  task 2 failed: crash: worker pid ")
            && crash.ends_with(" exited with code 4")
    );
}

#[test]
fn tag_prefixes_every_line_with_its_task() {
    let work = work_dir_with(&["faulty", "test"]);
    let params = write_lines(
        work.path(),
        "p.jsonl",
        &[
            json!({"do": "print", "bytes": 128}),
            json!({"do": "ok"}),
            json!({"do": "print", "bytes": 64}),
        ],
    );
    let mut command = runner();
    command
        .args(["--task", "faulty", "--tag", "-j", "2", "--params"])
        .arg(&params)
        .arg("--work-dir")
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(30));
    check!(run, run.code() == Some(0));
    let mut lines: Vec<&str> = run.stdout.lines().collect();
    lines.sort_unstable();
    let x = "x".repeat(63);
    let expected = [format!("0\t{x}"), format!("0\t{x}"), format!("2\t{x}")];
    check!(run, lines == expected, "{lines:?}");

    let mut command = runner();
    command
        .args([
            "--task",
            "test",
            "--tag",
            "--range",
            "0..3",
            "--results",
            "-",
            "--work-dir",
        ])
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(30));
    check!(run, run.code() == Some(0));
    // Records take stdout; task output moves to stderr, tagged.
    check!(run, run.stdout.lines().count() == 3);
    for i in 0..3 {
        check!(run, run.stderr.lines().any(|l| l == format!("{i}\t{i}")));
    }
}

#[test]
fn four_shards_over_the_same_params_run_every_task_once() {
    let work = work_dir_with(&["test"]);
    let mut all = Vec::new();
    for k in 0..4 {
        let results = work.path().join(format!("shard-{k}.jsonl"));
        let mut command = runner();
        command
            .args([
                "--task",
                "test",
                "--range",
                "0..103",
                "-q",
                "--shard",
                &format!("{k}/4"),
            ])
            .arg("--results")
            .arg(&results)
            .arg("--work-dir")
            .arg(work.path());
        let run = crate::util::run(command, Duration::from_secs(30));
        check!(run, run.code() == Some(0));
        let records = read_results(&results);
        check!(
            run,
            records
                .iter()
                .all(|r| r["index"].as_u64().unwrap() % 4 == k)
        );
        all.extend(records);
    }
    let merged = by_index(&all);
    assert_eq!(
        merged.keys().copied().collect::<Vec<_>>(),
        (0..103).collect::<Vec<_>>()
    );

    // `auto` reads a Slurm array.
    let results = work.path().join("slurm.jsonl");
    let mut command = runner();
    command
        .env("SLURM_ARRAY_TASK_ID", "2")
        .env("SLURM_ARRAY_TASK_COUNT", "4")
        .env("SLURM_ARRAY_TASK_MIN", "0")
        .args([
            "--task",
            "test",
            "--range",
            "0..10",
            "-q",
            "--shard",
            "auto",
            "--results",
        ])
        .arg(&results)
        .arg("--work-dir")
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(30));
    check!(run, run.code() == Some(0));
    let indices: Vec<u64> = read_results(&results)
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    check!(
        run,
        {
            let mut i = indices.clone();
            i.sort_unstable();
            i == [2, 6]
        },
        "{indices:?}"
    );
}

#[test]
fn new_writes_a_crate_that_builds_and_runs_at_once() {
    let work = tempfile::tempdir().unwrap();
    let mut command = runner();
    command
        .args(["new", "squares", "--work-dir"])
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(30));
    check!(run, run.code() == Some(0));
    check!(run, run.stdout.contains("runner --task squares --work-dir"));
    check!(run, work.path().join("squares/src/lib.rs").is_file());

    // Build with the workspace's target dir, where the dependencies are
    // compiled already.
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let results = work.path().join("r.jsonl");
    let mut command = runner();
    command
        .env("CARGO_TARGET_DIR", &target)
        .args(["--task", "squares", "--range", "0..4", "--results"])
        .arg(&results)
        .arg("--work-dir")
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(600));
    check!(run, run.code() == Some(0));
    let records = by_index(&read_results(&results));
    for n in 0..4u64 {
        check!(
            run,
            records[&n]["output"] == json!({"n": n, "square": n * n})
        );
    }

    // A second `new` of the same name refuses to overwrite.
    let mut command = runner();
    command
        .args(["new", "squares", "--work-dir"])
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(30));
    check!(run, run.code() == Some(2));
    check!(run, run.stderr.contains("exists already"));
}

#[test]
fn the_progress_bar_draws_on_a_terminal_and_never_into_a_pipe() {
    let work = work_dir_with(&["faulty"]);
    let params: Vec<Value> = (0..12)
        .map(|i| json!({"do": "sleep", "ms": 120, "value": i}))
        .collect();
    let params = write_lines(work.path(), "p.jsonl", &params);
    let command_line = format!(
        "{} --task faulty -j 2 --params {} --work-dir {}",
        env!("CARGO_BIN_EXE_runner"),
        params.display(),
        work.path().display()
    );

    // `script` runs the command on a pseudo-terminal and copies what it
    // draws to our pipe.
    let mut on_terminal = std::process::Command::new("script");
    on_terminal
        .args(["-qfec", &command_line, "/dev/null"])
        .env("TERM", "xterm");
    let drawn = crate::util::run(on_terminal, Duration::from_secs(30));
    check!(drawn, drawn.code() == Some(0));
    check!(
        drawn,
        drawn.stdout.contains("/12 tasks (0 failed, 0 retried)"),
        "no bar drawn"
    );
    check!(drawn, drawn.stdout.contains("12 tasks: 12 ok, 0 failed"));

    let mut piped = runner();
    piped
        .args(["--task", "faulty", "-j", "2", "--params"])
        .arg(&params)
        .arg("--work-dir")
        .arg(work.path());
    let quiet = crate::util::run(piped, Duration::from_secs(30));
    check!(quiet, quiet.code() == Some(0));
    check!(
        quiet,
        !quiet.stderr.contains("/12 tasks"),
        "the bar reached a pipe"
    );
    check!(quiet, !quiet.stderr.contains('\r'));

    // `always` means into a pipe, too.
    let mut forced = runner();
    forced
        .args([
            "--task",
            "faulty",
            "-j",
            "2",
            "--progress",
            "always",
            "--params",
        ])
        .arg(&params)
        .arg("--work-dir")
        .arg(work.path());
    let forced = crate::util::run(forced, Duration::from_secs(30));
    check!(forced, forced.code() == Some(0));
    check!(
        forced,
        forced.stderr.contains("/12 tasks (0 failed, 0 retried)")
    );
}

#[test]
fn completions_and_the_man_page_come_from_the_command_line_definition() {
    let mut command = runner();
    command.args(["completions", "bash"]);
    let run = crate::util::run(command, Duration::from_secs(10));
    check!(run, run.code() == Some(0));
    check!(
        run,
        run.stdout.contains("_runner()") && run.stdout.contains("--max-parallel")
    );

    let mut command = runner();
    command.arg("man");
    let run = crate::util::run(command, Duration::from_secs(10));
    check!(run, run.code() == Some(0));
    check!(
        run,
        run.stdout.contains(".TH runner 1") && run.stdout.contains("\\-\\-timeout")
    );
}

/// The embedding example, built by cargo next to the test binaries.
fn example_binary(name: &str) -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_runner"))
        .parent()
        .expect("the binary has a folder")
        .join("examples")
        .join(name)
}

#[test]
fn the_embedding_example_runs_5000_tasks_on_50_workers() {
    let binary = example_binary("embed");
    if !binary.exists() {
        eprintln!(
            "skipped: {} is not built (cargo test builds it)",
            binary.display()
        );
        return;
    }
    let work = work_dir_with(&["test"]);
    let mut command = std::process::Command::new(&binary);
    command.arg(work.path()).env_remove("RUST_LOG");
    let run = crate::util::run(command, Duration::from_secs(120));
    check!(run, run.code() == Some(0));
    check!(run, run.stdout.lines().count() == 5000);
    let summary = run
        .stderr
        .lines()
        .find(|l| l.starts_with("5000 results, 5000 ok, 0 failed; "));
    let started: Option<u32> = summary
        .and_then(|l| l.split("; ").nth(1))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok());
    check!(
        run,
        started.is_some_and(|n| (1..=50).contains(&n)),
        "{summary:?}"
    );
}
