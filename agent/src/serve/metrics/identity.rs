//! The exporter's state per process identity: cumulative counters (with the carry that keeps
//! them monotonic when processes leave), call sites with their own series, their scores and the
//! `other` remainder.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Instant,
};

use prometheus::proto::LabelPair;

use super::labels::identity_labels;
use super::{HYSTERESIS, OTHER_SITE, SCORE_DECAY};
use crate::model::{Histogram, ProcessLabels, ProcessSnapshot};

/// One histogram bound, stored as its bit pattern so that it can key a map.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub(super) struct Bound(pub(super) u64);

/// Which histogram a bucket belongs to.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub(super) enum Hist {
    AllocSize,
    GoPause,
    GoAllocSize,
}

/// Every integer counter of a process, so that they can be carried generically.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub(super) enum Key {
    Calls(&'static str),
    Bytes(&'static str),
    Frees,
    Deletes(&'static str),
    Lost(&'static str),
    MapGrows(&'static str),
    MapGrowBytes,
    SliceGrows,
    SliceGrowBytes,
    GcCycles,
    /// Symbol-probe calls by kind, and argument sums by (kind, argument).
    ProbeCalls(&'static str),
    ProbeArg(&'static str, &'static str),
    Bucket(Hist, Bound),
    Count(Hist),
}

/// Cumulative values of one process (or the sum of several).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Counters {
    pub(super) ints: BTreeMap<Key, u64>,
    /// Histogram sums.
    pub(super) sums: BTreeMap<Hist, f64>,
}

impl Counters {
    pub(super) fn of(p: &ProcessSnapshot) -> Self {
        let mut c = Counters::default();
        for (&api, &n) in &p.calls {
            c.ints.insert(Key::Calls(api), n);
        }
        for (&api, &n) in &p.bytes {
            c.ints.insert(Key::Bytes(api), n);
        }
        if !p.without_libc {
            c.ints.insert(Key::Frees, p.frees);
            for (&api, &n) in &p.deletes {
                c.ints.insert(Key::Deletes(api), n);
            }
            c.histogram(Hist::AllocSize, &p.alloc_sizes);
        }
        for (&cause, &n) in &p.lost {
            c.ints.insert(Key::Lost(cause), n);
        }
        for (&kind, &n) in &p.probe_calls {
            c.ints.insert(Key::ProbeCalls(kind), n);
        }
        for (&(kind, arg), &n) in &p.probe_args {
            c.ints.insert(Key::ProbeArg(kind, arg), n);
        }
        if let Some(go) = &p.go {
            for (&kind, &n) in &go.map_grows {
                c.ints.insert(Key::MapGrows(kind), n);
            }
            c.ints.insert(Key::MapGrowBytes, go.map_grow_bytes);
            c.ints.insert(Key::SliceGrows, go.slice_grows);
            c.ints.insert(Key::SliceGrowBytes, go.slice_grow_bytes);
            c.ints.insert(Key::GcCycles, go.gc_cycles);
            c.histogram(Hist::GoPause, &go.gc_pauses);
            if let Some(sizes) = &go.alloc_sizes {
                c.histogram(Hist::GoAllocSize, sizes);
            }
        }
        c
    }

    pub(super) fn histogram(&mut self, which: Hist, h: &Histogram) {
        let mut in_buckets = 0u64;
        for &(bound, n) in &h.buckets {
            // A NaN bound cannot be ordered or rendered; its observations still count in +Inf.
            if bound.is_nan() {
                continue;
            }
            let slot = self
                .ints
                .entry(Key::Bucket(which, Bound(bound.to_bits())))
                .or_default();
            *slot = slot.saturating_add(n);
            in_buckets = in_buckets.saturating_add(n);
        }
        // +Inf must hold every bucket even if the source's count lags behind its buckets.
        self.ints.insert(Key::Count(which), h.count.max(in_buckets));
        self.sums.insert(which, h.sum);
    }

    pub(super) fn add(&mut self, other: &Counters) {
        for (k, &v) in &other.ints {
            let slot = self.ints.entry(*k).or_default();
            *slot = slot.saturating_add(v);
        }
        for (k, &v) in &other.sums {
            *self.sums.entry(*k).or_default() += v;
        }
    }

    /// Whether some value of `self` (the previous scrape) is missing or smaller in `cur`: the
    /// pid is not the process it was (pid reuse) or its source was reset.
    pub(super) fn decreased_in(&self, cur: &Counters) -> bool {
        self.ints
            .iter()
            .any(|(k, &v)| cur.ints.get(k).copied().unwrap_or(0) < v)
            || self
                .sums
                .iter()
                .any(|(k, &v)| cur.sums.get(k).copied().unwrap_or(0.0) < v)
    }

    pub(super) fn has(&self, k: Key) -> bool {
        self.ints.contains_key(&k)
    }

    pub(super) fn get(&self, k: Key) -> u64 {
        self.ints.get(&k).copied().unwrap_or(0)
    }
}

/// A calls/bytes pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct CallsBytes {
    pub(super) calls: u64,
    pub(super) bytes: u64,
}

impl CallsBytes {
    pub(super) fn add(self, o: CallsBytes) -> CallsBytes {
        CallsBytes {
            calls: self.calls.saturating_add(o.calls),
            bytes: self.bytes.saturating_add(o.bytes),
        }
    }
    pub(super) fn sub(self, o: CallsBytes) -> CallsBytes {
        CallsBytes {
            calls: self.calls.saturating_sub(o.calls),
            bytes: self.bytes.saturating_sub(o.bytes),
        }
    }
    pub(super) fn min(self, o: CallsBytes) -> CallsBytes {
        CallsBytes {
            calls: self.calls.min(o.calls),
            bytes: self.bytes.min(o.bytes),
        }
    }
    pub(super) fn max(self, o: CallsBytes) -> CallsBytes {
        CallsBytes {
            calls: self.calls.max(o.calls),
            bytes: self.bytes.max(o.bytes),
        }
    }
    pub(super) fn is_zero(self) -> bool {
        self.calls == 0 && self.bytes == 0
    }
}

/// A live allocations/bytes pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Live {
    pub(super) allocations: u64,
    pub(super) bytes: u64,
}

impl Live {
    pub(super) fn add(self, o: Live) -> Live {
        Live {
            allocations: self.allocations.saturating_add(o.allocations),
            bytes: self.bytes.saturating_add(o.bytes),
        }
    }
    pub(super) fn sub(self, o: Live) -> Live {
        Live {
            allocations: self.allocations.saturating_sub(o.allocations),
            bytes: self.bytes.saturating_sub(o.bytes),
        }
    }
    pub(super) fn is_zero(self) -> bool {
        self.allocations == 0 && self.bytes == 0
    }
}

/// A site as Prometheus names it. Different stacks with the same label are one site.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub(super) struct SiteKey {
    pub(super) kind: &'static str,
    pub(super) site: Arc<str>,
}

/// What one pid contributed at the previous scrape.
pub(super) struct PidState {
    pub(super) labels: ProcessLabels,
    pub(super) counters: Counters,
    pub(super) sites: HashMap<SiteKey, CallsBytes>,
    pub(super) exited_at: Option<Instant>,
}

/// Present (this scrape) values of one site, summed over the identity's processes.
#[derive(Clone, Copy, Default)]
pub(super) struct SiteAgg {
    pub(super) cur: CallsBytes,
    /// From running processes only.
    pub(super) live: Live,
    /// Increase since the previous scrape.
    pub(super) delta: CallsBytes,
}

/// A site that has its own series: `value = carry + present − base`.
#[derive(Clone, Copy, Default)]
pub(super) struct Sticky {
    /// The part of the site's history that stays in `other`.
    pub(super) base: CallsBytes,
    /// Final values of processes that left while the site had its series.
    pub(super) carry: CallsBytes,
    /// The value exported at the previous scrape.
    pub(super) last: CallsBytes,
}

/// Moving averages of a site's calls and bytes per scrape.
#[derive(Clone, Copy, Default, Debug)]
pub(super) struct Score {
    pub(super) bytes: f64,
    pub(super) calls: f64,
}

impl Score {
    /// Descending rank: more bytes first, then more calls.
    pub(super) fn rank(&self, o: &Score) -> std::cmp::Ordering {
        o.bytes
            .total_cmp(&self.bytes)
            .then(o.calls.total_cmp(&self.calls))
    }

    pub(super) fn beats(&self, incumbent: &Score) -> bool {
        if self.bytes > 0.0 || incumbent.bytes > 0.0 {
            self.bytes > HYSTERESIS * incumbent.bytes
        } else {
            self.calls > HYSTERESIS * incumbent.calls
        }
    }

    pub(super) fn is_zero(&self) -> bool {
        self.bytes <= 0.0 && self.calls <= 0.0
    }
}

/// Per-kind sums used to derive `other`.
#[derive(Clone, Copy, Default)]
pub(super) struct KindAgg {
    /// Everything ever seen through sites of this kind (carry + present).
    pub(super) total: CallsBytes,
    /// Σ of the sticky sites' values.
    pub(super) sticky: CallsBytes,
    /// Live values of the present sites without their own series.
    pub(super) other_live: Live,
}

/// The live Go maps of an identity's running processes first grown at one site, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct MapAgg {
    pub(super) len: u64,
    pub(super) slots: u64,
    pub(super) bytes: u64,
    pub(super) growing: u64,
    pub(super) bloated: u64,
}

