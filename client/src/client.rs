//! The entry point: discovery (a bootstrap list, ZooKeeper, the disk
//! cache), cached cluster metadata, routing of each partition's requests
//! straight to its leader's owning shard (L2), and the admin operations.
//!
//! Routing: metadata maps every partition to its leader broker and the
//! shard that owns it there; the client sends the partition's requests to
//! that broker's port of that shard, never through another broker. A
//! broker that does not lead the partition answers `NotLeader`, usually
//! naming the leader: the client goes there at once and refreshes its
//! metadata in the background. With no leader named, no leader at all
//! (`LeaderNotAvailable`) or a dead connection, it forgets the topic's
//! placement, backs off and asks again. Metadata and admin requests go to
//! any live broker (brokers forward to the controller); one that cannot
//! be reached is skipped for the next.

use crate::connection::{Connection, Frame};
use crate::discovery::{self, Bootstrap, BrokerAddr, CacheFile, DiscoveryCache};
use crate::error::{Error, LeaderHint, Result};
use crate::retry::{Retrier, RetryPolicy};
use shoal_wire::{fb, ErrorCode};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One partition as metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: u32,
    /// The broker that leads it (on a single node, that node).
    pub leader_broker: u32,
    /// The shard that owns it on the leader.
    pub shard: u16,
    /// Bumped by every change of leader.
    pub leader_epoch: u32,
    /// The leader's log start and high watermark ([`Client::describe_topic`]
    /// asks each leader; metadata from another broker reports 0).
    pub log_start_offset: u64,
    pub high_watermark: u64,
    /// Brokers holding a replica, preferred leader first (empty on a
    /// single node).
    pub replicas: Vec<u32>,
    /// Replicas in sync with the leader (empty on a single node).
    pub isr: Vec<u32>,
    /// No live leader: produce and fetch fail with `LeaderNotAvailable`.
    pub offline: bool,
}

impl PartitionInfo {
    /// Fewer replicas in sync than there are, or a replica on a broker
    /// that is not live.
    pub fn is_under_replicated(&self, is_live: impl Fn(u32) -> bool) -> bool {
        self.isr.len() < self.replicas.len() || self.replicas.iter().any(|&b| !is_live(b))
    }
}

/// One topic as metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    /// This incarnation of the topic (a topic deleted and created again
    /// under the same name has a new id); 0 from brokers without ids.
    pub topic_id: u64,
    pub partitions: Vec<PartitionInfo>,
    /// Copies of each partition (1 on a single node).
    pub replication_factor: u16,
    pub sync: String,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: u64,
    /// Replicas that must be in sync for an `acks=all` produce (0 from a
    /// single node or brokers that predate the field).
    pub min_insync_replicas: u16,
    /// Whether a replica outside the in-sync set may become leader when
    /// none inside is alive (losing what only the in-sync set had).
    pub unclean_leader_election: bool,
}

/// A live broker as the last metadata described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerInfo {
    pub id: u32,
    pub host: String,
    /// Public port (any shard accepts).
    pub port: u16,
    /// Port of shard `i` at index `i`.
    pub shard_ports: Vec<u16>,
    /// The broker's release (`None` from brokers that predate the field).
    pub version: Option<String>,
    pub rack: Option<String>,
}

/// The cluster as the last metadata described it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterInfo {
    /// `None` on a single node.
    pub name: Option<String>,
    /// The controller's broker id and epoch; `None` while there is none.
    pub controller: Option<(u32, u64)>,
    /// The live brokers, by id.
    pub brokers: Vec<BrokerInfo>,
}

/// Where a client found the broker that first answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoverySource {
    /// An entry of the bootstrap list.
    BootstrapList,
    /// A broker registered in ZooKeeper.
    ZooKeeper,
    /// A broker of the disk cache (ZooKeeper or every bootstrap address
    /// was unreachable).
    Cache(PathBuf),
}

/// Settings of a topic to create.
#[derive(Debug, Clone)]
pub struct NewTopic {
    pub name: String,
    pub partitions: u32,
    /// Copies of each partition, on as many brokers (1 on a single node).
    pub replication_factor: u16,
    /// `always`, `interval:<ms>` or `none`; `None` takes the broker default.
    pub sync: Option<String>,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: Option<u64>,
    /// acks=all needs this many in-sync replicas (`None`: min(2, RF)).
    pub min_insync_replicas: Option<u16>,
    /// Whether a replica outside the in-sync set may lead when no in-sync
    /// one is alive (availability over acknowledged data).
    pub unclean_leader_election: bool,
}

impl NewTopic {
    pub fn new(name: impl Into<String>, partitions: u32) -> NewTopic {
        NewTopic {
            name: name.into(),
            partitions,
            replication_factor: 1,
            sync: None,
            retention_ms: None,
            retention_bytes: None,
            segment_bytes: None,
            min_insync_replicas: None,
            unclean_leader_election: false,
        }
    }
}

/// How a [`Client`] connects.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How long one connect may take before the address counts as
    /// unreachable (and how long a ZooKeeper lookup may take). Default 5 s.
    pub connect_timeout: Duration,
    /// Longest wait before an unreachable port is tried again (the wait
    /// doubles from 100 ms per failure up to this). Meanwhile a shard
    /// port's partitions go through its broker's public port. Default 30 s.
    pub reconnect_backoff_max: Duration,
    /// Where the broker list is kept between runs (Z2); see
    /// [`DiscoveryCache`].
    pub discovery_cache: DiscoveryCache,
    /// How long metadata and admin requests keep trying while no broker
    /// can be reached or the cluster cannot answer (`ClusterUnavailable`,
    /// no controller during a failover). Default 10 s.
    pub admin_retry_max: Duration,
    /// How long a request may go unanswered beyond the time it asks the
    /// broker to hold it (a fetch's `max_wait`, a produce's wait for its
    /// acknowledgement). Past it the connection counts as dead: it is
    /// closed, and the partition's requests on it are retried after a
    /// metadata refresh (a leader that hangs rather than dies). Default
    /// 30 s.
    pub request_timeout: Duration,
    /// Who to authenticate as (SCRAM-SHA-256) on every connection this
    /// client opens, shard ports and reconnects included; `None`: no
    /// authentication (a broker with auth on then refuses every request).
    /// See [`crate::Credentials`] for the environment and file forms.
    pub credentials: Option<crate::Credentials>,
    /// Connect with TLS (every connection, shard ports included), verifying
    /// the brokers with these CAs, presenting a client certificate if one
    /// is set; `None`: plaintext. See [`crate::TlsConfig`].
    pub tls: Option<crate::TlsConfig>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            reconnect_backoff_max: Duration::from_secs(30),
            discovery_cache: DiscoveryCache::Default,
            admin_retry_max: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            credentials: None,
            tls: None,
        }
    }
}

