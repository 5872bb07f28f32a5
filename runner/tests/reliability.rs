use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::{
    Background, by_index, count_lines, faulty_command, processes_in_groups, read_results, run,
    runner, work_dir_with,
};

fn ending_message(record: &Value) -> &str {
    record["error"]["message"].as_str().unwrap_or_default()
}

#[test]
fn a_stack_overflow_is_a_crash_not_a_hang() {
    let work = work_dir_with(&["faulty"]);
    let params = [
        json!({"do": "stack-overflow"}),
        json!({"do": "ok", "value": 1}),
    ];
    let (command, results) = faulty_command(work.path(), &params, &["--retries", "1"]);
    let run = run(command, Duration::from_secs(30));

    check!(run, run.code() == Some(1));
    let records = by_index(&read_results(&results));
    let bad = &records[&0];
    check!(
        run,
        bad["error"]["kind"] == "crash" && bad["attempts"] == 2,
        "{bad}"
    );
    let message = ending_message(bad);
    check!(
        run,
        message.contains("SIGABRT") || message.contains("SIGSEGV"),
        "{message}"
    );
    check!(run, records[&1]["status"] == "ok");
    run.assert_no_leftovers();
}

#[test]
fn an_exit_with_code_0_mid_task_is_a_crash() {
    let work = work_dir_with(&["faulty"]);
    let params = [
        json!({"do": "exit", "code": 0}),
        json!({"do": "ok", "value": 1}),
    ];
    let (command, results) = faulty_command(work.path(), &params, &["--retries", "0"]);
    let run = run(command, Duration::from_secs(30));

    check!(run, run.code() == Some(1));
    let records = by_index(&read_results(&results));
    check!(
        run,
        ending_message(&records[&0]).ends_with("exited with code 0")
    );
    check!(run, records[&1]["status"] == "ok");
    run.assert_no_leftovers();
}

#[test]
fn an_endless_loop_is_killed_within_the_timeout_and_retried() {
    let work = work_dir_with(&["faulty"]);
    let params = [json!({"do": "spin"})];
    let args = ["--timeout", "300ms", "--retries", "1"];
    let (command, results) = faulty_command(work.path(), &params, &args);
    let run = run(command, Duration::from_secs(20));

    check!(run, run.code() == Some(1));
    // Two attempts of 300 ms each, each killed within a second.
    check!(
        run,
        run.elapsed < Duration::from_millis(2 * 1300),
        "{:?}",
        run.elapsed
    );
    let record = &read_results(&results)[0];
    check!(
        run,
        record["attempts"] == 2 && record["error"]["kind"] == "timeout",
        "{record}"
    );
    check!(run, record["endings"][0]["kind"] == "timeout", "{record}");
    run.assert_no_leftovers();
}

#[test]
fn unbounded_allocation_under_a_memory_limit_fails_as_out_of_memory() {
    let work = work_dir_with(&["faulty"]);
    let params = [json!({"do": "alloc"}), json!({"do": "ok", "value": 2})];
    let args = ["--memory-limit", "256M", "--retries", "0"];
    let (command, results) = faulty_command(work.path(), &params, &args);
    let run = run(command, Duration::from_secs(60));

    check!(run, run.code() == Some(1));
    let records = by_index(&read_results(&results));
    let bad = &records[&0];
    check!(run, bad["error"]["kind"] == "out-of-memory", "{bad}");
    check!(run, ending_message(bad).contains("256 MiB"), "{bad}");
    check!(run, records[&1]["status"] == "ok");
    run.assert_no_leftovers();
}

#[test]
fn a_child_holding_stdout_open_neither_hangs_the_run_nor_survives_it() {
    let work = work_dir_with(&["faulty"]);
    let params = [
        json!({"do": "orphan", "ms": 30_000, "value": "parent returned"}),
        json!({"do": "ok", "value": 1}),
    ];
    let (command, results) = faulty_command(work.path(), &params, &["-j", "1"]);
    let run = run(command, Duration::from_secs(20));

    check!(run, run.code() == Some(0));
    check!(
        run,
        run.elapsed < Duration::from_secs(5),
        "{:?}",
        run.elapsed
    );
    let records = by_index(&read_results(&results));
    check!(run, records[&0]["output"] == "parent returned");
    run.assert_no_leftovers();
}