impl MapAgg {
    /// Series this site's maps take: length and bytes always, load where slots are known, one
    /// per verdict held.
    pub(super) fn series(&self) -> usize {
        2 + usize::from(self.slots > 0)
            + usize::from(self.growing > 0)
            + usize::from(self.bloated > 0)
    }
}

/// One rendered site row.
pub(super) struct SiteRow {
    pub(super) kind: &'static str,
    pub(super) site: Arc<str>,
    pub(super) value: CallsBytes,
    pub(super) live: Live,
}

/// Everything known about one process identity.
pub(super) struct Identity {
    /// Cached identity label pairs, in output order.
    pub(super) labels: Vec<LabelPair>,
    pub(super) carry: Counters,
    /// Site values of processes that left, by kind.
    pub(super) kind_carry: HashMap<&'static str, CallsBytes>,
    pub(super) sticky: HashMap<SiteKey, Sticky>,
    pub(super) scores: HashMap<SiteKey, Score>,
    /// `other` values exported at the previous scrape, by kind.
    pub(super) last_other: HashMap<&'static str, CallsBytes>,
    pub(super) last_departure: Option<Instant>,

    // Recomputed at every scrape.
    pub(super) present: Counters,
    pub(super) live: Live,
    pub(super) running: u64,
    pub(super) has_present: bool,
    pub(super) go_versions: BTreeSet<String>,
    /// The allocators serving `malloc` in its processes (a bounded set of names).
    pub(super) allocators: BTreeSet<&'static str>,
    pub(super) sites: HashMap<SiteKey, SiteAgg>,
    pub(super) kinds: BTreeMap<&'static str, KindAgg>,
    pub(super) suppressed: bool,
    pub(super) rows: Vec<SiteRow>,
    /// Go maps by the site label of their first growth (running processes, this scrape).
    pub(super) go_maps: HashMap<Arc<str>, MapAgg>,
    /// The map sites exported at this scrape (within `top_k` and the series cap), largest
    /// first.
    pub(super) map_rows: Vec<(Arc<str>, MapAgg)>,
}

