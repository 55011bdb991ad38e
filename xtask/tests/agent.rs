//! End-to-end tests of the node agent (`allocwatch agent`, issue 4) over HTTP: the real binary,
//! real uprobes, real fixtures, and independent readers of what it serves (`promtext`, a strict
//! reader of the text format, for /metrics, `go tool pprof` for the profiles, the `toml` crate
//! for the config file).
//! `./x test` runs them as root and sets `ALLOCWATCH_BIN`, `ALLOCWATCH_FIXTURES` (the C fixture),
//! `ALLOCWATCH_GO_FIXTURES` and `ALLOCWATCH_GO_TOOLCHAINS` (`$cache/go/toolchains.tsv`).
//!
//! Every test starts one agent on a free loopback port (`--listen 127.0.0.1:PORT`), waits until
//! `/healthz` answers, and ends it with SIGTERM: it must exit 0 within a few seconds, without a
//! crash, and leave no BPF program, link or map behind (nor tracefs/bpffs entries).
//!
//! The agent traces every process of the machine (deny-list mode), so a fixture is found by its
//! identity labels (`comm`, `exe`), never by pid. Each test runs its own *copy* of a fixture in a
//! fresh directory: the `exe` label is then unique to the test, and a fixture run by someone else
//! on this shared machine (or by another test file) can never be summed into the same series.
//! Fixtures are spawned directly (`std::process::Command`, i.e. `posix_spawn`), not through a
//! shell: a shell's forked child allocates under the same pid before its `exec`.
//!
//! The tests share system state (uprobes on libc, the BPF id space, the machine's two cores), so
//! each one holds [`serial`] for its whole run.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    env, fs,
    io::Write as _,
    net::TcpListener,
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    process::{ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::agent::{Agent, DISCOVERY_LIMIT, Identity, Metrics, free_port, try_get, value};
use support::{
    API_TOTALS, APIS, AllocwatchBin, ERROR_PREFIX, Fixture, GoToolchain, KernelState, SAMPLE_RATE,
    SAMPLE_SITES, SITES, Scratch, Site, address_groups, allocwatch_bin, assert_no_crash,
    assert_single_error, env_path, go_toolchains, libc_fixture, libc_path, panic_text, path_str,
    sample_bound, serial, signal, version_key, wait_child,
};

/// The `loop` mode's block size: malloc(48) then free, every millisecond.
const LOOP_BLOCK: u64 = 48;

/// How long a test waits for every site of its fixture to be named: a site the scrapes had no
/// time to name (a starved machine) is left out of the site series for up to 30 s
/// (`HOLD_BACK`, agent/src/daemon/snapshot.rs) while the agent names it, then put in `other`.
const SITES_NAMED: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------------------------------------
// What fixtures/go/growth does (see xtask/tests/go.rs for the derivations).

/// Old (bucket) maps: fillMapBig's 70,000 inserts make exactly 14 hashGrow calls (Go's load
/// factor; DESIGN.md §3, checked against bpftrace by go.rs).
const OLD_MAP_BIG_DOUBLINGS: u64 = 14;
/// Swiss maps: fillMapBig's first table (16 slots) is rehashed to double it up to 1024 slots:
/// 16 → 32 → … → 1024 is 6 `(*table).grow` calls, then the table splits.
const SWISS_MAP_BIG_GROWS: u64 = 6;
/// `bloat`: fillBloat fills a map to 100,000 keys, then deletes all but these.
const BLOAT_KEEP: u64 = 1_000;

// ---------------------------------------------------------------------------------------------
// Tests

/// Exact counters of a short-lived process (`libc_fixture run`, alive for well under a
/// millisecond) over HTTP, under its identity labels.
#[test]
fn exact_counters_over_http() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("exact");
    let fixture = scratch.copy(&env.fixture, "libc_fixture");
    let id = Identity::of(&fixture);
    let mut agent = Agent::start(&env, &[]);

    let status = run_fixture(&fixture, "run");
    assert!(status.success(), "libc_fixture run failed: {status}");
    let Some(m) = agent.try_scrape_until(Duration::from_secs(10), |m| {
        m.has(&id, "allocwatch_free_calls_total")
    }) else {
        let m = agent.scrape();
        // Say whether the counts at least are right under an identity without exe.
        let no_exe = Identity {
            comm: id.comm.clone(),
            exe: String::new(),
        };
        let counts = if m.has(&no_exe, "allocwatch_free_calls_total") {
            match panic::catch_unwind(AssertUnwindSafe(|| {
                check_fixture_totals(&m, &no_exe, &env.alias_groups);
            })) {
                Ok(()) => "its counts are exact, but under exe=\"\"".to_owned(),
                Err(e) => format!("under exe=\"\": {}", panic_text(&*e)),
            }
        } else {
            "no series with exe=\"\" either".to_owned()
        };
        panic!(
            "no series of {id} within 10 s of its exit ({counts}); series with comm=\"{}\" \
             (any exe):\n{}\nagent's own counters: {}",
            id.comm,
            m.lines_with_comm(&id.comm),
            m.self_stats()
        );
    };
    check_fixture_totals(&m, &id, &env.alias_groups);
    // Gauges count running processes only: once the agent has seen the exit, nothing is live.
    // Its sites are all named by then (a site not named yet is left out for a few scrapes).
    let m = agent.scrape_until("the fixture's exit, sites named", SITES_NAMED, |m| {
        m.value(&id, "allocwatch_processes", &[]) == Some(0.0) && m.sites_complete(&id)
    });
    check_fixture_totals(&m, &id, &env.alias_groups);
    for gauge in ["allocwatch_live_bytes", "allocwatch_live_allocations"] {
        assert_eq!(
            m.value(&id, gauge, &[]),
            Some(0.0),
            "{gauge} of an exited process\n{}",
            m.lines_of(&id)
        );
    }
    m.assert_conventions();
    // The agent never reports itself (its pid is denied in the kernel before any probe).
    let own_exe = fs::canonicalize(&env.bin).expect("the agent binary's path");
    let own: Vec<&str> = m
        .samples
        .iter()
        .filter(|s| s.labels.get("exe") == Some(path_str(&own_exe)))
        .map(|s| s.metric.as_str())
        .collect();
    assert!(own.is_empty(), "the agent's own series: {own:?}");
    // Once it is seen gone, its rows leave the kernel maps for the agent's memory (harvest,
    // then compaction): the same numbers, call for call, site by site.
    let sites = |m: &Metrics| {
        m.lines_of(&id)
            .lines()
            .filter(|l| l.starts_with("allocwatch_site_"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let before = sites(&m);
    thread::sleep(Duration::from_secs(2));
    let m = agent.scrape();
    check_fixture_totals(&m, &id, &env.alias_groups);
    assert_eq!(sites(&m), before, "site series changed after the harvest");
    agent.stop();
}

/// `--sample-bytes` in the agent (`libc_fixture sample`): per-API counters exact, call for
/// call; each site's series an estimate within the Poisson model's bound of what the fixture
/// did (`support::sample_bound`), free sites exact per caller.
#[test]
fn sampled_sites_estimated_totals_exact() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("sampled");
    let fixture = scratch.copy(&env.fixture, "libc_fixture");
    let id = Identity::of(&fixture);
    let rate = SAMPLE_RATE.to_string();
    let mut agent = Agent::start(&env, &["--sample-bytes", &rate]);
    // Found (and its executable read) before it allocates, so its sites are named as they
    // appear: a site first exported in `other` keeps its value there.
    agent.run_found(&fixture, "sample-wait");
    let mut calls: BTreeMap<&str, f64> = BTreeMap::new();
    let mut bytes: BTreeMap<&str, f64> = BTreeMap::new();
    // Per kind, the bound is the sum of its sites' (each estimated on its own).
    let mut slack: BTreeMap<&str, f64> = BTreeMap::new();
    for &(_, api, n, size, _) in SAMPLE_SITES {
        let exact = (n * size) as f64;
        *calls.entry(api).or_default() += n as f64;
        *bytes.entry(api).or_default() += exact;
        *slack.entry(api).or_default() += sample_bound(n, size, SAMPLE_RATE) * exact;
    }
    let site_sum = |m: &Metrics, api: &str| -> f64 {
        m.of(&id, "allocwatch_site_alloc_bytes_total")
            .iter()
            .filter(|s| s.labels.get("api") == Some(api))
            .map(|s| value(s))
            .sum()
    };
    // Final counts, and the sites' estimates in (a site not named yet is left out of the site
    // series for a few scrapes).
    let m = agent
        .try_scrape_until(SITES_NAMED, |m| {
            m.value(&id, "allocwatch_free_calls_total", &[]) == Some(20_000.0)
                && bytes
                    .iter()
                    .all(|(api, exact)| (site_sum(m, api) - exact).abs() <= slack[api])
        })
        .unwrap_or_else(|| agent.scrape());
    for &(func, api, n, size, _) in SAMPLE_SITES {
        let exact = (n * size) as f64;
        let bound = sample_bound(n, size, SAMPLE_RATE);
        // A site named after its first export keeps that value in `other` (the exporter's
        // monotonicity); a named site with a value is checked on its own.
        let site = format!("{func} <- main");
        let labels = [("site", site.as_str()), ("api", api)];
        let est = m
            .value(&id, "allocwatch_site_alloc_bytes_total", &labels)
            .unwrap_or(0.0);
        assert!(
            est == 0.0 || (est / exact - 1.0).abs() <= bound,
            "{site}: {est} bytes estimated, {exact} exact, bound {:.1} %\n{}",
            bound * 100.0,
            m.lines_of(&id)
        );
    }
    for (api, exact) in &bytes {
        let est = site_sum(&m, api);
        assert!(
            (est - exact).abs() <= slack[api],
            "{api}: sites sum to {est} bytes, {exact} exact ± {}\n{}",
            slack[api],
            m.lines_of(&id)
        );
    }
    for (api, n) in &calls {
        let api_label = [("api", *api)];
        assert_eq!(
            m.value(&id, "allocwatch_alloc_calls_total", &api_label),
            Some(*n),
            "{api} calls\n{}",
            m.lines_of(&id)
        );
        assert_eq!(
            m.value(&id, "allocwatch_alloc_bytes_total", &api_label),
            Some(bytes[api]),
            "{api} bytes"
        );
    }
    // free is never sampled: every call counted (the scrape waited for all 20,000), and it
    // has no site series (free is no allocation).
    assert!(
        m.of(&id, "allocwatch_site_alloc_calls_total")
            .iter()
            .all(|s| s.labels.get("api") != Some("free")),
        "free site series\n{}",
        m.lines_of(&id)
    );
    m.assert_conventions();
    agent.stop();
}

/// The agent's default (no `--sample-bytes`, `full`): one call per 512 KiB sampled, said on
/// its startup line; the per-API counters stay exact call for call, and the sites are still
/// there, as estimates (at 512 KiB the fixture's 2.6 MB make too few samples for a bound worth
/// checking: `sampled_sites_estimated_totals_exact` checks the estimates at 512 bytes).
#[test]
fn agent_samples_by_default() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("defsample");
    let fixture = scratch.copy(&env.fixture, "libc_fixture");
    let id = Identity::of(&fixture);
    let mut agent = Agent::start_as_configured(&env, &[]);
    // Read by `start` already (it waits for this line).
    let stderr = agent.stderr.text();
    let banner = stderr
        .lines()
        .find(|l| l.contains("agent serving on"))
        .unwrap_or_default();
    assert!(
        banner.contains("one call per 524288 bytes allocated sampled"),
        "the startup line does not say the agent samples: {banner}"
    );
    agent.run_found(&fixture, "sample-wait");
    let m = agent.scrape_until("the fixture's final counts", SITES_NAMED, |m| {
        m.value(&id, "allocwatch_free_calls_total", &[]) == Some(20_000.0)
            && !m.of(&id, "allocwatch_site_alloc_bytes_total").is_empty()
    });
    let mut want: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for &(_, api, n, size, _) in SAMPLE_SITES {
        let e = want.entry(api).or_default();
        e.0 += n as f64;
        e.1 += (n * size) as f64;
    }
    for (api, (calls, bytes)) in want {
        let label = [("api", api)];
        assert_eq!(
            (
                m.value(&id, "allocwatch_alloc_calls_total", &label),
                m.value(&id, "allocwatch_alloc_bytes_total", &label)
            ),
            (Some(calls), Some(bytes)),
            "{api} calls and bytes\n{}",
            m.lines_of(&id)
        );
    }
    m.assert_conventions();
    agent.stop();
}

/// `--mode count` (entry probes only, the cheapest): the same exact calls, bytes and frees;
/// no live gauges, size histogram or heap profile, which this mode cannot know (absent, not 0).
#[test]
fn count_mode_exact_counters_without_live_series() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("count");
    let fixture = scratch.copy(&env.fixture, "libc_fixture");
    let id = Identity::of(&fixture);
    let mut agent = Agent::start(&env, &["--mode", "count", "--pprof"]);
    let fx = agent.run_found(&fixture, "wait-run");
    agent.scrape_until("the fixture's final counts", Duration::from_secs(3), |m| {
        m.value(&id, "allocwatch_free_calls_total", &[]) == Some(17.0)
    });
    // Its sites are exported once named (a starved agent takes a few scrapes).
    let m = agent
        .try_scrape_until(SITES_NAMED, |m| m.sites_complete(&id))
        .unwrap_or_else(|| agent.scrape());
    check_fixture_calls(&m, &id, &env.alias_groups);
    for family in [
        "allocwatch_live_bytes",
        "allocwatch_live_allocations",
        "allocwatch_alloc_size_bytes",
        "allocwatch_site_live_bytes",
        "allocwatch_site_live_allocations",
    ] {
        assert!(
            m.of(&id, family).is_empty() && !m.text.contains(&format!("# TYPE {family} ")),
            "count mode exports {family}\n{}",
            m.lines_of(&id)
        );
    }
    assert!(
        !m.of(&id, "allocwatch_site_alloc_calls_total").is_empty(),
        "count mode still has per-site series\n{}",
        m.lines_of(&id)
    );
    let heap = agent.get(&format!("/debug/pprof/heap?pid={}", fx.pid));
    assert_eq!(heap.status, 404, "count mode has no in-use profile");
    let allocs = agent.get(&format!("/debug/pprof/allocs?pid={}", fx.pid));
    assert_eq!(
        allocs.status, 200,
        "count mode serves the allocation profile"
    );
    m.assert_conventions();
    agent.stop();
}

