//! The consumer: assigned partitions read by long-poll fetch, and push
//! subscriptions with credit-based flow control (L1, C4, C5).

use crate::client::Client;
use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::retry::{Retrier, RetryPolicy};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use shoal_wire::batch::{validate_batch, Batches, Records};
use shoal_wire::fb;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A record read from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Where to start reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    Beginning,
    End,
    Offset(u64),
    /// The first record at or after this time (ms since the epoch).
    Timestamp(i64),
}

/// A bare offset, so `subscribe(topic, partition, offset, credit)` reads
/// as it always did.
impl From<u64> for StartAt {
    fn from(offset: u64) -> StartAt {
        StartAt::Offset(offset)
    }
}

/// A record as it arrived: its key, value and headers are views into the
/// frame that carried it, so decoding copies no bytes and allocates no
/// topic name per record. A view keeps that whole frame's buffer alive;
/// copy what you keep for long ([`ConsumedRecord::from`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordView {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(Bytes, Bytes)>,
}

impl From<RecordView> for ConsumedRecord {
    fn from(r: RecordView) -> ConsumedRecord {
        ConsumedRecord {
            topic: r.topic.to_string(),
            partition: r.partition,
            offset: r.offset,
            timestamp_ms: r.timestamp_ms,
            key: r.key.map(|b| b.to_vec()),
            value: r.value.map(|b| b.to_vec()),
            headers: r
                .headers
                .into_iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect(),
        }
    }
}

/// Calls `f` with each record at or after `from` in a run of batches, and
/// its offset and timestamp. With `verify`, every batch is checked whole
/// (CRC and record framing) before any of its records is handed out.
fn for_each_record<'a>(
    topic: &str,
    partition: u32,
    payload: &'a [u8],
    from: u64,
    verify: bool,
    mut f: impl FnMut(u64, i64, shoal_wire::batch::Record<'a>),
) -> Result<()> {
    for b in Batches::new(payload, usize::MAX) {
        let (h, batch) = b.map_err(|e| Error::Protocol(format!("bad batch from broker: {e}")))?;
        if verify {
            validate_batch(batch, usize::MAX).map_err(|source| Error::Corrupt {
                topic: topic.to_string(),
                partition,
                offset: h.base_offset,
                source,
            })?;
        }
        if h.next_offset() <= from {
            continue;
        }
        for r in Records::new(batch) {
            let r = r.map_err(|e| Error::Protocol(format!("bad record from broker: {e}")))?;
            let offset = h.base_offset + u64::from(r.offset_delta);
            if offset >= from {
                f(
                    offset,
                    h.first_timestamp_ms + i64::from(r.timestamp_delta_ms),
                    r,
                );
            }
        }
    }
    Ok(())
}

/// Checks every batch of `payload` whole (CRC and record framing).
fn verify_batches(topic: &str, partition: u32, payload: &[u8]) -> Result<()> {
    for_each_record(topic, partition, payload, u64::MAX, true, |_, _, _| {})
}

/// The offset after the records of `payload`, read from its last batch;
/// `reported` (the broker's next offset) when it carries none. Positions
/// follow the bytes actually received, so a broker that reports a next
/// offset past them never makes the client skip a record.
fn next_after(payload: &[u8], reported: u64) -> u64 {
    Batches::new(payload, usize::MAX)
        .filter_map(|b| b.ok())
        .last()
        .map_or(reported, |(h, _)| h.next_offset())
}

/// Decodes the records at or after `from` in a run of batches, checking
/// each batch's CRC first ([`Error::Corrupt`]).
pub fn decode_records(
    topic: &str,
    partition: u32,
    payload: &[u8],
    from: u64,
) -> Result<Vec<ConsumedRecord>> {
    decode_checked(topic, partition, payload, from, true)
}

fn decode_checked(
    topic: &str,
    partition: u32,
    payload: &[u8],
    from: u64,
    verify: bool,
) -> Result<Vec<ConsumedRecord>> {
    let mut out = Vec::new();
    for_each_record(
        topic,
        partition,
        payload,
        from,
        verify,
        |offset, timestamp_ms, r| {
            out.push(ConsumedRecord {
                topic: topic.to_string(),
                partition,
                offset,
                timestamp_ms,
                key: r.key.map(<[u8]>::to_vec),
                value: r.value.map(<[u8]>::to_vec),
                headers: r.headers().map(|(k, v)| (k.to_vec(), v.to_vec())).collect(),
            });
        },
    )?;
    Ok(out)
}

/// Like [`decode_records`], handing out views into `payload` instead of
/// copies.
pub fn decode_record_views(
    topic: &Arc<str>,
    partition: u32,
    payload: &Bytes,
    from: u64,
) -> Result<Vec<RecordView>> {
    decode_views_checked(topic, partition, payload, from, true)
}

fn decode_views_checked(
    topic: &Arc<str>,
    partition: u32,
    payload: &Bytes,
    from: u64,
    verify: bool,
) -> Result<Vec<RecordView>> {
    let mut out = Vec::new();
    let view = |s: &[u8]| payload.slice_ref(s);
    for_each_record(
        topic,
        partition,
        payload,
        from,
        verify,
        |offset, timestamp_ms, r| {
            out.push(RecordView {
                topic: topic.clone(),
                partition,
                offset,
                timestamp_ms,
                key: r.key.map(view),
                value: r.value.map(view),
                headers: r.headers().map(|(k, v)| (view(k), view(v))).collect(),
            });
        },
    )?;
    Ok(out)
}

