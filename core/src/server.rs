//! Starting and stopping the broker: one pinned glommio executor per
//! configured core, joined by a channel mesh.
//!
//! Each shard listens on the public port (SO_REUSEPORT: the kernel spreads
//! new connections over the shards) and on its own shard port (public + 1 +
//! index), which metadata advertises so shard-aware clients reach a
//! partition's owner directly. SIGINT/SIGTERM stop every shard: listeners
//! close, partitions flush and write their clean checkpoints, threads end.

use crate::config::Config;
use crate::conn;
use crate::metadata::Topics;
use crate::shard::{Shard, ShardMsg};
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Messages queued between two shards before a sender waits.
const MESH_CHANNEL_CAPACITY: usize = 1024;

pub fn run(config: Config) -> Result<(), String> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", config.data_dir.display()))?;
    let mut topics = Topics::load(&config.data_dir)?;
    topics.fit_to(config.cores.len());
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    tracing::info!(signal = sig, "stopping: flushing partitions");
                    stop.store(true, Ordering::SeqCst);
                }
            })
            .map_err(|e| e.to_string())?;
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
    let mesh: Option<MeshBuilder<ShardMsg, _>> =
        (n > 1).then(|| MeshBuilder::full(n, MESH_CHANNEL_CAPACITY));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let mut handles = Vec::with_capacity(n);
    for (i, &core) in config.cores.iter().enumerate() {
        let (config, topics, mesh, stop, ready) = (
            config.clone(),
            topics.clone(),
            mesh.clone(),
            stop.clone(),
            ready_tx.clone(),
        );
        let h = LocalExecutorBuilder::new(Placement::Fixed(core))
            .spin_before_park(config.idle_spin)
            .name(&format!("shard-{i}"))
            .spawn(move || async move {
                let r = shard_main(i, config, topics, mesh, stop, ready.clone()).await;
                if let Err(e) = &r {
                    let _ = ready.send(Err(e.clone()));
                }
                r
            })
            .map_err(|e| format!("cannot start shard {i} on core {core}: {e}"))?;
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
    tracing::info!(port = config.listen.port(), "shoal is ready");
    let mut result = Ok(());
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(e) => result = Err(format!("a shard panicked: {e:?}")),
        }
    }
    tracing::info!("shoal stopped");
    result
}

async fn shard_main(
    id: usize,
    config: Config,
    topics: Topics,
    mesh: Option<MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>>,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<(), String> {
    let (senders, receivers) = match mesh {
        Some(m) => {
            let (s, r) = m
                .join()
                .await
                .map_err(|_| format!("shard {id}: cannot join the shard mesh"))?;
            (Some(s), Some(r))
        }
        None => (None, None),
    };
    let core = config.cores[id];
    let public = config.listen;
    let shard_addr = std::net::SocketAddr::new(public.ip(), config.shard_port(id));
    let config = Rc::new(config);
    let shard = Rc::new(Shard::new(id, config.clone(), topics, senders));
    shard
        .open_local_partitions()
        .await
        .map_err(|e| format!("shard {id}: {e}"))?;
    let listeners = [
        TcpListener::bind(public)
            .map_err(|e| format!("shard {id}: cannot listen on {public}: {e}"))?,
        TcpListener::bind(shard_addr)
            .map_err(|e| format!("shard {id}: cannot listen on {shard_addr}: {e}"))?,
    ];
    tracing::info!(shard = id, core, public = %public, shard_port = shard_addr.port(), "shard serving");
    let mut tasks = Vec::new();
    if let Some(mut r) = receivers {
        for (_, rx) in r.streams() {
            let shard = shard.clone();
            tasks.push(glommio::spawn_local(async move {
                while let Some(msg) = rx.recv().await {
                    let shard = shard.clone();
                    glommio::spawn_local(async move { shard.handle(msg).await }).detach();
                }
            }));
        }
    }
    let per_shard_max = config.connections_max.div_ceil(config.cores.len());
    for listener in listeners {
        let shard = shard.clone();
        tasks.push(glommio::spawn_local(async move {
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        if shard.metrics.connections_open.get() as usize >= per_shard_max {
                            tracing::warn!(
                                shard = shard.id,
                                limit = per_shard_max,
                                "connection limit reached; refusing"
                            );
                            drop(stream);
                            continue;
                        }
                        glommio::spawn_local(conn::serve(shard.clone(), stream)).detach();
                    }
                    Err(e) => {
                        tracing::warn!(shard = shard.id, error = %e, "accept failed");
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    {
        let shard = shard.clone();
        let every = config.retention_check;
        tasks.push(glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(every).await;
                shard.enforce_retention().await;
            }
        }));
    }
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::SeqCst) {
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
    shard.stopping.set(true);
    for t in tasks {
        t.cancel().await;
    }
    shard.close_all().await;
    tracing::info!(shard = id, "shard stopped; partitions flushed");
    Ok(())
}