/// A process that execs another program: what each program did stays with its own identity
/// (a shell's work before `exec app` is not the app's). `libc_fixture exec-run NEXT` does the
/// fixture's work, then execs a second copy of the fixture under another name, which does it
/// again in the same pid: each identity has exactly the fixture's calls, bytes, frees and size
/// histogram, once.
#[test]
fn exec_leaves_the_old_programs_counts_with_its_identity() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("execsplit");
    let first = scratch.copy(&env.fixture, "pre_exec_fx");
    let second = scratch.copy(&env.fixture, "post_exec_fx");
    let (first_id, second_id) = (Identity::of(&first), Identity::of(&second));
    let mut agent = Agent::start(&env, &[]);
    let status = Command::new(&first)
        .args(["exec-run", path_str(&second)])
        .stdin(Stdio::null())
        .status()
        .expect("running the exec-run fixture");
    assert!(status.success(), "libc_fixture exec-run failed: {status}");
    let done = |m: &Metrics| {
        [&first_id, &second_id]
            .iter()
            .all(|id| m.value(id, "allocwatch_free_calls_total", &[]).is_some())
    };
    let Some(m) = agent.try_scrape_until(Duration::from_secs(10), done) else {
        let m = agent.scrape();
        panic!(
            "no series of both {first_id} and {second_id} within 10 s; series of the fixture \
             copies:\n{}\n{}",
            m.lines_with_comm(&first_id.comm),
            m.lines_with_comm(&second_id.comm)
        );
    };
    // Calls, bytes and the size histogram: the histogram rows are keyed by pid in the kernel
    // and leave it at the exec (`ImageHist`), so each program has its own.
    check_fixture_totals(&m, &first_id, &env.alias_groups);
    check_fixture_totals(&m, &second_id, &env.alias_groups);
    m.assert_conventions();
    agent.stop();
}

/// A process the agent finds by its /proc scan before it allocates (`wait-run`): found within a
/// second, all counters zero until it works, then exactly the fixture's numbers.
#[test]
fn exact_counters_of_a_process_found_by_scan() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("scan");
    let fixture = scratch.copy(&env.fixture, "libc_fixture");
    let id = Identity::of(&fixture);
    let mut agent = Agent::start(&env, &[]);
    run_wait_run_fixture(&agent, &fixture, &id, &env.alias_groups);
    agent.stop();
}

/// Scrapes back to back (three clients that never pause, as several Prometheus replicas or a
/// user's `watch curl` can) do not starve the agent's own work: a process that exits is still
/// noticed by the /proc scan and its final counts exported within seconds.
#[test]
fn back_to_back_scrapes_do_not_starve_the_scan() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("hammer");
    let fixture = scratch.copy(&env.fixture, "hammered_fx");
    let id = Identity::of(&fixture);
    let mut agent = Agent::start(&env, &[]);
    let mut fx = Fixture::spawn(&fixture, "wait-run", "ready");
    agent.wait_for_identity(&id, fx.started);
    let stop = Arc::new(AtomicBool::new(false));
    let port = agent.port;
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let _ = try_get(port, "/metrics");
                    n += 1;
                }
                n
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(1));
    signal(fx.pid, libc::SIGUSR1);
    let status = fx.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "fixture wait-run failed: {status}");
    let exited = Instant::now();
    // The scan runs every 500 ms: well within 10 s however busy the machine.
    let m = agent.scrape_until("the fixture's exit", Duration::from_secs(10), |m| {
        m.value(&id, "allocwatch_processes", &[]) == Some(0.0)
    });
    let noticed = exited.elapsed();
    stop.store(true, Ordering::Relaxed);
    let scrapes: u64 = clients.into_iter().map(|c| c.join().unwrap_or(0)).sum();
    check_fixture_totals(&m, &id, &env.alias_groups);
    eprintln!("exit noticed after {noticed:?} under {scrapes} back-to-back scrapes");
    agent.stop();
}

/// A tracing loop whose every step outlasts its 100 ms tick (a node busy enough, or
/// `ALLOCWATCH_DEBUG_SLOW_STEP_MS`) still answers scrapes with fresh renderings: a step that is
/// always due must not keep requests waiting until the server gives up (a "still starting"
/// 503 before the first rendering, the last rendering after it).
#[test]
fn scrapes_are_answered_when_every_step_outlasts_the_tick() {
    let env = TestEnv::get();
    let _serial = serial();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["agent", "--listen", &listen, "--sample-bytes", "0"];
    let mut cmd = Command::new(&env.bin);
    cmd.args(args).env("ALLOCWATCH_DEBUG_SLOW_STEP_MS", "150");
    let mut agent = Agent::spawn(cmd, port, &args.join(" "));
    agent.wait_ready();
    // The server waits 800 ms for the loop; a loop that takes requests between its steps
    // answers within one step (150 ms and its work).
    for i in 0..10 {
        let started = Instant::now();
        let r = agent.get("/metrics");
        assert_eq!(
            r.status,
            200,
            "scrape {i} after {:?}: {}\nagent stderr:\n{}",
            started.elapsed(),
            String::from_utf8_lossy(&r.body),
            agent.stderr.text()
        );
    }
    let m = agent.scrape();
    let stale = m.global_sum("allocwatch_stale_scrapes_total", &[]);
    assert_eq!(
        stale,
        0.0,
        "scrapes answered with an old rendering\nagent stderr:\n{}",
        agent.stderr.text()
    );
    agent.stop();
}

/// `--ttl 2s`: the series of an exited process stay (and do not go down) within the TTL, and
/// every one of them is gone once it has passed.
#[test]
fn series_expire_after_ttl() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("ttl");
    let fixture = scratch.copy(&env.fixture, "libc_fixture");
    let id = Identity::of(&fixture);
    let mut agent = Agent::start(&env, &["--ttl", "2s"]);

    agent.run_found(&fixture, "wait-run");
    let exited = Instant::now();

    let first = agent.scrape_until("the fixture's final counts", Duration::from_secs(2), |m| {
        m.value(&id, "allocwatch_free_calls_total", &[]) == Some(17.0)
    });
    check_fixture_totals(&first, &id, &env.alias_groups);
    // Well within the TTL (2 s after the exit is noticed, ≤ 0.5 s after it happens).
    sleep_until(exited + Duration::from_millis(1200));
    let within = agent.scrape();
    assert!(
        within.has(&id, "allocwatch_free_calls_total"),
        "series gone {:?} after the exit, before the 2 s TTL\n{}",
        exited.elapsed(),
        within.lines_of(&id)
    );
    check_fixture_totals(&within, &id, &env.alias_groups);
    // TTL, plus the scan interval (the exit is noticed within 0.5 s), plus slack.
    sleep_until(exited + Duration::from_millis(3500));
    let after = agent.scrape();
    let left = after.lines_of(&id);
    assert!(
        left.is_empty(),
        "series of a process that exited {:?} ago are still exported with --ttl 2s:\n{left}",
        exited.elapsed()
    );
    agent.stop();
}

/// `--top-k 3` with the fixture's 10 call sites: per identity at most 3 sites with their own
/// series (plus one `site="other"` per api), and the sites of an api always sum to the
/// identity's total of that api. Checked for every identity on the machine too.
#[test]
fn site_cardinality_is_bounded() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("topk");
    let fixture = scratch.copy(&env.fixture, "libc_fixture");
    let id = Identity::of(&fixture);
    let mut agent = Agent::start(&env, &["--top-k", "3"]);

    agent.run_found(&fixture, "wait-run");
    let m = agent.scrape_until(
        "the fixture's final counts, sites named",
        SITES_NAMED,
        |m| m.value(&id, "allocwatch_free_calls_total", &[]) == Some(17.0) && m.sites_complete(&id),
    );
    check_fixture_totals(&m, &id, &env.alias_groups);
    // Sites are (re)chosen at each scrape: check two in a row.
    for m in [m, agent.scrape()] {
        check_site_bounds(&m, 3);
        let sites = m.sites(&id);
        check_site_sums(&m, &id, &env.alias_groups);
        let named = sites.keys().filter(|(_, site)| site != "other").count();
        assert!(
            named <= 3,
            "{named} sites with their own series with --top-k 3\n{}",
            m.lines_of(&id)
        );
        assert!(
            named >= 1,
            "no site has its own series (--top-k 3, 10 sites)\n{}",
            m.lines_of(&id)
        );
    }
    agent.stop();
}

/// Once the call-site table is three quarters full, one process may create only 1/32 of its rows
/// with a stack (512 of 16,384): six processes holding 2,048 rows each bring the pressure, then
/// another one's 1,024 distinct stacks (malloc + free each) go past its share, and every call is
/// still counted exactly, the later ones at their immediate caller; `stack_budget` counts those.
/// (Each process makes its stacks once the agent has admitted it.)
#[test]
fn site_share_under_pressure_keeps_counts_exact() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("budget");
    let fixture = scratch.copy(&env.fixture, "aw_budget");
    let id = Identity::of(&fixture);
    let config = scratch.path.join("budget.toml");
    fs::write(&config, "[capacity]\nmax_sites = 16384\n").expect("write the config");
    let mut agent = Agent::start(
        &env,
        &["--comm", "^aw_budget$", "--config", path_str(&config)],
    );
    // Paths per fixture process (2^10), holders, and the share of 16,384.
    const N: u64 = 1024;
    const HOLDERS: u64 = 6;
    const SHARE: u64 = 512;
    const BLOCK: u64 = 32;
    // Each let go once the agent lists it: rows made before a process is classified are held
    // to the undecided limit (tested in selection_lag_holds_undecided_rows_to_their_limit).
    let listed = |agent: &Agent, n: u64| {
        agent.scrape_until("the fixtures listed", Duration::from_secs(10), |m| {
            m.value(&id, "allocwatch_processes", &[]) == Some(n as f64)
        });
    };
    let stack = |fx: &Fixture| {
        signal(fx.pid, libc::SIGUSR1);
        fx.wait_word("stacked", Duration::from_secs(30));
    };
    let mut holders: Vec<Fixture> = (0..HOLDERS)
        .map(|_| Fixture::spawn(&fixture, "stacks-wait", "ready"))
        .collect();
    listed(&agent, HOLDERS);
    holders.iter().for_each(stack);
    let line = agent.stderr.wait_for(
        "allocwatch: warning: the call-site table holds",
        Duration::from_secs(10),
    );
    assert!(
        line.contains("each process keeps at most 512 sites with their stack"),
        "{line}"
    );
    let before = agent.scrape().lost("stack_budget");
    let last = Fixture::spawn(&fixture, "stacks-wait", "ready");
    listed(&agent, HOLDERS + 1);
    stack(&last);
    let all = (HOLDERS + 1) * N;
    let m = agent.scrape_until("every fixture's frees", Duration::from_secs(10), |m| {
        m.value(&id, "allocwatch_free_calls_total", &[]) == Some(all as f64)
    });
    let during = m.lost("stack_budget") - before;

    // A process with many more callers than ROW_SHARES shares (4 × 512 rows), as a compiler:
    // 4,096 call instructions × (malloc, free) want 8,192 rows keyed by the caller (unsampled
    // 16-byte calls have no stack). It gets 2,048 (a few more if two CPUs raced), its other sites
    // go to its rows of unknown sites (`site_budget`), and every call is still counted.
    let callers_dir = Scratch::new("budget-callers");
    let callers = callers_dir.copy(
        &env_path("ALLOCWATCH_FIXTURES").join("callers"),
        "aw_budget",
    );
    let callers_id = Identity::of(&callers);
    const CALLERS: u64 = 4096;
    const ROWS: u64 = 4 * SHARE;
    // The node's other processes share the table's last quarter: on a busy node (a build, the
    // agent lagging) it can be full while the fixture runs, and then its sites may spill
    // (`site_spilled`) before its bound is reached. A window short of the bound's figure in
    // which the table filled is taken again, up to three (counts must be exact in every one).
    let mut windows = Vec::new();
    // Room for the fixture's rows and some: the rows of others that exited leave within seconds.
    let room = 1.0 - (ROWS + SHARE) as f64 / 16_384.0;
    for run in 1..=3u64 {
        let _ = agent.try_scrape_until(Duration::from_secs(15), |m| {
            m.global_sum("allocwatch_map_fill_ratio", &[("map", "SITES")]) <= room
        });
        let before = agent.scrape();
        let mut many = Fixture::spawn_args(&callers, &["wait", &CALLERS.to_string()], "ready");
        agent.scrape_until("the callers fixture listed", Duration::from_secs(10), |m| {
            m.value(&callers_id, "allocwatch_processes", &[]) == Some(1.0)
        });
        signal(many.pid, libc::SIGUSR1);
        many.wait_word("called", Duration::from_secs(30));
        let m = agent.scrape_until("the callers' frees", Duration::from_secs(10), |m| {
            m.value(&callers_id, "allocwatch_free_calls_total", &[]) == Some((run * CALLERS) as f64)
        });
        let budget = m.lost("site_budget") - before.lost("site_budget");
        let full = m.lost("site_spilled") - before.lost("site_spilled");
        signal(many.pid, libc::SIGUSR1);
        let exit = many.wait_exit(Duration::from_secs(10));
        assert!(exit.success(), "fixture callers failed: {exit}");
        assert_eq!(
            (
                m.counter(
                    &callers_id,
                    "allocwatch_alloc_calls_total",
                    &[("api", "malloc")]
                ),
                m.counter(
                    &callers_id,
                    "allocwatch_alloc_bytes_total",
                    &[("api", "malloc")]
                ),
                m.counter(&callers_id, "allocwatch_free_calls_total", &[]),
            ),
            (run * CALLERS, run * CALLERS * 16, run * CALLERS),
            "the callers fixture's malloc calls and bytes, free calls (run {run})\n{}",
            m.lines_of(&callers_id)
        );
        windows.push(format!(
            "run {run}: site_budget +{budget}, site_spilled +{full} ({})",
            m.self_stats()
        ));
        let want = 2 * CALLERS - ROWS - 8;
        if budget >= want {
            break;
        }
        // Short of the bound's figure: only a window in which the table filled (others' sites
        // spilled too) may be taken again.
        assert!(
            full > 0 && run < 3,
            "site_budget rose by {budget} while the callers fixture ran, want at least {want}\n{}",
            windows.join("\n")
        );
        eprintln!(
            "the table was full while the callers fixture ran: {}",
            windows[windows.len() - 1]
        );
    }
    holders.push(last);
    for holder in &mut holders {
        signal(holder.pid, libc::SIGUSR1);
        let exit = holder.wait_exit(Duration::from_secs(10));
        assert!(exit.success(), "fixture stacks-wait failed: {exit}");
    }
    // The identity's sums: every process's mallocs and frees, whatever their rows; and its
    // sites' (a site not named yet is left out for a few scrapes).
    let m = agent
        .try_scrape_until(SITES_NAMED, |m| {
            m.value(&id, "allocwatch_free_calls_total", &[]) == Some(all as f64)
                && m.sites_complete(&id)
        })
        .unwrap_or_else(|| agent.scrape());
    assert_eq!(
        (
            m.counter(&id, "allocwatch_alloc_calls_total", &[("api", "malloc")]),
            m.counter(&id, "allocwatch_alloc_bytes_total", &[("api", "malloc")]),
            m.counter(&id, "allocwatch_free_calls_total", &[]),
        ),
        (all, all * BLOCK, all),
        "malloc calls and bytes, free calls\n{}",
        m.lines_of(&id)
    );
    let by_site = m
        .sites(&id)
        .into_iter()
        .filter(|((api, _), _)| api == "malloc")
        .fold((0, 0), |(c, b), (_, v)| (c + v.calls, b + v.bytes));
    assert_eq!(
        by_site,
        (all, all * BLOCK),
        "Σ over sites of the malloc site series (calls, bytes)\n{}",
        m.lines_of(&id)
    );
    // The last process: 2N calls at 2N distinct stacks, at most SHARE of them with a row of
    // their own (a few more if two CPUs created rows at once: the share is not atomic).
    assert!(
        during >= 2 * N - SHARE - 8,
        "stack_budget rose by {during} while the last process ran, want at least {} ({})",
        2 * N - SHARE - 8,
        m.self_stats()
    );
    assert_eq!(
        m.lost("site_map_full"),
        0,
        "the table itself never filled ({})",
        m.self_stats()
    );
    m.assert_conventions();
    agent.stop();
}

