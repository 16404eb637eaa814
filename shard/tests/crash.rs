//! Crash test: a child process appends with `always` and reports every
//! acknowledged batch; the parent kills it with SIGKILL at random moments,
//! reopens the log and proves every acknowledged batch is there and intact,
//! and that nothing past the valid tail is readable.

mod common;
use common::*;
use rand::Rng;
use shoal_shard::{LogConfig, PartitionLog, SyncMode};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ENV_DIR: &str = "SHOAL_CRASH_CHILD_DIR";
const ROUNDS: usize = 24;

fn config() -> LogConfig {
    LogConfig {
        sync: SyncMode::Always,
        segment_bytes: 256 * 1024,
        test_segments: true,
        batch_bytes_max: 64 * 1024,
        write_buffer_bytes: 1024 * 1024,
        ..LogConfig::default()
    }
}

/// The child: appends forever from four concurrent appenders, printing
/// `ack <base> <tag> <records> <size>` after each acknowledgement.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return;
    };
    run(move || async move {
        let log = std::rc::Rc::new(PartitionLog::open(&dir, config()).await.unwrap());
        let mut tasks = Vec::new();
        for w in 0..4u64 {
            let log = log.clone();
            tasks.push(glommio::spawn_local(async move {
                let mut rng = rand::thread_rng();
                for i in 0u64.. {
                    let tag = (std::process::id() as u64) << 32 | w << 24 | i;
                    let (n, size) = (rng.gen_range(1..8u32), rng.gen_range(10..3000usize));
                    let a = log
                        .append_acked(&batch(tag, n, size, i as i64))
                        .await
                        .unwrap();
                    println!("ack {} {tag} {n} {size}", a.base_offset);
                }
            }));
        }
        for t in tasks {
            t.await;
        }
    });
}

#[test]
fn kill_9_loses_no_acknowledged_batch() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::thread_rng();
    let mut acked: BTreeMap<u64, (u64, u32, usize)> = BTreeMap::new();
    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(ENV_DIR, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("ack ") {
                    let f: Vec<u64> = rest.split(' ').map(|x| x.parse().unwrap()).collect();
                    lines.push((f[0], (f[1], f[2] as u32, f[3] as usize)));
                }
            }
            lines
        });
        let wait = Duration::from_millis(rng.gen_range(50..400));
        let t0 = Instant::now();
        while t0.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        acked.extend(lines);

        let acked_now = acked.clone();
        let path = dir.path().to_path_buf();
        let (next, count) = run(move || async move {
            let log = PartitionLog::open(&path, config()).await.unwrap();
            let next = log.next_offset();
            // Every acknowledged batch is there, intact.
            for (&base, &(tag, n, size)) in &acked_now {
                assert!(
                    base + u64::from(n) <= next,
                    "round {round}: acked batch at {base} lost (log ends at {next})"
                );
                let s = log.read(base, 1).unwrap();
                assert_eq!(s.first_offset, base);
                let recs = records(s.bytes());
                assert_eq!(recs.len() as u32, n);
                for (i, (o, v)) in recs.into_iter().enumerate() {
                    assert_eq!(o, base + i as u64);
                    assert_eq!(
                        v,
                        value(tag, i as u32, size),
                        "round {round}: offset {o} corrupt"
                    );
                }
            }
            // Everything readable is whole, valid batches up to the end.
            let mut at = log.start_offset();
            let mut count = 0u64;
            while at < next {
                let s = log.read(at, 1 << 20).unwrap();
                let recs = records(s.bytes());
                assert!(!recs.is_empty());
                count += recs.len() as u64;
                at = s.next_offset;
            }
            assert_eq!(at, next);
            assert!(log.read(next + 1, 1).is_err());
            log.crash_stop().await;
            (next, count)
        });
        assert_eq!(count, next);
        eprintln!(
            "round {round}: {} acked batches, log ends at {next}",
            acked.len()
        );
    }
    assert!(acked.len() > ROUNDS, "the child acknowledged batches");
}
