//! The credential and ACL store: what every shard reads (an immutable
//! [`SecurityState`] snapshot) and how it is kept.
//!
//! - Single node: `<data_dir>/security.json`, written by shard 0 only
//!   (every change goes there over the mesh), replaced atomically (a
//!   temporary file with mode 0600, fsync, rename, fsync of the directory).
//! - Cluster: ZooKeeper, under the cluster's root (see
//!   [`crate::cluster::zk`]): `security/users/<name>` holds a
//!   [`UserRecord`], `security/acls/<key>` an [`AclRule`] (the key is the
//!   rule's canonical text, hex-encoded, so adding a rule twice is one
//!   node). The control thread writes them and re-reads the tree when its
//!   watch fires; shard 0 hands each new snapshot to every shard.
//!
//! Users are kept only as SCRAM credentials (salt, iterations, StoredKey,
//! ServerKey): never a password, nor anything a client can log in with.

use crate::auth::acl::{AclRule, Operation, Resource};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use shoal_wire::scram::{self, Credential};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

/// The file of a single node's store, in its data directory.
pub const SECURITY_FILE: &str = "security.json";

/// A user as stored (base64 for the binary fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub mechanism: String,
    pub salt: String,
    pub iterations: u32,
    pub stored_key: String,
    pub server_key: String,
}

impl UserRecord {
    pub fn from_credential(c: &Credential) -> UserRecord {
        UserRecord {
            mechanism: scram::MECHANISM.to_string(),
            salt: scram::b64_encode(&c.salt),
            iterations: c.iterations,
            stored_key: scram::b64_encode(&c.stored_key),
            server_key: scram::b64_encode(&c.server_key),
        }
    }

    /// The credential, or why the record is unusable.
    pub fn credential(&self) -> std::result::Result<Credential, scram::ScramError> {
        Credential::from_parts(
            &scram::b64_decode(&self.salt)?,
            self.iterations,
            &scram::b64_decode(&self.stored_key)?,
            &scram::b64_decode(&self.server_key)?,
        )
    }
}

/// Every user and ACL, as one immutable snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityState {
    #[serde(default)]
    pub users: BTreeMap<String, UserRecord>,
    #[serde(default)]
    pub acls: BTreeSet<AclRule>,
}

/// One change an administrator asks for.
#[derive(Debug, Clone)]
pub enum SecurityChange {
    PutUser {
        name: String,
        record: UserRecord,
        /// Change an existing user's credential (else: refuse if it exists).
        replace: bool,
    },
    DeleteUser(String),
    AddAcl(AclRule),
    RemoveAcl(AclRule),
}

impl SecurityChange {
    /// Checks names before anything is written.
    pub fn validate(&self) -> Result<()> {
        let user = |n: &str| {
            scram::validate_username(n).map_err(|e| Error::InvalidConfig(format!("{n:?}: {e}")))
        };
        match self {
            SecurityChange::PutUser { name, record, .. } => {
                user(name)?;
                record
                    .credential()
                    .map_err(|e| Error::Malformed(format!("credential of {name:?}: {e}")))?;
                Ok(())
            }
            SecurityChange::DeleteUser(name) => user(name),
            SecurityChange::AddAcl(r) | SecurityChange::RemoveAcl(r) => {
                user(&r.principal)?;
                r.resource.validate()
            }
        }
    }
}

impl SecurityState {
    /// Applies a change (errors: the user exists, or does not).
    pub fn apply(&mut self, change: &SecurityChange) -> Result<()> {
        match change {
            SecurityChange::PutUser {
                name,
                record,
                replace,
            } => {
                // The same record again is the same request retried (each
                // credential has a salt of its own): done, not a conflict.
                if !replace && self.users.get(name).is_some_and(|u| u != record) {
                    return Err(Error::UserExists(name.clone()));
                }
                self.users.insert(name.clone(), record.clone());
            }
            SecurityChange::DeleteUser(name) => {
                if self.users.remove(name).is_none() {
                    return Err(Error::UnknownUser(name.clone()));
                }
            }
            SecurityChange::AddAcl(r) => {
                self.acls.insert(r.clone());
            }
            SecurityChange::RemoveAcl(r) => {
                self.acls.remove(r);
            }
        }
        Ok(())
    }

    /// Reads a single node's store; empty when there is none yet.
    pub fn load(data_dir: &Path) -> Result<SecurityState> {
        let path = data_dir.join(SECURITY_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(SecurityState::default())
            }
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        let state: SecurityState = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Config(format!("{} is not valid: {e}", path.display())))?;
        for (name, u) in &state.users {
            if let Err(e) = u.credential() {
                return Err(Error::Config(format!(
                    "{}: user {name:?} has an unusable credential: {e}",
                    path.display()
                )));
            }
        }
        Ok(state)
    }

    /// Replaces a single node's store atomically and durably. The file
    /// (mode 0600) holds no password, but its keys allow an offline
    /// dictionary attack: only the broker's user should read it.
    pub fn save(&self, data_dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Config(format!("cannot encode the security store: {e}")))?;
        let tmp = data_dir.join(format!("{SECURITY_FILE}.tmp"));
        let written = (|| {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
            std::fs::rename(&tmp, data_dir.join(SECURITY_FILE))?;
            shoal_shard::durable::sync_dir_blocking(data_dir)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(|e| Error::io(format!("write {SECURITY_FILE}"), e))
    }

    /// The rules of one principal (all if `None`), in a stable order.
    pub fn acls_of(&self, principal: Option<&str>) -> Vec<&AclRule> {
        self.acls
            .iter()
            .filter(|r| principal.is_none_or(|p| r.principal == p))
            .collect()
    }
}

