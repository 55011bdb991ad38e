//! What the Go probes saw in one process: map growth (per kind and per map instance), slice
//! growth, large allocations, GC cycles and stop-the-world pauses. Pure decoding and
//! aggregation of [`GoEvent`]s; unit-tested without root.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, HashMap},
};

use allocwatch_common::{event::GoEvent, go::GoRole};

use crate::{
    gort::{
        buildinfo::GoVersion,
        growth::{self, TypeInfo},
        live::{self, Known, Live, Memory, Read},
        versions::MapImpl,
    },
    target::go::GoTarget,
};

/// Stop reasons (`stwReason`, Go ≥ 1.21) that belong to a GC cycle.
const STW_GC_MARK_TERM: u64 = 1;
const STW_GC_SWEEP_TERM: u64 = 2;

/// Map instances tracked at once per process; beyond it new maps are counted, not kept.
pub const MAX_MAP_INSTANCES: usize = 100_000;
/// Map headers read per refresh, the largest maps first (one `process_vm_readv` for a bucket
/// map, two plus one per table for a swiss map).
pub const MAX_MAP_READS: usize = 10_000;
/// A map still smaller than its last growth event after this many reads (seconds) is not that
/// map any more: a growth takes microseconds.
const MAX_BEHIND_READS: u32 = 3;

/// When a map is called bloated or growing (`allocwatch maps`, `--json` `verdict`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdicts {
    /// Bloated: fewer than 1/`bloat_load_divisor` of its slots used…
    pub bloat_load_divisor: u64,
    /// …while its buckets or tables hold more than this.
    pub bloat_min_bytes: u64,
    /// Growing: its length rose at this many reads without falling, the last rise fewer than
    /// this many reads ago, with a growth since the rises began.
    pub growing_reads: u32,
}

impl Default for Verdicts {
    fn default() -> Self {
        Self {
            bloat_load_divisor: 8,
            bloat_min_bytes: 1 << 20,
            growing_reads: 3,
        }
    }
}

/// A verdict on one map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Its length keeps rising, and it keeps growing: a leak suspect.
    Growing,
    /// Far emptier than what it grew to hold: memory kept after deletes (Go never shrinks a
    /// map); rebuilding it (copy to a new map) returns the memory.
    Bloated,
}

impl Verdict {
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Growing => "growing",
            Verdict::Bloated => "bloated",
        }
    }
}

/// Kinds of Go sites.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GoSiteKind {
    MapGrow,
    SliceGrow,
    Alloc,
}

impl GoSiteKind {
    pub const fn name(self) -> &'static str {
        match self {
            GoSiteKind::MapGrow => "map_grow",
            GoSiteKind::SliceGrow => "slice_grow",
            GoSiteKind::Alloc => "large_alloc",
        }
    }
}

/// Where a Go event happened: the call chain key used for symbolization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GoSiteKey {
    pub kind: GoSiteKind,
    pub stack_id: i64,
    pub ret_addr: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    pub count: u64,
    pub bytes: u64,
}

/// One live map, by its runtime pointer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapInstance {
    pub ptr: u64,
    pub grows: u64,
    pub by_kind: BTreeMap<&'static str, u64>,
    /// Bytes allocated by its growth so far.
    pub bytes: u64,
    /// Old maps: `B` (2^B buckets). Swiss maps: the largest table capacity seen.
    pub size_class: u64,
    /// Swiss maps: directory entries after the last growth (1 before any split).
    pub dir_len: u64,
    /// Elements at the last growth.
    pub len_at_last_grow: u64,
    pub first_site: Option<GoSiteKey>,
    /// Bytes of one bucket (bucket maps) or group (swiss maps), from its growth events.
    pub unit_bytes: u64,
    /// Read from the process at the last refresh (`None` before the first good read).
    pub live: Option<Live>,
    /// The largest length seen: at a growth or a read.
    pub len_max: u64,
    /// Reads at which its length rose since it last fell (or was first read), its grow count
    /// when that streak began, and reads since the last rise.
    pub rising_reads: u32,
    pub grows_at_streak_start: u64,
    pub flat_reads: u32,
    /// Reads in a row that found it behind its last growth ([`Read::Behind`]).
    pub behind_reads: u32,
}

impl MapInstance {
    /// Slots in use, 0..=1 (`None` before a read).
    pub fn load(&self) -> Option<f64> {
        self.live
            .filter(|l| l.slots > 0)
            .map(|l| l.len as f64 / l.slots as f64)
    }

