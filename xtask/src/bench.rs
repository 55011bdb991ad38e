//! `./x bench`: what tracing costs, measured side by side in one run (BENCHMARKS.md).
//!
//! Not part of `./x test`: it takes minutes and its numbers are only meaningful as ratios
//! measured together on a quiet machine. Every traced workload times itself (the tracer's
//! attach and the process start are not in the figure), every configuration runs `--reps`
//! times in rotating order, and every table reports the median and the min–max spread.
//!
//! Sections (`--only NAME`, repeatable; default all):
//! - `probe`: the C workload `fixtures/bench/alloc_bench.c` untraced, under the empty floor
//!   programs, under each allocwatch mode, and under bpftrace scripts that give the same
//!   information; ns added per call and the ratio to the floor.
//! - `go`: the Go workload `fixtures/bench/gogrowth` untraced, growth-only, with mallocgc.
//! - `throughput`: probe hits per second with several producer threads, checked exact.
//! - `footprint`: `allocwatch agent` RSS/CPU and time to attach with N fixture processes, and
//!   its /metrics scrape latency.
//! - `internals`: symbolization throughput and /metrics rendering with 10k and 100k series
//!   (ignored tests in agent/src/bench.rs, built in release mode).
//! - `metrics`: a real agent scraped over HTTP with ~10k and ~100k series from processes of
//!   `fixtures/bench/sites.c` (one identity each), the agent's allocator run as deployed and
//!   with its defaults.
//! - `stream`: Go events streamed through the ring buffer at controlled rates by
//!   `fixtures/bench/gostream` into an agent: delivered, lost, agent CPU per million events.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use crate::{
    agent::DEPLOYED_ALLOCATOR,
    cmd, go,
    paths::Paths,
    procs::{clock_ticks, cpu_ticks, free_port, rss_kib},
    setup,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Repetitions of every configuration (median and min–max are reported).
    #[arg(long, default_value_t = 7)]
    pub reps: usize,
    /// malloc/free pairs per run of the C workload (2 calls each).
    #[arg(long, default_value_t = 10_000)]
    pub pairs: u64,
    /// Run only these sections: probe, go, throughput, footprint, internals, metrics, stream
    /// (repeatable).
    #[arg(long, value_name = "SECTION")]
    pub only: Vec<String>,
    /// Use this allocwatch binary instead of building one.
    #[arg(long, value_name = "PATH")]
    pub bin: Option<PathBuf>,
    /// Processes traced in the footprint section (comma-separated counts).
    #[arg(long, default_value = "10,100,500", value_delimiter = ',')]
    pub procs: Vec<usize>,
    /// Process counts of the end-to-end /metrics section (each ~1,000 series).
    #[arg(long, default_value = "10,100", value_delimiter = ',')]
    pub metrics_procs: Vec<usize>,
    /// Runs of the streaming section: RATE[/GOROUTINES][+HOGS] (events/s in total, 0 =
    /// unpaced; 2 goroutines unless given; HOGS busy-loop processes beside the producer).
    #[arg(
        long,
        default_value = "25000,50000,100000,200000,400000,0,0/1,0+2",
        value_delimiter = ','
    )]
    pub stream_rates: Vec<String>,
    /// Seconds each streaming run lasts.
    #[arg(long, default_value_t = 4.0)]
    pub stream_secs: f64,
    /// Where the Markdown results go (also printed).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

const SECTIONS: &[&str] = &[
    "probe",
    "go",
    "throughput",
    "footprint",
    "internals",
    "metrics",
    "stream",
];

/// The libc API as bpftrace names it (allocwatch probes the same functions).
const APIS: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "free",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
];

pub fn run(paths: &Paths, args: &Args) -> anyhow::Result<()> {
    setup::require_root("run ./x bench (it loads eBPF programs and attaches uprobes)")?;
    for s in &args.only {
        if !SECTIONS.contains(&s.as_str()) {
            bail!("unknown section {s:?} (sections: {})", SECTIONS.join(", "));
        }
    }
    if args.reps == 0 || args.pairs == 0 {
        bail!("--reps and --pairs must be positive");
    }
    if !(args.stream_secs > 0.0 && args.stream_secs <= 600.0) {
        bail!("--stream-secs must be in (0, 600]");
    }
    let want = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => build_allocwatch(paths)?,
    };
    setup::tracefs()?;
    let out_dir = paths.target().join("bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let bench = Bench {
        bin,
        alloc_bench: build_alloc_bench(paths, &out_dir)?,
        libc_fixture: paths.fixtures_out().join("libc_fixture"),
        tmp: out_dir.clone(),
        reps: args.reps,
    };

    let out = args
        .out
        .clone()
        .unwrap_or_else(|| out_dir.join("results.md"));
    let mut md = String::new();
    writeln!(
        md,
        "<!-- generated by `./x bench {}` -->\n",
        bench_command(args)
    )?;
    md += &machine_facts(&bench)?;
    let mut failed = Vec::new();
    type Section<'a> = &'a dyn Fn() -> anyhow::Result<String>;
    let sections: [(&str, Section<'_>); 7] = [
        ("probe", &|| probe_section(&bench, args.pairs)),
        ("go", &|| go_section(paths, &bench, &out_dir)),
        ("throughput", &|| throughput_section(&bench, args.pairs)),
        ("footprint", &|| footprint_section(&bench, &args.procs)),
        ("internals", &|| internals_section(paths)),
        ("metrics", &|| {
            metrics_section(paths, &bench, &args.metrics_procs)
        }),
        ("stream", &|| {
            stream_section(
                paths,
                &bench,
                &out_dir,
                &args.stream_rates,
                args.stream_secs,
            )
        }),
    ];
    for (name, section) in sections {
        if !want(name) {
            continue;
        }
        // A failed section is reported in place; the others still run.
        match section() {
            Ok(text) => md += &text,
            Err(e) => {
                eprintln!("bench: section {name} failed: {e:#}");
                md += &format!("## Section `{name}`: failed\n\n```\n{e:#}\n```\n\n");
                failed.push(name);
            }
        }
        // Written after every section, so a long run keeps what it measured.
        fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
    }
    println!("{md}");
    eprintln!("bench: results written to {}", out.display());
    if !failed.is_empty() {
        bail!("sections failed: {}", failed.join(", "));
    }
    Ok(())
}

fn bench_command(args: &Args) -> String {
    let mut s = format!("--reps {} --pairs {}", args.reps, args.pairs);
    for o in &args.only {
        s += &format!(" --only {o}");
    }
    s
}