/// A single node's store at start: read, and with auth on and no user yet,
/// the bootstrap superuser created (its password from
/// `SHOAL_ADMIN_PASSWORD`; a clear error if it is missing).
pub fn bootstrap_single_node(config: &crate::config::Config) -> Result<SecurityState> {
    let mut state = SecurityState::load(&config.data_dir)?;
    let auth = &config.auth;
    if !auth.enabled || !state.users.is_empty() {
        return Ok(state);
    }
    let env = crate::config::ADMIN_PASSWORD_ENV;
    let (name, pw) = match &auth.bootstrap {
        Some((name, Some(pw))) => (name, pw),
        Some((name, None)) => {
            return Err(Error::Config(format!(
                "no users exist yet: superuser {name:?} is created with the password in {env}, which is not set"
            )))
        }
        None => {
            return Err(Error::Config(format!(
                "auth is on and no users exist yet: give --superuser NAME (TOML superuser) with its password in {env}"
            )))
        }
    };
    let cred = Credential::generate(&pw.0, scram::ITERATIONS_DEFAULT)
        .map_err(|e| Error::Config(format!("cannot make a credential: {e}")))?;
    state
        .users
        .insert(name.clone(), UserRecord::from_credential(&cred));
    state.save(&config.data_dir)?;
    tracing::info!(user = %name, "created the bootstrap superuser");
    Ok(state)
}

/// The ZooKeeper node name of a rule: its canonical text, hex-encoded (any
/// topic or group name becomes a valid path element).
pub fn acl_node_name(r: &AclRule) -> String {
    let (kind, name) = match &r.resource {
        Resource::Topic(n) => ("topic", n.as_str()),
        Resource::TopicPrefix(n) => ("topic_prefix", n.as_str()),
        Resource::Group(n) => ("group", n.as_str()),
        Resource::GroupPrefix(n) => ("group_prefix", n.as_str()),
        Resource::Cluster => ("cluster", ""),
    };
    let op = match r.operation {
        Operation::Produce => "produce",
        Operation::Consume => "consume",
        Operation::Describe => "describe",
        Operation::Admin => "admin",
    };
    let text = format!("{}\n{kind}\n{name}\n{op}", r.principal);
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(pw: &str) -> UserRecord {
        UserRecord::from_credential(&Credential::generate(pw, scram::ITERATIONS_MIN).unwrap())
    }

    #[test]
    fn changes_and_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SecurityState::load(dir.path()).unwrap();
        assert!(s.users.is_empty());
        let put = |name: &str, replace| SecurityChange::PutUser {
            name: name.into(),
            record: user("pw"),
            replace,
        };
        let first = put("alice", false);
        s.apply(&first).unwrap();
        // A retry of the same request (same salt) succeeds; another
        // credential for the name does not.
        s.apply(&first).unwrap();
        assert!(matches!(
            s.apply(&put("alice", false)),
            Err(Error::UserExists(_))
        ));
        s.apply(&put("alice", true)).unwrap();
        let rule = AclRule {
            principal: "alice".into(),
            resource: Resource::TopicPrefix("orders.".into()),
            operation: Operation::Produce,
        };
        s.apply(&SecurityChange::AddAcl(rule.clone())).unwrap();
        s.apply(&SecurityChange::AddAcl(rule.clone())).unwrap();
        assert_eq!(s.acls.len(), 1);
        s.save(dir.path()).unwrap();
        let back = SecurityState::load(dir.path()).unwrap();
        assert_eq!(back, s);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(SECURITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(dir.path().join(SECURITY_FILE)).unwrap();
        assert!(!text.contains("\"pw\""));
        s.apply(&SecurityChange::RemoveAcl(rule)).unwrap();
        s.apply(&SecurityChange::DeleteUser("alice".into()))
            .unwrap();
        assert!(matches!(
            s.apply(&SecurityChange::DeleteUser("alice".into())),
            Err(Error::UnknownUser(_))
        ));
        std::fs::write(dir.path().join(SECURITY_FILE), b"{ nope").unwrap();
        assert!(SecurityState::load(dir.path()).is_err());
    }

    #[test]
    fn acl_node_names_are_path_safe_and_distinct() {
        let a = AclRule {
            principal: "a".into(),
            resource: Resource::Group("x/y".into()),
            operation: Operation::Consume,
        };
        let mut b = a.clone();
        b.resource = Resource::GroupPrefix("x/y".into());
        let (na, nb) = (acl_node_name(&a), acl_node_name(&b));
        assert_ne!(na, nb);
        assert!(na.bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
