//! Taking the rows of processes that are gone out of the kernel maps, a bounded amount of
//! work per step, so that the daemon loop never stalls on it.
//!
//! A process that exited (or a program image that ended at `exec`) leaves rows in the site
//! table, the size histograms, the live-allocation table and the in-flight table. Its site and
//! histogram rows are final, so they are *harvested*: handed to the registry, which keeps what
//! it exports in userspace until the TTL, and deleted from the kernel at once. The kernel maps
//! then hold only running processes, whatever the churn (the soak in issue 17 filled the site
//! table within a minute with rows of processes that had exited, and the key-by-key deletion of
//! a million-entry live table then stopped the loop). Rows of processes the selection rejects
//! are deleted the same way, without harvest.
//!
//! The agent knows the key of every site row from its new-site record, so a process's rows
//! are looked up and deleted by key ([`TARGET_BUDGET`] keys per step) — a few milliseconds for
//! a `python3`, where walking a full 65k-row table took 50–90 ms on a loaded 2-CPU machine.
//! Rows whose record was lost (a full ring buffer) are found by a *backstop* pass over the
//! tables now and then, and the live-allocation table, whose keys (addresses) the agent never
//! sees, by a pass every [`LIVE_PASS_EVERY`] (sooner when it fills up). Passes read in batches
//! (`collect::RawMap`), a bounded number of entries per step; a pid is done with a table once a
//! pass that *started after* it was queued has finished.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

use allocwatch_common::{
    go::{GO_HIST_BUCKETS, GoHistKey, GoHistVal, GoProc, StwState},
    libc::{API_COUNT, LiveAlloc, LiveKey, Pending, SiteKey, SiteStats},
    map_names,
    symprobe::{ProbeSiteKey, ProbeSiteStats},
};

use super::retained::add_probe;
use crate::{
    aggregate::sum_stats,
    collect::{self, CollectError, Cursor, RawMap},
    probes::Probes,
};

/// Site keys looked up and deleted per step.
const TARGET_BUDGET: usize = 4 * 1024;
/// Entries each pass may visit per step (a batch syscall reads 4096): ~10 ms on a loaded
/// 2-CPU machine, so a step never holds the loop up for long.
const PASS_BUDGET: usize = 16 * 1024;
/// Live-table passes start at most this often (a pass over a few hundred thousand live
/// allocations costs ~0.3 s of CPU on a loaded 2-CPU machine) ...
pub const LIVE_PASS_EVERY: Duration = Duration::from_secs(30);
/// ... or this often while the table is more than [`LIVE_URGENT_FILL`] full.
const LIVE_URGENT_EVERY: Duration = Duration::from_secs(5);
const LIVE_URGENT_FILL: f64 = 0.5;
/// Backstop passes over the site, histogram and in-flight tables start at most this often.
const BACKSTOP_EVERY: Duration = Duration::from_secs(20);

/// What becomes of a gone process's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Exited and exported: its final rows go to the registry, then out of the kernel.
    Harvest,
    /// Exited, not exported: deleted.
    Drop,
    /// Running but not selected: the site rows it announced are deleted, nothing else. The
    /// passes leave it alone: it may exec a selected program at any time, whose rows must not
    /// go before the agent has read that exec (and cancelled this).
    Reject,
}

/// Final rows of one process (or program image), as harvested.
#[derive(Debug, Default)]
pub struct Harvest {
    pub rows: Vec<(SiteKey, SiteStats)>,
    /// (log2 bucket, count and bytes) of the libc and Go request-size histograms.
    pub libc_hist: Vec<(u32, GoHistVal)>,
    pub go_hist: Vec<(u32, GoHistVal)>,
    /// Symbol-probe rows (C++/Rust growth, `probe`s): they stay with the pid's current
    /// program image, like the histograms.
    pub probe_rows: Vec<(ProbeSiteKey, ProbeSiteStats)>,
}

