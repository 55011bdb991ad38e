//! `./x soak`: issue 17's acceptance run. `allocwatch agent` runs as an operator would start it
//! (defaults, a loopback listener) for N minutes under process churn (about two short-lived
//! programs a second) and one steady allocator; `/healthz` is probed every second and `/metrics`
//! scraped on a schedule, each timed end to end with a hard client timeout; then the agent gets
//! SIGTERM and the kernel is checked for anything it left. Prints (and writes) a Markdown table
//! and one PASS/FAIL verdict per criterion; fails when any criterion fails.
//!
//! Every child runs in its own process group and is killed and reaped on every way out (errors,
//! panics, Ctrl-C): no agent or workload outlives the soak.

mod http;
// The node bench (xtask/src/bench/node.rs) reads the agent's programs the same way.
pub(crate) mod kernel;
mod metrics;
mod report;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use report::{Failure, Probe, Scrape, Stop};

use crate::{
    agent::{self, DEPLOYED_ALLOCATOR},
    cmd, fixtures, host,
    paths::Paths,
    procs::{clock_ticks, cpu_ticks, free_port, rss_kib},
    setup,
};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// How long the churn lasts, in minutes (10 is issue 17's acceptance run).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..=1440))]
    pub minutes: u32,
    /// The agent's `--ttl` (how long series of exited processes are kept), e.g. 20s; not
    /// given: the agent's default.
    #[arg(long, value_name = "DURATION", value_parser = duration_text)]
    pub ttl: Option<String>,
    /// How often /metrics is scraped (it is also scraped at 0 s, 60 s and at the end).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub scrape_every: Duration,
    /// Also write the Markdown report here (it always goes to target/soak/results.md).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Soak this allocwatch binary instead of building one.
    #[arg(long, value_name = "PATH")]
    pub bin: Option<PathBuf>,
    /// Also keep this many mostly idle processes alive throughout (`fixtures/bench/node_idle.c`,
    /// as the node bench: each wakes every 200 ms for 4 malloc + 4 free): a node's few hundred
    /// daemons (issue 15's hour: `--minutes 60 --idle 200`).
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=2000))]
    pub idle: u32,
}

impl Args {
    /// The short soak `./x test` runs: two minutes, series expiring after 20 s (so the agent's
    /// cleanup of exited processes runs many times), a scrape every 10 s.
    pub fn short(bin: PathBuf) -> Self {
        Self {
            minutes: 2,
            ttl: Some("20s".into()),
            scrape_every: Duration::from_secs(10),
            out: None,
            bin: Some(bin),
            idle: 0,
        }
    }

    /// The command line that repeats this soak.
    pub fn command(&self) -> String {
        let mut s = format!("./x soak --minutes {}", self.minutes);
        if let Some(ttl) = &self.ttl {
            s += &format!(" --ttl {ttl}");
        }
        s += &format!(" --scrape-every {}s", self.scrape_every.as_secs_f64());
        if self.idle > 0 {
            s += &format!(" --idle {}", self.idle);
        }
        s
    }
}

/// A request that has not completed within this is recorded as unanswered.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
/// One short-lived program is started this often (about two a second).
const SPAWN_EVERY: Duration = Duration::from_millis(500);
/// More short-lived programs than this still running: the next start is skipped (and counted).
const MAX_RUNNING: usize = 16;
/// A short-lived program still running after this is killed and counted as failed.
const STRAGGLER: Duration = Duration::from_secs(60);
/// How long the agent may take to load, verify and attach before it serves.
const START_LIMIT: Duration = Duration::from_secs(180);
/// How long the soak waits for the agent to exit after SIGTERM before it sends SIGKILL.
const SIGTERM_WAIT: Duration = Duration::from_secs(10);
/// The steady allocator (fixtures/c/soak_steady.c): its comm finds its series.
pub(crate) const STEADY_COMM: &str = "soak_steady";
/// The mostly idle processes of `--idle` (fixtures/bench/node_idle.c).
pub(crate) const IDLE_COMM: &str = "node_idle";
/// The python3 one-liner: a dict and a list of 20,000 strings.
pub(crate) const PYTHON: &str = "d = {i: str(i) * 8 for i in range(20000)}; l = sorted(d.values()); \
                      assert len(l) == 20000";

