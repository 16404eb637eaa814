//! The consumer: assigned partitions read by long-poll fetch, and push
//! subscriptions with credit-based flow control (L1, C4, C5).

use crate::client::Client;
use crate::connection::Connection;
use crate::error::{Error, Result};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use shoal_wire::batch::{Batches, Records};
use shoal_wire::fb;
use std::sync::Arc;
use std::time::Duration;

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
/// its offset and timestamp.
fn for_each_record<'a>(
    payload: &'a [u8],
    from: u64,
    mut f: impl FnMut(u64, i64, shoal_wire::batch::Record<'a>),
) -> Result<()> {
    for b in Batches::new(payload, usize::MAX) {
        let (h, batch) = b.map_err(|e| Error::Protocol(format!("bad batch from broker: {e}")))?;
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

/// Decodes the records at or after `from` in a run of batches.
pub fn decode_records(
    topic: &str,
    partition: u32,
    payload: &[u8],
    from: u64,
) -> Result<Vec<ConsumedRecord>> {
    let mut out = Vec::new();
    for_each_record(payload, from, |offset, timestamp_ms, r| {
        out.push(ConsumedRecord {
            topic: topic.to_string(),
            partition,
            offset,
            timestamp_ms,
            key: r.key.map(<[u8]>::to_vec),
            value: r.value.map(<[u8]>::to_vec),
            headers: r.headers().map(|(k, v)| (k.to_vec(), v.to_vec())).collect(),
        });
    })?;
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
    let mut out = Vec::new();
    let view = |s: &[u8]| payload.slice_ref(s);
    for_each_record(payload, from, |offset, timestamp_ms, r| {
        out.push(RecordView {
            topic: topic.clone(),
            partition,
            offset,
            timestamp_ms,
            key: r.key.map(view),
            value: r.value.map(view),
            headers: r.headers().map(|(k, v)| (view(k), view(v))).collect(),
        });
    })?;
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

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub max_bytes: u32,
    pub min_bytes: u32,
    pub max_wait: Duration,
    /// Times a fetch or subscribe that failed retriably is sent again (to
    /// the new leader after `NotLeader`, after a metadata refresh when the
    /// leader is unknown or gone); also bounds the re-subscribes of a push
    /// subscription in a row. Default 10.
    pub retries: u32,
    /// Wait before retry `n` is `n` × this; none after a `NotLeader` that
    /// named the leader. Default 100 ms.
    pub retry_backoff: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_bytes: 1024 * 1024,
            min_bytes: 1,
            max_wait: Duration::from_millis(500),
            retries: 10,
            retry_backoff: Duration::from_millis(100),
        }
    }
}

struct Assignment {
    topic: String,
    /// The same name, shared by the records [`Consumer::poll_views`] hands
    /// out.
    shared_topic: Arc<str>,
    partition: u32,
    next: u64,
}

