//! `GET /metrics` in the Prometheus text exposition format (O1), served
//! when `metrics_listen` is set.
//!
//! **Where it runs.** Shard 0's executor owns the HTTP listener; a scrape
//! asks every other shard for a [`ShardScrape`] over the mesh (one message
//! per shard), each shard taking it of its own `Cell` counters on its own
//! core, so the data path never shares a counter, a lock or an atomic with
//! the scrape. Scrapes are served one at a time with bounded reads and
//! writes ([`METRICS_IO_TIMEOUT`]), and rendering yields to the shard's
//! other tasks between partitions.
//!
//! **What it shows**, per shard (`shard` label): the counters of
//! [`crate::metrics::Metrics`] (`shoal metrics` sums the same ones), requests
//! and bytes per API, error responses by code, latency histograms in
//! seconds (produce: decoded to answered; fetch: decoded to answered,
//! long-poll wait included; e2e: a batch's append to the end of its send
//! to a consumer at the tail), connections, and per partition its offsets
//! and size.

use crate::error::{Error, Result};
use crate::limits::{METRICS_IO_TIMEOUT, METRICS_REQUEST_BYTES_MAX};
use crate::mesh::MeshMsg;
use crate::metrics::{Histogram, PartitionScrape, ShardScrape, LATENCY_BOUNDS_US};
use crate::reactor::Reactor;
use crate::rt;
use futures::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use shoal_wire::fb;
use shoal_wire::ErrorCode;
use std::fmt::Write;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;

/// The scalar metrics of [`crate::metrics::Metrics::snapshot`], by the
/// name it gives them: Prometheus name, type, help.
const SCALARS: &[(&str, &str, &str, &str)] = &[
    (
        "group_offset_commits",
        "shoal_group_offset_commits_total",
        "counter",
        "Partition offsets committed and acknowledged by this broker's group coordinators.",
    ),
    (
        "group_joins",
        "shoal_group_joins_total",
        "counter",
        "Consumer-group members that joined.",
    ),
    (
        "group_leaves",
        "shoal_group_leaves_total",
        "counter",
        "Consumer-group members that left cleanly.",
    ),
    (
        "group_sessions_expired",
        "shoal_group_sessions_expired_total",
        "counter",
        "Consumer-group members removed because their session timed out.",
    ),
    (
        "group_checkpoints",
        "shoal_group_checkpoints_total",
        "counter",
        "Group-state checkpoints kept (the leader's own or a follower's).",
    ),
    (
        "auth_successes",
        "shoal_auth_successes_total",
        "counter",
        "SCRAM authentications that succeeded.",
    ),
    (
        "auth_failures",
        "shoal_auth_failures_total",
        "counter",
        "SCRAM authentications that failed (wrong password, unknown user, bad or replayed message).",
    ),
    (
        "authorization_denials",
        "shoal_authorization_denials_total",
        "counter",
        "Requests refused for want of authentication or of an ACL.",
    ),
    (
        "tls_handshake_failures",
        "shoal_tls_handshake_failures_total",
        "counter",
        "Connections refused on a TLS port before being served (failed or timed-out handshake, plaintext, unusable client certificate).",
    ),
    (
        "produce_requests",
        "shoal_produce_requests_total",
        "counter",
        "Produce requests appended to a local partition.",
    ),
    (
        "produce_bytes",
        "shoal_produce_bytes_total",
        "counter",
        "Bytes of record batches appended by produce requests.",
    ),
    (
        "fetch_requests",
        "shoal_fetch_requests_total",
        "counter",
        "Fetches served from a local partition (pushes included).",
    ),
    (
        "fetch_bytes",
        "shoal_fetch_bytes_total",
        "counter",
        "Log bytes sent in fetch and push responses.",
    ),
    (
        "zero_copy_bytes",
        "shoal_zero_copy_bytes_total",
        "counter",
        "Log bytes sent with sendfile (never through user space).",
    ),
    (
        "copied_bytes",
        "shoal_copied_bytes_total",
        "counter",
        "Log bytes sent through a user-space write (a full socket's one byte; every byte on TLS connections).",
    ),
    (
        "tail_cache_bytes",
        "shoal_tail_cache_bytes_total",
        "counter",
        "Log bytes read from the tail cache instead of the segment file.",
    ),
    (
        "cross_shard_requests",
        "shoal_cross_shard_requests_total",
        "counter",
        "Messages sent to another shard.",
    ),
    (
        "connections_accepted",
        "shoal_connections_accepted_total",
        "counter",
        "Client connections accepted.",
    ),
    (
        "connections_open",
        "shoal_connections_open",
        "gauge",
        "Client connections open now.",
    ),
    (
        "connections_refused",
        "shoal_connections_refused_total",
        "counter",
        "Connections refused at connections_max.",
    ),
    (
        "accept_errors",
        "shoal_accept_errors_total",
        "counter",
        "Failed accepts (e.g. out of file descriptors).",
    ),
    (
        "slow_consumers_closed",
        "shoal_slow_consumers_closed_total",
        "counter",
        "Connections closed for outbound data that made no progress.",
    ),
    (
        "request_timeouts",
        "shoal_request_timeouts_total",
        "counter",
        "Connections closed for a frame that did not complete in time.",
    ),
    (
        "recv_budget_waits",
        "shoal_recv_budget_waits_total",
        "counter",
        "Times a connection waited for the partial-frame memory budget.",
    ),
    (
        "recv_buffer_bytes",
        "shoal_recv_buffer_bytes",
        "gauge",
        "Receive-buffer bytes beyond their base size, now.",
    ),
    (
        "errors",
        "shoal_errors_total",
        "counter",
        "Requests answered with an error, and framing errors.",
    ),
];

