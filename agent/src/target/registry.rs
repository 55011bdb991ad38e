//! The target registry: one list of loaders, one per kind of file allocwatch probes (the
//! malloc family — glibc, musl, jemalloc, tcmalloc, mimalloc —, the Go runtime). Each loader analyses a file once per file identity
//! (device + inode) and the registry attaches its probes once per file; then a per-process
//! step tells the probes where the file is loaded in each process (its load bias). The CLI
//! session and the agent both attach through here.
//!
//! A new kind (unwind tables) is a [`Kind`], a [`Target`] variant with its analysis, and its arms in [`Targets::find`], [`Attacher`] and [`Target::in_process`].

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io,
    num::NonZeroU32,
    path::Path,
    sync::Arc,
    time::Instant,
};

use super::{
    TargetError,
    go::{self, GoProbeSet, GoTarget},
    libc::{self, LibcTarget},
    maps::{DevInode, MapEntry, Stamp},
    symprobe::{self, SymTarget},
};

/// The kinds of target, in the order a process's files are looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// The files that provide `malloc` and its family (libc, an allocator library, or a
    /// static executable).
    Libc,
    /// A Go executable's runtime.
    Go,
    /// Functions probed by symbol: the built-in C++/Rust container-growth kinds in a
    /// process's executable and libstdc++ (found by the agent's discovery), and `--probe`s
    /// (attached by the caller from its configuration, [`Targets::attach`]).
    Sym,
}

/// Every loader, in order.
pub const LOADERS: [Kind; 3] = [Kind::Libc, Kind::Go, Kind::Sym];

/// One file's analysis by its loader: what to probe in it.
#[derive(Clone, Debug)]
pub enum Target {
    Libc(Arc<LibcTarget>),
    Go(Arc<GoTarget>),
    Sym(Arc<SymTarget>),
}

/// A file's probes as attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    /// Probe points.
    pub points: usize,
    /// What [`Attacher::detach_file`] takes, for probes that can be detached on their own
    /// (a Go program's hold slots of a fixed-size table; any file's hold its inode).
    pub handle: Option<u64>,
}

/// A file whose probes can be detached on their own.
#[derive(Debug)]
struct Held {
    handle: u64,
    points: usize,
    /// When a process was last found running it (the order Go files make room in).
    seen: Instant,
    /// The file, open without access (`O_PATH`), to tell when its last name is gone: the
    /// probes then hold a deleted inode and its disk space.
    file: Option<std::fs::File>,
    /// Processes found mapping it once deleted: looked at again before /proc is scanned.
    holders: Vec<u32>,
}

impl Held {
    fn deleted(&self) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        self.file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .is_some_and(|m| m.nlink() == 0)
    }
}

/// What the registry needs from the loaded probe object.
pub trait Attacher {
    type Error: std::error::Error + 'static;
    /// Attaches a file's probes (for one process only, or for every process that maps it).
    fn attach_file(
        &mut self,
        target: &Target,
        scope: Option<NonZeroU32>,
    ) -> Result<Attached, Self::Error>;
    /// Detaches the probes of a file attached with a handle, and frees what they held.
    fn detach_file(&mut self, handle: u64);
    /// Tells the Go probes where `runtime.mallocgc` runs in process `pid`.
    fn set_mallocgc(&mut self, pid: u32, range: (u64, u64)) -> Result<(), Self::Error>;
    /// What kind of failure `e` is.
    fn failure(e: &Self::Error) -> AttachFailure {
        AttachFailure::of(e)
    }
}

impl Target {
    pub fn kind(&self) -> Kind {
        match self {
            Target::Libc(_) => Kind::Libc,
            Target::Go(_) => Kind::Go,
            Target::Sym(_) => Kind::Sym,
        }
    }

    /// The file the probes attach to.
    pub fn path(&self) -> &Path {
        match self {
            Target::Libc(t) => &t.path,
            Target::Go(t) => &t.path,
            Target::Sym(t) => &t.path,
        }
    }

    /// Whether the per-process step needs the process's memory map: its addresses are known
    /// only once the file is mapped (a position-independent Go binary's `mallocgc`).
    pub fn needs_maps(&self) -> bool {
        match self {
            Target::Libc(_) | Target::Sym(_) => false,
            Target::Go(g) => g.pie && g.mallocgc.is_some(),
        }
    }

    /// The per-process step: tells the probes what depends on where `id` (this file) is loaded
    /// in `pid`, whose memory map is `maps` (unread when [`Self::needs_maps`] is false).
    /// Whether it was done (false: the file is not mapped yet).
    pub fn in_process<A: Attacher>(
        &self,
        probes: &mut A,
        pid: u32,
        id: DevInode,
        maps: &[MapEntry],
    ) -> Result<bool, A::Error> {
        match self {
            Target::Libc(_) | Target::Sym(_) => Ok(true),
            Target::Go(g) => {
                let Some((start, end)) = g.mallocgc else {
                    return Ok(true);
                };
                let bias = if g.pie { load_bias(maps, id) } else { Some(0) };
                let Some(bias) = bias else {
                    return Ok(false);
                };
                probes.set_mallocgc(pid, (start + bias, end + bias))?;
                Ok(true)
            }
        }
    }
}

