//! Security (issue 14, C10) against the real broker: SCRAM-SHA-256 before
//! anything else, ACLs per principal that take effect on open
//! connections, the user and ACL commands, and a cluster with auth on
//! that still replicates through a leader's kill -9.

use flatbuffers::FlatBufferBuilder;
use shoal_client::{
    Acl, AclOperation, AclResource, Client, ClientConfig, Credentials, DiscoveryCache, NewTopic,
};
use shoal_tests::raw;
use shoal_tests::{rt, shoal_bin, Broker, ZooKeeper};
use shoal_wire::frame;
use shoal_wire::scram::{ClientFirst, ScramClient};
use shoal_wire::{fb, ErrorCode};
use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

const ADMIN_PW: &str = "admin-secret";

/// A single node with auth on and superuser `admin`.
fn secure_broker() -> Broker {
    Broker::start_env(
        shoal_tests::two_shards(),
        "",
        &["--auth", "--superuser", "admin"],
        &[("SHOAL_ADMIN_PASSWORD", ADMIN_PW)],
    )
}

fn config(user: &str, pw: &str) -> ClientConfig {
    ClientConfig {
        discovery_cache: DiscoveryCache::Off,
        credentials: Some(Credentials::new(user, pw).unwrap()),
        admin_retry_max: Duration::from_secs(2),
        // Failed logins from 127.0.0.1 earlier in a test slow the next
        // exchange by up to 5 s.
        connect_timeout: Duration::from_secs(15),
        ..ClientConfig::default()
    }
}

/// [`config`] for a cluster: admin requests and metadata lookups keep
/// trying through a failover (a leader's kill, a ZooKeeper session lost
/// on a loaded machine) as long as the client's default allows, not the
/// 2 s that single-node tests use to see refusals quickly.
fn cluster_config(user: &str, pw: &str) -> ClientConfig {
    ClientConfig {
        admin_retry_max: Duration::from_secs(15),
        ..config(user, pw)
    }
}

