//! One client connection on one shard.
//!
//! - this file: the connection's state and its receive loop. Frames are
//!   checked before anything is decoded; the receive buffer grows only as a
//!   frame's bytes arrive (never to the size a header merely announces),
//!   its growth beyond [`RECV_BUFFER_BASE_BYTES`] is drawn from the shard's
//!   [`RecvBudget`] (waiting while it is spent), and a frame must complete
//!   within `request_timeout_ms`.
//! - [`dispatch`]: decodes a request and hands it to its API family:
//!   [`produce`], [`fetch`], [`topics`] (create, delete, list, describe,
//!   metadata), [`push`] (subscriptions with credit), [`admin`] (metrics),
//!   [`auth`] (the SCRAM exchange, the ACL check of every request when
//!   auth is on, users and ACLs).
//! - [`respond`]: Shoal's response frames, built into one reused
//!   flatbuffer builder.
//! - [`writer`]: the protocol-neutral writer: a frame head, then log bytes
//!   with [`sendfile`] (never through user space); on a TLS connection
//!   copied in bounded pieces and encrypted (no kTLS on these kernels).
//! - [`tls`]: the TLS handshake (when the broker has a certificate), on
//!   the connection's own task; a client certificate names the principal.
//!
//! Framing errors close the connection (after an error frame): the byte
//! stream can no longer be trusted. Every other bad input gets an error
//! response and the connection keeps going.

pub mod admin;
pub mod auth;
pub mod dispatch;
pub mod fetch;
pub mod groups;
pub mod produce;
pub mod push;
pub mod respond;
pub mod sendfile;
pub mod tls;
pub mod topics;
pub mod writer;

use crate::error::Error;
use crate::limits::{RECV_BUFFER_BASE_BYTES, RECV_BUFFER_INITIAL_BYTES, RECV_BUFFER_KEEP_BYTES};
use crate::metrics::{add, sub};
use crate::reactor::Reactor;
use crate::rt;
use futures::io::{AsyncRead, AsyncReadExt};
use futures::lock::Mutex;
use glommio::net::TcpStream;
use shoal_shard::Notify;
use shoal_wire::frame::{self, Check};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The shard-wide budget for receive-buffer bytes beyond each buffer's
/// base size: what all connections of a shard may hold for partial (and
/// large) frames at once.
pub struct RecvBudget {
    max: usize,
    used: Cell<usize>,
    freed: Notify,
    /// When the budget last ran out and this was logged (one line per
    /// episode, not one per waiting connection).
    exhausted_since: Cell<Option<Instant>>,
}

impl RecvBudget {
    pub fn new(max: usize) -> RecvBudget {
        RecvBudget {
            max,
            used: Cell::new(0),
            freed: Notify::default(),
            exhausted_since: Cell::new(None),
        }
    }

    pub fn used(&self) -> usize {
        self.used.get()
    }

    fn try_take(&self, bytes: usize) -> bool {
        if self.used.get() + bytes > self.max {
            return false;
        }
        self.used.set(self.used.get() + bytes);
        true
    }

    fn give_back(&self, bytes: usize) {
        assert!(self.used.get() >= bytes, "budget returned twice");
        self.used.set(self.used.get() - bytes);
        if self.exhausted_since.get().is_some() && self.used.get() <= self.max / 2 {
            self.exhausted_since.set(None);
            tracing::info!(
                used_bytes = self.used.get(),
                "partial-frame memory budget available again"
            );
        }
        self.freed.notify_all();
    }
}

/// A connection's receive buffer, its growth paid from the shard's
/// [`RecvBudget`] and returned when it shrinks or the connection ends.
struct RecvBuffer<'a> {
    reactor: &'a Reactor,
    buf: Vec<u8>,
}

