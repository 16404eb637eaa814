//! One `__shoal_groups` partition's coordinator on the shard that leads
//! it.
//!
//! Load: the newest checkpoint (`groups.ckpt` in the partition's
//! directory), then the log from the checkpoint's offset to its end.
//! Requests then change the groups in memory and queue their records;
//! the flusher appends whatever is queued as one batch, and the
//! acknowledger answers each write, in log order, once the high watermark
//! passes its batch (applying offset commits only then, so an offset
//! fetch returns acknowledged commits; after a load, everything the log
//! holds, which may include commits whose answers were never sent).

use super::assign::Tp;
use super::records::{self, Change};
use super::state::{Committed, Group, Heartbeat, HeartbeatOk};
use crate::error::{Error, Result};
use crate::reactor::Reactor;
use crate::rt;
use futures::channel::{mpsc, oneshot};
use futures::{SinkExt, StreamExt};
use shoal_shard::PartitionLog;
use shoal_wire::batch::{Batches, Records};
use shoal_wire::group::GROUPS_TOPIC;
use shoal_wire::{BatchBuilder, NewRecord};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The checkpoint's file name in the partition directory.
pub const CHECKPOINT_FILE: &str = "groups.ckpt";
/// Writes queued for the flusher at most; more wait to queue.
const QUEUED_WRITES_MAX: usize = 4096;
/// Bytes of records in one flushed batch, about (see the flusher).
const FLUSH_BYTES_MAX: usize = 256 * 1024;
/// Bytes of records one change may write: a larger group state or commit
/// is refused before anything changes.
pub const WRITE_BYTES_MAX: usize = 256 * 1024;
/// Appended batches waiting for their acknowledgement at most.
const UNACKED_BATCHES_MAX: usize = 64;
/// Longest metadata string a committed offset may carry (Kafka's
/// `offset.metadata.max.bytes` default).
pub const OFFSET_METADATA_MAX: usize = 4096;
/// Longest a write waits for the in-sync replicas.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Resolves once a queued write is acknowledged.
pub struct Acked(oneshot::Receiver<Result<()>>, u32);

impl Acked {
    pub async fn wait(self) -> Result<()> {
        self.0.await.map_err(|_| moved(self.1))?
    }
}

/// A change waiting to be in the log: its records, the offset commits to
/// apply once acknowledged, and who waits.
struct Write {
    records: Vec<(Vec<u8>, Vec<u8>)>,
    apply: Vec<Change>,
    done: oneshot::Sender<Result<()>>,
}

impl Write {
    fn bytes(&self) -> usize {
        records_bytes(&self.records)
    }
}

fn records_bytes(records: &[(Vec<u8>, Vec<u8>)]) -> usize {
    records.iter().map(|(k, v)| k.len() + v.len() + 32).sum()
}

fn too_large(what: &str, bytes: usize) -> Error {
    Error::ResourceLimit(format!(
        "{what} would write {bytes} bytes to the group log, more than {WRITE_BYTES_MAX}"
    ))
}

pub struct Coordinator {
    pub partition: u32,
    log: Rc<PartitionLog>,
    epoch: u32,
    loaded: Cell<bool>,
    stopped: Cell<bool>,
    groups: RefCell<BTreeMap<String, Group>>,
    /// When each member was last heard, by (group, member id): ids are
    /// chosen by clients, so only unique within a group.
    last_seen: RefCell<HashMap<String, HashMap<String, Instant>>>,
    queue: RefCell<Option<mpsc::Sender<Write>>>,
    /// Everything below this offset is applied.
    applied: Cell<u64>,
    /// Records applied since the last checkpoint.
    since_checkpoint: Cell<u64>,
    checkpointing: Cell<bool>,
}

impl Coordinator {
    /// Starts loading partition `p`'s groups from `log`; requests are
    /// answered `CoordinatorLoading` until it is done.
    pub fn start(reactor: Rc<Reactor>, p: u32, log: Rc<PartitionLog>, epoch: u32) -> Rc<Self> {
        let c = Rc::new(Coordinator {
            partition: p,
            log,
            epoch,
            loaded: Cell::new(false),
            stopped: Cell::new(false),
            groups: RefCell::new(BTreeMap::new()),
            last_seen: RefCell::new(HashMap::new()),
            queue: RefCell::new(None),
            applied: Cell::new(0),
            since_checkpoint: Cell::new(0),
            checkpointing: Cell::new(false),
        });
        let me = c.clone();
        rt::spawn_detached(async move { me.load(reactor).await });
        c
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.get() && !self.stopped.get()
    }