async fn client(addr: &str, user: &str, pw: &str) -> Client {
    Client::connect_with_config(addr, config(user, pw))
        .await
        .unwrap()
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn sasl_frame(corr: u32, mechanism: Option<&str>, msg: &[u8]) -> Vec<u8> {
    raw::request(corr, fb::RequestBody::SaslAuthenticateRequest, |fbb| {
        let mechanism = mechanism.map(|m| fbb.create_string(m));
        let auth = fbb.create_vector(msg);
        fb::SaslAuthenticateRequest::create(
            fbb,
            &fb::SaslAuthenticateRequestArgs {
                mechanism,
                auth_bytes: Some(auth),
            },
        )
        .as_union_value()
    })
}

/// Sends a frame; the answer's error code and, if none, its SCRAM bytes.
fn exchange(s: &mut TcpStream, buf: &mut Vec<u8>, frame: &[u8]) -> (ErrorCode, Vec<u8>) {
    s.write_all(frame).unwrap();
    let h = raw::read_header(s, buf).expect("an answer");
    let r = frame::decode_response(&h).unwrap();
    let bytes = r
        .body_as_sasl_authenticate_response()
        .and_then(|a| a.auth_bytes())
        .map(|b| b.bytes().to_vec())
        .unwrap_or_default();
    (ErrorCode::from_u16(r.error_code()), bytes)
}

/// Whether the broker closed the connection (reads end, no more frames).
fn closed(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    raw::read_header(s, buf).is_none()
}

/// A raw connection authenticated as `user`; also returns its
/// client-final message (for replay).
fn authenticated(port: u16, user: &str, pw: &str) -> (TcpStream, Vec<u8>, String) {
    let mut s = connect(port);
    let mut buf = Vec::new();
    let (c, first) = ScramClient::new(user, pw).unwrap();
    let (code, server_first) = exchange(
        &mut s,
        &mut buf,
        &sasl_frame(1, Some("SCRAM-SHA-256"), first.as_bytes()),
    );
    assert_eq!(code, ErrorCode::None);
    let (fin, client_final) = c.server_first(&server_first).unwrap();
    let (code, server_final) = exchange(
        &mut s,
        &mut buf,
        &sasl_frame(2, None, client_final.as_bytes()),
    );
    assert_eq!(code, ErrorCode::None);
    fin.server_final(&server_final).unwrap();
    (s, buf, client_final)
}

fn produce_frame(corr: u32, topic: &str) -> Vec<u8> {
    raw::request_with(
        corr,
        fb::RequestBody::ProduceRequest,
        |fbb| {
            let t = fbb.create_string(topic);
            fb::ProduceRequest::create(
                fbb,
                &fb::ProduceRequestArgs {
                    topic: Some(t),
                    partition: 0,
                    acks: fb::Acks::Leader,
                    timeout_ms: 5000,
                    topic_id: 0,
                },
            )
            .as_union_value()
        },
        &raw::batch(-1, 0, 1, 16),
    )
}

fn create_user_frame(corr: u32, name: &str, c: &shoal_wire::scram::Credential) -> Vec<u8> {
    raw::request(corr, fb::RequestBody::CreateUserRequest, |fbb| {
        let name = fbb.create_string(name);
        let salt = fbb.create_vector(&c.salt);
        let stored = fbb.create_vector(&c.stored_key);
        let server = fbb.create_vector(&c.server_key);
        fb::CreateUserRequest::create(
            fbb,
            &fb::CreateUserRequestArgs {
                name: Some(name),
                salt: Some(salt),
                iterations: c.iterations,
                stored_key: Some(stored),
                server_key: Some(server),
                replace: false,
            },
        )
        .as_union_value()
    })
}

fn answer_code(s: &mut TcpStream, buf: &mut Vec<u8>, frame: &[u8]) -> ErrorCode {
    s.write_all(frame).unwrap();
    let h = raw::read_header(s, buf).expect("an answer");
    ErrorCode::from_u16(frame::decode_response(&h).unwrap().error_code())
}

/// Every request kind but the exchange itself, sent first on a
/// connection to a broker with auth on, is refused with
/// AuthenticationRequired and the connection closed.
#[test]
fn every_request_kind_before_authentication_is_refused_and_closed() {
    let b = secure_broker();
    let mut kinds = 0;
    for tag in 1..=fb::RequestBody::ENUM_MAX {
        let kind = fb::RequestBody(tag);
        if kind == fb::RequestBody::SaslAuthenticateRequest {
            continue;
        }
        let mut s = connect(b.port);
        let mut buf = Vec::new();
        // An empty table is a valid body of every kind.
        let f = raw::request(7, kind, |fbb: &mut FlatBufferBuilder<'static>| {
            let t = fbb.start_table();
            fbb.end_table(t).as_union_value()
        });
        let code = answer_code(&mut s, &mut buf, &f);
        assert_eq!(code, ErrorCode::AuthenticationRequired, "{kind:?}");
        assert!(
            closed(&mut s, &mut buf),
            "{kind:?} left the connection open"
        );
        kinds += 1;
    }
    assert!(kinds >= 23, "{kinds}");
    // A shard port refuses too.
    let mut s = connect(b.port + 1);
    let mut buf = Vec::new();
    assert_eq!(
        answer_code(&mut s, &mut buf, &produce_frame(1, "t")),
        ErrorCode::AuthenticationRequired
    );
}

