//! Finding brokers (Z2): the bootstrap string, ZooKeeper, and the disk
//! cache of the broker list.
//!
//! A client starts from whatever the user gave it:
//! - `host:port` or `host:port,host:port,...`: tried in order until one
//!   answers metadata;
//! - `zk://host:port[,host:port][/chroot][?cluster=NAME]`: the live brokers'
//!   registrations are read from ZooKeeper (`<chroot>/shoal/<cluster>/brokers/ids`),
//!   one is picked at random and the ZooKeeper session is closed again:
//!   after that the brokers' metadata says everything.
//!
//! After every metadata refresh that changes the live brokers, their
//! addresses go to a small JSON file ([`CacheFile`]), written whole and
//! renamed into place. When ZooKeeper or every bootstrap address is
//! unreachable the client starts from that file instead (seed 003). A file
//! that cannot be read or parsed is ignored with a warning.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The environment variable that sets the cache file ([`DiscoveryCache`]).
pub const CACHE_ENV: &str = "SHOAL_DISCOVERY_CACHE";

/// Cluster name when a `zk://` address names none (the brokers' default).
pub const DEFAULT_CLUSTER: &str = "default";

/// What a bootstrap string names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// `host:port` entries, in the order given.
    Brokers(Vec<String>),
    ZooKeeper(ZkTarget),
}

/// A cluster's registrations in ZooKeeper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZkTarget {
    /// `host:port[,host:port...]`, as the ZooKeeper client takes it.
    pub hosts: String,
    /// `""` or `/a/b`: the prefix of every Shoal path.
    pub chroot: String,
    pub cluster: String,
}

impl ZkTarget {
    /// `<chroot>/shoal/<cluster>`, as the brokers lay it out.
    pub fn root(&self) -> String {
        format!("{}/shoal/{}", self.chroot, self.cluster)
    }

    /// Where each live broker holds its ephemeral registration.
    pub fn brokers_path(&self) -> String {
        format!("{}/brokers/ids", self.root())
    }
}

fn valid_host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
}

/// Parses `host:port[,host:port...]` or
/// `zk://host:port[,host:port...][/chroot][?cluster=NAME]`.
pub fn parse_bootstrap(s: &str) -> Result<Bootstrap> {
    let s = s.trim();
    let Some(rest) = s.strip_prefix("zk://") else {
        let entries: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect();
        if entries.is_empty() || !entries.iter().all(|e| valid_host_port(e)) {
            return Err(Error::Invalid(format!(
                "bad broker address {s:?}: expected host:port[,host:port...] or \
                 zk://host:port[,host:port...][/chroot][?cluster=NAME]"
            )));
        }
        return Ok(Bootstrap::Brokers(entries));
    };
    let bad = |why: &str| {
        Error::Invalid(format!(
            "bad ZooKeeper address {s:?} ({why}): expected \
             zk://host:port[,host:port...][/chroot][?cluster=NAME]"
        ))
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (hosts, chroot) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if hosts.is_empty() || !hosts.split(',').all(valid_host_port) {
        return Err(bad("hosts"));
    }
    if chroot
        .split('/')
        .skip(1)
        .any(|e| e.is_empty() || e == "." || e == "..")
    {
        return Err(bad("chroot"));
    }
    let mut cluster = DEFAULT_CLUSTER.to_string();
    for kv in query.into_iter().flat_map(|q| q.split('&')) {
        match kv.split_once('=') {
            Some(("cluster", name)) if !name.is_empty() && !name.contains('/') => {
                cluster = name.to_string();
            }
            _ => return Err(bad("query: only cluster=NAME is known")),
        }
    }
    Ok(Bootstrap::ZooKeeper(ZkTarget {
        hosts: hosts.to_string(),
        chroot: chroot.to_string(),
        cluster,
    }))
}

/// One broker's address, as discovery and the cache know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerAddr {
    /// `None` for an entry of a bootstrap list (its id is not known yet).
    #[serde(default)]
    pub id: Option<u32>,
    pub host: String,
    /// Public port (any shard accepts).
    pub port: u16,
    #[serde(default)]
    pub shard_ports: Vec<u16>,
    #[serde(default)]
    pub rack: Option<String>,
}