/// What one step found and finished.
#[derive(Debug, Default)]
pub struct StepResult {
    /// Rows harvested in this step, by pid (whole processes) ...
    pub pids: HashMap<u32, Harvest>,
    /// ... and by (pid, image) for program images that ended at exec.
    pub images: HashMap<(u32, u32), Harvest>,
    /// Pids and images whose announced rows are all harvested: every such row is in this or
    /// an earlier step's result (a row whose announcement was lost may still come later).
    pub done_pids: Vec<u32>,
    pub done_images: Vec<(u32, u32)>,
    /// Rows deleted from the kernel maps in this step.
    pub deleted: usize,
}

/// One walk over a set of tables.
#[derive(Default)]
struct Pass {
    /// One cursor per table of the pass; `None` when no pass is under way.
    cursors: Option<Vec<Cursor>>,
    started: Option<Instant>,
    /// Pids and images this pass is responsible for (queued before it started).
    pids: HashSet<u32>,
    images: HashSet<(u32, u32)>,
    /// Queued for the next pass.
    queue: (HashSet<u32>, HashSet<(u32, u32)>),
}

impl Pass {
    fn running(&self) -> bool {
        self.cursors.is_some()
    }

    fn queued(&self) -> bool {
        !self.queue.0.is_empty() || !self.queue.1.is_empty()
    }

    fn start(&mut self, tables: usize) {
        self.cursors = Some(vec![Cursor::default(); tables]);
        self.started = Some(Instant::now());
        (self.pids, self.images) = std::mem::take(&mut self.queue);
    }

    fn due(&self, every: Duration) -> bool {
        self.started.is_none_or(|t| t.elapsed() >= every)
    }

    fn needs_pid(&self, pid: u32) -> bool {
        self.pids.contains(&pid) || self.queue.0.contains(&pid)
    }

    fn needs_image(&self, image: (u32, u32)) -> bool {
        self.images.contains(&image) || self.queue.1.contains(&image)
    }
}

/// Work queued by key: a process's or image's announced site rows.
struct Target {
    owner: Owner,
    keys: Vec<SiteKey>,
}

/// The pids and images whose rows are to leave the kernel maps.
#[derive(Default)]
pub struct Sweeper {
    fates: HashMap<u32, Fate>,
    /// Site keys of program images that ended at exec, with their (pid, image).
    image_keys: HashMap<SiteKey, (u32, u32)>,
    images: HashSet<(u32, u32)>,
    targets: VecDeque<Target>,
    /// Walks of the site, histogram and in-flight tables (rows never announced) ...
    backstop: Pass,
    /// ... and of the live-allocation table.
    live: Pass,
    /// Entries of the live table at the end of its last pass ...
    pub live_entries: usize,
    /// ... and counted so far in the current one.
    live_seen: usize,
    orphans: Orphans,
    /// Rows deleted as orphans, for the self-metrics.
    pub orphan_rows: u64,
}

/// Which pids the registry knows (registered, or the agent itself); an unknown pid that is not
/// running is an orphan.
pub type Known<'a> = &'a dyn Fn(u32) -> bool;

/// Pids with rows that the agent never registered and that are gone: a process whose every call
/// overflowed the site table is never announced, and one that forks without exec is seen only
/// by the /proc scan. Suspected at one backstop pass, deleted from the next on if still
/// unknown: by then any record of theirs that was in the ring buffer has been read.
#[derive(Default)]
struct Orphans {
    suspects: HashSet<u32>,
    next: HashSet<u32>,
    /// Whether a pid is gone, asked once per pid and step.
    gone: HashMap<u32, bool>,
}

impl Orphans {
    fn is_orphan(&mut self, pid: u32, known: Known<'_>) -> bool {
        if known(pid) {
            return false;
        }
        let gone = *self
            .gone
            .entry(pid)
            .or_insert_with(|| !std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !gone {
            return false;
        }
        self.next.insert(pid);
        self.suspects.contains(&pid)
    }

    /// The rows of `rows` that belong to orphans.
    fn of<K: Copy>(&mut self, rows: &[K], pid: impl Fn(&K) -> u32, known: Known<'_>) -> Vec<K> {
        rows.iter()
            .filter(|k| self.is_orphan(pid(k), known))
            .copied()
            .collect()
    }
}

impl Sweeper {
    /// Queues `pid`'s rows to leave the kernel maps: `keys` are the site rows it announced
    /// (looked up at once), the tables' passes catch the rest. A later call with another fate
    /// wins (a rejected process that exits becomes `Drop`).
    pub fn pid(&mut self, pid: u32, fate: Fate, keys: impl IntoIterator<Item = SiteKey>) {
        self.fates.insert(pid, fate);
        self.targets.push_back(Target {
            owner: Owner::Pid(pid),
            keys: keys.into_iter().collect(),
        });
        if fate != Fate::Reject {
            self.backstop.queue.0.insert(pid);
            self.live.queue.0.insert(pid);
        }
    }

