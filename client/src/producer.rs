//! The producer: batching by size and linger, partitioning, acks,
//! idempotence and retries (L1, C3).
//!
//! Records for one partition accumulate in a [`BatchBuilder`]; a batch is
//! sealed when it reaches `batch_bytes`, `linger` after its first record,
//! on [`Producer::flush`], or, with a linger of zero, as soon as the
//! partition's sender is free: records that arrive while a request is in
//! flight share the next batch instead of each making its own.
//! Each partition has one sender task that sends its batches in order, one
//! request at a time, so with idempotence on (the default) a retry after an
//! error carries the same producer id and sequence and the broker never
//! writes it twice.
//!
//! Failover (L3): a request that fails retriably (`NotLeader`,
//! `LeaderNotAvailable`, `NotEnoughReplicas`, a stale leader epoch, a
//! refused connect, a connection lost mid-request, no answer in time) is
//! sent again to the partition's leader as metadata then says, after a
//! backoff (see the crate's failover notes), until `delivery_timeout`
//! after its batch was sealed. A retry carries the same batches with the same sequences;
//! the broker answers a batch it stored already with its original offsets.
//! Retries go one batch per request, so each batch learns its own offsets
//! even when the first attempt stored only some of them. A request holds
//! at most [`REQUEST_BATCHES_MAX`] batches, the number the broker remembers
//! per producer, so a batch being retried is always one the broker can
//! still recognise.
//!
//! A batch that fails for good leaves a gap in the sequence, and one whose
//! fate is unknown (given up on after a timeout) may or may not be stored:
//! either way the batches after it are renumbered under a new producer
//! epoch, which the broker takes as a fresh start. So does a leader that
//! answers `OutOfOrderSequence` to a single batch after a failover: it lost
//! earlier batches that were acknowledged with `acks=leader` or `none`, and
//! does not have this one.
//!
//! Memory is bounded by `buffer_bytes_max`: a record takes its encoded size
//! from the buffer when it is accepted and gives it back when its batch is
//! acknowledged or fails, so the queues between callers and sender tasks
//! never hold more than that (Kafka's `buffer.memory`). A full buffer makes
//! `send` wait (up to `buffer_wait_max`, Kafka's `max.block.ms`) and sends
//! whatever is pending at once, since waiting for linger would only make
//! the wait longer.
//!
//! A record's bytes are copied once, into its batch; batches reach the
//! socket from where they lie (one vectored write per request).

use crate::client::Client;
use crate::error::{Error, Result};
use crate::retry::{Retrier, RetryPolicy};
use shoal_wire::batch::{
    compute_crc, BatchBuilder, BatchHeader, NewRecord, BATCH_HEADER_BYTES, NO_PRODUCER_ID,
    NO_SEQUENCE,
};
use shoal_wire::{fb, ErrorCode};
use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore, TryAcquireError};

/// How the broker acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// The broker answers once it accepted the batch (nothing waited for).
    None,
    /// The broker answers once the batch is stored per the topic's sync
    /// mode (on disk under `always`). A failover may lose it: a new leader
    /// has only what it had replicated.
    Leader,
    /// The broker answers once every in-sync replica has the batch (and
    /// at least the topic's `min_insync_replicas` are in sync): a failover
    /// to any of them keeps it. Too few in sync is `NotEnoughReplicas`,
    /// retried until the delivery timeout.
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitioner {
    /// Records with a key go to hash(key) % partitions; others round-robin.
    KeyOrRoundRobin,
    /// Every record round-robin, keys ignored.
    RoundRobin,
}

#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub batch_bytes: usize,
    /// How long a batch waits for more records after its first. Zero: no
    /// waiting, but records that arrive while the partition's previous
    /// request is in flight still go out together.
    pub linger: Duration,
    pub acks: Acks,
    /// Producer id and sequence numbers on every batch, so the broker
    /// stores a retried batch once. Off, a retry after a lost answer may
    /// store a batch twice, and each request carries one batch. Default on.
    pub idempotent: bool,
    /// Retries of one batch, at most. Default unbounded: the delivery
    /// timeout bounds them.
    pub retries: u32,
    /// First wait before a retry; it doubles per retry up to
    /// `retry_backoff_max`, each wait drawn between half and all of it.
    /// None after a `NotLeader` that named the leader. Default 50 ms.
    pub retry_backoff: Duration,
    /// Longest wait between retries. Default 1 s.
    pub retry_backoff_max: Duration,
    /// How long a batch may take from being sealed to being acknowledged,
    /// retries included (Kafka's `delivery.timeout.ms`). Past it the
    /// batch's records fail with the last error; a batch not sent by then
    /// is not sent. Default 120 s: longer than a failover takes.
    pub delivery_timeout: Duration,
    pub partitioner: Partitioner,
    /// Bytes of records (encoded) accepted but not yet acknowledged or
    /// failed, over all partitions. Default 32 MiB.
    pub buffer_bytes_max: usize,
    /// How long a send waits for room in a full buffer before it fails
    /// with [`Error::BufferFull`]; `Duration::ZERO` fails at once.
    /// Default 60 s.
    pub buffer_wait_max: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            batch_bytes: 64 * 1024,
            linger: Duration::from_millis(1),
            acks: Acks::Leader,
            idempotent: true,
            retries: u32::MAX,
            retry_backoff: Duration::from_millis(50),
            retry_backoff_max: Duration::from_secs(1),
            delivery_timeout: Duration::from_secs(120),
            partitioner: Partitioner::KeyOrRoundRobin,
            buffer_bytes_max: 32 * 1024 * 1024,
            buffer_wait_max: Duration::from_secs(60),
        }
    }
}

impl ProducerConfig {
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            retries: self.retries,
            backoff: self.retry_backoff,
            backoff_max: self.retry_backoff_max,
            timeout: self.delivery_timeout,
        }
    }
}

/// Where a record was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMetadata {
    pub partition: u32,
    pub offset: u64,
}

/// Why a batch failed: the broker's code if it gave one, and the message.
type Failure = (Option<ErrorCode>, String);

/// The outcome of one batch, shared by the deliveries of its records: one
/// allocation per batch, not per record.
#[derive(Default)]
struct BatchSlot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    /// Base offset, or the failure every record reports.
    result: Option<std::result::Result<u64, Failure>>,
    wakers: Vec<Waker>,
}

