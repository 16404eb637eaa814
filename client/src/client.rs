//! The entry point: a bootstrap connection, cached metadata, shard-aware
//! routing (L2) and the admin operations.

use crate::connection::{Connection, Frame};
use crate::error::{Error, Result};
use shoal_wire::{fb, ErrorCode};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One partition as metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: u32,
    pub shard: u16,
    pub log_start_offset: u64,
    pub high_watermark: u64,
}

/// One topic as metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    /// This incarnation of the topic (a topic deleted and created again
    /// under the same name has a new id); 0 from brokers without ids.
    pub topic_id: u64,
    pub partitions: Vec<PartitionInfo>,
    pub sync: String,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: u64,
}

/// Settings of a topic to create.
#[derive(Debug, Clone)]
pub struct NewTopic {
    pub name: String,
    pub partitions: u32,
    /// `always`, `interval:<ms>` or `none`; `None` takes the broker default.
    pub sync: Option<String>,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: Option<u64>,
}

impl NewTopic {
    pub fn new(name: impl Into<String>, partitions: u32) -> NewTopic {
        NewTopic {
            name: name.into(),
            partitions,
            sync: None,
            retention_ms: None,
            retention_bytes: None,
            segment_bytes: None,
        }
    }
}

/// How a [`Client`] connects.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How long one connect may take before the address counts as
    /// unreachable. Default 5 s.
    pub connect_timeout: Duration,
    /// Longest wait before an unreachable shard port is tried again (the
    /// wait doubles from 100 ms per failure up to this). Meanwhile its
    /// partitions go through the public port. Default 30 s.
    pub reconnect_backoff_max: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            reconnect_backoff_max: Duration::from_secs(30),
        }
    }
}

/// First wait before an unreachable shard port is tried again.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Cache {
    host_ip: Option<IpAddr>,
    shard_ports: Vec<u16>,
    broker_version: Option<String>,
    topics: HashMap<String, TopicInfo>,
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

/// A handle to a Shoal broker. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    bootstrap: SocketAddr,
    client_id: String,
    config: ClientConfig,
    conns: Mutex<Conns>,
    cache: Mutex<Cache>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn opt(v: i64) -> Option<u64> {
    (v >= 0).then_some(v as u64)
}

