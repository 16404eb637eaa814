//! Shoal's response frames: a flatbuffers `Response` header built in one
//! reused builder, optionally followed by log bytes.

use crate::conn::writer::Writer;
use crate::conn::Conn;
use crate::error::Error;
use crate::partitions::FetchData;
use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};
use shoal_wire::{fb, frame};

/// A connection's outbound side: the writer and the builder its headers
/// are encoded in. Behind one async lock, so responses and pushes never
/// interleave on the socket.
pub struct Out {
    writer: Writer,
    fbb: FlatBufferBuilder<'static>,
}

impl Out {
    pub fn new(writer: Writer) -> Out {
        Out {
            writer,
            fbb: FlatBufferBuilder::with_capacity(1024),
        }
    }
}

impl Conn {
    pub async fn respond<F>(
        &self,
        corr: u32,
        body_type: fb::ResponseBody,
        body: F,
    ) -> std::io::Result<()>
    where
        F: FnOnce(&mut FlatBufferBuilder<'static>) -> WIPOffset<UnionWIPOffset>,
    {
        self.respond_with(corr, body_type, body, None).await
    }

    /// A response whose payload is `data`'s log bytes.
    pub async fn respond_with<F>(
        &self,
        corr: u32,
        body_type: fb::ResponseBody,
        body: F,
        data: Option<&FetchData>,
    ) -> std::io::Result<()>
    where
        F: FnOnce(&mut FlatBufferBuilder<'static>) -> WIPOffset<UnionWIPOffset>,
    {
        let mut out = self.out.lock().await;
        let Out { writer, fbb } = &mut *out;
        fbb.reset();
        let b = body(fbb);
        let resp = fb::Response::create(
            fbb,
            &fb::ResponseArgs {
                correlation_id: corr,
                error_code: 0,
                error_message: None,
                body_type,
                body: Some(b),
                leader_hint: None,
            },
        );
        fbb.finish(resp, None);
        let header = fbb.finished_data();
        let payload_len = data.map_or(0, FetchData::len) as usize;
        let prefix = frame::prefix(header.len(), payload_len);
        let frame_bytes = prefix.len() + header.len() + payload_len;
        let m = &self.reactor.metrics;
        m.response_bytes_by_api
            .add(usize::from(body_type.0), frame_bytes as u64);
        writer.write(&[&prefix, header], data, m).await
    }

    pub async fn respond_error(&self, corr: u32, e: &Error) -> std::io::Result<()> {
        let mut out = self.out.lock().await;
        let Out { writer, fbb } = &mut *out;
        let header = encode_error(fbb, corr, e);
        let prefix = frame::prefix(header.len(), 0);
        let m = &self.reactor.metrics;
        m.errors_by_code.add(e.code() as usize, 1);
        m.response_bytes_by_api.add(
            usize::from(fb::ResponseBody::NONE.0),
            (prefix.len() + header.len()) as u64,
        );
        writer.write(&[&prefix, header], None, m).await
    }
}

/// Encodes an error response header into `fbb`.
pub fn encode_error<'a>(fbb: &'a mut FlatBufferBuilder<'static>, corr: u32, e: &Error) -> &'a [u8] {
    fbb.reset();
    let msg = fbb.create_string(&e.to_string());
    let leader_hint = match e {
        Error::NotLeader { hint: Some(h), .. } => {
            let host = fbb.create_string(&h.host);
            Some(fb::LeaderHint::create(
                fbb,
                &fb::LeaderHintArgs {
                    broker_id: h.broker_id as i32,
                    host: Some(host),
                    port: h.port,
                    leader_epoch: h.leader_epoch,
                },
            ))
        }
        _ => None,
    };
    let resp = fb::Response::create(
        fbb,
        &fb::ResponseArgs {
            correlation_id: corr,
            error_code: e.code() as u16,
            error_message: Some(msg),
            body_type: fb::ResponseBody::NONE,
            body: None,
            leader_hint,
        },
    );
    fbb.finish(resp, None);
    fbb.finished_data()
}

/// A whole error frame, for a connection that is refused before it is
/// served.
pub fn error_frame(corr: u32, e: &Error) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let mut out = Vec::new();
    frame::write_frame(&mut out, encode_error(&mut fbb, corr, e), &[]);
    out
}