/// A target with the identity of its file (uprobes attach to an inode).
#[derive(Clone, Debug)]
pub struct Loaded {
    pub id: DevInode,
    pub target: Target,
}

impl Loaded {
    /// [`Target::in_process`] for this file.
    pub fn in_process<A: Attacher>(
        &self,
        probes: &mut A,
        pid: u32,
        maps: &[MapEntry],
    ) -> Result<bool, A::Error> {
        self.target.in_process(probes, pid, self.id, maps)
    }
}

/// Load bias of a position-independent executable in a process: Go PIE binaries start with a
/// PT_LOAD of vaddr 0 at file offset 0, so the start of that mapping is the bias.
pub fn load_bias(maps: &[MapEntry], id: DevInode) -> Option<u64> {
    maps.iter()
        .find(|m| m.dev_inode == id && m.offset == 0)
        .map(|m| m.start)
}

/// Why a file's probes were not attached: the `reason` of `allocwatch_attach_failures_total`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AttachFailure {
    /// The kernel refused, with this errno.
    Os(i32),
    /// The file could not be analysed (not the ELF or Go binary it looked like).
    BadFile,
    /// More Go functions than the probe's spec table holds.
    TooManyGoFunctions,
    /// The kernel's denylist is full: a rejected process stays traced (its rows are deleted).
    DenylistFull,
    /// The exec tracepoint could not be attached.
    ExecTracepoint,
    /// A process's libc was replaced on disk before its probes could be placed, and the
    /// file it maps is out of the agent's reach (`/proc/<pid>/map_files` after the drop).
    MappedFileReplaced,
    /// Anything else.
    Other,
}

/// `: CAUSE` for the innermost error under `e` (an errno such as "Too many open files" that
/// aya's "`perf_event_open` failed" keeps as its source), or nothing when `e` has none.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    match std::iter::successors(e.source(), |e| e.source()).last() {
        Some(root) => format!(": {root}"),
        None => String::new(),
    }
}

impl AttachFailure {
    /// The errno anywhere in `e`'s chain of causes, else [`Self::Other`].
    pub fn of(e: &(dyn std::error::Error + 'static)) -> Self {
        std::iter::successors(Some(e), |e| e.source())
            .find_map(|e| e.downcast_ref::<io::Error>()?.raw_os_error())
            .map_or(Self::Other, Self::Os)
    }

    /// A target that could not be analysed.
    pub fn of_target(e: &TargetError) -> Self {
        match e {
            TargetError::BadElf { .. } | TargetError::MissingSymbol { .. } => Self::BadFile,
            e => Self::of(e),
        }
    }

    /// Whether the kernel said the map is full (E2BIG on update).
    pub fn is_full(&self) -> bool {
        *self == Self::Os(::libc::E2BIG)
    }

    /// The label value: short and bounded.
    pub fn label(&self) -> String {
        match self {
            Self::Os(errno) => io::Error::from_raw_os_error(*errno).to_string(),
            Self::BadFile => "unreadable file".into(),
            Self::TooManyGoFunctions => "too many Go functions".into(),
            Self::DenylistFull => "denylist full".into(),
            Self::ExecTracepoint => "exec_tracepoint".into(),
            Self::MappedFileReplaced => "mapped file replaced".into(),
            Self::Other => "other".into(),
        }
    }
}

/// What one file turned out to be to one loader. An attached file's inode is held by its
/// probes, so its number cannot come back for another file; the other verdicts keep the file
/// they were made about (`None`: unknown), and a verdict about an earlier file at the same
/// device and inode is dropped ([`Targets::knows`]).
enum FileState {
    Attached(Target),
    /// Not a file of this kind (remembered so it is not parsed again).
    NotOfKind(Option<Stamp>),
    Failed(Option<Stamp>),
}

/// The files of one process, as the registry looks at them.
pub struct ProcessFiles<'a> {
    pub pid: u32,
    pub comm: &'a str,
    pub maps: &'a [MapEntry],
}

/// Every file attached so far, by kind and identity; each is analysed and attached once.
pub struct Targets {
    /// One process only (the CLI), or every process that maps a probed file (the agent).
    scope: Option<NonZeroU32>,
    go_probes: GoProbeSet,
    /// Whether every process's files are searched for the built-in growth kinds (else only
    /// files attached whole, the agent's `probe`s, are found).
    native_growth: bool,
    /// What each mapped file is to the libc search, so each is parsed once for all processes.
    libc_search: libc::FileCache,
    files: HashMap<(Kind, DevInode), FileState>,
    /// The files attached with a handle (Go executables: least recently seen first when a new
    /// one needs the room; any file once deleted and mapped by no process).
    held: HashMap<(Kind, DevInode), Held>,
    /// Go files detached to make room for others.
    pub go_files_detached: u64,
    /// Files detached because they were deleted and no process mapped them any more.
    pub deleted_files_released: u64,
    /// Probe points attached.
    pub points_attached: u64,
    pub failures: BTreeMap<AttachFailure, u64>,
    /// Processes whose last libc search found the mapped file out of reach.
    libc_unreachable: HashSet<u32>,
}

