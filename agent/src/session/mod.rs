//! One tracing session: resolve the target, attach, follow it until it exits (or the duration
//! ends, or Ctrl-C/SIGTERM), then report. `top`, `leaks` and `maps` differ only in their views.
//!
//! - `resolve.rs`: the process and its files, attached through the target registry;
//! - `follow.rs`: the processes it starts, followed in the kernel (unless `--no-follow`);
//! - `view.rs`: the session's state and its reports.
//!
//! Records flow through the pipeline the agent uses too (`crate::pipeline`).

mod follow;
mod resolve;
mod view;

use std::{
    fs,
    io::IsTerminal as _,
    num::NonZeroU32,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use self::{
    follow::Tree,
    view::{Tracer, Watched, refresh_identity},
};
use crate::{
    aggregate::Sampling,
    cli::CommonArgs,
    collect,
    daemon::exec_snapshots,
    frames::FrameCache,
    gostate::GoState,
    model::SiteSnapshot,
    pipeline::Pipeline,
    preflight,
    probes::{Capacity, Filter, ProbeConfig, Probes},
    procfs,
    report::{
        self, LeaksReport, ProcessInfo, TopReport,
        files::{print_stdout, write_flamegraph, write_pprof, write_report},
        flame::FlameWeight,
    },
    symbolize::SymbolizerHandle,
    target::{TargetError, libc::Served, maps::DevInode},
    unwind::load::{Tables, UnwindMaps},
};

/// What the session shows.
#[derive(Clone, Debug)]
pub enum View {
    Top {
        interval: Duration,
        /// Extra outputs written at the end.
        flamegraph: Option<PathBuf>,
        pprof: Option<PathBuf>,
    },
    Leaks {
        interval: Duration,
        min_age: Duration,
        flamegraph: Option<PathBuf>,
    },
    Maps,
}

/// Why the session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Exited,
    Duration,
    Signal(i32),
}

pub async fn run(view: View, args: CommonArgs) -> anyhow::Result<()> {
    if matches!(view, View::Leaks { .. }) && !args.mode.tracks_live() {
        anyhow::bail!("leaks needs outstanding allocations: use --mode full or stacks-off");
    }
    if args.sample_bytes > 0 && !args.mode.samples(!args.no_stacks) {
        anyhow::bail!(
            "--sample-bytes samples stacks and outstanding allocations: --mode {} {} neither",
            args.mode.name(),
            if args.no_stacks {
                "with --no-stacks records"
            } else {
                "records"
            }
        );
    }
    preflight::check()?;
    let resolved = resolve::resolve(&args)?;
    let pid = resolved.pid;
    let launched = resolved.parked.is_some();
    let (mut tracer, pidfd) = start(resolved, &args)?;
    // SAFETY: an OwnedFd keeps its fd open and unchanged while the AsyncFd owns it.
    let mut pidfd = unsafe { AsyncFd::register(pidfd) }.map_err(std::io::Error::from)?;
    let end = follow(&mut tracer, &mut pidfd, &view, &args).await?;
    finish(&mut tracer.watched.info, &mut pidfd, end, launched, pid).await;
    // The report ends here, for every API at once, and the traced process is let go before
    // the final drain and the naming of its sites, which can take seconds on a loaded machine.
    if let Err(e) = tracer.pipe.parts.probes.stop() {
        crate::say!(
            "allocwatch: warning: the probes' stop flag: {e} (the report may end a few milliseconds apart per function)"
        );
    }

    // Final drain: records emitted just before the stop, and the Go growth counted in the
    // kernel.
    tracer.drain_go_agg().await?;
    let bad_records = tracer.pipe.stats.malformed_records;
    if bad_records > 0 {
        crate::say!("allocwatch: warning: {bad_records} malformed ring-buffer records ignored");
    }
    let rendered = render(&mut tracer, &view, &args).await?;
    drop(tracer);
    write_report(args.output.as_deref(), rendered)
}

