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
//!   information; ns added per call and the ratio to the floor. Also `alloc_bench_nofp deep`
//!   (no frame pointers, 45 frames) under the unwinders, for the table walk's cost.
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
//! - `node`: the whole node (issue 15): a few hundred processes alive and a fixed batch of C,
//!   shell, python3 and Go programs, without an agent, under the agent in several modes and
//!   under bpftrace; the batch's slowdown, the tracer's CPU and its BPF programs' CPU. Not in
//!   the default run (it loads probes for every process of the machine): `--only node`.

mod agent_http;
mod footprint;
mod go_growth;
mod internals;
mod machine;
mod measure;
mod metrics;
mod node;
mod probe;
mod stream;
mod throughput;

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
    cmd, go, host,
    paths::Paths,
    procs::{clock_ticks, cpu_ticks, free_port, rss_kib},
    setup,
};

use self::{
    agent_http::*, footprint::*, go_growth::*, internals::*, machine::*, measure::*, metrics::*,
    node::*, probe::*, stream::*, throughput::*,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Repetitions of every configuration (median and min–max are reported).
    #[arg(long, default_value_t = 7)]
    pub reps: usize,
    /// malloc/free pairs per run of the C workload (2 calls each).
    #[arg(long, default_value_t = 10_000)]
    pub pairs: u64,
    /// Run only these sections: probe, go, throughput, footprint, internals, metrics, stream,
    /// node (repeatable; node runs only when named).
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
    /// Rounds of the node section's batch (each: sh, python3, libc_fixture, gogrowth).
    #[arg(long, default_value_t = 30)]
    pub node_rounds: usize,
    /// Mostly idle processes alive throughout the node section.
    #[arg(long, default_value_t = 200)]
    pub node_idle: usize,
    /// Programs of the node section's batch running at once.
    #[arg(long, default_value_t = 2)]
    pub node_parallel: usize,
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
    "node",
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
    host::require_root("run ./x bench (it loads eBPF programs and attaches uprobes)")?;
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
    let named = |s: &str| args.only.iter().any(|o| o == s);
    // The node section loads probes for every process of the machine: only when named.
    let want = |s: &str| named(s) || (args.only.is_empty() && s != "node");
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
        alloc_bench_nofp: build_alloc_bench_nofp(paths, &out_dir)?,
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
    let node_opts = NodeOpts {
        rounds: args.node_rounds,
        idle: args.node_idle,
        parallel: args.node_parallel,
    };
    let sections: [(&str, Section<'_>); 8] = [
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
        ("node", &|| {
            node_section(paths, &bench, &out_dir, &node_opts)
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
    if args.only.iter().any(|o| o == "node") {
        s += &format!(
            " --node-rounds {} --node-idle {} --node-parallel {}",
            args.node_rounds, args.node_idle, args.node_parallel
        );
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

fn build_alloc_bench(paths: &Paths, out_dir: &Path) -> anyhow::Result<PathBuf> {
    build_c_bench(paths, out_dir, "alloc_bench")
}

/// `alloc_bench` without frame pointers (`alloc_bench_nofp`), as distributions build C: the
/// table walk's workload.
fn build_alloc_bench_nofp(paths: &Paths, out_dir: &Path) -> anyhow::Result<PathBuf> {
    crate::fixtures::build_bench_c(
        paths,
        out_dir,
        "alloc_bench",
        "alloc_bench_nofp",
        "-fomit-frame-pointer",
    )
}

/// `fixtures/bench/NAME.c` -> `out_dir/NAME`, with the flags issue 5 asks for: -O1 with frame
/// pointers (the workloads defeat the optimizer).
fn build_c_bench(paths: &Paths, out_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    crate::fixtures::build_bench_c(paths, out_dir, name, name, "-fno-omit-frame-pointer")
}

struct Bench {
    bin: PathBuf,
    alloc_bench: PathBuf,
    /// Built without frame pointers (the `deep` workload of section 1).
    alloc_bench_nofp: PathBuf,
    libc_fixture: PathBuf,
    tmp: PathBuf,
    reps: usize,
}
