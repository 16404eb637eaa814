//! One shard: the state a core owns and the partition operations on it.
//!
//! A `Shard` lives on one glommio executor (pinned to one core) and is
//! single-threaded: `Rc`, `Cell`, `RefCell`. It owns the logs of the
//! partitions assigned to it and a copy of the topic metadata. Requests for
//! partitions another shard owns travel as [`ShardMsg`]s over glommio's
//! channel mesh (the only way cores meet) and the answer comes back on a
//! oneshot channel.

use crate::config::Config;
use crate::metadata::{assign_shards, validate_topic_name, TopicMeta, Topics, PARTITIONS_MAX};
use futures::channel::oneshot;
use glommio::channels::channel_mesh::Senders;
use shoal_shard::{PartitionLog, ReadSlice};
use shoal_wire::batch::Batches;
use shoal_wire::ErrorCode;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// An error answer: a wire code and a message for people.
#[derive(Debug, Clone)]
pub struct ErrReply {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrReply {
        ErrReply {
            code,
            message: message.into(),
        }
    }
}

impl From<shoal_shard::Error> for ErrReply {
    fn from(e: shoal_shard::Error) -> Self {
        ErrReply::new(e.code(), e.to_string())
    }
}

pub type Reply<T> = Result<T, ErrReply>;

/// Longest a fetch waits (yielding) for its log bytes to reach the page
/// cache before sending them anyway.
const RESIDENT_WAIT_MAX: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    None,
    Leader,
}

#[derive(Debug, Clone)]
pub struct ProduceOk {
    pub base_offset: u64,
    pub last_offset: u64,
    pub duplicate: bool,
}

#[derive(Debug, Clone)]
pub struct FetchParams {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: Option<i64>,
    pub max_bytes: u32,
    pub min_bytes: u32,
    pub max_wait: Duration,
}

/// Log bytes to send: a slice of a local segment, or a descriptor of a
/// segment owned by another shard (a `dup` of its file, so it stays valid
/// even if retention deletes the segment meanwhile).
pub enum FetchData {
    Local(ReadSlice),
    Remote {
        file: std::fs::File,
        position: u64,
        len: u64,
    },
}

