//! The one way cores meet: typed messages over glommio's channel mesh.
//!
//! Every shard has a bounded channel to every other ([`MESH_CHANNEL_CAPACITY`]).
//! A request that lands on a shard that does not own its partition becomes a
//! [`MeshMsg`] carrying its arguments and a oneshot [`Reply`] for the
//! answer; [`Mesh::call`] sends and waits, [`Mesh::send`] only sends (a
//! produce sends in request order, then waits for its acknowledgement
//! beside the connection's next requests).
//!
//! **Order.** Messages that change a partition (produces) are *ordered*:
//! the receiving shard starts them in arrival order per partition, one
//! lane per partition ([`Lanes`]). A lane runs only the order-sensitive
//! start of each message (the append) and hands the rest (the wait for the
//! disk, the reply) to a task of its own, so a slow partition never blocks
//! the receive loop and never lets a later produce overtake an earlier one.
//! Everything else (fetches, metadata, topic changes) runs in a task per
//! message: it has no order to keep, and a long-poll must not hold up
//! anything behind it.
//!
//! **Zero-copy across cores.** Log bytes never cross as bytes: the owner
//! answers a fetch with a [`FileRange`], a duplicated descriptor of the
//! segment (or tail-cache memory file) plus a range, which the asking shard
//! sends with sendfile. The duplicate keeps the file alive even if the
//! owner's retention deletes the segment meanwhile.

use crate::controller::TopicSpec;
use crate::error::{Error, Result};
use crate::limits::{MESH_CHANNEL_CAPACITY, MESH_LANE_QUEUED_MAX};
use crate::metadata::TopicMeta;
use crate::metrics::add;
use crate::partitions::{Acks, FetchParams, PartitionState, ProduceOk};
use crate::reactor::Reactor;
use crate::rt;
use futures::channel::oneshot;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use shoal_shard::Notify;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::rc::Rc;

/// Where a message's answer goes.
pub type Reply<T> = oneshot::Sender<Result<T>>;

/// The mesh every shard joins (one per broker process).
pub type MeshBuilderFull = MeshBuilder<MeshMsg, Full>;

pub fn builder(shards: usize) -> Option<MeshBuilderFull> {
    (shards > 1).then(|| MeshBuilder::full(shards, MESH_CHANNEL_CAPACITY))
}

/// A range of a file another core can send with sendfile: owns a
/// duplicated descriptor, so it is valid on any thread for as long as it
/// lives.
#[derive(Debug)]
pub struct FileRange {
    pub file: std::fs::File,
    pub position: u64,
    pub len: u64,
}

/// A fetch answered by the owning shard.
#[derive(Debug)]
pub struct FetchReply {
    pub data: Option<FileRange>,
    pub high_watermark: u64,
    pub log_start_offset: u64,
    pub next_offset: u64,
    /// See [`crate::partitions::FetchOk::appended_at`].
    pub appended_at: Option<std::time::Instant>,
    pub leader_epoch: u32,
    pub diverging: Option<(i32, u64)>,
}