    /// Whether this coordinator serves `log` at leader epoch `epoch` (a
    /// new epoch means the lead moved away and back: load again).
    pub fn is_current(&self, log: &Rc<PartitionLog>, epoch: u32) -> bool {
        !self.stopped.get() && Rc::ptr_eq(&self.log, log) && self.epoch == epoch
    }

    pub fn stop(&self) {
        self.stopped.set(true);
        self.queue.borrow_mut().take();
    }

    async fn load(self: Rc<Self>, reactor: Rc<Reactor>) {
        let t0 = rt::now();
        match self.replay().await {
            Ok(replayed) => {
                if self.stopped.get() {
                    return;
                }
                let now = rt::now();
                {
                    let mut seen = self.last_seen.borrow_mut();
                    for g in self.groups.borrow().values() {
                        let of_group = seen.entry(g.name.clone()).or_default();
                        for id in g.members.keys() {
                            of_group.insert(id.clone(), now);
                        }
                    }
                }
                let (tx, rx) = mpsc::channel(QUEUED_WRITES_MAX);
                *self.queue.borrow_mut() = Some(tx);
                let me = self.clone();
                rt::spawn_detached(async move { me.flush_loop(reactor, rx).await });
                self.loaded.set(true);
                tracing::info!(
                    partition = self.partition,
                    groups = self.groups.borrow().len(),
                    records_replayed = replayed,
                    ms = t0.elapsed().as_millis() as u64,
                    "group coordinator loaded"
                );
            }
            Err(e) => {
                tracing::error!(partition = self.partition, error = %e, "group coordinator could not load");
                reactor.groups.remove(&self);
            }
        }
    }

    /// Reads the checkpoint, then applies the log from its offset to the
    /// end. Returns how many records it applied.
    async fn replay(&self) -> Result<u64> {
        let (from, groups) = read_checkpoint(&self.log).await?;
        *self.groups.borrow_mut() = groups;
        let end = self.log.next_offset();
        let (applied, reached) = replay(&self.log, from, end, &self.groups, &self.stopped).await?;
        self.applied.set(reached);
        self.since_checkpoint.set(applied);
        Ok(applied)
    }

    /// Queues `records` for the log; the receiver answers once they are
    /// acknowledged (and `apply` applied). Queued in call order.
    async fn enqueue(&self, records: Vec<(Vec<u8>, Vec<u8>)>, apply: Vec<Change>) -> Result<Acked> {
        let (done, rx) = oneshot::channel();
        let tx = self.queue.borrow().clone();
        let Some(mut tx) = tx else {
            return Err(moved(self.partition));
        };
        tx.send(Write {
            records,
            apply,
            done,
        })
        .await
        .map_err(|_| moved(self.partition))?;
        Ok(Acked(rx, self.partition))
    }

    /// Appends what is queued, a batch at a time, and hands each batch to
    /// the acknowledger.
    async fn flush_loop(self: Rc<Self>, reactor: Rc<Reactor>, mut rx: mpsc::Receiver<Write>) {
        let (mut acks, ack_rx) = mpsc::channel::<(u64, Vec<Write>)>(UNACKED_BATCHES_MAX);
        let me = self.clone();
        let r = reactor.clone();
        rt::spawn_detached(async move { me.ack_loop(r, ack_rx).await });
        let bmax = self.log.config().batch_bytes_max;
        // A write taken from the queue that did not fit the last batch.
        let mut carry: Option<Write> = None;
        loop {
            let first = match carry.take() {
                Some(w) => w,
                None => match rx.next().await {
                    Some(w) => w,
                    None => return,
                },
            };
            // Every write is at most WRITE_BYTES_MAX (checked when queued),
            // so a batch stays under FLUSH_BYTES_MAX + WRITE_BYTES_MAX.
            let mut bytes = first.bytes();
            let mut writes = vec![first];
            while bytes < FLUSH_BYTES_MAX {
                match rx.try_recv() {
                    Ok(w) if bytes + w.bytes() <= FLUSH_BYTES_MAX + WRITE_BYTES_MAX => {
                        bytes += w.bytes();
                        writes.push(w);
                    }
                    Ok(w) => {
                        carry = Some(w);
                        break;
                    }
                    _ => break,
                }
            }
            if self.stopped.get() {
                fail(writes, &moved(self.partition));
                continue;
            }
            let now = crate::partitions::now_ms();
            let mut b = BatchBuilder::with_capacity(bytes + 1024);
            let mut too_big = None;
            'build: for w in &writes {
                for (k, v) in &w.records {
                    let rec = NewRecord {
                        key: Some(k),
                        value: Some(v),
                        timestamp_ms: now,
                        headers: &[],
                    };
                    if let Err(e) = b.push(&rec) {
                        too_big = Some(e);
                        break 'build;
                    }
                }
            }
            // Cannot happen with writes bounded when queued; should it,
            // memory may hold changes the log does not: reload.
            if let Some(e) = too_big {
                fail(writes, &Error::ResourceLimit(format!("group records: {e}")));
                self.abandon(&reactor);
                continue;
            }
            let batch = b.finish(-1, 0, -1);
            if batch.len() > bmax {
                fail(
                    writes,
                    &Error::ResourceLimit(format!(
                        "group records of {} bytes exceed the batch limit of {bmax}",
                        batch.len()
                    )),
                );
                self.abandon(&reactor);
                continue;
            }
            let appended = match reactor
                .replication
                .check_writable(GROUPS_TOPIC, self.partition)
            {
                Ok(()) => self.log.append(&batch).await.map_err(Error::from),
                Err(e) => Err(e),
            };
            match appended {
                Ok(a) => {
                    if acks.send((a.last_offset + 1, writes)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    fail(writes, &e);
                    self.abandon(&reactor);
                }
            }
        }
    }