    /// The fate of `pid` if the passes are to take its rows (not for a rejected process).
    fn swept(&self, pid: u32) -> Option<Fate> {
        self.fates.get(&pid).copied().filter(|f| *f != Fate::Reject)
    }

    /// Queues `key` if its pid's rows are leaving the kernel; whether it was.
    pub fn add_key(&mut self, key: SiteKey) -> bool {
        let pid = key.tgid;
        if !self.fates.contains_key(&pid) {
            return false;
        }
        match self
            .targets
            .iter_mut()
            .rev()
            .find(|t| t.owner == Owner::Pid(pid))
        {
            Some(t) => t.keys.push(key),
            None => self.targets.push_back(Target {
                owner: Owner::Pid(pid),
                keys: vec![key],
            }),
        }
        true
    }

    /// Queues the rows `keys` of `pid`'s program image `image`, which ended at exec.
    pub fn image(&mut self, pid: u32, image: u32, keys: impl IntoIterator<Item = SiteKey>) {
        let keys: Vec<SiteKey> = keys.into_iter().collect();
        for k in &keys {
            self.image_keys.insert(*k, (pid, image));
        }
        self.images.insert((pid, image));
        self.targets.push_back(Target {
            owner: Owner::Image((pid, image)),
            keys,
        });
        self.backstop.queue.1.insert((pid, image));
        self.live.queue.1.insert((pid, image));
    }

    /// A pid that is back (reused by a new process before its rows were swept): stop deleting
    /// rows under it; what is left of the old process mixes with the new one's.
    pub fn cancel(&mut self, pid: u32) {
        if self.fates.remove(&pid).is_some() {
            self.targets
                .retain(|t| !matches!(t.owner, Owner::Pid(p) if p == pid));
            for pass in [&mut self.backstop, &mut self.live] {
                pass.pids.remove(&pid);
                pass.queue.0.remove(&pid);
            }
        }
    }

    /// Whether `pid` has rows queued to leave the kernel.
    pub fn pending(&self, pid: u32) -> bool {
        self.fates.contains_key(&pid)
    }

    /// One bounded step: queued keys first, then a slice of each pass that is due.
    pub fn step(
        &mut self,
        probes: &Probes,
        max_live: u32,
        known: Known<'_>,
    ) -> Result<StepResult, CollectError> {
        let mut out = StepResult::default();
        self.orphans.gone.clear();
        let t0 = Instant::now();
        self.targeted(probes, &mut out)?;
        let t1 = Instant::now();
        // Also with nothing queued: orphans are only found by these passes.
        if !self.backstop.running() && self.backstop.due(BACKSTOP_EVERY) {
            self.backstop.start(7);
        }
        let urgent = self.live_entries as f64 >= LIVE_URGENT_FILL * f64::from(max_live.max(1));
        // Without anything to delete, the pass still measures the table's fill.
        if !self.live.running()
            && (self.live.due(LIVE_PASS_EVERY)
                || (urgent && self.live.queued() && self.live.due(LIVE_URGENT_EVERY)))
        {
            self.live.start(1);
        }
        if self.backstop.running() {
            self.backstop_step(probes, &mut out, known)?;
        }
        let t2 = Instant::now();
        if self.live.running() {
            self.live_step(probes, &mut out, known)?;
        }
        if std::env::var_os("ALLOCWATCH_DEBUG_TIMING").is_some()
            && t0.elapsed() > Duration::from_millis(20)
        {
            crate::say!(
                "allocwatch: debug: sweep: targeted {:.1} ms ({} queued), backstop {:.1} ms, live {:.1} ms, deleted {}",
                (t1 - t0).as_secs_f64() * 1e3,
                self.targets.iter().map(|t| t.keys.len()).sum::<usize>(),
                (t2 - t1).as_secs_f64() * 1e3,
                t2.elapsed().as_secs_f64() * 1e3,
                out.deleted
            );
        }
        Ok(out)
    }

