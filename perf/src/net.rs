//! `produce`, `consume` and `e2e`: the broker measured through the Rust
//! client over TCP.

use crate::report::{self, histogram, Percentiles};
use clap::Args;
use futures::FutureExt;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use shoal_client::{Acks, Client, Consumer, ConsumerConfig, NewTopic, Producer, ProducerConfig};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Parses `10s`, `500ms`, `250us`, `2m` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map_or((s, "s"), |i| s.split_at(i));
    let v: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: use e.g. 10s, 500ms, 2m"))?;
    let secs = match unit {
        "s" => v,
        "ms" => v / 1e3,
        "us" | "µs" => v / 1e6,
        "m" => v * 60.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?}: use us, ms, s or m"
            ))
        }
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Broker to measure (ignored with --spawn).
    #[arg(long, default_value = "127.0.0.1:9400")]
    pub broker: String,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Time run before measuring.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Topic (created if missing). Default: a fresh one per run.
    #[arg(long)]
    pub topic: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// Sync mode of the created topic.
    #[arg(long, default_value = "interval:100")]
    pub sync: String,
    /// Replication factor of the created topic (a cluster: --spawn-cluster).
    #[arg(long, default_value_t = 1)]
    pub replication: u16,
    /// Start a `shoal serve` of our own on a free port and temp dir.
    #[arg(long)]
    pub spawn: bool,
    /// Start a private ZooKeeper (Debian's zookeeper package) and this
    /// many brokers of our own, one shard each, and measure the cluster
    /// (topics spread over the brokers; the client goes to each leader).
    #[arg(long, conflicts_with = "spawn")]
    pub spawn_cluster: Option<u32>,
    /// Cores for the spawned broker (each broker of --spawn-cluster takes
    /// one of them, in turn).
    #[arg(long, default_value = "0")]
    pub broker_cores: String,
    /// Config file (TOML) for the spawned broker, as `shoal serve --config`.
    #[arg(long)]
    pub broker_config: Option<PathBuf>,
    /// Core to pin the harness to (default: the last core when spawning).
    #[arg(long)]
    pub core: Option<usize>,
    /// Report the fraction of this line rate (Mbit/s) achieved.
    #[arg(long)]
    pub line_rate_mbit: Option<f64>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub out: report::Outputs,
}

/// TLS to the broker under test (a spawned one gets its certificate from
/// `--broker-config`: `tls_cert`, `tls_key`).
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Connect with TLS, verifying the broker against this CA (PEM)
    /// [default: $SHOAL_TLS_CA; neither: plaintext].
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) to present [default: $SHOAL_TLS_CERT].
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM) [default: $SHOAL_TLS_KEY].
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Verify the broker's certificate against this DNS name instead of the
    /// host it was reached by [default: $SHOAL_TLS_SERVER_NAME].
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    pub fn config(&self) -> Result<Option<shoal_client::TlsConfig>, String> {
        shoal_client::TlsConfig::from_flags_or_env(&shoal_client::TlsFiles {
            ca: self.tls_ca.clone().unwrap_or_default(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            server_name: self.tls_server_name.clone(),
        })
        .map_err(|e| e.to_string())
    }
}

#[derive(Args, Debug, Clone)]
pub struct ProduceArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Message value bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    #[arg(long, default_value_t = 64 * 1024)]
    pub batch_bytes: usize,
    #[arg(long, default_value_t = 1000)]
    pub linger_us: u64,
    #[arg(long, default_value = "leader")]
    pub acks: String,
    /// Messages per second over all producers (default: as fast as acknowledged).
    #[arg(long)]
    pub rate: Option<f64>,
}

#[derive(Args, Debug, Clone)]
pub struct ConsumeArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Message value bytes of the fill.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Bytes to fill a fresh topic with before reading (with --spawn or --fill).
    #[arg(long, default_value_t = 2 << 30)]
    pub fill_bytes: u64,
    /// Fill even without --spawn.
    #[arg(long)]
    pub fill: bool,
    /// Read with push subscriptions instead of fetch.
    #[arg(long)]
    pub push: bool,
    /// Bytes per fetch / push credit.
    #[arg(long, default_value_t = 4 << 20)]
    pub fetch_bytes: u32,
    /// Every consumer reads every partition (instead of a share of them):
    /// many readers of the same bytes, which the broker reads from the
    /// disk once (the report gives the disk's reads, from /proc/vmstat).
    #[arg(long)]
    pub all_read_all: bool,
}

#[derive(Args, Debug, Clone)]
pub struct E2eArgs {
    #[command(flatten)]
    pub common: Common,
    /// Messages per second (open loop).
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    #[arg(long, default_value_t = 0)]
    pub linger_us: u64,
    /// all | leader | none
    #[arg(long, default_value = "leader")]
    pub acks: String,
    /// Before measuring, fill the topic with this many bytes (of --size
    /// messages), and have another consumer read them from the start while
    /// the measured consumer follows the tail: its catch-up rate is in the
    /// report's settings (`catch_up`). 0: no catch-up reader.
    #[arg(long, default_value_t = 0)]
    pub catch_up_bytes: u64,
    /// How the catch-up reader reads: fetch | push | none (the fill
    /// without a reader: the baseline for the tail consumer's latency).
    #[arg(long, default_value = "fetch")]
    pub catch_up_reader: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetReport {
    pub mode: String,
    pub msgs_per_s: f64,
    pub mib_per_s: f64,
    pub messages: u64,
    pub seconds: f64,
    pub errors: u64,
    pub latency_us: Percentiles,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ack_latency_us: Option<Percentiles>,
    /// The broker's own produce latency over the measured window (request
    /// decoded to response written), from its latency buckets: each figure
    /// is the upper bound of the bucket the percentile falls in
    /// ([`OVER_LAST_BOUND_US`] beyond the last).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub broker_produce_latency_us: Option<Percentiles>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub line_rate_fraction: Option<f64>,
    pub settings: serde_json::Value,
    /// (percentile, µs) points of the latency curve, for plots.
    pub percentiles: Vec<(f64, f64)>,
}

/// Open-loop schedule: message `i` is due at `start + i / rate`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub start: Instant,
    pub interval: Duration,
}

