//! A session's state after attaching and its views of it: the `top`, `maps` and `leaks`
//! reports of the one traced process, built from the kernel maps, the Go state and the named
//! call chains.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, hash_map::Entry},
    sync::Arc,
    time::{Duration, Instant},
};

use allocwatch_common::{
    event::GoEvent,
    libc::{Api, NO_STACK, SiteKey, SiteStats},
    loss::LossCause,
    map_names,
};

use super::follow::Tree;
use crate::{
    aggregate,
    aggregate::Sampling,
    collect,
    daemon::exec_snapshots::ExecSnapshots,
    gort::live::ProcessMemory,
    gort::versions::MapImpl,
    gostate::{GoSiteKey, GoState, Pauses, Verdict, Verdicts},
    loss,
    pipeline::{Handler, Parts, Pipeline},
    procfs,
    report::{
        Caller, GoMap, GoReport, GoSite, Leak, LeaksReport, PauseSummary, ProbeSite, ProbeTotal,
        ProcessInfo, Site, TopReport,
    },
    symbolize::Frame,
    target::{go::GoTarget, symprobe::ProbeKind},
};

/// The state of a session after attaching.
pub struct Tracer {
    pub pipe: Pipeline,
    pub watched: Watched,
    pub go_target: Option<Arc<GoTarget>>,
    pub started: Instant,
    pub top_k: usize,
    pub sampling: Sampling,
    /// Reads the maps of the tree's programs at their exec (stops when dropped).
    pub _exec_snapshots: Option<ExecSnapshots>,
    /// The unwind tables loaded for the traced process (`--unwind dwarf`).
    pub unwind: Option<crate::unwind::load::Tables>,
    /// What each symbol-probe id counts.
    pub probe_kinds: Vec<ProbeKind>,
    /// The probe ids attached somewhere (a built-in kind is reported only when found).
    pub probes_attached: BTreeSet<u32>,
}

/// What the records say about the traced process beyond its sites.
pub struct Watched {
    pub info: ProcessInfo,
    /// The root's Go runtime events (a Go program the tree execs is counted through its libc
    /// calls only).
    pub go: Option<GoState>,
    pub tree: Tree,
}

impl Watched {
    /// A process seen for the first time: its mappings are noted for the symbolizer, and its
    /// identity read again (after exec they name the command).
    fn seen(&mut self, parts: &mut Parts, tgid: u32) {
        if parts.frames.noted.insert(tgid) {
            parts.symbolizer.note_process(tgid);
            refresh_identity(&mut self.info);
        }
    }
}

impl Handler for Watched {
    fn exec(&mut self, parts: &mut Parts, tgid: u32, comm: &[u8; 16], path: String) {
        let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
        let comm = String::from_utf8_lossy(&comm[..end]).into_owned();
        self.tree.exec(&mut parts.probes, tgid, comm, path);
    }

    fn fork(&mut self, parts: &mut Parts, child: u32, parent: u32, followed: bool) {
        self.tree.fork(child, parent, followed);
        // A forked child maps what its parent did: noted now, its sites can be named even
        // if it exits before its first new site is read.
        if followed && parts.frames.noted.insert(child) {
            parts.symbolizer.note_process(child);
        }
    }

    fn exit(&mut self, _parts: &mut Parts, tgid: u32, code: Option<u8>) {
        self.tree.exit(tgid, code);
    }

    fn new_site(&mut self, parts: &mut Parts, site: &SiteKey, _comm: &[u8; 16]) {
        if self.tree.on {
            self.tree.seen(site.tgid);
        }
        self.seen(parts, site.tgid);
    }

    fn go(&mut self, parts: &mut Parts, event: &GoEvent) {
        if let Some(state) = &mut self.go
            && event.header.tgid == self.info.pid
        {
            state.record(event);
        }
        self.seen(parts, event.header.tgid);
    }

    fn go_repeats(&mut self, event: &GoEvent, n: u64) {
        if let Some(state) = &mut self.go
            && event.header.tgid == self.info.pid
        {
            state.record_repeats(event, n);
        }
    }
}

