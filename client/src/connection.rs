//! One TCP connection to one broker port (plaintext or TLS), with requests
//! multiplexed by correlation id and pushes routed to their subscriptions.

use crate::error::{Error, Result};
use flatbuffers::{FlatBufferBuilder, WIPOffset};
use shoal_wire::frame::{self, Check};
use shoal_wire::{fb, ErrorCode};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};

/// A received frame: the verified response header and the raw payload.
pub struct Frame {
    buf: bytes::Bytes,
    header: Range<usize>,
    payload: Range<usize>,
}

impl Frame {
    pub fn response(&self) -> fb::Response<'_> {
        // Verified when the frame was received.
        flatbuffers::root::<fb::Response>(&self.buf[self.header.clone()])
            .expect("verified on receipt")
    }
    pub fn payload(&self) -> &[u8] {
        &self.buf[self.payload.clone()]
    }

    /// The payload as a view that shares the frame's buffer (no copy).
    pub fn payload_bytes(&self) -> bytes::Bytes {
        self.buf.slice(self.payload.clone())
    }
}

/// Smallest read the receive loop asks the kernel for.
const SMALL_FRAME_BYTES: usize = 64 * 1024;

/// Connection-level errors one route may hold unread; more are dropped
/// (they are logged, and one is enough to tell the subscriber).
const ROUTE_ERRORS_QUEUED_MAX: u32 = 4;

/// A request waiting for its response, with the credit it grants if it is
/// a subscribe (the push route must know it before the first push).
struct Waiting {
    tx: oneshot::Sender<Result<Frame>>,
    subscribe_credit_bytes: Option<u64>,
}

type Pending = Arc<Mutex<HashMap<u32, Waiting>>>;
type Pushes = Arc<Mutex<HashMap<u64, RouteTx>>>;
/// Push routes the reader created for new subscriptions, waiting for the
/// subscriber to take them.
type NewRoutes = Arc<Mutex<HashMap<u64, PushRoute>>>;

/// Credit accounting of one push route, shared by the reader (which
/// queues pushes) and the subscription (which takes them and grants).
///
/// The broker may only push within the credit granted, so the bytes a
/// route holds are bounded by that credit: the reader checks it instead of
/// trusting it, and ends the subscription of a broker that pushes past it.
#[derive(Default)]
struct RouteCredit {
    /// Payload bytes granted so far: the subscribe's credit plus every
    /// grant, counted before the grant is sent so a push it allows is
    /// never mistaken for a violation.
    granted_bytes: AtomicU64,
    /// Payload bytes pushed so far (the reader alone writes it).
    pushed_bytes: AtomicU64,
    /// Payload bytes queued and not yet taken by the subscriber.
    queued_bytes: AtomicU64,
    errors_queued: AtomicU32,
}

struct RouteTx {
    tx: mpsc::UnboundedSender<Result<Frame>>,
    credit: Arc<RouteCredit>,
}

/// The pushes of one subscription, as the connection's reader queues them.
///
/// Unbounded as a channel, bounded by credit: the reader queues a push only
/// while the subscription has credit left (one push may overrun what is
/// left; the broker itself never does), so the queue holds at most the
/// credit granted plus one push. A bounded channel would instead make the
/// reader wait for the slowest subscriber, stalling every response and
/// every other subscription on the connection.
pub struct PushRoute {
    rx: mpsc::UnboundedReceiver<Result<Frame>>,
    credit: Arc<RouteCredit>,
}

impl PushRoute {
    fn new(credit_bytes: u64) -> (RouteTx, PushRoute) {
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(RouteCredit::default());
        credit.granted_bytes.store(credit_bytes, Ordering::SeqCst);
        (
            RouteTx {
                tx,
                credit: credit.clone(),
            },
            PushRoute { rx, credit },
        )
    }

    /// The next push (or the error that ended the subscription); `None`
    /// once the route is closed. Cancel-safe: a push is either returned or
    /// stays queued.
    pub async fn recv(&mut self) -> Option<Result<Frame>> {
        let item = self.rx.recv().await?;
        match &item {
            Ok(f) => {
                self.credit
                    .queued_bytes
                    .fetch_sub(f.payload().len() as u64, Ordering::SeqCst);
            }
            Err(_) => {
                // The final error (closed, credit overrun) was never counted.
                let _ = self.credit.errors_queued.fetch_update(
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                    |n| n.checked_sub(1),
                );
            }
        }
        Some(item)
    }