impl BrokerAddr {
    /// `host:port` of the public port.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A broker's registration node as the brokers write it; fields this
/// client does not need are ignored.
#[derive(Debug, Deserialize)]
struct Registration {
    id: u32,
    host: String,
    port: u16,
    #[serde(default)]
    shard_ports: Vec<u16>,
    #[serde(default)]
    rack: Option<String>,
}

/// Decodes one registration; `path` names it in the error.
pub fn decode_registration(path: &str, data: &[u8]) -> Result<BrokerAddr> {
    let r: Registration = serde_json::from_slice(data)
        .map_err(|e| Error::Protocol(format!("malformed broker registration {path}: {e}")))?;
    if r.host.is_empty() || r.port == 0 {
        return Err(Error::Protocol(format!(
            "malformed broker registration {path}: no host or port"
        )));
    }
    Ok(BrokerAddr {
        id: Some(r.id),
        host: r.host,
        port: r.port,
        shard_ports: r.shard_ports,
        rack: r.rack,
    })
}

/// The live brokers registered in ZooKeeper under `target`, sorted by id.
/// Malformed registrations are skipped with a warning; none at all is an
/// error. The ZooKeeper session lives on a thread of its own (its client
/// does its own I/O) for this call only and is closed before it returns;
/// the whole lookup is bounded by `timeout`.
pub async fn zookeeper_brokers(target: &ZkTarget, timeout: Duration) -> Result<Vec<BrokerAddr>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let t = target.clone();
    std::thread::Builder::new()
        .name("shoal-zk-discovery".into())
        .spawn(move || {
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(Error::Io)
                .and_then(|rt| rt.block_on(zk_lookup(&t, timeout)));
            let _ = tx.send(r);
        })
        .map_err(Error::Io)?;
    // The thread bounds itself; this only guards against it dying.
    match tokio::time::timeout(timeout + Duration::from_secs(2), rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) | Err(_) => Err(zk_unreachable(target, "the lookup did not finish")),
    }
}

fn zk_unreachable(t: &ZkTarget, why: impl std::fmt::Display) -> Error {
    Error::Discovery(format!("ZooKeeper at {}: {why}", t.hosts))
}

async fn zk_lookup(t: &ZkTarget, timeout: Duration) -> Result<Vec<BrokerAddr>> {
    use zookeeper_client as zk;
    // Fail eagerly: once every host refused, say so now rather than after
    // the whole timeout (the cache may still get the client going).
    let connect = zk::Client::connector()
        .with_session_timeout(timeout.max(Duration::from_secs(2)))
        .with_connection_timeout(timeout)
        .with_fail_eagerly()
        .connect(&t.hosts);
    let client = match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(zk_unreachable(t, e)),
        Err(_) => {
            return Err(zk_unreachable(
                t,
                format_args!("no session within {} ms", timeout.as_millis()),
            ))
        }
    };
    let path = t.brokers_path();
    let r = tokio::time::timeout(timeout, async {
        let ids = match client.list_children(&path).await {
            Ok(ids) => ids,
            Err(zk::Error::NoNode) => {
                return Err(Error::Discovery(format!(
                    "no Shoal cluster {:?} in ZooKeeper at {} ({path} does not exist)",
                    t.cluster, t.hosts
                )))
            }
            Err(e) => return Err(zk_unreachable(t, format_args!("list {path}: {e}"))),
        };
        let mut brokers = Vec::with_capacity(ids.len());
        for id in ids {
            let node = format!("{path}/{id}");
            match client.get_data(&node).await {
                Ok((data, _)) => match decode_registration(&node, &data) {
                    Ok(b) => brokers.push(b),
                    Err(e) => tracing::warn!(error = %e, "skipping a broker registration"),
                },
                // Gone between the listing and the read: it just left.
                Err(zk::Error::NoNode) => {}
                Err(e) => return Err(zk_unreachable(t, format_args!("read {node}: {e}"))),
            }
        }
        Ok(brokers)
    })
    .await
    .unwrap_or_else(|_| Err(zk_unreachable(t, "no answer in time")));
    // Dropping the last handle closes the session; wait (briefly) for the
    // close to go out before this thread's runtime goes away.
    let mut state = client.state_watcher();
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while !state.peek_state().is_terminated() {
            state.changed().await;
        }
    })
    .await;
    let mut brokers = r?;
    if brokers.is_empty() {
        return Err(Error::Discovery(format!(
            "no live broker registered under {path} in ZooKeeper at {}",
            t.hosts
        )));
    }
    brokers.sort_by_key(|b| b.id);
    Ok(brokers)
}

