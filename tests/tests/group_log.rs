//! The group coordinator over the raw protocol, against the real broker:
//! membership and assignment (no partition held by two members), commits
//! fenced by member epochs, session expiry, bad input, and the metadata
//! log: acknowledged commits survive kill -9, and checkpoints let the log
//! before them go.

use shoal_tests::groupraw::*;
use shoal_tests::meta::{self, try_call};
use shoal_tests::{eventually, raw, Broker};
use shoal_wire::fb;
use shoal_wire::group::GROUPS_TOPIC;
use std::collections::BTreeMap;
use std::time::Duration;

#[test]
fn members_share_partitions_and_commits_are_fenced() {
    let b = Broker::start("0,1");
    let port = b.port;
    create(port, "t", 6);
    let g = "orders";
    let a = join(port, g, "t", 2000);
    assert_eq!(a.assignment.len(), 6, "a lone member gets every partition");
    let all: Vec<(&str, u32, i64)> = (0..6).map(|p| ("t", p, 10 + i64::from(p))).collect();
    assert_eq!(commit(port, g, &a.member_id, a.epoch, &all).0, 0);
    let got = fetch_offsets(port, g);
    assert_eq!(got.len(), 6);
    assert_eq!(got[&("t".to_string(), 5)], 15);

    // b joins: it gets nothing until a lets go of half.
    let bm = join(port, g, "t", 2000);
    assert!(bm.assignment.is_empty(), "b waits while a holds everything");
    let a2 = again(port, g, &a, &a.assignment).expect("a heartbeats");
    assert_eq!(a2.assignment.len(), 3);
    let given_up: Vec<(String, u32)> = a.assignment.difference(&a2.assignment).cloned().collect();
    // a commits what it gives up, then reports it released it.
    let offs: Vec<(&str, u32, i64)> = given_up
        .iter()
        .map(|(t, p)| (t.as_str(), *p, 100))
        .collect();
    assert_eq!(commit(port, g, &a.member_id, a2.epoch, &offs).0, 0);
    let b2 = again(port, g, &bm, &Tps::new()).expect("b heartbeats");
    assert!(b2.assignment.is_empty(), "a has not released them yet");
    let a3 = again(port, g, &a2, &a2.assignment).expect("a releases");
    let b3 = again(port, g, &b2, &Tps::new()).expect("b heartbeats");
    assert_eq!(b3.assignment, given_up.iter().cloned().collect::<Tps>());
    assert!(a3.assignment.is_disjoint(&b3.assignment));
    // a can no longer commit them: the partition is b's (42).
    let (code, msg) = commit(port, g, &a.member_id, a3.epoch, &offs);
    assert_eq!(code, 42, "a fenced: {msg}");
    assert_eq!(commit(port, g, &bm.member_id, b3.epoch, &offs).0, 0);
    // Nor with a stale epoch for one it still has... with b's old epoch b
    // cannot commit what it got later.
    assert_eq!(commit(port, g, &bm.member_id, b2.epoch, &offs).0, 42);
    // A stranger, a commit from outside while members exist.
    assert_eq!(commit(port, g, "nobody", 1, &offs).0, 41);
    assert_eq!(commit(port, g, "", -1, &offs).0, 44);
    let (state, members) = describe(port, g).2.expect("described");
    assert_eq!((state.as_str(), members), ("stable", 2));

    // b stops heartbeating: after its 2 s session a gets everything back.
    let t0 = std::time::Instant::now();
    let mut cur = a3;
    eventually(Duration::from_secs(10), "a takes b's partitions", || {
        let held = cur.assignment.clone();
        cur = again(port, g, &cur, &held).expect("a heartbeats");
        cur.assignment.len() == 6
    });
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "not before b's session ran out"
    );
    // b is gone.
    let (code, _) = again(port, g, &b3, &b3.assignment)
        .err()
        .expect("b is unknown");
    assert_eq!(code, 41);
    // a leaves cleanly: the group is empty, offsets stay, resets allowed.
    let left = beat(port, g, || {
        heartbeat_frame(g, &cur.member_id, -1, None, None, 0, None)
    })
    .expect("leave");
    assert_eq!(left.epoch, -1);
    assert_eq!(
        describe(port, g).2.expect("described"),
        ("empty".to_string(), 0)
    );
    assert_eq!(commit(port, g, "", -1, &[("t", 0, 0)]).0, 0);
    assert_eq!(fetch_offsets(port, g)[&("t".to_string(), 0)], 0);
    assert!(b.log_text().contains("group coordinator loaded"));
    // The counters moved with it (summed over shards).
    let m = metrics(port);
    assert!(m["group_joins"] >= 2, "{m:?}");
    assert!(m["group_leaves"] >= 1, "{m:?}");
    assert!(m["group_sessions_expired"] >= 1, "{m:?}");
    assert!(m["group_offset_commits"] >= 13, "{m:?}");
}

