//! Security on a connection: the SCRAM exchange, the check every request
//! passes when auth is on, and user and ACL administration.
//!
//! Which request needs what (README "Security" has the table):
//! - produce: `produce` on the topic; fetch (client) and subscribe:
//!   `consume` on the topic; grant-credit and unsubscribe act on the
//!   connection's own subscriptions only;
//! - metadata and list-topics: answered with the topics the principal may
//!   describe (internal `__shoal*` topics always: clients find group
//!   coordinators through them); describe-topic: `describe` on it;
//! - create-topic and delete-topic: `admin` on the topic;
//! - group heartbeat and offset commit: `consume` on the group and on
//!   every topic named; offset fetch and describe-group: `describe` on the
//!   group; list-groups: answered with the groups the principal may
//!   describe;
//! - metrics: `describe` on the cluster; users and ACLs: `admin` on the
//!   cluster;
//! - replica fetches (`replica_id >= 0`) and group checkpoints: brokers
//!   only (the inter-broker user or a superuser);
//! - superusers and the inter-broker user pass every check.

use crate::auth::acl::{AclRule, Kind, Operation, Resource};
use crate::auth::store::{SecurityChange, UserRecord};
use crate::conn::dispatch::{body_mismatch, s};
use crate::conn::Conn;
use crate::error::Error;
use crate::metrics::add;
use crate::rt;
use shoal_wire::fb::{self, RequestBody as B};
use shoal_wire::scram::{self, ClientFirst, Credential};

fn bytes<'a>(v: Option<flatbuffers::Vector<'a, u8>>) -> &'a [u8] {
    v.map(|b| b.bytes()).unwrap_or_default()
}

/// Whether a name is one of the broker's internal topics.
fn internal(topic: &str) -> bool {
    topic.starts_with("__shoal")
}

