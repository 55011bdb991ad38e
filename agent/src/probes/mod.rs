//! Loading the probe object and attaching it: the one place that talks to aya about programs.

mod count;
mod links;
mod mode;

use std::{num::NonZeroU32, path::Path};

use allocwatch_common::{
    capacity, config,
    event::Followed,
    globals,
    go::{self, GO_SPECS_MAX, GoProc, GoSpec},
    libc::{LIBC_FILES_MAX, cookie},
    map_names, symprobe,
    unwind::{UNWIND_PROCS_MAX, UNWIND_ROWS_MAX},
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapError},
    programs::{
        ProgramError, TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};
use thiserror::Error;

use self::{count::CountLayout, mode::*};
pub use self::{links::Links, mode::Mode};
use crate::slots::Ranges;
use crate::target::{
    ProbePoint,
    elf::ElfFile,
    go::GoProbe,
    registry::{AttachFailure, Attached, Attacher, Target},
    symprobe::SymPoint,
};

/// Whether this kernel's `sched:sched_process_exit` says which thread ends its process
/// (`group_dead`, Linux ≥ 6.16); without it the leader's exit stands for the process's.
fn exit_has_group_dead() -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .filter_map(|t| {
            std::fs::read_to_string(format!("{t}/events/sched/sched_process_exit/format")).ok()
        })
        .any(|f| f.contains("group_dead"))
}

/// The compiled probe object, built by agent/build.rs.
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/allocwatch"));

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("cannot load the eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the kernel rejected the {program} program: {}", brief(error))]
    Program {
        program: &'static str,
        // Not a `#[source]`: its Display carries the whole verifier log.
        error: ProgramError,
    },
    #[error("cannot attach uprobes to {path}: {source}")]
    Attach { path: String, source: ProgramError },
    #[error("cannot configure the Go probes: {0}")]
    GoConfig(#[from] MapError),
    #[error("cannot set up following the process tree: {0}")]
    Follow(MapError),
    #[error(
        "no room for this Go program's probes: the {GO_SPECS_MAX} Go function slots are held by \
         Go programs that are running"
    )]
    TooManyGoSpecs,
}

/// Kernel map capacities. Every drop caused by a full map is counted and reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Outstanding allocations tracked at once.
    pub max_live: u32,
    /// Distinct (process, API, stack) sites.
    pub max_sites: u32,
    /// Distinct user stacks.
    pub max_stacks: u32,
    /// Threads inside an allocation call at once.
    pub max_pending: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            max_live: capacity::LIVE,
            max_sites: capacity::SITES,
            max_stacks: capacity::STACKS,
            max_pending: capacity::PENDING,
        }
    }
}

/// Load-time settings of the probe.
#[derive(Clone, Copy, Debug)]
pub struct ProbeConfig {
    /// Only this process is traced; `None` traces every process the probes are attached to,
    /// narrowed by `filter`.
    pub tgid: Option<NonZeroU32>,
    pub filter: Filter,
    pub stacks: bool,
    /// Mean bytes between sampled calls (`--sample-bytes`; 0: every call). Only sampled
    /// calls have their stack walked and (full modes) their block tracked; every call is
    /// counted by API and immediate caller.
    pub sample_bytes: u64,
    pub capacity: Capacity,
    /// Walk libc probes' stacks with the unwind tables the agent loads (`--unwind dwarf`).
    pub unwind_tables: bool,
}

/// How the `TGIDS` map narrows tracing when no single process is targeted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Every process that runs a probed file.
    None,
    /// All but the processes the agent added (itself, the processes its selection rejects).
    Deny,
    /// The processes in the followed set: the roots put there with [`Probes::follow`], and
    /// every process they create after that, as the kernel creates it.
    Follow,
}

