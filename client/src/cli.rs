//! The client commands of the `shoal` binary (L4): `shoal topic ...`,
//! `produce`, `consume` (alone or as a member of a group), `group list |
//! describe | reset-offsets`, `metrics`, `cluster status`. They live with the
//! client they are built on; the binary in `shoal-core` only parses flags
//! and calls them, each on a small current-thread tokio runtime of its own.
//!
//! Every command reaches the cluster through an [`Endpoint`]: `--broker`
//! (`host:port`, `host:port,host:port,...` or
//! `zk://host:port[,host:port][/chroot][?cluster=NAME]`) and
//! `--discovery-cache PATH|off` (else `$SHOAL_DISCOVERY_CACHE`, else the
//! user's cache directory). With `--json`, `cluster status`, `topic
//! describe`, `group list` and `group describe` print exactly one JSON
//! object on stdout.
//!
//! Output goes through `Out`, never `println!`: a reader that goes away
//! early (`shoal topic list | head -1`) closes the pipe, and the command
//! then stops quietly with success, as `cat` or `grep` would, instead of
//! panicking on the failed write.

use crate::{
    Acks, Client, ClientConfig, ClusterInfo, ConsumedRecord, Consumer, ConsumerConfig,
    DiscoveryCache, DiscoverySource, GroupConfig, GroupConsumer, GroupDescription, NewTopic,
    OffsetReset, Producer, ProducerConfig, StartAt, TopicInfo, TopicPartition,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Where the commands find the cluster.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The bootstrap string ([`Client::connect`]).
    pub broker: String,
    pub discovery_cache: DiscoveryCache,
    /// Who to authenticate as (none: no authentication).
    pub credentials: Option<crate::Credentials>,
    /// TLS (none: plaintext).
    pub tls: Option<crate::TlsConfig>,
}

impl Endpoint {
    /// `discovery_cache`: a path, or `off`; `None` for the default (see
    /// [`DiscoveryCache::Default`]).
    pub fn new(broker: &str, discovery_cache: Option<&str>) -> Endpoint {
        Endpoint {
            broker: broker.to_string(),
            discovery_cache: discovery_cache
                .map_or(DiscoveryCache::Default, DiscoveryCache::from_setting),
            credentials: None,
            tls: None,
        }
    }

    /// Sets TLS from `--tls-ca FILE` (else `SHOAL_TLS_CA`), with
    /// `--tls-cert`/`--tls-key` (else `SHOAL_TLS_CERT`/`SHOAL_TLS_KEY`) and
    /// `--tls-server-name` (else `SHOAL_TLS_SERVER_NAME`); none of them:
    /// plaintext (see [`crate::TlsConfig::from_flags_or_env`]).
    pub fn with_tls(mut self, flags: &crate::TlsFiles) -> Result<Endpoint, String> {
        self.tls = crate::TlsConfig::from_flags_or_env(flags).map_err(|e| e.to_string())?;
        Ok(self)
    }

    /// Sets the credentials from `--credentials-file FILE`, else `--user
    /// NAME` with `SHOAL_PASSWORD`, else `SHOAL_USER` + `SHOAL_PASSWORD`,
    /// else none.
    pub fn with_credentials(
        mut self,
        user: Option<&str>,
        file: Option<&std::path::Path>,
    ) -> Result<Endpoint, String> {
        let c = match (file, user) {
            (Some(f), _) => Some(crate::Credentials::from_file(f)),
            (None, Some(u)) => Some(crate::Credentials::for_user_from_env(u)),
            (None, None) => crate::Credentials::from_env().transpose(),
        };
        self.credentials = c.transpose().map_err(|e| e.to_string())?;
        Ok(self)
    }
}

/// Why a command stopped before its end.
#[derive(Debug)]
pub(crate) enum Stop {
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
pub(crate) struct Out<W: Write>(pub(crate) W);

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

async fn connect(to: &Endpoint) -> Result<Client, String> {
    let config = ClientConfig {
        discovery_cache: to.discovery_cache.clone(),
        credentials: to.credentials.clone(),
        tls: to.tls.clone(),
        ..ClientConfig::default()
    };
    let c = Client::connect_with_config(&to.broker, config)
        .await
        .map_err(|e| format!("cannot reach the cluster at {}: {e}", to.broker))?;
    if let Some(DiscoverySource::Cache(path)) = c.discovery_source() {
        eprintln!(
            "shoal: {} unreachable; using the brokers cached in {}",
            to.broker,
            path.display()
        );
    }
    Ok(c)
}

fn fmt_opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

pub fn topic_create(to: &Endpoint, t: NewTopic) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(to).await?;
        c.create_topic(&t).await.map_err(|e| e.to_string())?;
        let mut out = stdout();
        out.line(format_args!(
            "created topic {} with {} partitions (replication {})",
            t.name,
            t.partitions,
            t.replication_factor.max(1)
        ))?;
        out.flush()
    }))
}

pub fn topic_list(to: &Endpoint) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(to).await?;
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

/// `shoal topic describe NAME [--json]`: per partition its leader, leader
/// epoch, replicas, in-sync replicas, offline or not, owning shard and
/// offsets (each from its leader).
pub fn topic_describe(to: &Endpoint, name: &str, json: bool) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(to).await?;
        let t = c.describe_topic(name).await.map_err(|e| e.to_string())?;
        if json {
            print_json(&mut stdout(), &topic_json(&t))
        } else {
            print_topic(&mut stdout(), &t)
        }
    }))
}

