//! TLS to the brokers (rustls with the `ring` provider, via tokio-rustls).
//!
//! [`TlsConfig`] is loaded once (files read, certificates parsed) and
//! shared by every connection a [`crate::Client`] opens. It trusts the CAs
//! in one PEM file (`--tls-ca FILE`, `SHOAL_TLS_CA`) and checks each
//! broker's certificate against the host the client was given for it
//! (a bootstrap entry, or the host a broker advertises): a DNS name must
//! be among the certificate's DNS SANs, an IP address among its IP SANs
//! (brokers advertise addresses such as `127.0.0.1`). A server name set
//! with `--tls-server-name` (`SHOAL_TLS_SERVER_NAME`) replaces them all:
//! every broker's certificate must then carry it as a DNS name. A client certificate and key
//! (`--tls-cert`/`--tls-key`, `SHOAL_TLS_CERT`/`SHOAL_TLS_KEY`) are
//! presented when the broker asks; signed by the CA the broker trusts for
//! clients, its subject CN (else first DNS name) is the principal, with no
//! SCRAM exchange.

use crate::error::{Error, Result};
use rustls::pki_types::{CertificateDer, ServerName};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

/// The DNS names addresses were resolved from, so a broker reached by
/// name has its certificate checked against that name, not the address
/// the name resolved to. Keyed by IP address, not port: a broker's shard
/// ports are reached at the address its advertised host resolved to.
/// Shared by every client of the process (a name's addresses are the same
/// for all of them); the latest word on an address wins (an IP literal
/// clears its entry), and at most [`HOST_NAMES_MAX`] addresses are held
/// (past that, new names are not remembered and those addresses are
/// checked as addresses).
static HOST_NAMES: LazyLock<Mutex<HashMap<IpAddr, ServerName<'static>>>> =
    LazyLock::new(Default::default);
const HOST_NAMES_MAX: usize = 4096;

/// Notes that `host_port` resolved to `addrs`.
pub(crate) fn remember_host(host_port: &str, addrs: &[SocketAddr]) {
    let Some((host, _)) = host_port.rsplit_once(':') else {
        return;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut names = HOST_NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Ok(ip) = host.parse::<IpAddr>() {
        // The address is its own name.
        names.remove(&ip);
        return;
    }
    let Ok(name @ ServerName::DnsName(_)) = ServerName::try_from(host.to_string()) else {
        return;
    };
    for a in addrs {
        if names.len() < HOST_NAMES_MAX || names.contains_key(&a.ip()) {
            names.insert(a.ip(), name.clone());
        }
    }
}

/// The name a broker's certificate must carry when reached at `addr`.
fn name_for(addr: SocketAddr) -> ServerName<'static> {
    let names = HOST_NAMES.lock().unwrap_or_else(|e| e.into_inner());
    names
        .get(&addr.ip())
        .cloned()
        .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
}

/// Environment variables of [`TlsConfig::from_env`].
pub const CA_ENV: &str = "SHOAL_TLS_CA";
pub const CERT_ENV: &str = "SHOAL_TLS_CERT";
pub const KEY_ENV: &str = "SHOAL_TLS_KEY";
pub const SERVER_NAME_ENV: &str = "SHOAL_TLS_SERVER_NAME";

/// Where the TLS material is (all PEM files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates the brokers' certificates are verified against.
    pub ca: PathBuf,
    /// A client certificate (then its chain) and its key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Verify every broker's certificate against this DNS name instead of
    /// the host each was reached by.
    pub server_name: Option<String>,
}

impl TlsFiles {
    /// `SHOAL_TLS_CA` (with `SHOAL_TLS_CERT`, `SHOAL_TLS_KEY`,
    /// `SHOAL_TLS_SERVER_NAME`); `None` if `SHOAL_TLS_CA` is unset.
    pub fn from_env() -> Option<TlsFiles> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Some(TlsFiles {
            ca: var(CA_ENV)?.into(),
            cert: var(CERT_ENV).map(PathBuf::from),
            key: var(KEY_ENV).map(PathBuf::from),
            server_name: var(SERVER_NAME_ENV),
        })
    }
}

