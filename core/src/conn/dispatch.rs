//! Decodes a request and hands it to its API family. Each family answers
//! for itself (success or error); an `Err` from here is an I/O error on the
//! socket and ends the connection.

use crate::conn::Conn;
use crate::error::Error;
use crate::metrics::add;
use shoal_wire::fb::RequestBody as B;
use shoal_wire::frame;
use std::rc::Rc;

/// The request body was not the type its tag said (cannot happen after
/// flatbuffers verification; answered rather than trusted).
pub fn body_mismatch() -> Error {
    Error::Malformed("request body does not match its type".into())
}

impl Conn {
    /// Serves one request.
    pub async fn handle(self: &Rc<Self>, header: &[u8], payload: &[u8]) -> std::io::Result<()> {
        let req = match frame::decode_request(header) {
            Ok(r) => r,
            Err(e) => return self.fail(0, Error::Frame(e)).await,
        };
        let corr = req.correlation_id();
        let m = &self.reactor.metrics;
        let api = usize::from(req.body_type().0);
        m.requests_by_api.add(api, 1);
        let frame_bytes = frame::FRAME_PREFIX_BYTES + header.len() + payload.len();
        m.request_bytes_by_api.add(api, frame_bytes as u64);
        if req.version() != 1 {
            return self
                .fail(corr, Error::UnsupportedVersion(req.version()))
                .await;
        }
        if self.reactor.security.enabled() && req.body_type() != B::SaslAuthenticateRequest {
            if let Err(e) = self.authorize(&req) {
                add(&m.authorization_denials, 1);
                let close = matches!(e, Error::AuthenticationRequired);
                self.fail(corr, e).await?;
                if close {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        "a request before authentication",
                    ));
                }
                return Ok(());
            }
        }
        match req.body_type() {
            B::ProduceRequest => self.produce(corr, req, payload).await,
            B::FetchRequest => self.fetch(corr, req).await,
            B::MetadataRequest => self.metadata(corr, req).await,
            B::CreateTopicRequest => self.create_topic(corr, req).await,
            B::DeleteTopicRequest => self.delete_topic(corr, req).await,
            B::ListTopicsRequest => self.list_topics(corr).await,
            B::DescribeTopicRequest => self.describe_topic(corr, req).await,
            B::SubscribeRequest => self.subscribe(corr, req).await,
            B::GrantCreditRequest => self.grant_credit(corr, req).await,
            B::UnsubscribeRequest => self.unsubscribe(corr, req).await,
            B::MetricsRequest => self.metrics(corr).await,
            B::GroupHeartbeatRequest => self.group_heartbeat(corr, req).await,
            B::OffsetCommitRequest => self.offset_commit(corr, req).await,
            B::OffsetFetchRequest => self.offset_fetch(corr, req).await,
            B::ListGroupsRequest => self.list_groups(corr, req).await,
            B::DescribeGroupRequest => self.describe_group(corr, req).await,
            B::GroupCheckpointRequest => self.group_checkpoint(corr, req, payload).await,
            B::SaslAuthenticateRequest => self.sasl_authenticate(corr, req).await,
            B::CreateUserRequest => self.create_user(corr, req).await,
            B::DeleteUserRequest => self.delete_user(corr, req).await,
            B::ListUsersRequest => self.list_users(corr).await,
            B::AddAclRequest => self.add_acl(corr, req).await,
            B::RemoveAclRequest => self.remove_acl(corr, req).await,
            B::ListAclsRequest => self.list_acls(corr, req).await,
            other => self.fail(corr, Error::UnsupportedApi(other.0)).await,
        }
    }

    /// Counts an error and answers it.
    pub async fn fail(&self, corr: u32, e: Error) -> std::io::Result<()> {
        add(&self.reactor.metrics.errors, 1);
        self.respond_error(corr, &e).await
    }
}

/// A string field, empty when absent.
pub fn s(opt: Option<&str>) -> &str {
    opt.unwrap_or("")
}