pub fn run(paths: &Paths, args: &Args) -> anyhow::Result<()> {
    host::require_root("run ./x soak (the agent loads eBPF programs and attaches uprobes)")?;
    let duration = Duration::from_secs(u64::from(args.minutes) * 60);
    if args.scrape_every < Duration::from_secs(1) || args.scrape_every > duration {
        bail!("--scrape-every must be between 1s and the soak's length ({duration:?})");
    }
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => agent::build(paths)?,
    };
    let fixtures = fixtures::build(paths)?;
    setup::tracefs()?;
    if cmd::stdout_if_ok(Command::new("bpftool").arg("version")).is_none() {
        setup::apt_packages()?;
    }
    let c_program = fixtures.c.join("libc_fixture");
    let steady_bin = fixtures.c.join(STEADY_COMM);
    for needed in [&c_program, &steady_bin] {
        if !needed.is_file() {
            bail!("{} is missing after `./x fixtures`", needed.display());
        }
    }
    let out_dir = paths.target().join("soak");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    // From here on a Ctrl-C (or SIGTERM, SIGHUP) only sets this flag: the soak then kills and
    // reaps what it started before it exits.
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, Arc::clone(&interrupted))
            .context("installing a signal handler")?;
    }

    let idle_bin = match args.idle {
        0 => None,
        _ => Some(fixtures::build_bench_c(
            paths,
            &out_dir,
            IDLE_COMM,
            IDLE_COMM,
            "-fno-omit-frame-pointer",
        )?),
    };

    let before = kernel::Snapshot::take()?;
    let mut idle = Vec::new();
    for _ in 0..args.idle {
        let bin = idle_bin.as_ref().expect("built when idle > 0");
        idle.push(Reaped::spawn(
            Command::new(bin)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            IDLE_COMM,
        )?);
    }
    let mut steady = Reaped::spawn(
        Command::new(&steady_bin)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        STEADY_COMM,
    )?;
    let port = free_port()?;
    let agent_log = out_dir.join("agent.log");
    let mut agent = start_agent(&bin, port, args.ttl.as_deref(), &agent_log)?;
    let agent_pid = agent.pid();
    let started = wait_until_serving(&mut agent, port, &agent_log, &interrupted)?;
    eprintln!(
        "soak: the agent (pid {agent_pid}) serves after {:.1} s; churning for {} min",
        started.as_secs_f64(),
        args.minutes
    );

    let shared = Shared {
        port,
        agent_pid,
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        ticks: clock_ticks(),
    };
    let mut churn = Churn::new(&c_program);
    let plan = schedule(duration, args.scrape_every);
    let (end, (scrapes, mut held, skipped), probes) = thread::scope(|s| {
        let scraper = s.spawn(|| scrape_metrics(&shared, &plan));
        let prober = s.spawn(|| probe_healthz(&shared));
        let end = churn_loop(&shared, &mut agent, &mut churn, duration, &interrupted);
        if !matches!(end, Ok(End::Done)) {
            shared.stop.store(true, Ordering::SeqCst);
        }
        if matches!(end, Ok(End::Interrupted) | Err(_)) {
            // Unblocks requests in flight at once.
            agent.kill_and_reap();
        }
        let scraped = scraper
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        shared.stop.store(true, Ordering::SeqCst);
        let probes = prober
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (end, scraped, probes)
    });
    churn.finish();
    let end = end?;
    if let End::Interrupted = end {
        steady.kill_and_reap();
        idle.iter_mut().for_each(Reaped::kill_and_reap);
        println!(
            "{}",
            report::table(&probes, &scrapes, CLIENT_TIMEOUT, STEADY_COMM)
        );
        bail!("interrupted: the agent and the workload were killed and reaped");
    }

    held.extend(kernel::held_by(agent_pid));
    let stop = match end {
        End::AgentDied(at, status) => Stop::DiedEarly {
            at,
            status: status.to_string(),
        },
        _ => stop_with_sigterm(&mut agent)?,
    };
    steady.kill_and_reap();
    idle.iter_mut().for_each(Reaped::kill_and_reap);
    let leftovers = kernel::leftovers(&before, &held, agent_pid, Duration::from_secs(5))
        .map_err(|e| format!("{e:#}"));

    let run = report::Run {
        command: args.command(),
        duration,
        client_timeout: CLIENT_TIMEOUT,
        probes,
        scrapes,
        skipped_scrapes: skipped,
        stop,
        agent_held: held,
        agent_pid,
        leftovers,
        churn: churn.record,
        steady_comm: STEADY_COMM,
    };
    let results = out_dir.join("results.md");
    let verdicts = write_report(paths, args, &run, &results)?;
    eprintln!(
        "soak: report in {}, agent log in {}",
        results.display(),
        agent_log.display()
    );
    let failed: Vec<String> = verdicts
        .iter()
        .filter(|v| !v.pass)
        .map(report::Verdict::line)
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    bail!(
        "the soak failed {} of {} criteria:\n{}",
        failed.len(),
        verdicts.len(),
        failed.join("\n")
    )
}