impl Schedule {
    pub fn new(start: Instant, rate: f64) -> Schedule {
        Schedule {
            start,
            interval: Duration::from_secs_f64(1.0 / rate.max(1e-9)),
        }
    }
    pub fn intended(&self, i: u64) -> Instant {
        self.start + self.interval.mul_f64(i as f64)
    }
}

/// e2e message value: intended send time (ns since the run's base instant)
/// and sequence number, then padding.
pub fn encode_stamp(buf: &mut [u8], intended_ns: u64, seq: u64) {
    buf[..8].copy_from_slice(&intended_ns.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
}

pub fn decode_stamp(v: &[u8]) -> Option<(u64, u64)> {
    if v.len() < 16 {
        return None;
    }
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&v[..8]);
    b.copy_from_slice(&v[8..16]);
    Some((u64::from_le_bytes(a), u64::from_le_bytes(b)))
}

// ---- spawned broker ---------------------------------------------------------

pub struct SpawnedBroker {
    child: Child,
    pub addr: String,
    dir: tempfile::TempDir,
    /// How it was started, for [`SpawnedBroker::kill9_and_restart`].
    cores: String,
    config: Option<PathBuf>,
    extra: Vec<String>,
    shards: u16,
}

fn shoal_bin() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("SHOAL_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.with_file_name("shoal");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: build it (cargo build --release -p shoal-core) or set SHOAL_BIN",
            bin.display()
        ))
    }
}

impl SpawnedBroker {
    pub fn start(cores: &str, config: Option<&Path>) -> Result<SpawnedBroker, String> {
        SpawnedBroker::start_with(cores, config, &[])
    }

    pub fn start_with(
        cores: &str,
        config: Option<&Path>,
        extra: &[String],
    ) -> Result<SpawnedBroker, String> {
        let shards = cores
            .split(',')
            .map(|p| {
                if let Some((a, b)) = p.split_once('-') {
                    b.trim()
                        .parse::<u16>()
                        .unwrap_or(0)
                        .saturating_sub(a.trim().parse::<u16>().unwrap_or(0))
                        + 1
                } else {
                    1
                }
            })
            .sum::<u16>();
        // Below the ephemeral range, so a probe cannot connect to itself.
        let port = (0..500)
            .map(|_| {
                10000
                    + (std::process::id() as u16)
                        .wrapping_mul(7919)
                        .wrapping_add(rand_u16())
                        % 20000
            })
            .find(|&p| {
                (0..=shards).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok())
            })
            .ok_or("no free port")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let addr = format!("127.0.0.1:{port}");
        let child = spawn_shoal(&addr, cores, dir.path(), config, extra)?;
        let b = SpawnedBroker {
            child,
            addr,
            dir,
            cores: cores.to_string(),
            config: config.map(Path::to_path_buf),
            extra: extra.to_vec(),
            shards,
        };
        b.wait_up()?;
        Ok(b)
    }

    fn wait_up(&self) -> Result<(), String> {
        let port: u16 = self
            .addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or("bad address")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let up = (0..=self.shards)
                .all(|i| std::net::TcpStream::connect(("127.0.0.1", port + i)).is_ok());
            if up {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err("the spawned broker did not start".into())
    }

    /// SIGKILL, then the same broker again on its data: returns when it
    /// listens.
    pub fn kill9_and_restart(&mut self) -> Result<(), String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_shoal(
            &self.addr,
            &self.cores,
            self.dir.path(),
            self.config.as_deref(),
            &self.extra,
        )?;
        self.wait_up()
    }
}

fn spawn_shoal(
    addr: &str,
    cores: &str,
    dir: &Path,
    config: Option<&Path>,
    extra: &[String],
) -> Result<Child, String> {
    let mut cmd = Command::new(shoal_bin()?);
    cmd.args(["serve", "--listen", addr, "--cores", cores])
        .arg("--data-dir")
        .arg(dir);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(extra);
    // The harness may have pinned itself (and so the children it starts
    // from now on) to one core: the broker gets every core back.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: runs in the forked child before exec and only calls
    // sched_setaffinity on itself with a zero-initialised, then filled,
    // cpu_set_t (async-signal-safe; no allocation).
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for c in 0..cpus {
                libc::CPU_SET(c, &mut set);
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
    cmd.env(
        "RUST_LOG",
        std::env::var("SHOAL_PERF_BROKER_LOG").unwrap_or_else(|_| "warn".into()),
    )
    .stdout(Stdio::null())
    .spawn()
    .map_err(|e| format!("cannot start shoal: {e}"))
}

fn rand_u16() -> u16 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u16)
        .unwrap_or(0)
}

impl Drop for SpawnedBroker {
    fn drop(&mut self) {
        // SAFETY: signals our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
    }
}

/// A private ZooKeeper and `n` brokers (ids 1..=n).
pub struct SpawnedCluster {
    // Brokers first: they stop (and leave the cluster) before ZooKeeper.
    brokers: Vec<SpawnedBroker>,
    zk: Child,
    _dir: tempfile::TempDir,
}

