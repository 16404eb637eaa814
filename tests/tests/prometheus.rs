//! `GET /metrics` (O1) from the real broker: the exposition parses, its
//! histograms are well formed, and the counters move with the traffic.
//! Checked with `promtool check metrics` too where Prometheus' tool is
//! installed (Debian's `prometheus` package).

use shoal_client::{Client, Consumer, ConsumerConfig, NewTopic, Producer, ProducerConfig};
use shoal_tests::{free_port, two_shards, Broker};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One HTTP/1.1 request; (status line, body).
fn http_get(port: u16, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.lines().next().unwrap_or("").to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("Content-Length");
    assert_eq!(body.len(), len, "body length as announced");
    (status, body.to_string())
}

fn scrape(port: u16) -> String {
    let (status, body) = http_get(
        port,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 200 OK");
    body
}

/// A sample: metric name, labels, value.
type Sample = (String, HashMap<String, String>, f64);

/// Parses the text format strictly enough to catch a malformed line: every
/// line a `# HELP`/`# TYPE` comment or `name{labels} value`, every sample's
/// family declared by a `# TYPE` before it, and no family declared twice.
fn parse(text: &str) -> Vec<Sample> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                types.insert(name.into(), kind.into()).is_none(),
                "{name} declared twice"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(
            !line.is_empty() && !line.starts_with('#'),
            "stray line {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), HashMap::new()),
            Some((n, l)) => {
                let l = l.strip_suffix('}').expect("closing brace");
                let labels = l
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once("=\"").expect("label=\"value\"");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{name}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(&name);
        assert!(types.contains_key(family), "{name} has no # TYPE before it");
        out.push((name, labels, value));
    }
    out
}

/// The sum of a metric's samples whose labels include `with`.
fn total(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && with
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// Every histogram: per shard, buckets ascending in `le` and never
/// decreasing, the `+Inf` bucket equal to `_count`.
fn check_histograms(samples: &[Sample]) {
    let mut buckets: HashMap<(String, String), Vec<(f64, f64)>> = HashMap::new();
    for (n, l, v) in samples {
        if let Some(family) = n.strip_suffix("_bucket") {
            let le = l.get("le").expect("le label");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le is a number")
            };
            buckets
                .entry((family.to_string(), l["shard"].clone()))
                .or_default()
                .push((le, *v));
        }
    }
    assert!(buckets.len() >= 3, "produce, fetch and e2e histograms");
    for ((family, shard), b) in &buckets {
        assert!(
            b.windows(2).all(|w| w[0].0 < w[1].0),
            "{family} le ascending"
        );
        assert!(
            b.windows(2).all(|w| w[0].1 <= w[1].1),
            "{family} cumulative"
        );
        let (last_le, inf) = *b.last().expect("buckets");
        assert!(last_le.is_infinite(), "{family} ends with +Inf");
        let count = total(
            samples,
            &format!("{family}_count"),
            &[("shard", shard.as_str())],
        );
        assert_eq!(inf, count, "{family} +Inf bucket = count");
    }
}

/// Counters, per-API lines, histograms and per-partition offsets move with
/// produce and fetch traffic over both shards, and the output passes
/// `promtool check metrics` where promtool is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_over_http_and_move_with_traffic() {
    let port = free_port();
    let broker = Broker::start_with_config(
        two_shards(),
        &format!("metrics_listen = \"127.0.0.1:{port}\"\n"),
    );
    assert!(
        broker.log_text().contains("serving Prometheus metrics"),
        "{}",
        broker.log_text()
    );
    let before = parse(&scrape(port));
    assert_eq!(
        total(&before, "shoal_shard_info", &[]) as usize,
        broker.shards,
        "one shard_info per shard"
    );
    assert_eq!(
        total(&before, "shoal_produce_latency_seconds_count", &[]),
        0.0
    );

    let client = Client::connect(&broker.addr()).await.expect("connect");
    client
        .create_topic(&NewTopic::new("metered", 4))
        .await
        .expect("create topic");
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let n = 200u32;
    let mut acks = Vec::new();
    for i in 0..n {
        acks.push(
            producer
                .send_to("metered", i % 4, None, format!("m{i}").as_bytes())
                .expect("send"),
        );
    }
    for a in acks {
        a.await.expect("acknowledged");
    }
    let consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    for p in 0..4 {
        let f = consumer
            .fetch_once("metered", p, 0, None, 0, Duration::ZERO)
            .await
            .expect("fetch");
        assert!(!f.records.is_empty());
    }

    let text = scrape(port);
    let after = parse(&text);
    check_histograms(&after);
    let produced = total(&after, "shoal_produce_requests_total", &[]);
    assert!(produced >= 1.0, "produce requests counted");
    assert_eq!(
        total(&after, "shoal_requests_total", &[("api", "Produce")]),
        produced,
        "per-API produce requests = produce requests"
    );
    assert!(total(&after, "shoal_request_bytes_total", &[("api", "Produce")]) > 0.0);
    assert!(total(&after, "shoal_response_bytes_total", &[("api", "Fetch")]) > 0.0);
    assert_eq!(
        total(&after, "shoal_produce_latency_seconds_count", &[]),
        produced,
        "one produce latency sample per produce request"
    );
    assert!(total(&after, "shoal_produce_latency_seconds_sum", &[]) > 0.0);
    assert!(total(&after, "shoal_fetch_latency_seconds_count", &[]) >= 4.0);
    assert!(
        total(&after, "shoal_e2e_latency_seconds_count", &[]) >= 1.0,
        "fetches that read the newest batches are timed from their append"
    );
    assert_eq!(
        total(
            &after,
            "shoal_partition_log_end_offset",
            &[("topic", "metered")]
        ),
        f64::from(n),
        "log end offsets add up to the messages produced"
    );
    assert_eq!(
        total(
            &after,
            "shoal_partition_high_watermark",
            &[("topic", "metered"), ("partition", "0")]
        ),
        f64::from(n / 4)
    );
    let shards_with_partitions: std::collections::HashSet<&String> = after
        .iter()
        .filter(|(n, _, _)| n == "shoal_partition_log_end_offset")
        .map(|(_, l, _)| &l["shard"])
        .collect();
    assert_eq!(
        shards_with_partitions.len(),
        broker.shards,
        "partitions reported by their own shards"
    );
    assert!(total(&after, "shoal_connections_accepted_total", &[]) >= 1.0);
    assert!(total(&after, "shoal_connections_open", &[]) >= 1.0);

    // An error response is counted by its code.
    assert!(client.describe_topic("no-such-topic").await.is_err());
    let again = parse(&scrape(port));
    assert!(
        total(
            &again,
            "shoal_error_responses_total",
            &[("error", "UnknownTopic")]
        ) >= 1.0,
        "{text}"
    );
    // `shoal metrics` reads the same counters.
    let summed: HashMap<String, u64> = client
        .metrics()
        .await
        .expect("metrics")
        .into_iter()
        .collect();
    assert_eq!(
        summed["produce_requests"] as f64,
        total(&again, "shoal_produce_requests_total", &[])
    );

    if let Some(verdict) = promtool(&text) {
        assert!(verdict.0, "promtool check metrics: {}", verdict.1);
    } else {
        // scripts/test.sh installs promtool and says so; without it (a
        // developer's machine) this test's own parser is the check.
        assert!(
            std::env::var_os("SHOAL_REQUIRE_PROMTOOL").is_none(),
            "promtool was expected but did not run"
        );
        eprintln!("promtool not installed: checked by this test's own parser only");
    }
}

