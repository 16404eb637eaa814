//! TLS (issue 14, C10) against the real broker, with certificates made at
//! run time ([`shoal_tests::pki`]): a client that does not trust the
//! broker's CA fails the handshake, a client that does produces and reads
//! back exactly its bytes by fetch and by push (a multi-MiB backlog goes
//! through the copy path), a plaintext client on a TLS port is told so and
//! the broker keeps serving, a client certificate is a principal for ACLs,
//! bad certificate files stop the start with a clear error, and a cluster
//! with TLS and auth replicates acks=all data through its leader's kill -9.

use shoal_client::{
    Acl, AclOperation, AclResource, Client, ClientConfig, Consumer, ConsumerConfig, Credentials,
    DiscoveryCache, ErrorCode, NewTopic, Producer, ProducerConfig, StartAt, TlsConfig, TlsFiles,
};
use shoal_tests::pki::Pki;
use shoal_tests::{raw, rt, Broker, ZooKeeper};
use shoal_wire::{fb, frame};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

const ADMIN_PW: &str = "admin-secret";

fn tls(ca: &Path, cert: Option<(&Path, &Path)>) -> TlsConfig {
    TlsConfig::load(&TlsFiles {
        ca: ca.to_path_buf(),
        cert: cert.map(|c| c.0.to_path_buf()),
        key: cert.map(|c| c.1.to_path_buf()),
        server_name: None,
    })
    .unwrap()
}

fn config(tls: Option<TlsConfig>, creds: Option<(&str, &str)>) -> ClientConfig {
    ClientConfig {
        discovery_cache: DiscoveryCache::Off,
        credentials: creds.map(|(u, p)| Credentials::new(u, p).unwrap()),
        tls,
        admin_retry_max: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(10),
        ..ClientConfig::default()
    }
}

/// Message `i` of a run: its number, then bytes that depend on it, so a
/// byte out of place anywhere shows.
fn message(i: u32, size: usize) -> Vec<u8> {
    let mut v = i.to_le_bytes().to_vec();
    let mut x = i.wrapping_mul(2_654_435_761).wrapping_add(1);
    while v.len() < size {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.push(x as u8);
    }
    v
}