/// A process that starts while the call-site table is full keeps its counts (issue 15, "defaults
/// that survive a busy node"): a holder makes 1,024 distinct stacks (2,048 rows) in a table of
/// 256 and stays, then `libc_fixture wait-run` starts and does its work. Its rows of unknown
/// sites have their own table, which sites cannot fill: every call is counted exactly under its
/// process (per API, its sites summed too), in `other` (`site_spilled` rises) and none as
/// `site_map_full`. Before that table, such a process had no row at all and its calls were
/// counted for the node only.
#[test]
fn process_starting_on_a_full_site_table_keeps_its_counts() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("spill");
    let holder_fx = scratch.copy(&env.fixture, "aw_spill_hold");
    let run_fx = scratch.copy(&env.fixture, "aw_spill_run");
    let (holder_id, id) = (Identity::of(&holder_fx), Identity::of(&run_fx));
    let config = scratch.path.join("spill.toml");
    fs::write(&config, "[capacity]\nmax_sites = 256\n").expect("write the config");
    let mut agent = Agent::start(
        &env,
        &["--comm", "^aw_spill_", "--config", path_str(&config)],
    );
    // Admitted first (an undecided process keeps 2 rows with a stack), then let go.
    let mut holder = Fixture::spawn(&holder_fx, "stacks-wait", "ready");
    agent.wait_for_identity(&holder_id, holder.started);
    signal(holder.pid, libc::SIGUSR1);
    holder.wait_word("stacked", Duration::from_secs(30));
    let full = agent.scrape_until("a full site table", Duration::from_secs(10), |m| {
        m.global_sum("allocwatch_map_fill_ratio", &[("map", "SITES")]) >= 1.0
    });
    agent.run_found(&run_fx, "wait-run");
    let m = agent.scrape_until("the fixture's final counts", SITES_NAMED, |m| {
        m.value(&id, "allocwatch_free_calls_total", &[]) == Some(17.0) && m.sites_complete(&id)
    });
    check_fixture_totals(&m, &id, &env.alias_groups);
    // Its site series (`other` holds the spilled calls) add up to its totals per API.
    check_site_sums(&m, &id, &env.alias_groups);
    let spilled = m.lost("site_spilled") - full.lost("site_spilled");
    assert!(
        spilled > 0,
        "site_spilled did not rise: the site table had room ({})",
        m.self_stats()
    );
    assert_eq!(
        m.lost("site_map_full"),
        0,
        "no call lost its process ({})",
        m.self_stats()
    );
    assert!(
        m.global_sum("allocwatch_map_fill_ratio", &[("map", "SPILL")]) > 0.0,
        "the rows of unknown sites in their table\n{}",
        m.self_stats()
    );
    signal(holder.pid, libc::SIGUSR1);
    let exit = holder.wait_exit(Duration::from_secs(10));
    assert!(exit.success(), "fixture stacks-wait failed: {exit}");
    m.assert_conventions();
    agent.stop();
}

