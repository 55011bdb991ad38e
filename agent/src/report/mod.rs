//! What a tracing session reports, independent of how it is rendered (text or JSON).

pub mod files;
pub mod flame;
pub mod json;
pub mod pprof;
pub mod text;

use std::collections::BTreeMap;

use allocwatch_common::libc::{Api, SiteStats};

use crate::{
    aggregate::Totals,
    gort::live::Live,
    symbolize::{Frame, SymbolizeStats},
    target::libc::Allocator,
};

/// Identity and fate of a traced process.
#[derive(Clone, Debug, Default)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    pub exe: String,
    pub exited: bool,
    /// Exit status when the agent launched the process (or it was killed by a signal: 128+n).
    pub exit_code: Option<i32>,
    /// The file that serves `malloc` (a libc, an allocator library, a static executable), as
    /// the process sees it.
    pub libc: String,
    /// Which allocator that file is (`None`: no malloc family found).
    pub allocator: Option<Allocator>,
    /// Every file probed for the malloc family, that one first (the next ones serve APIs it
    /// lacks: glibc's `reallocarray` under jemalloc).
    pub allocator_files: Vec<String>,
    /// API symbols that are the same function as another: (alias, counted under).
    pub aliases: Vec<(Api, Api)>,
}

/// One process of a followed tree: the session's command (or `--pid`) and every process it
/// started while traced.
#[derive(Clone, Debug, Default)]
pub struct TreeProcess {
    pub pid: u32,
    /// The followed process that created it (`None` for the root).
    pub parent_pid: Option<u32>,
    /// As last seen (after an exec: the new program's).
    pub comm: String,
    pub exe: String,
    pub exited: bool,
    /// Its `exit_group` status (the root launched by allocwatch: also 128+signal).
    pub exit_code: Option<i32>,
    /// It exec'd while traced: its first program was replaced, and its counts hold both.
    pub replaced_by_exec: bool,
    /// How its program was probed: `attached` (before its first call), `late` (an exec'd
    /// program whose files had to be probed after it started: its first calls are lost),
    /// `none` (nothing allocwatch can probe).
    pub probes: &'static str,
    /// A Go program: `traced` (the root's runtime events) or `not traced` (any other Go
    /// program of the tree: its libc calls only). `None`: not a Go program.
    pub go: Option<&'static str>,
    pub totals: Totals,
}

/// One call site: an API and the symbolized call chain that reached it.
#[derive(Clone, Debug)]
pub struct Site {
    pub api: Api,
    pub frames: Vec<Frame>,
    /// As reported: with sampling, estimates (`aggregate::Sampling::estimate`).
    pub stats: SiteStats,
    /// With sampling: the (calls, bytes) actually sampled at this stack, which `stats`
    /// scales; `None` when the figures are exact.
    pub sampled: Option<(u64, u64)>,
}

/// With sampled stacks: the exact figures of one immediate caller (every call counted).
#[derive(Clone, Debug)]
pub struct Caller {
    pub api: Api,
    pub frames: Vec<Frame>,
    pub calls: u64,
    pub bytes: u64,
    pub failed: u64,
}

/// The `top` report of one process.
#[derive(Clone, Debug)]
pub struct TopReport {
    pub info: ProcessInfo,
    pub elapsed_secs: f64,
    pub totals: Totals,
    /// Loss counters by cause name, all causes present.
    pub lost: BTreeMap<&'static str, u64>,
    /// Mean bytes between sampled calls (0: every call recorded, nothing estimated).
    pub sample_bytes: u64,
    /// Sites ranked by bytes (allocation sites first, then free sites).
    pub sites: Vec<Site>,
    /// With sampled stacks: exact calls and bytes per API and immediate caller, ranked as
    /// `sites`; empty otherwise (the sites are then exact per caller or per stack).
    pub callers: Vec<Caller>,
    /// Addresses the symbolizer could not name, by cause (all processes of the session).
    pub symbolization: SymbolizeStats,
    pub go: Option<GoReport>,
    /// Following a tree: each process traced (the root first). Empty with `--no-follow`;
    /// `totals`, `sites` and `callers` are then those of the whole tree.
    pub tree: Vec<TreeProcess>,
    /// Symbol probes: each kind's totals, and its sites by calls.
    pub probes: Vec<ProbeTotal>,
    pub probe_sites: Vec<ProbeSite>,
}

/// The calls of a probed function (a built-in growth kind or a `--probe`) at one call site.
#[derive(Clone, Debug)]
pub struct ProbeSite {
    pub kind: String,
    pub frames: Vec<Frame>,
    pub calls: u64,
    /// Each named argument's sum over the calls.
    pub args: Vec<(String, u64)>,
}

/// A probe kind's totals in the process (every `--probe`, and the built-in kinds found).
#[derive(Clone, Debug)]
pub struct ProbeTotal {
    pub kind: String,
    pub builtin: bool,
    pub calls: u64,
    pub args: Vec<(String, u64)>,
}

/// A Go growth or large-allocation site.
#[derive(Clone, Debug)]
pub struct GoSite {
    pub kind: &'static str,
    pub frames: Vec<Frame>,
    pub count: u64,
    pub bytes: u64,
}