/// Loads and attaches the probes, lets a launched command run, and notes the process for the
/// symbolizer; the pidfd that says when it exits.
fn start(mut r: resolve::Resolved, args: &CommonArgs) -> anyhow::Result<(Tracer, OwnedFd)> {
    let pid = r.pid;
    let launched = r.parked.is_some();
    let pidfd = procfs::pidfd_open(pid.get())
        .map_err(|_| TargetError::ExitedDuringAttach { pid: pid.get() })?;
    let capacity = Capacity::from(args.capacity);
    let unwind = args.unwind.tables()
        && args.mode.stacks()
        && !args.no_stacks
        && crate::unwind::TABLES_SUPPORTED;
    // Following, the probes go into every process that maps the files, and the kernel's
    // followed set narrows them to the tree; without, into the one process.
    let load = |follow: bool| {
        Probes::load_mode(
            &ProbeConfig {
                tgid: (!follow).then_some(pid),
                filter: if follow { Filter::Follow } else { Filter::None },
                stacks: args.mode.stacks() && !args.no_stacks,
                sample_bytes: args.sample_bytes,
                capacity,
                unwind_tables: unwind,
            },
            args.mode,
        )
        .map_err(|e| resolve::explain_load_error(e, &capacity))
    };
    // A process that exits while the probes go in makes the attach fail with an errno that
    // names nothing the user did: say what happened instead.
    let exited = |e: anyhow::Error| {
        if launched {
            e
        } else {
            resolve::exited_instead(pid.get(), e)
        }
    };
    // Like strace: a launched command is followed unless --no-follow; a running process
    // only with --follow (following plants the libc probes machine-wide and adds tracepoints
    // to the attach).
    let want_follow = if launched {
        !args.no_follow
    } else {
        args.follow
    };
    let (mut probes, follow) = if !want_follow {
        (load(false)?, false)
    } else {
        let mut probes = load(true)?;
        match probes.follow(pid) {
            Ok(()) => (probes, true),
            Err(e) if !launched && procfs::has_exited(pid.get()) => {
                return Err(exited(e.into()));
            }
            // The tracepoints need tracefs (absent, or not ours without root): the one
            // process is still worth tracing, and the user is told what is missing.
            Err(e) => {
                crate::say!(
                    "allocwatch: warning: cannot follow the processes pid {pid} starts ({e}): \
                     tracing it alone, as with --no-follow"
                );
                drop(probes);
                (load(false)?, false)
            }
        }
    };
    let mut tables = if unwind {
        Some(Tables::new(UnwindMaps::take(&mut probes)?, args.unwind))
    } else {
        None
    };
    let scope = (!follow).then_some(pid);
    let targets = resolve::attach(&mut probes, &r, resolve::go_probes(args), scope)
        .map_err(|e| exited(e.into()))?;
    // Started before the command runs: the first snapshot of a short command must not wait
    // for a thread to start.
    let mut pipe = Pipeline::new(probes, FrameCache::default(), SymbolizerHandle::spawn())?;
    // The tree's programs' maps are read the moment they exec, as the agent reads them.
    let exec_snapshots = if follow {
        collect::take_exec_notify(&mut pipe.parts.probes)
            .map_err(anyhow::Error::from)
            .and_then(|ring| Ok(exec_snapshots::spawn(ring, pipe.parts.symbolizer.clone())?))
            .inspect_err(|e| crate::say!("allocwatch: warning: exec snapshots: {e}"))
            .ok()
    } else {
        None
    };
    let mut info = ProcessInfo {
        pid: pid.get(),
        libc: r
            .libc
            .as_ref()
            .map_or_else(String::new, |l| l.primary().display_path.clone()),
        allocator: r.libc.as_ref().map(|l| l.allocator()),
        allocator_files: r
            .libc
            .as_ref()
            .map(|l| l.files().iter().map(|f| f.display_path.clone()).collect())
            .unwrap_or_default(),
        aliases: r.libc.as_ref().map(Served::aliases).unwrap_or_default(),
        ..Default::default()
    };
    let parts = &mut pipe.parts;
    if let Some(parked) = r.parked.take() {
        // Stopped right after exec: note its executable and identity before it can run (and
        // exit; /proc/PID/exe of an exited process cannot be read).
        let mut stopped = parked.release()?;
        parts.symbolizer.note_process(pid.get());
        refresh_identity(&mut info);
        // The program and ld.so, before either runs; then the libraries that serve the
        // probed functions (libc), as ld.so maps them: a command that called into libc before
        // its table was in would have its first stacks walked with frame pointers there (cut
        // short, and split from the same stacks walked later).
        if let Some(t) = &mut tables {
            view::load_unwind(t, pid.get());
            let libs: Vec<DevInode> = r
                .libc
                .iter()
                .flat_map(|l| l.files().iter().map(|f| f.dev_inode))
                .collect();
            if !libs.is_empty() && stopped.run_until(|| exec_mapped(pid.get(), &libs)) {
                view::load_unwind(t, pid.get());
            }
        }
        stopped.resume();
        // The command maps its libraries after exec; snapshot its mappings as soon as the
        // probed file is among them, so that even a command that exits within milliseconds
        // is named.
        let mut files = Vec::new();
        if let Ok(meta) = fs::metadata(&r.exe) {
            files.push(DevInode::from_metadata(&meta));
        }
        files.extend(
            r.libc
                .iter()
                .flat_map(|l| l.files().iter().map(|f| f.dev_inode)),
        );
        resolve::note_when_mapped(&parts.symbolizer, pid.get(), &files);
    } else {
        parts.symbolizer.note_process(pid.get());
    }
    if let Some(t) = &mut tables {
        view::load_unwind(t, pid.get());
    }
    resolve::attach_mapped(&mut parts.probes, &r).map_err(exited)?;
    parts.frames.noted.insert(pid.get());
    let mut tracer = Tracer {
        pipe,
        watched: Watched {
            info,
            go: r.go.as_deref().map(GoState::new),
            tree: Tree::new(follow, pid.get(), launched, targets, r.go.is_some()),
        },
        _exec_snapshots: exec_snapshots,
        unwind: tables,
        probe_kinds: crate::target::symprobe::kinds(&args.probes),
        probes_attached: probes_attached(&r),
        go_target: r.go,
        started: Instant::now(),
        top_k: args.top,
        sampling: Sampling {
            bytes: args.sample_bytes,
            stacks: args.mode.stacks() && !args.no_stacks,
        },
    };
    refresh_identity(&mut tracer.watched.info);
    banner(&tracer);
    Ok((tracer, pidfd))
}

