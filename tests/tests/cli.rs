//! The `shoal` CLI against a real broker: topic commands, produce from
//! stdin, consume to stdout.

use shoal_tests::{shoal_bin, two_shards, Broker};
use std::io::Write;
use std::process::{Command, Stdio};

fn shoal(b: &Broker, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(shoal_bin())
        .arg("--broker")
        .arg(b.addr())
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn topic_produce_consume_commands() {
    let broker = Broker::start(two_shards());
    let (ok, out, err) = shoal(
        &broker,
        &[
            "topic",
            "create",
            "logs",
            "--partitions",
            "3",
            "--sync",
            "always",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(out.contains("created topic logs"));
    let (ok, out, _) = shoal(&broker, &["topic", "list"], None);
    assert!(
        ok && out.contains("logs\tpartitions=3\tsync=always"),
        "{out}"
    );
    let (ok, out, _) = shoal(&broker, &["topic", "describe", "logs"], None);
    assert!(ok && out.matches("partition ").count() == 3, "{out}");

    let lines: Vec<String> = (0..50).map(|i| format!("line {i}")).collect();
    let (ok, _, err) = shoal(
        &broker,
        &["produce", "logs"],
        Some(&(lines.join("\n") + "\n")),
    );
    assert!(ok, "{err}");
    assert!(err.contains("50 messages acknowledged"), "{err}");
    let (ok, out, err) = shoal(&broker, &["consume", "logs", "--from-beginning"], None);
    assert!(ok, "{err}");
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    let mut want: Vec<&str> = lines.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(got, want);
    let (ok, out, _) = shoal(
        &broker,
        &["consume", "logs", "--from-beginning", "--count", "7"],
        None,
    );
    assert!(ok && out.lines().count() == 7);
    // Keyed messages land in one partition, in order.
    let (ok, _, _) = shoal(
        &broker,
        &["produce", "logs", "--key", "k"],
        Some("a\nb\nc\n"),
    );
    assert!(ok);
    let (_, out, _) = shoal(&broker, &["topic", "describe", "logs"], None);
    assert!(out.contains("shard="), "{out}");

    let (ok, _, err) = shoal(&broker, &["topic", "create", "bad/name"], None);
    assert!(!ok && err.contains("InvalidTopicName"), "{err}");
    let (ok, _, err) = shoal(&broker, &["consume", "missing"], None);
    assert!(!ok && err.contains("unknown topic"), "{err}");
    let (ok, out, _) = shoal(&broker, &["topic", "delete", "logs"], None);
    assert!(ok && out.contains("deleted topic logs"));
    let (_, out, _) = shoal(&broker, &["topic", "list"], None);
    assert!(out.trim().is_empty(), "{out}");
}

/// The quick start's way: a data directory relative to where the broker
/// runs. Topics can be created, written, read, and survive a restart.
#[test]
fn relative_data_dir_works() {
    let mut broker = Broker::start_relative(two_shards());
    let (ok, _, err) = shoal(
        &broker,
        &["topic", "create", "rel", "--partitions", "2"],
        None,
    );
    assert!(ok, "{err}");
    let (ok, _, err) = shoal(&broker, &["produce", "rel"], Some("one\ntwo\n"));
    assert!(ok, "{err}");
    assert!(broker.terminate(), "{}", broker.log_text());
    assert!(broker.data.path().join("data").join("topics.json").exists());
    broker.restart();
    let (ok, out, err) = shoal(&broker, &["consume", "rel", "--from-beginning"], None);
    assert!(ok, "{err}");
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    assert_eq!(got, ["one", "two"]);
}