#[test]
fn fifty_mebibytes_of_output_and_of_result_arrive_whole() {
    const SIZE: usize = 50 << 20;
    let work = work_dir_with(&["faulty"]);
    let params = [
        json!({"do": "print", "bytes": SIZE}),
        json!({"do": "return", "bytes": SIZE}),
    ];
    let (command, results) = faulty_command(work.path(), &params, &["-j", "2"]);
    let run = run(command, Duration::from_secs(120));

    check!(run, run.code() == Some(0));
    // Every printed line is 63 'x' and a newline.
    check!(
        run,
        run.stdout.len() == SIZE,
        "{} bytes of stdout",
        run.stdout.len()
    );
    check!(
        run,
        run.stdout
            .lines()
            .all(|l| l.len() == 63 && l.bytes().all(|b| b == b'x'))
    );
    let records = by_index(&read_results(&results));
    let output = records[&1]["output"].as_str().unwrap();
    check!(
        run,
        output.len() == SIZE && output.bytes().all(|b| b == b'y')
    );
    run.assert_no_leftovers();
}

#[test]
fn protocol_abuse_loses_the_worker_and_says_so() {
    let work = work_dir_with(&["faulty"]);
    let params = [
        json!({"do": "garbage"}),
        json!({"do": "close-protocol"}),
        json!({"do": "huge-frame"}),
        json!({"do": "ok", "value": 3}),
    ];
    let (command, results) = faulty_command(work.path(), &params, &["--retries", "1", "-j", "2"]);
    let run = run(command, Duration::from_secs(30));

    check!(run, run.code() == Some(1));
    let records = by_index(&read_results(&results));
    for index in [0, 2] {
        let record = &records[&index];
        check!(
            run,
            record["error"]["kind"] == "lost" && record["attempts"] == 2,
            "{record}"
        );
        check!(
            run,
            ending_message(record).contains("broke its protocol socket"),
            "{record}"
        );
    }
    // A task that closes the socket and returns has its result in the
    // worker's reply buffer: it is ok, and its worker is replaced.
    check!(
        run,
        records[&1]["status"] == "ok" && records[&1]["attempts"] == 1
    );
    check!(
        run,
        run.stderr
            .contains("worker lost its protocol socket between tasks; replaced")
    );
    let huge = ending_message(&records[&2]);
    check!(
        run,
        huge.contains("frame of 4294967295 bytes exceeds the limit"),
        "{huge}"
    );
    check!(run, records[&3]["status"] == "ok");
    run.assert_no_leftovers();
}

#[test]
fn a_plugin_that_crashes_while_loading_stops_the_run_with_one_error() {
    let work = work_dir_with(&["load-crash"]);
    let results = work.path().join("r.jsonl");
    let mut command = runner();
    command
        .args([
            "--task",
            "load-crash",
            "--range",
            "0..1000",
            "-j",
            "2",
            "--results",
        ])
        .arg(&results)
        .arg("--work-dir")
        .arg(work.path());
    let run = run(command, Duration::from_secs(30));

    check!(run, run.code() == Some(2));
    check!(
        run,
        run.worker_pids().len() <= 4,
        "it kept spawning: {:?}",
        run.worker_pids()
    );
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    check!(run, errors.len() == 1, "{errors:?}");
    check!(
        run,
        errors[0].contains("kills its worker before it is ready")
    );
    check!(run, errors[0].contains("SIGSEGV"));
    check!(run, read_results(&results).is_empty());
    run.assert_no_leftovers();
}

#[test]
fn a_fork_then_hang_is_ended_by_the_timeout_with_its_child() {
    let work = work_dir_with(&["faulty"]);
    let params = [json!({"do": "fork-hang"})];
    let args = ["--timeout", "300ms", "--retries", "0"];
    let (command, results) = faulty_command(work.path(), &params, &args);
    let run = run(command, Duration::from_secs(20));

    check!(run, run.code() == Some(1));
    check!(
        run,
        run.elapsed < Duration::from_secs(3),
        "{:?}",
        run.elapsed
    );
    check!(run, read_results(&results)[0]["error"]["kind"] == "timeout");
    run.assert_no_leftovers();
}

#[test]
fn a_child_that_escapes_with_setsid_does_not_hang_the_run() {
    let work = work_dir_with(&["faulty"]);
    let pidfile = work.path().join("escaped.pid");
    let params = [json!({"do": "escape", "ms": 60_000, "pidfile": pidfile, "value": 1})];
    let (command, results) = faulty_command(work.path(), &params, &[]);
    let run = run(command, Duration::from_secs(20));

    // What cannot be caught: the escaped process outlives the run. It must
    // not hold the run up, though. It is ended here by the pid it wrote.
    let escaped: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: the pid was written by the process this test caused to start.
    unsafe {
        libc::kill(escaped, libc::SIGKILL);
    }
    check!(run, run.code() == Some(0));
    check!(
        run,
        run.elapsed < Duration::from_secs(5),
        "{:?}",
        run.elapsed
    );
    check!(run, read_results(&results)[0]["output"] == 1);
    run.assert_no_leftovers();
}

