//! Broker configuration: `shoal serve` flags and the TOML file.
//!
//! Every setting can be given in the file (`--config shoal.toml`); a flag
//! given on the command line wins over the file. Documented in README.md.

use crate::error::{Error, Result};
use crate::limits;
use serde::Deserialize;
use shoal_shard::SyncMode;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default idle spin of a shard before it parks, in microseconds.
///
/// 0: a shard with nothing to do sleeps in the kernel at once. Spinning
/// wins a little median latency but holds the core against the kernel work
/// the shard itself waits for (io_uring's io-wq workers for fdatasync and
/// punted writes, interrupt and completion work), which showed in the tail:
/// `shoal-perf e2e --spawn --rate 10000 --duration 8s`, six alternating
/// pairs, medians: p50 262 vs 224 µs, p99 859 vs 1652 µs, p99.9 3.9 vs
/// 10.2 ms for 0 vs 200 µs of spin; produce throughput unchanged.
pub const IDLE_SPIN_US_DEFAULT: u64 = 0;

/// Settings as read from the TOML file (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub cores: Option<String>,
    pub core_plan: Option<PathBuf>,
    pub metrics_listen: Option<String>,
    pub log_format: Option<String>,
    pub advertised_host: Option<String>,
    pub frame_bytes_max: Option<usize>,
    pub connections_max: Option<usize>,
    pub default_sync: Option<String>,
    pub segment_bytes: Option<u64>,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub retention_check_ms: Option<u64>,
    pub idle_spin_us: Option<u64>,
    pub tail_cache_bytes: Option<usize>,
    pub tail_cache_shard_bytes: Option<usize>,
    pub request_timeout_ms: Option<u64>,
    pub slow_consumer_timeout_ms: Option<u64>,
    pub segment_fds_max: Option<usize>,
    pub partial_frames_bytes_max: Option<usize>,
    pub zookeeper: Option<String>,
    pub broker_id: Option<u32>,
    pub cluster: Option<String>,
    pub rack: Option<String>,
    pub zk_session_timeout_ms: Option<u64>,
    pub replica_lag_max_ms: Option<u64>,
    pub auto_leader_rebalance: Option<bool>,
    pub group_partitions: Option<u32>,
    pub group_replication_factor: Option<u16>,
    pub group_checkpoint_records: Option<u64>,
    pub group_segment_bytes: Option<u64>,
    pub auth: Option<bool>,
    pub superuser: Option<String>,
    pub superusers: Option<Vec<String>>,
    pub inter_broker_user: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub tls_client_auth: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_server_name: Option<String>,
}

/// The resolved configuration a broker runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// CPU of shard `i` at index `i`.
    pub cores: Vec<usize>,
    /// The core plan the cores came from, if any (see [`crate::coreplan`]).
    pub core_plan: Option<crate::coreplan::CorePlan>,
    /// Where `GET /metrics` is served (Prometheus), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: crate::logging::LogFormat,
    pub advertised_host: String,
    pub frame_bytes_max: usize,
    pub connections_max: usize,
    pub default_sync: SyncMode,
    pub segment_bytes: u64,
    pub retention: Option<Duration>,
    pub retention_bytes: Option<u64>,
    pub retention_check: Duration,
    /// How long an idle shard polls before it sleeps (lower wake-up latency
    /// for a little CPU).
    pub idle_spin: Duration,
    /// Memory per partition for its newest bytes while readers wait at its
    /// end (0: off). See `shoal_shard::tail`.
    pub tail_cache_bytes: usize,
    /// Per shard: memory all its partitions' tail caches may hold together.
    pub tail_cache_shard_bytes: usize,
    /// Longest a request frame may take from its first byte to its last;
    /// a connection that is slower is closed.
    pub request_timeout: Duration,
    /// A connection whose outbound data makes no progress this long is
    /// closed (a consumer that stopped reading).
    pub slow_consumer_timeout: Duration,
    /// Per shard: closed segments whose files stay open (the least recently
    /// read beyond this are closed and reopened on demand).
    pub segment_fds_max: usize,
    /// Per shard: bytes of receive buffers beyond their base size (partial
    /// and large frames) all connections may hold at once.
    pub partial_frames_bytes_max: usize,
    /// Cluster membership; `None`: a single node (no ZooKeeper).
    pub cluster: Option<ClusterConfig>,
    /// Consumer groups: partitions and replication factor of
    /// `__shoal_groups` when the broker creates it, and how many records
    /// of it are applied between two checkpoints.
    pub group_partitions: u32,
    pub group_replication_factor: u16,
    pub group_checkpoint_records: u64,
    pub group_segment_bytes: u64,
    /// Authentication and ACLs (C10); off (`enabled: false`) by default.
    pub auth: AuthConfig,
    /// TLS on the client ports and between brokers (C10); `None`: off.
    pub tls: Option<crate::auth::tls::Tls>,
}

