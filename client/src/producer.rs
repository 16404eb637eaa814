//! The producer: batching by size and linger, partitioning, acks,
//! idempotence and retries (L1, C3).
//!
//! Records for one partition accumulate in a [`BatchBuilder`]; a batch is
//! sent when it reaches `batch_bytes` or `linger` after its first record.
//! Each partition has one sender task that sends its batches in order, one
//! at a time, so with idempotence on (the default) a retry after an error
//! carries the same producer id and sequence and the broker never writes it
//! twice.

use crate::client::Client;
use crate::error::{Error, Result};
use shoal_wire::batch::{BatchBuilder, NewRecord, NO_PRODUCER_ID, NO_SEQUENCE};
use shoal_wire::fb;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::mpsc;

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
}

struct PartitionState {
    pending: Pending,
    next_sequence: i32,
    queue: mpsc::UnboundedSender<Outgoing>,
}

struct Outgoing {
    batch: Vec<u8>,
    slot: Arc<BatchSlot>,
}

/// Per topic, per partition; looked up by `&str` without allocating.
type Partitions = HashMap<String, HashMap<u32, PartitionState>>;

struct Shared {
    client: Client,
    config: ProducerConfig,
    producer_id: i64,
    partitions: Mutex<Partitions>,
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
        Producer {
            shared: Arc::new(Shared {
                client,
                config,
                producer_id,
                partitions: Mutex::new(HashMap::new()),
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
        self.send_to(topic, partition, key, value)
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
            },
            next_sequence: 0,
            queue: q,
        }
    }

    /// Queues a record for a given partition.
    pub fn send_to(
        &self,
        topic: &str,
        partition: u32,
        key: Option<&[u8]>,
        value: &[u8],
    ) -> Result<Delivery> {
        let record = NewRecord {
            key,
            value: Some(value),
            headers: &[],
            timestamp_ms: now_ms(),
        };
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
        if let Err(mpsc::error::SendError(o)) = st.queue.send(Outgoing { batch, slot }) {
            o.slot.complete(Err((None, Error::Closed.to_string())));
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
