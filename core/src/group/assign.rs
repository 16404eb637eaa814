//! Assignment strategies: which member of a group consumes which partition
//! of the topics it subscribes to. Pure functions of the members, their
//! subscriptions, the partition counts and (sticky) the current
//! assignment; deterministic, so a replayed coordinator computes what the
//! old one did.

use std::collections::{BTreeMap, BTreeSet};

/// A topic partition.
pub type Tp = (String, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Keeps every partition where it is as far as balance allows; only
    /// the excess of an overloaded member and the partitions of departed
    /// members move (to the least-loaded members).
    #[default]
    Sticky,
    /// Per topic, contiguous ranges of partitions to the members in id
    /// order (Kafka's range assignor).
    Range,
    /// Every partition of every topic, in order, dealt to the members in
    /// turn (skipping members not subscribed to its topic).
    RoundRobin,
}

impl Strategy {
    pub fn parse(s: &str) -> Option<Strategy> {
        match s {
            "" | "sticky" => Some(Strategy::Sticky),
            "range" => Some(Strategy::Range),
            "roundrobin" | "round-robin" => Some(Strategy::RoundRobin),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Sticky => "sticky",
            Strategy::Range => "range",
            Strategy::RoundRobin => "roundrobin",
        }
    }
}

/// One member's input: its subscription and what it is assigned now.
pub struct MemberInput<'a> {
    pub id: &'a str,
    pub topics: &'a [String],
    pub current: &'a BTreeSet<Tp>,
}

