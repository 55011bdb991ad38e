//! Pure aggregation: per-CPU sums, per-process totals, leak grouping, top-K. No I/O here, so all
//! of it is unit-tested without root.

use std::collections::BTreeMap;

use allocwatch_common::libc::{
    API_COUNT, Api, LiveAlloc, LiveKey, NO_STACK, Overflow, SiteKey, SiteStats,
};

/// How the probes sampled (`--sample-bytes`, `allocwatch_common::sample`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sampling {
    /// Mean bytes between sampled calls; 0: every call was recorded (nothing to scale).
    pub bytes: u64,
    /// Whether sampled calls got their stack (then rows with a stack hold the samples, and
    /// rows without one the other calls of the same caller).
    pub stacks: bool,
}

/// Whether the API id frees a block (`free`, `operator delete`: never sampled, no bytes).
fn is_free(api: u32) -> bool {
    Api::try_from(api).is_ok_and(Api::is_free)
}

impl Sampling {
    pub fn on(self) -> bool {
        self.bytes > 0
    }

    /// Whether a site row of `key` is shown as a site. With stacks sampled, an allocating
    /// caller's row without a stack holds the calls that were not sampled: they are in the
    /// exact totals (and the per-caller figures), and the sampled rows, scaled, stand for
    /// them per stack. `free` (and `operator delete`) is never sampled: its rows are exact, per caller.
    pub fn shows(self, key: &SiteKey) -> bool {
        !(self.on() && self.stacks && key.stack_id == NO_STACK && !is_free(key.api))
    }

    /// A row's figures as reported: with sampling, a row with a stack holds samples, scaled
    /// (calls, bytes, failures); every row's outstanding allocations are samples, scaled
    /// (returned as `tracked`, with `freed` 0, so [`live_of`] reads the estimate). Without
    /// sampling, the row itself.
    pub fn estimate(self, key: &SiteKey, s: &SiteStats) -> SiteStats {
        if !self.on() {
            return *s;
        }
        let mut out = *s;
        if key.stack_id != NO_STACK {
            let (calls, bytes) = scale(s.calls, s.bytes, self.bytes);
            out.calls = calls;
            out.bytes = bytes;
            out.failed = if s.calls == 0 {
                0
            } else {
                (s.failed as f64 * calls as f64 / s.calls as f64) as u64
            };
        }
        let (n, b) = live_of(s);
        let (n, b) = scale(n, b, self.bytes);
        out.tracked = n;
        out.tracked_bytes = b;
        out.freed = 0;
        out.freed_bytes = 0;
        out
    }
}

/// pprof's estimate of what `count` sampled calls of `bytes` in all stand for, sampled with a
/// mean of `rate` bytes between samples (Go's `scaleHeapSample`, runtime/pprof/protomem.go):
/// a call of the bucket's average size `a` is sampled with probability `1 - exp(-a/rate)`, so
/// both figures are divided by it. Exact for a bucket of equal sizes; for mixed sizes it
/// uses the average, as pprof does. `rate` ≤ 1: nothing to scale (every call was sampled).
pub fn scale(count: u64, bytes: u64, rate: u64) -> (u64, u64) {
    if count == 0 || bytes == 0 {
        return (0, 0);
    }
    if rate <= 1 {
        return (count, bytes);
    }
    let avg = bytes as f64 / count as f64;
    let s = 1.0 / (1.0 - (-avg / rate as f64).exp());
    ((count as f64 * s) as u64, (bytes as f64 * s) as u64)
}

/// Sums one site's per-CPU values. `freed` may be counted on another CPU than `tracked`, so only
/// the sums are meaningful.
pub fn sum_stats<'a>(values: impl Iterator<Item = &'a SiteStats>) -> SiteStats {
    values.fold(SiteStats::default(), |mut acc, v| {
        acc.calls += v.calls;
        acc.bytes += v.bytes;
        acc.failed += v.failed;
        acc.tracked += v.tracked;
        acc.tracked_bytes += v.tracked_bytes;
        acc.freed += v.freed;
        acc.freed_bytes += v.freed_bytes;
        acc
    })
}

/// Live allocations and bytes still attributed to a site.
pub fn live_of(s: &SiteStats) -> (u64, u64) {
    (
        s.tracked.saturating_sub(s.freed),
        s.tracked_bytes.saturating_sub(s.freed_bytes),
    )
}

/// The addresses of a site's call chain, innermost first.
///
/// `stack` comes from `bpf_get_stackid` at the probe: its first entry is the probed libc
/// instruction itself, and the frame-pointer walk then starts at the caller's *caller* (at a
/// function's entry the callee has not pushed a frame yet). The immediate caller is the return
/// address read at `[rsp]`, so it goes first; if the walk did see it, it is not repeated.
pub fn call_chain(ret_addr: u64, stack: &[u64]) -> Vec<u64> {
    let mut chain = Vec::with_capacity(stack.len() + 1);
    if ret_addr != 0 {
        chain.push(ret_addr);
    }
    let walked = stack.get(1..).unwrap_or_default();
    let skip = usize::from(walked.first() == Some(&ret_addr));
    chain.extend(walked.iter().skip(skip).copied().filter(|&a| a != 0));
    chain
}

