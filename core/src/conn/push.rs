//! Push subscriptions (C5): the broker streams new batches as they are
//! appended, never more payload bytes than the credit the client granted.

use crate::conn::dispatch::{body_mismatch, s};
use crate::conn::{Conn, Subscription};
use crate::error::{Error, Result};
use crate::limits::{FETCH_BYTES_MAX, PUSH_IDLE_WAIT, SUBSCRIPTIONS_MAX};
use crate::partitions::FetchParams;
use crate::rt;
use shoal_shard::Notify;
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

    /// Streams new batches to the client within its credit.
    async fn push_loop(
        &self,
        id: u64,
        sub: Rc<Subscription>,
        (topic, topic_id): (String, u64),
        partition: u32,
        mut offset: u64,
    ) -> Result<()> {
        loop {
            if sub.cancelled.get() || self.closed.get() || self.reactor.stopping.get() {
                return Ok(());
            }
            let credit = sub.credit.get();
            if credit == 0 {
                Self::wait_for_credit(&sub).await;
                continue;
            }
            let params = FetchParams {
                topic: topic.clone(),
                topic_id,
                partition,
                offset,
                timestamp_ms: None,
                max_bytes: credit.min(u64::from(FETCH_BYTES_MAX)) as u32,
                min_bytes: 1,
                max_wait: PUSH_IDLE_WAIT,
                replica: None,
            };
            // Waits for data without polling: an idle subscription costs a
            // waiter slot, nothing more. A grant or a cancellation ends the
            // wait early (the loop then looks again).
            let changed = sub.changed.changed();
            let fetch = self.reactor.fetch(params);
            futures::pin_mut!(changed, fetch);
            let ok = match futures::future::select(fetch, changed).await {
                futures::future::Either::Left((r, _)) => r?,
                futures::future::Either::Right(_) => continue,
            };
            let Some(data) = &ok.data else { continue };
            if data.len() > sub.credit.get() {
                // The next batch is larger than the credit left: wait for more.
                Self::wait_for_credit(&sub).await;
                continue;
            }
            sub.credit.set(sub.credit.get() - data.len());
            let (hw, next, appended_at) = (ok.high_watermark, ok.next_offset, ok.appended_at);
            let r = self
                .respond_with(
                    0,
                    fb::ResponseBody::Push,
                    |fbb| {
                        fb::Push::create(
                            fbb,
                            &fb::PushArgs {
                                subscription_id: id,
                                high_watermark: hw,
                                next_offset: next,
                            },
                        )
                        .as_union_value()
                    },
                    Some(data),
                )
                .await;
            if r.is_err() {
                return Ok(());
            }
            if let Some(t) = appended_at {
                self.reactor
                    .metrics
                    .e2e_latency
                    .record(rt::now().saturating_duration_since(t));
            }
            offset = next;
        }
    }
}
