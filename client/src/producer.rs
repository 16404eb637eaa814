//! The producer: batching by size and linger, partitioning, acks,
//! idempotence and retries (L1, C3).
//!
//! Records for one partition accumulate in a [`BatchBuilder`]; a batch is
//! sent when it reaches `batch_bytes` or `linger` after its first record.
//! Each partition has one sender task that sends its batches in order, one
//! at a time, so with idempotence on (the default) a retry after an error
//! carries the same producer id and sequence and the broker never writes it
//! twice.
//!
//! Memory is bounded by `buffer_bytes_max`: a record takes its encoded size
//! from the buffer when it is accepted and gives it back when its batch is
//! acknowledged or fails, so the queues between callers and sender tasks
//! never hold more than that (Kafka's `buffer.memory`). A full buffer makes
//! `send` wait (up to `buffer_wait_max`, Kafka's `max.block.ms`) and sends
//! whatever is pending at once, since waiting for linger would only make
//! the wait longer.

use crate::client::Client;
use crate::error::{Error, Result};
use shoal_wire::batch::{BatchBuilder, NewRecord, NO_PRODUCER_ID, NO_SEQUENCE};
use shoal_wire::fb;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore, TryAcquireError};

/// How the broker acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// The broker answers once it accepted the batch (nothing waited for).
    None,
    /// The broker answers once the batch is stored per the topic's sync
    /// mode (on disk under `always`).
    Leader,
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
    pub linger: Duration,
    pub acks: Acks,
    pub idempotent: bool,
    pub retries: u32,
    pub retry_backoff: Duration,
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
            retries: 10,
            retry_backoff: Duration::from_millis(100),
            partitioner: Partitioner::KeyOrRoundRobin,
            buffer_bytes_max: 32 * 1024 * 1024,
            buffer_wait_max: Duration::from_secs(60),
        }
    }
}

/// Where a record was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMetadata {
    pub partition: u32,
    pub offset: u64,
}

/// The outcome of one batch, shared by the deliveries of its records: one
/// allocation per batch, not per record.
#[derive(Default)]
struct BatchSlot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    /// Base offset, or the error (code and message) every record reports.
    result: Option<std::result::Result<u64, (Option<shoal_wire::ErrorCode>, String)>>,
    wakers: Vec<Waker>,
}

