//! The `--json` format (documented in README.md). Field names are a public contract.

use std::collections::BTreeMap;

use allocwatch_common::libc::Api;
use serde::Serialize;

use super::{
    Caller, GoReport, Leak, LeaksReport, PauseSummary, ProcessInfo, Site, TopReport, TreeProcess,
};
use crate::{
    aggregate::live_of,
    symbolize::{Frame, SymbolizeStats},
};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Serialize)]
struct Document<P> {
    version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_age_seconds: Option<f64>,
    processes: Vec<P>,
}

#[derive(Serialize)]
struct Identity<'a> {
    pid: u32,
    comm: &'a str,
    exe: &'a str,
    exited: bool,
    exit_code: Option<i32>,
    libc: &'a str,
    allocator: Option<&'static str>,
    allocator_files: &'a [String],
    aliases: BTreeMap<&'static str, &'static str>,
}

impl<'a> From<&'a ProcessInfo> for Identity<'a> {
    fn from(i: &'a ProcessInfo) -> Self {
        Self {
            pid: i.pid,
            comm: &i.comm,
            exe: &i.exe,
            exited: i.exited,
            exit_code: i.exit_code,
            libc: &i.libc,
            allocator: i.allocator.map(|a| a.name()),
            allocator_files: &i.allocator_files,
            aliases: i
                .aliases
                .iter()
                .map(|(alias, canon)| (alias.name(), canon.name()))
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct TopProcess<'a> {
    #[serde(flatten)]
    identity: Identity<'a>,
    elapsed_seconds: f64,
    calls: BTreeMap<&'static str, u64>,
    bytes: BTreeMap<&'static str, u64>,
    failed: BTreeMap<&'static str, u64>,
    live_bytes: u64,
    live_allocations: u64,
    lost: &'a BTreeMap<&'static str, u64>,
    /// `lost` summed by what it takes: `counts`, `live`, `detail` (crate::loss).
    lost_by_effect: BTreeMap<&'static str, u64>,
    symbolization: SymbolizeStats,
    /// Mean bytes between sampled calls; 0: every call recorded, nothing estimated.
    sample_bytes: u64,
    sites: Vec<JsonSite<'a>>,
    /// With sampled stacks: exact figures per API and immediate caller.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    callers: Vec<JsonCaller<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    go: Option<JsonGo<'a>>,
    /// Following a tree: every process traced, the root first (its figures are per process;
    /// the totals above are the tree's). Absent with `--no-follow`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    followed: Vec<JsonTreeProcess<'a>>,
    /// Symbol probes (built-in container growth, `--probe`): totals by kind and sites.
    #[serde(skip_serializing_if = "Option::is_none")]
    probes: Option<JsonProbes<'a>>,
}

#[derive(Serialize)]
struct JsonProbes<'a> {
    kinds: Vec<JsonProbeKind<'a>>,
    sites: Vec<JsonProbeSite<'a>>,
}

#[derive(Serialize)]
struct JsonProbeKind<'a> {
    kind: &'a str,
    builtin: bool,
    calls: u64,
    /// Each named argument's sum over the calls.
    args: BTreeMap<&'a str, u64>,
}

#[derive(Serialize)]
struct JsonProbeSite<'a> {
    kind: &'a str,
    frames: &'a [Frame],
    calls: u64,
    args: BTreeMap<&'a str, u64>,
}

fn named_args(a: &[(String, u64)]) -> BTreeMap<&str, u64> {
    a.iter().map(|(n, v)| (n.as_str(), *v)).collect()
}

fn json_probes(r: &TopReport) -> Option<JsonProbes<'_>> {
    let args = named_args;
    (!r.probes.is_empty()).then(|| JsonProbes {
        kinds: r
            .probes
            .iter()
            .map(|t| JsonProbeKind {
                kind: &t.kind,
                builtin: t.builtin,
                calls: t.calls,
                args: args(&t.args),
            })
            .collect(),
        sites: r
            .probe_sites
            .iter()
            .map(|s| JsonProbeSite {
                kind: &s.kind,
                frames: &s.frames,
                calls: s.calls,
                args: args(&s.args),
            })
            .collect(),
    })
}

#[derive(Serialize)]
struct JsonTreeProcess<'a> {
    pid: u32,
    parent_pid: Option<u32>,
    comm: &'a str,
    exe: &'a str,
    exited: bool,
    exit_code: Option<i32>,
    replaced_by_exec: bool,
    probes: &'static str,
    /// A Go program only: `traced` (the command's runtime) or `not traced`.
    #[serde(skip_serializing_if = "Option::is_none")]
    go_runtime: Option<&'static str>,
    calls: BTreeMap<&'static str, u64>,
    bytes: BTreeMap<&'static str, u64>,
    failed: BTreeMap<&'static str, u64>,
    live_bytes: u64,
    live_allocations: u64,
}