    /// Looks up, harvests and deletes queued keys, up to [`TARGET_BUDGET`].
    fn targeted(&mut self, probes: &Probes, out: &mut StepResult) -> Result<(), CollectError> {
        let mut budget = TARGET_BUDGET;
        // Pids whose announced rows are all out: their symbol-probe rows go in one walk.
        let mut finished: HashMap<u32, Option<Fate>> = HashMap::new();
        while budget > 0 {
            let Some(mut t) = self.targets.pop_front() else {
                break;
            };
            let take = t.keys.len().min(budget);
            let batch: Vec<SiteKey> = t.keys.drain(..take).collect();
            budget -= take.max(1);
            let fate = match t.owner {
                Owner::Pid(pid) => self.fates.get(&pid).copied(),
                Owner::Image(_) => Some(Fate::Harvest),
            };
            let mut values = Vec::new();
            let mut found_all = 0;
            for name in collect::SITE_TABLES {
                let map = RawMap::of::<SiteKey, SiteStats>(collect::map_ref(probes, name)?, name)?;
                let mut found = Vec::with_capacity(batch.len());
                for key in batch.iter().filter(|k| collect::site_table(k) == name) {
                    if map.lookup(key, &mut values)? {
                        found.push(*key);
                        // A key queued with its pid may have turned out to be an exec'd
                        // image's (its exec read since): the image's.
                        let (owner, fate) = match self.image_keys.get(key) {
                            Some(&i) => (Owner::Image(i), Some(Fate::Harvest)),
                            None => (t.owner, fate),
                        };
                        if fate == Some(Fate::Harvest) {
                            out.harvest(owner)
                                .rows
                                .push((*key, sum_stats(values.iter())));
                        }
                    }
                }
                found_all += found.len();
                out.deleted += map.delete(&found)?;
            }
            if found_all != 0 {
                log::debug!("{:?}: {found_all} announced rows out ({fate:?})", t.owner);
            }
            if !t.keys.is_empty() {
                self.targets.push_front(t);
                break;
            }
            // All its announced rows are out: the per-pid tables go now too.
            match t.owner {
                Owner::Pid(pid) => {
                    out.deleted += delete_per_pid(probes, pid, fate, &self.image_keys, out)?;
                    finished.insert(pid, fate);
                    if fate == Some(Fate::Reject) {
                        self.retire_pid(pid);
                        continue;
                    }
                    if fate == Some(Fate::Harvest) {
                        out.done_pids.push(pid);
                    }
                }
                Owner::Image(image) => out.done_images.push(image),
            }
        }
        out.deleted += sweep_probe_rows(probes, &finished, out)?;
        Ok(())
    }

    /// The owner of a site row to take out, if any: a queued image's key, else a queued pid
    /// (an image's rows are its own even when the pid's later rows are dropped).
    fn owner(&self, key: &SiteKey) -> Option<(Owner, Fate)> {
        if let Some(&i) = self.image_keys.get(key) {
            return Some((Owner::Image(i), Fate::Harvest));
        }
        self.swept(key.tgid)
            .map(|fate| (Owner::Pid(key.tgid), fate))
    }