    pub fn verdict(&self, v: &Verdicts) -> Option<Verdict> {
        let live = self.live?;
        if self.rising_reads >= v.growing_reads
            && self.flat_reads < v.growing_reads
            && self.grows > self.grows_at_streak_start
        {
            return Some(Verdict::Growing);
        }
        (live.bytes > v.bloat_min_bytes
            && live.len.saturating_mul(v.bloat_load_divisor) < live.slots)
            .then_some(Verdict::Bloated)
    }

    fn read_done(&mut self, l: Live) {
        // A busy program does not add to its map between every two reads: a read at the same
        // length pauses the streak, a shorter map ends it.
        match self.live.map(|prev| l.len.cmp(&prev.len)) {
            Some(Ordering::Greater) => {
                self.rising_reads += 1;
                self.flat_reads = 0;
            }
            Some(Ordering::Equal) => self.flat_reads += 1,
            Some(Ordering::Less) | None => {
                self.rising_reads = 0;
                self.flat_reads = 0;
                self.grows_at_streak_start = self.grows;
            }
        }
        self.len_max = self.len_max.max(l.len);
        self.live = Some(l);
    }
}

/// Pause statistics, in nanoseconds, with a log2 histogram.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pauses {
    pub count: u64,
    pub sum_ns: u64,
    pub max_ns: u64,
    /// `hist[i]`: pauses in `[2^i, 2^(i+1))` ns.
    pub hist: BTreeMap<u32, u64>,
}

impl Pauses {
    fn add(&mut self, ns: u64) {
        self.count += 1;
        self.sum_ns += ns;
        self.max_ns = self.max_ns.max(ns);
        *self.hist.entry(63 - (ns | 1).leading_zeros()).or_default() += 1;
    }
}

#[derive(Clone, Debug, Default)]
pub struct GoState {
    pub version: String,
    pub swiss: bool,
    pub map_grows: BTreeMap<&'static str, u64>,
    pub map_grow_bytes: u64,
    pub slice_grows: u64,
    pub slice_grow_bytes: u64,
    /// Go ≥ 1.26: stack-started slices moved to the heap (`moveSlice*`).
    pub slice_moves: Count,
    pub large_allocs: Count,
    pub gc_starts: u64,
    pub gc_cycles: u64,
    /// Stop-the-world pauses of the GC (sweep and mark termination).
    pub gc_pauses: Pauses,
    /// Every stop-the-world pause, GC or not (ReadMemStats, GOMAXPROCS, …).
    pub stw_pauses: Pauses,
    pub sites: HashMap<GoSiteKey, Count>,
    /// Per kind: the sites folded away by [`Self::compact`].
    pub sites_remainder: BTreeMap<GoSiteKind, Count>,
    pub maps: HashMap<u64, MapInstance>,
    pub maps_untracked: u64,
    /// Maps dropped because a read found them gone (freed, or their memory reused).
    pub maps_gone: u64,
    /// Events that could not be decoded for this Go version (should stay 0).
    pub unexpected: u64,
    /// Growth events counted in the kernel (`GO_AGG`) rather than streamed, included in the
    /// counts above with the stack of their key's first event.
    pub aggregated: u64,
    /// `runtime.mallocgc` is probed (`--go-malloc`, and the version has the probe): without
    /// it there is no allocation-size histogram.
    pub malloc_probed: bool,
    /// Before Go 1.21 stops carry no reason: GC stops return into these ranges.
    gc_stop_callers: Vec<(u64, u64)>,
    /// GC pauses seen on versions without reasons (two per cycle).
    reasonless_gc_pauses: u64,
    version_parsed: Option<GoVersion>,
}

impl GoState {
    pub fn new(target: &GoTarget) -> Self {
        Self {
            version: target.version.raw.clone(),
            swiss: target.maps == MapImpl::Swiss,
            gc_stop_callers: target.gc_stop_callers.clone(),
            version_parsed: Some(target.version.clone()),
            malloc_probed: target.probes.iter().any(|p| p.role == GoRole::Malloc),
            ..Self::default()
        }
    }