    /// Answers appended writes in log order once replicated, applying their
    /// offset commits.
    async fn ack_loop(
        self: Rc<Self>,
        reactor: Rc<Reactor>,
        mut rx: mpsc::Receiver<(u64, Vec<Write>)>,
    ) {
        while let Some((next, writes)) = rx.next().await {
            let r = reactor
                .replication
                .wait_all(GROUPS_TOPIC, self.partition, &self.log, next, ACK_TIMEOUT)
                .await;
            match r {
                Ok(()) if !self.stopped.get() => {
                    let mut n = 0u64;
                    {
                        let mut groups = self.groups.borrow_mut();
                        for w in &writes {
                            n += w.records.len() as u64;
                            for c in &w.apply {
                                records::apply(&mut groups, c.clone());
                            }
                        }
                    }
                    self.applied.set(next);
                    let commits = writes
                        .iter()
                        .flat_map(|w| &w.apply)
                        .filter(|c| matches!(c, Change::Offset { .. }))
                        .count();
                    crate::metrics::add(&reactor.metrics.group_offset_commits, commits as u64);
                    self.since_checkpoint.set(self.since_checkpoint.get() + n);
                    for w in writes {
                        let _ = w.done.send(Ok(()));
                    }
                }
                Ok(()) => fail(writes, &moved(self.partition)),
                Err(e) => {
                    fail(writes, &e);
                    self.abandon(&reactor);
                }
            }
        }
    }

    /// A write failed: what is in memory may differ from the log, so this
    /// coordinator stops; the next request loads the log again (here, or
    /// wherever the lead went).
    fn abandon(self: &Rc<Self>, reactor: &Reactor) {
        if !self.stopped.get() {
            tracing::warn!(
                partition = self.partition,
                "a group write failed; the coordinator reloads from its log"
            );
        }
        reactor.groups.remove(self);
    }

