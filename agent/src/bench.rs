//! Micro-benchmarks of agent internals for `./x bench` (BENCHMARKS.md, sections 5 and 6).
//! Ignored tests, run by `xtask/src/bench/internals.rs` with `--ignored --nocapture` on a
//! release build; each prints `BENCH <name> key=value …` lines that the harness turns into
//! tables.

use std::{
    collections::BTreeMap,
    hint::black_box,
    time::{Duration, Instant},
};

use crate::{
    model::{Histogram, ProcessLabels, ProcessSnapshot, SelfStats, SiteSnapshot},
    serve::metrics::{Exporter, MetricsConfig},
    symbolize::{Frame, SymbolizerHandle},
};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Sites per process identity in the synthetic /metrics model (every one gets its own
/// series: `top_k` is set to it).
const SITES_PER_PROCESS: usize = 20;

/// A process of the synthetic model: its own identity (comm), every malloc-family API used,
/// a size histogram, `SITES_PER_PROCESS` sites of four frames.
fn process(i: usize) -> ProcessSnapshot {
    let apis = [
        "malloc",
        "calloc",
        "realloc",
        "posix_memalign",
        "aligned_alloc",
    ];
    let frame = |f: String| Frame {
        function: Some(f),
        file: Some("/src/app/server.c".into()),
        line: Some(42),
        ..Frame::unknown(0x1000)
    };
    ProcessSnapshot {
        pid: 1000 + i as u32,
        image: 0,
        labels: ProcessLabels {
            namespace: format!("ns{}", i % 10),
            pod: format!("pod-{i}"),
            container: "app".into(),
            comm: format!("svc{i}"),
            exe: format!("/app/svc{i}"),
        },
        calls: apis.iter().map(|a| (*a, 1000 + i as u64)).collect(),
        bytes: apis.iter().map(|a| (*a, 64_000 + i as u64)).collect(),
        frees: 900,
        live_bytes: 12_345,
        live_allocations: 100,
        alloc_sizes: Histogram {
            buckets: (4..24).map(|b| ((1u64 << b) as f64, 10)).collect(),
            sum: 1e6,
            count: 200,
        },
        lost: BTreeMap::new(),
        sites: (0..SITES_PER_PROCESS)
            .map(|s| SiteSnapshot {
                kind: apis[s % apis.len()],
                frames: (0..4)
                    .map(|d| frame(format!("fn_{i}_{s}_{d}")))
                    .collect::<Vec<_>>()
                    .into(),
                calls: 10 + s as u64,
                bytes: 1000 + s as u64,
                live_allocations: 1,
                live_bytes: 100,
                remainder: false,
                pending: false,
            })
            .collect(),
        without_libc: false,
        go: None,
        exited_at: None,
    }
}

fn series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

/// `/metrics` rendering (the exporter's update and the text encoding; the snapshot of kernel
/// maps and HTTP are not included) with about 10k and 100k series.
#[test]
#[ignore = "benchmark: run by ./x bench"]
fn bench_metrics_render() {
    let cfg = MetricsConfig {
        ttl: Duration::from_secs(600),
        top_k: SITES_PER_PROCESS,
        max_site_series: usize::MAX,
        live: true,
    };
    let stats = SelfStats::default();
    let now = Instant::now();
    let per_process = series(
        &Exporter::new(cfg)
            .render(&[process(0)], &stats, now, now)
            .expect("renders"),
    );
    for target in [10_000usize, 100_000] {
        let procs: Vec<ProcessSnapshot> = (0..target.div_ceil(per_process)).map(process).collect();
        let mut exporter = Exporter::new(cfg);
        let t = Instant::now();
        let first = exporter.render(&procs, &stats, now, now).expect("renders");
        let cold_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..9 {
            let t = Instant::now();
            let text = exporter.render(&procs, &stats, now, now).expect("renders");
            times.push(t.elapsed().as_secs_f64() * 1e3);
            bytes = black_box(text).len();
        }
        let max = times.iter().copied().fold(0.0, f64::max);
        println!(
            "BENCH metrics processes={} series={} bytes={bytes} first_ms={cold_ms:.2} median_ms={:.2} max_ms={max:.2}",
            procs.len(),
            series(&first),
            median(&mut times),
        );
    }
}

/// Return addresses inside this binary's functions, as a stack would hold them.
fn addresses() -> Vec<u64> {
    let fns: [u64; 8] = [
        bench_symbolize as *const () as u64,
        bench_metrics_render as *const () as u64,
        process as *const () as u64,
        series as *const () as u64,
        crate::values::parse_duration as *const () as u64,
        crate::target::placement::place as *const () as u64,
        crate::target::placement::is_emulated as *const () as u64,
        crate::serve::metrics::site_label as *const () as u64,
    ];
    fns.iter().map(|f| f + 5).collect()
}

/// Symbolization through the agent's symbolizer thread: the first request for a large binary
/// (this test binary: its symbol table parsed cold), then stacks of 8 frames with a warm cache
/// (every address seen before) and with new addresses in an already parsed binary.
#[test]
#[ignore = "benchmark: run by ./x bench"]
fn bench_symbolize() {
    let pid = std::process::id();
    let exe_bytes = std::fs::metadata("/proc/self/exe").map_or(0, |m| m.len());
    let sym = SymbolizerHandle::spawn();
    let stack = addresses();
    let t = Instant::now();
    sym.note_process(pid);
    let frames = sym.symbolize(pid, stack.clone()).expect("symbolizes");
    let first_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(frames.iter().any(|f| f.function.is_some()), "{frames:?}");
    // libc, with its DWARF from a debug link when the distribution's debug package is there.
    let malloc_ret = libc::malloc as *const () as u64 + 5;
    let t = Instant::now();
    let libc_frames = sym.symbolize(pid, vec![malloc_ret]).expect("symbolizes");
    let libc_first_ms = t.elapsed().as_secs_f64() * 1e3;
    let libc_line = libc_frames.first().and_then(|f| f.line).is_some();

    let run = Duration::from_secs(2);
    let t = Instant::now();
    let mut warm = 0u64;
    while t.elapsed() < run {
        black_box(sym.symbolize(pid, stack.clone()).expect("symbolizes"));
        warm += 1;
    }
    let warm_per_s = warm as f64 / t.elapsed().as_secs_f64();

    // New return addresses each time: a function's first bytes, shifted by one per stack.
    let t = Instant::now();
    let mut cold = 0u64;
    while t.elapsed() < run && cold < 4000 {
        let shifted = stack.iter().map(|a| a + 1 + cold % 24).collect::<Vec<_>>();
        let shifted: Vec<u64> = if cold >= 24 {
            // Past the offsets above, spread over whole functions' bodies.
            stack.iter().map(|a| a + 24 + cold).collect()
        } else {
            shifted
        };
        black_box(sym.symbolize(pid, shifted).expect("symbolizes"));
        cold += 1;
    }
    let new_per_s = cold as f64 / t.elapsed().as_secs_f64();
    println!(
        "BENCH symbolize binary_bytes={exe_bytes} first_ms={first_ms:.1} warm_stacks_per_s={warm_per_s:.0} new_stacks_per_s={new_per_s:.0} frames_per_stack={} libc_first_ms={libc_first_ms:.1} libc_dwarf={libc_line}",
        stack.len()
    );
}
