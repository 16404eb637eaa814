//! The seam between shard logic and the executor: spawning, timers, the
//! clock and blocking work.
//!
//! Shard code (and the broker above it) calls these instead of glommio
//! directly. Today each is a thin wrapper over the calling core's glommio
//! executor; the point of the seam is that the same logic can later run
//! under a seeded, deterministic executor with a virtual clock and injected
//! faults (Iggy's `core/simulator`, TigerBeetle's VOPR), which is what
//! replication and failover need to be tested hard. Direct-I/O file access
//! (`DmaFile`) is a different seam and stays with glommio for now.
//!
//! Everything here runs on, and is owned by, the calling core: a [`Task`]
//! never crosses cores. Only [`spawn_blocking`] leaves the core, to the
//! executor's blocking thread, and takes `Send` work for that reason.

use std::future::Future;
use std::time::{Duration, Instant};

/// A task on this core; dropping it cancels it, `detach` lets it run on.
pub type Task<T> = glommio::Task<T>;

/// Runs `f` on this core beside the caller.
pub fn spawn<F>(f: F) -> Task<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    glommio::spawn_local(f)
}

/// Runs `f` on this core to its end, nobody waiting for it.
pub fn spawn_detached<F>(f: F)
where
    F: Future + 'static,
    F::Output: 'static,
{
    glommio::spawn_local(f).detach();
}

/// Completes after `d` (of the executor's clock, not necessarily the
/// wall's: a simulator advances it at will).
pub async fn sleep(d: Duration) {
    glommio::timer::sleep(d).await;
}

/// `f`'s output, or `None` if it did not finish within `d` (then `f` is
/// dropped).
pub async fn timeout<T>(d: Duration, f: impl Future<Output = T>) -> Option<T> {
    glommio::timer::timeout(d, async { Ok(f.await) }).await.ok()
}

/// The executor's clock. Shard code measures every age and deadline with
/// it, never with `Instant::now()` or `Instant::elapsed()` directly.
pub fn now() -> Instant {
    Instant::now()
}

/// Time since `t` on [`now`]'s clock (zero if `t` is in the future).
pub fn since(t: Instant) -> Duration {
    now().saturating_duration_since(t)
}

/// Lets other tasks of this core run if this one has used its share
/// (a long loop calls it now and then).
pub async fn yield_if_needed() {
    glommio::yield_if_needed().await;
}

/// Ends this task queue's turn: other ready tasks run before this task
/// goes on. The rings (new requests, completions) are looked at only once
/// glommio's preemption timer (100 ms by default) has fired or nothing is
/// ready; a completion does not interrupt a busy executor by itself. For a
/// task that keeps the core busy in bounded pieces of kernel work (sendfile
/// of megabytes), which `yield_if_needed` would let run for its whole time
/// slice.
pub async fn yield_to_io() {
    glommio::executor().yield_task_queue_now().await;
}

/// Runs blocking work (file-system calls glommio cannot issue through
/// io_uring: `read_dir`, `create_dir_all`, `remove_file`, `statvfs`, ...)
/// on the executor's blocking thread, so the core keeps serving meanwhile.
///
/// `f` runs inside the caller's tracing span, so its log lines keep the
/// shard's context. A panic in `f` resumes in the caller: glommio 0.9
/// would otherwise lose the blocking thread and never wake the caller.
pub async fn spawn_blocking<R, F>(f: F) -> R
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let span = tracing::Span::current();
    let run = move || {
        let _entered = span.enter();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
    };
    match glommio::executor().spawn_blocking(run).await {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_spawn_and_blocking_work() {
        let (timed_out, finished, ids, joined) = glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let timed_out =
                    timeout(Duration::from_millis(5), sleep(Duration::from_secs(60))).await;
                let finished = timeout(Duration::from_secs(60), async { 7 }).await;
                let t = now();
                let here = std::thread::current().id();
                let there = spawn_blocking(|| std::thread::current().id()).await;
                let joined = spawn(async { 3 }).await;
                yield_if_needed().await;
                assert!(since(t) < Duration::from_secs(60));
                (timed_out, finished, (here, there), joined)
            })
            .expect("executor starts")
            .join()
            .expect("executor finishes");
        assert_eq!(timed_out, None);
        assert_eq!(finished, Some(7));
        assert_ne!(ids.0, ids.1, "blocking work leaves the executor thread");
        assert_eq!(joined, 3);
    }
}