/// The loaded probe object and its attachments; dropping it detaches everything.
pub struct Probes {
    /// The probes' debug log while it is on; dropped before `ebpf` (declared first), whose
    /// ring buffer it reads.
    _log: Option<crate::probe_log::Reader>,
    ebpf: Ebpf,
    mode: Mode,
    /// Whether the kernel has uprobe multi-links (6.6): one link per file and program, else
    /// one perf-event link per probe site through the `_single` programs.
    multi: bool,
    attached_points: usize,
    /// Every link; dropping `Probes` detaches them (concurrently), and so does
    /// [`Links::detach_all`] on a clone, from any thread.
    links: Links,
    /// Free slots of the GO_SPECS array.
    go_specs: Ranges,
    /// Each attached Go file's link group and its slots of GO_SPECS.
    go_files: std::collections::HashMap<u64, (u32, u32)>,
    /// Probe points of each file's link group (Go, libc and symbol files alike).
    group_points: std::collections::HashMap<u64, usize>,
    /// The next link group of a file that can be detached on its own.
    next_group: u64,
    /// Free slots of the LIBC_FILES array (count mode) ...
    libc_files: Ranges,
    /// ... and the slot of each file's link group, given back when the file is let go.
    libc_file_slots: std::collections::HashMap<u64, u32>,
    /// What the probe's `RELAY_NAMED` holds (count mode).
    relay_named: u64,
}

impl Probes {
    /// Loads the Go programs and the libc programs of `mode` (only those: each load runs the
    /// verifier).
    pub fn load_mode(cfg: &ProbeConfig, mode: Mode) -> Result<Self, ProbeError> {
        let tgid = cfg.tgid.map_or(0, NonZeroU32::get);
        let mut flags = if cfg.stacks { config::FLAG_STACKS } else { 0 };
        if cfg.unwind_tables {
            flags |= config::FLAG_UNWIND_TABLES;
            // `MAX_STACK_DEPTH` frames deep where the kernel has `bpf_loop` (5.17); 16
            // unrolled before (the verifier prunes the other walk: FLAGS is read-only data).
            if crate::preflight::features().bpf_loop {
                flags |= config::FLAG_UNWIND_LOOP;
            }
        }
        // The tables are preallocated (8 MiB of rows): sized only when used.
        let tables = |n: u32| if cfg.unwind_tables { n } else { 1 };
        flags |= match cfg.filter {
            Filter::None => 0,
            Filter::Deny => config::FLAG_DENYLIST,
            Filter::Follow => config::FLAG_FOLLOW,
        };
        // The agent splits size histograms at exec where the kernel can sum per-CPU rows.
        let nr_cpus = aya::util::nr_cpus().map_or(u32::MAX, u32::from);
        if matches!(cfg.filter, Filter::Deny)
            && crate::preflight::features().percpu_lookup
            && nr_cpus <= capacity::EXEC_HIST_MAX_CPUS
        {
            flags |= config::FLAG_EXEC_HIST;
        }
        let follow = matches!(cfg.filter, Filter::Follow);
        let group_dead = u32::from(follow && exit_has_group_dead());
        // The tree's tables are sized only when following: PROGRAMS is per CPU and
        // preallocated (megabytes on a large node, for an agent that never uses it).
        let tree = |n: u32| if follow { n } else { 1 };
        let mut ebpf = EbpfLoader::new()
            .override_global(globals::TARGET_TGID, &tgid, true)
            .override_global(globals::FLAGS, &flags, true)
            .override_global(globals::SAMPLE_BYTES, &cfg.sample_bytes, true)
            .override_global(globals::EXIT_HAS_GROUP_DEAD, &group_dead, true)
            .override_global(
                globals::NR_CPUS,
                &nr_cpus.min(capacity::EXEC_HIST_MAX_CPUS),
                true,
            )
            // Below debug, the verifier drops the probes' logging paths.
            .override_global(aya_log::LEVEL, &crate::probe_log::level(), false)
            .map_max_entries(map_names::LIVE, cfg.capacity.max_live)
            .map_max_entries(map_names::SITES, cfg.capacity.max_sites)
            .map_max_entries(map_names::STACKS, cfg.capacity.max_stacks)
            .map_max_entries(map_names::PENDING, cfg.capacity.max_pending)
            .map_max_entries(map_names::LAST_ENTRY, cfg.capacity.max_pending)
            .map_max_entries(map_names::FOLLOWED, tree(capacity::FOLLOWED))
            .map_max_entries(map_names::PROGRAMS, tree(capacity::FOLLOWED * 4))
            .map_max_entries(map_names::UNWIND_ROWS, tables(UNWIND_ROWS_MAX))
            .map_max_entries(map_names::UNWIND_PROCS, tables(UNWIND_PROCS_MAX))
            .load(PROBE_OBJECT)?;
        let multi = crate::preflight::features().uprobe_multi;
        let (entry, ret) = mode.libc_programs();
        for program in [Some(entry), ret, Some(mode.go_program())]
            .into_iter()
            .flatten()
        {
            uprobe(&mut ebpf, program, multi)?
                .load()
                .inspect_err(|e| {
                    // The whole verifier log: the error keeps its last line only.
                    if let ProgramError::LoadError { verifier_log, .. } = e {
                        log::debug!("{program}: verifier log:\n{verifier_log}");
                    }
                })
                .map_err(|error| ProbeError::Program { program, error })?;
        }
        // After the programs are loaded: the reader takes the log's ring buffer map.
        let log = crate::probe_log::start(&mut ebpf);
        Ok(Self {
            _log: log,
            ebpf,
            mode,
            multi,
            attached_points: 0,
            links: Links::default(),
            go_specs: Ranges::new(go_specs_capacity()),
            go_files: std::collections::HashMap::new(),
            group_points: std::collections::HashMap::new(),
            next_group: links::PERMANENT + 1,
            libc_files: Ranges::new(LIBC_FILES_MAX),
            libc_file_slots: std::collections::HashMap::new(),
            relay_named: 0,
        })
    }

