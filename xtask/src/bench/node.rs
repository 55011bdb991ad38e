//! `./x bench`, section `node`: what the agent costs a whole node (issue 15). A few hundred
//! processes stay alive throughout (`fixtures/bench/node_idle.c`, waking every 200 ms to
//! allocate, and the soak's steady allocator); a fixed batch of short-lived programs (the
//! soak's `sh`, python3 and `libc_fixture run`, and the Go bench workload) runs a few at a time
//! under each configuration: no agent, `allocwatch agent` in several modes, bpftrace's
//! memleak-like script on the whole node. Per run: the batch's wall and CPU time, the
//! tracer's CPU, the CPU spent in its BPF programs (the kernel's run-time statistics, enabled
//! for the section) and the events it lost.

use std::{
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use super::*;
use crate::{
    fixtures,
    soak::{IDLE_COMM, PYTHON, STEADY_COMM, kernel},
};

/// The section's knobs (`./x bench --node-*`).
pub(super) struct NodeOpts {
    /// Rounds of the batch (each: one of every short-lived program).
    pub(super) rounds: usize,
    /// Mostly idle processes alive throughout.
    pub(super) idle: usize,
    /// Short-lived programs running at once.
    pub(super) parallel: usize,
}

/// `gogrowth ROUNDS`: about 50 ms untraced here.
const GO_ROUNDS: &str = "50";
/// At most this many repetitions (every run starts a tracer; the default run stays ~10 min).
const MAX_REPS: usize = 5;
const MEMLEAK: &str = "live allocations (memleak-like)";
/// How long the tracer is measured before the batch.
const IDLE_WINDOW: Duration = Duration::from_secs(3);

#[derive(Clone, Debug)]
enum NodeTracer {
    None,
    /// `allocwatch agent --listen 127.0.0.1:PORT FLAGS`.
    Agent(&'static [&'static str]),
    /// `bpftrace -e SCRIPT` on the whole node.
    Bpftrace(String),
}

struct NodeConfig {
    name: String,
    tracer: NodeTracer,
}

/// A bench script of [`bpftrace_scripts`] for every process, not only its `-c` child.
pub(super) fn node_wide(script: &str) -> String {
    script
        .replace(" /pid == cpid/", "")
        .replace("pid == cpid && ", "")
}

fn node_configs(libc: &str, with_bpftrace: bool) -> Vec<NodeConfig> {
    let agent = |name: &str, flags: &'static [&'static str]| NodeConfig {
        name: name.into(),
        tracer: NodeTracer::Agent(flags),
    };
    let mut configs = vec![
        NodeConfig {
            name: "no agent".into(),
            tracer: NodeTracer::None,
        },
        agent(
            "agent, defaults (full, sample_bytes 512 KiB, unwind fp)",
            &[],
        ),
        // Walks the sampled stacks of every process with a file built without frame pointers
        // (Debian's libc: all C programs) with tables: what it costs a node decides whether it
        // can be the agent's default.
        agent("agent --unwind auto", &["--unwind", "auto"]),
        agent("agent --mode count-stacks", &["--mode", "count-stacks"]),
        agent("agent --mode count", &["--mode", "count"]),
        agent(
            "agent --sample-bytes 0 (full, exact)",
            &["--sample-bytes", "0"],
        ),
    ];
    if with_bpftrace
        && let Some(Tracer::Bpftrace(_, script)) = bpftrace_scripts(libc)
            .into_iter()
            .find(|t| matches!(t, Tracer::Bpftrace(n, _) if *n == MEMLEAK))
    {
        configs.push(NodeConfig {
            name: format!("bpftrace {MEMLEAK}, whole node"),
            tracer: NodeTracer::Bpftrace(node_wide(&script)),
        });
    }
    configs
}

