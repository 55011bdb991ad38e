//! The processes the daemon traces: discovery from /proc, selection, attaching once per
//! distinct file (device + inode), exit and expiry.
//!
//! The kernel filter is always a denylist: a process is recorded from its first call, before
//! the agent has seen it, so that a selected program that lives less than a millisecond is
//! counted exactly. A process the selection rejects is denied as soon as it is classified (at
//! its exec event, its first new call site, or the /proc scan, whichever comes first), and what
//! it recorded before that is deleted from the kernel maps. Only registered processes
//! (`procs`) are exported, so an unclassified or rejected process's rows never reach a scrape.

use std::{
    collections::{HashMap, HashSet},
    fs,
    sync::Arc,
    time::{Duration, Instant},
};

use allocwatch_common::libc::{Api, SiteKey};

use super::{
    retained::{RETAINED_SITES, Retained},
    select::{Candidate, Selector},
    sweep::{Fate, StepResult, Sweeper},
};
use crate::{
    frames::FrameCache,
    gostate::GoState,
    k8s::{cgroup, pods::PodCache, watch::PodUpdate},
    probes::Probes,
    procfs,
    serve::model::ProcessLabels,
    symbolize::SymbolizerHandle,
    target::{
        go::{GoProbeSet, GoTarget},
        maps::{MapEntry, read_maps},
        registry::{AttachFailure, Attacher as _, Kind, LOADERS, ProcessFiles, Target, Targets},
    },
};

/// One traced process.
pub struct Proc {
    pub labels: ProcessLabels,
    /// Container and pod from its cgroup, to name it when pod metadata arrives.
    pub container: cgroup::ContainerRef,
    /// Start time (clock ticks since boot, /proc/<pid>/stat field 22): tells pid reuse apart.
    pub start_time: u64,
    pub exited_at: Option<Instant>,
    pub go: Option<GoState>,
    /// The APIs its libc probes under their own address (not the aliases counted as another
    /// API); `None` while no libc is known (a static Go program, or not mapped yet).
    pub libc_apis: Option<Vec<Api>>,
    /// Its final rows once it is gone (harvested from the kernel maps).
    pub retained: Retained,
}

/// A program image of a process that ended at `exec`: an exited process of its own, under the
/// identity it had. Its kernel rows are final (the address space that made them is gone) and
/// are told apart from the next image's by the site keys it announced before the exec record
/// (the ring buffer keeps one process's records in order).
pub struct PastImage {
    pub image: u32,
    pub proc: Proc,
    pub keys: HashSet<SiteKey>,
    /// False for an image the selection skipped: its rows are only kept out of the next
    /// image's.
    pub exported: bool,
    /// Its final rows, harvested from the kernel maps.
    pub retained: Retained,
}

/// The site keys a process announced since its last exec, and the comm they were made under.
#[derive(Default)]
struct ImageSites {
    comm: String,
    keys: HashSet<SiteKey>,
}

/// A gone process (`image` `None`) or exec'd program image due to leave the registry.
#[derive(Clone, Copy, Debug)]
pub struct Departure {
    pub pid: u32,
    pub image: Option<u32>,
    /// False for an image the selection skipped: it leaves without a trace.
    pub exported: bool,
    pub exited_at: Instant,
}

/// Scans that look again for the libc of a process registered before it was mapped.
const LIBC_RETRIES: u8 = 4;

