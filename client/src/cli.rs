//! The client commands of the `shoal` binary (L4): `shoal topic ...`,
//! `produce`, `consume`, `metrics`. They live with the client they are
//! built on; the binary in `shoal-core` only parses flags and calls them,
//! each on a small current-thread tokio runtime of its own.

use crate::{Acks, Client, Consumer, ConsumerConfig, NewTopic, Producer, ProducerConfig, StartAt};
use std::io::{BufRead, Write};
use std::time::Duration;

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
    rt()?.block_on(async {
        let c = connect(broker).await?;
        c.create_topic(&t).await.map_err(|e| e.to_string())?;
        println!("created topic {} with {} partitions", t.name, t.partitions);
        Ok(())
    })
}

pub fn topic_list(broker: &str) -> Result<(), String> {
    rt()?.block_on(async {
        let c = connect(broker).await?;
        for t in c.list_topics().await.map_err(|e| e.to_string())? {
            println!(
                "{}\tpartitions={}\tsync={}",
                t.name,
                t.partitions.len(),
                t.sync
            );
        }
        Ok(())
    })
}

pub fn topic_describe(broker: &str, name: &str) -> Result<(), String> {
    rt()?.block_on(async {
        let c = connect(broker).await?;
        let t = c.describe_topic(name).await.map_err(|e| e.to_string())?;
        println!(
            "topic {}  partitions={}  replication=1  sync={}  retention_ms={}  retention_bytes={}  segment_bytes={}",
            t.name,
            t.partitions.len(),
            t.sync,
            fmt_opt(t.retention_ms),
            fmt_opt(t.retention_bytes),
            t.segment_bytes
        );
        for p in &t.partitions {
            println!("  partition {}\tshard={}\tstart={}\tend={}", p.partition, p.shard, p.log_start_offset, p.high_watermark);
        }
        Ok(())
    })
}

pub fn topic_delete(broker: &str, name: &str) -> Result<(), String> {
    rt()?.block_on(async {
        let c = connect(broker).await?;
        c.delete_topic(name).await.map_err(|e| e.to_string())?;
        println!("deleted topic {name}");
        Ok(())
    })
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
    rt()?.block_on(async {
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
        eprintln!("{sent} messages acknowledged");
        Ok(())
    })
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
    rt()?.block_on(async {
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
        let stdout = std::io::stdout();
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
            let mut out = stdout.lock();
            for r in records {
                if count.is_some_and(|n| printed >= n) {
                    break;
                }
                out.write_all(r.value.as_deref().unwrap_or_default())
                    .map_err(|e| e.to_string())?;
                out.write_all(b"\n").map_err(|e| e.to_string())?;
                printed += 1;
            }
            out.flush().map_err(|e| e.to_string())?;
        }
    })
}

pub fn metrics(broker: &str) -> Result<(), String> {
    rt()?.block_on(async {
        let c = connect(broker).await?;
        for (k, v) in c.metrics().await.map_err(|e| e.to_string())? {
            println!("{k} {v}");
        }
        Ok(())
    })
}
