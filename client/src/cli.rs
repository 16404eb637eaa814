//! The client commands of the `shoal` binary (L4): `shoal topic ...`,
//! `produce`, `consume`, `metrics`, `cluster status`. They live with the
//! client they are built on; the binary in `shoal-core` only parses flags
//! and calls them, each on a small current-thread tokio runtime of its own.
//!
//! Every command reaches the cluster through an [`Endpoint`]: `--broker`
//! (`host:port`, `host:port,host:port,...` or
//! `zk://host:port[,host:port][/chroot][?cluster=NAME]`) and
//! `--discovery-cache PATH|off` (else `$SHOAL_DISCOVERY_CACHE`, else the
//! user's cache directory). With `--json`, `cluster status` and `topic
//! describe` print exactly one JSON object on stdout.
//!
//! Output goes through `Out`, never `println!`: a reader that goes away
//! early (`shoal topic list | head -1`) closes the pipe, and the command
//! then stops quietly with success, as `cat` or `grep` would, instead of
//! panicking on the failed write.

use crate::{
    Acks, Client, ClientConfig, ClusterInfo, Consumer, ConsumerConfig, DiscoveryCache,
    DiscoverySource, NewTopic, Producer, ProducerConfig, StartAt, TopicInfo,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::time::Duration;

/// Where the commands find the cluster.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The bootstrap string ([`Client::connect`]).
    pub broker: String,
    pub discovery_cache: DiscoveryCache,
}

impl Endpoint {
    /// `discovery_cache`: a path, or `off`; `None` for the default (see
    /// [`DiscoveryCache::Default`]).
    pub fn new(broker: &str, discovery_cache: Option<&str>) -> Endpoint {
        Endpoint {
            broker: broker.to_string(),
            discovery_cache: discovery_cache
                .map_or(DiscoveryCache::Default, DiscoveryCache::from_setting),
        }
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
}
