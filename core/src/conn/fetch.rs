//! Fetch requests. Long-polls run beside the read loop (up to
//! [`FETCHES_IN_FLIGHT_MAX`] per connection), so one waiting fetch never
//! holds up the connection's other requests.

use crate::conn::dispatch::{body_mismatch, s};
use crate::conn::Conn;
use crate::limits::{FETCHES_IN_FLIGHT_MAX, FETCH_BYTES_MAX, MAX_WAIT_MAX};
use crate::partitions::{FetchOk, FetchParams, ReplicaFetch};
use crate::rt;
use shoal_wire::fb;
use std::rc::Rc;
use std::time::Duration;

impl Conn {
    pub async fn fetch(self: &Rc<Self>, corr: u32, req: fb::Request<'_>) -> std::io::Result<()> {
        let Some(f) = req.body_as_fetch_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let params = FetchParams {
            topic: s(f.topic()).to_string(),
            topic_id: f.topic_id(),
            partition: f.partition(),
            offset: f.offset(),
            timestamp_ms: f.by_timestamp().then_some(f.timestamp_ms()),
            max_bytes: f.max_bytes().clamp(1, FETCH_BYTES_MAX),
            min_bytes: f.min_bytes(),
            max_wait: Duration::from_millis(u64::from(f.max_wait_ms())).min(MAX_WAIT_MAX),
            replica: (f.replica_id() >= 0).then(|| ReplicaFetch {
                broker: f.replica_id() as u32,
                current_leader_epoch: f.current_leader_epoch(),
                last_fetched_epoch: f.last_fetched_epoch(),
            }),
        };
        if self.fetches_in_flight.get() >= FETCHES_IN_FLIGHT_MAX {
            return self.fetch_and_answer(corr, params).await;
        }
        self.fetches_in_flight.set(self.fetches_in_flight.get() + 1);
        let conn = self.clone();
        rt::spawn_detached(async move {
            let r = conn.fetch_and_answer(corr, params).await;
            conn.fetches_in_flight.set(conn.fetches_in_flight.get() - 1);
            if r.is_err() {
                conn.closed.set(true);
            }
        });
        Ok(())
    }

    async fn fetch_and_answer(&self, corr: u32, params: FetchParams) -> std::io::Result<()> {
        let started = rt::now();
        match self.reactor.fetch(params).await {
            Ok(ok) => {
                let appended_at = ok.appended_at;
                self.respond_fetch(corr, ok).await?;
                let m = &self.reactor.metrics;
                let now = rt::now();
                m.fetch_latency
                    .record(now.saturating_duration_since(started));
                if let Some(t) = appended_at {
                    m.e2e_latency.record(now.saturating_duration_since(t));
                }
                Ok(())
            }
            Err(e) => self.fail(corr, e).await,
        }
    }

    async fn respond_fetch(&self, corr: u32, ok: FetchOk) -> std::io::Result<()> {
        let (hw, start, next) = (ok.high_watermark, ok.log_start_offset, ok.next_offset);
        let (leader_epoch, (diverging_epoch, diverging_end_offset)) =
            (ok.leader_epoch, ok.diverging.unwrap_or((-1, 0)));
        self.respond_with(
            corr,
            fb::ResponseBody::FetchResponse,
            |fbb| {
                fb::FetchResponse::create(
                    fbb,
                    &fb::FetchResponseArgs {
                        high_watermark: hw,
                        log_start_offset: start,
                        next_offset: next,
                        leader_epoch,
                        diverging_epoch,
                        diverging_end_offset,
                    },
                )
                .as_union_value()
            },
            ok.data.as_ref(),
        )
        .await
    }
}