fn ids(v: &[u32]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn print_topic<W: Write>(out: &mut Out<W>, t: &TopicInfo) -> Result<(), Stop> {
    out.line(format_args!(
        "topic {}  partitions={}  replication={}  sync={}  retention_ms={}  retention_bytes={}  segment_bytes={}",
        t.name,
        t.partitions.len(),
        t.replication_factor,
        t.sync,
        fmt_opt(t.retention_ms),
        fmt_opt(t.retention_bytes),
        t.segment_bytes
    ))?;
    for p in &t.partitions {
        let leader = if p.offline {
            "none".to_string()
        } else {
            p.leader_broker.to_string()
        };
        out.line(format_args!(
            "  partition {}\tleader={}\tepoch={}\treplicas={}\tisr={}\tshard={}\tstart={}\tend={}{}",
            p.partition,
            leader,
            p.leader_epoch,
            ids(&p.replicas),
            ids(&p.isr),
            p.shard,
            p.log_start_offset,
            p.high_watermark,
            if p.offline { "\tOFFLINE" } else { "" }
        ))?;
    }
    out.flush()
}

fn topic_json(t: &TopicInfo) -> Value {
    json!({
        "name": t.name,
        "topic_id": t.topic_id,
        "replication_factor": t.replication_factor,
        "sync": t.sync,
        "retention_ms": t.retention_ms,
        "retention_bytes": t.retention_bytes,
        "segment_bytes": t.segment_bytes,
        "partitions": t.partitions.iter().map(|p| json!({
            "partition": p.partition,
            "leader": (!p.offline).then_some(p.leader_broker),
            "leader_epoch": p.leader_epoch,
            "replicas": p.replicas,
            "isr": p.isr,
            "offline": p.offline,
            "shard": p.shard,
            "log_start_offset": p.log_start_offset,
            "high_watermark": p.high_watermark,
        })).collect::<Vec<_>>(),
    })
}

/// One JSON object on one line.
fn print_json<W: Write>(out: &mut Out<W>, v: &Value) -> Result<(), Stop> {
    out.line(format_args!("{v}"))?;
    out.flush()
}

/// `shoal cluster status [--json]`: the cluster's name, its controller,
/// every broker (live ones from metadata, and brokers that hold replicas
/// but are not live) with its partition and leader counts, the
/// under-replicated partitions and the offline ones.
pub fn cluster_status(to: &Endpoint, json: bool) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(to).await?;
        let topics = c.list_topics().await.map_err(|e| e.to_string())?;
        let status = ClusterStatus::new(&c.cluster(), &topics);
        if json {
            print_json(&mut stdout(), &status.json())
        } else {
            status.print(&mut stdout())
        }
    }))
}

/// One broker's line in `cluster status`.
#[derive(Debug, Default)]
struct BrokerRow {
    live: Option<crate::BrokerInfo>,
    /// Replicas it holds (on a single node: partitions it leads).
    partitions: usize,
    /// Partitions it leads now.
    leaders: usize,
}

/// A partition named in `cluster status`.
#[derive(Debug)]
struct PartRow {
    topic: String,
    partition: u32,
    leader: Option<u32>,
    replicas: Vec<u32>,
    isr: Vec<u32>,
}

#[derive(Debug)]
struct ClusterStatus {
    name: Option<String>,
    controller: Option<(u32, u64)>,
    brokers: BTreeMap<u32, BrokerRow>,
    topics: usize,
    partitions: usize,
    under_replicated: Vec<PartRow>,
    offline: Vec<PartRow>,
}

impl ClusterStatus {
    fn new(cluster: &ClusterInfo, topics: &[TopicInfo]) -> ClusterStatus {
        let mut brokers: BTreeMap<u32, BrokerRow> = cluster
            .brokers
            .iter()
            .map(|b| {
                (
                    b.id,
                    BrokerRow {
                        live: Some(b.clone()),
                        ..BrokerRow::default()
                    },
                )
            })
            .collect();
        let is_live = |id: u32| cluster.brokers.iter().any(|b| b.id == id);
        let mut status = ClusterStatus {
            name: cluster.name.clone(),
            controller: cluster.controller,
            brokers: BTreeMap::new(),
            topics: topics.len(),
            partitions: 0,
            under_replicated: Vec::new(),
            offline: Vec::new(),
        };
        for t in topics {
            for p in &t.partitions {
                status.partitions += 1;
                let row = || PartRow {
                    topic: t.name.clone(),
                    partition: p.partition,
                    leader: (!p.offline).then_some(p.leader_broker),
                    replicas: p.replicas.clone(),
                    isr: p.isr.clone(),
                };
                if p.replicas.is_empty() {
                    // A single node: the leader holds the only copy.
                    if !p.offline {
                        brokers.entry(p.leader_broker).or_default().partitions += 1;
                    }
                } else {
                    for &r in &p.replicas {
                        brokers.entry(r).or_default().partitions += 1;
                    }
                }
                if p.offline {
                    status.offline.push(row());
                } else {
                    brokers.entry(p.leader_broker).or_default().leaders += 1;
                }
                if p.is_under_replicated(is_live) {
                    status.under_replicated.push(row());
                }
            }
        }
        status.brokers = brokers;
        status
    }

