//! Faults found by trying to break the runner, each pinned by a test.

use std::collections::BTreeSet;
use std::time::Duration;

use runner::protocol::{self, Hello, PROTOCOL_VERSION, WorkerMessage};
use serde_json::{Value, json};

use crate::util::{
    Background, by_index, count_lines, faulty_command, processes_in_groups, read_results,
    run_with_input, runner, work_dir_with, write_lines,
};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_setup_that_hangs_is_ended_by_the_timeout() {
    let work = work_dir_with(&["faulty"]);
    let (mut command, results) =
        faulty_command(work.path(), &[json!({"do": "ok"})], &["--timeout", "300ms"]);
    command.env("FAULTY_SETUP", "hang");
    let run = crate::util::run(command, Duration::from_secs(20));

    check!(run, run.code() == Some(2));
    check!(
        run,
        run.elapsed < Duration::from_secs(5),
        "{:?}",
        run.elapsed
    );
    check!(
        run,
        run.stderr
            .contains("was not ready within the timeout of 300ms")
    );
    check!(run, read_results(&results).is_empty());
    run.assert_no_leftovers();
}

#[test]
fn a_failing_setup_stops_the_run_with_its_message_and_an_empty_one_says_so() {
    let work = work_dir_with(&["faulty"]);
    for (setting, expected) in [
        (
            "fail",
            "the plugin's setup failed: FAULTY_SETUP asked setup to fail",
        ),
        ("empty", "the plugin's setup failed: (empty message)"),
    ] {
        let (mut command, _) = faulty_command(work.path(), &[json!({"do": "ok"})], &[]);
        command.env("FAULTY_SETUP", setting);
        let run = crate::util::run(command, Duration::from_secs(20));
        check!(run, run.code() == Some(2));
        check!(run, run.stderr.contains(expected), "expected {expected:?}");
    }
}

