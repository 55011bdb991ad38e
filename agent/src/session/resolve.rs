//! What a session traces: the process (running, or a command launched parked right after its
//! exec) and the files to probe in it, resolved before anything touches the kernel; then
//! attached through the target registry, and noted for the symbolizer as they are mapped.

use std::{
    fs,
    num::NonZeroU32,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    cli::CommonArgs,
    launch::{self, Parked},
    probes::{Capacity, ProbeError, Probes},
    procfs,
    symbolize::SymbolizerHandle,
    target::{
        self, TargetError,
        elf::ElfFile,
        go::{GoProbeSet, GoTarget},
        libc::Served,
        maps::{DevInode, read_maps},
        registry::{Loaded, Target, Targets},
        symprobe::{self, SymTarget},
    },
};

/// The process to trace and the files to probe in it.
pub struct Resolved {
    pub pid: NonZeroU32,
    /// The executable (for a launched command: the resolved program).
    pub exe: PathBuf,
    pub parked: Option<Parked>,
    /// The files serving its allocation API (the one serving `malloc` first).
    pub libc: Option<Served>,
    pub go: Option<Arc<GoTarget>>,
    /// The files to attach: its libc, then its Go runtime, then its symbol probes.
    pub files: Vec<Loaded>,
}

/// The symbol probes of a session: its `--probe`s and the built-in growth functions of the
/// executable and its libstdc++ (`libraries`: what it loads, or has mapped).
fn sym_targets(
    args: &CommonArgs,
    exe: &std::path::Path,
    libraries: &[PathBuf],
) -> anyhow::Result<Vec<Arc<SymTarget>>> {
    Ok(symprobe::for_session(&args.probes, exe, libraries)?)
}

/// The files `pid` has mapped.
fn mapped_files(pid: u32) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = read_maps(pid)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.path.filter(|p| p.starts_with('/')).map(PathBuf::from))
        .collect();
    files.dedup();
    files
}

/// The probe set a session asks for.
pub fn go_probes(args: &CommonArgs) -> GoProbeSet {
    GoProbeSet {
        growth: true,
        malloc: !args.no_go_malloc,
        gc: true,
    }
}

/// Resolves everything that can fail on bad input before touching the kernel. A Go program
/// without cgo has no libc: it is traced through its runtime only.
pub fn resolve(args: &CommonArgs) -> anyhow::Result<Resolved> {
    let no_libc = |e: &TargetError| {
        matches!(
            e,
            TargetError::ProcessNoLibc { .. }
                | TargetError::StaticNoMalloc { .. }
                | TargetError::LibcNotFound { .. }
        )
    };
    let go_probes = go_probes(args);
    let (pid, exe, parked, libc, go, sym) = match args.pid {
        Some(pid) => {
            target::check::process(pid.get())?;
            // A process that exits while it is being read fails in whatever read came next:
            // say that it exited instead.
            let gone = |e: anyhow::Error| exited_instead(pid.get(), e);
            let libc = libc_when_loaded(pid.get());
            if let Err(e @ TargetError::NoSuchProcess { .. }) = libc {
                return Err(gone(e.into()));
            }
            let exe = procfs::exe_link(pid.get());
            let go = target::go::for_exe(&exe, go_probes).map_err(|e| gone(e.into()))?;
            let libc = match libc {
                Ok(l) => Some(l),
                Err(e) if go.is_some() && no_libc(&e) => None,
                Err(e) => return Err(gone(e.into())),
            };
            let sym = sym_targets(args, &exe, &mapped_files(pid.get()))?;
            (pid, exe, None, libc, go, sym)
        }
        None => {
            let exe = target::libc::resolve_program(&args.command[0])?;
            target::check::program(&exe)?;
            let go = target::go::for_exe(&exe, go_probes)?;
            let libc = match target::libc_for_command(&args.command[0]) {
                Ok(l) => Some(l),
                Err(e) if go.is_some() && no_libc(&e) => None,
                Err(e) => return Err(e.into()),
            };
            let libraries = ElfFile::open(&exe)
                .map(|e| target::libc::libraries_of(&e))
                .unwrap_or_default();
            let sym = sym_targets(args, &exe, &libraries)?;
            let parked = launch::park(&args.command)?;
            let pid = NonZeroU32::new(parked.pid()).context("fork returned pid 0")?;
            (pid, exe, Some(parked), libc, go, sym)
        }
    };
    let go = go.map(Arc::new);
    let mut files: Vec<Loaded> = libc
        .iter()
        .flat_map(Served::files)
        .map(|l| Loaded {
            id: l.dev_inode,
            target: Target::Libc(Arc::clone(l)),
        })
        .collect();
    if let Some(g) = &go {
        let meta = fs::metadata(&g.path)
            .with_context(|| g.path.display().to_string())
            .map_err(|e| exited_instead(pid.get(), e))?;
        files.push(Loaded {
            id: DevInode::from_metadata(&meta),
            target: Target::Go(Arc::clone(g)),
        });
    }
    for t in sym {
        let meta = fs::metadata(&t.path)
            .with_context(|| t.path.display().to_string())
            .map_err(|e| exited_instead(pid.get(), e))?;
        files.push(Loaded {
            id: DevInode::from_metadata(&meta),
            target: Target::Sym(t),
        });
    }
    Ok(Resolved {
        pid,
        exe,
        parked,
        libc,
        go,
        files,
    })
}

