//! One client connection on one shard.
//!
//! Requests are read into a per-connection buffer, checked as frames before
//! anything is decoded (nothing is allocated for a frame that has not fully
//! arrived, and nothing beyond `frame_bytes_max`), verified as flatbuffers
//! and served in order. Responses and pushes share the socket through one
//! async lock; log bytes go out with sendfile ([`crate::zerocopy`]).
//!
//! Framing errors close the connection (after an error frame): the byte
//! stream can no longer be trusted. Every other bad input gets an error
//! response and the connection keeps going.

use crate::shard::{add, Acks, ErrReply, FetchData, FetchParams, Reply, Shard, TopicSpec};
use crate::zerocopy;
use flatbuffers::{FlatBufferBuilder, WIPOffset};
use futures::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use futures::lock::Mutex;
use glommio::net::TcpStream;
use shoal_shard::Notify;
use shoal_wire::fb;
use shoal_wire::frame::{self, Check};
use shoal_wire::ErrorCode;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

/// Largest fetch/push payload in one frame.
const FETCH_BYTES_MAX: u32 = 4 * 1024 * 1024;
/// Longest long-poll a client may ask for.
const MAX_WAIT_MAX: Duration = Duration::from_secs(60);
/// Fetches a connection may have waiting at once; past this they are
/// served one after another.
const FETCHES_IN_FLIGHT_MAX: usize = 64;
/// Produce acknowledgements a connection may have pending at once; past
/// this the next produce is answered before the loop reads on.
const PRODUCES_IN_FLIGHT_MAX: usize = 64;
/// Subscriptions per connection.
const SUBSCRIPTIONS_MAX: usize = 1024;
/// How long a push subscription long-polls before checking its state.
const PUSH_POLL: Duration = Duration::from_millis(250);

struct Writer {
    w: WriteHalf<TcpStream>,
    sock: RawFd,
    fbb: FlatBufferBuilder<'static>,
    head: Vec<u8>,
}

struct Subscription {
    credit: Cell<u64>,
    cancelled: Cell<bool>,
    changed: Notify,
}

struct Conn {
    shard: Rc<Shard>,
    out: Mutex<Writer>,
    subs: RefCell<HashMap<u64, Rc<Subscription>>>,
    closed: Cell<bool>,
    fetches_in_flight: Cell<usize>,
    produces_in_flight: Cell<usize>,
}

/// Serves a connection until the peer closes it, a framing error, or
/// shutdown.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let sock = stream.as_raw_fd();
    let (mut r, w) = stream.split();
    let conn = Rc::new(Conn {
        shard: shard.clone(),
        out: Mutex::new(Writer {
            w,
            sock,
            fbb: FlatBufferBuilder::with_capacity(1024),
            head: Vec::with_capacity(1024),
        }),
        subs: RefCell::new(HashMap::new()),
        closed: Cell::new(false),
        fetches_in_flight: Cell::new(0),
        produces_in_flight: Cell::new(0),
    });
    add(&shard.metrics.connections_accepted, 1);
    add(&shard.metrics.connections_open, 1);
    if let Err(e) = read_loop(&conn, &mut r).await {
        tracing::debug!(shard = shard.id, error = %e, "connection ended");
    }
    conn.closed.set(true);
    for s in conn.subs.borrow().values() {
        s.cancelled.set(true);
        s.changed.notify_all();
    }
    shard
        .metrics
        .connections_open
        .set(shard.metrics.connections_open.get() - 1);
}

async fn read_loop(conn: &Rc<Conn>, r: &mut ReadHalf<TcpStream>) -> std::io::Result<()> {
    let max = conn.shard.config.frame_bytes_max;
    let mut buf: Vec<u8> = vec![0; 64 * 1024];
    let mut filled = 0usize;
    loop {
        match frame::check(&buf[..filled], max) {
            Err(e) => {
                add(&conn.shard.metrics.errors, 1);
                let err = ErrReply::new(e.code(), format!("{e}; closing the connection"));
                let _ = conn.respond_error(0, &err).await;
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    e.to_string(),
                ));
            }
            Ok(Check::Incomplete { total }) => {
                if buf.len() < total {
                    buf.resize(total, 0);
                }
                let n = r.read(&mut buf[filled..]).await?;
                if n == 0 {
                    return Ok(());
                }
                filled += n;
            }
            Ok(Check::Complete(parts)) => {
                let header = &buf[parts.header.clone()];
                let payload = &buf[parts.payload.clone()];
                conn.handle(header, payload).await?;
                buf.copy_within(parts.total..filled, 0);
                filled -= parts.total;
                if buf.len() > 1024 * 1024 && filled < 64 * 1024 {
                    buf.truncate(64 * 1024);
                    buf.shrink_to_fit();
                }
            }
        }
    }
}