    /// For a process that exited: keeps the `keep` largest sites (by bytes, then count), folds
    /// the rest into [`Self::sites_remainder`] and drops the map instances (only the CLI's
    /// `maps` view shows them). Returns the keys folded away.
    pub fn compact(&mut self, keep: usize) -> Vec<GoSiteKey> {
        self.maps = HashMap::new();
        if self.sites.len() <= keep {
            return Vec::new();
        }
        let mut ranked: Vec<(GoSiteKey, Count)> = self.sites.drain().collect();
        ranked.sort_by(|a, b| (b.1.bytes, b.1.count, a.0).cmp(&(a.1.bytes, a.1.count, b.0)));
        let folded = ranked.split_off(keep);
        self.sites = ranked.into_iter().collect();
        folded
            .into_iter()
            .map(|(key, c)| {
                let r = self.sites_remainder.entry(key.kind).or_default();
                r.count += c.count;
                r.bytes += c.bytes;
                key
            })
            .collect()
    }

    pub fn record(&mut self, ev: &GoEvent) {
        self.record_n(ev, 1);
    }

    /// `n` more growth events identical to `ev` but for their stack, counted in the kernel
    /// (`GO_AGG`) after `ev`, the first of their key: counted as `n` records of `ev` would be.
    pub fn record_repeats(&mut self, ev: &GoEvent, n: u64) {
        if n == 0 {
            return;
        }
        self.aggregated += n;
        self.record_n(ev, n);
    }

