//! Turning kernel maps and Go state into the export model (`serve::model`).

use std::collections::BTreeMap;

use allocwatch_common::{
    go::GoHistVal,
    libc::{API_COUNT, Api, Overflow, SiteKey, SiteStats},
    map_names,
};

use super::registry::{Proc, Registry};
use crate::{
    aggregate::{self, live_of},
    collect,
    frames::FrameCache,
    gostate::{GoState, Pauses},
    probes::Probes,
    serve::model::{GoSnapshot, Histogram, ProcessSnapshot, SelfStats, SiteSnapshot},
    symbolize::SymbolizerHandle,
};

/// Counters the daemon loop keeps about itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopStats {
    pub events_processed: u64,
    pub malformed_records: u64,
}

pub async fn build(
    probes: &Probes,
    registry: &Registry,
    frames: &mut FrameCache,
    symbolizer: &SymbolizerHandle,
    loop_stats: LoopStats,
    max_sites: u32,
    top_k: usize,
) -> anyhow::Result<((Vec<ProcessSnapshot>, SelfStats), Vec<u32>)> {
    let sites = collect::sites(&probes.ebpf, None)?;
    let libc_hist = collect::hist(&probes.ebpf, map_names::LIBC_HIST)?;
    let go_hist = collect::hist(&probes.ebpf, map_names::GO_HIST)?;
    let mut out = Vec::with_capacity(registry.procs.len());
    let mut budget = SYMBOLIZE_PER_SCRAPE.max(top_k);
    let mut ctx = Symbolize {
        frames,
        probes,
        symbolizer,
        budget: &mut budget,
        top_k,
    };
    for (&pid, p) in &registry.procs {
        // Rows an earlier program image of the pid made belong to that image.
        let rows: Vec<_> = sites
            .range(pid_range(pid))
            .filter(|(k, _)| !registry.is_past_site(k))
            .collect();
        let hists = (
            histogram(&libc_hist, pid, 1.0),
            histogram(&go_hist, pid, 1.0),
        );
        let image = registry.image_of(pid);
        out.push(process_snapshot(&mut ctx, (pid, image), p, &rows, hists).await?);
    }
    for (&pid, images) in &registry.past {
        for i in images.iter().filter(|i| i.exported) {
            let rows: Vec<_> = sites
                .range(pid_range(pid))
                .filter(|(k, _)| i.keys.contains(k))
                .collect();
            // The size histograms are kept per pid, not per image: they stay with the
            // current image.
            let hists = (Histogram::default(), Histogram::default());
            out.push(process_snapshot(&mut ctx, (pid, i.image), &i.proc, &rows, hists).await?);
        }
    }
    let frames = ctx.frames;
    let lost = collect::lost(&probes.ebpf)?;
    let sym = symbolizer.stats();
    let mut self_stats = SelfStats {
        probes_attached: registry.probes_attached,
        attach_failures: registry.attach_failures.clone(),
        events_processed: loop_stats.events_processed,
        events_lost: lost.iter().map(|(c, n)| (c.name(), *n)).collect(),
        ..SelfStats::default()
    };
    self_stats
        .events_lost
        .insert("malformed_record", loop_stats.malformed_records);
    self_stats
        .events_lost
        .insert("symbolize_process_gone", frames.process_gone);
    self_stats
        .events_lost
        .insert("stack_evicted", frames.stacks_evicted);
    self_stats.map_fill.insert(
        map_names::SITES,
        sites.len() as f64 / f64::from(max_sites.max(1)),
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
    self_stats.map_fill.insert(
        map_names::TGIDS,
        registry.denylist_len() as f64 / f64::from(allocwatch_common::capacity::TGIDS),
    );
    Ok(((out, self_stats), unexported(&sites, registry)))
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
}

/// The export model of one program image of a process: its libc rows (`rows`, already
/// narrowed to the image), its Go state and its (libc, Go) size histograms.
async fn process_snapshot(
    ctx: &mut Symbolize<'_>,
    (pid, image): (u32, u32),
    p: &Proc,
    rows: &[(&SiteKey, &SiteStats)],
    (alloc_sizes, go_sizes): (Histogram, Histogram),
) -> anyhow::Result<ProcessSnapshot> {
    let no_overflow = [Overflow::default(); API_COUNT];
    let totals = aggregate::totals(rows.iter().copied(), &no_overflow);
    let mut snap = ProcessSnapshot {
        pid,
        image,
        labels: p.labels.clone(),
        frees: totals.calls[Api::Free as usize],
        live_bytes: totals.live_bytes,
        live_allocations: totals.live_allocations,
        alloc_sizes,
        exited_at: p.exited_at,
        ..ProcessSnapshot::default()
    };
    for api in Api::ALL {
        if api != Api::Free {
            snap.calls.insert(api.symbol(), totals.calls[api as usize]);
            snap.bytes.insert(api.symbol(), totals.bytes[api as usize]);
        }
    }
    // Largest first: each process's likely series are always named (its own top-K, with
    // room for the exporter's different ranking); the shared budget covers the rest.
    let mut ranked = rows.to_vec();
    ranked.sort_by_key(|(_, s)| std::cmp::Reverse(s.bytes));
    for (i, (key, stats)) in ranked.into_iter().enumerate() {
        let (live_allocations, live_bytes) = live_of(stats);
        let frames = site_frames(ctx, i, (pid, key.stack_id, key.ret_addr)).await?;
        snap.sites.push(SiteSnapshot {
            kind: Api::try_from(key.api).map_or("unknown", Api::symbol),
            frames,
            calls: stats.calls,
            bytes: stats.bytes,
            live_allocations,
            live_bytes,
        });
    }
    if let Some(go) = &p.go {
        let mut ranked: Vec<_> = go.sites.iter().collect();
        ranked.sort_by_key(|(_, c)| std::cmp::Reverse(c.bytes));
        for (i, (key, c)) in ranked.into_iter().enumerate() {
            let frames = site_frames(ctx, i, (pid, key.stack_id, key.ret_addr)).await?;
            snap.sites.push(SiteSnapshot {
                kind: key.kind.name(),
                frames,
                calls: c.count,
                bytes: c.bytes,
                live_allocations: 0,
                live_bytes: 0,
            });
        }
        snap.go = Some(go_snapshot(go, go_sizes));
    }
    Ok(snap)
}

/// New call chains symbolized per scrape (each costs microseconds to milliseconds); the rest
/// wait for the next scrape, named by their caller's address meanwhile.
const SYMBOLIZE_PER_SCRAPE: usize = 2_000;

/// A site's frames: cached, symbolized (the process's `rank`-th largest site: within its own
/// top 4×K always, else within the scrape's budget), or (budget spent) just the return
/// address, so that an unnamed site is never mistaken for one without a stack.
async fn site_frames(
    ctx: &mut Symbolize<'_>,
    rank: usize,
    (pid, stack_id, ret_addr): (u32, i32, u64),
) -> anyhow::Result<Vec<crate::symbolize::Frame>> {
    if let Some(f) = ctx.frames.cached(pid, stack_id, ret_addr) {
        return Ok(f.to_vec());
    }
    if rank >= 4 * ctx.top_k {
        if *ctx.budget == 0 {
            return Ok(vec![crate::symbolize::Frame::unknown(ret_addr)]);
        }
        *ctx.budget -= 1;
    }
    ctx.frames
        .frames(ctx.probes, ctx.symbolizer, pid, stack_id, ret_addr)
        .await
}

/// Site keys sort by tgid first: the rows of one process are one range.
fn pid_range(pid: u32) -> std::ops::RangeInclusive<SiteKey> {
    SiteKey {
        tgid: pid,
        api: 0,
        stack_id: i32::MIN,
        _pad: 0,
        ret_addr: 0,
    }..=SiteKey {
        tgid: pid,
        api: u32::MAX,
        stack_id: i32::MAX,
        _pad: u32::MAX,
        ret_addr: u64::MAX,
    }
}

/// A log2 histogram of one process as per-bucket counts with upper bounds (`scale` converts
/// the unit).
fn histogram(h: &BTreeMap<(u32, u32), GoHistVal>, pid: u32, scale: f64) -> Histogram {
    let mut out = Histogram::default();
    for ((_, bucket), v) in h.range((pid, 0)..=(pid, u32::MAX)) {
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
        alloc_sizes,
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
        let x = histogram(&h, 7, 1.0);
        assert_eq!(x.buckets, vec![(32.0, 3), (2048.0, 1)]);
        assert_eq!((x.count, x.sum), (4, 1560.0));
    }
}
