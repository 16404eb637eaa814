//! The broker's inner boundaries against a real `shoal` process: produces
//! that cross between cores keep their order, a request is appended whole
//! or not at all, and frames that never finish commit no memory and are
//! closed after `request_timeout_ms` while normal clients are served.

use shoal_client::connection::Connection;
use shoal_client::{Client, Consumer, ConsumerConfig, NewTopic, StartAt};
use shoal_tests::raw::{self, read_header};
use shoal_tests::Broker;
use shoal_wire::frame;
use shoal_wire::{fb, ErrorCode};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn batch(producer_id: i64, first_seq: i32, n: usize, size: usize) -> Vec<u8> {
    raw::batch(producer_id, first_seq, n, size)
}

fn produce_frame(corr: u32, topic: &str, partition: u32, payload: &[u8]) -> Vec<u8> {
    raw::request_with(
        corr,
        fb::RequestBody::ProduceRequest,
        |fbb| {
            let t = fbb.create_string(topic);
            fb::ProduceRequest::create(
                fbb,
                &fb::ProduceRequestArgs {
                    topic_id: 0,
                    topic: Some(t),
                    partition,
                    acks: fb::Acks::Leader,
                    timeout_ms: 30_000,
                },
            )
            .as_union_value()
        },
        payload,
    )
}

/// The shard that owns `topic`/`partition`, and one that does not.
async fn owner_and_other(client: &Client, topic: &str, partition: u32) -> (u16, u16) {
    let t = client.describe_topic(topic).await.unwrap();
    let owner = t.partitions[partition as usize].shard;
    (owner, 1 - owner)
}

/// Produces sent to a shard that does not own the partition cross the mesh
/// to its owner. Pipelined on one connection, alternating large batches
/// (which wait for write-buffer space) with small ones (which would fit at
/// once), they must still be appended in request order: every idempotent
/// sequence is accepted and the log holds the records in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_core_produces_keep_their_order() {
    if shoal_tests::two_shards() != "0,1" {
        eprintln!("skipped: needs two cores");
        return;
    }
    let broker = Broker::start("0,1");
    let client = Client::connect(&broker.addr()).await.unwrap();
    let mut t = NewTopic::new("ordered", 1);
    t.sync = Some("always".into());
    client.create_topic(&t).await.unwrap();
    let (_, other) = owner_and_other(&client, "ordered", 0).await;
    let addr: SocketAddr = format!("127.0.0.1:{}", broker.port + 1 + other)
        .parse()
        .unwrap();

    let requests: u32 = std::env::var("SHOAL_TEST_ORDER_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96);
    let producer_id = 4242;
    let mut frames = Vec::new();
    let mut seq = 0i32;
    let mut expected_records = 0u64;
    for corr in 1..=requests {
        // 1000 records of 1000 bytes (~1 MB), then 1 small record.
        let (n, size) = if corr % 2 == 1 { (1000, 1000) } else { (1, 10) };
        frames.push(produce_frame(
            corr,
            "ordered",
            0,
            &batch(producer_id, seq, n, size),
        ));
        seq += n as i32;
        expected_records += n as u64;
    }
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for f in frames {
            w.write_all(&f).unwrap();
        }
    });
    let mut buf = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..requests {
        let Some(h) = read_header(&mut s, &mut buf) else {
            panic!("connection closed; broker log:\n{}", broker.log_text());
        };
        let r = frame::decode_response(&h).unwrap();
        if r.error_code() != 0 {
            errors.push((
                r.correlation_id(),
                ErrorCode::from_u16(r.error_code()),
                r.error_message().unwrap_or("").to_string(),
            ));
        }
    }
    writer.join().unwrap();
    assert!(errors.is_empty(), "produces refused: {errors:?}");

    // The log holds every record once, in sequence order.
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer
        .assign("ordered", 0, StartAt::Beginning)
        .await
        .unwrap();
    let mut next = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while next < expected_records && Instant::now() < deadline {
        for r in consumer.poll().await.unwrap() {
            let v = r.value.expect("a value");
            let got: u64 = std::str::from_utf8(&v[..10]).unwrap().parse().unwrap();
            assert_eq!(got, next, "record {} out of order", r.offset);
            next += 1;
        }
    }
    assert_eq!(next, expected_records);
}

