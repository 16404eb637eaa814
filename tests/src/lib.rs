//! Harness for integration tests: starts the real `shoal` binary as a
//! process on free 127.0.0.1 ports with its own data directory, and stops
//! it gracefully (SIGTERM) or kills it (SIGKILL).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `shoal` binary built by this workspace (or `$SHOAL_BIN`).
pub fn shoal_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SHOAL_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps");
    let bin = dir.join("shoal");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --workspace --bins)",
        bin.display()
    );
    bin
}

/// A base port with `shards` free ports after it, below the kernel's
/// ephemeral range (32768+): a connect to a port in that range can pick
/// the same port as its source and connect to itself.
///
/// Each port is leased for the rest of this process: a lock file per port
/// under the temp directory (`flock`, released by the kernel when the
/// process exits), so no other test thread or test process picks a port
/// between the check and the broker's bind, nor while a killed broker is
/// down before its restart on the same port.
fn free_ports(shards: usize) -> u16 {
    static LEASES: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("shoal-test-ports");
    std::fs::create_dir_all(&dir).expect("port lease directory");
    let mut leases = LEASES.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..500 {
        let base = 10000 + rand::random::<u16>() % 20000;
        let mut taken = Vec::new();
        for port in base..=base + shards as u16 {
            let lease = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(port.to_string()))
                .expect("port lease file");
            if lease.try_lock().is_err() || TcpListener::bind(("127.0.0.1", port)).is_err() {
                break;
            }
            taken.push(lease);
        }
        if taken.len() == shards + 1 {
            leases.extend(taken);
            return base;
        }
    }
    panic!("no free port range found");
}

/// A current-thread tokio runtime for a test's client calls.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// One free 127.0.0.1 port, leased like a broker's (see [`free_ports`]).
pub fn free_port() -> u16 {
    free_ports(0)
}

/// A leased base port with `n` more after it (a broker's public port and
/// its `n` shard ports).
pub fn free_port_range(n: usize) -> u16 {
    free_ports(n)
}

/// A private ZooKeeper server (Debian's `zookeeper` package, run from its
/// jars) on a free port with its own data directory: up in about a
/// second, a low tickTime so short session timeouts are allowed.
pub struct ZooKeeper {
    pub port: u16,
    /// The address it listens on (127.0.0.1 unless started elsewhere).
    pub host: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// Where Debian's package puts ZooKeeper.
const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";

impl ZooKeeper {
    pub fn start() -> ZooKeeper {
        ZooKeeper::start_on("127.0.0.1")
    }

    /// A ZooKeeper listening on `host` (an address of a test network).
    pub fn start_on(host: &str) -> ZooKeeper {
        assert!(
            std::path::Path::new(ZOOKEEPER_JAR).exists(),
            "{ZOOKEEPER_JAR} not found: install Debian's zookeeper package (scripts/test.sh does)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let mut zk = ZooKeeper {
            port: free_ports(0),
            host: host.to_string(),
            dir,
            child: None,
        };
        let cfg = format!(
            "tickTime=100\ndataDir={}\nclientPort={}\nclientPortAddress={}\n\
             admin.enableServer=false\n4lw.commands.whitelist=ruok,srvr\n\
             minSessionTimeout=200\nmaxSessionTimeout=20000\n",
            zk.dir.path().join("data").display(),
            zk.port,
            host
        );
        std::fs::write(zk.dir.path().join("zoo.cfg"), cfg).expect("zoo.cfg");
        zk.spawn();
        zk
    }

    /// The connect string brokers take (`--zookeeper`).
    pub fn connect(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("zk.log")).expect("zk log");
        let child = Command::new("java")
            .args([
                "-Xmx256m",
                "-cp",
                &format!("/etc/zookeeper/conf:{ZOOKEEPER_JAR}"),
            ])
            .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
            .arg(self.dir.path().join("zoo.cfg"))
            .stdout(log.try_clone().expect("zk log"))
            .stderr(log)
            .spawn()
            .expect("start ZooKeeper (java)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.ruok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("ZooKeeper did not start on port {}", self.port);
    }