/// While the agent lags (held with SIGSTOP), processes it has not classified yet may create only
/// 1/128 of the call-site table's rows (32 of 4,096), their stacks first: three processes the
/// selection will reject, 2,048 distinct stacks each, leave the table room, and a selected one
/// run meanwhile is still counted exactly, its later stacks at their immediate caller's row
/// where it has one, else in its row of unknown sites (`stack_undecided`). Without the limit
/// the three filled the table (`site_map_full`). A fifth, rejected, with 4,096 callers keeps
/// at most 32 rows of any kind (`site_undecided`).
#[test]
fn selection_lag_holds_undecided_rows_to_their_limit() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("undecided");
    let selected = scratch.copy(&env.fixture, "aw_undecided");
    let rejected = scratch.copy(&env.fixture, "aw_rejected");
    let id = Identity::of(&selected);
    let config = scratch.path.join("undecided.toml");
    fs::write(&config, "[capacity]\nmax_sites = 4096\n").expect("write the config");
    let mut agent = Agent::start(
        &env,
        &["--comm", "^aw_undecided$", "--config", path_str(&config)],
    );
    // Its libc attached and its file read first: a warm-up run.
    agent.run_found(&selected, "wait-run");
    const N: u64 = 1024;
    const LIMIT: u64 = 4096 / 128;
    let before = agent.scrape();
    let agent_pid = agent.child.id();
    signal(agent_pid, libc::SIGSTOP);
    let run = |path: &Path| {
        Command::new(path)
            .args(["stacks", &N.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()))
    };
    let mut children: Vec<_> = (0..3).map(|_| run(&rejected)).collect();
    children.push(run(&selected));
    // And one the selection will reject with 4,096 callers (8,192 rows keyed by the caller
    // wanted, as a compiler): at most LIMIT rows of any kind, the rest of its sites in its
    // rows of unknown sites (`site_undecided`).
    const CALLERS: u64 = 4096;
    let callers = scratch.copy(
        &env_path("ALLOCWATCH_FIXTURES").join("callers"),
        "aw_rcallers",
    );
    children.push(
        Command::new(&callers)
            .args(["run", &CALLERS.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", callers.display())),
    );
    let statuses: Vec<_> = children
        .iter_mut()
        .map(|c| wait_child(c, Duration::from_secs(30)))
        .collect();
    signal(agent_pid, libc::SIGCONT);
    for status in statuses {
        let status = status.expect("the stacks fixture ran within 30 s");
        assert!(status.success(), "fixture stacks failed: {status}");
    }
    let warm = before.counter(&id, "allocwatch_free_calls_total", &[]);
    let m = agent.scrape_until(
        "the selected fixture's frees",
        Duration::from_secs(10),
        |m| m.value(&id, "allocwatch_free_calls_total", &[]) == Some((warm + N) as f64),
    );
    let warm_calls = before.counter(&id, "allocwatch_alloc_calls_total", &[("api", "malloc")]);
    assert_eq!(
        m.counter(&id, "allocwatch_alloc_calls_total", &[("api", "malloc")]) - warm_calls,
        N,
        "malloc calls of the selected fixture\n{}",
        m.lines_of(&id)
    );
    // Four processes, 2N stacks each: at most LIMIT with a row of their own (a few more when
    // two CPUs create rows at once).
    let undecided = m.lost("stack_undecided") - before.lost("stack_undecided");
    assert!(
        undecided >= 4 * (2 * N - LIMIT - 8),
        "stack_undecided rose by {undecided}, want at least {} ({})",
        4 * (2 * N - LIMIT - 8),
        m.self_stats()
    );
    let rows = m.lost("site_undecided") - before.lost("site_undecided");
    assert!(
        rows >= 2 * CALLERS - LIMIT - 8,
        "site_undecided rose by {rows}, want at least {} ({})",
        2 * CALLERS - LIMIT - 8,
        m.self_stats()
    );
    assert_eq!(
        m.lost("site_map_full"),
        0,
        "the table filled ({})",
        m.self_stats()
    );
    m.assert_conventions();
    agent.stop();
}

/// `--pprof`: `/debug/pprof/allocs?pid=` serves a gzipped profile that `go tool pprof` reads,
/// with the fixture's functions and their exact totals; a running `loop` fixture's profile
/// shows fx_loop; the node's profile has a short header; `/debug/pprof/` lists the profiles;
/// bad queries get 404/400.
#[test]
fn pprof_profiles_read_by_go_tool_pprof() {
    let env = TestEnv::get();
    let _serial = serial();
    let go = newest_go_toolchain();
    let scratch = Scratch::new("pprof");
    let fixture = scratch.copy(&env.fixture, "libc_fixture");
    let id = Identity::of(&fixture);
    let mut agent = Agent::start(&env, &["--pprof"]);

    // The loop fixture first: it allocates while this test reads the other profiles.
    let looping = scratch.copy(&env.fixture, "loop_fixture");
    let loop_fx = Fixture::spawn(&looping, "loop", "loop");

    let fx = agent.run_found(&fixture, "wait-run");
    agent.scrape_until("the fixture's final counts", Duration::from_secs(3), |m| {
        m.value(&id, "allocwatch_free_calls_total", &[]) == Some(17.0)
    });

    // free is not an allocation: it has no place in an allocation profile.
    let allocs = SITES.iter().filter(|s| s.api != "free");
    // A site the agent had no time to name yet (a starved machine) is in the profile at its
    // caller's address: take profiles until every fixture function is in (bounded).
    let file = scratch.path.join("allocs.pb.gz");
    let deadline = Instant::now() + SITES_NAMED;
    let (space, objects) = loop {
        let profile = agent.profile(&format!("/debug/pprof/allocs?pid={}", fx.pid));
        fs::write(&file, &profile).expect("writing the profile");
        let space = pprof_top(&go, &file, &["-sample_index=alloc_space", "-unit=B"]);
        let objects = pprof_top(&go, &file, &["-sample_index=alloc_objects"]);
        let named = allocs.clone().all(|s| space.flat(s.function).is_some());
        if named || Instant::now() >= deadline {
            break (space, objects);
        }
        thread::sleep(Duration::from_millis(300));
    };
    let mut failures = Vec::new();
    let total_bytes: u64 = allocs.clone().map(|s| s.bytes).sum();
    let total_calls: u64 = allocs.clone().map(|s| s.calls).sum();
    for (top, unit, total) in [(&space, "B", total_bytes), (&objects, "", total_calls)] {
        let want = format!("of {total}{unit} total");
        if !top.text.contains(&want) {
            failures.push(format!("{}: no `{want}`", top.index));
        }
    }
    for &Site {
        function,
        api,
        calls,
        bytes,
        ..
    } in allocs
    {
        for (top, want) in [(&space, bytes), (&objects, calls)] {
            let got = top.flat(function);
            if got != Some(want) {
                failures.push(format!(
                    "{}: flat of {function} ({api}) {got:?}, want {want}",
                    top.index
                ));
            }
        }
    }
    // Frames come from a frame-pointer walk that reaches main (as in `top`'s report).
    for (top, total) in [(&space, total_bytes), (&objects, total_calls)] {
        for function in ["fx_work", "main"] {
            if top.cum(function) != Some(total) {
                failures.push(format!(
                    "{}: cum of {function} {:?}, want {total} (every sample's stack passes \
                     through it)",
                    top.index,
                    top.cum(function),
                ));
            }
        }
    }
    if !failures.is_empty() {
        failures.push(format!(
            "go tool pprof -top of the wait-run fixture:\n{}\n{}",
            space.text, objects.text
        ));
    }

    // The running loop fixture: fx_loop allocates 48 bytes per malloc.
    let loop_profile = agent.profile(&format!("/debug/pprof/allocs?pid={}", loop_fx.pid));
    let loop_file = scratch.path.join("loop.pb.gz");
    fs::write(&loop_file, &loop_profile).expect("writing the profile");
    let top = pprof_top(&go, &loop_file, &["-sample_index=alloc_space", "-unit=B"]);
    match top.flat("fx_loop") {
        Some(b) if b > 0 && b % LOOP_BLOCK == 0 => {}
        other => failures.push(format!(
            "fx_loop's alloc_space {other:?}: want a positive multiple of {LOOP_BLOCK}\n{}",
            top.text
        )),
    }
    // The node's profile (every process): a header, not one line per process, and no
    // `File:` of whichever process came first.
    let node_file = scratch.path.join("node.pb.gz");
    fs::write(&node_file, agent.profile("/debug/pprof/allocs")).expect("writing the profile");
    let node = pprof_top(&go, &node_file, &["-sample_index=alloc_space", "-unit=B"]);
    let header: Vec<&str> = node
        .text
        .lines()
        .take_while(|l| !l.trim_start().starts_with("flat"))
        .collect();
    let processes = header
        .iter()
        .filter(|l| l.ends_with(" processes (sample labels pid and comm tell them apart)"))
        .count();
    if header.len() > 6 || processes != 1 || header.iter().any(|l| l.starts_with("File:")) {
        failures.push(format!(
            "the node profile's header: want one line saying how many processes, no File:\n{}",
            header.join("\n")
        ));
    }
    // An index of the profiles, as Go's net/http/pprof serves one.
    let index = agent.get("/debug/pprof/");
    let html = String::from_utf8_lossy(&index.body);
    if index.status != 200
        || !html.contains("<a href=\"allocs\">allocs</a>")
        || !html.contains("<a href=\"heap\">heap</a>")
    {
        failures.push(format!("GET /debug/pprof/: {}\n{html}", index.status));
    }
    let heap = agent.get(&format!("/debug/pprof/heap?pid={}", loop_fx.pid));
    if heap.status != 200 || !heap.body.starts_with(&[0x1f, 0x8b]) {
        failures.push(format!(
            "/debug/pprof/heap?pid={}: status {}, not a gzip body",
            loop_fx.pid, heap.status
        ));
    }
    // Not `dead_pid()`: the agent traces the whole node, so a process that ran and exited
    // (even `true`) has a profile until its series expire. Above pid_max no process ever ran.
    let pid_max: u32 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("reading pid_max")
        .trim()
        .parse()
        .expect("pid_max is a number");
    let never = pid_max + 1;
    for (query, want) in [
        (format!("/debug/pprof/allocs?pid={never}"), 404),
        ("/debug/pprof/allocs?seconds=100000".to_owned(), 400),
    ] {
        let r = agent.get(&query);
        if r.status != want {
            failures.push(format!(
                "GET {query}: status {}, want {want}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
    }
    drop(loop_fx);
    agent.stop();
    assert!(
        failures.is_empty(),
        "profile checks failed:\n{}",
        failures.join("\n")
    );
}

/// `allocwatch config print-default` is a TOML file the agent accepts (`--config FILE`, here
/// with only its listen address changed, so the agent must take it from the file); bad files and
/// bad flags are one error line naming the key or flag (a file's error with a pointer to its line
/// under it), exit code 1.
#[test]
fn config_file_default_and_bad_configs() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("config");
    let out = Command::new(&env.bin)
        .args(["config", "print-default"])
        .output()
        .expect("running allocwatch config print-default");
    let text = String::from_utf8(out.stdout).expect("print-default prints UTF-8");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "config print-default: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let table: toml::Table = toml::from_str(&text)
        .unwrap_or_else(|e| panic!("print-default is not TOML ({e}):\n{text}"));
    for key in ["listen", "ttl", "top_k", "max_site_series"] {
        assert!(
            table.contains_key(key),
            "no `{key}` in print-default\n{text}"
        );
    }
    for section in ["select", "capacity", "go", "pprof", "kubernetes"] {
        assert!(
            table.get(section).is_some_and(toml::Value::is_table),
            "no [{section}] table in print-default\n{text}"
        );
    }
    let default_listen = table["listen"].as_str().expect("listen is a string");

    let port = free_port();
    let listen_line = format!("listen = \"{default_listen}\"");
    assert_eq!(
        text.matches(&listen_line).count(),
        1,
        "one `{listen_line}` line in print-default"
    );
    let file = scratch.path.join("allocwatch.toml");
    fs::write(
        &file,
        text.replace(&listen_line, &format!("listen = \"127.0.0.1:{port}\"")),
    )
    .expect("writing the config file");
    let mut agent = Agent::start_on(&env, port, &["agent", "--config", path_str(&file)]);
    agent.scrape().assert_conventions();
    agent.stop();

    let write = |name: &str, text: &str| {
        let path = scratch.path.join(name);
        fs::write(&path, text).expect("writing a config file");
        path
    };
    let unknown = write("unknown-key.toml", "top_kk = 3\n");
    let regex = write("bad-regex.toml", "[select]\ncomm = [\"(\"]\n");
    let ttl = write("bad-ttl.toml", "ttl = \"5 parsecs\"\n");
    let missing = scratch.path.join("missing.toml");
    let listen = format!("127.0.0.1:{}", free_port());
    // (args, what the line names, the cause it gives once, whether a pointer to the file's
    // line follows)
    let cases: [(Vec<&str>, &str, &str, bool); 5] = [
        (
            vec!["agent", "--config", path_str(&unknown), "--listen", &listen],
            "top_kk",
            "unknown field `top_kk`",
            true,
        ),
        (
            vec!["agent", "--config", path_str(&regex), "--listen", &listen],
            "line 2, key select.comm: [0]",
            "unclosed group",
            true,
        ),
        (
            vec!["agent", "--config", path_str(&ttl), "--listen", &listen],
            "key ttl",
            "unknown unit \" parsecs\"",
            true,
        ),
        (
            vec!["agent", "--config", path_str(&missing), "--listen", &listen],
            "missing.toml",
            "No such file or directory",
            false,
        ),
        (
            vec!["agent", "--exclude-comm", "[", "--listen", &listen],
            "'--exclude-comm <REGEX>'",
            "unclosed character class",
            false,
        ),
    ];
    let mut failures = Vec::new();
    for (args, names, cause, pointer) in &cases {
        if let Err(e) = panic::catch_unwind(AssertUnwindSafe(|| {
            let line = if *pointer {
                assert_config_error(&env, args)
            } else {
                assert_single_error(&env, args)
            };
            assert!(
                line.contains(names),
                "the error line does not name {names:?}: {line:?}"
            );
            assert_eq!(
                line.matches(cause).count(),
                1,
                "the error line should say {cause:?} once: {line:?}"
            );
        })) {
            failures.push(format!(
                "`allocwatch {}`: {}",
                args.join(" "),
                panic_text(&*e)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} bad-config case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A listen address already in use: one error line on stderr, exit 1, no backtrace, nothing left
/// in the kernel. An address that does not parse is refused while parsing, in one line naming
/// the flag (exit 1).
#[test]
fn taken_port_is_one_error_line() {
    let env = TestEnv::get();
    let _serial = serial();
    let before = KernelState::snapshot();
    let taken = TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let addr = taken.local_addr().expect("local address").to_string();
    let line = assert_single_error(&env, &["agent", "--listen", &addr]);
    assert!(
        line.contains(&format!("cannot listen on {addr}")) && line.contains("in use"),
        "error line for a taken port: {line:?}"
    );
    drop(taken);
    KernelState::snapshot().assert_nothing_added(&before);

    let out = Command::new(&env.bin)
        .args(["agent", "--listen", "nowhere"])
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .output()
        .expect("running allocwatch");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "--listen nowhere\n{stderr}");
    assert_eq!(
        stderr,
        "allocwatch: error: invalid value 'nowhere' for '--listen <HOST:PORT>': \"nowhere\" has \
         no port: expected HOST:PORT, e.g. 0.0.0.0:9464 or localhost:9464\n"
    );
}

/// The password of [`WEB_CONFIG_HASH`].
const WEB_CONFIG_PASSWORD: &str = "scrape-me";
/// bcrypt of [`WEB_CONFIG_PASSWORD`] (cost 5) by libxcrypt (Python's `crypt` module), not by
/// the agent's bcrypt crate.
const WEB_CONFIG_HASH: &str = "$2b$05$zYvO34dNduiXP3OnpmPG7uQofgkvng/wjthj9q0lto8sXAARctPIe";

/// TLS with client certificates and basic auth from an exporter-toolkit web config
/// (`--web-config`), scraped as Prometheus would: curl with the test CA, a client certificate
/// and the password (certificates made by openssl). Exact fixture counts come through; a
/// client without the password, without a certificate, or speaking plain HTTP gets nothing.
/// A bad web config is one error line before anything is attached.
#[test]
fn tls_client_certificates_and_basic_auth() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("tls");
    let dir = &scratch.path;
    openssl_pki(dir);
    let web = dir.join("web.yml");
    fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  \
             client_ca_file: ca.pem\n  client_auth_type: RequireAndVerifyClientCert\n\
             basic_auth_users:\n  prometheus: '{WEB_CONFIG_HASH}'\n"
        ),
    )
    .expect("writing the web config");

    let before = KernelState::snapshot();
    let bad = dir.join("bad.yml");
    fs::write(
        &bad,
        "tls_server_config:\n  cert_file: missing.pem\n  key_file: server.key\n",
    )
    .expect("writing a web config");
    let listen = format!("127.0.0.1:{}", free_port());
    let line = assert_single_error(
        &env,
        &["agent", "--listen", &listen, "--web-config", path_str(&bad)],
    );
    let missing = dir.join("missing.pem");
    assert!(
        line.contains("bad.yml: tls_server_config.cert_file")
            && line.contains(path_str(&missing))
            && line.contains("No such file"),
        "error line for a missing certificate: {line:?}"
    );
    KernelState::snapshot().assert_nothing_added(&before);

    let fixture = scratch.copy(&env.fixture, "libc_fixture");
    let id = Identity::of(&fixture);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["agent", "--listen", &listen, "--web-config", path_str(&web)];
    let mut cmd = Command::new(&env.bin);
    cmd.args(args);
    let mut agent = Agent::spawn(cmd, port, &args.join(" "));
    let user = format!("prometheus:{WEB_CONFIG_PASSWORD}");
    let trusted = ["--cert", "client.pem", "--key", "client.key", "-u", &user];
    agent.wait_ready_with(|port| curl(dir, port, "/healthz", &trusted));
    assert!(
        agent
            .stderr
            .text()
            .contains("TLS on, client certificates required, basic auth (1 user)"),
        "no web config line on stderr:\n{}",
        agent.stderr.text()
    );

    let status = run_fixture(&fixture, "run");
    assert!(status.success(), "libc_fixture run failed: {status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let (code, body) = curl(dir, port, "/metrics", &trusted).expect("scrape over TLS");
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        let m = Metrics::parse(String::from_utf8(body).expect("/metrics is UTF-8"));
        if m.has(&id, "allocwatch_free_calls_total") {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "no series of {id} over TLS within 10 s"
        );
        thread::sleep(Duration::from_millis(200));
    };
    check_fixture_totals(&m, &id, &env.alias_groups);
    m.assert_conventions();

    let wrong = "prometheus:wrong".to_owned();
    for (what, args) in [
        (
            "no password",
            vec!["--cert", "client.pem", "--key", "client.key"],
        ),
        (
            "a wrong password",
            vec!["--cert", "client.pem", "--key", "client.key", "-u", &wrong],
        ),
    ] {
        let (code, _) = curl(dir, port, "/healthz", &args).expect(what);
        assert_eq!(code, 401, "{what}");
    }
    let err = curl(dir, port, "/metrics", &["-u", &user])
        .expect_err("no client certificate must get no HTTP answer");
    assert!(err.to_string().contains("certificate required"), "{err}");
    let plain = try_get(port, "/healthz");
    assert!(
        plain.is_err(),
        "plain HTTP answered: {:?}",
        plain.map(|r| r.status)
    );
    agent.stop();
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate (openssl, P-256) in `dir`:
/// `ca.pem`, `server.{pem,key}`, `client.{pem,key}`.
fn openssl_pki(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("running openssl");
        assert!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &key,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
            &["-subj", "/CN=allocwatch test CA"],
        ]
        .concat(),
    );
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        fs::write(dir.join(format!("{name}.ext")), ext).expect("writing an extension file");
        let (k, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        let subj = format!("/CN={name}");
        openssl(
            &[
                &["req"][..],
                &key,
                &["-keyout", &k, "-out", &csr, "-subj", &subj],
            ]
            .concat(),
        );
        let ext = format!("{name}.ext");
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
    }
}

/// `curl` over TLS with the test CA (run in `dir`, so its file names resolve): the HTTP status
/// and body, or an error saying how curl failed when there was no HTTP answer.
fn curl(dir: &Path, port: u16, path: &str, args: &[&str]) -> std::io::Result<(u16, Vec<u8>)> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "--cacert",
            "ca.pem",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .current_dir(dir)
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "curl exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut body = out.stdout;
    let split = body
        .iter()
        .rposition(|&b| b == b'\n')
        .ok_or_else(|| std::io::Error::other("no status from curl"))?;
    let code = String::from_utf8_lossy(&body[split + 1..])
        .trim()
        .parse()
        .map_err(|_| std::io::Error::other("bad status from curl"))?;
    body.truncate(split);
    Ok((code, body))
}

/// A config file's error: exit 1, the one-line error, then the file's line with a caret under
/// the offending part (`  |`, `N | text`, `  | ^^^`). Returns the first line.
fn assert_config_error(env: &TestEnv, args: &[&str]) -> String {
    let out = Command::new(&env.bin)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .output()
        .expect("running allocwatch");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "`allocwatch {}`\n{stderr}",
        args.join(" ")
    );
    assert_no_crash(&stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 4
            && lines[0].starts_with("allocwatch: error: config file ")
            && lines[1].trim_end().ends_with(" |")
            && lines[2].contains(" | ")
            && lines[3].trim_end().ends_with('^'),
        "an error line and a pointer to the file's line:\n{stderr}"
    );
    lines[0].to_owned()
}

/// With exactly the capabilities the DaemonSet grants (deploy/kustomize/base/daemonset.yaml),
/// as root and with no_new_privs as there, the agent starts, then drops to user 65532 with only
/// the steady state's capabilities in every thread, and still works: it counts a C fixture
/// exactly and attaches to a Go program it sees after the drop (new uprobes on a new file),
/// whose map growth it counts exactly.
#[test]
fn runs_with_exactly_the_daemonset_capabilities() {
    let env = TestEnv::get();
    let _serial = serial();
    let granted = daemonset_capabilities();
    let caps = setpriv_caps(&granted);
    let scratch = Scratch::new("caps");
    let fixture = scratch.copy(&env.fixture, "libc_fixture");
    let id = Identity::of(&fixture);
    let build = go_builds().pop().expect("a Go build");
    let go = scratch.copy(&build.path, &build.name);
    let go_warm = scratch.path.join(format!("warm-{}", build.version));
    fs::hard_link(&go, &go_warm).expect("hard link of the Go fixture");

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // Only this test's programs are kept: on a machine busy compiling, the call-site table of
    // an agent that keeps every process fills up (site_map_full), which is not what this tests.
    let exe = format!("^{}/", scratch.path.display());
    let args = ["agent", "--listen", &listen, "--exe", &exe];
    if perf_events_need_sys_admin() {
        // Debian's and Ubuntu's perf_event_paranoid above 2 without uprobe multi-links: every
        // probe would be a perf event, refused without CAP_SYS_ADMIN. One line, exit 1.
        let out = setpriv(&env, &caps, &args)
            .stdin(Stdio::null())
            .output()
            .expect("setpriv");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("allocwatch: warning: "))
            .collect();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            lines.len() == 1
                && lines[0].starts_with(ERROR_PREFIX)
                && lines[0].contains("perf_event_paranoid"),
            "{stderr}"
        );
        return;
    }
    let mut agent = Agent::spawn(
        setpriv(&env, &caps, &args),
        port,
        &format!("(setpriv {caps}) {}", args.join(" ")),
    );
    agent.wait_ready();
    // Printed before the serving line, which wait_ready waited for.
    let stderr = agent.stderr.text();
    // Without uprobe multi-links (Linux < 6.6) the agent keeps its privileges, and says so:
    // there only its counts are checked.
    let kept_all = stderr.contains("the agent keeps the privileges it starts with");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("allocwatch: running as user 65532"))
        .map(str::to_owned);
    assert!(
        kept_all != line.is_some(),
        "one line about the privileges, dropped or kept:\n{stderr}"
    );
    // Under load the first scrapes can find no rendered metrics yet (500, "still starting"):
    // a startup matter of its own, not this test's.
    let deadline = Instant::now() + Duration::from_secs(30);
    while try_get(agent.port, "/metrics").map(|r| r.status).ok() != Some(200) {
        assert!(
            Instant::now() < deadline,
            "no /metrics within 30 s of /healthz"
        );
        thread::sleep(Duration::from_millis(100));
    }
    if let Some(line) = line {
        assert_dropped(&agent, &line);
    }
    run_wait_run_fixture(&agent, &fixture, &id, &env.alias_groups);

    // A Go program seen after the drop: its file gets uprobes of its own now. A hard link
    // (same inode) stopped right after exec is attached first; the measured run follows.
    attach_go_file(&agent, &go_warm);
    let go_id = Identity::of(&go);
    let out = Command::new(&go)
        .arg("map_big")
        .stdin(Stdio::null())
        .output()
        .expect("the Go fixture");
    assert!(out.status.success(), "{}: {}", go.display(), out.status);
    assert_map_big_growth(&agent, &go_id, &build, "counted by the unprivileged agent");
    agent.stop();
}

