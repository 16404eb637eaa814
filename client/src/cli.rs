//! The client commands of the `shoal` binary (L4): `shoal topic ...`,
//! `produce`, `consume`, `metrics`. They live with the client they are
//! built on; the binary in `shoal-core` only parses flags and calls them,
//! each on a small current-thread tokio runtime of its own.
//!
//! Output goes through [`Out`], never `println!`: a reader that goes away
//! early (`shoal topic list | head -1`) closes the pipe, and the command
//! then stops quietly with success, as `cat` or `grep` would, instead of
//! panicking on the failed write.

use crate::{
    Acks, Client, Consumer, ConsumerConfig, NewTopic, Producer, ProducerConfig, StartAt, TopicInfo,
};
use std::io::{BufRead, Write};
use std::time::Duration;

/// Why a command stopped before its end.
#[derive(Debug)]
enum Stop {
    /// Whoever read the output has gone: not a failure of the command.
    OutputClosed,
    Failed(String),
}

impl From<String> for Stop {
    fn from(m: String) -> Stop {
        Stop::Failed(m)
    }
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Stop {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Stop::OutputClosed
        } else {
            Stop::Failed(format!("cannot write the output: {e}"))
        }
    }
}

/// What a command reports to the binary: a closed output is success.
fn finish(r: Result<(), Stop>) -> Result<(), String> {
    match r {
        Ok(()) | Err(Stop::OutputClosed) => Ok(()),
        Err(Stop::Failed(m)) => Err(m),
    }
}

/// A command's output stream. Every write reports a closed pipe as
/// [`Stop::OutputClosed`], so `?` ends the command quietly.
struct Out<W: Write>(W);

impl<W: Write> Out<W> {
    fn line(&mut self, args: std::fmt::Arguments<'_>) -> Result<(), Stop> {
        self.0.write_fmt(args)?;
        self.0.write_all(b"\n")?;
        Ok(())
    }

    fn bytes(&mut self, b: &[u8]) -> Result<(), Stop> {
        Ok(self.0.write_all(b)?)
    }

    fn flush(&mut self) -> Result<(), Stop> {
        Ok(self.0.flush()?)
    }
}

fn stdout() -> Out<std::io::StdoutLock<'static>> {
    Out(std::io::stdout().lock())
}

fn rt() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

async fn connect(broker: &str) -> Result<Client, String> {
    Client::connect(broker)
        .await
        .map_err(|e| format!("cannot reach the broker at {broker}: {e}"))
}

fn fmt_opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

pub fn topic_create(broker: &str, t: NewTopic) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(broker).await?;
        c.create_topic(&t).await.map_err(|e| e.to_string())?;
        let mut out = stdout();
        out.line(format_args!(
            "created topic {} with {} partitions",
            t.name, t.partitions
        ))?;
        out.flush()
    }))
}

pub fn topic_list(broker: &str) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(broker).await?;
        let topics = c.list_topics().await.map_err(|e| e.to_string())?;
        print_topic_list(&mut stdout(), &topics)
    }))
}

fn print_topic_list<W: Write>(out: &mut Out<W>, topics: &[TopicInfo]) -> Result<(), Stop> {
    for t in topics {
        out.line(format_args!(
            "{}\tpartitions={}\tsync={}",
            t.name,
            t.partitions.len(),
            t.sync
        ))?;
    }
    out.flush()
}

pub fn topic_describe(broker: &str, name: &str) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(broker).await?;
        let t = c.describe_topic(name).await.map_err(|e| e.to_string())?;
        print_topic(&mut stdout(), &t)
    }))
}

fn print_topic<W: Write>(out: &mut Out<W>, t: &TopicInfo) -> Result<(), Stop> {
    out.line(format_args!(
        "topic {}  partitions={}  replication=1  sync={}  retention_ms={}  retention_bytes={}  segment_bytes={}",
        t.name,
        t.partitions.len(),
        t.sync,
        fmt_opt(t.retention_ms),
        fmt_opt(t.retention_bytes),
        t.segment_bytes
    ))?;
    for p in &t.partitions {
        out.line(format_args!(
            "  partition {}\tshard={}\tstart={}\tend={}",
            p.partition, p.shard, p.log_start_offset, p.high_watermark
        ))?;
    }
    out.flush()
}

pub fn topic_delete(broker: &str, name: &str) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(broker).await?;
        c.delete_topic(name).await.map_err(|e| e.to_string())?;
        let mut out = stdout();
        out.line(format_args!("deleted topic {name}"))?;
        out.flush()
    }))
}

/// One message per stdin line; exits after stdin closes and every message
/// is acknowledged.
pub fn produce(
    broker: &str,
    topic: &str,
    key: Option<String>,
    partition: Option<u32>,
    acks: Acks,
) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(broker).await?;
        c.topic(topic).await.map_err(|e| e.to_string())?;
        let p = Producer::new(
            c,
            ProducerConfig {
                acks,
                ..ProducerConfig::default()
            },
        );
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1024);
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
        let mut deliveries = Vec::new();
        let mut sent = 0u64;
        while let Some(line) = rx.recv().await {
            let d = match partition {
                Some(part) => {
                    p.send_nowait_to(
                        topic,
                        part,
                        key.as_deref().map(str::as_bytes),
                        line.as_bytes(),
                    )
                    .await
                }
                None => {
                    p.send_nowait(topic, key.as_deref().map(str::as_bytes), line.as_bytes())
                        .await
                }
            }
            .map_err(|e| e.to_string())?;
            deliveries.push(d);
            sent += 1;
            if deliveries.len() >= 10_000 {
                for d in deliveries.drain(..) {
                    d.await
                        .map_err(|e| format!("message not acknowledged: {e}"))?;
                }
            }
        }
        p.flush().await.map_err(|e| e.to_string())?;
        for d in deliveries {
            d.await
                .map_err(|e| format!("message not acknowledged: {e}"))?;
        }
        let mut err = Out(std::io::stderr().lock());
        err.line(format_args!("{sent} messages acknowledged"))
    }))
}