/// Wrong passwords, unknown users, truncated and malformed messages and a
/// client-final replayed from another exchange are refused with
/// AuthenticationFailed and the connection closed; failures are counted;
/// the right password works and the broker proves it knows it.
#[test]
fn bad_scram_exchanges_are_refused_and_closed() {
    let b = secure_broker();
    let port = b.port;
    let first_step = |user: &str, pw: &str| {
        let mut s = connect(port);
        let mut buf = Vec::new();
        let (c, first) = ScramClient::new(user, pw).unwrap();
        let (code, server_first) = exchange(
            &mut s,
            &mut buf,
            &sasl_frame(1, Some("SCRAM-SHA-256"), first.as_bytes()),
        );
        assert_eq!(code, ErrorCode::None);
        (s, buf, c, server_first)
    };
    // Wrong password; unknown user (answered alike until the proof).
    for (user, pw) in [("admin", "wrong"), ("nobody", "x")] {
        let (mut s, mut buf, c, server_first) = first_step(user, pw);
        let (_, client_final) = c.server_first(&server_first).unwrap();
        let (code, _) = exchange(
            &mut s,
            &mut buf,
            &sasl_frame(2, None, client_final.as_bytes()),
        );
        assert_eq!(code, ErrorCode::AuthenticationFailed, "{user}");
        assert!(closed(&mut s, &mut buf));
    }
    // Truncated client-first, client-final cut short, another mechanism.
    let mut s = connect(port);
    let mut buf = Vec::new();
    let (code, _) = exchange(
        &mut s,
        &mut buf,
        &sasl_frame(1, Some("SCRAM-SHA-256"), b"n,,n=admin"),
    );
    assert_eq!(code, ErrorCode::AuthenticationFailed);
    assert!(closed(&mut s, &mut buf));
    let (mut s, mut buf, c, server_first) = first_step("admin", ADMIN_PW);
    let (_, client_final) = c.server_first(&server_first).unwrap();
    let cut = &client_final.as_bytes()[..client_final.len() - 10];
    let (code, _) = exchange(&mut s, &mut buf, &sasl_frame(2, None, cut));
    assert_eq!(code, ErrorCode::AuthenticationFailed);
    assert!(closed(&mut s, &mut buf));
    let mut s = connect(port);
    let mut buf = Vec::new();
    let (code, _) = exchange(
        &mut s,
        &mut buf,
        &sasl_frame(1, Some("PLAIN"), b"\0admin\0x"),
    );
    assert_eq!(code, ErrorCode::AuthenticationFailed);
    assert!(closed(&mut s, &mut buf));
    // Garbage bytes as the first message.
    let mut s = connect(port);
    let mut buf = Vec::new();
    let (code, _) = exchange(
        &mut s,
        &mut buf,
        &sasl_frame(1, Some("SCRAM-SHA-256"), &[0xff; 300]),
    );
    assert_eq!(code, ErrorCode::AuthenticationFailed);
    // Replay: a client-final that succeeded once, sent in a new exchange.
    let (_ok, _, old_final) = authenticated(port, "admin", ADMIN_PW);
    let (mut s, mut buf, _, _) = first_step("admin", ADMIN_PW);
    let (code, _) = exchange(&mut s, &mut buf, &sasl_frame(2, None, old_final.as_bytes()));
    assert_eq!(code, ErrorCode::AuthenticationFailed);
    assert!(closed(&mut s, &mut buf));
    // The right password still works, and the broker serves afterwards.
    let (mut s, mut buf, _) = authenticated(port, "admin", ADMIN_PW);
    let meta = raw::request(3, fb::RequestBody::MetadataRequest, |fbb| {
        fb::MetadataRequest::create(fbb, &fb::MetadataRequestArgs { topics: None }).as_union_value()
    });
    assert_eq!(answer_code(&mut s, &mut buf, &meta), ErrorCode::None);
    // The failures were counted.
    rt().block_on(async {
        let c = client(&b.addr(), "admin", ADMIN_PW).await;
        let m = c.metrics().await.unwrap();
        let failures = m
            .iter()
            .find(|(k, _)| k == "auth_failures")
            .map_or(0, |(_, v)| *v);
        assert!(failures >= 7, "auth_failures = {failures}");
    });
    // No secret in the log.
    assert!(!b.log_text().contains(ADMIN_PW));
    // A SCRAM message parser fed the broker's own first message fails
    // cleanly (not a broker test, a sanity check of the test's helper).
    assert!(ClientFirst::parse(b"r=x").is_err());
}

