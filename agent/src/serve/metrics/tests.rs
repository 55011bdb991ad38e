use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
};

use super::*;
use crate::model::{GoSnapshot, Histogram, SiteSnapshot};
use crate::symbolize::Frame;

fn frame(function: &str) -> Frame {
    Frame {
        function: Some(function.to_string()),
        ..Frame::unknown(0x1000)
    }
}

fn site(kind: &'static str, stack: &[&str], calls: u64, bytes: u64) -> SiteSnapshot {
    SiteSnapshot {
        kind,
        frames: stack.iter().map(|f| frame(f)).collect::<Vec<_>>().into(),
        calls,
        bytes,
        live_allocations: 0,
        live_bytes: 0,
        remainder: false,
        pending: false,
        probe: false,
    }
}

fn web_labels() -> ProcessLabels {
    ProcessLabels {
        namespace: "shop".into(),
        pod: "web-1".into(),
        container: "app".into(),
        comm: "web".into(),
        exe: "/app/web".into(),
    }
}

fn cfg() -> MetricsConfig {
    MetricsConfig {
        ttl: Duration::from_secs(60),
        top_k: 10,
        max_site_series: 1000,
        live: true,
    }
}

/// Two replicas of `web` in one container and a Go process outside Kubernetes.
fn small_model() -> (Vec<ProcessSnapshot>, SelfStats) {
    let a = ProcessSnapshot {
        pid: 10,
        labels: web_labels(),
        calls: BTreeMap::from([("malloc", 3), ("calloc", 1)]),
        bytes: BTreeMap::from([("malloc", 300), ("calloc", 64)]),
        frees: 2,
        live_bytes: 100,
        live_allocations: 1,
        alloc_sizes: Histogram {
            buckets: vec![(64.0, 1), (128.0, 3)],
            sum: 364.0,
            count: 4,
        },
        sites: vec![
            SiteSnapshot {
                live_allocations: 1,
                live_bytes: 100,
                ..site("malloc", &["make_buf", "main"], 3, 300)
            },
            site("calloc", &["zero", "main"], 1, 64),
            // Symbol probes: a built-in growth kind and a configured probe (calls only).
            SiteSnapshot {
                probe: true,
                ..site("cxx_vector_grow", &["grow", "main"], 4, 0)
            },
            SiteSnapshot {
                probe: true,
                ..site("dictresize", &["insertdict", "main"], 2, 0)
            },
        ],
        probe_calls: BTreeMap::from([("cxx_vector_grow", 4), ("dictresize", 2)]),
        probe_args: BTreeMap::from([(("dictresize", "log2_size"), 9)]),
        ..Default::default()
    };
    let b = ProcessSnapshot {
        pid: 11,
        labels: web_labels(),
        calls: BTreeMap::from([("malloc", 1), ("calloc", 0)]),
        bytes: BTreeMap::from([("malloc", 1000), ("calloc", 0)]),
        alloc_sizes: Histogram {
            buckets: vec![(1024.0, 1)],
            sum: 1000.0,
            count: 1,
        },
        sites: vec![site("malloc", &["make_buf", "main", "_start"], 1, 1000)],
        ..Default::default()
    };
    let go = ProcessSnapshot {
        pid: 20,
        labels: ProcessLabels {
            comm: "api".into(),
            exe: "/bin/api".into(),
            ..Default::default()
        },
        lost: BTreeMap::from([("ringbuf_full", 1)]),
        // A static Go program: no libc series.
        without_libc: true,
        sites: vec![
            site("map_grow", &["main.fill", "main.main"], 2, 4096),
            site("slice_grow", &["main.fill", "main.main"], 5, 2048),
        ],
        go: Some(GoSnapshot {
            version: "go1.25.5".into(),
            map_grows: BTreeMap::from([("double", 2), ("same_size", 0)]),
            map_grow_bytes: 4096,
            slice_grows: 5,
            slice_grow_bytes: 2048,
            gc_cycles: 3,
            gc_pauses: Histogram {
                buckets: vec![(0.001, 2), (0.01, 1)],
                sum: 0.0125,
                count: 3,
            },
            // mallocgc not probed (the agent's default): no size histogram.
            alloc_sizes: None,
            maps: vec![crate::model::GoMapSnapshot {
                frames: site("map_grow", &["main.fill", "main.main"], 0, 0).frames,
                len: 100,
                slots: 131_072,
                bytes: 5 << 20,
                verdict: Some(Verdict::Bloated),
            }],
        }),
        ..Default::default()
    };
    let stats = SelfStats {
        probes_attached: 12,
        attach_failures: BTreeMap::from([("ENOENT".to_string(), 1)]),
        events_processed: 100,
        events_lost: BTreeMap::from([("ringbuf_full", 1), ("live_map_full", 0)]),
        map_fill: BTreeMap::from([("live", 0.25)]),
        symbolization_failures: BTreeMap::from([("no_symbol", 2)]),
        ..SelfStats::default()
    };
    (vec![a, b, go], stats)
}

/// The exposition without the (timing-dependent) scrape duration.
fn render(e: &mut Exporter, procs: &[ProcessSnapshot], stats: &SelfStats, now: Instant) -> String {
    let out = e.render(procs, stats, now, now).unwrap();
    out.lines()
        .filter(|l| !l.starts_with("allocwatch_scrape_duration_seconds "))
        .map(|l| format!("{l}\n"))
        .collect()
}

const WEB: &str = r#"namespace="shop",pod="web-1",container="app",comm="web",exe="/app/web""#;
const API: &str = r#"namespace="",pod="",container="",comm="api",exe="/bin/api""#;

