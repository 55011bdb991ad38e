//! One tracing session: resolve the target, attach, follow it until it exits (or the duration
//! ends, or Ctrl-C/SIGTERM), then report. `top`, `leaks` and `maps` differ only in their views.

use std::{
    collections::{BTreeMap, HashMap, hash_map::Entry},
    fs,
    io::{IsTerminal as _, Write as _},
    num::NonZeroU32,
    os::fd::{FromRawFd as _, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use allocwatch_common::{
    Event,
    go::GoProc,
    libc::{Api, SiteKey},
    loss::LossCause,
    map_names,
};
use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    aggregate,
    cli::{CapacityArgs, CommonArgs},
    collect,
    frames::FrameCache,
    gort::versions::MapImpl,
    gostate::{GoSiteKey, GoState, Pauses},
    launch::{self, Parked},
    preflight,
    probes::{Filter, ProbeConfig, Probes},
    report::{
        self, GoMap, GoReport, GoSite, Leak, LeaksReport, PauseSummary, ProcessInfo, Site,
        TopReport,
    },
    symbolize::{Frame, SymbolizerHandle},
    target::{
        self, TargetError,
        go::{GoProbeSet, GoTarget},
        libc::LibcTarget,
        maps::{DevInode, read_maps},
    },
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

/// The process to trace and the files to probe in it.
struct Target {
    pid: NonZeroU32,
    /// The executable (for a launched command: the resolved program).
    exe: PathBuf,
    parked: Option<Parked>,
    libc: Option<LibcTarget>,
    go: Option<GoTarget>,
}

/// Resolves everything that can fail on bad input before touching the kernel. A Go program
/// without cgo has no libc: it is traced through its runtime only.
fn resolve(args: &CommonArgs) -> anyhow::Result<Target> {
    let no_libc = |e: &TargetError| {
        matches!(
            e,
            TargetError::ProcessNoLibc { .. }
                | TargetError::StaticNoMalloc { .. }
                | TargetError::LibcNotFound { .. }
        )
    };
    let go_probes = GoProbeSet {
        growth: true,
        malloc: !args.no_go_malloc,
        gc: true,
    };
    match args.pid {
        Some(pid) => {
            target::check::process(pid.get())?;
            // A process that exits while it is being read fails in whatever read came next:
            // say that it exited instead.
            let gone = |e: anyhow::Error| {
                if has_exited(pid.get()) {
                    TargetError::ExitedDuringAttach { pid: pid.get() }.into()
                } else {
                    e
                }
            };
            let libc = libc_when_loaded(pid.get());
            if let Err(e @ TargetError::NoSuchProcess { .. }) = libc {
                return Err(gone(e.into()));
            }
            let exe = PathBuf::from(format!("/proc/{pid}/exe"));
            let go = target::go::for_exe(&exe, go_probes).map_err(|e| gone(e.into()))?;
            let libc = match libc {
                Ok(l) => Some(l),
                Err(e) if go.is_some() && no_libc(&e) => None,
                Err(e) => return Err(gone(e.into())),
            };
            Ok(Target {
                pid,
                exe,
                parked: None,
                libc,
                go,
            })
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
            let parked = launch::park(&args.command)?;
            let pid = NonZeroU32::new(parked.pid()).context("fork returned pid 0")?;
            Ok(Target {
                pid,
                exe,
                parked: Some(parked),
                libc,
                go,
            })
        }
    }
}

/// The libc of a running process. One that has just exec'd may not have mapped its libc yet
/// (ld.so maps it within a few milliseconds): when its executable needs one, wait for it a
/// little rather than call it a program without malloc.
fn libc_when_loaded(pid: u32) -> Result<LibcTarget, TargetError> {
    let first = target::libc_for_pid(pid);
    if !matches!(first, Err(TargetError::ProcessNoLibc { .. })) {
        return first;
    }
    let needs_libc = target::elf::dynamic_info(format!("/proc/{pid}/exe"))
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
            || has_exited(pid)
        {
            return again;
        }
    }
}

pub async fn run(view: View, args: CommonArgs) -> anyhow::Result<()> {
    if matches!(view, View::Leaks { .. }) && !args.mode.tracks_live() {
        anyhow::bail!("leaks needs outstanding allocations: use --mode full or stacks-off");
    }
    preflight::check()?;
    let target = resolve(&args)?;
    let Target {
        pid,
        exe: exe_path,
        parked,
        libc,
        go,
    } = target;
    let launched = parked.is_some();
    let pidfd =
        pidfd_open(pid.get()).map_err(|_| TargetError::ExitedDuringAttach { pid: pid.get() })?;

    let capacity = args.capacity;
    let mut probes = Probes::load_mode(
        &ProbeConfig {
            tgid: Some(pid),
            filter: Filter::None,
            stacks: args.mode.stacks() && !args.no_stacks,
            capacity,
        },
        args.mode,
    )
    .map_err(|e| explain_load_error(e, &capacity))?;
    // A process that exits while the probes go in makes the attach fail with an errno that
    // names nothing the user did: say what happened instead.
    let exited = |e: anyhow::Error| {
        if !launched && has_exited(pid.get()) {
            TargetError::ExitedDuringAttach { pid: pid.get() }.into()
        } else {
            e
        }
    };
    if let Some(libc) = &libc {
        probes
            .attach_libc(&libc.path, &libc.probes, Some(pid))
            .map_err(|e| exited(e.into()))?;
    }
    if let Some(go) = &go {
        probes
            .attach_go(&go.path, &go.probes, Some(pid))
            .map_err(|e| exited(e.into()))?;
        if let (Some((start, end)), false) = (go.mallocgc, go.pie) {
            probes
                .set_go_process(
                    pid.get(),
                    GoProc {
                        mallocgc_start: start,
                        mallocgc_end: end,
                    },
                )
                .map_err(|e| exited(e.into()))?;
        }
    }
    let ring = collect::take_events(&mut probes.ebpf)?;
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from)?;
    // Started before the command runs: the first snapshot of a short command must not wait
    // for a thread to start.
    let symbolizer = SymbolizerHandle::spawn();
    let mut info = ProcessInfo {
        pid: pid.get(),
        libc: libc
            .as_ref()
            .map_or_else(String::new, |l| l.display_path.clone()),
        aliases: libc.as_ref().map(|l| l.aliases.clone()).unwrap_or_default(),
        ..Default::default()
    };
    if let Some(parked) = parked {
        // Stopped right after exec: note its executable and identity before it can run (and
        // exit; /proc/PID/exe of an exited process cannot be read).
        let stopped = parked.release()?;
        symbolizer.note_process(pid.get());
        refresh_identity(&mut info);
        stopped.resume();
    }
    if launched {
        // The command maps its libraries after exec; snapshot its mappings as soon as the probed
        // file is among them, so that even a command that exits within milliseconds is named.
        let mut files = Vec::new();
        if let Ok(meta) = fs::metadata(&exe_path) {
            files.push(DevInode::from_metadata(&meta));
        }
        files.extend(libc.iter().map(|l| l.dev_inode));
        note_when_mapped(&symbolizer, pid.get(), &files);
    } else {
        symbolizer.note_process(pid.get());
    }
    if let Some(go) = go.as_ref().filter(|g| g.pie) {
        set_pie_mallocgc(&mut probes, pid.get(), go).map_err(exited)?;
    }

    let mut tracer = Tracer {
        probes,
        symbolizer,
        frames: FrameCache::default(),
        info,
        go: go.as_ref().map(GoState::new),
        go_target: go,
        started: Instant::now(),
        top_k: args.top,
    };
    tracer.frames.noted.insert(pid.get());
    refresh_identity(&mut tracer.info);
    let mut what = Vec::new();
    if !tracer.info.libc.is_empty() {
        what.push(tracer.info.libc.clone());
    }
    if let Some(g) = &tracer.go_target {
        what.push(format!("Go {} runtime", g.version.raw));
        for w in &g.warnings {
            eprintln!("allocwatch: warning: {w}");
        }
    }
    eprintln!(
        "allocwatch: tracing pid {pid} ({}): {} probes on {}",
        tracer.info.comm,
        tracer.probes.attached_points(),
        what.join(" and ")
    );

    // SAFETY: an OwnedFd keeps its fd open and unchanged while the AsyncFd owns it.
    let mut pidfd = unsafe { AsyncFd::register(pidfd) }.map_err(std::io::Error::from)?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let live_interval = match view {
        View::Top { interval, .. } if !args.json && args.output.is_none() => Some(interval),
        _ => None,
    };
    let mut tick = tokio::time::interval(live_interval.unwrap_or(Duration::from_secs(3600)));
    tick.tick().await;
    let mut events = Vec::new();
    let mut bad_records = 0u64;

    let end = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                bad_records += collect::drain(guard.get_inner_mut(), &mut events);
                guard.clear_ready();
                tracer.handle(&mut events).await?;
            }
            _ = pidfd.readable_mut() => break End::Exited,
            _ = sleep_until(deadline) => break End::Duration,
            _ = sigint.recv() => break End::Signal(libc::SIGINT),
            _ = sigterm.recv() => break End::Signal(libc::SIGTERM),
            _ = tick.tick(), if live_interval.is_some() => {
                let r = tracer.top_report().await?;
                let mut out = std::io::stdout().lock();
                if out.is_terminal() {
                    write!(out, "\x1b[2J\x1b[H")?;
                }
                writeln!(out, "{}", report::text::top(&r, args.top))?;
            }
        }
    };

    // A launched command is ours: when the session ends first (duration, Ctrl-C, SIGTERM) it
    // gets the signal (SIGTERM for the duration), its last calls are still counted, and it is
    // not left running behind us.
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
        tracer.info.exit_code = reap(pid.get());
        tracer.info.exited = tracer.info.exit_code.is_some();
    } else {
        tracer.info.exited = end == End::Exited || !process_alive(pid.get());
    }

    // Final drain: records emitted just before the exit.
    bad_records += collect::drain(ring.get_mut(), &mut events);
    tracer.handle(&mut events).await?;
    if bad_records > 0 {
        eprintln!("allocwatch: warning: {bad_records} malformed ring-buffer records ignored");
    }

    let rendered = match &view {
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
        } => {
            let r = tracer.leaks_report(*min_age).await?;
            if let Some(path) = flamegraph {
                let sites: Vec<_> = r
                    .leaks
                    .iter()
                    .map(|l| crate::serve::model::SiteSnapshot {
                        kind: l.api.symbol(),
                        frames: l.frames.clone().into(),
                        calls: l.count,
                        bytes: l.bytes,
                        live_allocations: l.count,
                        live_bytes: l.bytes,
                        remainder: false,
                    })
                    .collect();
                let title = format!(
                    "allocwatch: {} (pid {}) outstanding bytes by stack",
                    r.info.comm, r.info.pid
                );
                write_flamegraph(path, &sites, report::flame::FlameWeight::LiveBytes, &title)?;
            }
            if args.json {
                report::json::leaks(&[r])?
            } else {
                report::text::leaks(&r, args.top)
            }
        }
    };
    // Detach before writing: the report must not wait on the traced process.
    drop(tracer);
    match &args.output {
        Some(path) => fs::write(path, rendered + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => println!("{rendered}"),
    }
    Ok(())
}

