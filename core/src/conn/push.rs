//! Push subscriptions (C5): the broker streams batches from the
//! subscription's offset on, and new ones as they are appended, never more
//! payload bytes than the credit the client granted.
//!
//! On the shard that owns the partition a subscription is a stream driven
//! by the log ([`Conn::push_stream`]): no request per slice, no long-poll
//! loop, nothing allocated per slice, the next slice read while the last
//! one is sent. Through another shard's port it is a loop of mesh fetches.

use crate::conn::dispatch::{body_mismatch, s};
use crate::conn::{Conn, Subscription};
use crate::error::{Error, Result};
use crate::limits::{FETCH_BYTES_MAX, PUSH_IDLE_WAIT, RESIDENT_WAIT_MAX, SUBSCRIPTIONS_MAX};
use crate::metrics::add;
use crate::partitions::{FetchData, FetchParams};
use crate::rt;
use shoal_shard::{Notify, ReadSlice};
use shoal_wire::fb;
use std::cell::Cell;
use std::rc::Rc;

impl Conn {
    pub async fn subscribe(
        self: &Rc<Self>,
        corr: u32,
        req: fb::Request<'_>,
    ) -> std::io::Result<()> {
        let Some(sr) = req.body_as_subscribe_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let (topic, partition, offset) = (s(sr.topic()).to_string(), sr.partition(), sr.offset());
        let topic_id = sr.topic_id();
        let (id, sub) = match self.add_subscription(&topic, topic_id, partition, sr.credit_bytes())
        {
            Ok(v) => v,
            Err(e) => return self.fail(corr, e).await,
        };
        self.respond(corr, fb::ResponseBody::SubscribeResponse, |fbb| {
            fb::SubscribeResponse::create(
                fbb,
                &fb::SubscribeResponseArgs {
                    subscription_id: id,
                },
            )
            .as_union_value()
        })
        .await?;
        // Only now: no push may reach the client before the response that
        // tells it the subscription id.
        self.start_push(id, sub, (topic, topic_id), partition, offset);
        Ok(())
    }

    pub async fn grant_credit(&self, corr: u32, req: fb::Request<'_>) -> std::io::Result<()> {
        let Some(g) = req.body_as_grant_credit_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let found = self.subs.borrow().get(&g.subscription_id()).cloned();
        let Some(sub) = found else {
            let e = Error::Malformed(format!(
                "no subscription {} on this connection",
                g.subscription_id()
            ));
            return self.fail(corr, e).await;
        };
        sub.credit.set(sub.credit.get().saturating_add(g.bytes()));
        sub.changed.notify_all();
        self.respond(corr, fb::ResponseBody::GrantCreditResponse, |fbb| {
            fb::GrantCreditResponse::create(fbb, &fb::GrantCreditResponseArgs {}).as_union_value()
        })
        .await
    }

    pub async fn unsubscribe(&self, corr: u32, req: fb::Request<'_>) -> std::io::Result<()> {
        let Some(u) = req.body_as_unsubscribe_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        if let Some(sub) = self.subs.borrow_mut().remove(&u.subscription_id()) {
            sub.cancelled.set(true);
            sub.changed.notify_all();
        }
        self.respond(corr, fb::ResponseBody::UnsubscribeResponse, |fbb| {
            fb::UnsubscribeResponse::create(fbb, &fb::UnsubscribeResponseArgs {}).as_union_value()
        })
        .await
    }

    fn add_subscription(
        &self,
        topic: &str,
        topic_id: u64,
        partition: u32,
        credit: u64,
    ) -> Result<(u64, Rc<Subscription>)> {
        self.reactor.owner(topic, partition)?;
        self.reactor.partitions.check_id(topic, topic_id)?;
        if self.subs.borrow().len() >= SUBSCRIPTIONS_MAX {
            return Err(Error::ResourceLimit(format!(
                "at most {SUBSCRIPTIONS_MAX} subscriptions per connection"
            )));
        }
        let id = self.reactor.next_subscription_id();
        let sub = Rc::new(Subscription {
            credit: Cell::new(credit),
            cancelled: Cell::new(false),
            changed: Notify::default(),
        });
        self.subs.borrow_mut().insert(id, sub.clone());
        Ok((id, sub))
    }