#[test]
fn exact_output_for_a_small_model() {
    let (procs, stats) = small_model();
    let mut e = Exporter::new(cfg());
    let got = render(&mut e, &procs, &stats, Instant::now());
    let want = r#"# HELP allocwatch_processes Running traced processes with these labels (their series are summed).
# TYPE allocwatch_processes gauge
allocwatch_processes{API} 1
allocwatch_processes{WEB} 2
# HELP allocwatch_alloc_calls_total Malloc-family calls by API.
# TYPE allocwatch_alloc_calls_total counter
allocwatch_alloc_calls_total{WEB,api="calloc"} 1
allocwatch_alloc_calls_total{WEB,api="malloc"} 4
# HELP allocwatch_alloc_bytes_total Bytes requested from the malloc family, by API.
# TYPE allocwatch_alloc_bytes_total counter
allocwatch_alloc_bytes_total{WEB,api="calloc"} 64
allocwatch_alloc_bytes_total{WEB,api="malloc"} 1300
# HELP allocwatch_free_calls_total Calls to free.
# TYPE allocwatch_free_calls_total counter
allocwatch_free_calls_total{WEB} 2
# HELP allocwatch_live_bytes Bytes of outstanding malloc-family allocations of running processes.
# TYPE allocwatch_live_bytes gauge
allocwatch_live_bytes{WEB} 100
# HELP allocwatch_live_allocations Outstanding malloc-family allocations of running processes.
# TYPE allocwatch_live_allocations gauge
allocwatch_live_allocations{WEB} 1
# HELP allocwatch_alloc_size_bytes Malloc-family request sizes.
# TYPE allocwatch_alloc_size_bytes histogram
allocwatch_alloc_size_bytes_bucket{WEB,le="64"} 1
allocwatch_alloc_size_bytes_bucket{WEB,le="128"} 4
allocwatch_alloc_size_bytes_bucket{WEB,le="1024"} 5
allocwatch_alloc_size_bytes_bucket{WEB,le="+Inf"} 5
allocwatch_alloc_size_bytes_sum{WEB} 1364
allocwatch_alloc_size_bytes_count{WEB} 5
# HELP allocwatch_process_events_lost_total Events of these processes lost, by cause (where the loss is attributable) and what it takes from the figures (affects: counts, live, detail).
# TYPE allocwatch_process_events_lost_total counter
allocwatch_process_events_lost_total{API,cause="ringbuf_full",affects="counts"} 1
# HELP allocwatch_go_info Go version of traced Go processes (always 1).
# TYPE allocwatch_go_info gauge
allocwatch_go_info{API,version="go1.25.5"} 1
# HELP allocwatch_go_map_grows_total Go map growths by kind.
# TYPE allocwatch_go_map_grows_total counter
allocwatch_go_map_grows_total{API,kind="double"} 2
allocwatch_go_map_grows_total{API,kind="same_size"} 0
# HELP allocwatch_go_map_grow_bytes_total Bytes of new storage allocated by Go map growths.
# TYPE allocwatch_go_map_grow_bytes_total counter
allocwatch_go_map_grow_bytes_total{API} 4096
# HELP allocwatch_go_slice_grows_total Go slice growths (runtime.growslice).
# TYPE allocwatch_go_slice_grows_total counter
allocwatch_go_slice_grows_total{API} 5
# HELP allocwatch_go_slice_grow_bytes_total Bytes of new backing arrays allocated by Go slice growths.
# TYPE allocwatch_go_slice_grow_bytes_total counter
allocwatch_go_slice_grow_bytes_total{API} 2048
# HELP allocwatch_go_gc_cycles_total Go garbage collection cycles started.
# TYPE allocwatch_go_gc_cycles_total counter
allocwatch_go_gc_cycles_total{API} 3
# HELP allocwatch_go_gc_pause_seconds Go stop-the-world GC pauses.
# TYPE allocwatch_go_gc_pause_seconds histogram
allocwatch_go_gc_pause_seconds_bucket{API,le="0.001"} 2
allocwatch_go_gc_pause_seconds_bucket{API,le="0.01"} 3
allocwatch_go_gc_pause_seconds_bucket{API,le="+Inf"} 3
allocwatch_go_gc_pause_seconds_sum{API} 0.0125
allocwatch_go_gc_pause_seconds_count{API} 3
# HELP allocwatch_probe_calls_total Calls of symbol-probed functions by kind: C++/Rust/Python container growth (cxx_vector_grow, cxx_hash_rehash, rust_vec_grow, rust_hash_rehash, py_dict, py_list) and each configured probe (kind = its symbol as given); by call site in allocwatch_site_alloc_calls_total{api=kind}.
# TYPE allocwatch_probe_calls_total counter
allocwatch_probe_calls_total{WEB,kind="cxx_vector_grow"} 4
allocwatch_probe_calls_total{WEB,kind="dictresize"} 2
# HELP allocwatch_probe_arg_sum_total Sum of a configured probe's named integer argument over its calls (`argN as NAME`).
# TYPE allocwatch_probe_arg_sum_total counter
allocwatch_probe_arg_sum_total{WEB,kind="dictresize",arg="log2_size"} 9
# HELP allocwatch_go_map_len Elements in the live Go maps first grown at this call site (running processes; top sites by bytes held).
# TYPE allocwatch_go_map_len gauge
allocwatch_go_map_len{API,site="main.fill <- main.main"} 100
# HELP allocwatch_go_map_bytes Bytes held by the buckets or tables of those maps.
# TYPE allocwatch_go_map_bytes gauge
allocwatch_go_map_bytes{API,site="main.fill <- main.main"} 5242880
# HELP allocwatch_go_map_load_ratio Elements per slot of those maps (Go never shrinks a map: far below 1 after deletes is memory kept).
# TYPE allocwatch_go_map_load_ratio gauge
allocwatch_go_map_load_ratio{API,site="main.fill <- main.main"} 0.000762939453125
# HELP allocwatch_go_maps_flagged Those maps judged growing (length rising while it grows) or bloated (under 1/8 full, over 1 MiB).
# TYPE allocwatch_go_maps_flagged gauge
allocwatch_go_maps_flagged{API,site="main.fill <- main.main",verdict="bloated"} 1
# HELP allocwatch_site_alloc_calls_total Calls by call site (top sites per process identity; the rest in site="other").
# TYPE allocwatch_site_alloc_calls_total counter
allocwatch_site_alloc_calls_total{API,site="main.fill <- main.main",api="map_grow"} 2
allocwatch_site_alloc_calls_total{API,site="main.fill <- main.main",api="slice_grow"} 5
allocwatch_site_alloc_calls_total{WEB,site="zero <- main",api="calloc"} 1
allocwatch_site_alloc_calls_total{WEB,site="grow <- main",api="cxx_vector_grow"} 4
allocwatch_site_alloc_calls_total{WEB,site="insertdict <- main",api="dictresize"} 2
allocwatch_site_alloc_calls_total{WEB,site="make_buf <- main",api="malloc"} 4
# HELP allocwatch_site_alloc_bytes_total Bytes by call site (top sites per process identity; the rest in site="other").
# TYPE allocwatch_site_alloc_bytes_total counter
allocwatch_site_alloc_bytes_total{API,site="main.fill <- main.main",api="map_grow"} 4096
allocwatch_site_alloc_bytes_total{API,site="main.fill <- main.main",api="slice_grow"} 2048
allocwatch_site_alloc_bytes_total{WEB,site="zero <- main",api="calloc"} 64
allocwatch_site_alloc_bytes_total{WEB,site="grow <- main",api="cxx_vector_grow"} 0
allocwatch_site_alloc_bytes_total{WEB,site="insertdict <- main",api="dictresize"} 0
allocwatch_site_alloc_bytes_total{WEB,site="make_buf <- main",api="malloc"} 1300
# HELP allocwatch_site_live_allocations Outstanding allocations by call site.
# TYPE allocwatch_site_live_allocations gauge
allocwatch_site_live_allocations{API,site="main.fill <- main.main",api="map_grow"} 0
allocwatch_site_live_allocations{API,site="main.fill <- main.main",api="slice_grow"} 0
allocwatch_site_live_allocations{WEB,site="zero <- main",api="calloc"} 0
allocwatch_site_live_allocations{WEB,site="grow <- main",api="cxx_vector_grow"} 0
allocwatch_site_live_allocations{WEB,site="insertdict <- main",api="dictresize"} 0
allocwatch_site_live_allocations{WEB,site="make_buf <- main",api="malloc"} 1
# HELP allocwatch_site_live_bytes Bytes of outstanding allocations by call site.
# TYPE allocwatch_site_live_bytes gauge
allocwatch_site_live_bytes{API,site="main.fill <- main.main",api="map_grow"} 0
allocwatch_site_live_bytes{API,site="main.fill <- main.main",api="slice_grow"} 0
allocwatch_site_live_bytes{WEB,site="zero <- main",api="calloc"} 0
allocwatch_site_live_bytes{WEB,site="grow <- main",api="cxx_vector_grow"} 0
allocwatch_site_live_bytes{WEB,site="insertdict <- main",api="dictresize"} 0
allocwatch_site_live_bytes{WEB,site="make_buf <- main",api="malloc"} 100
# HELP allocwatch_probes_attached Probes (uprobe links) attached.
# TYPE allocwatch_probes_attached gauge
allocwatch_probes_attached 12
# HELP allocwatch_attach_failures_total Failed probe attachments by reason.
# TYPE allocwatch_attach_failures_total counter
allocwatch_attach_failures_total{reason="ENOENT"} 1
# HELP allocwatch_events_processed_total Events read from the kernel.
# TYPE allocwatch_events_processed_total counter
allocwatch_events_processed_total 100
# HELP allocwatch_events_lost_total Events lost by cause, all processes, and what the loss takes: affects="counts" (counts are low while it rises), "live" (live bytes and outstanding allocations are low), "detail" (every call counted exactly, its stack or site less precise).
# TYPE allocwatch_events_lost_total counter
allocwatch_events_lost_total{cause="live_map_full",affects="live"} 0
allocwatch_events_lost_total{cause="ringbuf_full",affects="counts"} 1
# HELP allocwatch_map_fill_ratio Fill level of each kernel map (1 = full: new entries are dropped).
# TYPE allocwatch_map_fill_ratio gauge
allocwatch_map_fill_ratio{map="live"} 0.25
# HELP allocwatch_symbolization_failures_total Addresses that could not be named, by cause.
# TYPE allocwatch_symbolization_failures_total counter
allocwatch_symbolization_failures_total{cause="no_symbol"} 2
# HELP allocwatch_stale_scrapes_total Scrapes answered with the previous snapshot because the tracer was busy.
# TYPE allocwatch_stale_scrapes_total counter
allocwatch_stale_scrapes_total 0
# HELP allocwatch_call_site_series Series labelled by call site exported at this scrape (allocwatch_site_*, allocwatch_go_map_* and allocwatch_go_maps_flagged).
# TYPE allocwatch_call_site_series gauge
allocwatch_call_site_series 28
# HELP allocwatch_call_site_series_limit Configured cap on the series labelled by call site (max_site_series).
# TYPE allocwatch_call_site_series_limit gauge
allocwatch_call_site_series_limit 1000
# HELP allocwatch_scrape_duration_seconds Time this scrape took to snapshot and render, up to this line.
# TYPE allocwatch_scrape_duration_seconds gauge
"#
    .replace("{API}", &format!("{{{API}}}"))
    .replace("{WEB}", &format!("{{{WEB}}}"))
    .replace("{API,", &format!("{{{API},"))
    .replace("{WEB,", &format!("{{{WEB},"));
    if got != want {
        // A line diff is easier to read than two 100-line strings.
        for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
            assert_eq!(g, w, "first difference at line {}", i + 1);
        }
        assert_eq!(got.lines().count(), want.lines().count(), "{got}");
    }
}