impl Conn {
    /// Refuses a request the connection may not make (auth on only). An
    /// `AuthenticationRequired` refusal closes the connection.
    pub fn authorize(&self, req: &fb::Request<'_>) -> Result<(), Error> {
        let session = self.session.borrow();
        let Some(principal) = session.principal.as_deref() else {
            return Err(Error::AuthenticationRequired);
        };
        if session.privileged {
            return Ok(());
        }
        let sec = &self.reactor.security;
        let need = |kind: Kind, name: &str, op: Operation| -> Result<(), Error> {
            if kind == Kind::Topic && internal(name) && op != Operation::Describe {
                return Err(Error::AuthorizationFailed(format!(
                    "{name:?} is internal to the brokers"
                )));
            }
            if sec.allows(principal, session.certified, kind, name, op) {
                Ok(())
            } else {
                Err(Error::AuthorizationFailed(format!(
                    "{principal:?} may not {} {} {name:?}",
                    op.name(),
                    kind.name()
                )))
            }
        };
        let brokers_only = |what: &str| {
            Err(Error::AuthorizationFailed(format!(
                "{what} are for brokers (the inter-broker user) only"
            )))
        };
        match req.body_type() {
            B::ProduceRequest => {
                let p = req.body_as_produce_request().ok_or_else(body_mismatch)?;
                need(Kind::Topic, s(p.topic()), Operation::Produce)
            }
            B::FetchRequest => {
                let f = req.body_as_fetch_request().ok_or_else(body_mismatch)?;
                if f.replica_id() >= 0 {
                    return brokers_only("replica fetches");
                }
                need(Kind::Topic, s(f.topic()), Operation::Consume)
            }
            B::SubscribeRequest => {
                let r = req.body_as_subscribe_request().ok_or_else(body_mismatch)?;
                need(Kind::Topic, s(r.topic()), Operation::Consume)
            }
            B::DescribeTopicRequest => {
                let d = req
                    .body_as_describe_topic_request()
                    .ok_or_else(body_mismatch)?;
                need(Kind::Topic, s(d.name()), Operation::Describe)
            }
            B::CreateTopicRequest => {
                let c = req
                    .body_as_create_topic_request()
                    .ok_or_else(body_mismatch)?;
                need(Kind::Topic, s(c.name()), Operation::Admin)
            }
            B::DeleteTopicRequest => {
                let d = req
                    .body_as_delete_topic_request()
                    .ok_or_else(body_mismatch)?;
                need(Kind::Topic, s(d.name()), Operation::Admin)
            }
            B::GroupHeartbeatRequest => {
                let h = req
                    .body_as_group_heartbeat_request()
                    .ok_or_else(body_mismatch)?;
                need(Kind::Group, s(h.group()), Operation::Consume)?;
                for t in h.topics().into_iter().flatten() {
                    need(Kind::Topic, t, Operation::Consume)?;
                }
                Ok(())
            }
            B::OffsetCommitRequest => {
                let c = req
                    .body_as_offset_commit_request()
                    .ok_or_else(body_mismatch)?;
                need(Kind::Group, s(c.group()), Operation::Consume)?;
                for t in c.topics().into_iter().flatten() {
                    need(Kind::Topic, s(t.topic()), Operation::Consume)?;
                }
                Ok(())
            }
            B::OffsetFetchRequest => {
                let f = req
                    .body_as_offset_fetch_request()
                    .ok_or_else(body_mismatch)?;
                need(Kind::Group, s(f.group()), Operation::Describe)
            }
            B::DescribeGroupRequest => {
                let d = req
                    .body_as_describe_group_request()
                    .ok_or_else(body_mismatch)?;
                need(Kind::Group, s(d.group()), Operation::Describe)
            }
            B::GroupCheckpointRequest => brokers_only("group checkpoints"),
            B::MetricsRequest => need(Kind::Cluster, "", Operation::Describe),
            B::CreateUserRequest
            | B::DeleteUserRequest
            | B::ListUsersRequest
            | B::AddAclRequest
            | B::RemoveAclRequest
            | B::ListAclsRequest => need(Kind::Cluster, "", Operation::Admin),
            // Filtered in their answers, or acting on the connection's own
            // state; an unknown kind is answered UnsupportedApi.
            _ => Ok(()),
        }
    }

    /// Whether the connection may see `topic` in lists (always when auth is
    /// off).
    pub fn may_describe_topic(&self, topic: &str) -> bool {
        self.may_describe(Kind::Topic, topic) || internal(topic)
    }

    /// Whether the connection may see `group` in lists.
    pub fn may_describe_group(&self, group: &str) -> bool {
        self.may_describe(Kind::Group, group)
    }

    fn may_describe(&self, kind: Kind, name: &str) -> bool {
        let sec = &self.reactor.security;
        if !sec.enabled() {
            return true;
        }
        let session = self.session.borrow();
        match session.principal.as_deref() {
            None => false,
            Some(_) if session.privileged => true,
            Some(p) => sec.allows(p, session.certified, kind, name, Operation::Describe),
        }
    }