/// `cargo build --release -p allocwatch` into `$CARGO_TARGET_DIR` (or target/).
fn build_allocwatch(paths: &Paths) -> anyhow::Result<PathBuf> {
    setup::build_tools(paths)?;
    cmd::run(cmd::cargo(paths).args(["build", "--release", "-p", "allocwatch"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                paths.root.join(t)
            }
        })
        .unwrap_or_else(|| paths.target());
    let bin = target.join("release/allocwatch");
    if !bin.is_file() {
        bail!("cargo build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// The flags the issue asks for: -O1 with frame pointers (the workload defeats the optimizer).
fn build_alloc_bench(paths: &Paths, out_dir: &Path) -> anyhow::Result<PathBuf> {
    let src = paths.root.join("fixtures/bench/alloc_bench.c");
    let out = out_dir.join("alloc_bench");
    cmd::run(
        Command::new("gcc")
            .args(["-O1", "-g", "-fno-omit-frame-pointer", "-Wall", "-Wextra"])
            .args(["-pthread", "-o"])
            .arg(&out)
            .arg(&src),
    )?;
    Ok(out)
}

struct Bench {
    bin: PathBuf,
    alloc_bench: PathBuf,
    libc_fixture: PathBuf,
    tmp: PathBuf,
    reps: usize,
}

// ---------------------------------------------------------------------------------------------
// Running one measured process.

/// What a finished child printed.
struct Finished {
    stdout: String,
    stderr: String,
    success: bool,
}

/// Runs `cmd` to completion (killed after `limit`), output captured through files so a chatty
/// child never blocks on a pipe.
fn run_captured(cmd: &mut Command, limit: Duration, tmp: &Path) -> anyhow::Result<Finished> {
    let out_path = tmp.join("run.stdout");
    let err_path = tmp.join("run.stderr");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::show(cmd)))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{}` did not finish within {limit:?}", cmd::show(cmd));
        }
        thread::sleep(Duration::from_millis(5));
    };
    Ok(Finished {
        stdout: fs::read_to_string(&out_path)?,
        stderr: fs::read_to_string(&err_path)?,
        success: status.success(),
    })
}

/// Processes other than this one holding BPF programs or links (another tracer: its uprobes
/// on libc would trap in every measured process, untraced ones included).
fn foreign_bpf_holders() -> Vec<String> {
    foreign_bpf_holders_except(&[])
}

/// [`foreign_bpf_holders`] not counting `ours` (e.g. the bench's own agent).
fn foreign_bpf_holders_except(ours: &[u32]) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit())
            || pid == me
            || ours.iter().any(|o| o.to_string() == pid)
        {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            fs::read_link(fd.path()).is_ok_and(|l| {
                let l = l.to_string_lossy();
                l == "anon_inode:bpf_link" || l == "anon_inode:bpf-prog"
            })
        });
        if holds {
            let comm = fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push(format!("{pid} ({})", comm.trim()));
        }
    }
    out
}

/// Waits (up to 10 minutes) until no other process holds BPF programs; returns how long.
fn wait_for_no_tracers() -> Duration {
    let started = Instant::now();
    let mut said = false;
    loop {
        let holders = foreign_bpf_holders();
        if holders.is_empty() || started.elapsed() > Duration::from_secs(600) {
            if !holders.is_empty() {
                eprintln!(
                    "bench: warning: measuring while {} hold BPF programs",
                    holders.join(", ")
                );
            }
            return started.elapsed();
        }
        if !said {
            eprintln!(
                "bench: waiting for other tracers to finish: {}",
                holders.join(", ")
            );
            said = true;
        }
        thread::sleep(Duration::from_millis(500));
    }
}

fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// `key=value` fields of the line starting with `prefix`.
fn fields(stdout: &str, prefix: &str) -> Option<BTreeMap<String, String>> {
    let line = stdout.lines().find(|l| l.starts_with(prefix))?;
    Some(
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

fn field_u64(f: &BTreeMap<String, String>, key: &str) -> anyhow::Result<u64> {
    f.get(key)
        .ok_or_else(|| anyhow!("no {key}= in the workload's line"))?
        .parse()
        .with_context(|| format!("{key}= is not a number"))
}

fn libc_path(exe: &Path) -> anyhow::Result<String> {
    let out = cmd::stdout_if_ok(Command::new("ldd").arg(exe))
        .ok_or_else(|| anyhow!("ldd {} failed", exe.display()))?;
    let line = out
        .lines()
        .find(|l| l.contains("libc.so.6"))
        .ok_or_else(|| anyhow!("{} does not link libc.so.6", exe.display()))?;
    let path = line
        .split("=>")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .ok_or_else(|| anyhow!("cannot parse ldd line {line:?}"))?;
    Ok(fs::canonicalize(path)?.display().to_string())
}

// ---------------------------------------------------------------------------------------------
// Statistics.

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

fn spread(v: &[f64], digits: usize) -> String {
    let (lo, hi) = min_max(v);
    format!("{lo:.digits$}–{hi:.digits$}")
}

// ---------------------------------------------------------------------------------------------
// Machine facts.

fn machine_facts(b: &Bench) -> anyhow::Result<String> {
    let first = |cmd: &mut Command| {
        cmd::stdout_if_ok(cmd)
            .and_then(|s| s.lines().next().map(str::to_owned))
            .unwrap_or_else(|| "?".into())
    };
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let mem_kib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = String::from("## Machine\n\n| | |\n|---|---|\n");
    writeln!(
        md,
        "| kernel | {} |",
        first(Command::new("uname").arg("-r"))
    )?;
    writeln!(md, "| CPU | {cpus} × {cpu} |")?;
    writeln!(md, "| memory | {} MiB |", mem_kib / 1024)?;
    writeln!(
        md,
        "| glibc | {} |",
        first(Command::new("ldd").arg("--version"))
    )?;
    writeln!(md, "| libc probed | {} |", libc_path(&b.alloc_bench)?)?;
    writeln!(
        md,
        "| bpftrace | {} |",
        first(Command::new("bpftrace").arg("--version"))
    )?;
    writeln!(
        md,
        "| allocwatch | {} |",
        first(Command::new(&b.bin).arg("--version"))
    )?;
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    writeln!(md, "| load average at start | {} |\n", load.trim())?;
    Ok(md)
}

// ---------------------------------------------------------------------------------------------
// Section 1: probe cost on the traced program.

#[derive(Clone, Debug)]
enum Tracer {
    Untraced,
    /// `allocwatch top --mode MODE`.
    Allocwatch(&'static str),
    /// A bpftrace script (its name in the table, the script).
    Bpftrace(&'static str, String),
}

impl Tracer {
    fn name(&self) -> String {
        match self {
            Tracer::Untraced => "untraced".into(),
            Tracer::Allocwatch(m) => format!("allocwatch {m}"),
            Tracer::Bpftrace(n, _) => format!("bpftrace {n}"),
        }
    }
}

/// A workload of `alloc_bench`: its arguments and the libc calls it times.
struct Workload {
    name: &'static str,
    args: Vec<String>,
    calls: u64,
    /// Expected (malloc, free) calls seen by a tracer of the whole process: the timed calls,
    /// one untimed warm-up pair, and stdio's buffer after the timed loop.
    expect: (u64, u64),
}

/// bpftrace scripts giving the information of each allocwatch mode (uprobes at offset 0:
/// bpftrace cannot probe inside a function here). `cpid` is the `-c` child.
fn bpftrace_scripts(libc: &str) -> Vec<Tracer> {
    let all: Vec<String> = APIS.iter().map(|a| format!("uprobe:{libc}:{a}")).collect();
    let on = |apis: &[&str]| {
        apis.iter()
            .map(|a| format!("uprobe:{libc}:{a}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    // The return address at offset 0: the immediate caller, as count mode keys sites.
    let caller = r#"*(uint64 *)reg("sp")"#;
    let by_caller = |apis: &[&str], bytes: &str| {
        format!(
            "{} /pid == cpid/ {{ @calls[probe, {caller}] = count(); @bytes[probe, {caller}] = sum({bytes}); }}\n",
            on(apis)
        )
    };
    let count_caller = [
        by_caller(&["malloc", "valloc", "pvalloc"], "arg0"),
        by_caller(&["calloc"], "arg0 * arg1"),
        by_caller(&["realloc"], "arg1"),
        by_caller(&["reallocarray"], "arg1 * arg2"),
        by_caller(&["posix_memalign"], "arg2"),
        // One block for the two names glibc defines at one address (bpftrace 0.17 cannot load
        // two programs on one function).
        by_caller(&["aligned_alloc", "memalign"], "arg1"),
        format!(
            "{} /pid == cpid/ {{ @calls[probe, {caller}] = count(); }}\n",
            on(&["free"])
        ),
    ]
    .concat();
    // bcc memleak's shape: size at entry, (size, stack) by pointer at return, delete at free.
    let req = |apis: &[&str], size: &str| {
        format!("{} /pid == cpid/ {{ @req[tid] = {size}; }}\n", on(apis))
    };
    let rets: Vec<String> = [
        "malloc",
        "calloc",
        "realloc",
        "reallocarray",
        "aligned_alloc",
        "valloc",
        "pvalloc",
    ]
    .iter()
    .map(|a| format!("uretprobe:{libc}:{a}"))
    .collect();
    let memleak = [
        req(&["malloc", "valloc", "pvalloc"], "arg0"),
        req(&["calloc"], "arg0 * arg1"),
        format!(
            "{} /pid == cpid/ {{ @req[tid] = arg1; delete(@live_size[arg0]); delete(@live_stack[arg0]); }}\n",
            on(&["realloc"])
        ),
        req(&["reallocarray"], "arg1 * arg2"),
        req(&["aligned_alloc", "memalign"], "arg1"),
        format!(
            "{} /pid == cpid/ {{ @req[tid] = arg2; @memptr[tid] = arg0; }}\n",
            on(&["posix_memalign"])
        ),
        format!(
            "{} /pid == cpid && @req[tid] != 0/ {{ if (retval != 0) {{ @live_size[retval] = @req[tid]; @live_stack[retval] = ustack; }} delete(@req[tid]); }}\n",
            rets.join(",")
        ),
        format!(
            "uretprobe:{libc}:posix_memalign /pid == cpid && @memptr[tid] != 0/ {{ if (retval == 0) {{ $p = *(uint64 *)@memptr[tid]; @live_size[$p] = @req[tid]; @live_stack[$p] = ustack; }} delete(@req[tid]); delete(@memptr[tid]); }}\n"
        ),
        format!(
            "{} /pid == cpid/ {{ delete(@live_size[arg0]); delete(@live_stack[arg0]); }}\n",
            on(&["free"])
        ),
        "END { clear(@live_size); clear(@live_stack); clear(@req); clear(@memptr); }\n".into(),
    ]
    .concat();
    vec![
        Tracer::Bpftrace(
            "count by API",
            format!(
                "{} /pid == cpid/ {{ @[probe] = count(); }}\n",
                all.join(",")
            ),
        ),
        Tracer::Bpftrace("count+bytes by API and caller", count_caller),
        Tracer::Bpftrace(
            "count by API and user stack",
            format!(
                "{} /pid == cpid/ {{ @[probe, ustack] = count(); }}\n",
                all.join(",")
            ),
        ),
        Tracer::Bpftrace("live allocations (memleak-like)", memleak),
    ]
}

/// One timed run of `alloc_bench ARGS` under `tracer`: the workload's ns.
fn run_alloc_bench(b: &Bench, tracer: &Tracer, w: &Workload) -> anyhow::Result<f64> {
    wait_for_no_tracers();
    let report = b.tmp.join("report.json");
    let mut cmd = match tracer {
        Tracer::Untraced => {
            let mut c = Command::new(&b.alloc_bench);
            c.args(&w.args);
            c
        }
        Tracer::Allocwatch(mode) => {
            let mut c = Command::new(&b.bin);
            c.args(["top", "--mode", mode, "--json", "-o"])
                .arg(&report)
                .arg("--")
                .arg(&b.alloc_bench)
                .args(&w.args);
            c
        }
        Tracer::Bpftrace(_, script) => {
            let mut c = Command::new("bpftrace");
            let child = std::iter::once(b.alloc_bench.display().to_string())
                .chain(w.args.iter().cloned())
                .collect::<Vec<_>>()
                .join(" ");
            // As many keys as allocwatch's site table holds (bpftrace's default is 4,096: the
            // live-allocation script would silently drop entries).
            c.env("BPFTRACE_MAP_KEYS_MAX", "65536")
                .args(["-e", script, "-c", &child]);
            c
        }
    };
    let done = run_captured(&mut cmd, Duration::from_secs(600), &b.tmp)?;
    if !done.success {
        bail!(
            "{} failed on {}:\n{}\n{}",
            tracer.name(),
            w.name,
            done.stdout,
            done.stderr
        );
    }
    if let Tracer::Allocwatch(_) = tracer {
        target_exited_ok(&report)?;
    }
    let f = fields(&done.stdout, "alloc_bench ")
        .ok_or_else(|| anyhow!("{}: no alloc_bench line:\n{}", tracer.name(), done.stdout))?;
    if field_u64(&f, "calls")? != w.calls {
        bail!(
            "alloc_bench made {} calls, expected {}",
            f["calls"],
            w.calls
        );
    }
    if let Tracer::Allocwatch(mode) = tracer
        && !mode.starts_with("floor")
    {
        check_exact(&report, mode, w)?;
    }
    Ok(field_u64(&f, "ns")? as f64)
}

/// allocwatch exits 0 whatever its target did: the report says how the target ended.
fn target_exited_ok(report: &Path) -> anyhow::Result<()> {
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(report)?)?;
    let code = &v["processes"][0]["exit_code"];
    if *code != 0 {
        bail!("the traced workload did not exit with 0 (exit_code {code})");
    }
    Ok(())
}

/// Zero loss, and every call of the process counted exactly once.
fn check_exact(report: &Path, mode: &str, w: &Workload) -> anyhow::Result<()> {
    let text = fs::read_to_string(report)?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let p = &v["processes"][0];
    let got = (
        p["calls"]["malloc"].as_u64().unwrap_or(0),
        p["calls"]["free"].as_u64().unwrap_or(0),
    );
    if got != w.expect {
        bail!(
            "allocwatch {mode} on {}: (malloc, free) calls {got:?}, expected {:?}",
            w.name,
            w.expect
        );
    }
    if let Some(lost) = p["lost"].as_object() {
        for (k, n) in lost {
            if n.as_u64().unwrap_or(0) != 0 {
                bail!("allocwatch {mode} on {}: lost {k} = {n}", w.name);
            }
        }
    }
    Ok(())
}

struct Row {
    name: String,
    /// Workload wall time per rep, ns.
    ns: Vec<f64>,
}

fn probe_section(b: &Bench, pairs: u64) -> anyhow::Result<String> {
    let libc = libc_path(&b.alloc_bench)?;
    let mut tracers = vec![
        Tracer::Untraced,
        Tracer::Allocwatch("floor"),
        Tracer::Allocwatch("floor-return"),
        Tracer::Allocwatch("count"),
        Tracer::Allocwatch("count-stacks"),
        Tracer::Allocwatch("stacks-off"),
        Tracer::Allocwatch("full"),
    ];
    tracers.extend(bpftrace_scripts(&libc));
    let workloads = [
        Workload {
            name: "pairs",
            args: vec!["pairs".into(), pairs.to_string()],
            calls: 2 * pairs,
            expect: (pairs + 2, pairs + 1),
        },
        Workload {
            name: "malloc",
            args: vec!["malloc".into(), (2 * pairs).to_string()],
            calls: 2 * pairs,
            expect: (2 * pairs + 2, 1),
        },
    ];
    let mut md = String::from("## 1. Probe cost on the traced program\n\n");
    for w in &workloads {
        eprintln!("bench: probe cost, workload {} ({} calls)", w.name, w.calls);
        let mut rows: Vec<Row> = tracers
            .iter()
            .map(|t| Row {
                name: t.name(),
                ns: Vec::new(),
            })
            .collect();
        let mut loads = Vec::new();
        for rep in 0..b.reps {
            loads.push(load_average());
            // Rotate the order so slow drifts of the machine spread over every configuration.
            for i in 0..tracers.len() {
                let k = (i + rep) % tracers.len();
                let ns = run_alloc_bench(b, &tracers[k], w)?;
                eprintln!(
                    "  rep {} {:<45} {:>10.3} ms",
                    rep + 1,
                    tracers[k].name(),
                    ns / 1e6
                );
                rows[k].ns.push(ns);
            }
        }
        md += &probe_table(w, &rows);
        md += &format!(
            "1-minute load average at the start of each repetition: {}.\n\n",
            loads
                .iter()
                .map(|l| format!("{l:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(md)
}

fn probe_table(w: &Workload, rows: &[Row]) -> String {
    let base = median(&rows[0].ns);
    let added =
        |r: &Row| -> Vec<f64> { r.ns.iter().map(|ns| (ns - base) / w.calls as f64).collect() };
    let floor = rows
        .iter()
        .find(|r| r.name == "allocwatch floor")
        .map(|r| median(&added(r)));
    let floor_ret = rows
        .iter()
        .find(|r| r.name == "allocwatch floor-return")
        .map(|r| median(&added(r)));
    let mut md = format!(
        "### Workload `{}`: {} libc calls per run, {} runs per row\n\n",
        w.name,
        w.calls,
        rows[0].ns.len()
    );
    md += "| configuration | run time, ms: median (min–max) | ns added per call: median (min–max) | × floor | × floor-return |\n";
    md += "|---|---:|---:|---:|---:|\n";
    for r in rows {
        let ms: Vec<f64> = r.ns.iter().map(|n| n / 1e6).collect();
        let a = added(r);
        let ratio = |f: Option<f64>| match f {
            Some(f) if r.name != "untraced" && f > 0.0 => format!("{:.2}", median(&a) / f),
            _ => "—".into(),
        };
        let added_cell = if r.name == "untraced" {
            format!("{:.1} ns/call untraced", base / w.calls as f64)
        } else {
            format!("{:.0} ({})", median(&a), spread(&a, 0))
        };
        md += &format!(
            "| {} | {:.2} ({}) | {} | {} | {} |\n",
            r.name,
            median(&ms),
            spread(&ms, 2),
            added_cell,
            ratio(floor),
            ratio(floor_ret)
        );
    }
    md.push('\n');
    md
}

// ---------------------------------------------------------------------------------------------
// Section 2: Go growth cost.

/// The Go workload's configurations, as (label, `allocwatch top` flags; None: untraced):
/// untraced, the floor (empty programs at exactly the instructions growth-only mode probes),
/// growth only, and with `with_malloc` growth + mallocgc.
fn go_configs(with_malloc: bool) -> Vec<(&'static str, Option<&'static [&'static str]>)> {
    let mut configs: Vec<(&str, Option<&[&str]>)> = vec![
        ("untraced", None),
        (
            "floor (`--mode floor --no-go-malloc`)",
            Some(&["--mode", "floor", "--no-go-malloc"]),
        ),
        ("growth only (`--no-go-malloc`)", Some(&["--no-go-malloc"])),
    ];
    if with_malloc {
        configs.push(("growth + mallocgc", Some(&[])));
    }
    configs
}

/// `exe` untraced (`flags` None), or under `allocwatch top --json -o REPORT FLAGS -- exe`.
fn go_workload(b: &Bench, exe: &Path, flags: Option<&[&str]>, report: &Path) -> Command {
    match flags {
        None => Command::new(exe),
        Some(flags) => {
            let mut c = Command::new(&b.bin);
            c.args(["top", "--json", "-o"])
                .arg(report)
                .args(flags)
                .arg("--")
                .arg(exe);
            c
        }
    }
}

fn go_section(paths: &Paths, b: &Bench, out_dir: &Path) -> anyhow::Result<String> {
    let mut md = String::from("## 2. Go growth cost\n\n");
    let toolchains = match go::ensure_toolchains(&paths.cache) {
        Ok(t) if !t.is_empty() => t,
        Ok(_) | Err(_) => {
            md += "Not measured: no Go toolchain (run `./x fixtures`, which installs them).\n\n";
            return Ok(md);
        }
    };
    // The oldest (bucket maps) and the newest (swiss maps, size-specialized mallocgc).
    let mut picks = vec![&toolchains[0]];
    if toolchains.len() > 1 {
        picks.push(&toolchains[toolchains.len() - 1]);
    }
    let src = paths.root.join("fixtures/bench/gogrowth");
    md += "Workload `fixtures/bench/gogrowth` (100 rounds of a 10,000-key map and two 10,000-element \
           slices built from empty); time measured by the program around its loop. Growth events \
           and mallocgc hits are allocwatch's own counts from the same runs (every run checked: \
           zero loss, exit code 0). The floor is an empty program at exactly the instructions \
           growth-only mode probes (it records nothing: its µs per event divides by the \
           growth-only run's event count).\n\n";
    md += "| Go | configuration | run time, ms: median (min–max) | slowdown: medians (mins) | added time × floor | growth events | mallocgc hits | µs per event |\n";
    md += "|---|---|---:|---:|---:|---:|---:|---:|\n";
    let mut rates = Vec::new();
    for &tc in &picks {
        let exe = out_dir.join(format!("gogrowth-{}", tc.version));
        go::build_fixture_with(tc, &src, &exe, false, None)?;
        let configs = go_configs(true);
        const FLOOR: usize = 1;
        const GROWTH_ONLY: usize = 2;
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
        let mut events: Vec<(u64, u64)> = vec![(0, 0); configs.len()];
        eprintln!("bench: Go growth cost, Go {}", tc.version);
        for rep in 0..b.reps {
            for i in 0..configs.len() {
                let k = (i + rep) % configs.len();
                wait_for_no_tracers();
                let report = b.tmp.join("go-report.json");
                let mut cmd = go_workload(b, &exe, configs[k].1, &report);
                let done = run_captured(&mut cmd, Duration::from_secs(600), &b.tmp)?;
                if !done.success {
                    bail!("gogrowth under {} failed:\n{}", configs[k].0, done.stderr);
                }
                let f = fields(&done.stdout, "gogrowth ")
                    .ok_or_else(|| anyhow!("no gogrowth line:\n{}", done.stdout))?;
                let ns = field_u64(&f, "ns")? as f64;
                eprintln!(
                    "  rep {} {:<32} {:>9.2} ms",
                    rep + 1,
                    configs[k].0,
                    ns / 1e6
                );
                times[k].push(ns);
                if configs[k].1.is_some() {
                    events[k] = go_events(&report)?;
                    if k == FLOOR && events[k] != (0, 0) {
                        bail!("the floor recorded Go events: {:?}", events[k]);
                    }
                }
            }
        }
        let base = median(&times[0]);
        let base_min = min_max(&times[0]).0;
        let floor_added = median(&times[FLOOR]) - base;
        // Growth events per second of the untraced workload, for the per-event table.
        rates.push(events[GROWTH_ONLY].0 as f64 / (base / 1e9));
        for (k, (name, _)) in configs.iter().enumerate() {
            let ms: Vec<f64> = times[k].iter().map(|n| n / 1e6).collect();
            let m = median(&times[k]);
            let (growth, mallocs) = events[k];
            // The floor records nothing: it fires at the growth-only run's sites.
            let hits = if k == FLOOR {
                events[GROWTH_ONLY].0
            } else {
                growth + mallocs
            };
            let vs_floor = if k <= FLOOR || floor_added <= 0.0 {
                "—".to_owned()
            } else {
                format!("{:.2}", (m - base) / floor_added)
            };
            let per_event = if k == 0 || hits == 0 {
                "—".to_owned()
            } else {
                format!("{:.2}", (m - base) / 1e3 / hits as f64)
            };
            let slowdown = if k == 0 {
                "—".to_owned()
            } else {
                format!(
                    "{:+.1} % ({:+.1} %)",
                    (m / base - 1.0) * 100.0,
                    (min_max(&times[k]).0 / base_min - 1.0) * 100.0
                )
            };
            let n = |x: u64| {
                if k <= FLOOR {
                    "—".to_owned()
                } else {
                    x.to_string()
                }
            };
            md += &format!(
                "| {} | {name} | {:.2} ({}) | {slowdown} | {vs_floor} | {} | {} | {per_event} |\n",
                tc.version,
                median(&ms),
                spread(&ms, 2),
                n(growth),
                n(mallocs),
            );
        }
    }
    md.push('\n');
    md += &go_event_cost(paths, b, out_dir, &picks, &rates)?;
    Ok(md)
}

/// The cost of one growth event, measured where it dominates: `gostream count N 1` makes N
/// growslice calls back to back (~18 ns each untraced), under the floor and growth-only mode.
/// `rates`: growth events per second of the untraced gogrowth, per toolchain of `picks`.
fn go_event_cost(
    paths: &Paths,
    b: &Bench,
    out_dir: &Path,
    picks: &[&go::GoToolchain],
    rates: &[f64],
) -> anyhow::Result<String> {
    const N: u64 = 100_000;
    let mut md = format!(
        "Per growth event: `fixtures/bench/gostream count {N} 1` makes {N} growslice calls back \
         to back in one goroutine (self-timed); *ns added per event* = (run time − median \
         untraced) / {N}. *Predicted for gogrowth*: that cost times the growth events per second \
         of the untraced gogrowth run above.\n\n"
    );
    md += "| Go | configuration | run time, ms: median (min–max) | ns added per event: median (min–max) | × floor | predicted slowdown of gogrowth |\n";
    md += "|---|---|---:|---:|---:|---:|\n";
    let src = paths.root.join("fixtures/bench/gostream");
    for (tc, &rate) in picks.iter().zip(rates) {
        let exe = out_dir.join(format!("gostream-{}", tc.version));
        go::build_fixture_with(tc, &src, &exe, false, None)?;
        let configs = go_configs(false);
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
        eprintln!("bench: Go growth event cost, Go {}", tc.version);
        for rep in 0..b.reps {
            for i in 0..configs.len() {
                let k = (i + rep) % configs.len();
                wait_for_no_tracers();
                let report = b.tmp.join("go-report.json");
                let mut cmd = go_workload(b, &exe, configs[k].1, &report);
                cmd.args(["count", &N.to_string(), "1"]);
                let done = run_captured(&mut cmd, Duration::from_secs(600), &b.tmp)?;
                if !done.success {
                    bail!("gostream under {} failed:\n{}", configs[k].0, done.stderr);
                }
                let f = fields(&done.stdout, "gostream ")
                    .ok_or_else(|| anyhow!("no gostream line:\n{}", done.stdout))?;
                if field_u64(&f, "events")? != N {
                    bail!("gostream made {} events, expected {N}", f["events"]);
                }
                if configs[k].1.is_some() {
                    let (growth, mallocs) = go_events(&report)?;
                    let ok = if k == 1 {
                        growth == 0 && mallocs == 0
                    } else {
                        // The runtime grows a few slices of its own.
                        (N..N + 1000).contains(&growth)
                    };
                    if !ok {
                        bail!("gostream under {}: {growth} growth events", configs[k].0);
                    }
                }
                times[k].push(field_u64(&f, "ns")? as f64);
            }
        }
        let base = median(&times[0]);
        let added =
            |k: usize| -> Vec<f64> { times[k].iter().map(|t| (t - base) / N as f64).collect() };
        let floor = median(&added(1));
        for (k, (name, _)) in configs.iter().enumerate() {
            let ms: Vec<f64> = times[k].iter().map(|n| n / 1e6).collect();
            let (cell, ratio, predicted) = if k == 0 {
                (
                    format!("{:.1} ns/event untraced", base / N as f64),
                    "—".to_owned(),
                    "—".to_owned(),
                )
            } else {
                let a = added(k);
                (
                    format!("{:.0} ({})", median(&a), spread(&a, 0)),
                    format!("{:.2}", median(&a) / floor),
                    format!("{:+.1} %", median(&a) * rate / 1e9 * 100.0),
                )
            };
            md += &format!(
                "| {} | {name} | {:.2} ({}) | {cell} | {ratio} | {predicted} |\n",
                tc.version,
                median(&ms),
                spread(&ms, 2),
            );
        }
        md += &format!(
            "| {} | (untraced gogrowth: {rate:.0} growth events/s) | | | | |\n",
            tc.version
        );
    }
    md.push('\n');
    Ok(md)
}

/// (growth events, mallocgc hits) of a `top --json` report of a Go program; an error if any
/// event was lost or the program did not exit with 0.
fn go_events(report: &Path) -> anyhow::Result<(u64, u64)> {
    target_exited_ok(report)?;
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(report)?)?;
    let p = &v["processes"][0];
    for (cause, n) in p["lost"].as_object().into_iter().flatten() {
        if n.as_u64().unwrap_or(0) != 0 {
            bail!("Go workload: lost {cause} = {n}");
        }
    }
    let g = &p["go"];
    let growth = g["map_grows"]["total"].as_u64().unwrap_or(0)
        + g["slice_grows"].as_u64().unwrap_or(0)
        + g["slice_moves"].as_u64().unwrap_or(0);
    let mallocs = g["alloc_sizes"].as_array().map_or(0, |a| {
        a.iter().map(|b| b["count"].as_u64().unwrap_or(0)).sum()
    });
    Ok((growth, mallocs))
}

// ---------------------------------------------------------------------------------------------
// Section 3: throughput.

fn throughput_section(b: &Bench, pairs: u64) -> anyhow::Result<String> {
    let mut md = String::from("## 3. Probe-hit throughput (in-kernel aggregation)\n\n");
    md += "allocwatch aggregates libc calls in per-CPU kernel maps: a probe hit is an \"event\" \
           that never crosses to user space. `alloc_bench pairs N T` runs T producer threads \
           (N malloc/free pairs each, timed from a start barrier to the last join). Exact: the \
           sites whose frame 0 is `bench_pairs` hold exactly T × N mallocs and T × N frees, \
           and every loss counter is 0.\n\n";
    md += "| configuration | threads | calls per run | hits/s: median (min–max) | ns per hit (wall) | exact |\n";
    md += "|---|---:|---:|---:|---:|---|\n";
    let n = pairs * 5;
    for mode in ["floor", "count", "full"] {
        for threads in [1u64, 2, 4] {
            eprintln!("bench: throughput, {mode}, {threads} threads");
            let calls = 2 * n * threads;
            let mut rates = Vec::new();
            let mut exact = if mode == "floor" {
                "—".to_owned()
            } else {
                "yes".to_owned()
            };
            for _ in 0..b.reps {
                wait_for_no_tracers();
                let report = b.tmp.join("tp-report.json");
                let mut cmd = Command::new(&b.bin);
                cmd.args(["top", "--mode", mode, "--json", "-o"])
                    .arg(&report)
                    .arg("--")
                    .arg(&b.alloc_bench)
                    .args(["pairs", &n.to_string(), &threads.to_string()]);
                let done = run_captured(&mut cmd, Duration::from_secs(600), &b.tmp)?;
                if !done.success {
                    bail!("throughput run failed:\n{}", done.stderr);
                }
                target_exited_ok(&report)?;
                let f = fields(&done.stdout, "alloc_bench ")
                    .ok_or_else(|| anyhow!("no alloc_bench line:\n{}", done.stdout))?;
                let ns = field_u64(&f, "ns")? as f64;
                rates.push(calls as f64 / (ns / 1e9));
                if mode != "floor" {
                    let got = loop_calls(&report, "bench_pairs")?;
                    let want = (n * threads, n * threads, 0);
                    if got != want {
                        exact = format!("no: (malloc, free, lost) {got:?}, want {want:?}");
                    }
                }
            }
            let m = median(&rates);
            md += &format!(
                "| allocwatch {mode} | {threads} | {calls} | {:.0} ({}) | {:.0} | {exact} |\n",
                m,
                spread(&rates, 0),
                1e9 / m,
            );
        }
    }
    md.push('\n');
    Ok(md)
}

/// (malloc calls, free calls) of the sites whose frame 0 is `function`, and the process's lost
/// total, from a `top --json` report.
fn loop_calls(report: &Path, function: &str) -> anyhow::Result<(u64, u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(report)?)?;
    let p = &v["processes"][0];
    let lost: u64 = p["lost"].as_object().map_or(0, |o| {
        o.values().filter_map(serde_json::Value::as_u64).sum()
    });
    let (mut mallocs, mut frees) = (0, 0);
    for s in p["sites"].as_array().into_iter().flatten() {
        if s["frames"][0]["function"] != function {
            continue;
        }
        let calls = s["calls"].as_u64().unwrap_or(0);
        match s["api"].as_str() {
            Some("malloc") => mallocs += calls,
            Some("free") => frees += calls,
            _ => {}
        }
    }
    Ok((mallocs, frees, lost))
}

// ---------------------------------------------------------------------------------------------
// Section 4: agent footprint and /metrics.

struct KillOnDrop(Vec<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn footprint_section(b: &Bench, counts: &[usize]) -> anyhow::Result<String> {
    let mut md = String::from("## 4. Agent footprint and /metrics\n\n");
    if !b.libc_fixture.is_file() {
        md += "Not measured: target/fixtures/libc_fixture is missing (run `./x fixtures`).\n\n";
        return Ok(md);
    }
    md += "`allocwatch agent --comm '^libc_fixture$'` (full mode, stacks) started after N \
           `libc_fixture` processes: idle ones (`wait-run`: blocked in sigwait) and busy ones \
           (`loop`: malloc(48) + free every millisecond, about 2,000 calls/s each). Time to \
           attach: from the agent's start (BPF load and verification included) until its \
           `allocwatch_processes` gauges sum to N. RSS and CPU of the agent over the next 10 s; \
           scrape latency: 20 sequential GETs of /metrics on loopback.\n\n";
    md += "| processes | time to attach all | agent RSS, MiB | agent CPU, % of one core | /metrics series | /metrics bytes | scrape ms: median (max) |\n";
    md += "|---|---:|---:|---:|---:|---:|---:|\n";
    let mut runs: Vec<(usize, &str)> = counts.iter().map(|&n| (n, "wait-run")).collect();
    runs.extend(counts.iter().filter(|&&n| n <= 100).map(|&n| (n, "loop")));
    for (n, mode) in runs {
        eprintln!("bench: footprint with {n} {mode} processes");
        let label = if mode == "loop" { "busy" } else { "idle" };
        match footprint_one(b, n, mode) {
            Ok(row) => md += &format!("| {n} {label} {row}\n"),
            Err(e) => md += &format!("| {n} {label} | failed: {e:#} | | | | | |\n"),
        }
    }
    md.push('\n');
    if let Some(&n) = counts.iter().max() {
        eprintln!("bench: {n} processes started while the agent runs");
        md += "Processes started while the agent runs (issue 4: picked up within one second): the \
               same agent, serving, with none of the fixtures yet; then N idle fixtures spawned back \
               to back. *Visible*: from the last spawn until the `allocwatch_processes` gauges have \
               grown by N; the slowest of the scrapes polled meanwhile (every 20 ms).\n\n";
        md += "| processes | spawning them took | all visible after the last spawn | slowest scrape meanwhile |\n";
        md += "|---:|---:|---:|---:|\n";
        match pickup_one(b, n) {
            Ok(row) => md += &format!("| {n} {row}\n"),
            Err(e) => md += &format!("| {n} | failed: {e:#} | | |\n"),
        }
        md.push('\n');
    }
    Ok(md)
}

/// One row of the pick-up table after the first cell: `| spawn | visible | slowest scrape |`.
fn pickup_one(b: &Bench, n: usize) -> anyhow::Result<String> {
    wait_for_no_tracers();
    let port = 19464;
    let listen = format!("127.0.0.1:{port}");
    let agent = Command::new(&b.bin)
        .args(["agent", "--listen", &listen, "--comm", "^libc_fixture$"])
        .env(DEPLOYED_ALLOCATOR.0, DEPLOYED_ALLOCATOR.1)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(b.tmp.join("agent.stderr"))?)
        .spawn()?;
    let agent_pid = agent.id();
    let mut agent = KillOnDrop(vec![agent]);
    let deadline = Instant::now() + Duration::from_secs(120);
    // Processes of other users of the machine may match too: count from what it sees now.
    let base = loop {
        if let Ok(body) = http_get(port, "/metrics") {
            break gauge(&body, "allocwatch_processes").unwrap_or(0.0);
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not serve within 120 s: {}",
                fs::read_to_string(b.tmp.join("agent.stderr")).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    let started = Instant::now();
    let mut procs = KillOnDrop(Vec::new());
    for _ in 0..n {
        procs.0.push(
            Command::new(&b.libc_fixture)
                .arg("wait-run")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    let spawning = started.elapsed();
    let last = Instant::now();
    let mut slowest = Duration::ZERO;
    let visible = loop {
        let t = Instant::now();
        let body = http_get(port, "/metrics")?;
        slowest = slowest.max(t.elapsed());
        if gauge(&body, "allocwatch_processes").is_some_and(|v| v >= base + n as f64) {
            break last.elapsed();
        }
        if last.elapsed() > Duration::from_secs(60) {
            bail!("the agent did not report the {n} new processes within 60 s");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let _ = Command::new("kill").arg(agent_pid.to_string()).status();
    if let Some(a) = agent.0.first_mut() {
        let _ = a.wait();
    }
    drop(procs);
    Ok(format!(
        "| {:.0} ms | {:.0} ms | {:.0} ms |",
        spawning.as_secs_f64() * 1e3,
        visible.as_secs_f64() * 1e3,
        slowest.as_secs_f64() * 1e3,
    ))
}

/// One footprint row after the first cell: `| attach | rss | cpu | series | bytes | scrape |`.
fn footprint_one(b: &Bench, n: usize, mode: &str) -> anyhow::Result<String> {
    wait_for_no_tracers();
    let mut procs = KillOnDrop(Vec::new());
    for _ in 0..n {
        procs.0.push(
            Command::new(&b.libc_fixture)
                .arg(mode)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    thread::sleep(Duration::from_millis(500));
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let agent = Command::new(&b.bin)
        .args(["agent", "--listen", &listen, "--comm", "^libc_fixture$"])
        .env(DEPLOYED_ALLOCATOR.0, DEPLOYED_ALLOCATOR.1)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(b.tmp.join("agent.stderr"))?)
        .spawn()?;
    let agent_pid = agent.id();
    let mut agent = KillOnDrop(vec![agent]);
    let deadline = started + Duration::from_secs(120);
    let attach = loop {
        if let Ok(body) = http_get(port, "/metrics")
            && gauge(&body, "allocwatch_processes").is_some_and(|v| v >= n as f64)
        {
            break started.elapsed();
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not report {n} processes within 120 s: {}",
                fs::read_to_string(b.tmp.join("agent.stderr")).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    let cpu0 = cpu_ticks(agent_pid)?;
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(10));
    let cpu = (cpu_ticks(agent_pid)? - cpu0) as f64 / clock_ticks() / t0.elapsed().as_secs_f64();
    let rss = rss_kib(agent_pid)? as f64 / 1024.0;
    let mut lat = Vec::new();
    let mut body = String::new();
    for _ in 0..20 {
        let t = Instant::now();
        body = http_get(port, "/metrics")?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let series = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count();
    let (_, max) = min_max(&lat);
    // SIGTERM: the agent detaches cleanly (KillOnDrop only reaps it then).
    let _ = Command::new("kill").arg(agent_pid.to_string()).status();
    if let Some(a) = agent.0.first_mut() {
        let _ = a.wait();
    }
    Ok(format!(
        "| {:.0} ms | {rss:.1} | {:.1} | {series} | {} | {:.1} ({max:.1}) |",
        attach.as_secs_f64() * 1e3,
        cpu * 100.0,
        body.len(),
        median(&lat),
    ))
}

// ---------------------------------------------------------------------------------------------
// Section 5/6: symbolization and /metrics rendering (agent internals).

fn internals_section(paths: &Paths) -> anyhow::Result<String> {
    eprintln!("bench: agent internals (release test build)");
    let mut cargo = cmd::cargo(paths);
    cargo.args([
        "test",
        "--release",
        "-p",
        "allocwatch",
        "--bin",
        "allocwatch",
        "bench::",
        "--",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    eprintln!("+ {}", cmd::show(&cargo));
    let out = cargo.output().context("running the agent's benchmarks")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "the agent's benchmarks failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let lines = |name: &str| -> Vec<BTreeMap<String, String>> {
        stdout
            .lines()
            .filter_map(|l| l.find(&format!("BENCH {name} ")).map(|i| &l[i..]))
            .filter_map(|l| fields(l, "BENCH "))
            .collect()
    };
    let get = |f: &BTreeMap<String, String>, k: &str| f.get(k).cloned().unwrap_or_default();
    let mut md = String::from("## 5. Symbolization\n\n");
    md += "The agent's symbolizer thread (blazesym behind a channel), asked by the test process \
           about its own addresses: the first request (maps noted, the binary's symbol table \
           parsed cold), then 8-frame stacks back to back for 2 s, all addresses seen before \
           (warm cache) or new ones each time (binary already parsed); then the first request \
           for an address in libc (its DWARF through the debug link when the distribution's \
           debug package is installed). One request at a time: each includes a round trip to \
           the symbolizer thread.\n\n";
    md += "| binary | first request, ms | warm stacks/s | stacks/s, new addresses |\n|---|---:|---:|---:|\n";
    for f in lines("symbolize") {
        let mib = get(&f, "binary_bytes").parse::<f64>().unwrap_or(0.0) / 1048576.0;
        md += &format!(
            "| allocwatch test binary, {mib:.1} MiB (release, symbols, no DWARF) | {} | {} | {} |\n",
            get(&f, "first_ms"),
            get(&f, "warm_stacks_per_s"),
            get(&f, "new_stacks_per_s"),
        );
        let dwarf = if get(&f, "libc_dwarf") == "true" {
            "with DWARF through its debug link"
        } else {
            "symbols only (no debug package)"
        };
        md += &format!(
            "| libc.so.6, {dwarf} | {} | | |\n",
            get(&f, "libc_first_ms")
        );
    }
    md += "\n## 6. /metrics rendering\n\n";
    md += "The exporter's update and text encoding (what a scrape does after the loop hands over \
           its snapshot) on a synthetic model: processes with their own identity, 5 APIs, a size \
           histogram and 20 four-frame sites each. First render, then the median and max of 9.\n\n";
    md += "| processes | series | response bytes | first render, ms | render ms: median (max) |\n|---:|---:|---:|---:|---:|\n";
    for f in lines("metrics") {
        md += &format!(
            "| {} | {} | {} | {} | {} ({}) |\n",
            get(&f, "processes"),
            get(&f, "series"),
            get(&f, "bytes"),
            get(&f, "first_ms"),
            get(&f, "median_ms"),
            get(&f, "max_ms"),
        );
    }
    md.push('\n');
    Ok(md)
}

fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}

/// The sum of a gauge's series in a Prometheus text body (`None` without any).
fn gauge(body: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = body
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(labels) => labels.split_once('}')?.1,
                None => rest,
            };
            rest.strip_prefix(' ')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The sum of the values of `name`'s series whose label set contains `label` (e.g.
/// `comm="gostream"`; `""` for all). `None` without any.
fn sum_where(body: &str, name: &str, label: &str) -> Option<f64> {
    let values: Vec<f64> = body
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, rest) = match rest.strip_prefix('{') {
                Some(r) => {
                    let (labels, rest) = r.split_once('}')?;
                    (labels, rest)
                }
                None => ("", rest),
            };
            if !labels.contains(label) {
                return None;
            }
            rest.strip_prefix(' ')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// `allocwatch_events_lost_total` by cause.
fn lost_by_cause(body: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for l in body.lines() {
        let Some(rest) = l.strip_prefix("allocwatch_events_lost_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let cause = labels
            .split(',')
            .find_map(|kv| kv.strip_prefix("cause=\""))
            .map(|c| c.trim_end_matches('"').to_owned())
            .unwrap_or_else(|| labels.to_owned());
        if let Ok(v) = value.trim().parse::<f64>() {
            *out.entry(cause).or_default() += v;
        }
    }
    out
}

/// Whether a `sites` process has blocked its signals: SIGTERM (15, bit 14 of `SigBlk`) is
/// blocked by the same call as SIGUSR1, which `sigwait` unblocks while it waits.
fn blocks_usr1(pid: u32) -> anyhow::Result<bool> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| anyhow!("no SigBlk for {pid}"))?;
    Ok(mask & (1 << 14) != 0)
}

fn signal(sig: &str, pids: &[u32]) -> anyhow::Result<()> {
    if pids.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("kill");
    cmd.arg(format!("-{sig}"));
    cmd.args(pids.iter().map(u32::to_string));
    cmd::run(&mut cmd)
}

/// Polls /metrics until `ready` holds for the body (every `every`), up to `limit`.
fn poll_metrics(
    port: u16,
    every: Duration,
    limit: Duration,
    what: &str,
    stderr: &Path,
    mut ready: impl FnMut(&str) -> bool,
) -> anyhow::Result<(String, Duration)> {
    let started = Instant::now();
    loop {
        if let Ok(body) = http_get(port, "/metrics")
            && ready(&body)
        {
            return Ok((body, started.elapsed()));
        }
        if started.elapsed() > limit {
            bail!(
                "{what} within {limit:?}; agent stderr:\n{}",
                fs::read_to_string(stderr).unwrap_or_default()
            );
        }
        thread::sleep(every);
    }
}

/// Stops the agent with SIGTERM (it detaches cleanly) and reaps it.
fn stop_agent(agent: &mut KillOnDrop) {
    for a in &mut agent.0 {
        let _ = Command::new("kill").arg(a.id().to_string()).status();
        let _ = a.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Section 7: /metrics end to end with 10k and 100k series.

/// Sites of one `sites` process: 12 leaves × 10 callers, malloc and free each, plus stdio's
/// buffer (`printf`).
const SITES_PER_PROC: usize = 2 * 12 * 10 + 1;
/// Series per site (`allocwatch_site_*` families).
const SITE_FAMILIES: usize = 4;

fn build_sites(paths: &Paths, out_dir: &Path) -> anyhow::Result<PathBuf> {
    let src = paths.root.join("fixtures/bench/sites.c");
    let out = out_dir.join("sites");
    cmd::run(
        Command::new("gcc")
            .args([
                "-O1",
                "-g",
                "-fno-omit-frame-pointer",
                "-Wall",
                "-Wextra",
                "-o",
            ])
            .arg(&out)
            .arg(&src),
    )?;
    Ok(out)
}

/// How the agent's allocator (mimalloc, built in) is run: as the image and the DaemonSet run it
/// (arena memory committed as it is used), and with mimalloc's defaults.
const AGENT_ALLOCATOR: [(&str, Option<(&str, &str)>); 2] = [
    (
        "mimalloc, `MIMALLOC_ARENA_EAGER_COMMIT=0` (as deployed)",
        Some(("MIMALLOC_ARENA_EAGER_COMMIT", "0")),
    ),
    ("mimalloc, defaults", None),
];

fn metrics_section(paths: &Paths, b: &Bench, counts: &[usize]) -> anyhow::Result<String> {
    let sites = build_sites(paths, &b.tmp)?;
    let mut md = String::from("## 7. /metrics end to end with 10k and 100k series\n\n");
    md += &format!(
        "A real agent (`allocwatch agent --config FILE`: `top_k = 1000`, `max_site_series = \
         1000000`, `comm = [\"^awsites_\"]`, `max_stacks = 65536`) traces N processes of \
         `fixtures/bench/sites.c`, each started under its own name (a symlink `awsites_NNN`: \
         one identity per process) with {SITES_PER_PROC} sites (12 leaf functions × 10 callers, \
         malloc and free, and stdio's buffer) = {} `allocwatch_site_*` series per process. The \
         processes make their calls once the agent has attached them (SIGUSR1), then wait. \
         *Until exported*: from that signal until a scrape holds every site series (each site is \
         symbolized once, then cached). Then sequential GETs of /metrics on loopback (20, or 10 \
         above 20,000 series): latency as the client sees it, and the agent's own \
         `allocwatch_scrape_duration_seconds` (snapshot of the kernel maps and the exporter's \
         update, up to its self-metrics; the text encoding of the rest and HTTP come after). \
         Checked: N processes reported, every site series present, every loss counter 0. The \
         agent allocates with mimalloc, not the glibc malloc it probes; run as deployed and with \
         mimalloc's defaults.\n\n",
        SITES_PER_PROC * SITE_FAMILIES
    );
    md += "| processes | agent's allocator | series | site series | bytes | until exported, s | scrape ms: median (max) | agent's own timing, ms: median (max) | agent RSS, MiB |\n";
    md += "|---:|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for &n in counts {
        for (label, env) in AGENT_ALLOCATOR {
            eprintln!("bench: /metrics end to end, {n} processes, {label}");
            match metrics_one(b, &sites, n, env) {
                Ok(row) => md += &format!("| {n} | {label} {row}\n"),
                Err(e) => {
                    md += &format!("| {n} | {label} | failed: {e:#} | | | | | | |\n");
                    eprintln!("bench: failed: {e:#}");
                }
            }
        }
    }
    md.push('\n');
    Ok(md)
}