/// One fetch's result.
#[derive(Debug)]
pub struct Fetched {
    pub records: Vec<ConsumedRecord>,
    pub next_offset: u64,
    pub high_watermark: u64,
    pub log_start_offset: u64,
}

/// How a consumer reads, and how it rides out a failover.
///
/// A fetch or subscribe that fails retriably (the leader moved or died,
/// no leader yet, the connection lost) is retried at the partition's
/// leader as metadata then says, with a backoff that doubles from
/// `retry_backoff` to `retry_backoff_max`, and resumes from the first
/// offset not yet delivered: the application sees no error and no record
/// twice. An error surfaces only once a partition has kept failing for
/// `unavailable_max` (or `retries` times in a row).
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub max_bytes: u32,
    pub min_bytes: u32,
    pub max_wait: Duration,
    /// Retries in a row of one partition's fetch or subscribe before its
    /// error surfaces. Default: unbounded (`unavailable_max` bounds them).
    pub retries: u32,
    /// First wait before a retry; it doubles per retry, each wait drawn
    /// between half and all of it. None after a `NotLeader` that named
    /// the leader. Default 50 ms.
    pub retry_backoff: Duration,
    /// Longest wait between retries. Default 1 s.
    pub retry_backoff_max: Duration,
    /// How long a partition may stay unavailable (every attempt failing
    /// retriably) before the error surfaces. Default 120 s.
    pub unavailable_max: Duration,
    /// Check each received batch's CRC before handing out its records; a
    /// mismatch is [`Error::Corrupt`]. Default on.
    pub check_crcs: bool,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_bytes: 1024 * 1024,
            min_bytes: 1,
            max_wait: Duration::from_millis(500),
            retries: u32::MAX,
            retry_backoff: Duration::from_millis(50),
            retry_backoff_max: Duration::from_secs(1),
            unavailable_max: Duration::from_secs(120),
            check_crcs: true,
        }
    }
}

impl ConsumerConfig {
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            retries: self.retries,
            backoff: self.retry_backoff,
            backoff_max: self.retry_backoff_max,
            timeout: self.unavailable_max,
        }
    }
}

struct Assignment {
    topic: String,
    /// The same name, shared by the records [`Consumer::poll_views`] hands
    /// out.
    shared_topic: Arc<str>,
    partition: u32,
    /// The first offset not yet delivered.
    next: u64,
    /// Set while the partition's fetches fail: its retries so far, and
    /// when the next may go.
    unavailable: Option<(Retrier, Instant)>,
}

/// Reads assigned partitions.
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    assigned: Vec<Assignment>,
}

/// What one partition's fetch in a poll came to.
enum Polled {
    /// The answer: its frame and the broker's next offset.
    Fetched(crate::connection::Frame, u64),
    /// Unavailable for now; retried later, from the same offset.
    Later(Retrier, Instant),
}

impl Consumer {
    pub fn new(client: Client, config: ConsumerConfig) -> Consumer {
        Consumer {
            client,
            config,
            assigned: Vec::new(),
        }
    }

    /// Reads `partition` of `topic` from `start`.
    pub async fn assign(&mut self, topic: &str, partition: u32, start: StartAt) -> Result<()> {
        let next = self.start_offset(topic, partition, start).await?;
        self.assigned.push(Assignment {
            shared_topic: Arc::from(topic),
            topic: topic.to_string(),
            partition,
            next,
            unavailable: None,
        });
        Ok(())
    }

    /// The offset `start` means for `partition` of `topic` now, as its
    /// leader says (only the leader knows its log start and high
    /// watermark).
    async fn start_offset(&self, topic: &str, partition: u32, start: StartAt) -> Result<u64> {
        let n = self.client.partition_count(topic).await?;
        if partition >= n {
            return Err(Error::Invalid(format!(
                "topic {topic:?} has no partition {partition}"
            )));
        }
        let policy = self.config.retry_policy();
        Ok(match start {
            StartAt::Offset(o) => o,
            StartAt::Beginning => {
                self.client
                    .partition_offsets_with(topic, partition, policy)
                    .await?
                    .0
            }
            StartAt::End => {
                self.client
                    .partition_offsets_with(topic, partition, policy)
                    .await?
                    .1
            }
            StartAt::Timestamp(ts) => {
                let f = self
                    .fetch_once(topic, partition, 0, Some(ts), 1, Duration::ZERO)
                    .await?;
                f.records.first().map_or(f.next_offset, |r| r.offset)
            }
        })
    }

    /// Assigns every partition of `topic`.
    pub async fn assign_all(&mut self, topic: &str, start: StartAt) -> Result<()> {
        let n = self.client.topic(topic).await?.partitions.len() as u32;
        for p in 0..n {
            self.assign(topic, p, start).await?;
        }
        Ok(())
    }

    /// Next offset per assigned partition.
    pub fn positions(&self) -> Vec<(String, u32, u64)> {
        self.assigned
            .iter()
            .map(|a| (a.topic.clone(), a.partition, a.next))
            .collect()
    }