/// Reads assigned partitions.
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    assigned: Vec<Assignment>,
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
        });
        Ok(())
    }

    /// The offset `start` means for `partition` of `topic` now.
    async fn start_offset(&self, topic: &str, partition: u32, start: StartAt) -> Result<u64> {
        let n = self.client.partition_count(topic).await?;
        if partition >= n {
            return Err(Error::Invalid(format!(
                "topic {topic:?} has no partition {partition}"
            )));
        }
        Ok(match start {
            StartAt::Offset(o) => o,
            StartAt::Beginning => self
                .fetch_once(topic, partition, 0, None, 0, Duration::ZERO)
                .await
                .map(|f| f.log_start_offset)
                .or_else(|e| {
                    if e.code() == Some(shoal_wire::ErrorCode::OffsetOutOfRange) {
                        Ok(0)
                    } else {
                        Err(e)
                    }
                })?,
            // Only the leader knows its high watermark.
            StartAt::End => self.client.partition_offsets(topic, partition).await?.1,
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

    /// One fetch from one partition.
    pub async fn fetch_once(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        timestamp_ms: Option<i64>,
        min_bytes: u32,
        max_wait: Duration,
    ) -> Result<Fetched> {
        let max_bytes = self.config.max_bytes;
        self.client
            .with_partition(
                topic,
                partition,
                self.config.retries,
                self.config.retry_backoff,
                |conn| async move {
                    fetch(
                        &conn,
                        topic,
                        partition,
                        offset,
                        timestamp_ms,
                        max_bytes,
                        min_bytes,
                        max_wait,
                    )
                    .await
                },
            )
            .await
    }

    /// Returns the next records from the assigned partitions: at once if
    /// any are ready, else as soon as one partition has data, else empty
    /// after `max_wait`.
    pub async fn poll(&mut self) -> Result<Vec<ConsumedRecord>> {
        self.poll_with(|a, payload, from| {
            decode_records(&a.topic, a.partition, payload.as_ref(), from)
        })
        .await
    }

    /// Like [`Consumer::poll`], without a copy per record: each record's
    /// key, value and headers are views of the received frame and the
    /// topic name is shared ([`RecordView`]).
    pub async fn poll_views(&mut self) -> Result<Vec<RecordView>> {
        self.poll_with(|a, payload, from| {
            decode_record_views(&a.shared_topic, a.partition, payload, from)
        })
        .await
    }

    async fn poll_with<T>(
        &mut self,
        decode: impl Fn(&Assignment, &Bytes, u64) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        for wait in [Duration::ZERO, self.config.max_wait] {
            let mut fetches = FuturesUnordered::new();
            let this = &*self;
            for (i, a) in this.assigned.iter().enumerate() {
                let min = if wait.is_zero() {
                    0
                } else {
                    self.config.min_bytes
                };
                fetches.push(async move {
                    let q = &FetchSpec {
                        topic: &a.topic,
                        partition: a.partition,
                        offset: a.next,
                        timestamp_ms: None,
                        max_bytes: this.config.max_bytes,
                        min_bytes: min,
                        max_wait: wait,
                    };
                    let r = this
                        .client
                        .with_partition(
                            &a.topic,
                            a.partition,
                            this.config.retries,
                            this.config.retry_backoff,
                            |conn| async move { fetch_frame(&conn, q).await },
                        )
                        .await;
                    (i, r)
                });
            }
            let mut got = Vec::new();
            let mut advance = Vec::new();
            while let Some((i, r)) = fetches.next().await {
                let (frame, _, _, next_offset) = r?;
                advance.push((i, next_offset));
                let a = &this.assigned[i];
                let records = decode(a, &frame.payload_bytes(), a.next)?;
                if !records.is_empty() {
                    got.extend(records);
                    if !wait.is_zero() {
                        break;
                    }
                }
            }
            drop(fetches);
            for (i, next) in advance {
                self.assigned[i].next = self.assigned[i].next.max(next);
            }
            if !got.is_empty() {
                return Ok(got);
            }
        }
        Ok(Vec::new())
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
        let (conn, id) = subscribe_request(
            &self.client,
            topic,
            partition,
            offset,
            credit_bytes,
            self.config.retries,
            self.config.retry_backoff,
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
            retries: self.config.retries,
            retry_backoff: self.config.retry_backoff,
            resubscribes: 0,
            ended: false,
        })
    }
}

/// Subscribes at the partition's leader, following redirects; returns
/// the connection the pushes will come on and the subscription's id.
#[allow(clippy::too_many_arguments)]
async fn subscribe_request(
    client: &Client,
    topic: &str,
    partition: u32,
    offset: u64,
    credit_bytes: u64,
    retries: u32,
    backoff: Duration,
) -> Result<(Arc<Connection>, u64)> {
    client
        .with_partition(topic, partition, retries, backoff, |conn| async move {
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
        })
        .await
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

#[allow(clippy::too_many_arguments)]
async fn fetch(
    conn: &Connection,
    topic: &str,
    partition: u32,
    offset: u64,
    timestamp_ms: Option<i64>,
    max_bytes: u32,
    min_bytes: u32,
    max_wait: Duration,
) -> Result<Fetched> {
    let q = FetchSpec {
        topic,
        partition,
        offset,
        timestamp_ms,
        max_bytes,
        min_bytes,
        max_wait,
    };
    let (f, high_watermark, log_start_offset, next_offset) = fetch_frame(conn, &q).await?;
    let from = if timestamp_ms.is_some() { 0 } else { offset };
    Ok(Fetched {
        records: decode_records(topic, partition, f.payload(), from)?,
        next_offset,
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
/// away), it subscribes again at the partition's leader from the next
/// offset it has not delivered, so nothing is lost or repeated (L3).
pub struct Subscription {
    client: Client,
    conn: Arc<Connection>,
    id: u64,
    topic: Arc<str>,
    partition: u32,
    next: u64,
    pushes: crate::connection::PushRoute,
    auto_credit: bool,
    /// Credit granted at subscribe; automatic grants return consumed
    /// bytes in steps of half of it, not one request per push.
    initial_credit: u64,
    /// Bytes consumed and not yet granted back.
    owed_bytes: u64,
    retries: u32,
    retry_backoff: Duration,
    /// Re-subscribes since the last push: bounded by `retries`.
    resubscribes: u32,
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
    /// for the broker's answer.
    ///
    /// Cancel-safe: the only wait is for the push itself, so a `next()`
    /// dropped by a timeout or `select!` has taken nothing, and the push
    /// is returned by the next call.
    pub async fn next(&mut self) -> Result<Pushed> {
        let (payload, from) = self.next_payload().await?;
        Ok(Pushed {
            records: decode_records(&self.topic, self.partition, &payload, from)?,
            payload_bytes: payload.len() as u64,
        })
    }

    /// Like [`Self::next`], with records that are views into the received
    /// push (no copy of keys, values or headers). Cancel-safe too.
    pub async fn next_views(&mut self) -> Result<PushedViews> {
        let (payload, from) = self.next_payload().await?;
        Ok(PushedViews {
            records: decode_record_views(&self.topic, self.partition, &payload, from)?,
            payload_bytes: payload.len() as u64,
        })
    }

    /// Like [`Self::next`] without decoding records (benchmarks): payload
    /// bytes and record count.
    pub async fn next_raw(&mut self) -> Result<(u64, u64)> {
        let (payload, _) = self.next_payload().await?;
        Ok((payload.len() as u64, count_records(&payload)?))
    }

    /// The next push's payload and the offset to decode it from. Nothing
    /// after the wait for the push awaits (see [`Self::next`]); a
    /// re-subscribe cut short by a cancel is started again by the next
    /// call (the dead route stays in place until a new one is whole).
    async fn next_payload(&mut self) -> Result<(Bytes, u64)> {
        loop {
            let e = match self.pushes.recv().await {
                Some(Ok(frame)) => {
                    let next = frame
                        .response()
                        .body_as_push()
                        .ok_or_else(|| Error::Protocol("expected a push".into()))?
                        .next_offset();
                    let from = std::mem::replace(&mut self.next, next);
                    let payload = frame.payload_bytes();
                    self.resubscribes = 0;
                    self.consumed(payload.len() as u64);
                    return Ok((payload, from));
                }
                Some(Err(e)) => e,
                None => Error::Closed,
            };
            if !e.is_retriable() {
                self.ended = true;
                return Err(e);
            }
            if self.ended || self.resubscribes >= self.retries {
                return Err(e);
            }
            self.resubscribe(&e).await?;
        }
    }

    /// Subscribes again from the next undelivered offset, at the leader as
    /// metadata knows it after `cause`.
    async fn resubscribe(&mut self, cause: &Error) -> Result<()> {
        self.resubscribes += 1;
        let at_once = self
            .client
            .reroute(&self.topic, self.partition, Some(self.conn.addr), cause);
        if !at_once {
            tokio::time::sleep(self.retry_backoff * self.resubscribes).await;
        }
        let (conn, id) = subscribe_request(
            &self.client,
            &self.topic,
            self.partition,
            self.next,
            self.initial_credit,
            self.retries,
            self.retry_backoff,
        )
        .await?;
        tracing::info!(
            topic = %self.topic,
            partition = self.partition,
            offset = self.next,
            broker = %conn.addr,
            error = %cause,
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