#[test]
fn a_worker_killed_from_outside_is_a_crash_with_that_signal() {
    let work = work_dir_with(&["faulty"]);
    let params = [json!({"do": "sleep", "ms": 20_000})];
    let (command, results) = faulty_command(work.path(), &params, &["--retries", "0"]);
    let background = Background::start(command);
    background.wait_until(Duration::from_secs(20), "a dispatched task", || {
        background.stderr_so_far().contains("dispatched task=0")
    });
    let stderr = background.stderr_so_far();
    let pid: i32 = stderr
        .split("dispatched task=0 pid=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("the dispatch log names the pid");
    // SAFETY: the pid is a worker of the runner this test started, alive
    // while its task sleeps.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let run = background.wait(Duration::from_secs(20));

    check!(run, run.code() == Some(1));
    let record = &read_results(&results)[0];
    check!(run, record["error"]["kind"] == "crash", "{record}");
    let message = record["error"]["message"].as_str().unwrap();
    check!(
        run,
        message.ends_with("killed by signal 9 (SIGKILL)"),
        "{message}"
    );
}

#[test]
fn a_child_in_the_worker_group_dies_with_a_killed_runner() {
    let work = work_dir_with(&["faulty"]);
    let params = [
        json!({"do": "orphan", "ms": 60_000}),
        json!({"do": "sleep", "ms": 60_000}),
    ];
    let (command, _) = faulty_command(work.path(), &params, &["-j", "1"]);
    let background = Background::start(command);
    background.wait_until(Duration::from_secs(20), "the second task", || {
        background.stderr_so_far().contains("dispatched task=1")
    });
    // The worker and the child it forked share the worker's group.
    let stderr = background.stderr_so_far();
    let groups: BTreeSet<u32> = stderr
        .lines()
        .filter_map(|l| l.split("spawned worker pid=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    let before = processes_in_groups(&groups);
    assert!(
        before.len() >= 2,
        "no child alive in the worker's group: {before:?}"
    );
    background.signal(libc::SIGKILL);
    let killed = background.wait(Duration::from_secs(5));
    check!(
        killed,
        killed.worker_pids().into_iter().collect::<BTreeSet<u32>>() == groups
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !processes_in_groups(&groups).is_empty() {
        let left = processes_in_groups(&groups);
        check!(
            killed,
            std::time::Instant::now() < deadline,
            "left behind: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn forged_frames_replace_only_their_worker() {
    let work = work_dir_with(&["faulty"]);
    let mut hello = Vec::new();
    protocol::encode_worker_message(
        &mut hello,
        &WorkerMessage::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            abi_version: 1,
            pid: 1,
            name: "forged".into(),
            version: "0".into(),
            description: String::new(),
        }),
    );
    let mut load_failed = Vec::new();
    protocol::encode_worker_message(
        &mut load_failed,
        &WorkerMessage::LoadFailed("forged".into()),
    );
    // A first task's frame is number 0: an answer to it that is no JSON.
    let mut bad_output = Vec::new();
    protocol::encode_done(&mut bad_output, 0, 0, 0, b"this is not json\n{");

    let mut params = vec![
        json!({"do": "write", "hex": hex(&hello), "value": "a"}),
        json!({"do": "write", "hex": hex(&load_failed), "value": "b"}),
    ];
    params.extend((0..20).map(|i| json!({"do": "sleep", "ms": 5, "value": i})));
    let (command, results) = faulty_command(work.path(), &params, &["-j", "2", "--retries", "0"]);
    let run = crate::util::run(command, Duration::from_secs(30));

    // The run goes on: every task is recorded, the forgers' too.
    check!(run, run.code() == Some(0), "a forged frame stopped the run");
    let records = by_index(&read_results(&results));
    check!(run, records.len() == 22);
    check!(run, records.values().all(|r| r["status"] == "ok"));
    check!(run, run.stderr.contains("said hello twice"));
    check!(
        run,
        run.stderr.contains("sent a load failure after its hello")
    );

    let (command, results) = faulty_command(
        work.path(),
        &[json!({"do": "write", "hex": hex(&bad_output)})],
        &["-j", "1", "--retries", "0"],
    );
    let run = crate::util::run(command, Duration::from_secs(30));
    check!(run, run.code() == Some(1));
    // The results file stays one JSON record a line.
    let records = read_results(&results);
    check!(run, records.len() == 1);
    let message = records[0]["error"]["message"].as_str().unwrap();
    check!(
        run,
        records[0]["error"]["kind"] == "lost" && message.contains("output that is not JSON")
    );
    run.assert_no_leftovers();
}

#[test]
fn absurd_durations_do_not_panic() {
    let work = work_dir_with(&["test"]);
    let mut command = runner();
    command
        .args(["--task", "test", "--range", "0..3", "-q"])
        .args([
            "--timeout",
            "500000000000y",
            "--grace",
            "18446744073709551615s",
        ])
        .arg("--work-dir")
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(20));
    check!(run, run.code() == Some(0));
}

#[test]
fn range_tasks_are_known_by_their_numbers() {
    let work = work_dir_with(&["test"]);
    let mut command = runner();
    command
        .args([
            "--task",
            "test",
            "--range",
            "5..8",
            "-q",
            "--results",
            "-",
            "--work-dir",
        ])
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(20));
    check!(run, run.code() == Some(0));
    let mut indices: Vec<(u64, u64)> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|r| (r["index"].as_u64().unwrap(), r["params"].as_u64().unwrap()))
        .collect();
    indices.sort_unstable();
    check!(run, indices == [(5, 5), (6, 6), (7, 7)]);
}

#[test]
fn the_params_file_is_never_the_results_file() {
    let work = work_dir_with(&["test"]);
    let params = write_lines(work.path(), "same.jsonl", &[json!(1), json!(2)]);
    let before = std::fs::read(&params).unwrap();
    let mut command = runner();
    command
        .args(["--task", "test", "--params"])
        .arg(&params)
        .arg("--results")
        .arg(work.path().join(".").join("same.jsonl"))
        .arg("--work-dir")
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(20));
    check!(run, run.code() == Some(2));
    check!(run, run.stderr.contains("is the params file"));
    check!(run, std::fs::read(&params).unwrap() == before);
}

#[test]
fn a_plugin_that_does_not_load_leaves_the_results_file_alone() {
    let work = work_dir_with(&["bad-abi"]);
    let results = work.path().join("precious.jsonl");
    std::fs::write(&results, "{\"precious\":1}\n").unwrap();
    let mut command = runner();
    command
        .args(["--task", "bad-abi", "--range", "0..2", "--results"])
        .arg(&results)
        .arg("--work-dir")
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(20));
    check!(run, run.code() == Some(2));
    check!(
        run,
        std::fs::read_to_string(&results).unwrap() == "{\"precious\":1}\n"
    );

    // A run that goes well replaces the old records.
    let work = work_dir_with(&["test"]);
    let results = work.path().join("old.jsonl");
    std::fs::write(&results, "{\"old\":1}\n{\"old\":2}\n").unwrap();
    let mut command = runner();
    command
        .args(["--task", "test", "--range", "0..1", "-q", "--results"])
        .arg(&results)
        .arg("--work-dir")
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(20));
    check!(run, run.code() == Some(0));
    check!(
        run,
        count_lines(&results) == 1 && !std::fs::read_to_string(&results).unwrap().contains("old")
    );
}