impl<'a> From<&'a TreeProcess> for JsonTreeProcess<'a> {
    fn from(p: &'a TreeProcess) -> Self {
        Self {
            pid: p.pid,
            parent_pid: p.parent_pid,
            comm: &p.comm,
            exe: &p.exe,
            exited: p.exited,
            exit_code: p.exit_code,
            replaced_by_exec: p.replaced_by_exec,
            probes: p.probes,
            go_runtime: p.go,
            calls: per_api(&p.totals.calls),
            bytes: per_api(&p.totals.bytes),
            failed: per_api(&p.totals.failed),
            live_bytes: p.totals.live_bytes,
            live_allocations: p.totals.live_allocations,
        }
    }
}

#[derive(Serialize)]
struct JsonCaller<'a> {
    api: &'static str,
    frames: &'a [Frame],
    calls: u64,
    bytes: u64,
    failed: u64,
}

impl<'a> From<&'a Caller> for JsonCaller<'a> {
    fn from(c: &'a Caller) -> Self {
        Self {
            api: c.api.name(),
            frames: &c.frames,
            calls: c.calls,
            bytes: c.bytes,
            failed: c.failed,
        }
    }
}

#[derive(Serialize)]
struct JsonGo<'a> {
    version: &'a str,
    map_impl: &'static str,
    map_grows: JsonGrows<'a>,
    map_grow_bytes: u64,
    slice_grows: u64,
    slice_grow_bytes: u64,
    slice_moves_to_heap: u64,
    slice_move_bytes: u64,
    large_allocs: u64,
    large_alloc_bytes: u64,
    gc_starts: u64,
    gc_cycles: u64,
    gc_pause_seconds: JsonPauses<'a>,
    stw_pause_seconds: JsonPauses<'a>,
    alloc_sizes: Vec<JsonBucket>,
    sites: Vec<JsonGoSite<'a>>,
    maps: Vec<JsonGoMap<'a>>,
    maps_tracked: u64,
    maps_untracked: u64,
    /// Map instances dropped because their memory no longer holds that map (freed and reused).
    maps_dropped: u64,
    /// Growth events counted in the kernel by key (included above, with the stack of their
    /// key's first event).
    growth_aggregated: u64,
    /// Whether allocwatch's knowledge of this Go release was measured on real binaries.
    runtime_measured: bool,
    warnings: &'a [String],
}

#[derive(Serialize)]
struct JsonGrows<'a> {
    total: u64,
    by_kind: &'a BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
struct JsonPauses<'a> {
    sum: f64,
    count: u64,
    max: f64,
    /// (upper bound in seconds, pauses in that log2 bucket)
    buckets: &'a [(f64, u64)],
}

impl<'a> From<&'a PauseSummary> for JsonPauses<'a> {
    fn from(p: &'a PauseSummary) -> Self {
        Self {
            sum: p.sum,
            count: p.count,
            max: p.max,
            buckets: &p.buckets,
        }
    }
}

#[derive(Serialize)]
struct JsonBucket {
    /// Sizes in `[min_bytes, 2 * min_bytes)`.
    min_bytes: u64,
    count: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct JsonGoSite<'a> {
    kind: &'static str,
    frames: &'a [Frame],
    count: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct JsonGoMap<'a> {
    address: u64,
    grows: u64,
    by_kind: &'a BTreeMap<&'static str, u64>,
    bytes: u64,
    /// Bucket maps: B; swiss maps: the largest table capacity.
    size_class: u64,
    directory_len: u64,
    len_at_last_grow: u64,
    /// Read from the process at the last refresh (null: never read).
    len: Option<u64>,
    /// The largest length seen, at a growth or a read.
    len_max: u64,
    /// Slots of its buckets or tables now.
    capacity: Option<u64>,
    /// Bytes its buckets or tables (and directory) hold now.
    bytes_held: Option<u64>,
    load: Option<f64>,
    /// "growing", "bloated" or null.
    verdict: Option<&'static str>,
    first_grown_at: &'a [Frame],
}

impl<'a> From<&'a GoReport> for JsonGo<'a> {
    fn from(g: &'a GoReport) -> Self {
        Self {
            version: &g.version,
            map_impl: g.map_impl,
            map_grows: JsonGrows {
                total: g.map_grows.values().sum(),
                by_kind: &g.map_grows,
            },
            map_grow_bytes: g.map_grow_bytes,
            slice_grows: g.slice_grows,
            slice_grow_bytes: g.slice_grow_bytes,
            slice_moves_to_heap: g.slice_moves,
            slice_move_bytes: g.slice_move_bytes,
            large_allocs: g.large_allocs,
            large_alloc_bytes: g.large_alloc_bytes,
            gc_starts: g.gc_starts,
            gc_cycles: g.gc_cycles,
            gc_pause_seconds: (&g.gc_pauses).into(),
            stw_pause_seconds: (&g.stw_pauses).into(),
            alloc_sizes: g
                .alloc_sizes
                .iter()
                .map(|&(min_bytes, count, bytes)| JsonBucket {
                    min_bytes,
                    count,
                    bytes,
                })
                .collect(),
            sites: g
                .sites
                .iter()
                .map(|s| JsonGoSite {
                    kind: s.kind,
                    frames: &s.frames,
                    count: s.count,
                    bytes: s.bytes,
                })
                .collect(),
            maps: g
                .maps
                .iter()
                .map(|m| JsonGoMap {
                    address: m.ptr,
                    grows: m.grows,
                    by_kind: &m.by_kind,
                    bytes: m.bytes,
                    size_class: m.size_class,
                    directory_len: m.dir_len,
                    len_at_last_grow: m.len_at_last_grow,
                    len: m.live.map(|l| l.len),
                    len_max: m.len_max,
                    capacity: m.live.map(|l| l.slots),
                    bytes_held: m.live.map(|l| l.bytes),
                    load: m.load,
                    verdict: m.verdict,
                    first_grown_at: &m.frames,
                })
                .collect(),
            maps_tracked: g.maps_tracked,
            maps_untracked: g.maps_untracked,
            maps_dropped: g.maps_dropped,
            growth_aggregated: g.growth_aggregated,
            runtime_measured: g.measured,
            warnings: &g.warnings,
        }
    }
}

