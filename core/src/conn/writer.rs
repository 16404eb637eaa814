//! The protocol-neutral half of a response: bytes the protocol encoded
//! (frame prefix, header), then log bytes straight from a file with
//! sendfile. A second protocol (a Kafka listener) encodes differently and
//! writes through the same path.

use crate::conn::sendfile;
use crate::metrics::{add, Metrics};
use crate::partitions::FetchData;
use futures::io::{AsyncWriteExt, WriteHalf};
use glommio::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};

pub struct Writer {
    w: WriteHalf<TcpStream>,
    sock: RawFd,
    /// Reused for the encoded parts, so each response is one write (one
    /// segment, one wake-up at the client).
    head: Vec<u8>,
}

impl Writer {
    pub fn new(w: WriteHalf<TcpStream>, sock: RawFd) -> Writer {
        Writer {
            w,
            sock,
            head: Vec::with_capacity(1024),
        }
    }

    /// Writes `parts` in one write, then `data` from its file, and flushes.
    pub async fn write(
        &mut self,
        parts: &[&[u8]],
        data: Option<&FetchData>,
        metrics: &Metrics,
    ) -> std::io::Result<()> {
        self.head.clear();
        for p in parts {
            self.head.extend_from_slice(p);
        }
        self.w.write_all(&self.head).await?;
        if let Some(d) = data {
            let (fd, position, len) = match d {
                FetchData::Local(s) => (s.file().as_raw_fd(), s.file_position(), s.len),
                FetchData::Remote(r) => (r.file.as_raw_fd(), r.position, r.len),
            };
            let sent = sendfile::send_file(&mut self.w, self.sock, fd, position, len).await?;
            add(&metrics.fetch_bytes, len);
            add(&metrics.zero_copy_bytes, sent.zero_copy);
            add(&metrics.copied_bytes, sent.copied);
        }
        self.w.flush().await
    }
}