/// The latency histograms: Prometheus name, help, and how to find it.
type HistogramOf = fn(&ShardScrape) -> &Histogram;
const HISTOGRAMS: &[(&str, &str, HistogramOf)] = &[
    (
        "shoal_produce_latency_seconds",
        "Produce requests from decoded to answered (acknowledgement wait included).",
        |s| &s.produce_latency,
    ),
    (
        "shoal_fetch_latency_seconds",
        "Fetch requests from decoded to answered (long-poll wait included).",
        |s| &s.fetch_latency,
    ),
    (
        "shoal_e2e_latency_seconds",
        "Batches from their append to the end of their send to a consumer at the tail (fetch or push).",
        |s| &s.e2e_latency,
    ),
];

type PerApiOf = fn(&ShardScrape) -> &[u64];
type PartitionValueOf = fn(&PartitionScrape) -> u64;

/// Partitions rendered between two yields to the shard's other tasks.
const PARTITIONS_PER_YIELD: usize = 256;

impl Reactor {
    /// This shard's part of a scrape, taken on its own core.
    pub async fn scrape_local(&self) -> ShardScrape {
        let m = &self.metrics;
        let mut partitions = Vec::new();
        for (i, ((topic, partition), log)) in
            self.partitions.local_logs_of(None).into_iter().enumerate()
        {
            if i % PARTITIONS_PER_YIELD == PARTITIONS_PER_YIELD - 1 {
                rt::yield_if_needed().await;
            }
            partitions.push(PartitionScrape {
                topic,
                partition,
                log_start_offset: log.start_offset(),
                log_end_offset: log.end_offset(),
                high_watermark: log.high_watermark(),
                size_bytes: log.size_bytes(),
            });
        }
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        ShardScrape {
            shard: self.id,
            core: self
                .config
                .cores
                .get(self.id)
                .copied()
                .unwrap_or(usize::MAX),
            counters: m.snapshot(),
            requests_by_api: m.requests_by_api.values(),
            request_bytes_by_api: m.request_bytes_by_api.values(),
            response_bytes_by_api: m.response_bytes_by_api.values(),
            errors_by_code: m.errors_by_code.values(),
            produce_latency: m.produce_latency.histogram(),
            fetch_latency: m.fetch_latency.histogram(),
            e2e_latency: m.e2e_latency.histogram(),
            partitions,
        }
    }