impl BatchSlot {
    fn complete(&self, r: std::result::Result<u64, Failure>) {
        let wakers = {
            let mut st = lock(&self.state);
            st.result = Some(r);
            std::mem::take(&mut st.wakers)
        };
        for w in wakers {
            w.wake();
        }
    }
}

fn failure_error((code, message): &Failure) -> Error {
    match code {
        Some(code) => Error::Broker {
            code: *code,
            message: message.clone(),
        },
        None => Error::Undelivered(message.clone()),
    }
}

/// A record's acknowledgement, to await.
pub struct Delivery {
    slot: Arc<BatchSlot>,
    partition: u32,
    index: u32,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("partition", &self.partition)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl std::future::Future for Delivery {
    type Output = Result<RecordMetadata>;
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = lock(&self.slot.state);
        match &st.result {
            Some(Ok(base)) => Poll::Ready(Ok(RecordMetadata {
                partition: self.partition,
                offset: base + u64::from(self.index),
            })),
            Some(Err(f)) => Poll::Ready(Err(failure_error(f))),
            None => {
                if !st.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    st.wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

/// Smallest buffer a new batch starts with.
const BATCH_CAPACITY_BYTES_MIN: usize = 4 * 1024;

struct Pending {
    builder: BatchBuilder,
    slot: Arc<BatchSlot>,
    /// Buffer bytes its records hold.
    buffer_bytes: usize,
    /// Counts sealed batches: a linger timer seals the batch it was armed
    /// for, never a later one.
    generation: u64,
    linger_armed: bool,
}

struct PartitionState {
    pending: Pending,
    /// How the next sealed batch is numbered (the sender renumbers after
    /// a failure).
    numbering: Numbering,
    queue: mpsc::UnboundedSender<Outgoing>,
    /// The sender has a batch to send or is sending one; it clears this
    /// (under the partition table's lock) only when its queue is empty and
    /// nothing pending is due, so a record seen while it is set is sealed
    /// by the sender when it is free.
    sender_busy: bool,
}

/// What a partition's sender task is handed. The queue of these is bounded
/// by the buffer: every batch holds its records' buffer bytes until it is
/// answered, and a flush marker exists only while its `flush` call waits.
enum Outgoing {
    Batch {
        batch: Vec<u8>,
        record_count: u32,
        slot: Arc<BatchSlot>,
        buffer_bytes: usize,
        sealed_at: Instant,
    },
    /// Answered once everything before it is answered: with the first
    /// failure since the previous marker, or success.
    FlushMarker(Arc<BatchSlot>),
}

/// Per topic, per partition; looked up by `&str` without allocating.
type Partitions = HashMap<String, HashMap<u32, PartitionState>>;

/// What sender tasks need. It holds no reference to the partition table,
/// so the table (and its queues) go away with the last [`Producer`], and
/// the sender tasks end once they have sent what was queued.
struct Core {
    client: Client,
    config: ProducerConfig,
    /// One permit per byte of `buffer_bytes_max`.
    buffer: Semaphore,
    buffer_bytes_max: usize,
    /// The incarnation of each topic this producer first wrote to: it never
    /// writes into a topic deleted and re-created under the same name
    /// (the broker refuses such a request with `UnknownTopicId`).
    topic_ids: std::sync::Mutex<HashMap<String, u64>>,
    /// Partitions of each topic as last seen: used while the client has
    /// dropped a topic's placement in a failover, so that sends do not
    /// wait on (or fail with) a metadata refresh; partitions never go
    /// away.
    partition_counts: std::sync::Mutex<HashMap<String, u32>>,
}

impl Core {
    /// The topic id this producer pinned for `topic`, pinning the client's
    /// cached one on first use (0, "any", while none is known).
    fn topic_id(&self, topic: &str) -> u64 {
        let mut ids = self.topic_ids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&id) = ids.get(topic) {
            return id;
        }
        let id = self.client.cached_topic_id(topic);
        if id != 0 {
            ids.insert(topic.to_string(), id);
        }
        id
    }

    fn release(&self, buffer_bytes: usize) {
        if buffer_bytes > 0 {
            self.buffer.add_permits(buffer_bytes);
        }
    }
}

struct Shared {
    core: Arc<Core>,
    producer_id: i64,
    partitions: Mutex<Partitions>,
}

impl Drop for Shared {
    /// Records accepted are sent even if the producer is dropped before
    /// their linger ran out: their deliveries still resolve.
    fn drop(&mut self) {
        let mut parts = lock(&self.partitions);
        for st in parts.values_mut().flat_map(|p| p.values_mut()) {
            seal(&self.core, st);
        }
    }
}

/// Sends records to topics. Clone it freely; clones share batches.
#[derive(Clone)]
pub struct Producer {
    shared: Arc<Shared>,
    round_robin: Arc<AtomicU32>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn record<'a>(key: Option<&'a [u8]>, value: &'a [u8], timestamp_ms: i64) -> NewRecord<'a> {
    NewRecord {
        key,
        value: Some(value),
        headers: &[],
        timestamp_ms,
    }
}

fn hash(key: &[u8]) -> u32 {
    // FNV-1a: stable across processes and versions.
    key.iter().fold(0x811c9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x01000193)
    })
}

/// Adds `n` to a sequence number. Sequences never go negative (a negative
/// one means "none"): after `i32::MAX` comes 0, as in Kafka, and a batch
/// that spans the wrap ends at a small number.
pub(crate) fn seq_add(seq: i32, n: u32) -> i32 {
    ((i64::from(seq) + i64::from(n)).rem_euclid(1 << 31)) as i32
}

/// How a partition's idempotent batches are numbered: producer id, epoch
/// and the next batch's first sequence. Non-idempotent: no producer id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Numbering {
    producer_id: i64,
    epoch: i16,
    next_sequence: i32,
}

impl Numbering {
    fn idempotent(&self) -> bool {
        self.producer_id >= 0
    }

    /// A fresh start after a batch the broker may not have stored: the
    /// next epoch (a higher epoch is a new sequence from 0 to the broker),
    /// or a new producer id once the epoch is spent.
    fn bumped(self) -> Numbering {
        match self.epoch.checked_add(1) {
            Some(epoch) => Numbering {
                epoch,
                next_sequence: 0,
                ..self
            },
            None => Numbering {
                producer_id: new_producer_id(),
                epoch: 0,
                next_sequence: 0,
            },
        }
    }