/// Every sample of an exposition: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn is_counter(series: &str) -> bool {
    let name = series.split('{').next().unwrap();
    name.ends_with("_total")
        || name.ends_with("_bucket")
        || name.ends_with("_count")
        || name.ends_with("_sum")
}

/// Counters present in both expositions did not go down.
fn assert_monotonic(before: &str, after: &str) {
    let (b, a) = (samples(before), samples(after));
    for (k, v) in &b {
        if let Some(w) = a.get(k)
            && is_counter(k)
        {
            assert!(w >= v, "{k} went down: {v} -> {w}");
        }
    }
}

#[test]
fn exited_process_keeps_counting_until_ttl_then_folds() {
    let (mut procs, stats) = small_model();
    let t0 = Instant::now();
    let mut e = Exporter::new(cfg());
    let first = render(&mut e, &procs, &stats, t0);
    let calls = |text: &str| {
        samples(text)
            .get(&format!(
                "allocwatch_alloc_calls_total{{{WEB},api=\"malloc\"}}"
            ))
            .copied()
    };
    assert_eq!(calls(&first), Some(4.0));

    // pid 11 exits: its counts stay, it no longer runs and holds no memory.
    procs[1].exited_at = Some(t0 + Duration::from_secs(1));
    procs[0].calls.insert("malloc", 5);
    let t1 = t0 + Duration::from_secs(10);
    let second = render(&mut e, &procs, &stats, t1);
    assert_monotonic(&first, &second);
    assert_eq!(calls(&second), Some(6.0));
    assert!(second.contains(&format!("allocwatch_processes{{{WEB}}} 1\n")));

    // Past its TTL pid 11 is forgotten, but the identity lives on in pid 10: still 6.
    let t2 = t0 + Duration::from_secs(62);
    let third = render(&mut e, &procs, &stats, t2);
    assert_monotonic(&second, &third);
    assert_eq!(calls(&third), Some(6.0));
    let site_series = format!(
        "allocwatch_site_alloc_bytes_total{{{WEB},site=\"make_buf <- main\",api=\"malloc\"}}"
    );
    assert_eq!(samples(&third).get(&site_series), Some(&1300.0));

    // pid 10's number is reused by another process (its counters start again): no reset.
    procs.remove(1);
    procs[0].calls.insert("malloc", 1);
    procs[0].bytes.insert("malloc", 8);
    procs[0].sites = vec![site("malloc", &["make_buf", "main"], 1, 8)];
    let fourth = render(&mut e, &procs, &stats, t2 + Duration::from_secs(1));
    assert_monotonic(&third, &fourth);
    assert_eq!(calls(&fourth), Some(7.0));
    assert_eq!(samples(&fourth).get(&site_series), Some(&1308.0));
}

#[test]
fn series_expire_after_ttl() {
    let (mut procs, stats) = small_model();
    let t0 = Instant::now();
    let mut e = Exporter::new(cfg());
    let has_web = |text: &str| text.contains("comm=\"web\"");
    let has_api = |text: &str| text.contains("comm=\"api\"");

    // Both web replicas exit.
    procs[0].exited_at = Some(t0);
    procs[1].exited_at = Some(t0);
    let out = render(&mut e, &procs, &stats, t0 + Duration::from_secs(30));
    assert!(has_web(&out) && has_api(&out));
    assert!(out.contains(&format!("allocwatch_live_bytes{{{WEB}}} 0\n")));
    assert!(out.contains(&format!("allocwatch_processes{{{WEB}}} 0\n")));
    // The Go process vanishes from the source without an exit time: kept for the TTL, frozen.
    procs.truncate(2);
    let out = render(&mut e, &procs, &stats, t0 + Duration::from_secs(40));
    assert!(has_api(&out), "a vanished process is kept for the TTL");
    assert!(out.contains(&format!("allocwatch_go_slice_grows_total{{{API}}} 5\n")));
    assert!(out.contains(&format!("allocwatch_processes{{{API}}} 0\n")));

    // 60 s after the exits the web series are gone, the Go ones 60 s after they vanished.
    let out = render(&mut e, &procs, &stats, t0 + Duration::from_secs(60));
    assert!(!has_web(&out) && has_api(&out), "{out}");
    let out = render(&mut e, &procs, &stats, t0 + Duration::from_secs(99));
    assert!(has_api(&out), "{out}");
    let out = render(&mut e, &procs, &stats, t0 + Duration::from_secs(100));
    assert!(!has_web(&out) && !has_api(&out), "{out}");
    assert!(out.contains("allocwatch_call_site_series 0\n"));
    assert!(
        e.ids.is_empty() && e.pids.is_empty(),
        "all state is dropped"
    );
}

#[test]
fn labels_that_change_move_the_process() {
    let (mut procs, stats) = small_model();
    let t0 = Instant::now();
    let mut e = Exporter::new(cfg());
    procs.truncate(1);
    procs[0].labels.pod.clear();
    procs[0].labels.namespace.clear();
    procs[0].labels.container.clear();
    render(&mut e, &procs, &stats, t0);
    // Pod metadata arrives later: the process now counts under its full labels, and the
    // old identity's series are frozen until they expire.
    procs[0].labels = web_labels();
    let out = render(&mut e, &procs, &stats, t0 + Duration::from_secs(1));
    assert!(out.contains(&format!(
        "allocwatch_alloc_calls_total{{{WEB},api=\"malloc\"}} 3\n"
    )));
    let bare = r#"namespace="",pod="",container="",comm="web",exe="/app/web""#;
    assert!(out.contains(&format!(
        "allocwatch_alloc_calls_total{{{bare},api=\"malloc\"}} 3\n"
    )));
    assert!(out.contains(&format!("allocwatch_processes{{{bare}}} 0\n")));
    let out = render(&mut e, &procs, &stats, t0 + Duration::from_secs(61));
    assert!(!out.contains(bare));
}