pub struct Registry {
    selector: Selector,
    ttl: Duration,
    pub procs: HashMap<u32, Proc>,
    /// Processes looked at and not selected (pid, start time).
    ignored: HashSet<(u32, u64)>,
    /// The pids of `ignored`, for the event path (no /proc read per event).
    ignored_pids: HashSet<u32>,
    /// The files probed, each analysed and attached once for all processes.
    pub targets: Targets,
    /// Processes whose memory map showed no libc when they were registered (an exec is read
    /// before ld.so has mapped the libraries): looked at again by the next scans, up to
    /// [`LIBC_RETRIES`] times, so that a libc file never seen before gets its probes.
    libc_retry: HashMap<u32, u8>,
    pub pods: PodCache,
    /// The path each process last exec'd (from the exec tracepoint), for processes that exit
    /// before /proc is read; dropped with the pid.
    exec_paths: HashMap<u32, String>,
    /// Per pid: the sites of its current program image, from its new-site records.
    image_sites: HashMap<u32, ImageSites>,
    /// Per pid: its images that ended at exec, oldest first, until their TTL.
    pub past: HashMap<u32, Vec<PastImage>>,
    /// Per pid: the number of its current image (0 before its first exec).
    images: HashMap<u32, u32>,
    /// Rejected processes in the kernel's denylist (besides the agent itself); removed when
    /// the process exits or execs.
    denied: HashSet<u32>,
    /// Processes that recorded rows and are not selected: their rows are deleted at the next
    /// scan (one pass over the maps for all of them).
    to_forget: HashSet<u32>,
    /// Takes the rows of gone and rejected processes out of the kernel maps.
    pub sweeper: Sweeper,
    /// Site rows kept per gone process ([`RETAINED_SITES`] × `top_k`).
    retain_sites: usize,
    self_pid: u32,
}

impl Registry {
    pub fn new(selector: Selector, go_probes: GoProbeSet, ttl: Duration, top_k: usize) -> Self {
        Self {
            selector,
            ttl,
            procs: HashMap::new(),
            ignored: HashSet::new(),
            ignored_pids: HashSet::new(),
            targets: Targets::new(go_probes, None),
            libc_retry: HashMap::new(),
            pods: PodCache::new(),
            exec_paths: HashMap::new(),
            image_sites: HashMap::new(),
            past: HashMap::new(),
            images: HashMap::new(),
            denied: HashSet::new(),
            to_forget: HashSet::new(),
            sweeper: Sweeper::default(),
            retain_sites: RETAINED_SITES * top_k.max(1),
            self_pid: std::process::id(),
        }
    }

