//! The control thread: this broker's ZooKeeper session, its registration,
//! the controller (when elected) and the links to the other brokers.
//!
//! One thread with a current-thread tokio runtime (the ZooKeeper client
//! does its own I/O); everything here is single-threaded (`Rc`,
//! `RefCell`). A session's life:
//! 1. connect (at start: refused after a bounded wait with a clear error);
//! 2. make the cluster's tree, watch it (persistent, recursive) *before*
//!    reading it, so no change is missed between the read and the watch;
//! 3. register `brokers/ids/<id>` (ephemeral);
//! 4. read everything, hand it to shard 0 (which opens this broker's
//!    replicas), then stand for controller;
//! 5. follow the watch until the session expires, then start again at 1
//!    with a new session (re-registering).
//!
//! While ZooKeeper is unreachable but the session lives, the broker keeps
//! serving the partitions it leads; topic changes fail with
//! `ClusterUnavailable`.
//!
//! The controller (one per cluster) holds the ephemeral `controller` node
//! and an epoch it bumped in `controller_epoch` with a conditional write.
//! Every write it makes is a multi-operation that first checks
//! `controller_epoch`'s version: a deposed controller's writes fail.

use super::links::{Links, PeerRequest};
use super::zk::{self, ControllerRec, Layout, PartitionStateRec, TopicRecord};
use super::{BrokerReg, ClusterView, ToControl, ToShards};
use crate::config::{ClusterConfig, Config};
use crate::controller::placement::{self, BrokerSlot, Load};
use crate::controller::{self, TopicSpec};
use crate::error::{Error, Result};
use crate::metadata::TopicMeta;
use futures::channel::{mpsc, oneshot};
use futures::{SinkExt, StreamExt};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zookeeper_client as zkc;

/// How long the controller waits for the brokers holding a new topic's
/// replicas to open them before it answers anyway (they catch up from
/// their watch).
const APPLY_WAIT: Duration = Duration::from_secs(10);
/// How often links are checked against membership and the stop flag read.
const TICK: Duration = Duration::from_millis(200);

/// Starts the control thread and waits until this broker is registered
/// and has applied the cluster's topics, or failed to.
pub fn start(
    config: Config,
    from_shards: mpsc::Receiver<ToControl>,
    to_shards: mpsc::Sender<ToShards>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let cc = config
        .cluster
        .clone()
        .ok_or_else(|| Error::Config("no cluster configured".into()))?;
    let (hosts, chroot) = zk::split_connect(&cc.zookeeper)?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let thread = std::thread::Builder::new()
        .name("cluster".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(Error::io("start the cluster runtime", e)));
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let control = Control::new(config, cc, hosts, chroot, to_shards, stop);
                control.run(from_shards, ready_tx).await;
            });
        })
        .map_err(|e| Error::io("start the cluster thread", e))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(Error::Config(
                "the cluster thread stopped during start-up".into(),
            ))
        }
    }
}

struct CtrlState {
    epoch: u64,
    /// `controller_epoch`'s version after our bump: every write checks it.
    version: i32,
}

type TopicRecords = BTreeMap<String, (TopicRecord, Vec<PartitionStateRec>)>;

struct Control {
    config: Config,
    cc: ClusterConfig,
    hosts: String,
    layout: Layout,
    nshards: usize,
    me: BrokerReg,
    peer_port: Cell<u16>,
    zk: RefCell<Option<zkc::Client>>,
    view: RefCell<ClusterView>,
    ctrl: RefCell<Option<CtrlState>>,
    topics: RefCell<TopicRecords>,
    to_shards: mpsc::Sender<ToShards>,
    links: RefCell<Option<Rc<Links>>>,
    stop: Arc<AtomicBool>,
    /// Whether the cluster's tree existed when this broker first connected.
    tree_existed: Cell<bool>,
    /// Controller: a pass over the partitions' leaders is running.
    electing: Cell<bool>,
    /// Controller: when leadership last moved back to preferred replicas.
    last_rebalance: Cell<Option<Instant>>,
    /// The users and ACLs as last read (links check peers against it).
    security: RefCell<Arc<crate::auth::store::SecurityState>>,
}

/// How often the controller moves leadership back to preferred replicas
/// that are in sync again.
const REBALANCE_EVERY: Duration = Duration::from_secs(5);

enum Exit {
    Stop,
    Expired,
}

fn zk_err(what: &str, e: zkc::Error) -> Error {
    Error::ClusterUnavailable(format!("ZooKeeper: cannot {what}: {e}"))
}

impl Control {
    fn new(
        config: Config,
        cc: ClusterConfig,
        hosts: String,
        chroot: String,
        to_shards: mpsc::Sender<ToShards>,
        stop: Arc<AtomicBool>,
    ) -> Rc<Control> {
        let nshards = config.cores.len();
        let me = BrokerReg {
            id: cc.broker_id,
            host: config.advertised_host.clone(),
            port: config.listen.port(),
            shard_ports: (0..nshards).map(|i| config.shard_port(i)).collect(),
            peer_port: 0,
            rack: cc.rack.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            incarnation: 0,
        };
        Rc::new(Control {
            layout: Layout::new(&chroot, &cc.name),
            view: RefCell::new(ClusterView {
                name: cc.name.clone(),
                me: cc.broker_id,
                ..ClusterView::default()
            }),
            config,
            cc,
            hosts,
            nshards,
            me,
            peer_port: Cell::new(0),
            zk: RefCell::new(None),
            ctrl: RefCell::new(None),
            topics: RefCell::new(BTreeMap::new()),
            to_shards,
            links: RefCell::new(None),
            stop,
            tree_existed: Cell::new(true),
            electing: Cell::new(false),
            last_rebalance: Cell::new(None),
            security: Default::default(),
        })
    }

    fn zk(&self) -> Result<zkc::Client> {
        self.zk
            .borrow()
            .clone()
            .ok_or_else(|| Error::ClusterUnavailable("not connected to ZooKeeper".into()))
    }

    fn links(&self) -> Result<Rc<Links>> {
        self.links
            .borrow()
            .clone()
            .ok_or_else(|| Error::ClusterUnavailable("peer links not started".into()))
    }