    /// Numbers `batch` (of `record_count` records) as the next one,
    /// re-sealing it if it carries other numbers (its CRC covers them).
    fn stamp(&mut self, batch: &mut [u8], record_count: u32) {
        if !self.idempotent() {
            return;
        }
        if let Ok(mut h) = BatchHeader::decode(batch) {
            let wanted = (self.producer_id, self.epoch, self.next_sequence);
            if (h.producer_id, h.producer_epoch, h.base_sequence) != wanted {
                h.producer_id = self.producer_id;
                h.producer_epoch = self.epoch;
                h.base_sequence = self.next_sequence;
                h.encode(&mut batch[..BATCH_HEADER_BYTES]);
                h.crc = compute_crc(batch);
                h.encode(&mut batch[..BATCH_HEADER_BYTES]);
            }
        }
        self.next_sequence = seq_add(self.next_sequence, record_count);
    }
}

/// A random producer id: with 63 bits a collision between producers is
/// negligible, and no broker round trip is needed to get one.
fn new_producer_id() -> i64 {
    (rand::random::<u64>() >> 1) as i64
}

/// Turns the pending records into a batch and queues it for the sender.
fn seal(core: &Core, st: &mut PartitionState) {
    let p = &mut st.pending;
    p.linger_armed = false;
    if p.builder.is_empty() {
        return;
    }
    p.generation += 1;
    let record_count = p.builder.record_count();
    let n = &mut st.numbering;
    let seq = if n.idempotent() {
        n.next_sequence
    } else {
        NO_SEQUENCE
    };
    if n.idempotent() {
        n.next_sequence = seq_add(seq, record_count);
    }
    // `finish` hands its buffer over and starts the next batch with one of
    // the same capacity, so it does not grow (and copy) its way up again.
    let batch = p.builder.finish(n.producer_id, n.epoch, seq);
    let slot = std::mem::take(&mut p.slot);
    let buffer_bytes = std::mem::take(&mut p.buffer_bytes);
    st.sender_busy = true;
    let o = Outgoing::Batch {
        batch,
        record_count,
        slot,
        buffer_bytes,
        sealed_at: Instant::now(),
    };
    if let Err(mpsc::error::SendError(Outgoing::Batch {
        slot, buffer_bytes, ..
    })) = st.queue.send(o)
    {
        slot.complete(Err((None, Error::Closed.to_string())));
        core.release(buffer_bytes);
    }
}

impl Producer {
    pub fn new(client: Client, config: ProducerConfig) -> Producer {
        let producer_id = if config.idempotent {
            new_producer_id()
        } else {
            NO_PRODUCER_ID
        };
        let buffer_bytes_max = config.buffer_bytes_max.min(Semaphore::MAX_PERMITS);
        Producer {
            shared: Arc::new(Shared {
                core: Arc::new(Core {
                    client,
                    config,
                    buffer: Semaphore::new(buffer_bytes_max),
                    buffer_bytes_max,
                    topic_ids: Default::default(),
                    partition_counts: Default::default(),
                }),
                producer_id,
                partitions: Mutex::new(HashMap::new()),
            }),
            round_robin: Arc::new(AtomicU32::new(rand::random::<u32>())),
        }
    }

    fn core(&self) -> &Core {
        &self.shared.core
    }

    /// Sends a record and waits for its acknowledgement.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
    ) -> Result<RecordMetadata> {
        self.send_nowait(topic, key, value).await?.await
    }

    /// Queues a record; the returned [`Delivery`] resolves when it is
    /// acknowledged. Records to one partition are stored in call order.
    /// Waits while the buffer is full (see [`ProducerConfig::buffer_wait_max`]).
    pub async fn send_nowait(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
    ) -> Result<Delivery> {
        let partition = self.partition_for(topic, key).await?;
        self.send_nowait_to(topic, partition, key, value).await
    }

    async fn partition_count(&self, topic: &str) -> Result<u32> {
        let core = self.core();
        let known = {
            let cached = core.client.cached_partition_count(topic);
            let mut counts = lock(&core.partition_counts);
            match (cached, counts.get(topic).copied()) {
                (Some(n), Some(known)) if n == known => Some(n),
                (Some(n), _) => {
                    counts.insert(topic.to_string(), n);
                    Some(n)
                }
                (None, known) => known,
            }
        };
        if let Some(n) = known {
            return Ok(n);
        }
        let n = core.client.partition_count(topic).await?;
        lock(&core.partition_counts).insert(topic.to_string(), n);
        Ok(n)
    }

    async fn partition_for(&self, topic: &str, key: Option<&[u8]>) -> Result<u32> {
        let n = self.partition_count(topic).await?;
        if n == 0 {
            return Err(Error::Invalid(format!("topic {topic:?} has no partitions")));
        }
        Ok(match (self.core().config.partitioner, key) {
            (Partitioner::KeyOrRoundRobin, Some(k)) => hash(k) % n,
            _ => self.round_robin.fetch_add(1, Ordering::Relaxed) % n,
        })
    }

    /// Queues a record for a given partition, waiting while the buffer is
    /// full (see [`ProducerConfig::buffer_wait_max`]).
    pub async fn send_nowait_to(
        &self,
        topic: &str,
        partition: u32,
        key: Option<&[u8]>,
        value: &[u8],
    ) -> Result<Delivery> {
        let bytes = record(key, value, 0).encoded_len();
        self.reserve(bytes).await?;
        self.append(topic, partition, &[(key, value)], bytes)
    }

    /// Queues a record for a given partition. Not being async, it cannot
    /// wait: with the buffer full it fails at once with
    /// [`Error::BufferFull`] ([`Self::send_nowait_to`] waits).
    pub fn send_to(
        &self,
        topic: &str,
        partition: u32,
        key: Option<&[u8]>,
        value: &[u8],
    ) -> Result<Delivery> {
        let bytes = record(key, value, 0).encoded_len();
        if !self.try_reserve(self.buffer_permits(bytes)?)? {
            self.seal_all();
            return Err(Error::BufferFull {
                bytes_max: self.core().buffer_bytes_max,
            });
        }
        self.append(topic, partition, &[(key, value)], bytes)
    }

