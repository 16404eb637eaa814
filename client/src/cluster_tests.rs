//! The client against several fake brokers (issue 10): routing to each
//! partition's leader shard, `NotLeader` and `LeaderNotAvailable`
//! handling, bootstrap lists with dead entries, and the disk cache of the
//! broker list.

use crate::discovery::{self, DiscoveryCache};
use crate::fake_broker::{FakeBroker, FakeCluster};
use crate::{
    Client, ClientConfig, Consumer, ConsumerConfig, DiscoverySource, Error, Producer,
    ProducerConfig,
};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A cluster "prod" of fakes with ids 1..=n, controller 1 at epoch 7.
async fn cluster(n: u32) -> (FakeCluster, Vec<FakeBroker>) {
    let c = FakeCluster::new("prod");
    c.with(|v| v.controller = Some((1, 7)));
    let mut fakes = Vec::new();
    for id in 1..=n {
        fakes.push(FakeBroker::start_member(&c, id).await);
    }
    (c, fakes)
}

fn config(cache: DiscoveryCache) -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(2),
        discovery_cache: cache,
        admin_retry_max: Duration::from_secs(2),
        ..ClientConfig::default()
    }
}

async fn connect(bootstrap: &str) -> Client {
    Client::connect_with_config(bootstrap, config(DiscoveryCache::Off))
        .await
        .expect("connect")
}

fn producer(client: Client, retries: u32, backoff: Duration) -> Producer {
    Producer::new(
        client,
        ProducerConfig {
            linger: Duration::ZERO,
            retries,
            retry_backoff: backoff,
            ..ProducerConfig::default()
        },
    )
}

/// A port nothing listens on: connects are refused.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    port
}

/// A fresh path under the temp directory, removed when dropped.
struct TempPath(PathBuf);

impl TempPath {
    fn new(name: &str) -> TempPath {
        let dir = std::env::temp_dir().join(format!(
            "shoal-client-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        TempPath(dir.join("brokers.json"))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(d) = self.0.parent() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A client that knows one broker's address reaches every partition's
/// leader, on that leader's port of the owning shard, and learns the
/// cluster: brokers, name, controller, replicas and ISR.
#[tokio::test]
async fn requests_go_to_each_partitions_leader_shard() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[1, 2]);
    let client = connect(&fakes[0].addr_string()).await;
    let p = producer(client.clone(), 0, Duration::from_millis(10));
    for part in [0, 1, 1] {
        p.send_nowait_to("t", part, None, b"v")
            .await
            .expect("queued")
            .await
            .expect("stored");
    }
    let seen = |f: &FakeBroker| -> Vec<(u32, u16, bool)> {
        f.produces()
            .iter()
            .map(|c| (c.partition, c.port, c.accepted))
            .collect()
    };
    assert_eq!(seen(&fakes[0]), [(0, fakes[0].shard_port(), true)]);
    assert_eq!(
        seen(&fakes[1]),
        [
            (1, fakes[1].shard_port(), true),
            (1, fakes[1].shard_port(), true)
        ]
    );
    let info = client.cluster();
    assert_eq!(info.name.as_deref(), Some("prod"));
    assert_eq!(info.controller, Some((1, 7)));
    let ids: Vec<u32> = info.brokers.iter().map(|b| b.id).collect();
    assert_eq!(ids, [1, 2]);
    assert_eq!(info.brokers[1].port, fakes[1].addr.port());
    assert_eq!(info.brokers[1].rack.as_deref(), Some("rack-2"));
    let t = client.topic("t").await.expect("topic");
    assert_eq!(t.partitions[1].leader_broker, 2);
    assert_eq!(t.partitions[1].replicas, [2, 1]);
    assert_eq!(t.partitions[1].isr, [2, 1]);
    assert!(!t.partitions[1].offline);
}

/// `NotLeader` with a hint: the retry goes to the named leader's shard at
/// once (the backoff is 30 s: waiting for it would fail the test), and
/// later requests keep going there though metadata still names the old
/// leader (the hint's leader epoch is newer).
#[tokio::test]
async fn not_leader_with_a_hint_goes_straight_to_the_leader() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2]);
    c.place("t", 0, |p| {
        p.leader_epoch = 1;
        p.advertised = Some((1, 0));
    });
    c.with(|v| v.stale_metadata = u32::MAX);
    let client = connect(&fakes[0].addr_string()).await;
    let p = producer(client, 1, Duration::from_secs(30));
    for _ in 0..3 {
        let d = p.send_nowait_to("t", 0, None, b"v").await.expect("queued");
        tokio::time::timeout(Duration::from_secs(5), d)
            .await
            .expect("no backoff after a hint")
            .expect("stored at the leader");
    }
    let refused: Vec<bool> = fakes[0].produces().iter().map(|c| c.accepted).collect();
    assert_eq!(refused, [false], "one try at the stale leader, then none");
    let stored: Vec<(u16, bool)> = fakes[1]
        .produces()
        .iter()
        .map(|c| (c.port, c.accepted))
        .collect();
    assert_eq!(stored, [(fakes[1].shard_port(), true); 3]);
}

