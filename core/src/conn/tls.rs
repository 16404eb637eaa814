//! The TLS handshake of a client connection, on the shard that accepted
//! it (never in the accept loop, so a slow handshake holds up no one else).
//!
//! Before the handshake the first bytes are peeked at: a TLS connection
//! starts with a handshake record (content type 22, then major version 3).
//! Anything else is a plaintext client on a TLS-only port: it gets one
//! `TlsRequired` error frame, in plaintext so it can read why, and is
//! closed.
//!
//! The peek and the handshake share one deadline ([`HANDSHAKE_TIMEOUT`],
//! or the request timeout if shorter), so a peer that trickles its hello
//! holds a connection slot for at most that long.

use crate::auth::tls::{principal_of, ClientAuth, Tls};
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
/// The second: the record's major protocol version (3 for SSL 3.0 up to
/// TLS 1.3).
const TLS_MAJOR_VERSION: u8 = 0x03;

/// The longest a connection may take from accept to a finished TLS
/// handshake (a real one takes a few milliseconds).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the first bytes a peer sent (at least one) open a TLS
/// connection. A Shoal frame starts with its little-endian length, so a
/// plaintext frame whose length's low byte is 22 matches the first byte;
/// the second tells them apart when it has arrived (only lengths of
/// 0x0316 + k * 65536 bytes match both, and no first request of a client
/// is that large). A client whose first write is that one byte alone is
/// taken for TLS and gets a TLS alert instead of `TlsRequired`.
fn looks_like_tls(first: &[u8]) -> bool {
    matches!(
        first,
        [TLS_HANDSHAKE_RECORD] | [TLS_HANDSHAKE_RECORD, TLS_MAJOR_VERSION, ..]
    )
}

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

/// Runs the server side of the handshake within [`HANDSHAKE_TIMEOUT`]
/// (or the request timeout if shorter). Returns the stream and the
/// principal the client's certificate names, if it presented one that
/// names a usable principal (see [`principal_of`]).
pub async fn accept(
    reactor: &Reactor,
    tls: &Tls,
    stream: TcpStream,
) -> Result<(TlsStream, Option<String>), Refused> {
    let limit = HANDSHAKE_TIMEOUT.min(reactor.config.request_timeout);
    let deadline = rt::now() + limit;
    let left = || deadline.saturating_duration_since(rt::now());
    let mut first = [0u8; 2];
    let n = match rt::timeout(left(), stream.peek(&mut first)).await {
        None => return Err(Refused::TimedOut),
        Some(Err(e)) => return Err(Refused::Handshake(e.to_string())),
        Some(Ok(0)) => return Err(Refused::Closed),
        Some(Ok(n)) => n,
    };
    if !looks_like_tls(&first[..n]) {
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
    let s = match rt::timeout(left(), acceptor.accept(stream)).await {
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
    let principal = match leaf.map(|c| principal_of(&c)) {
        None => None,
        Some(Ok(p)) => Some(p),
        // Where a certificate is only requested, one that names no usable
        // principal is as good as none: the client may still log in with
        // SCRAM (and a request before that is refused as unauthenticated).
        Some(Err(e)) if tls.client_auth == ClientAuth::Requested => {
            if let Some(held_back) = reactor.tls_log.allow() {
                tracing::warn!(
                    shard = reactor.id,
                    more_since_last_line = held_back,
                    "client certificate names no usable principal ({e}); the client must log in with SCRAM"
                );
            }
            None
        }
        Some(Err(e)) => return Err(Refused::Principal(e)),
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

#[cfg(test)]
mod tests {
    use super::looks_like_tls;

    #[test]
    fn a_client_hello_looks_like_tls_and_plaintext_frames_do_not() {
        // A TLS 1.2/1.3 ClientHello record header, whole or cut short.
        assert!(looks_like_tls(&[0x16, 0x03]));
        assert!(looks_like_tls(&[0x16]));
        // Shoal frames: little-endian lengths, 22 bytes and 0x0116 bytes.
        assert!(!looks_like_tls(&[0x16, 0x00]));
        assert!(!looks_like_tls(&[0x16, 0x01]));
        assert!(!looks_like_tls(&[0x20, 0x00]));
        assert!(!looks_like_tls(&[0x00]));
    }
}