/// A password read from the environment: never printed.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Environment variable with the bootstrap superuser's password.
pub const ADMIN_PASSWORD_ENV: &str = "SHOAL_ADMIN_PASSWORD";
/// Environment variable with the inter-broker user's password.
pub const INTER_BROKER_PASSWORD_ENV: &str = "SHOAL_INTER_BROKER_PASSWORD";

/// Authentication (SCRAM-SHA-256) and authorisation (ACLs).
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Every connection must authenticate first, and ACLs apply.
    pub enabled: bool,
    /// Allowed everything, without ACLs: `superusers` plus the bootstrap
    /// superuser.
    pub superusers: Vec<String>,
    /// Created on first start (no users yet) with the password in
    /// `SHOAL_ADMIN_PASSWORD` (`--superuser NAME`).
    pub bootstrap: Option<(String, Option<Secret>)>,
    /// Cluster: the user brokers authenticate as to each other (replica
    /// fetches, group checkpoints), with its password from
    /// `SHOAL_INTER_BROKER_PASSWORD`; created if missing. Allowed the
    /// broker-only requests and everything else, like a superuser.
    pub inter_broker: Option<(String, Secret)>,
    /// Key for the made-up salts answered for unknown users (so a client
    /// cannot tell which names exist); random per process.
    pub unknown_user_key: [u8; 32],
}

impl AuthConfig {
    /// Whether `name` is allowed everything without ACLs.
    pub fn is_privileged(&self, name: &str) -> bool {
        self.superusers.iter().any(|s| s == name)
            || self.inter_broker.as_ref().is_some_and(|(u, _)| u == name)
    }
}

/// Parses a core list: `all`, `0,2,3`, `0-3` or a mix (`0-1,4`). `all`
/// is the CPUs of the process's affinity mask, and a listed core must be
/// in it.
pub fn parse_cores(s: &str) -> Result<Vec<usize>> {
    let allowed = crate::coreplan::allowed_cpus()?;
    if s.trim() == "all" {
        return Ok(allowed);
    }
    let mut cores = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || {
            Error::Config(format!(
                "invalid core list {s:?}: expected all, N, N-M, comma-separated"
            ))
        };
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (usize, usize) =
                (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if a > b {
                return Err(bad());
            }
            cores.extend(a..=b);
        } else {
            cores.push(part.parse().map_err(|_| bad())?);
        }
    }
    if cores.is_empty() {
        return Err(Error::Config("the core list is empty".into()));
    }
    let mut seen = cores.clone();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != cores.len() {
        return Err(Error::Config(format!("core list {s:?} names a core twice")));
    }
    if let Some(c) = cores.iter().find(|c| !allowed.contains(c)) {
        return Err(Error::Config(format!(
            "core {c} is not one this process may run on (its affinity mask: {})",
            crate::coreplan::format_cpus(&allowed)
        )));
    }
    Ok(cores)
}

/// How this broker joins a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// ZooKeeper connect string: `host:port[,host:port...][/chroot]`.
    pub zookeeper: String,
    pub broker_id: u32,
    /// The cluster's name: its nodes live under `<chroot>/shoal/<cluster>`,
    /// so several clusters can share one ZooKeeper.
    pub name: String,
    pub rack: Option<String>,
    pub session_timeout: Duration,
    /// A follower that has not caught up with its leader's log end for
    /// this long leaves the in-sync set.
    pub replica_lag_max: Duration,
    /// The controller moves leadership back to each partition's preferred
    /// replica once it is in sync again.
    pub auto_leader_rebalance: bool,
}

/// Default `replica_lag_max_ms` (Kafka's `replica.lag.time.max.ms` is 30 s
/// since 2.5; 10 s keeps acks=all stalls short when a follower hangs).
pub const REPLICA_LAG_MAX_MS_DEFAULT: u64 = 10_000;