    /// One pass over /proc: new processes are examined (and attached), vanished ones marked
    /// exited (their rows are harvested from the kernel maps by the sweeper), expired ones
    /// forgotten. Bounded: no kernel map is walked here.
    pub fn scan(
        &mut self,
        probes: &mut Probes,
        symbolizer: &SymbolizerHandle,
        frames: &mut FrameCache,
    ) {
        let now = Instant::now();
        let mut seen = HashSet::new();
        if let Ok(dir) = fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                seen.insert(pid);
                self.ensure(pid, probes, symbolizer);
            }
        }
        self.retry_libc(&seen, probes);
        for (pid, p) in &mut self.procs {
            if p.exited_at.is_none() && !seen.contains(pid) {
                p.exited_at = Some(now);
                // The keys stay noted: an exec read late still splits them off (`exec_seen`).
                let keys = self.image_sites.get(pid).map(|s| s.keys.clone());
                self.sweeper
                    .pid(*pid, Fate::Harvest, keys.unwrap_or_default());
            }
        }
        let expired: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| {
                p.exited_at
                    .is_some_and(|t| now.duration_since(t) >= self.ttl)
            })
            .map(|(pid, _)| *pid)
            .collect();
        for images in self.past.values_mut() {
            images.retain(|i| {
                i.proc
                    .exited_at
                    .is_none_or(|t| now.duration_since(t) < self.ttl)
            });
        }
        let procs = &self.procs;
        self.past.retain(|pid, images| {
            let keep = !images.is_empty();
            if !keep && !procs.contains_key(pid) {
                frames.forget(*pid);
                symbolizer.forget(*pid);
            }
            keep
        });
        for pid in expired {
            self.procs.remove(&pid);
            self.past.remove(&pid);
            self.images.remove(&pid);
            self.image_sites.remove(&pid);
            frames.forget(pid);
            symbolizer.forget(pid);
            // Expired before its harvest finished: what is left goes unread.
            if self.sweeper.pending(pid) {
                self.sweeper.pid(pid, Fate::Drop, []);
            }
        }
        self.image_sites
            .retain(|pid, _| seen.contains(pid) || self.procs.contains_key(pid));
        self.ignored.retain(|(pid, _)| seen.contains(pid));
        self.ignored_pids = self.ignored.iter().map(|(pid, _)| *pid).collect();
        self.exec_paths
            .retain(|pid, _| seen.contains(pid) || self.procs.contains_key(pid));
        // Denied processes that exited: their entries make room (a reused pid starts traced).
        let gone: Vec<u32> = self
            .denied
            .iter()
            .copied()
            .filter(|pid| !seen.contains(pid))
            .collect();
        for pid in gone {
            self.undeny(pid, probes);
        }
        for pid in forgettable(&mut self.to_forget, &self.procs) {
            // An earlier image still exported keeps its named sites.
            if !self.past.contains_key(&pid) {
                frames.forget(pid);
                symbolizer.forget(pid);
            }
            let fate = if seen.contains(&pid) {
                Fate::Reject
            } else {
                Fate::Drop
            };
            log::debug!("pid {pid}: its rows go ({fate:?})");
            let keys = self.image_sites.remove(&pid).unwrap_or_default().keys;
            self.sweeper.pid(pid, fate, keys);
        }
    }

    /// One bounded step of the sweeper; the rows it harvested go to their processes, and
    /// those whose harvest is complete are cut down to what can be exported.
    pub async fn sweep(
        &mut self,
        probes: &mut Probes,
        frames: &mut FrameCache,
        symbolizer: &SymbolizerHandle,
        max_live: u32,
    ) -> anyhow::Result<usize> {
        let StepResult {
            pids,
            images,
            done_pids,
            done_images,
            deleted,
        } = {
            let (procs, past, me) = (&self.procs, &self.past, self.self_pid);
            let known = |pid: u32| pid == me || procs.contains_key(&pid) || past.contains_key(&pid);
            self.sweeper.step(probes, max_live, &known)?
        };
        for (pid, h) in pids {
            if let Some(p) = self.procs.get_mut(&pid).filter(|p| p.exited_at.is_some()) {
                p.retained.absorb(h);
            }
        }
        for ((pid, image), h) in images {
            if let Some(i) = self.past_image_mut(pid, image) {
                i.retained.absorb(h);
            }
        }
        let keep = self.retain_sites;
        for pid in done_pids {
            let Some(p) = self.procs.get_mut(&pid).filter(|p| p.exited_at.is_some()) else {
                continue;
            };
            let folded = p.retained.compact(keep);
            frames.forget_chains(pid, folded.iter().map(|k| (k.stack_id, k.ret_addr)));
            if let Some(go) = &mut p.go {
                let folded = go.compact(keep);
                frames.forget_chains(pid, folded.iter().map(|k| (k.stack_id, k.ret_addr)));
            }
            // Name what is kept now, while the raw stacks are at hand.
            for (k, _) in &p.retained.rows {
                frames
                    .frames(probes, symbolizer, pid, k.stack_id, k.ret_addr)
                    .await?;
            }
            if let Some(go) = &p.go {
                for k in go.sites.keys() {
                    frames
                        .frames(probes, symbolizer, pid, k.stack_id, k.ret_addr)
                        .await?;
                }
            }
            // Its earlier images' rows too: their raw stacks go with the process's.
            for i in self.past.get(&pid).into_iter().flatten() {
                for (k, _) in &i.retained.rows {
                    frames
                        .frames(probes, symbolizer, pid, k.stack_id, k.ret_addr)
                        .await?;
                }
            }
            frames.forget_raw(pid);
        }
        for (pid, image) in done_images {
            let Some(i) = self.past_image_mut(pid, image) else {
                continue;
            };
            let folded = i.retained.compact(keep);
            frames.forget_chains(pid, folded.iter().map(|k| (k.stack_id, k.ret_addr)));
            for (k, _) in &i.retained.rows {
                frames
                    .frames(probes, symbolizer, pid, k.stack_id, k.ret_addr)
                    .await?;
            }
            // None of its rows is in the kernel any more: a row made at the same key from now
            // on is the running image's.
            i.keys = HashSet::new();
        }
        Ok(deleted)
    }

    /// Gone processes and exec'd images whose harvest is complete and that exited at least
    /// `after` ago: due to leave with their final values (`Exporter::depart`), so that the
    /// agent keeps no per-process detail of a node's churn for the whole TTL. Images not
    /// exported are listed too (to be dropped).
    pub fn departures(&self, now: Instant, after: Duration) -> Vec<Departure> {
        let due = |p: &Proc| p.exited_at.is_some_and(|t| now.duration_since(t) >= after);
        let mut out: Vec<Departure> = self
            .procs
            .iter()
            .filter(|(_, p)| due(p) && p.retained.complete)
            .map(|(&pid, p)| Departure {
                pid,
                image: None,
                exported: true,
                exited_at: p.exited_at.unwrap_or(now),
            })
            .collect();
        for (&pid, images) in &self.past {
            for i in images {
                if due(&i.proc) && (i.retained.complete || !i.exported) {
                    out.push(Departure {
                        pid,
                        image: Some(i.image),
                        exported: i.exported,
                        exited_at: i.proc.exited_at.unwrap_or(now),
                    });
                }
            }
        }
        out
    }

    /// Forgets a departed process or image.
    pub fn remove_departed(
        &mut self,
        d: &Departure,
        frames: &mut FrameCache,
        symbolizer: &SymbolizerHandle,
    ) {
        match d.image {
            None => {
                self.procs.remove(&d.pid);
                self.image_sites.remove(&d.pid);
            }
            Some(n) => {
                if let Some(v) = self.past.get_mut(&d.pid) {
                    v.retain(|i| i.image != n);
                    if v.is_empty() {
                        self.past.remove(&d.pid);
                    }
                }
            }
        }
        if !self.procs.contains_key(&d.pid) && !self.past.contains_key(&d.pid) {
            frames.forget(d.pid);
            symbolizer.forget(d.pid);
        }
    }

    fn past_image_mut(&mut self, pid: u32, image: u32) -> Option<&mut PastImage> {
        self.past
            .get_mut(&pid)?
            .iter_mut()
            .find(|i| i.image == image)
    }

    /// Pids that have rows in the kernel maps and are not exported (from a scrape): those of
    /// rejected or vanished processes are deleted at the next scan; those of running processes
    /// not classified yet wait for the scan to classify them.
    pub fn unexported(&mut self, pids: impl IntoIterator<Item = u32>) {
        for pid in pids {
            if self.procs.contains_key(&pid) {
                continue;
            }
            if self.ignored_pids.contains(&pid) || procfs::start_time(pid).is_none() {
                log::debug!("pid {pid}: rows of a rejected or gone process not registered");
                self.to_forget.insert(pid);
            }
        }
    }

    /// Entries of the kernel's denylist: the agent and the rejected processes.
    pub fn denylist_len(&self) -> usize {
        self.denied.len() + 1
    }

    /// Adds a rejected process to the kernel's denylist for the program of exec stamp
    /// `stamp`; a failure (a full map) is counted.
    fn deny(&mut self, pid: u32, stamp: u64, probes: &mut Probes) {
        match probes.set_listed(pid, Some(stamp)) {
            Ok(()) => {
                self.denied.insert(pid);
            }
            Err(e) => {
                // It stays traced: its rows are deleted as they are announced, never exported.
                let why = match Probes::failure(&e) {
                    f if f.is_full() => AttachFailure::DenylistFull,
                    f => f,
                };
                log::warn!("denying pid {pid}: {e}");
                self.targets.failed(why);
            }
        }
    }

    /// Takes `pid` off the denylist, if it is on it.
    fn undeny(&mut self, pid: u32, probes: &mut Probes) {
        if self.denied.remove(&pid) {
            let _ = probes.set_listed(pid, None);
        }
    }

    /// Applies a pod change from the API and renames the processes it concerns.
    pub fn apply_pod(&mut self, update: PodUpdate) {
        match update {
            PodUpdate::Upsert(pod) => {
                if let Err(e) = self.pods.upsert(&pod) {
                    log::debug!("ignoring a pod: {e}");
                }
            }
            PodUpdate::Remove(uid) => self.pods.remove(&uid),
        }
        for p in self.procs.values_mut() {
            if p.container.is_empty() {
                continue;
            }
            if let Some(meta) = self.pods.lookup(&p.container) {
                p.labels.namespace = meta.namespace;
                p.labels.pod = meta.pod;
                p.labels.container = meta.container_name.unwrap_or_default();
            }
        }
    }

    /// Like [`Self::ensure`] for a process known from its events: one that already exited is
    /// still registered (as exited), named by the comm the probe recorded, so its counts are
    /// exported with a name instead of vanishing.
    pub fn ensure_seen(
        &mut self,
        pid: u32,
        comm: &[u8; 16],
        probes: &mut Probes,
        symbolizer: &SymbolizerHandle,
    ) {
        // Events come by the thousand on a busy node: known processes cost no /proc read.
        if self.procs.contains_key(&pid) {
            return;
        }
        if self.ignored_pids.contains(&pid) {
            // Recorded before it was denied (or the denylist is full).
            self.to_forget.insert(pid);
            return;
        }
        self.ensure(pid, probes, symbolizer);
        if self.procs.contains_key(&pid) || pid == self.self_pid {
            return;
        }
        // It has rows: unless it is selected below, they go.
        self.to_forget.insert(pid);
        let gone = procfs::is_ending(pid);
        if !gone {
            return;
        }
        // Exited before /proc was read: classified by what the probe saw (its comm, the path of
        // its exec), and its cgroup if it is a zombie still; with the cgroup unknown, cgroup and
        // namespace rules do not match it.
        let comm = comm_text(comm);
        let exe = self.exec_paths.get(&pid).cloned().unwrap_or_default();
        let cgroup_text = procfs::cgroup(pid).filter(|t| !t.is_empty());
        let container = cgroup_text
            .as_deref()
            .map(cgroup::parse)
            .unwrap_or_default();
        let pod = cgroup_text
            .as_ref()
            .and_then(|_| self.pods.lookup(&container));
        let candidate = Candidate {
            comm: &comm,
            exe: &exe,
            cgroup: cgroup_text.as_deref().map(cgroup_path),
            namespace: pod.as_ref().map(|p| p.namespace.as_str()),
        };
        if !self.selector.selects(&candidate) {
            log::debug!("pid {pid}: gone, rejected by its records (comm {comm:?}, exe {exe:?})");
            return;
        }
        log::debug!("pid {pid}: gone, selected by its records (comm {comm:?}, exe {exe:?})");
        self.to_forget.remove(&pid);
        self.procs.insert(
            pid,
            Proc {
                labels: ProcessLabels {
                    comm,
                    exe,
                    ..pod_labels(pod.as_ref())
                },
                container,
                // A zombie still has its start time: later scans must see the same process.
                start_time: procfs::start_time(pid).unwrap_or(0),
                exited_at: Some(Instant::now()),
                go: None,
                libc_apis: None,
                retained: Retained::default(),
            },
        );
        // The keys stay noted: its exec may still be in the ring (`exec_seen`).
        let keys = self.image_sites.get(&pid).map(|s| s.keys.clone());
        self.sweeper
            .pid(pid, Fate::Harvest, keys.unwrap_or_default());
    }

    /// A new-site record (records arrive in ring order): the process's current image made it.
    pub fn note_site(&mut self, key: &SiteKey, comm: &[u8; 16]) {
        if key.tgid == self.self_pid {
            return;
        }
        // A row of a process whose rows are leaving the kernel (read late, or made by a
        // rejected process still running) goes the same way.
        self.sweeper.add_key(*key);
        let image = self.image_sites.entry(key.tgid).or_default();
        if image.keys.is_empty() {
            image.comm = comm_text(comm);
        }
        image.keys.insert(*key);
    }

    /// The number of `pid`'s current program image (0 before its first exec).
    pub fn image_of(&self, pid: u32) -> u32 {
        self.images.get(&pid).copied().unwrap_or(0)
    }

    /// Whether `key` was made by an earlier image of its process (one that ended at exec).
    pub fn is_past_site(&self, key: &SiteKey) -> bool {
        self.past
            .get(&key.tgid)
            .is_some_and(|images| images.iter().any(|i| i.keys.contains(key)))
    }

    /// Like [`Self::ensure`] for a process that recorded rows (a Go event, which names no comm):
    /// unless it is selected, they go.
    pub fn ensure_rows(&mut self, pid: u32, probes: &mut Probes, symbolizer: &SymbolizerHandle) {
        if !self.ignored_pids.contains(&pid) {
            self.ensure(pid, probes, symbolizer);
        }
        if !self.procs.contains_key(&pid) && pid != self.self_pid {
            self.to_forget.insert(pid);
        }
    }

    /// `pid` exec'd `path`: its identity is the new program's from now on (a process that was
    /// skipped before may be selected now, and the other way round). What its old image did
    /// stays with the old identity, as an exited process of its own (a shell's work before
    /// `exec app` is not the app's).
    pub fn exec_seen(
        &mut self,
        pid: u32,
        comm: &[u8; 16],
        path: String,
        probes: &mut Probes,
        symbolizer: &SymbolizerHandle,
    ) {
        if pid == self.self_pid {
            return;
        }
        log::debug!("pid {pid}: exec of {path:?}");

        // The entry of this process: alive, marked exited by a scan that raced with the exec,
        // or registered from its records after it was gone (the agent reads the ring later
        // than the process runs); not that of an earlier process under the same pid.
        let start = procfs::start_time(pid);
        let old = if self.procs.get(&pid).is_some_and(|p| {
            p.exited_at.is_none() || start.is_none_or(|s| s == p.start_time || p.start_time == 0)
        }) {
            self.procs.remove(&pid)
        } else {
            None
        };
        if let Some(sites) = self.image_sites.remove(&pid).filter(|s| !s.keys.is_empty()) {
            self.end_image(pid, old, sites);
        }
        // What the new program records goes unless it is selected (the old image's stays,
        // above): a pid that ends up registered is not forgotten.
        self.to_forget.insert(pid);
        self.exec_paths.insert(pid, path);
        self.ignored.retain(|(p, _)| *p != pid);
        self.ignored_pids.remove(&pid);
        // The probe took it off the denylist at exec already; this keeps the books.
        self.undeny(pid, probes);
        self.ensure_seen(pid, comm, probes, symbolizer);
    }

    /// Keeps `pid`'s image that just ended at exec as an exited process of its own.
    fn end_image(&mut self, pid: u32, mut old: Option<Proc>, sites: ImageSites) {
        let mut exported = true;
        // Rows harvested before the exec was read (the process was gone by then) were made
        // by this image: every record of the old image precedes the exec's in the ring.
        let retained = old
            .as_mut()
            .map(|p| std::mem::take(&mut p.retained))
            .unwrap_or_default();
        let proc = match old {
            // Registered while the old program ran.
            Some(p) if p.labels.comm == sites.comm => Proc {
                exited_at: Some(Instant::now()),
                ..p
            },
            // Registered only after it exec'd (/proc read late): its records name the old
            // image; it is in the same cgroup.
            Some(p) => Proc {
                labels: ProcessLabels {
                    comm: sites.comm,
                    exe: self.exec_paths.get(&pid).cloned().unwrap_or_default(),
                    ..p.labels
                },
                exited_at: Some(Instant::now()),
                go: None,
                libc_apis: None,
                ..p
            },
            None => {
                let candidate = Candidate {
                    comm: &sites.comm,
                    ..Candidate::default()
                };
                exported = !self.ignored_pids.contains(&pid) && self.selector.selects(&candidate);
                Proc {
                    labels: ProcessLabels {
                        comm: sites.comm,
                        // The path of its own exec, when the agent saw one.
                        exe: self.exec_paths.get(&pid).cloned().unwrap_or_default(),
                        ..ProcessLabels::default()
                    },
                    container: cgroup::ContainerRef::default(),
                    start_time: procfs::start_time(pid).unwrap_or(0),
                    exited_at: Some(Instant::now()),
                    go: None,
                    libc_apis: None,
                    retained: Retained::default(),
                }
            }
        };
        let number = self.images.entry(pid).or_insert(0);
        let image = *number;
        *number += 1;
        // Its rows are final: harvested (or, not exported, deleted) out of the kernel maps.
        self.sweeper.image(pid, image, sites.keys.iter().copied());
        self.past.entry(pid).or_default().push(PastImage {
            image,
            proc,
            keys: sites.keys,
            exported,
            retained,
        });
    }

    /// Registers `pid` if it is new (or a new process under a reused pid) and selected.
    pub fn ensure(&mut self, pid: u32, probes: &mut Probes, symbolizer: &SymbolizerHandle) {
        if pid == self.self_pid {
            return;
        }
        let Some(start_time) = procfs::start_time(pid) else {
            return;
        };
        if let Some(p) = self.procs.get(&pid) {
            if p.start_time == start_time {
                return;
            }
            // The pid was reused: the old process is gone, and its rows are mixed with the new
            // one's from now on.
            self.procs.remove(&pid);
            self.to_forget.insert(pid);
        }
        if self.ignored.contains(&(pid, start_time)) {
            return;
        }
        // A new process under a pid whose rows are still being swept: they are its own now.
        self.sweeper.cancel(pid);
        // Before anything the decision rests on: an exec after this read makes a denial
        // below stale in the kernel, and the exec's event classifies the new program.
        let stamp = match probes.exec_stamp(pid) {
            Ok(stamp) => Some(stamp),
            Err(e) => {
                log::warn!("exec stamp of pid {pid}: {e}");
                None
            }
        };
        let Ok(exe) = procfs::exe(pid) else {
            // Kernel threads have no executable; a process that is exiting (its memory gone
            // before it is a zombie) has none left either, but its records still name it
            // (`ensure_seen`): ignoring it would drop them.
            if procfs::is_kernel_thread(pid) {
                self.ignored.insert((pid, start_time));
                self.ignored_pids.insert(pid);
            }
            return;
        };
        let exe = exe.display().to_string();
        let comm = procfs::comm(pid).unwrap_or_default();
        let cgroup_text = procfs::cgroup(pid).unwrap_or_default();
        let container = cgroup::parse(&cgroup_text);
        let pod = self.pods.lookup(&container);
        let candidate = Candidate {
            comm: &comm,
            exe: &exe,
            cgroup: Some(cgroup_path(&cgroup_text)),
            namespace: pod.as_ref().map(|p| p.namespace.as_str()),
        };
        if !self.selector.selects(&candidate) {
            log::debug!("pid {pid}: rejected (comm {comm:?}, exe {exe:?})");
            self.ignored.insert((pid, start_time));
            self.ignored_pids.insert(pid);
            // Without its stamp it stays traced: its rows are deleted as they are announced.
            if let Some(stamp) = stamp {
                self.deny(pid, stamp, probes);
            }
            // Its libc is probed all the same (once per file): a selected program that starts
            // later with this libc is then recorded from its first call, however briefly it
            // lives. Denied processes still take the uprobe trap of each call, and nothing more.
            let maps = read_maps(pid).unwrap_or_default();
            self.attach(pid, &comm, &maps, probes, false);
            return;
        }
        // A reused pid of a denied process that exited since the last scan.
        self.undeny(pid, probes);
        // One read of the memory map serves the libc search, the Go load bias and the
        // symbolizer's snapshot.
        let maps = read_maps(pid).unwrap_or_default();
        let (go, libc_apis) = self.attach(pid, &comm, &maps, probes, true);
        symbolizer.note_maps(pid, &maps);
        log::debug!("pid {pid}: selected (comm {comm:?}, exe {exe:?})");
        let labels = ProcessLabels {
            comm,
            exe,
            ..pod_labels(pod.as_ref())
        };
        self.procs.insert(
            pid,
            Proc {
                labels,
                container,
                start_time,
                exited_at: None,
                go: go.as_deref().map(GoState::new),
                libc_apis,
                retained: Retained::default(),
            },
        );
    }

    /// Looks again for the libc of the processes that had none mapped when they were
    /// registered (see `libc_retry`).
    fn retry_libc(&mut self, alive: &HashSet<u32>, probes: &mut Probes) {
        let pids: Vec<u32> = self.libc_retry.keys().copied().collect();
        for pid in pids {
            if !alive.contains(&pid) {
                self.libc_retry.remove(&pid);
                continue;
            }
            let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|s| s.trim_end().to_string())
                .unwrap_or_default();
            let maps = read_maps(pid).unwrap_or_default();
            self.attach(pid, &comm, &maps, probes, false);
        }
    }

    /// Attaches the files `pid` runs that are not probed yet: its libc, and (with `go`) its
    /// executable when it is a Go program. Returns its Go target and its libc's APIs, if any
    /// (and notes the APIs on the process when it is registered already).
    fn attach(
        &mut self,
        pid: u32,
        comm: &str,
        maps: &[MapEntry],
        probes: &mut Probes,
        go: bool,
    ) -> (Option<Arc<GoTarget>>, Option<Vec<Api>>) {
        let kinds: &[Kind] = if go { &LOADERS } else { &[Kind::Libc] };
        let proc = ProcessFiles { pid, comm, maps };
        let found = self.targets.attach_process(probes, &proc, kinds);
        let mut libc_apis = None;
        if let Some(libc) = found.iter().find_map(|t| match t {
            Target::Libc(l) => Some(l),
            Target::Go(_) => None,
        }) {
            log::debug!("pid {pid}: libc {}", libc.path.display());
            self.libc_retry.remove(&pid);
            libc_apis = Some(libc.probes.iter().map(|p| p.api).collect::<Vec<_>>());
            if let Some(p) = self.procs.get_mut(&pid) {
                p.libc_apis.clone_from(&libc_apis);
            }
        } else {
            let tries = self.libc_retry.entry(pid).or_default();
            *tries += 1;
            log::debug!("pid {pid}: no libc mapped yet (look {tries})");
            if *tries > LIBC_RETRIES {
                // A static program, or one that never maps a libc: nothing to attach.
                self.libc_retry.remove(&pid);
                // Replaced: a file it maps is deleted (renamed over), and it still runs (an
                // exiting process's files are out of reach too, and that is no failure).
                let replaced = maps
                    .iter()
                    .any(|m| m.deleted && m.perms.exec && m.is_file());
                if self.targets.take_libc_unreachable(pid) && replaced && !procfs::is_ending(pid) {
                    log::warn!(
                        "pid {pid} ({comm}): its libc was replaced on disk before the agent \
                         could probe it, and the file it still maps is out of reach after the \
                         privilege drop (/proc/{pid}/map_files): its calls are not counted \
                         (--keep-privileges reaches it)"
                    );
                    self.targets.failed(AttachFailure::MappedFileReplaced);
                }
            }
        }
        let go = found.into_iter().find_map(|t| match t {
            Target::Go(g) => Some(g),
            Target::Libc(_) => None,
        });
        (go, libc_apis)
    }
}