    /// Attaches the mode's entry program to every point of `file` and its return program (if
    /// any) to those that need the returned pointer. Scoped to `pid` when given (the kernel then
    /// only plants the breakpoints in that process).
    ///
    /// Every mode uses the same sites (placed for a return probe: no earlier instruction moves
    /// RSP), so the floor and each mode are measured at identical addresses.
    /// The link group of the file's probes comes back, for [`Self::detach_group`].
    pub fn attach_libc(
        &mut self,
        file: &Path,
        points: &[ProbePoint],
        pid: Option<NonZeroU32>,
    ) -> Result<u64, ProbeError> {
        let scope = pid.map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
        let (entry_program, ret_program) = self.mode.libc_programs();
        let entry: Vec<UProbeAttachPoint<'_>> = if entry_program == LIBC_COUNT {
            let layout = self.count_layout(file, points)?;
            points
                .iter()
                .map(|p| UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(p.file_offset),
                    cookie: Some(layout.cookie(p)),
                })
                .collect()
        } else {
            points.iter().map(attach_point).collect()
        };
        let ret: Vec<UProbeAttachPoint<'_>> = points
            .iter()
            .filter(|p| p.with_return)
            .map(attach_point)
            .collect();
        let group = self.next_group;
        let attached = self
            .attach_uprobe(entry_program, entry, file, scope, group)
            .and_then(|()| match ret_program {
                Some(ret_program) if !ret.is_empty() => {
                    self.attach_uprobe(ret_program, ret, file, scope, group)
                }
                _ => Ok(()),
            });
        if let Err(e) = attached {
            // The entry probes without their returns would leave every call in flight.
            self.detach_group(group);
            return Err(e);
        }
        Ok(self.group_attached(group, points.len()))
    }

    /// Books a file's link group as attached with `points` probe points.
    fn group_attached(&mut self, group: u64, points: usize) -> u64 {
        self.next_group += 1;
        self.group_points.insert(group, points);
        self.attached_points += points;
        group
    }

    /// Count mode's view of `file`: which API functions may tail-jump where, and (in a free
    /// `LIBC_FILES` slot) where they all are, so the probe can tell libc's relays from the
    /// program's calls without a return probe. Without a slot or a readable ELF the rules
    /// degrade (documented in BENCHMARKS.md / README), they never fail the attach. The APIs
    /// the file enters through a PLT slot naming them join `RELAY_NAMED` before its probes
    /// attach: their probes in every file then look for the relay.
    fn count_layout(
        &mut self,
        file: &Path,
        points: &[ProbePoint],
    ) -> Result<CountLayout, ProbeError> {
        let Ok(elf) = ElfFile::open(file) else {
            return Ok(CountLayout::unknown());
        };
        let layout = CountLayout::of(&elf, points, self.libc_files.alloc(1));
        if layout.relays.named & !self.relay_named != 0 {
            let named = self.relay_named | layout.relays.named;
            self.set_slot(map_names::RELAY_NAMED, 0, named)?;
            self.relay_named = named;
        }
        if layout.slot != cookie::NO_FILE {
            if let Err(e) = self.set_slot(map_names::LIBC_FILES, layout.slot, layout.file) {
                self.libc_files.release(layout.slot, 1);
                return Err(e);
            }
            self.libc_file_slots.insert(self.next_group, layout.slot);
        }
        Ok(layout)
    }

    /// Attaches the Go entry program at every probe site of a Go binary, each with its own
    /// capture spec.
    pub fn attach_go(
        &mut self,
        file: &Path,
        probes: &[GoProbe],
        pid: Option<NonZeroU32>,
    ) -> Result<u64, ProbeError> {
        if probes.is_empty() {
            return Ok(links::PERMANENT);
        }
        let len = u32::try_from(probes.len()).map_err(|_| ProbeError::TooManyGoSpecs)?;
        let first = self.go_specs.alloc(len).ok_or(ProbeError::TooManyGoSpecs)?;
        let written = (|| -> Result<(), ProbeError> {
            let map = self
                .ebpf
                .map_mut(map_names::GO_SPECS)
                .ok_or(MapError::InvalidName {
                    name: map_names::GO_SPECS.into(),
                })?;
            let mut specs: Array<_, GoSpec> = Array::try_from(map)?;
            for (i, p) in probes.iter().enumerate() {
                specs.set(first + i as u32, &p.spec, 0)?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            self.go_specs.release(first, len);
            return Err(e);
        }
        for p in probes {
            log::debug!(
                "{} {:?}: offset {:#x}, sp delta {}, {}",
                p.symbol,
                p.role,
                p.file_offset,
                p.sp_delta,
                if p.emulated {
                    "emulated"
                } else {
                    "single-stepped"
                }
            );
        }
        let points: Vec<UProbeAttachPoint<'_>> = probes
            .iter()
            .enumerate()
            .map(|(i, p)| UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(p.file_offset),
                cookie: Some(go::cookie::encode(first + i as u32, p.sp_delta)),
            })
            .collect();
        let scope = pid.map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
        let group = self.next_group;
        if let Err(e) = self.attach_uprobe(self.mode.go_program(), points, file, scope, group) {
            // Links of the file attached before the failure go with their slots.
            self.links.detach_group(group);
            self.go_specs.release(first, len);
            return Err(e);
        }
        self.go_files.insert(group, (first, len));
        Ok(self.group_attached(group, probes.len()))
    }

    /// Detaches the probes of the file attached as `group` and, for a Go file, frees its
    /// capture specs for another file (once the links are gone no probe reads them).
    pub fn detach_group(&mut self, group: u64) {
        let links = self.links.detach_group(group);
        if let Some((first, len)) = self.go_files.remove(&group) {
            self.go_specs.release(first, len);
        }
        // No probe reads the slot once its links are gone: another file may take it.
        if let Some(slot) = self.libc_file_slots.remove(&group) {
            self.libc_files.release(slot, 1);
        }
        if let Some(points) = self.group_points.remove(&group) {
            self.attached_points = self.attached_points.saturating_sub(points);
        }
        log::debug!("file group {group}: {links} links detached");
    }

    /// Loads the symbol-probe program if it is not loaded yet. The agent loads it at start:
    /// loading needs capabilities it drops once started, and it attaches growth functions as
    /// it finds them.
    pub fn load_sym(&mut self) -> Result<(), ProbeError> {
        let program = uprobe(&mut self.ebpf, SYM_ENTRY, self.multi)?;
        if program.fd().is_err() {
            program.load().map_err(|error| ProbeError::Program {
                program: SYM_ENTRY,
                error,
            })?;
        }
        Ok(())
    }

    /// Attaches the symbol-probe program at each point of `file` (loaded on first use: a
    /// session without symbol probes pays no verifier run for it).
    /// The link group of the file's probes comes back ([`links::PERMANENT`]: no points).
    pub fn attach_sym(
        &mut self,
        file: &Path,
        points: &[SymPoint],
        pid: Option<NonZeroU32>,
    ) -> Result<u64, ProbeError> {
        if points.is_empty() {
            return Ok(links::PERMANENT);
        }
        self.load_sym()?;
        for p in points {
            log::debug!(
                "probe {} {}: offset {:#x}, sp delta {}",
                p.probe,
                p.symbol,
                p.file_offset,
                p.sp_delta
            );
        }
        let attach: Vec<UProbeAttachPoint<'_>> = points
            .iter()
            .map(|p| UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(p.file_offset),
                cookie: Some({
                    let c = symprobe::cookie::encode(p.probe, p.sp_delta, p.args);
                    match p.list_resize_check {
                        Some(offset) => symprobe::cookie::with_list_resize_check(c, offset),
                        None => c,
                    }
                }),
            })
            .collect();
        let scope = pid.map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
        let group = self.next_group;
        if let Err(e) = self.attach_uprobe(SYM_ENTRY, attach, file, scope, group) {
            self.links.detach_group(group);
            return Err(e);
        }
        Ok(self.group_attached(group, points.len()))
    }

    /// Attaches the `sched:sched_process_exec` tracepoint (the agent's exec events).
    pub fn attach_exec(&mut self) -> Result<(), ProbeError> {
        self.attach_tracepoint("sched_process_exec", "sched", "sched_process_exec")
    }

    /// Follows the process tree of `root` (loaded with [`Filter::Follow`]): the tracepoints
    /// that add each new child to the followed set, note exit statuses and exits, and report
    /// execs, then `root` itself. In that order, so no child of `root` is created unseen.
    pub fn follow(&mut self, root: NonZeroU32) -> Result<(), ProbeError> {
        self.attach_tracepoint("task_newtask", "task", "task_newtask")?;
        self.attach_tracepoint("sys_enter_exit_group", "syscalls", "sys_enter_exit_group")?;
        self.attach_tracepoint("sched_process_exit", "sched", "sched_process_exit")?;
        self.attach_exec()?;
        let map = self
            .ebpf
            .map_mut(map_names::FOLLOWED)
            .ok_or(ProbeError::Follow(MapError::InvalidName {
                name: map_names::FOLLOWED.into(),
            }))?;
        let mut followed: HashMap<_, u32, Followed> =
            HashMap::try_from(map).map_err(ProbeError::Follow)?;
        followed
            .insert(&root.get(), &Followed::default(), 0)
            .map_err(ProbeError::Follow)?;
        Ok(())
    }

    fn attach_tracepoint(
        &mut self,
        program: &'static str,
        category: &str,
        name: &str,
    ) -> Result<(), ProbeError> {
        let tp: &mut TracePoint = self
            .ebpf
            .program_mut(program)
            .ok_or(ProbeError::Program {
                program,
                error: ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(|error| ProbeError::Program { program, error })?;
        tp.load()
            .map_err(|error| ProbeError::Program { program, error })?;
        let id = tp
            .attach(category, name)
            .map_err(|error| ProbeError::Program { program, error })?;
        let link = tp
            .take_link(id)
            .map_err(|error| ProbeError::Program { program, error })?;
        self.links.add(links::PERMANENT, link);
        Ok(())
    }

    /// Attaches the uprobe `program` at `points` of `file`, its links kept in [`Links`].
    /// Without multi-links, each point on its own: one perf-event link each, so that they
    /// are detached concurrently too. All or nothing: on an error, what this call attached
    /// is detached.
    fn attach_uprobe(
        &mut self,
        program: &'static str,
        points: Vec<UProbeAttachPoint<'_>>,
        file: &Path,
        scope: UProbeScope,
        group: u64,
    ) -> Result<(), ProbeError> {
        let attach_err = |source| ProbeError::Attach {
            path: file.display().to_string(),
            source,
        };
        let groups: Vec<Vec<UProbeAttachPoint<'_>>> = if self.multi {
            vec![points]
        } else {
            points.into_iter().map(|p| vec![p]).collect()
        };
        let uprobe = uprobe(&mut self.ebpf, program, self.multi)?;
        let mut links = Vec::with_capacity(groups.len());
        for group in groups {
            let id = uprobe.attach(group, file, scope).map_err(attach_err)?;
            links.push(
                uprobe
                    .take_link(id)
                    .map_err(|error| ProbeError::Program { program, error })?,
            );
        }
        for link in links {
            self.links.add(group, link);
        }
        Ok(())
    }

    /// Ends the session in the kernel: no entry probe counts a call from now on (one instant
    /// for every API, where the links' detaches are milliseconds apart), then every link is
    /// detached; the maps stay readable for the final report. The flag not set (a map error)
    /// only loses that instant: the links still go.
    pub fn stop(&mut self) -> Result<(), ProbeError> {
        let flagged = self.set_slot(map_names::STOPPED, 0, 1u32);
        self.links.detach_all();
        flagged
    }

    /// A handle on the links, to detach them from another thread.
    pub fn links(&self) -> Links {
        self.links.clone()
    }

    /// The exec stamp of `tgid` (0: no exec since the probes loaded). Read it *before* what
    /// a denial is decided on: a denial made with it stops applying at the process's next
    /// exec, however late the agent reads that exec.
    pub fn exec_stamp(&self, tgid: u32) -> Result<u64, ProbeError> {
        let map = self
            .ebpf
            .map(map_names::EXEC_STAMPS)
            .ok_or(MapError::InvalidName {
                name: map_names::EXEC_STAMPS.into(),
            })?;
        let stamps: HashMap<_, u32, u64> = HashMap::try_from(map)?;
        match stamps.get(&tgid, 0) {
            Ok(stamp) => Ok(stamp),
            Err(MapError::KeyNotFound) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Puts `tgid` on the denylist for the program of exec stamp `stamp`
    /// ([`Self::exec_stamp`]), or takes it off (`None`).
    pub fn set_listed(&mut self, tgid: u32, stamp: Option<u64>) -> Result<(), ProbeError> {
        self.set_stamp(map_names::TGIDS, tgid, stamp)
    }

    /// Marks `tgid` admitted by the selection for the program of exec stamp `stamp`, which
    /// lifts the undecided limit on its rows, or forgets it (`None`).
    pub fn set_admitted(&mut self, tgid: u32, stamp: Option<u64>) -> Result<(), ProbeError> {
        self.set_stamp(map_names::ADMITTED, tgid, stamp)
    }

    /// Sets (or removes) `tgid`'s exec stamp in the tgid → stamp map `name`.
    fn set_stamp(&mut self, name: &str, tgid: u32, stamp: Option<u64>) -> Result<(), ProbeError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(MapError::InvalidName { name: name.into() })?;
        let mut tgids: HashMap<_, u32, u64> = HashMap::try_from(map)?;
        if let Some(stamp) = stamp {
            tgids.insert(&tgid, &stamp, 0)?;
        } else {
            match tgids.remove(&tgid) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Rows with a stack one process may create in the call-site table, in the given
    /// [`site_limit`] slot; 0 = no limit.
    pub fn set_site_limit(&mut self, slot: u32, limit: u32) -> Result<(), ProbeError> {
        self.set_slot(map_names::SITE_LIMIT, slot, limit)
    }

    /// Sets slot `slot` of the array map `name`, whose values are `T`s.
    fn set_slot<T: aya::Pod>(&mut self, name: &str, slot: u32, value: T) -> Result<(), ProbeError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(MapError::InvalidName { name: name.into() })?;
        let mut slots: Array<_, T> = Array::try_from(map)?;
        slots.set(slot, &value, 0)?;
        Ok(())
    }

    /// Tells the probe where `runtime.mallocgc` lives in process `tgid`.
    pub fn set_go_process(&mut self, tgid: u32, proc: GoProc) -> Result<(), ProbeError> {
        let map = self
            .ebpf
            .map_mut(map_names::GO_PROCS)
            .ok_or(MapError::InvalidName {
                name: map_names::GO_PROCS.into(),
            })?;
        let mut procs: HashMap<_, u32, GoProc> = HashMap::try_from(map)?;
        procs.insert(&tgid, &proc, 0)?;
        Ok(())
    }

    pub fn attached_points(&self) -> usize {
        self.attached_points
    }

    /// A map of the probe object, for `collect` to read.
    pub fn map(&self, name: &str) -> Option<&Map> {
        self.ebpf.map(name)
    }

    /// Takes a map out of the object (a ring buffer polled on its own).
    pub fn take_map(&mut self, name: &str) -> Option<Map> {
        self.ebpf.take_map(name)
    }
}

/// `GO_SPECS_MAX`, or fewer with `ALLOCWATCH_DEBUG_GO_SPECS=N` (a test hook: a table that
/// holds one Go program's probes).
fn go_specs_capacity() -> u32 {
    std::env::var("ALLOCWATCH_DEBUG_GO_SPECS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(GO_SPECS_MAX, |n| n.min(GO_SPECS_MAX))
}

/// A file's probes as the registry keeps them: detachable by their group, unless there were
/// none to attach.
fn attached(points: usize, group: u64) -> Attached {
    Attached {
        points,
        handle: (group != links::PERMANENT).then_some(group),
    }
}

impl Attacher for Probes {
    type Error = ProbeError;

    fn attach_file(
        &mut self,
        target: &Target,
        scope: Option<NonZeroU32>,
    ) -> Result<Attached, ProbeError> {
        match target {
            Target::Libc(t) => {
                let group = self.attach_libc(&t.path, &t.probes, scope)?;
                Ok(attached(t.probes.len(), group))
            }
            Target::Go(t) => {
                let group = self.attach_go(&t.path, &t.probes, scope)?;
                Ok(attached(t.probes.len(), group))
            }
            Target::Sym(t) => {
                let group = self.attach_sym(&t.path, &t.points, scope)?;
                Ok(attached(t.points.len(), group))
            }
        }
    }

    fn detach_file(&mut self, handle: u64) {
        self.detach_group(handle);
    }

    fn set_mallocgc(&mut self, pid: u32, (start, end): (u64, u64)) -> Result<(), ProbeError> {
        self.set_go_process(
            pid,
            GoProc {
                mallocgc_start: start,
                mallocgc_end: end,
            },
        )
    }

    fn failure(e: &ProbeError) -> AttachFailure {
        match e {
            ProbeError::TooManyGoSpecs => AttachFailure::TooManyGoFunctions,
            e => AttachFailure::of(e),
        }
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        // Before the programs and maps go (fields drop after this): concurrently.
        self.links.detach_all();
    }
}

/// One line for a load error: the verifier's log is hundreds of lines; its last statement says
/// why (the full log is for developers: `bpftool prog load` reproduces it).
fn brief(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let why = log
                .split(['\n', ';'])
                .map(str::trim)
                .rev()
                .find(|l| {
                    !l.is_empty()
                        && !l.starts_with("verification time")
                        && !l.starts_with("processed ")
                        && !l.starts_with("stack depth")
                })
                .unwrap_or("");
            let why: String = why.chars().take(200).collect();
            format!("{io_error}: {why}")
        }
        other => other.to_string(),
    }
}

fn attach_point(p: &ProbePoint) -> UProbeAttachPoint<'static> {
    UProbeAttachPoint {
        location: UProbeAttachLocation::AbsoluteOffset(p.file_offset),
        cookie: Some(cookie::encode(p.api as u32, p.sp_delta)),
    }
}