/// One row after the first two cells.
fn metrics_one(
    b: &Bench,
    sites: &Path,
    n: usize,
    env: Option<(&str, &str)>,
) -> anyhow::Result<String> {
    wait_for_no_tracers();
    let dir = b.tmp.join("sites-bin");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let mut procs = KillOnDrop(Vec::new());
    for i in 0..n {
        let link = dir.join(format!("awsites_{i:03}"));
        std::os::unix::fs::symlink(sites, &link)?;
        procs.0.push(
            Command::new(&link)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    let pids: Vec<u32> = procs.0.iter().map(Child::id).collect();
    let port = free_port()?;
    let config = b.tmp.join("metrics-agent.toml");
    fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ntop_k = 1000\nmax_site_series = 1000000\n\
             [select]\ncomm = [\"^awsites_\"]\n[capacity]\nmax_stacks = 65536\n\
             [kubernetes]\nenabled = false\n"
        ),
    )?;
    let stderr = b.tmp.join("agent.stderr");
    let mut cmd = Command::new(&b.bin);
    cmd.arg("agent")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr)?);
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let mut agent = KillOnDrop(vec![cmd.spawn()?]);
    let agent_pid = agent.0[0].id();
    poll_metrics(
        port,
        Duration::from_millis(50),
        Duration::from_secs(120),
        &format!("the agent did not report {n} processes"),
        &stderr,
        |body| {
            sum_where(body, "allocwatch_processes", "comm=\"awsites_").unwrap_or(0.0) >= n as f64
        },
    )?;
    // SIGUSR1 before the program blocks it would kill it.
    let t = Instant::now();
    for &pid in &pids {
        while !blocks_usr1(pid)? {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("process {pid} does not block SIGUSR1");
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
    signal("USR1", &pids)?;
    let want = n * SITES_PER_PROC * SITE_FAMILIES;
    let (_, until) = poll_metrics(
        port,
        Duration::from_millis(200),
        Duration::from_secs(300),
        &format!("the agent did not export {want} site series"),
        &stderr,
        |body| gauge(body, "allocwatch_call_site_series").unwrap_or(0.0) >= want as f64,
    )?;
    let scrapes = if want > 20_000 { 10 } else { 20 };
    let (mut lat, mut own) = (Vec::new(), Vec::new());
    let mut body = String::new();
    for _ in 0..scrapes {
        let t = Instant::now();
        body = http_get(port, "/metrics")?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        own.push(gauge(&body, "allocwatch_scrape_duration_seconds").unwrap_or(f64::NAN) * 1e3);
    }
    let lost: Vec<String> = lost_by_cause(&body)
        .into_iter()
        .filter(|(_, v)| *v != 0.0)
        .map(|(c, v)| format!("{c}={v}"))
        .collect();
    if !lost.is_empty() {
        bail!("the agent lost events: {}", lost.join(", "));
    }
    let site_series = gauge(&body, "allocwatch_call_site_series").unwrap_or(0.0) as usize;
    if site_series != want {
        bail!("{site_series} site series, expected {want}");
    }
    let running = sum_where(&body, "allocwatch_processes", "comm=\"awsites_").unwrap_or(0.0);
    if running != n as f64 {
        bail!("{running} processes reported, expected {n}");
    }
    let series = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count();
    let rss = rss_kib(agent_pid)? as f64 / 1024.0;
    stop_agent(&mut agent);
    Ok(format!(
        "| {series} | {site_series} | {} | {:.1} | {:.1} ({:.1}) | {:.1} ({:.1}) | {rss:.1} |",
        body.len(),
        until.as_secs_f64(),
        median(&lat),
        min_max(&lat).1,
        median(&own),
        min_max(&own).1,
    ))
}

// ---------------------------------------------------------------------------------------------
// Section 8: the streaming path (Go events through the ring buffer).

fn stream_section(
    paths: &Paths,
    b: &Bench,
    out_dir: &Path,
    rates: &[String],
    secs: f64,
) -> anyhow::Result<String> {
    let rates: Vec<(u64, u32, u32)> = rates
        .iter()
        .map(|r| {
            let (r, hogs) = r.split_once('+').unwrap_or((r, "0"));
            let (rate, g) = r.split_once('/').unwrap_or((r, "2"));
            Ok((rate.parse()?, g.parse()?, hogs.parse()?))
        })
        .collect::<anyhow::Result<_>>()
        .context("--stream-rates: RATE[/GOROUTINES][+HOGS]")?;
    let mut md = String::from("## 8. Streaming path: Go events through the ring buffer\n\n");
    let toolchains = match go::ensure_toolchains(&paths.cache) {
        Ok(t) if !t.is_empty() => t,
        Ok(_) | Err(_) => {
            md += "Not measured: no Go toolchain (run `./x fixtures`, which installs them).\n\n";
            return Ok(md);
        }
    };
    let tc = &toolchains[toolchains.len() - 1];
    let exe = out_dir.join(format!("gostream-{}", tc.version));
    go::build_fixture_with(
        tc,
        &paths.root.join("fixtures/bench/gostream"),
        &exe,
        false,
        None,
    )?;
    let reps = b.reps.min(3);
    md += &format!(
        "Producer `fixtures/bench/gostream RATE {secs} GOROUTINES` (Go {}): GOROUTINES (2 unless \
         said) goroutines grow a nil `[]int` by one element RATE times per second in total (0: as \
         fast as they can) for {secs} s (`+N`: N busy-loop shell processes compete for the CPUs); every growth is a `growslice` call, one ring-buffer record with its user \
         stack. Consumer: one `allocwatch agent --comm '^gostream'` (the DaemonSet's path; \
         default Go settings: growth and GC, no mallocgc) for the whole section; the producer \
         starts streaming once the agent has attached it (SIGUSR1). *Delivered*: the increase \
         of the producer's `allocwatch_go_slice_grows_total` over the run (after the \
         scrape's drain); *lost*: the increase of `allocwatch_events_lost_total` (all causes); \
         *agent CPU*: utime + stime of the agent (/proc/PID/stat) from the start signal to the \
         scrape after the producer's exit, which includes the agent's idle work (the first row). \
         {reps} runs per rate, rates in rotating order; every run checked (the producer exited 0, \
         delivered + lost ≥ the producer's own count; the runtime grows a few slices of its own).\n\n",
        tc.version
    );
    md += "| target rate, events/s | produced/s: median (min–max) | delivered/s: median | lost: total over runs (by cause) | agent CPU, % of one core: median | agent CPU s per million events: median (min–max) |\n";
    md += "|---|---:|---:|---:|---:|---:|\n";

    wait_for_no_tracers();
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let stderr = b.tmp.join("agent.stderr");
    let mut agent = KillOnDrop(vec![
        Command::new(&b.bin)
            .args(["agent", "--listen", &listen, "--comm", "^gostream"])
            .env(DEPLOYED_ALLOCATOR.0, DEPLOYED_ALLOCATOR.1)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr)?)
            .spawn()?,
    ]);
    let agent_pid = agent.0[0].id();
    poll_metrics(
        port,
        Duration::from_millis(50),
        Duration::from_secs(60),
        "the agent did not serve /metrics",
        &stderr,
        |_| true,
    )?;
    let tick = clock_ticks();
    // Idle: the agent with nothing to stream (its /proc scans), over the same time.
    let idle = {
        let c0 = cpu_ticks(agent_pid)?;
        let t0 = Instant::now();
        thread::sleep(Duration::from_secs_f64(secs));
        (cpu_ticks(agent_pid)? - c0) as f64 / tick / t0.elapsed().as_secs_f64()
    };
    md += &format!(
        "| idle (no producer) | — | — | — | {:.1} | — |\n",
        idle * 100.0
    );
    let mut runs: Vec<Vec<StreamRun>> = rates.iter().map(|_| Vec::new()).collect();
    for rep in 0..reps {
        for i in 0..rates.len() {
            let k = (i + rep) % rates.len();
            let (rate, goroutines, hogs) = rates[k];
            let r = stream_one(
                b,
                &exe,
                port,
                agent_pid,
                (rate, goroutines, hogs),
                secs,
                &stderr,
            )?;
            eprintln!(
                "  rep {} rate {rate:>7}/{goroutines}+{hogs}: produced {:.0}/s, delivered {:.0}/s, lost {:?}, cpu {:.1} %",
                rep + 1,
                r.produced,
                r.delivered,
                r.lost,
                r.cpu_frac * 100.0
            );
            runs[k].push(r);
        }
    }
    stop_agent(&mut agent);
    let mut notes = Vec::new();
    for (k, &(rate, goroutines, hogs)) in rates.iter().enumerate() {
        let get = |f: fn(&StreamRun) -> f64| runs[k].iter().map(f).collect::<Vec<f64>>();
        let produced = get(|r| r.produced);
        let per_m = get(|r| r.cpu_per_m);
        let mut lost: BTreeMap<&str, f64> = BTreeMap::new();
        for r in &runs[k] {
            for (c, v) in &r.lost {
                *lost.entry(c).or_default() += v;
            }
        }
        let total: f64 = lost.values().sum();
        let lost = if total == 0.0 {
            "0".to_owned()
        } else {
            let causes: Vec<String> = lost
                .iter()
                .filter(|(_, v)| **v != 0.0)
                .map(|(c, v)| format!("{c} {v:.0}"))
                .collect();
            format!("{total:.0} ({})", causes.join(", "))
        };
        let rate = if rate == 0 {
            "unpaced".to_owned()
        } else {
            rate.to_string()
        };
        let g = if goroutines == 2 {
            String::new()
        } else {
            format!(
                ", {goroutines} goroutine{}",
                if goroutines == 1 { "" } else { "s" }
            )
        };
        let with_foreign = runs[k].iter().filter(|r| !r.foreign.is_empty()).count();
        if with_foreign > 0 {
            let who: Vec<&str> = runs[k]
                .iter()
                .flat_map(|r| r.foreign.iter().map(String::as_str))
                .collect();
            notes.push(format!(
                "rate {rate}/{goroutines}+{hogs}: {with_foreign} run(s) with other BPF holders present ({})",
                who.join(", ")
            ));
        }
        let g = if hogs > 0 {
            format!("{g}, {hogs} busy loops beside")
        } else {
            g
        };
        md += &format!(
            "| {rate}{g} | {:.0} ({}) | {:.0} | {lost} | {:.1} | {:.2} ({}) |\n",
            median(&produced),
            spread(&produced, 0),
            median(&get(|r| r.delivered)),
            median(&get(|r| r.cpu_frac)) * 100.0,
            median(&per_m),
            spread(&per_m, 2),
        );
    }
    md.push('\n');
    if !notes.is_empty() {
        md += &format!("Other tracers were running: {}.\n\n", notes.join("; "));
    }
    Ok(md)
}

