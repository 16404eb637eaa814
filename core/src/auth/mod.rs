//! Security (C10): who a connection is (SCRAM-SHA-256) and what it may do
//! (ACLs).
//!
//! - [`store`]: users (SCRAM credentials only) and ACL rules, as one
//!   immutable snapshot; kept in `security.json` on a single node and in
//!   ZooKeeper in a cluster.
//! - [`acl`]: rules, their matching, and the per-shard decision cache.
//! - [`throttle`]: failed logins slow later ones from the same address.
//! - [`client`]: the client side of the exchange on a glommio stream, for
//!   the broker's own connections to other brokers (replica fetches).
//! - [`tls`]: certificates and keys, client certificates as principals,
//!   how brokers verify each other.
//! - The request side lives with the connection: `conn::auth` (the SCRAM
//!   exchange, the check of every request, user and ACL administration).
//!
//! Each shard owns a [`Security`]: its copy of the snapshot (an `Arc`
//! handed over by shard 0 whenever the store changes), the decision cache
//! for that snapshot, and its throttle. When auth is off (the default) the
//! only cost on the data path is one `bool` read per request.

pub mod acl;
pub mod client;
pub mod store;
pub mod throttle;
pub mod tls;

use crate::config::AuthConfig;
use acl::{AclCache, Kind, Operation};
use shoal_wire::scram::{self, ScramServer};
use std::cell::RefCell;
use std::sync::Arc;
use store::SecurityState;

/// One shard's view of the store.
pub struct Security {
    pub config: AuthConfig,
    state: RefCell<Arc<SecurityState>>,
    cache: RefCell<AclCache>,
    /// Decisions for principals named by client certificates: kept apart,
    /// since such a principal needs no user of its name.
    cert_cache: RefCell<AclCache>,
    pub throttle: RefCell<throttle::Throttle>,
    /// Shard 0 (single node): changes are applied one at a time, each on
    /// top of the one before.
    pub changes: futures::lock::Mutex<()>,
}

impl Security {
    pub fn new(config: AuthConfig, state: Arc<SecurityState>) -> Security {
        Security {
            config,
            state: RefCell::new(state),
            cache: Default::default(),
            cert_cache: Default::default(),
            throttle: Default::default(),
            changes: futures::lock::Mutex::new(()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    pub fn state(&self) -> Arc<SecurityState> {
        self.state.borrow().clone()
    }

    /// A new snapshot: every decision is made again from it, for open
    /// connections too.
    pub fn install(&self, state: Arc<SecurityState>) {
        *self.state.borrow_mut() = state;
        self.cache.borrow_mut().clear();
        self.cert_cache.borrow_mut().clear();
    }

    /// Whether `principal` (authenticated, not privileged) may do `op` on
    /// the resource. A SCRAM principal whose user was deleted may do
    /// nothing; a principal named by a verified client certificate
    /// (`certified`) needs no user, only rules.
    pub fn allows(
        &self,
        principal: &str,
        certified: bool,
        kind: Kind,
        name: &str,
        op: Operation,
    ) -> bool {
        let state = self.state.borrow();
        let cache = if certified {
            &self.cert_cache
        } else {
            &self.cache
        };
        cache.borrow_mut().allows(principal, kind, name, op, || {
            if !certified && !state.users.contains_key(principal) {
                return 0;
            }
            acl::allowed_ops(&state.acls, principal, kind, name)
        })
    }

    /// The credential to answer `user`'s client-first with. For a user
    /// that does not exist: a made-up one (a stable salt per name), so the
    /// exchange fails only at the proof, like a wrong password.
    pub fn credential_for(&self, user: &str) -> (scram::Credential, bool) {
        if let Some(c) = self
            .state
            .borrow()
            .users
            .get(user)
            .and_then(|u| u.credential().ok())
        {
            return (c, true);
        }
        let salt = scram::keyed_hash(&self.config.unknown_user_key, user.as_bytes());
        let fake = scram::Credential {
            salt: salt[..16].to_vec(),
            iterations: scram::ITERATIONS_DEFAULT,
            stored_key: scram::keyed_hash(&salt, b"stored"),
            server_key: scram::keyed_hash(&salt, b"server"),
        };
        (fake, false)
    }
}

/// Who a connection is.
#[derive(Default)]
pub struct Session {
    /// Set once the exchange succeeded, or from the verified client
    /// certificate when the TLS handshake ends.
    pub principal: Option<String>,
    /// The principal comes from a client certificate (a SCRAM exchange
    /// may still replace it, e.g. a broker's as the inter-broker user).
    pub certified: bool,
    /// A superuser or the inter-broker user: no ACL is consulted.
    pub privileged: bool,
    /// An exchange after its server-first message: the server's state, the
    /// user name, and whether that user exists.
    pub scram: Option<(ScramServer, String, bool)>,
}

impl crate::reactor::Reactor {
    /// Changes the store: through ZooKeeper in a cluster (answered once
    /// this broker applied the new snapshot), else on shard 0, which
    /// writes `security.json` and hands the snapshot to every shard before
    /// it answers.
    pub async fn security_change(&self, change: store::SecurityChange) -> crate::error::Result<()> {
        use crate::controller::CONTROLLER_SHARD;
        use crate::mesh::MeshMsg;
        change.validate()?;
        if let Some(control) = &self.control {
            return crate::controller::ask_control(control, |reply| {
                crate::cluster::ToControl::Security { change, reply }
            })
            .await;
        }
        if self.id != CONTROLLER_SHARD {
            return self
                .mesh
                .call(self, CONTROLLER_SHARD, |reply| MeshMsg::SecurityChange {
                    change,
                    reply,
                })
                .await;
        }
        let _one_at_a_time = self.security.changes.lock().await;
        let mut next = (*self.security.state()).clone();
        next.apply(&change)?;
        next.save(&self.config.data_dir)?;
        self.spread_security(Arc::new(next)).await;
        Ok(())
    }

    /// Shard 0: installs a snapshot on every shard, this one last; returns
    /// once all have it.
    pub async fn spread_security(&self, state: Arc<SecurityState>) {
        use crate::mesh::MeshMsg;
        for s in (0..self.nshards).filter(|&s| s != self.id) {
            let state = state.clone();
            let r = self
                .mesh
                .call(self, s, |reply| MeshMsg::Security { state, reply })
                .await;
            if let Err(e) = r {
                tracing::debug!(shard = s, error = %e, "security snapshot not delivered");
            }
        }
        self.security.install(state);
    }
}