    fn start_push(
        self: &Rc<Self>,
        id: u64,
        sub: Rc<Subscription>,
        topic: (String, u64),
        partition: u32,
        offset: u64,
    ) {
        let conn = self.clone();
        rt::spawn_detached(async move {
            if let Err(e) = conn.push_loop(id, sub, topic, partition, offset).await {
                tracing::debug!(subscription = id, error = %e, "push subscription ended");
                let _ = conn.respond_error(0, &e).await;
            }
            conn.subs.borrow_mut().remove(&id);
        });
    }

    /// Waits up to [`PUSH_IDLE_WAIT`] for a credit grant or a cancellation.
    async fn wait_for_credit(sub: &Subscription) {
        let _ = rt::timeout(PUSH_IDLE_WAIT, sub.changed.changed()).await;
    }

    fn push_over(&self, sub: &Subscription) -> bool {
        sub.cancelled.get() || self.closed.get() || self.reactor.stopping.get()
    }

    /// Streams the partition to the client within its credit: from the
    /// log itself while this shard owns it ([`Conn::push_stream`]), through
    /// the mesh while another shard does (a client on a shard's port
    /// other than the owner's).
    async fn push_loop(
        &self,
        id: u64,
        sub: Rc<Subscription>,
        (topic, topic_id): (String, u64),
        partition: u32,
        mut offset: u64,
    ) -> Result<()> {
        while !self.push_over(&sub) {
            if self.reactor.owner(&topic, partition)? == self.reactor.id {
                match self
                    .push_stream(id, &sub, (&topic, topic_id), partition, offset)
                    .await?
                {
                    Some(at) => offset = at,
                    None => return Ok(()),
                }
            } else {
                match self
                    .push_through_mesh(id, &sub, (&topic, topic_id), partition, offset)
                    .await?
                {
                    Some(at) => offset = at,
                    None => return Ok(()),
                }
            }
        }
        Ok(())
    }

    /// The push stream of a partition this shard owns, driven by the log:
    /// a slice goes out as soon as data is visible and credit allows, and
    /// the next slice is read (its pages brought into memory, the
    /// read-ahead kept going) while the current one is sent, so the disk
    /// and the socket work at once; the socket holds as many slices as its
    /// buffer takes, the credit bounds them all. Nothing is allocated per
    /// slice: the partition is looked up by reference, the frame head is
    /// built in the connection's reused builder, the bytes go by sendfile.
    ///
    /// Ends with `Ok(None)` when the subscription is over (cancelled, the
    /// connection or the shard closing, a send failed), `Ok(Some(offset))`
    /// when another shard now owns the partition, and an error for the
    /// client otherwise (the partition deleted, leadership lost, ...).
    async fn push_stream(
        &self,
        id: u64,
        sub: &Subscription,
        (topic, topic_id): (&str, u64),
        partition: u32,
        offset: u64,
    ) -> Result<Option<u64>> {
        // The slice whose credit is taken and that goes out next.
        let mut ready: Option<ReadSlice> = None;
        let mut read_at = offset;
        loop {
            let send = async {
                match &ready {
                    Some(slice) => self.push_slice(id, (topic, partition), slice).await,
                    None => Ok(()),
                }
            };
            let read = self.next_slice(sub, (topic, topic_id), partition, read_at);
            let (sent, read) = futures::join!(send, read);
            if sent.is_err() {
                // The connection is gone; its read loop ends it.
                return Ok(None);
            }
            ready = match read? {
                Next::Slice(slice) => {
                    read_at = slice.next_offset;
                    Some(slice)
                }
                Next::Moved => return Ok(Some(read_at)),
                Next::Over => return Ok(None),
            };
        }
    }