    fn backstop_step(
        &mut self,
        probes: &Probes,
        out: &mut StepResult,
        known: Known<'_>,
    ) -> Result<(), CollectError> {
        let Some(mut cursors) = self.backstop.cursors.take() else {
            return Ok(());
        };
        // The site table and the rows of unknown sites (cursors 0 and 5).
        for (slot, name) in [(0, map_names::SITES), (5, map_names::SPILL)] {
            let map = RawMap::of::<SiteKey, SiteStats>(collect::map_ref(probes, name)?, name)?;
            let mut doomed: Vec<SiteKey> = Vec::new();
            let mut others: Vec<SiteKey> = Vec::new();
            map.scan(
                &mut cursors[slot],
                PASS_BUDGET,
                |k: &SiteKey, v: &[SiteStats]| {
                    let Some((owner, fate)) = self.owner(k) else {
                        others.push(*k);
                        return;
                    };
                    doomed.push(*k);
                    if fate == Fate::Harvest {
                        out.harvest(owner).rows.push((*k, sum_stats(v.iter())));
                    }
                },
            )?;
            let orphans = self.orphans.of(&others, |k| k.tgid, known);
            self.orphan_rows += orphans.len() as u64;
            if log::log_enabled!(log::Level::Debug) {
                let mut by_pid: HashMap<u32, usize> = HashMap::new();
                for k in &doomed {
                    *by_pid.entry(k.tgid).or_default() += 1;
                }
                for k in &orphans {
                    log::debug!("pid {}: orphan site row out", k.tgid);
                }
                for (pid, n) in by_pid {
                    log::debug!("pid {pid}: {n} {name} rows out by the backstop pass");
                }
            }
            doomed.extend(orphans);
            out.deleted += map.delete(&doomed)?;
        }
        // Symbol-probe rows (cursor 6): never announced, so only the targeted step's walk and
        // this pass find them; they stay with the pid, like the histograms.
        {
            let name = map_names::PROBE_SITES;
            let map =
                RawMap::of::<ProbeSiteKey, ProbeSiteStats>(collect::map_ref(probes, name)?, name)?;
            let mut doomed: Vec<ProbeSiteKey> = Vec::new();
            let mut others: Vec<ProbeSiteKey> = Vec::new();
            map.scan(
                &mut cursors[6],
                PASS_BUDGET,
                |k: &ProbeSiteKey, v: &[ProbeSiteStats]| {
                    let Some(fate) = self.swept(k.tgid) else {
                        others.push(*k);
                        return;
                    };
                    doomed.push(*k);
                    if fate == Fate::Harvest {
                        out.harvest(Owner::Pid(k.tgid))
                            .probe_rows
                            .push((*k, sum_probe(v)));
                    }
                },
            )?;
            let orphans = self.orphans.of(&others, |k| k.tgid, known);
            self.orphan_rows += orphans.len() as u64;
            doomed.extend(orphans);
            out.deleted += map.delete(&doomed)?;
        }
        // Size histograms are per pid (an exec'd image's left the maps at its exec, where the
        // kernel has per-CPU lookups: `ImageHist`).
        for (slot, name) in [(1, map_names::LIBC_HIST), (2, map_names::GO_HIST)] {
            let map = RawMap::of::<GoHistKey, GoHistVal>(collect::map_ref(probes, name)?, name)?;
            let mut doomed: Vec<GoHistKey> = Vec::new();
            let mut others: Vec<GoHistKey> = Vec::new();
            map.scan(
                &mut cursors[slot],
                PASS_BUDGET,
                |k: &GoHistKey, v: &[GoHistVal]| {
                    let Some(fate) = self.swept(k.tgid) else {
                        others.push(*k);
                        return;
                    };
                    doomed.push(*k);
                    if fate == Fate::Harvest {
                        let h = out.harvest(Owner::Pid(k.tgid));
                        let bucket = (k.bucket, collect::sum_hist(v));
                        if slot == 1 {
                            h.libc_hist.push(bucket);
                        } else {
                            h.go_hist.push(bucket);
                        }
                    }
                },
            )?;
            let orphans = self.orphans.of(&others, |k| k.tgid, known);
            self.orphan_rows += orphans.len() as u64;
            doomed.extend(orphans);
            out.deleted += map.delete(&doomed)?;
        }
        // Calls in flight when a process died never return (their threads are unknown to us:
        // found by a walk).
        {
            let name = map_names::PENDING;
            let map = RawMap::of::<u64, Pending>(collect::map_ref(probes, name)?, name)?;
            let mut doomed: Vec<u64> = Vec::new();
            let mut others: Vec<u64> = Vec::new();
            map.scan(&mut cursors[3], PASS_BUDGET, |k: &u64, _: &[Pending]| {
                let tgid = (*k >> 32) as u32;
                match self.fates.get(&tgid) {
                    Some(Fate::Reject) => {}
                    Some(_) => doomed.push(*k),
                    None => others.push(*k),
                }
            })?;
            let orphans = self.orphans.of(&others, |k| (*k >> 32) as u32, known);
            doomed.extend(orphans);
            out.deleted += map.delete(&doomed)?;
        }
        // Site budgets of processes whose rows went without a targeted sweep.
        {
            let name = map_names::SITE_BUDGET;
            let map = RawMap::of::<u32, u32>(collect::map_ref(probes, name)?, name)?;
            let mut doomed: Vec<u32> = Vec::new();
            let mut others: Vec<u32> = Vec::new();
            map.scan(
                &mut cursors[4],
                PASS_BUDGET,
                |k: &u32, _: &[u32]| match self.fates.get(k) {
                    Some(Fate::Reject) => {}
                    Some(_) => doomed.push(*k),
                    None => others.push(*k),
                },
            )?;
            doomed.extend(self.orphans.of(&others, |k| *k, known));
            out.deleted += map.delete(&doomed)?;
        }
        if !cursors.iter().all(Cursor::done) {
            self.backstop.cursors = Some(cursors);
            return Ok(());
        }
        self.orphans.suspects = std::mem::take(&mut self.orphans.next);
        for pid in std::mem::take(&mut self.backstop.pids) {
            self.retire_pid(pid);
        }
        for image in std::mem::take(&mut self.backstop.images) {
            self.retire_image(image);
        }
        Ok(())
    }

