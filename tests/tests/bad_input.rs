//! Bad input (N1): malformed, oversized and truncated frames, invalid
//! flatbuffers, unknown request types, unknown topics and partitions, bad
//! CRCs, invalid names. Each gets a clear error (or, for broken framing, an
//! error frame and a closed connection); the broker keeps serving and
//! nothing already stored is lost.

use flatbuffers::FlatBufferBuilder;
use shoal_client::connection::Connection;
use shoal_client::{Client, Consumer, ConsumerConfig, NewTopic, Producer, ProducerConfig};
use shoal_tests::{two_shards, Broker};
use shoal_wire::frame::{self, Check};
use shoal_wire::{fb, ErrorCode};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Reads one frame; `None` if the broker closed the connection.
fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
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

fn error_of(header: &[u8]) -> (ErrorCode, String) {
    let r = frame::decode_response(header).expect("a valid response");
    (
        ErrorCode::from_u16(r.error_code()),
        r.error_message().unwrap_or("").to_string(),
    )
}

fn connect(b: &Broker) -> TcpStream {
    let s = TcpStream::connect(b.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0))
        || matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

fn metadata_request(corr: u32, version: u16) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let body = fb::MetadataRequest::create(&mut fbb, &fb::MetadataRequestArgs { topics: None });
    let req = fb::Request::create(
        &mut fbb,
        &fb::RequestArgs {
            version,
            correlation_id: corr,
            client_id: None,
            body_type: fb::RequestBody::MetadataRequest,
            body: Some(body.as_union_value()),
        },
    );
    fbb.finish(req, None);
    let mut out = Vec::new();
    frame::write_frame(&mut out, fbb.finished_data(), &[]);
    out
}

