//! Many topics (issue 9 #1): with 2,000 topics of 4 partitions the
//! metadata response runs far past the 64 KiB a request header may take;
//! every CLI command still works against the real broker.

use shoal_client::{Client, NewTopic};
use shoal_tests::{shoal_bin, Broker};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

fn cli(broker: &Broker, args: &[&str], stdin: &[u8]) -> String {
    let mut child = Command::new(shoal_bin())
        .arg("--broker")
        .arg(broker.addr())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the shoal CLI");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "shoal {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cli_command_works_with_2000_topics() {
    let topics: usize = std::env::var("SHOAL_TEST_MANY_TOPICS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let broker = Broker::start(shoal_tests::two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    let started = Instant::now();
    let mut pending = Vec::new();
    for i in 0..topics {
        let client = client.clone();
        pending.push(tokio::spawn(async move {
            let mut t = NewTopic::new(format!("topic-with-a-longish-name-{i:05}"), 4);
            t.segment_bytes = Some(1 << 20);
            client.create_topic(&t).await
        }));
        if pending.len() >= 32 {
            for p in pending.drain(..) {
                p.await.unwrap().unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap().unwrap();
    }
    println!(
        "created {topics} topics x 4 partitions in {:?}",
        started.elapsed()
    );

    // A fresh client (metadata for every topic on connect) and every command.
    let fresh = Client::connect(&broker.addr()).await.unwrap();
    assert_eq!(fresh.list_topics().await.unwrap().len(), topics);
    let list = cli(&broker, &["topic", "list"], b"");
    assert_eq!(list.lines().count(), topics);
    let last = format!("topic-with-a-longish-name-{:05}", topics - 1);
    cli(&broker, &["produce", &last], b"one\ntwo\nthree\n");
    let describe = cli(&broker, &["topic", "describe", &last], b"");
    assert!(describe.contains("partitions=4"), "{describe}");
    let consumed = cli(&broker, &["consume", &last, "--from-beginning"], b"");
    let mut lines: Vec<&str> = consumed.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, vec!["one", "three", "two"]);
    cli(
        &broker,
        &["topic", "create", "one-more", "--partitions", "4"],
        b"",
    );
    cli(
        &broker,
        &["topic", "delete", "topic-with-a-longish-name-00000"],
        b"",
    );
    let metrics = cli(&broker, &["metrics"], b"");
    assert!(metrics.contains("produce_requests"));
    let list = cli(&broker, &["topic", "list"], b"");
    assert_eq!(list.lines().count(), topics);
    assert!(list.contains("one-more"));
}
