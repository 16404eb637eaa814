//! One group's membership, assignment and committed offsets, and the rules
//! that change them. Pure: time comes in as an argument and nothing here
//! touches the log, so the coordinator and a replaying standby apply the
//! same changes the same way.
//!
//! The assignment is the broker's (KIP-848 style). Each member has a
//! target (what the strategy wants it to consume), `given` (what it was
//! told it may consume now) and `held` (given, plus partitions taken away
//! that it still reported owning at its last heartbeat). A partition joins
//! a member's `given` only once no other member holds it, so no two
//! members consume a partition at once; a member's epoch moves whenever
//! its `given` changes. A commit names the member's epoch: it is accepted
//! for a partition the member holds since that epoch or earlier.

use super::assign::{assign, MemberInput, Strategy, Tp};
use crate::error::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Shortest and longest session a member may ask for.
pub const SESSION_TIMEOUT_MIN: Duration = Duration::from_millis(500);
pub const SESSION_TIMEOUT_MAX: Duration = Duration::from_secs(300);
/// Longest heartbeat interval handed out (a third of the session at most).
/// A member learns that partitions move away from it at its next heartbeat,
/// so this bounds how long a joining member waits for them; a heartbeat a
/// second per member costs the coordinator little.
pub const HEARTBEAT_INTERVAL_MAX: Duration = Duration::from_secs(1);
/// The interval while a member's assignment is still moving: it learns
/// of freed partitions (and reports released ones) quickly.
pub const HEARTBEAT_INTERVAL_RECONCILING: Duration = Duration::from_millis(100);
/// Most topics one member may subscribe to.
pub const SUBSCRIPTION_TOPICS_MAX: usize = 1000;
/// Longest member id a client may choose.
pub const MEMBER_ID_MAX: usize = 255;
/// Most members one group may have.
pub const MEMBERS_MAX: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub client_id: String,
    pub epoch: i32,
    /// The epoch before the last change: a heartbeat whose answer was lost
    /// still names it.
    pub prev_epoch: i32,
    pub topics: Vec<String>,
    pub session_timeout_ms: u32,
    pub metadata: Vec<u8>,
    pub target: BTreeSet<Tp>,
    pub given: BTreeSet<Tp>,
    /// Each held partition with the member epoch it was given at.
    pub held: BTreeMap<Tp, i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub offset: i64,
    pub metadata: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    /// Moves whenever the target assignment does.
    pub epoch: i32,
    pub strategy: Strategy,
    pub members: BTreeMap<String, Member>,
    pub offsets: BTreeMap<Tp, Committed>,
}

/// A heartbeat (join, heartbeat, leave) as the coordinator sees it.
pub struct Heartbeat<'a> {
    pub member_id: &'a str,
    pub member_epoch: i32,
    pub client_id: &'a str,
    pub topics: Option<Vec<String>>,
    pub owned: Option<BTreeSet<Tp>>,
    pub session_timeout_ms: u32,
    pub strategy: Strategy,
    pub metadata: Option<&'a [u8]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatOk {
    pub member_id: String,
    pub member_epoch: i32,
    pub heartbeat_interval_ms: u32,
    pub assignment: BTreeSet<Tp>,
}

impl Group {
    pub fn new(name: &str) -> Group {
        Group {
            name: name.to_string(),
            epoch: 0,
            strategy: Strategy::Sticky,
            members: BTreeMap::new(),
            offsets: BTreeMap::new(),
        }
    }

