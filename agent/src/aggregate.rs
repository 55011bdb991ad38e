//! Pure aggregation: per-CPU sums, per-process totals, leak grouping, top-K. No I/O here, so all
//! of it is unit-tested without root.

use std::collections::BTreeMap;

use allocwatch_common::libc::{API_COUNT, Api, LiveAlloc, LiveKey, Overflow, SiteKey, SiteStats};

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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub calls: [u64; API_COUNT],
    pub bytes: [u64; API_COUNT],
    pub failed: [u64; API_COUNT],
    pub live_allocations: u64,
    pub live_bytes: u64,
}

/// Totals of the given site rows (one process) plus the rows that found the site table full.
pub fn totals<'a>(
    sites: impl Iterator<Item = (&'a SiteKey, &'a SiteStats)>,
    overflow: &[Overflow; API_COUNT],
) -> Totals {
    let mut t = Totals::default();
    for (key, s) in sites {
        let Some(i) = Api::try_from(key.api).ok().map(|a| a as usize) else {
            continue;
        };
        t.calls[i] += s.calls;
        t.bytes[i] += s.bytes;
        t.failed[i] += s.failed;
        let (n, b) = live_of(s);
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
        let t = totals(sites.iter(), &overflow);
        assert_eq!(t.calls[Api::Malloc as usize], 8);
        assert_eq!(t.bytes[Api::Malloc as usize], 705);
        assert_eq!(t.calls[Api::Calloc as usize], 2);
        assert_eq!(t.bytes[Api::Calloc as usize], 20);
        assert_eq!(t.calls[Api::Free as usize], 4);
        assert_eq!(t.live_allocations, 7);
        assert_eq!(t.live_bytes, 700);
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
