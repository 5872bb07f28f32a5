use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::{
    by_index, processes_in_groups, read_results, run, runner, task_on_file, work_dir_with,
    write_lines,
};

/// Runs 200 faulty tasks, `bad` at index 100 and `ok` with its index as
/// value everywhere else, and checks the 199 good ones.
fn run_one_bad_among_200(bad: Value, retries: u32) -> (crate::util::Run, Value) {
    let work = work_dir_with(&["faulty"]);
    let mut params: Vec<Value> = (0..200).map(|i| json!({"do": "ok", "value": i})).collect();
    params[100] = bad;
    let params = write_lines(work.path(), "params.jsonl", &params);
    let results = work.path().join("results.jsonl");

    let command = task_on_file(
        "faulty",
        work.path(),
        &params,
        &results,
        &["-j", "2", "--retries", &retries.to_string()],
    );
    let run = run(command, Duration::from_secs(60));

    let records = by_index(&read_results(&results));
    check!(run, records.len() == 200, "{} records", records.len());
    for (index, record) in &records {
        if *index == 100 {
            continue;
        }
        check!(
            run,
            record["status"] == "ok" && record["output"] == json!(index),
            "{record}"
        );
        check!(run, record["attempts"] == 1, "{record}");
    }
    check!(run, run.code() == Some(1));
    run.assert_no_leftovers();
    let bad = records[&100].clone();
    check!(run, bad["status"] == "failed", "{bad}");
    (run, bad)
}

fn assert_every_ending(
    run: &crate::util::Run,
    bad: &Value,
    kind: &str,
    needle: &str,
    attempts: u64,
) {
    check!(run, bad["attempts"] == attempts, "{bad}");
    check!(run, bad["error"]["kind"] == kind, "{bad}");
    let endings = bad["endings"].as_array().unwrap();
    check!(run, endings.len() as u64 == attempts, "{bad}");
    for ending in endings {
        check!(run, ending["kind"] == kind, "{bad}");
        let message = ending["message"].as_str().unwrap();
        check!(
            run,
            message.contains(needle),
            "{message:?} lacks {needle:?}"
        );
    }
}

#[test]
fn a_segfault_fails_only_its_own_task() {
    let (run, bad) = run_one_bad_among_200(json!({"do": "segfault"}), 2);
    assert_every_ending(&run, &bad, "crash", "killed by signal 11 (SIGSEGV)", 3);
}

#[test]
fn an_abort_fails_only_its_own_task() {
    let (run, bad) = run_one_bad_among_200(json!({"do": "abort"}), 1);
    assert_every_ending(&run, &bad, "crash", "killed by signal 6 (SIGABRT)", 2);
}

#[test]
fn an_exit_with_code_3_fails_only_its_own_task() {
    let (run, bad) = run_one_bad_among_200(json!({"do": "exit", "code": 3}), 2);
    assert_every_ending(&run, &bad, "crash", "exited with code 3", 3);
}

#[test]
fn a_panic_fails_its_attempts_and_keeps_the_worker() {
    let (run, bad) = run_one_bad_among_200(json!({"do": "panic", "message": "kaboom"}), 2);
    assert_every_ending(&run, &bad, "panic", "kaboom", 3);
    // The message says where, as Rust's own panic message would.
    let message = bad["error"]["message"].as_str().unwrap();
    check!(
        run,
        message.starts_with("panicked at ") && message.contains("faulty/src/lib.rs:")
    );
    check!(run, message.ends_with(": kaboom"), "{message}");
    check!(
        run,
        run.worker_pids().len() == 2,
        "a panic must not cost a worker"
    );
}

#[test]
fn a_task_that_crashes_once_succeeds_on_its_second_attempt() {
    let work = work_dir_with(&["faulty"]);
    let marker = work.path().join("marker");
    let params = write_lines(
        work.path(),
        "p.jsonl",
        &[json!({"do": "segfault", "once": marker, "value": 7})],
    );
    let results = work.path().join("r.jsonl");
    let command = task_on_file("faulty", work.path(), &params, &results, &[]);
    let run = run(command, Duration::from_secs(30));

    check!(run, run.code() == Some(0));
    let records = read_results(&results);
    check!(run, records.len() == 1);
    let record = &records[0];
    check!(
        run,
        record["status"] == "ok" && record["attempts"] == 2,
        "{record}"
    );
    check!(run, record["output"] == 7, "{record}");
    check!(run, record["endings"][0]["kind"] == "crash", "{record}");
    let message = record["endings"][0]["message"].as_str().unwrap();
    check!(run, message.contains("SIGSEGV"), "{message}");
    check!(
        run,
        record["endings"].as_array().unwrap().len() == 1,
        "{record}"
    );
    check!(
        run,
        run.stderr.contains("1 task: 1 ok, 0 failed, 1 retried")
    );
    run.assert_no_leftovers();
}