    /// Stops reading `partition` of `topic`; returns its next offset if it
    /// was assigned.
    pub(crate) fn unassign(&mut self, topic: &str, partition: u32) -> Option<u64> {
        let i = self
            .assigned
            .iter()
            .position(|a| a.topic == topic && a.partition == partition)?;
        Some(self.assigned.remove(i).next)
    }

    /// Moves an assigned partition's next offset to `offset`; false if the
    /// partition is not assigned.
    pub(crate) fn seek(&mut self, topic: &str, partition: u32, offset: u64) -> bool {
        match self
            .assigned
            .iter_mut()
            .find(|a| a.topic == topic && a.partition == partition)
        {
            Some(a) => {
                a.next = offset;
                a.unavailable = None;
                true
            }
            None => false,
        }
    }

    /// Whether any partition is assigned.
    pub(crate) fn is_idle(&self) -> bool {
        self.assigned.is_empty()
    }

    /// The settings it reads with.
    pub(crate) fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// One fetch from one partition, retried through a failover.
    pub async fn fetch_once(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        timestamp_ms: Option<i64>,
        min_bytes: u32,
        max_wait: Duration,
    ) -> Result<Fetched> {
        let (max_bytes, verify) = (self.config.max_bytes, self.config.check_crcs);
        self.client
            .with_partition(
                topic,
                partition,
                self.config.retry_policy(),
                max_wait,
                |conn| async move {
                    let q = FetchSpec {
                        topic,
                        partition,
                        offset,
                        timestamp_ms,
                        max_bytes,
                        min_bytes,
                        max_wait,
                    };
                    fetch(&conn, &q, verify).await
                },
            )
            .await
    }

    /// Returns the next records from the assigned partitions: at once if
    /// any are ready, else as soon as one partition has data, else empty
    /// after `max_wait`. A partition whose leader is moving is retried
    /// meanwhile, from the first offset not yet returned, and holds up
    /// none of the others; its error comes back only once it has been
    /// unavailable for `unavailable_max`.
    pub async fn poll(&mut self) -> Result<Vec<ConsumedRecord>> {
        let verify = self.config.check_crcs;
        self.poll_with(|a, payload, from| {
            decode_checked(&a.topic, a.partition, payload.as_ref(), from, verify)
        })
        .await
    }

    /// Like [`Consumer::poll`], without a copy per record: each record's
    /// key, value and headers are views of the received frame and the
    /// topic name is shared ([`RecordView`]).
    pub async fn poll_views(&mut self) -> Result<Vec<RecordView>> {
        let verify = self.config.check_crcs;
        self.poll_with(|a, payload, from| {
            decode_views_checked(&a.shared_topic, a.partition, payload, from, verify)
        })
        .await
    }

    async fn poll_with<T>(
        &mut self,
        decode: impl Fn(&Assignment, &Bytes, u64) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        let deadline = Instant::now() + self.config.max_wait;
        for long_poll in [false, true] {
            let mut fetches = FuturesUnordered::new();
            let this = &*self;
            for (i, a) in this.assigned.iter().enumerate() {
                fetches.push(async move { (i, this.poll_partition(a, long_poll, deadline).await) });
            }
            let mut got = Vec::new();
            // Applied only if the whole poll succeeds: records decoded and
            // then dropped with an error must not count as delivered.
            let mut updates = Vec::new();
            while let Some((i, r)) = fetches.next().await {
                match r? {
                    Polled::Fetched(frame, reported_next) => {
                        let a = &this.assigned[i];
                        let payload = frame.payload_bytes();
                        let records = decode(a, &payload, a.next)?;
                        updates.push((i, Some(next_after(&payload, reported_next)), None));
                        if !records.is_empty() {
                            got.extend(records);
                            if long_poll {
                                break;
                            }
                        }
                    }
                    Polled::Later(retry, at) => updates.push((i, None, Some((retry, at)))),
                }
            }
            drop(fetches);
            for (i, next, unavailable) in updates {
                let a = &mut self.assigned[i];
                if let Some(next) = next {
                    a.next = a.next.max(next);
                }
                a.unavailable = unavailable;
            }
            if !got.is_empty() {
                return Ok(got);
            }
        }
        Ok(Vec::new())
    }