/// One producer run.
struct StreamRun {
    /// Events per second, the producer's count and time.
    produced: f64,
    /// Events per second the agent counted.
    delivered: f64,
    /// Loss counters' increase by cause (non-zero only).
    lost: BTreeMap<String, f64>,
    /// Agent CPU over the run, fraction of one core.
    cpu_frac: f64,
    /// Agent CPU seconds per million delivered events.
    cpu_per_m: f64,
    /// Other processes holding BPF programs during the run (their uprobes may trap in the
    /// producer too).
    foreign: Vec<String>,
}

/// `(rate, goroutines, hogs)`: `hogs` busy-loop processes compete for the CPUs during the run.
fn stream_one(
    b: &Bench,
    exe: &Path,
    port: u16,
    agent_pid: u32,
    (rate, goroutines, hogs): (u64, u32, u32),
    secs: f64,
    stderr: &Path,
) -> anyhow::Result<StreamRun> {
    // The executable is gostream-VERSION.
    const COMM: &str = "comm=\"gostream";
    let out_path = b.tmp.join("gostream.stdout");
    let mut child = KillOnDrop(vec![
        Command::new(exe)
            .args([rate.to_string(), secs.to_string(), goroutines.to_string()])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path)?)
            .stderr(Stdio::inherit())
            .spawn()?,
    ]);
    let pid = child.0[0].id();
    // SIGUSR1 before the program's signal.Notify would be ignored (Go catches every signal).
    let t = Instant::now();
    while !fs::read_to_string(&out_path)?.starts_with("ready") {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("gostream did not get ready within 30 s");
        }
        thread::sleep(Duration::from_millis(5));
    }
    let (before, _) = poll_metrics(
        port,
        Duration::from_millis(50),
        Duration::from_secs(60),
        "the agent did not attach gostream",
        stderr,
        |body| sum_where(body, "allocwatch_processes", COMM).unwrap_or(0.0) >= 1.0,
    )?;
    let grows0 = sum_where(&before, "allocwatch_go_slice_grows_total", COMM).unwrap_or(0.0);
    let lost0 = lost_by_cause(&before);
    // The agent holds the section's own programs; anyone else's are noted with the run.
    let mut foreign = foreign_bpf_holders_except(&[agent_pid]);
    let mut busy = KillOnDrop(Vec::new());
    for _ in 0..hogs {
        busy.0.push(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .spawn()?,
        );
    }
    let cpu0 = cpu_ticks(agent_pid)?;
    let t0 = Instant::now();
    signal("USR1", &[pid])?;
    let limit = Duration::from_secs_f64(secs + 60.0);
    let status = loop {
        if let Some(st) = child.0[0].try_wait()? {
            break st;
        }
        if t0.elapsed() > limit {
            bail!("gostream did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    drop(busy);
    for f in foreign_bpf_holders_except(&[agent_pid]) {
        if !foreign.contains(&f) {
            foreign.push(f);
        }
    }
    let after = http_get(port, "/metrics")?;
    let cpu = (cpu_ticks(agent_pid)? - cpu0) as f64 / clock_ticks();
    let wall = t0.elapsed().as_secs_f64();
    if !status.success() {
        bail!("gostream {rate} exited with {status}");
    }
    let out = fs::read_to_string(&out_path)?;
    let f = fields(&out, "gostream ").ok_or_else(|| anyhow!("no gostream line: {out:?}"))?;
    let (events, ns) = (field_u64(&f, "events")? as f64, field_u64(&f, "ns")? as f64);
    let delivered =
        sum_where(&after, "allocwatch_go_slice_grows_total", COMM).unwrap_or(0.0) - grows0;
    let mut lost = lost_by_cause(&after);
    for (c, v) in &mut lost {
        *v -= lost0.get(c).copied().unwrap_or(0.0);
    }
    lost.retain(|_, v| *v != 0.0);
    let lost_total: f64 = lost.values().sum();
    // The runtime grows a few slices of its own (start-up, GC): a little more, never less,
    // unless counted as lost.
    if delivered + lost_total < events || delivered > events * 1.001 + 100.0 {
        bail!(
            "gostream {rate}: produced {events}, delivered {delivered}, lost {lost:?}: \
             the counts do not add up"
        );
    }
    Ok(StreamRun {
        produced: events / (ns / 1e9),
        delivered: delivered / (ns / 1e9),
        lost,
        cpu_frac: cpu / wall,
        cpu_per_m: if delivered > 0.0 {
            cpu / (delivered / 1e6)
        } else {
            f64::NAN
        },
        foreign,
    })
}