#[test]
fn config_values_a_run_cannot_use_name_file_line_and_key() {
    let work = work_dir_with(&["test"]);
    let cases = [
        (
            "task = \"test\"\nmax-parallel = 0\n",
            "line 2, key `max-parallel`: must be at least 1",
        ),
        (
            "[tasks.test]\ntimeout = \"0s\"\n",
            "line 2, key `tasks.test.timeout`: a timeout of zero",
        ),
        (
            "range = \"5..2\"\n",
            "line 1, key `range`: invalid range `5..2`",
        ),
        (
            "params = \"p.jsonl\"\nrange = \"0..2\"\n",
            "line 2, key `range`: `params` is set too",
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(work.path().join("runner.toml"), text).unwrap();
        let mut command = runner();
        command.current_dir(work.path()).args([
            "--task",
            "test",
            "--work-dir",
            ".",
            "--range",
            "0..1",
        ]);
        let run = crate::util::run(command, Duration::from_secs(20));
        check!(run, run.code() == Some(2));
        let wanted = format!("error: invalid config `./runner.toml`: {expected}");
        check!(run, run.stderr.contains(&wanted), "expected {wanted:?}");
    }
}

#[test]
fn an_empty_json_file_is_zero_tasks() {
    let work = work_dir_with(&["test"]);
    std::fs::write(work.path().join("p.json"), "  \n").unwrap();
    let mut command = runner();
    command.current_dir(work.path()).args([
        "--task",
        "test",
        "--work-dir",
        ".",
        "--params",
        "p.json",
    ]);
    let run = crate::util::run(command, Duration::from_secs(20));
    check!(run, run.code() == Some(0));
    check!(run, run.stderr.contains("0 tasks: 0 ok, 0 failed"));
}

#[test]
fn a_fifo_named_like_a_library_is_refused_at_once() {
    let work = work_dir_with(&[]);
    let fifo = std::ffi::CString::new(
        work.path()
            .join("libpipe.so")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: mkfifo on a path in our own temp dir.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let mut command = runner();
    command
        .args(["--task", "pipe", "--range", "0..1", "--work-dir"])
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(10));
    check!(run, run.code() == Some(2));
    check!(
        run,
        run.stderr
            .contains("is not a plugin library: it is not a regular file")
    );
}

#[test]
fn a_memory_limit_too_small_to_start_is_refused() {
    let work = work_dir_with(&["test"]);
    let mut command = runner();
    command
        .args([
            "--task",
            "test",
            "--range",
            "0..1",
            "--memory-limit",
            "1K",
            "--work-dir",
        ])
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(10));
    check!(run, run.code() == Some(2));
    check!(
        run,
        run.stderr
            .contains("too small for a worker to start; give at least 16M")
    );
    check!(run, run.worker_pids().is_empty());
}

#[test]
fn stdin_tasks_read_before_a_bad_line_still_run() {
    let work = work_dir_with(&["test"]);
    let results = work.path().join("r.jsonl");
    let mut command = runner();
    command
        .args(["--task", "test", "--params", "-", "-q", "--results"])
        .arg(&results)
        .arg("--work-dir")
        .arg(work.path());
    let run = run_with_input(
        command,
        Some(b"1\n2\nnot json\n4\n".to_vec()),
        Duration::from_secs(20),
    );
    check!(run, run.code() == Some(2));
    check!(
        run,
        run.stderr.contains("error: stdin line 3: not valid JSON")
    );
    let records = by_index(&read_results(&results));
    check!(run, records.keys().copied().collect::<Vec<_>>() == [0, 1]);
}

/// `count` tiny tasks, then one sleeping `ms`, then `count` tiny tasks.
fn tiny_slow_tiny(count: usize, ms: u64) -> Vec<Value> {
    let mut params: Vec<Value> = (0..count)
        .map(|i| json!({"do": "ok", "value": i}))
        .collect();
    params.push(json!({"do": "sleep", "ms": ms}));
    params.extend((0..count).map(|i| json!({"do": "ok", "value": i})));
    params
}

/// The runner's own CPU time, from /proc.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / ticks
}

#[test]
fn a_long_task_behind_tiny_ones_leaves_the_supervisor_idle() {
    let work = work_dir_with(&["faulty"]);
    let (command, _) = faulty_command(work.path(), &tiny_slow_tiny(300, 4000), &["-j", "1"]);
    let background = Background::start(command);
    std::thread::sleep(Duration::from_millis(1500));
    let before = cpu_seconds(background.pid());
    std::thread::sleep(Duration::from_millis(1500));
    let used = cpu_seconds(background.pid()) - before;
    let run = background.wait(Duration::from_secs(20));
    check!(run, run.code() == Some(0));
    check!(
        run,
        used < 0.1,
        "the supervisor spent {used:.2} s of CPU waiting"
    );
}

