//! One TCP connection to one broker port, with requests multiplexed by
//! correlation id and pushes routed to their subscriptions.

use crate::error::{Error, Result};
use flatbuffers::{FlatBufferBuilder, WIPOffset};
use shoal_wire::frame::{self, Check};
use shoal_wire::{fb, ErrorCode};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
}

/// Smallest read the receive loop asks the kernel for.
const SMALL_FRAME_BYTES: usize = 64 * 1024;

type Pending = Arc<Mutex<HashMap<u32, oneshot::Sender<Result<Frame>>>>>;
type Pushes = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Result<Frame>>>>>;
/// Push routes the reader created for new subscriptions, waiting for the
/// subscriber to take them.
type NewRoutes = Arc<Mutex<HashMap<u64, mpsc::UnboundedReceiver<Result<Frame>>>>>;

pub struct Connection {
    pub addr: SocketAddr,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
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
    pub async fn connect(addr: SocketAddr, client_id: &str) -> Result<Arc<Connection>> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| Error::Connect {
                addr: addr.to_string(),
                source,
            })?;
        stream.set_nodelay(true)?;
        let (mut r, w) = stream.into_split();
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
            if let Err(e) = r {
                tracing::debug!(error = %e, "shoal connection closed");
            }
            for (_, tx) in lock(&p2).drain() {
                let _ = tx.send(Err(Error::Closed));
            }
            for (_, tx) in lock(&s2).drain() {
                let _ = tx.send(Err(Error::Closed));
            }
        });
        Ok(Arc::new(Connection {
            addr,
            writer: tokio::sync::Mutex::new(w),
            pending,
            pushes,
            new_routes,
            next_corr: AtomicU32::new(1),
            closed,
            reader,
            client_id: client_id.to_string(),
        }))
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Sends a request and waits for its response. `body` builds the
    /// request body; `payload` follows the header raw (record batches).
    pub async fn request<F>(
        &self,
        body_type: fb::RequestBody,
        body: F,
        payload: &[u8],
    ) -> Result<Frame>
    where
        F: FnOnce(&mut FlatBufferBuilder<'static>) -> WIPOffset<flatbuffers::UnionWIPOffset>,
    {
        if self.is_closed() {
            return Err(Error::Closed);
        }
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
        let header = fbb.finished_data();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(corr, tx);
        {
            let mut w = self.writer.lock().await;
            // One write per request: one segment, one wake-up at the broker.
            let mut frame_bytes =
                Vec::with_capacity(frame::FRAME_PREFIX_BYTES + header.len() + payload.len());
            frame_bytes.extend_from_slice(&frame::prefix(header.len(), payload.len()));
            frame_bytes.extend_from_slice(header);
            frame_bytes.extend_from_slice(payload);
            let r = async {
                w.write_all(&frame_bytes).await?;
                w.flush().await
            }
            .await;
            if let Err(e) = r {
                lock(&self.pending).remove(&corr);
                return Err(e.into());
            }
        }
        let frame = rx.await.map_err(|_| Error::Closed)??;
        let resp = frame.response();
        if resp.error_code() != 0 {
            return Err(Error::Broker {
                code: ErrorCode::from_u16(resp.error_code()),
                message: resp.error_message().unwrap_or("").to_string(),
            });
        }
        Ok(frame)
    }

    /// The pushes for `subscription`. The route exists from the moment its
    /// subscribe response arrived, so no push is lost in between.
    pub fn register_push(&self, subscription: u64) -> mpsc::UnboundedReceiver<Result<Frame>> {
        if let Some(rx) = lock(&self.new_routes).remove(&subscription) {
            return rx;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.pushes).insert(subscription, tx);
        rx
    }

    pub fn unregister_push(&self, subscription: u64) {
        lock(&self.pushes).remove(&subscription);
        lock(&self.new_routes).remove(&subscription);
    }
}

async fn read_loop(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    pending: &Pending,
    pushes: &Pushes,
    new_routes: &NewRoutes,
) -> Result<()> {
    // Frames are split off the front of one growing buffer: once their
    // readers drop them, `reserve` reuses the same memory (no fresh pages,
    // no zero-filling per frame).
    let mut buf = bytes::BytesMut::with_capacity(SMALL_FRAME_BYTES);
    loop {
        match frame::check(&buf, usize::MAX / 2).map_err(|e| Error::Protocol(e.to_string()))? {
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
                if let Some(sub) = resp.body_as_subscribe_response() {
                    let (tx, rx) = mpsc::unbounded_channel();
                    lock(pushes).insert(sub.subscription_id(), tx);
                    lock(new_routes).insert(sub.subscription_id(), rx);
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
                    if let Some(tx) = lock(pending).remove(&corr) {
                        let _ = tx.send(Ok(frame));
                    }
                } else if let Some(id) = push_id {
                    if let Some(tx) = lock(pushes).get(&id) {
                        let _ = tx.send(Ok(frame));
                    }
                } else if let Some((code, message)) = err {
                    // Connection-level errors (a push that ended, a request the
                    // broker could not parse): every subscription hears it.
                    tracing::warn!(?code, %message, "broker reported an error");
                    for tx in lock(pushes).values() {
                        let _ = tx.send(Err(Error::Broker {
                            code,
                            message: message.clone(),
                        }));
                    }
                }
            }
        }
    }
}