    fn live_step(
        &mut self,
        probes: &Probes,
        out: &mut StepResult,
        known: Known<'_>,
    ) -> Result<(), CollectError> {
        let Some(mut cursors) = self.live.cursors.take() else {
            return Ok(());
        };
        let name = map_names::LIVE;
        let map = RawMap::of::<LiveKey, LiveAlloc>(collect::map_ref(probes, name)?, name)?;
        let mut doomed: Vec<LiveKey> = Vec::new();
        let mut others: Vec<LiveKey> = Vec::new();
        let mut seen = 0;
        map.scan(
            &mut cursors[0],
            2 * PASS_BUDGET,
            |k: &LiveKey, a: &[LiveAlloc]| {
                seen += 1;
                if self.swept(k.tgid).is_some() || self.image_keys.contains_key(&a[0].site) {
                    doomed.push(*k);
                } else {
                    others.push(*k);
                }
            },
        )?;
        let orphans = self.orphans.of(&others, |k| k.tgid, known);
        self.orphan_rows += orphans.len() as u64;
        doomed.extend(orphans);
        let deleted = map.delete(&doomed)?;
        out.deleted += deleted;
        self.live_seen += seen - deleted.min(seen);
        if !cursors[0].done() {
            self.live.cursors = Some(cursors);
            return Ok(());
        }
        self.live_entries = std::mem::take(&mut self.live_seen);
        for pid in std::mem::take(&mut self.live.pids) {
            self.retire_pid(pid);
        }
        for image in std::mem::take(&mut self.live.images) {
            self.retire_image(image);
        }
        Ok(())
    }

    /// Forgets `pid` once no pass and no queued key needs it.
    fn retire_pid(&mut self, pid: u32) {
        let targeted = self
            .targets
            .iter()
            .any(|t| matches!(t.owner, Owner::Pid(p) if p == pid));
        if !targeted && !self.backstop.needs_pid(pid) && !self.live.needs_pid(pid) {
            self.fates.remove(&pid);
        }
    }

