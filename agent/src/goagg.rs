//! The agent's side of the kernel's Go growth aggregate (`GO_AGG`): which record each kernel
//! count belongs to, and how much of it has been handed on. Pure bookkeeping, no I/O
//! (`pipeline.rs` reads and deletes the map); unit-tested without root.
//!
//! The probe streams the first growth event of a key (`GoAggKey`: process, role, the two
//! innermost return addresses, the values the decoder reads) as a record with its stack, then inserts the key; a
//! later event with the same key only adds one to its per-CPU count. Every event is thus
//! either a record or one unit of a count, never both. The agent remembers the first record of
//! each key ([`GoAgg::note`]) and, at each drain, hands on the growth of the count since the
//! last drain as that many repeats of the record ([`GoAgg::take`]): exact counts and bytes,
//! attributed to the first event's stack. Counts are read whole (sums over CPUs) and never
//! reset in the kernel, so a drain cannot race with increments on other CPUs; a key's count
//! leaves the kernel only when its process is gone (nothing can add to it any more).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use allocwatch_common::{event::GoEvent, go::GoAggKey};

/// The first record of a key and the part of its count already handed on.
#[derive(Clone, Copy, Debug)]
struct Entry {
    first: GoEvent,
    taken: u64,
}

/// What a drain does with one key's count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Take {
    /// Hand on `n` repeats of this first record.
    Repeat(GoEvent, u64),
    /// Nothing new since the last drain.
    Nothing,
    /// No record of this key has been read yet (the probe writes it before the key, so it is
    /// in the ring): the count waits, untouched, for a later drain.
    Pending,
}

#[derive(Debug, Default)]
pub struct GoAgg {
    keys: BTreeMap<GoAggKey, Entry>,
    /// Keys seen without their record at the last drain while their process was gone: at the
    /// next such drain they are orphans (the ring has been read since), deleted.
    suspects: HashSet<GoAggKey>,
    /// Events handed on from the kernel's counts, all processes.
    pub repeats: u64,
}

impl GoAgg {
    /// A decoded Go record: the first of its key (if aggregated) names the key's counts.
    pub fn note(&mut self, ev: &GoEvent) {
        let Some(key) = GoAggKey::of(ev.header.tgid, ev.role, ev.ret_addr, ev.caller, &ev.values)
        else {
            return;
        };
        // Two CPUs may both stream the first event of a key: the first read stays.
        self.keys.entry(key).or_insert(Entry {
            first: *ev,
            taken: 0,
        });
    }

    /// The kernel's count of `key` is `total` (summed over CPUs).
    pub fn take(&mut self, key: &GoAggKey, total: u64) -> Take {
        let Some(e) = self.keys.get_mut(key) else {
            return Take::Pending;
        };
        self.suspects.remove(key);
        if total <= e.taken {
            // Equal: nothing new. Below: cannot happen while the key lives (counts only
            // rise); a key deleted and made again starts over.
            e.taken = total;
            return Take::Nothing;
        }
        let n = total - e.taken;
        e.taken = total;
        self.repeats += n;
        Take::Repeat(e.first, n)
    }

    /// A key read without its record, whose process is gone: whether it is an orphan now (also
    /// so at the previous drain), to be deleted uncounted.
    pub fn orphan(&mut self, key: GoAggKey) -> bool {
        !self.suspects.insert(key)
    }

    /// Keys of processes whose first records were read.
    pub fn tgids(&self) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        let mut next = self.keys.keys().next().map(|k| k.tgid);
        while let Some(t) = next {
            out.insert(t);
            next = self.keys.range(after(t)..).next().map(|(k, _)| k.tgid);
        }
        out
    }

    /// Known keys of `tgid`.
    pub fn keys_of(&self, tgid: u32) -> Vec<GoAggKey> {
        self.keys
            .range(first_of(tgid)..after(tgid))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Forgets keys that left the kernel map.
    pub fn forget(&mut self, keys: &[GoAggKey]) {
        for k in keys {
            self.keys.remove(k);
            self.suspects.remove(k);
        }
    }

    /// Keys whose first record was read.
    pub fn held(&self) -> usize {
        self.keys.len()
    }
}