/// A user may produce to the topic its ACL names and not to another; an
/// ACL added or removed takes effect on a connection already open; lists
/// show only what the user may describe; the client library and its
/// admin calls work through authentication.
#[test]
fn acls_allow_per_topic_and_changes_reach_open_connections() {
    let b = secure_broker();
    let addr = b.addr();
    rt().block_on(async {
        let admin = client(&addr, "admin", ADMIN_PW).await;
        admin
            .create_topic(&NewTopic::new("orders", 1))
            .await
            .unwrap();
        admin
            .create_topic(&NewTopic::new("audit", 1))
            .await
            .unwrap();
        admin.create_user("alice", "alice-pw", false).await.unwrap();
        let e = admin.create_user("alice", "x", false).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::UserExists));
        let audit = Acl {
            principal: "alice".into(),
            resource: AclResource::Topic("audit".into()),
            operation: AclOperation::Produce,
        };
        admin.add_acl(&audit).await.unwrap();
        let users: Vec<String> = admin
            .list_users()
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.name)
            .collect();
        assert_eq!(users, ["admin", "alice"]);
        assert_eq!(
            admin.list_acls(Some("alice")).await.unwrap(),
            vec![audit.clone()]
        );

        let (mut s, mut buf, _) = authenticated(b.port, "alice", "alice-pw");
        assert_eq!(
            answer_code(&mut s, &mut buf, &produce_frame(1, "audit")),
            ErrorCode::None
        );
        assert_eq!(
            answer_code(&mut s, &mut buf, &produce_frame(2, "orders")),
            ErrorCode::AuthorizationFailed
        );
        // Consuming needs `consume`; produce on a topic does not give it.
        let fetch = raw::request(9, fb::RequestBody::FetchRequest, |fbb| {
            let t = fbb.create_string("audit");
            fb::FetchRequest::create(
                fbb,
                &fb::FetchRequestArgs {
                    topic: Some(t),
                    replica_id: -1,
                    max_bytes: 1024,
                    ..Default::default()
                },
            )
            .as_union_value()
        });
        assert_eq!(
            answer_code(&mut s, &mut buf, &fetch),
            ErrorCode::AuthorizationFailed
        );
        assert_eq!(
            answer_code(&mut s, &mut buf, &raw::subscribe(10, "audit", 1024)),
            ErrorCode::AuthorizationFailed
        );
        // A group needs `consume` on the group and its topics.
        let join = raw::request(11, fb::RequestBody::GroupHeartbeatRequest, |fbb| {
            let g = fbb.create_string("g1");
            let t = fbb.create_string("audit");
            let topics = fbb.create_vector(&[t]);
            fb::GroupHeartbeatRequest::create(
                fbb,
                &fb::GroupHeartbeatRequestArgs {
                    group: Some(g),
                    topics: Some(topics),
                    ..Default::default()
                },
            )
            .as_union_value()
        });
        assert_eq!(
            answer_code(&mut s, &mut buf, &join),
            ErrorCode::AuthorizationFailed
        );
        // Refused, not closed: the connection still serves.
        assert_eq!(
            answer_code(&mut s, &mut buf, &produce_frame(3, "audit")),
            ErrorCode::None
        );
        // Alice may not administer.
        let alice = client(&addr, "alice", "alice-pw").await;
        let e = alice.create_user("mallory", "x", false).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::AuthorizationFailed));
        let e = alice.metrics().await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::AuthorizationFailed));
        let e = alice.delete_topic("orders").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::AuthorizationFailed));
        let topics: BTreeSet<String> = alice
            .list_topics()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .filter(|n| !n.starts_with("__"))
            .collect();
        assert_eq!(topics, BTreeSet::from(["audit".to_string()]));

        let orders = Acl {
            resource: AclResource::TopicPrefix("ord".into()),
            ..audit.clone()
        };
        admin.add_acl(&orders).await.unwrap();
        assert_eq!(
            answer_code(&mut s, &mut buf, &produce_frame(4, "orders")),
            ErrorCode::None,
            "an ACL added applies to the open connection"
        );
        admin.remove_acl(&orders).await.unwrap();
        assert_eq!(
            answer_code(&mut s, &mut buf, &produce_frame(5, "orders")),
            ErrorCode::AuthorizationFailed,
            "an ACL removed applies to the open connection"
        );
        // Replica fetches and group checkpoints are for brokers only.
        let replica_fetch = raw::request(7, fb::RequestBody::FetchRequest, |fbb| {
            let t = fbb.create_string("audit");
            fb::FetchRequest::create(
                fbb,
                &fb::FetchRequestArgs {
                    topic: Some(t),
                    replica_id: 2,
                    ..Default::default()
                },
            )
            .as_union_value()
        });
        assert_eq!(
            answer_code(&mut s, &mut buf, &replica_fetch),
            ErrorCode::AuthorizationFailed
        );
        let checkpoint = raw::request(8, fb::RequestBody::GroupCheckpointRequest, |fbb| {
            fb::GroupCheckpointRequest::create(fbb, &fb::GroupCheckpointRequestArgs::default())
                .as_union_value()
        });
        assert_eq!(
            answer_code(&mut s, &mut buf, &checkpoint),
            ErrorCode::AuthorizationFailed
        );
        // A deleted user's open connection may do nothing more.
        admin.delete_user("alice").await.unwrap();
        assert_eq!(
            answer_code(&mut s, &mut buf, &produce_frame(6, "audit")),
            ErrorCode::AuthorizationFailed
        );
    });
}

