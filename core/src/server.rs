//! Starting and stopping the broker: one pinned glommio executor per
//! configured core, each running a [`Reactor`], joined by the [`crate::mesh`].
//!
//! Each shard listens on the public port (SO_REUSEPORT: the kernel spreads
//! new connections over the shards) and on its own shard port (public + 1 +
//! index), which metadata advertises so shard-aware clients reach a
//! partition's owner directly. SIGINT/SIGTERM stop every shard: listeners
//! close, partitions flush and write their clean checkpoints, threads end.

use crate::cluster;
use crate::config::Config;
use crate::conn;
use crate::error::{Error, Result};
use crate::mesh::{self, Mesh, MeshBuilderFull};
use crate::metadata::Topics;
use crate::metrics::{add, LogLimiter};
use crate::reactor::Reactor;
use crate::rt;
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub fn run(config: Config) -> Result<()> {
    crate::coreplan::apply_and_report(&config.cores, config.core_plan.as_ref())?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| Error::io(format!("create data dir {}", config.data_dir.display()), e))?;
    raise_fd_limit();
    let mut topics = Topics::load(&config.data_dir)?;
    topics.fit_to(config.cores.len());
    remove_orphans(&config.data_dir, &topics);
    // A cluster's users and ACLs come from ZooKeeper (the control thread).
    let security = if config.cluster.is_none() {
        Arc::new(crate::auth::store::bootstrap_single_node(&config)?)
    } else {
        Arc::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])
        .map_err(|e| Error::io("install signal handlers", e))?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    tracing::info!(signal = sig, "stopping: flushing partitions");
                    stop.store(true, Ordering::SeqCst);
                }
            })
            .map_err(|e| Error::io("start the signal thread", e))?;
    }
    tracing::info!(
        listen = %config.listen,
        data_dir = %config.data_dir.display(),
        shards = config.cores.len(),
        cores = ?config.cores,
        topics = topics.topics.len(),
        "starting shoal"
    );
    let n = config.cores.len();
    let mesh = mesh::builder(n);
    // Cluster mode: the channels between the shards and the control thread
    // (ZooKeeper), started once the shards serve (it registers their ports).
    let (control_tx, control_rx) = futures::channel::mpsc::channel(cluster::CONTROL_QUEUE_MAX);
    let (shards_tx, shards_rx) = futures::channel::mpsc::channel(cluster::CONTROL_QUEUE_MAX);
    let clustered = config.cluster.is_some();
    let mut shards_rx = clustered.then_some(shards_rx);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let mut handles = Vec::with_capacity(n);
    for (i, &core) in config.cores.iter().enumerate() {
        let security = security.clone();
        let (config, topics, mesh, stop, ready) = (
            config.clone(),
            topics.clone(),
            mesh.clone(),
            stop.clone(),
            ready_tx.clone(),
        );
        let control = clustered.then(|| control_tx.clone());
        let from_control = if i == 0 { shards_rx.take() } else { None };
        let h = LocalExecutorBuilder::new(Placement::Fixed(core))
            .spin_before_park(config.idle_spin)
            .name(&format!("shard-{i}"))
            .spawn(move || async move {
                let links = ShardLinks {
                    control,
                    from_control,
                    security,
                };
                match shard_main(i, config, topics, mesh, links, stop, ready.clone()).await {
                    Ok(()) => Ok(()),
                    // The error itself goes to whoever waits for the shards
                    // to be ready (start-up) ...
                    Err(e) => {
                        let why = e.to_string();
                        let _ = ready.send(Err(e));
                        // ... and its text to whoever joins the thread.
                        Err(Error::Config(why))
                    }
                }
            })
            .map_err(|e| Error::Config(format!("cannot start shard {i} on core {core}: {e}")))?;
        handles.push(h);
    }
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                stop.store(true, Ordering::SeqCst);
                for h in handles {
                    let _ = h.join();
                }
                return Err(e);
            }
            Err(_) => break,
        }
    }
    drop(control_tx);
    let control_thread = if clustered {
        match cluster::control::start(config.clone(), control_rx, shards_tx, stop.clone()) {
            Ok(t) => Some(t),
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                for h in handles {
                    let _ = h.join();
                }
                return Err(e);
            }
        }
    } else {
        None
    };
    tracing::info!(port = config.listen.port(), "shoal is ready");
    let mut result = Ok(());
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(e) => result = Err(Error::Config(format!("a shard panicked: {e:?}"))),
        }
    }
    if let Some(t) = control_thread {
        let _ = t.join();
    }
    tracing::info!("shoal stopped");
    result
}

