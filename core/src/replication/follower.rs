//! The follower's side of a partition: a fetch task pulling from the
//! leader's owning shard.
//!
//! Each fetch names the leader epoch the follower believes current and the
//! epoch of its own last batch. The leader answers with whole batches from
//! its log (sent from the segment file, zero-copy on its side), which the
//! follower appends as they are, offsets and epochs included; or, when the
//! follower's log diverges from the leader's, with the end of the last
//! epoch they share, and the follower truncates there (KIP-279; never to
//! its own high watermark, which is how Kafka lost acknowledged records
//! before KIP-101). The next fetch goes out only once the appended batches
//! are stored as the topic's sync mode promises, so the position the leader
//! counts for acks=all is in this replica's file.
//!
//! The task ends when its role does ([`Fetcher::stop`]); it is never
//! cancelled inside a log operation.

use super::dial::PeerStream;
use super::Slot;
use crate::limits::FETCH_BYTES_MAX;
use crate::reactor::Reactor;
use crate::rt;
use flatbuffers::FlatBufferBuilder;
use futures::{AsyncReadExt, AsyncWriteExt};
use shoal_shard::{Notify, PartitionLog};
use shoal_wire::batch::Batches;
use shoal_wire::frame::{self, FRAME_PREFIX_BYTES};
use shoal_wire::group::GROUPS_TOPIC;
use shoal_wire::{fb, ErrorCode};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

/// How long a fetch waits at the leader for new data.
const FETCH_WAIT: Duration = Duration::from_millis(500);
/// Bytes a fetch asks for.
const FETCH_BYTES: u32 = 1 << 20;
/// Beyond the fetch's wait: an answer later than this means the
/// connection is dead.
const ANSWER_GRACE: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Stop {
    flag: Cell<bool>,
    notify: Notify,
}

impl Stop {
    /// Runs `f` unless the task is told to stop first.
    async fn or_stop<T>(&self, f: impl std::future::Future<Output = T>) -> Option<T> {
        if self.flag.get() {
            return None;
        }
        let stopped = self.notify.changed();
        match futures::future::select(std::pin::pin!(f), std::pin::pin!(stopped)).await {
            futures::future::Either::Left((v, _)) => Some(v),
            futures::future::Either::Right(_) => None,
        }
    }

    async fn sleep(&self, d: Duration) -> bool {
        self.or_stop(rt::sleep(d)).await.is_some()
    }
}

/// A running follower.
pub struct Fetcher {
    pub leader: Option<u32>,
    pub epoch: u32,
    stop: Rc<Stop>,
    task: Option<rt::Task<()>>,
}

impl Fetcher {
    /// Follows `leader` at `epoch` (no leader alive: waits for the
    /// metadata to name one, which starts a new fetcher).
    pub fn start(
        reactor: Rc<Reactor>,
        slot: Rc<Slot>,
        log: Rc<PartitionLog>,
        leader: Option<u32>,
        epoch: u32,
    ) -> Fetcher {
        let stop = Rc::new(Stop::default());
        let task = leader.map(|l| {
            let f = Follow {
                reactor,
                topic: slot.topic.clone(),
                partition: slot.partition,
                log,
                leader: l,
                epoch,
                stop: stop.clone(),
                standby: RefCell::new(
                    (slot.topic == GROUPS_TOPIC).then(crate::group::standby::Standby::default),
                ),
            };
            rt::spawn(f.run())
        });
        Fetcher {
            leader,
            epoch,
            stop,
            task,
        }
    }

    /// Ends the fetch task and waits for it: no append of this role
    /// happens after.
    pub async fn stop(self) {
        self.stop.flag.set(true);
        self.stop.notify.notify_all();
        if let Some(t) = self.task {
            t.await;
        }
    }
}

struct Follow {
    reactor: Rc<Reactor>,
    topic: String,
    partition: u32,
    log: Rc<PartitionLog>,
    leader: u32,
    epoch: u32,
    stop: Rc<Stop>,
    /// `__shoal_groups` only: the group state built from this copy, for
    /// checkpoints.
    standby: RefCell<Option<crate::group::standby::Standby>>,
}

/// Why a connection's fetch loop ended.
enum Ended {
    Stopped,
    /// Try again after a pause (connection lost, leader not ready).
    Retry(String),
}

