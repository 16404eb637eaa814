//! The TLS handshake of a client connection, on the shard that accepted
//! it (never in the accept loop, so a slow handshake holds up no one else).
//!
//! Before the handshake the first byte is peeked at: a TLS connection
//! starts with a handshake record (content type 22). Anything else is a
//! plaintext client on a TLS-only port: it gets one `TlsRequired` error
//! frame, in plaintext so it can read why, and is closed.

use crate::auth::tls::{principal_of, Tls};
use crate::error::Error;
use crate::metrics::add;
use crate::reactor::Reactor;
use crate::rt;
use futures::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::time::Duration;

/// A client connection over TLS.
pub type TlsStream = futures_rustls::server::TlsStream<TcpStream>;

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Why a connection ended before it was served.
#[derive(Debug)]
pub enum Refused {
    /// The peer closed before sending anything (a port probe).
    Closed,
    /// Plaintext on a TLS port; told so.
    Plaintext,
    Handshake(String),
    TimedOut,
    /// A client certificate that verified but names no usable principal.
    Principal(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Closed => f.write_str("closed before the TLS handshake"),
            Refused::Plaintext => f.write_str("plaintext on a TLS port (answered TlsRequired)"),
            Refused::Handshake(e) => write!(f, "TLS handshake failed: {e}"),
            Refused::TimedOut => f.write_str("TLS handshake timed out"),
            Refused::Principal(e) => write!(f, "client certificate refused: {e}"),
        }
    }
}

/// Runs the server side of the handshake within the request timeout.
/// Returns the stream and the principal the client's certificate names,
/// if it presented one.
pub async fn accept(
    reactor: &Reactor,
    tls: &Tls,
    stream: TcpStream,
) -> Result<(TlsStream, Option<String>), Refused> {
    let timeout = reactor.config.request_timeout;
    let mut first = [0u8; 1];
    match rt::timeout(timeout, stream.peek(&mut first)).await {
        None => return Err(Refused::TimedOut),
        Some(Err(e)) => return Err(Refused::Handshake(e.to_string())),
        Some(Ok(0)) => return Err(Refused::Closed),
        Some(Ok(_)) => {}
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        let frame = crate::conn::respond::error_frame(0, &Error::TlsRequired);
        let mut stream = stream;
        // A peer that reads nothing must not hold the connection. The
        // request it sent is read and dropped before the close: closing
        // with unread bytes would reset the connection, and a reset can
        // overtake the frame.
        let _ = rt::timeout(Duration::from_millis(200), async {
            stream.write_all(&frame).await?;
            stream.flush().await?;
            stream.shutdown(std::net::Shutdown::Write).await?;
            let mut sink = [0u8; 4096];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
        return Err(Refused::Plaintext);
    }
    let acceptor = futures_rustls::TlsAcceptor::from(tls.server.clone());
    let s = match rt::timeout(timeout, acceptor.accept(stream)).await {
        None => return Err(Refused::TimedOut),
        Some(Err(e)) => return Err(Refused::Handshake(e.to_string())),
        Some(Ok(s)) => s,
    };
    // A certificate is only there if the verifier accepted it.
    let leaf = s
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned();
    let principal = match leaf {
        None => None,
        Some(c) => Some(principal_of(&c).map_err(Refused::Principal)?),
    };
    Ok((s, principal))
}

/// Counts and logs (rate-limited) a connection refused at the handshake.
pub fn refused(reactor: &Reactor, peer: Option<std::net::SocketAddr>, why: &Refused) {
    if matches!(why, Refused::Closed) {
        tracing::debug!(shard = reactor.id, ?peer, "{why}");
        return;
    }
    add(&reactor.metrics.tls_handshake_failures, 1);
    if let Some(held_back) = reactor.tls_log.allow() {
        tracing::warn!(
            shard = reactor.id,
            ?peer,
            more_since_last_line = held_back,
            "refused a connection: {why}"
        );
    }
}