    fn counts<'a>(reactor: &'a Reactor) -> impl Fn(&str) -> Option<u32> + 'a {
        move |t: &str| reactor.partitions.topic(t).map(|m| m.partitions())
    }

    /// Join, heartbeat or leave. The answer may be sent once the returned
    /// write (the change it made, if any) is acknowledged.
    pub async fn heartbeat(
        &self,
        reactor: &Reactor,
        group: &str,
        hb: Heartbeat<'_>,
    ) -> Result<(HeartbeatOk, Option<Acked>)> {
        let counts = Self::counts(reactor);
        let joining = hb.member_epoch == 0;
        let client_id = hb.client_id.to_string();
        let (ok, record) = {
            let mut groups = self.groups.borrow_mut();
            if !joining && !groups.contains_key(group) {
                return Err(Error::UnknownMember {
                    group: group.to_string(),
                    member: hb.member_id.to_string(),
                });
            }
            let g = groups
                .entry(group.to_string())
                .or_insert_with(|| Group::new(group));
            // To undo a change too large to record (offsets are not
            // touched by a heartbeat: not copied).
            let before = (g.epoch, g.strategy, g.members.clone());
            let r = g.heartbeat(hb, &counts, || reactor.groups.new_member_id(&client_id));
            let drop_group = g.members.is_empty() && g.offsets.is_empty();
            let (ok, changed) = match r {
                Ok(x) => x,
                Err(e) => {
                    if drop_group {
                        groups.remove(group);
                    }
                    return Err(e);
                }
            };
            let record = changed.then(|| records::group_record(g));
            if let Some(r) = &record {
                let bytes = records_bytes(std::slice::from_ref(r));
                if bytes > WRITE_BYTES_MAX || g.members.len() > super::state::MEMBERS_MAX {
                    (g.epoch, g.strategy, g.members) = before;
                    if g.members.is_empty() && g.offsets.is_empty() {
                        groups.remove(group);
                    }
                    if bytes > WRITE_BYTES_MAX {
                        return Err(too_large("this group's state", bytes));
                    }
                    return Err(Error::ResourceLimit(format!(
                        "group {group:?} has {} members, the most a group may have",
                        super::state::MEMBERS_MAX
                    )));
                }
            }
            if drop_group {
                groups.remove(group);
            }
            (ok, record)
        };
        let m = &reactor.metrics;
        if joining {
            crate::metrics::add(&m.group_joins, 1);
        } else if ok.member_epoch == -1 {
            crate::metrics::add(&m.group_leaves, 1);
        }
        {
            let mut seen = self.last_seen.borrow_mut();
            if ok.member_epoch == -1 {
                if let Some(of_group) = seen.get_mut(group) {
                    of_group.remove(&ok.member_id);
                }
            } else {
                seen.entry(group.to_string())
                    .or_default()
                    .insert(ok.member_id.clone(), rt::now());
            }
        }
        let acked = match record {
            Some(r) => Some(self.enqueue(vec![r], Vec::new()).await?),
            None => None,
        };
        Ok((ok, acked))
    }

    /// Commits offsets (all or none), queued in call order; acknowledged
    /// once in the log.
    pub async fn commit(
        &self,
        reactor: &Reactor,
        group: &str,
        member_id: &str,
        member_epoch: i32,
        offsets: Vec<(Tp, i64, String)>,
    ) -> Result<Acked> {
        for ((t, p), offset, _) in &offsets {
            let n = reactor
                .partitions
                .topic(t)
                .ok_or_else(|| Error::UnknownTopic(t.clone()))?
                .partitions();
            if *p >= n {
                return Err(Error::UnknownPartition {
                    topic: t.clone(),
                    partition: *p,
                    count: n,
                });
            }
            if *offset < 0 {
                return Err(Error::Malformed(format!(
                    "offset {offset} for {t}-{p}: a committed offset is 0 or more"
                )));
            }
        }
        if let Some((tp, _, m)) = offsets
            .iter()
            .find(|(_, _, m)| m.len() > OFFSET_METADATA_MAX)
        {
            return Err(Error::Malformed(format!(
                "commit metadata of {} bytes for {}-{} exceeds {OFFSET_METADATA_MAX}",
                m.len(),
                tp.0,
                tp.1
            )));
        }
        {
            let groups = self.groups.borrow();
            let tps = offsets.iter().map(|((t, p), _, _)| (t.as_str(), *p));
            match groups.get(group) {
                Some(g) => g.check_commit(member_id, member_epoch, tps)?,
                None if member_id.is_empty() && member_epoch == -1 => {}
                None => {
                    return Err(Error::UnknownMember {
                        group: group.to_string(),
                        member: member_id.to_string(),
                    })
                }
            }
        }
        let at_ms = crate::partitions::now_ms();
        let mut recs = Vec::with_capacity(offsets.len());
        let mut apply = Vec::with_capacity(offsets.len());
        for (tp, offset, metadata) in offsets {
            let committed = Committed {
                offset,
                metadata,
                at_ms,
            };
            recs.push(records::offset_record(group, &tp, &committed));
            apply.push(Change::Offset {
                group: group.to_string(),
                tp,
                committed,
            });
        }
        let bytes = records_bytes(&recs);
        if bytes > WRITE_BYTES_MAX {
            return Err(too_large("this commit", bytes));
        }
        self.enqueue(recs, apply).await
    }

    /// Committed offsets of `group` for `topics` (all if empty).
    pub fn offsets(&self, group: &str, topics: &[String]) -> Vec<(Tp, Committed)> {
        let groups = self.groups.borrow();
        let Some(g) = groups.get(group) else {
            return Vec::new();
        };
        g.offsets
            .iter()
            .filter(|((t, _), _)| topics.is_empty() || topics.contains(t))
            .map(|(tp, c)| (tp.clone(), c.clone()))
            .collect()
    }

    /// (name, state, members) of every group here.
    pub fn list(&self) -> Vec<(String, &'static str, usize)> {
        self.groups
            .borrow()
            .values()
            .map(|g| (g.name.clone(), g.state(), g.members.len()))
            .collect()
    }

    pub fn describe(&self, group: &str) -> Option<Group> {
        self.groups.borrow().get(group).cloned()
    }

    /// Expires members whose session ran out (recording the change), and
    /// checkpoints when enough records were applied since the last one.
    pub async fn tick(self: &Rc<Self>, reactor: &Rc<Reactor>) {
        let now = rt::now();
        let counts = Self::counts(reactor);
        let mut recs = Vec::new();
        {
            let mut groups = self.groups.borrow_mut();
            let mut seen = self.last_seen.borrow_mut();
            for g in groups.values_mut() {
                let of_group = seen.entry(g.name.clone()).or_default();
                let dead = g.expire(&|id| of_group.get(id).copied(), now, &counts);
                if dead.is_empty() {
                    continue;
                }
                for id in &dead {
                    of_group.remove(id);
                }
                crate::metrics::add(&reactor.metrics.group_sessions_expired, dead.len() as u64);
                tracing::info!(group = %g.name, members = ?dead, "members' sessions expired; their partitions are reassigned");
                recs.push(records::group_record(g));
            }
            groups.retain(|_, g| !g.members.is_empty() || !g.offsets.is_empty());
            seen.retain(|name, of_group| !of_group.is_empty() && groups.contains_key(name));
        }
        if !recs.is_empty() {
            // Queued now, before any later change of these groups, so the
            // log holds their states in the order they happened.
            match self.enqueue(recs, Vec::new()).await {
                Ok(acked) => {
                    let p = self.partition;
                    rt::spawn_detached(async move {
                        if let Err(e) = acked.wait().await {
                            tracing::warn!(partition = p, error = %e, "could not record expired members");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(partition = self.partition, error = %e, "could not record expired members")
                }
            }
        }
        // With followers, they checkpoint (the leader never stops to);
        // alone, or when no follower has for four times as long, the
        // leader does.
        let every = reactor.config.group_checkpoint_records;
        let followers = reactor
            .partitions
            .topic(GROUPS_TOPIC)
            .and_then(|m| {
                m.placement
                    .get(self.partition as usize)
                    .map(|p| p.replicas.len() > 1)
            })
            .unwrap_or(false);
        let due = if followers {
            every.saturating_mul(4)
        } else {
            every
        };
        if self.since_checkpoint.get() >= due && !self.checkpointing.replace(true) {
            let me = self.clone();
            let r = reactor.clone();
            rt::spawn_detached(async move {
                if let Err(e) = me.checkpoint(&r).await {
                    tracing::warn!(partition = me.partition, error = %e, "group checkpoint failed");
                }
                me.checkpointing.set(false);
            });
        }
    }

    /// A follower shipped a checkpoint: the count starts again.
    pub fn checkpointed_by_follower(&self) {
        self.since_checkpoint.set(0);
    }

    /// Writes a checkpoint of the applied state (write-then-rename), then
    /// deletes the log's segments wholly below it.
    async fn checkpoint(&self, reactor: &Reactor) -> Result<()> {
        let offset = self.applied.get();
        let n = self.since_checkpoint.get();
        let bytes = records::encode_checkpoint(offset, &self.groups.borrow());
        tracing::info!(
            partition = self.partition,
            offset,
            "group checkpoint taken by the leader itself"
        );
        install_checkpoint(reactor, &self.log, offset, bytes).await?;
        self.since_checkpoint
            .set(self.since_checkpoint.get().saturating_sub(n));
        Ok(())
    }
}

/// Keeps `bytes` as `log`'s group checkpoint and deletes the segments
/// wholly below `offset`, unless the log already starts past `offset` or
/// the checkpoint there is as new (installs of one partition run one at a
/// time, so an older checkpoint never replaces a newer one whose install
/// already cut the log). Returns whether it was kept.
pub async fn install_checkpoint(
    reactor: &Reactor,
    log: &PartitionLog,
    offset: u64,
    bytes: Vec<u8>,
) -> Result<bool> {
    let lock = reactor.groups.install_lock(log.dir());
    let _one_at_a_time = lock.lock().await;
    if offset < log.start_offset() {
        return Ok(false);
    }
    if checkpoint_offset(log.dir())
        .await
        .is_some_and(|cur| offset <= cur)
    {
        return Ok(false);
    }
    let len = bytes.len();
    shoal_shard::durable::write_durably(log.dir(), CHECKPOINT_FILE, bytes)
        .await
        .map_err(|e| Error::io("write the group checkpoint", e))?;
    let deleted = log.delete_before(offset).await?;
    crate::metrics::add(&reactor.metrics.group_checkpoints, 1);
    tracing::info!(dir = %log.dir().display(), offset, bytes = len, segments_deleted = deleted, "group checkpoint written");
    Ok(true)
}

/// The offset of the checkpoint kept in `dir`, if one reads back whole.
pub async fn checkpoint_offset(dir: &std::path::Path) -> Option<u64> {
    let bytes = shoal_shard::durable::read(dir.join(CHECKPOINT_FILE))
        .await
        .ok()?;
    records::decode_checkpoint(&bytes).ok().map(|(o, _)| o)
}

/// The partition's checkpoint: the offset it is as of (where replay
/// starts, at least the log start) and its groups. None or a damaged one:
/// the log from its start.
pub async fn read_checkpoint(log: &PartitionLog) -> Result<(u64, BTreeMap<String, Group>)> {
    let dir = log.dir().to_path_buf();
    let (from, groups) = match shoal_shard::durable::read(dir.join(CHECKPOINT_FILE)).await {
        Ok(bytes) => match records::decode_checkpoint(&bytes) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "ignoring a damaged group checkpoint; replaying the whole log");
                (0, BTreeMap::new())
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, BTreeMap::new()),
        Err(e) => return Err(Error::io("read the group checkpoint", e)),
    };
    // The log before its start is gone: the state is whole only if the
    // checkpoint covers it. Never serve (nor checkpoint) a partial one.
    let start = log.start_offset();
    if from < start {
        return Err(Error::Storage(shoal_shard::Error::Corrupt(format!(
            "{}: the group log starts at {start} but the checkpoint covers only what is below {from}: the group state is incomplete",
            dir.display()
        ))));
    }
    Ok((from, groups))
}