impl Follow {
    async fn run(self) {
        let mut backoff = BACKOFF_MIN;
        let mut warned = false;
        while !self.stop.flag.get() {
            let why = match self.leader_addr() {
                None => "the leader is not registered".to_string(),
                Some((host, addr)) => {
                    let tls = self.reactor.config.tls.as_ref();
                    match self
                        .stop
                        .or_stop(super::dial::connect(tls, &host, addr, CONNECT_TIMEOUT))
                        .await
                    {
                        None => return,
                        Some(Ok(mut stream)) => {
                            if let Err(why) = self.authenticate(&mut stream).await {
                                why
                            } else {
                                match self.fetch_loop(stream, &mut backoff).await {
                                    Ended::Stopped => return,
                                    Ended::Retry(why) => why,
                                }
                            }
                        }
                        Some(Err(why)) => why,
                    }
                }
            };
            if !warned {
                tracing::info!(topic = %self.topic, partition = self.partition, leader = self.leader, epoch = self.epoch, "follower waits: {why}");
                warned = true;
            } else {
                tracing::debug!(topic = %self.topic, partition = self.partition, leader = self.leader, "follower waits: {why}");
            }
            if !self.stop.sleep(backoff).await {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// With auth on: the SCRAM exchange as the inter-broker user, first
    /// on a new connection to the leader.
    async fn authenticate(&self, stream: &mut PeerStream) -> Result<(), String> {
        let auth = &self.reactor.config.auth;
        if !auth.enabled {
            return Ok(());
        }
        let Some((user, password)) = &auth.inter_broker else {
            return Err("auth is on but no inter_broker_user is configured".into());
        };
        match self
            .stop
            .or_stop(rt::timeout(
                CONNECT_TIMEOUT,
                crate::auth::client::authenticate(stream, user, password),
            ))
            .await
        {
            None => Err("stopping".into()),
            Some(None) => Err("the leader did not answer authentication in time".into()),
            Some(Some(Err(e))) => Err(format!("cannot authenticate to the leader: {e}")),
            Some(Some(Ok(()))) => Ok(()),
        }
    }

    /// The leader's advertised host and the address of its shard port.
    fn leader_addr(&self) -> Option<(String, std::net::SocketAddr)> {
        let view = self.reactor.cluster.borrow().clone()?;
        let broker = view.brokers.get(&self.leader)?;
        let meta = self.reactor.partitions.topic(&self.topic)?;
        let shard = meta
            .placement
            .get(self.partition as usize)?
            .replica_on(self.leader)?
            .shard;
        let port = broker.shard_port(shard)?;
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(broker.host.as_str(), port))
            .ok()?
            .next()?;
        Some((broker.host.clone(), addr))
    }

    async fn fetch_loop(&self, mut stream: PeerStream, backoff: &mut Duration) -> Ended {
        let me = self.reactor.broker_id().unwrap_or(0);
        let mut fbb = FlatBufferBuilder::new();
        let mut out = Vec::with_capacity(256);
        let mut buf: Vec<u8> = Vec::with_capacity(FETCH_BYTES as usize + 4096);
        let mut corr: u32 = 0;
        // A role is one incarnation of the topic: a topic deleted and
        // created again under the name gets new roles.
        let Some(topic_id) = self.reactor.partitions.topic(&self.topic).map(|m| m.id) else {
            return Ended::Stopped;
        };
        loop {
            if self.stop.flag.get() {
                return Ended::Stopped;
            }
            corr = corr.wrapping_add(1);
            let offset = self.log.next_offset();
            let last_epoch = self.log.last_epoch().map_or(-1, |e| e as i32);
            encode_fetch(
                &mut fbb,
                &mut out,
                corr,
                &self.topic,
                self.partition,
                topic_id,
                offset,
                me,
                self.epoch,
                last_epoch,
            );
            let exchange = async {
                stream.write_all(&out).await?;
                // TLS holds written bytes until flushed.
                stream.flush().await?;
                read_frame(&mut stream, &mut buf).await
            };
            let parts = match self
                .stop
                .or_stop(rt::timeout(FETCH_WAIT + ANSWER_GRACE, exchange))
                .await
            {
                None => return Ended::Stopped,
                Some(None) => return Ended::Retry("the leader did not answer in time".into()),
                Some(Some(Err(e))) => return Ended::Retry(format!("connection lost: {e}")),
                Some(Some(Ok(parts))) => parts,
            };
            let header = &buf[parts.header.clone()];
            let resp = match frame::decode_response(header) {
                Ok(r) => r,
                Err(e) => return Ended::Retry(format!("unreadable answer: {e}")),
            };
            let code = ErrorCode::from_u16(resp.error_code());
            if code != ErrorCode::None {
                let msg = resp.error_message().unwrap_or_default().to_string();
                return Ended::Retry(format!("the leader answered {code:?}: {msg}"));
            }
            let Some(f) = resp.body_as_fetch_response() else {
                return Ended::Retry("the leader answered another request".into());
            };
            if f.leader_epoch() != self.epoch {
                return Ended::Retry(format!(
                    "the leader answered for epoch {}, not {}",
                    f.leader_epoch(),
                    self.epoch
                ));
            }
            let (hw, div_epoch, div_end) = (
                f.high_watermark(),
                f.diverging_epoch(),
                f.diverging_end_offset(),
            );
            if div_epoch != -1 {
                // A groups replica starting over keeps the leader's
                // checkpoint first: without it, the state below the
                // leader's log start would be gone from this replica.
                let checkpoint = if div_epoch == -3 && self.standby.borrow().is_some() {
                    match self
                        .leader_checkpoint(&mut stream, &mut buf, &mut corr)
                        .await
                    {
                        Ok(c) => Some(c),
                        Err(ended) => return ended,
                    }
                } else {
                    None
                };
                self.truncate(div_epoch, div_end).await;
                if let Some(bytes) = checkpoint {
                    self.keep_leader_checkpoint(bytes).await;
                }
                continue;
            }
            let payload = &buf[parts.payload.clone()];
            let bmax = self.log.config().batch_bytes_max;
            let mut appended = false;
            for b in Batches::new(payload, bmax) {
                let (h, bytes) = match b {
                    Ok(x) => x,
                    Err(e) => return Ended::Retry(format!("a bad batch from the leader: {e}")),
                };
                if h.base_offset < self.log.next_offset() {
                    continue;
                }
                if let Err(e) = self.log.append_replica(bytes).await {
                    return Ended::Retry(format!("cannot append at {}: {e}", h.base_offset));
                }
                appended = true;
            }
            if appended {
                if let Err(e) = self.log.wait_acked(self.log.next_offset()).await {
                    return Ended::Retry(format!("cannot store replicated batches: {e}"));
                }
            }
            self.log.set_high_watermark(hw.min(self.log.next_offset()));
            *backoff = BACKOFF_MIN;
            if let Some(ended) = self.standby_step(&mut stream, &mut buf, &mut corr).await {
                return ended;
            }
        }
    }

    /// The leader's group checkpoint (empty if it has none).
    async fn leader_checkpoint(
        &self,
        stream: &mut PeerStream,
        buf: &mut Vec<u8>,
        corr: &mut u32,
    ) -> Result<Vec<u8>, Ended> {
        *corr = corr.wrapping_add(1);
        let me = self.reactor.broker_id().unwrap_or(0) as i32;
        let frame = encode_checkpoint(*corr, self.partition, 0, self.epoch, me, &[]);
        let exchange = async {
            stream.write_all(&frame).await?;
            stream.flush().await?;
            read_frame(stream, buf).await
        };
        let parts = match self.stop.or_stop(rt::timeout(ANSWER_GRACE, exchange)).await {
            None => return Err(Ended::Stopped),
            Some(None) => return Err(Ended::Retry("the leader sent no checkpoint in time".into())),
            Some(Some(Err(e))) => return Err(Ended::Retry(format!("connection lost: {e}"))),
            Some(Some(Ok(parts))) => parts,
        };
        let resp = frame::decode_response(&buf[parts.header.clone()])
            .map_err(|e| Ended::Retry(format!("unreadable answer: {e}")))?;
        if resp.error_code() != 0 {
            return Err(Ended::Retry(format!(
                "the leader sent no checkpoint: {}",
                resp.error_message().unwrap_or_default()
            )));
        }
        Ok(resp
            .body_as_group_checkpoint_response()
            .and_then(|r| r.checkpoint())
            .map(|c| c.bytes().to_vec())
            .unwrap_or_default())
    }

    /// Keeps the leader's checkpoint after starting over at its log start,
    /// and builds the standby state from it.
    async fn keep_leader_checkpoint(&self, bytes: Vec<u8>) {
        let offset = match crate::group::records::decode_checkpoint(&bytes) {
            Ok((o, _)) => o,
            Err(e) if bytes.is_empty() => {
                tracing::warn!(partition = self.partition, "the leader has no group checkpoint: this replica's group state is incomplete ({e})");
                return;
            }
            Err(e) => {
                tracing::warn!(partition = self.partition, error = %e, "the leader's group checkpoint is unreadable");
                return;
            }
        };
        match crate::group::coordinator::install_checkpoint(&self.reactor, &self.log, offset, bytes)
            .await
        {
            Ok(_) => {
                tracing::info!(
                    partition = self.partition,
                    offset,
                    "kept the leader's group checkpoint before starting over"
                );
                *self.standby.borrow_mut() = Some(crate::group::standby::Standby::default());
            }
            Err(e) => {
                tracing::warn!(partition = self.partition, error = %e, "could not keep the leader's group checkpoint")
            }
        }
    }

    /// `__shoal_groups`: applies what is committed to the standby state and,
    /// when due, checkpoints: kept here (cutting this log), then shipped to
    /// the leader on the fetch connection.
    async fn standby_step(
        &self,
        stream: &mut PeerStream,
        buf: &mut Vec<u8>,
        corr: &mut u32,
    ) -> Option<Ended> {
        let mut standby = self.standby.borrow_mut().take()?;
        let due = match standby.catch_up(&self.log).await {
            Ok(()) => standby.due(self.reactor.config.group_checkpoint_records),
            Err(e) => {
                tracing::warn!(partition = self.partition, error = %e, "the groups standby stops checkpointing: it could not build the group state");
                standby.reset(true);
                None
            }
        };
        *self.standby.borrow_mut() = Some(standby);
        let (offset, bytes) = due?;
        match crate::group::coordinator::install_checkpoint(
            &self.reactor,
            &self.log,
            offset,
            bytes.clone(),
        )
        .await
        {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::warn!(partition = self.partition, error = %e, "could not keep a group checkpoint");
                return None;
            }
        }
        if bytes.len() + 4096 > self.reactor.config.frame_bytes_max {
            tracing::warn!(partition = self.partition, bytes = bytes.len(), frame_bytes_max = self.reactor.config.frame_bytes_max, "a group checkpoint is larger than a frame: kept here only (the leader checkpoints itself)");
            return None;
        }
        *corr = corr.wrapping_add(1);
        let me = self.reactor.broker_id().unwrap_or(0) as i32;
        let frame = encode_checkpoint(*corr, self.partition, offset, self.epoch, me, &bytes);
        let exchange = async {
            stream.write_all(&frame).await?;
            stream.flush().await?;
            read_frame(stream, buf).await
        };
        let parts = match self.stop.or_stop(rt::timeout(ANSWER_GRACE, exchange)).await {
            None => return Some(Ended::Stopped),
            Some(None) => {
                return Some(Ended::Retry(
                    "the leader did not take the checkpoint in time".into(),
                ))
            }
            Some(Some(Err(e))) => return Some(Ended::Retry(format!("connection lost: {e}"))),
            Some(Some(Ok(parts))) => parts,
        };
        match frame::decode_response(&buf[parts.header.clone()]) {
            Ok(r) if r.error_code() == 0 => {
                tracing::info!(
                    partition = self.partition,
                    offset,
                    bytes = bytes.len(),
                    leader = self.leader,
                    "group checkpoint shipped to the leader"
                );
            }
            Ok(r) => {
                tracing::warn!(
                    partition = self.partition,
                    offset,
                    code = r.error_code(),
                    error = r.error_message().unwrap_or_default(),
                    "the leader refused a group checkpoint"
                );
            }
            Err(e) => return Some(Ended::Retry(format!("unreadable answer: {e}"))),
        }
        None
    }

    /// The leader's log and ours part after `epoch` ends at `end` there
    /// (`epoch` -2: no epoch in common; truncate to `end`; -3: the leader no
    /// longer holds what we lack: start over at `end`, its log start).
    async fn truncate(&self, epoch: i32, end: u64) {
        if let Some(s) = self.standby.borrow_mut().as_mut() {
            s.reset(false);
        }
        if epoch == -3 {
            tracing::warn!(topic = %self.topic, partition = self.partition, leader = self.leader, log_end = self.log.next_offset(), leader_start = end, "the leader no longer holds what this replica lacks: starting over at its log start");
            if let Err(e) = self.log.start_over_at(end).await {
                tracing::error!(topic = %self.topic, partition = self.partition, error = %e, "cannot start over");
                let _ = self.stop.sleep(BACKOFF_MAX).await;
            }
            return;
        }
        let ours = if epoch >= 0 {
            match self.log.epoch_end(epoch as u32) {
                Some((_, our_end)) => our_end,
                None => self.log.start_offset(),
            }
        } else {
            self.log.next_offset()
        };
        let to = end.min(ours).min(self.log.next_offset());
        tracing::warn!(topic = %self.topic, partition = self.partition, leader = self.leader, epoch = self.epoch, log_end = self.log.next_offset(), to, "log diverges from the leader's: truncating");
        if let Err(e) = self.log.truncate_to(to).await {
            tracing::error!(topic = %self.topic, partition = self.partition, error = %e, "cannot truncate");
            let _ = self.stop.sleep(BACKOFF_MAX).await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn encode_fetch(
    fbb: &mut FlatBufferBuilder<'static>,
    out: &mut Vec<u8>,
    corr: u32,
    topic: &str,
    partition: u32,
    topic_id: u64,
    offset: u64,
    me: u32,
    epoch: u32,
    last_fetched_epoch: i32,
) {
    fbb.reset();
    let t = fbb.create_string(topic);
    let body = fb::FetchRequest::create(
        fbb,
        &fb::FetchRequestArgs {
            topic: Some(t),
            partition,
            offset,
            by_timestamp: false,
            timestamp_ms: 0,
            max_bytes: FETCH_BYTES.min(FETCH_BYTES_MAX),
            min_bytes: 1,
            max_wait_ms: FETCH_WAIT.as_millis() as u32,
            topic_id,
            replica_id: me as i32,
            current_leader_epoch: epoch as i32,
            last_fetched_epoch,
        },
    );
    let client = fbb.create_string("shoal-replica");
    let req = fb::Request::create(
        fbb,
        &fb::RequestArgs {
            version: 1,
            correlation_id: corr,
            client_id: Some(client),
            body_type: fb::RequestBody::FetchRequest,
            body: Some(body.as_union_value()),
        },
    );
    fbb.finish(req, None);
    out.clear();
    frame::write_frame(out, fbb.finished_data(), &[]);
}

/// A checkpoint of `__shoal_groups` partition `partition` for its leader.
fn encode_checkpoint(
    corr: u32,
    partition: u32,
    offset: u64,
    leader_epoch: u32,
    me: i32,
    bytes: &[u8],
) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let body = fb::GroupCheckpointRequest::create(
        &mut fbb,
        &fb::GroupCheckpointRequestArgs {
            partition,
            offset,
            leader_epoch,
            replica_id: me,
        },
    );
    let client = fbb.create_string("shoal-replica");
    let req = fb::Request::create(
        &mut fbb,
        &fb::RequestArgs {
            version: 1,
            correlation_id: corr,
            client_id: Some(client),
            body_type: fb::RequestBody::GroupCheckpointRequest,
            body: Some(body.as_union_value()),
        },
    );
    fbb.finish(req, None);
    let mut out = Vec::with_capacity(bytes.len() + 256);
    frame::write_frame(&mut out, fbb.finished_data(), bytes);
    out
}

/// Reads one response frame into `buf` (reused: no allocation once it has
/// grown to the largest answer).
async fn read_frame(
    stream: &mut PeerStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<frame::FrameParts> {
    buf.resize(FRAME_PREFIX_BYTES, 0);
    stream.read_exact(&mut buf[..FRAME_PREFIX_BYTES]).await?;
    let total = match frame::check_response(buf) {
        Ok(frame::Check::Incomplete { total }) => total,
        Ok(frame::Check::Complete(parts)) => return Ok(parts),
        Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
    };
    buf.resize(total, 0);
    stream.read_exact(&mut buf[FRAME_PREFIX_BYTES..]).await?;
    match frame::check_response(buf) {
        Ok(frame::Check::Complete(parts)) => Ok(parts),
        Ok(frame::Check::Incomplete { .. }) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame shorter than its length",
        )),
        Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
    }
}