impl Targets {
    /// Only files attached whole are found for the built-in growth kinds (the agent without
    /// `native_growth`).
    pub fn without_native_growth(mut self) -> Self {
        self.native_growth = false;
        self
    }

    pub fn new(go_probes: GoProbeSet, scope: Option<NonZeroU32>) -> Self {
        Self {
            scope,
            go_probes,
            native_growth: true,
            libc_search: libc::FileCache::default(),
            files: HashMap::new(),
            held: HashMap::new(),
            go_files_detached: 0,
            deleted_files_released: 0,
            points_attached: 0,
            failures: BTreeMap::new(),
            libc_unreachable: HashSet::new(),
        }
    }

    /// Whether `pid`'s last libc search failed because a file it maps was out of reach
    /// (forgotten by this call).
    pub fn take_libc_unreachable(&mut self, pid: u32) -> bool {
        self.libc_unreachable.remove(&pid)
    }

    /// The Go target attached for the file `id`, if that file is a probed Go executable.
    pub fn go_target(&self, id: DevInode) -> Option<Arc<GoTarget>> {
        match self.files.get(&(Kind::Go, id)) {
            Some(FileState::Attached(Target::Go(g))) => Some(g.clone()),
            _ => None,
        }
    }

    /// Whether the file `id` of `kind` is probed already.
    pub fn is_attached(&self, kind: Kind, id: DevInode) -> bool {
        matches!(self.files.get(&(kind, id)), Some(FileState::Attached(_)))
    }

    /// Whether `kind`'s verdict on the file `id` holds for the file that has that identity now
    /// (`now`: its stamp, `None` when it could not be looked at: it is taken to). A verdict
    /// about an earlier file (deleted, its inode number given to a new one: a redeployed
    /// binary) is forgotten, so that the new file is analysed.
    fn knows(&mut self, kind: Kind, id: DevInode, now: impl FnOnce() -> Option<Stamp>) -> bool {
        let holds = match self.files.get(&(kind, id)) {
            None => return false,
            Some(FileState::Attached(_)) => true,
            Some(FileState::NotOfKind(then) | FileState::Failed(then)) => Stamp::holds(*then, now),
        };
        if !holds {
            log::debug!("{kind:?} file {id:?} is not the file of its verdict: looked at again");
            self.files.remove(&(kind, id));
        }
        holds
    }

    /// Counts a failure.
    pub fn failed(&mut self, why: AttachFailure) {
        *self.failures.entry(why).or_default() += 1;
    }

    /// Attaches a file the caller analysed (the CLI's resolved target); an error is the
    /// caller's to report.
    pub fn attach<A: Attacher>(&mut self, probes: &mut A, file: &Loaded) -> Result<(), A::Error> {
        let n = probes.attach_file(&file.target, self.scope)?.points;
        self.points_attached += n as u64;
        self.files.insert(
            (file.target.kind(), file.id),
            FileState::Attached(file.target.clone()),
        );
        Ok(())
    }

    /// The agent's step for one process: finds the files of the `kinds` it runs, attaches
    /// those not probed yet (failures are counted, not returned), and does its per-process
    /// step. What was found, by kind.
    pub fn attach_process<A: Attacher>(
        &mut self,
        probes: &mut A,
        proc: &ProcessFiles<'_>,
        kinds: &[Kind],
    ) -> Vec<Target> {
        let exe = std::fs::metadata(crate::procfs::exe_link(proc.pid))
            .ok()
            .map(|m| (DevInode::from_metadata(&m), Stamp::of(&m)));
        let mut found = Vec::new();
        for &kind in kinds {
            for id in self.find(probes, kind, proc, exe) {
                let Some(FileState::Attached(target)) = self.files.get(&(kind, id)) else {
                    continue;
                };
                let target = target.clone();
                if let Some(h) = self.held.get_mut(&(kind, id)) {
                    h.seen = Instant::now();
                }
                // The process may be gone already, or the probe's table full: it is then
                // traced without the per-process detail (the kernel counts what it could not
                // record).
                let _ = target.in_process(probes, proc.pid, id, proc.maps);
                found.push(target);
            }
        }
        found
    }

