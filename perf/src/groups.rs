//! `shoal-perf groups`: consumer groups and their metadata log.
//!
//! - commits: `--committers` tasks commit one partition offset each, as
//!   fast as acknowledged (every commit on the coordinator partition's
//!   in-sync replicas, like an acks=all produce); throughput and commit
//!   latency percentiles.
//! - restart (with `--spawn`): kill -9 of the broker after the commits,
//!   and the time until the restarted broker answers an offset fetch with
//!   every acknowledged commit (its coordinator loads the newest
//!   checkpoint and replays the log after it; set `--checkpoint-records`
//!   to compare).
//! - rebalance: a group of `--members` on a topic of `--partitions` with a
//!   producer writing to every partition; one more member joins (then
//!   leaves), `--rebalances` times: the time from its join to its first
//!   poll that returns data.

use crate::net::{parse_duration, pin_to, SpawnedBroker};
use crate::report::{histogram, Percentiles};
use shoal_client::{
    Client, GroupConfig, GroupConsumer, NewTopic, OffsetReset, Producer, ProducerConfig,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct GroupsArgs {
    /// Broker to measure (ignored with --spawn).
    #[arg(long, default_value = "127.0.0.1:9400")]
    pub broker: String,
    /// Start a `shoal serve` of our own (needed for the restart phase).
    #[arg(long)]
    pub spawn: bool,
    /// Cores of the spawned broker.
    #[arg(long, default_value = "0")]
    pub broker_cores: String,
    /// `group_checkpoint_records` of the spawned broker.
    #[arg(long, default_value_t = 100_000)]
    pub checkpoint_records: u64,
    /// Offset commits to make (0: skip the commit and restart phases).
    #[arg(long, default_value_t = 100_000)]
    pub commits: u64,
    /// Concurrent committers (each waits for its commit's answer).
    #[arg(long, default_value_t = 32)]
    pub committers: u32,
    /// Members of the rebalanced group (0: skip the rebalance phase).
    #[arg(long, default_value_t = 10)]
    pub members: u32,
    /// Partitions of the rebalanced group's topic (and of the commits').
    #[arg(long, default_value_t = 60)]
    pub partitions: u32,
    /// Joins of one more member to time.
    #[arg(long, default_value_t = 5)]
    pub rebalances: u32,
    /// Session timeout of the members.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub session_timeout: Duration,
    /// Core to pin the harness to (default: the last core when spawning).
    #[arg(long)]
    pub core: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GroupsArgs) -> Result<(), String> {
    let mut spawned = if a.spawn {
        let cfg = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
        std::fs::write(
            cfg.path(),
            format!("group_checkpoint_records = {}\n", a.checkpoint_records),
        )
        .map_err(|e| e.to_string())?;
        let b = SpawnedBroker::start(&a.broker_cores, Some(cfg.path()))?;
        Some((b, cfg))
    } else {
        None
    };
    let addr = spawned
        .as_ref()
        .map_or(a.broker.clone(), |(b, _)| b.addr.clone());
    pin_to(a.core, a.spawn);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut out = serde_json::Map::new();
    let run_id = std::process::id();
    let topic = format!("perf-groups-{run_id}");
    rt.block_on(async {
        let client = crate::net::connect(&addr, &Default::default()).await?;
        client
            .create_topic(&NewTopic::new(&topic, a.partitions))
            .await
            .map_err(|e| format!("cannot create topic {topic}: {e}"))?;
        if a.commits > 0 {
            let group = format!("perf-commits-{run_id}");
            let r = commits(&client, &group, &topic, &a).await?;
            out.insert("commits".into(), r);
            if let Some((b, _)) = spawned.as_mut() {
                // Concurrent commits of one partition: the last one the
                // coordinator logged wins, not the largest. What it serves
                // now, every commit acknowledged, is what must survive.
                let before = client
                    .fetch_committed(&group, &[])
                    .await
                    .map_err(|e| format!("offsets before the restart: {e}"))?;
                let t0 = Instant::now();
                b.kill9_and_restart()?;
                // Its ports take connections before it serves them.
                let client = connect_within(&addr, Duration::from_secs(300)).await?;
                let got = loop {
                    match client.fetch_committed(&group, &[]).await {
                        Ok(got) => break got,
                        Err(_) if t0.elapsed() < Duration::from_secs(300) => pause().await,
                        Err(e) => return Err(format!("no offsets after the restart: {e}")),
                    }
                };
                let restart = t0.elapsed();
                let lost = before
                    .iter()
                    .filter(|(tp, o)| got.get(*tp) != Some(*o))
                    .count();
                if lost > 0 || got.len() != before.len() {
                    return Err(format!(
                        "offsets changed across the restart: {lost} of {} partitions differ",
                        before.len()
                    ));
                }
                out.insert(
                    "restart".into(),
                    serde_json::json!({
                        "commits_before": a.commits,
                        "checkpoint_records": a.checkpoint_records,
                        "offsets_served_ms": restart.as_secs_f64() * 1e3,
                    }),
                );
            }
        }
        if a.members > 0 && a.rebalances > 0 {
            // A client of its own: the broker may have restarted.
            let client = connect_within(&addr, Duration::from_secs(60)).await?;
            let r = rebalances(&client, &topic, &a).await?;
            out.insert("rebalance".into(), r);
        }
        Ok::<(), String>(())
    })?;
    let out = serde_json::Value::Object(out);
    if a.json {
        println!("{out}");
    } else {
        print_human(&out);
    }
    drop(spawned);
    Ok(())
}

async fn pause() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// A client of `addr`, retrying while the broker is not serving yet.
async fn connect_within(addr: &str, within: Duration) -> Result<Client, String> {
    let t0 = Instant::now();
    loop {
        // TLS, if any, from the environment (SHOAL_TLS_CA, ...).
        match crate::net::connect(addr, &Default::default()).await {
            Ok(c) => return Ok(c),
            Err(_) if t0.elapsed() < within => pause().await,
            Err(e) => return Err(e),
        }
    }
}

/// The commit phase; returns its report.
async fn commits(
    client: &Client,
    group: &str,
    topic: &str,
    a: &GroupsArgs,
) -> Result<serde_json::Value, String> {
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.committers.max(1) {
        let (client, group, topic, next) = (
            client.clone(),
            group.to_string(),
            topic.to_string(),
            next.clone(),
        );
        let (total, partitions) = (a.commits, a.partitions.max(1));
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let tp = (topic.clone(), (n % u64::from(partitions)) as u32);
                let offsets = BTreeMap::from([(tp, n + 1)]);
                let s = Instant::now();
                client
                    .commit_offsets_standalone(&group, &offsets)
                    .await
                    .map_err(|e| format!("commit {n}: {e}"))?;
                let _ = h.record(s.elapsed().as_micros() as u64);
            }
            Ok::<_, String>(h)
        }));
    }
    let mut h = histogram();
    for t in tasks {
        let th = t.await.map_err(|e| e.to_string())??;
        h.add(&th).map_err(|e| e.to_string())?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let p = Percentiles::of(&h);
    Ok(serde_json::json!({
        "commits": a.commits,
        "committers": a.committers,
        "seconds": secs,
        "commits_per_s": a.commits as f64 / secs,
        "latency_us": p,
    }))
}

