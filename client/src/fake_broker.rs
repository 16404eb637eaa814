//! A scripted broker for the client's unit tests: it speaks the real frame
//! format, but the test decides when a produce is answered and how, and
//! sends pushes by hand. That makes timing-dependent client behaviour
//! (buffer waits, linger, failed batches, credit) deterministic, which a
//! real broker process cannot.
//!
//! Several fakes can form a [`FakeCluster`]: they share one view of the
//! live brokers and of where each partition is led, answer metadata from
//! it, and refuse produce, fetch and subscribe for partitions they do not
//! lead with `NotLeader` (with or without a leader hint), or
//! `LeaderNotAvailable` while a partition is offline.
//!
//! Stored batches live in a [`FakeLog`] per partition, shared by every
//! member of a cluster: when leadership moves, the new leader has what the
//! old one stored (as with `acks=all`), unless a test truncates it (a lost
//! `acks=leader` tail). The log keeps idempotent producers' state as the
//! broker does (the last few batches per producer id): a retry of a stored
//! batch is answered with its original offsets and `duplicate`, a gap with
//! `OutOfOrderSequence`. Fetches read the log; subscriptions are pushed
//! what it holds and what is appended, within their credit. A script per
//! request type fails, drops or ignores the next requests.
// A kit: each test uses the few knobs it needs.
#![allow(dead_code)]

use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};
use shoal_wire::batch::{validate_batch, BatchHeader, Batches, Records};
use shoal_wire::frame::{self, Check};
use shoal_wire::{fb, ErrorCode};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The release the fake reports in metadata.
pub(crate) const FAKE_VERSION: &str = "0.0.0-fake";

/// How the fake answers produce requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProduceMode {
    Ack,
    /// Kept until [`FakeBroker::release`].
    Hold,
    Fail(ErrorCode),
}

/// One produce request as the fake saw it.
#[derive(Debug, Clone)]
pub(crate) struct ProduceCall {
    pub partition: u32,
    pub headers: Vec<BatchHeader>,
    /// The port it arrived on (public or a shard port).
    pub port: u16,
    /// Stored (false: refused, e.g. with NotLeader).
    pub accepted: bool,
    /// Every batch was already stored (an idempotent retry).
    pub duplicate: bool,
}

/// What the fake does with the next request of a kind, instead of its
/// usual answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scripted {
    /// Answers with this error (`NotLeader` without a hint); stores nothing.
    Fail(ErrorCode),
    /// Closes the connection before storing anything.
    DropBeforeStore,
    /// Stores the batches, then closes the connection without answering.
    DropAfterStore,
    /// Stores the batches and never answers (a hung broker).
    StoreAndIgnore,
}

/// The request types a script applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Api {
    Metadata,
    Produce,
    Fetch,
    Subscribe,
}

/// Batches remembered per idempotent producer (the broker's
/// `PRODUCER_BATCHES_KEPT`).
pub(crate) const FAKE_PRODUCER_BATCHES_KEPT: usize = 5;

/// Adds `n` to a sequence number, wrapping from `i32::MAX` to 0 (sequences
/// are never negative: a negative one means "no sequence").
pub(crate) fn seq_add(seq: i32, n: i64) -> i32 {
    ((i64::from(seq) + n).rem_euclid(1 << 31)) as i32
}

#[derive(Debug, Clone, Copy)]
struct StoredSeq {
    first_seq: i32,
    last_seq: i32,
    base_offset: u64,
    last_offset: u64,
}

#[derive(Debug, Default)]
struct FakeProducer {
    epoch: i16,
    batches: VecDeque<StoredSeq>,
}

/// One partition's log.
#[derive(Debug, Default)]
pub(crate) struct FakeLog {
    /// Stored batches, base offsets set.
    pub batches: Vec<Vec<u8>>,
    pub next_offset: u64,
    producers: HashMap<i64, FakeProducer>,
}

/// A batch appended (or recognised as stored already): base offset, last
/// offset, duplicate.
type AppendOk = (u64, u64, bool);

impl FakeLog {
    /// Appends one valid batch, or answers a retry of a stored one with its
    /// offsets, or refuses a sequence gap.
    fn append(&mut self, batch: &[u8]) -> Result<AppendOk, (ErrorCode, String)> {
        let h = BatchHeader::decode(batch).map_err(|e| (ErrorCode::CorruptBatch, e.to_string()))?;
        let count = i64::from(h.record_count);
        if h.is_idempotent() {
            let last_seq = seq_add(h.base_sequence, count - 1);
            if let Some(p) = self.producers.get(&h.producer_id) {
                if h.producer_epoch < p.epoch {
                    return Err((ErrorCode::OutOfOrderSequence, "fenced epoch (fake)".into()));
                }
                if h.producer_epoch == p.epoch {
                    if let Some(b) = p
                        .batches
                        .iter()
                        .find(|b| b.first_seq == h.base_sequence && b.last_seq == last_seq)
                    {
                        return Ok((b.base_offset, b.last_offset, true));
                    }
                    let expected = p.batches.back().map_or(0, |b| seq_add(b.last_seq, 1));
                    if h.base_sequence != expected {
                        return Err((
                            ErrorCode::OutOfOrderSequence,
                            format!(
                                "producer {}: expected sequence {expected}, got {} (fake)",
                                h.producer_id, h.base_sequence
                            ),
                        ));
                    }
                }
            }
            let base = self.next_offset;
            let p = self.producers.entry(h.producer_id).or_default();
            if p.epoch != h.producer_epoch {
                p.epoch = h.producer_epoch;
                p.batches.clear();
            }
            if p.batches.len() == FAKE_PRODUCER_BATCHES_KEPT {
                p.batches.pop_front();
            }
            p.batches.push_back(StoredSeq {
                first_seq: h.base_sequence,
                last_seq,
                base_offset: base,
                last_offset: base + h.record_count as u64 - 1,
            });
        }
        let base = self.next_offset;
        let mut stored = batch.to_vec();
        shoal_wire::batch::set_base_offset(&mut stored, base);
        self.batches.push(stored);
        self.next_offset = base + u64::from(h.record_count);
        Ok((base, self.next_offset - 1, false))
    }