impl FetchData {
    pub fn len(&self) -> u64 {
        match self {
            FetchData::Local(s) => s.len,
            FetchData::Remote { len, .. } => *len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct FetchOk {
    pub data: Option<FetchData>,
    pub high_watermark: u64,
    pub log_start_offset: u64,
    pub next_offset: u64,
}

/// A produce whose batches are appended (or on their way to the owning
/// shard), waiting for its acknowledgement.
pub enum PendingProduce {
    Local {
        log: Rc<PartitionLog>,
        ok: ProduceOk,
        wait: Option<u64>,
    },
    Remote(oneshot::Receiver<Reply<ProduceOk>>),
}

impl PendingProduce {
    pub async fn finish(self) -> Reply<ProduceOk> {
        match self {
            PendingProduce::Local { log, ok, wait } => {
                if let Some(next) = wait {
                    log.wait_acked(next).await?;
                }
                Ok(ok)
            }
            PendingProduce::Remote(rx) => rx.await.map_err(|_| shard_gone())?,
        }
    }
}

/// A fetch answered by another shard: the segment as a duplicated
/// descriptor (sendable between threads), the range and the offsets.
pub struct RemoteFetch {
    pub data: Option<(std::fs::File, u64, u64)>,
    pub high_watermark: u64,
    pub log_start_offset: u64,
    pub next_offset: u64,
}

/// A topic to create.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u16,
    pub sync: Option<String>,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: Option<u64>,
}

/// State of one partition as seen by its owner.
#[derive(Debug, Clone, Copy, Default)]
pub struct PartitionState {
    pub log_start_offset: u64,
    pub high_watermark: u64,
}

/// What crosses between shards.
pub enum ShardMsg {
    Produce {
        topic: String,
        partition: u32,
        payload: Vec<u8>,
        acks: Acks,
        reply: oneshot::Sender<Reply<ProduceOk>>,
    },
    Fetch {
        params: FetchParams,
        reply: oneshot::Sender<Reply<RemoteFetch>>,
    },
    PartitionState {
        topic: String,
        partition: u32,
        reply: oneshot::Sender<Reply<PartitionState>>,
    },
    CreateTopic {
        spec: TopicSpec,
        reply: oneshot::Sender<Reply<()>>,
    },
    DeleteTopic {
        name: String,
        reply: oneshot::Sender<Reply<()>>,
    },
    OpenTopic {
        meta: TopicMeta,
        reply: oneshot::Sender<Reply<()>>,
    },
    DropTopic {
        name: String,
        reply: oneshot::Sender<Reply<()>>,
    },
    Metrics {
        reply: oneshot::Sender<Vec<(&'static str, u64)>>,
    },
}

/// Upper bounds (µs) of the broker's latency buckets; a last bucket holds
/// everything slower.
pub const LATENCY_BOUNDS_US: [u64; 17] = [
    10, 25, 50, 75, 100, 150, 200, 300, 500, 750, 1_000, 2_000, 5_000, 10_000, 50_000, 100_000,
    1_000_000,
];

/// Metric names of the produce latency buckets, cumulative like
/// Prometheus' `le` buckets: `_le_<bound>` counts requests at or under it,
/// `_count` counts them all, `_sum` adds up their microseconds. Made once
/// from [`LATENCY_BOUNDS_US`], so names and bounds cannot drift apart.
static PRODUCE_LATENCY_NAMES: std::sync::LazyLock<Vec<&'static str>> =
    std::sync::LazyLock::new(|| bucket_names("produce_latency_us"));

fn bucket_names(prefix: &str) -> Vec<&'static str> {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    LATENCY_BOUNDS_US
        .iter()
        .map(|b| leak(format!("{prefix}_le_{b}")))
        .chain([
            leak(format!("{prefix}_count")),
            leak(format!("{prefix}_sum")),
        ])
        .collect()
}

/// A latency distribution in fixed buckets: cheap to record on the data
/// path, and (unlike percentiles) summable over shards and subtractable
/// between two reads, so a benchmark can take the distribution of just its
/// measured window.
#[derive(Default)]
pub struct LatencyBuckets {
    /// Requests per bucket (not cumulative); the last one is over every
    /// bound.
    counts: [Cell<u64>; LATENCY_BOUNDS_US.len() + 1],
    sum_us: Cell<u64>,
}

impl LatencyBuckets {
    pub fn record(&self, d: Duration) {
        let us = d.as_micros() as u64;
        let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        add(&self.counts[i], 1);
        add(&self.sum_us, us);
    }

    /// Appends the cumulative counts, then the sum, under `names` (from
    /// [`bucket_names`]).
    fn snapshot_into(&self, names: &[&'static str], out: &mut Vec<(&'static str, u64)>) {
        let mut cumulative = 0;
        for (name, c) in names.iter().zip(&self.counts) {
            cumulative += c.get();
            out.push((name, cumulative));
        }
        out.push((names[self.counts.len()], self.sum_us.get()));
    }
}

/// Per-shard counters (exported summed over shards by the Metrics API).
#[derive(Default)]
pub struct Metrics {
    pub produce_requests: Cell<u64>,
    pub produce_bytes: Cell<u64>,
    pub fetch_requests: Cell<u64>,
    /// Log bytes sent in fetch and push responses.
    pub fetch_bytes: Cell<u64>,
    /// Of those, bytes sent with sendfile (never through user space).
    pub zero_copy_bytes: Cell<u64>,
    /// Of those, bytes pushed through a user-space write to wait for a full
    /// socket (one byte per stall).
    pub copied_bytes: Cell<u64>,
    /// Log bytes read from the tail cache (memory) rather than the segment
    /// file, for fetches and pushes at the end of a log.
    pub tail_cache_bytes: Cell<u64>,
    pub cross_shard_requests: Cell<u64>,
    pub connections_accepted: Cell<u64>,
    pub connections_open: Cell<u64>,
    pub errors: Cell<u64>,
    /// Produce requests, from the decoded request to its response written
    /// (acknowledgement wait included).
    pub produce_latency: LatencyBuckets,
}

pub fn add(c: &Cell<u64>, v: u64) {
    c.set(c.get() + v);
}

impl Metrics {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let mut v = vec![
            ("produce_requests", self.produce_requests.get()),
            ("produce_bytes", self.produce_bytes.get()),
            ("fetch_requests", self.fetch_requests.get()),
            ("fetch_bytes", self.fetch_bytes.get()),
            ("zero_copy_bytes", self.zero_copy_bytes.get()),
            ("copied_bytes", self.copied_bytes.get()),
            ("tail_cache_bytes", self.tail_cache_bytes.get()),
            ("cross_shard_requests", self.cross_shard_requests.get()),
            ("connections_accepted", self.connections_accepted.get()),
            ("connections_open", self.connections_open.get()),
            ("errors", self.errors.get()),
        ];
        self.produce_latency
            .snapshot_into(&PRODUCE_LATENCY_NAMES, &mut v);
        v
    }
}

pub struct Shard {
    pub id: usize,
    pub nshards: usize,
    pub config: Rc<Config>,
    pub topics: RefCell<BTreeMap<String, TopicMeta>>,
    partitions: RefCell<HashMap<String, Vec<Option<Rc<PartitionLog>>>>>,
    senders: Option<Senders<ShardMsg>>,
    pub metrics: Metrics,
    pub stopping: Cell<bool>,
    next_subscription: Cell<u64>,
}

fn unknown_topic(topic: &str) -> ErrReply {
    ErrReply::new(ErrorCode::UnknownTopic, format!("unknown topic {topic:?}"))
}

fn unknown_partition(topic: &str, partition: u32, n: u32) -> ErrReply {
    ErrReply::new(
        ErrorCode::UnknownPartition,
        format!("topic {topic:?} has no partition {partition} (it has {n})"),
    )
}

fn shard_gone() -> ErrReply {
    ErrReply::new(
        ErrorCode::ShuttingDown,
        "the owning shard is not answering (shutting down)",
    )
}

impl Shard {
    pub fn new(
        id: usize,
        config: Rc<Config>,
        topics: Topics,
        senders: Option<Senders<ShardMsg>>,
    ) -> Shard {
        Shard {
            id,
            nshards: config.cores.len(),
            config,
            topics: RefCell::new(topics.topics),
            partitions: RefCell::new(HashMap::new()),
            senders,
            metrics: Metrics::default(),
            stopping: Cell::new(false),
            next_subscription: Cell::new(1),
        }
    }