/// One run of the batch under one configuration.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct NodeRun {
    /// The batch's wall time, s.
    pub(super) wall: f64,
    /// The batch's CPU time (user + system of the programs and their children), s.
    pub(super) cpu: f64,
    /// CPU of the long-lived processes over the batch, fraction of one core.
    pub(super) background: f64,
    /// The tracer's own CPU (utime + stime) over the batch, fraction of one core.
    pub(super) tracer: Option<f64>,
    /// The tracer's CPU and its BPF programs' run time over [`IDLE_WINDOW`] before the batch
    /// (the long-lived processes and the rest of the machine only), fractions of one core.
    pub(super) before: Option<(f64, f64)>,
    /// Time spent in the tracer's BPF programs, fraction of one core, and runs per second.
    pub(super) bpf: Option<(f64, f64)>,
    /// Events the agent counted as lost since its start, by cause (non-zero only).
    pub(super) lost: Option<BTreeMap<String, f64>>,
    /// CPU of everything else on the machine over the batch (other users' builds and tests),
    /// fraction of one core.
    pub(super) other: f64,
    /// The agent's RSS after the batch, MiB.
    pub(super) rss_mib: Option<f64>,
}

pub(super) fn node_section(
    paths: &Paths,
    b: &Bench,
    out_dir: &Path,
    opts: &NodeOpts,
) -> anyhow::Result<String> {
    if opts.rounds == 0 || opts.parallel == 0 {
        bail!("--node-rounds and --node-parallel must be positive");
    }
    let built = fixtures::build(paths)?;
    let libc_fixture = built.c.join("libc_fixture");
    let steady = built.c.join(STEADY_COMM);
    let idle = build_c_bench(paths, out_dir, IDLE_COMM)?;
    let toolchains = go::ensure_toolchains(&paths.cache)?;
    let tc = toolchains
        .last()
        .ok_or_else(|| anyhow!("no Go toolchain (run `./x fixtures`)"))?;
    let gogrowth = out_dir.join(format!("gogrowth-{}", tc.version));
    go::build_fixture_with(
        tc,
        &paths.root.join("fixtures/bench/gogrowth"),
        &gogrowth,
        false,
        None,
    )?;
    let libc = libc_path(&idle)?;
    let with_bpftrace = cmd::stdout_if_ok(Command::new("bpftrace").arg("--version")).is_some();
    let configs = node_configs(&libc, with_bpftrace);
    let reps = b.reps.min(MAX_REPS);

    // Ctrl-C (SIGTERM, SIGHUP) only sets this flag from here on: the section then stops its
    // tracer and its processes (dropped in order) before it returns.
    let interrupted = Arc::new(AtomicBool::new(false));
    let mut sig_ids = Vec::new();
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        sig_ids.push(
            signal_hook::flag::register(sig, Arc::clone(&interrupted))
                .context("installing a signal handler")?,
        );
    }
    let result = (|| {
        // Only the sysctl's own setting (other holders of BPF_ENABLE_STATS do not show).
        let stats_were_on =
            fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1");
        let _stats = enable_bpf_stats()?;
        let mut background = KillOnDrop(Vec::new());
        eprintln!(
            "bench: node: starting {} {IDLE_COMM} processes and {STEADY_COMM}",
            opts.idle
        );
        for _ in 0..opts.idle {
            background.0.push(spawn_quiet(&mut Command::new(&idle))?);
        }
        background.0.push(spawn_quiet(&mut Command::new(&steady))?);
        let bg_pids: Vec<u32> = background.0.iter().map(Child::id).collect();
        let progs = Programs {
            libc_fixture: &libc_fixture,
            gogrowth: &gogrowth,
        };
        let mut runs: Vec<Vec<NodeRun>> = configs.iter().map(|_| Vec::new()).collect();
        let mut notes = Vec::new();
        let mut loads = Vec::new();
        for rep in 0..reps {
            loads.push(load_average());
            for i in 0..configs.len() {
                let k = (i + rep) % configs.len();
                let (run, foreign) =
                    node_run(b, &configs[k], &progs, opts, &bg_pids, &interrupted)?;
                eprintln!(
                    "  rep {} {:<48} wall {:6.2} s cpu {:6.2} s tracer {} bpf {} lost {}",
                    rep + 1,
                    configs[k].name,
                    run.wall,
                    run.cpu,
                    run.tracer
                        .map_or("—".into(), |c| format!("{:.1} %", c * 100.0)),
                    run.bpf
                        .map_or("—".into(), |(c, _)| format!("{:.1} %", c * 100.0)),
                    run.lost.as_ref().map_or("—".into(), |l| format!("{l:?}")),
                );
                if !foreign.is_empty() {
                    notes.push(format!(
                        "rep {} {}: {}",
                        rep + 1,
                        configs[k].name,
                        foreign.join(", ")
                    ));
                }
                runs[k].push(run);
            }
        }
        Ok(node_markdown(
            &configs,
            &runs,
            opts,
            tc,
            reps,
            &loads,
            &notes,
            stats_were_on,
        ))
    })();
    for id in sig_ids {
        signal_hook::low_level::unregister(id);
    }
    if interrupted.load(Ordering::SeqCst) {
        bail!("interrupted: the tracer and the workload were stopped");
    }
    result
}

