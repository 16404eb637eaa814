//! The standby: a follower of a `__shoal_groups` partition keeps the
//! groups in memory from its own copy of the log (up to the high
//! watermark, so never anything a failover could take back), and every
//! `group_checkpoint_records` records writes a checkpoint, keeps it, cuts
//! its own log below it and ships it to the leader, which keeps it and
//! cuts its log too. The leader never stops to snapshot (seed 000's
//! checkpoint node).

use super::coordinator::{read_checkpoint, replay};
use super::records;
use super::state::Group;
use crate::error::Result;
use shoal_shard::PartitionLog;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

pub struct Standby {
    groups: RefCell<BTreeMap<String, Group>>,
    /// Everything below it is applied; `None` until loaded.
    applied: Option<u64>,
    since: u64,
    /// The log was emptied to start over past what the checkpoint covers:
    /// this replica cannot build a whole state any more.
    broken: bool,
    never: Cell<bool>,
}

impl Default for Standby {
    fn default() -> Self {
        Standby {
            groups: RefCell::new(BTreeMap::new()),
            applied: None,
            since: 0,
            broken: false,
            never: Cell::new(false),
        }
    }
}

impl Standby {
    /// Applies what the log holds below its high watermark.
    pub async fn catch_up(&mut self, log: &PartitionLog) -> Result<()> {
        if self.broken {
            return Ok(());
        }
        let from = match self.applied {
            Some(a) => a,
            None => {
                let (from, groups) = read_checkpoint(log).await?;
                *self.groups.borrow_mut() = groups;
                from
            }
        };
        let upto = log.high_watermark();
        let mut reached = from;
        if upto > from {
            let (n, r) = replay(log, from, upto, &self.groups, &self.never).await?;
            self.since += n;
            reached = r;
        }
        self.applied = Some(reached);
        Ok(())
    }

    /// The log was truncated or started over: load again from the
    /// checkpoint. `broken`: the state cannot be built (the checkpoint does
    /// not cover the log's start): never checkpoint from this replica
    /// again (until its role changes).
    pub fn reset(&mut self, broken: bool) {
        self.applied = None;
        self.groups.borrow_mut().clear();
        self.since = 0;
        self.broken |= broken;
    }

    /// A checkpoint when `every` records were applied since the last one:
    /// (offset, bytes).
    pub fn due(&mut self, every: u64) -> Option<(u64, Vec<u8>)> {
        let at = self.applied?;
        if self.broken || self.since < every {
            return None;
        }
        self.since = 0;
        Some((at, records::encode_checkpoint(at, &self.groups.borrow())))
    }
}
