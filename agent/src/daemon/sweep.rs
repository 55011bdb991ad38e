//! Taking the rows of processes that are gone out of the kernel maps, a bounded number of
//! entries per step, so that the daemon loop never stalls on it.
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
//! Each table is walked in passes with batch syscalls (`collect::RawMap`); a pid is done with a
//! table once a pass that *started after* it was queued has finished. The live table is the
//! largest and its rows of dead processes only take room, so its passes start at most every
//! [`LIVE_PASS_EVERY`] (sooner when it fills up).

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use allocwatch_common::{
    go::{GoHistKey, GoHistVal, GoProc, StwState},
    libc::{LiveAlloc, LiveKey, Pending, SiteKey, SiteStats},
    map_names,
};
use aya::Ebpf;

use crate::{
    aggregate::sum_stats,
    collect::{self, CollectError, Cursor, RawMap},
};

/// Entries each table's pass may visit per step (a batch syscall reads 4096).
const STEP_BUDGET: usize = 64 * 1024;
/// Live-table passes start at most this often while its fill is below [`LIVE_URGENT_FILL`].
pub const LIVE_PASS_EVERY: Duration = Duration::from_secs(5);
const LIVE_URGENT_FILL: f64 = 0.5;
/// A live-table pass at least this often, to measure its fill.
const LIVE_CENSUS_EVERY: Duration = Duration::from_secs(30);
/// Harvest passes start at most this often (each one takes every pid queued since the last).
const HARVEST_PASS_EVERY: Duration = Duration::from_millis(250);

/// What becomes of a gone process's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Exited and exported: its final rows go to the registry, then out of the kernel.
    Harvest,
    /// Exited, not exported: deleted.
    Drop,
    /// Running but not selected: its rows are deleted; its in-flight calls are left alone
    /// (their returns must still find them).
    Reject,
}

/// Final rows of one process (or program image), as harvested.
#[derive(Debug, Default)]
pub struct Harvest {
    pub rows: Vec<(SiteKey, SiteStats)>,
    /// (log2 bucket, count and bytes) of the libc and Go request-size histograms.
    pub libc_hist: Vec<(u32, GoHistVal)>,
    pub go_hist: Vec<(u32, GoHistVal)>,
}

/// What one step found and finished.
#[derive(Debug, Default)]
pub struct StepResult {
    /// Rows harvested in this step, by pid (whole processes) ...
    pub pids: HashMap<u32, Harvest>,
    /// ... and by (pid, image) for program images that ended at exec.
    pub images: HashMap<(u32, u32), Harvest>,
    /// Pids and images whose harvest is complete: every row they had is in this or an earlier
    /// step's result.
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
}

impl Pass {
    fn running(&self) -> bool {
        self.cursors.is_some()
    }

    fn start(&mut self, tables: usize, pids: HashSet<u32>, images: HashSet<(u32, u32)>) {
        self.cursors = Some(vec![Cursor::default(); tables]);
        self.started = Some(Instant::now());
        self.pids = pids;
        self.images = images;
    }

    fn due(&self, every: Duration) -> bool {
        self.started.is_none_or(|t| t.elapsed() >= every)
    }
}

/// The pids and images whose rows are to leave the kernel maps.
#[derive(Default)]
pub struct Sweeper {
    fates: HashMap<u32, Fate>,
    /// Site keys of program images that ended at exec, with their (pid, image).
    image_keys: HashMap<SiteKey, (u32, u32)>,
    images: HashMap<(u32, u32), usize>,
    /// Queued since the current harvest / live pass started.
    harvest_queue: (HashSet<u32>, HashSet<(u32, u32)>),
    live_queue: (HashSet<u32>, HashSet<(u32, u32)>),
    harvest: Pass,
    live: Pass,
    /// Entries of the live table at the end of its last pass ...
    pub live_entries: usize,
    /// ... and counted so far in the current one.
    live_seen: usize,
}

impl Sweeper {
    /// Queues `pid`'s rows to leave the kernel maps (a later call with another fate wins: a
    /// rejected process that exits becomes `Drop`).
    pub fn pid(&mut self, pid: u32, fate: Fate) {
        self.fates.insert(pid, fate);
        self.harvest_queue.0.insert(pid);
        self.live_queue.0.insert(pid);
    }