/// The short-lived programs' binaries.
struct Programs<'a> {
    libc_fixture: &'a Path,
    gogrowth: &'a Path,
}

/// The batch: `rounds` × (sh, python3, libc_fixture, gogrowth), in that order.
fn batch(p: &Programs<'_>, rounds: usize) -> Vec<(&'static str, Command)> {
    let mut jobs = Vec::with_capacity(rounds * 4);
    for _ in 0..rounds {
        let mut sh = Command::new("sh");
        sh.args(["-c", "ls /usr/bin | sort"]);
        let mut py = Command::new("python3");
        py.args(["-c", PYTHON]);
        let mut c = Command::new(p.libc_fixture);
        c.arg("run");
        let mut go = Command::new(p.gogrowth);
        go.arg(GO_ROUNDS);
        jobs.extend([
            ("sh", sh),
            ("python3", py),
            ("libc_fixture", c),
            ("gogrowth", go),
        ]);
    }
    jobs
}

/// In its own process group (a terminal's Ctrl-C reaches only the bench, which then stops
/// everything in order), output discarded.
fn spawn_quiet(cmd: &mut Command) -> anyhow::Result<Child> {
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::show(cmd)))
}

/// Runs the batch, `parallel` programs at a time; every program must exit 0.
fn run_batch(
    jobs: Vec<(&'static str, Command)>,
    parallel: usize,
    interrupted: &AtomicBool,
) -> anyhow::Result<()> {
    let mut pending = jobs.into_iter();
    let mut running: Vec<(&'static str, Child)> = Vec::new();
    let mut guard = KillOnDrop(Vec::new());
    loop {
        if interrupted.load(Ordering::SeqCst) {
            guard.0.extend(running.into_iter().map(|(_, c)| c));
            bail!("interrupted");
        }
        while running.len() < parallel {
            let Some((name, mut cmd)) = pending.next() else {
                break;
            };
            running.push((name, spawn_quiet(&mut cmd)?));
        }
        if running.is_empty() {
            return Ok(());
        }
        let mut failed = None;
        running.retain_mut(|(name, child)| match child.try_wait() {
            Ok(None) => true,
            Ok(Some(st)) => {
                if !st.success() {
                    failed = Some(format!("{name} exited with {st}"));
                }
                false
            }
            Err(e) => {
                failed = Some(format!("waiting for {name}: {e}"));
                false
            }
        });
        if let Some(f) = failed {
            guard.0.extend(running.into_iter().map(|(_, c)| c));
            bail!("the batch failed: {f}");
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// The kernel's BPF run-time statistics (`run_time_ns`, `run_cnt`) while the returned fd is
/// open (BPF_ENABLE_STATS: the switch `sysctl kernel.bpf_stats_enabled` turns on, counted per
/// holder, so it goes back to what it was however this process ends, SIGKILL included; the
/// sysctl keeps showing only its own setting).
fn enable_bpf_stats() -> anyhow::Result<OwnedFd> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr's enable_stats: { __u32 type }, BPF_STATS_RUN_TIME = 0.
    let attr: u32 = 0;
    // SAFETY: bpf(2) reads size_of::<u32>() bytes of `attr`, which lives across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            &attr as *const u32,
            size_of::<u32>() as libc::c_uint,
        )
    };
    if fd < 0 {
        bail!(
            "bpf(BPF_ENABLE_STATS) failed: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a new fd the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// user + system CPU seconds of the children this process has reaped.
fn reaped_children_cpu() -> f64 {
    // SAFETY: an all-zero rusage is valid; getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage that outlives the call.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// CPU ticks of `pids` (those gone count 0).
fn cpu_ticks_of(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| cpu_ticks(p).ok()).sum()
}

/// Busy CPU ticks of the whole machine (every state of /proc/stat's `cpu` line but idle and
/// iowait).
fn busy_ticks() -> anyhow::Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    busy_ticks_in(&stat).ok_or_else(|| anyhow!("no cpu line in /proc/stat"))
}

pub(super) fn busy_ticks_in(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user, nice]
    let (idle, iowait) = (*v.get(3)?, *v.get(4)?);
    Some(v.iter().take(8).sum::<u64>() - idle - iowait)
}

/// `bpftool prog show --json`.
fn bpftool_progs() -> anyhow::Result<String> {
    cmd::stdout_if_ok(Command::new("bpftool").args(["prog", "show", "--json"]))
        .ok_or_else(|| anyhow!("`bpftool prog show --json` failed (./x setup installs bpftool)"))
}

/// Summed `run_time_ns` and `run_cnt` of the programs `ids` in a `bpftool prog show --json`
/// listing (bpftool leaves both out while they are 0).
pub(super) fn bpf_run_totals(
    json: &str,
    ids: &std::collections::BTreeSet<u32>,
) -> anyhow::Result<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(json).context("bpftool's JSON")?;
    let items = v
        .as_array()
        .ok_or_else(|| anyhow!("bpftool's JSON is not an array"))?;
    let mut total = (0, 0);
    for p in items {
        let id = p.get("id").and_then(serde_json::Value::as_u64);
        if id.is_some_and(|id| u32::try_from(id).is_ok_and(|id| ids.contains(&id))) {
            let field = |k: &str| p.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            total.0 += field("run_time_ns");
            total.1 += field("run_cnt");
        }
    }
    Ok(total)
}

/// A started tracer: the child, and where the agent serves (its output: node-tracer.log).
struct Started {
    child: KillOnDrop,
    pid: u32,
    port: Option<u16>,
}

fn start_tracer(
    b: &Bench,
    tracer: &NodeTracer,
    opts: &NodeOpts,
    interrupted: &AtomicBool,
) -> anyhow::Result<Option<Started>> {
    let log = b.tmp.join("node-tracer.log");
    let out = || fs::File::create(&log).with_context(|| format!("creating {}", log.display()));
    let (mut cmd, port) = match tracer {
        NodeTracer::None => return Ok(None),
        NodeTracer::Agent(flags) => {
            let port = free_port()?;
            let mut c = Command::new(&b.bin);
            c.args(["agent", "--listen", &format!("127.0.0.1:{port}")])
                .args(*flags)
                .env(DEPLOYED_ALLOCATOR.0, DEPLOYED_ALLOCATOR.1);
            (c, Some(port))
        }
        NodeTracer::Bpftrace(script) => {
            let mut c = Command::new("bpftrace");
            // bpftrace's runtime-test hook: a line once every probe is attached (its
            // "Attaching N probes" comes before it attaches).
            c.env("BPFTRACE_MAP_KEYS_MAX", "65536")
                .env("__BPFTRACE_NOTIFY_PROBES_ATTACHED", "1")
                .args(["-e", script]);
            (c, None)
        }
    };
    let file = out()?;
    let child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::show(&cmd)))?;
    let pid = child.id();
    let mut started = Started {
        child: KillOnDrop(vec![child]),
        pid,
        port,
    };
    let since = Instant::now();
    let idle = format!("comm=\"{IDLE_COMM}\"");
    loop {
        if interrupted.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        let log_text = || fs::read_to_string(&log).unwrap_or_default();
        if let Some(st) = started.child.0[0].try_wait()? {
            bail!(
                "the tracer exited before it was ready ({st}):\n{}",
                log_text()
            );
        }
        let ready = match port {
            // Ready once it reports every idle process (it found and attached them).
            Some(port) => http_get(port, "/metrics").is_ok_and(|body| {
                sum_where(&body, "allocwatch_processes", &idle)
                    .is_some_and(|n| n >= opts.idle as f64)
            }),
            None => log_text().contains("__BPFTRACE_NOTIFY_PROBES_ATTACHED"),
        };
        if ready {
            break;
        }
        if since.elapsed() > Duration::from_secs(120) {
            bail!("the tracer was not ready within 120 s:\n{}", log_text());
        }
        thread::sleep(Duration::from_millis(50));
    }
    // Let its start-up work (the first /proc scans, symbol tables) settle.
    thread::sleep(Duration::from_secs(1));
    Ok(Some(started))
}