/// `allocwatch agent --listen 127.0.0.1:PORT [--ttl TTL]`, everything else at its default and
/// the allocator setting of the image; its output goes to `log`.
fn start_agent(bin: &Path, port: u16, ttl: Option<&str>, log: &Path) -> anyhow::Result<Reaped> {
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(bin);
    cmd.args(["agent", "--listen", &listen]);
    if let Some(ttl) = ttl {
        cmd.args(["--ttl", ttl]);
    }
    let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.env(DEPLOYED_ALLOCATOR.0, DEPLOYED_ALLOCATOR.1)
        .stdout(file.try_clone()?)
        .stderr(file);
    eprintln!("+ {}", cmd::show(&cmd));
    Reaped::spawn(&mut cmd, "allocwatch agent")
}

/// Prints the report and writes it to `results` (and `--out`); returns the verdicts.
fn write_report(
    paths: &Paths,
    args: &Args,
    run: &report::Run,
    results: &Path,
) -> anyhow::Result<Vec<report::Verdict>> {
    let verdicts = report::verdicts(run);
    let md = report::markdown(run, &header(paths, args), &verdicts);
    println!("{md}");
    for file in std::iter::once(results).chain(args.out.as_deref()) {
        fs::write(file, &md).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(verdicts)
}

/// Waits until the agent answers /healthz, then (up to 30 s) until the steady allocator, which
/// was running before it, has series: the first scrape then sees it. Returns the time taken.
fn wait_until_serving(
    agent: &mut Reaped,
    port: u16,
    log: &Path,
    interrupted: &AtomicBool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let log_tail = || {
        let text = fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    loop {
        if interrupted.load(Ordering::SeqCst) {
            bail!("interrupted while the agent was starting (it was killed and reaped)");
        }
        if let Some(status) = agent.try_exit()? {
            bail!(
                "the agent exited before serving ({status}); its log:\n{}",
                log_tail()
            );
        }
        if let http::Outcome::Ok(_) = http::get(port, "/healthz", Duration::from_secs(2)).outcome {
            break;
        }
        if start.elapsed() > START_LIMIT {
            bail!(
                "the agent did not serve /healthz within {START_LIMIT:?}; its log:\n{}",
                log_tail()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    let serving = Instant::now();
    while serving.elapsed() < Duration::from_secs(30) && !interrupted.load(Ordering::SeqCst) {
        if let http::Outcome::Ok(body) = http::get(port, "/metrics", CLIENT_TIMEOUT).outcome
            && metrics::read(&body, STEADY_COMM)
                .is_ok_and(|r| r.steady_calls.is_some_and(|c| c > 0.0))
        {
            break;
        }
        thread::sleep(Duration::from_millis(500));
    }
    Ok(start.elapsed())
}

/// When /metrics is scraped: every `every` from 0, at 60 s (the RSS baseline) and at the end.
fn schedule(duration: Duration, every: Duration) -> Vec<Duration> {
    let mut plan: Vec<Duration> = (0..)
        .map(|k| every * k)
        .take_while(|t| *t <= duration)
        .collect();
    plan.push(report::RSS_BASELINE_AT.min(duration));
    plan.push(duration);
    plan.sort();
    plan.dedup();
    plan
}

/// What the probing threads share with the main one.
struct Shared {
    port: u16,
    agent_pid: u32,
    /// The churn's start: t = 0 of every record.
    t0: Instant,
    /// Set when the probing threads must end (the agent died, Ctrl-C, the soak is over).
    stop: AtomicBool,
    ticks: f64,
}

impl Shared {
    /// Sleeps until `t0 + at`; false if told to stop meanwhile.
    fn sleep_until(&self, at: Duration) -> bool {
        let due = self.t0 + at;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return false;
            }
            let now = Instant::now();
            if now >= due {
                return true;
            }
            thread::sleep((due - now).min(Duration::from_millis(50)));
        }
    }
}

fn failure(outcome: http::Outcome) -> Result<String, Failure> {
    match outcome {
        http::Outcome::Ok(body) => Ok(body),
        http::Outcome::TimedOut => Err(Failure::TimedOut),
        http::Outcome::Failed(e) => Err(Failure::Failed(e)),
    }
}

/// `/healthz` once a second (a probe that took longer is followed by the next at once, not by
/// one per second it missed) until told to stop.
fn probe_healthz(sh: &Shared) -> Vec<Probe> {
    let mut probes = Vec::new();
    let mut next = Duration::ZERO;
    while sh.sleep_until(next) {
        let at = sh.t0.elapsed();
        let t = http::get(sh.port, "/healthz", CLIENT_TIMEOUT);
        probes.push(Probe {
            at,
            latency: t.latency,
            answer: failure(t.outcome).map(drop),
        });
        next = (next + Duration::from_secs(1)).max(Duration::from_secs(sh.t0.elapsed().as_secs()));
    }
    probes
}

/// The scrapes of `plan` (each with the agent's RSS and CPU time and the BPF objects it holds,
/// read just before it) until the plan ends or the threads are told to stop. A planned scrape
/// whose successor is already due (an earlier one was still in flight) is skipped, not queued:
/// the last one always runs. Returns the scrapes, what the agent held, and the skipped times.
fn scrape_metrics(sh: &Shared, plan: &[Duration]) -> (Vec<Scrape>, kernel::Ids, Vec<Duration>) {
    let mut scrapes = Vec::new();
    let mut held = kernel::Ids::default();
    let mut skipped = Vec::new();
    for (i, &planned) in plan.iter().enumerate() {
        if !sh.sleep_until(planned) {
            break;
        }
        if plan.get(i + 1).is_some_and(|&next| sh.t0.elapsed() >= next) {
            skipped.push(planned);
            continue;
        }
        let at = sh.t0.elapsed();
        held.extend(kernel::held_by(sh.agent_pid));
        let rss_kib = rss_kib(sh.agent_pid).ok();
        let cpu_secs = cpu_ticks(sh.agent_pid).ok().map(|t| t as f64 / sh.ticks);
        let reads = sh.t0.elapsed() - at;
        if reads > Duration::from_millis(500) {
            // Seen while the agent was stuck: worth knowing, as it delays the scrape.
            eprintln!(
                "soak: reading the agent's /proc entries took {}",
                report::fmt_latency(reads)
            );
        }
        let t = http::get(sh.port, "/metrics", CLIENT_TIMEOUT);
        let reading = failure(t.outcome).and_then(|body| {
            metrics::read(&body, STEADY_COMM).map_err(|e| Failure::Failed(format!("{e:#}")))
        });
        let what = match &reading {
            Ok(r) => format!(
                "{} sample lines, {} events lost, {STEADY_COMM} calls {}",
                r.sample_lines,
                report::fmt_count(r.lost_total()),
                r.steady_calls.map_or("none".into(), report::fmt_count)
            ),
            Err(Failure::TimedOut) => format!("no answer within {CLIENT_TIMEOUT:?}"),
            Err(Failure::Failed(e)) => format!("failed: {e}"),
        };
        eprintln!(
            "soak: t = {:>4} s: agent RSS {} MiB, /metrics {}: {what}",
            at.as_secs(),
            rss_kib.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
            report::fmt_latency(t.latency),
        );
        scrapes.push(Scrape {
            planned,
            at,
            rss_kib,
            cpu_secs,
            latency: t.latency,
            reading,
        });
    }
    (scrapes, held, skipped)
}

enum End {
    /// The churn ran its whole length.
    Done,
    /// The agent exited by itself at this time.
    AgentDied(Duration, ExitStatus),
    Interrupted,
}

/// Starts a short-lived program every [`SPAWN_EVERY`] and reaps those that ended, until the
/// soak's length has passed, the agent has exited or the soak was interrupted.
fn churn_loop(
    sh: &Shared,
    agent: &mut Reaped,
    churn: &mut Churn,
    duration: Duration,
    interrupted: &AtomicBool,
) -> anyhow::Result<End> {
    let mut next_start = sh.t0;
    loop {
        if interrupted.load(Ordering::SeqCst) {
            return Ok(End::Interrupted);
        }
        if let Some(status) = agent.try_exit()? {
            return Ok(End::AgentDied(sh.t0.elapsed(), status));
        }
        if sh.t0.elapsed() >= duration {
            return Ok(End::Done);
        }
        churn.reap();
        let now = Instant::now();
        if now >= next_start {
            churn.start_next();
            // After a stall, go on from now rather than start the missed programs in a burst.
            next_start = (next_start + SPAWN_EVERY).max(now);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM and waits for the agent to exit (SIGKILL after [`SIGTERM_WAIT`]).
fn stop_with_sigterm(agent: &mut Reaped) -> anyhow::Result<Stop> {
    let sent = Instant::now();
    signal(agent.pid() as i32, libc::SIGTERM);
    loop {
        if let Some(status) = agent.try_exit()? {
            return Ok(Stop::Exited {
                after: sent.elapsed(),
                success: status.success(),
                status: status.to_string(),
            });
        }
        if sent.elapsed() > SIGTERM_WAIT {
            agent.kill_and_reap();
            return Ok(Stop::Killed {
                waited: sent.elapsed(),
            });
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The short-lived programs: started in turn, reaped as they end.
struct Churn {
    kinds: Vec<(&'static str, Command)>,
    next: usize,
    running: Vec<(Reaped, &'static str, Instant)>,
    record: report::Churn,
}

impl Churn {
    fn new(c_program: &Path) -> Self {
        let mut sh = Command::new("sh");
        sh.args(["-c", "ls /usr/bin | sort"]);
        let mut python = Command::new("python3");
        python.args(["-c", PYTHON]);
        let mut c = Command::new(c_program);
        c.arg("run");
        for cmd in [&mut sh, &mut python, &mut c] {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        Self {
            kinds: vec![("sh", sh), ("python3", python), ("libc_fixture", c)],
            next: 0,
            running: Vec::new(),
            record: report::Churn::default(),
        }
    }

    fn start_next(&mut self) {
        if self.running.len() >= MAX_RUNNING {
            self.record.skipped += 1;
            return;
        }
        let n = self.kinds.len();
        let (name, cmd) = &mut self.kinds[self.next % n];
        let name: &'static str = name;
        self.next += 1;
        *self.record.started.entry(name).or_default() += 1;
        match Reaped::spawn(cmd, name) {
            Ok(child) => self.running.push((child, name, Instant::now())),
            Err(e) => self.record.failed.push(format!("{name}: {e:#}")),
        }
    }

    /// Reaps the programs that ended; kills those running longer than [`STRAGGLER`].
    fn reap(&mut self) {
        let record = &mut self.record;
        self.running.retain_mut(|(child, name, started)| {
            let status = match child.try_exit() {
                Ok(Some(status)) => status,
                Ok(None) if started.elapsed() < STRAGGLER => return true,
                Ok(None) => {
                    child.kill_and_reap();
                    let secs = STRAGGLER.as_secs();
                    record
                        .failed
                        .push(format!("{name}: still running after {secs} s, killed"));
                    return false;
                }
                Err(e) => {
                    record.failed.push(format!("{name}: waiting for it: {e}"));
                    return false;
                }
            };
            if !status.success() {
                record.failed.push(format!("{name}: {status}"));
            }
            false
        });
    }

    /// Reaps the rest once the churn is over (those still running after 30 s are killed).
    fn finish(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.running.is_empty() && Instant::now() < deadline {
            self.reap();
            thread::sleep(Duration::from_millis(20));
        }
        for (mut child, name, _) in self.running.drain(..) {
            child.kill_and_reap();
            let e = format!("{name}: still running when the churn ended, killed");
            self.record.failed.push(e);
        }
    }
}

/// A child in its own process group (a terminal's Ctrl-C reaches only the soak, which then
/// stops the children in order), killed with its group and reaped when dropped.
struct Reaped {
    child: Child,
    exited: Option<ExitStatus>,
}

impl Reaped {
    fn spawn(cmd: &mut Command, name: &str) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name} (`{}`)", cmd::show(cmd)))?;
        Ok(Self {
            child,
            exited: None,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn try_exit(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().context("waitpid")?;
        }
        Ok(self.exited)
    }

    /// SIGKILL to its whole group (while the leader is unreaped its id cannot be reused), then
    /// reap it.
    fn kill_and_reap(&mut self) {
        if self.exited.is_none() {
            signal(-(self.child.id() as i32), libc::SIGKILL);
            self.exited = self.child.wait().ok();
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// kill(2): a negative pid is a process group.
fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    unsafe { libc::kill(pid, sig) };
}

/// The report's opening lines: when, where, what ran.
fn header(paths: &Paths, args: &Args) -> String {
    let run = |c: &mut Command| cmd::stdout_if_ok(c).map(|s| s.trim().to_owned());
    let date = run(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])).unwrap_or_default();
    let kernel = run(Command::new("uname").arg("-r")).unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let git = |a: &[&str]| run(Command::new("git").arg("-C").arg(&paths.root).args(a));
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "?".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let ttl = args
        .ttl
        .as_ref()
        .map_or(String::new(), |t| format!(" --ttl {t}"));
    let idle = match args.idle {
        0 => String::new(),
        n => format!(
            ", and {n} `{IDLE_COMM}` processes (each wakes every 200 ms for 4 malloc + 4 free)"
        ),
    };
    format!(
        "{date}, Linux {kernel}, {cpus} CPUs; allocwatch at {commit}{}. The agent: `allocwatch \
         agent --listen 127.0.0.1:PORT{ttl}`, defaults otherwise, with \
         `{}={}` as in the image. The workload: every {} s one of `sh -c 'ls /usr/bin | \
         sort'`, a python3 one-liner (a dict and a sorted list of 20,000 strings) and \
         `libc_fixture run` in turn; `{STEADY_COMM}` (≈ 1,000 malloc + 1,000 free a second) \
         throughout{idle}. `/healthz` every second, `/metrics` at the times below, each timed from \
         connect to last byte with a {} s client timeout; RSS and CPU time from /proc just \
         before each scrape.",
        if dirty {
            " with uncommitted changes"
        } else {
            ""
        },
        DEPLOYED_ALLOCATOR.0,
        DEPLOYED_ALLOCATOR.1,
        SPAWN_EVERY.as_secs_f64(),
        CLIENT_TIMEOUT.as_secs(),
    )
}

/// Durations as the agent's `--ttl` reads them: `500ms`, `1s`, `2.5s`, `5m`, `1h`; a bare
/// number is seconds (the same grammar as agent/src/cli.rs, so `--ttl` fails here, early, on
/// exactly what the agent would refuse).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: 500ms, 1s, 5m)"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?} in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// `--ttl`: checked, then passed to the agent as written.
fn duration_text(s: &str) -> Result<String, String> {
    parse_duration(s).map(|_| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<Args, String> {
        let argv = std::iter::once("soak").chain(argv.iter().copied());
        Cli::try_parse_from(argv)
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn arguments_and_the_command_that_repeats_them() {
        let a = parse(&[]).expect("defaults");
        assert_eq!((a.minutes, a.ttl.as_deref()), (10, None));
        assert_eq!(a.scrape_every, Duration::from_secs(30));
        assert_eq!(a.command(), "./x soak --minutes 10 --scrape-every 30s");
        let short = Args::short(PathBuf::from("/bin/allocwatch"));
        assert_eq!(
            short.command(),
            "./x soak --minutes 2 --ttl 20s --scrape-every 10s"
        );
        let a = parse(&["--minutes", "2", "--ttl", "20s", "--scrape-every", "10s"]).expect("ok");
        assert_eq!(a.command(), short.command());
        assert!(parse(&["--minutes", "1"]).is_err());
        assert!(
            parse(&["--ttl", "5 parsecs"])
                .unwrap_err()
                .contains("invalid duration")
        );
        assert!(
            parse(&["--scrape-every", "10x"])
                .unwrap_err()
                .contains("unit")
        );
    }

    #[test]
    fn durations_read_as_the_agent_reads_them() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn scrapes_are_planned_at_every_interval_at_60_s_and_at_the_end() {
        let s = |v: &[u64]| {
            v.iter()
                .map(|&t| Duration::from_secs(t))
                .collect::<Vec<_>>()
        };
        let plan = schedule(Duration::from_secs(120), Duration::from_secs(10));
        assert_eq!(
            plan,
            s(&[0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120])
        );
        let plan = schedule(Duration::from_secs(600), Duration::from_secs(45));
        assert_eq!(
            plan,
            s(&[
                0, 45, 60, 90, 135, 180, 225, 270, 315, 360, 405, 450, 495, 540, 585, 600
            ])
        );
    }
}