    async fn run(
        self: Rc<Self>,
        mut from_shards: mpsc::Receiver<ToControl>,
        ready: std::sync::mpsc::Sender<Result<()>>,
    ) {
        let mut ready = Some(ready);
        match self.start_links().await {
            Ok(()) => {}
            Err(e) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(e));
                }
                return;
            }
        }
        loop {
            match self.session(&mut ready, &mut from_shards).await {
                Ok(Exit::Stop) => break,
                Ok(Exit::Expired) => {
                    tracing::warn!(
                        "ZooKeeper session expired: registering again with a new session"
                    );
                }
                Err(e) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Err(e));
                        return;
                    }
                    tracing::warn!(error = %e, "ZooKeeper session failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            self.ctrl.borrow_mut().take();
            self.zk.borrow_mut().take();
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
        }
        if let Ok(l) = self.links() {
            l.close_all();
        }
    }

    async fn start_links(self: &Rc<Self>) -> Result<()> {
        let listener = tokio::net::TcpListener::bind((self.config.listen.ip(), 0))
            .await
            .map_err(|e| Error::io("listen for links from other brokers", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::io("read the peer link port", e))?
            .port();
        let weak = Rc::downgrade(self);
        let handler: super::links::Handler = Rc::new(move |from, req| {
            let weak = weak.clone();
            Box::pin(async move {
                let Some(c) = weak.upgrade() else {
                    return Err(Error::ClusterUnavailable("broker stopping".into()));
                };
                c.serve_peer(from, req).await
            })
        });
        let auth = match (&self.config.auth.inter_broker, self.config.auth.enabled) {
            (Some((user, password)), true) => {
                let weak = Rc::downgrade(self);
                Some(super::links::LinkAuth {
                    user: user.clone(),
                    password: password.clone(),
                    broker_credential: Rc::new(move |name: &str| {
                        let c = weak.upgrade()?;
                        if !c.config.auth.is_privileged(name) {
                            return None;
                        }
                        let state = c.security.borrow().clone();
                        state.users.get(name)?.credential().ok()
                    }),
                })
            }
            _ => None,
        };
        let links = Links::new(
            self.cc.broker_id,
            self.cc.name.clone(),
            handler,
            auth,
            self.config.tls.clone(),
        );
        tokio::task::spawn_local(links.clone().accept_loop(listener));
        *self.links.borrow_mut() = Some(links);
        // The registration carries the port (set before the first one).
        self.peer_port.set(port);
        Ok(())
    }

    fn registration(&self) -> BrokerReg {
        BrokerReg {
            peer_port: self.peer_port.get(),
            ..self.me.clone()
        }
    }

    /// One ZooKeeper session, from connect to expiry (or stop).
    async fn session(
        self: &Rc<Self>,
        ready: &mut Option<std::sync::mpsc::Sender<Result<()>>>,
        from_shards: &mut mpsc::Receiver<ToControl>,
    ) -> Result<Exit> {
        let first = ready.is_some();
        let timeout = self.cc.session_timeout;
        // At start the wait is bounded; later, a member keeps trying (and
        // serving what it leads) until ZooKeeper is back.
        let wait = timeout.max(Duration::from_secs(2));
        let zk = match tokio::time::timeout(wait, self.connect(timeout)).await {
            Ok(Ok(zk)) => zk,
            Ok(Err(e)) => return Err(zk_err(&format!("connect to {}", self.hosts), e)),
            Err(_) => {
                return Err(Error::ClusterUnavailable(format!(
                    "ZooKeeper at {} did not answer within {} ms",
                    self.hosts,
                    wait.as_millis()
                )))
            }
        };
        let existed = self.ensure_tree(&zk).await?;
        if first {
            self.tree_existed.set(existed);
        }
        let mut watcher = zk
            .watch(&self.layout.root, zkc::AddWatchMode::PersistentRecursive)
            .await
            .map_err(|e| zk_err("watch the cluster", e))?;
        let mut state = zk.state_watcher();
        self.register(&zk, first).await?;
        *self.zk.borrow_mut() = Some(zk.clone());
        if first {
            self.bootstrap_users().await?;
        }
        self.read_all().await?;
        tracing::info!(
            broker = self.cc.broker_id,
            cluster = %self.cc.name,
            zookeeper = %self.hosts,
            session = format!("{:#x}", zk.session_id().0),
            "registered in the cluster"
        );
        if let Some(r) = ready.take() {
            let _ = r.send(Ok(()));
        }
        self.fence_shards(false).await;
        self.try_elect().await;
        let mut tick = tokio::time::interval(TICK);
        let mut disconnected_since: Option<Instant> = None;
        loop {
            tokio::select! {
                ev = watcher.changed() => {
                    if ev.event_type == zkc::EventType::Session {
                        if ev.session_state.is_terminated() {
                            self.fence_shards(true).await;
                            return Ok(Exit::Expired);
                        }
                        continue;
                    }
                    let mut paths = vec![ev.path];
                    // Take a burst of events at once (a topic's creation is
                    // one event per partition): each topic is read once.
                    while let Some(ev) = futures::FutureExt::now_or_never(watcher.changed()) {
                        if ev.event_type == zkc::EventType::Session {
                            if ev.session_state.is_terminated() {
                                self.fence_shards(true).await;
                                return Ok(Exit::Expired);
                            }
                            continue;
                        }
                        paths.push(ev.path);
                        if paths.len() >= 4096 {
                            break;
                        }
                    }
                    self.on_changes(paths).await;
                }
                st = state.changed() => {
                    match st {
                        zkc::SessionState::Disconnected => {
                            disconnected_since = Some(Instant::now());
                            tracing::warn!("lost contact with ZooKeeper; serving on while the session lives, acknowledging no acks=all write");
                            self.fence_shards(true).await;
                        }
                        zkc::SessionState::SyncConnected => {
                            if let Some(t) = disconnected_since.take() {
                                tracing::info!(after_ms = t.elapsed().as_millis() as u64, "ZooKeeper reachable again");
                                // Watch events during the gap can be lost: read
                                // everything again.
                                match self.read_all().await {
                                    Ok(()) => self.fence_shards(false).await,
                                    Err(e) => tracing::warn!(error = %e, "cannot re-read the cluster"),
                                }
                                self.try_elect().await;
                            }
                        }
                        s if s.is_terminated() => {
                            self.fence_shards(true).await;
                            return Ok(Exit::Expired);
                        }
                        _ => {}
                    }
                }
                req = from_shards.next() => {
                    match req {
                        Some(req) => {
                            let c = self.clone();
                            tokio::task::spawn_local(async move { c.serve_shard(req).await });
                        }
                        None => return Ok(Exit::Stop),
                    }
                }
                _ = tick.tick() => {
                    if self.stop.load(Ordering::SeqCst) {
                        self.deregister(&zk).await;
                        return Ok(Exit::Stop);
                    }
                    if let Ok(l) = self.links() {
                        l.reconcile(&self.view.borrow());
                    }
                    if disconnected_since.is_none() && self.view.borrow().controller.is_none() {
                        self.try_elect().await;
                    }
                    if disconnected_since.is_none() {
                        self.spawn_elect_leaders();
                    }
                }
            }
        }
    }

    /// Connects, trying again after a failed attempt (a server just
    /// started can drop the first connections); the caller bounds the
    /// wait.
    async fn connect(&self, timeout: Duration) -> std::result::Result<zkc::Client, zkc::Error> {
        loop {
            let r = zkc::Client::connector()
                .with_session_timeout(timeout)
                .with_connection_timeout(timeout.min(Duration::from_secs(5)))
                .connect(&self.hosts)
                .await;
            match r {
                Ok(zk) => return Ok(zk),
                Err(e @ (zkc::Error::AuthFailed | zkc::Error::BadArguments(_))) => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "ZooKeeper connect failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Creates the cluster's persistent nodes; whether they were there.
    async fn ensure_tree(&self, zk: &zkc::Client) -> Result<bool> {
        let existed = zk
            .check_stat(&self.layout.topics())
            .await
            .map_err(|e| zk_err("read the cluster's tree", e))?
            .is_some();
        let opts = zkc::CreateMode::Persistent.with_acls(zkc::Acls::anyone_all());
        for p in [
            self.layout.brokers(),
            self.layout.topics(),
            self.layout.users(),
            self.layout.acls(),
        ] {
            match zk.mkdir(&p, &opts).await {
                Ok(()) | Err(zkc::Error::NodeExists) => {}
                Err(e) => return Err(zk_err(&format!("create {p}"), e)),
            }
        }
        Ok(existed)
    }

    /// Registers this broker (ephemeral node). A node that exists already:
    /// - owned by this session (restored after a ZooKeeper restart): ours;
    /// - with this broker's own address: a previous run of this broker
    ///   whose session has not expired yet (nothing else can hold the
    ///   address this process listens on): wait for it to go;
    /// - otherwise another live broker has the id: refuse.
    async fn register(&self, zk: &zkc::Client, first: bool) -> Result<()> {
        let path = self.layout.broker(self.cc.broker_id);
        let reg = self.registration();
        let data = zk::encode(&reg);
        let opts = zkc::CreateMode::Ephemeral.with_acls(zkc::Acls::anyone_all());
        let give_up = Instant::now() + self.cc.session_timeout * 3;
        let mut waiting_logged = false;
        loop {
            match zk.create(&path, &data, &opts).await {
                Ok((stat, _)) => return self.registered(stat.czxid),
                Err(zkc::Error::NodeExists) => {}
                Err(e) => return Err(zk_err(&format!("create {path}"), e)),
            }
            let (bytes, stat) = match zk.get_data(&path).await {
                Ok(d) => d,
                Err(zkc::Error::NoNode) => continue,
                Err(e) => return Err(zk_err(&format!("read {path}"), e)),
            };
            if stat.ephemeral_owner == zk.session_id().0 {
                zk.set_data(&path, &data, Some(stat.version))
                    .await
                    .map_err(|e| zk_err(&format!("update {path}"), e))?;
                return self.registered(stat.czxid);
            }
            let other: Option<BrokerReg> = zk::decode(&path, &bytes).ok();
            let mine = other
                .as_ref()
                .is_some_and(|o| o.host == reg.host && o.port == reg.port);
            if first && !mine {
                let at = other.map_or_else(
                    || "unknown address".to_string(),
                    |o| format!("{}:{}", o.host, o.port),
                );
                return Err(Error::Config(format!(
                    "broker id {} is already registered in cluster {:?} by a live broker at {at}; give each broker its own --broker-id",
                    self.cc.broker_id, self.cc.name
                )));
            }
            if Instant::now() > give_up {
                return Err(Error::ClusterUnavailable(format!(
                    "broker id {} stays registered by another session",
                    self.cc.broker_id
                )));
            }
            if !waiting_logged {
                tracing::info!(broker = self.cc.broker_id, "a previous session of this broker is still registered; waiting for it to expire");
                waiting_logged = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn registered(&self, czxid: i64) -> Result<()> {
        if let Ok(l) = self.links() {
            l.incarnation.set(czxid);
        }
        Ok(())
    }

    /// Clean shutdown: leave the cluster at once (not a session timeout
    /// later) and hand the controller over.
    async fn deregister(&self, zk: &zkc::Client) {
        if self.ctrl.borrow().is_some() {
            let _ = zk.delete(&self.layout.controller(), None).await;
        }
        let _ = zk
            .delete(&self.layout.broker(self.cc.broker_id), None)
            .await;
        tracing::info!(broker = self.cc.broker_id, "left the cluster");
    }

    async fn read_all(&self) -> Result<()> {
        self.read_security().await?;
        self.read_brokers().await?;
        self.read_controller().await?;
        let zk = self.zk()?;
        let names = match zk.list_children(&self.layout.topics()).await {
            Ok(n) => n,
            Err(e) => return Err(zk_err("list topics", e)),
        };
        let reads = futures::future::join_all(names.iter().map(|n| self.read_topic(n))).await;
        let mut records = BTreeMap::new();
        for (name, r) in names.into_iter().zip(reads) {
            if let Some(rec) = r? {
                records.insert(name, rec);
            }
        }
        let metas: Vec<TopicMeta> = records
            .iter()
            .map(|(n, (rec, st))| zk::topic_meta(n, rec, st, self.cc.broker_id, self.nshards))
            .collect();
        *self.topics.borrow_mut() = records;
        let drop_strays = self.tree_existed.get();
        self.to_shard0(|reply| ToShards::Reconcile {
            topics: metas,
            drop_strays,
            reply,
        })
        .await
    }

    async fn read_brokers(&self) -> Result<()> {
        let zk = self.zk()?;
        let ids = zk
            .list_children(&self.layout.brokers())
            .await
            .map_err(|e| zk_err("list brokers", e))?;
        let mut brokers = BTreeMap::new();
        for id in ids {
            let path = format!("{}/{id}", self.layout.brokers());
            match zk.get_data(&path).await {
                Ok((bytes, stat)) => match zk::decode::<BrokerReg>(&path, &bytes) {
                    Ok(mut reg) => {
                        reg.incarnation = stat.czxid;
                        if id.parse::<u32>().ok() != Some(reg.id) {
                            tracing::error!(%path, "broker registration names another id; ignored");
                            continue;
                        }
                        brokers.insert(reg.id, reg);
                    }
                    Err(e) => tracing::error!(error = %e, "ignoring a broker registration"),
                },
                Err(zkc::Error::NoNode) => {}
                Err(e) => return Err(zk_err(&format!("read {path}"), e)),
            }
        }
        let changed = {
            let mut v = self.view.borrow_mut();
            let changed = v.brokers != brokers;
            if changed {
                let joined: Vec<u32> = brokers
                    .keys()
                    .filter(|b| !v.brokers.contains_key(b))
                    .copied()
                    .collect();
                let left: Vec<u32> = v
                    .brokers
                    .keys()
                    .filter(|b| !brokers.contains_key(b))
                    .copied()
                    .collect();
                tracing::info!(live = ?brokers.keys().collect::<Vec<_>>(), ?joined, ?left, "cluster membership");
            }
            v.brokers = brokers;
            changed
        };
        if changed {
            self.publish_view().await;
            if let Ok(l) = self.links() {
                l.reconcile(&self.view.borrow());
            }
        }
        Ok(())
    }

    /// Tells the shards whether this broker has lost ZooKeeper (a leader
    /// then acknowledges no acks=all write: it may have been deposed
    /// without hearing of it).
    async fn fence_shards(&self, fenced: bool) {
        if self
            .to_shards
            .clone()
            .send(ToShards::Fence(fenced))
            .await
            .is_err()
        {
            tracing::debug!("shards gone; fence not delivered");
        }
    }

    async fn read_controller(&self) -> Result<()> {
        let zk = self.zk()?;
        let path = self.layout.controller();
        let now = match zk.get_data(&path).await {
            Ok((bytes, _)) => match zk::decode::<ControllerRec>(&path, &bytes) {
                Ok(c) => Some((c.broker_id, c.epoch)),
                Err(e) => {
                    tracing::error!(error = %e, "unreadable controller node");
                    None
                }
            },
            Err(zkc::Error::NoNode) => None,
            Err(e) => return Err(zk_err("read the controller", e)),
        };
        if now.map(|c| c.0) != Some(self.cc.broker_id) && self.ctrl.borrow_mut().take().is_some() {
            tracing::warn!("no longer the controller");
        }
        let changed = {
            let mut v = self.view.borrow_mut();
            let changed = v.controller != now;
            v.controller = now;
            changed
        };
        if changed {
            match now {
                Some((id, epoch)) => tracing::info!(controller = id, epoch, "controller"),
                None => tracing::info!("no controller"),
            }
            self.publish_view().await;
        }
        Ok(())
    }

    /// The topic's record and partition states; `None` if it is not (or
    /// no longer, or not yet wholly) there, or malformed (reported).
    async fn read_topic(
        &self,
        name: &str,
    ) -> Result<Option<(TopicRecord, Vec<PartitionStateRec>)>> {
        let zk = self.zk()?;
        let path = self.layout.topic(name);
        let rec: TopicRecord = match zk.get_data(&path).await {
            Ok((bytes, _)) => match zk::decode(&path, &bytes) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "ignoring a topic");
                    return Ok(None);
                }
            },
            Err(zkc::Error::NoNode) => return Ok(None),
            Err(e) => return Err(zk_err(&format!("read {path}"), e)),
        };
        let paths: Vec<String> = (0..rec.replicas.len() as u32)
            .map(|p| self.layout.partition(name, p))
            .collect();
        let reads = futures::future::join_all(paths.iter().map(|p| zk.get_data(p))).await;
        let mut states = Vec::with_capacity(paths.len());
        for (path, r) in paths.iter().zip(reads) {
            match r {
                Ok((bytes, _)) => match zk::decode::<PartitionStateRec>(path, &bytes) {
                    Ok(s) => states.push(s),
                    Err(e) => {
                        tracing::error!(error = %e, "ignoring a topic");
                        return Ok(None);
                    }
                },
                Err(zkc::Error::NoNode) => return Ok(None),
                Err(e) => return Err(zk_err(&format!("read {path}"), e)),
            }
        }
        Ok(Some((rec, states)))
    }

    /// Reads a topic again and applies it here.
    async fn refresh_topic(&self, name: &str) -> Result<()> {
        match self.read_topic(name).await? {
            Some((rec, states)) => {
                let meta = zk::topic_meta(name, &rec, &states, self.cc.broker_id, self.nshards);
                self.topics
                    .borrow_mut()
                    .insert(name.to_string(), (rec, states));
                self.to_shard0(|reply| ToShards::Apply { meta, reply })
                    .await
            }
            None => {
                let id = self
                    .topics
                    .borrow_mut()
                    .remove(name)
                    .map_or(0, |(r, _)| r.id);
                // Gone (creation and deletion are atomic multis, so a topic
                // is never half there). Sent even when this thread saw it
                // go already: shard 0 serves changes in order, so the
                // answer comes once the replicas are dropped.
                let name = name.to_string();
                self.to_shard0(|reply| ToShards::Remove { name, id, reply })
                    .await
            }
        }
    }

    async fn on_changes(self: &Rc<Self>, paths: Vec<String>) {
        let mut brokers = false;
        let mut controller = false;
        let mut security = false;
        let mut topics = std::collections::BTreeSet::new();
        for p in &paths {
            match self.layout.classify(p) {
                zk::Changed::Security => security = true,
                zk::Changed::Brokers => brokers = true,
                zk::Changed::Controller => controller = true,
                zk::Changed::Topic(t) => {
                    topics.insert(t.to_string());
                }
                zk::Changed::Other => {}
            }
        }
        if security {
            if let Err(e) = self.read_security().await {
                tracing::warn!(error = %e, "cannot read the users and ACLs");
            }
        }
        if brokers {
            if let Err(e) = self.read_brokers().await {
                tracing::warn!(error = %e, "cannot read the brokers");
            }
            self.spawn_elect_leaders();
        }
        if controller {
            if let Err(e) = self.read_controller().await {
                tracing::warn!(error = %e, "cannot read the controller");
            }
            if self.view.borrow().controller.is_none() {
                self.try_elect().await;
            }
        }
        for t in topics {
            if let Err(e) = self.refresh_topic(&t).await {
                tracing::warn!(topic = %t, error = %e, "cannot apply a topic change");
            }
        }
    }

    async fn publish_view(&self) {
        let view = Arc::new(self.view.borrow().clone());
        let mut tx = self.to_shards.clone();
        if tx.send(ToShards::View(view)).await.is_err() {
            tracing::debug!("shards gone; view not published");
        }
    }

    async fn to_shard0(
        &self,
        msg: impl FnOnce(oneshot::Sender<Result<()>>) -> ToShards,
    ) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.to_shards
            .clone()
            .send(msg(tx))
            .await
            .map_err(|_| Error::ShardGone)?;
        rx.await.map_err(|_| Error::ShardGone)?
    }

    // ---- controller ------------------------------------------------------

    /// Stands for controller: creates the ephemeral `controller` node and,
    /// having won, bumps the epoch with a conditional write.
    async fn try_elect(&self) {
        if let Err(e) = self.elect().await {
            tracing::warn!(error = %e, "controller election failed");
        }
    }

    async fn elect(&self) -> Result<()> {
        if self.ctrl.borrow().is_some() {
            return Ok(());
        }
        let zk = self.zk()?;
        let path = self.layout.controller();
        let me = self.cc.broker_id;
        let opts = zkc::CreateMode::Ephemeral.with_acls(zkc::Acls::anyone_all());
        let claim = zk::encode(&ControllerRec {
            broker_id: me,
            epoch: 0,
        });
        match zk.create(&path, &claim, &opts).await {
            Ok(_) => {}
            Err(zkc::Error::NodeExists) => {
                // Ours from a restored session? Then take it up again.
                match zk.get_data(&path).await {
                    Ok((_, stat)) if stat.ephemeral_owner == zk.session_id().0 => {}
                    Ok(_) | Err(zkc::Error::NoNode) => return self.read_controller().await,
                    Err(e) => return Err(zk_err("read the controller", e)),
                }
            }
            Err(e) => return Err(zk_err("stand for controller", e)),
        }
        let epoch_path = self.layout.controller_epoch();
        let (epoch, version) = loop {
            let (old, version) = match zk.get_data(&epoch_path).await {
                Ok((bytes, stat)) => {
                    let old = std::str::from_utf8(&bytes)
                        .ok()
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .ok_or_else(|| {
                            Error::ClusterUnavailable(format!(
                                "malformed ZooKeeper node {epoch_path}"
                            ))
                        })?;
                    (old, Some(stat.version))
                }
                Err(zkc::Error::NoNode) => (0, None),
                Err(e) => return Err(zk_err("read the controller epoch", e)),
            };
            let next = old + 1;
            let r = match version {
                Some(v) => zk
                    .set_data(&epoch_path, next.to_string().as_bytes(), Some(v))
                    .await
                    .map(|s| s.version),
                None => zk
                    .create(
                        &epoch_path,
                        next.to_string().as_bytes(),
                        &zkc::CreateMode::Persistent.with_acls(zkc::Acls::anyone_all()),
                    )
                    .await
                    .map(|(s, _)| s.version),
            };
            match r {
                Ok(v) => break (next, v),
                Err(zkc::Error::BadVersion | zkc::Error::NodeExists) => continue,
                Err(e) => return Err(zk_err("bump the controller epoch", e)),
            }
        };
        let rec = zk::encode(&ControllerRec {
            broker_id: me,
            epoch,
        });
        zk.set_data(&path, &rec, None)
            .await
            .map_err(|e| zk_err("record the controller", e))?;
        *self.ctrl.borrow_mut() = Some(CtrlState { epoch, version });
        tracing::info!(broker = me, epoch, "this broker is the controller");
        self.view.borrow_mut().controller = Some((me, epoch));
        self.publish_view().await;
        Ok(())
    }

    /// The controller's fence: the check every controller write starts
    /// with, and the epoch it writes as.
    fn fence(&self) -> Result<(i32, u64)> {
        self.ctrl
            .borrow()
            .as_ref()
            .map(|c| (c.version, c.epoch))
            .ok_or_else(|| Error::ClusterUnavailable("this broker is not the controller".into()))
    }

    /// A controller write failed: if because the epoch moved on, this
    /// broker was deposed and stops acting as controller.
    fn write_failed(&self, what: &str, e: zkc::Error) -> Error {
        if e == zkc::Error::BadVersion {
            self.ctrl.borrow_mut().take();
            tracing::warn!("deposed: another broker is the controller now");
            return Error::ClusterUnavailable(format!(
                "cannot {what}: the controller changed; retry"
            ));
        }
        zk_err(what, e)
    }

    async fn create_topic(self: &Rc<Self>, spec: TopicSpec) -> Result<()> {
        let s = controller::settings(&spec, &self.config)?;
        let (version, epoch) = self.fence()?;
        if self.topics.borrow().contains_key(&spec.name) {
            return Err(Error::TopicExists(spec.name));
        }
        let slots: Vec<BrokerSlot> = self
            .view
            .borrow()
            .brokers
            .values()
            .map(|b| BrokerSlot {
                id: b.id,
                rack: b.rack.clone(),
                shards: b.shards(),
            })
            .collect();
        let mut load = Load::default();
        for (rec, states) in self.topics.borrow().values() {
            for (r, st) in rec.replicas.iter().zip(states) {
                load.add(r, st.leader);
            }
        }
        let replicas = placement::place_replicas(
            &spec.name,
            spec.partitions,
            spec.replication_factor,
            &slots,
            &mut load,
        )
        .map_err(Error::InvalidConfig)?;
        let rec = TopicRecord {
            id: controller::new_topic_id(),
            replication_factor: spec.replication_factor,
            sync: s.sync,
            retention_ms: s.retention_ms,
            retention_bytes: s.retention_bytes,
            segment_bytes: s.segment_bytes,
            replicas,
            min_insync_replicas: Some(s.min_insync_replicas),
            unclean_leader_election: s.unclean_leader_election,
        };
        let zk = self.zk()?;
        let opts = zkc::CreateMode::Persistent.with_acls(zkc::Acls::anyone_all());
        let name = spec.name.clone();
        {
            let mut w = zk.new_multi_writer();
            let add = |r: std::result::Result<(), zkc::Error>| {
                r.map_err(|e| zk_err("prepare the topic", e))
            };
            add(w.add_check_version(&self.layout.controller_epoch(), version))?;
            add(w.add_create(&self.layout.topic(&name), &zk::encode(&rec), &opts))?;
            add(w.add_create(&self.layout.partitions(&name), b"", &opts))?;
            for (p, r) in rec.replicas.iter().enumerate() {
                let st = PartitionStateRec {
                    leader: r.first().map(|x| x.broker),
                    leader_epoch: 0,
                    isr: r.iter().map(|x| x.broker).collect(),
                    controller_epoch: epoch,
                };
                add(w.add_create(
                    &self.layout.partition(&name, p as u32),
                    &zk::encode(&st),
                    &opts,
                ))?;
            }
            match w.commit().await {
                Ok(_) => {}
                Err(zkc::MultiWriteError::OperationFailed {
                    source: zkc::Error::NodeExists,
                    ..
                }) => return Err(Error::TopicExists(name)),
                Err(zkc::MultiWriteError::OperationFailed { source, .. })
                | Err(zkc::MultiWriteError::RequestFailed { source }) => {
                    return Err(self.write_failed("record the topic", source))
                }
            }
        }
        tracing::info!(topic = %name, partitions = spec.partitions, replication = spec.replication_factor, "topic created");
        let holders: std::collections::BTreeSet<u32> =
            rec.replicas.iter().flatten().map(|r| r.broker).collect();
        self.propagate(&name, holders).await;
        Ok(())
    }

    async fn delete_topic(self: &Rc<Self>, name: String) -> Result<()> {
        let (version, _) = self.fence()?;
        let zk = self.zk()?;
        let Some((rec, _)) = self.read_topic(&name).await? else {
            return Err(Error::UnknownTopic(name));
        };
        {
            let mut w = zk.new_multi_writer();
            let add = |r: std::result::Result<(), zkc::Error>| {
                r.map_err(|e| zk_err("prepare the deletion", e))
            };
            add(w.add_check_version(&self.layout.controller_epoch(), version))?;
            for p in 0..rec.replicas.len() as u32 {
                add(w.add_delete(&self.layout.partition(&name, p), None))?;
            }
            add(w.add_delete(&self.layout.partitions(&name), None))?;
            add(w.add_delete(&self.layout.topic(&name), None))?;
            match w.commit().await {
                Ok(_) => {}
                Err(zkc::MultiWriteError::OperationFailed {
                    source: zkc::Error::NoNode,
                    ..
                }) => return Err(Error::UnknownTopic(name)),
                Err(zkc::MultiWriteError::OperationFailed { source, .. })
                | Err(zkc::MultiWriteError::RequestFailed { source }) => {
                    return Err(self.write_failed("delete the topic", source))
                }
            }
        }
        tracing::info!(topic = %name, "topic deleted");
        let holders = rec.replicas.iter().flatten().map(|r| r.broker).collect();
        self.propagate(&name, holders).await;
        Ok(())
    }

    /// Has every live broker in `holders` apply the topic's new record
    /// now, and waits (bounded) for them: a client that created a topic
    /// can produce to it at once. A broker that does not answer catches
    /// up from its watch.
    async fn propagate(self: &Rc<Self>, name: &str, holders: std::collections::BTreeSet<u32>) {
        let me = self.cc.broker_id;
        let live: Vec<u32> = {
            let v = self.view.borrow();
            holders.into_iter().filter(|b| v.is_live(*b)).collect()
        };
        let links = self.links().ok();
        let waits = live.into_iter().map(|b| {
            let (c, links, name) = (self.clone(), links.clone(), name.to_string());
            async move {
                let r = if b == me {
                    c.refresh_topic(&name).await
                } else {
                    match links {
                        Some(l) => l.request(b, PeerRequest::ApplyTopic(name.clone()), APPLY_WAIT).await,
                        None => Err(Error::ClusterUnavailable("no links".into())),
                    }
                };
                if let Err(e) = r {
                    tracing::warn!(broker = b, topic = %name, error = %e, "broker did not apply the topic change yet; it will from its watch");
                }
            }
        });
        futures::future::join_all(waits).await;
    }

    // ---- security --------------------------------------------------------

    /// Reads every user and ACL and installs them on this broker's shards.
    /// A node that does not decode is skipped (and logged): one bad record
    /// must not lock everybody out.
    async fn read_security(&self) -> Result<()> {
        use crate::auth::store::{SecurityState, UserRecord};
        let zk = self.zk()?;
        let mut state = SecurityState::default();
        let names = zk
            .list_children(&self.layout.users())
            .await
            .map_err(|e| zk_err("list users", e))?;
        for n in names {
            let path = self.layout.user(&n);
            match zk.get_data(&path).await {
                Ok((bytes, _)) => match zk::decode::<UserRecord>(&path, &bytes) {
                    Ok(u) => {
                        state.users.insert(n, u);
                    }
                    Err(e) => tracing::warn!(error = %e, "skipping a user record"),
                },
                Err(zkc::Error::NoNode) => {}
                Err(e) => return Err(zk_err(&format!("read {path}"), e)),
            }
        }
        let keys = zk
            .list_children(&self.layout.acls())
            .await
            .map_err(|e| zk_err("list ACLs", e))?;
        for k in keys {
            let path = self.layout.acl(&k);
            match zk.get_data(&path).await {
                Ok((bytes, _)) => match zk::decode(&path, &bytes) {
                    Ok(rule) => {
                        state.acls.insert(rule);
                    }
                    Err(e) => tracing::warn!(error = %e, "skipping an ACL record"),
                },
                Err(zkc::Error::NoNode) => {}
                Err(e) => return Err(zk_err(&format!("read {path}"), e)),
            }
        }
        let state = Arc::new(state);
        *self.security.borrow_mut() = state.clone();
        self.to_shard0(|reply| ToShards::Security { state, reply })
            .await
    }

    /// Writes one change to ZooKeeper, then reads the store back so this
    /// broker applies it before answering (the others follow their watch).
    async fn security_change(&self, change: crate::auth::store::SecurityChange) -> Result<()> {
        use crate::auth::store::{acl_node_name, SecurityChange};
        let zk = self.zk()?;
        let opts = zkc::CreateMode::Persistent.with_acls(zkc::Acls::anyone_all());
        match &change {
            SecurityChange::PutUser {
                name,
                record,
                replace,
            } => {
                let path = self.layout.user(name);
                let data = zk::encode(record);
                match zk.create(&path, &data, &opts).await {
                    Ok(_) => {}
                    Err(zkc::Error::NodeExists) if *replace => {
                        zk.set_data(&path, &data, None)
                            .await
                            .map_err(|e| zk_err(&format!("update {path}"), e))?;
                    }
                    Err(zkc::Error::NodeExists) => {
                        // The same record already there is this request
                        // tried again: a create whose answer ZooKeeper lost
                        // (ConnectionLoss) may have succeeded, and the
                        // client retries after ClusterUnavailable. Its
                        // credential has a salt of its own, so an equal
                        // record is never another user's.
                        match zk.get_data(&path).await {
                            Ok((existing, _)) if existing == data => {}
                            Ok(_) => return Err(Error::UserExists(name.clone())),
                            Err(e) => return Err(zk_err(&format!("read {path}"), e)),
                        }
                    }
                    Err(e) => return Err(zk_err(&format!("create {path}"), e)),
                }
            }
            SecurityChange::DeleteUser(name) => {
                let path = self.layout.user(name);
                match zk.delete(&path, None).await {
                    Ok(()) => {}
                    Err(zkc::Error::NoNode) => return Err(Error::UnknownUser(name.clone())),
                    Err(e) => return Err(zk_err(&format!("delete {path}"), e)),
                }
            }
            SecurityChange::AddAcl(rule) => {
                let path = self.layout.acl(&acl_node_name(rule));
                match zk.create(&path, &zk::encode(rule), &opts).await {
                    Ok(_) | Err(zkc::Error::NodeExists) => {}
                    Err(e) => return Err(zk_err(&format!("create {path}"), e)),
                }
            }
            SecurityChange::RemoveAcl(rule) => {
                let path = self.layout.acl(&acl_node_name(rule));
                match zk.delete(&path, None).await {
                    Ok(()) | Err(zkc::Error::NoNode) => {}
                    Err(e) => return Err(zk_err(&format!("delete {path}"), e)),
                }
            }
        }
        self.read_security().await
    }

    /// At start with auth on: creates the bootstrap superuser when no user
    /// exists yet, and the inter-broker user when it is missing (a user
    /// that exists is never changed here).
    async fn bootstrap_users(&self) -> Result<()> {
        use crate::auth::store::UserRecord;
        use shoal_wire::scram::{Credential, ITERATIONS_DEFAULT};
        let auth = &self.config.auth;
        if !auth.enabled {
            return Ok(());
        }
        let zk = self.zk()?;
        let opts = zkc::CreateMode::Persistent.with_acls(zkc::Acls::anyone_all());
        let users = zk
            .list_children(&self.layout.users())
            .await
            .map_err(|e| zk_err("list users", e))?;
        let mut wanted = Vec::new();
        if users.is_empty() {
            match &auth.bootstrap {
                Some((name, Some(pw))) => wanted.push((name.clone(), pw.clone())),
                Some((name, None)) => {
                    return Err(Error::Config(format!(
                        "no users exist yet: superuser {name:?} is created with the password in {} (not set)",
                        crate::config::ADMIN_PASSWORD_ENV
                    )))
                }
                None => tracing::warn!("auth is on and no user exists: start one broker with --superuser NAME and {} to create the first", crate::config::ADMIN_PASSWORD_ENV),
            }
        }
        if let Some((name, pw)) = &auth.inter_broker {
            if !users.contains(name) {
                wanted.push((name.clone(), pw.clone()));
            }
        }
        for (name, pw) in wanted {
            let cred = Credential::generate(&pw.0, ITERATIONS_DEFAULT)
                .map_err(|e| Error::Config(format!("cannot make a credential: {e}")))?;
            let path = self.layout.user(&name);
            match zk
                .create(
                    &path,
                    &zk::encode(&UserRecord::from_credential(&cred)),
                    &opts,
                )
                .await
            {
                Ok(_) => tracing::info!(user = %name, "created user"),
                Err(zkc::Error::NodeExists) => {}
                Err(e) => return Err(zk_err(&format!("create {path}"), e)),
            }
        }
        Ok(())
    }

    // ---- requests --------------------------------------------------------

    async fn serve_shard(self: Rc<Self>, req: ToControl) {
        match req {
            ToControl::CreateTopic { spec, reply } => {
                let _ = reply.send(self.forward(PeerRequest::CreateTopic(spec)).await);
            }
            ToControl::DeleteTopic { name, reply } => {
                let _ = reply.send(self.forward(PeerRequest::DeleteTopic(name)).await);
            }
            ToControl::Security { change, reply } => {
                let _ = reply.send(self.security_change(change).await);
            }
            ToControl::AlterIsr {
                topic,
                partition,
                leader_epoch,
                isr,
                reply,
            } => {
                let _ = reply.send(self.alter_isr(&topic, partition, leader_epoch, isr).await);
            }
        }
    }

    /// A leader's change of its in-sync set: written only while ZooKeeper
    /// still shows this broker leading at `epoch` (a conditional write on
    /// the partition's node, so a controller's concurrent change wins and
    /// this one is tried again on top of it).
    async fn alter_isr(
        &self,
        topic: &str,
        partition: u32,
        epoch: u32,
        isr: Vec<u32>,
    ) -> Result<Vec<u32>> {
        let zk = self.zk()?;
        let path = self.layout.partition(topic, partition);
        let me = self.cc.broker_id;
        loop {
            let (bytes, stat) = match zk.get_data(&path).await {
                Ok(x) => x,
                Err(zkc::Error::NoNode) => return Err(Error::UnknownTopic(topic.into())),
                Err(e) => return Err(zk_err(&format!("read {path}"), e)),
            };
            let mut st: PartitionStateRec = zk::decode(&path, &bytes)?;
            if st.leader != Some(me) || st.leader_epoch != epoch {
                return Err(Error::FencedLeaderEpoch {
                    topic: topic.into(),
                    partition,
                    asked: i64::from(epoch),
                    current: st.leader_epoch,
                });
            }
            if st.isr == isr {
                return Ok(isr);
            }
            let old = std::mem::replace(&mut st.isr, isr.clone());
            match zk
                .set_data(&path, &zk::encode(&st), Some(stat.version))
                .await
            {
                Ok(_) => {
                    tracing::info!(topic, partition, epoch, ?old, new = ?isr, "in-sync set changed");
                    return Ok(isr);
                }
                Err(zkc::Error::BadVersion) => continue,
                Err(e) => return Err(zk_err(&format!("write {path}"), e)),
            }
        }
    }

    // ---- leader election (controller) -------------------------------------

    /// Runs a pass over every partition's leader in the background, unless
    /// one is running or this broker is not the controller.
    fn spawn_elect_leaders(self: &Rc<Self>) {
        if self.ctrl.borrow().is_none() || self.electing.replace(true) {
            return;
        }
        let c = self.clone();
        tokio::task::spawn_local(async move {
            let rebalance = c.cc.auto_leader_rebalance
                && c.last_rebalance
                    .get()
                    .is_none_or(|t| t.elapsed() >= REBALANCE_EVERY);
            if rebalance {
                c.last_rebalance.set(Some(Instant::now()));
            }
            if let Err(e) = c.elect_leaders(rebalance).await {
                tracing::warn!(error = %e, "leader election pass failed; retrying");
            }
            c.electing.set(false);
        });
    }

    /// Gives every partition whose leader is gone a new one from its live
    /// in-sync replicas (a new leader epoch), drops dead brokers from
    /// in-sync sets, and (`rebalance`) hands leadership back to preferred
    /// replicas that are in sync.
    async fn elect_leaders(&self, rebalance: bool) -> Result<()> {
        let live: std::collections::BTreeSet<u32> =
            self.view.borrow().brokers.keys().copied().collect();
        let todo: Vec<(String, u32, Vec<u32>, bool)> = self
            .topics
            .borrow()
            .iter()
            .flat_map(|(name, (rec, states))| {
                rec.replicas
                    .iter()
                    .zip(states)
                    .enumerate()
                    .filter_map(|(p, (replicas, st))| {
                        let ids: Vec<u32> = replicas.iter().map(|r| r.broker).collect();
                        next_state(st, &ids, &live, rec.unclean_leader_election, rebalance)
                            .map(|_| (name.clone(), p as u32, ids, rec.unclean_leader_election))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let zk = self.zk()?;
        for (name, p, replicas, unclean) in todo {
            let (version, epoch) = self.fence()?;
            let path = self.layout.partition(&name, p);
            let (bytes, stat) = match zk.get_data(&path).await {
                Ok(x) => x,
                Err(zkc::Error::NoNode) => continue,
                Err(e) => return Err(zk_err(&format!("read {path}"), e)),
            };
            let st: PartitionStateRec = zk::decode(&path, &bytes)?;
            let Some(mut next) = next_state(&st, &replicas, &live, unclean, rebalance) else {
                continue;
            };
            next.controller_epoch = epoch;
            let mut w = zk.new_multi_writer();
            let add = |r: std::result::Result<(), zkc::Error>| {
                r.map_err(|e| zk_err("prepare a leader change", e))
            };
            add(w.add_check_version(&self.layout.controller_epoch(), version))?;
            add(w.add_set_data(&path, &zk::encode(&next), Some(stat.version)))?;
            match w.commit().await {
                Ok(_) => {
                    let unclean_pick = next.leader.is_some_and(|l| !st.isr.contains(&l));
                    tracing::info!(topic = %name, partition = p, old_leader = ?st.leader, leader = ?next.leader, epoch = next.leader_epoch, isr = ?next.isr, unclean = unclean_pick, "partition leadership");
                }
                Err(zkc::MultiWriteError::OperationFailed {
                    source: zkc::Error::BadVersion,
                    index: 1,
                }) => {
                    tracing::debug!(topic = %name, partition = p, "partition state moved meanwhile; next pass");
                }
                Err(zkc::MultiWriteError::OperationFailed { source, .. })
                | Err(zkc::MultiWriteError::RequestFailed { source }) => {
                    return Err(self.write_failed("change a partition's leader", source))
                }
            }
        }
        Ok(())
    }

    /// Runs a controller request here if this broker is the controller,
    /// else on the controller over the link.
    async fn forward(self: &Rc<Self>, req: PeerRequest) -> Result<()> {
        let controller = self.view.borrow().controller.map(|c| c.0);
        match controller {
            Some(c) if c == self.cc.broker_id => self.serve_peer(c, req).await,
            Some(c) => self.links()?.request(c, req, APPLY_WAIT * 2).await,
            None => Err(Error::ClusterUnavailable(
                "the cluster has no controller right now; retry".into(),
            )),
        }
    }

    async fn serve_peer(self: &Rc<Self>, from: u32, req: PeerRequest) -> Result<()> {
        tracing::debug!(from, ?req, "cluster request");
        match req {
            PeerRequest::CreateTopic(spec) => self.create_topic(spec).await,
            PeerRequest::DeleteTopic(name) => self.delete_topic(name).await,
            PeerRequest::ApplyTopic(name) => {
                // The controller wrote through another ZooKeeper server,
                // maybe: catch up with the leader before reading.
                let zk = self.zk()?;
                zk.sync(&self.layout.topics())
                    .await
                    .map_err(|e| zk_err("sync with ZooKeeper", e))?;
                self.refresh_topic(&name).await
            }
        }
    }
}

/// The partition state the controller should write, if any: a live leader
/// from the in-sync set when the leader is gone (unclean: any live replica,
/// when the topic allows it and no in-sync one lives), dead brokers out of
/// the in-sync set, and (`rebalance`) the preferred replica back in the
/// lead once it is in sync. Every change of leader bumps the epoch. With no
/// live in-sync replica the set is kept as it was, so one of its members
/// can take over when it returns.
pub(crate) fn next_state(
    st: &PartitionStateRec,
    replicas: &[u32],
    live: &std::collections::BTreeSet<u32>,
    unclean: bool,
    rebalance: bool,
) -> Option<PartitionStateRec> {
    let live_isr: Vec<u32> = st
        .isr
        .iter()
        .copied()
        .filter(|b| live.contains(b))
        .collect();
    let mut next = st.clone();
    match st.leader.filter(|l| live.contains(l)) {
        Some(leader) => {
            if live_isr.len() != st.isr.len() {
                next.isr = live_isr.clone();
            }
            if let Some(&preferred) = replicas.first() {
                if rebalance && preferred != leader && live_isr.contains(&preferred) {
                    next.leader = Some(preferred);
                    next.leader_epoch += 1;
                }
            }
        }
        None => {
            let clean = replicas.iter().copied().find(|r| live_isr.contains(r));
            if let Some(c) = clean {
                next.leader = Some(c);
                next.isr = live_isr;
                next.leader_epoch += 1;
            } else if let Some(c) = replicas
                .iter()
                .copied()
                .find(|r| unclean && live.contains(r))
            {
                next.leader = Some(c);
                next.isr = vec![c];
                next.leader_epoch += 1;
            } else if st.leader.is_some() {
                next.leader = None;
                next.leader_epoch += 1;
            }
        }
    }
    (next != *st).then_some(next)
}

#[cfg(test)]
mod election_tests {
    use super::*;
    use std::collections::BTreeSet;

    fn st(leader: Option<u32>, epoch: u32, isr: &[u32]) -> PartitionStateRec {
        PartitionStateRec {
            leader,
            leader_epoch: epoch,
            isr: isr.to_vec(),
            controller_epoch: 1,
        }
    }

    fn live(b: &[u32]) -> BTreeSet<u32> {
        b.iter().copied().collect()
    }

    #[test]
    fn a_dead_leader_is_replaced_from_the_isr_with_a_new_epoch() {
        let n = next_state(
            &st(Some(1), 4, &[1, 2, 3]),
            &[1, 2, 3],
            &live(&[2, 3]),
            false,
            false,
        )
        .expect("a change");
        assert_eq!(n.leader, Some(2));
        assert_eq!(n.leader_epoch, 5);
        assert_eq!(n.isr, vec![2, 3]);
    }

    #[test]
    fn only_in_sync_replicas_are_elected_unless_unclean() {
        // Broker 3 is alive but out of sync; 1 and 2 are dead.
        let s = st(Some(1), 4, &[1, 2]);
        let n = next_state(&s, &[1, 2, 3], &live(&[3]), false, false).expect("offline");
        assert_eq!(n.leader, None);
        assert_eq!(n.isr, vec![1, 2], "the set is kept for when one returns");
        assert_eq!(n.leader_epoch, 5);
        // Offline already: nothing more to write.
        assert_eq!(next_state(&n, &[1, 2, 3], &live(&[3]), false, false), None);
        // Broker 2 comes back: it leads.
        let m = next_state(&n, &[1, 2, 3], &live(&[2, 3]), false, false).expect("back");
        assert_eq!(
            (m.leader, m.leader_epoch, m.isr.clone()),
            (Some(2), 6, vec![2])
        );
        // Unclean allowed: 3 leads at once.
        let u = next_state(&s, &[1, 2, 3], &live(&[3]), true, false).expect("unclean");
        assert_eq!((u.leader, u.isr.clone()), (Some(3), vec![3]));
    }

    #[test]
    fn dead_followers_leave_the_isr_without_a_new_epoch() {
        let n = next_state(
            &st(Some(1), 2, &[1, 2, 3]),
            &[1, 2, 3],
            &live(&[1, 2]),
            false,
            false,
        )
        .expect("a change");
        assert_eq!(
            (n.leader, n.leader_epoch, n.isr.clone()),
            (Some(1), 2, vec![1, 2])
        );
        assert_eq!(
            next_state(&n, &[1, 2, 3], &live(&[1, 2]), false, false),
            None
        );
    }

    #[test]
    fn leadership_returns_to_the_preferred_replica_once_in_sync() {
        let s = st(Some(2), 5, &[2, 3]);
        assert_eq!(
            next_state(&s, &[1, 2, 3], &live(&[1, 2, 3]), false, true),
            None,
            "1 not in sync yet"
        );
        let s = st(Some(2), 5, &[2, 3, 1]);
        assert_eq!(
            next_state(&s, &[1, 2, 3], &live(&[1, 2, 3]), false, false),
            None,
            "rebalance off"
        );
        let n = next_state(&s, &[1, 2, 3], &live(&[1, 2, 3]), false, true).expect("back to 1");
        assert_eq!((n.leader, n.leader_epoch), (Some(1), 6));
    }
}