    /// Whole batches from the one holding `from`, at least one, up to
    /// `max_bytes`; and the offset after the last.
    fn read(&self, from: u64, max_bytes: usize) -> (Vec<u8>, u64) {
        let mut out = Vec::new();
        let mut next = from;
        for b in &self.batches {
            let Ok(h) = BatchHeader::decode(b) else {
                continue;
            };
            if h.next_offset() <= from {
                continue;
            }
            if !out.is_empty() && out.len() + b.len() > max_bytes {
                break;
            }
            out.extend_from_slice(b);
            next = h.next_offset();
        }
        (out, next)
    }

    /// The first offset of the first batch with a record at or after `ts`,
    /// or the end.
    fn offset_for_timestamp(&self, ts: i64) -> u64 {
        self.batches
            .iter()
            .filter_map(|b| BatchHeader::decode(b).ok())
            .find(|h| h.max_timestamp_ms >= ts)
            .map_or(self.next_offset, |h| h.base_offset)
    }

    /// Loses every batch from `offset` on (a leader's unreplicated tail),
    /// with what the producers' state says about them.
    pub fn truncate(&mut self, offset: u64) {
        self.batches
            .retain(|b| BatchHeader::decode(b).is_ok_and(|h| h.base_offset < offset));
        self.next_offset = self.next_offset.min(offset);
        self.producers.retain(|_, p| {
            p.batches.retain(|b| b.last_offset < offset);
            !p.batches.is_empty()
        });
    }

    /// Every stored record: offset and value.
    pub fn records(&self) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        for b in &self.batches {
            let Ok(h) = BatchHeader::decode(b) else {
                continue;
            };
            for r in Records::new(b).flatten() {
                out.push((
                    h.base_offset + u64::from(r.offset_delta),
                    r.value.unwrap_or_default().to_vec(),
                ));
            }
        }
        out
    }
}

/// Logs by (topic, partition).
pub(crate) type Logs = Arc<Mutex<HashMap<(String, u32), FakeLog>>>;

fn logs_lock(l: &Logs) -> std::sync::MutexGuard<'_, HashMap<(String, u32), FakeLog>> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where one partition is led, as a [`FakeCluster`] knows it.
#[derive(Debug, Clone)]
pub(crate) struct FakePlacement {
    pub leader: u32,
    pub shard: u16,
    pub leader_epoch: u32,
    pub replicas: Vec<u32>,
    pub isr: Vec<u32>,
    pub offline: bool,
    /// What metadata says instead (leader, epoch) while the cluster's
    /// `stale_metadata` lasts: brokers that lag behind the truth.
    pub advertised: Option<(u32, u32)>,
}

/// One member of a [`FakeCluster`].
#[derive(Debug, Clone)]
pub(crate) struct FakeMember {
    pub id: u32,
    pub port: u16,
    pub shard_ports: Vec<u16>,
    pub rack: Option<String>,
    /// Listed in metadata.
    pub live: bool,
}

#[derive(Debug, Default)]
pub(crate) struct ClusterView {
    pub name: String,
    pub controller: Option<(u32, u64)>,
    pub members: Vec<FakeMember>,
    pub topics: Vec<(String, u32)>,
    pub placement: HashMap<(String, u32), FakePlacement>,
    /// NotLeader answers name the leader.
    pub hints: bool,
    /// Metadata answers left that still show `advertised` placements.
    pub stale_metadata: u32,
}

/// Fakes sharing one view of a cluster, and its logs.
#[derive(Clone, Default)]
pub(crate) struct FakeCluster {
    pub view: Arc<Mutex<ClusterView>>,
    pub logs: Logs,
}

