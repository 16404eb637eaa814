//! A scripted broker for the client's unit tests: it speaks the real frame
//! format, but the test decides when a produce is answered and how, and
//! sends pushes by hand. That makes timing-dependent client behaviour
//! (buffer waits, linger, failed batches, credit) deterministic, which a
//! real broker process cannot.
// A kit: each test uses the few knobs it needs.
#![allow(dead_code)]

use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};
use shoal_wire::batch::{BatchHeader, Batches};
use shoal_wire::frame::{self, Check};
use shoal_wire::{fb, ErrorCode};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The release the fake reports in metadata.
pub(crate) const FAKE_VERSION: &str = "0.0.0-fake";

/// How the fake answers produce requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProduceMode {
    Ack,
    /// Kept until [`FakeBroker::release`].
    Hold,
    Fail(ErrorCode),
}

/// One produce request as the fake saw it.
#[derive(Debug, Clone)]
pub(crate) struct ProduceCall {
    pub partition: u32,
    pub headers: Vec<BatchHeader>,
}

impl ProduceCall {
    pub fn records(&self) -> u32 {
        self.headers.iter().map(|h| h.record_count).sum()
    }
}

struct Held {
    out: mpsc::UnboundedSender<Vec<u8>>,
    corr: u32,
    topic: String,
    partition: u32,
    records: u64,
}

#[derive(Default)]
struct State {
    topics: Vec<(String, u32)>,
    shard_ports: Vec<u16>,
    produce_mode: Option<ProduceMode>,
    produces: Vec<ProduceCall>,
    held: Vec<Held>,
    offsets: HashMap<(String, u32), u64>,
    subs: HashMap<u64, mpsc::UnboundedSender<Vec<u8>>>,
    grants: Vec<(u64, u64)>,
    /// Grants are recorded but never answered.
    grants_unanswered: bool,
    /// Connections stop reading requests (their socket buffers fill up).
    reading_paused: bool,
    subscribe_credits: Vec<u64>,
    connections: usize,
    metadata_requests: usize,
}

pub(crate) struct FakeBroker {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            t.abort();
        }
    }
}

