//! Turning kernel maps and Go state into the export model (`model`).

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use allocwatch_common::{
    go::GoHistVal,
    libc::{API_COUNT, Api, NO_STACK, Overflow, SiteKey, SiteStats},
    map_names,
    symprobe::{self, ProbeSiteKey, ProbeSiteStats},
};

use super::registry::{Proc, Registry};
use crate::{
    aggregate::{self, Sampling, live_of},
    collect,
    frames::FrameCache,
    gostate::{GoState, Pauses, Verdicts},
    loss,
    model::{GoMapSnapshot, GoSnapshot, Histogram, ProcessSnapshot, SelfStats, SiteSnapshot},
    pipeline::LoopStats,
    probes::Probes,
    symbolize::Frame,
    symbolize::SymbolizerHandle,
    target::{libc::Allocator, symprobe::StaticKind},
};

pub async fn build(
    probes: &Probes,
    registry: &Registry,
    frames: &mut FrameCache,
    symbolizer: &SymbolizerHandle,
    loop_stats: LoopStats,
    (max_sites, top_k, sampling): (u32, usize, Sampling),
) -> anyhow::Result<((Vec<ProcessSnapshot>, SelfStats), Vec<u32>)> {
    let t0 = Instant::now();
    let sites = collect::sites(probes, None)?;
    let probe_sites = collect::probe_sites(probes, None)?;
    let libc_hist = collect::hist(probes, map_names::LIBC_HIST)?;
    let go_hist = collect::hist(probes, map_names::GO_HIST)?;
    if std::env::var_os("ALLOCWATCH_DEBUG_TIMING").is_some() {
        crate::say!(
            "allocwatch: debug: reading {} site rows took {:.1} ms",
            sites.len(),
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    let mut out = Vec::with_capacity(registry.procs.len());
    let mut budget = SYMBOLIZE_PER_SCRAPE.max(top_k);
    let mut ctx = Symbolize {
        frames,
        probes,
        symbolizer,
        budget: &mut budget,
        top_k,
        deadline: Instant::now() + SYMBOLIZE_TIME,
        sampling,
        hold_back: true,
        probe_kinds: &registry.probe_kinds,
    };
    // A process's rows are in the kernel maps while it runs and in `retained` once harvested
    // (a row is in one place or the other, never both), so a snapshot takes both.
    for (&pid, p) in &registry.procs {
        // Rows an earlier program image of the pid made belong to that image.
        let mut rows: Vec<(SiteKey, SiteStats)> = sites
            .range(pid_range(pid))
            .filter(|(k, _)| !registry.is_past_site(k))
            .map(|(k, v)| (*k, *v))
            .collect();
        rows.extend_from_slice(&p.retained.rows);
        let hists = (
            histogram(&libc_hist, &p.retained.libc_hist, pid, 1.0),
            histogram(&go_hist, &p.retained.go_hist, pid, 1.0),
        );
        let image = (pid, registry.image_of(pid));
        let rows = (&rows[..], &p.retained.remainder);
        let mut probe_rows: Vec<(ProbeSiteKey, ProbeSiteStats)> = probe_sites
            .range(probe_range(pid))
            .map(|(k, v)| (*k, *v))
            .collect();
        probe_rows.extend_from_slice(&p.retained.probe_rows);
        let mut snap = process_snapshot(&mut ctx, image, p, rows, hists).await?;
        probe_snapshot(&mut ctx, &mut snap, &probe_rows).await?;
        out.push(snap);
    }
    for (&pid, images) in &registry.past {
        for i in images.iter().filter(|i| i.exported) {
            let mut rows: Vec<(SiteKey, SiteStats)> = sites
                .range(pid_range(pid))
                .filter(|(k, _)| i.keys.contains(k))
                .map(|(k, v)| (*k, *v))
                .collect();
            rows.extend_from_slice(&i.retained.rows);
            // Its size histograms left the maps at its exec (`ImageHist`).
            let none = BTreeMap::new();
            let hists = (
                histogram(&none, &i.retained.libc_hist, pid, 1.0),
                histogram(&none, &i.retained.go_hist, pid, 1.0),
            );
            let image = (pid, i.image);
            let rows = (&rows[..], &i.retained.remainder);
            out.push(process_snapshot(&mut ctx, image, &i.proc, rows, hists).await?);
        }
    }
    let frames = ctx.frames;
    let lost = collect::lost(probes)?;
    let sym = symbolizer.stats();
    let mut self_stats = SelfStats {
        probes_attached: registry.targets.points_attached,
        attach_failures: registry
            .targets
            .failures
            .iter()
            .map(|(f, n)| (f.label(), *n))
            .collect(),
        events_processed: loop_stats.events_processed,
        events_lost: lost.iter().map(|(c, n)| (c.name(), *n)).collect(),
        ..SelfStats::default()
    };
    self_stats
        .events_lost
        .insert(loss::MALFORMED_RECORD, loop_stats.malformed_records);
    // Naming failures are not lost events (the counts are exact): they are symbolization
    // failures, below.
    let spill_rows = sites.keys().filter(|k| k.is_spill()).count();
    self_stats.map_fill.insert(
        map_names::SITES,
        (sites.len() - spill_rows) as f64 / f64::from(max_sites.max(1)),
    );
    self_stats.map_fill.insert(
        map_names::PROBE_SITES,
        probe_sites.len() as f64 / f64::from(symprobe::SITES_MAX),
    );
    self_stats.map_fill.insert(
        map_names::SPILL,
        spill_rows as f64 / f64::from(allocwatch_common::capacity::SPILL),
    );
    self_stats
        .symbolization_failures
        .insert("process_gone", sym.process_gone);
    self_stats
        .symbolization_failures
        .insert("unknown_address", sym.unknown_address);
    self_stats
        .symbolization_failures
        .insert("no_symbol", sym.no_symbol);
    self_stats
        .symbolization_failures
        .insert("stack_cut", sym.stack_cut);
    self_stats
        .symbolization_failures
        .insert("stack_evicted", frames.stacks_evicted);
    self_stats
        .symbolization_failures
        .insert("out_of_time", frames.out_of_time);
    self_stats.map_fill.insert(
        map_names::TGIDS,
        registry.denylist_len() as f64 / f64::from(allocwatch_common::capacity::TGIDS),
    );
    Ok(((out, self_stats), unexported(&sites, registry)))
}

/// The final snapshot of a gone process (`image` `None`) or of a program image of it that
/// ended at exec, from what was harvested of it, for the exporter's [`depart`].
///
/// [`depart`]: crate::serve::metrics::Exporter::depart
pub async fn departing(
    probes: &Probes,
    registry: &Registry,
    frames: &mut FrameCache,
    symbolizer: &SymbolizerHandle,
    top_k: usize,
    sampling: Sampling,
    (pid, image): (u32, Option<u32>),
) -> anyhow::Result<Option<ProcessSnapshot>> {
    let mut budget = SYMBOLIZE_PER_SCRAPE.max(top_k);
    let mut ctx = Symbolize {
        frames,
        probes,
        symbolizer,
        budget: &mut budget,
        top_k,
        deadline: Instant::now() + SYMBOLIZE_TIME,
        sampling,
        hold_back: false,
        probe_kinds: &registry.probe_kinds,
    };
    let (proc, retained, number) = match image {
        None => {
            let Some(p) = registry.procs.get(&pid) else {
                return Ok(None);
            };
            (p, &p.retained, registry.image_of(pid))
        }
        Some(n) => {
            let Some(i) = registry
                .past
                .get(&pid)
                .and_then(|v| v.iter().find(|i| i.image == n))
            else {
                return Ok(None);
            };
            (&i.proc, &i.retained, n)
        }
    };
    let none = BTreeMap::new();
    let hists = (
        histogram(&none, &retained.libc_hist, pid, 1.0),
        histogram(&none, &retained.go_hist, pid, 1.0),
    );
    let rows = (&retained.rows[..], &retained.remainder);
    let mut snap = process_snapshot(&mut ctx, (pid, number), proc, rows, hists).await?;
    // Symbol-probe rows stay with the pid's current image.
    if image.is_none() {
        probe_snapshot(&mut ctx, &mut snap, &retained.probe_rows).await?;
    }
    Ok(Some(snap))
}

/// Pids with rows in the site table that are not exported (not registered).
fn unexported(sites: &BTreeMap<SiteKey, SiteStats>, registry: &Registry) -> Vec<u32> {
    let mut pids: Vec<u32> = sites
        .keys()
        .map(|k| k.tgid)
        .filter(|pid| !registry.procs.contains_key(pid))
        .collect();
    pids.dedup();
    pids
}

/// What naming a process's sites needs, with the scrape's shared symbolization budget.
struct Symbolize<'a> {
    frames: &'a mut FrameCache,
    probes: &'a Probes,
    symbolizer: &'a SymbolizerHandle,
    budget: &'a mut usize,
    top_k: usize,
    /// Symbolizing stops here; the rest waits for the next scrape.
    deadline: Instant,
    /// How the probes sampled: which rows are sites, and their figures scaled.
    sampling: Sampling,
    /// Whether a young site this scrape had no time to name is held back ([`HOLD_BACK`]);
    /// not in a process's final snapshot, which has no later scrape.
    hold_back: bool,
    /// The symbol probes' kinds, by probe id.
    probe_kinds: &'a [StaticKind],
}

/// What naming a site came to.
enum Naming {
    Named(Arc<[Frame]>),
    /// The scrape's time ran out: named at a later scrape or in the background.
    Late,
    /// Beyond the process's own top sites, and the scrape's budget spent.
    OverBudget,
}

/// The export model of one program image of a process: its libc rows (`rows`, already
/// narrowed to the image), its Go state and its (libc, Go) size histograms.
async fn process_snapshot(
    ctx: &mut Symbolize<'_>,
    (pid, image): (u32, u32),
    p: &Proc,
    (rows, remainder): (&[(SiteKey, SiteStats)], &BTreeMap<u32, SiteStats>),
    (alloc_sizes, go_sizes): (Histogram, Histogram),
) -> anyhow::Result<ProcessSnapshot> {
    let no_overflow = [Overflow::default(); API_COUNT];
    let remainder_rows: Vec<(SiteKey, SiteStats)> = remainder
        .iter()
        .map(|(&api, s)| {
            // Exact sums of folded rows, sampled or not: never scaled as a sample.
            let key = SiteKey {
                tgid: pid,
                api,
                stack_id: NO_STACK,
                ..SiteKey::default()
            };
            (key, *s)
        })
        .collect();
    let sampling = ctx.sampling;
    let totals = aggregate::totals(
        rows.iter().chain(&remainder_rows).map(|(k, s)| (k, s)),
        &no_overflow,
        sampling,
    );
    let mut snap = ProcessSnapshot {
        pid,
        image,
        labels: p.labels.clone(),
        frees: totals.calls[Api::Free as usize],
        deletes: Api::ALL
            .into_iter()
            .filter(|a| a.is_free() && *a != Api::Free && totals.calls[*a as usize] > 0)
            .map(|a| (a.name(), totals.calls[a as usize]))
            .collect(),
        live_bytes: totals.live_bytes,
        live_allocations: totals.live_allocations,
        alloc_sizes,
        exited_at: p.exited_at,
        ..ProcessSnapshot::default()
    };
    // The APIs its libc probes under their own address, and any with calls: an alias
    // (`memalign` at `aligned_alloc`'s address) or a program without libc could only show 0.
    let called = |api: Api| totals.calls[api as usize] > 0 || totals.bytes[api as usize] > 0;
    let probed = |api: Api| p.libc_apis.as_ref().is_some_and(|a| a.contains(&api));
    for api in Api::ALL {
        if !api.is_free() && (probed(api) || called(api)) {
            snap.calls.insert(api.name(), totals.calls[api as usize]);
            snap.bytes.insert(api.name(), totals.bytes[api as usize]);
        }
    }
    snap.allocator = p.allocator.map(Allocator::name);
    snap.without_libc =
        p.libc_apis.is_none() && !Api::ALL.into_iter().any(called) && totals.live_allocations == 0;
    // Largest first: each process's likely series are always named (its own top-K, with
    // room for the exporter's different ranking); the shared budget covers the rest.
    // With sampled stacks, the sampled rows scaled stand for their callers' other calls.
    let mut ranked: Vec<(SiteKey, SiteStats)> = rows
        .iter()
        .filter(|(k, _)| sampling.shows(k) && !k.is_spill())
        .map(|(k, s)| (*k, sampling.estimate(k, s)))
        .collect();
    ranked.sort_by_key(|(_, s)| std::cmp::Reverse(s.bytes));
    for (i, (key, stats)) in ranked.iter().enumerate() {
        let (live_allocations, live_bytes) = live_of(stats);
        let site = (pid, key.stack_id, key.ret_addr);
        let naming = site_frames(ctx, i, site).await?;
        snap.sites.push(SiteSnapshot {
            kind: Api::try_from(key.api).map_or("unknown", Api::name),
            calls: stats.calls,
            bytes: stats.bytes,
            live_allocations,
            live_bytes,
            ..ctx.named(naming, site)
        });
    }
    // Sites of a gone process that were folded away (`retained.rs`), and the calls counted
    // in a process's row of unknown sites (`SiteKey::spill`: the table was full): `other`.
    let mut other: BTreeMap<u32, SiteStats> = remainder.clone();
    for (key, stats) in rows
        .iter()
        .filter(|(k, _)| k.is_spill() && sampling.shows(k))
    {
        let slot = other.entry(key.api).or_default();
        *slot = aggregate::sum_stats([*slot, *stats].iter());
    }
    for (&api, stats) in other.iter().filter(|(_, s)| s.calls > 0) {
        let (live_allocations, live_bytes) = live_of(stats);
        snap.sites.push(SiteSnapshot {
            kind: Api::try_from(api).map_or("unknown", Api::name),
            calls: stats.calls,
            bytes: stats.bytes,
            live_allocations,
            live_bytes,
            remainder: true,
            ..SiteSnapshot::default()
        });
    }
    if let Some(go) = &p.go {
        let mut ranked: Vec<_> = go.sites.iter().collect();
        ranked.sort_by_key(|(_, c)| std::cmp::Reverse(c.bytes));
        for (i, (key, c)) in ranked.into_iter().enumerate() {
            let site = (pid, key.stack_id, key.ret_addr);
            let naming = site_frames(ctx, i, site).await?;
            snap.sites.push(SiteSnapshot {
                kind: key.kind.name(),
                calls: c.count,
                bytes: c.bytes,
                ..ctx.named(naming, site)
            });
        }
        for (kind, c) in &go.sites_remainder {
            snap.sites.push(SiteSnapshot {
                kind: kind.name(),
                calls: c.count,
                bytes: c.bytes,
                remainder: true,
                ..SiteSnapshot::default()
            });
        }
        let mut go_snap = go_snapshot(go, go_sizes);
        // An exited process holds no map.
        if p.exited_at.is_none() {
            go_snap.maps = go_maps(ctx, pid, go).await?;
        }
        snap.go = Some(go_snap);
    }
    Ok(snap)
}

/// A process's symbol-probe rows (built-in growth kinds, `probe`s) into its snapshot: calls
/// and argument sums per kind, and sites by kind (calls only), the largest named first; a
/// probe's row of unknown sites (a full table, or folded away at exit) is its `other`.
async fn probe_snapshot(
    ctx: &mut Symbolize<'_>,
    snap: &mut ProcessSnapshot,
    rows: &[(ProbeSiteKey, ProbeSiteStats)],
) -> anyhow::Result<()> {
    let kinds = ctx.probe_kinds;
    let mut ranked: Vec<&(ProbeSiteKey, ProbeSiteStats)> = rows
        .iter()
        .filter(|(k, s)| s.calls > 0 && kinds.get(k.probe as usize).is_some())
        .collect();
    ranked.sort_by_key(|(k, s)| (std::cmp::Reverse(s.calls), *k));
    let mut other: BTreeMap<&'static str, u64> = BTreeMap::new();
    for (i, (key, stats)) in ranked.into_iter().enumerate() {
        let kind = &kinds[key.probe as usize];
        *snap.probe_calls.entry(kind.name).or_default() += stats.calls;
        for (slot, arg) in kind.args.iter().enumerate() {
            let sum = snap.probe_args.entry((kind.name, arg)).or_default();
            *sum = sum.wrapping_add(stats.args[slot]);
        }
        if key.stack_id == NO_STACK && key.ret_addr == 0 {
            *other.entry(kind.name).or_default() += stats.calls;
            continue;
        }
        let site = (snap.pid, key.stack_id, key.ret_addr);
        let naming = site_frames(ctx, i, site).await?;
        snap.sites.push(SiteSnapshot {
            kind: kind.name,
            probe: true,
            calls: stats.calls,
            ..ctx.named(naming, site)
        });
    }
    for (kind, calls) in other {
        snap.sites.push(SiteSnapshot {
            kind,
            probe: true,
            calls,
            remainder: true,
            ..SiteSnapshot::default()
        });
    }
    Ok(())
}

/// Symbol-probe keys sort by tgid first: the rows of one process are one range.
fn probe_range(pid: u32) -> std::ops::RangeInclusive<ProbeSiteKey> {
    ProbeSiteKey {
        tgid: pid,
        probe: 0,
        stack_id: i64::MIN,
        ret_addr: 0,
    }..=ProbeSiteKey {
        tgid: pid,
        probe: u32::MAX,
        stack_id: i64::MAX,
        ret_addr: u64::MAX,
    }
}

/// The maps read from `pid` at the last refresh, largest first, named by their first growth's
/// site; one whose site is not named yet is left out until it is.
async fn go_maps(
    ctx: &mut Symbolize<'_>,
    pid: u32,
    go: &GoState,
) -> anyhow::Result<Vec<GoMapSnapshot>> {
    let mut read: Vec<_> = go
        .maps
        .values()
        .filter_map(|m| Some((m, m.live?, m.first_site?)))
        .collect();
    read.sort_by_key(|(m, live, _)| (std::cmp::Reverse(live.bytes), m.ptr));
    let mut out = Vec::with_capacity(read.len());
    for (rank, (m, live, site)) in read.into_iter().enumerate() {
        let Naming::Named(frames) =
            site_frames(ctx, rank, (pid, site.stack_id, site.ret_addr)).await?
        else {
            continue;
        };
        out.push(GoMapSnapshot {
            frames,
            len: live.len,
            slots: live.slots,
            bytes: live.bytes,
            verdict: m.verdict(&Verdicts::default()),
        });
    }
    Ok(out)
}

/// New call chains symbolized per scrape (each costs microseconds to milliseconds); the rest
/// wait for the next scrape, named by their caller's address meanwhile.
const SYMBOLIZE_PER_SCRAPE: usize = 2_000;
/// Time a scrape may spend symbolizing (a cold file's DWARF can take long to parse): the
/// scrape answers within it, and the chains not named yet are named at a later scrape.
const SYMBOLIZE_TIME: Duration = Duration::from_millis(200);

/// How long a site not named for lack of time may be held back from `/metrics` (its value
/// only in the process's totals meanwhile) before it is exported in `other` for good. The
/// background naming and the next scrapes name it well within this unless the node is
/// starved for CPU for that long.
const HOLD_BACK: Duration = Duration::from_secs(30);

impl Symbolize<'_> {
    /// A site's frames and how `/metrics` takes it: named; held back while young and late;
    /// else in `other` (named by its caller's address in profiles) so that no series is ever
    /// labelled by a raw address.
    fn named(&mut self, naming: Naming, site: (u32, i64, u64)) -> SiteSnapshot {
        let unnamed = || Arc::from([Frame::unknown(site.2)]);
        match naming {
            Naming::Named(frames) => SiteSnapshot {
                frames,
                ..SiteSnapshot::default()
            },
            Naming::Late => {
                // Without hold-back (a departing process) this is the site's last chance.
                if !self.hold_back {
                    self.frames.out_of_time += 1;
                }
                SiteSnapshot {
                    frames: unnamed(),
                    remainder: true,
                    pending: self.hold_back
                        && self.frames.late_for(site, Instant::now()) < HOLD_BACK,
                    ..SiteSnapshot::default()
                }
            }
            Naming::OverBudget => SiteSnapshot {
                frames: unnamed(),
                remainder: true,
                ..SiteSnapshot::default()
            },
        }
    }
}

