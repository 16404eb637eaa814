//! The protocol-neutral half of a response: bytes the protocol encoded
//! (frame prefix, header), then log bytes straight from a file with
//! sendfile. A second protocol (a Kafka listener) encodes differently and
//! writes through the same path.
//!
//! On a TLS connection the log bytes must be encrypted in user space:
//! kernel TLS (kTLS), which would let sendfile encrypt in the kernel, is
//! not used (the kernel Shoal is tested on is built without it; see
//! `auth::tls`). They are read (`pread`) in pieces of [`TLS_COPY_PIECE_BYTES`]
//! into one buffer per connection, allocated at its first such write and
//! reused, and handed to rustls piece by piece: a multi-MiB slice never
//! sits in memory whole. The plaintext path is untouched (one `match` per
//! response).
//!
//! Slow consumers (C9): every writer has a [`Watch`] that says since when
//! its current write has been waiting. The shard's sweeper
//! ([`Reactor::sweep_stalled_writers`]) shuts down a connection whose write
//! made no progress for `slow_consumer_timeout_ms`, so a consumer that
//! stops reading never holds memory or a push loop forever, and never slows
//! the others (each connection writes on its own). No timer is armed per
//! write: the data path pays two `Cell` stores.

use crate::conn::sendfile;
use crate::conn::tls::TlsStream;
use crate::limits::TLS_COPY_PIECE_BYTES;
use crate::metrics::LogLimiter;
use crate::metrics::{add, Metrics};
use crate::partitions::FetchData;
use crate::reactor::Reactor;
use crate::rt;
use futures::io::{AsyncWriteExt, WriteHalf};
use glommio::net::TcpStream;
use std::cell::Cell;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

/// What the sweeper sees of a writer. Lives exactly as long as the
/// [`Writer`] (which holds the socket open), so a shutdown through it never
/// reaches a descriptor number reused by another connection.
pub struct Watch {
    sock: RawFd,
    /// Since when the current write has been waiting for the socket.
    progress_since: Cell<Option<Instant>>,
}

/// Where a connection's responses go.
pub enum Sink {
    /// Plaintext: log bytes by sendfile.
    Plain(WriteHalf<TcpStream>),
    /// TLS: log bytes copied through `copy` (empty until the first
    /// response with log bytes) and encrypted by rustls.
    Tls {
        w: WriteHalf<TlsStream>,
        copy: Vec<u8>,
    },
}

impl Sink {
    pub fn tls(w: WriteHalf<TlsStream>) -> Sink {
        Sink::Tls {
            w,
            copy: Vec::new(),
        }
    }
}

pub struct Writer {
    sink: Sink,
    sock: RawFd,
    /// Reused for the encoded parts, so each response is one write (one
    /// segment, one wake-up at the client).
    head: Vec<u8>,
    watch: Rc<Watch>,
}

impl Writer {
    pub fn new(sink: Sink, sock: RawFd, reactor: &Reactor) -> Writer {
        let watch = Rc::new(Watch {
            sock,
            progress_since: Cell::new(None),
        });
        reactor.watch_writer(&watch);
        Writer {
            sink,
            sock,
            head: Vec::with_capacity(1024),
            watch,
        }
    }

    /// Writes `parts` in one write, then `data` from its file, and flushes.
    pub async fn write(
        &mut self,
        parts: &[&[u8]],
        data: Option<&FetchData>,
        metrics: &Metrics,
    ) -> std::io::Result<()> {
        self.watch.progress_since.set(Some(rt::now()));
        let r = self.write_inner(parts, data, metrics).await;
        self.watch.progress_since.set(None);
        r
    }