/// Per-API totals of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Totals {
    pub calls: [u64; API_COUNT],
    pub bytes: [u64; API_COUNT],
    pub failed: [u64; API_COUNT],
    pub live_allocations: u64,
    pub live_bytes: u64,
}

// By hand: `Default` is derived for arrays of at most 32 elements.
impl Default for Totals {
    fn default() -> Self {
        Self {
            calls: [0; API_COUNT],
            bytes: [0; API_COUNT],
            failed: [0; API_COUNT],
            live_allocations: 0,
            live_bytes: 0,
        }
    }
}

/// Totals of the given site rows (one process) plus the rows that found the site table full:
/// calls, bytes and failures exact (every call is counted, sampled or not), outstanding
/// allocations estimated from the samples when `sampling` is on.
pub fn totals<'a>(
    sites: impl Iterator<Item = (&'a SiteKey, &'a SiteStats)>,
    overflow: &[Overflow; API_COUNT],
    sampling: Sampling,
) -> Totals {
    let mut t = Totals::default();
    for (key, s) in sites {
        let Some(i) = Api::try_from(key.api).ok().map(|a| a as usize) else {
            continue;
        };
        t.calls[i] += s.calls;
        t.bytes[i] += s.bytes;
        t.failed[i] += s.failed;
        let (n, b) = live_of(&sampling.estimate(key, s));
        t.live_allocations += n;
        t.live_bytes += b;
    }
    for (i, o) in overflow.iter().enumerate() {
        t.calls[i] += o.calls;
        t.bytes[i] += o.bytes;
    }
    t
}

/// Outstanding allocations of one site that are at least `min_age_ns` old.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeakGroup {
    pub site: SiteKey,
    pub count: u64,
    pub bytes: u64,
    pub oldest_age_ns: u64,
}

