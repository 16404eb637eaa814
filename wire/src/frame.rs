//! Length-prefixed framing and verified decoding of protocol envelopes.
//!
//! A frame is `u32 frame_len | u32 header_len | header | payload` (little
//! endian; `frame_len` counts everything after itself). The header is a
//! flatbuffer `Request` or `Response`; the payload is raw bytes (record
//! batches) that never pass through flatbuffers, so the broker can write
//! them to the log or send them from the log unchanged.
//!
//! [`check`] looks at a receive buffer without allocating and says whether
//! a whole frame has arrived (mini-redis' "check before parse"); only then
//! is the header verified and decoded.

use crate::error::ErrorCode;
use crate::generated::shoal::fb;
use std::ops::Range;
use thiserror::Error;

/// `frame_len` and `header_len`.
pub const FRAME_PREFIX_BYTES: usize = 8;
/// Default largest frame a peer may send (a 1 MiB batch fits with room).
pub const FRAME_BYTES_MAX_DEFAULT: usize = 8 * 1024 * 1024;
/// Largest request header accepted, whatever the frame limit: requests
/// are small (names and numbers; record batches travel as payload).
pub const HEADER_BYTES_MAX: usize = 64 * 1024;
/// Largest response a client accepts, header included. Responses are as
/// large as the data requires (metadata for thousands of partitions runs to
/// megabytes); this bound only stops a broken peer from making a client
/// buffer without end.
pub const RESPONSE_BYTES_MAX: usize = 256 * 1024 * 1024;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("header length {header_len} does not fit a frame of {frame_len} bytes")]
    BadHeaderLength { header_len: usize, frame_len: usize },
    #[error("header of {len} bytes exceeds the maximum of {max}")]
    HeaderTooLarge { len: usize, max: usize },
    #[error("invalid flatbuffer header: {0}")]
    InvalidHeader(String),
}

impl FrameError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } | FrameError::HeaderTooLarge { .. } => {
                ErrorCode::FrameTooLarge
            }
            _ => ErrorCode::MalformedRequest,
        }
    }
}

/// Where the parts of a complete frame lie in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameParts {
    /// Bytes the whole frame takes, prefix included.
    pub total: usize,
    pub header: Range<usize>,
    pub payload: Range<usize>,
}

/// What the start of a receive buffer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Not a whole frame yet; at least `total` bytes are needed.
    Incomplete {
        total: usize,
    },
    Complete(FrameParts),
}

/// Inspects `buf` for one request frame without allocating (headers up to
/// [`HEADER_BYTES_MAX`]). Errors are fatal for the connection: the framing
/// can no longer be trusted.
pub fn check(buf: &[u8], frame_bytes_max: usize) -> Result<Check, FrameError> {
    check_with(buf, frame_bytes_max, HEADER_BYTES_MAX)
}

/// Inspects `buf` for one response frame: any header that fits the frame,
/// frames up to [`RESPONSE_BYTES_MAX`].
pub fn check_response(buf: &[u8]) -> Result<Check, FrameError> {
    check_with(buf, RESPONSE_BYTES_MAX, RESPONSE_BYTES_MAX)
}

/// [`check`] with explicit bounds on the frame and on its header.
pub fn check_with(
    buf: &[u8],
    frame_bytes_max: usize,
    header_bytes_max: usize,
) -> Result<Check, FrameError> {
    if buf.len() < 4 {
        return Ok(Check::Incomplete {
            total: FRAME_PREFIX_BYTES,
        });
    }
    let frame_len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let total = 4 + frame_len;
    if total > frame_bytes_max {
        return Err(FrameError::TooLarge {
            len: total,
            max: frame_bytes_max,
        });
    }
    if frame_len < 4 {
        return Err(FrameError::BadHeaderLength {
            header_len: 0,
            frame_len,
        });
    }
    if buf.len() < FRAME_PREFIX_BYTES {
        return Ok(Check::Incomplete { total });
    }
    let header_len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    if header_len > frame_len - 4 {
        return Err(FrameError::BadHeaderLength {
            header_len,
            frame_len,
        });
    }
    if header_len > header_bytes_max {
        return Err(FrameError::HeaderTooLarge {
            len: header_len,
            max: header_bytes_max,
        });
    }
    if buf.len() < total {
        return Ok(Check::Incomplete { total });
    }
    let header = FRAME_PREFIX_BYTES..FRAME_PREFIX_BYTES + header_len;
    Ok(Check::Complete(FrameParts {
        total,
        payload: header.end..total,
        header,
    }))
}