/// The named call chain of a site.
async fn chain(
    parts: &mut Parts,
    tgid: u32,
    stack_id: i64,
    ret_addr: u64,
) -> anyhow::Result<Vec<Frame>> {
    // A process's row of unknown sites (`SiteKey::spill`): nothing to name.
    if stack_id == NO_STACK && ret_addr == 0 {
        return Ok(Vec::new());
    }
    let Parts {
        probes,
        frames,
        symbolizer,
    } = parts;
    frames
        .frames(probes, symbolizer, tgid, stack_id, ret_addr)
        .await
}

impl Tracer {
    /// Reads and handles every record ready, then names the new sites now, while their
    /// process is alive.
    pub async fn drain(&mut self) -> anyhow::Result<()> {
        self.pipe.drain(&mut self.watched)?;
        self.pipe.name_queued(None).await?;
        Ok(())
    }

    /// [`Self::drain`], then the Go growth counted in the kernel since the last call.
    pub async fn drain_go_agg(&mut self) -> anyhow::Result<()> {
        self.pipe.drain_go_agg(&mut self.watched)?;
        self.pipe.name_queued(None).await?;
        Ok(())
    }

    pub fn lost(&self) -> anyhow::Result<BTreeMap<&'static str, u64>> {
        let mut lost: BTreeMap<&'static str, u64> = collect::lost(&self.pipe.parts.probes)?
            .into_iter()
            .map(|(cause, n): (LossCause, u64)| (cause.name(), n))
            .collect();
        lost.insert(
            loss::SYMBOLIZE_PROCESS_GONE,
            self.pipe.parts.frames.process_gone,
        );
        lost.insert(
            loss::SYMBOLIZE_STACK_EVICTED,
            self.pipe.parts.frames.stacks_evicted,
        );
        lost.insert(
            loss::SYMBOLIZE_STACK_CUT,
            self.pipe.parts.symbolizer.stats().stack_cut,
        );
        if let Some(go) = &self.watched.go {
            lost.insert(loss::GO_MAP_INSTANCES_UNTRACKED, go.maps_untracked);
        }
        self.watched.tree.lost(&mut lost);
        Ok(lost)
    }

    /// The process whose rows are read: the root, or (following) every process recorded.
    fn scope(&self) -> Option<u32> {
        (!self.watched.tree.on).then_some(self.watched.info.pid)
    }

    pub async fn top_report(&mut self) -> anyhow::Result<TopReport> {
        // Following, every row is the tree's (the kernel records no other process).
        let rows = collect::sites(&self.pipe.parts.probes, self.scope())?;
        let overflow = collect::overflow(&self.pipe.parts.probes)?;
        let sampling = self.sampling;
        let totals = aggregate::totals(rows.iter(), &overflow, sampling);
        let mut chains = Vec::with_capacity(rows.len());
        for (key, stats) in rows
            .iter()
            .filter(|(k, s)| sampling.shows(k) && in_use(k, s))
        {
            let estimated = sampling.on() && key.stack_id != NO_STACK;
            chains.push(Site {
                api: Api::try_from(key.api)?,
                frames: self.site_frames(key).await?,
                stats: sampling.estimate(key, stats),
                sampled: estimated.then_some((stats.calls, stats.bytes)),
            });
        }
        let mut sites = merge_by_source(
            chains,
            |s| s.api as u32,
            |a, b| {
                a.stats = aggregate::sum_stats([a.stats, b.stats].iter());
                if let (Some(x), Some(y)) = (&mut a.sampled, b.sampled) {
                    *x = (x.0 + y.0, x.1 + y.1);
                }
            },
        );
        // Allocation sites by bytes first, then free sites by calls.
        sites.sort_by_key(|s| {
            (
                s.api.is_free(),
                std::cmp::Reverse(s.stats.bytes),
                std::cmp::Reverse(s.stats.calls),
            )
        });
        let callers = if sampling.on() && sampling.stacks {
            self.callers(&rows).await?
        } else {
            Vec::new()
        };
        let go = self.go_report().await?;
        let programs = if self.watched.tree.on {
            let (programs, full) = collect::programs(&self.pipe.parts.probes)?;
            self.watched.tree.programs_full = full;
            programs
        } else {
            BTreeMap::new()
        };
        let tree = self
            .watched
            .tree
            .report(&self.watched.info, &rows, &programs, sampling);
        let (probes, probe_sites) = self.probe_report().await?;
        Ok(TopReport {
            probes,
            probe_sites,
            tree,
            info: self.watched.info.clone(),
            elapsed_secs: self.started.elapsed().as_secs_f64(),
            totals,
            lost: self.lost()?,
            sample_bytes: sampling.bytes,
            sites,
            callers,
            symbolization: self.pipe.parts.symbolizer.stats(),
            go,
        })
    }

    /// The symbol probes' totals per kind and their sites (named, merged by source line),
    /// most calls first.
    async fn probe_report(&mut self) -> anyhow::Result<(Vec<ProbeTotal>, Vec<ProbeSite>)> {
        let rows = collect::probe_sites(&self.pipe.parts.probes, self.scope())?;
        let kinds = self.probe_kinds.clone();
        let named = |kind: &ProbeKind, sums: &[u64]| -> Vec<(String, u64)> {
            kind.args
                .iter()
                .cloned()
                .zip(sums.iter().copied())
                .collect()
        };
        let mut totals: Vec<ProbeTotal> = Vec::new();
        for (id, kind) in kinds.iter().enumerate() {
            let id = id as u32;
            let mut calls = 0;
            let mut sums = [0u64; allocwatch_common::symprobe::ARGS];
            for (_, s) in rows.iter().filter(|(k, _)| k.probe == id) {
                calls += s.calls;
                for (t, a) in sums.iter_mut().zip(s.args) {
                    *t = t.wrapping_add(a);
                }
            }
            if !kind.builtin || calls > 0 || self.probes_attached.contains(&id) {
                totals.push(ProbeTotal {
                    kind: kind.name.clone(),
                    builtin: kind.builtin,
                    calls,
                    args: named(kind, &sums),
                });
            }
        }
        let mut sites = Vec::new();
        for (key, s) in rows.iter().filter(|(_, s)| s.calls > 0) {
            let Some(kind) = kinds.get(key.probe as usize) else {
                continue;
            };
            sites.push(ProbeSite {
                kind: kind.name.clone(),
                frames: chain(&mut self.pipe.parts, key.tgid, key.stack_id, key.ret_addr).await?,
                calls: s.calls,
                args: named(kind, &s.args),
            });
        }
        // Kinds are told apart by their id (names of `--probe`s may repeat a built-in's).
        let id_of = |name: &str| kinds.iter().position(|k| k.name == name).unwrap_or(0) as u32;
        let mut sites = merge_by_source(
            sites,
            |s| id_of(&s.kind),
            |a, b| {
                a.calls += b.calls;
                for ((_, x), (_, y)) in a.args.iter_mut().zip(&b.args) {
                    *x = x.wrapping_add(*y);
                }
            },
        );
        sites.sort_by(|a, b| b.calls.cmp(&a.calls).then(a.kind.cmp(&b.kind)));
        Ok((totals, sites))
    }

    /// Exact calls and bytes per API and immediate caller: the sum of a caller's rows, the
    /// sampled (with a stack) and the others.
    async fn callers(
        &mut self,
        rows: &BTreeMap<SiteKey, SiteStats>,
    ) -> anyhow::Result<Vec<Caller>> {
        // By process too: a return address names code in its own process's program.
        let mut by_caller: BTreeMap<(u32, u32, u64), SiteStats> = BTreeMap::new();
        for (key, stats) in rows.iter().filter(|(k, s)| in_use(k, s)) {
            let sum = by_caller
                .entry((key.tgid, key.api, key.ret_addr))
                .or_default();
            *sum = aggregate::sum_stats([*sum, *stats].iter());
        }
        let mut out = Vec::with_capacity(by_caller.len());
        for ((pid, api, ret_addr), s) in by_caller {
            out.push(Caller {
                api: Api::try_from(api)?,
                frames: chain(&mut self.pipe.parts, pid, NO_STACK, ret_addr).await?,
                calls: s.calls,
                bytes: s.bytes,
                failed: s.failed,
            });
        }
        let mut out = merge_by_source(
            out,
            |c| c.api as u32,
            |a, b| {
                a.calls += b.calls;
                a.bytes += b.bytes;
                a.failed += b.failed;
            },
        );
        out.sort_by_key(|c| {
            (
                c.api.is_free(),
                std::cmp::Reverse(c.bytes),
                std::cmp::Reverse(c.calls),
            )
        });
        Ok(out)
    }

    /// Loads the unwind tables of the traced process's mappings that have none yet (libraries
    /// mapped since, dlopen), saying what it holds when that changed; the same for the
    /// processes of the followed tree (their new files said once each), whose exited ones
    /// leave the probe's tables.
    pub fn refresh_unwind(&mut self) {
        let pid = self.watched.info.pid;
        let Some(tables) = &mut self.unwind else {
            return;
        };
        let symbolizer = &self.pipe.parts.symbolizer;
        // Mappings the tables found changed (dlopen) are noted for the symbolizer too, while
        // the process lives: a stack through the new library may be named after it exits.
        if load_unwind(tables, pid) {
            symbolizer.note_process(pid);
        }
        for (child, running) in self.watched.tree.children() {
            let result = if running {
                tables.load_process(child).map(|loaded| {
                    if loaded.is_some() {
                        symbolizer.note_process(child);
                    }
                    for (path, rows) in loaded.map(|l| l.new_files).unwrap_or_default() {
                        crate::say!(
                            "allocwatch: unwind table of {path}: {rows} rows (pid {child})"
                        );
                    }
                })
            } else {
                tables.forget(child)
            };
            if let Err(e) = result {
                log::debug!("unwind tables for pid {child}: {e}");
            }
        }
    }

    /// Reads the length and size of the traced process's Go maps (see `gort::live`).
    pub fn refresh_maps(&mut self) {
        let pid = self.watched.info.pid;
        if let Some(go) = &mut self.watched.go {
            go.refresh_maps(&ProcessMemory { pid }, crate::gostate::MAX_MAP_READS);
        }
    }

    async fn site_frames(&mut self, key: &SiteKey) -> anyhow::Result<Vec<Frame>> {
        chain(&mut self.pipe.parts, key.tgid, key.stack_id, key.ret_addr).await
    }

    async fn go_report(&mut self) -> anyhow::Result<Option<GoReport>> {
        let Some(state) = &self.watched.go else {
            return Ok(None);
        };
        let pid = self.watched.info.pid;
        let mut site_keys: Vec<(GoSiteKey, u64, u64)> = state
            .sites
            .iter()
            .map(|(k, c)| (*k, c.count, c.bytes))
            .collect();
        site_keys.sort();
        let maps: Vec<_> = state
            .top_maps(self.top_k.max(1) * 10)
            .into_iter()
            .cloned()
            .collect();
        let mut report = go_summary(state, self.go_target.as_deref());
        report.alloc_sizes = collect::hist(&self.pipe.parts.probes, map_names::GO_HIST)?
            .into_iter()
            .filter(|((tgid, _), _)| *tgid == pid)
            .map(|((_, bucket), v)| (1u64 << bucket, v.count, v.bytes))
            .collect();
        let mut sites = Vec::with_capacity(site_keys.len());
        for (key, count, bytes) in site_keys {
            sites.push(GoSite {
                kind: key.kind.name(),
                frames: chain(&mut self.pipe.parts, pid, key.stack_id, key.ret_addr).await?,
                count,
                bytes,
            });
        }
        let mut sites = merge_by_source(
            sites,
            |s| s.kind.as_ptr() as u32,
            |a, b| {
                a.count += b.count;
                a.bytes += b.bytes;
            },
        );
        sites.sort_by_key(|s| (std::cmp::Reverse(s.bytes), std::cmp::Reverse(s.count)));
        report.sites = sites;
        for m in maps {
            let frames = match m.first_site {
                Some(k) => chain(&mut self.pipe.parts, pid, k.stack_id, k.ret_addr).await?,
                None => Vec::new(),
            };
            report.maps.push(GoMap {
                ptr: m.ptr,
                grows: m.grows,
                by_kind: m.by_kind.clone(),
                bytes: m.bytes,
                size_class: m.size_class,
                dir_len: m.dir_len,
                len_at_last_grow: m.len_at_last_grow,
                live: m.live,
                len_max: m.len_max,
                load: m.load(),
                verdict: m.verdict(&Verdicts::default()).map(Verdict::name),
                frames,
            });
        }
        // The verdicts first (growing, then bloated), each by bytes grown as before.
        report
            .maps
            .sort_by_key(|m| m.verdict.map_or(2, |v| u8::from(v != "growing")));
        if self
            .go_target
            .as_ref()
            .is_some_and(|g| g.maps == MapImpl::Buckets)
        {
            report.map_impl = "buckets";
        }
        Ok(Some(report))
    }

    pub async fn leaks_report(&mut self, min_age: Duration) -> anyhow::Result<LeaksReport> {
        let live = collect::live(&self.pipe.parts.probes, self.scope())?;
        let now = monotonic_ns();
        let groups = aggregate::leaks(&live, now, min_age.as_nanos() as u64);
        let rate = self.sampling.bytes;
        let mut leaks = Vec::with_capacity(groups.len());
        for g in &groups {
            // With sampling the live table holds sampled blocks: each site's scaled (as the
            // in-use figures of Go's heap profile).
            let (count, bytes) = aggregate::scale(g.count, g.bytes, rate);
            leaks.push(Leak {
                api: Api::try_from(g.site.api)?,
                frames: self.site_frames(&g.site).await?,
                count,
                bytes,
                oldest_age_secs: g.oldest_age_ns as f64 / 1e9,
            });
        }
        let (live_allocations, live_bytes) = aggregate::leaks(&live, now, 0)
            .iter()
            .map(|g| aggregate::scale(g.count, g.bytes, rate))
            .fold((0, 0), |(n, b), (gn, gb)| (n + gn, b + gb));
        Ok(LeaksReport {
            info: self.watched.info.clone(),
            min_age_secs: min_age.as_secs_f64(),
            sample_bytes: rate,
            live_allocations,
            live_bytes,
            lost: self.lost()?,
            leaks,
            symbolization: self.pipe.parts.symbolizer.stats(),
        })
    }
}

