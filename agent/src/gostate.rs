//! What the Go probes saw in one process: map growth (per kind and per map instance), slice
//! growth, large allocations, GC cycles and stop-the-world pauses. Pure decoding and
//! aggregation of [`GoEvent`]s; unit-tested without root.

use std::collections::{BTreeMap, HashMap};

use allocwatch_common::go::{GoEvent, GoRole};

use crate::{
    gort::{
        buildinfo::GoVersion,
        versions::{MapImpl, RuntimeFunc},
    },
    target::go::GoTarget,
};

/// Stop reasons (`stwReason`, Go ≥ 1.21) that belong to a GC cycle.
const STW_GC_MARK_TERM: u64 = 1;
const STW_GC_SWEEP_TERM: u64 = 2;

/// Map instances tracked at once per process; beyond it new maps are counted, not kept.
pub const MAX_MAP_INSTANCES: usize = 100_000;

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
            GoSiteKind::Alloc => "alloc",
        }
    }
}

/// Where a Go event happened: the call chain key used for symbolization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GoSiteKey {
    pub kind: GoSiteKind,
    pub stack_id: i32,
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
    pub maps: HashMap<u64, MapInstance>,
    pub maps_untracked: u64,
    /// Events whose role this binary was not probed for (should stay 0).
    pub unexpected: u64,
    /// Before Go 1.21 stops carry no reason: GC stops return into these ranges.
    gc_stop_callers: Vec<(u64, u64)>,
    /// GC pauses seen on versions without reasons (two per cycle).
    reasonless_gc_pauses: u64,
    version_parsed: Option<GoVersion>,
    funcs: HashMap<GoRole, &'static RuntimeFunc>,
}

impl GoState {
    pub fn new(target: &GoTarget) -> Self {
        Self {
            version: target.version.raw.clone(),
            swiss: target.maps == MapImpl::Swiss,
            gc_stop_callers: target.gc_stop_callers.clone(),
            version_parsed: Some(target.version.clone()),
            funcs: target.probes.iter().map(|p| (p.role, p.func)).collect(),
            ..Self::default()
        }
    }

