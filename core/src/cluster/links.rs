//! Links between brokers: one TCP connection per pair of live brokers,
//! between their control threads, kept in line with ZooKeeper's
//! membership (seed 003): a link opens when a peer registers and closes
//! when it leaves or re-registers as a new incarnation.
//!
//! Never two links for one pair: only the broker with the lower id dials;
//! the higher one accepts, and a new link from a peer replaces the old
//! one (the peer only dials again when it lost the old link or
//! restarted). Either end sends requests on the link: a broker forwards
//! topic changes to the controller, the controller asks the brokers that
//! hold a new topic's replicas to open them now.
//!
//! Framing: u32 little-endian length, then a JSON [`PeerMsg`]. The link
//! carries only control traffic (small, rare); replication will use the
//! shards' data path, not this.
//!
//! With auth on, a link starts with a SCRAM-SHA-256 exchange as the
//! inter-broker user ([`LinkAuth`]) before the hello: the accepting broker
//! serves no request from a peer that cannot prove it is a broker.
//!
//! With TLS on (`tls_cert`), the link is TLS from its first byte: the
//! dialing broker verifies the accepting one's certificate against
//! `tls_ca`, for the name the accepting broker registered as its host (or
//! `tls_server_name`), and presents its own certificate when client
//! certificates are on; the SCRAM exchange then runs inside TLS.

use super::ClusterView;
use crate::controller::TopicSpec;
use crate::error::{Error, Result};
use futures::channel::oneshot;
use futures::future::LocalBoxFuture;
use serde::{Deserialize, Serialize};
use shoal_wire::ErrorCode;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::either::Either;

/// Largest link frame accepted (control messages are small).
const PEER_FRAME_BYTES_MAX: usize = 16 << 20;
/// Messages queued for one link's socket.
const PEER_QUEUE_MAX: usize = 256;
/// How long a dial or the hello may take.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// An accepted link from a broker this one does not see registered yet
/// (its watch has not fired) is kept this long before it counts as stale.
const UNKNOWN_PEER_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerMsg {
    Hello {
        from: u32,
        incarnation: i64,
        cluster: String,
    },
    Request {
        id: u64,
        body: PeerRequest,
    },
    Response {
        id: u64,
        error: Option<RemoteError>,
    },
    /// Auth on: the SCRAM messages, in order, before the hello.
    ScramClientFirst(String),
    ScramServerFirst(String),
    ScramClientFinal(String),
    ScramServerFinal(String),
}

/// Largest message of the exchange before the hello (an unauthenticated
/// peer must not make this broker buffer a large frame).
const PEER_AUTH_BYTES_MAX: usize = 4096;

/// How links authenticate (auth on).
pub struct LinkAuth {
    /// The inter-broker user and its password (dialing).
    pub user: String,
    pub password: crate::config::Secret,
    /// The current credential of a user, if it is allowed to be a broker
    /// (accepting).
    pub broker_credential: BrokerCredential,
}

/// See [`LinkAuth::broker_credential`].
pub type BrokerCredential = Rc<dyn Fn(&str) -> Option<shoal_wire::scram::Credential>>;

fn denied(why: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, why.into())
}

impl LinkAuth {
    async fn dial(&self, s: &mut LinkStream) -> std::io::Result<()> {
        use shoal_wire::scram::ScramClient;
        let (client, first) =
            ScramClient::new(&self.user, &self.password.0).map_err(|e| denied(e.to_string()))?;
        write_msg(s, &PeerMsg::ScramClientFirst(first)).await?;
        let PeerMsg::ScramServerFirst(sf) = read_msg_max(s, PEER_AUTH_BYTES_MAX).await? else {
            return Err(denied("the peer did not answer authentication"));
        };
        let (fin, cf) = client
            .server_first(sf.as_bytes())
            .map_err(|e| denied(e.to_string()))?;
        write_msg(s, &PeerMsg::ScramClientFinal(cf)).await?;
        let PeerMsg::ScramServerFinal(sfin) = read_msg_max(s, PEER_AUTH_BYTES_MAX).await? else {
            return Err(denied("the peer refused authentication"));
        };
        fin.server_final(sfin.as_bytes())
            .map_err(|e| denied(e.to_string()))
    }

