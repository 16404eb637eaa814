//! A broker's own connection to another broker's shard port (a follower
//! to its leader): TCP, then TLS when the broker has TLS (the leader's
//! certificate verified against `tls_ca`, for the leader's advertised host
//! or `tls_server_name`), then the SCRAM exchange when auth is on (done by
//! the caller, on the stream this returns).

use crate::auth::tls::Tls;
use futures::future::Either;
use glommio::net::TcpStream;
use std::time::Duration;

/// A connection to another broker: plaintext (left) or TLS (right).
pub type PeerStream = Either<TcpStream, Box<futures_rustls::client::TlsStream<TcpStream>>>;

/// Opens a connection to `addr` (a broker whose advertised host is
/// `host`), within `timeout` for the connect and again for the handshake.
pub async fn connect(
    tls: Option<&Tls>,
    host: &str,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> Result<PeerStream, String> {
    let stream = match crate::rt::timeout(timeout, TcpStream::connect(addr)).await {
        None => return Err(format!("no connection to {addr} within {timeout:?}")),
        Some(Err(e)) => return Err(format!("cannot connect to {addr}: {e}")),
        Some(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(Either::Left(stream));
    };
    let (config, name) = tls
        .dial_params(host)
        .map_err(|e| format!("cannot verify {host}: {e}"))?;
    let connector = futures_rustls::TlsConnector::from(config);
    match crate::rt::timeout(timeout, connector.connect(name, stream)).await {
        None => Err(format!("no TLS handshake with {addr} within {timeout:?}")),
        Some(Err(e)) => Err(format!("TLS handshake with {host} ({addr}) failed: {e}")),
        Some(Ok(s)) => Ok(Either::Right(Box::new(s))),
    }
}
