//! What a hostile or careless client does to a real `shoal` process (issue
//! 9): each situation ends in a clear error and a broker that keeps
//! serving everything else.

use flatbuffers::FlatBufferBuilder;
use shoal_client::connection::Connection;
use shoal_client::{Client, Consumer, ConsumerConfig, NewTopic, StartAt};
use shoal_tests::Broker;
use shoal_wire::frame::{self, Check};
use shoal_wire::{fb, BatchBuilder, ErrorCode, NewRecord};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn request(
    corr: u32,
    body_type: fb::RequestBody,
    build: impl FnOnce(
        &mut FlatBufferBuilder<'static>,
    ) -> flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>,
) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let body = build(&mut fbb);
    let req = fb::Request::create(
        &mut fbb,
        &fb::RequestArgs {
            version: 1,
            correlation_id: corr,
            client_id: None,
            body_type,
            body: Some(body),
        },
    );
    fbb.finish(req, None);
    let mut out = Vec::new();
    frame::write_frame(&mut out, fbb.finished_data(), &[]);
    out
}

/// Reads one frame's header; `None` if the connection closed first.
fn read_header(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Check::Complete(p)) = frame::check_response(&buf) {
            return Some(buf[p.header].to_vec());
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn batch_of(n: usize, size: usize) -> Vec<u8> {
    let mut b = BatchBuilder::default();
    let value = vec![b'v'; size];
    for _ in 0..n {
        b.push(&NewRecord {
            key: None,
            value: Some(&value),
            timestamp_ms: 1,
            headers: &[],
        })
        .expect("record fits");
    }
    b.finish(-1, 0, -1)
}

async fn metrics(client: &Client) -> HashMap<String, u64> {
    client.metrics().await.unwrap().into_iter().collect()
}

/// At `connections_max` a new connection is told why (TooManyConnections)
/// before it is closed, and the connections already open keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_told_why() {
    let broker = Broker::start_with_config("0", "connections_max = 2\n");
    let client = Client::connect(&broker.addr()).await.unwrap();
    let second = TcpStream::connect(broker.addr()).unwrap();
    // Both slots are taken once the broker has accepted the second.
    std::thread::sleep(Duration::from_millis(200));
    let mut third = TcpStream::connect(broker.addr()).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let h = read_header(&mut third).expect("an error frame before the close");
    let r = frame::decode_response(&h).unwrap();
    assert_eq!(
        ErrorCode::from_u16(r.error_code()),
        ErrorCode::TooManyConnections,
        "{:?}",
        r.error_message()
    );
    assert!(r.error_message().unwrap_or("").contains("limit"));
    let mut b = [0u8; 1];
    assert!(matches!(third.read(&mut b), Ok(0) | Err(_)), "closed");
    drop(second);
    let m = metrics(&client).await;
    assert!(m["connections_refused"] >= 1);
}

/// A subscriber that stops reading its socket is disconnected after
/// `slow_consumer_timeout_ms` (metric, log line), while another consumer of
/// the same partition reads everything meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_consumer_is_disconnected_and_slows_no_one() {
    let broker = Broker::start_with_config(
        shoal_tests::two_shards(),
        "slow_consumer_timeout_ms = 1500\n",
    );
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("flood", 1))
        .await
        .unwrap();
    // The stalled subscriber: subscribes with plenty of credit, reads the
    // answer, then never reads again.
    let mut stalled = TcpStream::connect(broker.addr()).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stalled
        .write_all(&request(1, fb::RequestBody::SubscribeRequest, |fbb| {
            let t = fbb.create_string("flood");
            fb::SubscribeRequest::create(
                fbb,
                &fb::SubscribeRequestArgs {
                    topic: Some(t),
                    partition: 0,
                    offset: 0,
                    credit_bytes: 1 << 40,
                },
            )
            .as_union_value()
        }))
        .unwrap();
    let h = read_header(&mut stalled).expect("subscribe response");
    assert_eq!(frame::decode_response(&h).unwrap().error_code(), 0);

    // 64 MiB through the partition; a healthy consumer reads all of it.
    let conn = Connection::connect(broker.addr().parse().unwrap(), "test")
        .await
        .unwrap();
    let batch = batch_of(1000, 1000);
    let batches = 64u64;
    let mut healthy = Consumer::new(client.clone(), ConsumerConfig::default());
    healthy
        .assign("flood", 0, StartAt::Beginning)
        .await
        .unwrap();
    let started = Instant::now();
    for _ in 0..batches {
        shoal_client::produce_batches(&conn, "flood", 0, shoal_client::Acks::Leader, &batch)
            .await
            .unwrap();
    }
    let mut read = 0u64;
    while read < batches * 1000 {
        read += healthy.poll().await.unwrap().len() as u64;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "healthy consumer starved"
        );
    }

    // The stalled one is closed within the timeout (plus a sweep).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = metrics(&client).await;
        if m["slow_consumers_closed"] >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "stalled consumer never closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What it had buffered drains, then the stream ends.
    let mut sink = vec![0u8; 1 << 20];
    let mut drained = 0usize;
    loop {
        match stalled.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    assert!(drained < 64 << 20, "the broker stopped sending to it");
    assert!(broker.log_text().contains("slow consumers"));
}
