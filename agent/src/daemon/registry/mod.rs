//! The processes the daemon traces: discovery from /proc, selection, attaching once per
//! distinct file (device + inode), exit and expiry.
//!
//! The kernel filter is always a denylist: a process is recorded from its first call, before
//! the agent has seen it, so that a selected program that lives less than a millisecond is
//! counted exactly. A process the selection rejects is denied as soon as it is classified (at
//! its exec event, its first new call site, or the /proc scan, whichever comes first), and what
//! it recorded before that is deleted from the kernel maps. Only registered processes
//! (`procs`) are exported, so an unclassified or rejected process's rows never reach a scrape.
//!
//! This file holds the registry's state and what the rest of the daemon asks of it; `scan.rs`
//! its periodic steps (/proc, the sweeper), `admit.rs` the decision about one process,
//! `images.rs` what an exec does.

mod admit;
mod images;
mod scan;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use allocwatch_common::libc::{Api, SiteKey};

use super::{
    retained::{RETAINED_SITES, Retained},
    select::Selector,
    sweep::Sweeper,
};
use crate::{
    frames::FrameCache,
    gort::live::ProcessMemory,
    gostate::GoState,
    k8s::{cgroup, pods::PodCache, watch::PodUpdate},
    model::ProcessLabels,
    procfs,
    symbolize::SymbolizerHandle,
    target::{
        go::GoProbeSet,
        libc::Allocator,
        maps::MapEntry,
        registry::Targets,
        symprobe::{self, StaticKind},
    },
    unwind::worker::TablesWorker,
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
    /// The APIs its malloc family's files serve under their own names (not the aliases counted
    /// as another API); `None` while no libc is known (a static Go program, or not mapped yet).
    pub libc_apis: Option<Vec<Api>>,
    /// The allocator serving its `malloc`, once its files are found.
    pub allocator: Option<Allocator>,
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
    /// The size histograms the image left at its exec (`ImageHist` record), for its exec
    /// record to hand to the past image.
    hists: allocwatch_common::ImageHists,
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
    /// The unwind tables of the registered processes' files (`unwind = "dwarf"`).
    pub unwind: Option<TablesWorker>,
    /// The symbol probes' kinds by probe id (built-in growth kinds, then the `probe`s).
    pub probe_kinds: Vec<StaticKind>,
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
            unwind: None,
            probe_kinds: symprobe::static_kinds(&[]),
        }
    }

    /// Loads the unwind tables of `pid`'s files that have none yet (with tables on), off the
    /// loop; until they are in, its stacks are walked with frame pointers.
    fn load_unwind(&self, pid: u32, maps: &[MapEntry]) {
        if let Some(tables) = &self.unwind {
            tables.load(pid, maps);
        }
    }

    /// `pid`'s mappings leave the probe's tables (exited, or exec'd: the new image is loaded
    /// when it is registered).
    fn forget_unwind(&self, pid: u32) {
        if let Some(tables) = &self.unwind {
            tables.forget(pid);
        }
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

    /// Reads the largest `limit` Go maps of each running Go process (their length and size,
    /// for the map gauges and verdicts).
    pub fn read_go_maps(&mut self, limit: usize) {
        for (&pid, p) in &mut self.procs {
            if p.exited_at.is_some() {
                continue;
            }
            if let Some(go) = p.go.as_mut().filter(|g| !g.maps.is_empty()) {
                go.refresh_maps(&ProcessMemory { pid }, limit);
                log::debug!(
                    "pid {pid}: {} Go maps known, {} read live",
                    go.maps.len(),
                    go.maps.values().filter(|m| m.live.is_some()).count()
                );
            }
        }
    }

    /// Entries of the kernel's denylist: the agent and the rejected processes.
    pub fn denylist_len(&self) -> usize {
        self.denied.len() + 1
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
}

/// A comm as the kernel records it (NUL-padded) as text.
fn comm_text(comm: &[u8; 16]) -> String {
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..len]).into_owned()
}