/// The 8-byte prefix for a frame with these part sizes.
pub fn prefix(header_len: usize, payload_len: usize) -> [u8; FRAME_PREFIX_BYTES] {
    let frame_len = (4 + header_len + payload_len) as u32;
    let mut p = [0u8; FRAME_PREFIX_BYTES];
    p[..4].copy_from_slice(&frame_len.to_le_bytes());
    p[4..].copy_from_slice(&(header_len as u32).to_le_bytes());
    p
}

/// Appends a whole frame to `out`.
pub fn write_frame(out: &mut Vec<u8>, header: &[u8], payload: &[u8]) {
    out.extend_from_slice(&prefix(header.len(), payload.len()));
    out.extend_from_slice(header);
    out.extend_from_slice(payload);
}

/// Verifies and decodes a request header.
pub fn decode_request(header: &[u8]) -> Result<fb::Request<'_>, FrameError> {
    flatbuffers::root::<fb::Request>(header).map_err(|e| FrameError::InvalidHeader(e.to_string()))
}

/// Verifies and decodes a response header.
pub fn decode_response(header: &[u8]) -> Result<fb::Response<'_>, FrameError> {
    flatbuffers::root::<fb::Response>(header).map_err(|e| FrameError::InvalidHeader(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flatbuffers::FlatBufferBuilder;

    fn produce_header(fbb: &mut FlatBufferBuilder<'_>) -> Vec<u8> {
        let topic = fbb.create_string("orders");
        let body = fb::ProduceRequest::create(
            fbb,
            &fb::ProduceRequestArgs {
                topic_id: 0,
                topic: Some(topic),
                partition: 3,
                acks: fb::Acks::Leader,
                timeout_ms: 500,
            },
        );
        let client = fbb.create_string("test");
        let req = fb::Request::create(
            fbb,
            &fb::RequestArgs {
                version: 1,
                correlation_id: 42,
                client_id: Some(client),
                body_type: fb::RequestBody::ProduceRequest,
                body: Some(body.as_union_value()),
            },
        );
        fbb.finish(req, None);
        fbb.finished_data().to_vec()
    }

    #[test]
    fn frame_roundtrip_with_payload() {
        let mut fbb = FlatBufferBuilder::new();
        let header = produce_header(&mut fbb);
        let payload = crate::batch::build_batch(&[b"a", b"b"], 0);
        let mut frame = Vec::new();
        write_frame(&mut frame, &header, &payload);
        for cut in 0..frame.len() {
            assert!(
                matches!(check(&frame[..cut], 1 << 20), Ok(Check::Incomplete { .. })),
                "cut {cut}"
            );
        }
        let Check::Complete(parts) = check(&frame, 1 << 20).unwrap() else {
            panic!("complete")
        };
        assert_eq!(parts.total, frame.len());
        assert_eq!(&frame[parts.payload.clone()], &payload[..]);
        let req = decode_request(&frame[parts.header]).unwrap();
        assert_eq!(req.correlation_id(), 42);
        assert_eq!(req.client_id(), Some("test"));
        let p = req.body_as_produce_request().unwrap();
        assert_eq!(
            (p.topic(), p.partition(), p.timeout_ms()),
            (Some("orders"), 3, 500)
        );
    }

    #[test]
    fn bad_frames_are_refused() {
        let mut big = prefix(10, 1 << 20).to_vec();
        big.resize(64, 0);
        assert!(matches!(
            check(&big, 1 << 20),
            Err(FrameError::TooLarge { .. })
        ));
        let bad_header = prefix(100, 0);
        let mut f = bad_header.to_vec();
        f[4..8].copy_from_slice(&200u32.to_le_bytes());
        assert!(matches!(
            check(&f, 1 << 20),
            Err(FrameError::BadHeaderLength { .. })
        ));
        let mut garbage = Vec::new();
        write_frame(&mut garbage, &[0xff; 40], b"");
        let Check::Complete(parts) = check(&garbage, 1 << 20).unwrap() else {
            panic!("complete")
        };
        let err = decode_request(&garbage[parts.header]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::MalformedRequest);
    }

    #[test]
    fn responses_may_carry_headers_larger_than_requests() {
        let header_len = HEADER_BYTES_MAX + 1024;
        let mut f = prefix(header_len, 0).to_vec();
        f.resize(FRAME_PREFIX_BYTES + header_len, 0);
        assert!(matches!(
            check(&f, 1 << 30),
            Err(FrameError::HeaderTooLarge { .. })
        ));
        let Check::Complete(parts) = check_response(&f).unwrap() else {
            panic!("complete")
        };
        assert_eq!(parts.header.len(), header_len);
        let mut huge = prefix(10, RESPONSE_BYTES_MAX).to_vec();
        huge.resize(64, 0);
        assert!(matches!(
            check_response(&huge),
            Err(FrameError::TooLarge { .. })
        ));
    }
}