    /// Records a grant of `bytes` more credit. Call it before sending the
    /// grant: the broker may use it as soon as it arrives.
    pub fn granting(&self, bytes: u64) {
        self.credit.granted_bytes.fetch_add(bytes, Ordering::SeqCst);
    }

    /// Payload bytes queued for the subscriber and not yet taken.
    pub fn queued_bytes(&self) -> u64 {
        self.credit.queued_bytes.load(Ordering::SeqCst)
    }
}

impl RouteTx {
    /// Queues a push, or ends the route if the broker pushed beyond the
    /// credit granted. Returns false once the route is over.
    fn push(&self, subscription: u64, frame: Frame) -> bool {
        let bytes = frame.payload().len() as u64;
        let c = &self.credit;
        let granted = c.granted_bytes.load(Ordering::SeqCst);
        let pushed = c.pushed_bytes.load(Ordering::SeqCst);
        if bytes > 0 && pushed >= granted {
            tracing::warn!(
                subscription,
                granted,
                pushed,
                bytes,
                "broker pushed beyond the credit granted; ending the subscription"
            );
            let _ = self.tx.send(Err(Error::Protocol(format!(
                "subscription {subscription}: the broker pushed {bytes} bytes after \
                 {pushed} of {granted} granted"
            ))));
            return false;
        }
        c.pushed_bytes.fetch_add(bytes, Ordering::SeqCst);
        c.queued_bytes.fetch_add(bytes, Ordering::SeqCst);
        if self.tx.send(Ok(frame)).is_err() {
            // The subscriber is gone: nothing will take these bytes.
            c.queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
        }
        true
    }