    pub fn state(&self) -> &'static str {
        if self.members.is_empty() {
            "empty"
        } else if self
            .members
            .values()
            .all(|m| m.target == m.given && m.held.len() == m.given.len())
        {
            "stable"
        } else {
            "reconciling"
        }
    }

    /// Joins, heartbeats or leaves. `partitions` gives a topic's partition
    /// count (None: no such topic). `new_id` names a joining member.
    /// Returns the answer and whether the group's membership or
    /// assignment changed (to be recorded in the log). A leave answers
    /// with epoch -1.
    pub fn heartbeat(
        &mut self,
        hb: Heartbeat<'_>,
        partitions: &dyn Fn(&str) -> Option<u32>,
        new_id: impl FnOnce() -> String,
    ) -> Result<(HeartbeatOk, bool)> {
        let session = Duration::from_millis(u64::from(hb.session_timeout_ms));
        if hb.member_epoch == -1 {
            let changed = self.members.remove(hb.member_id).is_some();
            if changed {
                self.reconcile(partitions);
            }
            return Ok((
                HeartbeatOk {
                    member_id: hb.member_id.to_string(),
                    member_epoch: -1,
                    heartbeat_interval_ms: 0,
                    assignment: BTreeSet::new(),
                },
                changed,
            ));
        }
        let mut changed = false;
        // A join that names a member the group has is a retried join (its
        // answer was lost): answered as a heartbeat, not a second member.
        let retried_join = hb.member_epoch == 0
            && !hb.member_id.is_empty()
            && self.members.contains_key(hb.member_id);
        let id = if hb.member_epoch == 0 && !retried_join {
            if hb.member_id.len() > MEMBER_ID_MAX {
                return Err(Error::InvalidConfig(format!(
                    "a member id is at most {MEMBER_ID_MAX} bytes"
                )));
            }
            if !(SESSION_TIMEOUT_MIN..=SESSION_TIMEOUT_MAX).contains(&session) {
                return Err(Error::InvalidConfig(format!(
                    "session timeout {} ms is outside {}-{} ms",
                    hb.session_timeout_ms,
                    SESSION_TIMEOUT_MIN.as_millis(),
                    SESSION_TIMEOUT_MAX.as_millis()
                )));
            }
            let topics = hb.topics.clone().unwrap_or_default();
            if topics.is_empty() {
                return Err(Error::InvalidConfig(
                    "a joining member must subscribe to at least one topic".into(),
                ));
            }
            if self.members.is_empty() {
                self.strategy = hb.strategy;
            }
            let id = if hb.member_id.is_empty() {
                new_id()
            } else {
                hb.member_id.to_string()
            };
            self.members.insert(
                id.clone(),
                Member {
                    id: id.clone(),
                    client_id: hb.client_id.to_string(),
                    // 0 means "join" on the wire: members start at 1.
                    epoch: 1,
                    prev_epoch: 1,
                    topics,
                    session_timeout_ms: hb.session_timeout_ms,
                    metadata: hb.metadata.map(<[u8]>::to_vec).unwrap_or_default(),
                    target: BTreeSet::new(),
                    given: BTreeSet::new(),
                    held: BTreeMap::new(),
                },
            );
            changed = true;
            id
        } else {
            let m = self
                .members
                .get_mut(hb.member_id)
                .ok_or_else(|| Error::UnknownMember {
                    group: self.name.clone(),
                    member: hb.member_id.to_string(),
                })?;
            if !retried_join && hb.member_epoch != m.epoch && hb.member_epoch != m.prev_epoch {
                return Err(Error::FencedMemberEpoch(format!(
                    "member {:?} of group {:?} is at epoch {}, not {}",
                    m.id, self.name, m.epoch, hb.member_epoch
                )));
            }
            if let Some(topics) = hb.topics {
                if !topics.is_empty() && topics != m.topics {
                    m.topics = topics;
                    changed = true;
                }
            }
            if let Some(meta) = hb.metadata {
                if meta != m.metadata.as_slice() {
                    m.metadata = meta.to_vec();
                    changed = true;
                }
            }
            if let Some(owned) = hb.owned {
                let before = m.held.len();
                let given = &m.given;
                m.held
                    .retain(|tp, _| given.contains(tp) || owned.contains(tp));
                changed |= m.held.len() != before;
            }
            hb.member_id.to_string()
        };
        changed |= self.reconcile(partitions);
        changed |= self.advance(&id);
        let m = &self.members[&id];
        let interval = if m.target != m.given || m.held.len() != m.given.len() {
            HEARTBEAT_INTERVAL_RECONCILING
        } else {
            (Duration::from_millis(u64::from(m.session_timeout_ms)) / 3).min(HEARTBEAT_INTERVAL_MAX)
        };
        Ok((
            HeartbeatOk {
                member_id: id,
                member_epoch: m.epoch,
                heartbeat_interval_ms: interval.as_millis() as u32,
                assignment: m.given.clone(),
            },
            changed,
        ))
    }

    /// Removes the members whose session ran out (no heartbeat for their
    /// session timeout since `last_seen`); returns their ids.
    pub fn expire(
        &mut self,
        last_seen: &dyn Fn(&str) -> Option<Instant>,
        now: Instant,
        partitions: &dyn Fn(&str) -> Option<u32>,
    ) -> Vec<String> {
        let dead: Vec<String> = self
            .members
            .values()
            .filter(|m| {
                let timeout = Duration::from_millis(u64::from(m.session_timeout_ms));
                last_seen(&m.id).is_none_or(|t| now.saturating_duration_since(t) > timeout)
            })
            .map(|m| m.id.clone())
            .collect();
        if !dead.is_empty() {
            for id in &dead {
                self.members.remove(id);
            }
            self.reconcile(partitions);
        }
        dead
    }

    /// Recomputes the target assignment (each member's `given` follows in
    /// its own heartbeat: [`Group::advance`]). Returns whether it changed.
    pub fn reconcile(&mut self, partitions: &dyn Fn(&str) -> Option<u32>) -> bool {
        let mut counts = BTreeMap::new();
        for m in self.members.values() {
            for t in &m.topics {
                if let Some(n) = partitions(t) {
                    counts.insert(t.clone(), n);
                }
            }
        }
        let inputs: Vec<MemberInput<'_>> = self
            .members
            .values()
            .map(|m| MemberInput {
                id: &m.id,
                topics: &m.topics,
                current: &m.target,
            })
            .collect();
        let target = assign(self.strategy, &inputs, &counts);
        let mut changed = false;
        if self
            .members
            .values()
            .any(|m| target.get(&m.id) != Some(&m.target))
        {
            self.epoch += 1;
            changed = true;
            for m in self.members.values_mut() {
                m.target = target.get(&m.id).cloned().unwrap_or_default();
            }
        }
        changed
    }

    /// Moves member `id`'s `given` toward its target, in its own heartbeat
    /// (so its epoch only moves when it is told): what left its target
    /// leaves `given` (it stays held until the member stops reporting it),
    /// then what no other member holds joins it. Returns whether it moved.
    pub fn advance(&mut self, id: &str) -> bool {
        let holders: BTreeMap<&Tp, &str> = self
            .members
            .values()
            .filter(|m| m.id != id)
            .flat_map(|m| m.held.keys().map(|tp| (tp, m.id.as_str())))
            .collect();
        let Some(m) = self.members.get(id) else {
            return false;
        };
        let keep: BTreeSet<Tp> = m.given.intersection(&m.target).cloned().collect();
        let grant: Vec<Tp> = m
            .target
            .difference(&m.given)
            .filter(|tp| !holders.contains_key(tp))
            .cloned()
            .collect();
        if keep.len() == m.given.len() && grant.is_empty() {
            return false;
        }
        let Some(m) = self.members.get_mut(id) else {
            return false;
        };
        m.given = keep;
        m.given.extend(grant);
        m.prev_epoch = m.epoch;
        m.epoch += 1;
        let epoch = m.epoch;
        for tp in &m.given {
            m.held.entry(tp.clone()).or_insert(epoch);
        }
        true
    }

    /// Checks a commit: from a member, each partition must be held by it
    /// since `epoch` or earlier; from outside (empty member id, epoch -1),
    /// the group must have no members.
    pub fn check_commit<'a>(
        &self,
        member_id: &str,
        epoch: i32,
        mut tps: impl Iterator<Item = (&'a str, u32)>,
    ) -> Result<()> {
        if member_id.is_empty() && epoch == -1 {
            if !self.members.is_empty() {
                return Err(Error::GroupNotEmpty(self.name.clone()));
            }
            return Ok(());
        }
        let m = self
            .members
            .get(member_id)
            .ok_or_else(|| Error::UnknownMember {
                group: self.name.clone(),
                member: member_id.to_string(),
            })?;
        if epoch > m.epoch || epoch < 1 {
            return Err(Error::FencedMemberEpoch(format!(
                "member {member_id:?} of group {:?} is at epoch {}, not {epoch}",
                self.name, m.epoch
            )));
        }
        tps.try_for_each(|(t, p)| match m.held.get(&(t.to_string(), p)) {
            Some(&since) if since <= epoch => Ok(()),
            _ => Err(Error::FencedMemberEpoch(format!(
                "{t}-{p} is not assigned to member {member_id:?} of group {:?} at epoch {epoch}",
                self.name
            ))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn six(t: &str) -> Option<u32> {
        (t == "t").then_some(6)
    }

    fn join(g: &mut Group, id: &str) -> HeartbeatOk {
        g.heartbeat(
            Heartbeat {
                member_id: "",
                member_epoch: 0,
                client_id: "c",
                topics: Some(vec!["t".into()]),
                owned: None,
                session_timeout_ms: 3000,
                strategy: Strategy::Sticky,
                metadata: None,
            },
            &six,
            || id.to_string(),
        )
        .expect("join")
        .0
    }

    fn beat(g: &mut Group, id: &str, epoch: i32, owned: &BTreeSet<Tp>) -> Result<HeartbeatOk> {
        g.heartbeat(
            Heartbeat {
                member_id: id,
                member_epoch: epoch,
                client_id: "c",
                topics: None,
                owned: Some(owned.clone()),
                session_timeout_ms: 3000,
                strategy: Strategy::Sticky,
                metadata: None,
            },
            &six,
            || unreachable!(),
        )
        .map(|(ok, _)| ok)
    }

    fn no_overlap(g: &Group) {
        let mut seen = BTreeSet::new();
        for m in g.members.values() {
            for tp in m.held.keys() {
                assert!(seen.insert(tp.clone()), "{tp:?} held twice: {g:#?}");
            }
        }
    }

    #[test]
    fn a_partition_moves_only_once_its_owner_released_it() {
        let mut g = Group::new("g");
        let a = join(&mut g, "a");
        assert_eq!(a.assignment.len(), 6);
        let b = join(&mut g, "b");
        // b waits: a still holds everything.
        assert!(b.assignment.is_empty());
        no_overlap(&g);
        // a's next heartbeat takes three away; a still reports all six.
        let a2 = beat(&mut g, "a", a.member_epoch, &a.assignment).unwrap();
        assert_eq!(a2.assignment.len(), 3);
        assert!(a2.member_epoch > a.member_epoch);
        // a may still commit what it gives up, at its new epoch.
        let given_up: Vec<Tp> = a.assignment.difference(&a2.assignment).cloned().collect();
        g.check_commit(
            "a",
            a2.member_epoch,
            given_up.iter().map(|(t, p)| (t.as_str(), *p)),
        )
        .expect("commit of partitions being given up");
        let b2 = beat(&mut g, "b", b.member_epoch, &BTreeSet::new()).unwrap();
        assert!(b2.assignment.is_empty(), "a has not released yet");
        // a reports it released them: b gets them.
        beat(&mut g, "a", a2.member_epoch, &a2.assignment).unwrap();
        let b3 = beat(&mut g, "b", b2.member_epoch, &BTreeSet::new()).unwrap();
        assert_eq!(b3.assignment.len(), 3);
        no_overlap(&g);
        assert_eq!(g.state(), "stable");
        // a can no longer commit them; b can.
        let gone = given_up.iter().map(|(t, p)| (t.as_str(), *p));
        assert!(matches!(
            g.check_commit("a", a2.member_epoch, gone),
            Err(Error::FencedMemberEpoch(_))
        ));
        let tps = given_up.iter().map(|(t, p)| (t.as_str(), *p));
        g.check_commit("b", b3.member_epoch, tps)
            .expect("b commits");
        // ... but not with the epoch before it got them.
        let tps = given_up.iter().map(|(t, p)| (t.as_str(), *p));
        assert!(g.check_commit("b", b2.member_epoch, tps).is_err());
    }

    #[test]
    fn other_members_changes_never_fence_a_member() {
        // Two joins change a's target twice before a heartbeats: its epoch
        // only moves in its own heartbeat, so a is not fenced.
        let mut g = Group::new("g");
        let a = join(&mut g, "a");
        join(&mut g, "b");
        join(&mut g, "c");
        assert_eq!(g.members["a"].epoch, a.member_epoch);
        let a2 = beat(&mut g, "a", a.member_epoch, &a.assignment).expect("not fenced");
        assert_eq!(a2.assignment.len(), 2);
        no_overlap(&g);
    }

    #[test]
    fn a_retried_join_finds_its_member() {
        let mut g = Group::new("g");
        let hb = |id: &'static str| Heartbeat {
            member_id: id,
            member_epoch: 0,
            client_id: "c",
            topics: Some(vec!["t".into()]),
            owned: None,
            session_timeout_ms: 3000,
            strategy: Strategy::Sticky,
            metadata: None,
        };
        let (first, _) = g.heartbeat(hb("m-1"), &six, || unreachable!()).unwrap();
        assert_eq!(first.member_id, "m-1");
        let (again, _) = g.heartbeat(hb("m-1"), &six, || unreachable!()).unwrap();
        assert_eq!(g.members.len(), 1, "no second member");
        assert_eq!(again.assignment, first.assignment);
    }

    #[test]
    fn an_expired_member_frees_its_partitions() {
        let mut g = Group::new("g");
        let a = join(&mut g, "a");
        let b = join(&mut g, "b");
        let a2 = beat(&mut g, "a", a.member_epoch, &a.assignment).unwrap();
        beat(&mut g, "a", a2.member_epoch, &a2.assignment).unwrap();
        beat(&mut g, "b", b.member_epoch, &BTreeSet::new()).unwrap();
        let t0 = Instant::now();
        let seen = |id: &str| (id == "b").then_some(t0 + Duration::from_secs(10));
        let dead = g.expire(&seen, t0 + Duration::from_secs(5), &six);
        assert_eq!(dead, vec!["a".to_string()]);
        let (epoch, given) = (g.members["b"].epoch, g.members["b"].given.clone());
        let b_now = beat(&mut g, "b", epoch, &given).unwrap();
        assert_eq!(
            b_now.assignment.len(),
            6,
            "b takes everything at its next heartbeat"
        );
        no_overlap(&g);
        assert!(matches!(
            beat(&mut g, "a", a2.member_epoch, &BTreeSet::new()),
            Err(Error::UnknownMember { .. })
        ));
    }

    #[test]
    fn stale_epochs_and_strangers_are_refused() {
        let mut g = Group::new("g");
        let a = join(&mut g, "a");
        assert!(matches!(
            beat(&mut g, "a", a.member_epoch + 5, &a.assignment),
            Err(Error::FencedMemberEpoch(_))
        ));
        let tps = [("t", 0u32)];
        assert!(matches!(
            g.check_commit("nobody", 1, tps.iter().copied()),
            Err(Error::UnknownMember { .. })
        ));
        assert!(matches!(
            g.check_commit("", -1, tps.iter().copied()),
            Err(Error::GroupNotEmpty(_))
        ));
        assert!(matches!(
            g.check_commit("a", a.member_epoch + 1, tps.iter().copied()),
            Err(Error::FencedMemberEpoch(_))
        ));
        // A leave empties the group; outside commits are then allowed.
        beat(&mut g, "a", -1, &BTreeSet::new()).unwrap();
        assert_eq!(g.state(), "empty");
        g.check_commit("", -1, tps.iter().copied())
            .expect("empty group");
    }

    #[test]
    fn session_timeouts_outside_the_bounds_are_refused() {
        let mut g = Group::new("g");
        let r = g.heartbeat(
            Heartbeat {
                member_id: "",
                member_epoch: 0,
                client_id: "c",
                topics: Some(vec!["t".into()]),
                owned: None,
                session_timeout_ms: 10,
                strategy: Strategy::Sticky,
                metadata: None,
            },
            &six,
            || "x".into(),
        );
        assert!(matches!(r, Err(Error::InvalidConfig(_))));
        assert!(g.members.is_empty());
    }
}