/// The rebalance phase.
async fn rebalances(
    client: &Client,
    topic: &str,
    a: &GroupsArgs,
) -> Result<serde_json::Value, String> {
    let group = format!("perf-rebalance-{}", std::process::id());
    let stop = Arc::new(AtomicBool::new(false));
    // Data on every partition all along, so a member's first poll of a
    // new partition finds some.
    let producer = {
        let (client, topic, stop) = (client.clone(), topic.to_string(), stop.clone());
        tokio::spawn(async move {
            let p = Producer::new(client, ProducerConfig::default());
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..100 {
                    let _ = p.send_nowait(&topic, None, b"r").await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = p.flush().await;
        })
    };
    let config = GroupConfig {
        session_timeout: a.session_timeout,
        offset_reset: OffsetReset::Latest,
        auto_commit_interval: Duration::from_secs(1),
        ..GroupConfig::default()
    };
    let mut members = Vec::new();
    for _ in 0..a.members.saturating_sub(1) {
        let mut m = GroupConsumer::subscribe(client.clone(), &group, &[topic], config.clone())
            .await
            .map_err(|e| e.to_string())?;
        let stop = stop.clone();
        members.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = m.poll().await {
                    return Err(e.to_string());
                }
            }
            m.close().await.map_err(|e| e.to_string())
        }));
    }
    let stable = |want: usize| {
        let client = client.clone();
        let group = group.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(d) = client.describe_group(&group).await {
                    if d.state == "stable" && d.members.len() == want {
                        return Ok(());
                    }
                }
                if Instant::now() > deadline {
                    return Err(format!("the group did not settle with {want} members"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    stable(members.len()).await?;
    let mut h = histogram();
    for _ in 0..a.rebalances {
        let t0 = Instant::now();
        let mut m = GroupConsumer::subscribe(client.clone(), &group, &[topic], config.clone())
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let got = m.poll().await.map_err(|e| e.to_string())?;
            if !got.is_empty() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Err("the joining member got no data within 60 s".into());
            }
        }
        let _ = h.record(t0.elapsed().as_micros() as u64);
        m.close().await.map_err(|e| e.to_string())?;
        stable(members.len()).await?;
    }
    stop.store(true, Ordering::Relaxed);
    for m in members {
        m.await.map_err(|e| e.to_string())??;
    }
    let _ = producer.await;
    Ok(serde_json::json!({
        "members": a.members,
        "partitions": a.partitions,
        "rebalances": a.rebalances,
        "join_to_first_data_ms": {
            "p50": h.value_at_quantile(0.5) as f64 / 1e3,
            "max": h.max() as f64 / 1e3,
            "min": h.min() as f64 / 1e3,
        },
    }))
}

fn print_human(v: &serde_json::Value) {
    if let Some(c) = v.get("commits") {
        println!(
            "commits: {} in {:.1} s = {:.0}/s; latency us: {}",
            c["commits"],
            c["seconds"].as_f64().unwrap_or(0.0),
            c["commits_per_s"].as_f64().unwrap_or(0.0),
            c["latency_us"]
        );
    }
    if let Some(r) = v.get("restart") {
        println!(
            "restart after kill -9 with {} commits (checkpoint every {} records): offsets served {:.0} ms after the kill",
            r["commits_before"], r["checkpoint_records"],
            r["offsets_served_ms"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(r) = v.get("rebalance") {
        println!(
            "rebalance: {} members on {} partitions, join to first data ms: {}",
            r["members"], r["partitions"], r["join_to_first_data_ms"]
        );
    }
}