fn cli(addr: &str, args: &[&str], env: &[(&str, &str)], stdin: &str) -> (bool, String, String) {
    let mut child = std::process::Command::new(shoal_bin())
        .args(["--broker", addr])
        .args(args)
        .env("SHOAL_DISCOVERY_CACHE", "off")
        .env_remove("SHOAL_USER")
        .env_remove("SHOAL_PASSWORD")
        .env_remove("SHOAL_NEW_PASSWORD")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `shoal user` and `shoal acl` manage users and rules (password from
/// stdin, `--user` with `SHOAL_PASSWORD`, or a credentials file); without
/// credentials the CLI gets a clear refusal. The store survives a restart
/// and holds no password.
#[test]
fn user_and_acl_commands_and_a_restart() {
    let mut b = secure_broker();
    let addr = b.addr();
    let admin = [("SHOAL_PASSWORD", ADMIN_PW)];
    let (ok, _, err) = cli(&addr, &["topic", "list"], &[], "");
    assert!(!ok);
    assert!(err.contains("AuthenticationRequired"), "{err}");
    let (ok, _, err) = cli(
        &addr,
        &["--user", "admin", "topic", "list"],
        &[("SHOAL_PASSWORD", "nope")],
        "",
    );
    assert!(!ok);
    assert!(err.contains("AuthenticationFailed"), "{err}");
    let (ok, _, err) = cli(
        &addr,
        &["--user", "admin", "user", "create", "bob"],
        &admin,
        "bob-pw\n",
    );
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&addr, &["--user", "admin", "user", "list"], &admin, "");
    assert!(ok, "{err}");
    assert!(out.contains("bob\tSCRAM-SHA-256"), "{out}");
    let acl = [
        "acl",
        "add",
        "--principal",
        "bob",
        "--topic-prefix",
        "bob.",
        "--operation",
        "admin",
    ];
    let (ok, _, err) = cli(
        &addr,
        &[&["--user", "admin"][..], &acl].concat(),
        &admin,
        "",
    );
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&addr, &["--user", "admin", "acl", "list"], &admin, "");
    assert!(ok);
    assert!(out.contains("bob admin topic-prefix bob."), "{out}");
    let (ok, _, err) = cli(
        &addr,
        &[
            "acl",
            "add",
            "--principal",
            "bob",
            "--topic",
            "x",
            "--operation",
            "write",
        ],
        &admin,
        "",
    );
    assert!(!ok && err.contains("unknown operation"), "{err}");
    // bob, from a credentials file, may create topics under his prefix only.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bob.creds");
    std::fs::write(&file, "# bob\nuser = bob\npassword = \"bob-pw\"\n").unwrap();
    let f = file.to_str().unwrap();
    let (ok, _, err) = cli(
        &addr,
        &["--credentials-file", f, "topic", "create", "bob.t"],
        &[],
        "",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = cli(
        &addr,
        &["--credentials-file", f, "topic", "create", "other"],
        &[],
        "",
    );
    assert!(!ok && err.contains("AuthorizationFailed"), "{err}");
    // The new password comes from SHOAL_NEW_PASSWORD as well.
    let (ok, _, err) = cli(
        &addr,
        &["--user", "admin", "user", "create", "carol"],
        &[
            ("SHOAL_PASSWORD", ADMIN_PW),
            ("SHOAL_NEW_PASSWORD", "carol-pw"),
        ],
        "",
    );
    assert!(ok, "{err}");
    // The store: no password in it, only readable by the broker's user.
    let store = b.data_dir().join("security.json");
    let text = std::fs::read_to_string(&store).unwrap();
    for pw in [ADMIN_PW, "bob-pw", "carol-pw"] {
        assert!(!text.contains(pw));
    }
    assert!(b.terminate(), "a clean stop");
    b.restart();
    let (ok, out, err) = cli(&addr, &["--credentials-file", f, "topic", "list"], &[], "");
    assert!(ok, "{err}");
    assert!(out.contains("bob.t"), "{out}");
    let (ok, _, err) = cli(
        &addr,
        &["--user", "admin", "user", "delete", "bob"],
        &admin,
        "",
    );
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&addr, &["--credentials-file", f, "topic", "list"], &[], "");
    assert!(
        !ok,
        "a deleted user cannot log in: {out} {err}\n{}",
        b.log_text()
    );
}