/// A produce whose second batch is corrupt is refused whole: the first,
/// valid batch is not appended either, and the partition keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_with_a_bad_batch_appends_nothing() {
    let broker = Broker::start(shoal_tests::two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("whole", 1))
        .await
        .unwrap();
    let conn = Connection::connect(broker.addr().parse().unwrap(), "test")
        .await
        .unwrap();
    let mut payload = batch(-1, -1, 3, 10);
    let mut bad = batch(-1, -1, 2, 10);
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    payload.extend_from_slice(&bad);
    let e = shoal_client::produce_batches(&conn, "whole", 0, shoal_client::Acks::Leader, &payload)
        .await
        .expect_err("a corrupt batch must refuse the request");
    let t = client.describe_topic("whole").await.unwrap();
    assert_eq!(t.partitions[0].high_watermark, 0, "nothing appended");
    match e {
        shoal_client::Error::Broker { code, message } => {
            assert_eq!(code, ErrorCode::CorruptBatch, "{message}");
            assert!(message.contains("batch 1"), "{message}");
        }
        other => panic!("unexpected error {other}"),
    }

    // Two valid batches in one request: both appended.
    let mut good = batch(-1, -1, 3, 10);
    good.extend_from_slice(&batch(-1, -1, 2, 10));
    let p = shoal_client::produce_batches(&conn, "whole", 0, shoal_client::Acks::Leader, &good)
        .await
        .unwrap();
    assert_eq!((p.base_offset, p.last_offset), (0, 4));
}

/// Connections that announce an 8 MiB frame and send 1 KiB of it commit
/// memory for what arrived, not for what was announced; they are closed
/// after `request_timeout_ms`; a normal client is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_frames_commit_no_memory_and_time_out() {
    let conns: usize = std::env::var("SHOAL_TEST_PARTIAL_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let broker =
        Broker::start_with_config(shoal_tests::two_shards(), "request_timeout_ms = 3000\n");
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("served", 1))
        .await
        .unwrap();
    let conn = Connection::connect(broker.addr().parse().unwrap(), "test")
        .await
        .unwrap();
    let rss_before = broker.rss_bytes().expect("broker RSS");
    let started = Instant::now();
    let mut hostile = Vec::with_capacity(conns);
    let head = frame::prefix(1024, 8 * 1024 * 1024 - 1024 - frame::FRAME_PREFIX_BYTES);
    for _ in 0..conns {
        let mut s = TcpStream::connect(broker.addr()).unwrap();
        s.write_all(&head).unwrap();
        s.write_all(&[7u8; 1024]).unwrap();
        hostile.push(s);
    }
    // The normal client is served while they hang.
    for i in 0..5 {
        let p = shoal_client::produce_batches(
            &conn,
            "served",
            0,
            shoal_client::Acks::Leader,
            &batch(-1, -1, 1, 10),
        )
        .await
        .unwrap();
        assert_eq!(p.base_offset, i);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_during = broker.rss_bytes().expect("broker RSS");
    let grown = rss_during.saturating_sub(rss_before);
    println!(
        "{conns} connections each announcing 8 MiB and sending 1 KiB: broker RSS grew by {} MiB ({} KiB per connection)",
        grown >> 20,
        grown / 1024 / conns as u64
    );
    assert!(
        grown < conns as u64 * 128 * 1024,
        "RSS grew by {grown} bytes for {conns} partial frames"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "setup too slow for the timeout check"
    );

    // All are closed after the timeout, with a Timeout error frame.
    let mut timed_out = 0;
    for s in &mut hostile {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        if let Some(h) = read_header(s, &mut buf) {
            let r = frame::decode_response(&h).unwrap();
            assert_eq!(ErrorCode::from_u16(r.error_code()), ErrorCode::Timeout);
            timed_out += 1;
        }
        let mut b = [0u8; 1];
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)), "closed");
    }
    assert!(
        timed_out > conns * 9 / 10,
        "{timed_out} of {conns} got a Timeout frame"
    );
    let m: std::collections::HashMap<String, u64> =
        client.metrics().await.unwrap().into_iter().collect();
    assert_eq!(m["request_timeouts"], conns as u64);
    assert_eq!(m["recv_buffer_bytes"], 0);
    // And the broker still serves.
    let p = shoal_client::produce_batches(
        &conn,
        "served",
        0,
        shoal_client::Acks::Leader,
        &batch(-1, -1, 1, 10),
    )
    .await
    .unwrap();
    assert_eq!(p.base_offset, 5);
}