impl BatchSlot {
    fn complete(&self, r: std::result::Result<u64, (Option<shoal_wire::ErrorCode>, String)>) {
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
            Some(Err((Some(code), message))) => Poll::Ready(Err(Error::Broker {
                code: *code,
                message: message.clone(),
            })),
            Some(Err((None, message))) => Poll::Ready(Err(Error::Protocol(message.clone()))),
            None => {
                if !st.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    st.wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

struct Pending {
    builder: BatchBuilder,
    slot: Arc<BatchSlot>,
    linger_armed: bool,
    /// Buffer bytes its records hold.
    buffer_bytes: usize,
}

struct PartitionState {
    pending: Pending,
    next_sequence: i32,
    queue: mpsc::UnboundedSender<Outgoing>,
}

/// A sealed batch on its way to the partition's sender task. The queue of
/// these is bounded by the buffer: every batch holds its records' buffer
/// bytes until it is answered (flush markers hold none, and there is at
/// most one per waiting `flush` call).
struct Outgoing {
    batch: Vec<u8>,
    slot: Arc<BatchSlot>,
    buffer_bytes: usize,
}

/// Per topic, per partition; looked up by `&str` without allocating.
type Partitions = HashMap<String, HashMap<u32, PartitionState>>;

struct Shared {
    client: Client,
    config: ProducerConfig,
    producer_id: i64,
    partitions: Mutex<Partitions>,
    /// One permit per byte of `buffer_bytes_max`.
    buffer: Semaphore,
    buffer_bytes_max: usize,
}

impl Shared {
    fn release(&self, buffer_bytes: usize) {
        if buffer_bytes > 0 {
            self.buffer.add_permits(buffer_bytes);
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

impl Producer {
    pub fn new(client: Client, config: ProducerConfig) -> Producer {
        // A random id: with 63 bits a collision between producers is
        // negligible, and no broker round trip is needed to get one.
        let producer_id = if config.idempotent {
            (rand::random::<u64>() >> 1) as i64
        } else {
            NO_PRODUCER_ID
        };
        let buffer_bytes_max = config.buffer_bytes_max.min(Semaphore::MAX_PERMITS);
        Producer {
            shared: Arc::new(Shared {
                client,
                config,
                producer_id,
                partitions: Mutex::new(HashMap::new()),
                buffer: Semaphore::new(buffer_bytes_max),
                buffer_bytes_max,
            }),
            round_robin: Arc::new(AtomicU32::new(rand::random::<u32>())),
        }
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
        let n = self.shared.client.partition_count(topic).await?;
        if n == 0 {
            return Err(Error::Invalid(format!("topic {topic:?} has no partitions")));
        }
        let partition = match (self.shared.config.partitioner, key) {
            (Partitioner::KeyOrRoundRobin, Some(k)) => hash(k) % n,
            _ => self.round_robin.fetch_add(1, Ordering::Relaxed) % n,
        };
        self.send_nowait_to(topic, partition, key, value).await
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
        self.append(topic, partition, key, value, bytes)
    }

    /// Bytes of records accepted and not yet acknowledged or failed.
    pub fn buffered_bytes(&self) -> usize {
        self.shared.buffer_bytes_max - self.shared.buffer.available_permits()
    }

    fn buffer_permits(&self, bytes: usize) -> Result<u32> {
        let bytes_max = self.shared.buffer_bytes_max;
        match u32::try_from(bytes) {
            Ok(n) if bytes <= bytes_max => Ok(n),
            _ => Err(Error::RecordTooLarge { bytes, bytes_max }),
        }
    }

    fn try_reserve(&self, permits: u32) -> Result<bool> {
        match self.shared.buffer.try_acquire_many(permits) {
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
            self.shared.config.buffer_wait_max,
            self.shared.buffer_bytes_max,
        );
        if wait.is_zero() {
            return Err(Error::BufferFull { bytes_max });
        }
        match tokio::time::timeout(wait, self.shared.buffer.acquire_many(permits)).await {
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
            Self::seal(&self.shared, st);
        }
    }

    fn new_partition(&self, topic: &str, partition: u32) -> PartitionState {
        let (q, rx) = mpsc::unbounded_channel();
        tokio::spawn(partition_sender(
            self.shared.clone(),
            topic.to_string(),
            partition,
            rx,
        ));
        PartitionState {
            pending: Pending {
                builder: BatchBuilder::with_capacity(self.shared.config.batch_bytes),
                slot: Arc::default(),
                linger_armed: false,
                buffer_bytes: 0,
            },
            next_sequence: 0,
            queue: q,
        }
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
                bytes_max: self.shared.buffer_bytes_max,
            });
        }
        self.append(topic, partition, key, value, bytes)
    }

    /// Adds a record whose `buffer_bytes` are already reserved to its
    /// partition's pending batch; gives them back if it fails.
    fn append(
        &self,
        topic: &str,
        partition: u32,
        key: Option<&[u8]>,
        value: &[u8],
        buffer_bytes: usize,
    ) -> Result<Delivery> {
        let r = self.append_reserved(topic, partition, key, value, buffer_bytes);
        if r.is_err() {
            self.shared.release(buffer_bytes);
        }
        r
    }

    fn append_reserved(
        &self,
        topic: &str,
        partition: u32,
        key: Option<&[u8]>,
        value: &[u8],
        buffer_bytes: usize,
    ) -> Result<Delivery> {
        // Stamped when accepted, after any wait for room, so records of a
        // batch are in time order.
        let record = record(key, value, now_ms());
        let cfg = &self.shared.config;
        let mut parts = lock(&self.shared.partitions);
        if !parts.contains_key(topic) {
            parts.insert(topic.to_string(), HashMap::new());
        }
        let by_partition = parts.get_mut(topic).ok_or(Error::Closed)?;
        let st = by_partition
            .entry(partition)
            .or_insert_with(|| self.new_partition(topic, partition));
        if !st.pending.builder.is_empty()
            && st.pending.builder.len() + record.encoded_len() > cfg.batch_bytes
        {
            Self::seal(&self.shared, st);
        }
        let index = st.pending.builder.record_count();
        st.pending
            .builder
            .push(&record)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        st.pending.buffer_bytes += buffer_bytes;
        let delivery = Delivery {
            slot: st.pending.slot.clone(),
            partition,
            index,
        };
        if st.pending.builder.len() >= cfg.batch_bytes || cfg.linger.is_zero() {
            Self::seal(&self.shared, st);
        } else if !st.pending.linger_armed {
            st.pending.linger_armed = true;
            let (shared, linger, topic) = (self.shared.clone(), cfg.linger, topic.to_string());
            tokio::spawn(async move {
                tokio::time::sleep(linger).await;
                let mut parts = lock(&shared.partitions);
                if let Some(st) = parts.get_mut(&topic).and_then(|p| p.get_mut(&partition)) {
                    if st.pending.linger_armed {
                        Self::seal(&shared, st);
                    }
                }
            });
        }
        Ok(delivery)
    }

    /// Turns the pending records into a batch and queues it for sending.
    fn seal(shared: &Shared, st: &mut PartitionState) {
        st.pending.linger_armed = false;
        if st.pending.builder.is_empty() {
            return;
        }
        let count = st.pending.builder.record_count() as i32;
        let seq = if shared.producer_id >= 0 {
            st.next_sequence
        } else {
            NO_SEQUENCE
        };
        st.next_sequence = st.next_sequence.wrapping_add(count) & i32::MAX;
        let batch = st.pending.builder.finish(shared.producer_id, 0, seq);
        let slot = std::mem::take(&mut st.pending.slot);
        let buffer_bytes = std::mem::take(&mut st.pending.buffer_bytes);
        if let Err(mpsc::error::SendError(o)) = st.queue.send(Outgoing {
            batch,
            slot,
            buffer_bytes,
        }) {
            o.slot.complete(Err((None, Error::Closed.to_string())));
            shared.release(o.buffer_bytes);
        }
    }

    /// Sends everything queued so far and waits for it.
    pub async fn flush(&self) -> Result<()> {
        let mut waits = Vec::new();
        {
            let mut parts = lock(&self.shared.partitions);
            for (&partition, st) in parts.values_mut().flat_map(|p| p.iter_mut()) {
                let slot = if st.pending.builder.is_empty() {
                    // A marker behind everything queued: the sender answers
                    // it once all earlier batches are answered.
                    let slot: Arc<BatchSlot> = Arc::default();
                    let _ = st.queue.send(Outgoing {
                        batch: Vec::new(),
                        slot: slot.clone(),
                        buffer_bytes: 0,
                    });
                    slot
                } else {
                    let slot = st.pending.slot.clone();
                    Self::seal(&self.shared, st);
                    slot
                };
                waits.push(Delivery {
                    slot,
                    partition,
                    index: 0,
                });
            }
        }
        for w in waits {
            w.await?;
        }
        Ok(())
    }
}

/// Bytes of batches one produce request may carry.
const REQUEST_BYTES_MAX: usize = 4 * 1024 * 1024;

async fn partition_sender(
    shared: Arc<Shared>,
    topic: String,
    partition: u32,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut next: Option<Outgoing> = None;
    loop {
        let first = match next.take() {
            Some(o) => o,
            None => match rx.recv().await {
                Some(o) => o,
                None => return,
            },
        };
        if first.batch.is_empty() {
            first.slot.complete(Ok(0));
            continue;
        }
        // Everything queued behind it goes in the same request: batches
        // sealed while the previous request was in flight travel together.
        let mut payload = first.batch;
        let mut groups = vec![(
            shoal_wire::BatchHeader::decode(&payload).map_or(0, |h| h.record_count),
            first.slot,
        )];
        let mut buffer_bytes = first.buffer_bytes;
        while payload.len() < REQUEST_BYTES_MAX {
            match rx.try_recv() {
                Ok(o)
                    if !o.batch.is_empty()
                        && payload.len() + o.batch.len() <= REQUEST_BYTES_MAX =>
                {
                    groups.push((
                        shoal_wire::BatchHeader::decode(&o.batch).map_or(0, |h| h.record_count),
                        o.slot,
                    ));
                    buffer_bytes += o.buffer_bytes;
                    payload.extend_from_slice(&o.batch);
                }
                Ok(o) => {
                    next = Some(o);
                    break;
                }
                Err(_) => break,
            }
        }
        match send_with_retries(&shared, &topic, partition, &payload).await {
            Ok(base) => {
                // The broker stores the batches back to back.
                let mut offset = base;
                for (count, slot) in groups {
                    slot.complete(Ok(offset));
                    offset += u64::from(count);
                }
            }
            Err(e) => {
                let (code, msg) = (e.code(), e.to_string());
                for (_, slot) in groups {
                    slot.complete(Err((code, msg.clone())));
                }
            }
        }
        shared.release(buffer_bytes);
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
    let acks = match acks {
        Acks::None => fb::Acks::None,
        Acks::Leader => fb::Acks::Leader,
    };
    let f = conn
        .request(
            fb::RequestBody::ProduceRequest,
            |fbb| {
                let t = fbb.create_string(topic);
                fb::ProduceRequest::create(
                    fbb,
                    &fb::ProduceRequestArgs {
                        topic_id: 0,
                        topic: Some(t),
                        partition,
                        acks,
                        timeout_ms: 30_000,
                    },
                )
                .as_union_value()
            },
            payload,
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

async fn send_with_retries(
    shared: &Shared,
    topic: &str,
    partition: u32,
    batch: &[u8],
) -> Result<u64> {
    let cfg = &shared.config;
    let mut attempt = 0;
    loop {
        let r = async {
            let conn = shared.client.partition_connection(topic, partition).await?;
            produce_batches(&conn, topic, partition, cfg.acks, batch)
                .await
                .map(|p| p.base_offset)
        }
        .await;
        match r {
            Ok(base) => return Ok(base),
            Err(e) if e.is_retriable() && attempt < cfg.retries => {
                attempt += 1;
                tracing::debug!(error = %e, attempt, "produce failed; retrying");
                shared.client.invalidate();
                tokio::time::sleep(cfg.retry_backoff * attempt).await;
            }
            Err(e) => return Err(e),
        }
    }
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
}