/// Everything that crosses between cores.
pub enum MeshMsg {
    /// From shard 0: the users and ACLs now (decisions are made again).
    Security {
        state: std::sync::Arc<crate::auth::store::SecurityState>,
        reply: Reply<()>,
    },
    /// To shard 0 (single node): change the security store.
    SecurityChange {
        change: crate::auth::store::SecurityChange,
        reply: Reply<()>,
    },
    /// Ordered per partition: appended in arrival order.
    Produce {
        topic: String,
        topic_id: u64,
        partition: u32,
        payload: Vec<u8>,
        acks: Acks,
        reply: Reply<ProduceOk>,
    },
    Fetch {
        params: FetchParams,
        reply: Reply<FetchReply>,
    },
    PartitionState {
        topic: String,
        partition: u32,
        reply: Reply<PartitionState>,
    },
    /// The offsets of every partition the receiver owns of these topics
    /// (all topics if `None`), in one answer: metadata for thousands of
    /// partitions costs one message per shard, not one per partition.
    PartitionStates {
        topics: Option<Vec<String>>,
        reply: Reply<Vec<((String, u32), PartitionState)>>,
    },
    /// To the controller (shard 0).
    CreateTopic { spec: TopicSpec, reply: Reply<()> },
    /// To the controller (shard 0).
    DeleteTopic { name: String, reply: Reply<()> },
    /// From the controller: open the local partitions of a topic being
    /// created, not yet visible.
    StageTopic { meta: TopicMeta, reply: Reply<()> },
    /// From the controller: the topic is recorded; make it visible.
    CommitTopic { name: String, reply: Reply<()> },
    /// From the controller: close and delete the local partitions (of a
    /// deleted topic, or of a creation that is rolled back).
    DropTopic { meta: TopicMeta, reply: Reply<()> },
    /// From the controller: the topic's placement or partition state
    /// changed (leader, epoch, ISR); its local logs stay as they are.
    UpdateTopic { meta: TopicMeta, reply: Reply<()> },
    /// From shard 0: this broker lost (true) or regained (false)
    /// ZooKeeper; a leader acknowledges no acks=all write meanwhile.
    Fence { fenced: bool },
    /// From shard 0: the cluster as ZooKeeper shows it now.
    ClusterView {
        view: std::sync::Arc<crate::cluster::ClusterView>,
    },
    Metrics {
        reply: oneshot::Sender<Vec<(&'static str, u64)>>,
    },
    /// Everything `GET /metrics` shows of the receiving shard.
    Scrape {
        reply: Reply<crate::metrics::ShardScrape>,
    },
}

/// The partition a message must keep its order in, if any.
type LaneKey = (String, u32);

impl MeshMsg {
    fn lane(&self) -> Option<LaneKey> {
        match self {
            MeshMsg::Produce {
                topic, partition, ..
            } => Some((topic.clone(), *partition)),
            _ => None,
        }
    }
}

/// This shard's ends of the mesh.
pub struct Mesh {
    senders: Option<Senders<MeshMsg>>,
}

impl Mesh {
    /// Joins the mesh (every shard must, before any sends).
    pub async fn join(
        shard: usize,
        builder: Option<MeshBuilderFull>,
    ) -> Result<(Mesh, Option<Receivers<MeshMsg>>)> {
        match builder {
            None => Ok((Mesh { senders: None }, None)),
            Some(b) => {
                let (s, r) = b.join().await.map_err(|e| {
                    Error::Config(format!("shard {shard}: cannot join the shard mesh: {e}"))
                })?;
                Ok((Mesh { senders: Some(s) }, Some(r)))
            }
        }
    }

    /// Sends `msg` to `shard`, waiting only for room in the channel.
    pub async fn send(&self, reactor: &Reactor, shard: usize, msg: MeshMsg) -> Result<()> {
        let senders = self.senders.as_ref().ok_or(Error::ShardGone)?;
        add(&reactor.metrics.cross_shard_requests, 1);
        senders
            .send_to(shard, msg)
            .await
            .map_err(|_| Error::ShardGone)
    }

    /// Sends the message `make` builds around a reply channel and waits
    /// for the answer.
    pub async fn call<T>(
        &self,
        reactor: &Reactor,
        shard: usize,
        make: impl FnOnce(Reply<T>) -> MeshMsg,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.send(reactor, shard, make(tx)).await?;
        rx.await.map_err(|_| Error::ShardGone)?
    }
}

/// What is left of an ordered message once its order-sensitive part ran.
pub type Rest = Pin<Box<dyn Future<Output = ()>>>;

/// Starts an ordered message: runs its order-sensitive part and returns
/// the rest, if any.
type Start<M> = Box<dyn Fn(M) -> Pin<Box<dyn Future<Output = Option<Rest>>>>>;

/// Ordered messages waiting on the receiving shard, one FIFO lane per key
/// (partition). A lane's task starts its messages one after another; the
/// rest of each runs in a task of its own. Lanes exist only while they
/// hold messages. Owned by one core.
pub struct Lanes<K, M> {
    queues: RefCell<HashMap<K, VecDeque<M>>>,
    queued: Cell<usize>,
    queued_max: usize,
    drained: Notify,
    start: Start<M>,
}

impl<K: Eq + Hash + Clone + 'static, M: 'static> Lanes<K, M> {
    pub fn new(queued_max: usize, start: Start<M>) -> Rc<Lanes<K, M>> {
        assert!(queued_max > 0);
        Rc::new(Lanes {
            queues: RefCell::new(HashMap::new()),
            queued: Cell::new(0),
            queued_max,
            drained: Notify::default(),
            start,
        })
    }