    /// One partition's part of a poll: a fetch from its next offset at its
    /// leader. `long_poll`: the broker may hold it until `deadline`, and a
    /// partition that fails is retried until then; otherwise one try, and
    /// none while the partition is backing off.
    async fn poll_partition(
        &self,
        a: &Assignment,
        long_poll: bool,
        deadline: Instant,
    ) -> Result<Polled> {
        let mut unavailable = a.unavailable.clone();
        loop {
            if let Some((retry, at)) = &unavailable {
                let now = Instant::now();
                if *at > now && (!long_poll || *at >= deadline) {
                    return Ok(Polled::Later(retry.clone(), *at));
                }
                tokio::time::sleep_until((*at).into()).await;
            }
            let max_wait = if long_poll {
                deadline.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            let q = FetchSpec {
                topic: &a.topic,
                partition: a.partition,
                offset: a.next,
                timestamp_ms: None,
                max_bytes: self.config.max_bytes,
                min_bytes: if long_poll { self.config.min_bytes } else { 0 },
                max_wait,
            };
            let (r, sent_to) = self
                .client
                .attempt(&a.topic, a.partition, max_wait, &mut |conn: Arc<
                    Connection,
                >| {
                    let q = &q;
                    async move { fetch_frame(&conn, q).await }
                })
                .await;
            let e = match r {
                Ok((frame, _, _, next)) => return Ok(Polled::Fetched(frame, next)),
                Err(e) if e.is_retriable() || e.is_unknown_placement() => e,
                Err(e) => return Err(e),
            };
            let (mut retry, _) = unavailable
                .take()
                .unwrap_or_else(|| (Retrier::new(self.config.retry_policy()), Instant::now()));
            let at_once = self.client.reroute(&a.topic, a.partition, sent_to, &e);
            let once_only = e.is_unknown_placement() && retry.attempts() > 0;
            match retry.next_wait(at_once) {
                Some(wait) if !once_only => {
                    tracing::debug!(
                        topic = %a.topic,
                        partition = a.partition,
                        offset = a.next,
                        error = %e,
                        ?wait,
                        "fetch failed; retrying at the partition's leader"
                    );
                    unavailable = Some((retry, Instant::now() + wait));
                }
                _ => return Err(e),
            }
        }
    }

    /// Subscribes to pushes of `partition` from `start` (a [`StartAt`], or
    /// a bare offset), granting `credit_bytes` up front. The broker never
    /// sends more payload than granted; [`Subscription::next`] grants back
    /// what it consumed.
    pub async fn subscribe(
        &self,
        topic: &str,
        partition: u32,
        start: impl Into<StartAt>,
        credit_bytes: u64,
    ) -> Result<Subscription> {
        let offset = match start.into() {
            StartAt::Offset(o) => o,
            start => self.start_offset(topic, partition, start).await?,
        };
        let policy = self.config.retry_policy();
        let (conn, id) =
            self.client
                .with_partition(
                    topic,
                    partition,
                    policy,
                    Duration::ZERO,
                    |conn| async move {
                        subscribe_on(conn, topic, partition, offset, credit_bytes).await
                    },
                )
                .await?;
        let pushes = conn.register_push(id);
        Ok(Subscription {
            client: self.client.clone(),
            conn,
            id,
            topic: topic.into(),
            partition,
            next: offset,
            pushes,
            auto_credit: true,
            initial_credit: credit_bytes,
            owed_bytes: 0,
            policy,
            check_crcs: self.config.check_crcs,
            retry: None,
            subscribed_at: Instant::now(),
            resubscribe_due: None,
            ended: false,
        })
    }
}

/// Subscribes on `conn`; returns it and the subscription's id.
async fn subscribe_on(
    conn: Arc<Connection>,
    topic: &str,
    partition: u32,
    offset: u64,
    credit_bytes: u64,
) -> Result<(Arc<Connection>, u64)> {
    let f = conn
        .request(
            fb::RequestBody::SubscribeRequest,
            |fbb| {
                let t = fbb.create_string(topic);
                fb::SubscribeRequest::create(
                    fbb,
                    &fb::SubscribeRequestArgs {
                        topic_id: 0,
                        topic: Some(t),
                        partition,
                        offset,
                        credit_bytes,
                    },
                )
                .as_union_value()
            },
            &[],
        )
        .await?;
    let id = f
        .response()
        .body_as_subscribe_response()
        .map(|s| s.subscription_id())
        .ok_or_else(|| Error::Protocol("expected a subscribe response".into()))?;
    Ok((conn, id))
}

/// The log start offset and high watermark of `topic`/`partition` from
/// `conn`'s broker, which must lead it: a fetch from the first batch at or
/// after the end of time, which reads nothing (a `ListOffsets`).
pub(crate) async fn leader_offsets(
    conn: &Connection,
    topic: &str,
    partition: u32,
) -> Result<(u64, u64)> {
    let q = FetchSpec {
        topic,
        partition,
        offset: 0,
        timestamp_ms: Some(i64::MAX),
        max_bytes: 1,
        min_bytes: 0,
        max_wait: Duration::ZERO,
    };
    let (_, high_watermark, log_start_offset, _) = fetch_frame(conn, &q).await?;
    Ok((log_start_offset, high_watermark))
}

/// Counts the records of a run of batches from their headers alone.
fn count_records(payload: &[u8]) -> Result<u64> {
    let mut n = 0u64;
    for b in Batches::new(payload, usize::MAX) {
        let (h, _) = b.map_err(|e| Error::Protocol(format!("bad batch from broker: {e}")))?;
        n += u64::from(h.record_count);
    }
    Ok(n)
}

/// What to fetch.
struct FetchSpec<'a> {
    topic: &'a str,
    partition: u32,
    offset: u64,
    timestamp_ms: Option<i64>,
    max_bytes: u32,
    min_bytes: u32,
    max_wait: Duration,
}