/// SIGTERM (the agent) or SIGINT (bpftrace), then up to 30 s for it to exit; SIGKILL after.
fn stop_tracer(mut t: Started) -> anyhow::Result<()> {
    let sig = if t.port.is_some() { "TERM" } else { "INT" };
    let since = Instant::now();
    let mut sent = None::<Instant>;
    while since.elapsed() < Duration::from_secs(30) {
        // Again every 5 s: bpftrace 0.17 ignores a SIGINT that comes between two of its
        // epoll_waits (it reads its exit flag only when a wait is interrupted).
        if sent.is_none_or(|at| at.elapsed() > Duration::from_secs(5)) {
            signal(sig, &[t.pid])?;
            sent = Some(Instant::now());
        }
        if t.child.0[0].try_wait()?.is_some() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!("bench: node: the tracer did not exit within 30 s of SIG{sig}; killing it");
    drop(t.child);
    Ok(())
}

/// One run: the tracer started and ready, the batch timed, the tracer stopped. Also returns
/// other processes that held BPF programs meanwhile.
fn node_run(
    b: &Bench,
    config: &NodeConfig,
    progs: &Programs<'_>,
    opts: &NodeOpts,
    bg_pids: &[u32],
    interrupted: &AtomicBool,
) -> anyhow::Result<(NodeRun, Vec<String>)> {
    wait_for_no_tracers();
    let tracer = start_tracer(b, &config.tracer, opts, interrupted)?;
    let tracer_pid = tracer.as_ref().map(|t| t.pid);
    let ours: Vec<u32> = tracer_pid.into_iter().collect();
    let mut foreign = foreign_bpf_holders_except(&ours);
    let jobs = batch(progs, opts.rounds);
    let ticks = clock_ticks();

    // The tracer before the batch: what the long-lived processes and the rest of the machine
    // cost it.
    let idle = match tracer_pid {
        Some(pid) => {
            let at = (bpftool_progs()?, cpu_ticks(pid)?, Instant::now());
            thread::sleep(IDLE_WINDOW);
            Some(at)
        }
        None => None,
    };
    // bpftool is a child too: read outside the rusage window.
    let bpf0 = tracer_pid.map(|_| bpftool_progs()).transpose()?;
    let tb0 = Instant::now();
    let bg0 = cpu_ticks_of(bg_pids);
    let tr0 = tracer_pid.map(cpu_ticks).transpose()?;
    let busy0 = busy_ticks()?;
    let cpu0 = reaped_children_cpu();
    let t0 = Instant::now();
    run_batch(jobs, opts.parallel, interrupted)?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = reaped_children_cpu() - cpu0;
    let busy = busy_ticks()?.saturating_sub(busy0) as f64 / ticks;
    let tr1 = tracer_pid.map(cpu_ticks).transpose()?;
    let bg1 = cpu_ticks_of(bg_pids);
    let bpf1 = tracer_pid.map(|_| bpftool_progs()).transpose()?;
    let bpf_window = tb0.elapsed().as_secs_f64();

    let mut run = NodeRun {
        wall,
        cpu,
        background: bg1.saturating_sub(bg0) as f64 / ticks / wall,
        ..NodeRun::default()
    };
    let tracer_cpu = match (tr0, tr1) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / ticks,
        _ => 0.0,
    };
    run.other = ((busy - cpu - tracer_cpu) / wall - run.background).max(0.0);
    if let (Some(t), Some(tr0), Some(tr1), Some(bpf0), Some(bpf1)) =
        (&tracer, tr0, tr1, &bpf0, &bpf1)
    {
        run.tracer = Some((tr1 - tr0) as f64 / ticks / wall);
        let ids = kernel::held_by(t.pid).progs;
        if let Some((bpf_idle, tr_idle, since)) = &idle {
            let secs = (tb0 - *since).as_secs_f64();
            let (ns_idle, _) = bpf_run_totals(bpf_idle, &ids)?;
            let (ns0, _) = bpf_run_totals(bpf0, &ids)?;
            run.before = Some((
                tr0.saturating_sub(*tr_idle) as f64 / ticks / secs,
                ns0.saturating_sub(ns_idle) as f64 / 1e9 / secs,
            ));
        }
        let (ns0, n0) = bpf_run_totals(bpf0, &ids)?;
        let (ns1, n1) = bpf_run_totals(bpf1, &ids)?;
        run.bpf = Some((
            ns1.saturating_sub(ns0) as f64 / 1e9 / bpf_window,
            n1.saturating_sub(n0) as f64 / bpf_window,
        ));
        if let Some(port) = t.port {
            let body = http_get(port, "/metrics")?;
            let mut lost = lost_by_cause(&body);
            lost.retain(|_, v| *v != 0.0);
            run.lost = Some(lost);
            run.rss_mib = rss_kib(t.pid).ok().map(|k| k as f64 / 1024.0);
        }
    }
    for f in foreign_bpf_holders_except(&ours) {
        if !foreign.contains(&f) {
            foreign.push(f);
        }
    }
    if let Some(t) = tracer {
        stop_tracer(t)?;
    }
    Ok((run, foreign))
}

