//! Credentials, the SCRAM-SHA-256 exchange every connection makes first
//! when they are set, and the user and ACL administration calls.
//!
//! Credentials come from the program ([`Credentials::new`]), the
//! environment (`SHOAL_USER` + `SHOAL_PASSWORD`, [`Credentials::from_env`])
//! or a file ([`Credentials::from_file`]: `user = NAME` and
//! `password = SECRET` lines; `#` starts a comment) — never from a command
//! line flag alone, where other users of the machine could read it.

use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::Client;
use shoal_wire::fb;
use shoal_wire::scram::{self, Credential, ScramClient};
use std::path::Path;

/// Environment variables of [`Credentials::from_env`].
pub const USER_ENV: &str = "SHOAL_USER";
pub const PASSWORD_ENV: &str = "SHOAL_PASSWORD";

/// A user name and password to authenticate with.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Result<Credentials> {
        let c = Credentials {
            user: user.into(),
            password: password.into(),
        };
        scram::validate_username(&c.user)
            .map_err(|e| Error::Invalid(format!("user {:?}: {e}", c.user)))?;
        Ok(c)
    }

    /// `SHOAL_USER` and `SHOAL_PASSWORD`; `None` if `SHOAL_USER` is unset,
    /// an error if the password is missing.
    pub fn from_env() -> Result<Option<Credentials>> {
        let Some(user) = std::env::var(USER_ENV).ok().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        Credentials::for_user_from_env(&user).map(Some)
    }

    /// `user` with the password in `SHOAL_PASSWORD`.
    pub fn for_user_from_env(user: &str) -> Result<Credentials> {
        let password = std::env::var(PASSWORD_ENV).map_err(|_| {
            Error::Invalid(format!(
                "user {user:?} needs its password in {PASSWORD_ENV} (or use a credentials file)"
            ))
        })?;
        Credentials::new(user, password)
    }

    /// Reads `user = NAME` and `password = SECRET` lines (values may be in
    /// double quotes).
    pub fn from_file(path: &Path) -> Result<Credentials> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Invalid(format!("cannot read credentials {}: {e}", path.display()))
        })?;
        let (mut user, mut password) = (None, None);
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(Error::Invalid(format!(
                    "{}: expected `user = NAME` and `password = SECRET` lines",
                    path.display()
                )));
            };
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
                .to_string();
            match k.trim() {
                "user" => user = Some(v),
                "password" => password = Some(v),
                other => {
                    return Err(Error::Invalid(format!(
                        "{}: unknown key {other:?}",
                        path.display()
                    )))
                }
            }
        }
        match (user, password) {
            (Some(u), Some(p)) => Credentials::new(u, p),
            _ => Err(Error::Invalid(format!(
                "{}: needs both user and password",
                path.display()
            ))),
        }
    }

    pub(crate) fn password(&self) -> &str {
        &self.password
    }
}

