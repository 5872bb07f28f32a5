//! The process pool's usage example, written against `runner`'s library:
//! 5000 tasks of the `test` plugin on 50 workers, each task with a
//! one-element array as its params, results taken as they end.
//!
//! Run it from the repository's root with `cargo run --example embed`, or
//! give another work dir as the first argument.

use std::time::Duration;

fn main() -> anyhow::Result<()> {
    // Workers are this program, re-executed: let such a copy serve first.
    runner::worker::run_if_worker();

    let work_dir = std::env::args().nth(1).unwrap_or_else(|| "plugins".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut pool = runner::Pool::builder("test")
            .work_dir(work_dir)
            .max_parallel(50)
            .timeout(Duration::from_secs(60))
            .start()?;

        for i in 0..5000u64 {
            pool.submit(&[i]).await?;
        }
        pool.close();

        let mut ok = 0;
        while let Some(record) = pool.next_result().await {
            let output: Vec<u64> = record.output_json().ok_or_else(|| {
                anyhow::anyhow!("task {} failed: {:?}", record.index, record.outcome)
            })??;
            anyhow::ensure!(
                output == [record.index],
                "task {} returned {output:?}",
                record.index
            );
            ok += 1;
        }
        let summary = pool.finish().await?;
        // Workers start as work waits for them, up to the 50 allowed.
        eprintln!(
            "{ok} results, {} ok, {} failed; {} workers started, at most 50",
            summary.ok, summary.failed, summary.workers_started
        );
        Ok(())
    })
}