/// A site's frames: cached or symbolized (the process's `rank`-th largest site: within its
/// own top 4×K always, else within the scrape's budget) within the scrape's time.
async fn site_frames(
    ctx: &mut Symbolize<'_>,
    rank: usize,
    (pid, stack_id, ret_addr): (u32, i64, u64),
) -> anyhow::Result<Naming> {
    if let Some(f) = ctx.frames.cached(pid, stack_id, ret_addr) {
        return Ok(Naming::Named(Arc::clone(f)));
    }
    if rank >= 4 * ctx.top_k {
        if *ctx.budget == 0 {
            return Ok(Naming::OverBudget);
        }
        *ctx.budget -= 1;
    }
    if Instant::now() >= ctx.deadline {
        return Ok(Naming::Late);
    }
    let named = ctx
        .frames
        .frames_until(
            ctx.probes,
            ctx.symbolizer,
            (pid, stack_id, ret_addr),
            Some(ctx.deadline),
        )
        .await?;
    Ok(named.map_or(Naming::Late, Naming::Named))
}

/// Site keys sort by tgid first: the rows of one process are one range.
fn pid_range(pid: u32) -> std::ops::RangeInclusive<SiteKey> {
    SiteKey {
        tgid: pid,
        api: 0,
        stack_id: i64::MIN,
        ret_addr: 0,
    }..=SiteKey {
        tgid: pid,
        api: u32::MAX,
        stack_id: i64::MAX,
        ret_addr: u64::MAX,
    }
}

