//! Shard 0's end of the control thread's channel: applies what ZooKeeper
//! says to this broker's shards, one change at a time, in order.

use super::ToShards;
use crate::mesh::MeshMsg;
use crate::reactor::Reactor;
use futures::channel::mpsc;
use futures::StreamExt;
use std::rc::Rc;

/// Serves the control thread until it hangs up. `drop_strays`: whether
/// local cluster topics missing from ZooKeeper may be deleted (false when
/// the cluster's tree did not exist before this broker connected).
pub async fn serve(reactor: Rc<Reactor>, mut rx: mpsc::Receiver<ToShards>) {
    while let Some(msg) = rx.next().await {
        match msg {
            ToShards::Security { state, reply } => {
                reactor.spread_security(state).await;
                let _ = reply.send(Ok(()));
            }
            ToShards::View(view) => {
                for s in (0..reactor.nshards).filter(|&s| s != reactor.id) {
                    let msg = MeshMsg::ClusterView { view: view.clone() };
                    if reactor.mesh.send(&reactor, s, msg).await.is_err() {
                        tracing::debug!(shard = s, "shard gone; cluster view not delivered");
                    }
                }
                *reactor.cluster.borrow_mut() = Some(view);
            }
            ToShards::Fence(fenced) => {
                for s in (0..reactor.nshards).filter(|&s| s != reactor.id) {
                    if reactor
                        .mesh
                        .send(&reactor, s, MeshMsg::Fence { fenced })
                        .await
                        .is_err()
                    {
                        tracing::debug!(shard = s, "shard gone; fence not delivered");
                    }
                }
                reactor.replication.set_fenced(fenced);
            }
            ToShards::Apply { meta, reply } => {
                let _ = reply.send(reactor.apply_cluster_topic(meta).await);
            }
            ToShards::Remove { name, id, reply } => {
                let _ = reply.send(reactor.remove_cluster_topic(&name, id).await);
            }
            ToShards::Reconcile {
                topics,
                drop_strays,
                reply,
            } => {
                let _ = reply.send(reactor.reconcile_cluster_topics(topics, drop_strays).await);
            }
        }
    }
}