/// The target assignment of every member (each gets an entry, maybe
/// empty). `partitions`: each subscribed topic's partition count (topics
/// that do not exist are absent and assign nothing).
pub fn assign(
    strategy: Strategy,
    members: &[MemberInput<'_>],
    partitions: &BTreeMap<String, u32>,
) -> BTreeMap<String, BTreeSet<Tp>> {
    let mut out: BTreeMap<String, BTreeSet<Tp>> = members
        .iter()
        .map(|m| (m.id.to_string(), BTreeSet::new()))
        .collect();
    let mut sorted: Vec<&MemberInput<'_>> = members.iter().collect();
    sorted.sort_by_key(|m| m.id);
    match strategy {
        Strategy::Range => {
            for (topic, &n) in partitions {
                let subs: Vec<&str> = sorted
                    .iter()
                    .filter(|m| m.topics.contains(topic))
                    .map(|m| m.id)
                    .collect();
                if subs.is_empty() {
                    continue;
                }
                let (per, extra) = (n as usize / subs.len(), n as usize % subs.len());
                let mut p = 0u32;
                for (i, id) in subs.iter().enumerate() {
                    let take = per + usize::from(i < extra);
                    let set = out.entry(id.to_string()).or_default();
                    for _ in 0..take {
                        set.insert((topic.clone(), p));
                        p += 1;
                    }
                }
            }
        }
        Strategy::RoundRobin => {
            let mut turn = 0usize;
            for (topic, &n) in partitions {
                for p in 0..n {
                    for k in 0..sorted.len() {
                        let m = sorted[(turn + k) % sorted.len()];
                        if m.topics.contains(topic) {
                            out.entry(m.id.to_string())
                                .or_default()
                                .insert((topic.clone(), p));
                            turn = (turn + k + 1) % sorted.len();
                            break;
                        }
                    }
                }
            }
        }
        Strategy::Sticky => sticky(&sorted, partitions, &mut out),
    }
    out
}

/// Sticky: balance within each topic's subscribers (so a member never gets
/// a topic it does not subscribe to, and each topic is spread evenly),
/// keeping current owners first.
fn sticky(
    sorted: &[&MemberInput<'_>],
    partitions: &BTreeMap<String, u32>,
    out: &mut BTreeMap<String, BTreeSet<Tp>>,
) {
    // Total load per member across topics, to break ties toward the
    // least-loaded member overall.
    let mut load: BTreeMap<&str, usize> = sorted.iter().map(|m| (m.id, 0)).collect();
    for (topic, &n) in partitions {
        let subs: Vec<&MemberInput<'_>> = sorted
            .iter()
            .copied()
            .filter(|m| m.topics.contains(topic))
            .collect();
        if subs.is_empty() {
            continue;
        }
        let (per, extra) = (n as usize / subs.len(), n as usize % subs.len());
        // Members keep what they hold, up to `per` (+1 for the first
        // `extra` members that hold more than `per`).
        let mut kept: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        let mut taken = vec![false; n as usize];
        let mut bonus = extra;
        for m in &subs {
            let mine: Vec<u32> = m
                .current
                .iter()
                .filter(|(t, p)| t == topic && *p < n && !taken[*p as usize])
                .map(|(_, p)| *p)
                .collect();
            let mut cap = per;
            if mine.len() > per && bonus > 0 {
                cap += 1;
                bonus -= 1;
            }
            let keep: Vec<u32> = mine.into_iter().take(cap).collect();
            for &p in &keep {
                taken[p as usize] = true;
            }
            kept.insert(m.id, keep);
        }
        // The rest go one at a time to the member with the fewest of this
        // topic (then fewest overall, then lowest id) still below its cap.
        for p in 0..n {
            if taken[p as usize] {
                continue;
            }
            let pick = subs
                .iter()
                .filter(|m| {
                    let have = kept[m.id].len();
                    have < per || (have == per && bonus > 0)
                })
                .min_by_key(|m| (kept[m.id].len(), load[m.id], m.id))
                .map(|m| m.id);
            let Some(id) = pick else { break };
            if kept[id].len() == per {
                bonus -= 1;
            }
            if let Some(v) = kept.get_mut(id) {
                v.push(p);
            }
            taken[p as usize] = true;
        }
        for (id, ps) in kept {
            *load.entry(id).or_default() += ps.len();
            let set = out.entry(id.to_string()).or_default();
            set.extend(ps.into_iter().map(|p| (topic.clone(), p)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (id, subscription, current assignment)
    type M<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, u32)]);

    fn run(
        s: Strategy,
        members: &[M<'_>],
        parts: &[(&str, u32)],
    ) -> BTreeMap<String, BTreeSet<Tp>> {
        let owned: Vec<(Vec<String>, BTreeSet<Tp>)> = members
            .iter()
            .map(|(_, t, c)| {
                (
                    t.iter().map(|s| s.to_string()).collect(),
                    c.iter().map(|(t, p)| (t.to_string(), *p)).collect(),
                )
            })
            .collect();
        let inputs: Vec<MemberInput<'_>> = members
            .iter()
            .zip(&owned)
            .map(|((id, _, _), (t, c))| MemberInput {
                id,
                topics: t,
                current: c,
            })
            .collect();
        let p = parts.iter().map(|(t, n)| (t.to_string(), *n)).collect();
        assign(s, &inputs, &p)
    }

    fn check_complete(a: &BTreeMap<String, BTreeSet<Tp>>, parts: &[(&str, u32)]) {
        let mut seen = BTreeSet::new();
        for set in a.values() {
            for tp in set {
                assert!(seen.insert(tp.clone()), "{tp:?} assigned twice");
            }
        }
        let total: u32 = parts.iter().map(|(_, n)| n).sum();
        assert_eq!(seen.len() as u32, total, "every partition assigned once");
    }

    #[test]
    fn every_strategy_assigns_each_partition_once_and_evenly() {
        for s in [Strategy::Sticky, Strategy::Range, Strategy::RoundRobin] {
            let a = run(
                s,
                &[("a", &["t"], &[]), ("b", &["t"], &[]), ("c", &["t"], &[])],
                &[("t", 6)],
            );
            check_complete(&a, &[("t", 6)]);
            assert!(a.values().all(|v| v.len() == 2), "{s:?}: {a:?}");
        }
    }

    #[test]
    fn range_gives_contiguous_ranges() {
        let a = run(
            Strategy::Range,
            &[("a", &["t"], &[]), ("b", &["t"], &[])],
            &[("t", 5)],
        );
        let a_parts: Vec<u32> = a["a"].iter().map(|(_, p)| *p).collect();
        assert_eq!(a_parts, vec![0, 1, 2]);
    }

    #[test]
    fn members_get_only_topics_they_subscribe_to() {
        for s in [Strategy::Sticky, Strategy::Range, Strategy::RoundRobin] {
            let a = run(
                s,
                &[("a", &["x"], &[]), ("b", &["x", "y"], &[])],
                &[("x", 2), ("y", 3)],
            );
            check_complete(&a, &[("x", 2), ("y", 3)]);
            assert!(a["a"].iter().all(|(t, _)| t == "x"), "{s:?}: {a:?}");
        }
    }

    #[test]
    fn sticky_moves_only_what_balance_needs() {
        // c joins a group of two holding 3 each: it gets one from each, the
        // other four stay put.
        let a = run(
            Strategy::Sticky,
            &[
                ("a", &["t"], &[("t", 0), ("t", 1), ("t", 2)]),
                ("b", &["t"], &[("t", 3), ("t", 4), ("t", 5)]),
                ("c", &["t"], &[]),
            ],
            &[("t", 6)],
        );
        check_complete(&a, &[("t", 6)]);
        assert_eq!(a["a"].len(), 2);
        assert_eq!(a["b"].len(), 2);
        assert_eq!(a["c"].len(), 2);
        let before_a: BTreeSet<Tp> = [0, 1, 2].iter().map(|p| ("t".into(), *p)).collect();
        assert!(a["a"].is_subset(&before_a));
        // A member leaves: the others keep theirs and split its share.
        let b = run(
            Strategy::Sticky,
            &[
                ("a", &["t"], &[("t", 0), ("t", 1)]),
                ("b", &["t"], &[("t", 3), ("t", 4)]),
            ],
            &[("t", 6)],
        );
        check_complete(&b, &[("t", 6)]);
        assert!(b["a"].contains(&("t".into(), 0)) && b["a"].contains(&("t".into(), 1)));
        assert!(b["b"].contains(&("t".into(), 3)) && b["b"].contains(&("t".into(), 4)));
    }

    #[test]
    fn sticky_is_a_fixed_point() {
        let first = run(
            Strategy::Sticky,
            &[("a", &["t"], &[]), ("b", &["t"], &[]), ("c", &["t"], &[])],
            &[("t", 7)],
        );
        let cur: Vec<Vec<(&str, u32)>> = ["a", "b", "c"]
            .iter()
            .map(|m| first[*m].iter().map(|(t, p)| (t.as_str(), *p)).collect())
            .collect();
        let again = run(
            Strategy::Sticky,
            &[
                ("a", &["t"], &cur[0]),
                ("b", &["t"], &cur[1]),
                ("c", &["t"], &cur[2]),
            ],
            &[("t", 7)],
        );
        assert_eq!(first, again);
    }
}
