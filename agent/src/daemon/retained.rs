//! What the agent keeps of a process (or program image) that is gone, until its TTL: its
//! final site rows and size histograms, taken out of the kernel maps (`sweep.rs`), then cut
//! down to what can be exported.
//!
//! A short-lived `python3` leaves ~3,000 site rows; a node starting a few programs a second
//! keeps thousands of exited processes within the TTL. Only a process's largest sites can have
//! series of their own (`top_k` per identity, see `serve::metrics`), so once the harvest is
//! complete the rows beyond [`RETAINED_SITES`] × `top_k` are folded into one remainder per API:
//! every total stays exact, the remainder is exported under `site="other"`.

use std::collections::BTreeMap;

use allocwatch_common::{
    go::GoHistVal,
    libc::{NO_STACK, SiteKey, SiteStats},
    symprobe::{ProbeSiteKey, ProbeSiteStats},
};

use super::sweep::Harvest;
use crate::aggregate::sum_stats;

/// Sites kept per gone process, as a multiple of `top_k` (room for identities whose ranking
/// differs from one process's).
pub const RETAINED_SITES: usize = 4;

/// The final rows of a gone process or program image.
#[derive(Debug, Default)]
pub struct Retained {
    /// Harvested rows (all of them until [`Self::compact`], then the largest).
    pub rows: Vec<(SiteKey, SiteStats)>,
    /// Per API id: the sum of the rows folded away by [`Self::compact`].
    pub remainder: BTreeMap<u32, SiteStats>,
    /// Request-size histograms by log2 bucket.
    pub libc_hist: BTreeMap<u32, GoHistVal>,
    pub go_hist: BTreeMap<u32, GoHistVal>,
    /// Symbol-probe rows (the largest after [`Self::compact`], the rest folded into each
    /// probe's row of unknown sites: no stack, no caller).
    pub probe_rows: Vec<(ProbeSiteKey, ProbeSiteStats)>,
    /// The harvest is complete (no row of it is left in the kernel).
    pub complete: bool,
}

impl Retained {
    /// Adds rows of a harvest step.
    pub fn absorb(&mut self, h: Harvest) {
        self.rows.extend(h.rows);
        self.probe_rows.extend(h.probe_rows);
        self.add_hists(h.libc_hist, h.go_hist);
    }

    /// Adds buckets to the size histograms.
    pub fn add_hists(&mut self, libc: Vec<(u32, GoHistVal)>, go: Vec<(u32, GoHistVal)>) {
        for (hist, add) in [(&mut self.libc_hist, libc), (&mut self.go_hist, go)] {
            for (bucket, v) in add {
                let e = hist.entry(bucket).or_default();
                e.count += v.count;
                e.bytes += v.bytes;
            }
        }
    }

    /// Keeps the `keep` largest rows (by bytes, then calls) and folds the rest into the
    /// per-API remainder; returns the keys of the rows folded away.
    pub fn compact(&mut self, keep: usize) -> Vec<SiteKey> {
        self.complete = true;
        self.compact_probes(keep);
        if self.rows.len() <= keep {
            return Vec::new();
        }
        self.rows
            .sort_by(|a, b| (b.1.bytes, b.1.calls, a.0).cmp(&(a.1.bytes, a.1.calls, b.0)));
        let folded = self.rows.split_off(keep);
        self.rows.shrink_to_fit();
        let mut keys = Vec::with_capacity(folded.len());
        for (key, stats) in folded {
            let slot = self.remainder.entry(key.api).or_default();
            *slot = sum_stats([*slot, stats].iter());
            keys.push(key);
        }
        keys
    }
}

