//! The Rust client and the CLI against a real cluster (issue 10): a
//! client that knows one broker reaches every partition's leader; a
//! client bootstrapped from ZooKeeper keeps working from its disk cache
//! while ZooKeeper is down; `shoal cluster status` follows a broker that
//! is killed and comes back.

use shoal_client::{
    Client, ClientConfig, Consumer, ConsumerConfig, DiscoveryCache, NewTopic, Producer,
    ProducerConfig, StartAt,
};
use shoal_tests::{eventually, rt, shoal_bin, three_brokers, ZooKeeper};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn cluster_status(addr: &str) -> serde_json::Value {
    let out = std::process::Command::new(shoal_bin())
        .args(["--broker", addr, "cluster", "status", "--json"])
        .env("SHOAL_DISCOVERY_CACHE", "off")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// Started with only broker 1's address, a producer reaches the leader of
/// every partition (spread over three brokers) and a consumer reads every
/// record back.
#[test]
fn a_client_that_knows_one_broker_reaches_every_leader() {
    let zk = ZooKeeper::start();
    let brokers = three_brokers(&zk, &[]);
    let addr = brokers[0].addr();
    eventually(Duration::from_secs(10), "three brokers", || {
        cluster_status(&addr)["brokers"]
            .as_array()
            .map_or(0, Vec::len)
            == 3
    });
    rt().block_on(async {
        let config = ClientConfig {
            discovery_cache: DiscoveryCache::Off,
            ..ClientConfig::default()
        };
        let client = Client::connect_with_config(&addr, config).await.unwrap();
        let mut t = NewTopic::new("spread", 6);
        t.replication_factor = 2;
        client.create_topic(&t).await.unwrap();
        let info = client.describe_topic("spread").await.unwrap();
        let leaders: BTreeSet<u32> = info.partitions.iter().map(|p| p.leader_broker).collect();
        assert_eq!(leaders.len(), 3, "{info:?}");
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let mut partitions = BTreeSet::new();
        for i in 0..60u32 {
            let md = producer
                .send("spread", None, format!("m{i}").as_bytes())
                .await
                .unwrap();
            partitions.insert(md.partition);
        }
        assert_eq!(partitions.len(), 6, "round-robin over every partition");
        let mut consumer = Consumer::new(client, ConsumerConfig::default());
        consumer
            .assign_all("spread", StartAt::Beginning)
            .await
            .unwrap();
        let mut got = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < 60 && Instant::now() < deadline {
            for r in consumer.poll().await.unwrap() {
                got.insert(String::from_utf8(r.value.unwrap_or_default().to_vec()).unwrap());
            }
        }
        assert_eq!(got.len(), 60);
    });
}

/// A client bootstrapped with zk:// writes the broker list to its cache;
/// with ZooKeeper stopped, a new client connects from that cache and
/// works.
#[test]
fn the_discovery_cache_lets_a_client_connect_while_zookeeper_is_down() {
    let mut zk = ZooKeeper::start();
    let brokers = three_brokers(&zk, &[]);
    let addr = brokers[0].addr();
    eventually(Duration::from_secs(10), "three brokers", || {
        cluster_status(&addr)["brokers"]
            .as_array()
            .map_or(0, Vec::len)
            == 3
    });
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("brokers.json");
    let bootstrap = format!("zk://{}", zk.connect());
    let config = || ClientConfig {
        discovery_cache: DiscoveryCache::Path(cache.clone()),
        connect_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    };
    rt().block_on(async {
        let client = Client::connect_with_config(&bootstrap, config())
            .await
            .unwrap();
        client
            .create_topic(&NewTopic::new("cached", 3))
            .await
            .unwrap();
        client.refresh_metadata().await.unwrap();
    });
    let text = std::fs::read_to_string(&cache).expect("cache written");
    for b in &brokers {
        assert!(text.contains(&b.port.to_string()), "{text}");
    }
    zk.kill9();
    rt().block_on(async {
        let client = Client::connect_with_config(&bootstrap, config())
            .await
            .expect("connect from the cache while ZooKeeper is down");
        let producer = Producer::new(client, ProducerConfig::default());
        producer.send("cached", None, b"still here").await.unwrap();
    });
}

/// `shoal cluster status --json`: a broker killed with -9 disappears
/// within the session timeout and comes back when restarted.
#[test]
fn cluster_status_follows_a_killed_broker() {
    let zk = ZooKeeper::start();
    let mut brokers = three_brokers(&zk, &[]);
    let addr = brokers[0].addr();
    let ids = |v: &serde_json::Value| -> Vec<u64> {
        v["brokers"]
            .as_array()
            .map(|a| a.iter().filter_map(|b| b["id"].as_u64()).collect())
            .unwrap_or_default()
    };
    eventually(Duration::from_secs(10), "three brokers", || {
        ids(&cluster_status(&addr)) == vec![1, 2, 3]
    });
    let s = cluster_status(&addr);
    assert!(
        s["controller"]["id"].as_u64().is_some() || s["controller_id"].as_i64().is_some(),
        "{s}"
    );
    brokers[2].kill9();
    eventually(Duration::from_secs(6), "broker 3 gone", || {
        ids(&cluster_status(&addr)) == vec![1, 2]
    });
    brokers[2].restart();
    eventually(Duration::from_secs(10), "broker 3 back", || {
        ids(&cluster_status(&addr)) == vec![1, 2, 3]
    });
}