fn metric(m: &[(String, u64)], name: &str) -> u64 {
    m.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// A client trusting another CA fails the handshake, saying why; a client
/// trusting the broker's CA produces a 6 MiB backlog and reads every byte
/// of it back by fetch (4 MiB fetches: the pieces of the copy path) and
/// by push, and new messages as they arrive; the broker's counters show
/// the log bytes were copied (no kTLS), none sent by sendfile.
#[test]
fn a_tls_client_reads_back_exactly_what_it_wrote_and_a_wrong_ca_fails_the_handshake() {
    let pki = Pki::new();
    let broker = Broker::start_with_config(shoal_tests::two_shards(), &pki.broker_toml("none"));
    let addr = broker.addr();
    rt().block_on(async {
        let e = Client::connect_with_config(&addr, config(Some(tls(&pki.other_ca, None)), None))
            .await
            .err()
            .expect("a client trusting another CA cannot connect");
        let text = e.to_string();
        assert!(
            text.contains("TLS handshake failed") && text.contains("UnknownIssuer"),
            "{text}"
        );

        let client = Client::connect_with_config(&addr, config(Some(tls(&pki.ca, None)), None))
            .await
            .unwrap();
        client
            .create_topic(&NewTopic::new("secret", 1))
            .await
            .unwrap();
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let (n, size) = (3000u32, 2048usize);
        let mut ds = Vec::new();
        for i in 0..n {
            ds.push(
                producer
                    .send_to("secret", 0, None, &message(i, size))
                    .unwrap(),
            );
        }
        for d in ds {
            d.await.unwrap();
        }

        let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
        consumer
            .assign("secret", 0, StartAt::Beginning)
            .await
            .unwrap();
        let mut next = 0u32;
        let deadline = Instant::now() + Duration::from_secs(60);
        while next < n {
            assert!(Instant::now() < deadline, "fetched {next} of {n}");
            for r in consumer.poll().await.unwrap() {
                assert_eq!(r.offset, u64::from(next));
                assert!(
                    r.value.as_deref() == Some(&message(next, size)[..]),
                    "message {next} differs"
                );
                next += 1;
            }
        }

        let pusher = Consumer::new(client.clone(), ConsumerConfig::default());
        let mut sub = pusher.subscribe("secret", 0, 0, 4 << 20).await.unwrap();
        let mut next = 0u32;
        while next < n {
            let p = tokio::time::timeout(Duration::from_secs(30), sub.next())
                .await
                .expect("pushes arrive")
                .unwrap();
            for r in p.records {
                assert_eq!(r.offset, u64::from(next));
                assert!(
                    r.value.as_deref() == Some(&message(next, size)[..]),
                    "push {next} differs"
                );
                next += 1;
            }
        }
        producer
            .send("secret", None, b"live over tls")
            .await
            .unwrap();
        let p = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a new message is pushed")
            .unwrap();
        assert_eq!(p.records[0].value.as_deref(), Some(&b"live over tls"[..]));

        let m = client.metrics().await.unwrap();
        let backlog = u64::from(n) * size as u64;
        assert!(
            metric(&m, "copied_bytes") >= 2 * backlog,
            "fetch and push copied: {m:?}"
        );
        assert_eq!(metric(&m, "zero_copy_bytes"), 0, "no sendfile under TLS");
    });
}

/// A plaintext connection to a TLS port gets one `TlsRequired` frame (in
/// plaintext, so it can be read) and is closed; the Rust client reports
/// that code; bytes that only look like a TLS handshake are refused too;
/// the broker serves TLS clients throughout and counts the refusals.
#[test]
fn plaintext_on_a_tls_port_is_refused_and_the_broker_keeps_serving() {
    let pki = Pki::new();
    let broker = Broker::start_with_config(shoal_tests::two_shards(), &pki.broker_toml("none"));
    for port in [broker.port, broker.port + 1] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let req = raw::request(1, fb::RequestBody::MetadataRequest, |fbb| {
            fb::MetadataRequest::create(fbb, &fb::MetadataRequestArgs::default()).as_union_value()
        });
        s.write_all(&req).unwrap();
        let mut buf = Vec::new();
        let h = raw::read_header(&mut s, &mut buf).expect("an error frame");
        let r = frame::decode_response(&h).unwrap();
        assert_eq!(ErrorCode::from_u16(r.error_code()), ErrorCode::TlsRequired);
        assert!(
            r.error_message().unwrap_or_default().contains("TLS"),
            "{:?}",
            r.error_message()
        );
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "the connection is closed after the frame");
    }
    rt().block_on(async {
        let e = Client::connect_with_config(&broker.addr(), config(None, None))
            .await
            .err()
            .expect("a plaintext client cannot use a TLS port");
        assert_eq!(e.code(), Some(ErrorCode::TlsRequired), "{e}");
        let client =
            Client::connect_with_config(&broker.addr(), config(Some(tls(&pki.ca, None)), None))
                .await
                .unwrap();
        let before = metric(&client.metrics().await.unwrap(), "tls_handshake_failures");
        assert!(
            before >= 3,
            "two plaintext frames and the plaintext client: {before}"
        );

        // A handshake record header, then garbage: rustls refuses it with
        // an alert (a record of type 21) and the connection is closed.
        let mut s = std::net::TcpStream::connect(("127.0.0.1", broker.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5, 6, 7])
            .unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .expect("the broker closes the connection");
        assert!(
            rest.is_empty() || rest[0] == 0x15,
            "nothing or a TLS alert, not a frame: {rest:?}"
        );
        let after = metric(&client.metrics().await.unwrap(), "tls_handshake_failures");
        assert_eq!(after, before + 1, "the garbage handshake is counted");

        client
            .create_topic(&NewTopic::new("after", 2))
            .await
            .unwrap();
    });
    assert!(!broker.log_text().contains("panicked"));
}

async fn produce_once(client: &Client, topic: &str) -> shoal_client::Result<()> {
    Producer::new(
        client.clone(),
        ProducerConfig {
            delivery_timeout: Duration::from_secs(5),
            ..ProducerConfig::default()
        },
    )
    .send(topic, None, b"x")
    .await
    .map(|_| ())
}

