//! TLS (C10): the broker's certificate and key, how it verifies client
//! certificates, and how it verifies other brokers.
//!
//! Loaded once at start ([`load`]) into [`Tls`], which every shard shares
//! (`Arc`s of rustls configurations, read-only). The crypto is rustls with
//! the `ring` provider, chosen explicitly here (never a process default), so
//! the build needs only a C compiler.
//!
//! - Clients: the client ports (public and shard ports) speak only TLS when
//!   `tls_cert` is set. With `tls_client_ca` a client may present a
//!   certificate signed by that CA (`tls_client_auth = "requested"`, the
//!   default then) or must (`"required"`); a verified certificate's subject
//!   CN, else its first DNS name, is the connection's principal
//!   ([`principal_of`]) for ACLs, without a SCRAM exchange.
//! - Brokers: followers (replica fetches) and the links between control
//!   threads dial with [`Tls::peer`], which trusts `tls_ca` and checks the
//!   peer's certificate against the peer's advertised host (an IP address
//!   or a DNS name), or against `tls_server_name` when set. When client
//!   certificates are on, brokers present their own certificate to each
//!   other (so it must be signed by `tls_client_ca` and allow client
//!   authentication), and still authenticate with SCRAM as the
//!   inter-broker user when auth is on.
//!
//! Log bytes on a TLS connection are copied through user space to be
//! encrypted (see `conn::writer`): kernel TLS (kTLS), which would let
//! sendfile encrypt in the kernel, is not used, as the kernel Shoal is
//! tested on is built without it (`CONFIG_TLS` unset; `setsockopt(TCP_ULP,
//! "tls")` fails with `ENOENT`), so such a path could not be tested here.

use crate::error::{Error, Result};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Whether clients present certificates (Kafka's `ssl.client.auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No certificate is asked for; clients authenticate with SCRAM (when
    /// auth is on).
    None,
    /// A certificate is asked for and, if presented, must verify against
    /// `tls_client_ca`; a client without one authenticates with SCRAM.
    Requested,
    /// Every client must present a certificate that verifies.
    Required,
}

impl std::str::FromStr for ClientAuth {
    type Err = Error;
    fn from_str(s: &str) -> Result<ClientAuth> {
        match s {
            "none" => Ok(ClientAuth::None),
            "requested" => Ok(ClientAuth::Requested),
            "required" => Ok(ClientAuth::Required),
            _ => Err(Error::Config(format!(
                "tls_client_auth {s:?}: expected none, requested or required"
            ))),
        }
    }
}

/// The TLS settings as configured (file paths).
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// PEM: the broker's certificate, then its chain.
    pub cert: Option<PathBuf>,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// PEM: CA certificates client certificates are verified against.
    pub client_ca: Option<PathBuf>,
    pub client_auth: Option<ClientAuth>,
    /// PEM: CA certificates other brokers' certificates are verified
    /// against (a cluster).
    pub ca: Option<PathBuf>,
    /// Check other brokers' certificates against this name instead of
    /// their advertised host.
    pub server_name: Option<String>,
}

impl TlsSettings {
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some()
    }
}

/// TLS as the broker runs it.
#[derive(Clone)]
pub struct Tls {
    /// What the client ports accept with.
    pub server: Arc<rustls::ServerConfig>,
    /// What this broker dials other brokers with; `None` on a single node
    /// without `tls_ca`.
    pub peer: Option<Arc<rustls::ClientConfig>>,
    pub client_auth: ClientAuth,
    /// See [`TlsSettings::server_name`].
    pub peer_server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("client_auth", &self.client_auth)
            .field("peer", &self.peer.is_some())
            .field("peer_server_name", &self.peer_server_name)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// What dialing a peer broker whose advertised host is `host` needs:
    /// the client configuration (trusting `tls_ca`) and the name its
    /// certificate must carry (`tls_server_name`, else `host`). For the
    /// links (tokio) and the followers (glommio) alike.
    pub fn dial_params(
        &self,
        host: &str,
    ) -> std::io::Result<(Arc<rustls::ClientConfig>, ServerName<'static>)> {
        let Some(config) = &self.peer else {
            return Err(std::io::Error::other(
                "TLS is on but tls_ca is not set: cannot verify the other broker",
            ));
        };
        let name = match &self.peer_server_name {
            Some(n) => n.clone(),
            None => server_name(host).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
            })?,
        };
        Ok((config.clone(), name))
    }
}