/// A map the kernel would not create (out of memory for the capacities asked) named with the
/// flag that sizes it; any other load error as it is.
fn explain_load_error(e: crate::probes::ProbeError, capacity: &CapacityArgs) -> anyhow::Error {
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

/// Writes `--flamegraph` and `--pprof` from the final report.
fn export_profiles(
    r: &TopReport,
    flamegraph: Option<&std::path::Path>,
    pprof: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    if flamegraph.is_none() && pprof.is_none() {
        return Ok(());
    }
    let snap = report::snapshot_of(r);
    if let Some(path) = flamegraph {
        let file =
            fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
        let title = format!(
            "allocwatch: {} (pid {}) bytes by site",
            r.info.comm, r.info.pid
        );
        match report::flame::write_sites_svg(
            &snap.sites,
            report::flame::FlameWeight::Bytes,
            &title,
            std::io::BufWriter::new(file),
        ) {
            Ok(()) => {}
            Err(report::flame::FlameError::Empty(_)) => {
                eprintln!(
                    "allocwatch: warning: no allocation sites: {} is empty",
                    path.display()
                );
            }
            Err(e) => return Err(e).with_context(|| format!("cannot write {}", path.display())),
        }
    }
    if let Some(path) = pprof {
        let bytes = report::pprof::encode(
            std::slice::from_ref(&snap),
            &report::pprof::ProfileOptions::new(report::pprof::DefaultSample::AllocSpace),
        )?;
        fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn write_flamegraph(
    path: &std::path::Path,
    sites: &[crate::serve::model::SiteSnapshot],
    weight: report::flame::FlameWeight,
    title: &str,
) -> anyhow::Result<()> {
    let file =
        fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    match report::flame::write_sites_svg(sites, weight, title, std::io::BufWriter::new(file)) {
        Ok(()) => Ok(()),
        Err(report::flame::FlameError::Empty(_)) => {
            eprintln!(
                "allocwatch: warning: nothing to draw: {} is empty",
                path.display()
            );
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot write {}", path.display())),
    }
}

/// For a position-independent Go binary, `runtime.mallocgc`'s runtime range is known once the
/// executable is mapped.
fn set_pie_mallocgc(probes: &mut Probes, pid: u32, go: &GoTarget) -> anyhow::Result<()> {
    let Some((start, end)) = go.mallocgc else {
        return Ok(());
    };
    let exe = fs::metadata(&go.path).with_context(|| go.path.display().to_string())?;
    let id = DevInode::from_metadata(&exe);
    // Go PIE binaries start with a PT_LOAD of vaddr 0 at file offset 0: the base of that
    // mapping is the load bias.
    let base = read_maps(pid)?
        .into_iter()
        .find(|m| m.dev_inode == id && m.offset == 0)
        .map(|m| m.start);
    if let Some(base) = base {
        probes.set_go_process(
            pid,
            GoProc {
                mallocgc_start: base + start,
                mallocgc_end: base + end,
            },
        )?;
    }
    Ok(())
}

/// The state of a session after attaching.
struct Tracer {
    probes: Probes,
    symbolizer: SymbolizerHandle,
    frames: FrameCache,
    info: ProcessInfo,
    go: Option<GoState>,
    go_target: Option<GoTarget>,
    started: Instant,
    top_k: usize,
}

impl Tracer {
    async fn handle(&mut self, events: &mut Vec<Event>) -> anyhow::Result<()> {
        for ev in events.drain(..) {
            let (tgid, stack_id, ret_addr) = match ev {
                // Only the agent attaches the exec tracepoint.
                Event::Exec(..) => continue,
                Event::NewSite(site, _, stack) => {
                    self.frames.remember_event_stack(
                        &self.probes,
                        site.tgid,
                        site.stack_id,
                        stack,
                    )?;
                    (site.tgid, site.stack_id, site.ret_addr)
                }
                Event::Go(g) => {
                    if let Some(state) = &mut self.go {
                        state.record(&g);
                    }
                    (g.header.tgid, g.stack_id, g.ret_addr)
                }
            };
            if self.frames.noted.insert(tgid) {
                self.symbolizer.note_process(tgid);
                refresh_identity(&mut self.info);
            }
            // Symbolize now, while the process is alive (once per chain: a Go program streams
            // one event per growth, and cloning the cached chain for each one made the loop
            // slower than the probes at ~100k events/s).
            if self.frames.cached(tgid, stack_id, ret_addr).is_none() {
                self.frames
                    .frames(&self.probes, &self.symbolizer, tgid, stack_id, ret_addr)
                    .await?;
            }
        }
        Ok(())
    }

    fn lost(&self) -> anyhow::Result<BTreeMap<&'static str, u64>> {
        let mut lost: BTreeMap<&'static str, u64> = collect::lost(&self.probes.ebpf)?
            .into_iter()
            .map(|(cause, n): (LossCause, u64)| (cause.name(), n))
            .collect();
        lost.insert("symbolize_process_gone", self.frames.process_gone);
        if let Some(go) = &self.go {
            lost.insert("go_map_instances_untracked", go.maps_untracked);
        }
        Ok(lost)
    }

    async fn top_report(&mut self) -> anyhow::Result<TopReport> {
        let pid = self.info.pid;
        let rows = collect::sites(&self.probes.ebpf, Some(pid))?;
        let overflow = collect::overflow(&self.probes.ebpf)?;
        let totals = aggregate::totals(rows.iter(), &overflow);
        let mut chains = Vec::with_capacity(rows.len());
        for (key, stats) in &rows {
            chains.push(Site {
                api: Api::try_from(key.api)?,
                frames: self.site_frames(key).await?,
                stats: *stats,
            });
        }
        let mut sites = merge_by_source(
            chains,
            |s| s.api as u32,
            |a, b| {
                a.stats = aggregate::sum_stats([a.stats, b.stats].iter());
            },
        );
        // Allocation sites by bytes first, then free sites by calls.
        sites.sort_by_key(|s| {
            (
                s.api == Api::Free,
                std::cmp::Reverse(s.stats.bytes),
                std::cmp::Reverse(s.stats.calls),
            )
        });
        let go = self.go_report().await?;
        Ok(TopReport {
            info: self.info.clone(),
            elapsed_secs: self.started.elapsed().as_secs_f64(),
            totals,
            lost: self.lost()?,
            sites,
            symbolization: self.symbolizer.stats(),
            go,
        })
    }

    async fn site_frames(&mut self, key: &SiteKey) -> anyhow::Result<Vec<Frame>> {
        self.frames
            .frames(
                &self.probes,
                &self.symbolizer,
                key.tgid,
                key.stack_id,
                key.ret_addr,
            )
            .await
    }

    async fn go_report(&mut self) -> anyhow::Result<Option<GoReport>> {
        let Some(state) = &self.go else {
            return Ok(None);
        };
        let pid = self.info.pid;
        let mut site_keys: Vec<(GoSiteKey, u64, u64)> = state
            .sites
            .iter()
            .map(|(k, c)| (*k, c.count, c.bytes))
            .collect();
        site_keys.sort();
        let maps: Vec<_> = state
            .top_maps(self.top_k.max(1) * 10)
            .into_iter()
            .cloned()
            .collect();
        let mut report = GoReport {
            version: state.version.clone(),
            map_impl: if state.swiss { "swiss" } else { "buckets" },
            map_grows: state.map_grows.clone(),
            map_grow_bytes: state.map_grow_bytes,
            slice_grows: state.slice_grows,
            slice_grow_bytes: state.slice_grow_bytes,
            slice_moves: state.slice_moves.count,
            slice_move_bytes: state.slice_moves.bytes,
            large_allocs: state.large_allocs.count,
            large_alloc_bytes: state.large_allocs.bytes,
            gc_starts: state.gc_starts,
            gc_cycles: state.gc_cycles,
            gc_pauses: pause_summary(&state.gc_pauses),
            stw_pauses: pause_summary(&state.stw_pauses),
            maps_tracked: state.maps.len() as u64,
            maps_untracked: state.maps_untracked,
            measured: self.go_target.as_ref().is_some_and(|g| g.measured),
            warnings: self
                .go_target
                .as_ref()
                .map(|g| g.warnings.clone())
                .unwrap_or_default(),
            ..GoReport::default()
        };
        report.alloc_sizes = collect::hist(&self.probes.ebpf, map_names::GO_HIST)?
            .into_iter()
            .filter(|((tgid, _), _)| *tgid == pid)
            .map(|((_, bucket), v)| (1u64 << bucket, v.count, v.bytes))
            .collect();
        let mut sites = Vec::with_capacity(site_keys.len());
        for (key, count, bytes) in site_keys {
            sites.push(GoSite {
                kind: key.kind.name(),
                frames: self
                    .frames
                    .frames(
                        &self.probes,
                        &self.symbolizer,
                        pid,
                        key.stack_id,
                        key.ret_addr,
                    )
                    .await?,
                count,
                bytes,
            });
        }
        let mut sites = merge_by_source(
            sites,
            |s| s.kind.as_ptr() as u32,
            |a, b| {
                a.count += b.count;
                a.bytes += b.bytes;
            },
        );
        sites.sort_by_key(|s| (std::cmp::Reverse(s.bytes), std::cmp::Reverse(s.count)));
        report.sites = sites;
        for m in maps {
            let frames = match m.first_site {
                Some(k) => {
                    self.frames
                        .frames(&self.probes, &self.symbolizer, pid, k.stack_id, k.ret_addr)
                        .await?
                }
                None => Vec::new(),
            };
            report.maps.push(GoMap {
                ptr: m.ptr,
                grows: m.grows,
                by_kind: m.by_kind.clone(),
                bytes: m.bytes,
                size_class: m.size_class,
                dir_len: m.dir_len,
                len_at_last_grow: m.len_at_last_grow,
                frames,
            });
        }
        if self
            .go_target
            .as_ref()
            .is_some_and(|g| g.maps == MapImpl::Buckets)
        {
            report.map_impl = "buckets";
        }
        Ok(Some(report))
    }

    async fn leaks_report(&mut self, min_age: Duration) -> anyhow::Result<LeaksReport> {
        let live = collect::live(&self.probes.ebpf, Some(self.info.pid))?;
        let now = monotonic_ns();
        let groups = aggregate::leaks(&live, now, min_age.as_nanos() as u64);
        let mut leaks = Vec::with_capacity(groups.len());
        for g in &groups {
            leaks.push(Leak {
                api: Api::try_from(g.site.api)?,
                frames: self.site_frames(&g.site).await?,
                count: g.count,
                bytes: g.bytes,
                oldest_age_secs: g.oldest_age_ns as f64 / 1e9,
            });
        }
        Ok(LeaksReport {
            info: self.info.clone(),
            min_age_secs: min_age.as_secs_f64(),
            live_allocations: live.len() as u64,
            live_bytes: live.iter().map(|(_, a)| a.size).sum(),
            lost: self.lost()?,
            leaks,
            symbolization: self.symbolizer.stats(),
        })
    }
}

/// Rows whose call chains symbolize to the same source (call instructions the compiler
/// duplicated, e.g. in unrolled loops) become one row for the reader. `class` separates rows
/// that must not merge (different APIs or kinds).
fn merge_by_source<T: Clone + HasFrames>(
    rows: Vec<T>,
    class: impl Fn(&T) -> u32,
    merge: impl Fn(&mut T, &T),
) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(rows.len());
    let mut index: HashMap<(u32, Vec<SourceFrame<'_>>), usize> = HashMap::new();
    for row in &rows {
        let key = (
            class(row),
            row.frames().iter().map(SourceFrame::of).collect(),
        );
        match index.entry(key) {
            Entry::Occupied(e) => merge(&mut out[*e.get()], row),
            Entry::Vacant(e) => {
                e.insert(out.len());
                out.push(row.clone());
            }
        }
    }
    out
}

trait HasFrames {
    fn frames(&self) -> &[Frame];
}

impl HasFrames for Site {
    fn frames(&self) -> &[Frame] {
        &self.frames
    }
}

impl HasFrames for GoSite {
    fn frames(&self) -> &[Frame] {
        &self.frames
    }
}

fn pause_summary(p: &Pauses) -> PauseSummary {
    PauseSummary {
        count: p.count,
        sum: p.sum_ns as f64 / 1e9,
        max: p.max_ns as f64 / 1e9,
        buckets: p
            .hist
            .iter()
            .map(|(&b, &n)| ((1u64 << (b + 1)) as f64 / 1e9, n))
            .collect(),
    }
}

/// A frame as the reader sees it: function, file and line when symbolized, else the address.
#[derive(PartialEq, Eq, Hash)]
enum SourceFrame<'a> {
    Named(&'a str, Option<&'a str>, Option<u32>),
    Address(u64),
}

impl<'a> SourceFrame<'a> {
    fn of(f: &'a Frame) -> Self {
        match &f.function {
            Some(func) => Self::Named(func, f.file.as_deref(), f.line),
            None => Self::Address(f.address),
        }
    }
}

/// Reads comm and exe while the process is alive (after exec they name the command).
fn refresh_identity(info: &mut ProcessInfo) {
    if let Ok(comm) = fs::read_to_string(format!("/proc/{}/comm", info.pid)) {
        info.comm = comm.trim_end().to_string();
    }
    if let Ok(exe) = fs::read_link(format!("/proc/{}/exe", info.pid)) {
        info.exe = exe.display().to_string();
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether `pid` is gone or a zombie (state Z or X in /proc/<pid>/stat).
fn has_exited(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next());
    matches!(state, None | Some('Z' | 'X'))
}

fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
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

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Snapshots a freshly exec'd process's mappings for the symbolizer as soon as each of `files`
/// (in order: the executable, then the probed libc) is mapped, for at most 100 ms or until the
/// process is gone. The executable is mapped within the execve call itself; libc follows when
/// ld.so loads it. Noting after each keeps the program's own frames nameable even if a very
/// short command exits before libc is seen.
///
/// This blocks and spins on purpose: a small program can map libc, run and exit within a
/// millisecond, finer than any timer.
fn note_when_mapped(symbolizer: &SymbolizerHandle, pid: u32, files: &[DevInode]) {
    let deadline = Instant::now() + Duration::from_millis(100);
    let mut noted = 0;
    while noted < files.len() && Instant::now() < deadline {
        match read_maps(pid) {
            // No mappings: in the middle of execve (the new, still empty address space), or a
            // zombie with nothing left to read.
            Ok(maps) if maps.is_empty() => {
                if has_exited(pid) {
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
            Err(_) if !has_exited(pid) => std::thread::yield_now(),
            Err(_) => return,
        }
    }
    if noted < files.len() {
        symbolizer.note_process(pid);
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
