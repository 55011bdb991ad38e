//! One tracing session: resolve the target, attach, follow it until it exits (or the duration
//! ends, or Ctrl-C/SIGTERM), then report. `top` and `leaks` differ only in their views.

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{IsTerminal as _, Write as _},
    num::NonZeroU32,
    os::fd::{FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use allocwatch_common::{
    Event,
    libc::{Api, SiteKey},
    loss::LossCause,
};
use anyhow::{Context as _, anyhow};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    aggregate::{self, call_chain},
    cli::CommonArgs,
    collect, launch, preflight,
    probes::{ProbeConfig, Probes},
    report::{self, Leak, LeaksReport, ProcessInfo, Site, TopReport},
    symbolize::{Frame, SymbolizerHandle},
    target::{self, maps::DevInode},
};

/// What the session shows.
#[derive(Clone, Copy, Debug)]
pub enum View {
    Top { interval: Duration },
    Leaks { min_age: Duration },
}

/// Why the session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Exited,
    Duration,
    Signal(i32),
}

pub async fn run(view: View, args: CommonArgs) -> anyhow::Result<()> {
    preflight::check()?;
    let symbolizer = SymbolizerHandle::spawn();

    // Resolve everything that can fail on bad input before touching the kernel.
    let (pid, parked, libc) = match args.pid {
        Some(pid) => (pid, None, target::libc_for_pid(pid.get())?),
        None => {
            let libc = target::libc_for_command(&args.command[0])?;
            let parked = launch::park(&args.command)?;
            let pid = NonZeroU32::new(parked.pid()).context("fork returned pid 0")?;
            (pid, Some(parked), libc)
        }
    };
    let launched = parked.is_some();
    let pidfd = pidfd_open(pid.get())
        .with_context(|| format!("process {pid} does not exist (or exited already)"))?;

    let mut probes = Probes::load(&ProbeConfig {
        tgid: Some(pid),
        stacks: !args.no_stacks,
        capacity: args.capacity,
    })?;
    probes.attach_libc(&libc.path, &libc.probes, Some(pid))?;
    let ring = collect::take_events(&mut probes.ebpf)?;
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from)?;
    if let Some(parked) = parked {
        parked.release()?;
    }
    let mut frames = FrameCache::default();
    if launched {
        // The command maps its libraries after exec; snapshot its mappings as soon as the probed
        // libc is among them, so that even a command that exits within milliseconds is named.
        note_when_mapped(&symbolizer, pid.get(), libc.dev_inode);
    } else {
        symbolizer.note_process(pid.get());
    }
    frames.noted.insert(pid.get());
    let started = Instant::now();
    let mut info = ProcessInfo {
        pid: pid.get(),
        libc: libc.display_path.clone(),
        aliases: libc.aliases.clone(),
        ..Default::default()
    };
    refresh_identity(&mut info);
    eprintln!(
        "allocwatch: tracing pid {pid} ({}): {} probes on {}",
        info.comm,
        probes.attached_points(),
        info.libc
    );

    // SAFETY: an OwnedFd keeps its fd open and unchanged while the AsyncFd owns it.
    let mut pidfd = unsafe { AsyncFd::register(pidfd) }.map_err(std::io::Error::from)?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let live_interval = match view {
        View::Top { interval } if !args.json && args.output.is_none() => Some(interval),
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
                frames.resolve_events(&probes, &symbolizer, &mut info, &mut events).await?;
            }
            _ = pidfd.readable_mut() => break End::Exited,
            _ = sleep_until(deadline) => break End::Duration,
            _ = sigint.recv() => break End::Signal(libc::SIGINT),
            _ = sigterm.recv() => break End::Signal(libc::SIGTERM),
            _ = tick.tick(), if live_interval.is_some() => {
                let r = top_report(&probes, &symbolizer, &mut frames, &info, started).await?;
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
        info.exit_code = reap(pid.get());
        info.exited = info.exit_code.is_some();
    } else {
        info.exited = end == End::Exited || !process_alive(pid.get());
    }

    // Final drain: notifications emitted just before the exit.
    bad_records += collect::drain(ring.get_mut(), &mut events);
    frames
        .resolve_events(&probes, &symbolizer, &mut info, &mut events)
        .await?;
    if bad_records > 0 {
        eprintln!("allocwatch: warning: {bad_records} malformed ring-buffer records ignored");
    }

    let rendered = match view {
        View::Top { .. } => {
            let r = top_report(&probes, &symbolizer, &mut frames, &info, started).await?;
            if args.json {
                report::json::top(&[r])?
            } else {
                report::text::top(&r, args.top)
            }
        }
        View::Leaks { min_age } => {
            let r = leaks_report(&probes, &symbolizer, &mut frames, &info, min_age).await?;
            if args.json {
                report::json::leaks(&[r])?
            } else {
                report::text::leaks(&r, args.top)
            }
        }
    };
    // Detach before writing: the report must not wait on the traced process.
    drop(probes);
    match &args.output {
        Some(path) => fs::write(path, rendered + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => println!("{rendered}"),
    }
    Ok(())
}

/// Symbolized call chains by (process, stack, caller), filled while the process is alive.
#[derive(Default)]
struct FrameCache {
    chains: HashMap<(u32, i32, u64), Vec<Frame>>,
    /// Processes whose mappings were snapshotted after their first event (a launched command
    /// maps its libraries only after exec, after the session's first snapshot).
    noted: HashSet<u32>,
    /// Chains that could not be symbolized because the process was gone.
    process_gone: u64,
}