async fn produce_raw(
    conn: &Connection,
    topic: &str,
    partition: u32,
    payload: &[u8],
) -> shoal_client::Result<()> {
    shoal_client::produce_batches(conn, topic, partition, shoal_client::Acks::Leader, payload)
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_the_broker_keeps_serving() {
    let mut broker = Broker::start(two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("keep", 2))
        .await
        .unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    for i in 0..20u32 {
        producer
            .send_to("keep", i % 2, None, format!("kept-{i}").as_bytes())
            .unwrap();
    }
    producer.flush().await.unwrap();

    // Oversized frame: error frame, then the connection closes.
    let mut s = connect(&broker);
    s.write_all(&(100u32 << 20).to_le_bytes()).unwrap();
    let (code, msg) = error_of(&read_frame(&mut s).expect("an error frame"));
    assert_eq!(code, ErrorCode::FrameTooLarge, "{msg}");
    assert!(closed(&mut s));

    // Garbage: not a frame at all.
    let mut s = connect(&broker);
    s.write_all(&[0xff; 64]).unwrap();
    let (code, _) = error_of(&read_frame(&mut s).expect("an error frame"));
    assert_eq!(code, ErrorCode::FrameTooLarge);
    assert!(closed(&mut s));

    // A header length that does not fit the frame.
    let mut s = connect(&broker);
    let mut f = frame::prefix(4, 0).to_vec();
    f[4..8].copy_from_slice(&1000u32.to_le_bytes());
    s.write_all(&f).unwrap();
    let (code, _) = error_of(&read_frame(&mut s).expect("an error frame"));
    assert_eq!(code, ErrorCode::MalformedRequest);
    assert!(closed(&mut s));

    // A truncated frame, then the client goes away.
    let mut s = connect(&broker);
    s.write_all(&frame::prefix(100, 900)).unwrap();
    s.write_all(&[1, 2, 3]).unwrap();
    drop(s);

    // Invalid flatbuffers in a valid frame: an error, and the same
    // connection still serves.
    let mut s = connect(&broker);
    let mut f = Vec::new();
    frame::write_frame(&mut f, &[0x5a; 40], b"");
    s.write_all(&f).unwrap();
    let (code, _) = error_of(&read_frame(&mut s).expect("an error frame"));
    assert_eq!(code, ErrorCode::MalformedRequest);
    s.write_all(&metadata_request(7, 1)).unwrap();
    let r = read_frame(&mut s).expect("metadata");
    let resp = frame::decode_response(&r).unwrap();
    assert_eq!((resp.correlation_id(), resp.error_code()), (7, 0));

    // Unsupported protocol version.
    s.write_all(&metadata_request(8, 9)).unwrap();
    let (code, msg) = error_of(&read_frame(&mut s).unwrap());
    assert_eq!(code, ErrorCode::UnsupportedVersion, "{msg}");

    // Unknown request type.
    let mut fbb = FlatBufferBuilder::new();
    let body = fb::ListTopicsRequest::create(&mut fbb, &fb::ListTopicsRequestArgs {});
    let req = fb::Request::create(
        &mut fbb,
        &fb::RequestArgs {
            version: 1,
            correlation_id: 9,
            client_id: None,
            body_type: fb::RequestBody(200),
            body: Some(body.as_union_value()),
        },
    );
    fbb.finish(req, None);
    let mut f = Vec::new();
    frame::write_frame(&mut f, fbb.finished_data(), &[]);
    s.write_all(&f).unwrap();
    let (code, msg) = error_of(&read_frame(&mut s).unwrap());
    assert_eq!(code, ErrorCode::UnsupportedApi, "{msg}");

    // Request-level errors over the client.
    let conn = client.partition_connection("keep", 0).await.unwrap();
    let code = |r: shoal_client::Result<()>| r.unwrap_err().code();
    assert_eq!(
        code(
            produce_raw(
                &conn,
                "nope",
                0,
                &shoal_wire::batch::build_batch(&[b"x"], 0)
            )
            .await
        ),
        Some(ErrorCode::UnknownTopic)
    );
    assert_eq!(
        code(
            produce_raw(
                &conn,
                "keep",
                9,
                &shoal_wire::batch::build_batch(&[b"x"], 0)
            )
            .await
        ),
        Some(ErrorCode::UnknownPartition)
    );
    let mut bad_crc = shoal_wire::batch::build_batch(&[b"corrupt"], 0);
    let n = bad_crc.len();
    bad_crc[n - 2] ^= 0x40;
    assert_eq!(
        code(produce_raw(&conn, "keep", 0, &bad_crc).await),
        Some(ErrorCode::CorruptBatch)
    );
    assert_eq!(
        code(produce_raw(&conn, "keep", 0, &[1, 2, 3]).await),
        Some(ErrorCode::CorruptBatch)
    );
    assert_eq!(
        code(produce_raw(&conn, "keep", 0, &[]).await),
        Some(ErrorCode::MalformedRequest)
    );
    let big = vec![0u8; 2 << 20];
    let huge = shoal_wire::batch::build_batch(&[&big], 0);
    assert_eq!(
        code(produce_raw(&conn, "keep", 0, &huge).await),
        Some(ErrorCode::BatchTooLarge)
    );
    for name in ["", "a/b", "..", "spaces are bad"] {
        let e = client
            .create_topic(&NewTopic::new(name, 1))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::InvalidTopicName), "{name:?}");
    }
    let e = client
        .create_topic(&NewTopic::new("zero", 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidConfig));
    let mut bad_sync = NewTopic::new("badsync", 1);
    bad_sync.sync = Some("sometimes".into());
    assert_eq!(
        client.create_topic(&bad_sync).await.unwrap_err().code(),
        Some(ErrorCode::InvalidConfig)
    );
    assert_eq!(
        client
            .create_topic(&NewTopic::new("keep", 1))
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::TopicExists)
    );
    let consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    let e = consumer
        .fetch_once("keep", 0, 1_000_000, None, 0, Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::OffsetOutOfRange));

    // Still serving, nothing lost, nothing extra written: a normal round
    // trip on a new connection.
    assert!(broker.is_running());
    let fresh = Client::connect(&broker.addr()).await.unwrap();
    let p2 = Producer::new(fresh.clone(), ProducerConfig::default());
    p2.send_to("keep", 0, None, b"after")
        .unwrap()
        .await
        .unwrap();
    let c = Consumer::new(fresh, ConsumerConfig::default());
    let mut values = Vec::new();
    for p in 0..2 {
        let f = c
            .fetch_once("keep", p, 0, None, 0, Duration::ZERO)
            .await
            .unwrap();
        values.extend(
            f.records
                .into_iter()
                .map(|r| String::from_utf8(r.value.unwrap()).unwrap()),
        );
    }
    values.sort();
    let mut expect: Vec<String> = (0..20).map(|i| format!("kept-{i}")).collect();
    expect.push("after".into());
    expect.sort();
    assert_eq!(values, expect);
    assert!(
        broker.terminate(),
        "clean shutdown after all that: {}",
        broker.log_text()
    );
}