/// With auth on and client certificates requested, a certificate's CN is
/// the principal (no SCRAM): ACLs allow it one topic and not another; a
/// certificate without rules may do nothing; a client without certificate
/// or credentials must authenticate, and so must one whose certificate
/// names no valid user; a certificate from another CA fails the
/// handshake. With certificates required, a client without one, or with
/// one naming no valid user, cannot connect at all, and the broker's own
/// connections still work.
#[test]
fn a_client_certificate_is_the_principal_for_acls() {
    let pki = Pki::new();
    let (writer_cert, writer_key) = pki.issue("writer", &[], false, "writer");
    let (idle_cert, idle_key) = pki.issue("idle", &[], false, "idle");
    let (john_cert, john_key) = pki.issue("John Smith", &[], false, "john");
    let toml = pki.broker_toml("requested");
    let broker = Broker::start_env(
        shoal_tests::two_shards(),
        &toml,
        &["--auth", "--superuser", "admin"],
        &[("SHOAL_ADMIN_PASSWORD", ADMIN_PW)],
    );
    let addr = broker.addr();
    rt().block_on(async {
        let admin = Client::connect_with_config(
            &addr,
            config(Some(tls(&pki.ca, None)), Some(("admin", ADMIN_PW))),
        )
        .await
        .unwrap();
        for t in ["allowed", "forbidden"] {
            admin.create_topic(&NewTopic::new(t, 1)).await.unwrap();
        }
        // Describe rules let the principals see both topics (metadata hides
        // the others), so a refused produce says AuthorizationFailed.
        for (principal, topic, operation) in [
            ("writer", "allowed", AclOperation::Produce),
            ("writer", "allowed", AclOperation::Describe),
            ("writer", "forbidden", AclOperation::Describe),
            ("idle", "allowed", AclOperation::Describe),
        ] {
            admin
                .add_acl(&Acl {
                    principal: principal.into(),
                    resource: AclResource::Topic(topic.into()),
                    operation,
                })
                .await
                .unwrap();
        }

        let writer = Client::connect_with_config(
            &addr,
            config(Some(tls(&pki.ca, Some((&writer_cert, &writer_key)))), None),
        )
        .await
        .unwrap();
        produce_once(&writer, "allowed").await.unwrap();
        let e = produce_once(&writer, "forbidden").await.unwrap_err();
        assert!(e.to_string().contains("AuthorizationFailed"), "{e}");

        let idle = Client::connect_with_config(
            &addr,
            config(Some(tls(&pki.ca, Some((&idle_cert, &idle_key)))), None),
        )
        .await
        .unwrap();
        let e = produce_once(&idle, "allowed").await.unwrap_err();
        assert!(e.to_string().contains("AuthorizationFailed"), "{e}");

        // A certificate whose CN is no valid user name counts as none where
        // certificates are only requested: the client must log in with
        // SCRAM (and can, inside the same TLS).
        let john = tls(&pki.ca, Some((&john_cert, &john_key)));
        let e = match Client::connect_with_config(&addr, config(Some(john.clone()), None)).await {
            Ok(c) => produce_once(&c, "allowed").await.unwrap_err(),
            Err(e) => e,
        };
        assert!(e.to_string().contains("AuthenticationRequired"), "{e}");
        let john_as_admin =
            Client::connect_with_config(&addr, config(Some(john), Some(("admin", ADMIN_PW))))
                .await
                .unwrap();
        produce_once(&john_as_admin, "allowed").await.unwrap();

        // The rule removed: the open connection loses the right at once.
        admin
            .remove_acl(&Acl {
                principal: "writer".into(),
                resource: AclResource::Topic("allowed".into()),
                operation: AclOperation::Produce,
            })
            .await
            .unwrap();
        let e = produce_once(&writer, "allowed").await.unwrap_err();
        assert!(e.to_string().contains("AuthorizationFailed"), "{e}");

        let e = match Client::connect_with_config(&addr, config(Some(tls(&pki.ca, None)), None))
            .await
        {
            Ok(anonymous) => produce_once(&anonymous, "allowed").await.unwrap_err(),
            Err(e) => e,
        };
        assert!(e.to_string().contains("AuthenticationRequired"), "{e}");

        let stranger = Pki::new();
        let (sc, sk) = stranger.issue("writer", &[], false, "stranger");
        let e =
            Client::connect_with_config(&addr, config(Some(tls(&pki.ca, Some((&sc, &sk)))), None))
                .await
                .err()
                .expect("a certificate from another CA is refused");
        assert!(e.to_string().contains("TLS: received fatal alert"), "{e}");
    });
    drop(broker);

    let required = Broker::start_env(
        shoal_tests::two_shards(),
        &pki.broker_toml("required"),
        &["--auth", "--superuser", "admin"],
        &[("SHOAL_ADMIN_PASSWORD", ADMIN_PW)],
    );
    rt().block_on(async {
        let r = Client::connect_with_config(
            &required.addr(),
            config(Some(tls(&pki.ca, None)), Some(("admin", ADMIN_PW))),
        )
        .await;
        let e = r.err().expect("no certificate, no connection");
        assert!(e.to_string().contains("TLS: received fatal alert"), "{e}");
        // Where certificates are required, one must name a valid principal:
        // refused in the handshake, with an alert, SCRAM or not.
        let r = Client::connect_with_config(
            &required.addr(),
            config(
                Some(tls(&pki.ca, Some((&john_cert, &john_key)))),
                Some(("admin", ADMIN_PW)),
            ),
        )
        .await;
        let e = r
            .err()
            .expect("a certificate naming no principal is refused");
        assert!(
            e.to_string()
                .contains("TLS: received fatal alert: CertificateUnknown"),
            "{e}"
        );
        let (admin_cert, admin_key) = pki.issue("admin", &[], false, "admin");
        let admin = Client::connect_with_config(
            &required.addr(),
            config(Some(tls(&pki.ca, Some((&admin_cert, &admin_key)))), None),
        )
        .await
        .unwrap();
        // `admin` is a superuser: its certificate may do everything.
        admin.create_topic(&NewTopic::new("t", 1)).await.unwrap();
        produce_once(&admin, "t").await.unwrap();
    });
}

