use std::time::Duration;

use crate::util::{plugins_dir, read_results, run, runner, task_on_file, work_dir_with};

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
    check!(run, run.stderr.contains("; the work dir holds no tasks"));

    let work = work_dir_with(&["test", "faulty"]);
    let mut command = runner();
    command
        .args(["--task", "tset", "--range", "0..1", "--work-dir"])
        .arg(work.path());
    let listed = crate::util::run(command, Duration::from_secs(30));
    check!(listed, listed.code() == Some(2));
    check!(
        listed,
        listed
            .stderr
            .contains("; tasks in the work dir: faulty, test")
    );
}

#[test]
fn invalid_json_on_line_7_names_line_7_and_runs_nothing() {
    let work = work_dir_with(&["test"]);
    let params = work.path().join("params.jsonl");
    std::fs::write(&params, "1\n2\n3\n4\n5\n6\n{\"broken\": \n8\n").unwrap();
    let results = work.path().join("r.jsonl");
    let command = task_on_file("test", work.path(), &params, &results, &[]);
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

/// Runs the test task with `args` in a work dir holding it; asserts exit 2,
/// an error line containing every `needle`, and that nothing ran.
fn assert_refused(work: &std::path::Path, args: &[&str], needles: &[&str]) {
    let mut command = runner();
    command.current_dir(work).args(args);
    let run = run(command, Duration::from_secs(30));
    check!(run, run.code() == Some(2));
    let error = run
        .stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    for needle in needles {
        check!(run, error.contains(needle), "{error:?} lacks {needle:?}");
    }
    check!(run, run.stdout.is_empty(), "a task ran");
    check!(run, run.worker_pids().is_empty(), "a worker started");
}

#[test]
fn a_json_params_file_that_is_not_an_array_is_refused() {
    let work = work_dir_with(&["test"]);
    std::fs::write(work.path().join("p.json"), "{\"a\": 1}").unwrap();
    let args = ["--task", "test", "--work-dir", ".", "--params", "p.json"];
    assert_refused(work.path(), &args, &["`p.json`", "a JSON array", "line 1"]);
}

#[test]
fn invalid_utf8_in_params_names_the_line() {
    let work = work_dir_with(&["test"]);
    std::fs::write(work.path().join("p.jsonl"), b"\"fine\"\n\"caf\xe9\"\n").unwrap();
    let args = ["--task", "test", "--work-dir", ".", "--params", "p.jsonl"];
    assert_refused(work.path(), &args, &["`p.jsonl` line 2", "not UTF-8"]);
}

#[test]
fn an_empty_params_file_is_zero_tasks_and_success() {
    let work = work_dir_with(&["test"]);
    std::fs::write(work.path().join("p.jsonl"), "").unwrap();
    let mut command = runner();
    command.current_dir(work.path()).args([
        "--task",
        "test",
        "--work-dir",
        ".",
        "--params",
        "p.jsonl",
    ]);
    let run = run(command, Duration::from_secs(30));
    check!(run, run.code() == Some(0));
    check!(run, run.stderr.contains("0 tasks: 0 ok, 0 failed"));
}

#[test]
fn a_config_with_an_unknown_key_or_a_wrong_type_names_file_line_and_key() {
    let work = work_dir_with(&["test"]);
    std::fs::write(
        work.path().join("runner.toml"),
        "retries = 1\nretires = 2\n",
    )
    .unwrap();
    let args = ["--task", "test", "--work-dir", ".", "--range", "0..3"];
    assert_refused(
        work.path(),
        &args,
        &["`./runner.toml`", "line 2", "unknown field `retires`"],
    );

    std::fs::write(work.path().join("runner.toml"), "\ntimeout = 30\n").unwrap();
    assert_refused(
        work.path(),
        &args,
        &["`./runner.toml`", "line 2", "timeout"],
    );

    std::fs::write(
        work.path().join("other.toml"),
        "[tasks.test]\nretries = \"x\"\n",
    )
    .unwrap();
    let args = [
        "--task",
        "test",
        "--work-dir",
        ".",
        "--range",
        "0..3",
        "--config",
        "other.toml",
    ];
    std::fs::remove_file(work.path().join("runner.toml")).unwrap();
    assert_refused(work.path(), &args, &["`other.toml`", "line 2", "retries"]);
}

#[test]
fn bad_flag_values_are_refused_with_the_flag_named() {
    let work = work_dir_with(&["test"]);
    let base = ["--task", "test", "--work-dir", "."];
    let cases: [(&[&str], &[&str]); 4] = [
        (
            &["--range", "5..2"],
            &["--range `5..2`", "START is past END"],
        ),
        (
            &["--range", "0..3", "-j", "0"],
            &["--max-parallel", "at least 1"],
        ),
        (
            &["--range", "0..3", "--timeout", "banana"],
            &["--timeout", "`banana`"],
        ),
        (
            &["--range", "0..3", "--memory-limit", "lots"],
            &["--memory-limit", "`lots`"],
        ),
    ];
    for (extra, needles) in cases {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        assert_refused(work.path(), &args, needles);
    }
}

#[test]
fn task_names_with_paths_or_nul_are_refused() {
    let work = work_dir_with(&["test"]);
    for name in ["../test", "a/b", ".."] {
        let args = ["--task", name, "--work-dir", ".", "--range", "0..1"];
        assert_refused(work.path(), &args, &["invalid task name", name]);
    }
    // A NUL cannot be passed in argv; a config file can hold one.
    std::fs::write(work.path().join("runner.toml"), "task = \"te\\u0000st\"\n").unwrap();
    let args = ["--work-dir", ".", "--range", "0..1"];
    assert_refused(work.path(), &args, &["invalid task name `te\\0st`"]);
}

#[test]
fn a_missing_work_dir_is_named() {
    let work = work_dir_with(&[]);
    let args = ["--task", "test", "--work-dir", "nowhere", "--range", "0..1"];
    assert_refused(work.path(), &args, &["work dir `nowhere`", "No such file"]);
}

#[test]
fn a_library_file_that_is_no_library_or_for_another_machine_is_refused() {
    let work = work_dir_with(&[]);
    std::fs::write(work.path().join("libtext.so"), "just text\n").unwrap();
    let args = ["--task", "text", "--work-dir", ".", "--range", "0..1"];
    assert_refused(
        work.path(),
        &args,
        &["libtext.so` is not a plugin library", "not an ELF"],
    );

    // A 64-bit little-endian ELF shared object for aarch64 (machine 183).
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[6] = 1;
    elf[16] = 3;
    elf[18] = 183;
    std::fs::write(work.path().join("libarm.so"), elf).unwrap();
    let args = ["--task", "arm", "--work-dir", ".", "--range", "0..1"];
    assert_refused(
        work.path(),
        &args,
        &["another architecture", "ELF machine 183"],
    );
}

#[test]
fn no_params_and_no_task_are_refused_with_what_to_give() {
    let work = work_dir_with(&["test"]);
    assert_refused(
        work.path(),
        &["--task", "test", "--work-dir", "."],
        &["--params", "--range"],
    );
    assert_refused(
        work.path(),
        &["--work-dir", ".", "--range", "0..1"],
        &["--task NAME"],
    );
}