    /// One step of the SCRAM exchange. Errors close the connection.
    pub async fn sasl_authenticate(&self, corr: u32, req: fb::Request<'_>) -> std::io::Result<()> {
        let sec = &self.reactor.security;
        if !sec.enabled() {
            return self
                .auth_refused(
                    corr,
                    None,
                    "authentication is off on this broker (start it with --auth)",
                    false,
                )
                .await;
        }
        let Some(a) = req.body_as_sasl_authenticate_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let msg = a.auth_bytes().map(|b| b.bytes()).unwrap_or_default();
        let authenticated = {
            let session = self.session.borrow();
            session.principal.is_some() && !session.certified
        };
        if authenticated {
            return self
                .fail(
                    corr,
                    Error::Malformed("this connection is authenticated already".into()),
                )
                .await;
        }
        let ongoing = self.session.borrow_mut().scram.take();
        let Some((server, user, known)) = ongoing else {
            // The client-first message.
            if a.mechanism() != Some(scram::MECHANISM) {
                let why = format!(
                    "mechanism {:?} is not supported ({} is)",
                    s(a.mechanism()),
                    scram::MECHANISM
                );
                return self.auth_refused(corr, None, &why, true).await;
            }
            self.throttle_wait().await;
            let first = match ClientFirst::parse(msg) {
                Ok(f) => f,
                Err(e) => return self.auth_refused(corr, None, &e.to_string(), true).await,
            };
            let user = first.username.clone();
            let (cred, known): (Credential, bool) = sec.credential_for(&user);
            let (server, server_first) = match first.respond(&cred) {
                Ok(x) => x,
                Err(e) => {
                    return self
                        .auth_refused(corr, Some(&user), &e.to_string(), true)
                        .await
                }
            };
            self.session.borrow_mut().scram = Some((server, user, known));
            return self.sasl_answer(corr, server_first.as_bytes(), None).await;
        };
        // The client-final message.
        let verified = server.client_final(msg);
        match verified {
            Ok(server_final) if known => {
                let privileged = sec.config.is_privileged(&user);
                {
                    let mut session = self.session.borrow_mut();
                    session.principal = Some(user.clone());
                    session.certified = false;
                    session.privileged = privileged;
                }
                add(&self.reactor.metrics.auth_successes, 1);
                if let Some(peer) = self.peer {
                    sec.throttle.borrow_mut().succeeded(peer.ip());
                }
                tracing::info!(user = %user, peer = ?self.peer, "authenticated");
                self.sasl_answer(corr, server_final.as_bytes(), Some(&user))
                    .await
            }
            // An unknown user fails here, like a wrong password.
            Ok(_) => {
                self.auth_refused(corr, Some(&user), "wrong user name or password", true)
                    .await
            }
            Err(e) => {
                let why = match e {
                    scram::ScramError::BadProof => "wrong user name or password".to_string(),
                    other => other.to_string(),
                };
                self.auth_refused(corr, Some(&user), &why, true).await
            }
        }
    }

    /// Waits out the penalty of the peer's recent failures.
    async fn throttle_wait(&self) {
        let Some(peer) = self.peer else { return };
        let wait = self
            .reactor
            .security
            .throttle
            .borrow()
            .penalty(peer.ip(), rt::now());
        if !wait.is_zero() {
            rt::sleep(wait).await;
        }
    }