/// Whether every file of `files` has an executable mapping in `pid`.
fn exec_mapped(pid: u32, files: &[DevInode]) -> bool {
    let Ok(maps) = crate::target::maps::read_maps(pid) else {
        return false;
    };
    files
        .iter()
        .all(|f| maps.iter().any(|m| m.perms.exec && m.dev_inode == *f))
}

/// What is traced, on stderr (and what is not, as warnings).
fn banner(tracer: &Tracer) {
    let info = &tracer.watched.info;
    let mut what = Vec::new();
    if !info.libc.is_empty() {
        what.push(info.libc.clone());
    }
    if let Some(g) = &tracer.go_target {
        what.push(format!("Go {} runtime", g.version.raw));
        for w in &g.warnings {
            crate::say!("allocwatch: warning: {w}");
        }
    }
    let children = if tracer.watched.tree.on {
        " and the processes it starts"
    } else {
        ""
    };
    crate::say!(
        "allocwatch: tracing pid {} ({}){children}: {} probes on {}",
        info.pid,
        info.comm,
        tracer.pipe.parts.probes.attached_points(),
        what.join(" and ")
    );
}

/// How often a Go program's maps are read (`gort::live`).
const MAP_READ_INTERVAL: Duration = Duration::from_secs(1);
/// The symbol-probe ids the resolved files attach.
fn probes_attached(r: &resolve::Resolved) -> std::collections::BTreeSet<u32> {
    r.files
        .iter()
        .filter_map(|f| match &f.target {
            crate::target::registry::Target::Sym(t) => Some(t.points.iter().map(|p| p.probe)),
            _ => None,
        })
        .flatten()
        .collect()
}

/// How often the traced process's mappings are checked for files without unwind tables.
const UNWIND_INTERVAL: Duration = Duration::from_millis(100);

/// Handles records until the process exits, the duration ends or a signal comes; `top` and
/// `leaks` without `--json` or `--output` redraw their table every interval meanwhile.
async fn follow(
    tracer: &mut Tracer,
    pidfd: &mut AsyncFd<OwnedFd>,
    view: &View,
    args: &CommonArgs,
) -> anyhow::Result<End> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let live_interval = match view {
        View::Top { interval, .. } | View::Leaks { interval, .. }
            if !args.json && args.output.is_none() =>
        {
            Some(*interval)
        }
        _ => None,
    };
    let mut tick = tokio::time::interval(live_interval.unwrap_or(Duration::from_secs(3600)));
    tick.tick().await;
    // Go maps' lengths are read from the process while it lives (after it exits its last
    // reads stand).
    let reads_maps = tracer.watched.go.is_some();
    let mut map_tick = tokio::time::interval(MAP_READ_INTERVAL);
    map_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Libraries mapped after the start (dlopen) get their tables within this interval.
    let mut unwind_tick = tokio::time::interval(UNWIND_INTERVAL);
    unwind_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let unwinds = tracer.unwind.is_some();
    loop {
        tokio::select! {
            ready = tracer.pipe.readable() => {
                ready?;
                tracer.drain().await?;
            }
            _ = pidfd.readable_mut() => return Ok(End::Exited),
            _ = sleep_until(deadline) => return Ok(End::Duration),
            _ = sigint.recv() => return Ok(End::Signal(libc::SIGINT)),
            _ = sigterm.recv() => return Ok(End::Signal(libc::SIGTERM)),
            _ = map_tick.tick(), if reads_maps => {
                tracer.drain_go_agg().await?;
                tracer.refresh_maps();
            }
            _ = unwind_tick.tick(), if unwinds => tracer.refresh_unwind(),
            _ = tick.tick(), if live_interval.is_some() => {
                tracer.drain_go_agg().await?;
                let text = match view {
                    View::Leaks { min_age, .. } => {
                        report::text::leaks(&tracer.leaks_report(*min_age).await?, args.top)
                    }
                    _ => report::text::top(&tracer.top_report().await?, args.top),
                };
                let clear = if std::io::stdout().is_terminal() { "\x1b[2J\x1b[H" } else { "" };
                print_stdout(&format!("{clear}{text}\n"))?;
            }
        }
    }
}