fn s(opt: Option<&str>) -> &str {
    opt.unwrap_or("")
}

impl Conn {
    /// Serves one request. An `Err` is an I/O error on the socket.
    async fn handle(self: &Rc<Self>, header: &[u8], payload: &[u8]) -> std::io::Result<()> {
        let req = match frame::decode_request(header) {
            Ok(r) => r,
            Err(e) => {
                add(&self.shard.metrics.errors, 1);
                return self
                    .respond_error(0, &ErrReply::new(e.code(), e.to_string()))
                    .await;
            }
        };
        let corr = req.correlation_id();
        if req.version() != 1 {
            let e = ErrReply::new(
                ErrorCode::UnsupportedVersion,
                format!("protocol version {} is not supported (1 is)", req.version()),
            );
            return self.respond_error(corr, &e).await;
        }
        let shard = &self.shard;
        let r: Reply<()> = match req.body_type() {
            fb::RequestBody::ProduceRequest => {
                let p = req.body_as_produce_request().expect("union type checked");
                let acks = match p.acks() {
                    fb::Acks::None => Acks::None,
                    fb::Acks::Leader => Acks::Leader,
                    _ => {
                        let e = ErrReply::new(
                            ErrorCode::InvalidConfig,
                            "acks=all needs replication; use leader or none",
                        );
                        return self.respond_error(corr, &e).await;
                    }
                };
                let started = std::time::Instant::now();
                match shard
                    .produce_start(s(p.topic()), p.partition(), payload, acks)
                    .await
                {
                    Ok(pending) if self.produces_in_flight.get() < PRODUCES_IN_FLIGHT_MAX => {
                        // Appended in request order; the wait for the disk
                        // runs beside the request loop, which goes on to the
                        // next request (answers carry correlation ids).
                        self.produces_in_flight
                            .set(self.produces_in_flight.get() + 1);
                        let conn = self.clone();
                        glommio::spawn_local(async move {
                            let r = conn.finish_produce(corr, pending, started).await;
                            conn.produces_in_flight
                                .set(conn.produces_in_flight.get() - 1);
                            if r.is_err() {
                                conn.closed.set(true);
                            }
                        })
                        .detach();
                        return Ok(());
                    }
                    Ok(pending) => return self.finish_produce(corr, pending, started).await,
                    Err(e) => Err(e),
                }
            }
            fb::RequestBody::FetchRequest => {
                let f = req.body_as_fetch_request().expect("union type checked");
                let params = FetchParams {
                    topic: s(f.topic()).to_string(),
                    partition: f.partition(),
                    offset: f.offset(),
                    timestamp_ms: f.by_timestamp().then_some(f.timestamp_ms()),
                    max_bytes: f.max_bytes().clamp(1, FETCH_BYTES_MAX),
                    min_bytes: f.min_bytes(),
                    max_wait: Duration::from_millis(u64::from(f.max_wait_ms())).min(MAX_WAIT_MAX),
                };
                if self.fetches_in_flight.get() >= FETCHES_IN_FLIGHT_MAX {
                    match shard.fetch(params).await {
                        Ok(ok) => return self.respond_fetch(corr, ok).await,
                        Err(e) => Err(e),
                    }
                } else {
                    // Long-polls run beside the request loop, so one waiting
                    // fetch never holds up the connection's other requests;
                    // answers carry their correlation ids.
                    self.fetches_in_flight.set(self.fetches_in_flight.get() + 1);
                    let conn = self.clone();
                    glommio::spawn_local(async move {
                        let r = match conn.shard.fetch(params).await {
                            Ok(ok) => conn.respond_fetch(corr, ok).await,
                            Err(e) => {
                                add(&conn.shard.metrics.errors, 1);
                                conn.respond_error(corr, &e).await
                            }
                        };
                        conn.fetches_in_flight.set(conn.fetches_in_flight.get() - 1);
                        if r.is_err() {
                            conn.closed.set(true);
                        }
                    })
                    .detach();
                    return Ok(());
                }
            }
            fb::RequestBody::MetadataRequest => return self.respond_metadata(corr, req).await,
            fb::RequestBody::CreateTopicRequest => {
                let c = req
                    .body_as_create_topic_request()
                    .expect("union type checked");
                let opt = |v: i64| (v >= 0).then_some(v as u64);
                let spec = TopicSpec {
                    name: s(c.name()).to_string(),
                    partitions: c.partitions(),
                    replication_factor: c.replication_factor(),
                    sync: c.sync().filter(|s| !s.is_empty()).map(str::to_string),
                    retention_ms: opt(c.retention_ms()),
                    retention_bytes: opt(c.retention_bytes()),
                    segment_bytes: opt(c.segment_bytes()),
                };
                match shard.create_topic(spec).await {
                    Ok(()) => {
                        return self
                            .respond(corr, fb::ResponseBody::CreateTopicResponse, |fbb| {
                                fb::CreateTopicResponse::create(
                                    fbb,
                                    &fb::CreateTopicResponseArgs {},
                                )
                                .as_union_value()
                            })
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
            fb::RequestBody::DeleteTopicRequest => {
                let d = req
                    .body_as_delete_topic_request()
                    .expect("union type checked");
                match shard.delete_topic(s(d.name()).to_string()).await {
                    Ok(()) => {
                        return self
                            .respond(corr, fb::ResponseBody::DeleteTopicResponse, |fbb| {
                                fb::DeleteTopicResponse::create(
                                    fbb,
                                    &fb::DeleteTopicResponseArgs {},
                                )
                                .as_union_value()
                            })
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
            fb::RequestBody::ListTopicsRequest | fb::RequestBody::DescribeTopicRequest => {
                return self.respond_topics(corr, req).await;
            }
            fb::RequestBody::SubscribeRequest => {
                let sr = req.body_as_subscribe_request().expect("union type checked");
                let (topic, partition, offset) =
                    (s(sr.topic()).to_string(), sr.partition(), sr.offset());
                match self.subscribe(&topic, partition, sr.credit_bytes()) {
                    Ok((id, sub)) => {
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
                        // Only now: no push may reach the client before the
                        // response that tells it the subscription id.
                        self.start_push(id, sub, topic, partition, offset);
                        return Ok(());
                    }
                    Err(e) => Err(e),
                }
            }
            fb::RequestBody::GrantCreditRequest => {
                let g = req
                    .body_as_grant_credit_request()
                    .expect("union type checked");
                let found = self.subs.borrow().get(&g.subscription_id()).cloned();
                match found {
                    Some(sub) => {
                        sub.credit.set(sub.credit.get().saturating_add(g.bytes()));
                        sub.changed.notify_all();
                        return self
                            .respond(corr, fb::ResponseBody::GrantCreditResponse, |fbb| {
                                fb::GrantCreditResponse::create(
                                    fbb,
                                    &fb::GrantCreditResponseArgs {},
                                )
                                .as_union_value()
                            })
                            .await;
                    }
                    None => Err(ErrReply::new(
                        ErrorCode::MalformedRequest,
                        format!("no subscription {} on this connection", g.subscription_id()),
                    )),
                }
            }
            fb::RequestBody::UnsubscribeRequest => {
                let u = req
                    .body_as_unsubscribe_request()
                    .expect("union type checked");
                if let Some(sub) = self.subs.borrow_mut().remove(&u.subscription_id()) {
                    sub.cancelled.set(true);
                    sub.changed.notify_all();
                }
                return self
                    .respond(corr, fb::ResponseBody::UnsubscribeResponse, |fbb| {
                        fb::UnsubscribeResponse::create(fbb, &fb::UnsubscribeResponseArgs {})
                            .as_union_value()
                    })
                    .await;
            }
            fb::RequestBody::MetricsRequest => {
                let m = shard.metrics_all().await;
                return self
                    .respond(corr, fb::ResponseBody::MetricsResponse, |fbb| {
                        let items: Vec<_> = m
                            .iter()
                            .map(|(k, v)| {
                                let name = fbb.create_string(k);
                                fb::Metric::create(
                                    fbb,
                                    &fb::MetricArgs {
                                        name: Some(name),
                                        value: *v,
                                    },
                                )
                            })
                            .collect();
                        let metrics = fbb.create_vector(&items);
                        fb::MetricsResponse::create(
                            fbb,
                            &fb::MetricsResponseArgs {
                                metrics: Some(metrics),
                            },
                        )
                        .as_union_value()
                    })
                    .await;
            }
            other => Err(ErrReply::new(
                ErrorCode::UnsupportedApi,
                format!("unknown request type {}", other.0),
            )),
        };
        if let Err(e) = r {
            add(&self.shard.metrics.errors, 1);
            return self.respond_error(corr, &e).await;
        }
        Ok(())
    }

    async fn send(
        &self,
        w: &mut Writer,
        header_len: usize,
        data: Option<&FetchData>,
    ) -> std::io::Result<()> {
        let payload_len = data.map_or(0, FetchData::len) as usize;
        let Writer {
            w: sock_w,
            sock,
            fbb,
            head,
        } = w;
        // Prefix and header in one write: one segment, one wake-up at the
        // client, for every response without payload.
        head.clear();
        head.extend_from_slice(&frame::prefix(header_len, payload_len));
        head.extend_from_slice(fbb.finished_data());
        sock_w.write_all(head).await?;
        if let Some(d) = data {
            let (fd, position, len) = match d {
                FetchData::Local(s) => (s.file().as_raw_fd(), s.file_position(), s.len),
                FetchData::Remote {
                    file,
                    position,
                    len,
                } => (file.as_raw_fd(), *position, *len),
            };
            let sent = zerocopy::send_file(sock_w, *sock, fd, position, len).await?;
            let m = &self.shard.metrics;
            add(&m.fetch_bytes, len);
            add(&m.zero_copy_bytes, sent.zero_copy);
            add(&m.copied_bytes, sent.copied);
        }
        sock_w.flush().await
    }

    async fn respond<F>(
        &self,
        corr: u32,
        body_type: fb::ResponseBody,
        body: F,
    ) -> std::io::Result<()>
    where
        F: FnOnce(&mut FlatBufferBuilder<'static>) -> WIPOffset<flatbuffers::UnionWIPOffset>,
    {
        self.respond_with(corr, body_type, body, None).await
    }

    async fn respond_with<F>(
        &self,
        corr: u32,
        body_type: fb::ResponseBody,
        body: F,
        data: Option<&FetchData>,
    ) -> std::io::Result<()>
    where
        F: FnOnce(&mut FlatBufferBuilder<'static>) -> WIPOffset<flatbuffers::UnionWIPOffset>,
    {
        let mut w = self.out.lock().await;
        w.fbb.reset();
        let b = body(&mut w.fbb);
        let resp = fb::Response::create(
            &mut w.fbb,
            &fb::ResponseArgs {
                correlation_id: corr,
                error_code: 0,
                error_message: None,
                body_type,
                body: Some(b),
            },
        );
        w.fbb.finish(resp, None);
        let len = w.fbb.finished_data().len();
        self.send(&mut w, len, data).await
    }

    /// Waits for a produce's acknowledgement, answers it, and records its
    /// latency from `started` (the request decoded) if it succeeded.
    async fn finish_produce(
        &self,
        corr: u32,
        pending: crate::shard::PendingProduce,
        started: std::time::Instant,
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
                self.shard.metrics.produce_latency.record(started.elapsed());
                Ok(())
            }
            Err(e) => {
                add(&self.shard.metrics.errors, 1);
                self.respond_error(corr, &e).await
            }
        }
    }

    async fn respond_error(&self, corr: u32, e: &ErrReply) -> std::io::Result<()> {
        let mut w = self.out.lock().await;
        w.fbb.reset();
        let msg = w.fbb.create_string(&e.message);
        let resp = fb::Response::create(
            &mut w.fbb,
            &fb::ResponseArgs {
                correlation_id: corr,
                error_code: e.code as u16,
                error_message: Some(msg),
                body_type: fb::ResponseBody::NONE,
                body: None,
            },
        );
        w.fbb.finish(resp, None);
        let len = w.fbb.finished_data().len();
        self.send(&mut w, len, None).await
    }

    async fn respond_fetch(&self, corr: u32, ok: crate::shard::FetchOk) -> std::io::Result<()> {
        let (hw, start, next) = (ok.high_watermark, ok.log_start_offset, ok.next_offset);
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
                    },
                )
                .as_union_value()
            },
            ok.data.as_ref(),
        )
        .await
    }

    async fn respond_metadata(&self, corr: u32, req: fb::Request<'_>) -> std::io::Result<()> {
        let wanted: Option<Vec<String>> = req
            .body_as_metadata_request()
            .and_then(|m| m.topics())
            .map(|t| t.iter().map(str::to_string).collect())
            .filter(|v: &Vec<String>| !v.is_empty());
        let topics = self.topic_infos(wanted).await;
        let topics = match topics {
            Ok(t) => t,
            Err(e) => return self.respond_error(corr, &e).await,
        };
        let cfg = self.shard.config.clone();
        self.respond(corr, fb::ResponseBody::MetadataResponse, |fbb| {
            let host = fbb.create_string(&cfg.advertised_host);
            let ports: Vec<u16> = (0..cfg.cores.len()).map(|i| cfg.shard_port(i)).collect();
            let ports = fbb.create_vector(&ports);
            let broker = fb::BrokerInfo::create(
                fbb,
                &fb::BrokerInfoArgs {
                    id: 0,
                    host: Some(host),
                    port: cfg.listen.port(),
                    shard_ports: Some(ports),
                },
            );
            let brokers = fbb.create_vector(&[broker]);
            let topics = build_topics(fbb, &topics);
            fb::MetadataResponse::create(
                fbb,
                &fb::MetadataResponseArgs {
                    brokers: Some(brokers),
                    topics: Some(topics),
                },
            )
            .as_union_value()
        })
        .await
    }

    async fn respond_topics(&self, corr: u32, req: fb::Request<'_>) -> std::io::Result<()> {
        if let Some(d) = req.body_as_describe_topic_request() {
            let name = s(d.name()).to_string();
            let infos = match self.topic_infos(Some(vec![name])).await {
                Ok(t) => t,
                Err(e) => return self.respond_error(corr, &e).await,
            };
            return self
                .respond(corr, fb::ResponseBody::DescribeTopicResponse, |fbb| {
                    let topic = build_topic(fbb, &infos[0]);
                    fb::DescribeTopicResponse::create(
                        fbb,
                        &fb::DescribeTopicResponseArgs { topic: Some(topic) },
                    )
                    .as_union_value()
                })
                .await;
        }
        let infos = match self.topic_infos(None).await {
            Ok(t) => t,
            Err(e) => return self.respond_error(corr, &e).await,
        };
        self.respond(corr, fb::ResponseBody::ListTopicsResponse, |fbb| {
            let topics = build_topics(fbb, &infos);
            fb::ListTopicsResponse::create(
                fbb,
                &fb::ListTopicsResponseArgs {
                    topics: Some(topics),
                },
            )
            .as_union_value()
        })
        .await
    }

    /// Topic descriptions with each partition's current offsets.
    async fn topic_infos(&self, names: Option<Vec<String>>) -> Reply<Vec<TopicInfo>> {
        let metas: Vec<crate::metadata::TopicMeta> = {
            let topics = self.shard.topics.borrow();
            match names {
                None => topics.values().cloned().collect(),
                Some(names) => names
                    .iter()
                    .map(|n| {
                        topics.get(n).cloned().ok_or_else(|| {
                            ErrReply::new(ErrorCode::UnknownTopic, format!("unknown topic {n:?}"))
                        })
                    })
                    .collect::<Reply<_>>()?,
            }
        };
        let mut out = Vec::with_capacity(metas.len());
        for meta in metas {
            let mut parts = Vec::with_capacity(meta.shards.len());
            for (p, &shard) in meta.shards.iter().enumerate() {
                let st = self
                    .shard
                    .partition_state(&meta.name, p as u32)
                    .await
                    .unwrap_or_default();
                parts.push((p as u32, shard, st));
            }
            out.push(TopicInfo { meta, parts });
        }
        Ok(out)
    }

    fn subscribe(
        &self,
        topic: &str,
        partition: u32,
        credit: u64,
    ) -> Reply<(u64, Rc<Subscription>)> {
        self.shard.owner(topic, partition)?;
        if self.subs.borrow().len() >= SUBSCRIPTIONS_MAX {
            return Err(ErrReply::new(
                ErrorCode::ResourceLimit,
                format!("at most {SUBSCRIPTIONS_MAX} subscriptions per connection"),
            ));
        }
        let id = self.shard.next_subscription_id();
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
        topic: String,
        partition: u32,
        offset: u64,
    ) {
        let conn = self.clone();
        glommio::spawn_local(async move {
            if let Err(e) = conn.push_loop(id, sub, topic, partition, offset).await {
                tracing::debug!(subscription = id, error = %e.message, "push subscription ended");
                let _ = conn.respond_error(0, &e).await;
            }
            conn.subs.borrow_mut().remove(&id);
        })
        .detach();
    }

    /// Streams new batches to the client, never more payload bytes than the
    /// credit it granted.
    async fn push_loop(
        &self,
        id: u64,
        sub: Rc<Subscription>,
        topic: String,
        partition: u32,
        mut offset: u64,
    ) -> Reply<()> {
        loop {
            if sub.cancelled.get() || self.closed.get() || self.shard.stopping.get() {
                return Ok(());
            }
            let credit = sub.credit.get();
            if credit == 0 {
                let changed = sub.changed.changed();
                let _ = glommio::timer::timeout(PUSH_POLL, async {
                    changed.await;
                    Ok(())
                })
                .await;
                continue;
            }
            let params = FetchParams {
                topic: topic.clone(),
                partition,
                offset,
                timestamp_ms: None,
                max_bytes: credit.min(u64::from(FETCH_BYTES_MAX)) as u32,
                min_bytes: 1,
                max_wait: PUSH_POLL,
            };
            let ok = self.shard.fetch(params).await?;
            let Some(data) = &ok.data else { continue };
            if data.len() > sub.credit.get() {
                // The next batch is larger than the credit left: wait for more.
                let changed = sub.changed.changed();
                let _ = glommio::timer::timeout(PUSH_POLL, async {
                    changed.await;
                    Ok(())
                })
                .await;
                continue;
            }
            sub.credit.set(sub.credit.get() - data.len());
            let (hw, next) = (ok.high_watermark, ok.next_offset);
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
            offset = next;
        }
    }
}

struct TopicInfo {
    meta: crate::metadata::TopicMeta,
    parts: Vec<(u32, u16, crate::shard::PartitionState)>,
}

fn build_topic<'a>(fbb: &mut FlatBufferBuilder<'a>, t: &TopicInfo) -> WIPOffset<fb::TopicInfo<'a>> {
    let parts: Vec<_> = t
        .parts
        .iter()
        .map(|(p, shard, st)| {
            fb::PartitionInfo::create(
                fbb,
                &fb::PartitionInfoArgs {
                    partition: *p,
                    leader_broker: 0,
                    shard: *shard,
                    leader_epoch: 0,
                    log_start_offset: st.log_start_offset,
                    high_watermark: st.high_watermark,
                },
            )
        })
        .collect();
    let parts = fbb.create_vector(&parts);
    let name = fbb.create_string(&t.meta.name);
    let sync = fbb.create_string(&t.meta.sync);
    fb::TopicInfo::create(
        fbb,
        &fb::TopicInfoArgs {
            name: Some(name),
            partitions: Some(parts),
            replication_factor: 1,
            sync: Some(sync),
            retention_ms: t.meta.retention_ms.map_or(-1, |v| v as i64),
            retention_bytes: t.meta.retention_bytes.map_or(-1, |v| v as i64),
            segment_bytes: t.meta.segment_bytes as i64,
        },
    )
}

fn build_topics<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    topics: &[TopicInfo],
) -> WIPOffset<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<fb::TopicInfo<'a>>>> {
    let items: Vec<_> = topics.iter().map(|t| build_topic(fbb, t)).collect();
    fbb.create_vector(&items)
}
