//! The `shoal` CLI writing into a pipe whose reader has gone
//! (`shoal topic describe X | head -0`): every command that prints ends
//! quietly with success instead of panicking on the broken pipe.
//!
//! The CLI is the `shoal` binary built from core (or `$SHOAL_BIN`), which
//! also serves as the broker.

use shoal_client::{Client, NewTopic, Producer, ProducerConfig};
use shoal_tests::{shoal_bin, Broker};
use std::process::{Command, Stdio};

/// Runs the CLI with stdout a pipe already closed at the read end, so its
/// first write fails with EPIPE whatever the timing.
fn run_into_closed_pipe(broker: &Broker, args: &[&str]) -> (std::process::ExitStatus, String) {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let out = Command::new(shoal_bin())
        .arg("--broker")
        .arg(broker.addr())
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run the CLI");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_printing_command_exits_quietly_on_a_closed_pipe() {
    let broker = Broker::start("0");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = Client::connect(&broker.addr()).await.expect("connect");
        client
            .create_topic(&NewTopic::new("piped", 4))
            .await
            .expect("create");
        let p = Producer::new(client, ProducerConfig::default());
        for i in 0..100u32 {
            p.send("piped", None, format!("line {i}").as_bytes())
                .await
                .expect("produce");
        }
    });
    let commands: [&[&str]; 5] = [
        &["topic", "list"],
        &["topic", "describe", "piped"],
        &["topic", "create", "piped-2", "--partitions", "1"],
        &["metrics"],
        &["consume", "piped", "--from-beginning"],
    ];
    for args in commands {
        let (status, stderr) = run_into_closed_pipe(&broker, args);
        assert!(
            status.success(),
            "shoal {args:?} exited with {status}: {stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "shoal {args:?} panicked: {stderr}"
        );
    }
}