/// A launched command is ours: when the session ends first (duration, Ctrl-C, SIGTERM) it
/// gets the signal (SIGTERM for the duration), its last calls are still counted, and it is
/// not left running behind us. Notes how the process ended.
async fn finish(
    info: &mut ProcessInfo,
    pidfd: &mut AsyncFd<OwnedFd>,
    end: End,
    launched: bool,
    pid: NonZeroU32,
) {
    if launched && end != End::Exited {
        let sig = match end {
            End::Signal(sig) => sig,
            _ => libc::SIGTERM,
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid.get() as i32, sig) };
        if tokio::time::timeout(Duration::from_secs(5), pidfd.readable_mut())
            .await
            .is_err()
        {
            // SAFETY: as above.
            unsafe { libc::kill(pid.get() as i32, libc::SIGKILL) };
            let _ = pidfd.readable_mut().await;
        }
    }
    if launched {
        info.exit_code = reap(pid.get());
        info.exited = info.exit_code.is_some();
    } else {
        info.exited = end == End::Exited || !procfs::alive(pid.get());
    }
}

/// The final report in the view's format, and its extra files.
async fn render(tracer: &mut Tracer, view: &View, args: &CommonArgs) -> anyhow::Result<String> {
    Ok(match view {
        View::Top {
            flamegraph, pprof, ..
        } => {
            let r = tracer.top_report().await?;
            export_profiles(&r, flamegraph.as_deref(), pprof.as_deref())?;
            if args.json {
                report::json::top(&[r])?
            } else {
                report::text::top(&r, args.top)
            }
        }
        View::Maps => {
            let r = tracer.top_report().await?;
            if args.json {
                report::json::top(&[r])?
            } else {
                report::text::maps(&r, args.top)
            }
        }
        View::Leaks {
            min_age,
            flamegraph,
            ..
        } => {
            let r = tracer.leaks_report(*min_age).await?;
            if let Some(path) = flamegraph {
                leaks_flamegraph(&r, path)?;
            }
            if args.json {
                report::json::leaks(&[r])?
            } else {
                report::text::leaks(&r, args.top)
            }
        }
    })
}

/// Writes `--flamegraph` and `--pprof` from the final report.
fn export_profiles(
    r: &TopReport,
    flamegraph: Option<&Path>,
    pprof: Option<&Path>,
) -> anyhow::Result<()> {
    if flamegraph.is_none() && pprof.is_none() {
        return Ok(());
    }
    let snap = report::snapshot_of(r);
    if let Some(path) = flamegraph {
        let title = format!(
            "allocwatch: {} (pid {}) bytes by site",
            r.info.comm, r.info.pid
        );
        let weight = FlameWeight::Bytes;
        write_flamegraph(path, &snap.sites, weight, &title, "no allocation sites")?;
    }
    if let Some(path) = pprof {
        write_pprof(path, &snap, r.sample_bytes)?;
    }
    Ok(())
}

/// `leaks --flamegraph`: the outstanding bytes by stack.
fn leaks_flamegraph(r: &LeaksReport, path: &Path) -> anyhow::Result<()> {
    let sites: Vec<_> = r
        .leaks
        .iter()
        .map(|l| SiteSnapshot {
            kind: l.api.name(),
            frames: l.frames.clone().into(),
            calls: l.count,
            bytes: l.bytes,
            live_allocations: l.count,
            live_bytes: l.bytes,
            remainder: false,
            pending: false,
            probe: false,
        })
        .collect();
    let title = format!(
        "allocwatch: {} (pid {}) outstanding bytes by stack",
        r.info.comm, r.info.pid
    );
    write_flamegraph(
        path,
        &sites,
        FlameWeight::LiveBytes,
        &title,
        "nothing to draw",
    )
}

/// Waits for our launched child; its exit code, or 128+signal.
fn reap(pid: u32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
    if r <= 0 {
        return None;
    }
    if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Some(128 + libc::WTERMSIG(status))
    } else {
        None
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