/// Creates `topic` with a partition on each of the two shards and
/// produces to both: metadata sends the client to each shard port.
async fn produce_to_both_shards(client: &Client, topic: &str) {
    client.create_topic(&NewTopic::new(topic, 2)).await.unwrap();
    for p in 0..2 {
        Producer::new(client.clone(), ProducerConfig::default())
            .send_to(topic, p, None, b"x")
            .unwrap()
            .await
            .unwrap();
    }
}

/// A broker's certificate is checked against the name the client expects:
/// one for `localhost` only (no IP address) fails the handshake of a client
/// that connects to 127.0.0.1 and expects that address, and passes when
/// the client is told to expect `localhost` (`--tls-server-name`), or when
/// it reaches the broker by that name (bootstrap and advertised host), on
/// every port; the broker serves on after the refusal. A stalled handshake
/// is closed when its time is up.
#[test]
fn a_certificate_for_another_name_fails_unless_that_name_is_expected() {
    let pki = Pki::new();
    let (cert, key) = pki.issue_for_names("named", &["localhost"], "named");
    let toml = format!("tls_cert = {cert:?}\ntls_key = {key:?}\nrequest_timeout_ms = 1500\n");
    let broker = Broker::start_with_config(shoal_tests::two_shards(), &toml);
    let addr = broker.addr();
    // A peer that connects and sends nothing, or half a hello, is closed
    // once the handshake's time (here the request timeout) is up.
    for hello in [&[][..], &[0x16, 0x03, 0x01][..]] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", broker.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(hello).unwrap();
        let t = Instant::now();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .expect("the broker closes a stalled handshake");
        assert!(
            t.elapsed() >= Duration::from_millis(1000) && t.elapsed() < Duration::from_secs(5),
            "closed after {:?}, not at the request timeout (1.5 s)",
            t.elapsed()
        );
    }
    rt().block_on(async {
        let e = Client::connect_with_config(&addr, config(Some(tls(&pki.ca, None)), None))
            .await
            .err()
            .expect("a certificate without the address connected to is refused");
        let text = e.to_string();
        assert!(
            text.contains("TLS handshake failed") && text.contains("not valid for name"),
            "{text}"
        );
        let named = TlsConfig::load(&TlsFiles {
            ca: pki.ca.clone(),
            cert: None,
            key: None,
            server_name: Some("localhost".into()),
        })
        .unwrap();
        let client = Client::connect_with_config(&addr, config(Some(named), None))
            .await
            .unwrap();
        produce_to_both_shards(&client, "named").await;
    });
    drop(broker);

    // Reached by name, without a server name set: the bootstrap entry's
    // host, then the host the broker advertises, is what the certificate
    // must carry, on the public port and on each shard port. (Only where
    // `localhost` resolves to 127.0.0.1 first, where the broker listens.)
    let first = std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 1))
        .ok()
        .and_then(|mut a| a.next());
    if first.map(|a| a.ip()) != Some(std::net::Ipv4Addr::LOCALHOST.into()) {
        eprintln!(
            "localhost does not resolve to 127.0.0.1 first ({first:?}): by-name part skipped"
        );
        return;
    }
    let toml = format!("tls_cert = {cert:?}\ntls_key = {key:?}\nadvertised_host = \"localhost\"\n");
    let broker = Broker::start_with_config(shoal_tests::two_shards(), &toml);
    rt().block_on(async {
        let by_name = format!("localhost:{}", broker.port);
        let client = Client::connect_with_config(&by_name, config(Some(tls(&pki.ca, None)), None))
            .await
            .unwrap();
        produce_to_both_shards(&client, "by-name").await;
        // The client falls back to the public port when a shard port
        // fails, so the produces alone would not tell: no handshake failed.
        let m = client.metrics().await.unwrap();
        assert_eq!(metric(&m, "tls_handshake_failures"), 0, "{m:?}");
    });
}