/// A deterministic pseudo-random sequence (no dependency for tests).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// `n_procs` processes (distinct identities unless `replicas`) with `n_sites` malloc sites
/// each and a few calloc and Go growth sites.
fn many(n_procs: u32, n_sites: usize, replicas: u32) -> Vec<ProcessSnapshot> {
    (0..n_procs)
        .map(|i| {
            let sites: Vec<SiteSnapshot> = (0..n_sites)
                .map(|j| {
                    let kind = match j % 10 {
                        0 => "calloc",
                        1 => "map_grow",
                        _ => "malloc",
                    };
                    site(
                        kind,
                        &[&format!("fn{j}"), "main"],
                        1 + j as u64,
                        100 * (1 + j as u64),
                    )
                })
                .collect();
            let mut p = ProcessSnapshot {
                pid: 1000 + i,
                labels: ProcessLabels {
                    comm: format!("proc{}", i / replicas),
                    exe: "/bin/x".into(),
                    ..Default::default()
                },
                sites,
                ..Default::default()
            };
            for s in &p.sites {
                *p.calls.entry(s.kind).or_default() += s.calls;
                *p.bytes.entry(s.kind).or_default() += s.bytes;
            }
            p
        })
        .collect()
}

/// Lets some sites of some processes allocate more, some exit, some pids be reused.
fn evolve(procs: &mut [ProcessSnapshot], rng: &mut Lcg, now: Instant, round: u64) {
    for p in procs.iter_mut() {
        if p.exited_at.is_some() {
            continue;
        }
        for _ in 0..20 {
            let n = p.sites.len() as u64;
            let s = &mut p.sites[(rng.next() % n) as usize];
            let add = rng.next() % 100_000;
            s.calls += 1;
            s.bytes += add;
            s.live_allocations = rng.next() % 5;
            s.live_bytes = s.live_allocations * 64;
            *p.calls.entry(s.kind).or_default() += 1;
            *p.bytes.entry(s.kind).or_default() += add;
        }
        if rng.next() % 20 == 0 {
            p.exited_at = Some(now);
        }
    }
    // Now and then a pid is reused by a fresh process of the same program.
    if round % 3 == 0 {
        let i = (rng.next() % procs.len() as u64) as usize;
        let fresh = many(1, 30, 1).remove(0);
        let old = &mut procs[i];
        let mut fresh = ProcessSnapshot {
            pid: old.pid,
            labels: old.labels.clone(),
            ..fresh
        };
        fresh.exited_at = None;
        *old = fresh;
    }
}

fn site_series(text: &str) -> usize {
    text.lines()
        .filter(|l| l.starts_with("allocwatch_site_"))
        .count()
}

#[test]
fn cardinality_cap_holds_with_50_processes_of_1000_sites() {
    let mut procs = many(50, 1000, 1);
    let stats = SelfStats::default();
    let mut rng = Lcg(7);
    let t0 = Instant::now();
    for (cap, top_k) in [(1000, 10), (100_000, 10), (3, 10), (100_000, 0)] {
        let mut e = Exporter::new(MetricsConfig {
            ttl: Duration::from_secs(60),
            top_k,
            max_site_series: cap,
            live: true,
        });
        let mut prev = String::new();
        for round in 0..4u64 {
            let now = t0 + Duration::from_secs(round * 5);
            // Its cost is measured by `./x bench` (bench_metrics_render), not timed here.
            let out = render(&mut e, &procs, &stats, now);
            let n = site_series(&out);
            assert!(n <= cap, "cap {cap}: {n} site series");
            assert!(out.contains(&format!("allocwatch_call_site_series {n}\n")));
            // Per identity at most top_k sites besides the `other` rows (one per kind).
            let per_id = out
                .lines()
                .filter(|l| {
                    l.starts_with("allocwatch_site_alloc_bytes_total{")
                        && l.contains("comm=\"proc7\"")
                })
                .filter(|l| !l.contains("site=\"other\""))
                .count();
            assert!(per_id <= top_k, "{per_id} sites for proc7");
            if cap == 100_000 && top_k == 10 {
                assert_eq!(per_id, 10, "a generous cap gives every identity its top 10");
            }
            assert_monotonic(&prev, &out);
            prev = out;
            evolve(&mut procs, &mut rng, now, round);
        }
    }
}

/// Summing an identity's site series over `site` gives the total of its sites of that kind,
/// whichever sites hold their own series, across exits and pid reuse.
#[test]
fn site_series_add_up_and_never_go_down() {
    let mut procs = many(12, 60, 3);
    let stats = SelfStats::default();
    let mut rng = Lcg(42);
    let t0 = Instant::now();
    let mut e = Exporter::new(MetricsConfig {
        ttl: Duration::from_secs(1000),
        top_k: 4,
        max_site_series: 100_000,
        live: true,
    });
    let mut prev = String::new();
    for round in 0..25u64 {
        let now = t0 + Duration::from_secs(round);
        let out = render(&mut e, &procs, &stats, now);
        assert_monotonic(&prev, &out);
        let s = samples(&out);
        for id in 0..4 {
            let comm = format!("comm=\"proc{id}\"");
            let sum_of = |prefix: &str, kind: &str| -> f64 {
                s.iter()
                    .filter(|(k, _)| {
                        k.starts_with(prefix)
                            && k.contains(&comm)
                            && k.contains(&format!("api=\"{kind}\""))
                    })
                    .map(|(_, v)| v)
                    .sum()
            };
            // Core series count the same events as the sites here (every call has a site).
            let api = |kind: &str| -> f64 {
                s.iter()
                    .filter(|(k, _)| {
                        k.starts_with("allocwatch_alloc_bytes_total{")
                            && k.contains(&comm)
                            && k.contains(&format!("api=\"{kind}\""))
                    })
                    .map(|(_, v)| v)
                    .sum()
            };
            for kind in ["malloc", "calloc"] {
                assert_eq!(
                    sum_of("allocwatch_site_alloc_bytes_total{", kind),
                    api(kind),
                    "round {round} proc{id} {kind}"
                );
            }
        }
        prev = out;
        evolve(&mut procs, &mut rng, now, round);
    }
}

#[test]
fn a_new_hot_site_takes_over_a_cold_one() {
    let labels = web_labels();
    let mk = |hot: u64| ProcessSnapshot {
        pid: 1,
        labels: labels.clone(),
        sites: vec![
            site("malloc", &["cold"], 1, 1000),
            site("malloc", &["warm"], 1, 500),
            site("malloc", &["hot"], 1, hot),
        ],
        ..Default::default()
    };
    let mut e = Exporter::new(MetricsConfig {
        ttl: Duration::from_secs(60),
        top_k: 2,
        max_site_series: 1000,
        live: true,
    });
    let t0 = Instant::now();
    let stats = SelfStats::default();
    let out = render(&mut e, &[mk(10)], &stats, t0);
    let bytes = |text: &str, s: &str| {
        samples(text)
            .get(&format!(
                "allocwatch_site_alloc_bytes_total{{{WEB},site=\"{s}\",api=\"malloc\"}}"
            ))
            .copied()
    };
    assert_eq!(bytes(&out, "cold"), Some(1000.0));
    assert_eq!(bytes(&out, "warm"), Some(500.0));
    assert_eq!(bytes(&out, "other"), Some(10.0));
    // `hot` allocates 1 MB: it takes the weakest site's series; `warm` moves into `other`.
    let out2 = render(
        &mut e,
        &[mk(1_000_010)],
        &stats,
        t0 + Duration::from_secs(1),
    );
    assert_monotonic(&out, &out2);
    assert_eq!(bytes(&out2, "cold"), Some(1000.0));
    assert_eq!(bytes(&out2, "warm"), None);
    // `hot` takes its whole history out of `other`, which gets `warm`'s: nothing goes down.
    assert_eq!(bytes(&out2, "hot"), Some(1_000_010.0));
    assert_eq!(bytes(&out2, "other"), Some(500.0));
    // No flapping: `warm` allocating a little does not take the series back.
    let mut p = mk(1_000_010);
    p.sites[1].bytes += 100;
    let out3 = render(&mut e, &[p], &stats, t0 + Duration::from_secs(2));
    assert_eq!(bytes(&out3, "hot"), Some(1_000_010.0));
    assert_eq!(bytes(&out3, "other"), Some(600.0));
}