impl<'a> RecvBuffer<'a> {
    fn new(reactor: &'a Reactor) -> RecvBuffer<'a> {
        RecvBuffer {
            reactor,
            buf: vec![0; RECV_BUFFER_INITIAL_BYTES],
        }
    }

    fn charge_of(len: usize) -> usize {
        len.saturating_sub(RECV_BUFFER_BASE_BYTES)
    }

    fn charged(&self) -> usize {
        Self::charge_of(self.buf.len())
    }

    /// Grows to `len`, waiting for budget until `deadline`; `false` if the
    /// budget never allowed it.
    async fn grow_to(&mut self, len: usize, deadline: Instant) -> bool {
        assert!(len > self.buf.len());
        let need = Self::charge_of(len) - self.charged();
        if need == 0 {
            self.buf.resize(len, 0);
            return true;
        }
        let budget = &self.reactor.recv_budget;
        if !budget.try_take(need) {
            add(&self.reactor.metrics.recv_budget_waits, 1);
            if budget.exhausted_since.get().is_none() {
                budget.exhausted_since.set(Some(rt::now()));
                tracing::warn!(
                    shard = self.reactor.id,
                    budget_bytes = budget.max,
                    "partial-frame memory budget spent; connections that need more wait (closed after request_timeout_ms)"
                );
            }
            loop {
                let freed = budget.freed.changed();
                if budget.try_take(need) {
                    break;
                }
                let left = deadline.saturating_duration_since(rt::now());
                if left.is_zero() || rt::timeout(left, freed).await.is_none() {
                    return false;
                }
            }
        }
        add(&self.reactor.metrics.recv_buffer_bytes, need as u64);
        self.buf.resize(len, 0);
        true
    }

    /// Back to the initial size, once a large frame is served.
    fn shrink(&mut self) {
        let charged = self.charged();
        self.buf.truncate(RECV_BUFFER_INITIAL_BYTES);
        self.buf.shrink_to_fit();
        if charged == 0 {
            return;
        }
        sub(&self.reactor.metrics.recv_buffer_bytes, charged as u64);
        self.reactor.recv_budget.give_back(charged);
    }
}

impl Drop for RecvBuffer<'_> {
    fn drop(&mut self) {
        self.shrink();
    }
}

/// A push subscription's state, shared by its push loop and the requests
/// that grant credit or cancel it.
pub struct Subscription {
    pub credit: Cell<u64>,
    pub cancelled: Cell<bool>,
    pub changed: Notify,
}

pub struct Conn {
    pub reactor: Rc<Reactor>,
    pub out: Mutex<respond::Out>,
    pub subs: RefCell<HashMap<u64, Rc<Subscription>>>,
    pub closed: Cell<bool>,
    pub fetches_in_flight: Cell<usize>,
    pub produces_in_flight: Cell<usize>,
    /// The other end's address.
    pub peer: Option<std::net::SocketAddr>,
    /// Who the other end is (auth on).
    pub session: RefCell<crate::auth::Session>,
}

/// Serves a connection until the peer closes it, a framing error, a
/// request timeout, or shutdown. With TLS configured, the handshake comes
/// first (within the request timeout).
pub async fn serve(reactor: Rc<Reactor>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let sock = stream.as_raw_fd();
    add(&reactor.metrics.connections_accepted, 1);
    add(&reactor.metrics.connections_open, 1);
    // Every line logged from the read loop names its connection (the span
    // is made once per connection, never per request).
    let span = tracing::info_span!("conn", shard = reactor.id, peer = ?peer);
    let served = async {
        match &reactor.config.tls {
            None => {
                let (r, w) = stream.split();
                serve_stream(&reactor, r, writer::Sink::Plain(w), sock, peer, None).await;
            }
            Some(t) => match tls::accept(&reactor, t, stream).await {
                Ok((s, principal)) => {
                    let (r, w) = s.split();
                    let sink = writer::Sink::tls(w);
                    serve_stream(&reactor, r, sink, sock, peer, principal).await;
                }
                Err(why) => tls::refused(&reactor, peer, &why),
            },
        }
    };
    tracing::Instrument::instrument(served, span).await;
    sub(&reactor.metrics.connections_open, 1);
}

/// The connection proper, over a plaintext or TLS stream (`r` is its
/// receiving half, `sink` its sending one). `certified`: the principal a
/// verified client certificate named.
async fn serve_stream<R: AsyncRead + Unpin>(
    reactor: &Rc<Reactor>,
    mut r: R,
    sink: writer::Sink,
    sock: std::os::fd::RawFd,
    peer: Option<std::net::SocketAddr>,
    certified: Option<String>,
) {
    let mut session = crate::auth::Session::default();
    if let Some(p) = certified {
        session.privileged = reactor.security.config.is_privileged(&p);
        tracing::info!(principal = %p, peer = ?peer, "authenticated by client certificate");
        session.principal = Some(p);
        session.certified = true;
    }
    let conn = Rc::new(Conn {
        reactor: reactor.clone(),
        out: Mutex::new(respond::Out::new(writer::Writer::new(sink, sock, reactor))),
        subs: RefCell::new(HashMap::new()),
        closed: Cell::new(false),
        fetches_in_flight: Cell::new(0),
        produces_in_flight: Cell::new(0),
        peer,
        session: RefCell::new(session),
    });
    if let Err(e) = read_loop(&conn, &mut r).await {
        tracing::debug!(shard = reactor.id, error = %e, "connection ended");
    }
    conn.closed.set(true);
    for s in conn.subs.borrow().values() {
        s.cancelled.set(true);
        s.changed.notify_all();
    }
}