/// The counts of a Go report (its sites and maps are named by the caller).
fn go_summary(state: &GoState, target: Option<&GoTarget>) -> GoReport {
    GoReport {
        version: state.version.clone(),
        map_impl: if state.swiss { "swiss" } else { "buckets" },
        map_grows: state.map_grows.clone(),
        map_grow_bytes: state.map_grow_bytes,
        slice_grows: state.slice_grows,
        slice_grow_bytes: state.slice_grow_bytes,
        slice_moves: state.slice_moves.count,
        slice_move_bytes: state.slice_moves.bytes,
        large_allocs: state.large_allocs.count,
        large_alloc_bytes: state.large_allocs.bytes,
        gc_starts: state.gc_starts,
        gc_cycles: state.gc_cycles,
        gc_pauses: pause_summary(&state.gc_pauses),
        stw_pauses: pause_summary(&state.stw_pauses),
        maps_tracked: state.maps.len() as u64,
        maps_untracked: state.maps_untracked,
        maps_dropped: state.maps_gone,
        growth_aggregated: state.aggregated,
        measured: target.is_some_and(|g| g.measured),
        warnings: target.map(|g| g.warnings.clone()).unwrap_or_default(),
        ..GoReport::default()
    }
}

/// Rows whose call chains symbolize to the same source (call instructions the compiler
/// duplicated, e.g. in unrolled loops) become one row for the reader. `class` separates rows
/// that must not merge (different APIs or kinds).
fn merge_by_source<T: Clone + HasFrames>(
    rows: Vec<T>,
    class: impl Fn(&T) -> u32,
    merge: impl Fn(&mut T, &T),
) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(rows.len());
    let mut index: HashMap<(u32, Vec<SourceFrame<'_>>), usize> = HashMap::new();
    for row in &rows {
        let key = (
            class(row),
            row.frames().iter().map(SourceFrame::of).collect(),
        );
        match index.entry(key) {
            Entry::Occupied(e) => merge(&mut out[*e.get()], row),
            Entry::Vacant(e) => {
                e.insert(out.len());
                out.push(row.clone());
            }
        }
    }
    out
}