    /// `ev` seen `n` times.
    fn record_n(&mut self, ev: &GoEvent, n: u64) {
        let Ok(role) = GoRole::try_from(ev.role) else {
            self.unexpected += n;
            return;
        };
        let v = &ev.values;
        let site = |kind| GoSiteKey {
            kind,
            stack_id: ev.stack_id,
            ret_addr: ev.ret_addr,
        };
        match role {
            GoRole::MapHashGrow => {
                let (ptr, count, b) = (v[0], v[1], v[2] as u8);
                let bucket = TypeInfo {
                    size: v[4],
                    has_pointers: v[5] != 0,
                };
                let Some(g) = self.growth(|ver| growth::hash_grow(count, b, bucket, ver)) else {
                    return;
                };
                // A map whose B went down is a new map at a reused address.
                let fresh = self
                    .maps
                    .get(&ptr)
                    .is_some_and(|m| u64::from(b) < m.size_class);
                let new_b = g.new_b;
                self.map_grow(
                    n,
                    ptr,
                    g.kind.as_str(),
                    g.heap.requested,
                    site(GoSiteKind::MapGrow),
                    fresh,
                    |m| {
                        m.size_class = u64::from(new_b);
                        m.len_at_last_grow = count;
                        m.unit_bytes = bucket.size;
                    },
                );
            }
            GoRole::MapGrowToSmall => {
                let (ptr, group) = (v[0], group_type(v[4], v[5]));
                let Some(g) = self.growth(|ver| growth::swiss_grow_to_small(group, ver)) else {
                    return;
                };
                // The first group: always a new map (or a cleared one starting over).
                self.map_grow(
                    n,
                    ptr,
                    g.kind.as_str(),
                    g.heap.requested,
                    site(GoSiteKind::MapGrow),
                    true,
                    |m| {
                        m.size_class = g.new_size;
                        m.dir_len = 0;
                        m.unit_bytes = group.size;
                    },
                );
            }
            GoRole::MapGrowToTable => {
                let (ptr, used, group) = (v[0], v[1], group_type(v[4], v[5]));
                let Some(g) = self.growth(|ver| growth::swiss_grow_to_table(group, ver)) else {
                    return;
                };
                self.map_grow(
                    n,
                    ptr,
                    g.kind.as_str(),
                    g.heap.requested,
                    site(GoSiteKind::MapGrow),
                    false,
                    |m| {
                        m.size_class = g.new_size;
                        m.dir_len = 1;
                        m.len_at_last_grow = used;
                        m.unit_bytes = group.size;
                    },
                );
            }
            GoRole::MapTableGrow => {
                let (ptr, old_cap, new_cap, used) = (v[0], v[1] as u16, v[2] as u16, v[3]);
                let group = group_type(v[4], v[5]);
                let Some(g) =
                    self.growth(|ver| growth::swiss_table_grow(old_cap, new_cap, group, ver))
                else {
                    return;
                };
                self.map_grow(
                    n,
                    ptr,
                    g.kind.as_str(),
                    g.heap.requested,
                    site(GoSiteKind::MapGrow),
                    false,
                    |m| {
                        m.size_class = m.size_class.max(g.new_size);
                        m.len_at_last_grow = m.len_at_last_grow.max(used);
                        m.unit_bytes = group.size;
                    },
                );
            }
            GoRole::MapTableSplit => {
                let (ptr, group, map_used) = (v[0], group_type(v[3], v[5]), v[4]);
                let Some(g) = self.growth(|ver| growth::swiss_table_split(group, ver)) else {
                    return;
                };
                self.map_grow(
                    n,
                    ptr,
                    g.kind.as_str(),
                    g.heap.requested,
                    site(GoSiteKind::MapGrow),
                    false,
                    |m| {
                        m.size_class = m.size_class.max(g.old_size);
                        m.len_at_last_grow = map_used;
                        m.unit_bytes = group.size;
                    },
                );
            }
            GoRole::MapDirectoryGrow => {
                let (ptr, global_depth, dir_len, old_local) = (v[0], v[1], v[2], v[3]);
                let Some(Some(g)) = self.growth(|ver| {
                    growth::swiss_install_split(old_local as u8, global_depth as u8, dir_len, ver)
                }) else {
                    return;
                };
                self.map_grow(
                    n,
                    ptr,
                    g.kind.as_str(),
                    g.heap.requested,
                    site(GoSiteKind::MapGrow),
                    false,
                    |m| {
                        m.dir_len = g.new_size;
                    },
                );
            }
            GoRole::SliceGrow => {
                let (new_len, old_cap) = (v[0], v[1]);
                let elem = TypeInfo {
                    size: v[2],
                    has_pointers: v[3] != 0,
                };
                let Some(g) = self.growth(|ver| growth::growslice(old_cap, new_len, elem, ver))
                else {
                    return;
                };
                self.slice_grows += n;
                self.slice_grow_bytes += n * g.heap.requested;
                let s = self.sites.entry(site(GoSiteKind::SliceGrow)).or_default();
                s.count += n;
                s.bytes += n * g.heap.requested;
            }
            GoRole::SliceMoveToHeap => {
                // NoCap variants have no cap argument (captured as 0); NoScan variants have
                // no element type (pointer-free).
                let (len, cap) = (v[0], (v[1] != 0).then_some(v[1]));
                let elem = TypeInfo {
                    size: v[2],
                    has_pointers: v[3] != 0,
                };
                if len == 0 {
                    return;
                }
                let Some(g) = self.growth(|ver| growth::move_slice(len, cap, elem, ver)) else {
                    return;
                };
                self.slice_moves.count += n;
                self.slice_moves.bytes += n * g.heap.requested;
            }
            GoRole::Malloc | GoRole::MallocSpecialized => {
                let size = v[0];
                self.large_allocs.count += n;
                self.large_allocs.bytes += n * size;
                let s = self.sites.entry(site(GoSiteKind::Alloc)).or_default();
                s.count += n;
                s.bytes += n * size;
            }
            GoRole::GcStart => self.gc_starts += n,
            GoRole::StopTheWorld => self.unexpected += n,
            // Timed per event: never aggregated (`agg_ignored`), one record each.
            GoRole::StartTheWorld => {
                let (ns, reason, stop_ret) = (v[0], v[1], v[2]);
                self.stw_pauses.add(ns);
                let has_reasons = self
                    .version_parsed
                    .as_ref()
                    .is_some_and(|v| v.at_least(1, 21));
                if has_reasons {
                    if reason == STW_GC_MARK_TERM || reason == STW_GC_SWEEP_TERM {
                        self.gc_pauses.add(ns);
                    }
                    if reason == STW_GC_MARK_TERM {
                        self.gc_cycles += 1;
                    }
                } else if self
                    .gc_stop_callers
                    .iter()
                    .any(|&(s, e)| stop_ret >= s && stop_ret < e)
                {
                    self.gc_pauses.add(ns);
                    self.reasonless_gc_pauses += 1;
                    // Sweep termination then mark termination: a cycle ends every second stop.
                    if self.reasonless_gc_pauses.is_multiple_of(2) {
                        self.gc_cycles += 1;
                    }
                }
            }
        }
    }

    /// Runs a growth computation for this process's Go version; a failure (an event this
    /// version cannot produce) is counted, not guessed at.
    fn growth<T, E>(&mut self, f: impl FnOnce(&GoVersion) -> Result<T, E>) -> Option<T> {
        let r = self.version_parsed.as_ref().and_then(|v| f(v).ok());
        if r.is_none() {
            self.unexpected += 1;
        }
        r
    }