    /// Every shard's part, this one's first; a shard that does not answer
    /// (stopping) is left out.
    pub async fn scrape_all(&self) -> Vec<ShardScrape> {
        let mut all = vec![self.scrape_local().await];
        for s in (0..self.nshards).filter(|&s| s != self.id) {
            match self
                .mesh
                .call(self, s, |reply| MeshMsg::Scrape { reply })
                .await
            {
                Ok(part) => all.push(part),
                Err(e) => tracing::debug!(shard = s, error = %e, "no metrics from a shard"),
            }
        }
        all.sort_by_key(|s| s.shard);
        all
    }
}

/// The API name of a request (or response) body tag, for the `api` label:
/// `Produce` for `ProduceRequest` / `ProduceResponse`, `Push` for pushes.
fn api_name(tag: usize, response: bool) -> Option<&'static str> {
    let tag = u8::try_from(tag).ok()?;
    let name = if response {
        fb::ResponseBody(tag).variant_name()?
    } else {
        fb::RequestBody(tag).variant_name()?
    };
    if name == "NONE" {
        return Some(if response { "Error" } else { "None" });
    }
    Some(
        name.strip_suffix("Request")
            .or_else(|| name.strip_suffix("Response"))
            .unwrap_or(name),
    )
}

/// Escapes a label value (backslash, double quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Seconds from microseconds, as Prometheus reads them.
fn seconds(us: u64) -> f64 {
    us as f64 / 1e6
}

/// The whole exposition of `shards`.
pub async fn render(shards: &[ShardScrape]) -> String {
    let mut out = String::with_capacity(16 * 1024);
    head(
        &mut out,
        "shoal_shard_info",
        "gauge",
        "One per shard: the CPU it is pinned to.",
    );
    for s in shards {
        let _ = writeln!(
            out,
            "shoal_shard_info{{shard=\"{}\",core=\"{}\"}} 1",
            s.shard, s.core
        );
    }
    for (key, name, kind, help) in SCALARS {
        head(&mut out, name, kind, help);
        for s in shards {
            let v = s
                .counters
                .iter()
                .find(|(k, _)| k == key)
                .map_or(0, |(_, v)| *v);
            let _ = writeln!(out, "{name}{{shard=\"{}\"}} {v}", s.shard);
        }
    }
    let per_api: [(&str, &str, bool, PerApiOf); 3] = [
        ("shoal_requests_total", "Requests received, by API.", false, |s| &s.requests_by_api),
        ("shoal_request_bytes_total", "Bytes of request frames received, by API.", false, |s| &s.request_bytes_by_api),
        ("shoal_response_bytes_total", "Bytes of response frames sent (log bytes included), by API; error responses under Error.", true, |s| &s.response_bytes_by_api),
    ];
    for (name, help, response, of) in per_api {
        head(&mut out, name, "counter", help);
        for s in shards {
            for (tag, v) in of(s).iter().enumerate() {
                // Every API a client can call is shown (0 until used);
                // the empty tag only once it counted something.
                let Some(api) = api_name(tag, response) else {
                    continue;
                };
                if tag == 0 && *v == 0 {
                    continue;
                }
                let _ = writeln!(out, "{name}{{shard=\"{}\",api=\"{api}\"}} {v}", s.shard);
            }
        }
    }
    head(
        &mut out,
        "shoal_error_responses_total",
        "counter",
        "Error responses sent, by wire error code.",
    );
    for s in shards {
        for (code, v) in s.errors_by_code.iter().enumerate() {
            if *v == 0 {
                continue;
            }
            let name = u16::try_from(code).map_or(ErrorCode::Unknown, ErrorCode::from_u16);
            let _ = writeln!(
                out,
                "shoal_error_responses_total{{shard=\"{}\",code=\"{code}\",error=\"{name:?}\"}} {v}",
                s.shard
            );
        }
    }
    for (name, help, of) in HISTOGRAMS {
        head(&mut out, name, "histogram", help);
        for s in shards {
            let h = of(s);
            let mut cumulative = 0;
            for (bound, c) in LATENCY_BOUNDS_US.iter().zip(&h.counts) {
                cumulative += c;
                let _ = writeln!(
                    out,
                    "{name}_bucket{{shard=\"{}\",le=\"{}\"}} {cumulative}",
                    s.shard,
                    seconds(*bound)
                );
            }
            let count = h.count();
            let _ = writeln!(
                out,
                "{name}_bucket{{shard=\"{}\",le=\"+Inf\"}} {count}",
                s.shard
            );
            let _ = writeln!(
                out,
                "{name}_sum{{shard=\"{}\"}} {}",
                s.shard,
                seconds(h.sum_us)
            );
            let _ = writeln!(out, "{name}_count{{shard=\"{}\"}} {count}", s.shard);
        }
    }
    let per_partition: [(&str, &str, PartitionValueOf); 4] = [
        (
            "shoal_partition_log_start_offset",
            "Oldest offset still in the partition's log.",
            |p| p.log_start_offset,
        ),
        (
            "shoal_partition_log_end_offset",
            "Offset the partition's next batch gets.",
            |p| p.log_end_offset,
        ),
        (
            "shoal_partition_high_watermark",
            "Offset below which consumers may read (on a single broker, the log end).",
            |p| p.high_watermark,
        ),
        (
            "shoal_partition_size_bytes",
            "Bytes of the partition's segments.",
            |p| p.size_bytes,
        ),
    ];
    for (name, help, of) in per_partition {
        head(&mut out, name, "gauge", help);
        let mut n = 0;
        for s in shards {
            for p in &s.partitions {
                n += 1;
                if n % PARTITIONS_PER_YIELD == 0 {
                    rt::yield_if_needed().await;
                }
                let _ = writeln!(
                    out,
                    "{name}{{shard=\"{}\",topic=\"{}\",partition=\"{}\"}} {}",
                    s.shard,
                    label(&p.topic),
                    p.partition,
                    of(p)
                );
            }
        }
    }
    out
}