/// `shoal metrics` counters over the raw protocol.
fn metrics(port: u16) -> BTreeMap<String, u64> {
    let h = meta::call(
        port,
        raw::request(1, fb::RequestBody::MetricsRequest, |fbb| {
            fb::MetricsRequest::create(fbb, &fb::MetricsRequestArgs {}).as_union_value()
        }),
    );
    let r = flatbuffers::root::<fb::Response>(&h).expect("response");
    let m = r.body_as_metrics_response().expect("metrics body");
    m.metrics()
        .into_iter()
        .flatten()
        .map(|x| (x.name().unwrap_or_default().to_string(), x.value()))
        .collect()
}

#[test]
fn bad_group_requests_get_clear_errors_and_the_broker_keeps_serving() {
    let b = Broker::start("0");
    let port = b.port;
    create(port, "t", 2);
    let g = "g";
    // An unknown group: describe says so; its offsets are empty; a
    // heartbeat from a member it never had is UnknownMemberId.
    let (code, msg, _) = describe(port, "never-seen");
    assert_eq!(code, 45, "{msg}");
    assert!(fetch_offsets(port, "never-seen").is_empty());
    let r = beat(port, g, || {
        heartbeat_frame(g, "ghost", 3, None, None, 0, None)
    });
    assert_eq!(r.err().map(|e| e.0), Some(41));
    // Oversized member metadata, empty and over-long names, a session
    // timeout out of bounds, no topics, an unknown strategy's cousin: a
    // negative offset.
    let big = vec![7u8; 5000];
    let r = beat(port, g, || {
        heartbeat_frame(g, "", 0, Some(&["t"]), None, 3000, Some(&big))
    });
    let (code, msg) = r.err().expect("oversized metadata refused");
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("metadata"), "{msg}");
    let h = try_call(
        port,
        heartbeat_frame("", "", 0, Some(&["t"]), None, 3000, None),
    )
    .expect("answer");
    assert_eq!(
        flatbuffers::root::<fb::Response>(&h)
            .expect("response")
            .error_code(),
        46
    );
    let long = "x".repeat(300);
    let h = try_call(
        port,
        heartbeat_frame(&long, "", 0, Some(&["t"]), None, 3000, None),
    )
    .expect("answer");
    assert_eq!(
        flatbuffers::root::<fb::Response>(&h)
            .expect("response")
            .error_code(),
        46
    );
    let r = beat(port, g, || {
        heartbeat_frame(g, "", 0, Some(&["t"]), None, 1, None)
    });
    assert_eq!(
        r.err().map(|e| e.0),
        Some(14),
        "session timeout out of bounds"
    );
    let r = beat(port, g, || {
        heartbeat_frame(g, "", 0, Some(&[]), None, 3000, None)
    });
    assert_eq!(r.err().map(|e| e.0), Some(14), "no topics");
    let r = beat(port, g, || {
        heartbeat_frame(g, "", 0, Some(&["no/such"]), None, 3000, None)
    });
    assert_eq!(r.err().map(|e| e.0), Some(10), "not a topic name");
    assert_eq!(commit(port, g, "", -1, &[("t", 0, -5)]).0, 2);
    assert_eq!(commit(port, g, "", -1, &[("t", 9, 1)]).0, 12);
    assert_eq!(commit(port, g, "", -1, &[("nope", 0, 1)]).0, 11);
    // The internal topic takes no produce and no delete from clients.
    let h = meta::call(
        port,
        raw::request_with(
            1,
            fb::RequestBody::ProduceRequest,
            |fbb| {
                let t = fbb.create_string(GROUPS_TOPIC);
                fb::ProduceRequest::create(
                    fbb,
                    &fb::ProduceRequestArgs {
                        topic: Some(t),
                        ..Default::default()
                    },
                )
                .as_union_value()
            },
            &raw::batch(-1, -1, 1, 10),
        ),
    );
    assert_eq!(
        flatbuffers::root::<fb::Response>(&h)
            .expect("response")
            .error_code(),
        10
    );
    assert_eq!(meta::create_topic(port, "__shoal_x", 1, 1).0, 10);
    // A group whose state would not fit one record of the group log
    // (256 KiB): the join that would make it so is refused, the group
    // stays as it was. Each member subscribes to 300 topics of ~195 bytes
    // (a request header holds at most 64 KiB).
    let big: Vec<String> = (0..300)
        .map(|i| format!("{}{i:04}", "x".repeat(190)))
        .collect();
    let big: Vec<&str> = big.iter().map(String::as_str).collect();
    let huge = "huge";
    let join_big = || {
        beat(port, huge, || {
            heartbeat_frame(huge, "", 0, Some(&big), None, 3000, None)
        })
    };
    for k in 0..4 {
        let r = join_big();
        assert!(r.is_ok(), "member {k} fits: {:?}", r.err());
    }
    let (code, msg) = join_big().err().expect("a fifth such member is refused");
    assert_eq!(code, 34, "{msg}");
    assert_eq!(
        describe(port, huge).2.map(|d| d.1),
        Some(4),
        "the group kept its four members"
    );
    // Still serving: a good join works, nothing was recorded for the bad.
    let a = join(port, g, "t", 3000);
    assert_eq!(a.assignment.len(), 2);
    assert!(fetch_offsets(port, g).is_empty());
}