impl SpawnedCluster {
    pub fn start(n: u32, cores: &str, config: Option<&Path>) -> Result<SpawnedCluster, String> {
        const JAR: &str = "/usr/share/java/zookeeper.jar";
        if !Path::new(JAR).exists() {
            return Err(format!(
                "{JAR} not found: --spawn-cluster needs Debian's zookeeper package (apt-get install zookeeper)"
            ));
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let zk_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let cfg = dir.path().join("zoo.cfg");
        std::fs::write(
            &cfg,
            format!(
                "tickTime=200\ndataDir={}\nclientPort={zk_port}\nclientPortAddress=127.0.0.1\n\
                 admin.enableServer=false\n4lw.commands.whitelist=ruok\n",
                dir.path().join("zk").display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let zk = Command::new("java")
            .args(["-Xmx256m", "-cp", &format!("/etc/zookeeper/conf:{JAR}")])
            .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start ZooKeeper (java): {e}"))?;
        let mut c = SpawnedCluster {
            brokers: Vec::new(),
            zk,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", zk_port)).is_err() {
            if Instant::now() > deadline {
                return Err("ZooKeeper did not start".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let core_list: Vec<&str> = cores.split(',').collect();
        for id in 1..=n {
            let core = core_list[(id as usize - 1) % core_list.len()];
            let extra = [
                "--zookeeper".to_string(),
                format!("127.0.0.1:{zk_port}"),
                "--broker-id".to_string(),
                id.to_string(),
            ];
            c.brokers
                .push(SpawnedBroker::start_with(core, config, &extra)?);
        }
        Ok(c)
    }

    pub fn addr(&self) -> String {
        self.brokers
            .first()
            .map(|b| b.addr.clone())
            .unwrap_or_default()
    }
}

impl Drop for SpawnedCluster {
    fn drop(&mut self) {
        self.brokers.clear();
        let _ = self.zk.kill();
        let _ = self.zk.wait();
    }
}

// ---- shared plumbing --------------------------------------------------------

/// Stands for "beyond the broker's last latency bucket" (over 1 s).
pub const OVER_LAST_BOUND_US: f64 = 10_000_000.0;

/// Percentiles of the broker's produce latency between two metric reads,
/// from its cumulative `produce_latency_us_le_<bound>` buckets and
/// `produce_latency_us_count`. Each figure is the bound of the bucket the
/// percentile falls in. `None` if the broker has no such buckets or nothing
/// was produced in between.
pub fn bucket_percentiles(
    before: &[(String, u64)],
    after: &[(String, u64)],
) -> Option<Percentiles> {
    let get = |m: &[(String, u64)], k: &str| m.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
    let count_name = "produce_latency_us_count";
    let total = get(after, count_name)?.checked_sub(get(before, count_name)?)?;
    if total == 0 {
        return None;
    }
    let mut buckets: Vec<(u64, u64)> = after
        .iter()
        .filter_map(|(n, v)| {
            let bound = n
                .strip_prefix("produce_latency_us_le_")?
                .parse::<u64>()
                .ok()?;
            Some((bound, v.saturating_sub(get(before, n).unwrap_or(0))))
        })
        .collect();
    buckets.sort();
    let at = |q: f64| {
        let need = (q * total as f64).ceil() as u64;
        buckets
            .iter()
            .find(|(_, cum)| *cum >= need.max(1))
            .map_or(OVER_LAST_BOUND_US, |(b, _)| *b as f64)
    };
    Some(Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        p999: at(0.999),
        p9999: at(0.9999),
        max: at(1.0),
    })
}

pub(crate) fn pin_to(core: Option<usize>, spawn: bool) {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let core = core.or((spawn && n > 1).then_some(n - 1));
    if let Some(c) = core {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
        // inside it; sched_setaffinity reads it for the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(c, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// A network mode's setup, handed to its measurement.
struct Session {
    c: Common,
    client: Client,
    topic: String,
    /// The broker's address, for more connections.
    addr: String,
}

/// A client of the broker under test, authenticated as `SHOAL_USER` with
/// `SHOAL_PASSWORD` when those are set (a broker run with `--auth`; a
/// spawned one gets `auth = true` and `superuser` from `--broker-config`
/// and `SHOAL_ADMIN_PASSWORD` from this process's environment), over TLS
/// when `tls` (or the environment) names a CA.
pub async fn connect(addr: &str, tls: &TlsArgs) -> Result<Client, String> {
    let credentials = shoal_client::Credentials::from_env().map_err(|e| e.to_string())?;
    let config = shoal_client::ClientConfig {
        credentials,
        tls: tls.config()?,
        ..shoal_client::ClientConfig::default()
    };
    Client::connect_with_config(addr, config)
        .await
        .map_err(|e| e.to_string())
}

/// What every network mode does around its measurement: start (or find)
/// the broker, pin the harness, then run `body` on a single-threaded
/// runtime with a connected client and the topic (created if needed, named
/// after `default_topic` unless `--topic`). A spawned broker lives until
/// `body` is done.
fn run_mode<F, Fut>(c: Common, default_topic: &'static str, body: F) -> Result<(), String>
where
    F: FnOnce(Session) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let t = target(&c)?;
    pin_to(c.core, c.spawn || c.spawn_cluster.is_some());
    let rt = runtime()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let client = connect(&t.addr, &c.tls).await?;
        if let Some(n) = c.spawn_cluster {
            // Every broker registered before the topic is placed.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                client.refresh_metadata().await.map_err(|e| e.to_string())?;
                if client.brokers().len() >= n as usize {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "only {} of {n} brokers registered",
                        client.brokers().len()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let topic = setup_topic(&client, &c, default_topic).await?;
        let addr = t.addr.clone();
        let r = body(Session {
            c,
            client,
            topic,
            addr,
        })
        .await;
        drop(t);
        r
    })
}

struct Target {
    _spawned: Option<SpawnedBroker>,
    _cluster: Option<SpawnedCluster>,
    addr: String,
}

fn target(c: &Common) -> Result<Target, String> {
    if let Some(n) = c.spawn_cluster {
        let cluster = SpawnedCluster::start(n.max(1), &c.broker_cores, c.broker_config.as_deref())?;
        let addr = cluster.addr();
        return Ok(Target {
            _spawned: None,
            _cluster: Some(cluster),
            addr,
        });
    }
    if c.spawn {
        let b = SpawnedBroker::start(&c.broker_cores, c.broker_config.as_deref())?;
        let addr = b.addr.clone();
        Ok(Target {
            _spawned: Some(b),
            _cluster: None,
            addr,
        })
    } else {
        Ok(Target {
            _spawned: None,
            _cluster: None,
            addr: c.broker.clone(),
        })
    }
}

async fn setup_topic(client: &Client, c: &Common, default_name: &str) -> Result<String, String> {
    let name = c
        .topic
        .clone()
        .unwrap_or_else(|| format!("{default_name}-{}", std::process::id()));
    if client.topic(&name).await.is_err() {
        let mut t = NewTopic::new(&name, c.partitions);
        t.sync = Some(c.sync.clone());
        t.replication_factor = c.replication;
        client
            .create_topic(&t)
            .await
            .map_err(|e| format!("cannot create topic {name}: {e}"))?;
    }
    Ok(name)
}

/// What a mode measured, before it is turned into a [`NetReport`].
struct Run {
    mode: String,
    messages: u64,
    bytes: u64,
    seconds: f64,
    errors: u64,
    ack_latency_us: Option<Percentiles>,
    broker_produce_latency_us: Option<Percentiles>,
    settings: serde_json::Value,
}

/// Stops the progress line, derives the rates and percentiles, writes the
/// requested outputs and prints the report.
fn finish(
    c: &Common,
    progress: tokio::task::JoinHandle<()>,
    run: Run,
    h: &Histogram<u64>,
) -> Result<(), String> {
    progress.abort();
    if !c.out.json {
        eprintln!();
    }
    let mut r = NetReport {
        mode: run.mode,
        msgs_per_s: run.messages as f64 / run.seconds,
        mib_per_s: run.bytes as f64 / run.seconds / 1_048_576.0,
        messages: run.messages,
        seconds: run.seconds,
        errors: run.errors,
        latency_us: Percentiles::of(h),
        ack_latency_us: run.ack_latency_us,
        broker_produce_latency_us: run.broker_produce_latency_us,
        line_rate_fraction: None,
        settings: run.settings,
        percentiles: Vec::new(),
    };
    r.percentiles = report::curve(h);
    if let Some(mbit) = c.line_rate_mbit {
        r.line_rate_fraction = Some(r.mib_per_s * 1_048_576.0 * 8.0 / (mbit * 1e6));
    }
    let title = format!(
        "shoal-perf {}: {:.0} msgs/s, {:.1} MiB/s",
        r.mode, r.msgs_per_s, r.mib_per_s
    );
    c.out.write_files(h, &title, &r.mode, &r.percentiles)?;
    if c.out.json {
        println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
    } else {
        println!("shoal-perf {}  {}", r.mode, r.settings);
        println!(
            "  {:.0} msgs/s  {:.1} MiB/s  ({} messages in {:.2} s, {} errors)",
            r.msgs_per_s, r.mib_per_s, r.messages, r.seconds, r.errors
        );
        println!("  latency      {}", r.latency_us.table_row());
        if let Some(a) = &r.ack_latency_us {
            println!("  ack latency  {}", a.table_row());
        }
        if let Some(a) = &r.broker_produce_latency_us {
            println!("  in broker    {}  (produce, bucket bounds)", a.table_row());
        }
        if let Some(f) = r.line_rate_fraction {
            println!("  {:.1} % of line rate", f * 100.0);
        }
    }
    Ok(())
}

/// Prints a progress line every second until dropped.
fn progress(
    count: Rc<Cell<u64>>,
    bytes: Rc<Cell<u64>>,
    quiet: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_local(async move {
        let (mut last_c, mut last_b, t0) = (0, 0, Instant::now());
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (c, b) = (count.get(), bytes.get());
            if !quiet {
                eprint!(
                    "\r[{:>4.0}s] {:>10} msgs/s {:>9.1} MiB/s   ",
                    t0.elapsed().as_secs_f64(),
                    c - last_c,
                    (b - last_b) as f64 / 1_048_576.0
                );
            }
            last_c = c;
            last_b = b;
        }
    })
}

fn acks_of(s: &str) -> Result<Acks, String> {
    match s {
        "leader" => Ok(Acks::Leader),
        "none" => Ok(Acks::None),
        "all" => Ok(Acks::All),
        _ => Err(format!("invalid acks {s:?}: all, leader or none")),
    }
}

// ---- produce ----------------------------------------------------------------

pub fn produce(a: ProduceArgs) -> Result<(), String> {
    let acks = acks_of(&a.acks)?;
    run_mode(
        a.common.clone(),
        "perf-produce",
        move |session| async move {
            let Session {
                c, client, topic, ..
            } = session;
            let hist = Rc::new(RefCell::new(histogram()));
            let (count, bytes, errors) = (
                Rc::new(Cell::new(0u64)),
                Rc::new(Cell::new(0u64)),
                Rc::new(Cell::new(0u64)),
            );
            let t0 = Instant::now();
            let measure_from = t0 + c.warmup;
            let end = measure_from + c.duration;
            let prog = progress(count.clone(), bytes.clone(), c.out.json);
            let mut tasks = Vec::new();
            let producers = a.producers.max(1);
            for _ in 0..producers {
                let producer = Producer::new(
                    client.clone(),
                    ProducerConfig {
                        batch_bytes: a.batch_bytes,
                        linger: Duration::from_micros(a.linger_us),
                        acks,
                        ..ProducerConfig::default()
                    },
                );
                let (topic, hist, count, bytes, errors) = (
                    topic.clone(),
                    hist.clone(),
                    count.clone(),
                    bytes.clone(),
                    errors.clone(),
                );
                let value = vec![0x5au8; a.size];
                let window = (4 * a.batch_bytes / a.size.max(1)).max(64) * c.partitions as usize;
                let schedule = a.rate.map(|r| Schedule::new(t0, r / producers as f64));
                tasks.push(tokio::task::spawn_local(async move {
                    // Deliveries complete in order per partition; awaiting the
                    // oldest first is what a windowed producer does.
                    let mut inflight: VecDeque<(Instant, shoal_client::producer::Delivery)> =
                        VecDeque::new();
                    let mut i = 0u64;
                    let record = |(intended, r): (
                        Instant,
                        shoal_client::Result<shoal_client::RecordMetadata>,
                    )| {
                        let now = Instant::now();
                        match r {
                            Ok(_) if intended >= measure_from && now <= end => {
                                let _ = hist
                                    .borrow_mut()
                                    .record((now - intended).as_micros().max(1) as u64);
                                count.set(count.get() + 1);
                                bytes.set(bytes.get() + value.len() as u64);
                            }
                            Ok(_) => {}
                            Err(_) => errors.set(errors.get() + 1),
                        }
                    };
                    loop {
                        let intended = match schedule {
                            Some(s) => {
                                let at = s.intended(i);
                                while Instant::now() < at {
                                    match inflight.front_mut().and_then(|(_, d)| d.now_or_never()) {
                                        Some(r) => {
                                            let (at, _) =
                                                inflight.pop_front().expect("front exists");
                                            record((at, r));
                                        }
                                        None => tokio::task::yield_now().await,
                                    }
                                }
                                at
                            }
                            None => Instant::now(),
                        };
                        if intended >= end {
                            break;
                        }
                        while inflight.len() >= window {
                            if let Some((at, d)) = inflight.pop_front() {
                                record((at, d.await));
                            }
                        }
                        match producer.send_nowait(&topic, None, &value).await {
                            Ok(d) => inflight.push_back((intended, d)),
                            Err(_) => errors.set(errors.get() + 1),
                        }
                        i += 1;
                    }
                    let _ = producer.flush().await;
                    while let Some((at, d)) = inflight.pop_front() {
                        record((at, d.await));
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            let h = hist.borrow().clone();
            let run = Run {
                mode: "produce".into(),
                messages: count.get(),
                bytes: bytes.get(),
                seconds: c.duration.as_secs_f64(),
                errors: errors.get(),
                ack_latency_us: None,
                broker_produce_latency_us: None,
                settings: serde_json::json!({
                    "producers": producers, "size": a.size, "batch_bytes": a.batch_bytes, "linger_us": a.linger_us,
                    "acks": a.acks, "replication": c.replication, "rate": a.rate, "partitions": c.partitions, "sync": c.sync, "topic": topic,
                    "spawn": c.spawn, "spawn_cluster": c.spawn_cluster, "broker_cores": c.broker_cores,
                }),
            };
            finish(&c, prog, run, &h)
        },
    )
}

// ---- consume ----------------------------------------------------------------

async fn fill(
    client: &Client,
    topic: &str,
    partitions: u32,
    size: usize,
    bytes: u64,
    quiet: bool,
) -> Result<(), String> {
    let producer = Producer::new(
        client.clone(),
        ProducerConfig {
            batch_bytes: 256 * 1024,
            linger: Duration::from_millis(2),
            ..ProducerConfig::default()
        },
    );
    let value = vec![0xa5u8; size];
    let n = bytes / size.max(1) as u64;
    let mut inflight = VecDeque::new();
    for i in 0..n {
        // Waits for room in the producer's buffer rather than failing on
        // it: a fill of large values outruns the default 32 MiB.
        let d = producer
            .send_nowait_to(topic, (i % u64::from(partitions)) as u32, None, &value)
            .await
            .map_err(|e| e.to_string())?;
        inflight.push_back(d);
        if inflight.len() >= 8192 {
            if let Some(d) = inflight.pop_front() {
                d.await.map_err(|e| format!("fill failed: {e}"))?;
            }
        }
        if !quiet && i % 200_000 == 0 {
            eprint!("\rfilling: {:>5.1} %", i as f64 * 100.0 / n as f64);
        }
    }
    producer.flush().await.map_err(|e| e.to_string())?;
    while let Some(d) = inflight.pop_front() {
        d.await.map_err(|e| format!("fill failed: {e}"))?;
    }
    if !quiet {
        eprintln!("\rfilled {} messages ({} MiB)", n, bytes >> 20);
    }
    Ok(())
}

pub fn consume(a: ConsumeArgs) -> Result<(), String> {
    run_mode(
        a.common.clone(),
        "perf-consume",
        move |session| async move {
            let Session {
                c, client, topic, ..
            } = session;
            if c.spawn || c.spawn_cluster.is_some() || a.fill {
                fill(
                    &client,
                    &topic,
                    c.partitions,
                    a.size,
                    a.fill_bytes,
                    c.out.json,
                )
                .await?;
            }
            let info = client
                .describe_topic(&topic)
                .await
                .map_err(|e| e.to_string())?;
            let hist = Rc::new(RefCell::new(histogram()));
            let (count, bytes) = (Rc::new(Cell::new(0u64)), Rc::new(Cell::new(0u64)));
            let prog = progress(count.clone(), bytes.clone(), c.out.json);
            let disk_before = disk_read_bytes();
            let t0 = Instant::now();
            let consumers = a.consumers.max(1);
            let mut tasks = Vec::new();
            for k in 0..consumers {
                let all = a.all_read_all;
                let parts: Vec<(u32, u64, u64)> = info
                    .partitions
                    .iter()
                    .filter(|p| all || p.partition as usize % consumers == k)
                    .map(|p| (p.partition, p.log_start_offset, p.high_watermark))
                    .collect();
                let (client, topic, hist, count, bytes, push, fetch_bytes) = (
                    client.clone(),
                    topic.clone(),
                    hist.clone(),
                    count.clone(),
                    bytes.clone(),
                    a.push,
                    a.fetch_bytes,
                );
                tasks.push(tokio::task::spawn_local(async move {
                    let consumer = Consumer::new(
                        client.clone(),
                        ConsumerConfig {
                            max_bytes: fetch_bytes,
                            ..ConsumerConfig::default()
                        },
                    );
                    for (p, start, end) in parts {
                        read_range(
                            &client,
                            &consumer,
                            (&topic, p),
                            (start, end),
                            push,
                            fetch_bytes,
                            |payload, records, took| {
                                let _ = hist.borrow_mut().record(took.as_micros().max(1) as u64);
                                count.set(count.get() + records);
                                bytes.set(bytes.get() + payload);
                            },
                        )
                        .await?;
                    }
                    Ok::<(), String>(())
                }));
            }
            for t in tasks {
                t.await.map_err(|e| e.to_string())??;
            }
            let seconds = t0.elapsed().as_secs_f64();
            let disk_read_mib = disk_before
                .zip(disk_read_bytes())
                .map(|(b, a)| a.saturating_sub(b) as f64 / 1_048_576.0);
            let h = hist.borrow().clone();
            let run = Run {
                mode: if a.push {
                    "consume-push"
                } else {
                    "consume-fetch"
                }
                .into(),
                messages: count.get(),
                bytes: bytes.get(),
                seconds,
                errors: 0,
                ack_latency_us: None,
                broker_produce_latency_us: None,
                settings: serde_json::json!({
                    "consumers": consumers, "size": a.size, "fill_bytes": a.fill_bytes, "push": a.push, "fetch_bytes": a.fetch_bytes,
                    "all_read_all": a.all_read_all, "disk_read_mib": disk_read_mib,
                    "partitions": c.partitions, "topic": topic, "spawn": c.spawn, "spawn_cluster": c.spawn_cluster, "broker_cores": c.broker_cores,
                    "latency": "per fetch request (or per push)",
                }),
            };
            finish(&c, prog, run, &h)
        },
    )
}

/// Bytes read from block devices so far, system-wide (`pgpgin` of
/// /proc/vmstat, in KiB): what the disk delivered, whoever asked.
fn disk_read_bytes() -> Option<u64> {
    let vmstat = std::fs::read_to_string("/proc/vmstat").ok()?;
    vmstat
        .lines()
        .find_map(|l| l.strip_prefix("pgpgin "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// Reads `[start, end)` of a partition, by push subscription or by fetch,
/// calling `on_chunk(payload bytes, records, time it took)` per push or
/// fetch answer.
async fn read_range(
    client: &Client,
    consumer: &Consumer,
    (topic, p): (&str, u32),
    (start, end): (u64, u64),
    push: bool,
    fetch_bytes: u32,
    mut on_chunk: impl FnMut(u64, u64, Duration),
) -> Result<(), String> {
    if push {
        let mut sub = consumer
            .subscribe(topic, p, start, u64::from(fetch_bytes) * 4)
            .await
            .map_err(|e| e.to_string())?;
        while sub.position() < end {
            let s = Instant::now();
            let (payload, records) = sub.next_raw().await.map_err(|e| e.to_string())?;
            on_chunk(payload, records, s.elapsed());
        }
        let _ = sub.unsubscribe().await;
    } else {
        let conn = client
            .partition_connection(topic, p)
            .await
            .map_err(|e| e.to_string())?;
        let mut at = start;
        while at < end {
            let s = Instant::now();
            let (payload, records, next) =
                shoal_client::consumer::fetch_raw(&conn, topic, p, at, fetch_bytes)
                    .await
                    .map_err(|e| e.to_string())?;
            on_chunk(payload, records, s.elapsed());
            at = next;
        }
    }
    Ok(())
}

// ---- e2e --------------------------------------------------------------------

pub fn e2e(a: E2eArgs) -> Result<(), String> {
    if a.size < 16 {
        return Err("--size must be at least 16 (the message carries its send time)".into());
    }
    let acks = acks_of(&a.acks)?;
    run_mode(a.common.clone(), "perf-e2e", move |session| async move {
        let Session {
            c,
            client,
            topic,
            addr,
        } = session;
        if a.catch_up_bytes > 0 {
            fill(
                &client,
                &topic,
                c.partitions,
                a.size,
                a.catch_up_bytes,
                c.out.json,
            )
            .await?;
        }
        let info = client
            .describe_topic(&topic)
            .await
            .map_err(|e| e.to_string())?;
        let base = Instant::now();
        let e2e_hist = Rc::new(RefCell::new(histogram()));
        let ack_hist = Rc::new(RefCell::new(histogram()));
        let (received, bytes, errors) = (
            Rc::new(Cell::new(0u64)),
            Rc::new(Cell::new(0u64)),
            Rc::new(Cell::new(0u64)),
        );
        let t0 = base + Duration::from_millis(200);
        let measure_from = t0 + c.warmup;
        let end = measure_from + c.duration;
        let from_ns = (measure_from - base).as_nanos() as u64;
        let end_ns = (end - base).as_nanos() as u64;
        // Consumers: a push subscription per partition from the current end,
        // on connections of their own, as a separate consumer would have.
        let consumer_client = connect(&addr, &c.tls).await?;
        let consumer = Consumer::new(consumer_client, ConsumerConfig::default());
        let mut subs = Vec::new();
        for p in &info.partitions {
            subs.push(
                consumer
                    .subscribe(&topic, p.partition, p.high_watermark, 64 << 20)
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        // The catch-up reader: `shoal-perf consume` of every partition from
        // its start to where the fill ended, as a process of its own at the
        // lowest CPU priority, started as measuring starts. In this process
        // it would share the harness's one thread with the measured
        // producer and consumer and delay them itself (its 4 MiB answers
        // take milliseconds to walk); as a nice-19 process on the harness's
        // core it takes only the time the harness leaves, as a consumer on
        // another machine would.
        let push = match a.catch_up_reader.as_str() {
            "fetch" => Some(false),
            "push" => Some(true),
            "none" => None,
            other => return Err(format!("--catch-up-reader {other:?}: fetch, push or none")),
        };
        // Started by a task of its own as measuring starts: waiting for
        // that here would hold back the producer loop below, whose warmup
        // messages would then all go out in one burst as measuring starts
        // and queue the first measured ones behind them.
        let catch_up = match (a.catch_up_bytes > 0, push) {
            (true, Some(push)) => {
                let (addr, topic, size) = (addr.clone(), topic.clone(), a.size);
                Some(tokio::task::spawn_local(async move {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(measure_from)).await;
                    start_catch_up(&addr, &topic, size, push)
                }))
            }
            _ => None,
        };
        let measured_sent = Rc::new(Cell::new(0u64));
        let mut readers = Vec::new();
        for mut sub in subs {
            let (h, received, bytes) = (e2e_hist.clone(), received.clone(), bytes.clone());
            readers.push(tokio::task::spawn_local(async move {
                while let Ok(p) = sub.next_views().await {
                    let now_ns = base.elapsed().as_nanos() as u64;
                    for r in p.records {
                        if let Some((intended, _)) = r.value.as_deref().and_then(decode_stamp) {
                            if intended >= from_ns && intended < end_ns {
                                let _ = h
                                    .borrow_mut()
                                    .record((now_ns.saturating_sub(intended) / 1000).max(1));
                                received.set(received.get() + 1);
                                bytes.set(
                                    bytes.get() + r.value.as_ref().map_or(0, |v| v.len() as u64),
                                );
                            }
                        }
                    }
                }
            }));
        }
        // The broker's own latency buckets, read as measuring starts and
        // after it ends: their difference is the measured window.
        let broker_before = Rc::new(RefCell::new(None));
        {
            let (client, slot) = (client.clone(), broker_before.clone());
            tokio::task::spawn_local(async move {
                tokio::time::sleep_until(tokio::time::Instant::from_std(measure_from)).await;
                *slot.borrow_mut() = client.metrics().await.ok();
            });
        }
        let prog = progress(received.clone(), bytes.clone(), c.out.json);
        let producer = Producer::new(
            client.clone(),
            ProducerConfig {
                linger: Duration::from_micros(a.linger_us),
                acks,
                ..ProducerConfig::default()
            },
        );
        let schedule = Schedule::new(t0, a.rate);
        let mut value = vec![0x33u8; a.size];
        let mut inflight: VecDeque<(u64, shoal_client::producer::Delivery)> = VecDeque::new();
        let record_ack =
            |(intended_ns, r): (u64, shoal_client::Result<shoal_client::RecordMetadata>)| {
                let now_ns = base.elapsed().as_nanos() as u64;
                match r {
                    Ok(_) if intended_ns >= from_ns && intended_ns < end_ns => {
                        let _ = ack_hist
                            .borrow_mut()
                            .record((now_ns.saturating_sub(intended_ns) / 1000).max(1));
                    }
                    Ok(_) => {}
                    Err(_) => errors.set(errors.get() + 1),
                }
            };
        let n_parts = info.partitions.len() as u64;
        let mut i = 0u64;
        loop {
            let at = schedule.intended(i);
            if at >= end {
                break;
            }
            while Instant::now() < at {
                match inflight.front_mut().and_then(|(_, d)| d.now_or_never()) {
                    Some(r) => {
                        let (at, _) = inflight.pop_front().expect("front exists");
                        record_ack((at, r));
                    }
                    None => tokio::task::yield_now().await,
                }
            }
            let intended_ns = (at - base).as_nanos() as u64;
            encode_stamp(&mut value, intended_ns, i);
            match producer.send_to(&topic, (i % n_parts) as u32, None, &value) {
                Ok(d) => inflight.push_back((intended_ns, d)),
                Err(_) => errors.set(errors.get() + 1),
            }
            if intended_ns >= from_ns {
                measured_sent.set(measured_sent.get() + 1);
            }
            i += 1;
        }
        while let Some((at, d)) = inflight.pop_front() {
            record_ack((at, d.await));
        }
        // Let the last pushes arrive.
        let deadline = Instant::now() + Duration::from_secs(5);
        while received.get() < measured_sent.get() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for r in readers {
            r.abort();
        }
        let broker_after = client.metrics().await.ok();
        let catch_up_report = match catch_up {
            Some(started) => {
                let child = started
                    .await
                    .map_err(|e| format!("catch-up reader task: {e}"))??;
                Some(finish_catch_up(child)?)
            }
            None => None,
        };
        let missing = measured_sent.get().saturating_sub(received.get());
        let h = e2e_hist.borrow().clone();
        let run = Run {
            mode: "e2e".into(),
            messages: received.get(),
            bytes: bytes.get(),
            seconds: c.duration.as_secs_f64(),
            errors: errors.get() + missing,
            ack_latency_us: Some(Percentiles::of(&ack_hist.borrow())),
            broker_produce_latency_us: broker_before
                .borrow()
                .as_ref()
                .zip(broker_after.as_ref())
                .and_then(|(b, a)| bucket_percentiles(b, a)),
            settings: serde_json::json!({
                "rate": a.rate, "acks": a.acks, "replication": c.replication, "size": a.size, "linger_us": a.linger_us, "partitions": c.partitions, "sync": c.sync,
                "topic": topic, "spawn": c.spawn, "spawn_cluster": c.spawn_cluster, "broker_cores": c.broker_cores,
                "latency": "intended send time to delivery by push (corrected for coordinated omission)",
                "catch_up": catch_up_report,
            }),
        };
        finish(&c, prog, run, &h)
    })
}

/// `e2e`'s catch-up reader process; killed (and reaped) if the run ends
/// before its report is read, so an e2e that fails leaves nothing behind.
struct CatchUpChild(Option<std::process::Child>);

impl Drop for CatchUpChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `e2e`'s catch-up reader: this program's `consume` mode against
/// the same broker and topic, at nice 19, on this (the harness's) core.
fn start_catch_up(
    addr: &str,
    topic: &str,
    size: usize,
    push: bool,
) -> Result<CatchUpChild, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new("nice");
    cmd.args(["-n", "19"])
        .arg(exe)
        .args(["consume", "--broker", addr, "--topic", topic, "--json"])
        .args(["--size", &size.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    if push {
        cmd.arg("--push");
    }
    cmd.spawn()
        .map(|c| CatchUpChild(Some(c)))
        .map_err(|e| format!("start the catch-up reader: {e}"))
}

/// Waits for the catch-up reader and returns its report.
fn finish_catch_up(mut child: CatchUpChild) -> Result<serde_json::Value, String> {
    let out = child
        .0
        .take()
        .ok_or("the catch-up reader was already finished")?
        .wait_with_output()
        .map_err(|e| format!("catch-up reader: {e}"))?;
    if !out.status.success() {
        return Err(format!("the catch-up reader failed: {}", out.status));
    }
    let r: NetReport = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("catch-up reader's report: {e}"))?;
    Ok(serde_json::json!({
        "mode": r.mode, "mib_per_s": r.mib_per_s, "msgs_per_s": r.msgs_per_s,
        "messages": r.messages, "seconds": r.seconds,
    }))
}

// ---- ping -------------------------------------------------------------------

#[derive(Args, Debug, Clone)]
pub struct PingArgs {
    #[command(flatten)]
    pub common: Common,
    /// Requests per second (open loop).
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
}

/// Open-loop round trips that touch no data: a fetch at the end of an empty
/// partition, answered at once. Latency from each request's intended send
/// time to its answer: the floor the protocol, the network stack, the
/// client and the shard's request loop put under `e2e`, without the log.
pub fn ping(a: PingArgs) -> Result<(), String> {
    if !a.rate.is_finite() || a.rate <= 0.0 {
        return Err("--rate must be positive".into());
    }
    run_mode(a.common.clone(), "perf-ping", move |session| async move {
        let Session {
            c, client, topic, ..
        } = session;
        let conn = client
            .partition_connection(&topic, 0)
            .await
            .map_err(|e| e.to_string())?;
        let hist = Rc::new(RefCell::new(histogram()));
        let (count, errors) = (Rc::new(Cell::new(0u64)), Rc::new(Cell::new(0u64)));
        let base = Instant::now();
        let t0 = base + Duration::from_millis(200);
        let measure_from = t0 + c.warmup;
        let end = measure_from + c.duration;
        let prog = progress(count.clone(), Rc::new(Cell::new(0)), c.out.json);
        let schedule = Schedule::new(t0, a.rate);
        let mut tasks = Vec::new();
        let mut i = 0u64;
        loop {
            let at = schedule.intended(i);
            if at >= end {
                break;
            }
            while Instant::now() < at {
                tokio::task::yield_now().await;
            }
            let (conn, topic, hist, count, errors) = (
                conn.clone(),
                topic.clone(),
                hist.clone(),
                count.clone(),
                errors.clone(),
            );
            tasks.push(tokio::task::spawn_local(async move {
                let r = shoal_client::consumer::fetch_raw(&conn, &topic, 0, 0, 1).await;
                if at < measure_from {
                    return;
                }
                match r {
                    Ok(_) => {
                        let _ = hist
                            .borrow_mut()
                            .record((at.elapsed().as_micros() as u64).max(1));
                        count.set(count.get() + 1);
                    }
                    Err(_) => errors.set(errors.get() + 1),
                }
            }));
            if tasks.len() > 4096 {
                tasks.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
            }
            i += 1;
        }
        for t in tasks {
            let _ = t.await;
        }
        let h = hist.borrow().clone();
        let run = Run {
            mode: "ping".into(),
            messages: count.get(),
            bytes: 0,
            seconds: c.duration.as_secs_f64(),
            errors: errors.get(),
            ack_latency_us: None,
            broker_produce_latency_us: None,
            settings: serde_json::json!({
                "rate": a.rate, "topic": topic, "spawn": c.spawn, "spawn_cluster": c.spawn_cluster, "broker_cores": c.broker_cores,
                "latency": "intended send time to the answer of an empty fetch (open loop)",
            }),
        };
        finish(&c, prog, run, &h)
    })
}

// ---- compare ----------------------------------------------------------------

#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    pub a: PathBuf,
    pub b: PathBuf,
    /// Draw both latency curves (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

pub fn compare(a: CompareArgs) -> Result<(), String> {
    let load = |p: &PathBuf| -> Result<NetReport, String> {
        let text =
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        serde_json::from_str(text.trim())
            .map_err(|e| format!("{} is not a shoal-perf --json report: {e}", p.display()))
    };
    let (ra, rb) = (load(&a.a)?, load(&a.b)?);
    println!(
        "{:<14} {:>14} {:>14} {:>8}",
        "",
        a.a.display(),
        a.b.display(),
        "B/A"
    );
    let row = |name: &str, x: f64, y: f64| {
        let ratio = if x != 0.0 {
            format!("{:.2}", y / x)
        } else {
            "-".into()
        };
        println!("{name:<14} {x:>14.1} {y:>14.1} {ratio:>8}");
    };
    row("msgs/s", ra.msgs_per_s, rb.msgs_per_s);
    row("MiB/s", ra.mib_per_s, rb.mib_per_s);
    for (name, x, y) in [
        ("p50 µs", ra.latency_us.p50, rb.latency_us.p50),
        ("p90 µs", ra.latency_us.p90, rb.latency_us.p90),
        ("p99 µs", ra.latency_us.p99, rb.latency_us.p99),
        ("p99.9 µs", ra.latency_us.p999, rb.latency_us.p999),
        ("p99.99 µs", ra.latency_us.p9999, rb.latency_us.p9999),
        ("max µs", ra.latency_us.max, rb.latency_us.max),
    ] {
        row(name, x, y);
    }
    if let Some(p) = &a.plot {
        let svg = report::svg_plot(
            "shoal-perf compare",
            &[
                (a.a.display().to_string(), ra.percentiles),
                (a.b.display().to_string(), rb.percentiles),
            ],
        );
        std::fs::write(p, svg).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_buckets_give_window_percentiles() {
        let m = |v: &[(u64, u64)], count: u64| -> Vec<(String, u64)> {
            let mut out: Vec<(String, u64)> = v
                .iter()
                .map(|(b, c)| (format!("produce_latency_us_le_{b}"), *c))
                .collect();
            out.push(("produce_latency_us_count".into(), count));
            out
        };
        // Before: 100 requests, all under 50 µs. After: 1000 more, of which
        // 990 under 100 µs, 9 under 1000 and one over every bound.
        let before = m(&[(50, 100), (100, 100), (1000, 100)], 100);
        let after = m(&[(50, 100), (100, 1090), (1000, 1099)], 1100);
        let p = bucket_percentiles(&before, &after).unwrap();
        assert_eq!((p.p50, p.p90, p.p99), (100.0, 100.0, 100.0));
        assert_eq!(p.p999, 1000.0);
        assert_eq!(p.max, OVER_LAST_BOUND_US);
        assert!(bucket_percentiles(&before, &before).is_none());
        assert!(bucket_percentiles(&[], &after).is_none());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("10h").is_err());
    }

    #[test]
    fn schedule_is_open_loop() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 10_000.0);
        assert_eq!(s.intended(0), t0);
        assert_eq!(s.intended(10_000) - t0, Duration::from_secs(1));
        assert_eq!(s.intended(3) - t0, Duration::from_micros(300));
        // Intended times depend on the index only, never on when a message
        // was actually sent: a stall shows up as latency, not as a gap.
        let late = Schedule { start: t0, ..s };
        assert_eq!(late.intended(5_000), s.intended(5_000));
    }

    #[test]
    fn stamps_roundtrip() {
        let mut v = vec![0u8; 32];
        encode_stamp(&mut v, 123_456_789, 42);
        assert_eq!(decode_stamp(&v), Some((123_456_789, 42)));
        assert_eq!(decode_stamp(&v[..10]), None);
    }

    #[test]
    fn report_json_shape() {
        let mut h = histogram();
        h.record(100).unwrap();
        let r = NetReport {
            mode: "e2e".into(),
            msgs_per_s: 1.0,
            mib_per_s: 2.0,
            messages: 3,
            seconds: 1.0,
            errors: 0,
            latency_us: Percentiles::of(&h),
            ack_latency_us: None,
            broker_produce_latency_us: None,
            line_rate_fraction: Some(0.5),
            settings: serde_json::json!({"rate": 1}),
            percentiles: report::curve(&h),
        };
        let v = serde_json::to_value(&r).unwrap();
        for k in [
            "msgs_per_s",
            "mib_per_s",
            "latency_us",
            "settings",
            "line_rate_fraction",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        for k in ["p50", "p90", "p99", "p999", "p9999", "max"] {
            assert!(v["latency_us"].get(k).is_some(), "{k}");
        }
        let back: NetReport = serde_json::from_value(v).unwrap();
        assert_eq!(back.latency_us, r.latency_us);
    }
}