    fn error(&self, e: Error) {
        let c = &self.credit;
        if c.errors_queued.load(Ordering::SeqCst) >= ROUTE_ERRORS_QUEUED_MAX {
            return;
        }
        c.errors_queued.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(Err(e)).is_err() {
            c.errors_queued.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Why a connection ended, as its waiting requests hear it.
enum Why {
    Broker(ErrorCode, String),
    Tls(String),
}

/// A connection's sending half.
enum WriteSide {
    /// Written without waiting where the socket has room
    /// (`try_write_vectored`).
    Plain(OwnedWriteHalf),
    /// Written into rustls, which encrypts and holds what the socket does
    /// not take until it is flushed.
    Tls(tokio::io::WriteHalf<TlsStream>),
}

impl AsyncWrite for WriteSide {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            WriteSide::Plain(w) => Pin::new(w).poll_write(cx, buf),
            WriteSide::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            WriteSide::Plain(w) => Pin::new(w).poll_flush(cx),
            WriteSide::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            WriteSide::Plain(w) => Pin::new(w).poll_shutdown(cx),
            WriteSide::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

pub struct Connection {
    pub addr: SocketAddr,
    writer: Arc<tokio::sync::Mutex<WriteSide>>,
    pending: Pending,
    pushes: Pushes,
    new_routes: NewRoutes,
    next_corr: AtomicU32,
    closed: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
    client_id: String,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Connection {
    /// A plaintext connection.
    pub async fn connect(addr: SocketAddr, client_id: &str) -> Result<Arc<Connection>> {
        Connection::connect_with(addr, client_id, None).await
    }

    /// A connection, over TLS when `tls` is given (the handshake is done
    /// when this returns).
    pub async fn connect_with(
        addr: SocketAddr,
        client_id: &str,
        tls: Option<&crate::tls::TlsConfig>,
    ) -> Result<Arc<Connection>> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| Error::Connect {
                addr: addr.to_string(),
                source,
            })?;
        stream.set_nodelay(true)?;
        match tls {
            None => {
                let (r, w) = stream.into_split();
                Ok(Connection::start(addr, client_id, r, WriteSide::Plain(w)))
            }
            Some(tls) => {
                let s = tls.connect(addr, stream).await?;
                let (r, w) = tokio::io::split(s);
                Ok(Connection::start(addr, client_id, r, WriteSide::Tls(w)))
            }
        }
    }

    fn start<R: AsyncRead + Unpin + Send + 'static>(
        addr: SocketAddr,
        client_id: &str,
        mut r: R,
        w: WriteSide,
    ) -> Arc<Connection> {
        let pending: Pending = Arc::default();
        let pushes: Pushes = Arc::default();
        let new_routes: NewRoutes = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let (p2, s2, n2, c2) = (
            pending.clone(),
            pushes.clone(),
            new_routes.clone(),
            closed.clone(),
        );
        let reader = tokio::spawn(async move {
            let r = read_loop(&mut r, &p2, &s2, &n2).await;
            c2.store(true, Ordering::SeqCst);
            // The broker said why it closed the connection (a plaintext
            // client on a TLS port), or TLS did (a client certificate the
            // broker refused: under TLS 1.3 the client's handshake ends
            // before the broker has checked it, so the refusal comes as an
            // alert on the first read): every request waiting hears that.
            let why = match &r {
                Err(Error::Broker { code, message }) => Some(Why::Broker(*code, message.clone())),
                Err(Error::Io(e)) => e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .map(|t| Why::Tls(t.to_string())),
                _ => None,
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "shoal connection closed");
            }
            for (_, w) in lock(&p2).drain() {
                let e = match &why {
                    Some(Why::Broker(code, message)) => Error::Broker {
                        code: *code,
                        message: message.clone(),
                    },
                    Some(Why::Tls(message)) => Error::Connect {
                        addr: addr.to_string(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            format!("TLS: {message}"),
                        ),
                    },
                    None => Error::Closed,
                };
                let _ = w.tx.send(Err(e));
            }
            for (_, route) in lock(&s2).drain() {
                let _ = route.tx.send(Err(Error::Closed));
            }
        });
        Arc::new(Connection {
            addr,
            writer: Arc::new(tokio::sync::Mutex::new(w)),
            pending,
            pushes,
            new_routes,
            next_corr: AtomicU32::new(1),
            closed,
            reader,
            client_id: client_id.to_string(),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Gives the connection up (its broker stopped answering): every
    /// request waiting on it fails with [`Error::Closed`], every push route
    /// ends with it, and nothing more is sent on it.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.reader.abort();
        for (_, w) in lock(&self.pending).drain() {
            let _ = w.tx.send(Err(Error::Closed));
        }
        for (_, route) in lock(&self.pushes).drain() {
            let _ = route.tx.send(Err(Error::Closed));
        }
        lock(&self.new_routes).clear();
    }

    /// Sends a request and waits for its response. `body` builds the
    /// request body; `payload` follows the header raw (record batches).
    ///
    /// Cancel-safe: a caller that stops waiting (a timeout, `select!`)
    /// never leaves part of a frame on the connection; the request is then
    /// either not sent at all or sent whole, its response dropped.
    pub async fn request<F>(
        &self,
        body_type: fb::RequestBody,
        body: F,
        payload: &[u8],
    ) -> Result<Frame>
    where
        F: FnOnce(&mut FlatBufferBuilder<'static>) -> WIPOffset<flatbuffers::UnionWIPOffset>,
    {
        self.request_parts(body_type, body, &[payload]).await
    }

    /// Like [`Self::request`], with the payload in parts (batches as they
    /// lie in memory) written with one vectored write, not copied together.
    pub async fn request_parts<F>(
        &self,
        body_type: fb::RequestBody,
        body: F,
        payload: &[&[u8]],
    ) -> Result<Frame>
    where
        F: FnOnce(&mut FlatBufferBuilder<'static>) -> WIPOffset<flatbuffers::UnionWIPOffset>,
    {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        let (corr, fbb) = self.build_request(body_type, body);
        let header = fbb.finished_data();
        let subscribe_credit_bytes = if body_type == fb::RequestBody::SubscribeRequest {
            // Read back from the request itself, so a subscribe sent through
            // this generic path is accounted for like any other.
            flatbuffers::root::<fb::Request>(header)
                .ok()
                .and_then(|r| r.body_as_subscribe_request())
                .map(|s| s.credit_bytes())
        } else {
            None
        };
        let (tx, rx) = oneshot::channel();
        // Waiting for the lock writes nothing, so it may be cancelled.
        let w = self.writer.clone().lock_owned().await;
        lock(&self.pending).insert(
            corr,
            Waiting {
                tx,
                subscribe_credit_bytes,
            },
        );
        if let Err(e) = write_frame(w, header, payload).await {
            lock(&self.pending).remove(&corr);
            // Part of the frame may be out: nothing more can follow it.
            self.closed.store(true, Ordering::SeqCst);
            return Err(e.into());
        }
        let frame = rx.await.map_err(|_| Error::Closed)??;
        let resp = frame.response();
        if resp.error_code() != 0 {
            return Err(response_error(resp));
        }
        Ok(frame)
    }

    fn build_request<F>(
        &self,
        body_type: fb::RequestBody,
        body: F,
    ) -> (u32, FlatBufferBuilder<'static>)
    where
        F: FnOnce(&mut FlatBufferBuilder<'static>) -> WIPOffset<flatbuffers::UnionWIPOffset>,
    {
        let corr = self.next_corr.fetch_add(1, Ordering::Relaxed).max(1);
        let mut fbb = FlatBufferBuilder::with_capacity(256);
        let b = body(&mut fbb);
        let client_id = fbb.create_string(&self.client_id);
        let req = fb::Request::create(
            &mut fbb,
            &fb::RequestArgs {
                version: 1,
                correlation_id: corr,
                client_id: Some(client_id),
                body_type,
                body: Some(b),
            },
        );
        fbb.finish(req, None);
        (corr, fbb)
    }

    /// Sends a request without waiting for (or reading) its answer, and
    /// without awaiting anything: it is on the socket when this returns if
    /// the socket had room and no other request was being written, else a
    /// task finishes it. For requests whose failure shows elsewhere (a
    /// credit grant: the subscription ends).
    pub fn send_detached<F>(&self, body_type: fb::RequestBody, body: F)
    where
        F: FnOnce(&mut FlatBufferBuilder<'static>) -> WIPOffset<flatbuffers::UnionWIPOffset>,
    {
        if self.is_closed() {
            return;
        }
        // No pending entry: the reader drops the answer.
        let (_, fbb) = self.build_request(body_type, body);
        let header = fbb.finished_data();
        let closed = self.closed.clone();
        match self.writer.clone().try_lock_owned() {
            Ok(mut w) => match write_now(&mut w, header, &[]) {
                Ok(None) => {}
                Ok(Some(rest)) => {
                    tokio::spawn(async move {
                        if finish_write(w, rest).await.is_err() {
                            closed.store(true, Ordering::SeqCst);
                        }
                    });
                }
                Err(_) => closed.store(true, Ordering::SeqCst),
            },
            Err(_) => {
                let (writer, header) = (self.writer.clone(), header.to_vec());
                tokio::spawn(async move {
                    let w = writer.lock_owned().await;
                    if write_frame(w, &header, &[]).await.is_err() {
                        closed.store(true, Ordering::SeqCst);
                    }
                });
            }
        }
    }

    /// The pushes for `subscription`. The route exists from the moment its
    /// subscribe response arrived, so no push is lost in between. A route
    /// not made by a subscribe on this connection starts with no credit:
    /// grant some through [`PushRoute::granting`] first.
    pub fn register_push(&self, subscription: u64) -> PushRoute {
        if let Some(route) = lock(&self.new_routes).remove(&subscription) {
            return route;
        }
        let (tx, route) = PushRoute::new(0);
        lock(&self.pushes).insert(subscription, tx);
        route
    }

    pub fn unregister_push(&self, subscription: u64) {
        lock(&self.pushes).remove(&subscription);
        lock(&self.new_routes).remove(&subscription);
    }
}

/// The error an error response carries; `NotLeader` with the leader's
/// whereabouts when the broker gave them.
pub(crate) fn response_error(resp: fb::Response<'_>) -> Error {
    let code = ErrorCode::from_u16(resp.error_code());
    let message = resp.error_message().unwrap_or("").to_string();
    if code != ErrorCode::NotLeader {
        return Error::Broker { code, message };
    }
    let hint = resp.leader_hint().filter(|h| h.port() != 0).and_then(|h| {
        Some(crate::error::LeaderHint {
            broker_id: u32::try_from(h.broker_id()).ok(),
            host: h.host().filter(|s| !s.is_empty())?.to_string(),
            port: h.port(),
            leader_epoch: h.leader_epoch(),
        })
    });
    Error::NotLeader { message, hint }
}

/// Writes one frame: the prefix and header, then the payload parts.
///
/// What is written before the first await is written by this future; if
/// the socket cannot take it all at once, the rest is copied and written
/// by a task of its own, which holds the writer until the frame is whole.
/// So dropping this future never cuts a frame short, and the common case
/// (the socket has room) costs one `writev` and no copy of the payload.
async fn write_frame(
    mut w: tokio::sync::OwnedMutexGuard<WriteSide>,
    header: &[u8],
    payload: &[&[u8]],
) -> std::io::Result<()> {
    match write_now(&mut w, header, payload)? {
        None => Ok(()),
        Some(rest) => finish_write(w, rest).await,
    }
}

/// Writes what the socket takes now, without waiting; returns a copy of
/// the rest if it could not take the whole frame (for TLS: possibly
/// nothing, with encrypted bytes still to flush).
fn write_now(
    w: &mut WriteSide,
    header: &[u8],
    payload: &[&[u8]],
) -> std::io::Result<Option<Vec<u8>>> {
    let payload_bytes: usize = payload.iter().map(|p| p.len()).sum();
    let mut head = Vec::with_capacity(frame::FRAME_PREFIX_BYTES + header.len());
    head.extend_from_slice(&frame::prefix(header.len(), payload_bytes));
    head.extend_from_slice(header);
    let mut slices: Vec<std::io::IoSlice<'_>> = std::iter::once(std::io::IoSlice::new(&head))
        .chain(
            payload
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| std::io::IoSlice::new(p)),
        )
        .collect();
    let mut left = head.len() + payload_bytes;
    let mut bufs = &mut slices[..];
    let w = match w {
        WriteSide::Plain(w) => w,
        WriteSide::Tls(_) => return tls_write_now(w, bufs, left),
    };
    while left > 0 {
        match w.try_write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                left -= n;
                std::io::IoSlice::advance_slices(&mut bufs, n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut rest = Vec::with_capacity(left);
                for s in bufs.iter() {
                    rest.extend_from_slice(s);
                }
                return Ok(Some(rest));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// [`write_now`] for TLS: polls the writes and the flush once, with a
/// waker that wakes no one (the task that finishes the frame polls again
/// with its own). rustls takes the plaintext into its buffer (bounded)
/// and writes what the socket takes.
fn tls_write_now(
    w: &mut WriteSide,
    mut bufs: &mut [std::io::IoSlice<'_>],
    mut left: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    let rest = |bufs: &[std::io::IoSlice<'_>], left: usize| {
        let mut rest = Vec::with_capacity(left);
        for s in bufs {
            rest.extend_from_slice(s);
        }
        rest
    };
    while left > 0 {
        match Pin::new(&mut *w).poll_write_vectored(&mut cx, bufs) {
            Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                left -= n;
                std::io::IoSlice::advance_slices(&mut bufs, n);
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(Some(rest(bufs, left))),
        }
    }
    match Pin::new(&mut *w).poll_flush(&mut cx) {
        Poll::Ready(r) => r.map(|()| None),
        Poll::Pending => Ok(Some(Vec::new())),
    }
}

/// Writes the rest of a frame on a task of its own, holding the writer
/// until it is out (and flushed: TLS holds bytes until then); awaiting
/// the result is cancel-safe.
async fn finish_write(
    mut w: tokio::sync::OwnedMutexGuard<WriteSide>,
    rest: Vec<u8>,
) -> std::io::Result<()> {
    tokio::spawn(async move {
        w.write_all(&rest).await?;
        w.flush().await
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

async fn read_loop<R: AsyncRead + Unpin>(
    r: &mut R,
    pending: &Pending,
    pushes: &Pushes,
    new_routes: &NewRoutes,
) -> Result<()> {
    // Frames are split off the front of one growing buffer: once their
    // readers drop them, `reserve` reuses the same memory (no fresh pages,
    // no zero-filling per frame).
    let mut buf = bytes::BytesMut::with_capacity(SMALL_FRAME_BYTES);
    loop {
        match frame::check_response(&buf).map_err(|e| Error::Protocol(e.to_string()))? {
            Check::Incomplete { total } => {
                buf.reserve(total.saturating_sub(buf.len()).max(SMALL_FRAME_BYTES));
                let n = r.read_buf(&mut buf).await?;
                if n == 0 {
                    return Err(Error::Closed);
                }
            }
            Check::Complete(parts) => {
                let frame_buf = buf.split_to(parts.total).freeze();
                let resp = frame::decode_response(&frame_buf[parts.header.clone()])
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                let corr = resp.correlation_id();
                let push_id = resp.body_as_push().map(|p| p.subscription_id());
                let waiting = (corr != 0).then(|| lock(pending).remove(&corr)).flatten();
                if let Some(sub) = resp.body_as_subscribe_response() {
                    let credit = waiting.as_ref().and_then(|w| w.subscribe_credit_bytes);
                    let (tx, route) = PushRoute::new(credit.unwrap_or(0));
                    lock(pushes).insert(sub.subscription_id(), tx);
                    lock(new_routes).insert(sub.subscription_id(), route);
                }
                let err = (resp.error_code() != 0).then(|| {
                    (
                        ErrorCode::from_u16(resp.error_code()),
                        resp.error_message().unwrap_or("").to_string(),
                    )
                });
                let frame = Frame {
                    buf: frame_buf,
                    header: parts.header,
                    payload: parts.payload,
                };
                if corr != 0 {
                    if let Some(w) = waiting {
                        let _ = w.tx.send(Ok(frame));
                    }
                } else if let (Some(id), Some((code, message))) = (push_id, &err) {
                    // The end of one subscription, named: only it hears.
                    if let Some(route) = lock(pushes).remove(&id) {
                        route.error(Error::Broker {
                            code: *code,
                            message: message.clone(),
                        });
                    }
                } else if let Some(id) = push_id {
                    let mut routes = lock(pushes);
                    let over = routes.get(&id).is_some_and(|route| !route.push(id, frame));
                    if over {
                        // Dropping the sender ends the route after the error.
                        routes.remove(&id);
                    }
                } else if let Some((ErrorCode::TlsRequired, message)) = err {
                    // The broker closes the connection after this.
                    return Err(Error::Broker {
                        code: ErrorCode::TlsRequired,
                        message,
                    });
                } else if let Some((code, message)) = err {
                    // Connection-level errors (a push that ended without
                    // saying which, a request the broker could not parse):
                    // every subscription hears it, and each retriable one
                    // subscribes again from where it is.
                    tracing::warn!(?code, %message, "broker reported an error");
                    for route in lock(pushes).values() {
                        route.error(Error::Broker {
                            code,
                            message: message.clone(),
                        });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_broker::FakeBroker;
    use std::time::Duration;

    async fn metadata(conn: &Connection) -> Result<Frame> {
        conn.request(
            fb::RequestBody::MetadataRequest,
            |fbb| {
                fb::MetadataRequest::create(fbb, &fb::MetadataRequestArgs::default())
                    .as_union_value()
            },
            &[],
        )
        .await
    }

    /// A request given up halfway through its write (the broker was not
    /// reading, a timeout fired) still goes out whole, so the requests
    /// after it are read as they were sent and answered.
    #[tokio::test]
    async fn a_cancelled_request_never_cuts_a_frame_short() {
        let fake = FakeBroker::start(&[("t", 1)]).await;
        let conn = Connection::connect(fake.addr, "test")
            .await
            .expect("connect");
        fake.pause_reading(true);
        // Far more than the socket buffers hold while nobody reads.
        let big = vec![0u8; 16 << 20];
        let produce = crate::produce_batches(&conn, "t", 0, crate::Acks::Leader, &big);
        let r = tokio::time::timeout(Duration::from_millis(200), produce).await;
        assert!(r.is_err(), "the write cannot have finished");
        fake.pause_reading(false);
        let m = tokio::time::timeout(Duration::from_secs(10), metadata(&conn))
            .await
            .expect("answered in time")
            .expect("a metadata response");
        assert!(m.response().body_as_metadata_response().is_some());
        assert_eq!(fake.produces().len(), 1);
    }
}
