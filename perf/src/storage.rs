//! `shoal-perf storage`: the partition log alone, no network.
//!
//! N appenders share one partition log on one glommio executor (one shard).
//! Each appends pre-built batches and waits for the sync mode's
//! acknowledgement; the append latency is measured from the call to the
//! acknowledgement. With `--reopen`, it then times opening the partition
//! after a clean close and after a writer killed with SIGKILL.

use crate::report::{histogram, Percentiles};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use shoal_shard::{LogConfig, PartitionLog, SyncMode};
use shoal_wire::batch::{BatchBuilder, NewRecord, NO_PRODUCER_ID, NO_SEQUENCE};
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct StorageArgs {
    /// Directory for the partition (created; emptied first).
    #[arg(long)]
    dir: PathBuf,
    /// always | interval:<ms> | none
    #[arg(long, default_value = "none")]
    sync: SyncMode,
    /// Total bytes to append.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Bytes per batch.
    #[arg(long, default_value_t = 64 * 1024)]
    batch_bytes: usize,
    /// Value bytes per record.
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// Concurrent appenders.
    #[arg(long, default_value_t = 1)]
    appenders: usize,
    /// Segment size.
    #[arg(long, default_value_t = 1 << 30)]
    segment_bytes: u64,
    /// CPU to pin the shard to.
    #[arg(long)]
    core: Option<usize>,
    /// Also time reopening after a clean close and after SIGKILL.
    #[arg(long)]
    reopen: bool,
    /// Then read the log back from its start, right after writing it (a
    /// consumer catching up: nothing is in the page cache, appends bypass
    /// it), as the broker does: `read_ready` slices sent with sendfile (to
    /// /dev/null here, so only the storage side is measured).
    #[arg(long)]
    read_back: bool,
    /// Bytes per read-back slice (a fetch's max_bytes).
    #[arg(long, default_value_t = 4 << 20)]
    read_bytes: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct WriterArgs {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    sync: SyncMode,
    #[arg(long)]
    batch_bytes: usize,
    #[arg(long)]
    record_bytes: usize,
    #[arg(long)]
    segment_bytes: u64,
}

#[derive(Serialize)]
struct ReopenMs {
    clean: f64,
    crash: f64,
}

#[derive(Serialize)]
struct ReadBack {
    mib_per_s: f64,
    seconds: f64,
    /// Time to a resident slice, per read.
    wait_us: Percentiles,
}

#[derive(Serialize)]
struct StorageReport {
    mode: &'static str,
    mib_per_s: f64,
    batches_per_s: f64,
    msgs_per_s: f64,
    bytes: u64,
    batches: u64,
    seconds: f64,
    latency_us: Percentiles,
    #[serde(skip_serializing_if = "Option::is_none")]
    reopen_ms: Option<ReopenMs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    read_back: Option<ReadBack>,
    settings: serde_json::Value,
}

fn make_batch(batch_bytes: usize, record_bytes: usize) -> Vec<u8> {
    let value = vec![0xa5u8; record_bytes];
    let mut b = BatchBuilder::with_capacity(batch_bytes);
    let rec = NewRecord {
        value: Some(&value),
        timestamp_ms: now_ms(),
        ..Default::default()
    };
    loop {
        b.push(&rec).expect("record fits");
        if b.len() + rec.encoded_len() > batch_bytes {
            break;
        }
    }
    b.finish(NO_PRODUCER_ID, 0, NO_SEQUENCE)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn log_config(sync: SyncMode, segment_bytes: u64, batch_bytes: usize) -> LogConfig {
    let batch_bytes_max = batch_bytes.max(shoal_shard::limits::BATCH_BYTES_MAX_DEFAULT);
    LogConfig {
        sync,
        segment_bytes,
        batch_bytes_max,
        write_buffer_bytes: (32 << 20).max(4 * batch_bytes_max),
        retention_age: None,
        ..LogConfig::default()
    }
}

fn executor(core: Option<usize>) -> glommio::LocalExecutorBuilder {
    match core {
        Some(c) => glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(c)),
        None => glommio::LocalExecutorBuilder::default(),
    }
}

fn run_on<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
    core: Option<usize>,
    f: impl FnOnce() -> F + Send + 'static,
) -> Result<T, String> {
    executor(core)
        .spawn(f)
        .map_err(|e| format!("cannot start executor: {e}"))?
        .join()
        .map_err(|e| format!("executor failed: {e:?}"))
}