/// One message value per stdout line.
pub fn consume(
    broker: &str,
    topic: &str,
    from_beginning: bool,
    count: Option<u64>,
    follow: bool,
    partition: Option<u32>,
) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(broker).await?;
        let info = c.topic(topic).await.map_err(|e| e.to_string())?;
        let mut consumer = Consumer::new(
            c.clone(),
            ConsumerConfig {
                max_wait: Duration::from_millis(500),
                ..ConsumerConfig::default()
            },
        );
        let start = if from_beginning {
            StartAt::Beginning
        } else {
            StartAt::End
        };
        let parts: Vec<u32> = match partition {
            Some(p) => vec![p],
            None => (0..info.partitions.len() as u32).collect(),
        };
        for &p in &parts {
            consumer
                .assign(topic, p, start)
                .await
                .map_err(|e| e.to_string())?;
        }
        // Without --follow, stop at the end as it is now.
        let ends = c
            .describe_topic(topic)
            .await
            .map_err(|e| e.to_string())?
            .partitions;
        let mut printed = 0u64;
        let mut out = stdout();
        loop {
            if count.is_some_and(|n| printed >= n) {
                return Ok(());
            }
            if !follow
                && consumer
                    .positions()
                    .iter()
                    .all(|(_, p, next)| *next >= ends[*p as usize].high_watermark)
            {
                return Ok(());
            }
            let records = consumer.poll().await.map_err(|e| e.to_string())?;
            for r in records {
                if count.is_some_and(|n| printed >= n) {
                    break;
                }
                out.bytes(r.value.as_deref().unwrap_or_default())?;
                out.bytes(b"\n")?;
                printed += 1;
            }
            out.flush()?;
        }
    }))
}

pub fn metrics(broker: &str) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(broker).await?;
        let metrics = c.metrics().await.map_err(|e| e.to_string())?;
        let mut out = stdout();
        for (k, v) in metrics {
            out.line(format_args!("{k} {v}"))?;
        }
        out.flush()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PartitionInfo;
    use std::io::{Error as IoError, ErrorKind};

    /// Takes `room` bytes, then fails every write with `kind`: a reader
    /// that read a little and left (`| head -1`), or a full disk.
    struct Leaving {
        taken: Vec<u8>,
        room: usize,
        kind: ErrorKind,
    }

    impl Write for Leaving {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.taken.len() >= self.room {
                return Err(IoError::from(self.kind));
            }
            let n = buf.len().min(self.room - self.taken.len());
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn out(room: usize, kind: ErrorKind) -> Out<Leaving> {
        Out(Leaving {
            taken: Vec::new(),
            room,
            kind,
        })
    }

    fn topic(partitions: u32) -> TopicInfo {
        TopicInfo {
            name: "orders".into(),
            topic_id: 1,
            partitions: (0..partitions)
                .map(|p| PartitionInfo {
                    partition: p,
                    leader_broker: 0,
                    shard: 0,
                    leader_epoch: 0,
                    log_start_offset: 0,
                    high_watermark: 10,
                    replicas: vec![],
                    isr: vec![],
                    offline: false,
                })
                .collect(),
            replication_factor: 1,
            sync: "always".into(),
            retention_ms: None,
            retention_bytes: None,
            segment_bytes: 1 << 30,
        }
    }

    /// `shoal topic describe X | head -1`: the first line goes out, the
    /// rest meets a closed pipe, and the command ends with success.
    #[test]
    fn a_closed_pipe_ends_a_command_quietly() {
        let mut o = out(100, ErrorKind::BrokenPipe);
        let r = print_topic(&mut o, &topic(64));
        assert!(matches!(r, Err(Stop::OutputClosed)), "{r:?}");
        assert_eq!(finish(r), Ok(()));
        assert_eq!(o.0.taken.len(), 100);
        let mut o = out(0, ErrorKind::BrokenPipe);
        assert_eq!(finish(print_topic_list(&mut o, &[topic(1)])), Ok(()));
    }

    /// Other write failures are still failures, with the cause.
    #[test]
    fn other_write_errors_fail_the_command() {
        let mut o = out(10, ErrorKind::StorageFull);
        let e = finish(print_topic(&mut o, &topic(4))).expect_err("a failure");
        assert!(e.starts_with("cannot write the output"), "{e}");
    }

    #[test]
    fn describe_prints_every_partition() {
        let mut o = out(usize::MAX, ErrorKind::BrokenPipe);
        print_topic(&mut o, &topic(2)).expect("written");
        let text = String::from_utf8(o.0.taken).expect("utf-8");
        assert_eq!(text.lines().count(), 3);
        assert!(
            text.contains("  partition 1\tshard=0\tstart=0\tend=10\n"),
            "{text}"
        );
    }
}