/// Whether this kernel refuses the agent's probes without CAP_SYS_ADMIN: a
/// `kernel.perf_event_paranoid` above 2 (Debian's and Ubuntu's own levels) and no uprobe
/// multi-links (Linux < 6.6, or `ALLOCWATCH_NO_UPROBE_MULTI`), so every probe is a perf event.
fn perf_events_need_sys_admin() -> bool {
    let paranoid: i32 = fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(2);
    let multi = kernel_version() >= (6, 6) && env::var_os("ALLOCWATCH_NO_UPROBE_MULTI").is_none();
    paranoid > 2 && !multi
}

/// Every thread of `agent` runs as 65532 with only the steady state's capabilities, as its
/// `line` says.
fn assert_dropped(agent: &Agent, line: &str) {
    let keep = steady_state_capabilities();
    let pid = agent.child.id();
    let tasks: Vec<String> = fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the agent's tasks")
        .map(|e| e.expect("task").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(tasks.len() >= 3, "the agent's threads: {tasks:?}");
    // The process (its main thread, what `ps` and /proc/<pid>/status show) and every thread.
    for status_path in std::iter::once(format!("/proc/{pid}/status"))
        .chain(tasks.iter().map(|t| format!("/proc/{pid}/task/{t}/status")))
    {
        let status = fs::read_to_string(&status_path).expect("the agent's status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:\t")))
                .unwrap_or_else(|| panic!("no {name} in {status_path}:\n{status}"))
        };
        assert_eq!(
            (field("Uid"), field("Gid"), field("Groups").trim()),
            (
                "65532\t65532\t65532\t65532",
                "65532\t65532\t65532\t65532",
                ""
            ),
            "{status_path}: user, group and groups after startup\n{status}"
        );
        assert_eq!(
            (
                status_mask(&status, "CapPrm"),
                status_mask(&status, "CapEff"),
                status_mask(&status, "CapBnd")
            ),
            (keep, keep, keep),
            "{status_path}: permitted/effective/bounding capabilities after startup (want \
             {keep:#x})\n{status}"
        );
        assert_eq!(
            (
                status_mask(&status, "CapInh"),
                status_mask(&status, "CapAmb")
            ),
            (0, 0),
            "{status_path}\n{status}"
        );
        assert_eq!(field("NoNewPrivs"), "1", "{status_path}\n{status}");
    }
    let kept = if keep == 1 << 19 {
        "CAP_SYS_PTRACE in all"
    } else {
        "CAP_SYS_PTRACE"
    };
    assert!(line.contains(kept), "{line}");
}

/// A Go program that has run and exited before the agent reads its exec (an agent behind on a
/// busy node; here held with SIGSTOP while the program runs) keeps its map growth: it is
/// registered from its records with its file's Go state, and every growth it recorded is
/// counted (it was dropped before: found under load, `runs_with_exactly_the_daemonset_capabilities`).
#[test]
fn go_program_gone_before_its_exec_is_read_keeps_its_growth() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("gonebefore");
    let build = go_builds().pop().expect("a Go build");
    let go = scratch.copy(&build.path, &build.name);
    let go_warm = scratch.path.join(format!("warm-{}", build.version));
    fs::hard_link(&go, &go_warm).expect("hard link of the Go fixture");
    let exe = format!("^{}/", scratch.path.display());
    let mut agent = Agent::start(&env, &["--exe", &exe]);
    // Its file attached first (see runs_with_exactly_the_daemonset_capabilities).
    attach_go_file(&agent, &go_warm);
    let go_id = Identity::of(&go);
    let agent_pid = agent.child.id();
    signal(agent_pid, libc::SIGSTOP);
    let out = Command::new(&go)
        .arg("map_big")
        .stdin(Stdio::null())
        .output();
    signal(agent_pid, libc::SIGCONT);
    let out = out.expect("the Go fixture");
    assert!(out.status.success(), "{}: {}", go.display(), out.status);
    assert_map_big_growth(
        &agent,
        &go_id,
        &build,
        "of a program gone before the agent read its exec",
    );
    agent.stop();
}

/// Without one of the capabilities the agent needs (the DaemonSet's list minus one), it refuses
/// to start: one error line naming the capability, exit status 1, nothing loaded. Without
/// CAP_SYS_RESOURCE, needed only before Linux 5.11, and CAP_SYS_NICE, optional (a warning), it
/// starts here.
#[test]
fn a_missing_capability_is_one_error_line() {
    let env = TestEnv::get();
    let _serial = serial();
    let granted = daemonset_capabilities();
    let before = KernelState::snapshot();
    for (missing, _) in &granted {
        let rest: Vec<(String, u32)> = granted
            .iter()
            .filter(|(n, _)| n != missing)
            .cloned()
            .collect();
        let caps = setpriv_caps(&rest);
        if missing == "SYS_RESOURCE" || missing == "SYS_NICE" {
            continue; // optional here: started below
        }
        let listen = format!("127.0.0.1:{}", free_port());
        let out = setpriv(&env, &caps, &["agent", "--listen", &listen])
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .output()
            .expect("setpriv");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "without CAP_{missing}:\n{stderr}"
        );
        assert_no_crash(&stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "without CAP_{missing}: one line\n{stderr}");
        assert!(
            lines[0].starts_with("allocwatch: error: ")
                && lines[0].contains(&format!("CAP_{missing}")),
            "without CAP_{missing}: the line must name it: {}",
            lines[0]
        );
    }
    KernelState::snapshot().assert_nothing_added(&before);

    let rest: Vec<(String, u32)> = granted
        .iter()
        .filter(|(n, _)| n != "SYS_RESOURCE" && n != "SYS_NICE")
        .cloned()
        .collect();
    let caps = setpriv_caps(&rest);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut agent = Agent::spawn(
        setpriv(&env, &caps, &["agent", "--listen", &listen]),
        port,
        &format!("(setpriv {caps}) agent --listen {listen}"),
    );
    agent.wait_ready();
    agent.stop();
}

/// `--keep-privileges`: the agent keeps the user and capabilities it started with (the opt-out).
#[test]
fn keep_privileges_keeps_root_and_the_capabilities() {
    let env = TestEnv::get();
    let _serial = serial();
    let granted = daemonset_capabilities();
    let caps = setpriv_caps(&granted);
    let own_bounding = own_status_mask("CapBnd");
    let mask: u64 = granted
        .iter()
        .map(|(_, bit)| 1u64 << bit)
        .filter(|b| own_bounding & b != 0)
        .sum();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut agent = Agent::spawn(
        setpriv(
            &env,
            &caps,
            &["agent", "--keep-privileges", "--listen", &listen],
        ),
        port,
        &format!("(setpriv {caps}) agent --keep-privileges --listen {listen}"),
    );
    agent.wait_ready();
    let pid = agent.child.id();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's status");
    assert!(status.lines().any(|l| l == "Uid:\t0\t0\t0\t0"), "{status}");
    assert_eq!(
        (
            status_mask(&status, "CapEff"),
            status_mask(&status, "CapPrm"),
            status_mask(&status, "CapBnd")
        ),
        (mask, mask, mask),
        "the agent's effective/permitted/bounding capabilities (want {caps})\n{status}"
    );
    assert!(
        !agent.stderr.text().contains("running as user"),
        "{}",
        agent.stderr.text()
    );
    agent.stop();
}

/// A process the agent saw before it called `exec` (here a copy of dash waiting on stdin, then
/// `exec libc_fixture run`; in a cluster, every container starts as `runc init` and execs its
/// entrypoint) must afterwards be exported under its new identity.
#[test]
fn exec_after_discovery_takes_the_new_identity() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("exec");
    let fixture = scratch.copy(&env.fixture, "libc_fixture");
    let shell = scratch.copy(Path::new("/usr/bin/dash"), "aw-exec-shell");
    let (fx_id, sh_id) = (Identity::of(&fixture), Identity::of(&shell));
    let mut agent = Agent::start(&env, &[]);

    let started = Instant::now();
    let mut child = Command::new(&shell)
        .args(["-c", "read x; exec \"$0\" run"])
        .arg(&fixture)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", shell.display()));
    let mut stdin: ChildStdin = child.stdin.take().expect("stdin");
    agent.wait_for_identity(&sh_id, started);
    stdin.write_all(b"go\n").expect("writing to the shell");
    drop(stdin);
    let status = wait_child(&mut child, Duration::from_secs(10)).expect("shell + fixture exit");
    assert!(status.success(), "exec'd fixture failed: {status}");
    let found = agent.try_scrape_until(Duration::from_secs(5), |m| {
        m.has(&fx_id, "allocwatch_free_calls_total")
    });
    let m = agent.scrape();
    agent.stop();
    assert!(
        found.is_some(),
        "no series with the exec'd program's identity {fx_id}: its calls stayed under the \
         identity the process had before exec.\nseries of the shell identity {sh_id}:\n{}",
        m.core_lines_of(&sh_id)
    );
    // The shell's own allocations before exec share the pid: the fixture's numbers are a floor.
    let m = found.expect("checked");
    let free = m.value(&fx_id, "allocwatch_free_calls_total", &[]);
    assert!(
        free.is_some_and(|f| f >= 17.0),
        "allocwatch_free_calls_total of the exec'd fixture: {free:?}, want ≥ 17\n{}",
        m.lines_of(&fx_id)
    );
}

/// An include rule (`--comm`) selects a program that lives less than a millisecond: the kernel
/// records every new process from its first call and the agent drops the ones its selection
/// rejects, so `libc_fixture run` is counted exactly, while the same fixture under another name
/// (run over and over, and a copy allocating every millisecond all along) appears in no scrape.
#[test]
fn comm_selection_counts_a_short_lived_process_exactly() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("select");
    let selected = scratch.copy(&env.fixture, "aw_selected");
    let rejected = scratch.copy(&env.fixture, "aw_rejected");
    let id = Identity::of(&selected);
    let mut agent = Agent::start(&env, &["--comm", "^aw_selected$"]);

    let looping = Fixture::spawn(&rejected, "loop", "loop");
    let stop = Arc::new(AtomicBool::new(false));
    let runs = thread::spawn({
        let (stop, rejected) = (stop.clone(), rejected.clone());
        move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let status = run_fixture(&rejected, "run");
                assert!(status.success(), "rejected fixture run failed: {status}");
                n += 1;
                thread::sleep(Duration::from_millis(5));
            }
            n
        }
    });
    let started = Instant::now();
    let mut ran = false;
    let mut scrapes = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let m = agent.scrape();
        scrapes += 1;
        let foreign = m.foreign_lines(&id.comm);
        assert!(
            foreign.is_empty(),
            "scrape {scrapes} ({:.2?} in) exports processes the selection rejects:
{foreign}",
            started.elapsed()
        );
        if !ran && started.elapsed() > Duration::from_secs(1) {
            let status = run_fixture(&selected, "run");
            assert!(status.success(), "selected fixture run failed: {status}");
            ran = true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let rejected_runs = runs.join().expect("the rejected runs");
    drop(looping);
    assert!(rejected_runs > 10, "only {rejected_runs} rejected runs");
    let m = agent.scrape_until(
        "the selected fixture's counts",
        Duration::from_secs(10),
        |m| m.value(&id, "allocwatch_free_calls_total", &[]) == Some(17.0),
    );
    check_fixture_totals(&m, &id, &env.alias_groups);
    let foreign = m.foreign_lines(&id.comm);
    assert!(
        foreign.is_empty(),
        "the last scrape exports processes the selection rejects:\n{foreign}"
    );
    m.assert_conventions();
    agent.stop();
}

/// A rejected program (a shell, denied in the kernel once classified) that execs a selected one
/// (`exec libc_fixture run`): the probe clears the denial at exec, so the program it became is
/// counted exactly from its first call, and nothing of the shell is exported.
#[test]
fn rejected_process_that_execs_a_selected_program_is_counted_exactly() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("selexec");
    let fixture = scratch.copy(&env.fixture, "aw_selected");
    let shell = scratch.copy(Path::new("/usr/bin/dash"), "aw-sel-shell");
    let id = Identity::of(&fixture);
    // With the registry's debug log: this test failed twice in many runs (the exec'd program
    // registered with no counts), cause not found; the log of its pid is printed if it fails.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "agent",
        "--listen",
        &listen,
        "--sample-bytes",
        "0",
        "--comm",
        "^aw_selected$",
    ];
    let mut cmd = Command::new(env.bin());
    cmd.args(args).env("RUST_LOG", "allocwatch::daemon=debug");
    let mut agent = Agent::spawn(cmd, port, &args.join(" "));
    agent.wait_ready();

    let mut child = Command::new(&shell)
        .args(["-c", "read x; exec \"$0\" run"])
        .arg(&fixture)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", shell.display()));
    let mut stdin: ChildStdin = child.stdin.take().expect("stdin");
    // Classified (scans every 500 ms) and denied, and what it recorded deleted, by then.
    thread::sleep(Duration::from_millis(1500));
    stdin.write_all(b"go\n").expect("writing to the shell");
    drop(stdin);
    let pid = child.id();
    let status = wait_child(&mut child, Duration::from_secs(10)).expect("shell + fixture exit");
    assert!(status.success(), "exec'd fixture failed: {status}");
    let m = agent
        .try_scrape_until(Duration::from_secs(10), |m| {
            m.value(&id, "allocwatch_free_calls_total", &[])
                .is_some_and(|f| f >= 17.0)
        })
        .unwrap_or_else(|| {
            let m = agent.scrape();
            let text = agent.stderr.text();
            let about: Vec<&str> = text
                .lines()
                .filter(|l| {
                    l.contains(&format!("pid {pid}:"))
                        || l.contains(&format!("Pid({pid})"))
                        || !l.contains("debug")
                })
                .collect();
            panic!(
                "no counts of the exec'd fixture (pid {pid}) in /metrics within 10 s\n{}\n{}\n\
                 agent stderr about pid {pid}, and its other lines:\n{}",
                m.test_lines(),
                m.self_stats(),
                about.join("\n")
            )
        });
    check_fixture_totals(&m, &id, &env.alias_groups);
    let foreign = m.foreign_lines(&id.comm);
    assert!(
        foreign.is_empty(),
        "exports processes the selection rejects:\n{foreign}"
    );
    agent.stop();
}