trait HasFrames {
    fn frames(&self) -> &[Frame];
}

impl HasFrames for ProbeSite {
    fn frames(&self) -> &[Frame] {
        &self.frames
    }
}

impl HasFrames for Site {
    fn frames(&self) -> &[Frame] {
        &self.frames
    }
}

impl HasFrames for Caller {
    fn frames(&self) -> &[Frame] {
        &self.frames
    }
}

impl HasFrames for GoSite {
    fn frames(&self) -> &[Frame] {
        &self.frames
    }
}

fn pause_summary(p: &Pauses) -> PauseSummary {
    PauseSummary {
        count: p.count,
        sum: p.sum_ns as f64 / 1e9,
        max: p.max_ns as f64 / 1e9,
        buckets: p
            .hist
            .iter()
            .map(|(&b, &n)| ((1u64 << (b + 1)) as f64 / 1e9, n))
            .collect(),
    }
}

/// A frame as the reader sees it: function, file and line when symbolized, else the address.
#[derive(PartialEq, Eq, Hash)]
enum SourceFrame<'a> {
    Named(&'a str, Option<&'a str>, Option<u32>),
    Address(u64),
}

impl<'a> SourceFrame<'a> {
    fn of(f: &'a Frame) -> Self {
        match &f.function {
            Some(func) => Self::Named(func, f.file.as_deref(), f.line),
            None => Self::Address(f.address),
        }
    }
}