pub fn run(a: StorageArgs) -> Result<(), String> {
    if a.dir.exists() {
        std::fs::remove_dir_all(&a.dir)
            .map_err(|e| format!("cannot clear {}: {e}", a.dir.display()))?;
    }
    std::fs::create_dir_all(&a.dir)
        .map_err(|e| format!("cannot create {}: {e}", a.dir.display()))?;
    let batch = make_batch(a.batch_bytes, a.record_bytes);
    let records = shoal_wire::BatchHeader::decode(&batch)
        .map_err(|e| e.to_string())?
        .record_count;
    let batch_len = batch.len() as u64;
    let cfg = log_config(a.sync, a.segment_bytes, a.batch_bytes);
    let total_batches = a.bytes.div_ceil(batch_len);
    let (dir, appenders) = (a.dir.clone(), a.appenders.max(1));
    let (hist, secs) = run_on(a.core, move || async move {
        let log = Rc::new(
            PartitionLog::open(&dir, cfg)
                .await
                .map_err(|e| e.to_string())?,
        );
        let hist = Rc::new(RefCell::new(histogram()));
        let left = Rc::new(std::cell::Cell::new(total_batches));
        let batch = Rc::new(batch);
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..appenders {
            let (log, hist, left, batch) = (log.clone(), hist.clone(), left.clone(), batch.clone());
            tasks.push(glommio::spawn_local(async move {
                while left.get() > 0 {
                    left.set(left.get() - 1);
                    let s = Instant::now();
                    log.append_acked(&batch).await.map_err(|e| e.to_string())?;
                    let _ = hist
                        .borrow_mut()
                        .record(s.elapsed().as_micros().max(1) as u64);
                }
                Ok::<(), String>(())
            }));
        }
        for t in tasks {
            t.await?;
        }
        let secs = t0.elapsed().as_secs_f64();
        Rc::try_unwrap(log)
            .map_err(|_| "log still shared")?
            .close()
            .await
            .map_err(|e| e.to_string())?;
        let h: Histogram<u64> = hist.borrow().clone();
        Ok::<_, String>((h, secs))
    })??;
    let bytes = total_batches * batch_len;
    let read_back = if a.read_back {
        let cfg = log_config(a.sync, a.segment_bytes, a.batch_bytes);
        Some(read_back(a.dir.clone(), cfg, a.core, a.read_bytes)?)
    } else {
        None
    };
    let reopen_ms = if a.reopen { Some(reopen(&a)?) } else { None };
    let report = StorageReport {
        mode: "storage",
        mib_per_s: bytes as f64 / secs / (1024.0 * 1024.0),
        batches_per_s: total_batches as f64 / secs,
        msgs_per_s: (total_batches * u64::from(records)) as f64 / secs,
        bytes,
        batches: total_batches,
        seconds: secs,
        latency_us: Percentiles::of(&hist),
        reopen_ms,
        read_back,
        settings: serde_json::json!({
            "sync": a.sync.to_string(), "batch_bytes": a.batch_bytes, "record_bytes": a.record_bytes,
            "appenders": appenders, "segment_bytes": a.segment_bytes, "dir": a.dir, "core": a.core,
        }),
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
    } else {
        println!(
            "shoal-perf storage  sync={} batch={}B record={}B appenders={}",
            a.sync, a.batch_bytes, a.record_bytes, appenders
        );
        println!(
            "  {:.1} MiB/s  {:.0} batches/s  {:.0} msgs/s  ({} bytes in {:.2} s)",
            report.mib_per_s, report.batches_per_s, report.msgs_per_s, bytes, secs
        );
        println!("  append latency  {}", report.latency_us.table_row());
        if let Some(r) = &report.read_back {
            println!(
                "  read back: {:.1} MiB/s in {:.2} s; wait per slice {}",
                r.mib_per_s,
                r.seconds,
                r.wait_us.table_row()
            );
        }
        if let Some(r) = &report.reopen_ms {
            println!(
                "  reopen: clean {:.1} ms, after SIGKILL {:.1} ms",
                r.clean, r.crash
            );
        }
    }
    Ok(())
}