/// Call sites are named after the fixture's functions (`site="fx_malloc <- fx_work"`, the
/// innermost two frames; `free` has no site series), with the exact numbers of each, both for
/// two processes found by the scan and for one that lived less than a millisecond and was gone
/// before the first scrape. The two found by the scan run one program (one identity) at two
/// address-space layouts: each site is one series, with the sum of both.
#[test]
fn sites_are_named_after_the_fixture_functions() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("sites");
    let scanned = scratch.copy(&env.fixture, "libc_fixture");
    let short = scratch.copy(&env.fixture, "short_fixture");
    let (scanned_id, short_id) = (Identity::of(&scanned), Identity::of(&short));
    let mut agent = Agent::start(&env, &[]);

    let mut fxs = [
        Fixture::spawn(&scanned, "wait-run", "ready"),
        Fixture::spawn(&scanned, "wait-run", "ready"),
    ];
    agent.wait_for_identity(&scanned_id, fxs[0].started);
    agent.scrape_until("both processes found", DISCOVERY_LIMIT, |m| {
        m.value(&scanned_id, "allocwatch_processes", &[]) == Some(2.0)
    });
    for fx in &mut fxs {
        signal(fx.pid, libc::SIGUSR1);
        let status = fx.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "fixture wait-run failed: {status}");
    }
    let status = run_fixture(&short, "run");
    assert!(status.success(), "fixture run failed: {status}");
    // The short-lived process may be exported without its exe label (a bug of its own, see
    // exact_counters_over_http): its comm is unique to this test, so take it either way.
    let short_no_exe = Identity {
        comm: short_id.comm.clone(),
        exe: String::new(),
    };
    // Final counts, and every site named (one not named yet is left out for a few scrapes).
    let done = |m: &Metrics, id: &Identity, runs: f64| {
        m.value(id, "allocwatch_free_calls_total", &[]) == Some(17.0 * runs) && m.sites_complete(id)
    };
    let m = agent
        .try_scrape_until(SITES_NAMED, |m| {
            done(m, &scanned_id, 2.0) && (done(m, &short_id, 1.0) || done(m, &short_no_exe, 1.0))
        })
        .unwrap_or_else(|| agent.scrape());
    let short_id = if done(&m, &short_id, 1.0) {
        short_id
    } else {
        short_no_exe
    };
    let stats = m.self_stats();
    agent.stop();

    let mut failures = Vec::new();
    for (what, id, runs) in [
        ("found by scan, two processes", &scanned_id, 2),
        ("short-lived", &short_id, 1),
    ] {
        let want: BTreeMap<(String, String), (u64, u64)> = SITES
            .iter()
            .filter(|s| s.api != "free")
            .map(|s| {
                let api = canonical(&env.alias_groups, &m, id, s.api);
                (
                    (api, format!("{} <- fx_work", s.function)),
                    (s.calls * runs, s.bytes * runs),
                )
            })
            .collect();
        let got: BTreeMap<(String, String), (u64, u64)> = m
            .sites(id)
            .into_iter()
            .filter(|(_, v)| v.calls > 0 || v.bytes > 0)
            .map(|(k, v)| (k, (v.calls, v.bytes)))
            .collect();
        if got != want {
            let show = |s: &BTreeMap<(String, String), (u64, u64)>| {
                s.iter()
                    .map(|((api, site), (c, b))| format!("  {api:<15} {site:<32} {c:>3} {b:>5}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            failures.push(format!(
                "[{what}] site series (api, site, calls, bytes):\n{}\nwant:\n{}",
                show(&got),
                show(&want)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n\nthe agent's own counters: {stats}",
        failures.join("\n\n")
    );
}

/// `--unwind auto` on the node: a malloc made five calls deep in code
/// built -fomit-frame-pointer, through a library built the same way (the fixture of
/// unwind.rs), is in the agent's heap profile with every frame of its chain (a frame-pointer
/// walk loses them past the first: the fixture points rbp at a fake frame), and its site
/// series is named after the innermost two.
#[test]
fn agent_walks_stacks_with_unwind_tables() {
    const BYTES: u64 = 5151;
    const CHAIN: [&str; 5] = [
        "fx_uw_leaf",
        "fx_uw_callback",
        "fx_uw_lib_inner",
        "fx_uw_lib_outer",
        "fx_uw_outer",
    ];
    let env = TestEnv::get();
    let _serial = serial();
    let go = newest_go_toolchain();
    let scratch = Scratch::new("unwind");
    let fixture = PathBuf::from(env::var_os("ALLOCWATCH_FIXTURES").expect("ALLOCWATCH_FIXTURES"))
        .join("unwind/nofp/unwind_fixture");
    let id = Identity::of(&fixture);
    let gofile = scratch.path.join("go");
    // `auto`: the fixture and its library are built without frame
    // pointers, so they get tables.
    let mut agent = Agent::start(
        &env,
        &["--pprof", "--unwind", "auto", "--sample-bytes", "0"],
    );
    let mut fx = Fixture::spawn_quiet(&fixture, &[path_str(&gofile)]);
    // The library is the fixture's alone: its table's line comes once the fixture's mappings
    // with it are in the probe (the agent's table thread says it after setting them).
    let lib = fs::canonicalize(fixture.with_file_name("libunwfix.so")).expect("libunwfix.so");
    agent.stderr.wait_for(
        &format!("allocwatch: unwind table of {}: ", lib.display()),
        // Behind the tables of every file on the machine at the agent's start (a compiler's
        // libLLVM takes seconds).
        Duration::from_secs(60),
    );
    fs::write(&gofile, b"").expect("writing the go file");
    let status = fx.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "unwind_fixture failed: {status}");

    let file = scratch.path.join("allocs.pb.gz");
    let space = alloc_space_until(&agent, &go, &file, fx.pid, |space| {
        space.flat(CHAIN[0]) == Some(BYTES)
    });
    let m = agent.scrape();
    agent.stop();
    assert_eq!(space.flat(CHAIN[0]), Some(BYTES), "{}", space.text);
    for f in CHAIN {
        assert_eq!(space.cum(f), Some(BYTES), "cum of {f}\n{}", space.text);
    }
    let site = m
        .sites(&id)
        .into_iter()
        .find(|((api, _), v)| api == "malloc" && v.bytes == BYTES);
    assert_eq!(
        site.map(|((_, site), _)| site).as_deref(),
        Some("fx_uw_leaf <- fx_uw_callback"),
        "{}",
        m.lines_of(&id)
    );
    assert!(
        m.global_sum("allocwatch_map_fill_ratio", &[("map", "UNWIND_ROWS")]) > 0.0,
        "the tables' fill is exported\n{}",
        m.self_stats()
    );
}

/// A library a registered process opens later (dlopen) gets its table on the agent's node:
/// the first call through it (cut at its first frame: no table yet, and its rbp holds no
/// frame) makes the table thread read the process's mappings again, and the next call is in
/// the heap profile with every frame of its chain.
#[test]
fn agent_loads_tables_for_a_library_opened_later() {
    const BYTES: u64 = 5151;
    const CHAIN: [&str; 5] = [
        "fx_uw_leaf",
        "fx_uw_callback",
        "fx_uw_dl_inner",
        "fx_uw_dl_outer",
        "fx_uw_outer_dl",
    ];
    let env = TestEnv::get();
    let _serial = serial();
    let go = newest_go_toolchain();
    let scratch = Scratch::new("unwind-dl");
    let fixture = PathBuf::from(env::var_os("ALLOCWATCH_FIXTURES").expect("ALLOCWATCH_FIXTURES"))
        .join("unwind/nofp/unwind_fixture");
    let gofile = scratch.path.join("go");
    let gofile2 = scratch.path.join("go2");
    let mut agent = Agent::start(
        &env,
        &["--pprof", "--unwind", "auto", "--sample-bytes", "0"],
    );
    let mut fx = Fixture::spawn_quiet(&fixture, &[path_str(&gofile), "dlopen", path_str(&gofile2)]);
    let lib = fs::canonicalize(fixture.with_file_name("libunwfix.so")).expect("libunwfix.so");
    agent.stderr.wait_for(
        &format!("allocwatch: unwind table of {}: ", lib.display()),
        Duration::from_secs(60),
    );
    fs::write(&gofile, b"").expect("writing the go file");
    let dl = fs::canonicalize(fixture.with_file_name("libunwdl.so")).expect("libunwdl.so");
    agent.stderr.wait_for(
        &format!("allocwatch: unwind table of {}: ", dl.display()),
        Duration::from_secs(30),
    );
    fs::write(&gofile2, b"").expect("writing the second go file");
    let status = fx.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "unwind_fixture failed: {status}");

    let file = scratch.path.join("allocs.pb.gz");
    let space = alloc_space_until(&agent, &go, &file, fx.pid, |space| {
        space.cum(CHAIN[4]) == Some(BYTES)
    });
    agent.stop();
    // Both calls: the first one's stack is cut in the library.
    assert_eq!(space.flat(CHAIN[0]), Some(2 * BYTES), "{}", space.text);
    for f in &CHAIN[3..] {
        assert_eq!(space.cum(f), Some(BYTES), "cum of {f}\n{}", space.text);
    }
}

/// Go growth and GC of the newest Go (swiss maps) and the newest old-map build, `map_big ints
/// gc repeat`: map grows by kind and their bytes equal what `allocwatch top --json` reports for
/// the same binary (deterministic for this fixture: fillMapBig's 14 doublings on old maps, 6
/// table grows then 127 splits on swiss maps, and `repeat`'s 2,000 identical small maps), slice
/// grows at least the capacities the fixture saw plus `repeat`'s, GC cycles = the fixture's
/// NumGC, two stop-the-world pauses per cycle. `repeat` repeats the same growths 2,000 times:
/// most of them reach the agent as kernel counts (`GO_AGG`), not records.
///
/// Go programs are found by the /proc scan only (they do not call libc), and their probes are
/// attached per file: a run that ends before the next scan (≈ 0.15 s here) is not traced at
/// all. So the test first starts a *hard link* of each build (same inode, other name, so other
/// identity labels), stopped right after exec, until the agent attached it; the measured run is
/// then traced from its first instruction.
#[test]
fn go_growth_matches_top() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("go");
    let builds = go_builds();
    let modes = ["map_big", "ints", "gc", "repeat"];
    struct Run {
        build: GoBuild,
        path: PathBuf,
        warm: PathBuf,
        reference: Value,
    }
    // The reference first, with no agent running.
    let runs: Vec<Run> = builds
        .into_iter()
        .map(|build| {
            let path = scratch.copy(&build.path, &build.name);
            let warm = scratch.path.join(format!("warm-{}", build.version));
            fs::hard_link(&path, &warm).expect("hard link of the fixture");
            let reference = top_json(&env, &scratch, &path, &modes);
            Run {
                build,
                path,
                warm,
                reference,
            }
        })
        .collect();

    let mut agent = Agent::start(&env, &[]);
    // Stopped right after exec: the scan finds them and attaches to their file, and they burn no
    // CPU meanwhile (SIGKILL ends them stopped).
    let warmers: Vec<Fixture> = runs
        .iter()
        .map(|r| {
            let w = Fixture::spawn_quiet(&r.warm, &["gc"; 2000]);
            signal(w.pid, libc::SIGSTOP);
            w
        })
        .collect();
    for (r, w) in runs.iter().zip(&warmers) {
        let id = Identity::of(&r.warm);
        let (found, _) = agent.discover(&id, "allocwatch_go_info", w.started);
        eprintln!(
            "{}: Go probes attached ({id} has allocwatch_go_info) {found:.1?} after its start",
            r.build.name
        );
    }
    drop(warmers);

    let mut failures = Vec::new();
    for r in &runs {
        if let Err(e) = panic::catch_unwind(AssertUnwindSafe(|| {
            check_go_run(&agent, &r.path, &modes, &r.build, &r.reference);
        })) {
            failures.push(format!("=== {}\n{}", r.build.name, panic_text(&*e)));
        }
    }
    agent.stop();
    assert!(
        failures.is_empty(),
        "{} Go build(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Go maps read live by the agent (issue 13), on the newest swiss-map and old-map builds:
/// `bloat dedup` fills a map to 100,000 keys and keeps 1,000 (bloated: its gauges say 1,000
/// elements, more than 1 MiB held, under 1/8 full, `verdict="bloated"`), then a set grows for
/// 8 s (`verdict="growing"`), each under the site of its first growth; once the program has
/// exited its identity has no map series (an exited process holds no map).
#[test]
fn go_map_gauges_and_verdicts() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("gomaps");
    let mut agent = Agent::start(&env, &[]);
    let mut failures = Vec::new();
    for build in go_builds() {
        let path = scratch.copy(&build.path, &build.name);
        let warm = scratch.path.join(format!("warm-{}", build.version));
        fs::hard_link(&path, &warm).expect("hard link of the fixture");
        // Attached to the file before the measured run starts (see go_growth_matches_top).
        attach_go_file(&agent, &warm);
        let id = Identity::of(&path);
        let mut fx = Fixture::spawn_quiet(&path, &["bloat", "dedup"]);
        let site_of = |m: &Metrics, family: &str, function: &str| -> Vec<(String, f64)> {
            m.of(&id, family)
                .into_iter()
                .filter(|s| s.labels.get("site").is_some_and(|l| l.contains(function)))
                .map(|s| {
                    let verdict = s.labels.get("verdict").unwrap_or_default();
                    (verdict.to_owned(), value(s))
                })
                .collect()
        };
        // The bloated state lasts from the deletes to the exit (≈ 11 s), the growing one the
        // 8 s of the set's growth: watch the whole run.
        let (mut bloated, mut growing) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline
            && !(bloated.is_some() && growing.is_some())
            && fx.child.try_wait().ok().flatten().is_none()
        {
            let m = agent.scrape();
            let flagged = |f: &str, v: &str| {
                site_of(&m, "allocwatch_go_maps_flagged", f).contains(&(v.to_owned(), 1.0))
            };
            if bloated.is_none() && flagged("main.fillBloat", "bloated") {
                bloated = Some((
                    site_of(&m, "allocwatch_go_map_len", "main.fillBloat"),
                    site_of(&m, "allocwatch_go_map_bytes", "main.fillBloat"),
                    site_of(&m, "allocwatch_go_map_load_ratio", "main.fillBloat"),
                    m.lines_of(&id),
                ));
            }
            if growing.is_none() && flagged("main.fillDedup", "growing") {
                growing = Some(m.lines_of(&id));
            }
            thread::sleep(Duration::from_millis(250));
        }
        let status = fx.wait_exit(Duration::from_secs(60));
        let mut fail = |what: String| failures.push(format!("=== {}: {what}", build.name));
        if !status.success() {
            fail(format!("the fixture failed: {status}"));
        }
        match bloated {
            None => fail(format!(
                "no scrape had the fillBloat map flagged bloated\n{}",
                agent.scrape().lines_of(&id)
            )),
            Some((len, bytes, load, lines)) => {
                let one = |v: &[(String, f64)]| (v.len() == 1).then(|| v[0].1);
                let ok = one(&len) == Some(BLOAT_KEEP as f64)
                    && one(&bytes).is_some_and(|b| b > f64::from(1 << 20))
                    && one(&load).is_some_and(|l| l < 1.0 / 8.0);
                if !ok {
                    fail(format!(
                        "the bloated map: want len {BLOAT_KEEP}, > 1 MiB, load < 1/8\n{lines}"
                    ));
                }
            }
        }
        if growing.is_none() {
            fail("no scrape had the fillDedup set flagged growing".to_owned());
        }
        let gone = agent.scrape_until("the fixture's exit", Duration::from_secs(10), |m| {
            m.value(&id, "allocwatch_processes", &[]) == Some(0.0)
        });
        let left: Vec<String> = [
            "allocwatch_go_map_len",
            "allocwatch_go_map_bytes",
            "allocwatch_go_map_load_ratio",
            "allocwatch_go_maps_flagged",
        ]
        .iter()
        .filter(|f| !gone.of(&id, f).is_empty())
        .map(|f| (*f).to_owned())
        .collect();
        if !left.is_empty() {
            fail(format!("map series of an exited process: {left:?}"));
        }
    }
    agent.scrape().assert_conventions();
    let stderr = agent.stderr.text();
    agent.stop();
    let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
    assert!(
        failures.is_empty(),
        "{}\nagent stderr (last lines):\n{}",
        failures.join("\n\n"),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

/// The issue: new processes are picked up within one second. A Go program is found by the /proc
/// scan only; it must have its Go series (attached and labelled) within a second of its start.
#[test]
fn go_program_is_picked_up_within_one_second() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("gofind");
    let build = go_builds().pop().expect("a Go build");
    let path = scratch.copy(&build.path, &build.name);
    let id = Identity::of(&path);
    let mut agent = Agent::start(&env, &[]);
    let fx = Fixture::spawn_quiet(&path, &["gc"; 2000]);
    let (found, last_miss) = agent.discover(&id, "allocwatch_go_info", fx.started);
    eprintln!("{id}: allocwatch_go_info found by a scrape started {found:.2?} after its start");
    drop(fx);
    agent.stop();
    assert!(
        last_miss.is_none_or(|t| t < DISCOVERY_LIMIT),
        "a scrape started {:.2?} after the Go program started still had no allocwatch_go_info \
         for it (found at {found:.2?}); the issue asks for new processes within one second",
        last_miss.unwrap_or_default()
    );
}

/// The Go probes' capture specs are a table of fixed size and a node starts new Go programs for
/// as long as the agent lives: the probes of a Go program no process runs any more are
/// detached to make room for a new one's. With the table as large as one program's probes
/// (`ALLOCWATCH_DEBUG_GO_SPECS`, a test hook), two copies of the newest build (two files), run
/// one after the other, are both traced exactly (as `top` counts them). Before, the second
/// was not traced at all (`too many Go functions`, about 85 Go 1.27 programs into an agent's
/// life at the default size).
#[test]
fn go_programs_that_exited_make_room_for_new_ones() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("goroom");
    let build = go_builds().pop().expect("a Go build");
    let modes = ["map_big", "ints", "gc"];
    let paths = [
        scratch.copy(&build.path, "goroom-one"),
        scratch.copy(&build.path, "goroom-two"),
    ];
    let reference = top_json(&env, &scratch, &paths[0], &modes);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // Only this test's programs: a Go toolchain run elsewhere on the machine takes no room.
    let only = format!("^{}/", scratch.path.display());
    let args = [
        "agent",
        "--listen",
        &listen,
        "--sample-bytes",
        "0",
        "--exe",
        &only,
        "--log-level",
        "info",
    ];
    let mut cmd = Command::new(&env.bin);
    // The agent's probes of a Go 1.27 program take 12 specs: one program fits, two do not.
    cmd.args(args).env("ALLOCWATCH_DEBUG_GO_SPECS", "20");
    let mut agent = Agent::spawn(cmd, port, &args.join(" "));
    agent.wait_ready();
    for (i, path) in paths.iter().enumerate() {
        // Attached before the run (stopped at its start, as in `go_growth_matches_top`), so
        // that the run is traced from its first instruction.
        let warm = scratch.path.join(format!("goroom-warm{i}"));
        fs::hard_link(path, &warm).expect("hard link of the fixture");
        attach_go_file(&agent, &warm);
        check_go_run(&agent, path, &modes, &build, &reference);
    }
    let stderr = agent.stderr.text();
    agent.stop();
    assert!(
        stderr.contains("detached the Go probes of file"),
        "the first program's probes made room for the second's\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the tests

/// Per-API counters, free calls and the size histogram of one `libc_fixture run`.
/// `id`'s site series (`other` included) summed per API equal the fixture's totals (calls,
/// bytes; `free` is no allocation and has no site series).
fn check_site_sums(m: &Metrics, id: &Identity, groups: &[Vec<String>]) {
    let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for &(api, calls, bytes) in API_TOTALS.iter().filter(|a| a.0 != "free") {
        let e = want.entry(canonical(groups, m, id, api)).or_default();
        e.0 += calls;
        e.1 += bytes;
    }
    let mut got: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for ((api, _), v) in m.sites(id) {
        let e = got.entry(api).or_default();
        e.0 += v.calls;
        e.1 += v.bytes;
    }
    assert_eq!(
        got,
        want,
        "Σ over site of allocwatch_site_alloc_{{calls,bytes}}_total per api (calls, bytes) \
         vs the fixture's totals\n{}",
        m.lines_of(id)
    );
}

fn check_fixture_totals(m: &Metrics, id: &Identity, groups: &[Vec<String>]) {
    check_fixture_calls(m, id, groups);
    // One observation per allocation call, of its requested size.
    let allocs = API_TOTALS.iter().filter(|a| a.0 != "free");
    let (calls, bytes) = allocs.fold((0, 0), |(c, b), a| (c + a.1, b + a.2));
    let h = m.histogram(id, "allocwatch_alloc_size_bytes");
    assert_eq!(
        (h.count, h.sum),
        (calls as f64, bytes as f64),
        "allocwatch_alloc_size_bytes count and sum\n{}",
        m.lines_of(id)
    );
}

/// The fixture's calls and bytes per API and its frees: what every probe mode counts.
fn check_fixture_calls(m: &Metrics, id: &Identity, groups: &[Vec<String>]) {
    m.assert_parsed_completely(id);
    // Calls and bytes per API, summed over each set of aliases (names at one libc address: a
    // uprobe cannot tell them apart, so all their calls go to one of them, the others are 0).
    for class in alias_classes(groups) {
        let (mut want_calls, mut want_bytes) = (0u64, 0u64);
        for &(api, calls, bytes) in API_TOTALS
            .iter()
            .filter(|a| class.contains(&a.0.to_owned()))
        {
            if api != "free" {
                want_calls += calls;
                want_bytes += bytes;
            }
        }
        if class == ["free"] {
            continue;
        }
        let mut nonzero = Vec::new();
        let mut exported = Vec::new();
        let (mut calls, mut bytes) = (0u64, 0u64);
        for api in &class {
            let labels = [("api", api.as_str())];
            if m.value(id, "allocwatch_alloc_calls_total", &labels)
                .is_some()
            {
                exported.push(api.clone());
            }
            // Absent for an alias (checked below): 0.
            let count = |family| m.value(id, family, &labels).map_or(0, |v| v as u64);
            let (c, b) = (
                count("allocwatch_alloc_calls_total"),
                count("allocwatch_alloc_bytes_total"),
            );
            if c > 0 || b > 0 {
                nonzero.push(api.clone());
            }
            calls += c;
            bytes += b;
        }
        // An alias has no series of its own: it could only be 0.
        assert!(
            exported.len() <= 1 && (want_calls == 0 || exported.len() == 1),
            "aliases {class:?}: one series under one name, got {exported:?}\n{}",
            m.lines_of(id)
        );
        assert_eq!(
            (calls, bytes),
            (want_calls, want_bytes),
            "allocwatch_alloc_{{calls,bytes}}_total for api in {class:?}\n{}",
            m.lines_of(id)
        );
        assert!(
            nonzero.len() <= 1,
            "aliases {class:?} share one address: their calls belong under one name, not \
             {nonzero:?}\n{}",
            m.lines_of(id)
        );
    }
    assert_eq!(
        m.counter(id, "allocwatch_free_calls_total", &[]),
        17,
        "allocwatch_free_calls_total\n{}",
        m.lines_of(id)
    );
}

/// `wait-run`: found by the scan within a second with zero counters, then exact after its work.
fn run_wait_run_fixture(agent: &Agent, fixture: &Path, id: &Identity, groups: &[Vec<String>]) {
    let mut fx = Fixture::spawn(fixture, "wait-run", "ready");
    let m = agent.wait_for_identity(id, fx.started);
    assert_eq!(
        m.value(id, "allocwatch_processes", &[]),
        Some(1.0),
        "allocwatch_processes of the waiting fixture\n{}",
        m.lines_of(id)
    );
    for family in [
        "allocwatch_alloc_calls_total",
        "allocwatch_free_calls_total",
    ] {
        let n: f64 = m.of(id, family).iter().map(|s| value(s)).sum();
        assert_eq!(
            n,
            0.0,
            "{family} before the fixture works\n{}",
            m.lines_of(id)
        );
    }
    signal(fx.pid, libc::SIGUSR1);
    let status = fx.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "fixture wait-run failed: {status}");
    let m = agent.scrape();
    check_fixture_totals(&m, id, groups);
    m.assert_conventions();
}

/// Per identity at most `top_k` sites with their own series, the same label sets in all four
/// site families, and the self-reported series count right.
fn check_site_bounds(m: &Metrics, top_k: usize) {
    let families = [
        "allocwatch_site_alloc_calls_total",
        "allocwatch_site_alloc_bytes_total",
        "allocwatch_site_live_allocations",
        "allocwatch_site_live_bytes",
    ];
    let mut sets: Vec<BTreeSet<(Identity, String, String)>> = Vec::new();
    for family in families {
        let set: BTreeSet<(Identity, String, String)> = m
            .samples
            .iter()
            .filter(|s| s.metric == family)
            .map(|s| {
                (
                    Identity::from_labels(s),
                    s.labels.get("api").unwrap_or_default().to_owned(),
                    s.labels.get("site").unwrap_or_default().to_owned(),
                )
            })
            .collect();
        sets.push(set);
    }
    for (family, set) in families.iter().zip(&sets).skip(1) {
        assert_eq!(
            set, &sets[0],
            "{family} has other label sets than {}",
            families[0]
        );
    }
    let mut named: BTreeMap<&Identity, usize> = BTreeMap::new();
    for (id, _, site) in &sets[0] {
        if site != "other" {
            *named.entry(id).or_default() += 1;
        }
    }
    let over: Vec<String> = named
        .iter()
        .filter(|(_, n)| **n > top_k)
        .map(|(id, n)| format!("{id}: {n}"))
        .collect();
    assert!(
        over.is_empty(),
        "identities with more than --top-k {top_k} sites with their own series: {over:?}"
    );
    // Go map series (of any Go program on the machine: a `go build` beside the suite) take
    // from the same cap.
    let map_families = [
        "allocwatch_go_map_len",
        "allocwatch_go_map_bytes",
        "allocwatch_go_map_load_ratio",
        "allocwatch_go_maps_flagged",
    ];
    let total_site_samples = m
        .samples
        .iter()
        .filter(|s| {
            families.contains(&s.metric.as_str()) || map_families.contains(&s.metric.as_str())
        })
        .count();
    let reported = m.global("allocwatch_call_site_series");
    let limit = m.global("allocwatch_call_site_series_limit");
    assert_eq!(
        reported, total_site_samples as f64,
        "allocwatch_call_site_series vs the site series in the same scrape"
    );
    assert!(
        reported <= limit,
        "{reported} site series over the limit {limit}"
    );
}

/// One Go build under the agent vs its reference `top` report.
fn check_go_run(agent: &Agent, path: &Path, modes: &[&str], build: &GoBuild, reference: &Value) {
    let id = Identity::of(path);
    let out = Command::new(path)
        .args(modes)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} failed: {}\n{stdout}",
        path.display(),
        out.status
    );
    let numgc = number_after(&stdout, "numgc=");
    let caps = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ints caps="))
        .unwrap_or_else(|| panic!("no `ints caps=` line in\n{stdout}"))
        .split(',')
        .count() as u64;
    assert!(caps >= 19, "appendInts saw {caps} capacities\n{stdout}");
    let (repeat_grows, repeat_bytes) = if modes.contains(&"repeat") {
        (
            number_after(&stdout, "slice_grows="),
            number_after(&stdout, "slice_bytes="),
        )
    } else {
        (0, 0)
    };
    // Go events reach the agent through its ring buffer: wait until the counts stop moving.
    agent.scrape_until(
        &format!("allocwatch_go_gc_cycles_total of {id}"),
        Duration::from_secs(10),
        |m| m.has(&id, "allocwatch_go_gc_cycles_total"),
    );
    let m = agent.scrape_stable(&id);
    let go = &reference["go"];
    let summary = || format!("{}\nreference (top --json):\n{go:#}", m.lines_of(&id));

    let want_kinds: BTreeMap<String, u64> = go["map_grows"]["by_kind"]
        .as_object()
        .unwrap_or_else(|| panic!("no go.map_grows.by_kind in the top report\n{go:#}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("count")))
        .filter(|(_, v)| *v > 0)
        .collect();
    let got_kinds: BTreeMap<String, u64> = m
        .of(&id, "allocwatch_go_map_grows_total")
        .iter()
        .map(|s| {
            let kind = s.labels.get("kind").unwrap_or_default().to_owned();
            (kind, value(s) as u64)
        })
        .filter(|(_, v)| *v > 0)
        .collect();
    assert_eq!(
        got_kinds,
        want_kinds,
        "allocwatch_go_map_grows_total by kind (left) vs top's map_grows.by_kind (right)\n{}",
        summary()
    );
    if build.old_maps() {
        let doubles = got_kinds.get("double").copied().unwrap_or(0);
        assert!(
            doubles >= OLD_MAP_BIG_DOUBLINGS,
            "old maps: {doubles} doublings, fillMapBig alone makes {OLD_MAP_BIG_DOUBLINGS}\n{}",
            summary()
        );
    } else if repeat_grows > 0 {
        // repeatMap's 2,000 maps grow their tables too (exact: equal to top's, above).
        let grows = got_kinds.get("grow").copied().unwrap_or(0);
        assert!(
            grows > SWISS_MAP_BIG_GROWS,
            "swiss maps: {grows} table grows, fillMapBig alone makes {SWISS_MAP_BIG_GROWS}\n{}",
            summary()
        );
    } else {
        assert_eq!(
            got_kinds.get("grow").copied(),
            Some(SWISS_MAP_BIG_GROWS),
            "swiss maps: table grows (fillMapBig's table from 16 to 1024 slots)\n{}",
            summary()
        );
    }
    assert_eq!(
        m.counter(&id, "allocwatch_go_map_grow_bytes_total", &[]),
        go["map_grow_bytes"].as_u64().expect("map_grow_bytes"),
        "allocwatch_go_map_grow_bytes_total vs top's map_grow_bytes\n{}",
        summary()
    );
    let slices = m.counter(&id, "allocwatch_go_slice_grows_total", &[]);
    assert!(
        slices >= caps + repeat_grows,
        "allocwatch_go_slice_grows_total {slices}: appendInts alone grew {caps} times, \
         repeatSlice {repeat_grows}\n{}",
        summary()
    );
    assert!(
        m.counter(&id, "allocwatch_go_slice_grow_bytes_total", &[]) > repeat_bytes.max(1),
        "allocwatch_go_slice_grow_bytes_total (repeatSlice alone: {repeat_bytes})\n{}",
        summary()
    );
    if repeat_grows > 0 {
        let counted = m.global_sum(
            "allocwatch_go_growth_aggregated_total",
            &[("how", "kernel_count")],
        );
        assert!(
            counted >= (repeat_grows / 2) as f64,
            "allocwatch_go_growth_aggregated_total{{how=\"kernel_count\"}} {counted}: most of \
             repeatSlice's {repeat_grows} growths repeat a key the kernel counts\n{}",
            summary()
        );
    }
    assert_eq!(
        m.counter(&id, "allocwatch_go_gc_cycles_total", &[]),
        numgc,
        "allocwatch_go_gc_cycles_total vs the fixture's NumGC\n{}",
        summary()
    );
    let pauses = m.histogram(&id, "allocwatch_go_gc_pause_seconds");
    assert_eq!(
        pauses.count,
        (2 * numgc) as f64,
        "allocwatch_go_gc_pause_seconds_count: two stop-the-world phases per cycle\n{}",
        summary()
    );
    assert!(pauses.sum > 0.0, "GC pauses take time\n{}", summary());
    let version = format!("go{}", build.version);
    assert_eq!(
        m.value(&id, "allocwatch_go_info", &[("version", &version)]),
        Some(1.0),
        "allocwatch_go_info{{version=\"{version}\"}}\n{}",
        summary()
    );
    m.assert_conventions();
}

// ---------------------------------------------------------------------------------------------
// pprof

/// `go tool pprof -top` output, by function: (flat, cum) in the unit of the index shown.
struct PprofTop {
    index: String,
    text: String,
    rows: BTreeMap<String, (u64, u64)>,
}

impl PprofTop {
    fn flat(&self, function: &str) -> Option<u64> {
        self.rows.get(function).map(|r| r.0)
    }

    fn cum(&self, function: &str) -> Option<u64> {
        self.rows.get(function).map(|r| r.1)
    }
}

/// `go tool pprof -top` of a profile file.
/// `pid`'s heap profile by bytes allocated (`alloc_space`), taken again until `done` holds: a
/// site the agent had no time to name yet is at its caller's address (bounded by SITES_NAMED).
fn alloc_space_until(
    agent: &Agent,
    go: &GoToolchain,
    file: &Path,
    pid: u32,
    done: impl Fn(&PprofTop) -> bool,
) -> PprofTop {
    let deadline = Instant::now() + SITES_NAMED;
    loop {
        let profile = agent.profile(&format!("/debug/pprof/allocs?pid={pid}"));
        fs::write(file, &profile).expect("writing the profile");
        let space = pprof_top(go, file, &["-sample_index=alloc_space", "-unit=B"]);
        if done(&space) || Instant::now() >= deadline {
            return space;
        }
        thread::sleep(Duration::from_millis(300));
    }
}

fn pprof_top(go: &GoToolchain, file: &Path, args: &[&str]) -> PprofTop {
    let out = go
        .tool("pprof")
        .env("PPROF_TMPDIR", file.parent().expect("profile directory"))
        .args(["-top", "-nodecount=1000"])
        .args(args)
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {} tool pprof: {e}", go.go.display()));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "go tool pprof (Go {}) cannot read the profile: {}\n{text}",
        go.version,
        String::from_utf8_lossy(&out.stderr)
    );
    // `      700B  6.49% 85.88%       700B  6.49%  fx_malloc`
    let number = |s: &str| s.trim_end_matches('B').parse::<u64>().ok();
    let rows = text
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.len() < 6 || !cols[1].ends_with('%') {
                return None;
            }
            Some((cols[5..].join(" "), (number(cols[0])?, number(cols[3])?)))
        })
        .collect();
    PprofTop {
        index: args
            .iter()
            .find_map(|a| a.strip_prefix("-sample_index="))
            .unwrap_or("default")
            .to_owned(),
        text,
        rows,
    }
}