    /// Answers a failed exchange and ends the connection. `counted`: a
    /// failure that counts towards the peer's penalty. The log line names
    /// the user and the address, never a message of the exchange.
    async fn auth_refused(
        &self,
        corr: u32,
        user: Option<&str>,
        why: &str,
        counted: bool,
    ) -> std::io::Result<()> {
        if counted {
            add(&self.reactor.metrics.auth_failures, 1);
            tracing::warn!(user = user.unwrap_or(""), peer = ?self.peer, reason = why, "authentication failed");
            if let Some(peer) = self.peer {
                self.reactor
                    .security
                    .throttle
                    .borrow_mut()
                    .failed(peer.ip(), rt::now());
            }
            self.throttle_wait().await;
        }
        self.fail(corr, Error::AuthenticationFailed(why.to_string()))
            .await?;
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("authentication failed: {why}"),
        ))
    }

    async fn sasl_answer(
        &self,
        corr: u32,
        bytes: &[u8],
        principal: Option<&str>,
    ) -> std::io::Result<()> {
        self.respond(corr, fb::ResponseBody::SaslAuthenticateResponse, |fbb| {
            let auth = fbb.create_vector(bytes);
            let principal = principal.map(|p| fbb.create_string(p));
            fb::SaslAuthenticateResponse::create(
                fbb,
                &fb::SaslAuthenticateResponseArgs {
                    auth_bytes: Some(auth),
                    principal,
                },
            )
            .as_union_value()
        })
        .await
    }

    // ---- administration ------------------------------------------------------

    async fn change_security(
        &self,
        corr: u32,
        change: SecurityChange,
        body_type: fb::ResponseBody,
    ) -> std::io::Result<()> {
        tracing::info!(peer = ?self.peer, by = self.session.borrow().principal.as_deref().unwrap_or(""), change = %describe_change(&change), "security change");
        match self.reactor.security_change(change).await {
            Ok(()) => {
                self.respond(corr, body_type, |fbb| {
                    // Every answer of these requests is an empty table.
                    let start = fbb.start_table();
                    fbb.end_table(start).as_union_value()
                })
                .await
            }
            Err(e) => self.fail(corr, e).await,
        }
    }

    pub async fn create_user(&self, corr: u32, req: fb::Request<'_>) -> std::io::Result<()> {
        let Some(c) = req.body_as_create_user_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let cred = match Credential::from_parts(
            bytes(c.salt()),
            c.iterations(),
            bytes(c.stored_key()),
            bytes(c.server_key()),
        ) {
            Ok(c) => c,
            Err(e) => return self.fail(corr, Error::InvalidConfig(e.to_string())).await,
        };
        let change = SecurityChange::PutUser {
            name: s(c.name()).to_string(),
            record: UserRecord::from_credential(&cred),
            replace: c.replace(),
        };
        self.change_security(corr, change, fb::ResponseBody::CreateUserResponse)
            .await
    }

    pub async fn delete_user(&self, corr: u32, req: fb::Request<'_>) -> std::io::Result<()> {
        let Some(d) = req.body_as_delete_user_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let change = SecurityChange::DeleteUser(s(d.name()).to_string());
        self.change_security(corr, change, fb::ResponseBody::DeleteUserResponse)
            .await
    }

    pub async fn list_users(&self, corr: u32) -> std::io::Result<()> {
        let state = self.reactor.security.state();
        self.respond(corr, fb::ResponseBody::ListUsersResponse, |fbb| {
            let items: Vec<_> = state
                .users
                .iter()
                .map(|(name, u)| {
                    let name = fbb.create_string(name);
                    let mechanism = fbb.create_string(&u.mechanism);
                    fb::UserListing::create(
                        fbb,
                        &fb::UserListingArgs {
                            name: Some(name),
                            mechanism: Some(mechanism),
                            iterations: u.iterations,
                        },
                    )
                })
                .collect();
            let users = fbb.create_vector(&items);
            fb::ListUsersResponse::create(fbb, &fb::ListUsersResponseArgs { users: Some(users) })
                .as_union_value()
        })
        .await
    }

    pub async fn add_acl(&self, corr: u32, req: fb::Request<'_>) -> std::io::Result<()> {
        let entry = req.body_as_add_acl_request().map(|a| a.acl());
        self.change_acl(
            corr,
            entry,
            SecurityChange::AddAcl,
            fb::ResponseBody::AddAclResponse,
        )
        .await
    }

    pub async fn remove_acl(&self, corr: u32, req: fb::Request<'_>) -> std::io::Result<()> {
        let entry = req.body_as_remove_acl_request().map(|a| a.acl());
        self.change_acl(
            corr,
            entry,
            SecurityChange::RemoveAcl,
            fb::ResponseBody::RemoveAclResponse,
        )
        .await
    }

    /// Adds or removes the rule `entry` names (`None`: the request's body
    /// was not the kind its type said).
    async fn change_acl(
        &self,
        corr: u32,
        entry: Option<Option<fb::AclEntry<'_>>>,
        change: fn(AclRule) -> SecurityChange,
        answer: fb::ResponseBody,
    ) -> std::io::Result<()> {
        match entry.ok_or_else(body_mismatch).and_then(rule_of) {
            Ok(r) => self.change_security(corr, change(r), answer).await,
            Err(e) => self.fail(corr, e).await,
        }
    }

    pub async fn list_acls(&self, corr: u32, req: fb::Request<'_>) -> std::io::Result<()> {
        let Some(l) = req.body_as_list_acls_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let state = self.reactor.security.state();
        let principal = l.principal().filter(|p| !p.is_empty());
        self.respond(corr, fb::ResponseBody::ListAclsResponse, |fbb| {
            let items: Vec<_> = state
                .acls_of(principal)
                .into_iter()
                .map(|r| {
                    let (t, name) = match &r.resource {
                        Resource::Topic(n) => (fb::AclResourceType::Topic, n.as_str()),
                        Resource::TopicPrefix(n) => (fb::AclResourceType::TopicPrefix, n.as_str()),
                        Resource::Group(n) => (fb::AclResourceType::Group, n.as_str()),
                        Resource::GroupPrefix(n) => (fb::AclResourceType::GroupPrefix, n.as_str()),
                        Resource::Cluster => (fb::AclResourceType::Cluster, ""),
                    };
                    let op = match r.operation {
                        Operation::Produce => fb::AclOperation::Produce,
                        Operation::Consume => fb::AclOperation::Consume,
                        Operation::Describe => fb::AclOperation::Describe,
                        Operation::Admin => fb::AclOperation::Admin,
                    };
                    let principal = fbb.create_string(&r.principal);
                    let resource = fbb.create_string(name);
                    fb::AclEntry::create(
                        fbb,
                        &fb::AclEntryArgs {
                            principal: Some(principal),
                            resource_type: t,
                            resource: Some(resource),
                            operation: op,
                        },
                    )
                })
                .collect();
            let acls = fbb.create_vector(&items);
            fb::ListAclsResponse::create(fbb, &fb::ListAclsResponseArgs { acls: Some(acls) })
                .as_union_value()
        })
        .await
    }
}