    fn json(&self) -> Value {
        let parts = |v: &[PartRow]| -> Vec<Value> {
            v.iter()
                .map(|p| {
                    json!({
                        "topic": p.topic,
                        "partition": p.partition,
                        "leader": p.leader,
                        "replicas": p.replicas,
                        "isr": p.isr,
                    })
                })
                .collect()
        };
        json!({
            "cluster": self.name,
            "controller": self.controller.map(|(id, epoch)| json!({"id": id, "epoch": epoch})),
            "brokers": self.brokers.iter().map(|(id, b)| json!({
                "id": id,
                "live": b.live.is_some(),
                "host": b.live.as_ref().map(|l| l.host.clone()),
                "port": b.live.as_ref().map(|l| l.port),
                "shard_ports": b.live.as_ref().map(|l| l.shard_ports.clone()),
                "rack": b.live.as_ref().and_then(|l| l.rack.clone()),
                "version": b.live.as_ref().and_then(|l| l.version.clone()),
                "partitions": b.partitions,
                "leaders": b.leaders,
            })).collect::<Vec<_>>(),
            "topics": self.topics,
            "partitions": self.partitions,
            "under_replicated": parts(&self.under_replicated),
            "offline": parts(&self.offline),
        })
    }

    fn print<W: Write>(&self, out: &mut Out<W>) -> Result<(), Stop> {
        let controller = self
            .controller
            .map_or("none".to_string(), |(id, e)| format!("{id} (epoch {e})"));
        out.line(format_args!(
            "cluster {}  controller={}  brokers={}  topics={}  partitions={}",
            self.name.as_deref().unwrap_or("-"),
            controller,
            self.brokers.values().filter(|b| b.live.is_some()).count(),
            self.topics,
            self.partitions
        ))?;
        for (id, b) in &self.brokers {
            match &b.live {
                Some(l) => out.line(format_args!(
                    "broker {id}\tlive\t{}:{}\track={}\tversion={}\tpartitions={}\tleaders={}",
                    l.host,
                    l.port,
                    l.rack.as_deref().unwrap_or("-"),
                    l.version.as_deref().unwrap_or("-"),
                    b.partitions,
                    b.leaders
                ))?,
                None => out.line(format_args!(
                    "broker {id}\tDOWN\t-\track=-\tversion=-\tpartitions={}\tleaders={}",
                    b.partitions, b.leaders
                ))?,
            }
        }
        for (title, rows) in [
            ("under-replicated", &self.under_replicated),
            ("offline", &self.offline),
        ] {
            out.line(format_args!("{title} partitions: {}", rows.len()))?;
            for p in rows {
                out.line(format_args!(
                    "  {}-{}\tleader={}\treplicas={}\tisr={}",
                    p.topic,
                    p.partition,
                    p.leader.map_or("none".to_string(), |l| l.to_string()),
                    ids(&p.replicas),
                    ids(&p.isr)
                ))?;
            }
        }
        out.flush()
    }
}

pub fn topic_delete(to: &Endpoint, name: &str) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(to).await?;
        c.delete_topic(name).await.map_err(|e| e.to_string())?;
        let mut out = stdout();
        out.line(format_args!("deleted topic {name}"))?;
        out.flush()
    }))
}

/// `shoal produce`: one message per stdin line (its bytes, UTF-8 or not,
/// without the line end: `\n` or `\r\n`). Succeeds only if every line was
/// acknowledged; otherwise fails naming how many were not, and the first
/// reason. Lines are retried through a failover (see
/// [`ProducerConfig::delivery_timeout`]); with `--acks all` none that was
/// acknowledged is lost by one.
pub fn produce(
    to: &Endpoint,
    topic: &str,
    key: Option<String>,
    partition: Option<u32>,
    acks: Acks,
) -> Result<(), String> {
    let summary = rt()?.block_on(produce_lines(
        to,
        topic,
        key.as_deref().map(str::as_bytes),
        partition,
        acks,
        std::io::stdin(),
    ))?;
    let mut err = Out(std::io::stderr().lock());
    finish(err.line(format_args!(
        "{} messages acknowledged",
        summary.acknowledged
    )))
}

/// What `produce` did with its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceSummary {
    pub lines: u64,
    pub acknowledged: u64,
}

/// Deliveries awaited at a time; past it, reading waits for the oldest.
const DELIVERIES_IN_FLIGHT_MAX: usize = 10_000;

/// Counts what became of each line.
#[derive(Default)]
struct Tally {
    lines: u64,
    acknowledged: u64,
    first_error: Option<String>,
}

impl Tally {
    fn failed(&mut self, e: impl std::fmt::Display) {
        self.first_error.get_or_insert_with(|| e.to_string());
    }

    async fn settle(&mut self, d: crate::Delivery) {
        match d.await {
            Ok(_) => self.acknowledged += 1,
            Err(e) => self.failed(e),
        }
    }
}

/// Splits off one line's value: without its `\n`, and without a `\r`
/// before it.
fn line_value(mut line: Vec<u8>) -> Vec<u8> {
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    line
}