/// Params for slow tasks that each return their index.
fn sleepers(count: usize, ms: u64) -> Vec<Value> {
    (0..count)
        .map(|i| json!({"do": "sleep", "ms": ms, "value": i}))
        .collect()
}

#[test]
fn sigterm_kills_running_tasks_after_the_grace_period_and_keeps_the_finished() {
    let work = work_dir_with(&["faulty"]);
    let mut params = vec![
        json!({"do": "ok", "value": 0}),
        json!({"do": "ok", "value": 1}),
    ];
    params.extend((0..4).map(|_| json!({"do": "sleep", "ms": 30_000})));
    let args = ["-j", "2", "--grace", "300ms"];
    let (command, results) = faulty_command(work.path(), &params, &args);
    let background = Background::start(command);
    background.wait_until(Duration::from_secs(20), "two records", || {
        count_lines(&results) == 2
    });
    std::thread::sleep(Duration::from_millis(100));
    background.signal(libc::SIGTERM);
    let run = background.wait(Duration::from_secs(10));

    check!(run, run.code() == Some(143));
    check!(run, run.elapsed < Duration::from_secs(8));
    let records = by_index(&read_results(&results));
    check!(run, records.keys().copied().collect::<Vec<_>>() == [0, 1]);
    check!(run, run.stderr.contains("interrupted by SIGTERM"));
    run.assert_no_leftovers();
}

#[test]
fn sigint_lets_running_tasks_finish_within_the_grace_period() {
    let work = work_dir_with(&["faulty"]);
    let params = sleepers(4, 1500);
    let args = ["-j", "2", "--grace", "20s"];
    let (command, results) = faulty_command(work.path(), &params, &args);
    let background = Background::start(command);
    background.wait_until(Duration::from_secs(20), "two workers ready", || {
        background.stderr_so_far().matches("worker ready").count() == 2
    });
    std::thread::sleep(Duration::from_millis(300));
    background.signal(libc::SIGINT);
    let run = background.wait(Duration::from_secs(20));

    check!(run, run.code() == Some(130));
    let records = by_index(&read_results(&results));
    // The two running tasks finished and were recorded; the two queued ones
    // never started.
    check!(
        run,
        records.keys().copied().collect::<Vec<_>>() == [0, 1],
        "{records:?}"
    );
    check!(run, records.values().all(|r| r["status"] == "ok"));
    check!(
        run,
        run.elapsed < Duration::from_secs(6),
        "{:?}",
        run.elapsed
    );
    run.assert_no_leftovers();
}

#[test]
fn a_second_signal_kills_at_once() {
    let work = work_dir_with(&["faulty"]);
    let params = sleepers(2, 30_000);
    let args = ["-j", "2", "--grace", "60s"];
    let (command, results) = faulty_command(work.path(), &params, &args);
    let background = Background::start(command);
    background.wait_until(Duration::from_secs(20), "two workers ready", || {
        background.stderr_so_far().matches("worker ready").count() == 2
    });
    background.signal(libc::SIGINT);
    std::thread::sleep(Duration::from_millis(300));
    background.signal(libc::SIGINT);
    let run = background.wait(Duration::from_secs(10));

    check!(run, run.code() == Some(130));
    check!(
        run,
        run.elapsed < Duration::from_secs(5),
        "{:?}",
        run.elapsed
    );
    check!(run, read_results(&results).is_empty());
    run.assert_no_leftovers();
}