/// Reads the whole log from its start as a fetching consumer would, each
/// slice made resident without blocking (`read_ready`) and then sent with
/// sendfile to /dev/null.
fn read_back(
    dir: PathBuf,
    cfg: LogConfig,
    core: Option<usize>,
    read_bytes: u64,
) -> Result<ReadBack, String> {
    run_on(core, move || async move {
        use std::os::fd::AsRawFd;
        let sink = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map_err(|e| e.to_string())?;
        let log = PartitionLog::open(&dir, cfg)
            .await
            .map_err(|e| e.to_string())?;
        let (mut at, end) = (log.start_offset(), log.end_offset());
        let mut hist = histogram();
        let (t0, mut bytes) = (Instant::now(), 0u64);
        while at < end {
            let s = Instant::now();
            let slice = log
                .read_ready(at, read_bytes, Duration::from_millis(100))
                .await
                .map_err(|e| e.to_string())?;
            let _ = hist.record(s.elapsed().as_micros().max(1) as u64);
            let mut off = slice.file_position() as libc::off_t;
            let mut left = slice.len as usize;
            while left > 0 {
                // SAFETY: both descriptors are open for the call; `off` is
                // a local.
                let n = unsafe {
                    libc::sendfile(sink.as_raw_fd(), slice.file().as_raw_fd(), &mut off, left)
                };
                if n <= 0 {
                    return Err(format!("sendfile: {}", std::io::Error::last_os_error()));
                }
                left -= n as usize;
            }
            bytes += slice.len;
            at = slice.next_offset;
        }
        let seconds = t0.elapsed().as_secs_f64();
        log.close().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(ReadBack {
            mib_per_s: bytes as f64 / seconds / (1024.0 * 1024.0),
            seconds,
            wait_us: Percentiles::of(&hist),
        })
    })?
}

fn time_open(dir: PathBuf, cfg: LogConfig, core: Option<usize>) -> Result<(f64, u64), String> {
    run_on(core, move || async move {
        let t0 = Instant::now();
        let log = PartitionLog::open(&dir, cfg)
            .await
            .map_err(|e| e.to_string())?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        let size = log.size_bytes();
        log.close().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((ms, size))
    })?
}

fn reopen(a: &StorageArgs) -> Result<ReopenMs, String> {
    let cfg = log_config(a.sync, a.segment_bytes, a.batch_bytes);
    let (clean, _) = time_open(a.dir.clone(), cfg.clone(), a.core)?;
    // A writer appending to the same log, killed with SIGKILL mid-stream.
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(exe)
        .arg("storage-writer")
        .args(["--dir", &a.dir.to_string_lossy()])
        .args(["--sync", &a.sync.to_string()])
        .args(["--batch-bytes", &a.batch_bytes.to_string()])
        .args(["--record-bytes", &a.record_bytes.to_string()])
        .args(["--segment-bytes", &a.segment_bytes.to_string()])
        .spawn()
        .map_err(|e| format!("cannot start writer: {e}"))?;
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().map_err(|e| e.to_string())?;
    let _ = child.wait();
    let (crash, _) = time_open(a.dir.clone(), cfg, a.core)?;
    Ok(ReopenMs { clean, crash })
}

/// Appends until killed.
pub fn writer(a: WriterArgs) -> Result<(), String> {
    let cfg = log_config(a.sync, a.segment_bytes, a.batch_bytes);
    let batch = make_batch(a.batch_bytes, a.record_bytes);
    run_on(None, move || async move {
        let log = Rc::new(
            PartitionLog::open(&a.dir, cfg)
                .await
                .map_err(|e| e.to_string())?,
        );
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (log, batch) = (log.clone(), batch.clone());
            tasks.push(glommio::spawn_local(async move {
                loop {
                    if let Err(e) = log.append_acked(&batch).await {
                        return Err(e.to_string());
                    }
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        Ok::<(), String>(())
    })?
}