/// TLS settings a client connects with (cheap to clone).
#[derive(Clone)]
pub struct TlsConfig {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn invalid(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("TLS {what} {}: {e}", path.display()))
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).map_err(|e| invalid(what, path, e))?;
    shoal_wire::pem::certificates(&pem).map_err(|e| invalid(what, path, e))
}

impl TlsConfig {
    /// The settings a command line gives (`flags`; an empty `ca` is none),
    /// each falling back to its environment variable; `Ok(None)` when no CA
    /// is given anywhere (plaintext). The files are read now, so a bad one
    /// fails before anything connects.
    pub fn from_flags_or_env(flags: &TlsFiles) -> Result<Option<TlsConfig>> {
        let env = TlsFiles::from_env().unwrap_or_default();
        let files = TlsFiles {
            ca: if flags.ca.as_os_str().is_empty() {
                env.ca
            } else {
                flags.ca.clone()
            },
            cert: flags.cert.clone().or(env.cert),
            key: flags.key.clone().or(env.key),
            server_name: flags.server_name.clone().or(env.server_name),
        };
        if files.ca.as_os_str().is_empty() {
            if files.cert.is_some() || files.key.is_some() || files.server_name.is_some() {
                return Err(Error::Invalid(format!(
                    "TLS needs --tls-ca FILE (or {CA_ENV}): the CA that signed the brokers' certificates"
                )));
            }
            return Ok(None);
        }
        TlsConfig::load(&files).map(Some)
    }

    /// Reads the files; every error names the file and what is wrong.
    pub fn load(files: &TlsFiles) -> Result<TlsConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(&files.ca, "CA")? {
            roots
                .add(c)
                .map_err(|e| invalid("CA", &files.ca, format!("not a usable CA: {e}")))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(|e| Error::Invalid(format!("TLS: {e}")))?
            .with_root_certificates(roots);
        let config = match (&files.cert, &files.key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "client certificate")?;
                let pem = std::fs::read(key).map_err(|e| invalid("client key", key, e))?;
                let k = shoal_wire::pem::private_key(&pem)
                    .map_err(|e| invalid("client key", key, e))?;
                builder
                    .with_client_auth_cert(chain, k)
                    .map_err(|e| invalid("client certificate", cert, e))?
            }
            _ => {
                return Err(Error::Invalid(
                    "a TLS client certificate needs both --tls-cert and --tls-key".into(),
                ))
            }
        };
        let server_name = match &files.server_name {
            None => None,
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|e| Error::Invalid(format!("TLS server name {n:?}: {e}")))?,
            ),
        };
        Ok(TlsConfig {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The TLS handshake on a connected stream to `addr`.
    pub(crate) async fn connect(
        &self,
        addr: SocketAddr,
        stream: tokio::net::TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let name = self.server_name.clone().unwrap_or_else(|| name_for(addr));
        self.connector
            .connect(name, stream)
            .await
            .map_err(|e| Error::Connect {
                addr: addr.to_string(),
                source: std::io::Error::new(e.kind(), format!("TLS handshake failed: {e}")),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_reached_by_name_is_checked_against_that_name_else_its_address() {
        // Addresses of their own, so other tests of this process do not
        // meet them.
        let a: SocketAddr = "127.0.0.11:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.12:2".parse().unwrap();
        let c: SocketAddr = "[::1]:3".parse().unwrap();
        remember_host("broker-1.example:1", &[a]);
        remember_host("127.0.0.12:2", &[b]);
        remember_host("[::1]:3", &[c]);
        let named = ServerName::try_from("broker-1.example".to_string()).unwrap();
        assert_eq!(name_for(a), named);
        // The broker's shard ports: same address, another port.
        assert_eq!(name_for(SocketAddr::new(a.ip(), 9)), named);
        assert_eq!(name_for(b), ServerName::IpAddress(b.ip().into()));
        assert_eq!(name_for(c), ServerName::IpAddress(c.ip().into()));
        // The address given as such later: checked as the address.
        remember_host("127.0.0.11:1", &[a]);
        assert_eq!(name_for(a), ServerName::IpAddress(a.ip().into()));
    }
}