/// A log2 histogram of one process as per-bucket counts with upper bounds (`scale` converts
/// the unit): its rows in the kernel map `h` plus those already harvested.
fn histogram(
    h: &BTreeMap<(u32, u32), GoHistVal>,
    harvested: &BTreeMap<u32, GoHistVal>,
    pid: u32,
    scale: f64,
) -> Histogram {
    let mut merged = harvested.clone();
    for ((_, bucket), v) in h.range((pid, 0)..=(pid, u32::MAX)) {
        let e = merged.entry(*bucket).or_default();
        e.count += v.count;
        e.bytes += v.bytes;
    }
    let mut out = Histogram::default();
    for (bucket, v) in merged {
        let upper = (1u128 << (bucket + 1)) as f64 * scale;
        out.buckets.push((upper, v.count));
        out.count += v.count;
        out.sum += v.bytes as f64 * scale;
    }
    out
}

fn pause_histogram(p: &Pauses) -> Histogram {
    Histogram {
        buckets: p
            .hist
            .iter()
            .map(|(&b, &n)| ((1u128 << (b + 1)) as f64 / 1e9, n))
            .collect(),
        sum: p.sum_ns as f64 / 1e9,
        count: p.count,
    }
}

fn go_snapshot(go: &GoState, alloc_sizes: Histogram) -> GoSnapshot {
    GoSnapshot {
        version: go.version.clone(),
        map_grows: go.map_grows.clone(),
        map_grow_bytes: go.map_grow_bytes,
        slice_grows: go.slice_grows,
        slice_grow_bytes: go.slice_grow_bytes,
        gc_cycles: go.gc_cycles,
        gc_pauses: pause_histogram(&go.gc_pauses),
        alloc_sizes: go.malloc_probed.then_some(alloc_sizes),
        maps: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_of_one_process() {
        let mut h = BTreeMap::new();
        h.insert(
            (7, 4),
            GoHistVal {
                count: 3,
                bytes: 60,
            },
        );
        h.insert(
            (7, 10),
            GoHistVal {
                count: 1,
                bytes: 1500,
            },
        );
        h.insert((8, 4), GoHistVal { count: 9, bytes: 9 });
        let x = histogram(&h, &BTreeMap::new(), 7, 1.0);
        assert_eq!(x.buckets, vec![(32.0, 3), (2048.0, 1)]);
        assert_eq!((x.count, x.sum), (4, 1560.0));
        // Harvested rows of the same process add up with the kernel's.
        let harvested = BTreeMap::from([(
            4,
            GoHistVal {
                count: 1,
                bytes: 20,
            },
        )]);
        let x = histogram(&h, &harvested, 7, 1.0);
        assert_eq!(x.buckets, vec![(32.0, 4), (2048.0, 1)]);
        assert_eq!((x.count, x.sum), (5, 1580.0));
    }
}
