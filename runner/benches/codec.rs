//! Micro-benchmarks of the hot paths: the frame codec on both sides and
//! the params reader. `cargo bench -p runner --bench codec`.

use std::hint::black_box;

use runner::params::ParamsSource;
use runner::protocol::{self, FrameAssembler, TaskFrame, WorkerMessage};

fn main() {
    divan::main();
}

/// A batch of 64 task frames, as the supervisor sends tiny tasks.
#[divan::bench]
fn encode_64_tasks(bencher: divan::Bencher) {
    let mut out = Vec::with_capacity(64 * 32);
    bencher.bench_local(|| {
        out.clear();
        for i in 0..64u64 {
            protocol::encode_task(
                &mut out,
                &TaskFrame {
                    id: i,
                    index: i,
                    params: b"12345",
                },
            );
        }
        black_box(&out);
    });
}

/// Cutting and decoding 64 done frames, as the supervisor reads a batch.
#[divan::bench]
fn decode_64_answers(bencher: divan::Bencher) {
    let mut stream = Vec::new();
    for i in 0..64u64 {
        protocol::encode_done(&mut stream, i, 0, 100, b"null");
    }
    bencher.bench_local(|| {
        let mut frames = FrameAssembler::new();
        frames.buffer().extend_from_slice(&stream);
        let mut count = 0;
        while let Ok(Some(body)) = frames.next_frame() {
            if let Ok(WorkerMessage::Done(done)) = protocol::decode_worker_message(body) {
                count += done.id;
            }
        }
        black_box(count);
    });
}

/// Decoding one task frame, as a worker does per task.
#[divan::bench]
fn decode_task(bencher: divan::Bencher) {
    let mut frame = Vec::new();
    protocol::encode_task(
        &mut frame,
        &TaskFrame {
            id: 7,
            index: 7,
            params: b"{\"path\":\"/usr/share/doc/README\"}",
        },
    );
    let body = frame[4..].to_vec();
    bencher.bench_local(|| black_box(protocol::decode_task(black_box(&body))));
}

/// Reading and checking 10,000 JSON Lines of params.
#[divan::bench]
fn read_10k_json_lines(bencher: divan::Bencher) {
    let dir = std::env::temp_dir().join(format!("runner-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("params.jsonl");
    let text: String = (0..10_000)
        .map(|i| format!("{{\"file\":\"/data/{i}.bin\",\"size\":{i}}}\n"))
        .collect();
    std::fs::write(&path, text).unwrap();
    let source = ParamsSource::from_path(&path);
    bencher.bench_local(|| {
        let mut count = 0u64;
        source
            .stream(|task| {
                count += task.json.len() as u64;
                true
            })
            .unwrap();
        black_box(count)
    });
}

/// Generating 10,000 tasks of a range.
#[divan::bench]
fn read_10k_range(bencher: divan::Bencher) {
    let source = ParamsSource::Range {
        start: 0,
        end: 10_000,
    };
    bencher.bench_local(|| {
        let mut count = 0u64;
        source
            .stream(|task| {
                count += task.index;
                true
            })
            .unwrap();
        black_box(count)
    });
}