pub(crate) fn topic_info(t: fb::TopicInfo<'_>) -> TopicInfo {
    TopicInfo {
        name: t.name().unwrap_or("").to_string(),
        topic_id: t.topic_id(),
        partitions: t
            .partitions()
            .map(|ps| {
                ps.iter()
                    .map(|p| PartitionInfo {
                        partition: p.partition(),
                        shard: p.shard(),
                        log_start_offset: p.log_start_offset(),
                        high_watermark: p.high_watermark(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        sync: t.sync().unwrap_or("").to_string(),
        retention_ms: opt(t.retention_ms()),
        retention_bytes: opt(t.retention_bytes()),
        segment_bytes: t.segment_bytes().max(0) as u64,
    }
}

impl Client {
    /// Connects to the broker at `addr` (`host:port`) and loads metadata.
    pub async fn connect(addr: &str) -> Result<Client> {
        Client::connect_with_config(addr, ClientConfig::default()).await
    }

    /// [`Client::connect`] with settings.
    pub async fn connect_with_config(addr: &str, config: ClientConfig) -> Result<Client> {
        let bootstrap = addr
            .to_socket_addrs()
            .map_err(|e| Error::Invalid(format!("bad broker address {addr:?}: {e}")))?
            .next()
            .ok_or_else(|| {
                Error::Invalid(format!("broker address {addr:?} resolves to nothing"))
            })?;
        let client = Client {
            inner: Arc::new(Inner {
                bootstrap,
                client_id: format!("shoal-client-{}", std::process::id()),
                config,
                conns: Mutex::new(Conns::default()),
                cache: Mutex::new(Cache::default()),
            }),
        };
        client.refresh_metadata().await?;
        Ok(client)
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

    /// Connects to `addr` unless a connection opened meanwhile; the caller
    /// holds the address' gate. Remembers a failure, forgets it on success.
    async fn connect_now(&self, addr: SocketAddr) -> Result<Arc<Connection>> {
        if let Some(c) = self.open_connection(addr) {
            return Ok(c);
        }
        let timeout = self.inner.config.connect_timeout;
        let r =
            match tokio::time::timeout(timeout, Connection::connect(addr, &self.inner.client_id))
                .await
            {
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
                let backoff = RECONNECT_BACKOFF_MIN
                    .saturating_mul(1 << (failures - 1).min(16))
                    .min(self.inner.config.reconnect_backoff_max);
                conns.unreachable.insert(
                    addr,
                    Unreachable {
                        failures,
                        retry_at: Instant::now() + backoff,
                    },
                );
                Err(e)
            }
        }
    }

    pub async fn bootstrap(&self) -> Result<Arc<Connection>> {
        self.connection(self.inner.bootstrap).await
    }

    /// Reloads brokers, shard ports and topics.
    pub async fn refresh_metadata(&self) -> Result<()> {
        self.refresh_metadata_of(None).await
    }

    /// Reloads brokers and the named topics only (all if `None`): with
    /// thousands of topics, learning one must not cost a description of
    /// every partition.
    pub async fn refresh_metadata_of(&self, topics: Option<&[&str]>) -> Result<()> {
        let conn = self.bootstrap().await?;
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
                if matches!(
                    &e,
                    Error::Broker {
                        code: ErrorCode::UnknownTopic,
                        ..
                    }
                ) {
                    let mut cache = lock(&self.inner.cache);
                    for t in ts {
                        cache.topics.remove(*t);
                    }
                }
                return Err(e);
            }
            (Err(e), None) => return Err(e),
        };
        let resp = frame.response();
        let m = resp
            .body_as_metadata_response()
            .ok_or_else(|| Error::Protocol("expected a metadata response".into()))?;
        let mut cache = lock(&self.inner.cache);
        if let Some(b) = m.brokers().and_then(|b| b.iter().next()) {
            cache.host_ip = b.host().and_then(|h| h.parse().ok());
            cache.shard_ports = b
                .shard_ports()
                .map(|p| p.iter().collect())
                .unwrap_or_default();
            cache.broker_version = b.version().map(str::to_string);
        }
        let fresh = m.topics().into_iter().flatten().map(topic_info);
        if topics.is_none() {
            cache.topics = fresh.map(|t| (t.name.clone(), t)).collect();
        } else {
            cache.topics.extend(fresh.map(|t| (t.name.clone(), t)));
        }
        Ok(())
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
            .ok_or_else(|| Error::Broker {
                code: ErrorCode::UnknownTopic,
                message: format!("unknown topic {name:?}"),
            })
    }

    /// The broker's release as its metadata reports it (`None` from brokers
    /// that predate the field).
    pub fn broker_version(&self) -> Option<String> {
        lock(&self.inner.cache).broker_version.clone()
    }

    /// How many partitions `topic` has (cached; no allocation on a hit).
    pub async fn partition_count(&self, topic: &str) -> Result<u32> {
        if let Some(t) = lock(&self.inner.cache).topics.get(topic) {
            return Ok(t.partitions.len() as u32);
        }
        Ok(self.topic(topic).await?.partitions.len() as u32)
    }

    /// The address of the shard that owns `topic`/`partition` (L2: requests
    /// go straight to it, no cross-core hop in the broker). Looked up in
    /// place: nothing is cloned per request.
    pub async fn partition_addr(&self, topic: &str, partition: u32) -> Result<SocketAddr> {
        if let Some(addr) = self.cached_partition_addr(topic, partition) {
            return addr;
        }
        self.refresh_metadata_of(Some(&[topic])).await?;
        self.cached_partition_addr(topic, partition)
            .unwrap_or_else(|| {
                Err(Error::Broker {
                    code: ErrorCode::UnknownTopic,
                    message: format!("unknown topic {topic:?}"),
                })
            })
    }

    /// `None` if the topic is not in the cache.
    fn cached_partition_addr(&self, topic: &str, partition: u32) -> Option<Result<SocketAddr>> {
        let cache = lock(&self.inner.cache);
        let t = cache.topics.get(topic)?;
        let Some(p) = t.partitions.get(partition as usize) else {
            return Some(Err(Error::Broker {
                code: ErrorCode::UnknownPartition,
                message: format!("topic {topic:?} has no partition {partition}"),
            }));
        };
        let port = cache.shard_ports.get(usize::from(p.shard)).copied();
        let ip = cache.host_ip.unwrap_or(self.inner.bootstrap.ip());
        Some(Ok(
            port.map_or(self.inner.bootstrap, |p| SocketAddr::new(ip, p))
        ))
    }

    /// The connection for `topic`/`partition`: its shard's port, or the
    /// public port (which serves every partition) while the shard port
    /// cannot be reached. Waits for a connect only the first time a shard
    /// port is tried (bounded by `connect_timeout`); later attempts after a
    /// failure run in the background, and requests meanwhile use the
    /// public port.
    pub async fn partition_connection(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Arc<Connection>> {
        let addr = self.partition_addr(topic, partition).await?;
        if addr == self.inner.bootstrap {
            return self.bootstrap().await;
        }
        match self.shard_port(addr) {
            ShardPort::Open(c) => Ok(c),
            ShardPort::Avoid => self.bootstrap().await,
            ShardPort::Try { retry: true } => {
                let client = self.clone();
                tokio::spawn(async move {
                    let gate = client.gate(addr);
                    let Ok(_connecting) = gate.try_lock() else {
                        return;
                    };
                    if let Err(e) = client.connect_now(addr).await {
                        tracing::debug!(%addr, error = %e, "shard port still unreachable");
                    }
                });
                self.bootstrap().await
            }
            ShardPort::Try { retry: false } => {
                let gate = self.gate(addr);
                // Someone else is connecting to it: do not queue behind them.
                let Ok(_connecting) = gate.try_lock() else {
                    return self.bootstrap().await;
                };
                match self.connect_now(addr).await {
                    Ok(c) => Ok(c),
                    Err(e) => {
                        tracing::warn!(
                            %addr,
                            error = %e,
                            "shard port unreachable; using the public port"
                        );
                        self.bootstrap().await
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

    /// Drops cached placement after an error, so the next call re-learns it.
    pub fn invalidate(&self) {
        lock(&self.inner.cache).topics.clear();
    }

    // ---- admin --------------------------------------------------------------

    pub async fn create_topic(&self, t: &NewTopic) -> Result<()> {
        let conn = self.bootstrap().await?;
        let to_i = |v: Option<u64>| v.map_or(-1, |v| v as i64);
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
                        replication_factor: 1,
                        sync,
                        retention_ms: to_i(t.retention_ms),
                        retention_bytes: to_i(t.retention_bytes),
                        segment_bytes: to_i(t.segment_bytes),
                    },
                )
                .as_union_value()
            },
            &[],
        )
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
        let conn = self.bootstrap().await?;
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
        .await?;
        lock(&self.inner.cache).topics.remove(name);
        Ok(())
    }

    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        let conn = self.bootstrap().await?;
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
    }

    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        let conn = self.bootstrap().await?;
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

    /// The broker's counters, summed over its shards.
    pub async fn metrics(&self) -> Result<Vec<(String, u64)>> {
        let conn = self.bootstrap().await?;
        let f = conn
            .request(
                fb::RequestBody::MetricsRequest,
                |fbb| fb::MetricsRequest::create(fbb, &fb::MetricsRequestArgs {}).as_union_value(),
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
    }
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