/// Sends each line of `input` as one message and waits for all of them.
/// `Ok` only if every line was acknowledged; the error names how many were
/// not. A read error of the input ends reading and counts as a failure.
pub async fn produce_lines(
    to: &Endpoint,
    topic: &str,
    key: Option<&[u8]>,
    partition: Option<u32>,
    acks: Acks,
    input: impl std::io::Read + Send + 'static,
) -> Result<ProduceSummary, String> {
    let c = connect(to).await?;
    c.topic(topic).await.map_err(|e| e.to_string())?;
    let p = Producer::new(
        c,
        ProducerConfig {
            acks,
            ..ProducerConfig::default()
        },
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(1024);
    std::thread::spawn(move || {
        let mut input = std::io::BufReader::new(input);
        loop {
            let mut line = Vec::new();
            let r = match input.read_until(b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) => Ok(line_value(line)),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let stop = r.is_err();
            if tx.blocking_send(r).is_err() || stop {
                return;
            }
        }
    });
    let mut tally = Tally::default();
    let mut deliveries = std::collections::VecDeque::new();
    let mut read_error = None;
    while let Some(line) = rx.recv().await {
        let value = match line {
            Ok(v) => v,
            Err(e) => {
                read_error = Some(format!("cannot read the input: {e}"));
                break;
            }
        };
        tally.lines += 1;
        let d = match partition {
            Some(part) => p.send_nowait_to(topic, part, key, &value).await,
            None => p.send_nowait(topic, key, &value).await,
        };
        match d {
            Ok(d) => deliveries.push_back(d),
            Err(e) => tally.failed(e),
        }
        if deliveries.len() >= DELIVERIES_IN_FLIGHT_MAX {
            if let Some(d) = deliveries.pop_front() {
                tally.settle(d).await;
            }
        }
    }
    // Each failure is reported by its own delivery too.
    let _ = p.flush().await;
    for d in deliveries {
        tally.settle(d).await;
    }
    let unacknowledged = tally.lines - tally.acknowledged;
    match (unacknowledged, read_error) {
        (0, None) => Ok(ProduceSummary {
            lines: tally.lines,
            acknowledged: tally.acknowledged,
        }),
        (0, Some(r)) => Err(format!(
            "{r}; the {} lines read before it were acknowledged",
            tally.lines
        )),
        (n, r) => Err(format!(
            "{n} of {} lines were not acknowledged (first error: {}){}",
            tally.lines,
            tally.first_error.as_deref().unwrap_or("unknown"),
            r.map_or(String::new(), |r| format!("; then {r}"))
        )),
    }
}

/// `shoal consume`: one message value per stdout line. Rides out a
/// failover: the consumer resumes on the new leader where it was.
pub fn consume(
    to: &Endpoint,
    topic: &str,
    from_beginning: bool,
    count: Option<u64>,
    follow: bool,
    partition: Option<u32>,
) -> Result<(), String> {
    finish(rt()?.block_on(consume_to(
        to,
        topic,
        from_beginning,
        count,
        follow,
        partition,
        &mut stdout(),
    )))
}

pub(crate) async fn consume_to<W: Write>(
    to: &Endpoint,
    topic: &str,
    from_beginning: bool,
    count: Option<u64>,
    follow: bool,
    partition: Option<u32>,
    out: &mut Out<W>,
) -> Result<(), Stop> {
    let c = connect(to).await?;
    let info = c.topic(topic).await.map_err(|e| e.to_string())?;
    let mut consumer = Consumer::new(
        c.clone(),
        ConsumerConfig {
            max_wait: Duration::from_millis(500),
            ..ConsumerConfig::default()
        },
    );
    let parts: Vec<u32> = match partition {
        Some(p) => vec![p],
        None => (0..info.partitions.len() as u32).collect(),
    };
    // Without --follow, stop at each partition's end as its leader says
    // now (metadata from another broker does not know it).
    let mut ends = BTreeMap::new();
    for &p in &parts {
        let (start, end) = c
            .partition_offsets(topic, p)
            .await
            .map_err(|e| e.to_string())?;
        ends.insert(p, end);
        let at = if from_beginning {
            StartAt::Offset(start)
        } else {
            StartAt::Offset(end)
        };
        consumer
            .assign(topic, p, at)
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut printed = 0u64;
    loop {
        if count.is_some_and(|n| printed >= n) {
            return Ok(());
        }
        if !follow
            && consumer
                .positions()
                .iter()
                .all(|(_, p, next)| ends.get(p).is_none_or(|end| next >= end))
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
}

/// How `shoal consume --group` takes part in its group.
#[derive(Debug, Clone)]
pub struct GroupConsume {
    pub group: String,
    /// Partitions the group has no committed offset for start at the
    /// oldest record (else at the end).
    pub from_beginning: bool,
    /// Stop after this many messages.
    pub count: Option<u64>,
    /// The member's session timeout (default: [`GroupConfig`]'s).
    pub session_timeout: Option<Duration>,
}

/// `shoal consume TOPIC --group G`: one message value per stdout line,
/// from the partitions the group assigns this member, until `--count`,
/// SIGINT or SIGTERM (a second one ends the process at once). Commits
/// what it printed as it goes; at the end commits it once more and leaves
/// the group, so the next member resumes right after the last line
/// printed.
pub fn consume_group(to: &Endpoint, topic: &str, g: &GroupConsume) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let stop = stop_on_signals()?;
        let c = connect(to).await?;
        c.topic(topic).await.map_err(|e| e.to_string())?;
        let defaults = GroupConfig::default();
        let config = GroupConfig {
            offset_reset: if g.from_beginning {
                OffsetReset::Earliest
            } else {
                OffsetReset::Latest
            },
            session_timeout: g.session_timeout.unwrap_or(defaults.session_timeout),
            fetch: ConsumerConfig {
                max_wait: Duration::from_millis(500),
                ..ConsumerConfig::default()
            },
            ..defaults
        };
        let mut consumer = GroupConsumer::subscribe(c, &g.group, &[topic], config)
            .await
            .map_err(|e| format!("cannot join group {:?}: {e}", g.group))?;
        let r = consume_group_to(&mut consumer, g.count, &stop, &mut stdout()).await;
        let closed = consumer.close().await;
        r?;
        closed.map_err(|e| Stop::Failed(format!("could not commit the last positions: {e}")))
    }))
}

/// A flag set by the first SIGINT or SIGTERM; a second one exits at once.
fn stop_on_signals() -> Result<Arc<AtomicBool>, String> {
    let stop = Arc::new(AtomicBool::new(false));
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let flag = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                if flag.swap(true, Ordering::SeqCst) {
                    std::process::exit(130);
                }
            }
        });
    }
    Ok(stop)
}

