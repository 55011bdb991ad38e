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
        deletes: BTreeMap::new(),
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
                probe: false,
            })
            .collect(),
        without_libc: false,
        allocator: Some("glibc"),
        probe_calls: BTreeMap::new(),
        probe_args: BTreeMap::new(),
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

/// Cost of the live map reads (issue 13): `GoState::refresh_maps` over 1,000 maps whose headers
/// (and, for swiss maps, directories and table headers) are laid out in this process's memory
/// as the Go runtime lays them out, read through `process_vm_readv` as the agent reads a
/// traced program (so every read is the real system call). Old maps: one 24-byte read per map;
/// swiss maps with 4 tables: the header, the directory and 4 table headers (6 reads).
#[test]
#[ignore = "benchmark: run by ./x bench"]
fn bench_go_map_refresh() {
    use crate::gort::{
        live::ProcessMemory,
        versions::{HMAP_HEADER, SWISS_HEADER},
    };
    use crate::gostate::{GoState, MAX_MAP_READS, MapInstance};
    const MAPS: usize = 1_000;
    let pid = std::process::id();
    for swiss in [false, true] {
        // Boxed so that the addresses stay put; kept alive until the reads are done.
        let mut memory: Vec<Box<[u8]>> = Vec::new();
        let mut state = GoState::default();
        state.swiss = swiss;
        for i in 0..MAPS {
            let mut header = vec![0u8; 40].into_boxed_slice();
            let size_class = if swiss {
                let h = &SWISS_HEADER;
                let mut tables = Vec::new();
                for _ in 0..4 {
                    let mut t = vec![0u8; 8].into_boxed_slice();
                    t[h.table_used..h.table_used + 2].copy_from_slice(&512u16.to_le_bytes());
                    t[h.table_capacity..h.table_capacity + 2]
                        .copy_from_slice(&1024u16.to_le_bytes());
                    tables.push(t.as_ptr() as u64);
                    memory.push(t);
                }
                let dir: Vec<u8> = tables.iter().flat_map(|t| t.to_le_bytes()).collect();
                let dir = dir.into_boxed_slice();
                header[h.len..h.len + 8].copy_from_slice(&2048u64.to_le_bytes());
                header[h.storage..h.storage + 8]
                    .copy_from_slice(&(dir.as_ptr() as u64).to_le_bytes());
                header[h.dir_len..h.dir_len + 8].copy_from_slice(&4u64.to_le_bytes());
                header[h.global_depth] = 2;
                memory.push(dir);
                1024
            } else {
                let h = &HMAP_HEADER;
                header[h.len..h.len + 8].copy_from_slice(&3000u64.to_le_bytes());
                header[h.log2_buckets] = 10;
                header[h.storage..h.storage + 8].copy_from_slice(&0x1000u64.to_le_bytes());
                10
            };
            let ptr = header.as_ptr() as u64;
            memory.push(header);
            state.maps.insert(
                ptr,
                MapInstance {
                    ptr,
                    bytes: 1 + i as u64,
                    size_class,
                    unit_bytes: 208,
                    ..MapInstance::default()
                },
            );
        }
        let mem = ProcessMemory { pid };
        state.refresh_maps(&mem, MAX_MAP_READS);
        let read = state.maps.values().filter(|m| m.live.is_some()).count();
        assert_eq!(read, MAPS, "every fake map reads as live");
        let mut times = Vec::new();
        for _ in 0..51 {
            let t = Instant::now();
            state.refresh_maps(&mem, MAX_MAP_READS);
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let max = times.iter().copied().fold(0.0, f64::max);
        println!(
            "BENCH maprefresh kind={} maps={MAPS} median_ms={:.3} max_ms={max:.3}",
            if swiss {
                "swiss,4-tables-each"
            } else {
                "buckets"
            },
            median(&mut times),
        );
        black_box(memory);
    }
}