    pub fn next_subscription_id(&self) -> u64 {
        let id = self.next_subscription.get();
        self.next_subscription.set(id + 1);
        id
    }

    /// Opens the logs of every partition this shard owns.
    pub async fn open_local_partitions(&self) -> Result<(), String> {
        let metas: Vec<TopicMeta> = self.topics.borrow().values().cloned().collect();
        for meta in metas {
            self.open_topic(&meta).await.map_err(|e| e.message)?;
        }
        Ok(())
    }

    async fn open_topic(&self, meta: &TopicMeta) -> Reply<()> {
        let mut logs = Vec::with_capacity(meta.shards.len());
        for (p, &s) in meta.shards.iter().enumerate() {
            if usize::from(s) != self.id {
                logs.push(None);
                continue;
            }
            let dir = meta.partition_dir(&self.config.data_dir, p as u32);
            let config = shoal_shard::LogConfig {
                tail_cache_bytes: self.config.tail_cache_bytes,
                ..meta.log_config()
            };
            let log = PartitionLog::open(&dir, config).await.map_err(|e| {
                ErrReply::new(
                    e.code(),
                    format!("cannot open partition {}-{p}: {e}", meta.name),
                )
            })?;
            logs.push(Some(Rc::new(log)));
        }
        self.topics
            .borrow_mut()
            .insert(meta.name.clone(), meta.clone());
        self.partitions.borrow_mut().insert(meta.name.clone(), logs);
        Ok(())
    }