    async fn write_inner(
        &mut self,
        parts: &[&[u8]],
        data: Option<&FetchData>,
        metrics: &Metrics,
    ) -> std::io::Result<()> {
        self.head.clear();
        for p in parts {
            self.head.extend_from_slice(p);
        }
        let w = match &mut self.sink {
            Sink::Plain(w) => w,
            Sink::Tls { w, copy } => {
                match data {
                    None => w.write_all(&self.head).await?,
                    Some(d) => {
                        let (file, position, len) = d.file_range();
                        let progress = &self.watch.progress_since;
                        copy_file(w, copy, &self.head, (file, position, len), progress).await?;
                        add(&metrics.fetch_bytes, len);
                        add(&metrics.copied_bytes, len);
                    }
                }
                return w.flush().await;
            }
        };
        w.write_all(&self.head).await?;
        if let Some(d) = data {
            let (file, position, len) = d.file_range();
            let sent = sendfile::send_file(
                w,
                self.sock,
                file.as_raw_fd(),
                position,
                len,
                &self.watch.progress_since,
            )
            .await?;
            add(&metrics.fetch_bytes, len);
            add(&metrics.zero_copy_bytes, sent.zero_copy);
            add(&metrics.copied_bytes, sent.copied);
        }
        w.flush().await
    }
}

/// Writes `head`, then `len` bytes of `file` from `position`, to a TLS
/// stream: each piece is read into `copy` (the head shares the first
/// piece, so a small response is one TLS record) and encrypted as it is
/// written. Each piece written sets `progress_since` (the slow-consumer
/// sweeper reads it).
async fn copy_file(
    w: &mut WriteHalf<TlsStream>,
    copy: &mut Vec<u8>,
    head: &[u8],
    (file, mut position, mut len): (&std::fs::File, u64, u64),
    progress_since: &Cell<Option<Instant>>,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    if copy.is_empty() {
        // Once per connection, and only for connections that read log
        // bytes; zeroed once, then only overwritten.
        copy.resize(TLS_COPY_PIECE_BYTES, 0);
    }
    let mut start = if head.len() <= copy.len() / 2 {
        copy[..head.len()].copy_from_slice(head);
        head.len()
    } else {
        w.write_all(head).await?;
        0
    };
    while len > 0 {
        let piece = (copy.len() - start).min(len as usize);
        let mut filled = start;
        while filled < start + piece {
            let n = file.read_at(&mut copy[filled..start + piece], position)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "log file ended before the range sent",
                ));
            }
            filled += n;
            position += n as u64;
        }
        w.write_all(&copy[..filled]).await?;
        progress_since.set(Some(rt::now()));
        len -= piece as u64;
        start = 0;
        if len > 0 {
            // As between sendfile pieces: let the shard's other work in.
            rt::yield_to_io().await;
        }
    }
    if start > 0 {
        // No log bytes after all: the head alone.
        w.write_all(&copy[..start]).await?;
    }
    Ok(())
}

/// The writers of one shard, for the sweeper.
#[derive(Default)]
pub struct Watches {
    all: std::cell::RefCell<Vec<Weak<Watch>>>,
}

impl Reactor {
    fn watch_writer(&self, w: &Rc<Watch>) {
        self.writers.all.borrow_mut().push(Rc::downgrade(w));
    }

    /// Shuts down every connection whose write has waited longer than
    /// `timeout` without progress, and forgets writers that are gone.
    /// Returns how many it shut down.
    pub fn sweep_stalled_writers(&self, timeout: Duration, log: &LogLimiter) -> usize {
        let now = rt::now();
        let mut closed = 0;
        self.writers.all.borrow_mut().retain(|w| {
            let Some(w) = w.upgrade() else {
                return false;
            };
            let stalled = w
                .progress_since
                .get()
                .is_some_and(|t| now.saturating_duration_since(t) >= timeout);
            if stalled {
                w.progress_since.set(None);
                // SAFETY: shutdown(2) on a socket this shard's connection
                // still owns (the Watch lives no longer than its Writer);
                // no memory is passed.
                unsafe { libc::shutdown(w.sock, libc::SHUT_RDWR) };
                closed += 1;
            }
            true
        });
        if closed > 0 {
            add(&self.metrics.slow_consumers_closed, closed as u64);
            if let Some(held_back) = log.allow() {
                tracing::warn!(
                    shard = self.id,
                    closed,
                    more_since_last_line = held_back,
                    timeout_ms = timeout.as_millis() as u64,
                    "closed connections whose outbound data made no progress (slow consumers)"
                );
            }
        }
        closed
    }
}