/// `num / base` with two decimals, `—` without a base.
fn ratio(num: f64, base: f64) -> String {
    if base > 0.0 && num.is_finite() {
        format!("{:.2}", num / base)
    } else {
        "—".into()
    }
}

/// One table row after the configuration's name, against the baseline's runs.
pub(super) fn node_row(runs: &[NodeRun], base: &[NodeRun]) -> String {
    let col = |f: fn(&NodeRun) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let base_col = |f: fn(&NodeRun) -> f64| median(&base.iter().map(f).collect::<Vec<f64>>());
    let (wall, cpu) = (col(|r| r.wall), col(|r| r.cpu));
    let opt = |f: fn(&NodeRun) -> Option<f64>, scale: f64, digits: usize| {
        let v: Vec<f64> = runs.iter().filter_map(f).collect();
        if v.is_empty() {
            "—".to_owned()
        } else {
            format!("{:.digits$}", median(&v) * scale)
        }
    };
    let lost = lost_cell(runs.iter().filter_map(|r| r.lost.as_ref()));
    format!(
        "| {:.2} ({}) | {} | {:.2} ({}) | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
        median(&wall),
        spread(&wall, 2),
        ratio(median(&wall), base_col(|r| r.wall)),
        median(&cpu),
        spread(&cpu, 2),
        ratio(median(&cpu), base_col(|r| r.cpu)),
        median(&col(|r| r.background)) * 100.0,
        opt(|r| r.before.map(|b| b.0), 100.0, 1),
        opt(|r| r.before.map(|b| b.1), 100.0, 1),
        opt(|r| r.tracer, 100.0, 1),
        opt(|r| r.bpf.map(|b| b.0), 100.0, 1),
        opt(|r| r.bpf.map(|b| b.1), 1e-3, 0),
        lost,
        opt(|r| r.rss_mib, 1.0, 0),
        median(&col(|r| r.other)) * 100.0,
    )
}