/// Sends a fetch; returns the response frame and its offsets
/// (high watermark, log start, next offset).
async fn fetch_frame(
    conn: &Connection,
    q: &FetchSpec<'_>,
) -> Result<(crate::connection::Frame, u64, u64, u64)> {
    let f = conn
        .request(
            fb::RequestBody::FetchRequest,
            |fbb| {
                let t = fbb.create_string(q.topic);
                fb::FetchRequest::create(
                    fbb,
                    &fb::FetchRequestArgs {
                        topic_id: 0,
                        topic: Some(t),
                        partition: q.partition,
                        offset: q.offset,
                        by_timestamp: q.timestamp_ms.is_some(),
                        timestamp_ms: q.timestamp_ms.unwrap_or(0),
                        max_bytes: q.max_bytes,
                        min_bytes: q.min_bytes,
                        max_wait_ms: q.max_wait.as_millis().min(u128::from(u32::MAX)) as u32,
                        ..Default::default()
                    },
                )
                .as_union_value()
            },
            &[],
        )
        .await?;
    let resp = f.response();
    let r = resp
        .body_as_fetch_response()
        .ok_or_else(|| Error::Protocol("expected a fetch response".into()))?;
    let (hw, start, next) = (r.high_watermark(), r.log_start_offset(), r.next_offset());
    Ok((f, hw, start, next))
}

/// One fetch without decoding records (benchmarks): payload bytes, records
/// (from batch headers) and the next offset.
pub async fn fetch_raw(
    conn: &Connection,
    topic: &str,
    partition: u32,
    offset: u64,
    max_bytes: u32,
) -> Result<(u64, u64, u64)> {
    let q = FetchSpec {
        topic,
        partition,
        offset,
        timestamp_ms: None,
        max_bytes,
        min_bytes: 0,
        max_wait: Duration::ZERO,
    };
    let (f, _, _, next) = fetch_frame(conn, &q).await?;
    Ok((f.payload().len() as u64, count_records(f.payload())?, next))
}

async fn fetch(conn: &Connection, q: &FetchSpec<'_>, verify: bool) -> Result<Fetched> {
    let (f, high_watermark, log_start_offset, next_offset) = fetch_frame(conn, q).await?;
    let from = if q.timestamp_ms.is_some() {
        0
    } else {
        q.offset
    };
    Ok(Fetched {
        records: decode_checked(q.topic, q.partition, f.payload(), from, verify)?,
        next_offset: next_after(f.payload(), next_offset),
        high_watermark,
        log_start_offset,
    })
}

async fn grant_request(conn: &Connection, subscription: u64, bytes: u64) -> Result<()> {
    conn.request(
        fb::RequestBody::GrantCreditRequest,
        |fbb| {
            fb::GrantCreditRequest::create(
                fbb,
                &fb::GrantCreditRequestArgs {
                    subscription_id: subscription,
                    bytes,
                },
            )
            .as_union_value()
        },
        &[],
    )
    .await?;
    Ok(())
}

/// A push subscription to one partition. When its connection closes or
/// the broker ends it with a retriable error (the leader moved or went
/// away), it subscribes again at the partition's leader from the first
/// offset it has not delivered, so nothing is lost or repeated (L3); the
/// application sees an error only once the partition has been unavailable
/// for the consumer's `unavailable_max`.
///
/// A broker that hangs without closing the connection looks like a quiet
/// partition: pushes carry no heartbeat to tell them apart.
pub struct Subscription {
    client: Client,
    conn: Arc<Connection>,
    id: u64,
    topic: Arc<str>,
    partition: u32,
    /// The first offset not yet delivered.
    next: u64,
    pushes: crate::connection::PushRoute,
    auto_credit: bool,
    /// Credit granted at subscribe; automatic grants return consumed
    /// bytes in steps of half of it, not one request per push.
    initial_credit: u64,
    /// Bytes consumed and not yet granted back.
    owed_bytes: u64,
    policy: RetryPolicy,
    check_crcs: bool,
    /// Set while re-subscribing fails, cleared by a push or by a
    /// subscription that lasted.
    retry: Option<Retrier>,
    subscribed_at: Instant,
    /// A push failed its check: subscribe again from `next` before
    /// anything else, rather than deliver what follows the gap.
    resubscribe_due: Option<String>,
    /// A non-retriable error ended it: no re-subscribe after that.
    ended: bool,
}

/// One push: its records and the payload bytes it used of the credit.
#[derive(Debug)]
pub struct Pushed {
    pub records: Vec<ConsumedRecord>,
    pub payload_bytes: u64,
}

/// One push as [`RecordView`]s ([`Subscription::next_views`]).
#[derive(Debug)]
pub struct PushedViews {
    pub records: Vec<RecordView>,
    pub payload_bytes: u64,
}

impl Subscription {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Leave credit management to the caller ([`Self::grant`]).
    pub fn manual_credit(&mut self) {
        self.auto_credit = false;
    }

    /// Waits for the next push. With automatic credit, consumed bytes are
    /// granted back in steps of half the initial credit, without waiting
    /// for the broker's answer. A push whose batch fails its CRC is
    /// [`Error::Corrupt`]; the position stays before it, and the next call
    /// subscribes again from there.
    ///
    /// Cancel-safe: a `next()` dropped by a timeout or `select!` has taken
    /// nothing, and the push is returned by the next call; a re-subscribe
    /// cut short is started again by the next call.
    pub async fn next(&mut self) -> Result<Pushed> {
        let (payload, from) = self.next_payload().await?;
        Ok(Pushed {
            // Checked already in `next_payload`.
            records: decode_checked(&self.topic, self.partition, &payload, from, false)?,
            payload_bytes: payload.len() as u64,
        })
    }