/// First wait before an unreachable port is tried again.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// First and longest wait between admin retries.
const ADMIN_BACKOFF_MIN: Duration = Duration::from_millis(100);
const ADMIN_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A broker with the address its host resolved to.
#[derive(Clone)]
struct Broker {
    info: BrokerInfo,
    ip: IpAddr,
}

impl Broker {
    fn public(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.info.port)
    }
}

/// Where a `NotLeader` answer said the leader is, until metadata at least
/// as new says so too.
#[derive(Clone, Copy)]
struct Hint {
    shard: SocketAddr,
    public: SocketAddr,
    leader_epoch: u32,
}

#[derive(Default)]
struct Cache {
    brokers: BTreeMap<u32, Broker>,
    cluster: String,
    controller: Option<(u32, u64)>,
    topics: HashMap<String, TopicInfo>,
    /// Per topic, per partition.
    hints: HashMap<String, HashMap<u32, Hint>>,
}

/// Where one partition's requests go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route {
    /// The leader's port of the owning shard.
    shard: SocketAddr,
    /// The leader's public port, if the shard port cannot be reached.
    public: SocketAddr,
}

/// An address whose last connect failed.
struct Unreachable {
    failures: u32,
    /// Nobody tries it before then; a retry in flight pushes it forward.
    retry_at: Instant,
}

/// Open connections and what is known about reaching each address. Behind
/// a plain mutex that is never held across an await: one slow connect
/// stalls nobody but its own caller.
#[derive(Default)]
struct Conns {
    open: HashMap<SocketAddr, Arc<Connection>>,
    /// One connect at a time per address.
    connecting: HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>,
    unreachable: HashMap<SocketAddr, Unreachable>,
}

/// What [`Client::partition_connection`] may do with a shard port.
enum ShardPort {
    Open(Arc<Connection>),
    /// Never failed, or the last failure's backoff is over and this caller
    /// claimed the retry.
    Try {
        retry: bool,
    },
    /// Failed recently, or another request is connecting to it.
    Avoid,
}

/// A handle to a Shoal cluster (or single broker). Cheap to share (`Arc`
/// inside).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    /// As the user gave it (it also names the default cache file).
    bootstrap: String,
    client_id: String,
    config: ClientConfig,
    cache_path: Option<PathBuf>,
    source: Mutex<Option<DiscoverySource>>,
    /// Where to look when no broker of the last metadata answers: the
    /// bootstrap list's addresses, ZooKeeper's brokers or the cache's.
    seeds: Mutex<Vec<SocketAddr>>,
    /// The broker that answered the last metadata or admin request.
    preferred: Mutex<Option<SocketAddr>>,
    conns: Mutex<Conns>,
    cache: Mutex<Cache>,
    /// The broker list last written to the disk cache: written again only
    /// when it changes. Held across the write, so writes never interleave.
    cache_written: tokio::sync::Mutex<Option<Vec<BrokerAddr>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn opt(v: i64) -> Option<u64> {
    (v >= 0).then_some(v as u64)
}

fn nonempty(s: Option<&str>) -> Option<String> {
    s.filter(|s| !s.is_empty()).map(str::to_string)
}

pub(crate) fn topic_info(t: fb::TopicInfo<'_>) -> TopicInfo {
    let partitions: Vec<PartitionInfo> = t
        .partitions()
        .map(|ps| {
            ps.iter()
                .map(|p| PartitionInfo {
                    partition: p.partition(),
                    leader_broker: p.leader_broker(),
                    shard: p.shard(),
                    leader_epoch: p.leader_epoch(),
                    log_start_offset: p.log_start_offset(),
                    high_watermark: p.high_watermark(),
                    replicas: p.replicas().map(|v| v.iter().collect()).unwrap_or_default(),
                    isr: p.isr().map(|v| v.iter().collect()).unwrap_or_default(),
                    offline: p.offline(),
                })
                .collect()
        })
        .unwrap_or_default();
    TopicInfo {
        name: t.name().unwrap_or("").to_string(),
        topic_id: t.topic_id(),
        replication_factor: t.replication_factor().max(1),
        partitions,
        sync: t.sync().unwrap_or("").to_string(),
        retention_ms: opt(t.retention_ms()),
        retention_bytes: opt(t.retention_bytes()),
        segment_bytes: t.segment_bytes().max(0) as u64,
        min_insync_replicas: t.min_insync_replicas(),
        unclean_leader_election: t.unclean_leader_election(),
    }
}

/// The addresses `host:port` names (DNS for names), or the error.
async fn resolve(host_port: &str) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(host_port)
        .await
        .map_err(|e| Error::Invalid(format!("bad broker address {host_port:?}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(Error::Invalid(format!(
            "broker address {host_port:?} resolves to nothing"
        )));
    }
    crate::tls::remember_host(host_port, &addrs);
    Ok(addrs)
}