/// One Go map instance that grew.
#[derive(Clone, Debug)]
pub struct GoMap {
    pub ptr: u64,
    pub grows: u64,
    pub by_kind: BTreeMap<&'static str, u64>,
    pub bytes: u64,
    /// Old maps: B (2^B buckets); swiss maps: largest table capacity.
    pub size_class: u64,
    pub dir_len: u64,
    pub len_at_last_grow: u64,
    /// Read from the process at the last refresh (`None`: never read).
    pub live: Option<Live>,
    /// The largest length seen, at a growth or a read.
    pub len_max: u64,
    /// len / slots at the last read.
    pub load: Option<f64>,
    /// "growing", "bloated" or none (`gostate::Verdicts`).
    pub verdict: Option<&'static str>,
    /// Call chain of its first growth seen.
    pub frames: Vec<Frame>,
}

/// Pause statistics in seconds.
#[derive(Clone, Debug, Default)]
pub struct PauseSummary {
    pub count: u64,
    pub sum: f64,
    pub max: f64,
    /// (upper bound in seconds, pauses in that log2 bucket).
    pub buckets: Vec<(f64, u64)>,
}

/// What the Go probes saw in one process.
#[derive(Clone, Debug, Default)]
pub struct GoReport {
    pub version: String,
    /// "swiss" or "buckets".
    pub map_impl: &'static str,
    pub map_grows: BTreeMap<&'static str, u64>,
    pub map_grow_bytes: u64,
    pub slice_grows: u64,
    pub slice_grow_bytes: u64,
    pub slice_moves: u64,
    pub slice_move_bytes: u64,
    pub large_allocs: u64,
    pub large_alloc_bytes: u64,
    pub gc_starts: u64,
    pub gc_cycles: u64,
    pub gc_pauses: PauseSummary,
    pub stw_pauses: PauseSummary,
    /// mallocgc request sizes: (log2 bucket lower bound in bytes, count, bytes).
    pub alloc_sizes: Vec<(u64, u64, u64)>,
    pub sites: Vec<GoSite>,
    pub maps: Vec<GoMap>,
    pub maps_tracked: u64,
    pub maps_untracked: u64,
    /// Map instances read as no longer there (freed, their memory reused) and dropped.
    pub maps_dropped: u64,
    /// Growth events counted in the kernel (`GO_AGG`), included in the counts above.
    pub growth_aggregated: u64,
    /// Whether this Go release's runtime knowledge was measured on real binaries.
    pub measured: bool,
    pub warnings: Vec<String>,
}

/// Outstanding allocations of one site.
#[derive(Clone, Debug)]
pub struct Leak {
    pub api: Api,
    pub frames: Vec<Frame>,
    pub count: u64,
    pub bytes: u64,
    pub oldest_age_secs: f64,
}

/// The `leaks` report of one process.
#[derive(Clone, Debug)]
pub struct LeaksReport {
    pub info: ProcessInfo,
    pub min_age_secs: f64,
    /// Mean bytes between sampled calls: counts and bytes are then estimates (0: exact).
    pub sample_bytes: u64,
    pub live_allocations: u64,
    pub live_bytes: u64,
    pub lost: BTreeMap<&'static str, u64>,
    pub leaks: Vec<Leak>,
    pub symbolization: SymbolizeStats,
}

/// `1536` → `1.5 KiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The report as the export model, for the pprof and flamegraph writers.
pub fn snapshot_of(r: &TopReport) -> crate::model::ProcessSnapshot {
    use crate::model::{ProcessLabels, ProcessSnapshot, SiteSnapshot};
    let mut snap = ProcessSnapshot {
        pid: r.info.pid,
        labels: ProcessLabels {
            comm: r.info.comm.clone(),
            exe: r.info.exe.clone(),
            ..ProcessLabels::default()
        },
        frees: r.totals.calls[Api::Free as usize],
        deletes: Api::ALL
            .into_iter()
            .filter(|a| a.is_free() && *a != Api::Free && r.totals.calls[*a as usize] > 0)
            .map(|a| (a.name(), r.totals.calls[a as usize]))
            .collect(),
        live_bytes: r.totals.live_bytes,
        live_allocations: r.totals.live_allocations,
        ..ProcessSnapshot::default()
    };
    for api in Api::ALL {
        if !api.is_free() {
            snap.calls.insert(api.name(), r.totals.calls[api as usize]);
            snap.bytes.insert(api.name(), r.totals.bytes[api as usize]);
        }
    }
    for s in &r.sites {
        let (live_allocations, live_bytes) = crate::aggregate::live_of(&s.stats);
        snap.sites.push(SiteSnapshot {
            kind: s.api.name(),
            frames: s.frames.clone().into(),
            calls: s.stats.calls,
            bytes: s.stats.bytes,
            live_allocations,
            live_bytes,
            remainder: false,
            pending: false,
            probe: false,
        });
    }
    if let Some(go) = &r.go {
        for s in &go.sites {
            snap.sites.push(SiteSnapshot {
                kind: s.kind,
                frames: s.frames.clone().into(),
                calls: s.count,
                bytes: s.bytes,
                live_allocations: 0,
                live_bytes: 0,
                remainder: false,
                pending: false,
                probe: false,
            });
        }
    }
    snap
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }
}