impl FakeCluster {
    pub fn new(name: &str) -> FakeCluster {
        let c = FakeCluster::default();
        c.with(|v| {
            v.name = name.to_string();
            v.hints = true;
        });
        c
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut ClusterView) -> T) -> T {
        f(&mut self.view.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Adds a topic whose partition `p` is led by `leaders[p]` on shard 0,
    /// with every member as a replica (leader first) and all in sync.
    pub fn topic(&self, name: &str, leaders: &[u32]) {
        self.with(|v| {
            v.topics.push((name.to_string(), leaders.len() as u32));
            let ids: Vec<u32> = v.members.iter().map(|m| m.id).collect();
            for (p, &leader) in leaders.iter().enumerate() {
                let mut replicas = vec![leader];
                replicas.extend(ids.iter().copied().filter(|&i| i != leader));
                v.placement.insert(
                    (name.to_string(), p as u32),
                    FakePlacement {
                        leader,
                        shard: 0,
                        leader_epoch: 0,
                        isr: replicas.clone(),
                        replicas,
                        offline: false,
                        advertised: None,
                    },
                );
            }
        });
    }

    pub fn place(&self, topic: &str, partition: u32, f: impl FnOnce(&mut FakePlacement)) {
        self.with(|v| {
            if let Some(p) = v.placement.get_mut(&(topic.to_string(), partition)) {
                f(p);
            }
        });
    }

    pub fn member(&self, id: u32) -> Option<FakeMember> {
        self.with(|v| v.members.iter().find(|m| m.id == id).cloned())
    }

    /// Moves `topic`/`partition` to `leader` with a new leader epoch.
    pub fn move_leader(&self, topic: &str, partition: u32, leader: u32) {
        self.place(topic, partition, |p| {
            p.leader = leader;
            p.leader_epoch += 1;
            p.offline = false;
        });
    }

    /// Takes broker `id` out of the live brokers metadata lists.
    pub fn remove_member(&self, id: u32) {
        self.with(|v| v.members.retain(|m| m.id != id));
    }

    pub fn log<T>(&self, topic: &str, partition: u32, f: impl FnOnce(&mut FakeLog) -> T) -> T {
        f(logs_lock(&self.logs)
            .entry((topic.to_string(), partition))
            .or_default())
    }
}

impl ProduceCall {
    pub fn records(&self) -> u32 {
        self.headers.iter().map(|h| h.record_count).sum()
    }
}

struct Held {
    out: mpsc::UnboundedSender<Vec<u8>>,
    corr: u32,
    topic: String,
    partition: u32,
    payload: Vec<u8>,
}

/// A push subscription the fake feeds from its log.
struct FakeSub {
    out: mpsc::UnboundedSender<Vec<u8>>,
    topic: String,
    partition: u32,
    /// Next offset to push.
    next: u64,
    granted_bytes: u64,
    pushed_bytes: u64,
}

#[derive(Default)]
struct State {
    /// This fake's broker id (0 alone).
    id: u32,
    cluster: Option<FakeCluster>,
    topics: Vec<(String, u32)>,
    fetches: Vec<(u32, u16)>,
    subscribes: Vec<(u32, u16, u64)>,
    shard_ports: Vec<u16>,
    produce_mode: Option<ProduceMode>,
    produces: Vec<ProduceCall>,
    held: Vec<Held>,
    logs: Logs,
    scripts: HashMap<Api, VecDeque<Scripted>>,
    subs: HashMap<u64, FakeSub>,
    subs_made: u64,
    grants: Vec<(u64, u64)>,
    /// Grants are recorded but never answered.
    grants_unanswered: bool,
    /// Connections stop reading requests (their socket buffers fill up).
    reading_paused: bool,
    /// The next produce that stores several batches gets another
    /// producer's batch between each two of them.
    interleave_next: bool,
    subscribe_credits: Vec<u64>,
    connections: usize,
    metadata_requests: usize,
}

type Tasks = Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>;

pub(crate) struct FakeBroker {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Listeners and the connections they accepted.
    tasks: Tasks,
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn accept_loop(listener: tokio::net::TcpListener, st: Arc<Mutex<State>>, tasks: Tasks) {
    let t = tasks.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            lock(&st).connections += 1;
            let conn = tokio::spawn(serve(s, st.clone()));
            t.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
        }
    });
    tasks.lock().unwrap_or_else(|p| p.into_inner()).push(task);
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeBroker {
    /// A fake with `topics` (name, partitions), all on shard 0, no shard
    /// ports, answering produces at once.
    pub async fn start(topics: &[(&str, u32)]) -> FakeBroker {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a local port");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(Mutex::new(State {
            topics: topics.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
            produce_mode: Some(ProduceMode::Ack),
            ..State::default()
        }));
        let tasks = Tasks::default();
        accept_loop(listener, state.clone(), tasks.clone());
        FakeBroker { addr, state, tasks }
    }

    /// A member `id` of `cluster` with a public port and one shard port;
    /// it is listed live in the cluster's view.
    pub async fn start_member(cluster: &FakeCluster, id: u32) -> FakeBroker {
        let fake = FakeBroker::start(&[]).await;
        let shard = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a shard port");
        let shard_port = shard.local_addr().expect("local address").port();
        fake.also_listen(shard);
        {
            let mut st = lock(&fake.state);
            st.id = id;
            st.cluster = Some(cluster.clone());
            st.logs = cluster.logs.clone();
            st.shard_ports = vec![shard_port];
        }
        cluster.with(|v| {
            v.members.push(FakeMember {
                id,
                port: fake.addr.port(),
                shard_ports: vec![shard_port],
                rack: Some(format!("rack-{id}")),
                live: true,
            })
        });
        fake
    }

    /// Stops listening and drops every connection, as a dead broker.
    pub fn kill(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        // The connections' writers end with the last sender of their queue.
        let mut st = lock(&self.state);
        st.subs.clear();
        st.held.clear();
    }

    /// Serves on `listener` too (a shard port).
    pub fn also_listen(&self, listener: tokio::net::TcpListener) {
        accept_loop(listener, self.state.clone(), self.tasks.clone());
    }

    /// The first shard port.
    pub fn shard_port(&self) -> u16 {
        lock(&self.state).shard_ports.first().copied().unwrap_or(0)
    }

    /// Fetches seen: (partition, port it arrived on).
    pub fn fetches(&self) -> Vec<(u32, u16)> {
        lock(&self.state).fetches.clone()
    }

    /// Subscribes seen: (partition, port it arrived on, offset).
    pub fn subscribes(&self) -> Vec<(u32, u16, u64)> {
        lock(&self.state).subscribes.clone()
    }

    pub fn addr_string(&self) -> String {
        self.addr.to_string()
    }

    pub fn set_shard_ports(&self, ports: &[u16]) {
        lock(&self.state).shard_ports = ports.to_vec();
    }

    pub fn set_produce_mode(&self, m: ProduceMode) {
        lock(&self.state).produce_mode = Some(m);
    }

    pub fn produces(&self) -> Vec<ProduceCall> {
        lock(&self.state).produces.clone()
    }

    pub fn held(&self) -> usize {
        lock(&self.state).held.len()
    }

    pub fn connections(&self) -> usize {
        lock(&self.state).connections
    }

    pub fn metadata_requests(&self) -> usize {
        lock(&self.state).metadata_requests
    }

    pub fn pause_reading(&self, paused: bool) {
        lock(&self.state).reading_paused = paused;
    }

    pub fn leave_grants_unanswered(&self) {
        lock(&self.state).grants_unanswered = true;
    }

    pub fn grants(&self) -> Vec<(u64, u64)> {
        lock(&self.state).grants.clone()
    }

    pub fn subscribe_credits(&self) -> Vec<u64> {
        lock(&self.state).subscribe_credits.clone()
    }

    /// Answers the oldest held produce: stored, or failed with `code`.
    pub fn release(&self, code: Option<ErrorCode>) -> bool {
        let mut st = lock(&self.state);
        if st.held.is_empty() {
            return false;
        }
        let h = st.held.remove(0);
        let frame = match code {
            None => match store(&mut st, &h.topic, h.partition, &h.payload) {
                Ok((base, last, dup)) => produce_ok(h.corr, base, last, dup),
                Err((c, m)) => error(h.corr, c, &m),
            },
            Some(c) => error(h.corr, c, "failed by the test"),
        };
        let _ = h.out.send(frame);
        true
    }

    /// The next `n` requests of `api` get `what` instead of their answer
    /// (after whatever was scripted before).
    pub fn script(&self, api: Api, what: Scripted, n: usize) {
        let mut st = lock(&self.state);
        let q = st.scripts.entry(api).or_default();
        q.extend(std::iter::repeat_n(what, n));
    }

    /// The next produce of several batches is stored with another
    /// producer's batch between each two (two connections' appends
    /// interleaved on the broker).
    pub fn interleave_next_produce(&self) {
        lock(&self.state).interleave_next = true;
    }

    /// Drops what is left of `api`'s script.
    pub fn clear_script(&self, api: Api) {
        lock(&self.state).scripts.remove(&api);
    }

    /// Scripted answers not yet used.
    pub fn scripted_left(&self, api: Api) -> usize {
        lock(&self.state).scripts.get(&api).map_or(0, VecDeque::len)
    }

    /// What this fake has stored in `topic`/`partition` (shared with its
    /// cluster): offset and value of every record.
    pub fn records(&self, topic: &str, partition: u32) -> Vec<(u64, Vec<u8>)> {
        let logs = lock(&self.state).logs.clone();
        let mut l = logs_lock(&logs);
        l.entry((topic.to_string(), partition))
            .or_default()
            .records()
    }

    /// Flips one byte inside stored batch number `index` of
    /// `topic`/`partition`, past its header: its CRC no longer matches (a
    /// second flip mends it).
    pub fn flip_byte(&self, topic: &str, partition: u32, index: usize) {
        let logs = lock(&self.state).logs.clone();
        let mut l = logs_lock(&logs);
        let log = l.entry((topic.to_string(), partition)).or_default();
        let b = &mut log.batches[index];
        let at = b.len() - 1;
        b[at] ^= 0x40;
    }

    /// Stores `values` in `topic`/`partition` as one batch, as another
    /// producer would, and pushes it to this fake's subscribers.
    pub fn append(&self, topic: &str, partition: u32, values: &[&[u8]]) {
        let batch = shoal_wire::batch::build_batch(values, 1);
        let mut st = lock(&self.state);
        let _ = store(&mut st, topic, partition, &batch);
    }

    /// Ends every push subscription with `code`, as a broker that stopped
    /// leading: `tagged` names the subscription in the answer (a Push body),
    /// else the error goes to the whole connection as the broker does it
    /// today.
    pub fn end_subscriptions(&self, code: ErrorCode, tagged: bool) {
        let ids: Vec<u64> = lock(&self.state).subs.keys().copied().collect();
        for id in ids {
            self.end_subscription(id, code, tagged);
        }
    }

    /// Ends one push subscription with `code` (see
    /// [`Self::end_subscriptions`]).
    pub fn end_subscription(&self, id: u64, code: ErrorCode, tagged: bool) {
        let mut st = lock(&self.state);
        if let Some(sub) = st.subs.remove(&id) {
            let frame = response(
                0,
                Some((code, "subscription ended (fake)")),
                |fbb| {
                    if !tagged {
                        return (fb::ResponseBody::NONE, None);
                    }
                    let b = fb::Push::create(
                        fbb,
                        &fb::PushArgs {
                            subscription_id: id,
                            high_watermark: 0,
                            next_offset: 0,
                        },
                    );
                    (fb::ResponseBody::Push, Some(b.as_union_value()))
                },
                &[],
            );
            let _ = sub.out.send(frame);
        }
    }

    /// Waits until `n` produces are held.
    pub async fn wait_held(&self, n: usize) {
        for _ in 0..2000 {
            if self.held() >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        panic!("expected {n} held produces, have {}", self.held());
    }

    /// Subscriptions made so far (their ids are 1, 2, ...).
    pub fn subscriptions(&self) -> usize {
        lock(&self.state).subs_made as usize
    }

    /// Sends a push of `payload` for `subscription`, outside the log and
    /// its credit.
    pub fn push(&self, subscription: u64, payload: &[u8], next_offset: u64) {
        let st = lock(&self.state);
        let sub = st.subs.get(&subscription).expect("a known subscription");
        let _ = sub.out.send(response(
            0,
            None,
            |fbb| {
                let b = fb::Push::create(
                    fbb,
                    &fb::PushArgs {
                        subscription_id: subscription,
                        high_watermark: next_offset,
                        next_offset,
                    },
                );
                (fb::ResponseBody::Push, Some(b.as_union_value()))
            },
            payload,
        ));
    }
}