#[test]
fn a_timeout_kills_the_worker_well_before_the_sleep_ends() {
    let work = work_dir_with(&["faulty"]);
    let params = write_lines(
        work.path(),
        "p.jsonl",
        &[
            json!({"do": "sleep", "ms": 10_000}),
            json!({"do": "ok", "value": 1}),
        ],
    );
    let results = work.path().join("r.jsonl");
    let command = task_on_file(
        "faulty",
        work.path(),
        &params,
        &results,
        &["--timeout", "200ms", "--retries", "0", "-j", "2"],
    );
    let run = run(command, Duration::from_secs(9));

    check!(run, run.code() == Some(1));
    check!(
        run,
        run.elapsed < Duration::from_secs(3),
        "took {:?}",
        run.elapsed
    );
    let records = by_index(&read_results(&results));
    check!(run, records.len() == 2);
    let slow = &records[&0];
    check!(
        run,
        slow["status"] == "failed" && slow["error"]["kind"] == "timeout",
        "{slow}"
    );
    check!(run, slow["attempts"] == 1, "{slow}");
    let message = slow["error"]["message"].as_str().unwrap();
    check!(run, message.contains("200ms"), "{message}");
    check!(run, records[&1]["status"] == "ok");

    // The killed worker's pid is in the message; neither it nor anything in
    // its group may survive.
    let pid: u32 = message
        .split("worker pid ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("the timeout message names the pid");
    check!(run, processes_in_groups(&BTreeSet::from([pid])).is_empty());
    run.assert_no_leftovers();
}

#[test]
fn permanent_errors_and_bad_params_are_not_retried() {
    let work = work_dir_with(&["faulty"]);
    let params = write_lines(
        work.path(),
        "p.jsonl",
        &[
            json!({"do": "permanent", "message": "cannot ever work"}),
            json!({"do": "no-such-action"}),
            json!({"do": "error", "message": "try again"}),
        ],
    );
    let results = work.path().join("r.jsonl");
    let command = task_on_file(
        "faulty",
        work.path(),
        &params,
        &results,
        &["--retries", "3"],
    );
    let run = run(command, Duration::from_secs(30));

    check!(run, run.code() == Some(1));
    let records = by_index(&read_results(&results));
    check!(
        run,
        records[&0]["attempts"] == 1 && records[&0]["error"]["kind"] == "permanent"
    );
    check!(run, records[&0]["error"]["message"] == "cannot ever work");
    check!(
        run,
        records[&1]["attempts"] == 1 && records[&1]["error"]["kind"] == "bad-params"
    );
    let message = records[&1]["error"]["message"].as_str().unwrap();
    check!(run, message.contains("no-such-action"), "{message}");
    check!(
        run,
        records[&2]["attempts"] == 4 && records[&2]["error"]["kind"] == "error"
    );
    run.assert_no_leftovers();
}

#[test]
fn tasks_sent_ahead_of_a_crash_are_neither_lost_nor_run_twice() {
    let work = work_dir_with(&["faulty"]);
    let log = work.path().join("ran.log");
    let marker = work.path().join("crashed");
    let mut params: Vec<Value> = (0..3000)
        .map(|i| json!({"do": "ok", "value": i, "log": log}))
        .collect();
    params[2500] = json!({"do": "segfault", "value": 2500, "log": log, "once": marker});
    let params = write_lines(work.path(), "params.jsonl", &params);
    let results = work.path().join("results.jsonl");
    let mut command = runner();
    command
        .env("RUNNER_LOG", "runner=trace")
        .args(["--task", "faulty", "-j", "2"])
        .arg("--params")
        .arg(&params)
        .arg("--results")
        .arg(&results)
        .arg("--work-dir")
        .arg(work.path());
    let run = run(command, Duration::from_secs(60));

    check!(run, run.code() == Some(0));
    // Tiny tasks go many at a time, so tasks were queued behind the crash.
    let widest = run
        .stderr
        .lines()
        .filter_map(|l| l.split("send window changed window=").nth(1))
        .filter_map(|w| w.split(' ').next()?.parse::<u32>().ok())
        .max()
        .unwrap_or(1);
    check!(run, widest > 8, "the send window never opened: {widest}");

    let records = by_index(&read_results(&results));
    check!(run, records.len() == 3000);
    for (index, record) in &records {
        let attempts = if *index == 2500 { 2 } else { 1 };
        check!(
            run,
            record["status"] == "ok" && record["attempts"] == attempts,
            "{record}"
        );
    }
    let mut counts = std::collections::BTreeMap::new();
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        *counts.entry(line.parse::<u64>().unwrap()).or_insert(0) += 1;
    }
    check!(run, counts.len() == 3000);
    for (index, count) in counts {
        let expected = if index == 2500 { 2 } else { 1 };
        check!(run, count == expected, "task {index} ran {count} times");
    }
    run.assert_no_leftovers();
}