    /// Attaches `target`; when the probes' table has no room for a Go program's, detaches the
    /// Go programs no process runs any more, least recently seen first, until it fits.
    fn attach_making_room<A: Attacher>(
        &mut self,
        probes: &mut A,
        target: &Target,
    ) -> Result<Attached, A::Error> {
        let mut running: Option<HashSet<DevInode>> = None;
        loop {
            let err = match probes.attach_file(target, self.scope) {
                Ok(a) => return Ok(a),
                Err(e) => e,
            };
            if A::failure(&err) != AttachFailure::TooManyGoFunctions {
                return Err(err);
            }
            // Read once per attach, and only under pressure: every process's executable.
            let running = running.get_or_insert_with(running_executables);
            let Some(key) = self
                .held
                .iter()
                .filter(|((kind, id), _)| *kind == Kind::Go && !running.contains(id))
                .min_by_key(|(_, h)| h.seen)
                .map(|(key, _)| *key)
            else {
                return Err(err);
            };
            let id = key.1;
            self.detach(probes, key);
            self.go_files_detached += 1;
            log::info!(
                "detached the Go probes of file {id:?} (no process runs it) to make room for {}",
                target.path().display()
            );
        }
    }

    /// Detaches a held file's probes and forgets the file (a later process mapping the same
    /// identity has it analysed and attached anew).
    fn detach<A: Attacher>(&mut self, probes: &mut A, key: (Kind, DevInode)) {
        if let Some(h) = self.held.remove(&key) {
            probes.detach_file(h.handle);
            self.points_attached = self.points_attached.saturating_sub(h.points as u64);
        }
        self.files.remove(&key);
        if key.0 == Kind::Libc {
            self.libc_search.forget(key.1);
        }
    }

    /// Detaches the probes of files that are deleted (no name left: an upgraded library, a
    /// redeployed binary) and mapped by no process: the probes would otherwise hold the inode,
    /// and its disk space, for the agent's life. /proc is scanned only when such a file exists
    /// and the processes last found mapping it no longer do. How many files were released.
    pub fn release_deleted<A: Attacher>(&mut self, probes: &mut A) -> usize {
        let deleted: Vec<(Kind, DevInode)> = self
            .held
            .iter()
            .filter(|(_, h)| h.deleted())
            .filter(|((_, id), h)| !h.holders.iter().any(|&pid| maps_file(pid, *id)))
            .map(|(key, _)| *key)
            .collect();
        if deleted.is_empty() {
            return 0;
        }
        let ids: HashSet<DevInode> = deleted.iter().map(|(_, id)| *id).collect();
        let holders = processes_mapping(&ids);
        let mut released = 0;
        for key in deleted {
            if let Some(pids) = holders.get(&key.1) {
                if let Some(h) = self.held.get_mut(&key) {
                    h.holders.clone_from(pids);
                }
                continue;
            }
            if let Some(FileState::Attached(t)) = self.files.get(&key) {
                log::info!(
                    "detached the {:?} probes of {} (deleted, no process maps it)",
                    key.0,
                    t.path().display()
                );
            }
            self.detach(probes, key);
            released += 1;
        }
        self.deleted_files_released += released as u64;
        released
    }