#[test]
fn site_labels() {
    assert_eq!(site_label(&[]), "(no stack)");
    assert_eq!(site_label(&[frame("a")]), "a");
    assert_eq!(site_label(&[frame("a"), frame("b"), frame("c")]), "a <- b");
    assert_eq!(site_label(&[frame("other")]), "other <- ?");
    let unknown = Frame {
        module: Some("/lib/x86_64-linux-gnu/libc.so.6".into()),
        offset: Some(0x2a),
        ..Frame::unknown(0x7f00)
    };
    // An address alone differs in every process (ASLR): it is no part of a label.
    assert_eq!(
        site_label(&[unknown, Frame::unknown(0x5585_c2ac_ec8e)]),
        "libc.so.6+0x2a <- ?"
    );
    // Generic and template arguments left out; brackets that do not pair are kept.
    assert_eq!(
        site_label(&[
            frame(
                "std::vector<std::pair<int, int>, std::allocator<std::pair<int, int> > >::_M_realloc_insert<int const&>"
            ),
            frame("main.Cache[go.shape.string,go.shape.int].Put"),
        ]),
        "std::vector<...>::_M_realloc_insert<...> <- main.Cache[...].Put"
    );
    assert_eq!(
        site_label(&[frame("<alloc::vec::Vec<u8> as core::clone::Clone>::clone")]),
        "<...>::clone"
    );
    assert_eq!(
        site_label(&[frame("operator<"), frame("main.(*T).m")]),
        "operator< <- main.(*T).m"
    );
    let long = "é".repeat(400);
    let l = site_label(&[frame(&long)]);
    assert!(l.len() <= MAX_SITE_LABEL && l.ends_with("..."), "{l}");
    for l in [site_label(&[frame("a"), frame("b")]), l] {
        assert!(!l.contains('←') && !l.contains('…'), "{l}");
    }
}

/// Two processes of one identity whose stacks differ below the two innermost frames, and a
/// third whose caller is known only by its (randomized) address: each site is one series.
#[test]
fn one_call_site_in_several_processes_is_one_series() {
    let p = |pid: u32, stack: &[&str], addr: u64| ProcessSnapshot {
        pid,
        labels: web_labels(),
        sites: vec![SiteSnapshot {
            frames: stack
                .iter()
                .map(|f| frame(f))
                .chain([Frame::unknown(addr)])
                .collect::<Vec<_>>()
                .into(),
            ..site("malloc", &[], 2, 200)
        }],
        ..Default::default()
    };
    let procs = [
        p(10, &["make_buf", "main"], 0x5585_0000_1000),
        p(11, &["make_buf", "main", "_start"], 0x55aa_0000_1000),
        p(12, &["xmalloc"], 0x5585_c2ac_ec8e),
        p(13, &["xmalloc"], 0x55ff_c2ac_ec8e),
    ];
    let mut e = Exporter::new(cfg());
    let out = render(&mut e, &procs, &SelfStats::default(), Instant::now());
    let sites: Vec<(String, f64)> = samples(&out)
        .into_iter()
        .filter(|(k, _)| k.starts_with("allocwatch_site_alloc_calls_total{"))
        .collect();
    let series = |site: &str| {
        format!("allocwatch_site_alloc_calls_total{{{WEB},site=\"{site}\",api=\"malloc\"}}")
    };
    assert_eq!(
        sites,
        [
            (series("make_buf <- main"), 4.0),
            (series("xmalloc <- ?"), 4.0)
        ],
        "{out}"
    );
}

/// Series that could only be zero are left out: the libc series of a program without libc,
/// the Go size histogram where mallocgc is not probed. A Go program with cgo (a libc) and
/// mallocgc probed has both.
#[test]
fn series_that_could_only_be_zero_are_left_out() {
    let go = |pid: u32, comm: &str, without_libc: bool, sizes: Option<Histogram>| ProcessSnapshot {
        pid,
        labels: ProcessLabels {
            comm: comm.into(),
            ..Default::default()
        },
        without_libc,
        go: Some(GoSnapshot {
            version: "go1.27.3".into(),
            alloc_sizes: sizes,
            ..Default::default()
        }),
        ..Default::default()
    };
    let sizes = Histogram {
        buckets: vec![(16.0, 2)],
        sum: 24.0,
        count: 2,
    };
    let procs = [
        go(1, "static", true, None),
        go(2, "cgo", false, Some(sizes)),
    ];
    let mut e = Exporter::new(cfg());
    let out = render(&mut e, &procs, &SelfStats::default(), Instant::now());
    let families_of = |comm: &str| -> BTreeSet<String> {
        samples(&out)
            .into_keys()
            .filter(|k| k.contains(&format!("comm=\"{comm}\"")))
            .map(|k| k.split('{').next().unwrap().to_string())
            .collect()
    };
    let libc = [
        "allocwatch_free_calls_total",
        "allocwatch_live_bytes",
        "allocwatch_live_allocations",
        "allocwatch_alloc_size_bytes_count",
    ];
    let static_go = families_of("static");
    let cgo = families_of("cgo");
    for f in libc {
        assert!(!static_go.contains(f), "{f} of a static Go program\n{out}");
        assert!(
            cgo.contains(f),
            "no {f} for a Go program with a libc\n{out}"
        );
    }
    assert!(
        !static_go.contains("allocwatch_go_alloc_size_bytes_count"),
        "{out}"
    );
    assert!(
        cgo.contains("allocwatch_go_alloc_size_bytes_count"),
        "{out}"
    );
    assert!(static_go.contains("allocwatch_go_gc_cycles_total"), "{out}");
}