    /// Queues the rows `keys` of `pid`'s program image `image`, which ended at exec.
    pub fn image(&mut self, pid: u32, image: u32, keys: impl IntoIterator<Item = SiteKey>) {
        let mut n = 0;
        for k in keys {
            self.image_keys.insert(k, (pid, image));
            n += 1;
        }
        self.images.insert((pid, image), n);
        self.harvest_queue.1.insert((pid, image));
        self.live_queue.1.insert((pid, image));
    }

    /// A pid that is back (reused by a new process before its rows were swept): stop deleting
    /// rows under it; what is left of the old process mixes with the new one's.
    pub fn cancel(&mut self, pid: u32) {
        if self.fates.remove(&pid).is_some() {
            for q in [
                &mut self.harvest_queue.0,
                &mut self.live_queue.0,
                &mut self.harvest.pids,
                &mut self.live.pids,
            ] {
                q.remove(&pid);
            }
        }
    }

    /// Whether `pid` has rows queued to leave the kernel.
    pub fn pending(&self, pid: u32) -> bool {
        self.fates.contains_key(&pid)
    }

    /// One bounded step of the harvest and live passes.
    pub fn step(&mut self, ebpf: &mut Ebpf, max_live: u32) -> Result<StepResult, CollectError> {
        let mut out = StepResult::default();
        if !self.harvest.running()
            && (!self.harvest_queue.0.is_empty() || !self.harvest_queue.1.is_empty())
            && self.harvest.due(HARVEST_PASS_EVERY)
        {
            let (pids, images) = std::mem::take(&mut self.harvest_queue);
            self.harvest.start(4, pids, images);
        }
        let urgent = self.live_entries as f64 >= LIVE_URGENT_FILL * f64::from(max_live.max(1));
        let queued = !self.live_queue.0.is_empty() || !self.live_queue.1.is_empty();
        // Without anything to delete, a pass now and then still measures the table's fill.
        if !self.live.running()
            && ((queued && (urgent || self.live.due(LIVE_PASS_EVERY)))
                || self.live.due(LIVE_CENSUS_EVERY))
        {
            let (pids, images) = std::mem::take(&mut self.live_queue);
            self.live.start(1, pids, images);
        }
        if self.harvest.running() {
            self.harvest_step(ebpf, &mut out)?;
        }
        if self.live.running() {
            self.live_step(ebpf, &mut out)?;
        }
        Ok(out)
    }

    /// The owner of a site row to take out, if any: a queued pid, or a queued image's key.
    /// An image's rows are its own even when the pid's later rows are dropped.
    fn owner(&self, key: &SiteKey) -> Option<Owner> {
        if let Some(&i) = self.image_keys.get(key) {
            return Some(Owner::Image(i));
        }
        self.fates
            .get(&key.tgid)
            .map(|&fate| Owner::Pid(key.tgid, fate))
    }