fn closing(kind: std::io::ErrorKind, why: String) -> std::io::Error {
    std::io::Error::new(kind, why)
}

async fn read_loop<R: AsyncRead + Unpin>(conn: &Rc<Conn>, r: &mut R) -> std::io::Result<()> {
    let reactor = &*conn.reactor;
    let max = reactor.config.frame_bytes_max;
    let request_timeout = reactor.config.request_timeout;
    let mut buf = RecvBuffer::new(reactor);
    let mut filled = 0usize;
    // When the first byte of the frame now arriving was seen.
    let mut frame_started: Option<Instant> = None;
    // With auth on, a connection must authenticate within one request
    // timeout: an idle unauthenticated connection holds nothing for long.
    let auth_deadline = reactor
        .security
        .enabled()
        .then(|| rt::now() + request_timeout);
    loop {
        match frame::check(&buf.buf[..filled], max) {
            Err(e) => {
                add(&reactor.metrics.errors, 1);
                let why = e.to_string();
                let _ = conn.respond_error(0, &Error::BadFrame(e)).await;
                return Err(closing(std::io::ErrorKind::InvalidData, why));
            }
            Ok(Check::Incomplete { total }) => {
                let deadline = match (filled, frame_started) {
                    (0, _) => auth_deadline.filter(|_| conn.session.borrow().principal.is_none()),
                    (_, Some(t)) => Some(t + request_timeout),
                    (_, None) => {
                        let now = rt::now();
                        frame_started = Some(now);
                        Some(now + request_timeout)
                    }
                };
                if filled == buf.buf.len() {
                    // Full: grow towards the frame, at most doubling what
                    // has arrived, so memory follows bytes received.
                    let len = total.min((filled * 2).max(RECV_BUFFER_INITIAL_BYTES));
                    let deadline = deadline.unwrap_or_else(|| rt::now() + request_timeout);
                    if !buf.grow_to(len, deadline).await {
                        return Err(timed_out(conn, request_timeout).await);
                    }
                }
                let n = match deadline {
                    None => r.read(&mut buf.buf[filled..]).await?,
                    Some(d) => {
                        let left = d.saturating_duration_since(rt::now());
                        match rt::timeout(left, r.read(&mut buf.buf[filled..])).await {
                            Some(n) => n?,
                            None => return Err(timed_out(conn, request_timeout).await),
                        }
                    }
                };
                if n == 0 {
                    return Ok(());
                }
                let was_full = filled + n == buf.buf.len();
                filled += n;
                if was_full && buf.buf.len() < RECV_BUFFER_BASE_BYTES {
                    // The read filled all the room: more is likely waiting
                    // (pipelined requests); read it in fewer calls.
                    let len = (buf.buf.len() * 2).min(RECV_BUFFER_BASE_BYTES);
                    let _ = buf.grow_to(len, rt::now()).await;
                }
            }
            Ok(Check::Complete(parts)) => {
                let header = &buf.buf[parts.header.clone()];
                let payload = &buf.buf[parts.payload.clone()];
                conn.handle(header, payload).await?;
                buf.buf.copy_within(parts.total..filled, 0);
                filled -= parts.total;
                frame_started = None;
                if buf.buf.len() > RECV_BUFFER_KEEP_BYTES && filled <= RECV_BUFFER_INITIAL_BYTES {
                    buf.shrink();
                }
            }
        }
    }
}

/// Answers a connection whose frame did not complete in time, and says why
/// it is closed.
async fn timed_out(conn: &Conn, request_timeout: Duration) -> std::io::Error {
    let reactor = &conn.reactor;
    add(&reactor.metrics.request_timeouts, 1);
    let e = Error::RequestTimeout {
        ms: request_timeout.as_millis() as u64,
    };
    tracing::debug!(shard = reactor.id, "{e}");
    // A peer that reads nothing must not hold the close up.
    let _ = rt::timeout(Duration::from_millis(100), conn.respond_error(0, &e)).await;
    closing(std::io::ErrorKind::TimedOut, e.to_string())
}