/// Groups live allocations by site, keeping those at least `min_age_ns` old at `now_ns`
/// (CLOCK_MONOTONIC, like `bpf_ktime_get_ns`). Largest first, then oldest.
pub fn leaks(live: &[(LiveKey, LiveAlloc)], now_ns: u64, min_age_ns: u64) -> Vec<LeakGroup> {
    let mut groups: BTreeMap<SiteKey, LeakGroup> = BTreeMap::new();
    for (_, a) in live {
        let age = now_ns.saturating_sub(a.ts_ns);
        if age < min_age_ns {
            continue;
        }
        let g = groups.entry(a.site).or_insert(LeakGroup {
            site: a.site,
            count: 0,
            bytes: 0,
            oldest_age_ns: 0,
        });
        g.count += 1;
        g.bytes += a.size;
        g.oldest_age_ns = g.oldest_age_ns.max(age);
    }
    let mut out: Vec<_> = groups.into_values().collect();
    out.sort_by(|a, b| {
        (b.bytes, b.oldest_age_ns, b.count)
            .cmp(&(a.bytes, a.oldest_age_ns, a.count))
            .then(a.site.cmp(&b.site))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(api: Api, ret: u64) -> SiteKey {
        SiteKey {
            tgid: 1,
            api: api as u32,
            stack_id: 3,
            ret_addr: ret,
        }
    }

    fn stats(calls: u64, bytes: u64, tracked: u64, tracked_bytes: u64) -> SiteStats {
        SiteStats {
            calls,
            bytes,
            tracked,
            tracked_bytes,
            ..Default::default()
        }
    }

    #[test]
    fn per_cpu_sum_with_frees_on_other_cpus() {
        let cpu0 = stats(3, 300, 3, 300);
        let cpu1 = SiteStats {
            freed: 2,
            freed_bytes: 200,
            ..Default::default()
        };
        let s = sum_stats([cpu0, cpu1].iter());
        assert_eq!((s.calls, s.bytes), (3, 300));
        assert_eq!(live_of(&s), (1, 100));
    }

    #[test]
    fn chain_puts_immediate_caller_first_and_drops_probe_ip() {
        // [probe ip in libc, caller's caller, main]
        assert_eq!(
            call_chain(0x10, &[0xfff0, 0x20, 0x30]),
            vec![0x10, 0x20, 0x30]
        );
        // The walk already saw the caller: not repeated.
        assert_eq!(call_chain(0x10, &[0xfff0, 0x10, 0x20]), vec![0x10, 0x20]);
        assert_eq!(call_chain(0x10, &[]), vec![0x10]);
        assert_eq!(call_chain(0, &[0xfff0, 0x20]), vec![0x20]);
    }

    #[test]
    fn totals_include_overflow_and_live() {
        let mut sites = BTreeMap::new();
        sites.insert(key(Api::Malloc, 1), stats(7, 700, 7, 700));
        sites.insert(
            key(Api::Malloc, 2),
            SiteStats {
                freed: 1,
                freed_bytes: 5,
                ..stats(1, 5, 1, 5)
            },
        );
        sites.insert(key(Api::Free, 3), stats(4, 300, 0, 0));
        let mut overflow = [Overflow::default(); API_COUNT];
        overflow[Api::Calloc as usize] = Overflow {
            calls: 2,
            bytes: 20,
        };
        let t = totals(sites.iter(), &overflow, Sampling::default());
        assert_eq!(t.calls[Api::Malloc as usize], 8);
        assert_eq!(t.bytes[Api::Malloc as usize], 705);
        assert_eq!(t.calls[Api::Calloc as usize], 2);
        assert_eq!(t.bytes[Api::Calloc as usize], 20);
        assert_eq!(t.calls[Api::Free as usize], 4);
        assert_eq!(t.live_allocations, 7);
        assert_eq!(t.live_bytes, 700);
    }

    /// Go's scaleHeapSample: 1/(1 - exp(-avg/rate)) on both figures.
    #[test]
    fn scale_as_pprof() {
        assert_eq!(scale(0, 0, 512), (0, 0));
        assert_eq!(scale(3, 0, 512), (0, 0));
        assert_eq!(scale(10, 1000, 0), (10, 1000));
        assert_eq!(scale(10, 1000, 1), (10, 1000));
        // avg = rate: p = 1 - 1/e = 0.632…, scale 1.582.
        assert_eq!(scale(1000, 512_000, 512), (1581, 809_972));
        // Large blocks are sampled almost surely: barely scaled.
        assert_eq!(scale(4, 64 << 20, 512 << 10), (4, 64 << 20));
        // Small blocks: about rate/avg.
        let (n, b) = scale(100, 1600, 512 << 10);
        assert_eq!(n, 3_276_850);
        assert_eq!(b, 52_429_600);
    }

    /// The samples of a known population, scaled, give the population back within the
    /// binomial's spread (the model the integration test's bound comes from).
    #[test]
    fn scaled_samples_estimate_the_population() {
        let rate = 512u64;
        for size in [16u64, 256, 512, 4096] {
            let n = 100_000u64;
            let p = 1.0 - (-(size as f64) / rate as f64).exp();
            // The expected sample count.
            let k = (n as f64 * p).round() as u64;
            let (calls, bytes) = scale(k, k * size, rate);
            assert!(
                (calls as f64 / n as f64 - 1.0).abs() < 1e-3,
                "{size}: {calls}"
            );
            assert_eq!(bytes / size, calls);
        }
    }

    /// Sampled rows (with a stack) are scaled, the callers' rows of unsampled calls are not
    /// shown as sites, free rows are; outstanding allocations are always scaled.
    #[test]
    fn sampling_estimates_and_shows() {
        let on = Sampling {
            bytes: 512,
            stacks: true,
        };
        let sampled = key(Api::Malloc, 1);
        let rest = SiteKey {
            stack_id: NO_STACK,
            ..sampled
        };
        let free = SiteKey {
            api: Api::Free as u32,
            ..rest
        };
        assert!(on.shows(&sampled) && on.shows(&free) && !on.shows(&rest));
        assert!(
            Sampling {
                stacks: false,
                ..on
            }
            .shows(&rest)
        );
        assert!(Sampling::default().shows(&rest));
        let s = SiteStats {
            failed: 10,
            freed: 500,
            freed_bytes: 256_000,
            ..stats(1000, 512_000, 1000, 512_000)
        };
        let e = on.estimate(&sampled, &s);
        assert_eq!((e.calls, e.bytes, e.failed), (1581, 809_972, 15));
        assert_eq!(live_of(&e), scale(500, 256_000, 512));
        let e = on.estimate(&rest, &s);
        assert_eq!((e.calls, e.bytes, e.failed), (1000, 512_000, 10));
        assert_eq!(live_of(&e), scale(500, 256_000, 512));
        assert_eq!(Sampling::default().estimate(&rest, &s), s);
        // Totals: calls and bytes exact, live scaled.
        let rows = BTreeMap::from([(sampled, s), (rest, stats(7, 700, 0, 0))]);
        let t = totals(rows.iter(), &[Overflow::default(); API_COUNT], on);
        assert_eq!(t.calls[Api::Malloc as usize], 1007);
        assert_eq!(t.bytes[Api::Malloc as usize], 512_700);
        assert_eq!(t.live_allocations, scale(500, 256_000, 512).0);
    }

    #[test]
    fn leaks_group_and_filter_by_age() {
        let site_a = key(Api::Malloc, 1);
        let site_b = key(Api::Calloc, 2);
        let alloc = |site, size, ts_ns| (LiveKey::default(), LiveAlloc { size, ts_ns, site });
        let live = [
            alloc(site_a, 100, 1_000),
            alloc(site_a, 100, 5_000),
            alloc(site_b, 1_000, 9_500),
            alloc(site_a, 100, 9_900),
        ];
        let g = leaks(&live, 10_000, 1_000);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].site, site_a);
        assert_eq!(
            (g[0].count, g[0].bytes, g[0].oldest_age_ns),
            (2, 200, 9_000)
        );
        let all = leaks(&live, 10_000, 0);
        assert_eq!(all[0].site, site_b);
        assert_eq!((all[1].count, all[1].bytes), (3, 300));
    }
}
