use std::time::Duration;

use crate::util::{plugins_dir, read_results, run, runner, work_dir_with};

#[test]
fn a_plugin_for_another_abi_version_is_refused_before_any_task() {
    let work = work_dir_with(&["bad-abi"]);
    let results = work.path().join("r.jsonl");
    let mut command = runner();
    command
        .args(["--task", "bad-abi", "--range", "0..100", "-j", "2"])
        .arg("--results")
        .arg(&results)
        .arg("--work-dir")
        .arg(work.path());
    let run = run(command, Duration::from_secs(30));

    check!(run, run.code() == Some(2));
    check!(run, run.stderr.contains("plugin ABI version 999"));
    check!(run, run.stderr.contains("this runner speaks version 1"));
    check!(run, read_results(&results).is_empty());
    check!(run, run.stderr.contains("0 tasks: 0 ok, 0 failed"));
    run.assert_no_leftovers();
}

#[test]
fn a_missing_task_lists_the_paths_looked_at() {
    let work = work_dir_with(&[]);
    let mut command = runner();
    command
        .args(["--task", "no-such", "--range", "0..1", "--work-dir"])
        .arg(work.path());
    let run = run(command, Duration::from_secs(30));

    check!(run, run.code() == Some(2));
    let dir = work.path().display();
    for path in [
        format!("`{dir}/libno-such.so`"),
        format!("`{dir}/libno_such.so`"),
        format!("`{dir}/no-such/Cargo.toml`"),
    ] {
        check!(run, run.stderr.contains(&path), "missing {path}");
    }
    check!(run, run.stderr.starts_with("error: no task `no-such`"));
}

#[test]
fn invalid_json_on_line_7_names_line_7_and_runs_nothing() {
    let work = work_dir_with(&["test"]);
    let params = work.path().join("params.jsonl");
    std::fs::write(&params, "1\n2\n3\n4\n5\n6\n{\"broken\": \n8\n").unwrap();
    let results = work.path().join("r.jsonl");
    let mut command = runner();
    command
        .args(["--task", "test"])
        .arg("--params")
        .arg(&params)
        .arg("--results")
        .arg(&results)
        .arg("--work-dir")
        .arg(work.path());
    let run = run(command, Duration::from_secs(30));

    check!(run, run.code() == Some(2));
    let expected = format!("error: `{}` line 7: not valid JSON", params.display());
    check!(run, run.stderr.contains(&expected), "expected {expected:?}");
    check!(run, run.stdout.is_empty(), "a task ran");
    check!(run, !results.exists(), "the results file was touched");
    check!(run, run.worker_pids().is_empty());
}

#[test]
fn the_crate_folder_is_built_when_no_library_exists() {
    let mut command = runner();
    command
        .args(["--task", "test", "--range", "3..5", "--work-dir"])
        .arg(plugins_dir());
    let run = run(command, Duration::from_secs(300));

    check!(run, run.code() == Some(0));
    let mut lines: Vec<&str> = run.stdout.lines().collect();
    lines.sort_unstable();
    check!(run, lines == ["3", "4"]);
}
