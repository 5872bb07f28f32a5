use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::util::{
    by_index, plugins_dir, read_results, run, run_with_input, runner, work_dir_with,
};

#[test]
fn five_thousand_test_tasks_on_four_workers_each_run_once() {
    let out = tempfile::tempdir().unwrap();
    let results = out.path().join("results.jsonl");
    let mut command = runner();
    command
        .args([
            "--task",
            "test",
            "--range",
            "0..5000",
            "-j",
            "4",
            "--results",
        ])
        .arg(&results)
        .arg("--work-dir")
        .arg(plugins_dir());
    let run = run(command, Duration::from_secs(300));

    check!(run, run.code() == Some(0));
    let records = read_results(&results);
    check!(run, records.len() == 5000, "{} records", records.len());
    let records = by_index(&records);
    for i in 0..5000u64 {
        let record = &records[&i];
        assert_eq!(record["status"], "ok", "{record}");
        assert_eq!(record["attempts"], 1, "{record}");
        assert_eq!(record["params"], json!(i), "{record}");
        assert_eq!(record["output"], json!(i), "{record}");
    }

    // The test plugin prints its params on a line: every number once, each
    // line whole.
    let mut printed: Vec<u64> = run
        .stdout
        .lines()
        .map(|l| l.parse().unwrap_or_else(|_| panic!("bad line {l:?}")))
        .collect();
    printed.sort_unstable();
    check!(run, printed == (0..5000).collect::<Vec<_>>());
    check!(
        run,
        run.stderr
            .contains("5000 tasks: 5000 ok, 0 failed, 0 retried")
    );
    run.assert_no_leftovers();
}

#[test]
fn sha256_digests_every_file_and_names_a_missing_one() {
    let data = tempfile::tempdir().unwrap();
    let mut params = Vec::new();
    let mut expected = Vec::new();
    for i in 0..40usize {
        let path = data.path().join(format!("file-{i}.bin"));
        let contents: Vec<u8> = (0..i * 997).map(|b| (b * 31 + i) as u8).collect();
        std::fs::write(&path, &contents).unwrap();
        params.push(json!(path));
        expected.push((format!("{:x}", Sha256::digest(&contents)), contents.len()));
    }
    let missing = data.path().join("not-there");
    params.push(json!(missing));

    let work = work_dir_with(&["sha256"]);
    let results = data.path().join("results.jsonl");
    let mut command = runner();
    command
        .args(["--task", "sha256", "--params", "-", "-j", "3", "--results"])
        .arg(&results)
        .arg("--work-dir")
        .arg(work.path());
    let input: String = params.iter().map(|p| format!("{p}\n")).collect();
    let run = run_with_input(command, Some(input.into_bytes()), Duration::from_secs(60));

    check!(run, run.code() == Some(1));
    let records = by_index(&read_results(&results));
    check!(run, records.len() == 41);
    for (i, (digest, size)) in expected.iter().enumerate() {
        let record = &records[&(i as u64)];
        assert_eq!(record["status"], "ok", "{record}");
        assert_eq!(record["output"]["sha256"], json!(digest), "{record}");
        assert_eq!(record["output"]["bytes"], json!(size), "{record}");
    }
    let failed = &records[&40];
    assert_eq!(failed["status"], "failed");
    assert_eq!(
        failed["attempts"], 1,
        "a missing file is permanent: {failed}"
    );
    assert_eq!(failed["error"]["kind"], "permanent");
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("`{}`", missing.display())),
        "{message}"
    );
    run.assert_no_leftovers();
}

#[test]
fn a_json_array_file_gives_one_task_per_element() {
    let work = work_dir_with(&["test"]);
    let dir = tempfile::tempdir().unwrap();
    let params = dir.path().join("params.json");
    std::fs::write(
        &params,
        "[\n  [1, 2],\n  {\"a\": [3,\n 4]},\n  \"five\"\n]\n",
    )
    .unwrap();
    let results = dir.path().join("results.jsonl");
    let mut command = runner();
    command
        .args(["--task", "test", "--results"])
        .arg(&results)
        .arg("--params")
        .arg(&params)
        .arg("--work-dir")
        .arg(work.path());
    let run = run(command, Duration::from_secs(30));

    check!(run, run.code() == Some(0));
    let records = by_index(&read_results(&results));
    let outputs: Vec<&Value> = records.values().map(|r| &r["output"]).collect();
    assert_eq!(
        outputs,
        [&json!([1, 2]), &json!({"a": [3, 4]}), &json!("five")]
    );
}

#[test]
fn cargo_run_in_the_workspace_runs_the_runner() {
    // The README's first command is `cargo run --release -p runner -- ...`;
    // with two binaries in the package, cargo must know which one.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command
        .args(["run", "-q", "-p", "runner", "--", "--version"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    let run = run(command, Duration::from_secs(300));
    check!(run, run.code() == Some(0));
    check!(
        run,
        run.stdout.trim() == concat!("runner ", env!("CARGO_PKG_VERSION"))
    );
}