/// With auth on and no user yet, a broker refuses to start without the
/// superuser's password, saying where it goes; auth off stays the default.
#[test]
fn first_start_with_auth_needs_the_admin_password() {
    let (ok, log, _) = Broker::run_to_exit(
        "0",
        &["--auth", "--superuser", "admin"],
        Duration::from_secs(20),
    );
    assert!(!ok);
    assert!(log.contains("SHOAL_ADMIN_PASSWORD"), "{log}");
    let (ok, log, _) = Broker::run_to_exit("0", &["--auth"], Duration::from_secs(20));
    assert!(!ok);
    assert!(log.contains("--superuser"), "{log}");
    // Auth off: no credentials needed, and a client that brings some is
    // told authentication is off.
    let b = Broker::start("0");
    let (ok, _, err) = cli(&b.addr(), &["topic", "list"], &[], "");
    assert!(ok, "{err}");
    let (ok, _, err) = cli(
        &b.addr(),
        &["--user", "admin", "topic", "list"],
        &[("SHOAL_PASSWORD", "x")],
        "",
    );
    assert!(!ok && err.contains("authentication is off"), "{err}");
}

/// Three brokers with auth on (an inter-broker user, users and ACLs in
/// ZooKeeper): a user created through broker 1 logs in at broker 3, its
/// ACL applies there; acks=all records survive a kill -9 of the leader
/// (the followers replicate as the inter-broker user).
#[test]
fn a_cluster_with_auth_replicates_and_survives_its_leaders_kill() {
    let zk = ZooKeeper::start();
    let toml = "zk_session_timeout_ms = 1500\ninter_broker_user = \"broker\"\n";
    let env = [
        ("SHOAL_ADMIN_PASSWORD", ADMIN_PW),
        ("SHOAL_INTER_BROKER_PASSWORD", "broker-secret"),
    ];
    let mut brokers = shoal_tests::three_auth_brokers(&zk, toml, &env);
    let addrs: Vec<String> = brokers.iter().map(Broker::addr).collect();
    rt().block_on(async {
        let admin = Client::connect_with_config(&addrs[0], cluster_config("admin", ADMIN_PW))
            .await
            .unwrap();
        shoal_tests::create_replicated_topic(&admin, "safe", Duration::from_secs(20)).await;
        admin.create_user("alice", "alice-pw", false).await.unwrap();
        admin
            .add_acl(&Acl {
                principal: "alice".into(),
                resource: AclResource::Topic("safe".into()),
                operation: AclOperation::Consume,
            })
            .await
            .unwrap();
        // A create sent again (a client retrying after ClusterUnavailable,
        // when ZooKeeper lost the answer to a create that happened) is
        // done, not UserExists; another credential for the name is.
        let port: u16 = addrs[1].rsplit(':').next().unwrap().parse().unwrap();
        let (mut s, mut buf, _) = authenticated(port, "admin", ADMIN_PW);
        let bob = shoal_wire::scram::Credential::generate("bob-pw", 4096).unwrap();
        for corr in [10, 11] {
            let code = answer_code(&mut s, &mut buf, &create_user_frame(corr, "bob", &bob));
            assert_eq!(code, ErrorCode::None, "create {corr}");
        }
        let other = shoal_wire::scram::Credential::generate("bob-pw", 4096).unwrap();
        let code = answer_code(&mut s, &mut buf, &create_user_frame(12, "bob", &other));
        assert_eq!(code, ErrorCode::UserExists);
        // Broker 3 learns of alice through ZooKeeper.
        let deadline = Instant::now() + Duration::from_secs(15);
        let alice = loop {
            match Client::connect_with_config(&addrs[2], cluster_config("alice", "alice-pw")).await
            {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("alice at broker 3: {e}"),
            }
        };
        let e = alice
            .create_topic(&NewTopic::new("nope", 1))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::AuthorizationFailed));

        shoal_tests::acks_all_records_survive_the_leaders_kill(
            &mut brokers,
            &addrs,
            "safe",
            cluster_config("admin", ADMIN_PW),
            cluster_config("alice", "alice-pw"),
        )
        .await;
    });
    for b in &brokers {
        assert!(!b.log_text().contains("broker-secret"));
        assert!(!b.log_text().contains(ADMIN_PW));
    }
}