/// `NotLeader` without a hint: the placement is re-learned and the retry
/// goes to the leader metadata now names.
#[tokio::test]
async fn not_leader_without_a_hint_refreshes_and_retries() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2]);
    c.place("t", 0, |p| {
        p.leader_epoch = 1;
        p.advertised = Some((1, 0));
    });
    c.with(|v| {
        v.hints = false;
        // Only the answer at connect is stale.
        v.stale_metadata = 1;
    });
    let client = connect(&fakes[0].addr_string()).await;
    let p = producer(client, 3, Duration::from_millis(10));
    p.send_nowait_to("t", 0, None, b"v")
        .await
        .expect("queued")
        .await
        .expect("stored after a refresh");
    assert_eq!(fakes[0].produces().len(), 1);
    assert!(!fakes[0].produces()[0].accepted);
    assert_eq!(fakes[1].produces().len(), 1);
    assert!(fakes[1].produces()[0].accepted);
    assert!(fakes[0].metadata_requests() + fakes[1].metadata_requests() >= 2);
}

/// No leader for a while (`LeaderNotAvailable` from metadata): the
/// producer backs off, asks again, and stores once a leader is back.
#[tokio::test]
async fn a_partition_without_a_leader_is_retried_until_it_has_one() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2]);
    c.place("t", 0, |p| p.offline = true);
    let client = connect(&fakes[0].addr_string()).await;
    let p = producer(client, 30, Duration::from_millis(20));
    let t0 = Instant::now();
    let c2 = c.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c2.place("t", 0, |p| p.offline = false);
    });
    p.send_nowait_to("t", 0, None, b"v")
        .await
        .expect("queued")
        .await
        .expect("stored once the leader is back");
    assert!(t0.elapsed() >= Duration::from_millis(250));
    assert_eq!(fakes[1].produces().len(), 1);
    assert!(fakes[0].produces().is_empty());
    // Retries are bounded: with none left the error comes back.
    c.place("t", 0, |p| p.offline = true);
    let client = connect(&fakes[0].addr_string()).await;
    let p = producer(client, 2, Duration::from_millis(5));
    let e = p
        .send_nowait_to("t", 0, None, b"v")
        .await
        .expect("queued")
        .await
        .expect_err("no leader");
    assert_eq!(e.code(), Some(shoal_wire::ErrorCode::LeaderNotAvailable));
}

/// Fetch and subscribe follow `NotLeader` to the leader's shard too.
#[tokio::test]
async fn fetch_and_subscribe_follow_not_leader() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2]);
    c.place("t", 0, |p| {
        p.leader_epoch = 3;
        p.advertised = Some((1, 2));
    });
    c.with(|v| v.stale_metadata = u32::MAX);
    let client = connect(&fakes[0].addr_string()).await;
    let consumer = Consumer::new(
        client,
        ConsumerConfig {
            retries: 1,
            retry_backoff: Duration::from_secs(30),
            ..ConsumerConfig::default()
        },
    );
    let f = tokio::time::timeout(
        Duration::from_secs(5),
        consumer.fetch_once("t", 0, 5, None, 0, Duration::ZERO),
    )
    .await
    .expect("no backoff after a hint")
    .expect("fetched at the leader");
    assert_eq!(f.next_offset, 5);
    assert_eq!(fakes[0].fetches(), [(0, fakes[0].shard_port())]);
    assert_eq!(fakes[1].fetches(), [(0, fakes[1].shard_port())]);
    let sub = tokio::time::timeout(Duration::from_secs(5), consumer.subscribe("t", 0, 7, 4096))
        .await
        .expect("in time")
        .expect("subscribed at the leader");
    assert_eq!(sub.position(), 7);
    // The hint was remembered: the subscribe went straight there.
    assert!(
        fakes[0].subscribes().is_empty(),
        "{:?}",
        fakes[0].subscribes()
    );
    assert_eq!(fakes[1].subscribes(), [(0, fakes[1].shard_port(), 7)]);
}