    /// Queues `msg` behind the others of its lane. Waits while the lanes
    /// hold `queued_max` messages: the sender then waits on the channel
    /// instead of this shard queueing without end.
    pub async fn push(self: &Rc<Self>, key: K, msg: M) {
        while self.queued.get() >= self.queued_max {
            self.drained.changed().await;
        }
        self.queued.set(self.queued.get() + 1);
        {
            let mut queues = self.queues.borrow_mut();
            if let Some(q) = queues.get_mut(&key) {
                q.push_back(msg);
                return;
            }
            queues.insert(key.clone(), VecDeque::from([msg]));
        }
        // The borrow ends before the spawn: the new task may run at once.
        let lanes = self.clone();
        rt::spawn_detached(async move { lanes.run(key).await });
    }

    async fn run(&self, key: K) {
        loop {
            // The lane is removed only when found empty, with no await in
            // between: a message queued meanwhile is never stranded.
            let next = {
                let mut queues = self.queues.borrow_mut();
                let Some(q) = queues.get_mut(&key) else {
                    return;
                };
                match q.pop_front() {
                    Some(m) => m,
                    None => {
                        queues.remove(&key);
                        return;
                    }
                }
            };
            self.queued.set(self.queued.get() - 1);
            self.drained.notify_all();
            if let Some(rest) = (self.start)(next).await {
                rt::spawn_detached(rest);
            }
        }
    }
}

/// Serves the messages other shards send to this one until the tasks are
/// dropped: one receive loop per peer; ordered messages go through
/// per-partition [`Lanes`], the others each run in a task of their own.
pub fn serve(reactor: &Rc<Reactor>, mut receivers: Receivers<MeshMsg>) -> Vec<rt::Task<()>> {
    let lanes: Rc<Lanes<LaneKey, MeshMsg>> = {
        let reactor = reactor.clone();
        Lanes::new(
            MESH_LANE_QUEUED_MAX,
            Box::new(move |msg| Box::pin(reactor.clone().start_ordered(msg))),
        )
    };
    receivers
        .streams()
        .into_iter()
        .map(|(_, rx)| {
            let (reactor, lanes) = (reactor.clone(), lanes.clone());
            rt::spawn(async move {
                while let Some(msg) = rx.recv().await {
                    match msg.lane() {
                        None => {
                            let reactor = reactor.clone();
                            rt::spawn_detached(async move { reactor.handle(msg).await });
                        }
                        Some(key) => lanes.push(key, msg).await,
                    }
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A lane starts its messages in arrival order even when the first is
    /// slow to start, and a slow lane holds up no other lane.
    #[test]
    fn lanes_keep_arrival_order_per_key() {
        let ex = glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor");
        let order = ex.run(async {
            let order = Rc::new(RefCell::new(Vec::new()));
            let o = order.clone();
            let lanes: Rc<Lanes<u32, (u32, u64)>> = Lanes::new(
                8,
                Box::new(move |(id, delay_ms): (u32, u64)| {
                    let o = o.clone();
                    Box::pin(async move {
                        rt::sleep(Duration::from_millis(delay_ms)).await;
                        o.borrow_mut().push(id);
                        None
                    })
                }),
            );
            lanes.push(7, (1, 60)).await;
            lanes.push(7, (2, 0)).await;
            lanes.push(9, (3, 0)).await;
            lanes.push(7, (4, 0)).await;
            rt::sleep(Duration::from_millis(200)).await;
            assert!(lanes.queues.borrow().is_empty(), "lanes removed when empty");
            assert_eq!(lanes.queued.get(), 0);
            let v = order.borrow().clone();
            v
        });
        assert_eq!(order, vec![3, 1, 2, 4]);
    }

    /// Past `queued_max` a push waits until a lane drains.
    #[test]
    fn lanes_are_bounded() {
        let ex = glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor");
        ex.run(async {
            let lanes: Rc<Lanes<u32, u64>> = Lanes::new(
                2,
                Box::new(|delay_ms: u64| {
                    Box::pin(async move {
                        rt::sleep(Duration::from_millis(delay_ms)).await;
                        None
                    })
                }),
            );
            // The first starts at once (its lane task takes it); two more
            // fill the bound.
            lanes.push(1, 100).await;
            rt::sleep(Duration::from_millis(5)).await;
            lanes.push(1, 0).await;
            lanes.push(1, 0).await;
            let t0 = rt::now();
            lanes.push(1, 0).await;
            assert!(
                t0.elapsed() >= Duration::from_millis(50),
                "the fourth push waited for the first to finish"
            );
        });
    }
}