fn newest_go_toolchain() -> GoToolchain {
    go_toolchains()
        .into_iter()
        .max_by_key(|t| version_key(&t.version))
        .expect("no Go toolchain: run ./x setup")
}

// ---------------------------------------------------------------------------------------------
// Go fixtures

struct GoBuild {
    version: String,
    /// `growth-1.27.3`
    name: String,
    path: PathBuf,
}

impl GoBuild {
    /// Bucket maps: Go ≤ 1.23 (this test uses no GOEXPERIMENT=noswissmap build).
    fn old_maps(&self) -> bool {
        version_key(&self.version).get(1).copied().unwrap_or(0) <= 23
    }
}

/// Attaches the agent to a Go file before a measured run: a process of `warm` (a hard link of
/// the measured file, same inode) is stopped right after exec until the agent lists it.
fn attach_go_file(agent: &Agent, warm: &Path) {
    let w = Fixture::spawn_quiet(warm, &["gc"; 2000]);
    signal(w.pid, libc::SIGSTOP);
    agent.discover(&Identity::of(warm), "allocwatch_go_info", w.started);
}

/// `map_big`'s exact map growth under `id` (`what`: whose, for the message), once stable.
fn assert_map_big_growth(agent: &Agent, id: &Identity, build: &GoBuild, what: &str) {
    let want = if build.old_maps() {
        ("double", OLD_MAP_BIG_DOUBLINGS)
    } else {
        ("grow", SWISS_MAP_BIG_GROWS)
    };
    agent.scrape_until(
        &format!("allocwatch_go_map_grows_total of {id}"),
        Duration::from_secs(10),
        |m| m.has(id, "allocwatch_go_map_grows_total"),
    );
    let m = agent.scrape_stable(id);
    assert_eq!(
        m.counter(id, "allocwatch_go_map_grows_total", &[("kind", want.0)]),
        want.1,
        "map_big's map growth ({}) {what}\n{}",
        want.0,
        m.lines_of(id)
    );
    m.assert_conventions();
}