/// The first offset per partition of `records`.
fn first_offsets(records: &[ConsumedRecord]) -> BTreeMap<TopicPartition, u64> {
    let mut out: BTreeMap<TopicPartition, u64> = BTreeMap::new();
    for r in records {
        let o = out
            .entry((r.topic.clone(), r.partition))
            .or_insert(r.offset);
        *o = (*o).min(r.offset);
    }
    out
}

async fn consume_group_to<W: Write>(
    g: &mut GroupConsumer,
    count: Option<u64>,
    stop: &AtomicBool,
    out: &mut Out<W>,
) -> Result<(), Stop> {
    let mut printed = 0u64;
    while !stop.load(Ordering::SeqCst) && count.is_none_or(|n| printed < n) {
        let records = g.poll().await.map_err(|e| e.to_string())?;
        let mut done = records.len();
        let mut failed = None;
        for (i, r) in records.iter().enumerate() {
            if count.is_some_and(|n| printed >= n) {
                done = i;
                break;
            }
            let line = out
                .bytes(r.value.as_deref().unwrap_or_default())
                .and_then(|()| out.bytes(b"\n"));
            if let Err(e) = line {
                done = i;
                failed = Some(e);
                break;
            }
            printed += 1;
        }
        // Returned but not printed: read again (here or by the next
        // member), so not committed.
        for ((t, p), o) in first_offsets(&records[done..]) {
            g.seek(&t, p, o).map_err(|e| e.to_string())?;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        out.flush()?;
        if let Err(e) = g.commit_async() {
            tracing::warn!(group = g.group(), error = %e, "commit failed; retrying with the next");
        }
    }
    Ok(())
}

fn tp_list(v: &[TopicPartition]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|(t, p)| format!("{t}-{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn tp_json(v: &[TopicPartition]) -> Vec<Value> {
    v.iter()
        .map(|(t, p)| json!({"topic": t, "partition": p}))
        .collect()
}

/// `shoal group list [--json]`: every group, its state and member count.
pub fn group_list(to: &Endpoint, json: bool) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(to).await?;
        let groups = c.list_groups().await.map_err(|e| e.to_string())?;
        let mut out = stdout();
        if json {
            let groups: Vec<Value> = groups
                .iter()
                .map(|g| json!({"group": g.group, "state": g.state, "members": g.members}))
                .collect();
            return print_json(&mut out, &json!({ "groups": groups }));
        }
        for g in &groups {
            out.line(format_args!(
                "{}\tstate={}\tmembers={}",
                g.group, g.state, g.members
            ))?;
        }
        out.flush()
    }))
}

/// One partition's line in `group describe`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LagRow {
    topic: String,
    partition: u32,
    committed: Option<u64>,
    /// The partition's high watermark; `None` if the topic is gone.
    end: Option<u64>,
    member: Option<String>,
}

impl LagRow {
    fn lag(&self) -> Option<u64> {
        Some(self.end?.saturating_sub(self.committed?))
    }
}

/// Every partition of the group's topics (`topics`: as described now)
/// with its committed offset, end, lag and the member assigned it; then
/// committed partitions of topics no longer described.
fn lag_rows(d: &GroupDescription, topics: &[TopicInfo]) -> Vec<LagRow> {
    let committed: BTreeMap<TopicPartition, u64> = d
        .offsets
        .iter()
        .map(|o| ((o.topic.clone(), o.partition), o.offset))
        .collect();
    let owner: BTreeMap<&TopicPartition, &str> = d
        .members
        .iter()
        .flat_map(|m| m.assignment.iter().map(|tp| (tp, m.member_id.as_str())))
        .collect();
    let mut rows: BTreeMap<TopicPartition, LagRow> = BTreeMap::new();
    for t in topics {
        for p in &t.partitions {
            let tp = (t.name.clone(), p.partition);
            rows.insert(
                tp.clone(),
                LagRow {
                    topic: t.name.clone(),
                    partition: p.partition,
                    committed: committed.get(&tp).copied(),
                    end: Some(p.high_watermark),
                    member: owner.get(&tp).map(|m| m.to_string()),
                },
            );
        }
    }
    for (tp, c) in &committed {
        rows.entry(tp.clone()).or_insert_with(|| LagRow {
            topic: tp.0.clone(),
            partition: tp.1,
            committed: Some(*c),
            end: None,
            member: owner.get(tp).map(|m| m.to_string()),
        });
    }
    rows.into_values().collect()
}

/// `shoal group describe G [--json]`: state, members and their
/// assignments, and per partition of the group's topics its committed
/// offset, log end (high watermark) and lag.
pub fn group_describe(to: &Endpoint, group: &str, json: bool) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(to).await?;
        let d = c.describe_group(group).await.map_err(|e| {
            if e.code() == Some(crate::ErrorCode::UnknownGroup) {
                format!("no group {group:?}")
            } else {
                e.to_string()
            }
        })?;
        let mut names: BTreeSet<&str> = d.offsets.iter().map(|o| o.topic.as_str()).collect();
        for m in &d.members {
            names.extend(m.topics.iter().map(String::as_str));
            names.extend(m.assignment.iter().map(|(t, _)| t.as_str()));
        }
        let mut topics = Vec::new();
        for name in names {
            match c.describe_topic(name).await {
                Ok(t) => topics.push(t),
                Err(e) => {
                    tracing::warn!(topic = name, error = %e, "cannot describe a topic of the group")
                }
            }
        }
        let rows = lag_rows(&d, &topics);
        let mut out = stdout();
        if json {
            print_json(&mut out, &group_json(&d, &rows))
        } else {
            print_group(&mut out, &d, &rows)
        }
    }))
}