/// Applies the records of `log` in `[from, upto)` to `groups`, reading
/// a slice at a time and yielding between slices; returns how many, and
/// the offset it reached (below `upto` if the log ends first).
pub async fn replay(
    log: &PartitionLog,
    mut from: u64,
    upto: u64,
    groups: &RefCell<BTreeMap<String, Group>>,
    stopped: &Cell<bool>,
) -> Result<(u64, u64)> {
    let mut applied = 0u64;
    while from < upto && !stopped.get() {
        let slice = log
            .read_replica_ready(from, 1 << 20, Duration::from_millis(100))
            .await?;
        if slice.is_empty() {
            break;
        }
        applied += apply_batches(log, slice.bytes(), from, upto, &mut groups.borrow_mut())?;
        from = slice.next_offset.min(upto);
        rt::yield_if_needed().await;
    }
    Ok((applied, from))
}

/// Applies the records in `[from, upto)` of whole batches `bytes`;
/// returns how many.
fn apply_batches(
    log: &PartitionLog,
    bytes: &[u8],
    from: u64,
    upto: u64,
    groups: &mut BTreeMap<String, Group>,
) -> Result<u64> {
    let bad = |e: shoal_wire::BatchError| Error::Malformed(format!("{}: {e}", log.dir().display()));
    let mut applied = 0u64;
    for b in Batches::new(bytes, log.config().batch_bytes_max) {
        let (h, bytes) = b.map_err(bad)?;
        for r in Records::new(bytes) {
            let r = r.map_err(bad)?;
            let offset = h.base_offset + u64::from(r.offset_delta);
            if offset < from || offset >= upto {
                continue;
            }
            match records::decode(r.key.unwrap_or(&[]), r.value.unwrap_or(&[])) {
                Ok(change) => records::apply(groups, change),
                Err(e) => {
                    tracing::warn!(dir = %log.dir().display(), offset, error = %e, "skipping an unreadable group record")
                }
            }
            applied += 1;
        }
    }
    Ok(applied)
}

fn moved(p: u32) -> Error {
    crate::replication::not_leader_now(GROUPS_TOPIC, p)
}

/// Fails every write of `writes` with (a copy of) `e`.
fn fail(writes: Vec<Write>, e: &Error) {
    for w in writes {
        let _ = w.done.send(Err(Error::Remote {
            code: e.code(),
            message: e.to_string(),
        }));
    }
}