/// A push subscription whose leader dies subscribes again at the new
/// leader, from the first offset it has not delivered.
#[tokio::test]
async fn a_push_subscription_follows_the_leader_to_another_broker() {
    use shoal_wire::batch::{build_batch, set_base_offset};
    let batch_at = |offset: u64| {
        let mut b = build_batch(&[&b"x"[..]], 0);
        set_base_offset(&mut b, offset);
        b
    };
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2]);
    let bootstrap = format!("{},{}", fakes[0].addr, fakes[1].addr);
    let consumer = Consumer::new(
        connect(&bootstrap).await,
        ConsumerConfig {
            retry_backoff: Duration::from_millis(10),
            ..ConsumerConfig::default()
        },
    );
    let mut sub = consumer.subscribe("t", 0, 0, 1 << 20).await.expect("sub");
    fakes[1].push(sub.id(), &batch_at(0), 1);
    let got = sub.next().await.expect("a push");
    assert_eq!(got.records[0].offset, 0);
    // Broker 2 dies; broker 1 leads from now on.
    c.place("t", 0, |p| {
        p.leader = 1;
        p.leader_epoch = 1;
    });
    c.with(|v| v.members.retain(|m| m.id != 2));
    fakes[1].kill();
    let next = tokio::spawn(async move {
        let p = sub.next().await;
        (p, sub)
    });
    let t0 = Instant::now();
    while fakes[0].subscriptions() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "never re-subscribed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(fakes[0].subscribes(), [(0, fakes[0].shard_port(), 1)]);
    fakes[0].push(1, &batch_at(1), 2);
    let (p, sub) = tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .expect("in time")
        .expect("task");
    assert_eq!(p.expect("a push from the new leader").records[0].offset, 1);
    assert_eq!(sub.position(), 2);
}

/// A bootstrap list whose first address is dead connects through the
/// next one.
#[tokio::test]
async fn a_dead_first_bootstrap_address_is_skipped() {
    let fake = FakeBroker::start(&[("t", 1)]).await;
    let client = connect(&format!("127.0.0.1:{},{}", dead_port(), fake.addr)).await;
    assert_eq!(
        client.discovery_source(),
        Some(DiscoverySource::BootstrapList)
    );
    producer(client, 0, Duration::from_millis(10))
        .send("t", None, b"v")
        .await
        .expect("stored");
    assert_eq!(fake.produces().len(), 1);
    let e = Client::connect_with_config(
        &format!("127.0.0.1:{},127.0.0.1:{}", dead_port(), dead_port()),
        config(DiscoveryCache::Off),
    )
    .await
    .err()
    .expect("nothing reachable");
    assert!(matches!(e, Error::Discovery(_)), "{e}");
}

/// When the broker that answered metadata dies, metadata comes from
/// another live broker.
#[tokio::test]
async fn metadata_moves_on_from_a_dead_broker() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2]);
    let client = connect(&fakes[0].addr_string()).await;
    assert_eq!(fakes[0].metadata_requests(), 1);
    fakes[0].kill();
    client.refresh_metadata().await.expect("from broker 2");
    assert_eq!(fakes[1].metadata_requests(), 1);
    // And the data path goes to the leader, which is alive.
    producer(client, 0, Duration::from_millis(10))
        .send("t", None, b"v")
        .await
        .expect("stored");
    assert_eq!(fakes[1].produces().len(), 1);
}

/// Every refresh that changes the live brokers writes them to the cache
/// file; a client whose bootstrap addresses are all dead starts from it.
#[tokio::test]
async fn the_cache_is_written_and_used_when_every_bootstrap_address_is_dead() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2]);
    let path = TempPath::new("cache");
    let cache = DiscoveryCache::Path(path.0.clone());
    let client = Client::connect_with_config(&fakes[0].addr_string(), config(cache.clone()))
        .await
        .expect("connect");
    let file = discovery::read_cache(&path.0).expect("written at connect");
    assert_eq!(file.cluster, "prod");
    assert_eq!(file.bootstrap, fakes[0].addr_string());
    let ports: Vec<(Option<u32>, u16)> = file.brokers.iter().map(|b| (b.id, b.port)).collect();
    assert_eq!(
        ports,
        [
            (Some(1), fakes[0].addr.port()),
            (Some(2), fakes[1].addr.port())
        ]
    );
    // Broker 1 leaves: the next refresh rewrites the file.
    c.with(|v| v.members.retain(|m| m.id != 1));
    client.refresh_metadata().await.expect("refresh");
    let file = discovery::read_cache(&path.0).expect("rewritten");
    assert_eq!(file.brokers.len(), 1);
    assert_eq!(file.brokers[0].port, fakes[1].addr.port());
    drop(client);

    let dead = format!("127.0.0.1:{},127.0.0.1:{}", dead_port(), dead_port());
    let client = Client::connect_with_config(&dead, config(cache))
        .await
        .expect("started from the cache");
    assert_eq!(
        client.discovery_source(),
        Some(DiscoverySource::Cache(path.0.clone()))
    );
    producer(client, 0, Duration::from_millis(10))
        .send("t", None, b"v")
        .await
        .expect("stored");
    assert_eq!(fakes[1].produces().len(), 1);
}

