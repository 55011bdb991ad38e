//! Loss causes by name, the kernel's (`LossCause`) and the agent's own, with what each takes from
//! the figures (`LossEffect`): the one place a cause name is classified, for the text report,
//! the JSON, the metrics' `affects` label and the agent's warnings.

use std::collections::BTreeMap;

pub use allocwatch_common::loss::{LossCause, LossEffect};

/// A ring-buffer record the agent could not decode: whatever it carried is not counted.
pub const MALFORMED_RECORD: &str = "malformed_record";
/// A site's frames could not be named: its process was gone before the symbolizer read it.
pub const SYMBOLIZE_PROCESS_GONE: &str = "symbolize_process_gone";
/// A stack the kernel's LRU table dropped before it was copied: the site keeps only its caller.
pub const SYMBOLIZE_STACK_EVICTED: &str = "symbolize_stack_evicted";
/// A stack whose frames the symbolizer stopped at (a frame in no mapping).
pub const SYMBOLIZE_STACK_CUT: &str = "symbolize_stack_cut";
/// Go maps the agent could not keep an instance for (growth counted, per-map verdicts not).
pub const GO_MAP_INSTANCES_UNTRACKED: &str = "go_map_instances_untracked";
/// The followed tree (`top -- CMD`): processes whose calls are missing from its figures.
pub const PROCESSES_NOT_FOLLOWED: &str = "processes_not_followed";
pub const PROCESSES_NOT_PROBED: &str = "processes_not_probed";
pub const PROCESSES_PROBED_LATE: &str = "processes_probed_late";
pub const PROCESSES_UNCHECKED: &str = "processes_unchecked";
pub const PROGRAM_TABLE_FULL: &str = "program_table_full";
pub const ATTACH_FAILURES: &str = "attach_failures";
pub const GO_PROGRAMS_NOT_TRACED: &str = "go_programs_not_traced";

/// The agent's own causes and what each takes.
const AGENT_CAUSES: [(&str, LossEffect); 12] = [
    (MALFORMED_RECORD, LossEffect::Counts),
    (SYMBOLIZE_PROCESS_GONE, LossEffect::Detail),
    (SYMBOLIZE_STACK_EVICTED, LossEffect::Detail),
    (SYMBOLIZE_STACK_CUT, LossEffect::Detail),
    (GO_MAP_INSTANCES_UNTRACKED, LossEffect::Detail),
    (PROCESSES_NOT_FOLLOWED, LossEffect::Counts),
    (PROCESSES_NOT_PROBED, LossEffect::Counts),
    (PROCESSES_PROBED_LATE, LossEffect::Counts),
    (PROCESSES_UNCHECKED, LossEffect::Counts),
    (PROGRAM_TABLE_FULL, LossEffect::Counts),
    (ATTACH_FAILURES, LossEffect::Counts),
    (GO_PROGRAMS_NOT_TRACED, LossEffect::Counts),
];

/// What the cause named `name` takes; a name not known here is taken to affect counts (the
/// claim that is never falsely reassuring).
pub fn effect(name: &str) -> LossEffect {
    LossCause::ALL
        .iter()
        .find(|c| c.name() == name)
        .map(|c| c.effect())
        .or_else(|| {
            AGENT_CAUSES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, e)| *e)
        })
        .unwrap_or(LossEffect::Counts)
}

/// The sum of a loss map by effect, every effect present (zeros too).
pub fn by_effect(lost: &BTreeMap<&'static str, u64>) -> BTreeMap<&'static str, u64> {
    let mut out: BTreeMap<&'static str, u64> =
        LossEffect::ALL.iter().map(|e| (e.name(), 0)).collect();
    for (cause, &n) in lost {
        *out.entry(effect(cause).name()).or_default() += n;
    }
    out
}

/// How a rise of a cause with this effect is said: what the figures lose.
pub const fn consequence(e: LossEffect) -> &'static str {
    match e {
        LossEffect::Counts => "counts are low",
        LossEffect::Live => "live bytes and outstanding allocations are low",
        LossEffect::Detail => "counts stay exact, only call sites are less detailed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_causes_keep_their_effect_by_name() {
        for c in LossCause::ALL {
            assert_eq!(effect(c.name()), c.effect(), "{}", c.name());
        }
    }

    #[test]
    fn agent_causes_are_classified_and_distinct_from_the_kernels() {
        assert_eq!(effect(SYMBOLIZE_PROCESS_GONE), LossEffect::Detail);
        assert_eq!(effect(MALFORMED_RECORD), LossEffect::Counts);
        for (n, _) in AGENT_CAUSES {
            assert!(LossCause::ALL.iter().all(|c| c.name() != n), "{n}");
        }
    }

    #[test]
    fn unknown_names_count_as_counts() {
        assert_eq!(effect("no_such_cause"), LossEffect::Counts);
    }

    #[test]
    fn by_effect_sums_and_keeps_zeros() {
        let lost = BTreeMap::from([
            ("ringbuf_full", 2),
            ("malformed_record", 1),
            ("orphan_return", 3),
            ("unwind_truncated", 40),
            ("symbolize_process_gone", 5),
        ]);
        assert_eq!(
            by_effect(&lost),
            BTreeMap::from([("counts", 3), ("live", 3), ("detail", 45)])
        );
        assert_eq!(
            by_effect(&BTreeMap::new()),
            BTreeMap::from([("counts", 0), ("live", 0), ("detail", 0)])
        );
    }
}