/// Default partitions of `__shoal_groups` (each leader coordinates the
/// groups that hash to it).
pub const GROUP_PARTITIONS_DEFAULT: u32 = 8;
/// Default replication factor of `__shoal_groups` (fewer when fewer
/// brokers are live when it is created).
pub const GROUP_REPLICATION_FACTOR_DEFAULT: u16 = 3;
/// Default records of a `__shoal_groups` partition applied between two
/// checkpoints: a restart replays at most about this many.
pub const GROUP_CHECKPOINT_RECORDS_DEFAULT: u64 = 100_000;

/// Default segment size of `__shoal_groups`: small, so a checkpoint lets
/// the log before it go soon.
pub const GROUP_SEGMENT_BYTES_DEFAULT: u64 = 8 * 1024 * 1024;

/// Default ZooKeeper session timeout: a dead broker leaves the cluster
/// (and its partitions are seen offline) this long after its last contact.
pub const ZK_SESSION_TIMEOUT_MS_DEFAULT: u64 = 6000;

/// Flags of `shoal serve` that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub cores: Option<String>,
    pub core_plan: Option<PathBuf>,
    pub metrics_listen: Option<String>,
    pub log_format: Option<String>,
    pub config: Option<PathBuf>,
    pub zookeeper: Option<String>,
    pub broker_id: Option<u32>,
    pub cluster: Option<String>,
    pub rack: Option<String>,
    pub auth: bool,
    pub superuser: Option<String>,
    pub tls: crate::auth::tls::TlsSettings,
}