    /// Sends `records` (key, value) to `partition` now, as one batch of
    /// their own, behind whatever was sent to that partition before.
    /// Waits for buffer room like [`Self::send_nowait`]. The delivery
    /// resolves to where the first record was stored; the others follow
    /// it in order. The batch may exceed `batch_bytes` (not the broker's
    /// batch limit).
    pub async fn send_batch(
        &self,
        topic: &str,
        partition: u32,
        records: &[(Option<&[u8]>, &[u8])],
    ) -> Result<Delivery> {
        if records.is_empty() {
            return Err(Error::Invalid("a batch needs at least one record".into()));
        }
        let bytes = records
            .iter()
            .map(|(k, v)| record(*k, v, 0).encoded_len())
            .sum();
        self.reserve(bytes).await?;
        self.append(topic, partition, records, bytes)
    }

    /// Bytes of records accepted and not yet acknowledged or failed.
    pub fn buffered_bytes(&self) -> usize {
        self.core().buffer_bytes_max - self.core().buffer.available_permits()
    }

    fn buffer_permits(&self, bytes: usize) -> Result<u32> {
        let bytes_max = self.core().buffer_bytes_max;
        match u32::try_from(bytes) {
            Ok(n) if bytes <= bytes_max => Ok(n),
            _ => Err(Error::RecordTooLarge { bytes, bytes_max }),
        }
    }

    fn try_reserve(&self, permits: u32) -> Result<bool> {
        match self.core().buffer.try_acquire_many(permits) {
            Ok(p) => {
                // Given back by hand when the record's batch is answered.
                p.forget();
                Ok(true)
            }
            Err(TryAcquireError::NoPermits) => Ok(false),
            Err(TryAcquireError::Closed) => Err(Error::Closed),
        }
    }