/// Lost events summed over runs, by cause: `0`, `N (cause n, …)`, `—` without an agent.
fn lost_cell<'a>(runs: impl Iterator<Item = &'a BTreeMap<String, f64>>) -> String {
    let mut any = false;
    let mut by: BTreeMap<&str, f64> = BTreeMap::new();
    for r in runs {
        any = true;
        for (c, v) in r {
            *by.entry(c).or_default() += v;
        }
    }
    let total: f64 = by.values().sum();
    if !any {
        "—".into()
    } else if total == 0.0 {
        "0".into()
    } else {
        let causes: Vec<String> = by.iter().map(|(c, v)| format!("{c} {v:.0}")).collect();
        format!("{total:.0} ({})", causes.join(", "))
    }
}

#[allow(clippy::too_many_arguments)]
fn node_markdown(
    configs: &[NodeConfig],
    runs: &[Vec<NodeRun>],
    opts: &NodeOpts,
    tc: &go::GoToolchain,
    reps: usize,
    loads: &[f64],
    notes: &[String],
    stats_were_on: bool,
) -> String {
    let mut md = String::from("## 7. The whole node (issue 15)\n\n");
    md += &format!(
        "{} `{IDLE_COMM}` processes (each wakes every 200 ms: 4 malloc + 4 free) and `{STEADY_COMM}` \
         (≈ 1,000 malloc + 1,000 free a second) alive throughout; the batch: {} rounds of `sh -c \
         'ls /usr/bin | sort'`, the python3 one-liner of the soak (a dict and a sorted list of \
         20,000 strings), `libc_fixture run` and `gogrowth {GO_ROUNDS}` (Go {}), {} at a time. \
         {reps} runs per configuration, in rotating order; the tracer is started (and ready: \
         the agent reports every `{IDLE_COMM}`) before each batch and stopped after it. *Wall*, \
         *CPU*: the batch's wall time and its programs' user + system time (getrusage \
         RUSAGE_CHILDREN; the probes' traps and BPF programs run in the traced process and \
         count here); × = ratio of medians to no agent. *Background*: the long-lived \
         processes' CPU over the batch. *Tracer*: the agent's (or bpftrace's) utime + stime \
         over the batch. *Before the batch*: the same over {} s just before it (the long-lived \
         processes and the rest of the machine only). *BPF*: `run_time_ns` and `run_cnt` of the tracer's programs (kernel \
         BPF statistics, on for the whole section{}), over the batch: the agent traces every \
         process of the machine, other users' included. *Rest of the machine*: busy CPU \
         (/proc/stat) over the batch minus the batch, the background and the tracer. CPU \
         figures in % of one core; medians.\n\n",
        opts.idle,
        opts.rounds,
        tc.version,
        opts.parallel,
        IDLE_WINDOW.as_secs(),
        if stats_were_on {
            "; already on before it"
        } else {
            ""
        },
    );
    md += "| configuration | batch wall, s: median (min–max) | × | batch CPU, s: median (min–max) | × | background CPU, % | before the batch: tracer CPU, % | before: BPF programs, % | tracer CPU, % | BPF programs, % | BPF runs, k/s | events lost (all runs) | agent RSS, MiB | rest of the machine, % |\n";
    md += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for (c, r) in configs.iter().zip(runs) {
        md += &format!("| {} {}\n", c.name, node_row(r, &runs[0]));
    }
    md.push('\n');
    md += &load_line(loads);
    if !notes.is_empty() {
        md += &format!(
            "Other processes held BPF programs during: {}.\n\n",
            notes.join("; ")
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn node_wide_scripts_filter_no_pid() {
        let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let Some(Tracer::Bpftrace(_, script)) = bpftrace_scripts(libc)
            .into_iter()
            .find(|t| matches!(t, Tracer::Bpftrace(n, _) if *n == MEMLEAK))
        else {
            panic!("no memleak-like script");
        };
        let wide = node_wide(&script);
        assert!(!wide.contains("cpid"), "{wide}");
        assert!(wide.contains("/@req[tid] != 0/"));
        assert!(wide.contains(&format!("uprobe:{libc}:free {{ delete(@live_size[arg0]);")));
        assert_eq!(wide.lines().count(), script.lines().count());
        let configs = node_configs(libc, true);
        assert_eq!(configs.len(), 7);
        assert!(matches!(&configs[6].tracer, NodeTracer::Bpftrace(s) if *s == wide));
        assert_eq!(node_configs(libc, false).len(), 6);
    }

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 1000 20 3 2 1 7 0\ncpu0 50 2 25 500 10 1 1 0 0 0\nintr 1\n";
        assert_eq!(busy_ticks_in(stat), Some(161));
        assert_eq!(busy_ticks_in("cpu0 1 2 3 4 5\n"), None);
        assert_eq!(busy_ticks_in("cpu  1 2 x 4 5\n"), None);
    }

    #[test]
    fn bpf_run_totals_sum_the_named_programs() {
        let json = r#"[{"id":5,"type":"kprobe","run_time_ns":1000,"run_cnt":10},
            {"id":6,"type":"kprobe"},
            {"id":7,"type":"kprobe","run_time_ns":500,"run_cnt":2},
            {"id":8,"type":"tracing","run_time_ns":99999,"run_cnt":9}]"#;
        let ids: BTreeSet<u32> = [5, 6, 7, 9].into();
        assert_eq!(bpf_run_totals(json, &ids).expect("parses"), (1500, 12));
        assert_eq!(
            bpf_run_totals("[]", &ids).expect("parses"),
            (0, 0),
            "programs not loaded yet count 0"
        );
        assert!(bpf_run_totals("{}", &ids).is_err());
        assert!(bpf_run_totals("not json", &ids).is_err());
    }

    #[test]
    fn rows_give_medians_and_ratios_to_the_baseline() {
        let run = |wall: f64, cpu: f64| NodeRun {
            wall,
            cpu,
            background: 0.02,
            ..NodeRun::default()
        };
        let base = vec![run(10.0, 8.0), run(12.0, 9.0), run(11.0, 8.5)];
        assert_eq!(
            node_row(&base, &base),
            "| 11.00 (10.00–12.00) | 1.00 | 8.50 (8.00–9.00) | 1.00 | 2.0 | — | — | — | — | — | — | — | 0 |"
        );
        let traced: Vec<NodeRun> = [(22.0, 17.0), (23.0, 18.0)]
            .iter()
            .map(|&(w, c)| NodeRun {
                tracer: Some(0.25),
                before: Some((0.1, 0.02)),
                bpf: Some((0.05, 120_000.0)),
                lost: Some(BTreeMap::new()),
                other: 0.5,
                rss_mib: Some(100.4),
                ..run(w, c)
            })
            .collect();
        assert_eq!(
            node_row(&traced, &base),
            "| 22.50 (22.00–23.00) | 2.05 | 17.50 (17.00–18.00) | 2.06 | 2.0 | 10.0 | 2.0 | 25.0 | 5.0 | 120 | 0 | 100 | 50 |"
        );
        let lost = |v: &[(&str, f64)]| -> BTreeMap<String, f64> {
            v.iter().map(|&(c, n)| (c.to_owned(), n)).collect()
        };
        let runs = [
            lost(&[("stack_budget", 20.0)]),
            lost(&[]),
            lost(&[("ringbuf_full", 5.0), ("stack_budget", 3.0)]),
        ];
        assert_eq!(
            lost_cell(runs.iter()),
            "28 (ringbuf_full 5, stack_budget 23)"
        );
        assert_eq!(lost_cell(runs[1..2].iter()), "0");
        assert_eq!(lost_cell([].iter()), "—");
        assert_eq!(ratio(1.0, 0.0), "—");
        assert_eq!(ratio(f64::NAN, 1.0), "—");
    }
}