/// The one crypto provider Shoal uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A host (an IP address or a DNS name) as a name to verify a
/// certificate against: an IP address is matched with the certificate's
/// IP SANs, a name with its DNS SANs.
pub fn server_name(host: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(host.to_string())
        .map_err(|e| Error::Config(format!("{host:?} cannot name a TLS server: {e}")))
}

fn tls_err(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("{what} {}: {e}", path.display()))
}

/// The certificates of a PEM file (at least one).
pub fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    // Read first, so a missing file says so rather than "no certificate".
    let pem = std::fs::read(path).map_err(|e| tls_err(what, path, e))?;
    shoal_wire::pem::certificates(&pem).map_err(|e| tls_err(what, path, e))
}

/// The private key of a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).map_err(|e| tls_err("tls_key", path, e))?;
    shoal_wire::pem::private_key(&pem).map_err(|e| tls_err("tls_key", path, e))
}

/// A store of the CA certificates in a PEM file.
pub fn read_roots(path: &Path, what: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(path, what)? {
        roots
            .add(c)
            .map_err(|e| tls_err(what, path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Reads the files and builds the configurations; `None` when TLS is off.
/// Every failure names the setting and the file.
pub fn load(s: &TlsSettings) -> Result<Option<Tls>> {
    if !s.enabled() {
        if s.client_ca.is_some() || s.ca.is_some() || s.client_auth.is_some() {
            return Err(Error::Config(
                "tls_client_ca, tls_client_auth and tls_ca need tls_cert and tls_key".into(),
            ));
        }
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&s.cert, &s.key) else {
        return Err(Error::Config("TLS needs both tls_cert and tls_key".into()));
    };
    let chain = read_certs(cert, "tls_cert")?;
    let key = read_key(key)?;
    let provider = provider();
    let client_auth = match (s.client_auth, &s.client_ca) {
        (None, None) => ClientAuth::None,
        (None, Some(_)) => ClientAuth::Requested,
        (Some(ClientAuth::None), _) => ClientAuth::None,
        (Some(m), Some(_)) => m,
        (Some(m), None) => {
            return Err(Error::Config(format!(
                "tls_client_auth = {m:?} needs tls_client_ca (the CA client certificates are verified against)"
            )))
        }
    };
    let versions = rustls::DEFAULT_VERSIONS;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    let builder = match (client_auth, &s.client_ca) {
        (ClientAuth::Requested | ClientAuth::Required, Some(ca)) => {
            let roots = Arc::new(read_roots(ca, "tls_client_ca")?);
            let v = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
            let v = if client_auth == ClientAuth::Requested {
                v.allow_unauthenticated()
            } else {
                v
            };
            let verifier = v.build().map_err(|e| tls_err("tls_client_ca", ca, e))?;
            let verifier: Arc<dyn ClientCertVerifier> = if client_auth == ClientAuth::Required {
                Arc::new(NamesAPrincipal(verifier))
            } else {
                verifier
            };
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let server = builder
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| {
            tls_err(
                "tls_cert",
                cert,
                format!("cannot be used with tls_key: {e}"),
            )
        })?;
    let peer = match &s.ca {
        None => None,
        Some(ca) => {
            let roots = read_roots(ca, "tls_ca")?;
            let b = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(versions)
                .map_err(|e| Error::Config(format!("TLS: {e}")))?
                .with_root_certificates(roots);
            // Brokers present their own certificate to each other when
            // the ports ask for one (every broker of a cluster is
            // configured alike).
            let c = if client_auth == ClientAuth::None {
                b.with_no_client_auth()
            } else {
                b.with_client_auth_cert(chain, key)
                    .map_err(|e| tls_err("tls_cert", cert, e))?
            };
            Some(Arc::new(c))
        }
    };
    let peer_server_name = s.server_name.as_deref().map(server_name).transpose()?;
    Ok(Some(Tls {
        server: Arc::new(server),
        peer,
        client_auth,
        peer_server_name,
    }))
}

/// Where client certificates are required, one must also name a usable
/// principal ([`principal_of`]): checked in the handshake, so the client
/// gets an alert (`CertificateUnknown`) that says its certificate was refused,
/// not a connection closed after a handshake that seemed to succeed.
#[derive(Debug)]
struct NamesAPrincipal(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for NamesAPrincipal {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        match principal_of(end_entity) {
            Ok(_) => Ok(verified),
            // The reason travels in the handshake error the broker logs.
            Err(e) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                    std::io::Error::other(e),
                ))),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The principal a verified client certificate names: its subject's
/// common name, else its first DNS name; it must be a valid user name
/// (the names ACLs take).
pub fn principal_of(cert: &CertificateDer<'_>) -> std::result::Result<String, String> {
    use x509_parser::extensions::GeneralName;
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let cn = x
        .subject()
        .iter_common_name()
        .next()
        .map(|cn| {
            cn.as_str()
                .map(str::to_string)
                .map_err(|e| format!("the certificate's common name is not text: {e}"))
        })
        .transpose()?;
    let name = match cn {
        Some(n) => n,
        None => {
            let san = x
                .subject_alternative_name()
                .map_err(|e| format!("unreadable subject alternative names: {e}"))?;
            san.and_then(|s| {
                s.value.general_names.iter().find_map(|g| match g {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
            })
            .ok_or("the client certificate names no common name and no DNS name")?
        }
    };
    shoal_wire::scram::validate_username(&name).map_err(|e| {
        format!("the client certificate's name {name:?} is not a valid principal: {e}")
    })?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(cn: Option<&str>, dns: &[&str]) -> CertificateDer<'static> {
        let mut p =
            rcgen::CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name
                .push(rcgen::DnType::CommonName, cn.to_string());
        }
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn the_principal_is_the_common_name_else_the_first_dns_name() {
        assert_eq!(
            principal_of(&cert_with(Some("alice"), &["bob.example"])).unwrap(),
            "alice"
        );
        assert_eq!(
            principal_of(&cert_with(None, &["carol.example", "dave.example"])).unwrap(),
            "carol.example"
        );
        let e = principal_of(&cert_with(None, &[])).unwrap_err();
        assert!(e.contains("no common name"), "{e}");
        let e = principal_of(&cert_with(Some("no spaces allowed"), &[])).unwrap_err();
        assert!(e.contains("not a valid principal"), "{e}");
        assert!(principal_of(&CertificateDer::from(vec![1u8, 2, 3])).is_err());
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_pem, key_pem) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert_pem, cert.pem()).unwrap();
        std::fs::write(&key_pem, key.serialize_pem()).unwrap();
        let other_key = dir.path().join("other.pem");
        std::fs::write(
            &other_key,
            rcgen::KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let with = |cert: &Path, key: &Path| TlsSettings {
            cert: Some(cert.to_path_buf()),
            key: Some(key.to_path_buf()),
            ..Default::default()
        };
        let msg = |s: TlsSettings| load(&s).unwrap_err().to_string();
        let e = msg(with(&missing, &key_pem));
        assert!(e.contains("tls_cert") && e.contains("missing.pem"), "{e}");
        let e = msg(with(&garbage, &key_pem));
        assert!(e.contains("no CERTIFICATE"), "{e}");
        let e = msg(with(&cert_pem, &garbage));
        assert!(e.contains("tls_key") && e.contains("private key"), "{e}");
        let e = msg(with(&cert_pem, &other_key));
        assert!(e.contains("cannot be used with tls_key"), "{e}");
        let e = msg(TlsSettings {
            client_auth: Some(ClientAuth::Required),
            ..with(&cert_pem, &key_pem)
        });
        assert!(e.contains("needs tls_client_ca"), "{e}");
        let e = msg(TlsSettings {
            cert: Some(cert_pem.clone()),
            ..Default::default()
        });
        assert!(e.contains("both tls_cert and tls_key"), "{e}");
        let ok = load(&with(&cert_pem, &key_pem)).unwrap().unwrap();
        assert_eq!(ok.client_auth, ClientAuth::None);
        assert!(ok.peer.is_none());
        let ok = load(&TlsSettings {
            client_ca: Some(cert_pem.clone()),
            ca: Some(cert_pem.clone()),
            ..with(&cert_pem, &key_pem)
        })
        .unwrap()
        .unwrap();
        assert_eq!(ok.client_auth, ClientAuth::Requested);
        assert!(ok.peer.is_some());
    }
}