    /// The files of `kind` that `proc` runs (libc: every file that serves its allocation
    /// API, the one serving `malloc` first), each analysed and attached if it is new.
    fn find<A: Attacher>(
        &mut self,
        probes: &mut A,
        kind: Kind,
        proc: &ProcessFiles<'_>,
        exe: Option<(DevInode, Stamp)>,
    ) -> Vec<DevInode> {
        let exe_id = exe.map(|(id, _)| id);
        // Each file with its stamp now (what its verdict is made about) and what it is.
        type Analysed = (DevInode, Option<Stamp>, Result<Option<Target>, TargetError>);
        let analysed: Vec<Analysed> = match kind {
            Kind::Libc => {
                // A process without libc (a static Go program, a process gone meanwhile) is
                // no failure: there is nothing of this kind to probe.
                let served = libc::for_pid_cached(
                    proc.pid,
                    proc.comm,
                    proc.maps,
                    exe_id,
                    &mut self.libc_search,
                )
                .inspect_err(|e| log::debug!("pid {}: no libc: {e}", proc.pid));
                // Only this look counts: an earlier one may have raced with an exit.
                self.libc_unreachable.remove(&proc.pid);
                if let Err(TargetError::MappedFileUnavailable { .. }) = &served {
                    self.libc_unreachable.insert(proc.pid);
                }
                let Ok(served) = served else {
                    return Vec::new();
                };
                // The search checked each file's stamp against its own verdict just now.
                served
                    .files()
                    .iter()
                    .map(|l| {
                        let stamp = self.libc_search.stamp(l.dev_inode);
                        (l.dev_inode, stamp, Ok(Some(Target::Libc(Arc::clone(l)))))
                    })
                    .collect()
            }
            Kind::Go => {
                let Some((id, stamp)) = exe else {
                    return Vec::new();
                };
                if self.knows(kind, id, || Some(stamp)) {
                    return vec![id];
                }
                let exe = crate::procfs::exe_link(proc.pid);
                let go = go::for_exe(&exe, self.go_probes)
                    // The kernel resolves the path to the inode at attach time: the probes
                    // stay when this pid exits, for every process running the same file.
                    .map(|g| g.map(|g| Target::Go(Arc::new(g))));
                vec![(id, Some(stamp), go)]
            }
            // The built-in growth kinds: templates are instantiated in the executable, the
            // C++ rehash policy lives in libstdc++, CPython's functions in the interpreter or
            // libpython (each file analysed once, for every process that maps it; one with
            // `--probe`s was attached whole at start).
            Kind::Sym => {
                let sym = |t: Result<Option<SymTarget>, TargetError>| {
                    t.map(|t| t.map(|t| Target::Sym(Arc::new(t))))
                };
                let mut out: Vec<Analysed> = Vec::new();
                if let Some((id, stamp)) = exe {
                    let exe = crate::procfs::exe_link(proc.pid);
                    if self.knows(kind, id, || Some(stamp)) {
                        out.push((id, None, Ok(None)));
                    } else if self.native_growth {
                        match symprobe::builtins_in(&exe) {
                            // Gone meanwhile: no verdict on its file, which the next process
                            // running it brings back.
                            Err(TargetError::Io { .. }) => {}
                            analysed => out.push((id, Some(stamp), sym(analysed))),
                        }
                    }
                }
                for m in proc.maps.iter().filter(|m| {
                    m.offset == 0 && Some(m.dev_inode) != exe_id && symprobe::has_builtins(m)
                }) {
                    if out.iter().any(|(id, ..)| *id == m.dev_inode)
                        || self.knows(kind, m.dev_inode, || libc::mapped_stamp(proc.pid, m))
                    {
                        out.push((m.dev_inode, None, Ok(None)));
                        continue;
                    }
                    if !self.native_growth {
                        continue;
                    }
                    let (stamp, analysed) = match libc::find_mapped(proc.pid, m) {
                        Ok((path, meta)) => (Some(Stamp::of(&meta)), symprobe::builtins_in(&path)),
                        Err(tried) => (
                            None,
                            Err(TargetError::MappedFileUnavailable {
                                pid: proc.pid,
                                comm: proc.comm.to_owned(),
                                display_path: m.path.clone().unwrap_or_default(),
                                tried,
                            }),
                        ),
                    };
                    out.push((m.dev_inode, stamp, sym(analysed)));
                }
                out
            }
        };
        let mut ids = Vec::new();
        // A process that exits while its files are read or attached (through /proc/PID/…)
        // says nothing about the files: no verdict, so that the next process running them
        // brings them back (a short-lived first run must not leave a program unprobed).
        let gone = || std::fs::metadata(crate::procfs::exe_link(proc.pid)).is_err();
        for (id, stamp, analysed) in analysed {
            ids.push(id);
            if self.knows(kind, id, || stamp) {
                continue;
            }
            let state = match analysed {
                Ok(Some(target)) => match self.attach_making_room(probes, &target) {
                    Ok(attached) => {
                        self.points_attached += attached.points as u64;
                        if let Some(handle) = attached.handle {
                            let file = open_path(target.path());
                            let held = Held {
                                handle,
                                points: attached.points,
                                seen: Instant::now(),
                                file,
                                holders: Vec::new(),
                            };
                            self.held.insert((kind, id), held);
                        }
                        FileState::Attached(target)
                    }
                    Err(e) if gone() => {
                        log::debug!(
                            "attaching {}: {e} (the process is gone)",
                            target.path().display()
                        );
                        continue;
                    }
                    Err(e) => {
                        log::warn!(
                            "attaching {}: {e}{}",
                            target.path().display(),
                            root_cause(&e)
                        );
                        self.failed(A::failure(&e));
                        FileState::Failed(stamp)
                    }
                },
                Ok(None) => FileState::NotOfKind(stamp),
                Err(e) if gone() => {
                    log::debug!(
                        "analysing pid {}'s {kind:?} file: {e} (the process is gone)",
                        proc.pid
                    );
                    continue;
                }
                Err(e) => {
                    log::warn!("analysing pid {}'s {kind:?} file: {e}", proc.pid);
                    self.failed(AttachFailure::of_target(&e));
                    FileState::Failed(stamp)
                }
            };
            self.files.insert((kind, id), state);
        }
        ids
    }
}

/// The file at `path`, opened without access (`O_PATH`: no read permission needed, nothing
/// read); `None` when it cannot be (its probes are then kept for the agent's life).
fn open_path(path: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(::libc::O_PATH | ::libc::O_CLOEXEC)
        .open(path)
        .inspect_err(|e| log::debug!("{}: {e} (kept attached for good)", path.display()))
        .ok()
}

/// Whether process `pid` maps the file `id`.
fn maps_file(pid: u32, id: DevInode) -> bool {
    super::maps::read_maps(pid).is_ok_and(|m| m.iter().any(|e| e.dev_inode == id))
}

