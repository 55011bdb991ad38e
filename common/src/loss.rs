//! Why events can be lost. Each cause has a slot in the `LOST` per-CPU array; the agent reports
//! every non-zero slot, so nothing is dropped silently.

/// Index into the `LOST` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(PartialOrd, Ord))]
pub enum LossCause {
    /// The per-thread in-flight table was full: the call is counted (at its entry), but its
    /// return is not seen, so its block is not entered in the live table (live bytes
    /// under-count) and a failure is not counted as failed.
    PendingFull = 0,
    /// The live-allocation table was full: the allocation is counted but cannot be matched with
    /// its free, so live bytes under-count.
    LiveFull = 1,
    /// The call-site table was full and so was the table of rows of unknown sites (`SPILL`,
    /// one row per process and API, sized for every process the agent can hold: see
    /// `SiteSpilled`): the call is counted in the node's per-API overflow row, without its
    /// process.
    SitesFull = 2,
    /// Another stack already has this stack's id (a 31-bit hash of its frames): the site keeps
    /// only its immediate caller.
    StackCollision = 3,
    /// The user stack could not be read (the walk, or the return address at the probe: a call
    /// that is not sampled then lands in its process's row of unknown sites).
    StackError = 4,
    /// The ring buffer had no room for a new-site notification: that site is symbolized late,
    /// or not at all if the process is gone by then.
    RingbufFull = 5,
    /// A call entered above an outer call of the same thread that never returned (a longjmp out
    /// of a callback, or probes attached mid-call): the outer call, counted at its entry, loses
    /// its return (its block is not entered in the live table). A return without any entry is
    /// not counted: it has nothing to lose.
    OrphanReturn = 6,
    /// An allocation-size histogram table (libc or Go) was full: that allocation is counted
    /// but not in the histogram.
    HistFull = 7,
    /// The stack table was full: the site keeps only its immediate caller.
    StackMapFull = 8,
    /// The process already had its share of the call-site table (its rows, with a stack or
    /// keyed by the caller, while the table is under pressure): the call is counted exactly at its immediate caller, without the rest of its
    /// stack. Keeps one process with endless distinct stacks (a program without frame pointers
    /// yields garbage chains) from filling the table for every other process.
    StackBudget = 9,
    /// A process the agent had not classified yet (its selection can reject processes) already
    /// had its rows with a stack: the call is counted exactly at its immediate caller. Keeps
    /// processes the selection will reject from filling the table before the agent denies them.
    StackUndecided = 10,
    /// The call-site table was full: the call is counted exactly in its process's row of
    /// unknown sites for its API (`SiteKey::spill` in the `SPILL` table, which site churn cannot
    /// fill, so a process that starts while the site table is full keeps its counts; exported
    /// as `other`), without its site.
    SiteSpilled = 11,
    /// Table unwinding (`--unwind dwarf`): a frame's code had a rule the walker does not follow
    /// (a CFA expression such as a PLT stub's, a return address not at CFA-8): the stack ends
    /// at that frame.
    UnwindUnsupported = 12,
    /// Table unwinding: the stack could not be read where a rule pointed (return address or
    /// saved rbp): the stack ends at that frame.
    UnwindReadError = 13,
    /// Table unwinding: the walk reached its frame limit (16, what the verifier accepts; see
    /// probe-ebpf/src/unwind.rs) before the outermost frame: the stack keeps its innermost
    /// frames.
    UnwindTruncated = 14,
    /// The symbol-probe site table (`PROBE_SITES`: growth kinds and `--probe`s) was full: the
    /// call is counted exactly in its process's row of unknown sites for that probe (made with
    /// the process's first row of the probe), without its call chain.
    ProbeSiteSpilled = 15,
    /// The symbol-probe site table had no row of unknown sites for the process either (it was
    /// full before the process's first call of that probe): the call is not counted.
    ProbeSitesFull = 16,
    /// The call-site table is under pressure and the process already holds
    /// `site_limit::ROW_SHARES` times its share of it, rows with a stack and rows keyed by the
    /// immediate caller together: the call is counted exactly in its process's row of unknown
    /// sites for its API, without its site (as `SiteSpilled`), so that one process cannot fill
    /// the table for every other.
    SiteBudget = 17,
    /// A process the agent had not classified yet (while its selection can reject) already
    /// holds its undecided limit of rows, of any kind: the call is counted exactly in its
    /// process's row of unknown sites for its API (as `SiteBudget`).
    /// Beside a build, every compiler the selection was about to reject made thousands of rows
    /// keyed by its callers while the agent lagged.
    SiteUndecided = 18,
}

pub const LOSS_CAUSES: usize = 19;

/// What a loss takes from the figures: an operator must tell "the counts are low" (alert)
/// from "some stacks end early" (a node running deep or frame-pointer-less code lives with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(PartialOrd, Ord))]
pub enum LossEffect {
    /// A call or event is missing from a count: a process's calls, a Go growth, a histogram.
    Counts,
    /// Every call is counted, but an allocation's return or free is not matched: live bytes
    /// and outstanding allocations (`leaks`) are low, failures may be missed.
    Live,
    /// Every call is counted exactly; only where it came from is less precise (its stack ends
    /// early or is missing, or it is counted in its process's `other` site).
    Detail,
}