/// `e`, or that `pid` exited when it did (a read of a process that exits fails in whatever
/// read comes next, with an errno that names nothing the user did).
pub fn exited_instead(pid: u32, e: anyhow::Error) -> anyhow::Error {
    // On its way out counts: an exiting process has lost its files (its exe link reads ENOENT)
    // before its state turns Z.
    if procfs::is_ending(pid) {
        TargetError::ExitedDuringAttach { pid }.into()
    } else {
        e
    }
}

/// The libc of a running process. One that has just exec'd may not have mapped its libc yet
/// (ld.so maps it within a few milliseconds): when its executable needs one, wait for it a
/// little rather than call it a program without malloc.
fn libc_when_loaded(pid: u32) -> Result<Served, TargetError> {
    let first = target::libc_for_pid(pid);
    if !matches!(first, Err(TargetError::ProcessNoLibc { .. })) {
        return first;
    }
    let needs_libc = target::elf::dynamic_info(procfs::exe_link(pid))
        .is_ok_and(|d| d.needed.iter().any(|n| n.starts_with("libc.")));
    if !needs_libc {
        return first;
    }
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        std::thread::sleep(Duration::from_millis(2));
        let again = target::libc_for_pid(pid);
        if !matches!(again, Err(TargetError::ProcessNoLibc { .. }))
            || Instant::now() >= deadline
            || procfs::has_exited(pid)
        {
            return again;
        }
    }
}

/// Attaches the resolved files (for this process only with `scope`, else for every process,
/// which the followed set narrows), and does the per-process step of those whose addresses do
/// not depend on where the process maps them. The registry, for the programs it execs later.
pub fn attach(
    probes: &mut Probes,
    r: &Resolved,
    go_probes: GoProbeSet,
    scope: Option<NonZeroU32>,
) -> Result<Targets, ProbeError> {
    let mut targets = Targets::new(go_probes, scope);
    for f in &r.files {
        targets.attach(probes, f)?;
    }
    for f in r.files.iter().filter(|f| !f.target.needs_maps()) {
        f.in_process(probes, r.pid.get(), &[])?;
    }
    Ok(targets)
}

/// The per-process step of the files whose addresses are known only once the process has
/// mapped them (a position-independent Go binary's `mallocgc`).
pub fn attach_mapped(probes: &mut Probes, r: &Resolved) -> anyhow::Result<()> {
    if !r.files.iter().any(|f| f.target.needs_maps()) {
        return Ok(());
    }
    let maps = read_maps(r.pid.get())?;
    for f in r.files.iter().filter(|f| f.target.needs_maps()) {
        f.in_process(probes, r.pid.get(), &maps)?;
    }
    Ok(())
}

/// A map the kernel would not create (out of memory for the capacities asked) named with the
/// flag that sizes it; any other load error as it is.
pub fn explain_load_error(e: ProbeError, capacity: &Capacity) -> anyhow::Error {
    let errno = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
        .find_map(|e| e.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error);
    if matches!(errno, Some(libc::ENOMEM | libc::E2BIG)) {
        anyhow::anyhow!(
            "the kernel could not allocate the eBPF maps (--max-live {}, --max-sites {}, \
             --max-stacks {}, --max-pending {}): {}; lower them",
            capacity.max_live,
            capacity.max_sites,
            capacity.max_stacks,
            capacity.max_pending,
            std::io::Error::from_raw_os_error(errno.unwrap_or(libc::ENOMEM)),
        )
    } else {
        e.into()
    }
}

/// Snapshots a freshly exec'd process's mappings for the symbolizer as soon as each of `files`
/// (in order: the executable, then the probed libc) is mapped, for at most 100 ms or until the
/// process is gone. The executable is mapped within the execve call itself; libc follows when
/// ld.so loads it. Noting after each keeps the program's own frames nameable even if a very
/// short command exits before libc is seen.
///
/// This blocks and spins on purpose: a small program can map libc, run and exit within a
/// millisecond, finer than any timer.
pub fn note_when_mapped(symbolizer: &SymbolizerHandle, pid: u32, files: &[DevInode]) {
    let deadline = Instant::now() + Duration::from_millis(100);
    let mut noted = 0;
    while noted < files.len() && Instant::now() < deadline {
        match read_maps(pid) {
            // No mappings: in the middle of execve (the new, still empty address space), or a
            // zombie with nothing left to read.
            Ok(maps) if maps.is_empty() => {
                if procfs::has_exited(pid) {
                    return;
                }
                std::thread::yield_now();
            }
            Ok(maps) => {
                let mapped = files
                    .iter()
                    .take_while(|f| maps.iter().any(|m| m.dev_inode == **f))
                    .count();
                if mapped > noted {
                    symbolizer.note_process(pid);
                    noted = mapped;
                } else {
                    std::thread::yield_now();
                }
            }
            // Reading the maps of a task in the middle of execve fails transiently.
            Err(_) if !procfs::has_exited(pid) => std::thread::yield_now(),
            Err(_) => return,
        }
    }
    if noted < files.len() {
        symbolizer.note_process(pid);
    }
}
