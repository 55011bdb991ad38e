//! `/metrics`: the Prometheus text exposition of process snapshots, with bounded cardinality.
//!
//! Behaviour a reader of the series can rely on:
//!
//! * **Identity, not pid.** Series carry `namespace`, `pod`, `container`, `comm`, `exe` — never a
//!   pid or a stack id. Processes with equal labels are summed: two replicas of a binary in one
//!   container are one set of series, and `allocwatch_processes` says how many are running.
//! * **Counters never go down** while their series exists. A process that exits keeps
//!   contributing its final values; when it is forgotten (`ttl` after its exit, or when the
//!   source stops listing it, or when its pid is reused or its labels change), its final values
//!   are folded into a per-identity carry, so the identity's sums stay monotonic as long as the
//!   identity has any series. Gauges (`live_*`) count only running processes: an exited
//!   process holds no memory.
//! * **Expiry.** An identity's series disappear once none of its processes is running or
//!   within `ttl` of leaving (exit time, or the scrape at which the source stopped listing it).
//!   If the identity comes back later its counters start again from the new processes' values.
//! * **Call sites** (`allocwatch_site_*{site="fn ← caller", kind}`) exist for at most `top_k`
//!   sites per identity, ranked by recently allocated bytes (a per-scrape moving average), the
//!   rest summed into `site="other"` per kind; and the total number of `allocwatch_site_*`
//!   series never exceeds `max_site_series` (each site is one series in each of the
//!   [`SITE_FAMILIES`] families). A site keeps its series until a challenger allocates at
//!   least twice as fast (hysteresis, so sites do not flap), the identity expires, or the
//!   global cap forces the lowest-ranked sites out. To keep every site series monotonic, a
//!   site's counter starts with as much of its history as can be taken out of `other`
//!   without `other` going below what it already exported (all of it for a new identity or a
//!   site new since the last scrape); on eviction its value moves into `other`. Summing a
//!   kind's site series over `site` always gives the identity's total for that kind as seen
//!   through call sites. Under the cap, identities are served largest first (bytes allocated
//!   through sites): one that does not fit loses its weakest sites, and those whose `other`
//!   rows alone do not fit get no site series (their core series still count everything).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus::{
    TextEncoder,
    proto::{self, LabelPair, Metric, MetricFamily, MetricType},
};

use super::model::{Histogram, ProcessLabels, ProcessSnapshot, SelfStats, SiteSnapshot};
use crate::{report::pprof::function_name, symbolize::Frame};

/// The `allocwatch_site_*` families; one site label set costs one series in each.
pub const SITE_FAMILIES: usize = 4;

/// The site label of the remainder of an identity's sites of one kind.
pub const OTHER_SITE: &str = "other";

/// Longest `site` label value (bytes); longer ones are cut at a character boundary and end in `…`.
const MAX_SITE_LABEL: usize = 256;

/// Weight of the previous score in a site's moving average of bytes per scrape.
const SCORE_DECAY: f64 = 0.5;

/// A challenger must allocate this many times faster than the weakest site to take its series.
const HYSTERESIS: f64 = 2.0;

/// The `/metrics` text format's content type (the format `prometheus::TextEncoder` writes).
// Site labels hold non-ASCII (`←`): say UTF-8 explicitly.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("encoding the metrics text: {0}")]
    Encode(#[from] prometheus::Error),
    #[error("the agent is still starting (no metrics rendered yet); try again")]
    NotReady,
}

/// Cardinality and expiry settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// How long series of an exited (or vanished) process are kept.
    pub ttl: Duration,
    /// Call sites per process identity with their own series.
    pub top_k: usize,
    /// Hard cap on the number of `allocwatch_site_*` series, over all identities.
    pub max_site_series: usize,
    /// The probes track outstanding allocations and request sizes (modes `full` and
    /// `stacks-off`); otherwise the live gauges and the size histogram are not exported (they
    /// would read 0, which is a claim, not a lack of data).
    pub live: bool,
}

/// One histogram bound, stored as its bit pattern so that it can key a map.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
struct Bound(u64);

/// Which histogram a bucket belongs to.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
enum Hist {
    AllocSize,
    GoPause,
    GoAllocSize,
}