    pub fn record(&mut self, ev: &GoEvent) {
        let Ok(role) = GoRole::try_from(ev.role) else {
            self.unexpected += 1;
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
                let (ptr, count, b, bucketsize) = (v[0], v[1], v[2] as u8, v[4]);
                let Some(doubles) = self
                    .funcs
                    .get(&role)
                    .and_then(|f| f.hash_grow_doubles(count, b))
                else {
                    self.unexpected += 1;
                    return;
                };
                let new_b = if doubles { b + 1 } else { b };
                let bytes = growth::bucket_array_bytes(bucketsize, new_b);
                let kind = if doubles { "double" } else { "same_size" };
                // A map whose B went down is a new map at a reused address.
                let fresh = self
                    .maps
                    .get(&ptr)
                    .is_some_and(|m| u64::from(b) < m.size_class);
                self.map_grow(ptr, kind, bytes, site(GoSiteKind::MapGrow), fresh, |m| {
                    m.size_class = u64::from(new_b);
                    m.len_at_last_grow = count;
                });
            }
            GoRole::MapGrowToSmall => {
                let (ptr, group) = (v[0], v[4]);
                // The first group: always a new map (or a cleared one starting over).
                self.map_grow(ptr, "small", group, site(GoSiteKind::MapGrow), true, |m| {
                    m.size_class = 8;
                    m.dir_len = 0;
                });
            }
            GoRole::MapGrowToTable => {
                let (ptr, used, group) = (v[0], v[1], v[4]);
                self.map_grow(
                    ptr,
                    "to_table",
                    growth::swiss_table_bytes(16, group),
                    site(GoSiteKind::MapGrow),
                    false,
                    |m| {
                        m.size_class = 16;
                        m.dir_len = 1;
                        m.len_at_last_grow = used;
                    },
                );
            }
            GoRole::MapTableGrow => {
                let (ptr, new_cap, used, group) = (v[0], v[3], v[4], v[5]);
                self.map_grow(
                    ptr,
                    "grow",
                    growth::swiss_table_bytes(new_cap, group),
                    site(GoSiteKind::MapGrow),
                    false,
                    |m| {
                        m.size_class = m.size_class.max(new_cap);
                        m.len_at_last_grow = m.len_at_last_grow.max(used);
                    },
                );
            }
            GoRole::MapTableSplit => {
                let (ptr, cap, group, map_used) = (v[0], v[2], v[4], v[5]);
                self.map_grow(
                    ptr,
                    "split",
                    2 * growth::swiss_table_bytes(cap, group),
                    site(GoSiteKind::MapGrow),
                    false,
                    |m| {
                        m.size_class = m.size_class.max(cap);
                        m.len_at_last_grow = map_used;
                    },
                );
            }
            GoRole::MapDirectoryGrow => {
                let (ptr, global_depth, dir_len, old_local) = (v[0], v[1], v[2], v[3]);
                if old_local == global_depth {
                    self.map_grow(
                        ptr,
                        "dir_grow",
                        2 * dir_len * 8,
                        site(GoSiteKind::MapGrow),
                        false,
                        |m| m.dir_len = 2 * dir_len,
                    );
                }
            }
            GoRole::SliceGrow => {
                let (new_len, old_cap, elem, ptr_bytes) = (v[0], v[1], v[2], v[3]);
                let Some(version) = &self.version_parsed else {
                    return;
                };
                let g = growth::grow_slice(version, old_cap, new_len, elem, ptr_bytes != 0);
                self.slice_grows += 1;
                self.slice_grow_bytes += g.bytes;
                let s = self.sites.entry(site(GoSiteKind::SliceGrow)).or_default();
                s.count += 1;
                s.bytes += g.bytes;
            }
            GoRole::SliceMoveToHeap => {
                let (len, cap, elem) = (v[0], v[1], v[2]);
                if len > 0 {
                    self.slice_moves.count += 1;
                    self.slice_moves.bytes += cap.max(len).saturating_mul(elem);
                }
            }
            GoRole::Malloc | GoRole::MallocSpecialized => {
                let size = v[0];
                self.large_allocs.count += 1;
                self.large_allocs.bytes += size;
                let s = self.sites.entry(site(GoSiteKind::Alloc)).or_default();
                s.count += 1;
                s.bytes += size;
            }
            GoRole::GcStart => self.gc_starts += 1,
            GoRole::StopTheWorld => self.unexpected += 1,
            GoRole::StartTheWorldRet => {
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

    fn map_grow(
        &mut self,
        ptr: u64,
        kind: &'static str,
        bytes: u64,
        site: GoSiteKey,
        fresh: bool,
        update: impl FnOnce(&mut MapInstance),
    ) {
        *self.map_grows.entry(kind).or_default() += 1;
        self.map_grow_bytes += bytes;
        let s = self.sites.entry(site).or_default();
        s.count += 1;
        s.bytes += bytes;
        if fresh {
            self.maps.remove(&ptr);
        }
        if !self.maps.contains_key(&ptr) && self.maps.len() >= MAX_MAP_INSTANCES {
            self.maps_untracked += 1;
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
    }

    /// Map instances ranked by bytes grown, then by grow count.
    pub fn top_maps(&self, k: usize) -> Vec<&MapInstance> {
        let mut v: Vec<_> = self.maps.values().collect();
        v.sort_by(|a, b| (b.bytes, b.grows, a.ptr).cmp(&(a.bytes, a.grows, b.ptr)));
        v.truncate(k);
        v
    }
}

/// TEMPORARY until gort::growth lands (no size-class rounding).
mod growth {
    use crate::gort::buildinfo::GoVersion;
    pub struct Growth {
        pub bytes: u64,
    }
    pub fn bucket_array_bytes(bucketsize: u64, b: u8) -> u64 {
        bucketsize << b
    }
    pub fn swiss_table_bytes(cap: u64, group: u64) -> u64 {
        cap / 8 * group
    }
    pub fn grow_slice(_v: &GoVersion, old_cap: u64, new_len: u64, elem: u64, _p: bool) -> Growth {
        let new_cap = if new_len > 2 * old_cap {
            new_len
        } else if old_cap < 256 {
            2 * old_cap
        } else {
            old_cap + (old_cap + 768) / 4
        };
        Growth {
            bytes: new_cap * elem,
        }
    }
}