#[derive(Serialize)]
struct JsonSite<'a> {
    api: &'static str,
    frames: &'a [Frame],
    calls: u64,
    bytes: u64,
    failed: u64,
    live_bytes: u64,
    live_allocations: u64,
    /// With sampling: the calls and bytes sampled at this stack, which `calls` and `bytes`
    /// estimate the whole of.
    #[serde(skip_serializing_if = "Option::is_none")]
    sampled_calls: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sampled_bytes: Option<u64>,
}

impl<'a> From<&'a Site> for JsonSite<'a> {
    fn from(s: &'a Site) -> Self {
        let (live_allocations, live_bytes) = live_of(&s.stats);
        Self {
            api: s.api.name(),
            frames: &s.frames,
            calls: s.stats.calls,
            bytes: s.stats.bytes,
            failed: s.stats.failed,
            live_bytes,
            live_allocations,
            sampled_calls: s.sampled.map(|x| x.0),
            sampled_bytes: s.sampled.map(|x| x.1),
        }
    }
}

#[derive(Serialize)]
struct LeaksProcess<'a> {
    #[serde(flatten)]
    identity: Identity<'a>,
    live_bytes: u64,
    live_allocations: u64,
    lost: &'a BTreeMap<&'static str, u64>,
    lost_by_effect: BTreeMap<&'static str, u64>,
    symbolization: SymbolizeStats,
    /// Mean bytes between sampled calls: counts and bytes are then estimates (0: exact).
    sample_bytes: u64,
    leaks: Vec<JsonLeak<'a>>,
}

#[derive(Serialize)]
struct JsonLeak<'a> {
    api: &'static str,
    frames: &'a [Frame],
    count: u64,
    bytes: u64,
    oldest_age_seconds: f64,
}

impl<'a> From<&'a Leak> for JsonLeak<'a> {
    fn from(l: &'a Leak) -> Self {
        Self {
            api: l.api.name(),
            frames: &l.frames,
            count: l.count,
            bytes: l.bytes,
            oldest_age_seconds: l.oldest_age_secs,
        }
    }
}

/// Every libc API, and the C++ operators and allocators' own entry points with calls (most
/// processes have none to show).
fn per_api(values: &[u64]) -> BTreeMap<&'static str, u64> {
    Api::ALL
        .iter()
        .filter(|a| a.is_libc() || values[**a as usize] > 0)
        .map(|a| (a.name(), values[*a as usize]))
        .collect()
}

pub fn top(reports: &[TopReport]) -> serde_json::Result<String> {
    let processes = reports
        .iter()
        .map(|r| TopProcess {
            identity: (&r.info).into(),
            elapsed_seconds: r.elapsed_secs,
            calls: per_api(&r.totals.calls),
            bytes: per_api(&r.totals.bytes),
            failed: per_api(&r.totals.failed),
            live_bytes: r.totals.live_bytes,
            live_allocations: r.totals.live_allocations,
            lost: &r.lost,
            lost_by_effect: crate::loss::by_effect(&r.lost),
            symbolization: r.symbolization,
            sample_bytes: r.sample_bytes,
            sites: r.sites.iter().map(Into::into).collect(),
            callers: r.callers.iter().map(Into::into).collect(),
            go: r.go.as_ref().map(Into::into),
            followed: r.tree.iter().map(Into::into).collect(),
            probes: json_probes(r),
        })
        .collect();
    serde_json::to_string_pretty(&Document {
        version: FORMAT_VERSION,
        min_age_seconds: None,
        processes,
    })
}

pub fn leaks(reports: &[LeaksReport]) -> serde_json::Result<String> {
    let min_age_seconds = reports.first().map(|r| r.min_age_secs);
    let processes = reports
        .iter()
        .map(|r| LeaksProcess {
            identity: (&r.info).into(),
            live_bytes: r.live_bytes,
            live_allocations: r.live_allocations,
            lost: &r.lost,
            lost_by_effect: crate::loss::by_effect(&r.lost),
            symbolization: r.symbolization,
            sample_bytes: r.sample_bytes,
            leaks: r.leaks.iter().map(Into::into).collect(),
        })
        .collect();
    serde_json::to_string_pretty(&Document {
        version: FORMAT_VERSION,
        min_age_seconds,
        processes,
    })
}