    /// `n` growths of the map at `ptr`, counted `n` times in the totals and the site. Repeats
    /// (`n` > 1, from the kernel's counts) have the same map pointer and the same counts at the
    /// growth, which one map never has twice (its count and size only rise): they are maps
    /// built the same way at a reused address, one after the other. As with records, the
    /// instance is the latest of them: it counts the growth once.
    #[allow(clippy::too_many_arguments)]
    fn map_grow(
        &mut self,
        n: u64,
        ptr: u64,
        kind: &'static str,
        bytes: u64,
        site: GoSiteKey,
        fresh: bool,
        update: impl FnOnce(&mut MapInstance),
    ) {
        *self.map_grows.entry(kind).or_default() += n;
        self.map_grow_bytes += n * bytes;
        let s = self.sites.entry(site).or_default();
        s.count += n;
        s.bytes += n * bytes;
        if fresh {
            self.maps.remove(&ptr);
        }
        if !self.maps.contains_key(&ptr) && self.maps.len() >= MAX_MAP_INSTANCES {
            self.maps_untracked += n;
            return;
        }
        let m = self.maps.entry(ptr).or_insert_with(|| MapInstance {
            ptr,
            first_site: Some(site),
            ..MapInstance::default()
        });
        m.grows += 1;
        *m.by_kind.entry(kind).or_default() += 1;
        m.bytes += bytes;
        update(m);
        m.len_max = m.len_max.max(m.len_at_last_grow);
    }

    /// Reads the length and size of the largest `limit` maps (by bytes their growth
    /// allocated) from the process; a map that is not there any more (freed, its memory
    /// reused) is dropped.
    pub fn refresh_maps(&mut self, mem: &impl Memory, limit: usize) {
        let mut order: Vec<(u64, u64)> = self.maps.values().map(|m| (m.bytes, m.ptr)).collect();
        if order.len() > limit {
            order.select_nth_unstable_by(limit, |a, b| b.cmp(a));
            order.truncate(limit);
        }
        for (_, ptr) in order {
            let Some(m) = self.maps.get_mut(&ptr) else {
                continue;
            };
            let known = Known {
                unit_bytes: m.unit_bytes,
                size_class: m.size_class,
                slots: m.live.map_or(0, |l| l.slots),
            };
            let read = if self.swiss {
                live::read_swiss(mem, ptr, known)
            } else {
                live::read_buckets(mem, ptr, known)
            };
            let read = match read {
                Ok(r) => r,
                Err(e) => {
                    // The process itself cannot be read (it exited): keep what was read last.
                    log::debug!("map reads stopped: {e}");
                    return;
                }
            };
            match read {
                Read::Live(l) => {
                    m.behind_reads = 0;
                    m.read_done(l);
                }
                Read::Torn => {}
                Read::Behind if m.behind_reads < MAX_BEHIND_READS => m.behind_reads += 1,
                Read::Behind => {
                    log::debug!("map {ptr:#x} dropped: still smaller than its last growth");
                    self.maps.remove(&ptr);
                    self.maps_gone += 1;
                }
                Read::Gone(why) => {
                    log::debug!("map {ptr:#x} dropped: {why}");
                    self.maps.remove(&ptr);
                    self.maps_gone += 1;
                }
            }
        }
    }

    /// Map instances ranked by bytes grown, then by grow count.
    pub fn top_maps(&self, k: usize) -> Vec<&MapInstance> {
        let mut v: Vec<_> = self.maps.values().collect();
        v.sort_by(|a, b| (b.bytes, b.grows, a.ptr).cmp(&(a.bytes, a.grows, b.ptr)));
        v.truncate(k);
        v
    }
}