impl Identity {
    pub(super) fn new(labels: &ProcessLabels) -> Self {
        Identity {
            labels: identity_labels(labels),
            carry: Counters::default(),
            kind_carry: HashMap::new(),
            sticky: HashMap::new(),
            scores: HashMap::new(),
            last_other: HashMap::new(),
            last_departure: None,
            present: Counters::default(),
            live: Live::default(),
            running: 0,
            has_present: false,
            go_versions: BTreeSet::new(),
            allocators: BTreeSet::new(),
            sites: HashMap::new(),
            kinds: BTreeMap::new(),
            suppressed: false,
            rows: Vec::new(),
            go_maps: HashMap::new(),
            map_rows: Vec::new(),
        }
    }

    pub(super) fn begin_scrape(&mut self) {
        self.present = Counters::default();
        self.live = Live::default();
        self.running = 0;
        self.has_present = false;
        self.go_versions.clear();
        self.allocators.clear();
        self.sites.clear();
        self.kinds.clear();
        self.suppressed = false;
        self.rows.clear();
        self.go_maps.clear();
        self.map_rows.clear();
    }

    /// The `top_k` map sites holding the most bytes, largest first.
    pub(super) fn top_maps(&self, top_k: usize) -> Vec<(&Arc<str>, &MapAgg)> {
        let mut m: Vec<(&Arc<str>, &MapAgg)> = self.go_maps.iter().collect();
        m.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then_with(|| a.0.cmp(b.0)));
        m.truncate(top_k);
        m
    }

    /// Bytes held by the identity's live maps.
    pub(super) fn map_bytes(&self) -> u64 {
        self.go_maps.values().map(|m| m.bytes).sum()
    }

    /// A site's values of a process that left stay counted.
    pub(super) fn fold_site(&mut self, key: &SiteKey, v: CallsBytes) {
        let slot = self.kind_carry.entry(key.kind).or_default();
        *slot = slot.add(v);
        self.fold_sticky(key, v);
    }

    /// A sticky site keeps the values a process gave it.
    pub(super) fn fold_sticky(&mut self, key: &SiteKey, v: CallsBytes) {
        if let Some(s) = self.sticky.get_mut(key) {
            s.carry = s.carry.add(v);
        }
    }

    pub(super) fn depart(&mut self, pid: &PidState, at: Instant) {
        self.carry.add(&pid.counters);
        for (key, &v) in &pid.sites {
            self.fold_site(key, v);
        }
        self.last_departure = Some(self.last_departure.map_or(at, |t| t.max(at)));
    }

    pub(super) fn totals(&self) -> Counters {
        let mut t = self.carry.clone();
        t.add(&self.present);
        t
    }

    pub(super) fn sticky_value(&self, key: &SiteKey) -> CallsBytes {
        let Some(s) = self.sticky.get(key) else {
            return CallsBytes::default();
        };
        let cur = self.sites.get(key).map(|a| a.cur).unwrap_or_default();
        s.carry.add(cur).sub(s.base)
    }

    pub(super) fn site_live(&self, key: &SiteKey) -> Live {
        self.sites.get(key).map(|a| a.live).unwrap_or_default()
    }

    pub(super) fn other(&self, kind: &'static str) -> CallsBytes {
        let k = self.kinds.get(kind).copied().unwrap_or_default();
        let last = self.last_other.get(kind).copied().unwrap_or_default();
        // `max` with the exported value: `other` never goes down, even for odd input.
        k.total.sub(k.sticky).max(last)
    }

    pub(super) fn needs_other_row(&self, kind: &'static str) -> bool {
        let live = self
            .kinds
            .get(kind)
            .map(|k| k.other_live)
            .unwrap_or_default();
        !self.other(kind).is_zero() || !live.is_zero()
    }

    /// Site label sets this identity would export now.
    pub(super) fn rows_needed(&self) -> usize {
        if self.suppressed {
            return 0;
        }
        let others = self
            .kinds
            .keys()
            .filter(|k| self.needs_other_row(k))
            .count();
        self.sticky.len() + others
    }

    /// Recomputes the per-kind sums from scratch (after this scrape's aggregation).
    pub(super) fn compute_kinds(&mut self) {
        let mut kinds: BTreeMap<&'static str, KindAgg> = BTreeMap::new();
        for (&kind, &v) in &self.kind_carry {
            let k = kinds.entry(kind).or_default();
            k.total = k.total.add(v);
        }
        for (key, a) in &self.sites {
            let k = kinds.entry(key.kind).or_default();
            k.total = k.total.add(a.cur);
            if !self.sticky.contains_key(key) {
                k.other_live = k.other_live.add(a.live);
            }
        }
        for key in self.sticky.keys() {
            let v = self.sticky_value(key);
            let k = kinds.entry(key.kind).or_default();
            k.sticky = k.sticky.add(v);
        }
        self.kinds = kinds;
    }

    /// Gives `key` its own series, starting with as much of its history as `other` can give
    /// up without going below what it exported.
    pub(super) fn admit(&mut self, key: &SiteKey) {
        let Some(agg) = self.sites.get(key).copied() else {
            return;
        };
        let last = self.last_other.get(key.kind).copied().unwrap_or_default();
        let k = self.kinds.entry(key.kind).or_default();
        let slack = k.total.sub(k.sticky).sub(last);
        let start = agg.cur.min(slack);
        k.sticky = k.sticky.add(start);
        k.other_live = k.other_live.sub(agg.live);
        self.sticky.insert(
            key.clone(),
            Sticky {
                base: agg.cur.sub(start),
                carry: CallsBytes::default(),
                last: start,
            },
        );
    }

    /// Takes `key`'s series away; its value moves into `other`.
    pub(super) fn evict(&mut self, key: &SiteKey) {
        let v = self.sticky_value(key);
        let live = self.site_live(key);
        if self.sticky.remove(key).is_some() {
            let k = self.kinds.entry(key.kind).or_default();
            k.sticky = k.sticky.sub(v);
            k.other_live = k.other_live.add(live);
        }
    }

    pub(super) fn score(&self, key: &SiteKey) -> Score {
        self.scores.get(key).copied().unwrap_or_default()
    }

    /// The weakest sticky site, if any.
    pub(super) fn weakest(&self) -> Option<(SiteKey, Score)> {
        self.sticky
            .keys()
            .map(|k| (k.clone(), self.score(k)))
            .max_by(|a, b| a.1.rank(&b.1).then_with(|| a.0.cmp(&b.0)))
    }

    /// Present sites without a series that allocate, best first.
    pub(super) fn challengers(&self) -> Vec<(SiteKey, Score)> {
        let mut c: Vec<(SiteKey, Score)> = self
            .sites
            .keys()
            .filter(|k| !self.sticky.contains_key(*k) && &*k.site != OTHER_SITE)
            .map(|k| (k.clone(), self.score(k)))
            .filter(|(_, s)| !s.is_zero())
            .collect();
        c.sort_by(|a, b| a.1.rank(&b.1).then_with(|| a.0.cmp(&b.0)));
        c
    }

    pub(super) fn total_site_bytes(&self) -> u64 {
        self.kinds
            .values()
            .fold(0u64, |acc, k| acc.saturating_add(k.total.bytes))
    }

    /// A value that moved out of `other` into a site with its own series (a site named after
    /// it was first exported unnamed) would count twice: `other` cannot go down. The site's
    /// increase since the last scrape takes the difference instead (its base grows), as far
    /// as it goes.
    pub(super) fn rebalance(&mut self) {
        let kinds: Vec<&'static str> = self.kinds.keys().copied().collect();
        for kind in kinds {
            let k = self.kinds[kind];
            let last = self.last_other.get(kind).copied().unwrap_or_default();
            let mut deficit = last.sub(k.total.sub(k.sticky));
            if deficit.is_zero() {
                continue;
            }
            let mut keys: Vec<SiteKey> = self
                .sticky
                .keys()
                .filter(|key| key.kind == kind)
                .cloned()
                .collect();
            keys.sort();
            let mut taken = CallsBytes::default();
            for key in keys {
                let now = self.sticky_value(&key);
                let Some(s) = self.sticky.get_mut(&key) else {
                    continue;
                };
                let take = now.sub(s.last).min(deficit);
                s.base = s.base.add(take);
                deficit = deficit.sub(take);
                taken = taken.add(take);
                if deficit.is_zero() {
                    break;
                }
            }
            if let Some(k) = self.kinds.get_mut(kind) {
                k.sticky = k.sticky.sub(taken);
            }
        }
    }

    /// Fixes this scrape's site rows and remembers what `other` exported.
    pub(super) fn finish_rows(&mut self) {
        self.rebalance();
        let mut rows = Vec::new();
        let kinds: Vec<&'static str> = self.kinds.keys().copied().collect();
        for kind in kinds {
            let other = self.other(kind);
            self.last_other.insert(kind, other);
            if !self.suppressed && self.needs_other_row(kind) {
                let live = self
                    .kinds
                    .get(kind)
                    .map(|k| k.other_live)
                    .unwrap_or_default();
                rows.push(SiteRow {
                    kind,
                    site: Arc::from(OTHER_SITE),
                    value: other,
                    live,
                });
            }
        }
        let keys: Vec<SiteKey> = self.sticky.keys().cloned().collect();
        for key in keys {
            let value = self.sticky_value(&key);
            if let Some(s) = self.sticky.get_mut(&key) {
                s.last = value;
            }
            if !self.suppressed {
                rows.push(SiteRow {
                    kind: key.kind,
                    site: Arc::clone(&key.site),
                    value,
                    live: self.site_live(&key),
                });
            }
        }
        rows.sort_by(|a, b| (a.kind, &*a.site).cmp(&(b.kind, &*b.site)));
        self.rows = rows;
    }
}

/// Moving averages of bytes and calls per scrape; sites neither present nor sticky are forgotten.
pub(super) fn update_scores(id: &mut Identity) {
    let Identity {
        scores,
        sites,
        sticky,
        ..
    } = id;
    scores.retain(|k, _| sites.contains_key(k) || sticky.contains_key(k));
    for s in scores.values_mut() {
        s.bytes *= SCORE_DECAY;
        s.calls *= SCORE_DECAY;
    }
    for (k, a) in sites.iter() {
        let s = scores.entry(k.clone()).or_default();
        s.bytes += a.delta.bytes as f64;
        s.calls += a.delta.calls as f64;
    }
}