fn accept_loop(
    listener: tokio::net::TcpListener,
    st: Arc<Mutex<State>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            lock(&st).connections += 1;
            tokio::spawn(serve(s, st.clone()));
        }
    })
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeBroker {
    /// A fake with `topics` (name, partitions), all on shard 0, no shard
    /// ports, answering produces at once.
    pub async fn start(topics: &[(&str, u32)]) -> FakeBroker {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a local port");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(Mutex::new(State {
            topics: topics.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
            produce_mode: Some(ProduceMode::Ack),
            ..State::default()
        }));
        let task = accept_loop(listener, state.clone());
        FakeBroker {
            addr,
            state,
            tasks: Mutex::new(vec![task]),
        }
    }

    /// Serves on `listener` too (a shard port).
    pub fn also_listen(&self, listener: tokio::net::TcpListener) {
        let task = accept_loop(listener, self.state.clone());
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    pub fn addr_string(&self) -> String {
        self.addr.to_string()
    }

    pub fn set_shard_ports(&self, ports: &[u16]) {
        lock(&self.state).shard_ports = ports.to_vec();
    }

    pub fn set_produce_mode(&self, m: ProduceMode) {
        lock(&self.state).produce_mode = Some(m);
    }

    pub fn produces(&self) -> Vec<ProduceCall> {
        lock(&self.state).produces.clone()
    }

    pub fn held(&self) -> usize {
        lock(&self.state).held.len()
    }

    pub fn connections(&self) -> usize {
        lock(&self.state).connections
    }

    pub fn metadata_requests(&self) -> usize {
        lock(&self.state).metadata_requests
    }

    pub fn pause_reading(&self, paused: bool) {
        lock(&self.state).reading_paused = paused;
    }

    pub fn leave_grants_unanswered(&self) {
        lock(&self.state).grants_unanswered = true;
    }

    pub fn grants(&self) -> Vec<(u64, u64)> {
        lock(&self.state).grants.clone()
    }

    pub fn subscribe_credits(&self) -> Vec<u64> {
        lock(&self.state).subscribe_credits.clone()
    }

    /// Answers the oldest held produce: stored, or failed with `code`.
    pub fn release(&self, code: Option<ErrorCode>) -> bool {
        let mut st = lock(&self.state);
        if st.held.is_empty() {
            return false;
        }
        let h = st.held.remove(0);
        let frame = match code {
            None => {
                let base = assign(&mut st, &h.topic, h.partition, h.records);
                produce_ok(h.corr, base, h.records)
            }
            Some(c) => error(h.corr, c, "failed by the test"),
        };
        let _ = h.out.send(frame);
        true
    }

    /// Waits until `n` produces are held.
    pub async fn wait_held(&self, n: usize) {
        for _ in 0..2000 {
            if self.held() >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        panic!("expected {n} held produces, have {}", self.held());
    }

    /// Sends a push of `payload` for `subscription`.
    pub fn push(&self, subscription: u64, payload: &[u8], next_offset: u64) {
        let st = lock(&self.state);
        let out = st.subs.get(&subscription).expect("a known subscription");
        let _ = out.send(response(
            0,
            None,
            |fbb| {
                let b = fb::Push::create(
                    fbb,
                    &fb::PushArgs {
                        subscription_id: subscription,
                        high_watermark: next_offset,
                        next_offset,
                    },
                );
                (fb::ResponseBody::Push, Some(b.as_union_value()))
            },
            payload,
        ));
    }
}

fn assign(st: &mut State, topic: &str, partition: u32, records: u64) -> u64 {
    let next = st
        .offsets
        .entry((topic.to_string(), partition))
        .or_insert(0);
    let base = *next;
    *next += records;
    base
}

fn response<F>(corr: u32, err: Option<(ErrorCode, &str)>, body: F, payload: &[u8]) -> Vec<u8>
where
    F: FnOnce(
        &mut FlatBufferBuilder<'static>,
    ) -> (fb::ResponseBody, Option<WIPOffset<UnionWIPOffset>>),
{
    let mut fbb = FlatBufferBuilder::new();
    let (body_type, body) = body(&mut fbb);
    let error_message = err.map(|(_, m)| fbb.create_string(m));
    let r = fb::Response::create(
        &mut fbb,
        &fb::ResponseArgs {
            correlation_id: corr,
            error_code: err.map_or(0, |(c, _)| c as u16),
            error_message,
            body_type,
            body,
        },
    );
    fbb.finish(r, None);
    let mut out = Vec::new();
    frame::write_frame(&mut out, fbb.finished_data(), payload);
    out
}

fn error(corr: u32, code: ErrorCode, message: &str) -> Vec<u8> {
    response(
        corr,
        Some((code, message)),
        |_| (fb::ResponseBody::NONE, None),
        &[],
    )
}

fn produce_ok(corr: u32, base: u64, records: u64) -> Vec<u8> {
    response(
        corr,
        None,
        |fbb| {
            let b = fb::ProduceResponse::create(
                fbb,
                &fb::ProduceResponseArgs {
                    base_offset: base,
                    last_offset: (base + records).saturating_sub(1),
                    duplicate: false,
                },
            );
            (fb::ResponseBody::ProduceResponse, Some(b.as_union_value()))
        },
        &[],
    )
}

fn metadata(corr: u32, st: &State, port: u16) -> Vec<u8> {
    response(
        corr,
        None,
        |fbb| {
            let host = fbb.create_string("127.0.0.1");
            let version = fbb.create_string(FAKE_VERSION);
            let ports = fbb.create_vector(&st.shard_ports);
            let broker = fb::BrokerInfo::create(
                fbb,
                &fb::BrokerInfoArgs {
                    version: Some(version),
                    id: 0,
                    host: Some(host),
                    port,
                    shard_ports: Some(ports),
                },
            );
            let brokers = fbb.create_vector(&[broker]);
            let topics: Vec<_> = st
                .topics
                .iter()
                .map(|(name, n)| {
                    let parts: Vec<_> = (0..*n)
                        .map(|p| {
                            fb::PartitionInfo::create(
                                fbb,
                                &fb::PartitionInfoArgs {
                                    partition: p,
                                    shard: 0,
                                    ..Default::default()
                                },
                            )
                        })
                        .collect();
                    let parts = fbb.create_vector(&parts);
                    let name = fbb.create_string(name);
                    fb::TopicInfo::create(
                        fbb,
                        &fb::TopicInfoArgs {
                            topic_id: 0,
                            name: Some(name),
                            partitions: Some(parts),
                            ..Default::default()
                        },
                    )
                })
                .collect();
            let topics = fbb.create_vector(&topics);
            let m = fb::MetadataResponse::create(
                fbb,
                &fb::MetadataResponseArgs {
                    brokers: Some(brokers),
                    topics: Some(topics),
                },
            );
            (fb::ResponseBody::MetadataResponse, Some(m.as_union_value()))
        },
        &[],
    )
}

fn empty_ok(corr: u32, body_type: fb::ResponseBody) -> Vec<u8> {
    response(
        corr,
        None,
        |fbb| {
            let b = match body_type {
                fb::ResponseBody::GrantCreditResponse => {
                    fb::GrantCreditResponse::create(fbb, &fb::GrantCreditResponseArgs {})
                        .as_union_value()
                }
                _ => fb::UnsubscribeResponse::create(fbb, &fb::UnsubscribeResponseArgs {})
                    .as_union_value(),
            };
            (body_type, Some(b))
        },
        &[],
    )
}

async fn serve(s: tokio::net::TcpStream, st: Arc<Mutex<State>>) {
    let port = s.local_addr().map_or(0, |a| a.port());
    let (mut r, mut w) = s.into_split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            if w.write_all(&f).await.is_err() {
                return;
            }
        }
    });
    let mut buf = Vec::new();
    loop {
        let parts = match frame::check(&buf, usize::MAX / 2) {
            Ok(Check::Complete(p)) => p,
            Ok(Check::Incomplete { .. }) => {
                while lock(&st).reading_paused {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                let mut chunk = [0u8; 64 * 1024];
                match r.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            }
            Err(_) => return,
        };
        let frame: Vec<u8> = buf.drain(..parts.total).collect();
        let Ok(req) = frame::decode_request(&frame[parts.header.clone()]) else {
            return;
        };
        let payload = &frame[parts.payload.clone()];
        let corr = req.correlation_id();
        let mut st = lock(&st);
        let reply = if req.body_as_metadata_request().is_some() {
            st.metadata_requests += 1;
            Some(metadata(corr, &st, port))
        } else if let Some(p) = req.body_as_produce_request() {
            let topic = p.topic().unwrap_or("").to_string();
            let headers: Vec<BatchHeader> = Batches::new(payload, usize::MAX)
                .filter_map(|b| b.ok().map(|(h, _)| h))
                .collect();
            let records: u64 = headers.iter().map(|h| u64::from(h.record_count)).sum();
            st.produces.push(ProduceCall {
                partition: p.partition(),
                headers,
            });
            match st.produce_mode.unwrap_or(ProduceMode::Ack) {
                ProduceMode::Ack => {
                    let base = assign(&mut st, &topic, p.partition(), records);
                    Some(produce_ok(corr, base, records))
                }
                ProduceMode::Fail(code) => Some(error(corr, code, "failed by the test")),
                ProduceMode::Hold => {
                    st.held.push(Held {
                        out: out.clone(),
                        corr,
                        topic,
                        partition: p.partition(),
                        records,
                    });
                    None
                }
            }
        } else if let Some(s) = req.body_as_subscribe_request() {
            let id = st.subs.len() as u64 + 1;
            st.subs.insert(id, out.clone());
            st.subscribe_credits.push(s.credit_bytes());
            Some(response(
                corr,
                None,
                |fbb| {
                    let b = fb::SubscribeResponse::create(
                        fbb,
                        &fb::SubscribeResponseArgs {
                            subscription_id: id,
                        },
                    );
                    (
                        fb::ResponseBody::SubscribeResponse,
                        Some(b.as_union_value()),
                    )
                },
                &[],
            ))
        } else if let Some(g) = req.body_as_grant_credit_request() {
            st.grants.push((g.subscription_id(), g.bytes()));
            (!st.grants_unanswered).then(|| empty_ok(corr, fb::ResponseBody::GrantCreditResponse))
        } else if req.body_as_unsubscribe_request().is_some() {
            Some(empty_ok(corr, fb::ResponseBody::UnsubscribeResponse))
        } else {
            Some(error(corr, ErrorCode::UnsupportedApi, "not in the fake"))
        };
        if let Some(f) = reply {
            let _ = out.send(f);
        }
    }
}