impl LossEffect {
    /// Stable name: the `affects` label of the loss metrics and the JSON key.
    pub const fn name(self) -> &'static str {
        match self {
            LossEffect::Counts => "counts",
            LossEffect::Live => "live",
            LossEffect::Detail => "detail",
        }
    }
}

impl LossCause {
    /// The cause of a `LOST` index (`None` past the last).
    pub const fn from_index(i: u32) -> Option<Self> {
        Some(match i {
            0 => LossCause::PendingFull,
            1 => LossCause::LiveFull,
            2 => LossCause::SitesFull,
            3 => LossCause::StackCollision,
            4 => LossCause::StackError,
            5 => LossCause::RingbufFull,
            6 => LossCause::OrphanReturn,
            7 => LossCause::HistFull,
            8 => LossCause::StackMapFull,
            9 => LossCause::StackBudget,
            10 => LossCause::StackUndecided,
            11 => LossCause::SiteSpilled,
            12 => LossCause::UnwindUnsupported,
            13 => LossCause::UnwindReadError,
            14 => LossCause::UnwindTruncated,
            15 => LossCause::ProbeSiteSpilled,
            16 => LossCause::ProbeSitesFull,
            17 => LossCause::SiteBudget,
            18 => LossCause::SiteUndecided,
            _ => return None,
        })
    }

    /// What this loss takes from the figures (see each cause).
    pub const fn effect(self) -> LossEffect {
        match self {
            // The call is counted only for the node (SitesFull), a Go growth event or an exec
            // record is dropped (RingbufFull), a probe call is not counted (ProbeSitesFull), an
            // allocation is missing from its size histogram (HistFull).
            LossCause::SitesFull
            | LossCause::RingbufFull
            | LossCause::ProbeSitesFull
            | LossCause::HistFull => LossEffect::Counts,
            LossCause::PendingFull | LossCause::LiveFull | LossCause::OrphanReturn => {
                LossEffect::Live
            }
            LossCause::StackCollision
            | LossCause::StackError
            | LossCause::StackMapFull
            | LossCause::StackBudget
            | LossCause::StackUndecided
            | LossCause::SiteSpilled
            | LossCause::UnwindUnsupported
            | LossCause::UnwindReadError
            | LossCause::UnwindTruncated
            | LossCause::ProbeSiteSpilled
            | LossCause::SiteBudget
            | LossCause::SiteUndecided => LossEffect::Detail,
        }
    }

    /// Stable name used in JSON and metrics labels, and in the probes' debug log.
    pub const fn name(self) -> &'static str {
        match self {
            LossCause::PendingFull => "pending_full",
            LossCause::LiveFull => "live_map_full",
            LossCause::SitesFull => "site_map_full",
            LossCause::StackCollision => "stack_collision",
            LossCause::StackError => "stack_error",
            LossCause::RingbufFull => "ringbuf_full",
            LossCause::OrphanReturn => "orphan_return",
            LossCause::HistFull => "size_histogram_full",
            LossCause::StackMapFull => "stack_map_full",
            LossCause::StackBudget => "stack_budget",
            LossCause::StackUndecided => "stack_undecided",
            LossCause::SiteSpilled => "site_spilled",
            LossCause::UnwindUnsupported => "unwind_unsupported",
            LossCause::UnwindReadError => "unwind_read_error",
            LossCause::UnwindTruncated => "unwind_truncated",
            LossCause::ProbeSiteSpilled => "probe_site_spilled",
            LossCause::ProbeSitesFull => "probe_site_map_full",
            LossCause::SiteBudget => "site_budget",
            LossCause::SiteUndecided => "site_undecided",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::{LossCause, LossEffect};

    impl LossEffect {
        pub const ALL: [LossEffect; 3] = [LossEffect::Counts, LossEffect::Live, LossEffect::Detail];
    }

    impl LossCause {
        pub const ALL: [LossCause; super::LOSS_CAUSES] = [
            LossCause::PendingFull,
            LossCause::LiveFull,
            LossCause::SitesFull,
            LossCause::StackCollision,
            LossCause::StackError,
            LossCause::RingbufFull,
            LossCause::OrphanReturn,
            LossCause::HistFull,
            LossCause::StackMapFull,
            LossCause::StackBudget,
            LossCause::StackUndecided,
            LossCause::SiteSpilled,
            LossCause::UnwindUnsupported,
            LossCause::UnwindReadError,
            LossCause::UnwindTruncated,
            LossCause::ProbeSiteSpilled,
            LossCause::ProbeSitesFull,
            LossCause::SiteBudget,
            LossCause::SiteUndecided,
        ];
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn all_is_in_index_order() {
            for (i, c) in LossCause::ALL.iter().enumerate() {
                assert_eq!(*c as usize, i);
            }
        }

        #[test]
        fn from_index_inverts_the_index() {
            for (i, c) in LossCause::ALL.iter().enumerate() {
                assert_eq!(LossCause::from_index(i as u32), Some(*c));
            }
            assert_eq!(
                LossCause::from_index(super::super::LOSS_CAUSES as u32),
                None
            );
        }
    }
}