    async fn accept(&self, s: &mut LinkStream) -> std::io::Result<()> {
        use shoal_wire::scram::ClientFirst;
        let PeerMsg::ScramClientFirst(first) = read_msg_max(s, PEER_AUTH_BYTES_MAX).await? else {
            return Err(denied("no authentication from the peer"));
        };
        let first = ClientFirst::parse(first.as_bytes()).map_err(|e| denied(e.to_string()))?;
        let user = first.username.clone();
        let Some(cred) = (self.broker_credential)(&user) else {
            return Err(denied(format!("{user:?} is not the inter-broker user")));
        };
        let (server, sf) = first.respond(&cred).map_err(|e| denied(e.to_string()))?;
        write_msg(s, &PeerMsg::ScramServerFirst(sf)).await?;
        let PeerMsg::ScramClientFinal(cf) = read_msg_max(s, PEER_AUTH_BYTES_MAX).await? else {
            return Err(denied("the peer broke off authentication"));
        };
        let sfin = server
            .client_final(cf.as_bytes())
            .map_err(|e| denied(format!("{user:?}: {e}")))?;
        write_msg(s, &PeerMsg::ScramServerFinal(sfin)).await
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerRequest {
    /// To the controller.
    CreateTopic(TopicSpec),
    /// To the controller.
    DeleteTopic(String),
    /// From the controller: read this topic's record now and apply it.
    ApplyTopic(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteError {
    pub code: u16,
    pub message: String,
}

impl From<&Error> for RemoteError {
    fn from(e: &Error) -> RemoteError {
        RemoteError {
            code: e.code() as u16,
            message: e.to_string(),
        }
    }
}

impl From<RemoteError> for Error {
    fn from(e: RemoteError) -> Error {
        Error::Remote {
            code: ErrorCode::from_u16(e.code),
            message: e.message,
        }
    }
}

/// Serves a request a peer sent.
pub type Handler = Rc<dyn Fn(u32, PeerRequest) -> LocalBoxFuture<'static, Result<()>>>;

struct Link {
    peer: u32,
    incarnation: i64,
    opened: Instant,
    tx: tokio::sync::mpsc::Sender<PeerMsg>,
    pending: RefCell<HashMap<u64, oneshot::Sender<Result<()>>>>,
    closed: Cell<bool>,
    tasks: RefCell<Vec<tokio::task::JoinHandle<()>>>,
}

impl Link {
    fn close(&self) {
        self.closed.set(true);
        for t in self.tasks.borrow_mut().drain(..) {
            t.abort();
        }
        for (_, w) in self.pending.borrow_mut().drain() {
            let _ = w.send(Err(Error::ClusterUnavailable(format!(
                "link to broker {} closed",
                self.peer
            ))));
        }
    }
}

pub struct Links {
    me: u32,
    cluster: String,
    /// This broker's registration incarnation (sent in the hello).
    pub incarnation: Cell<i64>,
    links: RefCell<HashMap<u32, Rc<Link>>>,
    dialing: RefCell<HashSet<u32>>,
    handler: Handler,
    next_id: Cell<u64>,
    auth: Option<LinkAuth>,
    tls: Option<crate::auth::tls::Tls>,
}

impl Links {
    pub fn new(
        me: u32,
        cluster: String,
        handler: Handler,
        auth: Option<LinkAuth>,
        tls: Option<crate::auth::tls::Tls>,
    ) -> Rc<Links> {
        Rc::new(Links {
            me,
            auth,
            tls,
            cluster,
            incarnation: Cell::new(0),
            links: RefCell::new(HashMap::new()),
            dialing: RefCell::new(HashSet::new()),
            handler,
            next_id: Cell::new(1),
        })
    }

    /// The peers this broker has an open link to.
    pub fn peers(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .links
            .borrow()
            .values()
            .filter(|l| !l.closed.get())
            .map(|l| l.peer)
            .collect();
        v.sort_unstable();
        v
    }

    /// Accepts links from brokers with lower ids.
    pub async fn accept_loop(self: Rc<Self>, listener: TcpListener) {
        loop {
            let (stream, addr) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "peer link accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let links = self.clone();
            tokio::task::spawn_local(async move {
                let _ = stream.set_nodelay(true);
                let mut stream = match &links.tls {
                    None => Either::Left(stream),
                    Some(tls) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
                        match tokio::time::timeout(PEER_CONNECT_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => Either::Right(Box::new(s.into())),
                            Ok(Err(e)) => {
                                tracing::warn!(%addr, error = %e, "refused a peer link: TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::warn!(%addr, "refused a peer link: TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                if let Some(auth) = &links.auth {
                    match tokio::time::timeout(PEER_CONNECT_TIMEOUT, auth.accept(&mut stream)).await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(%addr, error = %e, "refused a peer link: authentication failed");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(%addr, "refused a peer link: authentication timed out");
                            return;
                        }
                    }
                }
                let hello = tokio::time::timeout(PEER_CONNECT_TIMEOUT, read_msg(&mut stream)).await;
                match hello {
                    Ok(Ok(PeerMsg::Hello {
                        from,
                        incarnation,
                        cluster,
                    })) if cluster == links.cluster && from != links.me => {
                        links.install(from, incarnation, stream);
                    }
                    Ok(Ok(PeerMsg::Hello { from, cluster, .. })) => {
                        tracing::warn!(%addr, from, %cluster, "refused a peer link: wrong cluster or my own id");
                    }
                    _ => tracing::warn!(%addr, "refused a peer link: no hello"),
                }
            });
        }
    }

    /// Opens the links this broker should dial and closes those whose
    /// peer left (or came back as a new incarnation).
    pub fn reconcile(self: &Rc<Self>, view: &ClusterView) {
        let stale: Vec<Rc<Link>> = self
            .links
            .borrow()
            .values()
            .filter(|l| match view.brokers.get(&l.peer) {
                None => l.closed.get() || l.opened.elapsed() > UNKNOWN_PEER_GRACE,
                Some(reg) => {
                    l.closed.get() || (reg.incarnation != 0 && l.incarnation != reg.incarnation)
                }
            })
            .cloned()
            .collect();
        for l in stale {
            if !l.closed.get() {
                tracing::info!(peer = l.peer, "closing the link to a broker that left");
            }
            l.close();
            let mut links = self.links.borrow_mut();
            if links.get(&l.peer).is_some_and(|cur| Rc::ptr_eq(cur, &l)) {
                links.remove(&l.peer);
            }
        }
        for reg in view.brokers.values() {
            if reg.id <= self.me
                || self.links.borrow().contains_key(&reg.id)
                || !self.dialing.borrow_mut().insert(reg.id)
            {
                continue;
            }
            let links = self.clone();
            let (peer, addr, incarnation, host) = (
                reg.id,
                format!("{}:{}", reg.host, reg.peer_port),
                reg.incarnation,
                reg.host.clone(),
            );
            tokio::task::spawn_local(async move {
                let dialed = tokio::time::timeout(PEER_CONNECT_TIMEOUT, async {
                    let s = TcpStream::connect(&addr).await?;
                    s.set_nodelay(true)?;
                    let mut s = match &links.tls {
                        None => Either::Left(s),
                        Some(tls) => {
                            let (config, name) = tls.dial_params(&host)?;
                            let connector = tokio_rustls::TlsConnector::from(config);
                            let s = connector.connect(name, s).await.map_err(|e| {
                                std::io::Error::new(e.kind(), format!("TLS handshake: {e}"))
                            })?;
                            Either::Right(Box::new(s.into()))
                        }
                    };
                    if let Some(auth) = &links.auth {
                        auth.dial(&mut s).await?;
                    }
                    write_msg(
                        &mut s,
                        &PeerMsg::Hello {
                            from: links.me,
                            incarnation: links.incarnation.get(),
                            cluster: links.cluster.clone(),
                        },
                    )
                    .await?;
                    Ok::<_, std::io::Error>(s)
                })
                .await;
                links.dialing.borrow_mut().remove(&peer);
                match dialed {
                    Ok(Ok(s)) => links.install(peer, incarnation, s),
                    Ok(Err(e)) => {
                        tracing::warn!(peer, %addr, error = %e, "cannot open a link to a broker; retrying")
                    }
                    Err(_) => tracing::warn!(peer, %addr, "link to a broker timed out; retrying"),
                }
            });
        }
    }

    fn install(self: &Rc<Self>, peer: u32, incarnation: i64, stream: LinkStream) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<PeerMsg>(PEER_QUEUE_MAX);
        let link = Rc::new(Link {
            peer,
            incarnation,
            opened: Instant::now(),
            tx,
            pending: RefCell::new(HashMap::new()),
            closed: Cell::new(false),
            tasks: RefCell::new(Vec::new()),
        });
        if let Some(old) = self.links.borrow_mut().insert(peer, link.clone()) {
            old.close();
            tracing::info!(peer, "replaced the link to a broker (it reconnected)");
        } else {
            tracing::info!(peer, "link to broker open");
        }
        let (mut rd, mut wr) = tokio::io::split(stream);
        let writer = {
            let link = link.clone();
            tokio::task::spawn_local(async move {
                while let Some(m) = rx.recv().await {
                    if write_msg(&mut wr, &m).await.is_err() {
                        break;
                    }
                }
                link.closed.set(true);
            })
        };
        let reader = {
            let (link, links) = (link.clone(), self.clone());
            tokio::task::spawn_local(async move {
                loop {
                    match read_msg(&mut rd).await {
                        Ok(PeerMsg::Request { id, body }) => {
                            let (handler, tx) = (links.handler.clone(), link.tx.clone());
                            tokio::task::spawn_local(async move {
                                let error = handler(peer, body).await.err().map(|e| (&e).into());
                                let _ = tx.send(PeerMsg::Response { id, error }).await;
                            });
                        }
                        Ok(PeerMsg::Response { id, error }) => {
                            if let Some(w) = link.pending.borrow_mut().remove(&id) {
                                let _ = w.send(error.map_or(Ok(()), |e| Err(e.into())));
                            }
                        }
                        Ok(
                            PeerMsg::Hello { .. }
                            | PeerMsg::ScramClientFirst(_)
                            | PeerMsg::ScramServerFirst(_)
                            | PeerMsg::ScramClientFinal(_)
                            | PeerMsg::ScramServerFinal(_),
                        ) => {}
                        Err(e) => {
                            tracing::info!(peer, error = %e, "link to broker closed");
                            break;
                        }
                    }
                }
                link.close();
                let mut all = links.links.borrow_mut();
                if all.get(&peer).is_some_and(|cur| Rc::ptr_eq(cur, &link)) {
                    all.remove(&peer);
                }
            })
        };
        link.tasks.borrow_mut().extend([writer, reader]);
    }

    /// Sends `body` to `peer` and waits for its answer.
    pub async fn request(&self, peer: u32, body: PeerRequest, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        // A link being opened (the peer just registered) gets a moment.
        let link = loop {
            if let Some(l) = self.links.borrow().get(&peer).filter(|l| !l.closed.get()) {
                break l.clone();
            }
            if Instant::now() >= deadline {
                return Err(Error::ClusterUnavailable(format!(
                    "no link to broker {peer}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let (w, r) = oneshot::channel();
        link.pending.borrow_mut().insert(id, w);
        if link.tx.send(PeerMsg::Request { id, body }).await.is_err() {
            link.pending.borrow_mut().remove(&id);
            return Err(Error::ClusterUnavailable(format!(
                "link to broker {peer} closed"
            )));
        }
        match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), r).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::ClusterUnavailable(format!(
                "link to broker {peer} closed"
            ))),
            Err(_) => {
                link.pending.borrow_mut().remove(&id);
                Err(Error::ClusterUnavailable(format!(
                    "broker {peer} did not answer within {} ms",
                    timeout.as_millis()
                )))
            }
        }
    }

    pub fn close_all(&self) {
        for (_, l) in self.links.borrow_mut().drain() {
            l.close();
        }
    }
}

async fn read_msg<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<PeerMsg> {
    read_msg_max(r, PEER_FRAME_BYTES_MAX).await
}

async fn read_msg_max<R: AsyncReadExt + Unpin>(r: &mut R, max: usize) -> std::io::Result<PeerMsg> {
    let len = r.read_u32_le().await? as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("peer frame of {len} bytes"),
        ));
    }
    let mut buf = vec![0; len];
    r.read_exact(&mut buf).await?;
    serde_json::from_slice(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

async fn write_msg<W: AsyncWriteExt + Unpin>(w: &mut W, m: &PeerMsg) -> std::io::Result<()> {
    let body = serde_json::to_vec(m).map_err(std::io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame).await?;
    // TLS holds written bytes until flushed.
    w.flush().await
}

/// A link's connection: plaintext (left) or TLS, either end of it (right).
pub type LinkStream = Either<TcpStream, Box<tokio_rustls::TlsStream<TcpStream>>>;