#[test]
fn a_timeout_is_not_charged_to_the_task_after_a_held_answer() {
    let work = work_dir_with(&["faulty"]);
    let mut params: Vec<Value> = (0..300).map(|i| json!({"do": "ok", "value": i})).collect();
    params.push(json!({"do": "sleep", "ms": 700}));
    params.push(json!({"do": "sleep", "ms": 700}));
    params.extend((0..300).map(|i| json!({"do": "ok", "value": i})));
    let args = ["-j", "1", "--timeout", "1s", "--retries", "0"];
    let (command, results) = faulty_command(work.path(), &params, &args);
    let run = crate::util::run(command, Duration::from_secs(30));
    check!(
        run,
        run.code() == Some(0),
        "a task was charged a timeout it did not run into"
    );
    check!(run, read_results(&results).len() == 602);
}

#[test]
fn answers_settled_during_a_long_task_reach_the_file_before_a_kill() {
    let work = work_dir_with(&["faulty"]);
    let (command, results) =
        faulty_command(work.path(), &tiny_slow_tiny(300, 20_000), &["-j", "1"]);
    let background = Background::start(command);
    std::thread::sleep(Duration::from_millis(1500));
    background.signal(libc::SIGKILL);
    let run = background.wait(Duration::from_secs(10));
    check!(run, run.status.code().is_none());
    let records = by_index(&read_results(&results));
    check!(
        run,
        records.len() == 300,
        "{} of 300 finished tasks recorded",
        records.len()
    );
}

#[test]
fn tasks_sent_ahead_of_a_slow_one_are_taken_back_for_idle_workers() {
    let work = work_dir_with(&["faulty"]);
    let mut params: Vec<Value> = (0..40).map(|i| json!({"do": "ok", "value": i})).collect();
    params.extend((0..64).map(|_| json!({"do": "sleep", "ms": 200})));
    let (command, results) = faulty_command(work.path(), &params, &["-j", "8"]);
    let run = crate::util::run(command, Duration::from_secs(30));
    check!(run, run.code() == Some(0));
    check!(run, read_results(&results).len() == 104);
    // 12.8 s of sleeps on one worker; 1.6 s on eight.
    check!(
        run,
        run.elapsed < Duration::from_secs(4),
        "took {:?}",
        run.elapsed
    );
    check!(
        run,
        records_attempts_all_one(&results),
        "a taken-back task was charged"
    );
}

fn records_attempts_all_one(results: &std::path::Path) -> bool {
    read_results(results).iter().all(|r| r["attempts"] == 1)
}

#[test]
fn a_worker_whose_teardown_hangs_is_killed_after_the_last_task() {
    let work = work_dir_with(&["faulty"]);
    let params: Vec<Value> = (0..10).map(|i| json!({"do": "ok", "value": i})).collect();
    let (mut command, results) = faulty_command(work.path(), &params, &["--timeout", "1s"]);
    command.env("FAULTY_TEARDOWN", "hang");
    let run = crate::util::run(command, Duration::from_secs(30));
    check!(run, run.code() == Some(0));
    check!(
        run,
        run.elapsed < Duration::from_secs(8),
        "took {:?}",
        run.elapsed
    );
    check!(run, read_results(&results).len() == 10);
    check!(
        run,
        run.stderr
            .contains("closed worker did not exit in time; killing it")
    );
    run.assert_no_leftovers();
}

#[test]
fn without_a_timeout_a_hanging_teardown_is_killed_after_ten_seconds() {
    let work = work_dir_with(&["faulty"]);
    let params: Vec<Value> = (0..3).map(|i| json!({"do": "ok", "value": i})).collect();
    let (mut command, results) = faulty_command(work.path(), &params, &["-j", "1"]);
    command.env("FAULTY_TEARDOWN", "hang");
    let run = crate::util::run(command, Duration::from_secs(40));
    check!(run, run.code() == Some(0));
    check!(
        run,
        run.elapsed >= Duration::from_secs(9),
        "killed early: {:?}",
        run.elapsed
    );
    check!(
        run,
        run.elapsed < Duration::from_secs(20),
        "took {:?}",
        run.elapsed
    );
    check!(run, read_results(&results).len() == 3);
    run.assert_no_leftovers();
}

#[test]
fn a_hard_link_to_the_params_file_is_no_results_file() {
    let work = work_dir_with(&["test"]);
    let params = write_lines(work.path(), "params.jsonl", &[json!(1), json!(2)]);
    let link = work.path().join("results.jsonl");
    std::fs::hard_link(&params, &link).unwrap();
    let mut command = runner();
    command
        .args(["--task", "test", "--params"])
        .arg(&params)
        .arg("--results")
        .arg(&link)
        .arg("--work-dir")
        .arg(work.path());
    let run = crate::util::run(command, Duration::from_secs(20));
    check!(run, run.code() == Some(2));
    check!(run, run.stderr.contains("is the params file"));
    check!(run, std::fs::read_to_string(&params).unwrap() == "1\n2\n");
}
