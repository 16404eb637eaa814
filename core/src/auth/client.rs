//! The client side of the SCRAM exchange on a broker's own connection to
//! another broker (replica fetches, group checkpoints), before anything
//! else is sent on it.

use crate::config::Secret;
use flatbuffers::FlatBufferBuilder;
use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use shoal_wire::frame::{self, FRAME_PREFIX_BYTES};
use shoal_wire::scram::{self, ScramClient};
use shoal_wire::{fb, ErrorCode};

/// Longest answer accepted during the exchange (they are small).
const ANSWER_BYTES_MAX: usize = 64 * 1024;

fn invalid(why: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, why)
}

fn encode(corr: u32, mechanism: Option<&str>, bytes: &[u8]) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let mechanism = mechanism.map(|m| fbb.create_string(m));
    let auth = fbb.create_vector(bytes);
    let body = fb::SaslAuthenticateRequest::create(
        &mut fbb,
        &fb::SaslAuthenticateRequestArgs {
            mechanism,
            auth_bytes: Some(auth),
        },
    );
    let client = fbb.create_string("shoal-broker");
    let req = fb::Request::create(
        &mut fbb,
        &fb::RequestArgs {
            version: 1,
            correlation_id: corr,
            client_id: Some(client),
            body_type: fb::RequestBody::SaslAuthenticateRequest,
            body: Some(body.as_union_value()),
        },
    );
    fbb.finish(req, None);
    let mut out = Vec::with_capacity(256);
    frame::write_frame(&mut out, fbb.finished_data(), &[]);
    out
}

/// Sends one step and returns the server's message.
async fn step<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    corr: u32,
    mechanism: Option<&str>,
    msg: &[u8],
) -> std::io::Result<Vec<u8>> {
    stream.write_all(&encode(corr, mechanism, msg)).await?;
    // A TLS stream holds written bytes until flushed.
    stream.flush().await?;
    let mut buf = vec![0u8; FRAME_PREFIX_BYTES];
    stream.read_exact(&mut buf).await?;
    let total = match frame::check_response(&buf) {
        Ok(frame::Check::Incomplete { total }) if total <= ANSWER_BYTES_MAX => total,
        Ok(_) => return Err(invalid("an oversized answer to authentication".into())),
        Err(e) => return Err(invalid(format!("an unreadable answer: {e}"))),
    };
    buf.resize(total, 0);
    stream.read_exact(&mut buf[FRAME_PREFIX_BYTES..]).await?;
    let parts = match frame::check_response(&buf) {
        Ok(frame::Check::Complete(p)) => p,
        _ => return Err(invalid("an unreadable answer to authentication".into())),
    };
    let resp = frame::decode_response(&buf[parts.header.clone()])
        .map_err(|e| invalid(format!("an unreadable answer: {e}")))?;
    let code = ErrorCode::from_u16(resp.error_code());
    if code != ErrorCode::None {
        return Err(invalid(format!(
            "authentication refused ({code:?}): {}",
            resp.error_message().unwrap_or_default()
        )));
    }
    let Some(a) = resp.body_as_sasl_authenticate_response() else {
        return Err(invalid(
            "the answer to authentication is of another kind".into(),
        ));
    };
    Ok(a.auth_bytes()
        .map(|b| b.bytes().to_vec())
        .unwrap_or_default())
}

/// Authenticates `stream` as `user`; an error says why (and the stream is
/// then to be closed).
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    password: &Secret,
) -> std::io::Result<()> {
    let scram_err = |e: scram::ScramError| invalid(e.to_string());
    let (client, first) = ScramClient::new(user, &password.0).map_err(scram_err)?;
    let server_first = step(stream, 1, Some(scram::MECHANISM), first.as_bytes()).await?;
    let (fin, client_final) = client.server_first(&server_first).map_err(scram_err)?;
    let server_final = step(stream, 2, None, client_final.as_bytes()).await?;
    fin.server_final(&server_final).map_err(scram_err)
}