/// A rule of [`Client::add_acl`]: `principal` may do `operation` on
/// `resource`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    pub principal: String,
    pub resource: AclResource,
    pub operation: AclOperation,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AclResource {
    Topic(String),
    TopicPrefix(String),
    Group(String),
    GroupPrefix(String),
    Cluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclOperation {
    Produce,
    Consume,
    Describe,
    Admin,
}

impl AclOperation {
    pub fn parse(s: &str) -> Option<AclOperation> {
        Some(match s {
            "produce" => AclOperation::Produce,
            "consume" => AclOperation::Consume,
            "describe" => AclOperation::Describe,
            "admin" => AclOperation::Admin,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            AclOperation::Produce => "produce",
            AclOperation::Consume => "consume",
            AclOperation::Describe => "describe",
            AclOperation::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Acl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let res = match &self.resource {
            AclResource::Topic(n) => format!("topic {n}"),
            AclResource::TopicPrefix(n) => format!("topic-prefix {n}"),
            AclResource::Group(n) => format!("group {n}"),
            AclResource::GroupPrefix(n) => format!("group-prefix {n}"),
            AclResource::Cluster => "cluster".into(),
        };
        write!(f, "{} {} {res}", self.principal, self.operation.name())
    }
}

/// A user as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub mechanism: String,
    pub iterations: u32,
}

fn protocol(e: scram::ScramError) -> Error {
    Error::Broker {
        code: shoal_wire::ErrorCode::AuthenticationFailed,
        message: e.to_string(),
    }
}

impl Connection {
    /// The SCRAM-SHA-256 exchange; on success the connection acts as
    /// `creds.user`. Also checks the broker's signature: a broker that does
    /// not know the credential cannot pass itself off as the real one.
    pub async fn authenticate(&self, creds: &Credentials) -> Result<()> {
        let (client, first) = ScramClient::new(&creds.user, creds.password()).map_err(protocol)?;
        let server_first = self
            .sasl_step(Some(scram::MECHANISM), first.as_bytes())
            .await?;
        let (fin, client_final) = client.server_first(&server_first).map_err(protocol)?;
        let server_final = self.sasl_step(None, client_final.as_bytes()).await?;
        fin.server_final(&server_final).map_err(protocol)
    }

    async fn sasl_step(&self, mechanism: Option<&str>, msg: &[u8]) -> Result<Vec<u8>> {
        let frame = self
            .request(
                fb::RequestBody::SaslAuthenticateRequest,
                |fbb| {
                    let mechanism = mechanism.map(|m| fbb.create_string(m));
                    let auth = fbb.create_vector(msg);
                    fb::SaslAuthenticateRequest::create(
                        fbb,
                        &fb::SaslAuthenticateRequestArgs {
                            mechanism,
                            auth_bytes: Some(auth),
                        },
                    )
                    .as_union_value()
                },
                &[],
            )
            .await?;
        let resp = frame.response();
        let a = resp
            .body_as_sasl_authenticate_response()
            .ok_or_else(|| Error::Protocol("unexpected answer to authentication".into()))?;
        Ok(a.auth_bytes()
            .map(|b| b.bytes().to_vec())
            .unwrap_or_default())
    }
}

impl Client {
    /// Creates a user (or, with `replace`, sets an existing user's
    /// password). The credential is derived here: the password never
    /// reaches the broker.
    pub async fn create_user(&self, name: &str, password: &str, replace: bool) -> Result<()> {
        scram::validate_username(name).map_err(|e| Error::Invalid(format!("{name:?}: {e}")))?;
        let cred = Credential::generate(password, scram::ITERATIONS_DEFAULT)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        self.admin_request(fb::RequestBody::CreateUserRequest, |fbb| {
            let name = fbb.create_string(name);
            let salt = fbb.create_vector(&cred.salt);
            let stored = fbb.create_vector(&cred.stored_key);
            let server = fbb.create_vector(&cred.server_key);
            fb::CreateUserRequest::create(
                fbb,
                &fb::CreateUserRequestArgs {
                    name: Some(name),
                    salt: Some(salt),
                    iterations: cred.iterations,
                    stored_key: Some(stored),
                    server_key: Some(server),
                    replace,
                },
            )
            .as_union_value()
        })
        .await
        .map(|_| ())
    }

    pub async fn delete_user(&self, name: &str) -> Result<()> {
        self.admin_request(fb::RequestBody::DeleteUserRequest, |fbb| {
            let name = fbb.create_string(name);
            fb::DeleteUserRequest::create(fbb, &fb::DeleteUserRequestArgs { name: Some(name) })
                .as_union_value()
        })
        .await
        .map(|_| ())
    }

    pub async fn list_users(&self) -> Result<Vec<UserInfo>> {
        let frame = self
            .admin_request(fb::RequestBody::ListUsersRequest, |fbb| {
                fb::ListUsersRequest::create(fbb, &fb::ListUsersRequestArgs {}).as_union_value()
            })
            .await?;
        let resp = frame.response();
        let l = resp
            .body_as_list_users_response()
            .ok_or_else(|| Error::Protocol("unexpected answer to list users".into()))?;
        Ok(l.users()
            .into_iter()
            .flatten()
            .map(|u| UserInfo {
                name: u.name().unwrap_or_default().to_string(),
                mechanism: u.mechanism().unwrap_or_default().to_string(),
                iterations: u.iterations(),
            })
            .collect())
    }

    pub async fn add_acl(&self, acl: &Acl) -> Result<()> {
        self.admin_request(fb::RequestBody::AddAclRequest, |fbb| {
            let acl = encode_acl(fbb, acl);
            fb::AddAclRequest::create(fbb, &fb::AddAclRequestArgs { acl: Some(acl) })
                .as_union_value()
        })
        .await
        .map(|_| ())
    }

    pub async fn remove_acl(&self, acl: &Acl) -> Result<()> {
        self.admin_request(fb::RequestBody::RemoveAclRequest, |fbb| {
            let acl = encode_acl(fbb, acl);
            fb::RemoveAclRequest::create(fbb, &fb::RemoveAclRequestArgs { acl: Some(acl) })
                .as_union_value()
        })
        .await
        .map(|_| ())
    }

    /// The rules of `principal`, or all.
    pub async fn list_acls(&self, principal: Option<&str>) -> Result<Vec<Acl>> {
        let frame = self
            .admin_request(fb::RequestBody::ListAclsRequest, |fbb| {
                let principal = principal.map(|p| fbb.create_string(p));
                fb::ListAclsRequest::create(fbb, &fb::ListAclsRequestArgs { principal })
                    .as_union_value()
            })
            .await?;
        let resp = frame.response();
        let l = resp
            .body_as_list_acls_response()
            .ok_or_else(|| Error::Protocol("unexpected answer to list ACLs".into()))?;
        let mut out = Vec::new();
        for e in l.acls().into_iter().flatten() {
            let name = e.resource().unwrap_or_default().to_string();
            let resource = match e.resource_type() {
                fb::AclResourceType::Topic => AclResource::Topic(name),
                fb::AclResourceType::TopicPrefix => AclResource::TopicPrefix(name),
                fb::AclResourceType::Group => AclResource::Group(name),
                fb::AclResourceType::GroupPrefix => AclResource::GroupPrefix(name),
                fb::AclResourceType::Cluster => AclResource::Cluster,
                _ => continue,
            };
            let operation = match e.operation() {
                fb::AclOperation::Produce => AclOperation::Produce,
                fb::AclOperation::Consume => AclOperation::Consume,
                fb::AclOperation::Describe => AclOperation::Describe,
                fb::AclOperation::Admin => AclOperation::Admin,
                _ => continue,
            };
            out.push(Acl {
                principal: e.principal().unwrap_or_default().to_string(),
                resource,
                operation,
            });
        }
        Ok(out)
    }
}

impl Client {
    /// An administrative request to any live broker (not retried once
    /// sent: a change that did happen would come back as an error).
    async fn admin_request<F>(
        &self,
        body_type: fb::RequestBody,
        build: F,
    ) -> Result<crate::connection::Frame>
    where
        F: Fn(
            &mut flatbuffers::FlatBufferBuilder<'static>,
        ) -> flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>,
    {
        let build = &build;
        self.admin(false, |conn| async move {
            conn.request(body_type, build, &[]).await
        })
        .await
    }
}

fn encode_acl<'a>(
    fbb: &mut flatbuffers::FlatBufferBuilder<'a>,
    acl: &Acl,
) -> flatbuffers::WIPOffset<fb::AclEntry<'a>> {
    let (t, name) = match &acl.resource {
        AclResource::Topic(n) => (fb::AclResourceType::Topic, n.as_str()),
        AclResource::TopicPrefix(n) => (fb::AclResourceType::TopicPrefix, n.as_str()),
        AclResource::Group(n) => (fb::AclResourceType::Group, n.as_str()),
        AclResource::GroupPrefix(n) => (fb::AclResourceType::GroupPrefix, n.as_str()),
        AclResource::Cluster => (fb::AclResourceType::Cluster, ""),
    };
    let op = match acl.operation {
        AclOperation::Produce => fb::AclOperation::Produce,
        AclOperation::Consume => fb::AclOperation::Consume,
        AclOperation::Describe => fb::AclOperation::Describe,
        AclOperation::Admin => fb::AclOperation::Admin,
    };
    let principal = fbb.create_string(&acl.principal);
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
}