/// Where a client keeps its broker list between runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DiscoveryCache {
    /// `$SHOAL_DISCOVERY_CACHE` if set (a path, or `off`), else
    /// `$XDG_CACHE_HOME/shoal/brokers-<hash of the bootstrap string>.json`,
    /// else the same under `~/.cache`. (In this crate's own unit tests:
    /// off, so they leave nothing in the home directory.)
    #[default]
    Default,
    Path(PathBuf),
    /// Neither written nor read.
    Off,
}

impl DiscoveryCache {
    /// A setting as the CLI and the environment give it: `off` (or `none`,
    /// or empty) turns the cache off, anything else is a path.
    pub fn from_setting(s: &str) -> DiscoveryCache {
        match s.trim() {
            "" | "off" | "none" => DiscoveryCache::Off,
            p => DiscoveryCache::Path(PathBuf::from(p)),
        }
    }

    /// The file for `bootstrap`, or `None` if the cache is off (or no
    /// cache directory can be found).
    pub fn resolve(&self, bootstrap: &str) -> Option<PathBuf> {
        match self {
            DiscoveryCache::Off => None,
            DiscoveryCache::Path(p) => Some(p.clone()),
            DiscoveryCache::Default if cfg!(test) => None,
            DiscoveryCache::Default => match std::env::var_os(CACHE_ENV) {
                Some(v) => DiscoveryCache::from_setting(&v.to_string_lossy()).resolve(bootstrap),
                None => default_cache_path(bootstrap),
            },
        }
    }
}

/// `$XDG_CACHE_HOME/shoal/brokers-<hash>.json`, else under `~/.cache`.
pub fn default_cache_path(bootstrap: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|h| h.join(".cache"))
        })?;
    Some(
        dir.join("shoal")
            .join(format!("brokers-{:016x}.json", fnv1a64(bootstrap.trim()))),
    )
}

/// FNV-1a: the same file name for the same bootstrap string on every run
/// and every build.
fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The cache file's format version.
pub const CACHE_FORMAT: u32 = 1;

/// The cache file: JSON, one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheFile {
    /// [`CACHE_FORMAT`]; a file of another format is ignored.
    pub format: u32,
    /// The bootstrap string the list was learned from.
    pub bootstrap: String,
    /// The cluster's name (empty for a single node).
    #[serde(default)]
    pub cluster: String,
    /// When it was written, ms since the epoch.
    #[serde(default)]
    pub written_ms: u64,
    /// The live brokers of the last metadata.
    pub brokers: Vec<BrokerAddr>,
}

/// Reads the cache; `None` (with a warning) if it is missing, unreadable,
/// malformed, of another format or empty.
pub fn read_cache(path: &Path) -> Option<CacheFile> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the discovery cache; ignoring it");
            return None;
        }
    };
    match serde_json::from_slice::<CacheFile>(&bytes) {
        Ok(c) if c.format == CACHE_FORMAT && !c.brokers.is_empty() => Some(c),
        Ok(c) => {
            tracing::warn!(
                path = %path.display(),
                format = c.format,
                brokers = c.brokers.len(),
                "discovery cache of another format or empty; ignoring it"
            );
            None
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "corrupt discovery cache; ignoring it");
            None
        }
    }
}