fn group_json(d: &GroupDescription, rows: &[LagRow]) -> Value {
    json!({
        "group": d.group,
        "state": d.state,
        "group_epoch": d.group_epoch,
        "strategy": d.strategy,
        "members": d.members.iter().map(|m| json!({
            "member_id": m.member_id,
            "client_id": m.client_id,
            "member_epoch": m.member_epoch,
            "topics": m.topics,
            "assignment": tp_json(&m.assignment),
            "owned": tp_json(&m.owned),
            "session_timeout_ms": m.session_timeout_ms,
        })).collect::<Vec<_>>(),
        "partitions": rows.iter().map(|r| json!({
            "topic": r.topic,
            "partition": r.partition,
            "committed": r.committed,
            "log_end_offset": r.end,
            "lag": r.lag(),
            "member": r.member,
        })).collect::<Vec<_>>(),
    })
}

fn print_group<W: Write>(
    out: &mut Out<W>,
    d: &GroupDescription,
    rows: &[LagRow],
) -> Result<(), Stop> {
    out.line(format_args!(
        "group {}  state={}  epoch={}  strategy={}  members={}",
        d.group,
        d.state,
        d.group_epoch,
        d.strategy,
        d.members.len()
    ))?;
    for m in &d.members {
        out.line(format_args!(
            "  member {}\tclient={}\tepoch={}\ttopics={}\tassignment={}",
            m.member_id,
            m.client_id,
            m.member_epoch,
            m.topics.join(","),
            tp_list(&m.assignment)
        ))?;
    }
    for r in rows {
        out.line(format_args!(
            "  {}-{}\tcommitted={}\tend={}\tlag={}\tmember={}",
            r.topic,
            r.partition,
            fmt_opt(r.committed),
            fmt_opt(r.end),
            fmt_opt(r.lag()),
            r.member.as_deref().unwrap_or("-")
        ))?;
    }
    out.flush()
}

/// Where `shoal group reset-offsets` moves a topic's committed offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// Each partition's log start.
    Earliest,
    /// Each partition's high watermark.
    Latest,
    /// This offset, within each partition's log start and high watermark.
    Offset(u64),
}

/// The offset `to` means for each partition of `t`.
fn reset_targets(t: &TopicInfo, to: ResetTo) -> BTreeMap<TopicPartition, u64> {
    t.partitions
        .iter()
        .map(|p| {
            let o = match to {
                ResetTo::Earliest => p.log_start_offset,
                ResetTo::Latest => p.high_watermark,
                ResetTo::Offset(o) => o.clamp(p.log_start_offset, p.high_watermark),
            };
            ((t.name.clone(), p.partition), o)
        })
        .collect()
}

/// `shoal group reset-offsets G --topic T (--to-earliest|--to-latest|--to-offset N)`:
/// commits the new offsets of every partition of `topic` for `group`,
/// which must have no members (the coordinator refuses otherwise).
pub fn group_reset_offsets(
    to: &Endpoint,
    group: &str,
    topic: &str,
    reset: ResetTo,
) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(to).await?;
        let t = c.describe_topic(topic).await.map_err(|e| e.to_string())?;
        let offsets = reset_targets(&t, reset);
        c.commit_offsets_standalone(group, &offsets)
            .await
            .map_err(|e| {
                if e.code() == Some(crate::ErrorCode::GroupNotEmpty) {
                    format!(
                        "group {group:?} has active members; stop them first (see `shoal group \
                         describe {group}`): nothing was reset"
                    )
                } else {
                    e.to_string()
                }
            })?;
        let mut out = stdout();
        for ((t, p), o) in &offsets {
            out.line(format_args!("{group}\t{t}-{p}\t-> {o}"))?;
        }
        out.flush()
    }))
}

pub fn metrics(to: &Endpoint) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(to).await?;
        let metrics = c.metrics().await.map_err(|e| e.to_string())?;
        let mut out = stdout();
        for (k, v) in metrics {
            out.line(format_args!("{k} {v}"))?;
        }
        out.flush()
    }))
}

/// `shoal user create NAME`: the password from `SHOAL_NEW_PASSWORD`, else
/// the first line of stdin (never a flag).
pub fn user_create(to: &Endpoint, name: &str, replace: bool) -> Result<(), String> {
    let password = match std::env::var(NEW_PASSWORD_ENV) {
        Ok(p) if !p.is_empty() => p,
        _ => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    if password.is_empty() {
        return Err(format!(
            "no password: give it on stdin or in {NEW_PASSWORD_ENV}"
        ));
    }
    rt()?.block_on(async {
        let c = connect(to).await?;
        c.create_user(name, &password, replace)
            .await
            .map_err(|e| e.to_string())
    })
}

/// Where `shoal user create` reads the new password (else stdin).
pub const NEW_PASSWORD_ENV: &str = "SHOAL_NEW_PASSWORD";

pub fn user_delete(to: &Endpoint, name: &str) -> Result<(), String> {
    rt()?.block_on(async {
        let c = connect(to).await?;
        c.delete_user(name).await.map_err(|e| e.to_string())
    })
}

pub fn user_list(to: &Endpoint) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(to).await?;
        let users = c.list_users().await.map_err(|e| e.to_string())?;
        let mut out = stdout();
        for u in users {
            out.line(format_args!(
                "{}\t{}\t{}",
                u.name, u.mechanism, u.iterations
            ))?;
        }
        out.flush()
    }))
}