impl FrameCache {
    async fn resolve_events(
        &mut self,
        probes: &Probes,
        symbolizer: &SymbolizerHandle,
        info: &mut ProcessInfo,
        events: &mut Vec<Event>,
    ) -> anyhow::Result<()> {
        for ev in events.drain(..) {
            match ev {
                Event::NewSite(site) => {
                    if self.noted.insert(site.tgid) {
                        symbolizer.note_process(site.tgid);
                        refresh_identity(info);
                    }
                    self.frames(probes, symbolizer, &site).await?;
                }
            }
        }
        Ok(())
    }

    async fn frames(
        &mut self,
        probes: &Probes,
        symbolizer: &SymbolizerHandle,
        site: &SiteKey,
    ) -> anyhow::Result<Vec<Frame>> {
        let key = (site.tgid, site.stack_id, site.ret_addr);
        if let Some(f) = self.chains.get(&key) {
            return Ok(f.clone());
        }
        let stack = collect::stack(&probes.ebpf, site.stack_id)?;
        let chain = call_chain(site.ret_addr, &stack);
        let frames = match symbolizer.symbolize_async(site.tgid, chain.clone()).await {
            Ok(frames) => frames,
            Err(e) if e.is_process_gone() => {
                self.process_gone += 1;
                chain.iter().map(|&a| Frame::unknown(a)).collect()
            }
            Err(e) => return Err(anyhow!("symbolizing pid {}: {e}", site.tgid)),
        };
        self.chains.insert(key, frames.clone());
        Ok(frames)
    }
}

fn lost_map(
    probes: &Probes,
    frames: &FrameCache,
) -> anyhow::Result<std::collections::BTreeMap<&'static str, u64>> {
    let mut lost: std::collections::BTreeMap<&'static str, u64> = collect::lost(&probes.ebpf)?
        .into_iter()
        .map(|(cause, n): (LossCause, u64)| (cause.name(), n))
        .collect();
    lost.insert("symbolize_process_gone", frames.process_gone);
    Ok(lost)
}

async fn top_report(
    probes: &Probes,
    symbolizer: &SymbolizerHandle,
    frames: &mut FrameCache,
    info: &ProcessInfo,
    started: Instant,
) -> anyhow::Result<TopReport> {
    let rows = collect::sites(&probes.ebpf, Some(info.pid))?;
    let overflow = collect::overflow(&probes.ebpf)?;
    let totals = aggregate::totals(rows.iter(), &overflow);
    let mut sites: Vec<Site> = Vec::with_capacity(rows.len());
    let mut by_source: HashMap<(Api, Vec<SourceFrame<'_>>), usize> = HashMap::new();
    let mut chains = Vec::with_capacity(rows.len());
    for (key, stats) in &rows {
        let site = Site {
            api: Api::try_from(key.api)?,
            frames: frames.frames(probes, symbolizer, key).await?,
            stats: *stats,
        };
        chains.push(site);
    }
    // Call instructions the compiler duplicated (unrolled loops) symbolize to the same source
    // chain: one site for the reader.
    for site in &chains {
        match by_source.entry((site.api, site.frames.iter().map(SourceFrame::of).collect())) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let existing = &mut sites[*e.get()];
                existing.stats = aggregate::sum_stats([existing.stats, site.stats].iter());
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(sites.len());
                sites.push(site.clone());
            }
        }
    }
    // Allocation sites by bytes first, then free sites by calls.
    sites.sort_by_key(|s| {
        (
            s.api == Api::Free,
            std::cmp::Reverse(s.stats.bytes),
            std::cmp::Reverse(s.stats.calls),
        )
    });
    Ok(TopReport {
        info: info.clone(),
        elapsed_secs: started.elapsed().as_secs_f64(),
        totals,
        lost: lost_map(probes, frames)?,
        sites,
        symbolization: symbolizer.stats(),
    })
}

async fn leaks_report(
    probes: &Probes,
    symbolizer: &SymbolizerHandle,
    frames: &mut FrameCache,
    info: &ProcessInfo,
    min_age: Duration,
) -> anyhow::Result<LeaksReport> {
    let live = collect::live(&probes.ebpf, Some(info.pid))?;
    let now = monotonic_ns();
    let groups = aggregate::leaks(&live, now, min_age.as_nanos() as u64);
    let mut leaks = Vec::with_capacity(groups.len());
    for g in &groups {
        leaks.push(Leak {
            api: Api::try_from(g.site.api)?,
            frames: frames.frames(probes, symbolizer, &g.site).await?,
            count: g.count,
            bytes: g.bytes,
            oldest_age_secs: g.oldest_age_ns as f64 / 1e9,
        });
    }
    Ok(LeaksReport {
        info: info.clone(),
        min_age_secs: min_age.as_secs_f64(),
        live_allocations: live.len() as u64,
        live_bytes: live.iter().map(|(_, a)| a.size).sum(),
        lost: lost_map(probes, frames)?,
        leaks,
        symbolization: symbolizer.stats(),
    })
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

/// Polls the maps of a freshly exec'd process until `libc` is mapped (ld.so maps every needed
/// library before running any of them), for at most 100 ms or until the process is gone.
///
/// This blocks on purpose, with a short sleep: a small program can map libc, run and exit
/// within a millisecond, finer than the async timer.
fn note_when_mapped(symbolizer: &SymbolizerHandle, pid: u32, libc: DevInode) {
    let deadline = Instant::now() + Duration::from_millis(100);
    while Instant::now() < deadline {
        match target::maps::read_maps(pid) {
            Ok(maps) if maps.iter().any(|m| m.dev_inode == libc) => break,
            // A zombie has no mappings left: nothing more to wait for.
            Ok(maps) if maps.is_empty() => return,
            Ok(_) => std::thread::sleep(Duration::from_micros(20)),
            Err(_) => return,
        }
    }
    symbolizer.note_process(pid);
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