    fn retire_image(&mut self, image: (u32, u32)) {
        let targeted = self
            .targets
            .iter()
            .any(|t| matches!(t.owner, Owner::Image(i) if i == image));
        if !targeted
            && !self.backstop.needs_image(image)
            && !self.live.needs_image(image)
            && self.images.remove(&image)
        {
            self.image_keys.retain(|_, i| *i != image);
        }
    }
}

impl StepResult {
    fn harvest(&mut self, owner: Owner) -> &mut Harvest {
        match owner {
            Owner::Pid(pid) => self.pids.entry(pid).or_default(),
            Owner::Image(i) => self.images.entry(i).or_default(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Pid(u32),
    Image((u32, u32)),
}

/// Per-CPU values of a symbol-probe row, summed.
fn sum_probe(v: &[ProbeSiteStats]) -> ProbeSiteStats {
    let mut sum = ProbeSiteStats::default();
    for x in v {
        add_probe(&mut sum, x);
    }
    sum
}

/// Takes the symbol-probe rows of `pids` (with their fates) out of their table in one walk:
/// their keys (stacks, callers) are never announced. Those of exported processes are
/// harvested, with the pid (a rejected process's are deleted: it is denied from now on).
fn sweep_probe_rows(
    probes: &Probes,
    pids: &HashMap<u32, Option<Fate>>,
    out: &mut StepResult,
) -> Result<usize, CollectError> {
    if pids.is_empty() {
        return Ok(0);
    }
    let name = map_names::PROBE_SITES;
    let map = RawMap::of::<ProbeSiteKey, ProbeSiteStats>(collect::map_ref(probes, name)?, name)?;
    let mut doomed: Vec<ProbeSiteKey> = Vec::new();
    map.scan(
        &mut Cursor::default(),
        usize::MAX,
        |k: &ProbeSiteKey, v: &[ProbeSiteStats]| {
            let Some(fate) = pids.get(&k.tgid) else {
                return;
            };
            doomed.push(*k);
            if *fate == Some(Fate::Harvest) {
                out.harvest(Owner::Pid(k.tgid))
                    .probe_rows
                    .push((*k, sum_probe(v)));
            }
        },
    )?;
    if !doomed.is_empty() {
        log::debug!("{} symbol-probe rows out", doomed.len());
    }
    Ok(map.delete(&doomed)?)
}

/// Rows keyed by the pid: its rows of unknown sites and size-histogram buckets (harvested),
/// the Go process table and stop-the-world state. The unknown sites' rows are looked up by
/// every API, announced or not (one record lost to a full ring buffer would otherwise leave a
/// row to the backstop pass); those taken already by their announced key are not found again.
fn delete_per_pid(
    probes: &Probes,
    pid: u32,
    fate: Option<Fate>,
    image_keys: &HashMap<SiteKey, (u32, u32)>,
    out: &mut StepResult,
) -> Result<usize, CollectError> {
    let mut n = 0;
    {
        let mut values = Vec::new();
        let name = map_names::SPILL;
        let map = RawMap::of::<SiteKey, SiteStats>(collect::map_ref(probes, name)?, name)?;
        let mut found = Vec::new();
        for api in 0..API_COUNT as u32 {
            let key = SiteKey::spill(pid, api);
            if map.lookup(&key, &mut values)? {
                found.push(key);
                // An exec'd image's row, if announced as its: the image's.
                let (owner, fate) = match image_keys.get(&key) {
                    Some(&i) => (Owner::Image(i), Some(Fate::Harvest)),
                    None => (Owner::Pid(pid), fate),
                };
                if fate == Some(Fate::Harvest) {
                    out.harvest(owner)
                        .rows
                        .push((key, sum_stats(values.iter())));
                }
            }
        }
        n += map.delete(&found)?;
    }
    let mut values = Vec::new();
    for (libc, name) in [(true, map_names::LIBC_HIST), (false, map_names::GO_HIST)] {
        let map = RawMap::of::<GoHistKey, GoHistVal>(collect::map_ref(probes, name)?, name)?;
        let mut found = Vec::new();
        for bucket in 0..GO_HIST_BUCKETS {
            let key = GoHistKey { tgid: pid, bucket };
            if map.lookup(&key, &mut values)? {
                found.push(key);
                if fate == Some(Fate::Harvest) {
                    let h = out.harvest(Owner::Pid(pid));
                    let v = (bucket, collect::sum_hist(&values));
                    if libc {
                        h.libc_hist.push(v);
                    } else {
                        h.go_hist.push(v);
                    }
                }
            }
        }
        n += map.delete(&found)?;
    }
    let name = map_names::GO_PROCS;
    n += RawMap::of::<u32, GoProc>(collect::map_ref(probes, name)?, name)?.delete(&[pid])?;
    let name = map_names::SITE_BUDGET;
    n += RawMap::of::<u32, u32>(collect::map_ref(probes, name)?, name)?.delete(&[pid])?;
    let name = map_names::GO_STW;
    n += RawMap::of::<u32, StwState>(collect::map_ref(probes, name)?, name)?.delete(&[pid])?;
    Ok(n)
}
