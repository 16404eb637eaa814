//! Produce requests: appended in request order by the read loop, answered
//! by a task of their own once acknowledged, so the loop reads on while the
//! disk works (answers carry correlation ids).

use crate::conn::dispatch::{body_mismatch, s};
use crate::conn::Conn;
use crate::error::Error;
use crate::limits::{ACKS_ALL_TIMEOUT_MAX, ACKS_ALL_TIMEOUT_MIN, PRODUCES_IN_FLIGHT_MAX};
use crate::partitions::{Acks, PendingProduce};
use crate::rt;
use shoal_wire::fb;
use std::rc::Rc;
use std::time::Instant;

impl Conn {
    pub async fn produce(
        self: &Rc<Self>,
        corr: u32,
        req: fb::Request<'_>,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let Some(p) = req.body_as_produce_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let acks = match p.acks() {
            fb::Acks::None => Acks::None,
            fb::Acks::Leader => Acks::Leader,
            fb::Acks::All => Acks::All {
                timeout: std::time::Duration::from_millis(u64::from(p.timeout_ms()))
                    .clamp(ACKS_ALL_TIMEOUT_MIN, ACKS_ALL_TIMEOUT_MAX),
            },
            other => {
                let e = Error::Malformed(format!("unknown acks level {}", other.0));
                return self.fail(corr, e).await;
            }
        };
        if let Err(e) = crate::metadata::check_not_internal(s(p.topic())) {
            return self.fail(corr, e).await;
        }
        let started = rt::now();
        let pending = match self
            .reactor
            .produce_start(s(p.topic()), p.topic_id(), p.partition(), payload, acks)
            .await
        {
            Ok(p) => p,
            Err(e) => return self.fail(corr, e).await,
        };
        if self.produces_in_flight.get() >= PRODUCES_IN_FLIGHT_MAX {
            return self.finish_produce(corr, pending, started).await;
        }
        self.produces_in_flight
            .set(self.produces_in_flight.get() + 1);
        let conn = self.clone();
        rt::spawn_detached(async move {
            let r = conn.finish_produce(corr, pending, started).await;
            conn.produces_in_flight
                .set(conn.produces_in_flight.get() - 1);
            if r.is_err() {
                conn.closed.set(true);
            }
        });
        Ok(())
    }

    /// Waits for a produce's acknowledgement, answers it, and records its
    /// latency from `started` (the request decoded) if it succeeded.
    async fn finish_produce(
        &self,
        corr: u32,
        pending: PendingProduce,
        started: Instant,
    ) -> std::io::Result<()> {
        match pending.finish().await {
            Ok(ok) => {
                self.respond(corr, fb::ResponseBody::ProduceResponse, |fbb| {
                    fb::ProduceResponse::create(
                        fbb,
                        &fb::ProduceResponseArgs {
                            base_offset: ok.base_offset,
                            last_offset: ok.last_offset,
                            duplicate: ok.duplicate,
                        },
                    )
                    .as_union_value()
                })
                .await?;
                self.reactor
                    .metrics
                    .produce_latency
                    .record(started.elapsed());
                Ok(())
            }
            Err(e) => self.fail(corr, e).await,
        }
    }
}