/// A rule from its wire form.
fn rule_of(e: Option<fb::AclEntry<'_>>) -> Result<AclRule, Error> {
    let e = e.ok_or_else(|| Error::Malformed("the request names no ACL".into()))?;
    let name = s(e.resource()).to_string();
    let resource = match e.resource_type() {
        fb::AclResourceType::Topic => Resource::Topic(name),
        fb::AclResourceType::TopicPrefix => Resource::TopicPrefix(name),
        fb::AclResourceType::Group => Resource::Group(name),
        fb::AclResourceType::GroupPrefix => Resource::GroupPrefix(name),
        fb::AclResourceType::Cluster => Resource::Cluster,
        other => {
            return Err(Error::Malformed(format!(
                "unknown ACL resource type {}",
                other.0
            )))
        }
    };
    let operation = match e.operation() {
        fb::AclOperation::Produce => Operation::Produce,
        fb::AclOperation::Consume => Operation::Consume,
        fb::AclOperation::Describe => Operation::Describe,
        fb::AclOperation::Admin => Operation::Admin,
        other => {
            return Err(Error::Malformed(format!(
                "unknown ACL operation {}",
                other.0
            )))
        }
    };
    Ok(AclRule {
        principal: s(e.principal()).to_string(),
        resource,
        operation,
    })
}

/// A change as a log line shows it (never a credential).
fn describe_change(c: &SecurityChange) -> String {
    match c {
        SecurityChange::PutUser { name, replace, .. } => {
            format!(
                "{} user {name:?}",
                if *replace {
                    "set password of"
                } else {
                    "create"
                }
            )
        }
        SecurityChange::DeleteUser(name) => format!("delete user {name:?}"),
        SecurityChange::AddAcl(r) => format!(
            "allow {:?} to {} {}",
            r.principal,
            r.operation.name(),
            r.resource.describe()
        ),
        SecurityChange::RemoveAcl(r) => format!(
            "no longer allow {:?} to {} {}",
            r.principal,
            r.operation.name(),
            r.resource.describe()
        ),
    }
}