/// A shard's ends of the channels to the control thread (cluster mode).
struct ShardLinks {
    security: Arc<crate::auth::store::SecurityState>,
    control: Option<cluster::ControlSender>,
    /// Shard 0 only: what the control thread says.
    from_control: Option<futures::channel::mpsc::Receiver<cluster::ToShards>>,
}

async fn shard_main(
    id: usize,
    config: Config,
    topics: Topics,
    mesh: Option<MeshBuilderFull>,
    links: ShardLinks,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<Result<()>>,
) -> Result<()> {
    let (mesh, receivers) = Mesh::join(id, mesh).await?;
    let core = config.cores[id];
    let public = config.listen;
    let shard_addr = std::net::SocketAddr::new(public.ip(), config.shard_port(id));
    // The storage engine's descriptor budget is per shard (per thread).
    shoal_shard::FdBudget::shard_default().set_segments_max(config.segment_fds_max);
    shoal_shard::TailBudget::shard_default().set_bytes_max(config.tail_cache_shard_bytes);
    let config = Rc::new(config);
    let reactor = Rc::new(Reactor::new(
        id,
        config.clone(),
        topics.topics.into_values(),
        mesh,
        links.control,
    ));
    reactor.security.install(links.security);
    reactor
        .open_local_partitions()
        .await
        .map_err(|e| Error::Config(format!("shard {id}: {e}")))?;
    let listen = |addr| {
        bind_listener(addr)
            .map_err(|e| Error::Config(format!("shard {id}: cannot listen on {addr}: {e}")))
    };
    let listeners = [listen(public)?, listen(shard_addr)?];
    tracing::info!(shard = id, core, public = %public, shard_port = shard_addr.port(), "shard serving");
    let mut tasks = match receivers {
        Some(r) => mesh::serve(&reactor, r),
        None => Vec::new(),
    };
    if let Some(rx) = links.from_control {
        tasks.push(rt::spawn(cluster::bridge::serve(reactor.clone(), rx)));
    }
    if config.cluster.is_some() {
        tasks.push(rt::spawn(reactor.clone().replication_loop()));
    }
    let per_shard_max = config.connections_max.div_ceil(config.cores.len());
    for listener in listeners {
        tasks.push(rt::spawn(accept_loop(
            reactor.clone(),
            listener,
            per_shard_max,
        )));
    }
    if let (0, Some(addr)) = (id, config.metrics_listen) {
        tasks.push(crate::prometheus::serve(reactor.clone(), addr)?);
    }
    {
        let reactor = reactor.clone();
        let every = config.retention_check;
        tasks.push(rt::spawn(async move {
            loop {
                rt::sleep(every).await;
                reactor.enforce_retention().await;
            }
        }));
    }
    {
        let reactor = reactor.clone();
        tasks.push(rt::spawn(async move {
            loop {
                rt::sleep(crate::group::TICK).await;
                reactor.groups_tick().await;
            }
        }));
    }
    {
        let reactor = reactor.clone();
        let timeout = config.slow_consumer_timeout;
        tasks.push(rt::spawn(async move {
            let log = LogLimiter::new(Duration::from_secs(10));
            let every = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
            loop {
                rt::sleep(every).await;
                reactor.sweep_stalled_writers(timeout, &log);
            }
        }));
    }
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::SeqCst) {
        rt::sleep(Duration::from_millis(50)).await;
    }
    reactor.stopping.set(true);
    for t in tasks {
        t.cancel().await;
    }
    reactor.groups.stop_all();
    reactor.replication_stop().await;
    reactor.close_all().await;
    tracing::info!(shard = id, "shard stopped; partitions flushed");
    Ok(())
}