/// Reads comm and exe while the process is alive (after exec they name the command).
pub fn refresh_identity(info: &mut ProcessInfo) {
    if let Some(comm) = procfs::comm(info.pid) {
        info.comm = comm;
    }
    if let Ok(exe) = procfs::exe(info.pid) {
        info.exe = exe.display().to_string();
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// False for a process's row of unknown sites while it is empty (`SiteKey::spill`: made when
/// first needed, and counted in right after).
fn in_use(key: &SiteKey, stats: &SiteStats) -> bool {
    !key.is_spill() || stats.calls > 0
}

/// Loads `pid`'s unwind tables (see [`Tracer::refresh_unwind`]); a failure is said, not fatal:
/// the process's stacks are then walked with frame pointers. Whether its mappings changed.
pub fn load_unwind(tables: &mut crate::unwind::load::Tables, pid: u32) -> bool {
    match tables.load_process(pid) {
        Ok(Some(loaded)) => {
            let kept = if loaded.frame_pointers.is_empty() {
                String::new()
            } else {
                format!("; frame pointers: {}", loaded.frame_pointers.join(", "))
            };
            crate::say!(
                "allocwatch: unwind tables for pid {pid}: {} ({} rows in all, {} KiB of {} \
                 KiB){kept}",
                loaded.files.join(", "),
                loaded.rows,
                loaded.bytes.div_ceil(1024),
                crate::unwind::load::Tables::CAPACITY_BYTES / 1024
            );
            true
        }
        Ok(None) => false,
        Err(e) => {
            crate::say!("allocwatch: warning: unwind tables for pid {pid}: {e}");
            false
        }
    }
}