    /// Takes `bytes` from the buffer, waiting up to `buffer_wait_max`.
    /// Cancel-safe: a cancelled wait takes nothing.
    async fn reserve(&self, bytes: usize) -> Result<()> {
        let permits = self.buffer_permits(bytes)?;
        if self.try_reserve(permits)? {
            return Ok(());
        }
        self.seal_all();
        let (wait, bytes_max) = (
            self.core().config.buffer_wait_max,
            self.core().buffer_bytes_max,
        );
        if wait.is_zero() {
            return Err(Error::BufferFull { bytes_max });
        }
        match tokio::time::timeout(wait, self.core().buffer.acquire_many(permits)).await {
            Ok(Ok(p)) => {
                p.forget();
                Ok(())
            }
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::BufferFull { bytes_max }),
        }
    }

    /// Sends every pending batch now.
    fn seal_all(&self) {
        let mut parts = lock(&self.shared.partitions);
        for st in parts.values_mut().flat_map(|p| p.values_mut()) {
            seal(&self.shared.core, st);
        }
    }

    fn new_partition(&self, topic: &str, partition: u32) -> PartitionState {
        let (q, rx) = mpsc::unbounded_channel();
        let numbering = Numbering {
            producer_id: self.shared.producer_id,
            epoch: 0,
            next_sequence: 0,
        };
        tokio::spawn(partition_sender(
            self.shared.core.clone(),
            Arc::downgrade(&self.shared),
            topic.to_string(),
            partition,
            numbering,
            rx,
        ));
        PartitionState {
            pending: Pending {
                builder: BatchBuilder::with_capacity(BATCH_CAPACITY_BYTES_MIN),
                slot: Arc::default(),
                buffer_bytes: 0,
                generation: 0,
                linger_armed: false,
            },
            numbering,
            queue: q,
            sender_busy: false,
        }
    }

    /// Adds records whose `buffer_bytes` are already reserved to their
    /// partition (one record: to its pending batch; several: as a batch of
    /// their own); gives the bytes back if that fails.
    fn append(
        &self,
        topic: &str,
        partition: u32,
        records: &[(Option<&[u8]>, &[u8])],
        buffer_bytes: usize,
    ) -> Result<Delivery> {
        let r = self.append_reserved(topic, partition, records, buffer_bytes);
        if r.is_err() {
            self.core().release(buffer_bytes);
        }
        r
    }

    fn append_reserved(
        &self,
        topic: &str,
        partition: u32,
        records: &[(Option<&[u8]>, &[u8])],
        buffer_bytes: usize,
    ) -> Result<Delivery> {
        // Stamped when accepted, after any wait for room, so records of a
        // batch are in time order.
        let timestamp_ms = now_ms();
        let core = &*self.shared.core;
        let cfg = &core.config;
        let mut parts = lock(&self.shared.partitions);
        if !parts.contains_key(topic) {
            parts.insert(topic.to_string(), HashMap::new());
        }
        let by_partition = parts.get_mut(topic).ok_or(Error::Closed)?;
        let st = by_partition
            .entry(partition)
            .or_insert_with(|| self.new_partition(topic, partition));
        let own_batch = records.len() > 1;
        let first_bytes = records
            .first()
            .map_or(0, |(k, v)| record(*k, v, 0).encoded_len());
        if !st.pending.builder.is_empty()
            && (own_batch || st.pending.builder.len() + first_bytes > cfg.batch_bytes)
        {
            seal(core, st);
        }
        let index = st.pending.builder.record_count();
        for (i, (key, value)) in records.iter().enumerate() {
            if let Err(e) = st.pending.builder.push(&record(*key, value, timestamp_ms)) {
                if i > 0 {
                    // Half a batch of our own: drop it, nobody holds a
                    // delivery for it yet.
                    st.pending.builder = BatchBuilder::with_capacity(BATCH_CAPACITY_BYTES_MIN);
                }
                return Err(Error::Invalid(e.to_string()));
            }
        }
        st.pending.buffer_bytes += buffer_bytes;
        let delivery = Delivery {
            slot: st.pending.slot.clone(),
            partition,
            index,
        };
        let due = own_batch
            || st.pending.builder.len() >= cfg.batch_bytes
            || (cfg.linger.is_zero() && !st.sender_busy);
        if due {
            seal(core, st);
        } else if !cfg.linger.is_zero() && !st.pending.linger_armed {
            st.pending.linger_armed = true;
            let (shared, linger, topic) =
                (Arc::downgrade(&self.shared), cfg.linger, topic.to_string());
            let generation = st.pending.generation;
            tokio::spawn(async move {
                tokio::time::sleep(linger).await;
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let mut parts = lock(&shared.partitions);
                if let Some(st) = parts.get_mut(&topic).and_then(|p| p.get_mut(&partition)) {
                    if st.pending.generation == generation {
                        seal(&shared.core, st);
                    }
                }
            });
        }
        Ok(delivery)
    }

    /// Sends everything accepted so far and waits until it is answered.
    /// Fails if anything it waited for failed (the first failure of each
    /// partition since the previous flush, so each is reported once), after
    /// waiting for all of it.
    pub async fn flush(&self) -> Result<()> {
        let mut waits = Vec::new();
        {
            let mut parts = lock(&self.shared.partitions);
            for (&partition, st) in parts.values_mut().flat_map(|p| p.iter_mut()) {
                seal(&self.shared.core, st);
                let slot: Arc<BatchSlot> = Arc::default();
                if st.queue.send(Outgoing::FlushMarker(slot.clone())).is_err() {
                    slot.complete(Err((None, Error::Closed.to_string())));
                }
                waits.push(Delivery {
                    slot,
                    partition,
                    index: 0,
                });
            }
        }
        let mut first_error = None;
        for w in waits {
            if let Err(e) = w.await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Bytes of batches one produce request may carry.
const REQUEST_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Batches one produce request may carry: the number of batches the broker
/// remembers per producer to recognise retries (`PRODUCER_BATCHES_KEPT` in
/// `shard/src/limits.rs`). With more, a request whose batches were all
/// stored but whose answer was lost could not be retried: the broker would
/// have forgotten the first of them and refuse it as out of order.
pub const REQUEST_BATCHES_MAX: usize = 5;

/// How long a produce asks the broker to wait for its acknowledgement
/// (`acks=all`: for the in-sync replicas) before answering `Timeout`.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// One batch of a request, until it is answered.
struct InFlight {
    batch: Vec<u8>,
    record_count: u32,
    slot: Arc<BatchSlot>,
    buffer_bytes: usize,
    /// When its delivery timeout runs out.
    deadline: Instant,
    /// Sent at least once: its fate may be unknown.
    sent: bool,
    /// Its base offset, or why it failed.
    outcome: Option<std::result::Result<u64, Failure>>,
}

/// One partition's batches, sent in order, one request at a time; batches
/// queued while a request is in flight travel together in the next (up to
/// [`REQUEST_BATCHES_MAX`], or one at a time without idempotence).
async fn partition_sender(
    core: Arc<Core>,
    table: Weak<Shared>,
    topic: String,
    partition: u32,
    mut numbering: Numbering,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    // Taken from `rx` to be renumbered, still in order (see `renumber`).
    let mut backlog: VecDeque<Outgoing> = VecDeque::new();
    let mut unreported: Option<Failure> = None;
    let batches_max = if numbering.idempotent() {
        REQUEST_BATCHES_MAX
    } else {
        1
    };
    let delivery_timeout = core.config.delivery_timeout;
    loop {
        if backlog.is_empty() && rx.is_empty() {
            going_idle(&core, &table, &topic, partition, &rx);
        }
        let mut group: Vec<InFlight> = Vec::new();
        let mut payload_bytes = 0;
        while group.len() < batches_max {
            let o = match backlog.pop_front() {
                Some(o) => o,
                None if group.is_empty() => match rx.recv().await {
                    Some(o) => o,
                    None => return,
                },
                None => match rx.try_recv() {
                    Ok(o) => o,
                    Err(_) => break,
                },
            };
            match o {
                Outgoing::FlushMarker(slot) if group.is_empty() => {
                    slot.complete(unreported.take().map_or(Ok(0), Err));
                }
                Outgoing::Batch {
                    mut batch,
                    record_count,
                    slot,
                    buffer_bytes,
                    sealed_at,
                } if group.is_empty() || payload_bytes + batch.len() <= REQUEST_BYTES_MAX => {
                    payload_bytes += batch.len();
                    numbering.stamp(&mut batch, record_count);
                    group.push(InFlight {
                        batch,
                        record_count,
                        slot,
                        buffer_bytes,
                        deadline: sealed_at + delivery_timeout,
                        sent: false,
                        outcome: None,
                    });
                }
                o => {
                    backlog.push_front(o);
                    break;
                }
            }
        }
        if group.is_empty() {
            continue;
        }
        let renumbered = deliver(&core, &topic, partition, &mut group, &mut numbering).await;
        if renumbered {
            renumber(&table, &topic, partition, &numbering, &mut backlog, &mut rx);
        }
        // Room first, then the answers: whoever sees a delivery complete
        // also sees its bytes out of the buffer.
        core.release(group.iter().map(|b| b.buffer_bytes).sum());
        for b in group {
            let outcome = b
                .outcome
                .unwrap_or_else(|| Err((None, "not sent (the producer stopped)".into())));
            if let Err(f) = &outcome {
                unreported.get_or_insert_with(|| f.clone());
            }
            b.slot.complete(outcome);
        }
    }
}

/// After the sender changed the numbering: batches sealed from now on
/// follow it, after those queued already (which the sender re-stamps as it
/// takes them). Under the partition table's lock, so no seal slips in
/// between; the queue is moved to `backlog` to count it.
fn renumber(
    table: &Weak<Shared>,
    topic: &str,
    partition: u32,
    numbering: &Numbering,
    backlog: &mut VecDeque<Outgoing>,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
) {
    let Some(shared) = table.upgrade() else {
        // No producer left to seal anything.
        return;
    };
    let mut parts = lock(&shared.partitions);
    while let Ok(o) = rx.try_recv() {
        backlog.push_back(o);
    }
    let mut after = *numbering;
    for o in backlog.iter() {
        if let Outgoing::Batch { record_count, .. } = o {
            after.next_sequence = seq_add(after.next_sequence, *record_count);
        }
    }
    if let Some(st) = parts.get_mut(topic).and_then(|p| p.get_mut(&partition)) {
        st.numbering = after;
    }
}

/// Sends one group of a partition's batches until each is acknowledged or
/// has failed for good, setting each one's outcome. Returns whether the
/// numbering changed (the batches queued behind must follow it).
async fn deliver(
    core: &Core,
    topic: &str,
    partition: u32,
    group: &mut [InFlight],
    numbering: &mut Numbering,
) -> bool {
    let cfg = &core.config;
    let policy = cfg.retry_policy();
    let idempotent = numbering.idempotent();
    let mut renumbered = false;
    // The first batch not yet answered.
    let mut i = 0;
    // One batch per request: after any failure, so that each learns its
    // own offsets and its own verdict.
    let mut single = group.len() == 1;
    let mut retry = Retrier::until(policy, group[0].deadline);
    let mut refreshed_unknown = false;
    let mut gap_renumbered: Option<usize> = None;
    // Why batch `i`'s last attempt failed: what it fails with if its time
    // runs out.
    let mut last: Option<Failure> = None;
    while i < group.len() {
        if Instant::now() >= group[i].deadline {
            let failure = last.take().unwrap_or_else(|| {
                (
                    Some(ErrorCode::Timeout),
                    format!(
                        "not acknowledged within the delivery timeout of {:?}",
                        cfg.delivery_timeout
                    ),
                )
            });
            i = give_up(group, i, failure, numbering, &mut renumbered);
            retry = next_retrier(group, i, policy);
            continue;
        }
        let end = if single { i + 1 } else { group.len() };
        for b in &mut group[i..end] {
            b.sent = true;
        }
        let (r, sent_to) = {
            let parts: Vec<&[u8]> = group[i..end].iter().map(|b| b.batch.as_slice()).collect();
            let topic_id = core.topic_id(topic);
            // Only acks=all asks the broker to hold the request (for the
            // replicas); others are answered once stored.
            let held = if cfg.acks == Acks::All {
                ACK_WAIT
            } else {
                Duration::ZERO
            };
            let mut send = |conn: Arc<crate::connection::Connection>| {
                let parts = &parts;
                async move { produce_parts(&conn, topic, topic_id, partition, cfg.acks, parts).await }
            };
            let attempt = core.client.attempt(topic, partition, held, &mut send);
            // Never past the delivery timeout: the answer may still come,
            // but the caller was promised one by then.
            match tokio::time::timeout_at(group[i].deadline.into(), attempt).await {
                Ok(r) => r,
                // Given up at the top of the loop, with the last error.
                Err(_) => continue,
            }
        };
        let e = match r {
            Ok(p) => {
                let records: u64 = group[i..end]
                    .iter()
                    .map(|b| u64::from(b.record_count))
                    .sum();
                let span = p.last_offset.checked_sub(p.base_offset).map(|d| d + 1);
                if end - i == 1 || span == Some(records) {
                    // One batch, or several stored back to back.
                    let mut offset = p.base_offset;
                    for b in &mut group[i..end] {
                        b.outcome = Some(Ok(offset));
                        offset += u64::from(b.record_count);
                    }
                    i = end;
                    last = None;
                    retry = next_retrier(group, i, policy);
                } else {
                    // Stored, but not back to back (a retry answered for
                    // some, or another producer's batches between): each
                    // alone again is answered with its own offsets.
                    single = true;
                }
                continue;
            }
            Err(e) => e,
        };
        if e.code() == Some(ErrorCode::OutOfOrderSequence) && idempotent {
            if end - i > 1 {
                // Which batch? Each alone says; those stored come back as
                // duplicates.
                single = true;
                continue;
            }
            if gap_renumbered != Some(i) {
                // A single batch refused as out of order was not stored
                // (were it stored, it would be among the last batches the
                // broker remembers, a request never holding more): the
                // leader lacks batches before it, acknowledged without
                // `acks=all` and lost in a failover. Start afresh.
                tracing::warn!(
                    topic,
                    partition,
                    error = %e,
                    "the partition's leader lacks earlier batches of this producer \
                     (lost in a failover?); renumbering under a new producer epoch"
                );
                gap_renumbered = Some(i);
                *numbering = numbering.bumped();
                for b in &mut group[i..] {
                    numbering.stamp(&mut b.batch, b.record_count);
                }
                renumbered = true;
                continue;
            }
        }
        last = Some((e.code(), e.to_string()));
        let unknown_once = e.is_unknown_placement() && sent_to.is_some() && !refreshed_unknown;
        refreshed_unknown |= e.is_unknown_placement();
        if e.is_retriable() || unknown_once {
            let at_once = core.client.reroute(topic, partition, sent_to, &e);
            if let Some(wait) = retry.next_wait(at_once) {
                tracing::debug!(error = %e, topic, partition, attempt = retry.attempts(), ?wait, "produce failed; retrying");
                single |= end - i > 1;
                tokio::time::sleep(wait).await;
                continue;
            }
        } else if end - i > 1 {
            // The broker checks every batch of a request before it stores
            // any, so none of these is stored: each alone finds the one it
            // refuses.
            single = true;
            continue;
        }
        let failure: Failure = (e.code(), e.to_string());
        let retriable = e.is_retriable();
        last = None;
        i = give_up(group, i, failure.clone(), numbering, &mut renumbered);
        if retriable {
            // Out of time or retries: so are the batches behind it whose
            // deadline has passed too.
            while i < group.len() && Instant::now() >= group[i].deadline {
                i = give_up(group, i, failure.clone(), numbering, &mut renumbered);
            }
        }
        retry = next_retrier(group, i, policy);
    }
    renumbered
}

/// Fails batch `i` and renumbers the ones after it: under a new epoch if
/// it was sent (the broker may or may not have it, so the sequence it
/// expects next is unknown), else from its own first sequence (the broker
/// never saw it). Returns the next batch's index.
fn give_up(
    group: &mut [InFlight],
    i: usize,
    failure: Failure,
    numbering: &mut Numbering,
    renumbered: &mut bool,
) -> usize {
    group[i].outcome = Some(Err(failure));
    if numbering.idempotent() {
        if group[i].sent {
            *numbering = numbering.bumped();
        } else if let Ok(h) = BatchHeader::decode(&group[i].batch) {
            numbering.next_sequence = h.base_sequence;
        }
        for b in &mut group[i + 1..] {
            numbering.stamp(&mut b.batch, b.record_count);
        }
        *renumbered = true;
    }
    i + 1
}

fn next_retrier(group: &[InFlight], i: usize, policy: RetryPolicy) -> Retrier {
    let deadline = group.get(i).map_or_else(Instant::now, |b| b.deadline);
    Retrier::until(policy, deadline)
}

/// The sender is about to wait for work: with a linger of zero, what
/// accumulated while it was busy goes now; otherwise it is marked free, so
/// the next record (linger zero) is sealed at once by whoever sends it.
fn going_idle(
    core: &Core,
    table: &Weak<Shared>,
    topic: &str,
    partition: u32,
    rx: &mpsc::UnboundedReceiver<Outgoing>,
) {
    let Some(shared) = table.upgrade() else {
        return;
    };
    let mut parts = lock(&shared.partitions);
    let Some(st) = parts.get_mut(topic).and_then(|p| p.get_mut(&partition)) else {
        return;
    };
    // Checked again under the lock every seal holds: nothing can be queued
    // between this check and clearing the flag.
    if !rx.is_empty() {
        return;
    }
    st.sender_busy = false;
    if core.config.linger.is_zero() {
        seal(core, st);
    }
}

/// What a produce request was answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    /// Offset of the first record of the first batch.
    pub base_offset: u64,
    /// Offset of the last record of the last batch.
    pub last_offset: u64,
    /// Every batch was an idempotent retry of one already stored.
    pub duplicate: bool,
}

/// Sends record batches (built already, back to back) to one partition over
/// `conn`: the request under [`Producer`], for callers that build batches
/// themselves.
pub async fn produce_batches(
    conn: &crate::connection::Connection,
    topic: &str,
    partition: u32,
    acks: Acks,
    payload: &[u8],
) -> Result<Produced> {
    produce_parts(conn, topic, 0, partition, acks, &[payload]).await
}

/// Like [`produce_batches`], with the batches where they lie.
async fn produce_parts(
    conn: &crate::connection::Connection,
    topic: &str,
    topic_id: u64,
    partition: u32,
    acks: Acks,
    batches: &[&[u8]],
) -> Result<Produced> {
    let acks = match acks {
        Acks::None => fb::Acks::None,
        Acks::Leader => fb::Acks::Leader,
        Acks::All => fb::Acks::All,
    };
    let f = conn
        .request_parts(
            fb::RequestBody::ProduceRequest,
            |fbb| {
                let t = fbb.create_string(topic);
                fb::ProduceRequest::create(
                    fbb,
                    &fb::ProduceRequestArgs {
                        topic: Some(t),
                        topic_id,
                        partition,
                        acks,
                        timeout_ms: ACK_WAIT.as_millis() as u32,
                    },
                )
                .as_union_value()
            },
            batches,
        )
        .await?;
    let resp = f.response();
    let p = resp
        .body_as_produce_response()
        .ok_or_else(|| Error::Protocol("expected a produce response".into()))?;
    Ok(Produced {
        base_offset: p.base_offset(),
        last_offset: p.last_offset(),
        duplicate: p.duplicate(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_broker::{FakeBroker, ProduceMode};
    use shoal_wire::batch::RECORD_FIXED_BYTES;
    use shoal_wire::ErrorCode;

    const VALUE_BYTES: usize = 100;
    const RECORD_BYTES: usize = RECORD_FIXED_BYTES + VALUE_BYTES;

    /// A producer whose buffer holds exactly three records and whose
    /// batches go out only when something forces them (linger of an hour).
    async fn three_record_producer(fake: &FakeBroker, wait: Duration) -> Producer {
        let client = Client::connect(&fake.addr_string()).await.expect("connect");
        Producer::new(
            client,
            ProducerConfig {
                linger: Duration::from_secs(3600),
                buffer_bytes_max: 3 * RECORD_BYTES,
                buffer_wait_max: wait,
                retries: 0,
                ..ProducerConfig::default()
            },
        )
    }

    /// `send` waits while the buffer is full and goes on once acknowledgements
    /// free room; a full buffer sends what is pending rather than wait for
    /// the linger.
    #[tokio::test]
    async fn send_waits_for_acks_to_free_the_buffer() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        fake.set_produce_mode(ProduceMode::Hold);
        let p = three_record_producer(&fake, Duration::from_secs(30)).await;
        let value = [7u8; VALUE_BYTES];
        let mut first = Vec::new();
        for _ in 0..3 {
            first.push(p.send_nowait("t", None, &value).await.expect("room"));
        }
        assert_eq!(p.buffered_bytes(), 3 * RECORD_BYTES);
        let p2 = p.clone();
        let fourth = tokio::spawn(async move { p2.send("t", None, &value).await });
        fake.wait_held(1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!fourth.is_finished(), "a send into a full buffer must wait");
        assert_eq!(p.buffered_bytes(), 3 * RECORD_BYTES);
        assert!(fake.release(None));
        for (i, d) in first.into_iter().enumerate() {
            assert_eq!(d.await.expect("acknowledged").offset, i as u64);
        }
        // The fourth record goes out on its own once it is accepted; the
        // linger would hold it for an hour, so flush.
        fake.set_produce_mode(ProduceMode::Ack);
        p.flush().await.expect("flush");
        let m = fourth
            .await
            .expect("task")
            .expect("sent after room was freed");
        assert_eq!(m.offset, 3);
        assert_eq!(p.buffered_bytes(), 0);
    }

    /// With `buffer_wait_max` zero a full buffer fails the send at once,
    /// async or not, with `BufferFull`; room comes back when batches are
    /// answered.
    #[tokio::test]
    async fn full_buffer_fails_at_once_without_a_wait() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        fake.set_produce_mode(ProduceMode::Hold);
        let p = three_record_producer(&fake, Duration::ZERO).await;
        let value = [7u8; VALUE_BYTES];
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(p.send_to("t", 0, None, &value).expect("room"));
        }
        let e = p.send_nowait("t", None, &value).await.expect_err("full");
        assert!(
            matches!(e, Error::BufferFull { bytes_max } if bytes_max == 3 * RECORD_BYTES),
            "{e}"
        );
        let e = p.send_to("t", 0, None, &value).expect_err("full");
        assert!(matches!(e, Error::BufferFull { .. }), "{e}");
        fake.wait_held(1).await;
        assert!(fake.release(None));
        for d in held {
            d.await.expect("acknowledged");
        }
        assert_eq!(p.buffered_bytes(), 0);
        assert!(p.send_to("t", 0, None, &value).is_ok());
    }

    /// A send gives up after `buffer_wait_max` if no room comes.
    #[tokio::test]
    async fn wait_for_room_is_bounded() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        fake.set_produce_mode(ProduceMode::Hold);
        let wait = Duration::from_millis(150);
        let p = three_record_producer(&fake, wait).await;
        let value = [7u8; VALUE_BYTES];
        for _ in 0..3 {
            p.send_to("t", 0, None, &value).expect("room");
        }
        let t0 = std::time::Instant::now();
        let e = p.send("t", None, &value).await.expect_err("full");
        assert!(matches!(e, Error::BufferFull { .. }), "{e}");
        assert!(t0.elapsed() >= wait);
    }

    /// Failed batches give their bytes back as acknowledged ones do, and a
    /// record that could never fit is refused rather than waited for.
    #[tokio::test]
    async fn failures_free_the_buffer_and_oversized_records_are_refused() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        fake.set_produce_mode(ProduceMode::Fail(ErrorCode::CorruptBatch));
        let p = three_record_producer(&fake, Duration::from_secs(5)).await;
        let value = [7u8; VALUE_BYTES];
        let d = p.send_to("t", 0, None, &value).expect("room");
        assert!(p.flush().await.is_err());
        assert!(d.await.is_err());
        assert_eq!(p.buffered_bytes(), 0);
        let big = vec![0u8; 3 * RECORD_BYTES];
        let e = p.send("t", None, &big).await.expect_err("too large");
        assert!(matches!(e, Error::RecordTooLarge { .. }), "{e}");
        assert_eq!(p.buffered_bytes(), 0);
    }

    fn producer_with(client: Client, linger: Duration, batch_bytes: usize) -> Producer {
        Producer::new(
            client,
            ProducerConfig {
                linger,
                batch_bytes,
                retries: 0,
                ..ProducerConfig::default()
            },
        )
    }

    /// `flush` fails if any batch it waited for failed, not only the last
    /// one of each partition; it reports each failure once.
    #[tokio::test]
    async fn flush_reports_an_earlier_failed_batch() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        fake.set_produce_mode(ProduceMode::Hold);
        let client = Client::connect(&fake.addr_string()).await.expect("connect");
        // Every record is a batch of its own.
        let p = producer_with(client, Duration::from_secs(3600), 1);
        let first = p.send_to("t", 0, None, b"one").expect("room");
        fake.wait_held(1).await;
        // Queued behind the first request: it goes in a second one.
        let second = p.send_to("t", 0, None, b"two").expect("room");
        let p2 = p.clone();
        let flush = tokio::spawn(async move { p2.flush().await });
        assert!(fake.release(Some(ErrorCode::CorruptBatch)));
        fake.wait_held(1).await;
        assert!(fake.release(None));
        let r = flush.await.expect("task");
        assert!(
            matches!(
                &r,
                Err(Error::Broker {
                    code: ErrorCode::CorruptBatch,
                    ..
                })
            ),
            "{r:?}"
        );
        assert!(first.await.is_err());
        assert_eq!(second.await.expect("stored").offset, 0);
        fake.set_produce_mode(ProduceMode::Ack);
        p.flush().await.expect("nothing failed since");
    }

    /// A linger timer armed for a batch that was sealed early (by size)
    /// does not seal the next batch: every batch waits its full linger.
    #[tokio::test]
    async fn a_stale_linger_timer_does_not_seal_the_next_batch() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        let client = Client::connect(&fake.addr_string()).await.expect("connect");
        let linger = Duration::from_millis(400);
        let value = [1u8; VALUE_BYTES];
        // Two records fill a batch.
        let p = producer_with(client, linger, 2 * RECORD_BYTES + 64);
        let a = p.send_to("t", 0, None, &value).expect("room");
        let b = p.send_to("t", 0, None, &value).expect("room");
        a.await.expect("sealed by size");
        b.await.expect("sealed by size");
        tokio::time::sleep(linger / 2).await;
        let t0 = std::time::Instant::now();
        p.send_to("t", 0, None, &value)
            .expect("room")
            .await
            .expect("stored");
        let waited = t0.elapsed();
        assert!(
            waited >= linger * 9 / 10,
            "sealed after {waited:?}, linger is {linger:?}"
        );
    }

    /// With a linger of zero, records sent while the partition's request is
    /// in flight go out together as one batch, not one batch each.
    #[tokio::test]
    async fn linger_zero_batches_what_arrives_during_a_request() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        fake.set_produce_mode(ProduceMode::Hold);
        let client = Client::connect(&fake.addr_string()).await.expect("connect");
        let p = producer_with(client, Duration::ZERO, 64 * 1024);
        let mut ds = vec![p.send_to("t", 0, None, b"first").expect("room")];
        fake.wait_held(1).await;
        for i in 0..9 {
            ds.push(
                p.send_to("t", 0, None, format!("r{i}").as_bytes())
                    .expect("room"),
            );
        }
        fake.set_produce_mode(ProduceMode::Ack);
        assert!(fake.release(None));
        for (i, d) in ds.into_iter().enumerate() {
            assert_eq!(d.await.expect("stored").offset, i as u64);
        }
        let counts: Vec<Vec<u32>> = fake
            .produces()
            .iter()
            .map(|c| c.headers.iter().map(|h| h.record_count).collect())
            .collect();
        assert_eq!(counts, [vec![1], vec![9]]);
    }

    /// `send_batch` sends its records at once as one batch, behind what was
    /// pending for the partition.
    #[tokio::test]
    async fn send_batch_sends_its_records_now_as_one_batch() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        let client = Client::connect(&fake.addr_string()).await.expect("connect");
        let p = producer_with(client, Duration::from_secs(3600), 64 * 1024);
        let pending = p.send_to("t", 0, None, b"pending").expect("room");
        let batch = p
            .send_batch("t", 0, &[(None, b"a"), (Some(b"k"), b"b"), (None, b"c")])
            .await
            .expect("room");
        let t0 = std::time::Instant::now();
        assert_eq!(batch.await.expect("stored").offset, 1);
        assert_eq!(pending.await.expect("stored").offset, 0);
        assert!(t0.elapsed() < Duration::from_secs(5));
        let counts: Vec<u32> = fake
            .produces()
            .iter()
            .flat_map(|c| c.headers.iter().map(|h| h.record_count))
            .collect();
        assert_eq!(counts, [1, 3]);
        assert!(p.send_batch("t", 0, &[]).await.is_err());
    }

    /// Dropping the producer sends what it accepted; the deliveries resolve.
    #[tokio::test]
    async fn dropping_the_producer_still_sends_what_it_accepted() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        let client = Client::connect(&fake.addr_string()).await.expect("connect");
        let p = producer_with(client, Duration::from_secs(3600), 64 * 1024);
        let d = p.send_to("t", 0, None, b"last words").expect("room");
        drop(p);
        let m = tokio::time::timeout(Duration::from_secs(5), d)
            .await
            .expect("delivered without waiting for the linger")
            .expect("stored");
        assert_eq!(m.offset, 0);
    }
}