/// Bad TLS files stop `shoal serve` at start with an error naming the
/// setting and the file, never a panic.
#[test]
fn bad_tls_files_stop_the_start_with_a_clear_error() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN NOTHING-----\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let cert = pki.broker_cert.to_str().unwrap();
    let key = pki.broker_key.to_str().unwrap();
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["--tls-cert", missing.to_str().unwrap(), "--tls-key", key],
            "missing.pem",
        ),
        (
            vec!["--tls-cert", cert, "--tls-key", garbage.to_str().unwrap()],
            "tls_key",
        ),
        (vec!["--tls-cert", cert], "both tls_cert and tls_key"),
        (
            vec![
                "--tls-cert",
                cert,
                "--tls-key",
                key,
                "--tls-client-auth",
                "required",
            ],
            "needs tls_client_ca",
        ),
    ];
    for (args, says) in cases {
        let (ok, log, _) = Broker::run_to_exit("0", &args, Duration::from_secs(20));
        assert!(!ok, "{args:?} must not start");
        assert!(log.contains(says), "{args:?}: {log}");
        assert!(!log.contains("panicked"), "{args:?}: {log}");
    }
}

/// Three brokers with TLS everywhere (client ports, replica fetches,
/// links between brokers; client certificates requested, so brokers
/// present theirs to each other) and auth on: a topic of three replicas
/// is created (through the links), every replica joins the in-sync set
/// (the followers fetch over TLS), and acks=all records survive a kill -9
/// of the leader.
#[test]
fn a_cluster_with_tls_and_auth_replicates_and_survives_its_leaders_kill() {
    let pki = Pki::new();
    let zk = ZooKeeper::start();
    let toml = format!(
        "zk_session_timeout_ms = 3000\ninter_broker_user = \"broker\"\n{}",
        pki.broker_toml("requested")
    );
    let env = [
        ("SHOAL_ADMIN_PASSWORD", ADMIN_PW),
        ("SHOAL_INTER_BROKER_PASSWORD", "broker-secret"),
    ];
    let mut brokers = shoal_tests::three_auth_brokers(&zk, &toml, &env);
    let addrs: Vec<String> = brokers.iter().map(Broker::addr).collect();
    let admin_config = || {
        let mut c = config(Some(tls(&pki.ca, None)), Some(("admin", ADMIN_PW)));
        c.admin_retry_max = Duration::from_secs(10);
        c
    };
    rt().block_on(async {
        let admin = Client::connect_with_config(&addrs[0], admin_config())
            .await
            .unwrap();
        shoal_tests::create_replicated_topic(&admin, "safe", Duration::from_secs(30)).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = admin.describe_topic("safe").await.unwrap().partitions[0].clone();
            if p.isr.len() == 3 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "followers never caught up over TLS: {p:?}; {}",
                brokers[1].log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        shoal_tests::acks_all_records_survive_the_leaders_kill(
            &mut brokers,
            &addrs,
            "safe",
            admin_config(),
            admin_config(),
        )
        .await;
    });
    for b in &brokers {
        let log = b.log_text();
        assert!(!log.contains("panicked"), "{log}");
        assert!(!log.contains("broker-secret"));
    }
}