/// Every integer counter of a process, so that they can be carried generically.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
enum Key {
    Calls(&'static str),
    Bytes(&'static str),
    Frees,
    Lost(&'static str),
    MapGrows(&'static str),
    MapGrowBytes,
    SliceGrows,
    SliceGrowBytes,
    GcCycles,
    Bucket(Hist, Bound),
    Count(Hist),
}

/// Cumulative values of one process (or the sum of several).
#[derive(Clone, Debug, Default, PartialEq)]
struct Counters {
    u: BTreeMap<Key, u64>,
    /// Histogram sums.
    f: BTreeMap<Hist, f64>,
}

impl Counters {
    fn of(p: &ProcessSnapshot) -> Self {
        let mut c = Counters::default();
        for (&api, &n) in &p.calls {
            c.u.insert(Key::Calls(api), n);
        }
        for (&api, &n) in &p.bytes {
            c.u.insert(Key::Bytes(api), n);
        }
        c.u.insert(Key::Frees, p.frees);
        for (&cause, &n) in &p.lost {
            c.u.insert(Key::Lost(cause), n);
        }
        c.histogram(Hist::AllocSize, &p.alloc_sizes);
        if let Some(go) = &p.go {
            for (&kind, &n) in &go.map_grows {
                c.u.insert(Key::MapGrows(kind), n);
            }
            c.u.insert(Key::MapGrowBytes, go.map_grow_bytes);
            c.u.insert(Key::SliceGrows, go.slice_grows);
            c.u.insert(Key::SliceGrowBytes, go.slice_grow_bytes);
            c.u.insert(Key::GcCycles, go.gc_cycles);
            c.histogram(Hist::GoPause, &go.gc_pauses);
            c.histogram(Hist::GoAllocSize, &go.alloc_sizes);
        }
        c
    }

    fn histogram(&mut self, which: Hist, h: &Histogram) {
        let mut in_buckets = 0u64;
        for &(bound, n) in &h.buckets {
            // A NaN bound cannot be ordered or rendered; its observations still count in +Inf.
            if bound.is_nan() {
                continue;
            }
            let slot = self
                .u
                .entry(Key::Bucket(which, Bound(bound.to_bits())))
                .or_default();
            *slot = slot.saturating_add(n);
            in_buckets = in_buckets.saturating_add(n);
        }
        // +Inf must hold every bucket even if the source's count lags behind its buckets.
        self.u.insert(Key::Count(which), h.count.max(in_buckets));
        self.f.insert(which, h.sum);
    }

    fn add(&mut self, other: &Counters) {
        for (k, &v) in &other.u {
            let slot = self.u.entry(*k).or_default();
            *slot = slot.saturating_add(v);
        }
        for (k, &v) in &other.f {
            *self.f.entry(*k).or_default() += v;
        }
    }

    /// Whether some value of `self` (the previous scrape) is missing or smaller in `cur`: the
    /// pid is not the process it was (pid reuse) or its source was reset.
    fn decreased_in(&self, cur: &Counters) -> bool {
        self.u
            .iter()
            .any(|(k, &v)| cur.u.get(k).copied().unwrap_or(0) < v)
            || self
                .f
                .iter()
                .any(|(k, &v)| cur.f.get(k).copied().unwrap_or(0.0) < v)
    }

    fn get(&self, k: Key) -> u64 {
        self.u.get(&k).copied().unwrap_or(0)
    }
}

/// A calls/bytes pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Cv {
    calls: u64,
    bytes: u64,
}

impl Cv {
    fn add(self, o: Cv) -> Cv {
        Cv {
            calls: self.calls.saturating_add(o.calls),
            bytes: self.bytes.saturating_add(o.bytes),
        }
    }
    fn sub(self, o: Cv) -> Cv {
        Cv {
            calls: self.calls.saturating_sub(o.calls),
            bytes: self.bytes.saturating_sub(o.bytes),
        }
    }
    fn min(self, o: Cv) -> Cv {
        Cv {
            calls: self.calls.min(o.calls),
            bytes: self.bytes.min(o.bytes),
        }
    }
    fn max(self, o: Cv) -> Cv {
        Cv {
            calls: self.calls.max(o.calls),
            bytes: self.bytes.max(o.bytes),
        }
    }
    fn is_zero(self) -> bool {
        self.calls == 0 && self.bytes == 0
    }
}

/// A live allocations/bytes pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Live {
    allocations: u64,
    bytes: u64,
}

impl Live {
    fn add(self, o: Live) -> Live {
        Live {
            allocations: self.allocations.saturating_add(o.allocations),
            bytes: self.bytes.saturating_add(o.bytes),
        }
    }
    fn sub(self, o: Live) -> Live {
        Live {
            allocations: self.allocations.saturating_sub(o.allocations),
            bytes: self.bytes.saturating_sub(o.bytes),
        }
    }
    fn is_zero(self) -> bool {
        self.allocations == 0 && self.bytes == 0
    }
}

/// A site as Prometheus names it. Different stacks with the same label are one site.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
struct SiteKey {
    kind: &'static str,
    site: Arc<str>,
}

/// What one pid contributed at the previous scrape.
struct PidState {
    labels: ProcessLabels,
    counters: Counters,
    sites: HashMap<SiteKey, Cv>,
    exited_at: Option<Instant>,
}

/// Present (this scrape) values of one site, summed over the identity's processes.
#[derive(Clone, Copy, Default)]
struct SiteAgg {
    cur: Cv,
    /// From running processes only.
    live: Live,
    /// Increase since the previous scrape.
    delta: Cv,
}

/// A site that has its own series: `value = carry + present − base`.
#[derive(Clone, Copy, Default)]
struct Sticky {
    /// The part of the site's history that stays in `other`.
    base: Cv,
    /// Final values of processes that left while the site had its series.
    carry: Cv,
    /// The value exported at the previous scrape.
    last: Cv,
}

/// Moving averages of a site's calls and bytes per scrape.
#[derive(Clone, Copy, Default, Debug)]
struct Score {
    bytes: f64,
    calls: f64,
}

impl Score {
    /// Descending rank: more bytes first, then more calls.
    fn rank(&self, o: &Score) -> std::cmp::Ordering {
        o.bytes
            .total_cmp(&self.bytes)
            .then(o.calls.total_cmp(&self.calls))
    }

    fn beats(&self, incumbent: &Score) -> bool {
        if self.bytes > 0.0 || incumbent.bytes > 0.0 {
            self.bytes > HYSTERESIS * incumbent.bytes
        } else {
            self.calls > HYSTERESIS * incumbent.calls
        }
    }

    fn is_zero(&self) -> bool {
        self.bytes <= 0.0 && self.calls <= 0.0
    }
}

/// Per-kind sums used to derive `other`.
#[derive(Clone, Copy, Default)]
struct KindAgg {
    /// Everything ever seen through sites of this kind (carry + present).
    total: Cv,
    /// Σ of the sticky sites' values.
    sticky: Cv,
    /// Live values of the present sites without their own series.
    other_live: Live,
}

/// One rendered site row.
struct SiteRow {
    kind: &'static str,
    site: Arc<str>,
    value: Cv,
    live: Live,
}

/// Everything known about one process identity.
struct Identity {
    /// Cached identity label pairs, in output order.
    labels: Vec<LabelPair>,
    carry: Counters,
    /// Site values of processes that left, by kind.
    kind_carry: HashMap<&'static str, Cv>,
    sticky: HashMap<SiteKey, Sticky>,
    scores: HashMap<SiteKey, Score>,
    /// `other` values exported at the previous scrape, by kind.
    last_other: HashMap<&'static str, Cv>,
    last_departure: Option<Instant>,

    // Recomputed at every scrape.
    present: Counters,
    live: Live,
    running: u64,
    has_present: bool,
    go_versions: BTreeSet<String>,
    sites: HashMap<SiteKey, SiteAgg>,
    kinds: BTreeMap<&'static str, KindAgg>,
    suppressed: bool,
    rows: Vec<SiteRow>,
}

impl Identity {
    fn new(labels: &ProcessLabels) -> Self {
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
            sites: HashMap::new(),
            kinds: BTreeMap::new(),
            suppressed: false,
            rows: Vec::new(),
        }
    }

    fn begin_scrape(&mut self) {
        self.present = Counters::default();
        self.live = Live::default();
        self.running = 0;
        self.has_present = false;
        self.go_versions.clear();
        self.sites.clear();
        self.kinds.clear();
        self.suppressed = false;
        self.rows.clear();
    }

    /// A site's values of a process that left stay counted.
    fn fold_site(&mut self, key: &SiteKey, v: Cv) {
        let slot = self.kind_carry.entry(key.kind).or_default();
        *slot = slot.add(v);
        self.fold_sticky(key, v);
    }

    /// A sticky site keeps the values a process gave it.
    fn fold_sticky(&mut self, key: &SiteKey, v: Cv) {
        if let Some(s) = self.sticky.get_mut(key) {
            s.carry = s.carry.add(v);
        }
    }

    fn depart(&mut self, pid: &PidState, at: Instant) {
        self.carry.add(&pid.counters);
        for (key, &v) in &pid.sites {
            self.fold_site(key, v);
        }
        self.last_departure = Some(self.last_departure.map_or(at, |t| t.max(at)));
    }

    fn totals(&self) -> Counters {
        let mut t = self.carry.clone();
        t.add(&self.present);
        t
    }

    fn sticky_value(&self, key: &SiteKey) -> Cv {
        let Some(s) = self.sticky.get(key) else {
            return Cv::default();
        };
        let cur = self.sites.get(key).map(|a| a.cur).unwrap_or_default();
        s.carry.add(cur).sub(s.base)
    }

    fn site_live(&self, key: &SiteKey) -> Live {
        self.sites.get(key).map(|a| a.live).unwrap_or_default()
    }

    fn other(&self, kind: &'static str) -> Cv {
        let k = self.kinds.get(kind).copied().unwrap_or_default();
        let last = self.last_other.get(kind).copied().unwrap_or_default();
        // `max` with the exported value: `other` never goes down, even for odd input.
        k.total.sub(k.sticky).max(last)
    }

    fn needs_other_row(&self, kind: &'static str) -> bool {
        let live = self
            .kinds
            .get(kind)
            .map(|k| k.other_live)
            .unwrap_or_default();
        !self.other(kind).is_zero() || !live.is_zero()
    }

    /// Site label sets this identity would export now.
    fn rows_needed(&self) -> usize {
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
    fn compute_kinds(&mut self) {
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
    fn admit(&mut self, key: &SiteKey) {
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
                carry: Cv::default(),
                last: start,
            },
        );
    }

    /// Takes `key`'s series away; its value moves into `other`.
    fn evict(&mut self, key: &SiteKey) {
        let v = self.sticky_value(key);
        let live = self.site_live(key);
        if self.sticky.remove(key).is_some() {
            let k = self.kinds.entry(key.kind).or_default();
            k.sticky = k.sticky.sub(v);
            k.other_live = k.other_live.add(live);
        }
    }

    fn score(&self, key: &SiteKey) -> Score {
        self.scores.get(key).copied().unwrap_or_default()
    }

    /// The weakest sticky site, if any.
    fn weakest(&self) -> Option<(SiteKey, Score)> {
        self.sticky
            .keys()
            .map(|k| (k.clone(), self.score(k)))
            .max_by(|a, b| a.1.rank(&b.1).then_with(|| a.0.cmp(&b.0)))
    }

    /// Present sites without a series that allocate, best first.
    fn challengers(&self) -> Vec<(SiteKey, Score)> {
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

    fn total_site_bytes(&self) -> u64 {
        self.kinds
            .values()
            .fold(0u64, |acc, k| acc.saturating_add(k.total.bytes))
    }

    /// A value that moved out of `other` into a site with its own series (a site named after
    /// it was first exported unnamed) would count twice: `other` cannot go down. The site's
    /// increase since the last scrape takes the difference instead (its base grows), as far
    /// as it goes.
    fn rebalance(&mut self) {
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
            let mut taken = Cv::default();
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
    fn finish_rows(&mut self) {
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

/// The identity labels in output order.
fn identity_labels(l: &ProcessLabels) -> Vec<LabelPair> {
    [
        ("namespace", &l.namespace),
        ("pod", &l.pod),
        ("container", &l.container),
        ("comm", &l.comm),
        ("exe", &l.exe),
    ]
    .into_iter()
    .map(|(n, v)| label(n, v))
    .collect()
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut lp = LabelPair::default();
    lp.set_name(name.to_string());
    lp.set_value(value.to_string());
    lp
}

/// `fn ← caller` from the innermost two frames (`(no stack)` without frames). Never equal to
/// [`OTHER_SITE`], and at most [`MAX_SITE_LABEL`] bytes.
pub fn site_label(frames: &[Frame]) -> String {
    let mut s = match frames {
        [] => "(no stack)".to_string(),
        [only] => function_name(only),
        [first, caller, ..] => format!("{} ← {}", function_name(first), function_name(caller)),
    };
    if s == OTHER_SITE {
        s.push_str(" ← ?");
    }
    if s.len() > MAX_SITE_LABEL {
        let mut cut = MAX_SITE_LABEL - '…'.len_utf8();
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Site labels by call chain: the agent's chains are shared (interned), so each label is
/// made once, not once per process and scrape.
#[derive(Default)]
struct Labels(HashMap<usize, LabelOf>);

/// A chain (weakly: the label goes when the chain does) and its label.
type LabelOf = (std::sync::Weak<[Frame]>, Arc<str>);

impl Labels {
    fn of(&mut self, frames: &Arc<[Frame]>) -> Arc<str> {
        let key = Arc::as_ptr(frames).cast::<Frame>() as usize;
        if let Some((weak, label)) = self.0.get(&key)
            && weak.upgrade().is_some_and(|f| Arc::ptr_eq(&f, frames))
        {
            return Arc::clone(label);
        }
        let label: Arc<str> = Arc::from(site_label(frames));
        self.0
            .insert(key, (Arc::downgrade(frames), Arc::clone(&label)));
        label
    }

    /// Drops the labels of chains nobody holds any more.
    fn purge(&mut self) {
        self.0.retain(|_, (weak, _)| weak.strong_count() > 0);
    }
}

fn sites_of(sites: &[SiteSnapshot], labels: &mut Labels) -> HashMap<SiteKey, (Cv, Live)> {
    let mut out: HashMap<SiteKey, (Cv, Live)> = HashMap::with_capacity(sites.len());
    for s in sites {
        // A gone process's folded sites count toward its kind under `other` (a label no
        // real site has), and never become a site of their own (see `challengers`).
        let site = if s.remainder {
            Arc::from(OTHER_SITE)
        } else {
            labels.of(&s.frames)
        };
        let key = SiteKey { kind: s.kind, site };
        let e = out.entry(key).or_default();
        e.0 = e.0.add(Cv {
            calls: s.calls,
            bytes: s.bytes,
        });
        e.1 = e.1.add(Live {
            allocations: s.live_allocations,
            bytes: s.live_bytes,
        });
    }
    out
}

/// Turns successive snapshots into the exposition, keeping what monotonicity and expiry need.
pub struct Exporter {
    cfg: MetricsConfig,
    /// By (pid, program image).
    pids: HashMap<(u32, u32), PidState>,
    ids: BTreeMap<ProcessLabels, Identity>,
    /// `allocwatch_site_*` series in the last rendering.
    site_series: usize,
    labels: Labels,
}

impl Exporter {
    pub fn new(cfg: MetricsConfig) -> Self {
        Exporter {
            cfg,
            pids: HashMap::new(),
            ids: BTreeMap::new(),
            site_series: 0,
            labels: Labels::default(),
        }
    }

    /// Updates the state with a snapshot and renders the exposition. `scrape_started` is when
    /// the scrape began (before the snapshot was taken): `allocwatch_scrape_duration_seconds`
    /// is the time from then until the self-metrics are rendered.
    pub fn render(
        &mut self,
        procs: &[ProcessSnapshot],
        stats: &SelfStats,
        now: Instant,
        scrape_started: Instant,
    ) -> Result<String, MetricsError> {
        self.update(procs, now);
        self.labels.purge();
        let mut families = self.process_families();
        families.extend(self.self_families(stats, scrape_started.elapsed()));
        let mut out = String::new();
        TextEncoder::new().encode_utf8(&families, &mut out)?;
        Ok(out)
    }

    /// A process (program image) that is gone for good leaves with its final values: the
    /// source lists it no more (it keeps no per-process detail for the TTL, so a node's churn
    /// costs it nothing), its values stay in its identity's sums, and the identity's series
    /// expire `ttl` after `at` unless another of its processes runs.
    pub fn depart(&mut self, p: &ProcessSnapshot, at: Instant) {
        let fin = PidState {
            labels: p.labels.clone(),
            counters: Counters::of(p),
            sites: sites_of(&p.sites, &mut self.labels)
                .into_iter()
                .map(|(k, (v, _))| (k, v))
                .collect(),
            exited_at: p.exited_at,
        };
        if let Some(old) = self.pids.remove(&(p.pid, p.image))
            && let Some(id) = self.ids.get_mut(&old.labels)
        {
            if old.labels == fin.labels {
                // As at a scrape: a site that went into `other` keeps its own series' value.
                for (key, &v) in &old.sites {
                    let now_v = fin.sites.get(key).copied().unwrap_or_default();
                    if now_v.calls < v.calls || now_v.bytes < v.bytes {
                        id.fold_sticky(key, v);
                    }
                }
            } else {
                id.depart(&old, at);
            }
        }
        self.ids
            .entry(fin.labels.clone())
            .or_insert_with(|| Identity::new(&fin.labels))
            .depart(&fin, at);
    }

    fn expired(&self, exited_at: Option<Instant>, now: Instant) -> bool {
        exited_at.is_some_and(|t| now.saturating_duration_since(t) >= self.cfg.ttl)
    }

    fn update(&mut self, procs: &[ProcessSnapshot], now: Instant) {
        for id in self.ids.values_mut() {
            id.begin_scrape();
        }
        let mut seen: HashSet<(u32, u32)> = HashSet::with_capacity(procs.len());
        for p in procs {
            // A duplicate (pid, image) is a source bug; the first entry wins.
            if self.expired(p.exited_at, now) || !seen.insert((p.pid, p.image)) {
                continue;
            }
            self.update_pid(p, now);
        }
        // Processes the source no longer lists, or whose TTL ran out, leave their identity.
        let gone: Vec<(u32, u32)> = self
            .pids
            .keys()
            .filter(|pid| !seen.contains(pid))
            .copied()
            .collect();
        for pid in gone {
            if let Some(st) = self.pids.remove(&pid) {
                let at = st.exited_at.unwrap_or(now);
                if let Some(id) = self.ids.get_mut(&st.labels) {
                    id.depart(&st, at);
                }
            }
        }
        let ttl = self.cfg.ttl;
        self.ids.retain(|_, id| {
            id.has_present
                || id
                    .last_departure
                    .is_some_and(|t| now.saturating_duration_since(t) < ttl)
        });
        for id in self.ids.values_mut() {
            update_scores(id);
            id.compute_kinds();
        }
        self.select_sites();
        let mut n = 0;
        for id in self.ids.values_mut() {
            id.finish_rows();
            n += id.rows.len();
        }
        self.site_series = n * SITE_FAMILIES;
    }

    fn update_pid(&mut self, p: &ProcessSnapshot, now: Instant) {
        let cur = Counters::of(p);
        let cur_sites = sites_of(&p.sites, &mut self.labels);
        let mut last_sites: HashMap<SiteKey, Cv> = HashMap::new();
        if let Some(old) = self.pids.remove(&(p.pid, p.image)) {
            if old.labels != p.labels || old.counters.decreased_in(&cur) {
                // Another process under a reused pid, or one that moved to other labels: the
                // old one leaves its identity with its final values.
                let at = if old.labels != p.labels {
                    now
                } else {
                    old.exited_at.unwrap_or(now)
                };
                if let Some(id) = self.ids.get_mut(&old.labels) {
                    id.depart(&old, at);
                }
            } else {
                let id = self.ids.get_mut(&old.labels);
                if let Some(id) = id {
                    // A site that vanished or went down under a running process moved: to
                    // another label (it was named since), or into the process's unnamed
                    // part (`other`: not named yet, or folded away when it exited). Its
                    // value is still in the process's sums, so only its own series keeps
                    // what it exported.
                    for (key, &v) in &old.sites {
                        let now_v = cur_sites.get(key).map(|s| s.0).unwrap_or_default();
                        if now_v.calls < v.calls || now_v.bytes < v.bytes {
                            id.fold_sticky(key, v);
                        } else {
                            last_sites.insert(key.clone(), v);
                        }
                    }
                }
            }
        }
        let id = self
            .ids
            .entry(p.labels.clone())
            .or_insert_with(|| Identity::new(&p.labels));
        let running = p.exited_at.is_none();
        id.has_present = true;
        id.present.add(&cur);
        if running {
            id.running += 1;
            id.live = id.live.add(Live {
                allocations: p.live_allocations,
                bytes: p.live_bytes,
            });
        }
        if let Some(go) = &p.go {
            id.go_versions.insert(go.version.clone());
        }
        let mut pid_sites = HashMap::with_capacity(cur_sites.len());
        for (key, (v, live)) in cur_sites {
            let before = last_sites.get(&key).copied().unwrap_or_default();
            let agg = id.sites.entry(key.clone()).or_default();
            agg.cur = agg.cur.add(v);
            agg.delta = agg.delta.add(v.sub(before));
            if running {
                agg.live = agg.live.add(live);
            }
            pid_sites.insert(key, v);
        }
        self.pids.insert(
            (p.pid, p.image),
            PidState {
                labels: p.labels.clone(),
                counters: cur,
                sites: pid_sites,
                exited_at: p.exited_at,
            },
        );
    }

    /// Chooses which sites have their own series, within `top_k` per identity and the global
    /// cap. Identities are served largest first (bytes allocated through sites), each taking
    /// what it needs of the cap: a smaller one gets what is left, possibly nothing.
    fn select_sites(&mut self) {
        let budget = self.cfg.max_site_series / SITE_FAMILIES;
        let top_k = self.cfg.top_k;
        let mut order: Vec<(u64, ProcessLabels)> = self
            .ids
            .iter()
            .map(|(l, id)| (id.total_site_bytes(), l.clone()))
            .collect();
        order.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let mut used = 0usize;
        for (_, labels) in &order {
            let Some(id) = self.ids.get_mut(labels) else {
                continue;
            };
            // More sites than top_k (a lowered setting): drop the weakest.
            while id.sticky.len() > top_k {
                let Some((key, _)) = id.weakest() else { break };
                id.evict(&key);
            }
            // Free slots go to the best challengers while the cap has room.
            for (key, _) in id.challengers() {
                if id.sticky.len() >= top_k {
                    break;
                }
                id.admit(&key);
                if used + id.rows_needed() > budget {
                    // Taking it back returns its value to `other`, which ends where it was.
                    id.evict(&key);
                }
            }
            // A site that allocates much faster than the weakest one takes its series.
            // Terminates: every swap raises the sum of the sticky sites' scores.
            while let (Some((weak, weak_score)), Some((best, best_score))) =
                (id.weakest(), id.challengers().into_iter().next())
            {
                if !best_score.beats(&weak_score) {
                    break;
                }
                id.evict(&weak);
                id.admit(&best);
                if used + id.rows_needed() > budget {
                    // The swap opened an `other` row the cap has no room for: take the
                    // challenger out again (the weak site's value stays in `other`).
                    id.evict(&best);
                    break;
                }
            }
            // Over the cap: the weakest sites go, then the identity's site series altogether.
            while used + id.rows_needed() > budget {
                let Some((key, _)) = id.weakest() else { break };
                id.evict(&key);
            }
            if used + id.rows_needed() > budget {
                id.suppressed = true;
            }
            used += id.rows_needed();
        }
    }

    fn process_families(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        let totals: Vec<(&Identity, Counters)> =
            self.ids.values().map(|id| (id, id.totals())).collect();

        let mut f = Family::new(
            "allocwatch_processes",
            "Running traced processes with these labels (their series are summed).",
            MetricType::GAUGE,
        );
        for (id, _) in &totals {
            f.gauge(&id.labels, &[], id.running as f64);
        }
        f.push_to(&mut out);

        let mut calls = Family::new(
            "allocwatch_alloc_calls_total",
            "Malloc-family calls by API.",
            MetricType::COUNTER,
        );
        let mut bytes = Family::new(
            "allocwatch_alloc_bytes_total",
            "Bytes requested from the malloc family, by API.",
            MetricType::COUNTER,
        );
        let mut frees = Family::new(
            "allocwatch_free_calls_total",
            "Calls to free.",
            MetricType::COUNTER,
        );
        let mut lost = Family::new(
            "allocwatch_process_events_lost_total",
            "Events of these processes lost, by cause (where the loss is attributable).",
            MetricType::COUNTER,
        );
        let mut grows = Family::new(
            "allocwatch_go_map_grows_total",
            "Go map growths by kind.",
            MetricType::COUNTER,
        );
        for (id, t) in &totals {
            for (k, &v) in &t.u {
                match *k {
                    Key::Calls(api) => calls.counter(&id.labels, &[("api", api)], v),
                    Key::Bytes(api) => bytes.counter(&id.labels, &[("api", api)], v),
                    Key::Frees => frees.counter(&id.labels, &[], v),
                    Key::Lost(cause) => lost.counter(&id.labels, &[("cause", cause)], v),
                    Key::MapGrows(kind) => grows.counter(&id.labels, &[("kind", kind)], v),
                    _ => {}
                }
            }
        }
        calls.push_to(&mut out);
        bytes.push_to(&mut out);
        frees.push_to(&mut out);

        let mut live_b = Family::new(
            "allocwatch_live_bytes",
            "Bytes of outstanding malloc-family allocations of running processes.",
            MetricType::GAUGE,
        );
        let mut live_a = Family::new(
            "allocwatch_live_allocations",
            "Outstanding malloc-family allocations of running processes.",
            MetricType::GAUGE,
        );
        let mut sizes = Family::new(
            "allocwatch_alloc_size_bytes",
            "Malloc-family request sizes.",
            MetricType::HISTOGRAM,
        );
        if self.cfg.live {
            for (id, t) in &totals {
                live_b.gauge(&id.labels, &[], id.live.bytes as f64);
                live_a.gauge(&id.labels, &[], id.live.allocations as f64);
                sizes.histogram(&id.labels, t, Hist::AllocSize);
            }
            live_b.push_to(&mut out);
            live_a.push_to(&mut out);
            sizes.push_to(&mut out);
        }
        lost.push_to(&mut out);

        let mut info = Family::new(
            "allocwatch_go_info",
            "Go version of traced Go processes (always 1).",
            MetricType::GAUGE,
        );
        let mut grow_bytes = Family::new(
            "allocwatch_go_map_grow_bytes_total",
            "Bytes of new storage allocated by Go map growths.",
            MetricType::COUNTER,
        );
        let mut slices = Family::new(
            "allocwatch_go_slice_grows_total",
            "Go slice growths (runtime.growslice).",
            MetricType::COUNTER,
        );
        let mut slice_bytes = Family::new(
            "allocwatch_go_slice_grow_bytes_total",
            "Bytes of new backing arrays allocated by Go slice growths.",
            MetricType::COUNTER,
        );
        let mut cycles = Family::new(
            "allocwatch_go_gc_cycles_total",
            "Go garbage collection cycles started.",
            MetricType::COUNTER,
        );
        let mut pauses = Family::new(
            "allocwatch_go_gc_pause_seconds",
            "Go stop-the-world GC pauses.",
            MetricType::HISTOGRAM,
        );
        let mut go_sizes = Family::new(
            "allocwatch_go_alloc_size_bytes",
            "Go heap allocation sizes (runtime.mallocgc).",
            MetricType::HISTOGRAM,
        );
        for (id, t) in &totals {
            for v in &id.go_versions {
                info.gauge(&id.labels, &[("version", v)], 1.0);
            }
            // Present once any process of the identity had a Go snapshot.
            if !t.u.contains_key(&Key::GcCycles) {
                continue;
            }
            grow_bytes.counter(&id.labels, &[], t.get(Key::MapGrowBytes));
            slices.counter(&id.labels, &[], t.get(Key::SliceGrows));
            slice_bytes.counter(&id.labels, &[], t.get(Key::SliceGrowBytes));
            cycles.counter(&id.labels, &[], t.get(Key::GcCycles));
            pauses.histogram(&id.labels, t, Hist::GoPause);
            go_sizes.histogram(&id.labels, t, Hist::GoAllocSize);
        }
        for f in [
            info,
            grows,
            grow_bytes,
            slices,
            slice_bytes,
            cycles,
            pauses,
            go_sizes,
        ] {
            f.push_to(&mut out);
        }

        let mut s_calls = Family::new(
            "allocwatch_site_alloc_calls_total",
            "Calls by call site (top sites per process identity; the rest in site=\"other\").",
            MetricType::COUNTER,
        );
        let mut s_bytes = Family::new(
            "allocwatch_site_alloc_bytes_total",
            "Bytes by call site (top sites per process identity; the rest in site=\"other\").",
            MetricType::COUNTER,
        );
        let mut s_live_a = Family::new(
            "allocwatch_site_live_allocations",
            "Outstanding allocations by call site.",
            MetricType::GAUGE,
        );
        let mut s_live_b = Family::new(
            "allocwatch_site_live_bytes",
            "Bytes of outstanding allocations by call site.",
            MetricType::GAUGE,
        );
        for id in self.ids.values() {
            for r in &id.rows {
                let extra = [("site", &*r.site), ("kind", r.kind)];
                s_calls.counter(&id.labels, &extra, r.value.calls);
                s_bytes.counter(&id.labels, &extra, r.value.bytes);
                if self.cfg.live {
                    s_live_a.gauge(&id.labels, &extra, r.live.allocations as f64);
                    s_live_b.gauge(&id.labels, &extra, r.live.bytes as f64);
                }
            }
        }
        let site_families = if self.cfg.live {
            vec![s_calls, s_bytes, s_live_a, s_live_b]
        } else {
            vec![s_calls, s_bytes]
        };
        for f in site_families {
            f.push_to(&mut out);
        }
        out
    }

    fn self_families(&self, s: &SelfStats, scrape: Duration) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        let mut f = Family::new(
            "allocwatch_probes_attached",
            "Probes (uprobe links) attached.",
            MetricType::GAUGE,
        );
        f.gauge(&[], &[], s.probes_attached as f64);
        f.push_to(&mut out);

        let mut f = Family::new(
            "allocwatch_attach_failures_total",
            "Failed probe attachments by reason.",
            MetricType::COUNTER,
        );
        for (reason, &n) in &s.attach_failures {
            f.counter(&[], &[("reason", reason)], n);
        }
        f.push_to(&mut out);

        let mut f = Family::new(
            "allocwatch_events_processed_total",
            "Events read from the kernel.",
            MetricType::COUNTER,
        );
        f.counter(&[], &[], s.events_processed);
        f.push_to(&mut out);

        let mut f = Family::new(
            "allocwatch_events_lost_total",
            "Events lost by cause, all processes (counts are low while this rises).",
            MetricType::COUNTER,
        );
        for (cause, &n) in &s.events_lost {
            f.counter(&[], &[("cause", cause)], n);
        }
        f.push_to(&mut out);

        let mut f = Family::new(
            "allocwatch_map_fill_ratio",
            "Fill level of each kernel map (1 = full: new entries are dropped).",
            MetricType::GAUGE,
        );
        for (map, &v) in &s.map_fill {
            f.gauge(&[], &[("map", map)], v);
        }
        f.push_to(&mut out);

        let mut f = Family::new(
            "allocwatch_symbolization_failures_total",
            "Addresses that could not be named, by cause.",
            MetricType::COUNTER,
        );
        for (cause, &n) in &s.symbolization_failures {
            f.counter(&[], &[("cause", cause)], n);
        }
        f.push_to(&mut out);

        let mut f = Family::new(
            "allocwatch_stale_scrapes_total",
            "Scrapes answered with the previous snapshot because the tracer was busy.",
            MetricType::COUNTER,
        );
        f.counter(&[], &[], s.stale_snapshots);
        f.push_to(&mut out);

        let mut f = Family::new(
            "allocwatch_held_entries",
            "What the agent holds in memory, by kind (bounded by its configuration).",
            MetricType::GAUGE,
        );
        for (what, &n) in &s.held {
            f.gauge(&[], &[("what", what)], n as f64);
        }
        f.push_to(&mut out);

        let mut f = Family::new(
            "allocwatch_call_site_series",
            "allocwatch_site_* series exported at this scrape.",
            MetricType::GAUGE,
        );
        f.gauge(&[], &[], self.site_series as f64);
        f.push_to(&mut out);

        let mut f = Family::new(
            "allocwatch_call_site_series_limit",
            "Configured cap on allocwatch_site_* series (max_site_series).",
            MetricType::GAUGE,
        );
        f.gauge(&[], &[], self.cfg.max_site_series as f64);
        f.push_to(&mut out);

        let mut f = Family::new(
            "allocwatch_scrape_duration_seconds",
            "Time this scrape took to snapshot and render, up to this line.",
            MetricType::GAUGE,
        );
        f.gauge(&[], &[], scrape.as_secs_f64());
        f.push_to(&mut out);
        out
    }
}

/// Moving averages of bytes and calls per scrape; sites neither present nor sticky are forgotten.
fn update_scores(id: &mut Identity) {
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

/// A metric family under construction.
struct Family {
    mf: MetricFamily,
}

impl Family {
    fn new(name: &str, help: &str, ty: MetricType) -> Self {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(ty);
        Family { mf }
    }

    fn labels(base: &[LabelPair], extra: &[(&str, &str)]) -> Vec<LabelPair> {
        let mut v = Vec::with_capacity(base.len() + extra.len());
        v.extend_from_slice(base);
        v.extend(extra.iter().map(|(n, val)| label(n, val)));
        v
    }

    // Counters are rendered as f64 by the text format; values above 2^53 lose precision only.
    fn counter(&mut self, base: &[LabelPair], extra: &[(&str, &str)], v: u64) {
        let mut m = Metric::from_label(Self::labels(base, extra));
        let mut c = proto::Counter::default();
        c.set_value(v as f64);
        m.set_counter(c);
        self.mf.mut_metric().push(m);
    }

    fn gauge(&mut self, base: &[LabelPair], extra: &[(&str, &str)], v: f64) {
        let mut m = Metric::from_label(Self::labels(base, extra));
        let mut g = proto::Gauge::default();
        g.set_value(v);
        m.set_gauge(g);
        self.mf.mut_metric().push(m);
    }

    /// Renders per-bucket counts as Prometheus' cumulative buckets.
    fn histogram(&mut self, base: &[LabelPair], t: &Counters, which: Hist) {
        let mut bounds: Vec<(f64, u64)> =
            t.u.iter()
                .filter_map(|(k, &n)| match *k {
                    Key::Bucket(h, Bound(bits)) if h == which => Some((f64::from_bits(bits), n)),
                    _ => None,
                })
                .collect();
        bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut cumulative = 0u64;
        let mut buckets = Vec::with_capacity(bounds.len());
        for (bound, n) in bounds {
            cumulative = cumulative.saturating_add(n);
            // An explicit +Inf bucket is the count line the encoder writes anyway.
            if bound == f64::INFINITY {
                continue;
            }
            let mut b = proto::Bucket::default();
            b.set_upper_bound(bound);
            b.set_cumulative_count(cumulative);
            buckets.push(b);
        }
        let mut h = proto::Histogram::default();
        h.set_bucket(buckets);
        h.set_sample_count(t.get(Key::Count(which)).max(cumulative));
        h.set_sample_sum(t.f.get(&which).copied().unwrap_or(0.0));
        let mut m = Metric::from_label(base.to_vec());
        m.set_histogram(h);
        self.mf.mut_metric().push(m);
    }

    /// Families without series are left out (the format has no empty family).
    fn push_to(self, out: &mut Vec<MetricFamily>) {
        if !self.mf.get_metric().is_empty() {
            out.push(self.mf);
        }
    }
}

#[cfg(test)]
mod tests;