impl Retained {
    /// Keeps the `keep` largest symbol-probe rows (by calls) and folds the rest into their
    /// probe's row of unknown sites (exported as `site="other"`).
    fn compact_probes(&mut self, keep: usize) {
        if self.probe_rows.len() <= keep {
            return;
        }
        self.probe_rows
            .sort_by(|a, b| (b.1.calls, a.0).cmp(&(a.1.calls, b.0)));
        let folded = self.probe_rows.split_off(keep);
        let mut rest: BTreeMap<ProbeSiteKey, ProbeSiteStats> = BTreeMap::new();
        for (key, stats) in folded {
            let spill = ProbeSiteKey {
                stack_id: NO_STACK,
                ret_addr: 0,
                ..key
            };
            add_probe(rest.entry(spill).or_default(), &stats);
        }
        // A kept row of unknown sites takes its folded part.
        for (key, stats) in &mut self.probe_rows {
            if let Some(r) = rest.remove(key) {
                add_probe(stats, &r);
            }
        }
        self.probe_rows.extend(rest);
        self.probe_rows.shrink_to_fit();
    }
}

/// `sum += v`, calls and every argument's sum.
pub fn add_probe(sum: &mut ProbeSiteStats, v: &ProbeSiteStats) {
    sum.calls += v.calls;
    for (s, a) in sum.args.iter_mut().zip(v.args) {
        *s = s.wrapping_add(a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(stack_id: i64, api: u32, calls: u64, bytes: u64) -> (SiteKey, SiteStats) {
        (
            SiteKey {
                tgid: 7,
                api,
                stack_id,
                ..SiteKey::default()
            },
            SiteStats {
                calls,
                bytes,
                ..SiteStats::default()
            },
        )
    }

    #[test]
    fn compaction_keeps_the_largest_and_every_total() {
        let mut r = Retained::default();
        r.absorb(Harvest {
            rows: vec![
                row(1, 0, 1, 10),
                row(2, 0, 5, 500),
                row(3, 1, 2, 20),
                row(4, 0, 3, 30),
            ],
            libc_hist: vec![(
                4,
                GoHistVal {
                    count: 2,
                    bytes: 40,
                },
            )],
            go_hist: Vec::new(),
            probe_rows: Vec::new(),
        });
        r.absorb(Harvest {
            libc_hist: vec![(
                4,
                GoHistVal {
                    count: 1,
                    bytes: 20,
                },
            )],
            ..Harvest::default()
        });
        let folded = r.compact(2);
        let kept: Vec<i64> = r.rows.iter().map(|(k, _)| k.stack_id).collect();
        assert_eq!(kept, vec![2, 4]);
        let mut folded: Vec<i64> = folded.iter().map(|k| k.stack_id).collect();
        folded.sort_unstable();
        assert_eq!(folded, vec![1, 3]);
        assert_eq!((r.remainder[&0].calls, r.remainder[&0].bytes), (1, 10));
        assert_eq!((r.remainder[&1].calls, r.remainder[&1].bytes), (2, 20));
        assert_eq!(
            r.libc_hist[&4],
            GoHistVal {
                count: 3,
                bytes: 60
            }
        );
        assert!(r.complete);
    }

    #[test]
    fn probe_rows_compact_into_their_probes_unknown_sites() {
        let row = |probe: u32, stack_id: i64, calls: u64| {
            let key = ProbeSiteKey {
                tgid: 7,
                probe,
                stack_id,
                ret_addr: if stack_id == NO_STACK { 0 } else { 0x1000 },
            };
            let mut args = [0; allocwatch_common::symprobe::ARGS];
            args[0] = 10 * calls;
            (key, ProbeSiteStats { calls, args })
        };
        let mut r = Retained::default();
        r.absorb(Harvest {
            probe_rows: vec![
                row(0, 1, 5),
                row(0, 2, 1),
                row(0, NO_STACK, 2),
                row(4, 3, 4),
                row(4, 5, 3),
            ],
            ..Harvest::default()
        });
        r.compact(2);
        let mut rows: Vec<(u32, i64, u64, u64)> = r
            .probe_rows
            .iter()
            .map(|(k, s)| (k.probe, k.stack_id, s.calls, s.args[0]))
            .collect();
        rows.sort_unstable();
        // The two largest kept; the rest in their probe's row of unknown sites (probe 0's
        // existing one took its share), every total and argument sum exact.
        assert_eq!(
            rows,
            vec![
                (0, NO_STACK, 3, 30),
                (0, 1, 5, 50),
                (4, 3, 4, 40),
                (4, NO_STACK, 3, 30)
            ]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
        );
    }
}
