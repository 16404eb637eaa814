//! The entry point: a bootstrap connection, cached metadata, shard-aware
//! routing (L2) and the admin operations.

use crate::connection::{Connection, Frame};
use crate::error::{Error, Result};
use shoal_wire::{fb, ErrorCode};
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};

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

#[derive(Default)]
struct Cache {
    host: Option<String>,
    shard_ports: Vec<u16>,
    topics: HashMap<String, TopicInfo>,
}

/// A handle to a Shoal broker. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    bootstrap: SocketAddr,
    client_id: String,
    conns: tokio::sync::Mutex<HashMap<SocketAddr, Arc<Connection>>>,
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
                conns: tokio::sync::Mutex::new(HashMap::new()),
                cache: Mutex::new(Cache::default()),
            }),
        };
        client.refresh_metadata().await?;
        Ok(client)
    }

    /// A live connection to `addr`, reusing one if open.
    pub async fn connection(&self, addr: SocketAddr) -> Result<Arc<Connection>> {
        let mut conns = self.inner.conns.lock().await;
        if let Some(c) = conns.get(&addr) {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let c = Connection::connect(addr, &self.inner.client_id).await?;
        conns.insert(addr, c.clone());
        Ok(c)
    }

    pub async fn bootstrap(&self) -> Result<Arc<Connection>> {
        self.connection(self.inner.bootstrap).await
    }

    /// Reloads brokers, shard ports and topics.
    pub async fn refresh_metadata(&self) -> Result<()> {
        let conn = self.bootstrap().await?;
        let frame = conn
            .request(
                fb::RequestBody::MetadataRequest,
                |fbb| {
                    fb::MetadataRequest::create(fbb, &fb::MetadataRequestArgs { topics: None })
                        .as_union_value()
                },
                &[],
            )
            .await?;
        let resp = frame.response();
        let m = resp
            .body_as_metadata_response()
            .ok_or_else(|| Error::Protocol("expected a metadata response".into()))?;
        let mut cache = lock(&self.inner.cache);
        if let Some(b) = m.brokers().and_then(|b| b.iter().next()) {
            cache.host = b.host().map(str::to_string);
            cache.shard_ports = b
                .shard_ports()
                .map(|p| p.iter().collect())
                .unwrap_or_default();
        }
        cache.topics = m
            .topics()
            .map(|ts| {
                ts.iter()
                    .map(topic_info)
                    .map(|t| (t.name.clone(), t))
                    .collect()
            })
            .unwrap_or_default();
        Ok(())
    }

    /// Cached topic metadata, refreshed once if the topic is not known.
    pub async fn topic(&self, name: &str) -> Result<TopicInfo> {
        if let Some(t) = lock(&self.inner.cache).topics.get(name).cloned() {
            return Ok(t);
        }
        self.refresh_metadata().await?;
        lock(&self.inner.cache)
            .topics
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Broker {
                code: ErrorCode::UnknownTopic,
                message: format!("unknown topic {name:?}"),
            })
    }

    /// How many partitions `topic` has (cached; no allocation on a hit).
    pub async fn partition_count(&self, topic: &str) -> Result<u32> {
        if let Some(t) = lock(&self.inner.cache).topics.get(topic) {
            return Ok(t.partitions.len() as u32);
        }
        Ok(self.topic(topic).await?.partitions.len() as u32)
    }

    /// The address of the shard that owns `topic`/`partition` (L2: requests
    /// go straight to it, no cross-core hop in the broker).
    pub async fn partition_addr(&self, topic: &str, partition: u32) -> Result<SocketAddr> {
        let t = self.topic(topic).await?;
        let shard = t
            .partitions
            .get(partition as usize)
            .map(|p| p.shard)
            .ok_or_else(|| Error::Broker {
                code: ErrorCode::UnknownPartition,
                message: format!("topic {topic:?} has no partition {partition}"),
            })?;
        let cache = lock(&self.inner.cache);
        let port = cache.shard_ports.get(usize::from(shard)).copied();
        let ip = cache
            .host
            .as_deref()
            .and_then(|h| h.parse().ok())
            .unwrap_or(self.inner.bootstrap.ip());
        Ok(port.map_or(self.inner.bootstrap, |p| SocketAddr::new(ip, p)))
    }

    pub async fn partition_connection(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Arc<Connection>> {
        let addr = self.partition_addr(topic, partition).await?;
        match self.connection(addr).await {
            Ok(c) => Ok(c),
            // The shard port may be unreachable (a proxy, a firewall): the
            // public port serves every partition too.
            Err(_) => self.bootstrap().await,
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
        self.refresh_metadata().await
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
        self.refresh_metadata().await
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