/// The newest old-map build and the newest build of all (swiss maps), plain (not stripped, not
/// PIE), oldest first.
fn go_builds() -> Vec<GoBuild> {
    let dir = env::var_os("ALLOCWATCH_GO_FIXTURES")
        .map(PathBuf::from)
        .expect("ALLOCWATCH_GO_FIXTURES is not set (./x test sets it)");
    let mut versions: Vec<String> = go_toolchains().into_iter().map(|t| t.version).collect();
    versions.sort_by_key(|v| version_key(v));
    let old = versions
        .iter()
        .rev()
        .find(|v| version_key(v).get(1).is_some_and(|&m| m <= 23))
        .expect("no Go toolchain with old maps (≤ 1.23)");
    let new = versions.last().expect("a Go toolchain");
    assert!(
        version_key(new).get(1).is_some_and(|&m| m >= 24),
        "the newest Go toolchain {new} has no swiss maps"
    );
    [old, new]
        .into_iter()
        .map(|v| {
            let name = format!("growth-{v}");
            let path = dir.join(&name);
            assert!(
                path.is_file(),
                "{} missing: run ./x fixtures",
                path.display()
            );
            GoBuild {
                version: v.clone(),
                name,
                path,
            }
        })
        .collect()
}

/// `allocwatch top --json -- PATH MODES…`: the report's one process.
fn top_json(env: &TestEnv, scratch: &Scratch, path: &Path, modes: &[&str]) -> Value {
    let out_file = scratch.path.join("top.json");
    let mut args = vec![
        "top",
        "--json",
        "-o",
        path_str(&out_file),
        "--",
        path_str(path),
    ];
    args.extend_from_slice(modes);
    let out = Command::new(&env.bin)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .expect("running allocwatch top");
    assert!(
        out.status.success(),
        "`allocwatch {}` failed: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = fs::read_to_string(&out_file).expect("top's report");
    let report: Value = serde_json::from_str(&text).expect("top's report is JSON");
    let processes = report["processes"].as_array().expect("processes");
    assert_eq!(
        processes.len(),
        1,
        "one process in top's report\n{report:#}"
    );
    assert!(
        processes[0]["go"].is_object(),
        "no go object in top's report\n{report:#}"
    );
    processes[0].clone()
}

fn number_after(text: &str, key: &str) -> u64 {
    let at = text
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in\n{text}"));
    text[at + key.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key} in\n{text}"))
}

// ---------------------------------------------------------------------------------------------
// Capabilities

/// `capabilities.add` of the agent container in the DaemonSet, as (NAME, bit).
fn daemonset_capabilities() -> Vec<(String, u32)> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kustomize/base/daemonset.yaml");
    let yaml = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "capabilities:");
    assert!(
        lines.next().is_some(),
        "no capabilities in {}",
        path.display()
    );
    let names: Vec<String> = lines
        .skip_while(|l| l.trim() != "add:")
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .take_while(|l| l.starts_with("- "))
        .map(|l| l.trim_start_matches("- ").trim().to_owned())
        .collect();
    assert!(
        !names.is_empty(),
        "no capabilities.add list in {}",
        path.display()
    );
    // linux/capability.h
    let bits: BTreeMap<&str, u32> = [
        ("DAC_OVERRIDE", 1),
        ("SETGID", 6),
        ("SETUID", 7),
        ("SETPCAP", 8),
        ("DAC_READ_SEARCH", 2),
        ("KILL", 5),
        ("NET_ADMIN", 12),
        ("IPC_LOCK", 14),
        ("SYS_CHROOT", 18),
        ("SYS_PTRACE", 19),
        ("SYS_ADMIN", 21),
        ("SYS_NICE", 23),
        ("SYS_RESOURCE", 24),
        ("SYSLOG", 34),
        ("PERFMON", 38),
        ("BPF", 39),
        ("CHECKPOINT_RESTORE", 40),
    ]
    .into_iter()
    .collect();
    names
        .into_iter()
        .map(|n| {
            let bit = *bits
                .get(n.as_str())
                .unwrap_or_else(|| panic!("capability {n} of the DaemonSet: add it to this table"));
            (n, bit)
        })
        .collect()
}

/// What the agent keeps after startup on this kernel (agent/src/privilege.rs): CAP_SYS_PTRACE,
/// plus CAP_PERFMON before 6.6 (no uprobe_multi links) and CAP_BPF before 6.5.
fn steady_state_capabilities() -> u64 {
    let version = kernel_version();
    let mut keep = 1u64 << 19;
    if version < (6, 6) {
        keep |= 1 << 38;
    }
    if version < (6, 5) {
        keep |= 1 << 39;
    }
    keep
}

/// This kernel's (major, minor).
fn kernel_version() -> (u32, u32) {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let v = version_key(release.trim());
    (
        v.first().copied().unwrap_or(0),
        v.get(1).copied().unwrap_or(0),
    )
}

/// `+bpf,+perfmon,…` for setpriv: the capabilities this test process can grant at all (a note for
/// the others).
fn setpriv_caps(granted: &[(String, u32)]) -> String {
    let own_bounding = own_status_mask("CapBnd");
    let mut out = Vec::new();
    for (name, bit) in granted {
        if own_bounding & (1 << bit) == 0 {
            eprintln!(
                "note: CAP_{name} is not in this test's own bounding set: the agent runs without it"
            );
        } else {
            out.push(format!("+{}", name.to_lowercase()));
        }
    }
    out.join(",")
}

/// `allocwatch ARGS` as root with exactly `caps` (`+name,…`) and no_new_privs, as the
/// DaemonSet's securityContext runs it.
fn setpriv(env: &TestEnv, caps: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--inh-caps=-all",
        "--ambient-caps=-all",
        &format!("--bounding-set=-all,{caps}"),
        "--no-new-privs",
        "--",
    ])
    .arg(&env.bin)
    .args(args);
    cmd
}

fn own_status_mask(field: &str) -> u64 {
    let status = fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status_mask(&status, field)
}

fn status_mask(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no {field} in\n{status}"))
}

// ---------------------------------------------------------------------------------------------
// libc aliases

/// Every API in one class: its alias group, or itself.
fn alias_classes(groups: &[Vec<String>]) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = groups.to_vec();
    for api in APIS {
        if !groups.iter().any(|g| g.iter().any(|a| a == api)) {
            out.push(vec![(*api).to_owned()]);
        }
    }
    out
}

/// The name the agent reports `api`'s calls under: for an aliased API, the member of its group
/// with non-zero calls in `m`.
fn canonical(groups: &[Vec<String>], m: &Metrics, id: &Identity, api: &str) -> String {
    let Some(group) = groups.iter().find(|g| g.iter().any(|a| a == api)) else {
        return api.to_owned();
    };
    group
        .iter()
        .find(|a| {
            m.value(id, "allocwatch_alloc_calls_total", &[("api", a.as_str())])
                .is_some_and(|v| v > 0.0)
        })
        .cloned()
        .unwrap_or_else(|| api.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Processes and files

struct TestEnv {
    bin: PathBuf,
    fixture: PathBuf,
    alias_groups: Vec<Vec<String>>,
}

impl TestEnv {
    /// Panics when anything the tests need is missing (`ALLOCWATCH_BIN` unset: plain `cargo
    /// test` without `./x test`): these tests must run, never pass by skipping.
    fn get() -> Self {
        Self {
            bin: allocwatch_bin("root and the built binary and fixtures"),
            fixture: libc_fixture(),
            alias_groups: address_groups(&libc_path(), APIS),
        }
    }
}

impl AllocwatchBin for TestEnv {
    fn bin(&self) -> &Path {
        &self.bin
    }
}

/// `FIXTURE MODE` to its end (reaped at once, as a shell would).
fn run_fixture(path: &Path, mode: &str) -> ExitStatus {
    Command::new(path)
        .arg(mode)
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()))
}

fn sleep_until(t: Instant) {
    thread::sleep(t.saturating_duration_since(Instant::now()));
}