/// Resolves discovered brokers, in order; ones that do not resolve are
/// reported in `tried` and skipped.
async fn resolve_all(brokers: &[BrokerAddr], tried: &mut Vec<String>) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for b in brokers {
        match resolve(&b.host_port()).await {
            Ok(a) => out.extend(a.into_iter().take(1)),
            Err(e) => tried.push(e.to_string()),
        }
    }
    out
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Client {
    /// Connects to a Shoal cluster and loads metadata. `bootstrap` is
    /// `host:port`, a list `host:port,host:port,...` (tried in order), or
    /// `zk://host:port[,host:port][/chroot][?cluster=NAME]` (a live broker
    /// picked at random from ZooKeeper). When none of those answers, the
    /// brokers in the discovery cache are tried (see
    /// [`ClientConfig::discovery_cache`]).
    pub async fn connect(bootstrap: &str) -> Result<Client> {
        Client::connect_with_config(bootstrap, ClientConfig::default()).await
    }

    /// [`Client::connect`] with settings.
    pub async fn connect_with_config(bootstrap: &str, config: ClientConfig) -> Result<Client> {
        let bootstrap = bootstrap.trim();
        let boot = discovery::parse_bootstrap(bootstrap)?;
        let cache_path = config.discovery_cache.resolve(bootstrap);
        let client = Client {
            inner: Arc::new(Inner {
                bootstrap: bootstrap.to_string(),
                client_id: format!("shoal-client-{}", std::process::id()),
                config,
                cache_path,
                source: Mutex::new(None),
                seeds: Mutex::new(Vec::new()),
                preferred: Mutex::new(None),
                conns: Mutex::new(Conns::default()),
                cache: Mutex::new(Cache::default()),
                cache_written: tokio::sync::Mutex::new(None),
            }),
        };
        let mut tried = Vec::new();
        let (seeds, source) = match &boot {
            Bootstrap::Brokers(list) => {
                let mut seeds = Vec::new();
                for entry in list {
                    match resolve(entry).await {
                        // One address per entry: the list's order is the
                        // order of preference.
                        Ok(a) => seeds.extend(a.into_iter().take(1)),
                        Err(e) => tried.push(e.to_string()),
                    }
                }
                (seeds, DiscoverySource::BootstrapList)
            }
            Bootstrap::ZooKeeper(target) => {
                let timeout = client.inner.config.connect_timeout;
                match discovery::zookeeper_brokers(target, timeout).await {
                    Ok(brokers) => {
                        let mut seeds = resolve_all(&brokers, &mut tried).await;
                        // Spread clients over the brokers (seed 003).
                        use rand::seq::SliceRandom;
                        seeds.shuffle(&mut rand::thread_rng());
                        (seeds, DiscoverySource::ZooKeeper)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ZooKeeper discovery failed");
                        tried.push(e.to_string());
                        (Vec::new(), DiscoverySource::ZooKeeper)
                    }
                }
            }
        };
        *lock(&client.inner.seeds) = seeds.clone();
        match client.first_metadata(&seeds, &mut tried).await {
            Ok(()) => {
                *lock(&client.inner.source) = Some(source);
                return Ok(client);
            }
            Err(e) if !e.is_retriable() => return Err(e),
            Err(_) => {}
        }
        if let Some(path) = client.inner.cache_path.clone() {
            match discovery::read_cache(&path) {
                Some(cached) => {
                    tracing::warn!(
                        bootstrap,
                        cache = %path.display(),
                        brokers = cached.brokers.len(),
                        "no broker reachable from the bootstrap; starting from the discovery cache"
                    );
                    let addrs = resolve_all(&cached.brokers, &mut tried).await;
                    lock(&client.inner.seeds).extend(addrs.iter().copied());
                    match client.first_metadata(&addrs, &mut tried).await {
                        Ok(()) => {
                            *lock(&client.inner.source) = Some(DiscoverySource::Cache(path));
                            return Ok(client);
                        }
                        Err(e) if !e.is_retriable() => return Err(e),
                        Err(_) => {}
                    }
                }
                None => tried.push(format!("no usable discovery cache at {}", path.display())),
            }
        }
        Err(Error::Discovery(format!(
            "no broker reachable from {bootstrap}: {}",
            if tried.is_empty() {
                "no address to try".to_string()
            } else {
                tried.join("; ")
            }
        )))
    }

    /// Loads metadata from the first of `addrs` that answers. Failures are
    /// added to `tried`; a non-retriable one (the broker answered, with an
    /// error) ends the search.
    async fn first_metadata(&self, addrs: &[SocketAddr], tried: &mut Vec<String>) -> Result<()> {
        let mut last = Error::Discovery("no address to try".into());
        for &addr in addrs {
            let r = match self.connection(addr).await {
                Ok(conn) => self.metadata_on(&conn, None).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {
                    *lock(&self.inner.preferred) = Some(addr);
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "bootstrap address failed");
                    tried.push(e.to_string());
                    if !e.is_retriable() {
                        return Err(e);
                    }
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Where the broker that first answered was found.
    pub fn discovery_source(&self) -> Option<DiscoverySource> {
        lock(&self.inner.source).clone()
    }

    /// The disk cache file this client reads and writes (`None`: off).
    pub fn discovery_cache_path(&self) -> Option<PathBuf> {
        self.inner.cache_path.clone()
    }

    /// A live connection to `addr`, reusing one if open. Concurrent calls
    /// for one address share one connect, bounded by `connect_timeout`.
    pub async fn connection(&self, addr: SocketAddr) -> Result<Arc<Connection>> {
        if let Some(c) = self.open_connection(addr) {
            return Ok(c);
        }
        let gate = self.gate(addr);
        let _connecting = gate.lock().await;
        self.connect_now(addr).await
    }

    fn open_connection(&self, addr: SocketAddr) -> Option<Arc<Connection>> {
        let conns = lock(&self.inner.conns);
        conns.open.get(&addr).filter(|c| !c.is_closed()).cloned()
    }

    fn gate(&self, addr: SocketAddr) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.inner.conns)
            .connecting
            .entry(addr)
            .or_default()
            .clone()
    }

    fn backoff(&self, failures: u32) -> Duration {
        RECONNECT_BACKOFF_MIN
            .saturating_mul(1 << failures.saturating_sub(1).min(16))
            .min(self.inner.config.reconnect_backoff_max)
    }

    /// Connects to `addr` unless a connection opened meanwhile; the caller
    /// holds the address' gate. Remembers a failure, forgets it on success.
    async fn connect_now(&self, addr: SocketAddr) -> Result<Arc<Connection>> {
        if let Some(c) = self.open_connection(addr) {
            return Ok(c);
        }
        let timeout = self.inner.config.connect_timeout;
        let open = async {
            let tls = self.inner.config.tls.as_ref();
            let c = Connection::connect_with(addr, &self.inner.client_id, tls).await?;
            if let Some(creds) = &self.inner.config.credentials {
                c.authenticate(creds).await?;
            }
            Ok::<_, Error>(c)
        };
        let r = match tokio::time::timeout(timeout, open).await {
            Ok(r) => r,
            Err(_) => Err(Error::Connect {
                addr: addr.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {timeout:?}"),
                ),
            }),
        };
        let mut conns = lock(&self.inner.conns);
        match r {
            Ok(c) => {
                conns.unreachable.remove(&addr);
                conns.open.insert(addr, c.clone());
                Ok(c)
            }
            Err(e) => {
                let failures = conns.unreachable.get(&addr).map_or(0, |u| u.failures) + 1;
                conns.unreachable.insert(
                    addr,
                    Unreachable {
                        failures,
                        retry_at: Instant::now() + self.backoff(failures),
                    },
                );
                Err(e)
            }
        }
    }

    fn in_backoff(&self, addr: SocketAddr) -> bool {
        lock(&self.inner.conns)
            .unreachable
            .get(&addr)
            .is_some_and(|u| Instant::now() < u.retry_at)
    }

    /// Brokers to try for metadata and admin requests, best first: the one
    /// that answered last, the live brokers of the last metadata, then the
    /// bootstrap's (or cache's) addresses.
    fn candidates(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        out.extend(*lock(&self.inner.preferred));
        out.extend(lock(&self.inner.cache).brokers.values().map(Broker::public));
        out.extend(lock(&self.inner.seeds).iter().copied());
        let mut seen = std::collections::HashSet::new();
        out.retain(|a| seen.insert(*a));
        out
    }

    /// A connection to any live broker (for metadata and admin requests),
    /// trying each known broker in turn; ones that failed recently go last.
    pub async fn any_connection(&self) -> Result<Arc<Connection>> {
        let candidates = self.candidates();
        for &a in &candidates {
            if let Some(c) = self.open_connection(a) {
                return Ok(c);
            }
        }
        let (fresh, failed): (Vec<SocketAddr>, Vec<SocketAddr>) =
            candidates.iter().partition(|a| !self.in_backoff(**a));
        let mut errors = Vec::new();
        for a in fresh.into_iter().chain(failed) {
            match self.connection(a).await {
                Ok(c) => {
                    *lock(&self.inner.preferred) = Some(a);
                    return Ok(c);
                }
                Err(e) => errors.push(e),
            }
        }
        match errors.len() {
            0 => Err(Error::Discovery("no broker known".into())),
            1 => Err(errors.remove(0)),
            _ => Err(Error::Discovery(format!(
                "no broker reachable: {}",
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ))),
        }
    }

    /// Kept for callers of the single-broker client: a connection to any
    /// live broker ([`Client::any_connection`]).
    pub async fn bootstrap(&self) -> Result<Arc<Connection>> {
        self.any_connection().await
    }

    /// Runs `f` on a connection to any live broker. Moves on to another
    /// broker when one cannot be reached (or, for an `idempotent` request,
    /// drops the connection mid-request), and waits out a cluster that
    /// cannot answer now, both within `admin_retry_max`.
    pub(crate) async fn admin<T, F, Fut>(&self, idempotent: bool, mut f: F) -> Result<T>
    where
        F: FnMut(Arc<Connection>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let deadline = Instant::now() + self.inner.config.admin_retry_max;
        let mut backoff = ADMIN_BACKOFF_MIN;
        loop {
            let r = match self.any_connection().await {
                Ok(conn) => {
                    let addr = conn.addr;
                    // A broker that hangs must not hold up a metadata
                    // refresh in the middle of a failover.
                    let r = self.within(conn.clone(), Duration::ZERO, f(conn)).await;
                    if matches!(r, Err(Error::Closed | Error::Io(_))) {
                        // Try the others first next time.
                        let mut preferred = lock(&self.inner.preferred);
                        if *preferred == Some(addr) {
                            *preferred = None;
                        }
                    }
                    r
                }
                Err(e) => Err(e),
            };
            let e = match r {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let again = match &e {
                Error::Connect { .. } | Error::Discovery(_) => true,
                Error::Closed | Error::Io(_) => idempotent,
                Error::Broker { code, .. } => matches!(
                    code,
                    ErrorCode::ClusterUnavailable | ErrorCode::LeaderNotAvailable
                ),
                _ => false,
            };
            if !again || Instant::now() + backoff > deadline {
                return Err(e);
            }
            tracing::debug!(error = %e, "admin request failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(ADMIN_BACKOFF_MAX);
        }
    }

    /// Reloads brokers, shard ports and topics.
    pub async fn refresh_metadata(&self) -> Result<()> {
        self.refresh_metadata_of(None).await
    }

    /// Reloads brokers and the named topics only (all if `None`): with
    /// thousands of topics, learning one must not cost a description of
    /// every partition.
    pub async fn refresh_metadata_of(&self, topics: Option<&[&str]>) -> Result<()> {
        self.admin(
            true,
            |conn| async move { self.metadata_on(&conn, topics).await },
        )
        .await
    }

    /// One metadata request over `conn`, applied to the cache.
    async fn metadata_on(&self, conn: &Connection, topics: Option<&[&str]>) -> Result<()> {
        let r = conn
            .request(
                fb::RequestBody::MetadataRequest,
                |fbb| {
                    let names = topics.map(|ts| {
                        let v: Vec<_> = ts.iter().map(|t| fbb.create_string(t)).collect();
                        fbb.create_vector(&v)
                    });
                    fb::MetadataRequest::create(fbb, &fb::MetadataRequestArgs { topics: names })
                        .as_union_value()
                },
                &[],
            )
            .await;
        let frame = match (r, topics) {
            (Ok(f), _) => f,
            (Err(e), Some(ts)) => {
                // An unknown topic among them: forget what was cached.
                if e.code() == Some(ErrorCode::UnknownTopic) {
                    let mut cache = lock(&self.inner.cache);
                    for t in ts {
                        cache.topics.remove(*t);
                        cache.hints.remove(*t);
                    }
                }
                return Err(e);
            }
            (Err(e), None) => return Err(e),
        };
        self.apply_metadata(&frame, conn.addr, topics.is_none())
            .await
    }

    async fn apply_metadata(
        &self,
        frame: &Frame,
        from: SocketAddr,
        all_topics: bool,
    ) -> Result<()> {
        // Brokers first, resolved outside the lock (names may need DNS).
        let listed: Vec<BrokerInfo> = {
            let resp = frame.response();
            let m = resp
                .body_as_metadata_response()
                .ok_or_else(|| Error::Protocol("expected a metadata response".into()))?;
            m.brokers()
                .into_iter()
                .flatten()
                .map(|b| BrokerInfo {
                    id: b.id(),
                    host: b.host().unwrap_or("").to_string(),
                    port: b.port(),
                    shard_ports: b
                        .shard_ports()
                        .map(|p| p.iter().collect())
                        .unwrap_or_default(),
                    version: nonempty(b.version()),
                    rack: nonempty(b.rack()),
                })
                .collect()
        };
        let mut brokers = BTreeMap::new();
        for info in listed {
            let ip = match info.host.parse::<IpAddr>() {
                // A broker listening on every address: reach it the way
                // this answer came.
                Ok(ip) if ip.is_unspecified() => from.ip(),
                Ok(ip) => ip,
                Err(_) if info.host.is_empty() => from.ip(),
                Err(_) => match resolve(&format!("{}:{}", info.host, info.port)).await {
                    Ok(a) => a[0].ip(),
                    Err(e) => {
                        tracing::warn!(broker = info.id, error = %e, "cannot resolve a broker's host; skipping it");
                        continue;
                    }
                },
            };
            brokers.insert(info.id, Broker { info, ip });
        }
        let resp = frame.response();
        let m = resp
            .body_as_metadata_response()
            .ok_or_else(|| Error::Protocol("expected a metadata response".into()))?;
        let fresh: Vec<TopicInfo> = m.topics().into_iter().flatten().map(topic_info).collect();
        let addrs: Vec<BrokerAddr> = brokers
            .values()
            .map(|b| BrokerAddr {
                id: Some(b.info.id),
                host: if b
                    .info
                    .host
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| !ip.is_unspecified())
                {
                    b.info.host.clone()
                } else if b.info.host.is_empty() || b.info.host.parse::<IpAddr>().is_ok() {
                    b.ip.to_string()
                } else {
                    b.info.host.clone()
                },
                port: b.info.port,
                shard_ports: b.info.shard_ports.clone(),
                rack: b.info.rack.clone(),
            })
            .collect();
        let cluster = m.cluster().unwrap_or("").to_string();
        {
            let mut cache = lock(&self.inner.cache);
            cache.brokers = brokers;
            cache.cluster = cluster.clone();
            cache.controller = u32::try_from(m.controller_id())
                .ok()
                .map(|id| (id, m.controller_epoch()));
            for t in &fresh {
                // A hint stands until metadata knows of its leader epoch.
                if let Some(hints) = cache.hints.get_mut(&t.name) {
                    hints.retain(|p, h| {
                        t.partitions
                            .get(*p as usize)
                            .is_some_and(|p| p.leader_epoch < h.leader_epoch)
                    });
                }
            }
            if all_topics {
                cache.topics = fresh.into_iter().map(|t| (t.name.clone(), t)).collect();
                let Cache { hints, topics, .. } = &mut *cache;
                hints.retain(|t, h| !h.is_empty() && topics.contains_key(t));
            } else {
                cache
                    .topics
                    .extend(fresh.into_iter().map(|t| (t.name.clone(), t)));
            }
        }
        self.write_discovery_cache(cluster, addrs).await;
        Ok(())
    }

    /// Writes the live brokers to the disk cache if they changed since this
    /// client last wrote them. A failure is logged, never returned: the
    /// cache only helps a later start.
    async fn write_discovery_cache(&self, cluster: String, brokers: Vec<BrokerAddr>) {
        let Some(path) = self.inner.cache_path.clone() else {
            return;
        };
        if brokers.is_empty() {
            return;
        }
        let mut written = self.inner.cache_written.lock().await;
        if written.as_ref() == Some(&brokers) {
            return;
        }
        let file = CacheFile {
            format: discovery::CACHE_FORMAT,
            bootstrap: self.inner.bootstrap.clone(),
            cluster,
            written_ms: now_ms(),
            brokers: brokers.clone(),
        };
        let p = path.clone();
        let r = tokio::task::spawn_blocking(move || discovery::write_cache(&p, &file))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match r {
            Ok(()) => *written = Some(brokers),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the discovery cache")
            }
        }
    }

    /// Cached topic metadata, refreshed once if the topic is not known.
    pub async fn topic(&self, name: &str) -> Result<TopicInfo> {
        if let Some(t) = lock(&self.inner.cache).topics.get(name).cloned() {
            return Ok(t);
        }
        self.refresh_metadata_of(Some(&[name])).await?;
        lock(&self.inner.cache)
            .topics
            .get(name)
            .cloned()
            .ok_or_else(|| unknown_topic(name))
    }

    /// The release of the broker that answered metadata last (`None` from
    /// brokers that predate the field).
    pub fn broker_version(&self) -> Option<String> {
        let preferred = *lock(&self.inner.preferred);
        let cache = lock(&self.inner.cache);
        cache
            .brokers
            .values()
            .find(|b| Some(b.public()) == preferred)
            .or_else(|| cache.brokers.values().next())
            .and_then(|b| b.info.version.clone())
    }

    /// The live brokers of the last metadata, by id.
    pub fn brokers(&self) -> Vec<BrokerInfo> {
        lock(&self.inner.cache)
            .brokers
            .values()
            .map(|b| b.info.clone())
            .collect()
    }

    /// The cluster's name from the last metadata (`None` on a single node).
    pub fn cluster_name(&self) -> Option<String> {
        nonempty(Some(&lock(&self.inner.cache).cluster))
    }

    /// The controller's broker id and epoch from the last metadata.
    pub fn controller(&self) -> Option<(u32, u64)> {
        lock(&self.inner.cache).controller
    }

    /// Name, controller and live brokers from the last metadata.
    pub fn cluster(&self) -> ClusterInfo {
        let cache = lock(&self.inner.cache);
        ClusterInfo {
            name: nonempty(Some(&cache.cluster)),
            controller: cache.controller,
            brokers: cache.brokers.values().map(|b| b.info.clone()).collect(),
        }
    }

    /// How many partitions `topic` has, if its metadata is cached.
    pub(crate) fn cached_partition_count(&self, topic: &str) -> Option<u32> {
        lock(&self.inner.cache)
            .topics
            .get(topic)
            .map(|t| t.partitions.len() as u32)
    }

    /// How many partitions `topic` has (cached; no allocation on a hit).
    pub async fn partition_count(&self, topic: &str) -> Result<u32> {
        if let Some(t) = lock(&self.inner.cache).topics.get(topic) {
            return Ok(t.partitions.len() as u32);
        }
        Ok(self.topic(topic).await?.partitions.len() as u32)
    }

    /// The address of the leader's shard that owns `topic`/`partition`
    /// (L2: requests go straight to it, no hop between brokers or cores).
    /// Looked up in place: nothing is cloned per request.
    pub async fn partition_addr(&self, topic: &str, partition: u32) -> Result<SocketAddr> {
        Ok(self.route(topic, partition).await?.shard)
    }

    async fn route(&self, topic: &str, partition: u32) -> Result<Route> {
        match self.cached_route(topic, partition) {
            Some(Ok(r)) => return Ok(r),
            // Leaderless as far as the cache knows: perhaps no longer.
            Some(Err(e)) if e.code() != Some(ErrorCode::LeaderNotAvailable) => return Err(e),
            _ => {}
        }
        self.refresh_metadata_of(Some(&[topic])).await?;
        self.cached_route(topic, partition)
            .unwrap_or_else(|| Err(unknown_topic(topic)))
    }

    /// `None` if the topic is not in the cache.
    fn cached_route(&self, topic: &str, partition: u32) -> Option<Result<Route>> {
        let cache = lock(&self.inner.cache);
        let t = cache.topics.get(topic)?;
        let Some(p) = t.partitions.get(partition as usize) else {
            return Some(Err(Error::Broker {
                code: ErrorCode::UnknownPartition,
                message: format!("topic {topic:?} has no partition {partition}"),
            }));
        };
        if let Some(h) = cache.hints.get(topic).and_then(|h| h.get(&partition)) {
            return Some(Ok(Route {
                shard: h.shard,
                public: h.public,
            }));
        }
        let leaderless = |why: String| {
            Some(Err(Error::Broker {
                code: ErrorCode::LeaderNotAvailable,
                message: format!("{topic}-{partition}: {why}"),
            }))
        };
        if p.offline {
            return leaderless("no live leader".into());
        }
        let Some(b) = cache.brokers.get(&p.leader_broker) else {
            return leaderless(format!(
                "its leader, broker {}, is not among the live brokers",
                p.leader_broker
            ));
        };
        let public = b.public();
        let shard = b
            .info
            .shard_ports
            .get(usize::from(p.shard))
            .map_or(public, |&port| SocketAddr::new(b.ip, port));
        Some(Ok(Route { shard, public }))
    }

    /// The connection for `topic`/`partition`: its leader's port of the
    /// owning shard, or the leader's public port (which serves every
    /// partition it leads) while the shard port cannot be reached. Waits
    /// for a connect only the first time a shard port is tried (bounded by
    /// `connect_timeout`); later attempts after a failure run in the
    /// background, and requests meanwhile use the public port.
    pub async fn partition_connection(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Arc<Connection>> {
        let Route { shard, public } = self.route(topic, partition).await?;
        if shard == public {
            return self.connection(public).await;
        }
        match self.shard_port(shard) {
            ShardPort::Open(c) => Ok(c),
            ShardPort::Avoid => self.connection(public).await,
            ShardPort::Try { retry: true } => {
                let client = self.clone();
                tokio::spawn(async move {
                    let gate = client.gate(shard);
                    let Ok(_connecting) = gate.try_lock() else {
                        return;
                    };
                    if let Err(e) = client.connect_now(shard).await {
                        tracing::debug!(addr = %shard, error = %e, "shard port still unreachable");
                    }
                });
                self.connection(public).await
            }
            ShardPort::Try { retry: false } => {
                let gate = self.gate(shard);
                // Someone else is connecting to it: do not queue behind them.
                let Ok(_connecting) = gate.try_lock() else {
                    return self.connection(public).await;
                };
                match self.connect_now(shard).await {
                    Ok(c) => Ok(c),
                    Err(e) => {
                        tracing::warn!(
                            addr = %shard,
                            error = %e,
                            "shard port unreachable; using the broker's public port"
                        );
                        self.connection(public).await
                    }
                }
            }
        }
    }

    fn shard_port(&self, addr: SocketAddr) -> ShardPort {
        let mut conns = lock(&self.inner.conns);
        if let Some(c) = conns.open.get(&addr).filter(|c| !c.is_closed()) {
            return ShardPort::Open(c.clone());
        }
        let connect_timeout = self.inner.config.connect_timeout;
        match conns.unreachable.get_mut(&addr) {
            None => ShardPort::Try { retry: false },
            Some(u) => {
                let now = Instant::now();
                if now < u.retry_at {
                    return ShardPort::Avoid;
                }
                // Claimed: nobody else retries before this attempt ends.
                u.retry_at = now + connect_timeout;
                ShardPort::Try { retry: true }
            }
        }
    }

    /// Drops all cached placement, so the next call re-learns it.
    pub fn invalidate(&self) {
        let mut cache = lock(&self.inner.cache);
        cache.topics.clear();
        cache.hints.clear();
    }

    /// Drops one topic's cached placement.
    pub fn invalidate_topic(&self, topic: &str) {
        let mut cache = lock(&self.inner.cache);
        cache.topics.remove(topic);
        cache.hints.remove(topic);
    }

    /// Learns from a failed request to `topic`/`partition` (sent to
    /// `failed`, if it got that far) where to send the next one. Returns
    /// true if the next attempt may go at once: a `NotLeader` that named a
    /// leader elsewhere. Otherwise the topic's placement is dropped when
    /// the error says it is wrong or dead, and the caller backs off.
    pub fn reroute(
        &self,
        topic: &str,
        partition: u32,
        failed: Option<SocketAddr>,
        e: &Error,
    ) -> bool {
        if let Error::NotLeader { hint: Some(h), .. } = e {
            if let Some(hint) = self.hint(topic, partition, h, failed) {
                let at_once = Some(hint.shard) != failed;
                lock(&self.inner.cache)
                    .hints
                    .entry(topic.to_string())
                    .or_default()
                    .insert(partition, hint);
                // Catch up with the new placement without holding up the
                // retry.
                let (client, topic) = (self.clone(), topic.to_string());
                tokio::spawn(async move {
                    if let Err(e) = client.refresh_metadata_of(Some(&[&topic])).await {
                        tracing::debug!(error = %e, topic, "metadata refresh after NotLeader failed");
                    }
                });
                return at_once;
            }
        }
        if e.is_routing() {
            self.invalidate_topic(topic);
        }
        false
    }

    /// The route a leader hint names, if it names one newer than the
    /// cached metadata's and its host can be reached.
    fn hint(
        &self,
        topic: &str,
        partition: u32,
        h: &LeaderHint,
        failed: Option<SocketAddr>,
    ) -> Option<Hint> {
        let cache = lock(&self.inner.cache);
        let known = cache
            .topics
            .get(topic)
            .and_then(|t| t.partitions.get(partition as usize));
        if known.is_some_and(|p| h.leader_epoch < p.leader_epoch) {
            return None;
        }
        let broker = h.broker_id.and_then(|id| cache.brokers.get(&id));
        let ip = match h.host.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() => ip,
            _ => broker.map(|b| b.ip).or(failed.map(|a| a.ip()))?,
        };
        let shard = SocketAddr::new(ip, h.port);
        Some(Hint {
            shard,
            public: broker.map_or(shard, Broker::public),
            leader_epoch: h.leader_epoch,
        })
    }

    /// Runs `f` on the connection to `topic`/`partition`'s leader,
    /// retrying a retriable failure as `policy` says (see [`crate::retry`]):
    /// at once when a `NotLeader` named the leader elsewhere, else after a
    /// backoff, with the placement re-learned. `held`: how long the request
    /// asks the broker to hold it before answering.
    pub(crate) async fn with_partition<T, F, Fut>(
        &self,
        topic: &str,
        partition: u32,
        policy: RetryPolicy,
        held: Duration,
        mut f: F,
    ) -> Result<T>
    where
        F: FnMut(Arc<Connection>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut retry = Retrier::new(policy);
        let mut refreshed_unknown = false;
        loop {
            let (r, sent_to) = self.attempt(topic, partition, held, &mut f).await;
            let e = match r {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retriable() => e,
                Err(e) if e.is_unknown_placement() && sent_to.is_some() && !refreshed_unknown => {
                    refreshed_unknown = true;
                    e
                }
                Err(e) => return Err(e),
            };
            let at_once = self.reroute(topic, partition, sent_to, &e);
            match retry.next_wait(at_once) {
                Some(wait) => {
                    tracing::debug!(error = %e, topic, partition, attempt = retry.attempts(), ?wait, "request failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(e),
            }
        }
    }

    /// One attempt of a partition's request: its leader's connection, and
    /// `f` on it within the request timeout. Returns where it was sent, if
    /// it got that far.
    pub(crate) async fn attempt<T, F, Fut>(
        &self,
        topic: &str,
        partition: u32,
        held: Duration,
        f: &mut F,
    ) -> (Result<T>, Option<SocketAddr>)
    where
        F: FnMut(Arc<Connection>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let conn = match self.partition_connection(topic, partition).await {
            Ok(c) => c,
            Err(e) => return (Err(e), None),
        };
        let addr = conn.addr;
        (self.within(conn.clone(), held, f(conn)).await, Some(addr))
    }

    /// Awaits `request` on `conn`, for at most `held` plus the request
    /// timeout. A request unanswered by then closes the connection: what
    /// else is pending on it fails too and is retried elsewhere, rather
    /// than each waiting out its own timeout on a broker that hangs.
    pub(crate) async fn within<T>(
        &self,
        conn: Arc<Connection>,
        held: Duration,
        request: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let limit = held.saturating_add(self.inner.config.request_timeout);
        match tokio::time::timeout(limit, request).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(addr = %conn.addr, ?limit, "no answer in time; closing the connection");
                conn.close();
                Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer from {} within {limit:?}", conn.addr),
                )))
            }
        }
    }

    // ---- admin --------------------------------------------------------------

    pub async fn create_topic(&self, t: &NewTopic) -> Result<()> {
        let to_i = |v: Option<u64>| v.map_or(-1, |v| v as i64);
        // Not retried once sent: a create that did happen would come back
        // as TopicExists.
        self.admin(false, |conn| async move {
            conn.request(
                fb::RequestBody::CreateTopicRequest,
                |fbb| {
                    let name = fbb.create_string(&t.name);
                    let sync = t.sync.as_deref().map(|s| fbb.create_string(s));
                    fb::CreateTopicRequest::create(
                        fbb,
                        &fb::CreateTopicRequestArgs {
                            name: Some(name),
                            partitions: t.partitions,
                            replication_factor: t.replication_factor.max(1),
                            sync,
                            retention_ms: to_i(t.retention_ms),
                            retention_bytes: to_i(t.retention_bytes),
                            segment_bytes: to_i(t.segment_bytes),
                            min_insync_replicas: t
                                .min_insync_replicas
                                .map_or(-1, |m| i16::try_from(m).unwrap_or(i16::MAX)),
                            unclean_leader_election: t.unclean_leader_election,
                        },
                    )
                    .as_union_value()
                },
                &[],
            )
            .await
        })
        .await?;
        self.refresh_metadata_of(Some(&[&t.name])).await
    }

    /// The id of the incarnation of `topic` this client knows (0 if it
    /// knows none or the broker has no ids).
    pub fn cached_topic_id(&self, topic: &str) -> u64 {
        lock(&self.inner.cache)
            .topics
            .get(topic)
            .map_or(0, |t| t.topic_id)
    }

    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        self.admin(false, |conn| async move {
            conn.request(
                fb::RequestBody::DeleteTopicRequest,
                |fbb| {
                    let name = fbb.create_string(name);
                    fb::DeleteTopicRequest::create(
                        fbb,
                        &fb::DeleteTopicRequestArgs { name: Some(name) },
                    )
                    .as_union_value()
                },
                &[],
            )
            .await
        })
        .await?;
        self.invalidate_topic(name);
        Ok(())
    }

    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        self.admin(true, |conn| async move {
            let f: Frame = conn
                .request(
                    fb::RequestBody::ListTopicsRequest,
                    |fbb| {
                        fb::ListTopicsRequest::create(fbb, &fb::ListTopicsRequestArgs {})
                            .as_union_value()
                    },
                    &[],
                )
                .await?;
            let r = f.response();
            let l = r
                .body_as_list_topics_response()
                .ok_or_else(|| Error::Protocol("expected a topic list".into()))?;
            Ok(l.topics()
                .map(|ts| ts.iter().map(topic_info).collect())
                .unwrap_or_default())
        })
        .await
    }

    /// The topic's placement from any broker, with each partition's log
    /// start and high watermark from its leader (only a leader knows its
    /// own): one request per leader broker.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        let (from, mut t) = self
            .admin(true, |conn| async move {
                let t = describe_on(&conn, name).await?;
                Ok((conn.addr, t))
            })
            .await?;
        let leaders: BTreeSet<u32> = t
            .partitions
            .iter()
            .filter(|p| !p.offline)
            .map(|p| p.leader_broker)
            .collect();
        for id in leaders {
            let Some(addr) = lock(&self.inner.cache).brokers.get(&id).map(Broker::public) else {
                continue;
            };
            if addr == from {
                continue;
            }
            let theirs = match self.connection(addr).await {
                Ok(conn) => describe_on(&conn, name).await,
                Err(e) => Err(e),
            };
            match theirs {
                Ok(theirs) => {
                    for (mine, their) in t.partitions.iter_mut().zip(&theirs.partitions) {
                        if mine.leader_broker == id && their.leader_broker == id {
                            mine.log_start_offset = their.log_start_offset;
                            mine.high_watermark = their.high_watermark;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(broker = id, error = %e, "cannot read offsets from a leader")
                }
            }
        }
        Ok(t)
    }

    /// `topic`/`partition`'s log start offset and high watermark, from its
    /// leader: a fetch (which only the leader answers) at the end of the
    /// log, so it reads nothing. Retried through a failover like any
    /// request to the partition.
    pub async fn partition_offsets(&self, topic: &str, partition: u32) -> Result<(u64, u64)> {
        self.partition_offsets_with(
            topic,
            partition,
            RetryPolicy {
                retries: u32::MAX,
                backoff: Duration::from_millis(50),
                backoff_max: Duration::from_secs(1),
                timeout: Duration::from_secs(30),
            },
        )
        .await
    }

    pub(crate) async fn partition_offsets_with(
        &self,
        topic: &str,
        partition: u32,
        policy: RetryPolicy,
    ) -> Result<(u64, u64)> {
        self.with_partition(
            topic,
            partition,
            policy,
            Duration::ZERO,
            |conn| async move { crate::consumer::leader_offsets(&conn, topic, partition).await },
        )
        .await
    }

    /// The counters of the broker that answers, summed over its shards.
    pub async fn metrics(&self) -> Result<Vec<(String, u64)>> {
        self.admin(true, |conn| async move {
            let f = conn
                .request(
                    fb::RequestBody::MetricsRequest,
                    |fbb| {
                        fb::MetricsRequest::create(fbb, &fb::MetricsRequestArgs {}).as_union_value()
                    },
                    &[],
                )
                .await?;
            let r = f.response();
            let m = r
                .body_as_metrics_response()
                .ok_or_else(|| Error::Protocol("expected metrics".into()))?;
            Ok(m.metrics()
                .map(|ms| {
                    ms.iter()
                        .map(|m| (m.name().unwrap_or("").to_string(), m.value()))
                        .collect()
                })
                .unwrap_or_default())
        })
        .await
    }
}