/// Stores every batch of a produce's payload, in order, as the broker
/// does: all are checked first, then appended one by one, so a refused
/// sequence leaves the batches before it stored. Pushes what was stored to
/// this fake's subscribers.
fn store(
    st: &mut State,
    topic: &str,
    partition: u32,
    payload: &[u8],
) -> Result<AppendOk, (ErrorCode, String)> {
    let mut batches = Vec::new();
    for b in Batches::new(payload, usize::MAX) {
        let (_, bytes) = b.map_err(|e| (ErrorCode::CorruptBatch, e.to_string()))?;
        validate_batch(bytes, usize::MAX).map_err(|e| (ErrorCode::CorruptBatch, e.to_string()))?;
        batches.push(bytes);
    }
    if batches.is_empty() {
        return Err((ErrorCode::MalformedRequest, "no batch (fake)".into()));
    }
    let logs = st.logs.clone();
    let r = {
        let mut l = logs_lock(&logs);
        let log = l.entry((topic.to_string(), partition)).or_default();
        let mut result: Option<AppendOk> = None;
        let mut failed = None;
        let interleave = batches.len() > 1 && std::mem::take(&mut st.interleave_next);
        for (i, b) in batches.into_iter().enumerate() {
            if interleave && i > 0 {
                // Another connection's batch lands between this request's.
                let _ = log.append(&shoal_wire::batch::build_batch(&[&b"between"[..]], 1));
            }
            match log.append(b) {
                Ok((base, last, dup)) => {
                    let r = result.get_or_insert((base, last, true));
                    r.1 = last;
                    r.2 &= dup;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => result.ok_or((ErrorCode::MalformedRequest, "no batch (fake)".into())),
        }
    };
    pump(st, Some((topic, partition)));
    r
}

/// Pushes stored batches to the subscriptions of `only` (all if `None`)
/// while they have credit left (one push may overrun it, as the broker's
/// may).
fn pump(st: &mut State, only: Option<(&str, u32)>) {
    let logs = st.logs.clone();
    let mut l = logs_lock(&logs);
    for (&id, sub) in st.subs.iter_mut() {
        if only.is_some_and(|(t, p)| (t, p) != (sub.topic.as_str(), sub.partition)) {
            continue;
        }
        let log = l.entry((sub.topic.clone(), sub.partition)).or_default();
        while sub.pushed_bytes < sub.granted_bytes && sub.next < log.next_offset {
            let (payload, next) = log.read(sub.next, 1);
            if payload.is_empty() {
                break;
            }
            sub.pushed_bytes += payload.len() as u64;
            sub.next = next;
            let frame = response(
                0,
                None,
                |fbb| {
                    let b = fb::Push::create(
                        fbb,
                        &fb::PushArgs {
                            subscription_id: id,
                            high_watermark: log.next_offset,
                            next_offset: next,
                        },
                    );
                    (fb::ResponseBody::Push, Some(b.as_union_value()))
                },
                &payload,
            );
            let _ = sub.out.send(frame);
        }
    }
}

/// A leader hint: broker id, host, port, leader epoch.
type Hint = (i32, String, u16, u32);

fn response<F>(corr: u32, err: Option<(ErrorCode, &str)>, body: F, payload: &[u8]) -> Vec<u8>
where
    F: FnOnce(
        &mut FlatBufferBuilder<'static>,
    ) -> (fb::ResponseBody, Option<WIPOffset<UnionWIPOffset>>),
{
    response_hinted(corr, err, None, body, payload)
}

fn response_hinted<F>(
    corr: u32,
    err: Option<(ErrorCode, &str)>,
    hint: Option<&Hint>,
    body: F,
    payload: &[u8],
) -> Vec<u8>
where
    F: FnOnce(
        &mut FlatBufferBuilder<'static>,
    ) -> (fb::ResponseBody, Option<WIPOffset<UnionWIPOffset>>),
{
    let mut fbb = FlatBufferBuilder::new();
    let (body_type, body) = body(&mut fbb);
    let error_message = err.map(|(_, m)| fbb.create_string(m));
    let leader_hint = hint.map(|(id, host, port, epoch)| {
        let host = fbb.create_string(host);
        fb::LeaderHint::create(
            &mut fbb,
            &fb::LeaderHintArgs {
                broker_id: *id,
                host: Some(host),
                port: *port,
                leader_epoch: *epoch,
            },
        )
    });
    let r = fb::Response::create(
        &mut fbb,
        &fb::ResponseArgs {
            correlation_id: corr,
            error_code: err.map_or(0, |(c, _)| c as u16),
            error_message,
            body_type,
            body,
            leader_hint,
        },
    );
    fbb.finish(r, None);
    let mut out = Vec::new();
    frame::write_frame(&mut out, fbb.finished_data(), payload);
    out
}

fn error(corr: u32, code: ErrorCode, message: &str) -> Vec<u8> {
    response(
        corr,
        Some((code, message)),
        |_| (fb::ResponseBody::NONE, None),
        &[],
    )
}

fn produce_ok(corr: u32, base: u64, last: u64, duplicate: bool) -> Vec<u8> {
    response(
        corr,
        None,
        |fbb| {
            let b = fb::ProduceResponse::create(
                fbb,
                &fb::ProduceResponseArgs {
                    base_offset: base,
                    last_offset: last,
                    duplicate,
                },
            );
            (fb::ResponseBody::ProduceResponse, Some(b.as_union_value()))
        },
        &[],
    )
}

/// One broker as metadata lists it: id, public port, shard ports, rack.
type Listed = (u32, u16, Vec<u16>, Option<String>);
/// One partition as metadata lists it: leader, shard, epoch, replicas,
/// ISR, offline.
type ListedPartition = (u32, u16, u32, Vec<u32>, Vec<u32>, bool);
/// What one metadata answer says: brokers, topics, cluster, controller.
type Listing = (
    Vec<Listed>,
    Vec<(String, Vec<ListedPartition>)>,
    Option<String>,
    Option<(u32, u64)>,
);

fn metadata(corr: u32, st: &State, port: u16) -> Vec<u8> {
    let (brokers, topics, cluster, controller): Listing = match &st.cluster {
        None => (
            vec![(0, port, st.shard_ports.clone(), None)],
            st.topics
                .iter()
                .map(|(name, n)| {
                    let parts = (0..*n).map(|_| (0, 0, 0, vec![], vec![], false)).collect();
                    (name.clone(), parts)
                })
                .collect(),
            None,
            Some((0, 0)),
        ),
        Some(c) => c.with(|v| {
            let stale = v.stale_metadata > 0;
            v.stale_metadata = v.stale_metadata.saturating_sub(1);
            let brokers = v
                .members
                .iter()
                .filter(|m| m.live)
                .map(|m| (m.id, m.port, m.shard_ports.clone(), m.rack.clone()))
                .collect();
            let topics = v
                .topics
                .iter()
                .map(|(name, n)| {
                    let parts = (0..*n)
                        .map(|p| {
                            let Some(pl) = v.placement.get(&(name.clone(), p)) else {
                                return (0, 0, 0, vec![], vec![], true);
                            };
                            let (leader, epoch) = match (stale, pl.advertised) {
                                (true, Some(a)) => a,
                                _ => (pl.leader, pl.leader_epoch),
                            };
                            (
                                leader,
                                pl.shard,
                                epoch,
                                pl.replicas.clone(),
                                pl.isr.clone(),
                                pl.offline,
                            )
                        })
                        .collect();
                    (name.clone(), parts)
                })
                .collect();
            (brokers, topics, Some(v.name.clone()), v.controller)
        }),
    };
    response(
        corr,
        None,
        |fbb| {
            let brokers: Vec<_> = brokers
                .iter()
                .map(|(id, port, shard_ports, rack)| {
                    let host = fbb.create_string("127.0.0.1");
                    let version = fbb.create_string(FAKE_VERSION);
                    let ports = fbb.create_vector(shard_ports);
                    let rack = rack.as_deref().map(|r| fbb.create_string(r));
                    fb::BrokerInfo::create(
                        fbb,
                        &fb::BrokerInfoArgs {
                            version: Some(version),
                            id: *id,
                            host: Some(host),
                            port: *port,
                            shard_ports: Some(ports),
                            rack,
                        },
                    )
                })
                .collect();
            let brokers = fbb.create_vector(&brokers);
            let topics: Vec<_> = topics
                .iter()
                .map(|(name, parts)| {
                    let parts: Vec<_> = parts
                        .iter()
                        .enumerate()
                        .map(|(p, (leader, shard, epoch, replicas, isr, offline))| {
                            let replicas = fbb.create_vector(replicas);
                            let isr = fbb.create_vector(isr);
                            fb::PartitionInfo::create(
                                fbb,
                                &fb::PartitionInfoArgs {
                                    partition: p as u32,
                                    leader_broker: *leader,
                                    shard: *shard,
                                    leader_epoch: *epoch,
                                    replicas: Some(replicas),
                                    isr: Some(isr),
                                    offline: *offline,
                                    ..Default::default()
                                },
                            )
                        })
                        .collect();
                    let parts = fbb.create_vector(&parts);
                    let name = fbb.create_string(name);
                    fb::TopicInfo::create(
                        fbb,
                        &fb::TopicInfoArgs {
                            topic_id: 0,
                            name: Some(name),
                            partitions: Some(parts),
                            ..Default::default()
                        },
                    )
                })
                .collect();
            let topics = fbb.create_vector(&topics);
            let cluster = cluster.as_deref().map(|c| fbb.create_string(c));
            let m = fb::MetadataResponse::create(
                fbb,
                &fb::MetadataResponseArgs {
                    brokers: Some(brokers),
                    topics: Some(topics),
                    cluster,
                    controller_id: controller.map_or(-1, |c| c.0 as i32),
                    controller_epoch: controller.map_or(0, |c| c.1),
                },
            );
            (fb::ResponseBody::MetadataResponse, Some(m.as_union_value()))
        },
        &[],
    )
}

/// Why this fake may not serve `topic`/`partition`: an error frame for
/// `corr` (NotLeader, with a hint if the cluster gives them, or
/// LeaderNotAvailable), or `None` if it leads it (or is alone).
fn not_leader(corr: u32, st: &State, topic: &str, partition: u32) -> Option<Vec<u8>> {
    let c = st.cluster.as_ref()?;
    c.with(|v| {
        let pl = v.placement.get(&(topic.to_string(), partition))?;
        if pl.offline {
            return Some(error(
                corr,
                ErrorCode::LeaderNotAvailable,
                "no live leader (fake)",
            ));
        }
        if pl.leader == st.id {
            return None;
        }
        let hint = v
            .hints
            .then(|| v.members.iter().find(|m| m.id == pl.leader))
            .flatten()
            .and_then(|m| {
                let port = *m.shard_ports.get(usize::from(pl.shard))?;
                Some((m.id as i32, "127.0.0.1".to_string(), port, pl.leader_epoch))
            });
        Some(response_hinted(
            corr,
            Some((ErrorCode::NotLeader, "not the leader (fake)")),
            hint.as_ref(),
            |_| (fb::ResponseBody::NONE, None),
            &[],
        ))
    })
}

/// A fetch from the log: from `offset` (or the first batch at or after a
/// timestamp), whole batches up to `max_bytes`. Past the end: nothing, and
/// the next offset is the one asked for.
fn fetch_ok(corr: u32, st: &State, f: &fb::FetchRequest<'_>) -> Vec<u8> {
    let mut l = logs_lock(&st.logs);
    let log = l
        .entry((f.topic().unwrap_or("").to_string(), f.partition()))
        .or_default();
    let offset = if f.by_timestamp() {
        log.offset_for_timestamp(f.timestamp_ms())
    } else {
        f.offset()
    };
    let (payload, next_offset) = log.read(offset, f.max_bytes() as usize);
    let high_watermark = log.next_offset;
    response(
        corr,
        None,
        |fbb| {
            let b = fb::FetchResponse::create(
                fbb,
                &fb::FetchResponseArgs {
                    high_watermark,
                    log_start_offset: 0,
                    next_offset,
                    ..Default::default()
                },
            );
            (fb::ResponseBody::FetchResponse, Some(b.as_union_value()))
        },
        &payload,
    )
}

fn empty_ok(corr: u32, body_type: fb::ResponseBody) -> Vec<u8> {
    response(
        corr,
        None,
        |fbb| {
            let b = match body_type {
                fb::ResponseBody::GrantCreditResponse => {
                    fb::GrantCreditResponse::create(fbb, &fb::GrantCreditResponseArgs {})
                        .as_union_value()
                }
                _ => fb::UnsubscribeResponse::create(fbb, &fb::UnsubscribeResponseArgs {})
                    .as_union_value(),
            };
            (body_type, Some(b))
        },
        &[],
    )
}

/// What a request's script says, if anything is scripted for `api`.
fn scripted(st: &mut State, api: Api) -> Option<Scripted> {
    st.scripts.get_mut(&api).and_then(VecDeque::pop_front)
}

/// Frames the writer task takes as "close the connection".
const CLOSE: Vec<u8> = Vec::new();

async fn serve(s: tokio::net::TcpStream, st: Arc<Mutex<State>>) {
    let port = s.local_addr().map_or(0, |a| a.port());
    let (mut r, mut w) = s.into_split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            if f.is_empty() {
                let _ = w.shutdown().await;
                return;
            }
            if w.write_all(&f).await.is_err() {
                return;
            }
        }
    });
    let mut buf = Vec::new();
    loop {
        let parts = match frame::check(&buf, usize::MAX / 2) {
            Ok(Check::Complete(p)) => p,
            Ok(Check::Incomplete { .. }) => {
                while lock(&st).reading_paused {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                let mut chunk = [0u8; 64 * 1024];
                match r.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            }
            Err(_) => return,
        };
        let frame: Vec<u8> = buf.drain(..parts.total).collect();
        let Ok(req) = frame::decode_request(&frame[parts.header.clone()]) else {
            return;
        };
        let payload = &frame[parts.payload.clone()];
        let corr = req.correlation_id();
        let mut st = lock(&st);
        let mut close = false;
        let reply = if req.body_as_metadata_request().is_some() {
            st.metadata_requests += 1;
            match scripted(&mut st, Api::Metadata) {
                Some(Scripted::Fail(code)) => Some(error(corr, code, "scripted (fake)")),
                Some(_) => {
                    close = true;
                    None
                }
                None => Some(metadata(corr, &st, port)),
            }
        } else if let Some(p) = req.body_as_produce_request() {
            let topic = p.topic().unwrap_or("").to_string();
            let headers: Vec<BatchHeader> = Batches::new(payload, usize::MAX)
                .filter_map(|b| b.ok().map(|(h, _)| h))
                .collect();
            let refused = not_leader(corr, &st, &topic, p.partition());
            let mut call = ProduceCall {
                partition: p.partition(),
                headers,
                port,
                accepted: false,
                duplicate: false,
            };
            let reply = if let Some(e) = refused {
                Some(e)
            } else {
                match scripted(&mut st, Api::Produce) {
                    Some(Scripted::Fail(code)) => Some(error(corr, code, "scripted (fake)")),
                    Some(Scripted::DropBeforeStore) => {
                        close = true;
                        None
                    }
                    Some(what @ (Scripted::DropAfterStore | Scripted::StoreAndIgnore)) => {
                        let r = store(&mut st, &topic, p.partition(), payload);
                        call.accepted = r.is_ok();
                        call.duplicate = r.is_ok_and(|r| r.2);
                        close = what == Scripted::DropAfterStore;
                        None
                    }
                    None => match st.produce_mode.unwrap_or(ProduceMode::Ack) {
                        ProduceMode::Ack => {
                            let r = store(&mut st, &topic, p.partition(), payload);
                            call.accepted = r.is_ok();
                            Some(match r {
                                Ok((base, last, dup)) => {
                                    call.duplicate = dup;
                                    produce_ok(corr, base, last, dup)
                                }
                                Err((code, m)) => error(corr, code, &m),
                            })
                        }
                        ProduceMode::Fail(code) => Some(error(corr, code, "failed by the test")),
                        ProduceMode::Hold => {
                            call.accepted = true;
                            st.held.push(Held {
                                out: out.clone(),
                                corr,
                                topic,
                                partition: p.partition(),
                                payload: payload.to_vec(),
                            });
                            None
                        }
                    },
                }
            };
            st.produces.push(call);
            reply
        } else if let Some(f) = req.body_as_fetch_request() {
            st.fetches.push((f.partition(), port));
            match not_leader(corr, &st, f.topic().unwrap_or(""), f.partition()) {
                Some(e) => Some(e),
                None => match scripted(&mut st, Api::Fetch) {
                    Some(Scripted::Fail(code)) => Some(error(corr, code, "scripted (fake)")),
                    Some(Scripted::StoreAndIgnore) => None,
                    Some(Scripted::DropBeforeStore | Scripted::DropAfterStore) => {
                        close = true;
                        None
                    }
                    None => Some(fetch_ok(corr, &st, &f)),
                },
            }
        } else if let Some(s) = req.body_as_subscribe_request() {
            st.subscribes.push((s.partition(), port, s.offset()));
            let topic = s.topic().unwrap_or("").to_string();
            match not_leader(corr, &st, &topic, s.partition()) {
                Some(e) => Some(e),
                None => match scripted(&mut st, Api::Subscribe) {
                    Some(Scripted::Fail(code)) => Some(error(corr, code, "scripted (fake)")),
                    Some(Scripted::StoreAndIgnore) => None,
                    Some(Scripted::DropBeforeStore | Scripted::DropAfterStore) => {
                        close = true;
                        None
                    }
                    None => {
                        st.subs_made += 1;
                        let id = st.subs_made;
                        st.subs.insert(
                            id,
                            FakeSub {
                                out: out.clone(),
                                topic,
                                partition: s.partition(),
                                next: s.offset(),
                                granted_bytes: s.credit_bytes(),
                                pushed_bytes: 0,
                            },
                        );
                        st.subscribe_credits.push(s.credit_bytes());
                        // Answered before anything is pushed: the client
                        // routes pushes once it has the answer.
                        let _ = out.send(response(
                            corr,
                            None,
                            |fbb| {
                                let b = fb::SubscribeResponse::create(
                                    fbb,
                                    &fb::SubscribeResponseArgs {
                                        subscription_id: id,
                                    },
                                );
                                (
                                    fb::ResponseBody::SubscribeResponse,
                                    Some(b.as_union_value()),
                                )
                            },
                            &[],
                        ));
                        pump(&mut st, None);
                        None
                    }
                },
            }
        } else if let Some(g) = req.body_as_grant_credit_request() {
            st.grants.push((g.subscription_id(), g.bytes()));
            if let Some(sub) = st.subs.get_mut(&g.subscription_id()) {
                sub.granted_bytes += g.bytes();
            }
            let answer = (!st.grants_unanswered)
                .then(|| empty_ok(corr, fb::ResponseBody::GrantCreditResponse));
            if let Some(a) = answer {
                let _ = out.send(a);
            }
            pump(&mut st, None);
            None
        } else if let Some(u) = req.body_as_unsubscribe_request() {
            st.subs.remove(&u.subscription_id());
            Some(empty_ok(corr, fb::ResponseBody::UnsubscribeResponse))
        } else {
            Some(error(corr, ErrorCode::UnsupportedApi, "not in the fake"))
        };
        if let Some(f) = reply {
            let _ = out.send(f);
        }
        if close {
            st.subs.retain(|_, s| !s.out.same_channel(&out));
            st.held.retain(|h| !h.out.same_channel(&out));
            let _ = out.send(CLOSE);
            return;
        }
    }
}