/// `promtool check metrics` on `text`: (passed, what it said), or `None`
/// without promtool.
fn promtool(text: &str) -> Option<(bool, String)> {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool ran");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), said))
}

/// Other paths and methods get HTTP errors, and the listener keeps serving.
#[test]
fn other_requests_get_http_errors() {
    let port = free_port();
    let _broker =
        Broker::start_with_config("0", &format!("metrics_listen = \"127.0.0.1:{port}\"\n"));
    assert_eq!(
        http_get(port, "GET / HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        http_get(port, "POST /metrics HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(
        http_get(port, "nonsense\r\n\r\n").0,
        "HTTP/1.1 400 Bad Request"
    );
    assert!(scrape(port).contains("shoal_produce_requests_total{shard=\"0\"} 0"));
}

/// `log_format = "json"`: every line the broker logs is a JSON object with
/// a level and a message, and shard lines carry the shard as a field.
#[test]
fn json_logs_are_one_object_per_line() {
    let mut b = Broker::start_with_config("0", "log_format = \"json\"\n");
    assert!(b.terminate(), "clean exit");
    let log = b.log_text();
    let mut shard_lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
        assert!(v["message"].is_string(), "{line}");
        if v["message"] == "shard serving" {
            assert_eq!(v["shard"], 0, "{line}");
            shard_lines += 1;
        }
    }
    assert_eq!(shard_lines, 1, "{log}");
}