    /// The next slice of a local partition from `offset`, with its credit
    /// taken: waits for data, for credit, or for the subscription to end.
    /// Every look at the partition checks again that this shard still owns
    /// and may serve it.
    async fn next_slice(
        &self,
        sub: &Subscription,
        (topic, topic_id): (&str, u64),
        partition: u32,
        offset: u64,
    ) -> Result<Next> {
        let reactor = &*self.reactor;
        loop {
            if self.push_over(sub) {
                return Ok(Next::Over);
            }
            if reactor.owner(topic, partition)? != reactor.id {
                return Ok(Next::Moved);
            }
            reactor.partitions.check_id(topic, topic_id)?;
            let log = reactor.partitions.local_log(topic, partition)?;
            let credit = sub.credit.get();
            if credit == 0 {
                Self::wait_for_credit(sub).await;
                continue;
            }
            let max_bytes = credit.min(u64::from(FETCH_BYTES_MAX));
            let slice = log.read_ready(offset, max_bytes, RESIDENT_WAIT_MAX).await?;
            if slice.is_empty() {
                // At the end: wait for an append (or a grant, a
                // cancellation, the log closing). The periodic look again
                // notices a leadership change on an idle partition.
                let changed = sub.changed.changed();
                let data = log.wait_for_data(offset);
                futures::pin_mut!(changed, data);
                let either = futures::future::select(data, changed);
                let _ = rt::timeout(PUSH_IDLE_WAIT, either).await;
                continue;
            }
            if slice.len > sub.credit.get() {
                // The next batch is larger than the credit left (a grant
                // may have come while the slice was read): wait for more.
                Self::wait_for_credit(sub).await;
                continue;
            }
            sub.credit.set(sub.credit.get() - slice.len);
            if slice.is_cached() {
                add(&reactor.metrics.tail_cache_bytes, slice.len);
            }
            return Ok(Next::Slice(slice));
        }
    }

    /// Sends one slice as a `Push` frame.
    async fn push_slice(
        &self,
        id: u64,
        (topic, partition): (&str, u32),
        slice: &ReadSlice,
    ) -> std::io::Result<()> {
        let (hw, next) = (slice.high_watermark, slice.next_offset);
        let data = FetchData::Local(slice.clone());
        self.send_push(id, hw, next, &data).await?;
        let m = &self.reactor.metrics;
        if let Some(t) = m.append_clocks.appended_at(topic, partition, next) {
            m.e2e_latency.record(rt::now().saturating_duration_since(t));
        }
        Ok(())
    }

    async fn send_push(
        &self,
        id: u64,
        high_watermark: u64,
        next_offset: u64,
        data: &FetchData,
    ) -> std::io::Result<()> {
        self.respond_with(
            0,
            fb::ResponseBody::Push,
            |fbb| {
                fb::Push::create(
                    fbb,
                    &fb::PushArgs {
                        subscription_id: id,
                        high_watermark,
                        next_offset,
                    },
                )
                .as_union_value()
            },
            Some(data),
        )
        .await
    }

    /// The push stream of a partition another shard owns: one mesh fetch
    /// (a long-poll) per slice. Ends like [`Conn::push_stream`]; `Some`
    /// when this shard now owns the partition.
    async fn push_through_mesh(
        &self,
        id: u64,
        sub: &Subscription,
        (topic, topic_id): (&str, u64),
        partition: u32,
        mut offset: u64,
    ) -> Result<Option<u64>> {
        loop {
            if self.push_over(sub) {
                return Ok(None);
            }
            if self.reactor.owner(topic, partition)? == self.reactor.id {
                return Ok(Some(offset));
            }
            let credit = sub.credit.get();
            if credit == 0 {
                Self::wait_for_credit(sub).await;
                continue;
            }
            let params = FetchParams {
                topic: topic.to_string(),
                topic_id,
                partition,
                offset,
                timestamp_ms: None,
                max_bytes: credit.min(u64::from(FETCH_BYTES_MAX)) as u32,
                min_bytes: 1,
                max_wait: PUSH_IDLE_WAIT,
                replica: None,
            };
            // Waits for data without polling; a grant or a cancellation
            // ends the wait early (the loop then looks again).
            let changed = sub.changed.changed();
            let fetch = self.reactor.fetch(params);
            futures::pin_mut!(changed, fetch);
            let ok = match futures::future::select(fetch, changed).await {
                futures::future::Either::Left((r, _)) => r?,
                futures::future::Either::Right(_) => continue,
            };
            let Some(data) = &ok.data else { continue };
            if data.len() > sub.credit.get() {
                Self::wait_for_credit(sub).await;
                continue;
            }
            sub.credit.set(sub.credit.get() - data.len());
            if self
                .send_push(id, ok.high_watermark, ok.next_offset, data)
                .await
                .is_err()
            {
                return Ok(None);
            }
            if let Some(t) = ok.appended_at {
                self.reactor
                    .metrics
                    .e2e_latency
                    .record(rt::now().saturating_duration_since(t));
            }
            offset = ok.next_offset;
        }
    }
}

/// What [`Conn::next_slice`] found.
enum Next {
    /// A slice to send, its credit taken.
    Slice(ReadSlice),
    /// Another shard owns the partition now.
    Moved,
    /// The subscription is over.
    Over,
}
