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
//! * **Call sites** (`allocwatch_site_*{site="fn <- caller", api}`) exist for at most `top_k`
//!   allocating sites per identity (`free` has none), ranked by recently allocated bytes (a
//!   per-scrape moving average), the rest summed into `site="other"` per `api`; and the
//!   total number of `allocwatch_site_*` series never exceeds `max_site_series` (each site is
//!   one series in each of the [`SITE_FAMILIES`] families). A site keeps its series until a challenger allocates at
//!   least twice as fast (hysteresis, so sites do not flap), the identity expires, or the
//!   global cap forces the lowest-ranked sites out. To keep every site series monotonic, a
//!   site's counter starts with as much of its history as can be taken out of `other`
//!   without `other` going below what it already exported (all of it for a new identity or a
//!   site new since the last scrape); on eviction its value moves into `other`. Summing an
//!   api's site series over `site` always gives the identity's total for that api as seen
//!   through call sites, except for sites not named yet: a site whose naming ran out of a
//!   scrape's time is left out (for up to 30 s) rather than put in `other` for good, so
//!   the sum may lag the total for a few scrapes. Under the cap, identities are served largest first (bytes allocated
//!   through sites): one that does not fit loses its weakest sites, and those whose `other`
//!   rows alone do not fit get no site series (their core series still count everything).
//!   Go's growth events and the symbol probes' kinds (C++/Rust container growth, configured
//!   probes: calls only, ranked after the sites that allocate bytes) are sites of their
//!   `api` under the same rules.
//!   The Go map gauges (`allocwatch_go_map_*`, `allocwatch_go_maps_flagged`, also by `site`)
//!   count against the same cap, served after the call sites: at most `top_k` map sites per
//!   identity, identities holding the most map bytes first, with what the call sites left.
//!
//! The families themselves (name, help, type, labels) are data: `families.rs`.

mod families;
mod identity;
mod labels;
#[cfg(test)]
mod tests;

#[cfg(test)]
pub use families::{FAMILIES, MetricKind, Scope};
#[cfg(test)]
pub use labels::site_label;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus::TextEncoder;

use self::identity::{
    CallsBytes, Counters, Identity, Live, MapAgg, PidState, SiteKey, update_scores,
};
use self::labels::{Labels, sites_of};
use crate::gostate::Verdict;
use crate::model::{ProcessLabels, ProcessSnapshot, SelfStats};

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
// Label values may hold non-ASCII (a comm, a path, a symbol): say UTF-8 explicitly.
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
        self.site_series +=
            self.select_maps(self.cfg.max_site_series.saturating_sub(self.site_series));
    }

    /// Chooses the map sites exported, within `top_k` per identity and the `budget` of series
    /// the call sites left: identities holding the most map bytes first, each site whole or
    /// not at all. Gauges, so unlike call sites nothing has to be carried for those left out.
    /// Returns the series taken.
    fn select_maps(&mut self, budget: usize) -> usize {
        let mut order: Vec<(u64, &ProcessLabels)> =
            self.ids.iter().map(|(l, id)| (id.map_bytes(), l)).collect();
        order.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        let order: Vec<ProcessLabels> = order.into_iter().map(|(_, l)| l.clone()).collect();
        let mut used = 0;
        for labels in &order {
            let Some(id) = self.ids.get_mut(labels) else {
                continue;
            };
            let rows: Vec<(Arc<str>, MapAgg)> = id
                .top_maps(self.cfg.top_k)
                .into_iter()
                .map(|(site, m)| (Arc::clone(site), *m))
                .collect();
            for (site, m) in rows {
                if used + m.series() > budget {
                    break;
                }
                used += m.series();
                id.map_rows.push((site, m));
            }
        }
        used
    }

    fn update_pid(&mut self, p: &ProcessSnapshot, now: Instant) {
        let cur = Counters::of(p);
        let cur_sites = sites_of(&p.sites, &mut self.labels);
        let mut last_sites: HashMap<SiteKey, CallsBytes> = HashMap::new();
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
                            // Only what left: the rest is still in `now_v` (a label shared by
                            // several stacks, some of them folded away at exit).
                            id.fold_sticky(key, v.sub(now_v));
                            last_sites.insert(key.clone(), now_v.min(v));
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
        id.allocators.extend(p.allocator);
        if let Some(go) = &p.go {
            id.go_versions.insert(go.version.clone());
            // Maps of running processes only: an exited one holds none.
            for m in go.maps.iter().filter(|_| running) {
                let a = id.go_maps.entry(self.labels.of(&m.frames)).or_default();
                a.len += m.len;
                a.slots += m.slots;
                a.bytes += m.bytes;
                match m.verdict {
                    Some(Verdict::Growing) => a.growing += 1,
                    Some(Verdict::Bloated) => a.bloated += 1,
                    None => {}
                }
            }
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
}
