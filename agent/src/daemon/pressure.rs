//! Sharing the call-site table among the node's processes. While the table is under three
//! quarters full every process keeps every stack; past that, each may create at most
//! 1/[`SHARE`] of the table's rows with a stack (all its rows count), and its further sites keep
//! only their immediate caller (`stack_budget`); past `ROW_SHARES` shares, its further sites go
//! to its row of unknown sites (`site_budget`). One long-running program without frame pointers
//! (a shell, Debian's python3) makes endless garbage stacks: without a share it filled the table
//! within a minute and every other process lost its per-site figures. A compiler calls malloc
//! from tens of thousands of places, a row each even without stacks: four `rustc`s filled the
//! default table with their callers alone.

use std::time::{Duration, Instant};

use allocwatch_common::{
    libc::{SiteKey, SiteStats},
    map_names::SITES,
    site_limit,
};

use crate::{collect, probes::Probes};

/// An estimate past the threshold is checked by counting the table at most this often (a
/// churn of short-lived processes creates rows faster than a census, and their rows go soon).
const RECOUNT_EVERY: Duration = Duration::from_secs(1);

/// Under pressure, one process may create this fraction of the table's rows with a stack.
pub const SHARE: u32 = 32;

/// While the selection can reject processes, one not classified yet may create this fraction
/// of the table's rows, always (512 of the default 65,536): its stacks, then its callers (a
/// compiler's callers alone are thousands of rows). The agent classifies
/// a new process at its exec, within milliseconds on a quiet node; under load it lags by
/// seconds, and beside a build every compiler the selection was about to reject filled the
/// table with its stacks in that time (the site-share test under two parallel builds).
pub const UNDECIDED_SHARE: u32 = 128;

/// Rows a process the agent has not admitted may create in a table of
/// `capacity` rows.
pub fn undecided_limit(capacity: u32) -> u32 {
    (capacity / UNDECIDED_SHARE).max(1)
}

/// Fill (numerator / DENOM of the capacity) at which the shares start ...
///
/// Three quarters, not half: a churn of short-lived programs without frame pointers (the soak's
/// python3 one-liners) passed half the default table in bursts that the sweeper clears within
/// seconds, and each burst cost the next programs their stacks; a quarter of the table is still
/// left to everyone else when one runaway process is limited.
const ON: u64 = 6;
/// ... and below which (at a census) they are lifted.
const OFF: u64 = 4;
const DENOM: u64 = 8;

/// Follows the site table's fill between censuses and sets the probe's per-process limit.
pub struct SitePressure {
    capacity: u64,
    /// Rows counted at the last census, and the probe's creation counter then.
    rows_at_census: u64,
    created_at_census: u64,
    limited: bool,
    last_count: Option<Instant>,
}

/// A change of the limit, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Limited { rows: u64, per_process: u32 },
    Lifted { rows: u64 },
}

impl SitePressure {
    pub fn new(capacity: u32) -> Self {
        Self {
            capacity: u64::from(capacity),
            rows_at_census: 0,
            created_at_census: 0,
            limited: false,
            last_count: None,
        }
    }

    /// Rows one process may create with a stack while the table is under pressure.
    pub fn per_process(&self) -> u32 {
        (self.capacity / u64::from(SHARE)).max(1) as u32
    }

    /// Every tick: the rows now are at most those of the last count plus those created since
    /// (deletions are not seen); an estimate past the threshold is checked by counting.
    pub fn tick(&mut self, probes: &mut Probes, now: Instant) -> anyhow::Result<Option<Change>> {
        if self.limited {
            return Ok(None);
        }
        let created = collect::site_rows_created(probes)?;
        let rows = self.rows_at_census + created.saturating_sub(self.created_at_census);
        if want(false, rows, self.capacity) != Some(true)
            || self
                .last_count
                .is_some_and(|t| now.saturating_duration_since(t) < RECOUNT_EVERY)
        {
            return Ok(None);
        }
        self.last_count = Some(now);
        self.census(probes)
    }

    /// Counts the rows really in the table and decides on them (every census, and when the
    /// estimate says so).
    pub fn census(&mut self, probes: &mut Probes) -> anyhow::Result<Option<Change>> {
        self.created_at_census = collect::site_rows_created(probes)?;
        let (rows, _) = collect::count_rows::<SiteKey, SiteStats>(probes, SITES)?;
        self.rows_at_census = rows;
        self.decide(rows, probes)
    }

    fn decide(&mut self, rows: u64, probes: &mut Probes) -> anyhow::Result<Option<Change>> {
        match want(self.limited, rows, self.capacity) {
            Some(true) => {
                probes.set_site_limit(site_limit::UNDER_PRESSURE, self.per_process())?;
                self.limited = true;
                Ok(Some(Change::Limited {
                    rows,
                    per_process: self.per_process(),
                }))
            }
            Some(false) => {
                probes.set_site_limit(site_limit::UNDER_PRESSURE, 0)?;
                self.limited = false;
                Ok(Some(Change::Lifted { rows }))
            }
            None => Ok(None),
        }
    }
}

/// Whether to limit (`Some(true)`), lift (`Some(false)`) or leave the limit as it is.
fn want(limited: bool, rows: u64, capacity: u64) -> Option<bool> {
    if !limited && rows * DENOM >= capacity * ON {
        Some(true)
    } else if limited && rows * DENOM < capacity * OFF {
        Some(false)
    } else {
        None
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Limited { rows, per_process } => write!(
                f,
                "the call-site table holds {rows} rows (three quarters full or more): from now \
                 on each process keeps at most {per_process} sites with their stack, later \
                 sites keep their immediate caller (lost cause stack_budget), and at most {} \
                 sites in all, later sites go to its row of unknown sites (site_budget); \
                 counts stay exact",
                per_process.saturating_mul(site_limit::ROW_SHARES)
            ),
            Change::Lifted { rows } => write!(
                f,
                "the call-site table is down to {rows} rows: every process keeps every stack \
                 again"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_at_three_quarters_and_lifts_below_half() {
        let cap = 65_536;
        assert_eq!(want(false, 49_151, cap), None);
        assert_eq!(want(false, 49_152, cap), Some(true));
        assert_eq!(want(true, 49_152, cap), None);
        // Between the two thresholds nothing changes either way.
        assert_eq!(want(true, 32_768, cap), None);
        assert_eq!(want(false, 32_768, cap), None);
        assert_eq!(want(true, 32_767, cap), Some(false));
    }

    #[test]
    fn a_tiny_table_still_allows_a_row() {
        let p = SitePressure::new(8);
        assert_eq!(p.per_process(), 1);
        assert_eq!(SitePressure::new(65_536).per_process(), 2048);
    }
}