#[test]
fn sigkill_of_the_runner_takes_its_workers_and_resume_finishes_the_rest() {
    let work = work_dir_with(&["faulty"]);
    let params = sleepers(120, 25);
    let (command, results) = faulty_command(work.path(), &params, &["-j", "2"]);
    let background = Background::start(command);
    background.wait_until(Duration::from_secs(20), "some records", || {
        count_lines(&results) >= 20
    });
    background.signal(libc::SIGKILL);
    let killed = background.wait(Duration::from_secs(5));
    check!(killed, killed.status.code().is_none());

    // The death signal reaches every worker at once.
    let groups: BTreeSet<u32> = killed.worker_pids().into_iter().collect();
    check!(killed, !groups.is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !processes_in_groups(&groups).is_empty() {
        check!(
            killed,
            std::time::Instant::now() < deadline,
            "workers outlived the runner"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let first = read_results(&results);

    let (mut command, _) = faulty_command(work.path(), &params, &["-j", "2"]);
    command.arg("--resume");
    let resumed = run(command, Duration::from_secs(30));
    check!(resumed, resumed.code() == Some(0));
    let all = read_results(&results);
    check!(resumed, all.len() == 120, "{} records in all", all.len());
    let records = by_index(&all);
    for (index, record) in &records {
        check!(
            resumed,
            record["status"] == "ok" && record["output"] == json!(index)
        );
    }
    let skipped = format!("{} tasks skipped", first.len());
    check!(
        resumed,
        resumed.stderr.contains(&skipped),
        "expected {skipped:?}"
    );
    resumed.assert_no_leftovers();
}

#[test]
fn a_plugin_overwritten_mid_run_changes_nothing_for_the_run() {
    let work = work_dir_with(&["faulty", "test"]);
    let marker_dir = tempfile::tempdir().unwrap();
    let mut params = sleepers(60, 30);
    // Late tasks kill their worker once, so fresh workers load the plugin
    // after it was replaced on disk.
    for (i, param) in params.iter_mut().enumerate().skip(40).take(6) {
        *param = json!({"do": "exit", "code": 1, "once": marker_dir.path().join(i.to_string()), "value": i});
    }
    let (command, results) = faulty_command(work.path(), &params, &["-j", "2"]);
    let background = Background::start(command);
    background.wait_until(Duration::from_secs(20), "a few records", || {
        count_lines(&results) >= 6
    });
    // `cp new.so libfaulty.so`: the same file, rewritten in place.
    let replacement = std::fs::read(work.path().join("libtest.so")).unwrap();
    std::fs::write(work.path().join("libfaulty.so"), replacement).unwrap();
    let run = background.wait(Duration::from_secs(30));

    check!(run, run.code() == Some(0));
    let records = by_index(&read_results(&results));
    check!(run, records.len() == 60);
    for (index, record) in &records {
        // The test plugin would return the params object itself.
        check!(run, record["output"] == json!(index), "{record}");
    }
    check!(
        run,
        run.worker_pids().len() >= 8,
        "workers were replaced after the overwrite"
    );
    run.assert_no_leftovers();
}

#[test]
fn resume_accepts_a_half_written_last_line() {
    let work = work_dir_with(&["test"]);
    let results = work.path().join("r.jsonl");
    std::fs::write(
        &results,
        "{\"index\":0,\"status\":\"ok\",\"attempts\":1,\"duration_ms\":0.1,\"params\":0,\"output\":0}\n\
         {\"index\":1,\"status\":\"ok\",\"attempts\":1,\"duration_ms\":0.1,\"params\":1,\"output\":1}\n\
         {\"index\":2,\"status\":\"ok\",\"attem",
    )
    .unwrap();
    let mut command = runner();
    command
        .args(["--task", "test", "--range", "0..5", "--resume", "--results"])
        .arg(&results)
        .arg("--work-dir")
        .arg(work.path());
    let run = run(command, Duration::from_secs(30));

    check!(run, run.code() == Some(0));
    let records = by_index(&read_results(&results));
    check!(
        run,
        records.keys().copied().collect::<Vec<_>>() == [0, 1, 2, 3, 4]
    );
    let mut printed: Vec<&str> = run.stdout.lines().collect();
    printed.sort_unstable();
    check!(
        run,
        printed == ["2", "3", "4"],
        "only the unfinished tasks ran"
    );
}

#[test]
fn a_full_disk_stops_the_run_at_the_first_failed_write() {
    let work = work_dir_with(&["test"]);
    let mut command = runner();
    command
        .args([
            "--task",
            "test",
            "--range",
            "0..100000",
            "--results",
            "/dev/full",
            "--work-dir",
        ])
        .arg(work.path());
    let run = run(command, Duration::from_secs(30));

    check!(run, run.code() == Some(2));
    check!(
        run,
        run.stderr
            .contains("error: cannot write results: No space left on device")
    );
    check!(
        run,
        !run.stderr.contains("100000 tasks: 100000 ok"),
        "the run went on"
    );
    run.assert_no_leftovers();
}

#[test]
fn an_unwritable_results_path_is_an_error_before_any_task() {
    let work = work_dir_with(&["test"]);
    let results = work.path().join("no-such-dir/r.jsonl");
    let mut command = runner();
    command
        .args(["--task", "test", "--range", "0..10", "--results"])
        .arg(&results)
        .arg("--work-dir")
        .arg(work.path());
    let run = run(command, Duration::from_secs(30));

    check!(run, run.code() == Some(2));
    let expected = format!("error: cannot create results file `{}`", results.display());
    check!(run, run.stderr.contains(&expected));
    check!(run, run.stdout.is_empty() && run.worker_pids().is_empty());
}