    /// Serving: `srvr` reports the server's mode (`ruok` answers earlier,
    /// before the server takes sessions).
    fn ruok(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = TcpStream::connect((self.host.as_str(), self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut out = String::new();
        s.write_all(b"srvr").is_ok() && s.read_to_string(&mut out).is_ok() && out.contains("Mode:")
    }

    /// SIGKILL the server (its data stays).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.spawn();
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Three cluster members around `zk` (ids 1-3, one shard each, on cores
/// 0 and 1 in turn), with `racks[i]` as broker i+1's rack where given and
/// a 1.5 s ZooKeeper session timeout.
pub fn three_brokers(zk: &ZooKeeper, racks: &[&str]) -> Vec<Broker> {
    (1..=3u32)
        .map(|id| {
            let cores = if id % 2 == 0 { "1" } else { "0" };
            let extra: Vec<&str> = racks
                .get(id as usize - 1)
                .map_or(vec![], |r| vec!["--rack", r]);
            Broker::start_member(
                cores,
                &zk.connect(),
                id,
                "zk_session_timeout_ms = 1500\n",
                &extra,
            )
        })
        .collect()
}

/// Three cluster members with auth on (superuser `admin`), on alternating
/// cores, each with `toml` and the environment `env` (the passwords).
pub fn three_auth_brokers(zk: &ZooKeeper, toml: &str, env: &[(&str, &str)]) -> Vec<Broker> {
    (1..=3u32)
        .map(|id| {
            let cores = if id % 2 == 0 { "1" } else { "0" };
            let id = id.to_string();
            Broker::start_env(
                cores,
                toml,
                &[
                    "--zookeeper",
                    &zk.connect(),
                    "--broker-id",
                    &id,
                    "--auth",
                    "--superuser",
                    "admin",
                ],
                env,
            )
        })
        .collect()
}

/// Creates `topic` with one partition, three replicas and at least two in
/// sync for acks=all, trying again for `within` (a cluster still forming
/// answers ClusterUnavailable; an attempt that timed out at the client may
/// have created it, so TopicExists is done).
pub async fn create_replicated_topic(admin: &shoal_client::Client, topic: &str, within: Duration) {
    let mut t = shoal_client::NewTopic::new(topic, 1);
    t.replication_factor = 3;
    t.min_insync_replicas = Some(2);
    let deadline = Instant::now() + within;
    loop {
        match admin.create_topic(&t).await {
            Ok(()) => return,
            Err(e) if e.code() == Some(shoal_client::ErrorCode::TopicExists) => return,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("create {topic}: {e}"),
        }
    }
}

/// The failover check of the cluster tests: 50 acks=all records
/// (`m0`..`m49`) written to `topic` through a client with `writer`, a
/// kill -9 of the leader of its partition 0, then every record read back
/// from a surviving broker through a client with `reader`. An
/// acknowledged record that did not survive fails the test.
pub async fn acks_all_records_survive_the_leaders_kill(
    brokers: &mut [Broker],
    addrs: &[String],
    topic: &str,
    writer: shoal_client::ClientConfig,
    reader: shoal_client::ClientConfig,
) {
    use shoal_client::{Acks, Client, Consumer, ConsumerConfig, Producer, ProducerConfig, StartAt};
    let client = Client::connect_with_config(&addrs.join(","), writer)
        .await
        .expect("the writer connects");
    let producer = Producer::new(
        client.clone(),
        ProducerConfig {
            acks: Acks::All,
            ..ProducerConfig::default()
        },
    );
    for i in 0..50u32 {
        producer
            .send(topic, None, format!("m{i}").as_bytes())
            .await
            .expect("an acks=all record is acknowledged");
    }
    let leader = client
        .describe_topic(topic)
        .await
        .expect("describe")
        .partitions[0]
        .leader_broker as usize;
    brokers[leader - 1].kill9();
    let survivor = &addrs[if leader == 1 { 1 } else { 0 }];
    let reader = Client::connect_with_config(survivor, reader)
        .await
        .expect("the reader connects to a survivor");
    let mut consumer = Consumer::new(reader, ConsumerConfig::default());
    consumer
        .assign_all(topic, StartAt::Beginning)
        .await
        .expect("assign");
    let mut got = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < 50 && Instant::now() < deadline {
        for r in consumer.poll().await.expect("poll") {
            got.insert(
                String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned(),
            );
        }
    }
    let sent: std::collections::BTreeSet<String> = (0..50).map(|i| format!("m{i}")).collect();
    assert_eq!(got, sent, "every acks=all record after the leader's kill");
}

/// Polls `f` until it holds or `within` passes (then panics naming
/// `what`); returns the time it took.
pub fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f() {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {within:?}");
}

pub struct Broker {
    pub port: u16,
    pub shards: usize,
    pub data: tempfile::TempDir,
    cores: String,
    child: Option<Child>,
    log: PathBuf,
    relative: bool,
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    /// More `shoal serve` flags, and the CPUs the process may run on (its
    /// affinity mask), for [`Broker::start_custom`].
    extra_args: Vec<String>,
    affinity: Option<Vec<usize>>,
    /// The address it listens on, and the network namespace it runs in
    /// (see [`netns::Net`]).
    pub host: String,
    netns: Option<String>,
    /// More environment for the broker process (e.g. passwords).
    env: Vec<(String, String)>,
}

impl Broker {
    /// [`Broker::start_member`] inside network namespace `ns`, listening on
    /// `host` (an address of that namespace).
    pub fn start_member_in(
        ns: &str,
        host: &str,
        cores: &str,
        zk: &str,
        id: u32,
        toml: &str,
    ) -> Broker {
        let data = tempfile::tempdir().expect("temp dir");
        let config = data.path().join("shoal.toml");
        std::fs::write(&config, toml).expect("config file");
        let mut b = Broker {
            port: free_ports(cores.split(',').count()),
            shards: cores.split(',').count(),
            log: data.path().join("broker.log"),
            data,
            cores: cores.into(),
            child: None,
            relative: false,
            config: Some(config),
            data_dir: None,
            extra_args: vec![
                "--zookeeper".into(),
                zk.into(),
                "--broker-id".into(),
                id.to_string(),
            ],
            affinity: None,
            host: host.into(),
            netns: Some(ns.into()),
            env: Vec::new(),
        };
        b.spawn();
        b
    }

    /// Starts a cluster member: `--zookeeper zk --broker-id id`, plus
    /// `toml` as its config file and `extra` flags.
    pub fn start_member(cores: &str, zk: &str, id: u32, toml: &str, extra: &[&str]) -> Broker {
        let data = tempfile::tempdir().expect("temp dir");
        let config = data.path().join("shoal.toml");
        std::fs::write(&config, toml).expect("config file");
        let shards = cores.split(',').count();
        let mut args = vec![
            "--zookeeper".to_string(),
            zk.to_string(),
            "--broker-id".to_string(),
            id.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut b = Broker {
            port: free_ports(shards),
            shards,
            log: data.path().join("broker.log"),
            data,
            cores: cores.into(),
            child: None,
            relative: false,
            config: Some(config),
            data_dir: None,
            extra_args: args,
            affinity: None,
            host: "127.0.0.1".into(),
            netns: None,
            env: Vec::new(),
        };
        b.spawn();
        b
    }

    /// Runs `shoal serve` with these flags and waits for it to exit
    /// (for starts that must fail); returns (success, log).
    pub fn run_to_exit(cores: &str, args: &[&str], timeout: Duration) -> (bool, String, Duration) {
        let data = tempfile::tempdir().expect("temp dir");
        let port = free_ports(cores.split(',').count());
        let t0 = Instant::now();
        let mut child = Command::new(shoal_bin())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--cores",
                cores,
            ])
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start shoal");
        let deadline = t0 + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return (status.success(), err, t0.elapsed());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("shoal serve {args:?} did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    /// Starts a broker on `cores` (e.g. "0,1") and waits until it serves.
    pub fn start(cores: &str) -> Broker {
        Broker::start_in(cores, None, None)
    }

    /// Like [`Broker::start`], with `toml` as its config file (`--config`).
    pub fn start_with_config(cores: &str, toml: &str) -> Broker {
        Broker::start_in(cores, None, Some(toml))
    }

    /// Like [`Broker::start`], with the broker's working directory set and
    /// its data directory given relative to it (`--data-dir data`), the way
    /// the README's quick start runs it.
    pub fn start_relative(cores: &str) -> Broker {
        Broker::start_in(cores, Some(()), None)
    }

    fn start_in(cores: &str, relative: Option<()>, toml: Option<&str>) -> Broker {
        let shards = cores.split(',').count();
        let data = tempfile::tempdir().expect("temp dir");
        let log = data.path().join("broker.log");
        let config = toml.map(|t| {
            let p = data.path().join("shoal.toml");
            std::fs::write(&p, t).expect("config file");
            p
        });
        let mut b = Broker {
            port: free_ports(shards),
            shards,
            data,
            cores: cores.into(),
            child: None,
            log,
            relative: relative.is_some(),
            data_dir: None,
            config,
            extra_args: Vec::new(),
            affinity: None,
            host: "127.0.0.1".into(),
            netns: None,
            env: Vec::new(),
        };
        b.spawn();
        b
    }

    /// Like [`Broker::start_with_config`], with the data directory at
    /// `data_dir` (e.g. on a small file system of its own).
    pub fn start_at(cores: &str, data_dir: PathBuf, toml: &str) -> Broker {
        let data = tempfile::tempdir().expect("temp dir");
        let config = data.path().join("shoal.toml");
        std::fs::write(&config, toml).expect("config file");
        let shards = cores.split(',').count();
        let mut b = Broker {
            port: free_ports(shards),
            shards,
            log: data.path().join("broker.log"),
            data,
            cores: cores.into(),
            child: None,
            relative: false,
            config: Some(config),
            data_dir: Some(data_dir),
            extra_args: Vec::new(),
            affinity: None,
            host: "127.0.0.1".into(),
            netns: None,
            env: Vec::new(),
        };
        b.spawn();
        b
    }

    /// A broker with `shards` shards, started with `--cores cores` if given
    /// (else none: a core plan in `args` or the default), more flags
    /// `args`, and its affinity mask set to `affinity` (as `taskset` does).
    pub fn start_custom(
        cores: Option<&str>,
        shards: usize,
        args: &[&str],
        affinity: Option<&[usize]>,
    ) -> Broker {
        let data = tempfile::tempdir().expect("temp dir");
        let mut b = Broker {
            port: free_ports(shards),
            shards,
            log: data.path().join("broker.log"),
            data,
            cores: cores.unwrap_or("").into(),
            child: None,
            relative: false,
            config: None,
            data_dir: None,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            affinity: affinity.map(<[usize]>::to_vec),
            host: "127.0.0.1".into(),
            netns: None,
            env: Vec::new(),
        };
        b.spawn();
        b
    }

    /// A broker with `toml` as its config file, more `shoal serve` flags
    /// `args` (`--auth`, or `--zookeeper ... --broker-id N` for a cluster
    /// member) and more environment `env` (passwords).
    pub fn start_env(cores: &str, toml: &str, args: &[&str], env: &[(&str, &str)]) -> Broker {
        let data = tempfile::tempdir().expect("temp dir");
        let config = data.path().join("shoal.toml");
        std::fs::write(&config, toml).expect("config file");
        let shards = cores.split(',').count();
        let mut b = Broker {
            port: free_ports(shards),
            shards,
            log: data.path().join("broker.log"),
            data,
            cores: cores.into(),
            child: None,
            relative: false,
            config: Some(config),
            data_dir: None,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            affinity: None,
            host: "127.0.0.1".into(),
            netns: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        b.spawn();
        b
    }

    /// Where the broker keeps its topics and partitions.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| self.data.path().join("data"))
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = match &self.netns {
            // `ip netns exec` execs the broker: the child's pid is the
            // broker's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(shoal_bin());
                c
            }
            None => Command::new(shoal_bin()),
        };
        cmd.args(["serve", "--listen", &self.addr()]);
        if !self.cores.is_empty() {
            cmd.args(["--cores", &self.cores]);
        }
        cmd.args(&self.extra_args).arg("--data-dir");
        if self.relative {
            cmd.current_dir(self.data.path()).arg("data");
        } else {
            cmd.arg(self.data_dir());
        }
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        if let Some(cpus) = self.affinity.clone() {
            set_affinity_on_exec(&mut cmd, cpus);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = cmd
            // The harness waits for the INFO line "shoal is ready".
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start shoal");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let ports: Vec<u16> = (0..=self.shards as u16).map(|i| self.port + i).collect();
        let ready_before = self.log_text().matches("shoal is ready").count();
        while Instant::now() < deadline {
            let ready = self.log_text().matches("shoal is ready").count() > ready_before;
            let up = ready
                && ports.iter().all(|p| {
                    let a: SocketAddr = format!("{}:{p}", self.host).parse().expect("addr");
                    TcpStream::connect_timeout(&a, Duration::from_millis(100)).is_ok()
                });
            if up {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("shoal exited with {status}: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("shoal did not start listening: {}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no flush, no checkpoint.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit success.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        // SAFETY: sends a signal to our own child process by pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        false
    }

    /// Starts the broker again on the same ports and data.
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// The broker process' id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the broker process, in bytes (from /proc).
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `cmd` with its affinity mask set to `cpus`, as `taskset -c` would.
pub fn set_affinity_on_exec(cmd: &mut Command, cpus: Vec<usize>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the child between fork and exec; sched_setaffinity
    // is async-signal-safe and touches only the set built here.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in &cpus {
                libc::CPU_SET(c, &mut set);
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The CPUs this (test) process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: all zeroes is the empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: writes at most size_of::<cpu_set_t>() bytes into `set`.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    assert_eq!(rc, 0, "sched_getaffinity");
    (0..8 * std::mem::size_of::<libc::cpu_set_t>())
        // SAFETY: reads the set, within its size.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// The allowed CPUs of each thread of process `pid`, by thread name.
pub fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field("Cpus_allowed_list:")));
    }
    out
}

/// Cores for a two-shard broker where the machine has them, else one.
pub fn two_shards() -> &'static str {
    if std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        >= 2
    {
        "0,1"
    } else {
        "0"
    }
}

/// Raw protocol helpers for tests that speak bytes to the broker (as a
/// hostile or careless client would), bypassing the Rust client.
pub mod groupraw;

pub mod raw {
    use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};
    use shoal_wire::frame::{self, Check};
    use shoal_wire::{fb, BatchBuilder, NewRecord};
    use std::io::Read;
    use std::net::TcpStream;

    /// A whole request frame (no payload) whose body `build` makes.
    pub fn request(
        corr: u32,
        body_type: fb::RequestBody,
        build: impl FnOnce(&mut FlatBufferBuilder<'static>) -> WIPOffset<UnionWIPOffset>,
    ) -> Vec<u8> {
        request_with(corr, body_type, build, &[])
    }

    /// A whole request frame with `payload` after its header.
    pub fn request_with(
        corr: u32,
        body_type: fb::RequestBody,
        build: impl FnOnce(&mut FlatBufferBuilder<'static>) -> WIPOffset<UnionWIPOffset>,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut fbb = FlatBufferBuilder::new();
        let body = build(&mut fbb);
        let req = fb::Request::create(
            &mut fbb,
            &fb::RequestArgs {
                version: 1,
                correlation_id: corr,
                client_id: None,
                body_type,
                body: Some(body),
            },
        );
        fbb.finish(req, None);
        let mut out = Vec::new();
        frame::write_frame(&mut out, fbb.finished_data(), payload);
        out
    }

    /// A push subscription to partition 0 of `topic` from offset 0.
    pub fn subscribe(corr: u32, topic: &str, credit_bytes: u64) -> Vec<u8> {
        request(corr, fb::RequestBody::SubscribeRequest, |fbb| {
            let t = fbb.create_string(topic);
            fb::SubscribeRequest::create(
                fbb,
                &fb::SubscribeRequestArgs {
                    topic: Some(t),
                    topic_id: 0,
                    partition: 0,
                    offset: 0,
                    credit_bytes,
                },
            )
            .as_union_value()
        })
    }

    /// Reads one response frame's header (what is left over stays in
    /// `buf`); `None` if the connection closed first.
    pub fn read_header(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            if let Ok(Check::Complete(p)) = frame::check_response(buf) {
                let h = buf[p.header].to_vec();
                buf.drain(..p.total);
                return Some(h);
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads one response frame: its header and payload (what is left
    /// over stays in `buf`); `None` if the connection closed first.
    pub fn read_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(Vec<u8>, Vec<u8>)> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            if let Ok(Check::Complete(p)) = frame::check_response(buf) {
                let h = buf[p.header].to_vec();
                let payload = buf[p.payload].to_vec();
                buf.drain(..p.total);
                return Some((h, payload));
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// One batch of `n` records of `size` bytes, each value starting with
    /// its sequence number (10 digits, from `first_seq` or 0), idempotent
    /// when `producer_id` is not -1.
    pub fn batch(producer_id: i64, first_seq: i32, n: usize, size: usize) -> Vec<u8> {
        let mut b = BatchBuilder::default();
        for i in 0..n {
            let mut value = format!("{:010}", first_seq.max(0) as usize + i).into_bytes();
            value.resize(size.max(10), b'x');
            b.push(&NewRecord {
                key: None,
                value: Some(&value),
                timestamp_ms: 1,
                headers: &[],
            })
            .expect("record fits");
        }
        b.finish(producer_id, 0, first_seq)
    }
}

/// Cluster metadata over the raw protocol, for tests that follow leaders
/// and in-sync sets.
pub mod meta {
    use super::raw;
    use shoal_wire::fb;
    use std::io::Write;
    use std::net::TcpStream;
    use std::time::Duration;

    #[derive(Debug, Clone)]
    pub struct Part {
        pub leader: u32,
        pub shard: u16,
        pub replicas: Vec<u32>,
        pub isr: Vec<u32>,
        pub offline: bool,
    }

    #[derive(Debug)]
    pub struct Meta {
        /// (id, port, shard ports, rack)
        pub brokers: Vec<(u32, u16, Vec<u16>, String)>,
        pub controller: i32,
        pub cluster: String,
        pub topics: Vec<(String, Vec<Part>)>,
    }

    impl Meta {
        pub fn ids(&self) -> Vec<u32> {
            self.brokers.iter().map(|b| b.0).collect()
        }
        pub fn topic(&self, name: &str) -> Vec<Part> {
            self.topics
                .iter()
                .find(|t| t.0 == name)
                .map(|t| t.1.clone())
                .unwrap_or_else(|| panic!("no topic {name} in {self:?}"))
        }
        pub fn shard_port(&self, broker: u32, shard: u16) -> u16 {
            let b = self.brokers.iter().find(|b| b.0 == broker).expect("broker");
            b.2[shard as usize]
        }
    }

    /// One request, one response header (raw protocol).
    pub fn call(port: u16, frame: Vec<u8>) -> Vec<u8> {
        try_call(port, frame).expect("a response")
    }

    /// [`call`], `None` if the broker is down or does not answer.
    pub fn try_call(port: u16, frame: Vec<u8>) -> Option<Vec<u8>> {
        try_call_at("127.0.0.1", port, frame)
    }

    /// [`try_call`] to a broker listening on `host`.
    pub fn try_call_at(host: &str, port: u16, frame: Vec<u8>) -> Option<Vec<u8>> {
        call_within(host, port, frame, Duration::from_secs(30))
    }

    /// One request and its answer within `wait` (a stopped broker's kernel
    /// still accepts the connection: only the answer tells).
    fn call_within(host: &str, port: u16, frame: Vec<u8>, wait: Duration) -> Option<Vec<u8>> {
        let a: std::net::SocketAddr = format!("{host}:{port}").parse().ok()?;
        let mut s = TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(wait)).ok()?;
        s.write_all(&frame).ok()?;
        let mut buf = Vec::new();
        raw::read_header(&mut s, &mut buf)
    }

    pub fn metadata(port: u16) -> Meta {
        try_metadata(port).expect("metadata")
    }

    /// [`metadata`], `None` if the broker is down or answers an error.
    pub fn try_metadata(port: u16) -> Option<Meta> {
        try_metadata_at("127.0.0.1", port)
    }

    /// [`try_metadata`] of a broker listening on `host`.
    pub fn try_metadata_at(host: &str, port: u16) -> Option<Meta> {
        let h = call_within(
            host,
            port,
            raw::request(1, fb::RequestBody::MetadataRequest, |fbb| {
                fb::MetadataRequest::create(fbb, &fb::MetadataRequestArgs { topics: None })
                    .as_union_value()
            }),
            Duration::from_secs(3),
        )?;
        let r = flatbuffers::root::<fb::Response>(&h).ok()?;
        if r.error_code() != 0 {
            return None;
        }
        let m = r.body_as_metadata_response()?;
        Some(Meta {
            brokers: m
                .brokers()
                .map(|v| {
                    v.iter()
                        .map(|b| {
                            (
                                b.id(),
                                b.port(),
                                b.shard_ports()
                                    .map(|p| p.iter().collect())
                                    .unwrap_or_default(),
                                b.rack().unwrap_or_default().to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            controller: m.controller_id(),
            cluster: m.cluster().unwrap_or_default().to_string(),
            topics: m
                .topics()
                .map(|v| {
                    v.iter()
                        .map(|t| {
                            let parts = t
                                .partitions()
                                .map(|ps| {
                                    ps.iter()
                                        .map(|p| Part {
                                            leader: p.leader_broker(),
                                            shard: p.shard(),
                                            replicas: p
                                                .replicas()
                                                .map(|x| x.iter().collect())
                                                .unwrap_or_default(),
                                            isr: p
                                                .isr()
                                                .map(|x| x.iter().collect())
                                                .unwrap_or_default(),
                                            offline: p.offline(),
                                        })
                                        .collect()
                                })
                                .unwrap_or_default();
                            (t.name().unwrap_or_default().to_string(), parts)
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// Creates a topic; returns the error code (0 = created) and message.
    pub fn create_topic(port: u16, name: &str, partitions: u32, rf: u16) -> (u16, String) {
        let h = call(
            port,
            raw::request(1, fb::RequestBody::CreateTopicRequest, |fbb| {
                let n = fbb.create_string(name);
                fb::CreateTopicRequest::create(
                    fbb,
                    &fb::CreateTopicRequestArgs {
                        name: Some(n),
                        partitions,
                        replication_factor: rf,
                        ..Default::default()
                    },
                )
                .as_union_value()
            }),
        );
        let r = flatbuffers::root::<fb::Response>(&h).expect("response");
        (
            r.error_code(),
            r.error_message().unwrap_or_default().to_string(),
        )
    }
}

/// Network namespaces on a private bridge, for partition tests: the test
/// process (root namespace) is `10.S.0.1`, a ZooKeeper there can listen
/// on `10.S.0.2`, member `i` is `10.S.0.(10+i)` in namespace `ns(i)`.
/// [`Net::cut`] makes a member unable to reach some addresses (blackhole
/// routes inside its namespace: its packets to them are dropped, so both
/// directions of those connections die) while the test process still
/// reaches it. Everything is deleted on drop (only what this made).
pub mod netns {
    use std::process::Command;

    pub struct Net {
        id: String,
        subnet: u32,
        members: usize,
    }

    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    impl Net {
        pub fn new(members: usize) -> Net {
            let pid = std::process::id() % 100_000;
            let net = Net {
                id: pid.to_string(),
                subnet: 100 + pid % 100,
                members,
            };
            let br = net.bridge();
            ip(&["link", "add", &br, "type", "bridge"]);
            ip(&["addr", "add", &format!("{}/24", net.host()), "dev", &br]);
            ip(&["addr", "add", &format!("{}/24", net.zk_host()), "dev", &br]);
            ip(&["link", "set", &br, "up"]);
            for i in 1..=members {
                let (ns, v, p) = (
                    net.ns(i),
                    format!("shv{}x{i}", net.id),
                    format!("shp{}x{i}", net.id),
                );
                ip(&["netns", "add", &ns]);
                ip(&["link", "add", &v, "type", "veth", "peer", "name", &p]);
                ip(&["link", "set", &p, "netns", &ns]);
                ip(&["link", "set", &v, "master", &br, "up"]);
                let addr = format!("{}/24", net.ip(i));
                ip(&["netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", &p]);
                ip(&["netns", "exec", &ns, "ip", "link", "set", &p, "up"]);
                ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
            }
            net
        }

        fn bridge(&self) -> String {
            format!("shb{}", self.id)
        }

        /// The test process's address.
        pub fn host(&self) -> String {
            format!("10.{}.0.1", self.subnet)
        }

        /// An address in the root namespace for ZooKeeper.
        pub fn zk_host(&self) -> String {
            format!("10.{}.0.2", self.subnet)
        }

        /// Member `i`'s address (1-based).
        pub fn ip(&self, i: usize) -> String {
            format!("10.{}.0.{}", self.subnet, 10 + i)
        }

        pub fn ns(&self, i: usize) -> String {
            format!("shn{}x{i}", self.id)
        }

        /// Member `i` can no longer reach `hosts`.
        pub fn cut(&self, i: usize, hosts: &[String]) {
            self.blackhole(i, hosts, "add");
        }

        /// Undoes [`Net::cut`].
        pub fn heal(&self, i: usize, hosts: &[String]) {
            self.blackhole(i, hosts, "del");
        }

        fn blackhole(&self, i: usize, hosts: &[String], op: &str) {
            let ns = self.ns(i);
            for h in hosts {
                let to = format!("{h}/32");
                ip(&["netns", "exec", &ns, "ip", "route", op, "blackhole", &to]);
            }
        }
    }

    impl Drop for Net {
        fn drop(&mut self) {
            for i in 1..=self.members {
                let _ = Command::new("ip")
                    .args(["netns", "del", &self.ns(i)])
                    .output();
            }
            let _ = Command::new("ip")
                .args(["link", "del", &self.bridge()])
                .output();
        }
    }
}

/// Certificates for TLS tests, made at run time with rcgen into a temp
/// dir: a CA, a broker certificate for 127.0.0.1 and localhost (usable by
/// brokers as servers and, towards each other, as clients), client
/// certificates by name, and a second CA that signed nothing the brokers
/// trust.
pub mod pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    use std::path::{Path, PathBuf};

    pub struct Pki {
        pub dir: tempfile::TempDir,
        ca_cert: rcgen::Certificate,
        ca_key: KeyPair,
        /// PEM files.
        pub ca: PathBuf,
        pub broker_cert: PathBuf,
        pub broker_key: PathBuf,
        /// A CA of its own, self-signed, that signed nothing else.
        pub other_ca: PathBuf,
    }

    fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        (p.self_signed(&key).expect("CA certificate"), key)
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write a PEM file");
        p
    }

    impl Pki {
        pub fn new() -> Pki {
            let dir = tempfile::tempdir().expect("temp dir");
            let (ca_cert, ca_key) = ca("shoal test CA");
            let (other_cert, _) = ca("some other CA");
            let ca = write(dir.path(), "ca.pem", &ca_cert.pem());
            let other_ca = write(dir.path(), "other-ca.pem", &other_cert.pem());
            let mut pki = Pki {
                dir,
                ca_cert,
                ca_key,
                ca,
                broker_cert: PathBuf::new(),
                broker_key: PathBuf::new(),
                other_ca,
            };
            let (c, k) = pki.issue("broker", &["localhost"], true, "broker");
            pki.broker_cert = c;
            pki.broker_key = k;
            pki
        }

        /// A certificate signed by the CA: subject CN `cn`, DNS names
        /// `dns` (plus IP 127.0.0.1 for a server), written as
        /// `<file>.pem` and `<file>-key.pem`.
        pub fn issue(
            &self,
            cn: &str,
            dns: &[&str],
            server: bool,
            file: &str,
        ) -> (PathBuf, PathBuf) {
            self.sign(cn, dns, server, server, file)
        }

        /// A server certificate for DNS names only: no IP address, so a
        /// client that connects to 127.0.0.1 and expects that address
        /// must refuse it.
        pub fn issue_for_names(&self, cn: &str, dns: &[&str], file: &str) -> (PathBuf, PathBuf) {
            self.sign(cn, dns, true, false, file)
        }

        fn sign(
            &self,
            cn: &str,
            dns: &[&str],
            server: bool,
            ip: bool,
            file: &str,
        ) -> (PathBuf, PathBuf) {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.distinguished_name.push(DnType::CommonName, cn);
            for d in dns {
                p.subject_alt_names
                    .push(SanType::DnsName((*d).try_into().expect("a DNS name")));
            }
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            if ip {
                p.subject_alt_names
                    .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
            }
            if server {
                p.extended_key_usages
                    .push(ExtendedKeyUsagePurpose::ServerAuth);
            }
            let cert = p
                .signed_by(&key, &self.ca_cert, &self.ca_key)
                .expect("sign");
            (
                write(self.dir.path(), &format!("{file}.pem"), &cert.pem()),
                write(
                    self.dir.path(),
                    &format!("{file}-key.pem"),
                    &key.serialize_pem(),
                ),
            )
        }

        /// Broker TOML lines for TLS with this CA (for clients too when
        /// `client_auth` is `requested` or `required`).
        pub fn broker_toml(&self, client_auth: &str) -> String {
            let mut t = format!(
                "tls_cert = {:?}\ntls_key = {:?}\ntls_ca = {:?}\n",
                self.broker_cert, self.broker_key, self.ca
            );
            if client_auth != "none" {
                t += &format!(
                    "tls_client_ca = {:?}\ntls_client_auth = {client_auth:?}\n",
                    self.ca
                );
            }
            t
        }
    }

    impl Default for Pki {
        fn default() -> Pki {
            Pki::new()
        }
    }
}