#[test]
fn acknowledged_commits_survive_kill9_and_checkpoints_cut_the_log() {
    let toml =
        "group_partitions = 1\ngroup_checkpoint_records = 500\ngroup_segment_bytes = 1048576\n";
    let mut b = Broker::start_with_config("0", toml);
    let port = b.port;
    create(port, "t", 4);
    let g = "stream";
    // A stream of commits with 1 KiB of metadata each (to fill segments),
    // from outside the group; each acknowledged one is remembered.
    let meta_str = "m".repeat(1000);
    let mut acked: BTreeMap<u32, i64> = BTreeMap::new();
    let mut n = 0i64;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while groups_log_starts(port)[0] == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint cut the log"
        );
        n += 1;
        let p = (n % 4) as u32;
        let (code, msg, _) = group_call(port, g, || {
            commit_frame(g, "", -1, &[("t", p, n)], &meta_str)
        });
        assert_eq!(code, 0, "commit {n}: {msg}");
        acked.insert(p, n);
    }
    let dir = b
        .data_dir()
        .join("topics")
        .join(format!("{GROUPS_TOPIC}-0"));
    assert!(
        dir.join("groups.ckpt").exists(),
        "checkpoint in {}",
        dir.display()
    );
    assert!(b.log_text().contains("group checkpoint written"));
    // Kill -9 in the middle of a stream of pipelined commits.
    let to = coordinator_port(port, g).expect("coordinator");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", to)).expect("connect");
    let mut buf = Vec::new();
    let stop_after = 300;
    for i in 0..stop_after {
        n += 1;
        let p = (n % 4) as u32;
        use std::io::Write;
        s.write_all(&commit_frame(g, "", -1, &[("t", p, n)], ""))
            .expect("send");
        if i % 10 == 9 {
            // Read what is answered so far (in order: one per request).
            for _ in 0..10 {
                let h = raw::read_header(&mut s, &mut buf).expect("answer");
                assert_eq!(
                    flatbuffers::root::<fb::Response>(&h)
                        .expect("response")
                        .error_code(),
                    0
                );
            }
            let base = n - 9;
            for k in base..=n {
                acked.insert((k % 4) as u32, k);
            }
        }
        if i == stop_after / 2 {
            b.kill9();
            break;
        }
    }
    b.restart();
    let got = fetch_offsets(port, g);
    for (p, want) in &acked {
        let have = got.get(&("t".to_string(), *p)).copied().unwrap_or(-1);
        assert!(
            have >= *want,
            "partition {p}: acknowledged commit {want} lost (have {have})"
        );
    }
    let text = b.log_text();
    let loaded = text
        .lines()
        .rev()
        .find(|l| l.contains("group coordinator loaded"))
        .expect("loaded line");
    let replayed: i64 = loaded
        .split("records_replayed=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no count in {loaded}"));
    assert!(
        replayed < n,
        "a restart replays only the tail after the checkpoint: {replayed} of {n}"
    );
}
