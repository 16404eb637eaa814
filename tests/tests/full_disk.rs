//! A full disk is not one-way (issue 9 #4), against a real `shoal` process
//! whose data directory is a small ext4 file system of its own (a loop
//! mount; the test needs root and skips, saying so, where it cannot mount):
//! producers get a clear retriable error, a kill -9 on the full disk still
//! restarts, a topic can be deleted to make room, and appends resume once
//! there is space again.

use shoal_client::connection::Connection;
use shoal_client::{Client, NewTopic};
use shoal_tests::Broker;
use shoal_wire::{BatchBuilder, ErrorCode, NewRecord};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A loop-mounted ext4 file system, unmounted on drop.
struct SmallFs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn new(mib: u64) -> Option<SmallFs> {
        let dir = tempfile::tempdir().ok()?;
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).ok()?;
        std::fs::File::create(&img).ok()?.set_len(mib << 20).ok()?;
        let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
        if !ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img)) {
            return None;
        }
        if !ok(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt))
        {
            return None;
        }
        Some(SmallFs { mnt, _dir: dir })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// Fills the file system until it is full; returns the filler file.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let block = vec![0xaau8; 1 << 20];
    while f.write_all(&block).is_ok() {}
    let small = vec![0xaau8; 4096];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    p
}

fn one_mib_batch() -> Vec<u8> {
    let mut b = BatchBuilder::default();
    let value = vec![b'x'; 1000];
    for _ in 0..1000 {
        b.push(&NewRecord {
            key: None,
            value: Some(&value),
            timestamp_ms: 1,
            headers: &[],
        })
        .unwrap();
    }
    b.finish(-1, 0, -1)
}

async fn produce(conn: &Connection, topic: &str) -> Result<(), (ErrorCode, String)> {
    shoal_client::produce_batches(conn, topic, 0, shoal_client::Acks::Leader, &one_mib_batch())
        .await
        .map(|_| ())
        .map_err(|e| match e {
            shoal_client::Error::Broker { code, message } => (code, message),
            other => (ErrorCode::Unknown, other.to_string()),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_not_one_way() {
    let Some(fs) = SmallFs::new(96) else {
        eprintln!(
            "skipped: cannot make a loop-mounted file system here (needs root and loop devices)"
        );
        return;
    };
    let data = fs.mnt.join("data");
    let mut broker = Broker::start_at("0", data.clone(), "default_sync = \"always\"\n");
    let client = Client::connect(&broker.addr()).await.unwrap();
    let mut big = NewTopic::new("big", 1);
    big.segment_bytes = Some(8 << 20);
    client.create_topic(&big).await.unwrap();
    let mut small = NewTopic::new("small", 1);
    small.segment_bytes = Some(8 << 20);
    client.create_topic(&small).await.unwrap();
    let conn = Connection::connect(broker.addr().parse().unwrap(), "test")
        .await
        .unwrap();
    produce(&conn, "small").await.unwrap();

    // Fill the disk through the broker: a clear, retriable error.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (code, message) = loop {
        match produce(&conn, "big").await {
            Ok(()) => assert!(Instant::now() < deadline, "the disk never filled"),
            Err(e) => break e,
        }
    };
    assert_eq!(code, ErrorCode::StorageError, "{message}");
    assert!(code.is_retriable());
    let filler = fill(&fs.mnt);

    // kill -9 on the full disk: the broker still starts.
    broker.kill9();
    broker.restart();
    let client = Client::connect(&broker.addr()).await.unwrap();
    let conn = Connection::connect(broker.addr().parse().unwrap(), "test")
        .await
        .unwrap();
    // (A partition may still write into space it preallocated before.)

    // Deleting a topic works on the full disk and makes room.
    client.delete_topic("big").await.unwrap();
    assert!(!data.join("topics").join("big-0").exists());
    std::fs::remove_file(&filler).unwrap();

    // Appends resume, without a restart.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match produce(&conn, "small").await {
            Ok(()) => break,
            Err((code, message)) => {
                assert_eq!(code, ErrorCode::StorageError, "{message}");
                assert!(
                    Instant::now() < deadline,
                    "appends never resumed: {message}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    client
        .create_topic(&NewTopic::new("after", 1))
        .await
        .unwrap();
    produce(&conn, "after").await.unwrap();
    let t = client.describe_topic("small").await.unwrap();
    assert!(t.partitions[0].high_watermark >= 2000);
    broker.terminate();
}