    /// Like [`Self::next`], with records that are views into the received
    /// push (no copy of keys, values or headers). Cancel-safe too.
    pub async fn next_views(&mut self) -> Result<PushedViews> {
        let (payload, from) = self.next_payload().await?;
        Ok(PushedViews {
            records: decode_views_checked(&self.topic, self.partition, &payload, from, false)?,
            payload_bytes: payload.len() as u64,
        })
    }

    /// Like [`Self::next`] without decoding records (benchmarks): payload
    /// bytes and record count.
    pub async fn next_raw(&mut self) -> Result<(u64, u64)> {
        let (payload, _) = self.next_payload().await?;
        Ok((payload.len() as u64, count_records(&payload)?))
    }

    /// The next push's payload (checked) and the offset to decode it from.
    /// Nothing between taking a push and returning it awaits (see
    /// [`Self::next`]); the dead route of a failed subscription stays in
    /// place until a new one is whole, so a cancelled re-subscribe is
    /// started again by the next call.
    async fn next_payload(&mut self) -> Result<(Bytes, u64)> {
        loop {
            if let Some(why) = self.resubscribe_due.take() {
                let cause = Error::Protocol(why.clone());
                if let Err(e) = self.resubscribe(&cause).await {
                    self.resubscribe_due = Some(why);
                    if !e.is_retriable() {
                        return Err(e);
                    }
                    self.wait_before_retry(e).await?;
                }
                continue;
            }
            let e = match self.pushes.recv().await {
                Some(Ok(frame)) => {
                    let reported_next = frame
                        .response()
                        .body_as_push()
                        .ok_or_else(|| Error::Protocol("expected a push".into()))?
                        .next_offset();
                    let payload = frame.payload_bytes();
                    self.consumed(payload.len() as u64);
                    if self.check_crcs {
                        if let Err(e) = verify_batches(&self.topic, self.partition, &payload) {
                            self.resubscribe_due = Some(e.to_string());
                            return Err(e);
                        }
                    }
                    let from = self.next;
                    self.next = self.next.max(next_after(&payload, reported_next));
                    self.retry = None;
                    return Ok((payload, from));
                }
                Some(Err(e)) => e,
                None => Error::Closed,
            };
            if self.ended {
                return Err(e);
            }
            if !(e.is_retriable() || e.is_unknown_placement()) {
                self.ended = true;
                return Err(e);
            }
            if self.subscribed_at.elapsed() >= self.policy.backoff_max {
                // The last subscription lasted: this is a new outage.
                self.retry = None;
            }
            let mut cause = e;
            loop {
                let at_once =
                    self.client
                        .reroute(&self.topic, self.partition, Some(self.conn.addr), &cause);
                self.wait_before_retry_at(cause, at_once).await?;
                match self.resubscribe_once().await {
                    Ok(()) => break,
                    Err(e) if e.is_retriable() || e.is_unknown_placement() => cause = e,
                    Err(e) => {
                        self.ended = true;
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Backs off before the next re-subscribe, or gives `cause` back once
    /// the partition has been unavailable too long.
    async fn wait_before_retry(&mut self, cause: Error) -> Result<()> {
        self.wait_before_retry_at(cause, false).await
    }

    async fn wait_before_retry_at(&mut self, cause: Error, at_once: bool) -> Result<()> {
        let policy = self.policy;
        let retry = self.retry.get_or_insert_with(|| Retrier::new(policy));
        match retry.next_wait(at_once) {
            Some(wait) => {
                tracing::debug!(topic = %self.topic, partition = self.partition, error = %cause, ?wait, "push subscription lost; subscribing again");
                tokio::time::sleep(wait).await;
                Ok(())
            }
            None => {
                self.ended = true;
                Err(cause)
            }
        }
    }

    /// Subscribes again from the next undelivered offset, at the leader as
    /// metadata knows it after `cause`, retrying as the policy says.
    async fn resubscribe(&mut self, cause: &Error) -> Result<()> {
        self.client
            .reroute(&self.topic, self.partition, Some(self.conn.addr), cause);
        self.resubscribe_once().await
    }

    /// One subscribe at the partition's leader from `next`; on success the
    /// new subscription replaces the old one.
    async fn resubscribe_once(&mut self) -> Result<()> {
        let (topic, partition, offset, credit) = (
            self.topic.clone(),
            self.partition,
            self.next,
            self.initial_credit,
        );
        let (r, _) = self
            .client
            .attempt(&topic, partition, Duration::ZERO, &mut |conn| {
                let topic = topic.clone();
                async move { subscribe_on(conn, &topic, partition, offset, credit).await }
            })
            .await;
        let (conn, id) = r?;
        tracing::info!(
            topic = %self.topic,
            partition = self.partition,
            offset = self.next,
            broker = %conn.addr,
            "push subscription re-subscribed"
        );
        let pushes = conn.register_push(id);
        let (old_conn, old_id) = (std::mem::replace(&mut self.conn, conn), self.id);
        old_conn.unregister_push(old_id);
        // If the old subscription still runs, stop it: its pushes would only
        // use credit nobody reads.
        old_conn.send_detached(fb::RequestBody::UnsubscribeRequest, |fbb| {
            fb::UnsubscribeRequest::create(
                fbb,
                &fb::UnsubscribeRequestArgs {
                    subscription_id: old_id,
                },
            )
            .as_union_value()
        });
        self.id = id;
        self.pushes = pushes;
        self.owed_bytes = 0;
        self.subscribed_at = Instant::now();
        Ok(())
    }

    /// Counts consumed bytes and, with automatic credit, grants them back
    /// once they reach half the initial credit. The grant is written at
    /// once but not waited for: the caller holds records it must not lose
    /// to a cancelled wait, and a failed grant shows up as the end of the
    /// subscription (the broker reports it, or the connection closes).
    fn consumed(&mut self, bytes: u64) {
        if !self.auto_credit {
            return;
        }
        self.owed_bytes += bytes;
        if self.owed_bytes < (self.initial_credit / 2).max(1) {
            return;
        }
        let bytes = std::mem::take(&mut self.owed_bytes);
        self.pushes.granting(bytes);
        let id = self.id;
        self.conn
            .send_detached(fb::RequestBody::GrantCreditRequest, |fbb| {
                fb::GrantCreditRequest::create(
                    fbb,
                    &fb::GrantCreditRequestArgs {
                        subscription_id: id,
                        bytes,
                    },
                )
                .as_union_value()
            });
    }

    /// Grants the broker `bytes` more payload and waits for its answer.
    pub async fn grant(&self, bytes: u64) -> Result<()> {
        self.pushes.granting(bytes);
        grant_request(&self.conn, self.id, bytes).await
    }

    /// Payload bytes received and not yet taken by [`Self::next`]; bounded
    /// by the credit granted.
    pub fn queued_bytes(&self) -> u64 {
        self.pushes.queued_bytes()
    }

    /// Next offset the subscription will deliver.
    pub fn position(&self) -> u64 {
        self.next
    }

    pub async fn unsubscribe(self) -> Result<()> {
        let id = self.id;
        self.conn.unregister_push(id);
        self.conn
            .request(
                fb::RequestBody::UnsubscribeRequest,
                |fbb| {
                    fb::UnsubscribeRequest::create(
                        fbb,
                        &fb::UnsubscribeRequestArgs {
                            subscription_id: id,
                        },
                    )
                    .as_union_value()
                },
                &[],
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_broker::FakeBroker;
    use shoal_wire::batch::{build_batch, set_base_offset};

    /// One record of 400 bytes at `offset`.
    fn batch_at(offset: u64) -> Vec<u8> {
        let mut b = build_batch(&[&[1u8; 400][..]], 0);
        set_base_offset(&mut b, offset);
        b
    }

    async fn wait_granted(fake: &FakeBroker, bytes: u64) {
        for _ in 0..2000 {
            if fake.grants().iter().map(|g| g.1).sum::<u64>() >= bytes {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("expected {bytes} bytes granted, have {:?}", fake.grants());
    }

    async fn wait_queued(sub: &Subscription, bytes: u64) {
        for _ in 0..2000 {
            if sub.queued_bytes() >= bytes {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("expected {bytes} queued bytes, have {}", sub.queued_bytes());
    }

    /// Pushes are queued only within the credit granted (one push may
    /// overrun what is left); a broker that pushes past it ends the
    /// subscription with a protocol error instead of growing the queue.
    #[tokio::test]
    async fn pushes_beyond_credit_end_the_subscription() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        let client = Client::connect(&fake.addr_string()).await.expect("connect");
        let consumer = Consumer::new(client, ConsumerConfig::default());
        let n = batch_at(0).len() as u64;
        let mut sub = consumer
            .subscribe("t", 0, 0, n + 1)
            .await
            .expect("subscribe");
        sub.manual_credit();
        let id = sub.id();
        // Within credit, then one push that overruns what is left.
        fake.push(id, &batch_at(0), 1);
        fake.push(id, &batch_at(1), 2);
        wait_queued(&sub, 2 * n).await;
        // Past the credit: refused, not queued.
        fake.push(id, &batch_at(2), 3);
        fake.push(id, &batch_at(3), 4);
        let mut got = 0;
        let err = loop {
            match sub.next().await {
                Ok(p) => got += p.records.len(),
                Err(e) => break e,
            }
        };
        assert_eq!(got, 2);
        assert!(matches!(err, Error::Protocol(_)), "{err}");
        assert_eq!(sub.queued_bytes(), 0);
        assert!(matches!(sub.next().await, Err(Error::Closed)));
    }

    /// Credit granted later is counted: pushes it allows are delivered.
    #[tokio::test]
    async fn granted_credit_allows_more_pushes() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        let client = Client::connect(&fake.addr_string()).await.expect("connect");
        let consumer = Consumer::new(client, ConsumerConfig::default());
        let n = batch_at(0).len() as u64;
        let mut sub = consumer.subscribe("t", 0, 0, n).await.expect("subscribe");
        sub.manual_credit();
        fake.push(sub.id(), &batch_at(0), 1);
        assert_eq!(sub.next().await.expect("within credit").records.len(), 1);
        sub.grant(2 * n).await.expect("grant");
        fake.push(sub.id(), &batch_at(1), 2);
        fake.push(sub.id(), &batch_at(2), 3);
        assert_eq!(sub.next().await.expect("granted").records.len(), 1);
        assert_eq!(sub.next().await.expect("granted").records.len(), 1);
        assert_eq!(sub.position(), 3);
    }

    /// A `next()` cut short by a timeout loses nothing, even when the
    /// broker is slow to answer credit grants: the grant is not waited for.
    #[tokio::test]
    async fn next_is_cancel_safe_and_never_waits_for_a_grant() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        fake.leave_grants_unanswered();
        let client = Client::connect(&fake.addr_string()).await.expect("connect");
        let consumer = Consumer::new(client, ConsumerConfig::default());
        let n = batch_at(0).len() as u64;
        // Every push is at least half the credit, so each one grants.
        let mut sub = consumer
            .subscribe("t", 0, 0, 2 * n)
            .await
            .expect("subscribe");
        fake.push(sub.id(), &batch_at(0), 1);
        fake.push(sub.id(), &batch_at(1), 2);
        let mut offsets = Vec::new();
        for _ in 0..10 {
            if offsets.len() == 2 {
                break;
            }
            if let Ok(p) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
                offsets.extend(p.expect("a push").records.iter().map(|r| r.offset));
            }
        }
        // The grants went out though unanswered: the broker may push again.
        wait_granted(&fake, 2 * n).await;
        fake.push(sub.id(), &batch_at(2), 3);
        let p = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
        offsets.extend(
            p.expect("in time")
                .expect("a push")
                .records
                .iter()
                .map(|r| r.offset),
        );
        assert_eq!(offsets, [0, 1, 2]);
        assert_eq!(sub.position(), 3);
    }

    /// Automatic credit goes back in steps of half the initial credit, not
    /// one grant per push.
    #[tokio::test]
    async fn grants_are_batched_in_half_credit_steps() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        let client = Client::connect(&fake.addr_string()).await.expect("connect");
        let consumer = Consumer::new(client, ConsumerConfig::default());
        let n = batch_at(0).len() as u64;
        let mut sub = consumer
            .subscribe("t", 0, 0, 10 * n)
            .await
            .expect("subscribe");
        for o in 0..10 {
            fake.push(sub.id(), &batch_at(o), o + 1);
        }
        for _ in 0..10 {
            sub.next().await.expect("a push");
        }
        wait_granted(&fake, 10 * n).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let id = sub.id();
        assert_eq!(fake.grants(), [(id, 5 * n), (id, 5 * n)]);
    }

    /// `subscribe` takes a [`StartAt`] as `assign` does (and still a bare
    /// offset).
    #[tokio::test]
    async fn subscribe_starts_where_asked() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        let client = Client::connect(&fake.addr_string()).await.expect("connect");
        let consumer = Consumer::new(client, ConsumerConfig::default());
        let sub = consumer
            .subscribe("t", 0, 7u64, 1024)
            .await
            .expect("offset");
        assert_eq!(sub.position(), 7);
        let sub = consumer
            .subscribe("t", 0, StartAt::Offset(9), 1024)
            .await
            .expect("StartAt");
        assert_eq!(sub.position(), 9);
        let e = consumer
            .subscribe("t", 3, StartAt::Beginning, 1024)
            .await
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("no partition 3")));
    }

    /// Views decode to the same records as copies, and point into the
    /// payload they came in (nothing copied).
    #[test]
    fn record_views_are_the_records_without_copies() {
        use shoal_wire::batch::{BatchBuilder, NewRecord};
        let mut b = BatchBuilder::default();
        for (i, v) in [&b"first"[..], b"second", b"third"].iter().enumerate() {
            b.push(&NewRecord {
                key: (i == 1).then_some(&b"key"[..]),
                value: Some(v),
                headers: &[(&b"h"[..], &b"hv"[..])],
                timestamp_ms: 1000 + i as i64,
            })
            .expect("fits");
        }
        let mut batch = b.finish(-1, 0, -1);
        set_base_offset(&mut batch, 10);
        let payload = Bytes::from(batch);
        let topic: Arc<str> = "t".into();
        let views = decode_record_views(&topic, 3, &payload, 11).expect("decoded");
        let copies = decode_records("t", 3, &payload, 11).expect("decoded");
        assert_eq!(views.len(), 2);
        let converted: Vec<ConsumedRecord> = views.iter().cloned().map(Into::into).collect();
        assert_eq!(converted, copies);
        let range = payload.as_ptr_range();
        for v in &views {
            let value = v.value.as_ref().expect("a value");
            assert!(range.contains(&value.as_ptr()), "a view, not a copy");
            assert!(Arc::ptr_eq(&v.topic, &topic));
        }
        assert_eq!(views[0].key.as_deref(), Some(&b"key"[..]));
        assert_eq!(views[1].headers[0].1.as_ref(), b"hv");
    }

    #[tokio::test]
    async fn next_views_delivers_pushes_in_order() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        let client = Client::connect(&fake.addr_string()).await.expect("connect");
        let consumer = Consumer::new(client, ConsumerConfig::default());
        let n = batch_at(0).len() as u64;
        let mut sub = consumer
            .subscribe("t", 0, 0, 4 * n)
            .await
            .expect("subscribe");
        fake.push(sub.id(), &batch_at(0), 1);
        fake.push(sub.id(), &batch_at(1), 2);
        let a = sub.next_views().await.expect("a push");
        let b = sub.next_views().await.expect("a push");
        assert_eq!((a.records[0].offset, b.records[0].offset), (0, 1));
        assert_eq!(a.payload_bytes, n);
        assert_eq!(b.records[0].value.as_deref(), Some(&[1u8; 400][..]));
        assert_eq!(sub.position(), 2);
    }
}