/// Writes the cache whole: to a temporary file beside it, flushed, then
/// renamed over the old one, so a reader sees the old list or the new one,
/// never half of one.
pub fn write_cache(path: &Path, cache: &CacheFile) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "brokers.json".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let json = serde_json::to_vec_pretty(cache).map_err(std::io::Error::other)?;
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_strings() {
        assert_eq!(
            parse_bootstrap("127.0.0.1:9400").expect("one"),
            Bootstrap::Brokers(vec!["127.0.0.1:9400".into()])
        );
        assert_eq!(
            parse_bootstrap("a:1, b:2,").expect("two"),
            Bootstrap::Brokers(vec!["a:1".into(), "b:2".into()])
        );
        assert_eq!(
            parse_bootstrap("zk://z1:2181,z2:2181/apps/x?cluster=prod").expect("zk"),
            Bootstrap::ZooKeeper(ZkTarget {
                hosts: "z1:2181,z2:2181".into(),
                chroot: "/apps/x".into(),
                cluster: "prod".into(),
            })
        );
        let Ok(Bootstrap::ZooKeeper(t)) = parse_bootstrap("zk://z:2181") else {
            panic!("zk without chroot");
        };
        assert_eq!(t.brokers_path(), "/shoal/default/brokers/ids");
        for bad in [
            "",
            "host",
            "host:port",
            "a:1,b",
            ":1",
            "a:0",
            "zk://",
            "zk://z",
            "zk://z:1//x",
            "zk://z:1/..",
            "zk://z:1?cluster=",
            "zk://z:1?x=y",
        ] {
            assert!(parse_bootstrap(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn registrations_are_read_and_malformed_ones_refused() {
        let b = decode_registration(
            "/x/1",
            br#"{"id":1,"host":"127.0.0.1","port":9400,"shard_ports":[9401,9402],"peer_port":40123,"rack":null,"version":"0.1.0"}"#,
        )
        .expect("valid");
        assert_eq!(b.id, Some(1));
        assert_eq!(b.host_port(), "127.0.0.1:9400");
        assert_eq!(b.shard_ports, [9401, 9402]);
        for bad in [&b"{"[..], br#"{"id":1}"#, br#"{"id":1,"host":"","port":1}"#] {
            let e = decode_registration("/x/1", bad).expect_err("malformed");
            assert!(e.to_string().contains("/x/1"), "{e}");
        }
    }

    #[test]
    fn the_default_path_depends_on_the_bootstrap_string_only() {
        let a = default_cache_path("a:1,b:2");
        assert_eq!(a, default_cache_path("a:1,b:2"));
        assert_ne!(a, default_cache_path("a:1"));
        if let Some(p) = a {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            assert!(name.is_some_and(|n| n.starts_with("brokers-") && n.ends_with(".json")));
        }
        assert_eq!(DiscoveryCache::from_setting("off"), DiscoveryCache::Off);
        assert_eq!(DiscoveryCache::from_setting("off").resolve("a:1"), None);
        assert_eq!(
            DiscoveryCache::from_setting("/tmp/x.json").resolve("a:1"),
            Some(PathBuf::from("/tmp/x.json"))
        );
    }

    #[test]
    fn the_cache_round_trips_and_corruption_is_ignored() {
        let dir = std::env::temp_dir().join(format!("shoal-cache-test-{}", std::process::id()));
        let path = dir.join("sub").join("brokers.json");
        let c = CacheFile {
            format: CACHE_FORMAT,
            bootstrap: "a:1".into(),
            cluster: "prod".into(),
            written_ms: 7,
            brokers: vec![BrokerAddr {
                id: Some(2),
                host: "127.0.0.1".into(),
                port: 9400,
                shard_ports: vec![9401],
                rack: Some("r1".into()),
            }],
        };
        write_cache(&path, &c).expect("written");
        assert_eq!(read_cache(&path), Some(c.clone()));
        for junk in [
            &b""[..],
            b"{",
            b"\xff\xfe",
            br#"{"format":1,"bootstrap":"a:1","brokers":[]}"#,
        ] {
            std::fs::write(&path, junk).expect("junk");
            assert_eq!(read_cache(&path), None);
        }
        let newer = CacheFile {
            format: CACHE_FORMAT + 1,
            ..c
        };
        write_cache(&path, &newer).expect("written");
        assert_eq!(read_cache(&path), None);
        assert_eq!(read_cache(&dir.join("missing.json")), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
