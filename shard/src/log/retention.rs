//! Retention (S5): deleting whole closed segments by age and by size.

use super::PartitionLog;
use crate::durable;
use crate::error::Result;
use crate::segment::{self};

impl PartitionLog {
    /// Deletes whole closed segments past the retention limits; the log
    /// start moves to the first remaining segment. Returns how many.
    pub async fn enforce_retention(&self, now_ms: i64) -> Result<usize> {
        let cfg = &self.inner.config;
        let mut deleted = Vec::new();
        {
            let mut st = self.inner.st.borrow_mut();
            let mut total: u64 = st.closed.iter().map(|s| s.len()).sum::<u64>() + st.active_bytes;
            while let Some(first) = st.closed.first() {
                let too_old = match (cfg.retention_age, first.max_timestamp()) {
                    (Some(age), Some(ts)) => ts < now_ms.saturating_sub(age.as_millis() as i64),
                    _ => false,
                };
                let too_big = cfg.retention_bytes.is_some_and(|max| total > max);
                if !too_old && !too_big {
                    break;
                }
                total -= first.len();
                deleted.push(st.closed.remove(0));
            }
        }
        self.delete_segments(deleted, "retention deleted segment")
            .await
    }

    /// Deletes the closed segments that hold only offsets below `offset`
    /// (a checkpoint of what they held was kept elsewhere); the log start
    /// moves to the first remaining segment. Returns how many.
    pub async fn delete_before(&self, offset: u64) -> Result<usize> {
        let mut deleted = Vec::new();
        {
            let mut st = self.inner.st.borrow_mut();
            loop {
                let next_base = match st.closed.get(1) {
                    Some(s) => s.base_offset,
                    None if !st.closed.is_empty() => st.active.base_offset,
                    None => break,
                };
                if next_base > offset {
                    break;
                }
                deleted.push(st.closed.remove(0));
            }
        }
        self.delete_segments(deleted, "deleted segment below a checkpoint")
            .await
    }

    async fn delete_segments(
        &self,
        deleted: Vec<std::rc::Rc<segment::Segment>>,
        why: &str,
    ) -> Result<usize> {
        if !deleted.is_empty() {
            let dir = &self.inner.dir;
            let paths = deleted
                .iter()
                .flat_map(|seg| segment::segment_paths(dir, seg.base_offset))
                .collect();
            durable::remove_files(dir, paths).await?;
            let start = self.start_offset();
            self.inner.read_ahead.borrow_mut().forget_before(start);
            for seg in &deleted {
                seg.retire();
                tracing::info!(segment = %seg.path.display(), "{why}");
            }
        }
        Ok(deleted.len())
    }
}