    async fn drop_topic(&self, name: &str) -> Reply<()> {
        let meta = self.topics.borrow_mut().remove(name);
        let logs = self
            .partitions
            .borrow_mut()
            .remove(name)
            .unwrap_or_default();
        for (p, log) in logs.into_iter().enumerate() {
            if let Some(log) = log {
                let _ = log.shutdown().await;
                if let Some(meta) = &meta {
                    let dir = meta.partition_dir(&self.config.data_dir, p as u32);
                    std::fs::remove_dir_all(&dir).map_err(|e| {
                        ErrReply::new(
                            ErrorCode::StorageError,
                            format!("cannot delete {}: {e}", dir.display()),
                        )
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Flushes and closes every local partition (clean shutdown).
    pub async fn close_all(&self) {
        let all: Vec<Rc<PartitionLog>> = self
            .partitions
            .borrow()
            .values()
            .flatten()
            .flatten()
            .cloned()
            .collect();
        for log in all {
            if let Err(e) = log.shutdown().await {
                tracing::error!(shard = self.id, dir = %log.dir().display(), error = %e, "partition did not close cleanly");
            }
        }
    }

    /// Periodic retention over the local partitions.
    pub async fn enforce_retention(&self) {
        let all: Vec<Rc<PartitionLog>> = self
            .partitions
            .borrow()
            .values()
            .flatten()
            .flatten()
            .cloned()
            .collect();
        let now = now_ms();
        for log in all {
            if let Err(e) = log.enforce_retention(now).await {
                tracing::warn!(dir = %log.dir().display(), error = %e, "retention failed");
            }
        }
    }

    /// Which shard owns `topic`/`partition`.
    pub fn owner(&self, topic: &str, partition: u32) -> Reply<usize> {
        let topics = self.topics.borrow();
        let meta = topics.get(topic).ok_or_else(|| unknown_topic(topic))?;
        meta.shards
            .get(partition as usize)
            .map(|&s| usize::from(s))
            .ok_or_else(|| unknown_partition(topic, partition, meta.partitions()))
    }

    fn local_log(&self, topic: &str, partition: u32) -> Reply<Rc<PartitionLog>> {
        let parts = self.partitions.borrow();
        let logs = parts.get(topic).ok_or_else(|| unknown_topic(topic))?;
        match logs.get(partition as usize) {
            Some(Some(log)) => Ok(log.clone()),
            Some(None) => Err(ErrReply::new(
                ErrorCode::NotOwner,
                format!("partition {topic}-{partition} is owned by another shard"),
            )),
            None => Err(unknown_partition(topic, partition, logs.len() as u32)),
        }
    }

    async fn send_to(&self, shard: usize, msg: ShardMsg) -> Reply<()> {
        let senders = self.senders.as_ref().ok_or_else(shard_gone)?;
        add(&self.metrics.cross_shard_requests, 1);
        senders.send_to(shard, msg).await.map_err(|_| shard_gone())
    }

    // ---- partition operations, routed to the owner ------------------------

    /// The order-sensitive half of a produce: appends the batches (or hands
    /// them to the owning shard) in request order. The returned
    /// [`PendingProduce`] waits for the acknowledgement, so a connection can
    /// go on to its next request while the disk works.
    pub async fn produce_start(
        &self,
        topic: &str,
        partition: u32,
        payload: &[u8],
        acks: Acks,
    ) -> Reply<PendingProduce> {
        let owner = self.owner(topic, partition)?;
        if owner == self.id {
            let (log, ok) = self.produce_append(topic, partition, payload).await?;
            let wait = (acks == Acks::Leader).then_some(ok.last_offset + 1);
            return Ok(PendingProduce::Local { log, ok, wait });
        }
        let (tx, rx) = oneshot::channel();
        let msg = ShardMsg::Produce {
            topic: topic.into(),
            partition,
            payload: payload.to_vec(),
            acks,
            reply: tx,
        };
        self.send_to(owner, msg).await?;
        Ok(PendingProduce::Remote(rx))
    }

    async fn produce_append(
        &self,
        topic: &str,
        partition: u32,
        payload: &[u8],
    ) -> Reply<(Rc<PartitionLog>, ProduceOk)> {
        let log = self.local_log(topic, partition)?;
        if payload.is_empty() {
            return Err(ErrReply::new(
                ErrorCode::MalformedRequest,
                "produce request carries no record batch",
            ));
        }
        add(&self.metrics.produce_requests, 1);
        let mut result: Option<ProduceOk> = None;
        for b in Batches::new(payload, log.config().batch_bytes_max) {
            let (_, bytes) =
                b.map_err(|e| ErrReply::new(e.code(), format!("invalid batch: {e}")))?;
            let a = log.append(bytes).await?;
            let r = result.get_or_insert(ProduceOk {
                base_offset: a.base_offset,
                last_offset: a.last_offset,
                duplicate: true,
            });
            r.last_offset = a.last_offset;
            r.duplicate &= a.duplicate;
        }
        let r =
            result.ok_or_else(|| ErrReply::new(ErrorCode::MalformedRequest, "no record batch"))?;
        add(&self.metrics.produce_bytes, payload.len() as u64);
        Ok((log, r))
    }

    async fn produce_local(
        &self,
        topic: &str,
        partition: u32,
        payload: &[u8],
        acks: Acks,
    ) -> Reply<ProduceOk> {
        let (log, ok) = self.produce_append(topic, partition, payload).await?;
        if acks == Acks::Leader {
            log.wait_acked(ok.last_offset + 1).await?;
        }
        Ok(ok)
    }

    pub async fn fetch(&self, params: FetchParams) -> Reply<FetchOk> {
        let owner = self.owner(&params.topic, params.partition)?;
        if owner == self.id {
            return self.fetch_local(&params).await;
        }
        let (tx, rx) = oneshot::channel();
        self.send_to(owner, ShardMsg::Fetch { params, reply: tx })
            .await?;
        let r = rx.await.map_err(|_| shard_gone())??;
        Ok(FetchOk {
            data: r.data.map(|(file, position, len)| FetchData::Remote {
                file,
                position,
                len,
            }),
            high_watermark: r.high_watermark,
            log_start_offset: r.log_start_offset,
            next_offset: r.next_offset,
        })
    }

    /// Reads from a local partition, long-polling up to `max_wait` for
    /// `min_bytes`.
    async fn fetch_local(&self, p: &FetchParams) -> Reply<FetchOk> {
        let log = self.local_log(&p.topic, p.partition)?;
        add(&self.metrics.fetch_requests, 1);
        let deadline = Instant::now() + p.max_wait;
        let mut offset = p.offset;
        if let Some(ts) = p.timestamp_ms {
            offset = log
                .offset_for_timestamp(ts)
                .unwrap_or_else(|| log.end_offset());
        }
        loop {
            let slice = log.read(offset, u64::from(p.max_bytes.max(1)))?;
            let now = Instant::now();
            // A slice that stops short of the data already there (at
            // max_bytes, a segment's end or a tail cache block's end) cannot
            // grow by waiting: answer now, the consumer comes straight back.
            let stopped_short = !slice.is_empty() && slice.next_offset < slice.high_watermark;
            if slice.len >= u64::from(p.min_bytes)
                || stopped_short
                || now >= deadline
                || self.stopping.get()
            {
                if slice.is_cached() {
                    add(&self.metrics.tail_cache_bytes, slice.len);
                }
                slice.make_resident(RESIDENT_WAIT_MAX).await;
                let ok = FetchOk {
                    high_watermark: slice.high_watermark,
                    log_start_offset: log.start_offset(),
                    next_offset: slice.next_offset,
                    data: (!slice.is_empty()).then_some(FetchData::Local(slice)),
                };
                return Ok(ok);
            }
            let wait_from = if slice.is_empty() {
                offset
            } else {
                slice.next_offset
            };
            let _ = glommio::timer::timeout(deadline - now, async {
                log.wait_for_data(wait_from).await;
                Ok(())
            })
            .await;
        }
    }

    pub async fn partition_state(&self, topic: &str, partition: u32) -> Reply<PartitionState> {
        let owner = self.owner(topic, partition)?;
        if owner == self.id {
            let log = self.local_log(topic, partition)?;
            return Ok(PartitionState {
                log_start_offset: log.start_offset(),
                high_watermark: log.end_offset(),
            });
        }
        let (tx, rx) = oneshot::channel();
        self.send_to(
            owner,
            ShardMsg::PartitionState {
                topic: topic.into(),
                partition,
                reply: tx,
            },
        )
        .await?;
        rx.await.map_err(|_| shard_gone())?
    }

    // ---- topics: shard 0 is the controller ---------------------------------

    pub async fn create_topic(&self, spec: TopicSpec) -> Reply<()> {
        if self.id != 0 {
            let (tx, rx) = oneshot::channel();
            self.send_to(0, ShardMsg::CreateTopic { spec, reply: tx })
                .await?;
            return rx.await.map_err(|_| shard_gone())?;
        }
        validate_topic_name(&spec.name)
            .map_err(|m| ErrReply::new(ErrorCode::InvalidTopicName, m))?;
        let invalid = |m: String| ErrReply::new(ErrorCode::InvalidConfig, m);
        if spec.partitions == 0 || spec.partitions > PARTITIONS_MAX {
            return Err(invalid(format!("partitions must be 1 to {PARTITIONS_MAX}")));
        }
        if spec.replication_factor > 1 {
            return Err(invalid(
                "replication factor above 1 needs a cluster; this broker runs alone".into(),
            ));
        }
        let sync = spec
            .sync
            .clone()
            .unwrap_or_else(|| self.config.default_sync.to_string());
        sync.parse::<shoal_shard::SyncMode>().map_err(invalid)?;
        let meta = TopicMeta {
            name: spec.name.clone(),
            shards: assign_shards(&spec.name, spec.partitions, self.nshards),
            sync,
            retention_ms: spec
                .retention_ms
                .or(self.config.retention.map(|d| d.as_millis() as u64)),
            retention_bytes: spec.retention_bytes.or(self.config.retention_bytes),
            segment_bytes: spec.segment_bytes.unwrap_or(self.config.segment_bytes),
        };
        meta.log_config().validate().map_err(invalid)?;
        if self.topics.borrow().contains_key(&spec.name) {
            return Err(ErrReply::new(
                ErrorCode::TopicExists,
                format!("topic {:?} already exists", spec.name),
            ));
        }
        // Reserve the name before any await.
        self.topics
            .borrow_mut()
            .insert(meta.name.clone(), meta.clone());
        let all = self.topics.borrow().clone();
        if let Err(e) = self.persist_topics(all).await {
            self.topics.borrow_mut().remove(&meta.name);
            return Err(e);
        }
        self.broadcast(
            |reply| ShardMsg::OpenTopic {
                meta: meta.clone(),
                reply,
            },
            self.open_topic(&meta),
        )
        .await
    }

    pub async fn delete_topic(&self, name: String) -> Reply<()> {
        if self.id != 0 {
            let (tx, rx) = oneshot::channel();
            self.send_to(0, ShardMsg::DeleteTopic { name, reply: tx })
                .await?;
            return rx.await.map_err(|_| shard_gone())?;
        }
        if !self.topics.borrow().contains_key(&name) {
            return Err(unknown_topic(&name));
        }
        let mut remaining = self.topics.borrow().clone();
        remaining.remove(&name);
        self.persist_topics(remaining).await?;
        self.broadcast(
            |reply| ShardMsg::DropTopic {
                name: name.clone(),
                reply,
            },
            self.drop_topic(&name),
        )
        .await
    }

    async fn persist_topics(&self, topics: BTreeMap<String, TopicMeta>) -> Reply<()> {
        let topics = Topics { topics };
        shoal_shard::checkpoint::write_durably(
            &self.config.data_dir,
            "topics.json",
            topics.encode(),
        )
        .await
        .map_err(|e| {
            ErrReply::new(
                ErrorCode::StorageError,
                format!("cannot save topic metadata: {e}"),
            )
        })
    }

    /// Runs `local` here and sends `msg` to every other shard; all must agree.
    async fn broadcast(
        &self,
        msg: impl Fn(oneshot::Sender<Reply<()>>) -> ShardMsg,
        local: impl std::future::Future<Output = Reply<()>>,
    ) -> Reply<()> {
        let mut waits = Vec::new();
        for s in (0..self.nshards).filter(|&s| s != self.id) {
            let (tx, rx) = oneshot::channel();
            self.send_to(s, msg(tx)).await?;
            waits.push(rx);
        }
        let mut result = local.await;
        for rx in waits {
            let r = rx.await.map_err(|_| shard_gone()).and_then(|r| r);
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    pub async fn metrics_all(&self) -> Vec<(&'static str, u64)> {
        let mut total = self.metrics.snapshot();
        for s in (0..self.nshards).filter(|&s| s != self.id) {
            let (tx, rx) = oneshot::channel();
            if self
                .send_to(s, ShardMsg::Metrics { reply: tx })
                .await
                .is_err()
            {
                continue;
            }
            if let Ok(m) = rx.await {
                for (t, (_, v)) in total.iter_mut().zip(m) {
                    t.1 += v;
                }
            }
        }
        total
    }

    /// Serves a message from another shard.
    pub async fn handle(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Produce {
                topic,
                partition,
                payload,
                acks,
                reply,
            } => {
                let _ = reply.send(self.produce_local(&topic, partition, &payload, acks).await);
            }
            ShardMsg::Fetch { params, reply } => {
                let r = self.fetch_local(&params).await.and_then(|ok| {
                    let data = match ok.data {
                        Some(FetchData::Local(s)) => Some((
                            s.file().try_clone().map_err(|e| {
                                ErrReply::new(ErrorCode::StorageError, e.to_string())
                            })?,
                            s.file_position(),
                            s.len,
                        )),
                        Some(FetchData::Remote {
                            file,
                            position,
                            len,
                        }) => Some((file, position, len)),
                        None => None,
                    };
                    Ok(RemoteFetch {
                        data,
                        high_watermark: ok.high_watermark,
                        log_start_offset: ok.log_start_offset,
                        next_offset: ok.next_offset,
                    })
                });
                let _ = reply.send(r);
            }
            ShardMsg::PartitionState {
                topic,
                partition,
                reply,
            } => {
                let _ = reply.send(self.partition_state(&topic, partition).await);
            }
            ShardMsg::CreateTopic { spec, reply } => {
                let _ = reply.send(self.create_topic(spec).await);
            }
            ShardMsg::DeleteTopic { name, reply } => {
                let _ = reply.send(self.delete_topic(name).await);
            }
            ShardMsg::OpenTopic { meta, reply } => {
                let _ = reply.send(self.open_topic(&meta).await);
            }
            ShardMsg::DropTopic { name, reply } => {
                let _ = reply.send(self.drop_topic(&name).await);
            }
            ShardMsg::Metrics { reply } => {
                let _ = reply.send(self.metrics.snapshot());
            }
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