/// `free` is no allocation: its sites have no series in `allocwatch_site_alloc_*`.
#[test]
fn free_sites_are_not_allocation_sites() {
    let p = ProcessSnapshot {
        pid: 10,
        labels: web_labels(),
        calls: BTreeMap::from([("malloc", 3)]),
        bytes: BTreeMap::from([("malloc", 300)]),
        frees: 3,
        sites: vec![
            site("malloc", &["make_buf", "main"], 3, 300),
            site("free", &["drop_buf", "main"], 3, 300),
        ],
        ..Default::default()
    };
    let mut e = Exporter::new(cfg());
    let out = render(&mut e, &[p], &SelfStats::default(), Instant::now());
    let site_lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("allocwatch_site_"))
        .collect();
    assert_eq!(site_lines.len(), 4, "{out}");
    assert!(
        site_lines.iter().all(|l| l.contains(r#"api="malloc""#)),
        "{out}"
    );
    assert!(
        out.contains(&format!("allocwatch_free_calls_total{{{WEB}}} 3")),
        "{out}"
    );
}

#[test]
fn odd_input_does_not_panic() {
    let mut p = small_model().0.remove(0);
    p.alloc_sizes = Histogram {
        buckets: vec![
            (f64::NAN, 3),
            (f64::INFINITY, 2),
            (-1.0, 1),
            (8.0, u64::MAX),
        ],
        sum: f64::NAN,
        count: 1,
    };
    p.calls.insert("malloc", u64::MAX);
    let dup = p.clone();
    p.exited_at = Some(Instant::now() + Duration::from_secs(3600));
    let label = "quote\" backslash\\ newline\n".to_string();
    p.labels.pod = label;
    let mut e = Exporter::new(cfg());
    let out = render(&mut e, &[p, dup], &SelfStats::default(), Instant::now());
    assert!(
        out.contains(r#"pod="quote\" backslash\\ newline\n""#),
        "{out}"
    );
    let back = parse_back(&out);
    assert!(
        back.samples
            .iter()
            .any(|s| s.labels.get("pod") == Some("quote\" backslash\\ newline\n")),
        "the escaped label does not read back\n{out}"
    );
}

/// The strict reader of the text format the integration tests use (an implementation
/// independent of the exporter's encoder) reads every sample back with its labels.
fn parse_back(text: &str) -> promtext::Scrape {
    promtext::Scrape::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[path = "../../../../xtask/src/promtext.rs"]
mod promtext;

#[test]
fn exposition_parses_back() {
    let (procs, stats) = small_model();
    let mut e = Exporter::new(cfg());
    let text = e
        .render(&procs, &stats, Instant::now(), Instant::now())
        .unwrap();
    let scrape = parse_back(&text);
    let find = |metric: &str, label: (&str, &str)| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == metric && s.labels.get(label.0) == Some(label.1))
            .map(|s| s.value.clone())
    };
    assert!(matches!(
        find("allocwatch_alloc_bytes_total", ("api", "malloc")),
        Some(promtext::Value::Counter(v)) if v == 1300.0
    ));
    assert!(matches!(
        find("allocwatch_live_bytes", ("pod", "web-1")),
        Some(promtext::Value::Gauge(v)) if v == 100.0
    ));
    match find("allocwatch_go_gc_pause_seconds", ("comm", "api")) {
        Some(promtext::Value::Histogram(buckets)) => {
            let counts: Vec<(f64, f64)> = buckets.iter().map(|b| (b.less_than, b.count)).collect();
            assert_eq!(counts, [(0.001, 2.0), (0.01, 3.0), (f64::INFINITY, 3.0)]);
        }
        other => panic!("gc pause histogram: {other:?}"),
    }
    let site = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "allocwatch_site_alloc_bytes_total" && s.labels.get("api") == Some("malloc")
        })
        .unwrap();
    assert_eq!(site.labels.get("site"), Some("make_buf <- main"));
    for s in &scrape.samples {
        assert!(s.labels.get("pid").is_none(), "no pid label: {s:?}");
    }
}

/// `promtool check metrics` (Debian's prometheus package) lints the exposition: names, units,
/// `_total` suffixes, histogram shape.
#[test]
fn promtool_check_metrics() {
    let promtool = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("promtool"))
            .find(|p| p.is_file())
    });
    let promtool = promtool.expect(
        "promtool is not installed: `./x test` installs it (deploy/check.sh: Debian's prometheus)",
    );
    let (procs, stats) = small_model();
    let mut e = Exporter::new(cfg());
    let text = e
        .render(&procs, &stats, Instant::now(), Instant::now())
        .unwrap();
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// deploy/README.md's metrics table (what `deploy/check.sh` checks the alerts and dashboard
/// against) is the family specs, row by row: name, type (agent families marked), labels.
#[test]
fn readme_table_is_the_family_specs() {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/README.md"),
    )
    .unwrap();
    let documented: Vec<String> = readme
        .lines()
        .filter(|l| l.starts_with("| `allocwatch_"))
        .map(String::from)
        .collect();
    let from_specs: Vec<String> = FAMILIES
        .iter()
        .map(|f| {
            let kind = match f.scope {
                Scope::Process => f.kind.as_str().to_string(),
                Scope::Agent => format!("{} (agent)", f.kind.as_str()),
            };
            let labels: Vec<String> = f.labels.iter().map(|l| format!("`{l}`")).collect();
            let labels = if labels.is_empty() {
                String::new()
            } else {
                format!(" {}", labels.join(", "))
            };
            format!("| `{}` | {kind} |{labels} |", f.name)
        })
        .collect();
    assert_eq!(documented, from_specs);
}

/// The exporter writes every family of the specs (given data for each), in their order, with
/// their help and type, and each series with exactly the identity labels (process families)
/// and the spec's labels.
#[test]
fn exported_families_follow_their_specs() {
    let (mut procs, mut stats) = small_model();
    // Make every optional family appear.
    procs[0].lost.insert("pending_full", 0);
    procs[0].allocator = Some("jemalloc");
    procs[0].deletes.insert("delete(size)", 0);
    procs[2].go.as_mut().unwrap().alloc_sizes = Some(Histogram::default());
    stats.attach_failures.insert("EPERM".into(), 0);
    stats.held.insert("processes", 0);
    stats.go_growth_aggregated.insert("kernel_count", 0);
    let mut e = Exporter::new(cfg());
    let text = e
        .render(&procs, &stats, Instant::now(), Instant::now())
        .unwrap();
    let exported: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let names: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
    assert_eq!(exported, names);
    const IDENTITY: [&str; 5] = ["namespace", "pod", "container", "comm", "exe"];
    let parsed = parse_back(&text);
    for f in FAMILIES {
        assert!(
            text.contains(&format!("# HELP {} {}\n", f.name, f.help)),
            "{}: help",
            f.name
        );
        assert!(
            text.contains(&format!("# TYPE {} {}\n", f.name, f.kind.as_str())),
            "{}: type",
            f.name
        );
        let mut want: BTreeSet<&str> = f.labels.iter().copied().collect();
        if f.scope == Scope::Process {
            want.extend(IDENTITY);
        }
        let samples: Vec<_> = parsed
            .samples
            .iter()
            .filter(|s| {
                s.metric == f.name
                    || (f.kind == MetricKind::Histogram
                        && s.metric
                            .strip_prefix(f.name)
                            .is_some_and(|rest| ["_bucket", "_sum", "_count"].contains(&rest)))
            })
            .collect();
        assert!(!samples.is_empty(), "{}: no samples", f.name);
        for s in samples {
            let got: BTreeSet<&str> = s
                .labels
                .keys()
                .map(String::as_str)
                .filter(|&l| l != "le")
                .collect();
            assert_eq!(got, want, "{}: labels of {:?}", f.name, s.labels);
        }
    }
}

/// Over the cap the largest identities keep their sites; the smallest lose them first.
#[test]
fn the_cap_serves_the_largest_identities_first() {
    let proc_of = |pid: u32, comm: &str, scale: u64| ProcessSnapshot {
        pid,
        labels: ProcessLabels {
            comm: comm.into(),
            ..Default::default()
        },
        sites: (1..=5)
            .map(|j| site("malloc", &[&format!("f{j}")], 1, j * scale))
            .collect(),
        ..Default::default()
    };
    let procs = vec![
        proc_of(1, "small", 1),
        proc_of(2, "big", 1000),
        proc_of(3, "mid", 100),
    ];
    let mut e = Exporter::new(MetricsConfig {
        ttl: Duration::from_secs(60),
        top_k: 2,
        max_site_series: 4 * SITE_FAMILIES,
        live: true,
    });
    let out = render(&mut e, &procs, &SelfStats::default(), Instant::now());
    let sites = |comm: &str| -> Vec<String> {
        out.lines()
            .filter(|l| {
                l.starts_with("allocwatch_site_alloc_bytes_total{")
                    && l.contains(&format!("comm=\"{comm}\""))
            })
            .map(|l| l.split("site=\"").nth(1).unwrap().to_string())
            .collect()
    };
    assert_eq!(
        sites("big"),
        [
            "f4\",api=\"malloc\"} 4000",
            "f5\",api=\"malloc\"} 5000",
            "other\",api=\"malloc\"} 6000"
        ]
    );
    assert_eq!(sites("mid"), ["other\",api=\"malloc\"} 1500"]);
    assert!(sites("small").is_empty());
    assert_eq!(site_series(&out), 4 * SITE_FAMILIES);
}