    fn harvest_step(&mut self, ebpf: &mut Ebpf, out: &mut StepResult) -> Result<(), CollectError> {
        let Some(mut cursors) = self.harvest.cursors.take() else {
            return Ok(());
        };
        // Site rows: final values of the queued, then deleted.
        let mut doomed: Vec<SiteKey> = Vec::new();
        {
            let name = map_names::SITES;
            let map = RawMap::of::<SiteKey, SiteStats>(collect::map_ref(ebpf, name)?, name)?;
            map.scan(
                &mut cursors[0],
                STEP_BUDGET,
                |k: &SiteKey, v: &[SiteStats]| {
                    let Some(owner) = self.owner(k) else { return };
                    doomed.push(*k);
                    let row = (*k, sum_stats(v.iter()));
                    match owner {
                        Owner::Pid(pid, Fate::Harvest) => {
                            out.pids.entry(pid).or_default().rows.push(row)
                        }
                        Owner::Pid(..) => {}
                        Owner::Image(i) => out.images.entry(i).or_default().rows.push(row),
                    }
                },
            )?;
            out.deleted += map.delete(&doomed)?;
        }
        // Size histograms are per pid (an exec'd image's stay with the pid).
        for (slot, name) in [(1, map_names::LIBC_HIST), (2, map_names::GO_HIST)] {
            let map = RawMap::of::<GoHistKey, GoHistVal>(collect::map_ref(ebpf, name)?, name)?;
            let mut doomed: Vec<GoHistKey> = Vec::new();
            map.scan(
                &mut cursors[slot],
                STEP_BUDGET,
                |k: &GoHistKey, v: &[GoHistVal]| {
                    let Some(&fate) = self.fates.get(&k.tgid) else {
                        return;
                    };
                    doomed.push(*k);
                    if fate == Fate::Harvest {
                        let h = out.pids.entry(k.tgid).or_default();
                        let bucket = (k.bucket, collect::sum_hist(v));
                        if slot == 1 {
                            h.libc_hist.push(bucket);
                        } else {
                            h.go_hist.push(bucket);
                        }
                    }
                },
            )?;
            out.deleted += map.delete(&doomed)?;
        }
        // Calls in flight when a process died never return.
        {
            let name = map_names::PENDING;
            let map = RawMap::of::<u64, Pending>(collect::map_ref(ebpf, name)?, name)?;
            let mut doomed: Vec<u64> = Vec::new();
            map.scan(&mut cursors[3], STEP_BUDGET, |k: &u64, _: &[Pending]| {
                let tgid = (*k >> 32) as u32;
                if self.fates.get(&tgid).is_some_and(|f| *f != Fate::Reject) {
                    doomed.push(*k);
                }
            })?;
            out.deleted += map.delete(&doomed)?;
        }
        if !cursors.iter().all(Cursor::done) {
            self.harvest.cursors = Some(cursors);
            return Ok(());
        }
        // Pass complete: its pids' per-pid rows go, and they are done unless the live pass
        // still owes them.
        for pid in std::mem::take(&mut self.harvest.pids) {
            out.deleted += delete_per_pid(ebpf, pid)?;
            if self.fates.get(&pid) == Some(&Fate::Harvest) {
                out.done_pids.push(pid);
            }
            self.retire_pid(pid);
        }
        for image in std::mem::take(&mut self.harvest.images) {
            out.done_images.push(image);
            self.retire_image(image);
        }
        Ok(())
    }

    fn live_step(&mut self, ebpf: &mut Ebpf, out: &mut StepResult) -> Result<(), CollectError> {
        let Some(mut cursors) = self.live.cursors.take() else {
            return Ok(());
        };
        let name = map_names::LIVE;
        let map = RawMap::of::<LiveKey, LiveAlloc>(collect::map_ref(ebpf, name)?, name)?;
        let mut doomed: Vec<LiveKey> = Vec::new();
        let mut seen = 0;
        map.scan(
            &mut cursors[0],
            2 * STEP_BUDGET,
            |k: &LiveKey, a: &[LiveAlloc]| {
                seen += 1;
                if self.fates.contains_key(&k.tgid) || self.image_keys.contains_key(&a[0].site) {
                    doomed.push(*k);
                }
            },
        )?;
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

    /// Forgets `pid` once neither pass nor queue needs it.
    fn retire_pid(&mut self, pid: u32) {
        let needed = [
            &self.harvest_queue.0,
            &self.live_queue.0,
            &self.harvest.pids,
            &self.live.pids,
        ]
        .iter()
        .any(|q| q.contains(&pid));
        if !needed {
            self.fates.remove(&pid);
        }
    }

    fn retire_image(&mut self, image: (u32, u32)) {
        let needed = [
            &self.harvest_queue.1,
            &self.live_queue.1,
            &self.harvest.images,
            &self.live.images,
        ]
        .iter()
        .any(|q| q.contains(&image));
        if !needed && self.images.remove(&image).is_some() {
            self.image_keys.retain(|_, i| *i != image);
        }
    }
}

enum Owner {
    Pid(u32, Fate),
    Image((u32, u32)),
}

/// Rows keyed by the pid alone: the Go process table and stop-the-world state.
fn delete_per_pid(ebpf: &mut Ebpf, pid: u32) -> Result<usize, CollectError> {
    let mut n = 0;
    let name = map_names::GO_PROCS;
    n += RawMap::of::<u32, GoProc>(collect::map_ref(ebpf, name)?, name)?.delete(&[pid])?;
    let name = map_names::GO_STW;
    n += RawMap::of::<u32, StwState>(collect::map_ref(ebpf, name)?, name)?.delete(&[pid])?;
    Ok(n)
}