/// A comm as the kernel records it (NUL-padded) as text.
fn comm_text(comm: &[u8; 16]) -> String {
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..len]).into_owned()
}

/// Namespace, pod and container labels of a process in `pod` (empty outside pods).
fn pod_labels(pod: Option<&crate::k8s::pods::PodMeta>) -> ProcessLabels {
    ProcessLabels {
        namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
        pod: pod.map(|p| p.pod.clone()).unwrap_or_default(),
        container: pod
            .and_then(|p| p.container_name.clone())
            .unwrap_or_default(),
        ..ProcessLabels::default()
    }
}

/// The cgroup path of /proc/<pid>/cgroup: the v2 line, else the first v1 hierarchy's.
fn cgroup_path(text: &str) -> &str {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| text.lines().next().and_then(|l| l.splitn(3, ':').nth(2)))
        .unwrap_or("")
}

/// Takes the pids to forget out of `to_forget`: all but the registered ones (a pid reused by a
/// selected process, whose rows are its own now).
fn forgettable(to_forget: &mut HashSet<u32>, procs: &HashMap<u32, Proc>) -> HashSet<u32> {
    to_forget
        .drain()
        .filter(|pid| !procs.contains_key(pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_path_prefers_the_v2_line() {
        assert_eq!(cgroup_path("0::/kubepods.slice/a\n"), "/kubepods.slice/a");
        assert_eq!(
            cgroup_path("9:name=systemd:/x\n8:pids:/y\n0::/z\n"),
            "/z",
            "hybrid: the unified line"
        );
        assert_eq!(cgroup_path("4:memory:/docker/ab\n3:cpu:/c\n"), "/docker/ab");
        assert_eq!(cgroup_path(""), "");
    }

    /// Rows of a pid that is registered again (reused by a selected process) are its own.
    #[test]
    fn registered_pids_are_not_forgotten() {
        let mut to_forget = HashSet::from([1, 2, 3]);
        let procs = HashMap::from([(
            2,
            Proc {
                labels: ProcessLabels::default(),
                container: cgroup::ContainerRef::default(),
                start_time: 1,
                exited_at: None,
                go: None,
                libc_apis: None,
                retained: Retained::default(),
            },
        )]);
        assert_eq!(forgettable(&mut to_forget, &procs), HashSet::from([1, 3]));
        assert!(to_forget.is_empty());
    }
}