/// Longest pause between accept attempts after failures (e.g. out of file
/// descriptors): backs off from 10 ms so a full fd table does not spin.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

async fn accept_loop(reactor: Rc<Reactor>, listener: TcpListener, per_shard_max: usize) {
    let refused_log = LogLimiter::new(Duration::from_secs(10));
    let failed_log = LogLimiter::new(Duration::from_secs(10));
    let mut backoff = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok(stream) => {
                backoff = Duration::from_millis(10);
                if reactor.metrics.connections_open.get() as usize >= per_shard_max {
                    add(&reactor.metrics.connections_refused, 1);
                    if let Some(held_back) = refused_log.allow() {
                        tracing::warn!(
                            shard = reactor.id,
                            limit = per_shard_max,
                            more_since_last_line = held_back,
                            "connection limit reached; refusing connections"
                        );
                    }
                    if reactor.config.tls.is_none() {
                        rt::spawn_detached(refuse(stream, per_shard_max));
                    }
                    continue;
                }
                rt::spawn_detached(conn::serve(reactor.clone(), stream));
            }
            Err(e) => {
                add(&reactor.metrics.accept_errors, 1);
                if let Some(held_back) = failed_log.allow() {
                    tracing::warn!(
                        shard = reactor.id,
                        error = %e,
                        more_since_last_line = held_back,
                        "accept failed; backing off"
                    );
                }
                rt::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Tells a plaintext connection over the limit why, then closes it. On a
/// TLS port one is closed without a word (the accept loop drops it):
/// answering would take a handshake per refused
/// connection, which turns a connection flood at the limit into
/// handshake work on the shard. (The client sees the connection closed
/// during its handshake; the broker counts it in `connections_refused`.)
async fn refuse(stream: glommio::net::TcpStream, limit: usize) {
    use futures::io::AsyncWriteExt;
    let frame = conn::respond::error_frame(0, &Error::TooManyConnections { limit });
    // A peer that reads nothing must not hold the slot.
    let mut stream = stream;
    let _ = rt::timeout(Duration::from_millis(500), stream.write_all(&frame)).await;
}

/// Removes partition directories no recorded topic owns: what a topic
/// creation that never committed (a crash between opening its partitions
/// and recording it) left behind. Runs before any shard starts.
fn remove_orphans(data_dir: &std::path::Path, topics: &Topics) {
    let Ok(entries) = std::fs::read_dir(data_dir.join("topics")) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let owned = name.rsplit_once('-').is_some_and(|(topic, p)| {
            let p: Option<u32> = p.parse().ok();
            topics
                .topics
                .get(topic)
                .zip(p)
                .is_some_and(|(t, p)| p < t.partitions())
        });
        if !owned {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => {
                    tracing::info!(dir = %e.path().display(), "removed the files of a topic creation that never completed")
                }
                Err(err) => {
                    tracing::warn!(dir = %e.path().display(), error = %err, "cannot remove an unrecorded partition directory")
                }
            }
        }
    }
}

/// Raises the soft limit on open files to the hard limit: every connection
/// and every active segment holds descriptors, and the default soft limit
/// (often 1024) is far below what a broker needs. Logged either way.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass, nothing else.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    tracing::info!(open_files_max = lim.rlim_cur, "file descriptor limit");
}

/// A listener on `addr` shared by every shard (SO_REUSEPORT) that binds
/// even while connections of an earlier process on the port linger in
/// TIME_WAIT (SO_REUSEADDR; glommio's own bind sets only the first, so a
/// broker restarted on its port, or started on a port another program
/// just used, could fail with "address in use").
fn bind_listener(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sk = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sk.set_reuse_address(true)?;
    sk.set_reuse_port(true)?;
    sk.bind(&addr.into())?;
    sk.listen(1024)?;
    // SAFETY: the descriptor is a TCP socket this function created, bound
    // and set listening; ownership passes to the glommio listener (the
    // Socket gives it up with into_raw_fd, so it is closed once).
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(sk)) })
}