fn first_of(tgid: u32) -> GoAggKey {
    GoAggKey {
        tgid,
        ..GoAggKey::default()
    }
}

/// The first key past every key of `tgid`.
fn after(tgid: u32) -> GoAggKey {
    match tgid.checked_add(1) {
        Some(t) => first_of(t),
        None => GoAggKey {
            tgid,
            role: u32::MAX,
            ret_addr: u64::MAX,
            caller: u64::MAX,
            values: [u64::MAX; allocwatch_common::go::GO_VALUES],
        },
    }
}

#[cfg(test)]
mod tests {
    use allocwatch_common::{
        event::{EventHeader, EventKind},
        go::GoRole,
    };

    use super::*;

    fn event(tgid: u32, role: GoRole, stack_id: i64, values: [u64; 6]) -> GoEvent {
        GoEvent {
            header: EventHeader {
                kind: EventKind::Go as u32,
                tgid,
            },
            role: role as u32,
            tid: tgid,
            ts_ns: 1,
            goroutine: 0,
            ret_addr: 0x4000,
            stack_id,
            values,
            caller: 0x5000,
        }
    }

    fn key(ev: &GoEvent) -> GoAggKey {
        GoAggKey::of(ev.header.tgid, ev.role, ev.ret_addr, ev.caller, &ev.values).unwrap()
    }

    #[test]
    fn counts_are_handed_on_once_as_deltas_with_the_first_stack() {
        let mut a = GoAgg::default();
        let first = event(10, GoRole::SliceGrow, 7, [9, 8, 8, 0, 0x1000, 0]);
        // Same key, another stack and old array: a second record (two CPUs) keeps the first.
        let again = event(10, GoRole::SliceGrow, 8, [9, 8, 8, 0, 0x2000, 0]);
        a.note(&first);
        a.note(&again);
        assert_eq!(a.held(), 1);
        let k = key(&first);
        assert_eq!(k, key(&again), "the old array pointer is not in the key");
        assert_eq!(a.take(&k, 0), Take::Nothing);
        assert_eq!(a.take(&k, 5), Take::Repeat(first, 5));
        assert_eq!(a.take(&k, 5), Take::Nothing);
        assert_eq!(a.take(&k, 12), Take::Repeat(first, 7));
        assert_eq!(a.repeats, 12);
    }

    #[test]
    fn a_count_before_its_record_waits_whole() {
        let mut a = GoAgg::default();
        let ev = event(10, GoRole::MapHashGrow, 7, [0x5000, 13, 1, 0, 144, 8]);
        let k = key(&ev);
        assert_eq!(a.take(&k, 3), Take::Pending);
        assert_eq!(a.take(&k, 4), Take::Pending);
        a.note(&ev);
        assert_eq!(
            a.take(&k, 4),
            Take::Repeat(ev, 4),
            "nothing lost while pending"
        );
    }

    #[test]
    fn keys_are_found_and_forgotten_per_process() {
        let mut a = GoAgg::default();
        for (tgid, len) in [(10, 1), (10, 2), (11, 1), (u32::MAX, 1)] {
            a.note(&event(tgid, GoRole::SliceGrow, 1, [len, 0, 8, 0, 0, 0]));
        }
        // Not aggregated: allocations and GC events.
        a.note(&event(10, GoRole::Malloc, 1, [40000, 0, 0, 0, 0, 0]));
        assert_eq!(a.tgids(), BTreeSet::from([10, 11, u32::MAX]));
        let ten = a.keys_of(10);
        assert_eq!(ten.len(), 2);
        assert_eq!(a.keys_of(u32::MAX).len(), 1);
        a.forget(&ten);
        assert_eq!(a.tgids(), BTreeSet::from([11, u32::MAX]));
        assert_eq!(a.take(&ten[0], 1), Take::Pending);
    }

    #[test]
    fn an_unknown_key_of_a_gone_process_is_an_orphan_at_its_second_drain() {
        let mut a = GoAgg::default();
        let k = key(&event(10, GoRole::SliceGrow, 1, [2, 1, 8, 0, 0, 0]));
        assert!(!a.orphan(k));
        assert!(a.orphan(k));
    }
}