/// Binds `addr` (a plain listener: no SO_REUSEPORT, so a second broker on
/// the same metrics port fails to start instead of taking half the
/// scrapes) and serves `GET /metrics` on this shard's executor until the
/// task is dropped.
pub fn serve(reactor: Rc<Reactor>, addr: SocketAddr) -> Result<rt::Task<()>> {
    let std_listener = std::net::TcpListener::bind(addr)
        .map_err(|e| Error::Config(format!("cannot listen for metrics on {addr}: {e}")))?;
    let local = std_listener.local_addr().unwrap_or(addr);
    // SAFETY: the descriptor is a bound, listening TCP socket we own; the
    // glommio listener takes it over and nothing else closes it.
    let listener = unsafe { TcpListener::from_raw_fd(std_listener.into_raw_fd()) };
    tracing::info!(shard = reactor.id, url = %format!("http://{local}/metrics"), "serving Prometheus metrics");
    Ok(rt::spawn(async move {
        let failed_log = crate::metrics::LogLimiter::new(std::time::Duration::from_secs(10));
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    if let Err(e) = answer(&reactor, stream).await {
                        tracing::debug!(error = %e, "metrics scrape ended");
                    }
                }
                Err(e) => {
                    if let Some(held_back) = failed_log.allow() {
                        tracing::warn!(error = %e, more_since_last_line = held_back, "metrics accept failed");
                    }
                    rt::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

/// What an HTTP request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    Metrics,
    NotFound,
    BadMethod,
    Bad,
}

/// Reads the request line of a complete head.
fn parse_head(head: &[u8]) -> Ask {
    let Ok(text) = std::str::from_utf8(head) else {
        return Ask::Bad;
    };
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Ask::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Ask::Bad;
    }
    if method != "GET" && method != "HEAD" {
        return Ask::BadMethod;
    }
    let path = target.split('?').next().unwrap_or("");
    if path == "/metrics" {
        Ask::Metrics
    } else {
        Ask::NotFound
    }
}

async fn answer(reactor: &Reactor, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; METRICS_REQUEST_BYTES_MAX];
    let mut filled = 0;
    let deadline = rt::now() + METRICS_IO_TIMEOUT;
    let ask = loop {
        if let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            break parse_head(&buf[..end]);
        }
        if filled == buf.len() {
            break Ask::Bad;
        }
        let left = deadline.saturating_duration_since(rt::now());
        let n = match rt::timeout(left, stream.read(&mut buf[filled..])).await {
            Some(r) => r?,
            None => return Err(std::io::ErrorKind::TimedOut.into()),
        };
        if n == 0 {
            return Ok(());
        }
        filled += n;
    };
    let head_only = buf.starts_with(b"HEAD ");
    let (status, body) = match ask {
        Ask::Metrics => ("200 OK", render(&reactor.scrape_all().await).await),
        Ask::NotFound => (
            "404 Not Found",
            "only /metrics is served here\n".to_string(),
        ),
        Ask::BadMethod => ("405 Method Not Allowed", "GET /metrics\n".to_string()),
        Ask::Bad => ("400 Bad Request", "bad request\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        if !head_only {
            stream.write_all(body.as_bytes()).await?;
        }
        stream.flush().await?;
        stream.close().await
    };
    match rt::timeout(METRICS_IO_TIMEOUT, write).await {
        Some(r) => r,
        None => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x"),
            Ask::Metrics
        );
        assert_eq!(parse_head(b"GET /metrics?x=1 HTTP/1.0"), Ask::Metrics);
        assert_eq!(parse_head(b"GET / HTTP/1.1"), Ask::NotFound);
        assert_eq!(parse_head(b"POST /metrics HTTP/1.1"), Ask::BadMethod);
        assert_eq!(parse_head(b"GET /metrics"), Ask::Bad);
        assert_eq!(parse_head(b"\xff\xfe"), Ask::Bad);
    }

    #[test]
    fn api_names() {
        assert_eq!(
            api_name(usize::from(fb::RequestBody::ProduceRequest.0), false),
            Some("Produce")
        );
        assert_eq!(
            api_name(usize::from(fb::ResponseBody::Push.0), true),
            Some("Push")
        );
        assert_eq!(api_name(0, true), Some("Error"));
        assert_eq!(api_name(200, false), None);
    }

    /// Every scalar `shoal metrics` reports has a Prometheus name, so the
    /// two cannot drift apart.
    #[test]
    fn every_counter_has_a_prometheus_name() {
        let m = crate::metrics::Metrics::default();
        for (k, _) in m.snapshot() {
            if k.starts_with("produce_latency_us_") {
                continue;
            }
            assert!(
                SCALARS.iter().any(|(key, ..)| *key == k),
                "{k} has no Prometheus name"
            );
        }
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn a_histogram_is_cumulative_and_ends_at_its_count() {
        let ex = glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor");
        let text = ex.run(async {
            let m = crate::metrics::Metrics::default();
            m.produce_latency
                .record(std::time::Duration::from_micros(7));
            m.produce_latency
                .record(std::time::Duration::from_micros(120));
            m.produce_latency.record(std::time::Duration::from_secs(5));
            let s = ShardScrape {
                shard: 3,
                core: 1,
                counters: m.snapshot(),
                requests_by_api: m.requests_by_api.values(),
                request_bytes_by_api: m.request_bytes_by_api.values(),
                response_bytes_by_api: m.response_bytes_by_api.values(),
                errors_by_code: m.errors_by_code.values(),
                produce_latency: m.produce_latency.histogram(),
                fetch_latency: m.fetch_latency.histogram(),
                e2e_latency: m.e2e_latency.histogram(),
                partitions: vec![],
            };
            render(&[s]).await
        });
        assert!(
            text.contains("shoal_produce_latency_seconds_bucket{shard=\"3\",le=\"0.00001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("shoal_produce_latency_seconds_bucket{shard=\"3\",le=\"0.00015\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("shoal_produce_latency_seconds_bucket{shard=\"3\",le=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("shoal_produce_latency_seconds_bucket{shard=\"3\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("shoal_produce_latency_seconds_count{shard=\"3\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("shoal_produce_latency_seconds_sum{shard=\"3\"} 5.000127\n"),
            "{text}"
        );
        assert!(
            text.contains("shoal_shard_info{shard=\"3\",core=\"1\"} 1\n"),
            "{text}"
        );
    }
}