/// The processes in /proc that map each of `ids` (those mapped by none are absent). The agent
/// itself is not one: its symbolizer maps the files of processes it still names, which need
/// no probes.
fn processes_mapping(ids: &HashSet<DevInode>) -> HashMap<DevInode, Vec<u32>> {
    let mut out: HashMap<DevInode, Vec<u32>> = HashMap::new();
    let me = std::process::id();
    for pid in crate::procfs::pids().filter(|&pid| pid != me) {
        let Ok(maps) = super::maps::read_maps(pid) else {
            continue;
        };
        for id in maps
            .iter()
            .map(|e| e.dev_inode)
            .filter(|id| ids.contains(id))
        {
            let pids = out.entry(id).or_default();
            if pids.last() != Some(&pid) {
                pids.push(pid);
            }
        }
    }
    out
}

/// The executables of every process in /proc (a process whose executable cannot be read, a
/// kernel thread or one exiting, runs none that matters here).
fn running_executables() -> HashSet<DevInode> {
    crate::procfs::pids()
        .filter_map(|pid| std::fs::metadata(crate::procfs::exe_link(pid)).ok())
        .map(|m| DevInode::from_metadata(&m))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test process's mappings.
    fn own_maps() -> Vec<MapEntry> {
        super::super::maps::read_maps(std::process::id()).unwrap()
    }

    /// This test process's files, from its `maps`.
    fn own_files(maps: &[MapEntry]) -> ProcessFiles<'_> {
        ProcessFiles {
            pid: std::process::id(),
            comm: "test",
            maps,
        }
    }

    #[test]
    fn failure_kinds_from_error_chains() {
        #[derive(Debug)]
        struct Wrap(io::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("map update failed")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e2big = AttachFailure::of(&Wrap(io::Error::from_raw_os_error(::libc::E2BIG)));
        assert_eq!(e2big, AttachFailure::Os(::libc::E2BIG));
        assert!(e2big.is_full());
        let eperm = AttachFailure::of(&Wrap(io::Error::from_raw_os_error(::libc::EPERM)));
        assert!(!eperm.is_full());
        assert_eq!(eperm.label(), "Operation not permitted (os error 1)");
        assert_eq!(AttachFailure::of(&std::fmt::Error), AttachFailure::Other);
        let bad = TargetError::BadElf {
            path: "/x".into(),
            reason: "no .gopclntab".into(),
        };
        assert_eq!(AttachFailure::of_target(&bad), AttachFailure::BadFile);
        for f in [
            AttachFailure::Os(::libc::ENOENT),
            AttachFailure::BadFile,
            AttachFailure::TooManyGoFunctions,
            AttachFailure::DenylistFull,
            AttachFailure::ExecTracepoint,
            AttachFailure::Other,
        ] {
            assert!(f.label().len() <= 60, "{f:?}");
        }
    }

    /// Records what it is asked to attach; fails with `errno` when given.
    #[derive(Default)]
    struct Recorder {
        files: Vec<std::path::PathBuf>,
        mallocgc: Vec<(u32, (u64, u64))>,
        errno: Option<i32>,
        detached: Vec<u64>,
    }

    impl Attacher for Recorder {
        type Error = io::Error;

        fn attach_file(
            &mut self,
            target: &Target,
            _scope: Option<NonZeroU32>,
        ) -> Result<Attached, io::Error> {
            if let Some(errno) = self.errno {
                return Err(io::Error::from_raw_os_error(errno));
            }
            self.files.push(target.path().to_owned());
            Ok(Attached {
                points: match target {
                    Target::Libc(t) => t.probes.len(),
                    Target::Go(t) => t.probes.len(),
                    Target::Sym(t) => t.points.len(),
                },
                handle: None,
            })
        }

        fn detach_file(&mut self, handle: u64) {
            self.detached.push(handle);
        }

        fn set_mallocgc(&mut self, pid: u32, range: (u64, u64)) -> Result<(), io::Error> {
            self.mallocgc.push((pid, range));
            Ok(())
        }
    }

    /// A held file's probes are kept while it has a name, and while a process maps it once
    /// deleted (that process is then remembered as its holder); detached once nothing maps it.
    #[test]
    fn deleted_files_are_released_once_no_process_maps_them() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("allocwatch-release-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A program of our own, so that a child maps it (this process does not count).
        let path = dir.join("sleep");
        std::fs::copy("/bin/sleep", &path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let id = DevInode::from_metadata(&std::fs::metadata(&path).unwrap());
        // No Go file here: which Go functions would be probed does not matter.
        let none = GoProbeSet {
            growth: false,
            malloc: false,
            gc: false,
        };
        let mut targets = Targets::new(none, None);
        let mut probes = Recorder::default();
        let key = (Kind::Sym, id);
        targets.files.insert(key, FileState::NotOfKind(None));
        targets.points_attached = 5;
        let held = Held {
            handle: 7,
            points: 3,
            seen: Instant::now(),
            file: open_path(&path),
            holders: Vec::new(),
        };
        assert!(held.file.is_some());
        targets.held.insert(key, held);
        assert_eq!(targets.release_deleted(&mut probes), 0, "named: kept");

        let mut child = std::process::Command::new(&path).arg("60").spawn().unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while !maps_file(child.id(), id) {
            assert!(
                Instant::now() < deadline,
                "the child never mapped its program"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::fs::remove_file(&path).unwrap();
        assert!(targets.held[&key].deleted());
        assert_eq!(targets.release_deleted(&mut probes), 0, "mapped: kept");
        // Another holder was seen once beside other sessions' tests (not reproduced): name it.
        let holders = &targets.held[&key].holders;
        let who: Vec<String> = holders
            .iter()
            .map(|p| {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                format!("{p}: {}", String::from_utf8_lossy(&cmd).replace('\0', " "))
            })
            .collect();
        assert_eq!(holders, &[child.id()], "holders: {who:?}");
        assert!(probes.detached.is_empty());

        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(targets.release_deleted(&mut probes), 1);
        assert_eq!(probes.detached, [7]);
        assert_eq!(targets.points_attached, 2);
        assert!(!targets.files.contains_key(&key) && !targets.held.contains_key(&key));
        assert_eq!(targets.deleted_files_released, 1);
        assert_eq!(targets.release_deleted(&mut probes), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The registry's verdicts that hold no inode (not of the kind, failed) are about the file
    /// they were made with: another file at the same device and inode (another stamp: a
    /// redeploy that got the old inode number) is analysed again; the same stamp, or an unknown
    /// one, keeps the verdict. This test program (Rust: its `finish_grow`s) as the file.
    #[test]
    fn verdicts_hold_for_their_own_file_only() {
        let maps = own_maps();
        let proc = own_files(&maps);
        let exe = std::fs::metadata("/proc/self/exe").unwrap();
        let (id, same) = (DevInode::from_metadata(&exe), Some(Stamp::of(&exe)));
        let other = Some(Stamp::of(&std::fs::metadata("/bin/true").unwrap()));
        assert_ne!(same, other);
        let set = GoProbeSet {
            growth: true,
            malloc: false,
            gc: false,
        };
        let found = |state: FileState| {
            let mut targets = Targets::new(set, None);
            targets.files.insert((Kind::Sym, id), state);
            let mut probes = Recorder::default();
            let kinds: Vec<Kind> = targets
                .attach_process(&mut probes, &proc, &[Kind::Sym])
                .iter()
                .map(Target::kind)
                .collect();
            assert_eq!(probes.files.len(), kinds.len());
            kinds
        };
        for kept in [
            FileState::NotOfKind(same),
            FileState::NotOfKind(None),
            FileState::Failed(same),
        ] {
            assert_eq!(found(kept), [], "kept");
        }
        for stale in [FileState::NotOfKind(other), FileState::Failed(other)] {
            assert_eq!(found(stale), [Kind::Sym], "analysed again");
        }
    }

    /// A program without an allocator of its own is deleted, and a libc is written to a file
    /// that gets its device and inode (a redeploy on ext4): the libc search's verdict was about
    /// the earlier file, so the new one is examined and attached. Checked where the filesystem
    /// gives the inode number back (ext4 does).
    #[test]
    fn a_new_file_at_a_reused_inode_is_attached() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = std::env::temp_dir().join(format!("allocwatch-reuse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("libaw.so");
        let _one = super::super::maps::tests::inode_reuse_lock();
        std::fs::copy("/bin/true", &path).unwrap();
        let id = DevInode::from_metadata(&std::fs::metadata(&path).unwrap());
        // Mapped by this process, as far as the registry is told.
        let line = format!(
            "7f0000000000-7f0000001000 r-xp 00000000 {:02x}:{:02x} {} {}",
            id.major,
            id.minor,
            id.inode,
            path.display()
        );
        let maps = [super::super::maps::parse_line(&line).unwrap()];
        let proc = own_files(&maps);
        let none = GoProbeSet {
            growth: false,
            malloc: false,
            gc: false,
        };
        let mut targets = Targets::new(none, None);
        let mut probes = Recorder::default();
        for _ in 0..2 {
            let found = targets.attach_process(&mut probes, &proc, &[Kind::Libc]);
            assert!(found.is_empty(), "no malloc in /bin/true");
        }
        // The change time has the kernel's coarse clock (a tick, 1-10 ms).
        std::thread::sleep(std::time::Duration::from_millis(20));
        if let Some(mut new) = super::super::maps::tests::recreate_at_same_inode(&path) {
            let libc = crate::target::elf::tests::own_libc().unwrap();
            io::copy(&mut std::fs::File::open(libc).unwrap(), &mut new).unwrap();
            drop(new);
            assert_eq!(std::fs::metadata(&path).unwrap().ino(), id.inode);
            let kinds: Vec<Kind> = targets
                .attach_process(&mut probes, &proc, &[Kind::Libc])
                .iter()
                .map(Target::kind)
                .collect();
            assert_eq!(kinds, [Kind::Libc]);
            assert_eq!(probes.files, [path]);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// This test process's own libc, found through the registry: attached once however many
    /// processes run it; a failure is counted once and not retried for the same file.
    #[test]
    fn each_file_is_attached_once() {
        let maps = own_maps();
        let proc = own_files(&maps);
        let set = GoProbeSet {
            growth: true,
            malloc: true,
            gc: true,
        };
        let mut targets = Targets::new(set, None);
        let mut probes = Recorder::default();
        let found = targets.attach_process(&mut probes, &proc, &LOADERS);
        // Its libc, and (a Rust program, not Go) its own `finish_grow`s: Rust growth.
        let kinds: Vec<Kind> = found.iter().map(Target::kind).collect();
        assert_eq!(kinds, [Kind::Libc, Kind::Sym]);
        assert_eq!(probes.files.len(), 2);
        let points = targets.points_attached;
        assert!(points >= 3, "at least malloc, free and one finish_grow");
        let again = targets.attach_process(&mut probes, &proc, &LOADERS);
        assert_eq!(again.len(), 2);
        assert_eq!(probes.files.len(), 2, "not attached twice");
        assert_eq!(targets.points_attached, points);
        assert!(targets.failures.is_empty());

        let mut failing = Recorder {
            errno: Some(::libc::EPERM),
            ..Recorder::default()
        };
        let mut targets = Targets::new(set, None);
        assert!(
            targets
                .attach_process(&mut failing, &proc, &LOADERS)
                .is_empty()
        );
        assert!(
            targets
                .attach_process(&mut failing, &proc, &LOADERS)
                .is_empty()
        );
        assert_eq!(
            targets.failures,
            BTreeMap::from([(AttachFailure::Os(::libc::EPERM), 2)]),
            "the libc and the executable, once each"
        );
        assert_eq!(targets.points_attached, 0);
    }

    /// A process that is gone when its files fail to attach (the kernel resolves
    /// /proc/PID/exe, or a file reached through the process, at attach time) leaves no verdict
    /// on them: the next process mapping the same libc gets it attached.
    #[test]
    fn a_gone_process_leaves_its_files_undecided() {
        let set = GoProbeSet {
            growth: true,
            malloc: false,
            gc: false,
        };
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        // Its maps once its exec is done (libc mapped).
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let maps = loop {
            let maps = super::super::maps::read_maps(pid).unwrap();
            if maps
                .iter()
                .any(|m| m.path.as_deref().is_some_and(|p| p.contains("libc.so")))
                || Instant::now() > deadline
            {
                break maps;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        child.kill().unwrap();
        child.wait().unwrap();
        let gone = ProcessFiles {
            pid,
            comm: "sleep",
            maps: &maps,
        };
        let mut targets = Targets::new(set, None);
        let mut failing = Recorder {
            errno: Some(::libc::ENOENT),
            ..Recorder::default()
        };
        assert!(
            targets
                .attach_process(&mut failing, &gone, &LOADERS)
                .is_empty()
        );
        assert!(targets.failures.is_empty(), "{:?}", targets.failures);
        let mut probes = Recorder::default();
        let my_maps = own_maps();
        let alive = own_files(&my_maps);
        let kinds: Vec<Kind> = targets
            .attach_process(&mut probes, &alive, &LOADERS)
            .iter()
            .map(Target::kind)
            .collect();
        assert!(kinds.contains(&Kind::Libc), "{kinds:?}");
    }

    /// The agent without `native_growth`: this Rust test program's `finish_grow`s are not
    /// looked for.
    #[test]
    fn native_growth_off_finds_no_growth_kinds() {
        let maps = own_maps();
        let proc = own_files(&maps);
        let set = GoProbeSet {
            growth: true,
            malloc: false,
            gc: false,
        };
        let mut targets = Targets::new(set, None).without_native_growth();
        let mut probes = Recorder::default();
        let kinds: Vec<Kind> = targets
            .attach_process(&mut probes, &proc, &LOADERS)
            .iter()
            .map(Target::kind)
            .collect();
        assert_eq!(kinds, [Kind::Libc]);
    }

    fn mapping(start: u64, offset: u64, inode: u64) -> MapEntry {
        let line = format!(
            "{start:x}-{:x} r--p {offset:08x} 08:01 {inode} /bin/x",
            start + 0x1000
        );
        super::super::maps::parse_line(&line).unwrap()
    }

    #[test]
    fn load_bias_is_the_mapping_at_offset_zero() {
        let maps = [
            mapping(0x5555_0000_1000, 0x1000, 7),
            mapping(0x5555_0000_0000, 0, 7),
            mapping(0x7000_0000_0000, 0, 8),
        ];
        let id = maps[0].dev_inode;
        assert_eq!(load_bias(&maps, id), Some(0x5555_0000_0000));
        assert_eq!(load_bias(&maps[..1], id), None);
    }
}