/// A corrupt cache is ignored with a warning: without a reachable
/// bootstrap the connect fails with a clear error, with one it succeeds
/// and writes a good cache over the bad one.
#[tokio::test]
async fn a_corrupt_cache_is_ignored() {
    let fake = FakeBroker::start(&[("t", 1)]).await;
    let path = TempPath::new("corrupt");
    let cache = DiscoveryCache::Path(path.0.clone());
    for junk in [
        &b"{\"format\":1,\"brokers\":[{\"host\":"[..],
        b"\0\0\0",
        b"[]",
    ] {
        std::fs::create_dir_all(path.0.parent().expect("dir")).expect("dir");
        std::fs::write(&path.0, junk).expect("junk");
        let e = Client::connect_with_config(
            &format!("127.0.0.1:{}", dead_port()),
            config(cache.clone()),
        )
        .await
        .err()
        .expect("nothing to start from");
        let text = e.to_string();
        assert!(text.contains("no usable discovery cache"), "{text}");
    }
    let client = Client::connect_with_config(&fake.addr_string(), config(cache))
        .await
        .expect("the bootstrap works");
    assert_eq!(
        client.discovery_source(),
        Some(DiscoverySource::BootstrapList)
    );
    let file = discovery::read_cache(&path.0).expect("a good cache again");
    assert_eq!(file.brokers[0].port, fake.addr.port());
}

/// With the cache off nothing is written.
#[tokio::test]
async fn no_cache_is_written_when_it_is_off() {
    let fake = FakeBroker::start(&[]).await;
    let path = TempPath::new("off");
    Client::connect_with_config(&fake.addr_string(), config(DiscoveryCache::Off))
        .await
        .expect("connect");
    assert!(!path.0.exists());
    Client::connect_with_config(
        &fake.addr_string(),
        config(DiscoveryCache::Path(path.0.clone())),
    )
    .await
    .expect("connect");
    assert!(path.0.exists());
}

/// `zk://` with ZooKeeper down: the lookup fails at once (every host
/// refuses) and the client starts from the brokers cached for that
/// bootstrap string. No ZooKeeper is needed: none is running there.
#[tokio::test]
async fn an_unreachable_zookeeper_falls_back_to_the_cache() {
    let (c, fakes) = cluster(1).await;
    c.topic("t", &[1]);
    let path = TempPath::new("zk");
    let zk = format!("zk://127.0.0.1:{}/apps?cluster=prod", dead_port());
    let file = discovery::CacheFile {
        format: discovery::CACHE_FORMAT,
        bootstrap: zk.clone(),
        cluster: "prod".into(),
        written_ms: 0,
        brokers: vec![discovery::BrokerAddr {
            id: Some(1),
            host: "127.0.0.1".into(),
            port: fakes[0].addr.port(),
            shard_ports: vec![],
            rack: None,
        }],
    };
    discovery::write_cache(&path.0, &file).expect("cache");
    let t0 = Instant::now();
    let client = Client::connect_with_config(&zk, config(DiscoveryCache::Path(path.0.clone())))
        .await
        .expect("from the cache");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(
        client.discovery_source(),
        Some(DiscoverySource::Cache(path.0.clone()))
    );
    assert_eq!(client.cluster_name().as_deref(), Some("prod"));
    // Without a cache the error names ZooKeeper.
    let e = Client::connect_with_config(&zk, config(DiscoveryCache::Off))
        .await
        .err()
        .expect("nothing to start from");
    assert!(e.to_string().contains("ZooKeeper at 127.0.0.1:"), "{e}");
}