impl Config {
    pub fn load(o: &Overrides) -> Result<Config> {
        let file = match &o.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let auth = auth_config(o, &file, o.zookeeper.is_some() || file.zookeeper.is_some())?;
        let tls = tls_config(o, &file, o.zookeeper.is_some() || file.zookeeper.is_some())?;
        let listen = o
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:9400".into());
        let listen: SocketAddr = listen.parse().map_err(|_| {
            Error::Config(format!(
                "invalid listen address {listen:?}: expected IP:PORT"
            ))
        })?;
        let (cores, core_plan) = crate::coreplan::resolve(
            (o.cores.clone(), o.core_plan.clone()),
            (file.cores, file.core_plan),
        )?;
        let metrics_listen = match o.metrics_listen.clone().or(file.metrics_listen) {
            None => None,
            Some(a) => Some(a.parse().map_err(|_| {
                Error::Config(format!("invalid metrics_listen {a:?}: expected IP:PORT"))
            })?),
        };
        let log_format = o
            .log_format
            .clone()
            .or(file.log_format)
            .map_or(Ok(crate::logging::LogFormat::Text), |f| f.parse())?;
        if usize::from(listen.port()) + cores.len() > usize::from(u16::MAX) {
            return Err(Error::Config(
                "listen port too high: shard ports are port+1 .. port+shards".into(),
            ));
        }
        let default_sync: SyncMode = file
            .default_sync
            .as_deref()
            .unwrap_or("interval:100")
            .parse()
            .map_err(Error::Config)?;
        let frame_bytes_max = file
            .frame_bytes_max
            .unwrap_or(shoal_wire::frame::FRAME_BYTES_MAX_DEFAULT);
        let cluster = match o.zookeeper.clone().or(file.zookeeper) {
            None => {
                if o.broker_id.or(file.broker_id).is_some() {
                    return Err(Error::Config(
                        "broker_id is set but zookeeper is not: a single node needs neither".into(),
                    ));
                }
                None
            }
            Some(zookeeper) => {
                let broker_id = o.broker_id.or(file.broker_id).ok_or_else(|| {
                    Error::Config("--zookeeper needs --broker-id N (TOML broker_id)".into())
                })?;
                let name = o
                    .cluster
                    .clone()
                    .or(file.cluster)
                    .unwrap_or_else(|| "default".into());
                crate::metadata::validate_cluster_name(&name)?;
                let session_ms = file
                    .zk_session_timeout_ms
                    .unwrap_or(ZK_SESSION_TIMEOUT_MS_DEFAULT);
                if !(1000..=600_000).contains(&session_ms) {
                    return Err(Error::Config(format!(
                        "zk_session_timeout_ms {session_ms} must be 1000 to 600000"
                    )));
                }
                let lag_ms = file
                    .replica_lag_max_ms
                    .unwrap_or(REPLICA_LAG_MAX_MS_DEFAULT);
                if !(100..=600_000).contains(&lag_ms) {
                    return Err(Error::Config(format!(
                        "replica_lag_max_ms {lag_ms} must be 100 to 600000"
                    )));
                }
                Some(ClusterConfig {
                    zookeeper,
                    broker_id,
                    name,
                    rack: o.rack.clone().or(file.rack).filter(|r| !r.is_empty()),
                    session_timeout: Duration::from_millis(session_ms),
                    replica_lag_max: Duration::from_millis(lag_ms),
                    auto_leader_rebalance: file.auto_leader_rebalance.unwrap_or(true),
                })
            }
        };
        let config = Config {
            auth,
            tls,
            cluster,
            listen,
            // Absolute, so logs name it unambiguously and glommio (which
            // opens directories by absolute path only) can use it.
            data_dir: std::path::absolute(
                o.data_dir
                    .clone()
                    .or(file.data_dir)
                    .unwrap_or_else(|| "./shoal-data".into()),
            )
            .map_err(|e| Error::Config(format!("invalid data dir: {e}")))?,
            cores,
            core_plan,
            metrics_listen,
            log_format,
            advertised_host: file
                .advertised_host
                .unwrap_or_else(|| listen.ip().to_string()),
            frame_bytes_max,
            connections_max: file
                .connections_max
                .unwrap_or(limits::CONNECTIONS_MAX_DEFAULT),
            default_sync,
            segment_bytes: file
                .segment_bytes
                .unwrap_or(shoal_shard::limits::SEGMENT_BYTES_DEFAULT),
            retention: Some(Duration::from_millis(
                file.retention_ms
                    .unwrap_or(shoal_shard::limits::RETENTION_AGE_DEFAULT_MS),
            )),
            retention_bytes: file.retention_bytes,
            retention_check: Duration::from_millis(
                file.retention_check_ms.unwrap_or(60_000).max(100),
            ),
            idle_spin: Duration::from_micros(
                file.idle_spin_us
                    .unwrap_or(IDLE_SPIN_US_DEFAULT)
                    .min(1_000_000),
            ),
            tail_cache_bytes: file
                .tail_cache_bytes
                .unwrap_or(shoal_shard::limits::TAIL_CACHE_BYTES_DEFAULT)
                .min(1 << 30),
            tail_cache_shard_bytes: file
                .tail_cache_shard_bytes
                .unwrap_or(shoal_shard::limits::TAIL_CACHE_SHARD_BYTES_DEFAULT),
            request_timeout: file
                .request_timeout_ms
                .map_or(limits::REQUEST_TIMEOUT_DEFAULT, Duration::from_millis),
            slow_consumer_timeout: file
                .slow_consumer_timeout_ms
                .map_or(limits::SLOW_CONSUMER_TIMEOUT_DEFAULT, Duration::from_millis),
            segment_fds_max: file
                .segment_fds_max
                .unwrap_or(shoal_shard::limits::SEGMENT_FDS_DEFAULT)
                .max(1),
            partial_frames_bytes_max: file
                .partial_frames_bytes_max
                .unwrap_or(limits::PARTIAL_FRAMES_BYTES_MAX_DEFAULT),
            group_partitions: file.group_partitions.unwrap_or(GROUP_PARTITIONS_DEFAULT),
            group_replication_factor: file
                .group_replication_factor
                .unwrap_or(GROUP_REPLICATION_FACTOR_DEFAULT),
            group_checkpoint_records: file
                .group_checkpoint_records
                .unwrap_or(GROUP_CHECKPOINT_RECORDS_DEFAULT),
            group_segment_bytes: file
                .group_segment_bytes
                .unwrap_or(GROUP_SEGMENT_BYTES_DEFAULT),
        };
        if !(1..=1000).contains(&config.group_partitions) {
            return Err(Error::Config(format!(
                "group_partitions {} must be 1 to 1000",
                config.group_partitions
            )));
        }
        if config.group_replication_factor == 0 {
            return Err(Error::Config(
                "group_replication_factor must be at least 1".into(),
            ));
        }
        if config.group_checkpoint_records < 100 {
            return Err(Error::Config(format!(
                "group_checkpoint_records {} must be at least 100",
                config.group_checkpoint_records
            )));
        }
        limits::check_config(&config)?;
        Ok(config)
    }

    pub fn shard_port(&self, shard: usize) -> u16 {
        self.listen.port() + 1 + shard as u16
    }
}