/// The uprobe program `program`, or its per-site twin (`NAME_single`, probe-ebpf) where the
/// kernel has no uprobe multi-links.
fn uprobe<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
    multi: bool,
) -> Result<&'a mut UProbe, ProbeError> {
    let program = if multi { program } else { single_twin(program) };
    let missing = || ProbeError::Program {
        program,
        error: ProgramError::UnexpectedProgramType,
    };
    ebpf.program_mut(program)
        .ok_or_else(missing)?
        .try_into()
        .map_err(|error| ProbeError::Program { program, error })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loader writes the probes' globals (`globals`, aya-log's level) into the object's
    /// .rodata. A pointer to a constant that the compiler shared with one of them hands a
    /// helper the loaded value instead of the constant: `&1` was NR_CPUS's address (every
    /// process's first row charged as NR_CPUS rows), `&0` SAMPLE_BYTES's (on the `goagg`
    /// branch, every Go growth key started at 2^19). So every load of a global's address in
    /// the probes must be read through before any helper call.
    #[test]
    fn no_helper_is_handed_the_address_of_a_loaded_global() {
        use object::{
            Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget, SectionKind,
            SymbolKind,
        };
        let obj = object::File::parse(PROBE_OBJECT).expect("the probe object parses");
        let rodata = obj.section_by_name(".rodata").expect(".rodata").index();
        let globals: std::collections::HashMap<_, String> = obj
            .symbols()
            .filter(|s| s.section_index() == Some(rodata) && s.kind() == SymbolKind::Data)
            .filter_map(|s| Some((s.index(), s.name().ok()?.to_owned())))
            .filter(|(_, name)| !name.is_empty())
            .collect();
        assert!(
            globals.values().any(|n| n == globals::NR_CPUS),
            "the globals are named symbols of .rodata: {globals:?}"
        );
        const LDDW: u8 = 0x18;
        const CALL: u8 = 0x85;
        let mut handed = Vec::new();
        let mut read = 0;
        for section in obj.sections().filter(|s| s.kind() == SectionKind::Text) {
            let code = section.data().expect("code");
            for (offset, reloc) in section.relocations() {
                let RelocationTarget::Symbol(sym) = reloc.target() else {
                    continue;
                };
                let Some(name) = globals.get(&sym) else {
                    continue;
                };
                let at = offset as usize;
                if code.get(at) != Some(&LDDW) {
                    continue;
                }
                let dst = code[at + 1] & 0x0f;
                // The next instructions, until a load through `dst` (class LDX, mode MEM) or
                // a helper call.
                let mut i = at + 16;
                let mut through = false;
                while i + 8 <= code.len() && i < at + 16 + 16 * 8 {
                    let (op, src) = (code[i], code[i + 1] >> 4);
                    if op & 0x07 == 0x01 && op & 0xe0 == 0x60 && src == dst {
                        through = true;
                        break;
                    }
                    if op == CALL {
                        break;
                    }
                    i += if op == LDDW { 16 } else { 8 };
                }
                if through {
                    read += 1;
                } else {
                    handed.push(format!(
                        "{} +{at:#x}: {name}",
                        section.name().unwrap_or("?")
                    ));
                }
            }
        }
        assert!(read > 0, "no global read at all: the scan is wrong");
        assert!(
            handed.is_empty(),
            "addresses of loaded globals not read through before a call:\n{}",
            handed.join("\n")
        );
    }
}