#[test]
fn count_modes_export_no_live_or_size_series() {
    let (procs, stats) = small_model();
    let now = Instant::now();
    let mut full = Exporter::new(cfg());
    let mut count = Exporter::new(MetricsConfig {
        live: false,
        ..cfg()
    });
    let with = samples(&render(&mut full, &procs, &stats, now));
    let without = samples(&render(&mut count, &procs, &stats, now));
    let families = [
        "allocwatch_live_bytes",
        "allocwatch_live_allocations",
        "allocwatch_alloc_size_bytes_bucket",
        "allocwatch_site_live_bytes",
        "allocwatch_site_live_allocations",
    ];
    let has = |s: &BTreeMap<String, f64>, family: &str| {
        s.keys().any(|k| k.starts_with(&format!("{family}{{")))
    };
    for family in families {
        assert!(has(&with, family), "full mode exports {family}");
        assert!(
            !has(&without, family),
            "count mode must not export {family}"
        );
    }
    // Everything else is the same.
    let rest = |s: &BTreeMap<String, f64>| -> BTreeMap<String, f64> {
        s.iter()
            .filter(|(k, _)| {
                !families.iter().any(|f| k.starts_with(&format!("{f}{{")))
                    && !k.starts_with("allocwatch_alloc_size_bytes")
                    && !k.starts_with("allocwatch_scrape")
            })
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    assert_eq!(rest(&with), rest(&without));
}

/// A site first exported unnamed (part of `other`) and named at a later scrape, and an exited
/// process whose sites are folded into its remainder: the value moves between rows of the
/// process, so the site series still add up to the process's total, and none goes down.
#[test]
fn sites_moving_in_and_out_of_the_remainder_are_counted_once() {
    let t0 = Instant::now();
    let mut e = Exporter::new(cfg());
    let stats = SelfStats::default();
    let named = |calls, bytes| site("malloc", &["make_buf", "main"], calls, bytes);
    let unnamed = |calls, bytes| SiteSnapshot {
        frames: vec![Frame::unknown(0x5555_0000_1234)].into(),
        remainder: true,
        ..site("malloc", &[], calls, bytes)
    };
    let proc_with = |sites: Vec<SiteSnapshot>, exited: bool| ProcessSnapshot {
        pid: 10,
        labels: web_labels(),
        calls: BTreeMap::from([("malloc", sites.iter().map(|s| s.calls).sum())]),
        bytes: BTreeMap::from([("malloc", sites.iter().map(|s| s.bytes).sum())]),
        sites,
        exited_at: exited.then_some(t0),
        ..Default::default()
    };
    let site_sum = |text: &str| -> f64 {
        samples(text)
            .iter()
            .filter(|(k, _)| {
                k.starts_with("allocwatch_site_alloc_bytes_total{") && k.contains("api=\"malloc\"")
            })
            .map(|(_, v)| v)
            .sum()
    };
    let rounds = [
        // Not named yet: the whole site is in `other`, never labelled by its address.
        vec![unnamed(2, 200), named(1, 10)],
        // Named now (and grown): the same value under its label.
        vec![named(3, 300), site("malloc", &["other_fn", "main"], 1, 10)],
        // Exited and compacted: the smaller site is folded into the remainder.
        vec![
            named(3, 300),
            SiteSnapshot {
                frames: Vec::new().into(),
                ..unnamed(1, 10)
            },
        ],
    ];
    let mut prev = String::new();
    for (i, sites) in rounds.into_iter().enumerate() {
        let total: u64 = sites.iter().map(|s| s.bytes).sum();
        let out = render(
            &mut e,
            &[proc_with(sites, i == 2)],
            &stats,
            t0 + Duration::from_secs(i as u64),
        );
        assert_monotonic(&prev, &out);
        assert_eq!(site_sum(&out), total as f64, "round {i}:\n{out}");
        assert!(!out.contains("0x5555"), "a raw address as a label:\n{out}");
        prev = out;
    }
}

/// Go maps: per identity and site of first growth, the sums of its running processes' maps
/// (two maps at one site are one series), the top `top_k` sites by bytes held, a verdict's
/// series only where a map has it, and nothing from an exited process (it holds no map).
fn go_map(
    f: &str,
    len: u64,
    slots: u64,
    bytes: u64,
    verdict: Option<Verdict>,
) -> crate::model::GoMapSnapshot {
    crate::model::GoMapSnapshot {
        frames: site("map_grow", &[f, "main.main"], 0, 0).frames,
        len,
        slots,
        bytes,
        verdict,
    }
}

/// A Go process of the `web` identity holding `maps`.
fn go_proc(pid: u32, maps: Vec<crate::model::GoMapSnapshot>, exited: bool) -> ProcessSnapshot {
    ProcessSnapshot {
        pid,
        labels: web_labels(),
        without_libc: true,
        exited_at: exited.then(Instant::now),
        go: Some(GoSnapshot {
            version: "go1.27.3".into(),
            maps,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn go_maps_by_site_of_running_processes() {
    let (map, go) = (go_map, go_proc);
    let procs = [
        go(
            1,
            vec![
                map("main.dedup", 1000, 2048, 1 << 20, Some(Verdict::Growing)),
                map("main.small", 3, 8, 200, None),
                map("main.bloat", 1000, 131_072, 5 << 20, Some(Verdict::Bloated)),
            ],
            false,
        ),
        go(2, vec![map("main.dedup", 24, 32, 1024, None)], false),
        go(3, vec![map("main.gone", 9, 16, 1 << 30, None)], true),
    ];
    let mut e = Exporter::new(MetricsConfig { top_k: 2, ..cfg() });
    let out = render(&mut e, &procs, &SelfStats::default(), Instant::now());
    let got: BTreeMap<String, f64> = samples(&out)
        .into_iter()
        .filter(|(k, _)| {
            [
                "allocwatch_go_map_len{",
                "allocwatch_go_map_bytes{",
                "allocwatch_go_map_load_ratio{",
                "allocwatch_go_maps_flagged{",
            ]
            .iter()
            .any(|f| k.starts_with(f))
        })
        .map(|(k, v)| {
            let (name, rest) = k.split_once('{').expect("labels");
            let site = rest
                .split("site=\"")
                .nth(1)
                .expect("site")
                .split('"')
                .next();
            let verdict = rest.split("verdict=\"").nth(1).map(|v| v.split('"').next());
            (format!("{name} {} {verdict:?}", site.expect("site")), v)
        })
        .collect();
    let want: BTreeMap<String, f64> = [
        ("allocwatch_go_map_len main.bloat <- main.main None", 1000.0),
        (
            "allocwatch_go_map_bytes main.bloat <- main.main None",
            f64::from(5 << 20),
        ),
        (
            "allocwatch_go_map_load_ratio main.bloat <- main.main None",
            1000.0 / 131_072.0,
        ),
        (
            "allocwatch_go_maps_flagged main.bloat <- main.main Some(Some(\"bloated\"))",
            1.0,
        ),
        ("allocwatch_go_map_len main.dedup <- main.main None", 1024.0),
        (
            "allocwatch_go_map_bytes main.dedup <- main.main None",
            f64::from((1 << 20) + 1024),
        ),
        (
            "allocwatch_go_map_load_ratio main.dedup <- main.main None",
            1024.0 / 2080.0,
        ),
        (
            "allocwatch_go_maps_flagged main.dedup <- main.main Some(Some(\"growing\"))",
            1.0,
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(got, want, "{out}");
}

/// The map gauges count against `max_site_series`, after the call sites: whole sites, largest
/// first, while the cap has room; `allocwatch_call_site_series` counts them.
#[test]
fn go_map_series_count_against_the_site_series_cap() {
    let procs = [go_proc(
        1,
        vec![
            // 4 series each (length, bytes, load, one verdict); 2 for a map without slots.
            go_map("main.bloat", 1000, 131_072, 5 << 20, Some(Verdict::Bloated)),
            go_map("main.dedup", 1000, 2048, 1 << 20, Some(Verdict::Growing)),
            go_map("main.small", 3, 0, 200, None),
        ],
        false,
    )];
    let map_sites = |out: &str| -> Vec<String> {
        let sites: BTreeSet<String> = samples(out)
            .into_keys()
            .filter(|k| k.starts_with("allocwatch_go_map") && k.contains("site=\""))
            .filter_map(|k| Some(k.split("site=\"").nth(1)?.split(" <-").next()?.to_owned()))
            .collect();
        sites.into_iter().collect()
    };
    let series = |out: &str| samples(out)["allocwatch_call_site_series"];
    for (cap, want, n) in [
        (0, vec![], 0.0),
        (7, vec!["main.bloat"], 4.0),
        (9, vec!["main.bloat", "main.dedup"], 8.0),
        (10, vec!["main.bloat", "main.dedup", "main.small"], 10.0),
    ] {
        let mut e = Exporter::new(MetricsConfig {
            max_site_series: cap,
            ..cfg()
        });
        let out = render(&mut e, &procs, &SelfStats::default(), Instant::now());
        assert_eq!(map_sites(&out), want, "cap {cap}:\n{out}");
        assert_eq!(series(&out), n, "cap {cap}:\n{out}");
        assert!(series(&out) <= cap as f64);
    }
    // Call sites are served first: one call site takes 4 of 7, and the largest map site (4)
    // no longer fits; nor does a smaller one after it (whole sites, largest first).
    let mut with_sites = procs[0].clone();
    with_sites.without_libc = false;
    with_sites.sites = vec![site("malloc", &["main.alloc", "main.main"], 10, 1000)];
    let mut e = Exporter::new(MetricsConfig {
        max_site_series: SITE_FAMILIES + 3,
        ..cfg()
    });
    let out = render(&mut e, &[with_sites], &SelfStats::default(), Instant::now());
    assert!(out.contains("site=\"main.alloc <- main.main\""), "{out}");
    assert_eq!(map_sites(&out), Vec::<String>::new(), "{out}");
    assert_eq!(series(&out), SITE_FAMILIES as f64, "{out}");
}

/// A site whose naming ran late (`pending`) is left out, not put in `other`: when it is named
/// at a later scrape its whole value is under its own label and `other` stays empty (in
/// `other`, the value could never have left: counters do not go down). The process's totals
/// count it all along.
#[test]
fn a_pending_site_is_held_back_until_named() {
    let t0 = Instant::now();
    let mut e = Exporter::new(cfg());
    let stats = SelfStats::default();
    let pending = SiteSnapshot {
        frames: vec![Frame::unknown(0x5555_0000_1234)].into(),
        remainder: true,
        pending: true,
        ..site("malloc", &[], 2, 200)
    };
    let proc_with = |sites: Vec<SiteSnapshot>| ProcessSnapshot {
        pid: 10,
        labels: web_labels(),
        calls: BTreeMap::from([("malloc", sites.iter().map(|s| s.calls).sum())]),
        bytes: BTreeMap::from([("malloc", sites.iter().map(|s| s.bytes).sum())]),
        sites,
        ..Default::default()
    };
    // Whether a series (not a HELP line) is `site="other"`; the value of one series.
    let has_other = |text: &str| samples(text).keys().any(|k| k.contains("site=\"other\""));
    let value_of = |text: &str, name: &str, tail: &str| {
        samples(text)
            .into_iter()
            .find(|(k, _)| k.starts_with(name) && k.ends_with(tail))
            .map(|(_, v)| v)
    };
    let first = render(
        &mut e,
        &[proc_with(vec![
            pending,
            site("malloc", &["other_fn", "main"], 1, 10),
        ])],
        &stats,
        t0,
    );
    assert_eq!(
        value_of(&first, "allocwatch_alloc_bytes_total{", "api=\"malloc\"}"),
        Some(210.0),
        "the totals count the pending site:\n{first}"
    );
    assert!(!has_other(&first), "{first}");
    assert!(
        !first.contains("0x5555"),
        "a raw address as a label:\n{first}"
    );
    let second = render(
        &mut e,
        &[proc_with(vec![
            site("malloc", &["make_buf", "main"], 2, 200),
            site("malloc", &["other_fn", "main"], 1, 10),
        ])],
        &stats,
        t0 + Duration::from_secs(1),
    );
    assert_monotonic(&first, &second);
    assert_eq!(
        value_of(
            &second,
            "allocwatch_site_alloc_bytes_total{",
            "site=\"make_buf <- main\",api=\"malloc\"}"
        ),
        Some(200.0),
        "named with its whole value:\n{second}"
    );
    assert!(!has_other(&second), "{second}");
}

/// Two stacks under one label (`make_buf <- main` from two deeper callers), and at exit one of
/// them folded into the process's remainder: the label's series keeps its value, not its value
/// twice (found by the agent test `site_cardinality_is_bounded`: 28 frees exported for 17).
#[test]
fn a_label_partly_folded_away_at_exit_is_counted_once() {
    let t0 = Instant::now();
    let mut e = Exporter::new(cfg());
    let stats = SelfStats::default();
    let deep =
        |caller: &str, calls, bytes| site("malloc", &["make_buf", "main", caller], calls, bytes);
    let proc_with = |sites: Vec<SiteSnapshot>, exited: bool| ProcessSnapshot {
        pid: 10,
        labels: web_labels(),
        calls: BTreeMap::from([("malloc", sites.iter().map(|s| s.calls).sum())]),
        bytes: BTreeMap::from([("malloc", sites.iter().map(|s| s.bytes).sum())]),
        sites,
        exited_at: exited.then_some(t0),
        ..Default::default()
    };
    let rounds = [
        vec![deep("a", 11, 1100), deep("b", 6, 600)],
        vec![
            deep("a", 11, 1100),
            SiteSnapshot {
                frames: Vec::new().into(),
                remainder: true,
                ..deep("b", 6, 600)
            },
        ],
    ];
    let mut prev = String::new();
    for (i, sites) in rounds.into_iter().enumerate() {
        let out = render(
            &mut e,
            &[proc_with(sites, i == 1)],
            &stats,
            t0 + Duration::from_secs(i as u64),
        );
        assert_monotonic(&prev, &out);
        let calls: f64 = samples(&out)
            .iter()
            .filter(|(k, _)| k.starts_with("allocwatch_site_alloc_calls_total{"))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(calls, 17.0, "round {i}:\n{out}");
        assert!(
            out.contains("site=\"make_buf <- main\",api=\"malloc\"} 17"),
            "round {i}:\n{out}"
        );
        prev = out;
    }
}