fn auth_config(o: &Overrides, file: &FileConfig, clustered: bool) -> Result<AuthConfig> {
    let enabled = o.auth || file.auth.unwrap_or(false);
    let user = |what: &str, n: &str| {
        shoal_wire::scram::validate_username(n)
            .map_err(|e| Error::Config(format!("{what} {n:?}: {e}")))
    };
    let bootstrap = o.superuser.clone().or(file.superuser.clone());
    let mut superusers = file.superusers.clone().unwrap_or_default();
    for s in &superusers {
        user("superuser", s)?;
    }
    if let Some(b) = &bootstrap {
        user("superuser", b)?;
        if !superusers.contains(b) {
            superusers.push(b.clone());
        }
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty()).map(Secret);
    let inter_broker = match &file.inter_broker_user {
        None => None,
        Some(u) => {
            user("inter_broker_user", u)?;
            let pw = env(INTER_BROKER_PASSWORD_ENV).ok_or_else(|| {
                Error::Config(format!(
                    "inter_broker_user {u:?} needs its password in {INTER_BROKER_PASSWORD_ENV}"
                ))
            })?;
            Some((u.clone(), pw))
        }
    };
    if enabled && clustered && inter_broker.is_none() {
        return Err(Error::Config(format!(
            "auth in a cluster needs inter_broker_user (TOML) with its password in {INTER_BROKER_PASSWORD_ENV}: brokers authenticate to each other"
        )));
    }
    let mut unknown_user_key = [0u8; 32];
    let random = shoal_wire::scram::random_bytes(32)
        .map_err(|e| Error::Config(format!("cannot start authentication: {e}")))?;
    unknown_user_key.copy_from_slice(&random);
    Ok(AuthConfig {
        enabled,
        superusers,
        bootstrap: bootstrap.map(|b| (b, env(ADMIN_PASSWORD_ENV))),
        inter_broker,
        unknown_user_key,
    })
}

/// TLS settings: a flag wins over the file, each setting on its own.
fn tls_config(
    o: &Overrides,
    file: &FileConfig,
    clustered: bool,
) -> Result<Option<crate::auth::tls::Tls>> {
    let f = &o.tls;
    let settings = crate::auth::tls::TlsSettings {
        cert: f.cert.clone().or(file.tls_cert.clone()),
        key: f.key.clone().or(file.tls_key.clone()),
        client_ca: f.client_ca.clone().or(file.tls_client_ca.clone()),
        client_auth: match (f.client_auth, file.tls_client_auth.as_deref()) {
            (Some(m), _) => Some(m),
            (None, Some(s)) => Some(s.parse()?),
            (None, None) => None,
        },
        ca: f.ca.clone().or(file.tls_ca.clone()),
        server_name: f.server_name.clone().or(file.tls_server_name.clone()),
    };
    if clustered && settings.enabled() && settings.ca.is_none() {
        return Err(Error::Config(
            "TLS in a cluster needs tls_ca: brokers verify each other's certificates with it"
                .into(),
        ));
    }
    crate::auth::tls::load(&settings)
}

fn read_file(p: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(p)
        .map_err(|e| Error::io(format!("read config {}", p.display()), e))?;
    toml::from_str(&text).map_err(|e| Error::Config(format!("invalid config {}: {e}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn core_lists() {
        assert_eq!(parse_cores("0").unwrap(), vec![0]);
        assert!(parse_cores("0,0").is_err());
        assert!(parse_cores("1-0").is_err());
        assert!(parse_cores("x").is_err());
        assert!(parse_cores("9999").is_err());
        assert!(!parse_cores("all").unwrap().is_empty());
    }
    #[test]
    fn file_overridden_by_flags() {
        let dir = std::env::temp_dir().join(format!("shoal-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("shoal.toml");
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:7000\"\ndata_dir = \"/tmp/x\"\ndefault_sync = \"always\"\n",
        )
        .unwrap();
        let c = Config::load(&Overrides {
            config: Some(p.clone()),
            listen: Some("127.0.0.1:7100".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.listen.port(), 7100);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.default_sync, SyncMode::Always);
        std::fs::write(&p, "bogus = 1\n").unwrap();
        assert!(Config::load(&Overrides {
            config: Some(p.clone()),
            ..Default::default()
        })
        .is_err());
        // A frame that could never fit the partial-frame budget.
        std::fs::write(
            &p,
            "frame_bytes_max = 16777216\npartial_frames_bytes_max = 8388608\n",
        )
        .unwrap();
        let e = Config::load(&Overrides {
            config: Some(p),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("partial_frames_bytes_max"), "{e}");
    }
}