fn unknown_topic(name: &str) -> Error {
    Error::Broker {
        code: ErrorCode::UnknownTopic,
        message: format!("unknown topic {name:?}"),
    }
}

async fn describe_on(conn: &Connection, name: &str) -> Result<TopicInfo> {
    let f = conn
        .request(
            fb::RequestBody::DescribeTopicRequest,
            |fbb| {
                let name = fbb.create_string(name);
                fb::DescribeTopicRequest::create(
                    fbb,
                    &fb::DescribeTopicRequestArgs { name: Some(name) },
                )
                .as_union_value()
            },
            &[],
        )
        .await?;
    let r = f.response();
    r.body_as_describe_topic_response()
        .and_then(|d| d.topic())
        .map(topic_info)
        .ok_or_else(|| Error::Protocol("expected a topic description".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_broker::FakeBroker;

    /// A port whose connects hang: a listener with a full accept queue
    /// that never accepts, so further SYNs go unanswered.
    async fn hanging_port() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>, u16) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(1).expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let mut fill = Vec::new();
        for _ in 0..8 {
            let c = tokio::time::timeout(
                Duration::from_millis(100),
                tokio::net::TcpStream::connect(("127.0.0.1", port)),
            )
            .await;
            match c {
                Ok(Ok(s)) => fill.push(s),
                _ => break,
            }
        }
        (listener, fill, port)
    }

    async fn client(fake: &FakeBroker, connect_timeout: Duration) -> Client {
        Client::connect_with_config(
            &fake.addr_string(),
            ClientConfig {
                connect_timeout,
                reconnect_backoff_max: Duration::from_secs(30),
                ..ClientConfig::default()
            },
        )
        .await
        .expect("connect")
    }

    /// A shard port that cannot be reached costs one bounded connect; the
    /// requests around it, and all after it, go straight to the public port
    /// without waiting.
    #[tokio::test]
    async fn an_unreachable_shard_port_stalls_no_request() {
        let fake = FakeBroker::start(&[("t", 2)]).await;
        let (_listener, _fill, port) = hanging_port().await;
        fake.set_shard_ports(&[port]);
        let timeout = Duration::from_millis(300);
        let c = client(&fake, timeout).await;
        let t0 = Instant::now();
        let first = {
            let c = c.clone();
            tokio::spawn(async move { c.partition_connection("t", 0).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // While the first connect hangs, others do not queue behind it.
        for p in [1, 0, 1] {
            let t = Instant::now();
            let conn = tokio::time::timeout(Duration::from_secs(2), c.partition_connection("t", p))
                .await
                .expect("not stalled")
                .expect("a connection");
            assert_eq!(conn.addr, fake.addr);
            assert!(
                t.elapsed() < Duration::from_millis(100),
                "{:?}",
                t.elapsed()
            );
        }
        let conn = tokio::time::timeout(Duration::from_secs(2), first)
            .await
            .expect("bounded by connect_timeout")
            .expect("task")
            .expect("the public port");
        assert_eq!(conn.addr, fake.addr);
        let waited = t0.elapsed();
        assert!(waited >= timeout && waited < timeout * 3, "{waited:?}");
        // Remembered: no further waits.
        for _ in 0..20 {
            let t = Instant::now();
            c.partition_connection("t", 0).await.expect("a connection");
            assert!(
                t.elapsed() < Duration::from_millis(100),
                "{:?}",
                t.elapsed()
            );
        }
    }

    /// Once the backoff is over the shard port is tried again in the
    /// background, and used when it answers.
    #[tokio::test]
    async fn a_shard_port_that_comes_back_is_used_again() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        fake.set_shard_ports(&[port]);
        let c = client(&fake, Duration::from_secs(1)).await;
        let conn = c.partition_connection("t", 0).await.expect("a connection");
        assert_eq!(conn.addr, fake.addr, "refused: the public port");
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("the port again");
        fake.also_listen(listener);
        let t0 = Instant::now();
        loop {
            let conn = c.partition_connection("t", 0).await.expect("a connection");
            if conn.addr.port() == port {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "never retried");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn the_broker_version_comes_from_metadata() {
        let fake = FakeBroker::start(&[]).await;
        let c = client(&fake, Duration::from_secs(1)).await;
        assert_eq!(
            c.broker_version().as_deref(),
            Some(crate::fake_broker::FAKE_VERSION)
        );
    }
}