/// The group type of a swiss map from its captured size and pointer bytes.
fn group_type(size: u64, ptr_bytes: u64) -> TypeInfo {
    TypeInfo {
        size,
        has_pointers: ptr_bytes != 0,
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, io};

    use super::*;

    /// One bucket map header at 0x1000, whose count and B the test sets between reads.
    struct OneMap(RefCell<(u64, u8)>);

    impl Memory for OneMap {
        fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
            if addr != 0x1000 {
                return Err(io::Error::from_raw_os_error(libc::EFAULT));
            }
            let (count, b) = *self.0.borrow();
            let mut h = [0u8; 48];
            h[0..8].copy_from_slice(&count.to_le_bytes());
            h[9] = b;
            h[16..24].copy_from_slice(&0x9000u64.to_le_bytes());
            buf.copy_from_slice(&h[..buf.len()]);
            Ok(())
        }
    }

    fn state_with_map(b: u8) -> GoState {
        let mut s = GoState::default();
        s.maps.insert(
            0x1000,
            MapInstance {
                ptr: 0x1000,
                grows: 1,
                size_class: u64::from(b),
                unit_bytes: 144,
                ..MapInstance::default()
            },
        );
        s
    }

    fn state(version: &str) -> GoState {
        let v = GoVersion::parse(version).unwrap();
        GoState {
            swiss: crate::gort::versions::map_impl(&v) == MapImpl::Swiss,
            version_parsed: Some(v),
            ..GoState::default()
        }
    }

    fn go_event(role: GoRole, values: [u64; 6]) -> GoEvent {
        GoEvent {
            header: allocwatch_common::event::EventHeader {
                kind: allocwatch_common::event::EventKind::Go as u32,
                tgid: 10,
            },
            role: role as u32,
            ret_addr: 0x4000,
            stack_id: 3,
            values,
            caller: 0x5000,
            ..GoEvent::default()
        }
    }

    /// What the totals and sites say (the map instances are compared where it applies).
    fn totals(s: &GoState) -> impl PartialEq + std::fmt::Debug {
        (
            s.map_grows.clone(),
            s.map_grow_bytes,
            s.slice_grows,
            s.slice_grow_bytes,
            s.slice_moves,
            s.sites.clone(),
            s.unexpected,
        )
    }

    /// One realistic event of every aggregated role, per Go version (values in
    /// `target::go::value_names` order).
    fn aggregated_events() -> Vec<(&'static str, GoEvent)> {
        vec![
            (
                "go1.19.8",
                go_event(GoRole::MapHashGrow, [0x1000, 13, 1, 0, 144, 0]),
            ),
            (
                "go1.19.8",
                go_event(GoRole::SliceGrow, [5, 4, 8, 0, 0x9000, 0]),
            ),
            (
                "go1.27.3",
                go_event(GoRole::MapGrowToSmall, [0x2000, 0, 0, 0, 136, 0]),
            ),
            (
                "go1.27.3",
                go_event(GoRole::MapGrowToTable, [0x2000, 8, 0, 0, 136, 0]),
            ),
            (
                "go1.27.3",
                go_event(GoRole::MapTableGrow, [0x2000, 16, 32, 14, 136, 0]),
            ),
            (
                "go1.27.3",
                go_event(GoRole::MapTableSplit, [0x2000, 1024, 0, 136, 900, 0]),
            ),
            (
                "go1.27.3",
                go_event(GoRole::MapDirectoryGrow, [0x2000, 1, 2, 1, 0, 0]),
            ),
            (
                "go1.27.3",
                go_event(GoRole::SliceMoveToHeap, [3, 4, 8, 0, 0, 0]),
            ),
            (
                "go1.27.3",
                go_event(GoRole::SliceGrow, [5, 4, 24, 8, 0x9000, 0]),
            ),
        ]
    }

    #[test]
    fn repeats_count_as_that_many_records() {
        for (version, ev) in aggregated_events() {
            let role = GoRole::try_from(ev.role).unwrap();
            let mut records = state(version);
            for _ in 0..6 {
                records.record(&ev);
            }
            let mut repeats = state(version);
            repeats.record(&ev);
            repeats.record_repeats(&ev, 5);
            assert_eq!(totals(&repeats), totals(&records), "{role:?}");
            assert_eq!(repeats.unexpected, 0, "{role:?} decodes on {version}");
            assert_eq!(repeats.aggregated, 5);
            // A repeat of a map's growth is another map at that address: as records of a new
            // map (its B went down, or its first group) the instance is the latest map.
            if matches!(role, GoRole::MapHashGrow | GoRole::MapGrowToSmall) {
                assert_eq!(repeats.maps, records.maps, "{role:?}");
            }
            if role == GoRole::MapHashGrow {
                // Bucket maps see a new map only when B went down: mimic what follows it.
                let m = &repeats.maps[&0x1000];
                assert_eq!((m.grows, m.size_class), (1, 2));
            }
        }
    }

    #[test]
    fn values_left_out_of_the_kernel_key_change_nothing_counted() {
        for (version, ev) in aggregated_events() {
            let ignored = allocwatch_common::go::agg_ignored(ev.role).unwrap();
            let mut other = ev;
            for (i, v) in other.values.iter_mut().enumerate() {
                if ignored & (1 << i) != 0 {
                    *v = v.wrapping_mul(7).wrapping_add(0x1234_5678);
                }
            }
            let (mut a, mut b) = (state(version), state(version));
            a.record(&ev);
            b.record(&other);
            assert_eq!(totals(&a), totals(&b), "{:?}", GoRole::try_from(ev.role));
            let (ma, mb): (Vec<_>, Vec<_>) = (a.maps.values().collect(), b.maps.values().collect());
            assert_eq!(ma, mb);
        }
    }

    #[test]
    fn a_map_rising_at_every_read_while_growing_is_growing_and_stops_being_so() {
        let v = Verdicts::default();
        let mut s = state_with_map(10);
        let mem = OneMap(RefCell::new((1000, 10)));
        for len in [1000, 2000, 3000, 4000] {
            mem.0.borrow_mut().0 = len;
            s.refresh_maps(&mem, MAX_MAP_READS);
            if len == 2000 {
                s.maps.get_mut(&0x1000).unwrap().grows += 1;
            }
        }
        let m = &s.maps[&0x1000];
        assert_eq!((m.live.unwrap().len, m.len_max), (4000, 4000));
        assert_eq!(m.verdict(&v), Some(Verdict::Growing));
        // Reads at the same length pause the streak; three of them end it, as does a fall.
        s.refresh_maps(&mem, MAX_MAP_READS);
        s.refresh_maps(&mem, MAX_MAP_READS);
        assert_eq!(s.maps[&0x1000].verdict(&v), Some(Verdict::Growing));
        s.refresh_maps(&mem, MAX_MAP_READS);
        assert_eq!(s.maps[&0x1000].verdict(&v), None);
        mem.0.borrow_mut().0 = 5000;
        s.refresh_maps(&mem, MAX_MAP_READS);
        assert_eq!(s.maps[&0x1000].verdict(&v), Some(Verdict::Growing));
        mem.0.borrow_mut().0 = 4000;
        s.refresh_maps(&mem, MAX_MAP_READS);
        assert_eq!(s.maps[&0x1000].verdict(&v), None);
    }

    #[test]
    fn a_map_emptied_after_growing_large_is_bloated() {
        let v = Verdicts::default();
        let mut s = state_with_map(14);
        let mem = OneMap(RefCell::new((100_000, 14)));
        s.refresh_maps(&mem, MAX_MAP_READS);
        assert_eq!(s.maps[&0x1000].verdict(&v), None);
        mem.0.borrow_mut().0 = 1000;
        s.refresh_maps(&mem, MAX_MAP_READS);
        let m = &s.maps[&0x1000];
        assert_eq!((m.live.unwrap().len, m.len_max), (1000, 100_000));
        assert_eq!(m.live.unwrap().bytes, 144 << 14);
        assert_eq!(m.verdict(&v), Some(Verdict::Bloated));
        // Under 1 MiB held: not worth a verdict.
        let mut small = state_with_map(8);
        let mem = OneMap(RefCell::new((10, 8)));
        small.refresh_maps(&mem, MAX_MAP_READS);
        assert_eq!(small.maps[&0x1000].verdict(&v), None);
    }

    #[test]
    fn a_map_behind_its_growth_for_three_reads_is_dropped_and_a_freed_one_at_once() {
        let mut s = state_with_map(14);
        let mem = OneMap(RefCell::new((50_000, 13)));
        for _ in 0..MAX_BEHIND_READS {
            s.refresh_maps(&mem, MAX_MAP_READS);
            assert!(
                s.maps.contains_key(&0x1000),
                "a growth may still be under way"
            );
        }
        s.refresh_maps(&mem, MAX_MAP_READS);
        assert!(s.maps.is_empty());
        assert_eq!(s.maps_gone, 1);
        let mut s = state_with_map(14);
        let mem = OneMap(RefCell::new((3, 0)));
        s.refresh_maps(&mem, MAX_MAP_READS);
        assert!(s.maps.is_empty(), "B 0 where B 14 was: another map");
    }
}