/// `shoal acl add|remove`.
pub fn acl_change(to: &Endpoint, acl: &crate::Acl, add: bool) -> Result<(), String> {
    rt()?.block_on(async {
        let c = connect(to).await?;
        if add {
            c.add_acl(acl).await
        } else {
            c.remove_acl(acl).await
        }
        .map_err(|e| e.to_string())
    })
}

pub fn acl_list(to: &Endpoint, principal: Option<&str>) -> Result<(), String> {
    finish(rt()?.block_on(async {
        let c = connect(to).await?;
        let acls = c.list_acls(principal).await.map_err(|e| e.to_string())?;
        let mut out = stdout();
        for a in acls {
            out.line(format_args!("{a}"))?;
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
            min_insync_replicas: 0,
            unclean_leader_election: false,
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
            text.contains(
                "  partition 1\tleader=0\tepoch=0\treplicas=-\tisr=-\tshard=0\tstart=0\tend=10\n"
            ),
            "{text}"
        );
    }

    fn broker(id: u32) -> crate::BrokerInfo {
        crate::BrokerInfo {
            id,
            host: "127.0.0.1".into(),
            port: 9400 + id as u16 * 10,
            shard_ports: vec![9401 + id as u16 * 10],
            version: Some("0.1.0".into()),
            rack: (id != 2).then(|| format!("r{id}")),
        }
    }

    /// Three brokers' worth of replicas with broker 3 gone: partition 0 is
    /// whole, partition 1 has a replica out of sync, partition 2 has one
    /// on the dead broker, partition 3 has no leader.
    fn cluster_topic() -> TopicInfo {
        let mut t = topic(4);
        t.replication_factor = 2;
        let place = [
            (1, vec![1, 2], vec![1, 2], false),
            (2, vec![2, 1], vec![2], false),
            (1, vec![1, 3], vec![1, 3], false),
            (3, vec![3, 2], vec![3], true),
        ];
        for (p, (leader, replicas, isr, offline)) in t.partitions.iter_mut().zip(place) {
            p.leader_broker = leader;
            p.replicas = replicas;
            p.isr = isr;
            p.offline = offline;
            p.leader_epoch = 4;
        }
        t
    }

    fn cluster_info() -> ClusterInfo {
        ClusterInfo {
            name: Some("prod".into()),
            controller: Some((2, 9)),
            brokers: vec![broker(1), broker(2)],
        }
    }

    #[test]
    fn cluster_status_counts_and_flags_partitions() {
        let st = ClusterStatus::new(&cluster_info(), &[cluster_topic()]);
        let mut o = out(usize::MAX, ErrorKind::BrokenPipe);
        st.print(&mut o).expect("written");
        let text = String::from_utf8(o.0.taken).expect("utf-8");
        let want = "cluster prod  controller=2 (epoch 9)  brokers=2  topics=1  partitions=4\n\
            broker 1\tlive\t127.0.0.1:9410\track=r1\tversion=0.1.0\tpartitions=3\tleaders=2\n\
            broker 2\tlive\t127.0.0.1:9420\track=-\tversion=0.1.0\tpartitions=3\tleaders=1\n\
            broker 3\tDOWN\t-\track=-\tversion=-\tpartitions=2\tleaders=0\n\
            under-replicated partitions: 3\n\
            \x20 orders-1\tleader=2\treplicas=2,1\tisr=2\n\
            \x20 orders-2\tleader=1\treplicas=1,3\tisr=1,3\n\
            \x20 orders-3\tleader=none\treplicas=3,2\tisr=3\n\
            offline partitions: 1\n\
            \x20 orders-3\tleader=none\treplicas=3,2\tisr=3\n";
        assert_eq!(text, want);
    }

    #[test]
    fn cluster_status_json_is_one_object() {
        let st = ClusterStatus::new(&cluster_info(), &[cluster_topic()]);
        let mut o = out(usize::MAX, ErrorKind::BrokenPipe);
        print_json(&mut o, &st.json()).expect("written");
        let text = String::from_utf8(o.0.taken).expect("utf-8");
        assert_eq!(text.lines().count(), 1);
        let v: Value = serde_json::from_str(&text).expect("one JSON object");
        assert_eq!(v["cluster"], "prod");
        assert_eq!(v["controller"], json!({"id": 2, "epoch": 9}));
        assert_eq!(v["brokers"].as_array().map(Vec::len), Some(3));
        assert_eq!(v["brokers"][0]["leaders"], 2);
        assert_eq!(v["brokers"][1]["rack"], Value::Null);
        assert_eq!(v["brokers"][2]["live"], false);
        assert_eq!(v["brokers"][2]["partitions"], 2);
        assert_eq!(v["under_replicated"].as_array().map(Vec::len), Some(3));
        assert_eq!(v["offline"][0]["partition"], 3);
        assert_eq!(v["offline"][0]["leader"], Value::Null);
        assert_eq!(v["partitions"], 4);
    }

    /// A single node: no replicas listed, nothing under-replicated, every
    /// partition counted on the one broker, no cluster name.
    #[test]
    fn cluster_status_of_a_single_node() {
        let info = ClusterInfo {
            name: None,
            controller: Some((0, 0)),
            brokers: vec![broker(0)],
        };
        let st = ClusterStatus::new(&info, &[topic(3)]);
        let v = st.json();
        assert_eq!(v["cluster"], Value::Null);
        assert_eq!(v["brokers"][0]["partitions"], 3);
        assert_eq!(v["brokers"][0]["leaders"], 3);
        assert_eq!(v["under_replicated"], json!([]));
        assert_eq!(v["offline"], json!([]));
    }

    #[test]
    fn topic_describe_shows_leaders_replicas_and_isr() {
        let t = cluster_topic();
        let mut o = out(usize::MAX, ErrorKind::BrokenPipe);
        print_topic(&mut o, &t).expect("written");
        let text = String::from_utf8(o.0.taken).expect("utf-8");
        assert!(text.contains("replication=2"), "{text}");
        assert!(
            text.contains("  partition 1\tleader=2\tepoch=4\treplicas=2,1\tisr=2\tshard=0"),
            "{text}"
        );
        assert!(
            text.contains("  partition 3\tleader=none\tepoch=4\treplicas=3,2\tisr=3\tshard=0\tstart=0\tend=10\tOFFLINE\n"),
            "{text}"
        );
        let v = topic_json(&t);
        assert_eq!(v["replication_factor"], 2);
        assert_eq!(v["partitions"][1]["isr"], json!([2]));
        assert_eq!(v["partitions"][3]["leader"], Value::Null);
        assert_eq!(v["partitions"][3]["offline"], true);
        assert_eq!(v["partitions"][0]["leader"], 1);
    }

    fn group_of(offsets: &[(&str, u32, u64)]) -> GroupDescription {
        GroupDescription {
            group: "g".into(),
            state: "stable".into(),
            group_epoch: 3,
            strategy: "sticky".into(),
            members: vec![crate::GroupMember {
                member_id: "m1".into(),
                client_id: "c".into(),
                member_epoch: 2,
                topics: vec!["orders".into()],
                assignment: vec![("orders".into(), 0), ("orders".into(), 1)],
                owned: vec![("orders".into(), 0), ("orders".into(), 1)],
                session_timeout_ms: 10_000,
                metadata: Vec::new(),
            }],
            offsets: offsets
                .iter()
                .map(|(t, p, o)| crate::CommittedOffset {
                    topic: t.to_string(),
                    partition: *p,
                    offset: *o,
                    metadata: String::new(),
                })
                .collect(),
        }
    }

    /// Every partition of the group's topics gets a row: lag = end −
    /// committed where both are known; a committed topic that is gone
    /// still shows, without an end.
    #[test]
    fn group_describe_shows_lag_per_partition() {
        let d = group_of(&[("orders", 0, 4), ("gone", 0, 7)]);
        let rows = lag_rows(&d, &[topic(3)]);
        assert_eq!(rows.len(), 4);
        let row = |t: &str, p: u32| {
            rows.iter()
                .find(|r| r.topic == t && r.partition == p)
                .expect("a row")
                .clone()
        };
        assert_eq!(row("orders", 0).lag(), Some(6));
        assert_eq!(row("orders", 0).member.as_deref(), Some("m1"));
        assert_eq!(row("orders", 1).committed, None);
        assert_eq!(row("orders", 1).lag(), None);
        assert_eq!(row("orders", 2).member, None);
        assert_eq!(row("gone", 0).end, None);
        let mut o = out(usize::MAX, ErrorKind::BrokenPipe);
        print_group(&mut o, &d, &rows).expect("written");
        let text = String::from_utf8(o.0.taken).expect("utf-8");
        assert!(text.starts_with("group g  state=stable  epoch=3  strategy=sticky  members=1\n"));
        assert!(text.contains("assignment=orders-0,orders-1"), "{text}");
        assert!(
            text.contains("  orders-0\tcommitted=4\tend=10\tlag=6\tmember=m1\n"),
            "{text}"
        );
        assert!(
            text.contains("  orders-2\tcommitted=-\tend=10\tlag=-\tmember=-\n"),
            "{text}"
        );
        let v = group_json(&d, &rows);
        assert_eq!(v["members"][0]["assignment"][1]["partition"], 1);
        assert_eq!(v["partitions"][1]["lag"], 6);
        assert_eq!(v["partitions"][0]["log_end_offset"], Value::Null);
    }

    /// Earliest and latest are each partition's log bounds; a given
    /// offset is kept within them.
    #[test]
    fn reset_targets_follow_each_partition_s_log() {
        let mut t = topic(2);
        t.partitions[1].log_start_offset = 5;
        let tp = |p: u32| ("orders".to_string(), p);
        let e = reset_targets(&t, ResetTo::Earliest);
        assert_eq!((e[&tp(0)], e[&tp(1)]), (0, 5));
        let l = reset_targets(&t, ResetTo::Latest);
        assert_eq!((l[&tp(0)], l[&tp(1)]), (10, 10));
        let o = reset_targets(&t, ResetTo::Offset(3));
        assert_eq!((o[&tp(0)], o[&tp(1)]), (3, 5));
        let o = reset_targets(&t, ResetTo::Offset(99));
        assert_eq!(o[&tp(0)], 10);
    }

    /// What `consume --group` did not print is sought back to: the first
    /// such offset per partition.
    #[test]
    fn first_offsets_are_per_partition_minimums() {
        let r = |p: u32, offset: u64| ConsumedRecord {
            topic: "t".into(),
            partition: p,
            offset,
            timestamp_ms: 0,
            key: None,
            value: None,
            headers: Vec::new(),
        };
        let f = first_offsets(&[r(0, 7), r(1, 3), r(0, 5), r(1, 4)]);
        assert_eq!(f.len(), 2);
        assert_eq!(f[&("t".to_string(), 0)], 5);
        assert_eq!(f[&("t".to_string(), 1)], 3);
        assert!(first_offsets(&[]).is_empty());
    }
}
