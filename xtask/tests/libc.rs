//! End-to-end tests of `allocwatch top` / `allocwatch leaks` against the C fixture
//! (fixtures/c/libc_fixture.c), with real uprobes. `./x test` runs them as root and sets
//! `ALLOCWATCH_BIN` (target/release/allocwatch) and `ALLOCWATCH_FIXTURES` (target/fixtures).
//!
//! The tests share system state (uprobes on libc, tracefs, the BPF object id space), so each one
//! holds [`serial`] for its whole run, whatever `--test-threads` says.
//!
//! # Expected numbers, and what an independent peer (bpftrace) sees
//!
//! allocwatch counts the program's own calls: the outermost allocation-API call on a thread.
//! bpftrace (uprobes at every API's offset 0, filtered on the fixture's pid) counts every entry,
//! including glibc 2.36's internal relays, and on this machine showed for `libc_fixture run`:
//!
//! | probe          | bpftrace | program-level | why they differ                                   |
//! |----------------|---------:|--------------:|---------------------------------------------------|
//! | malloc         |       12 |             7 | +3 realloc(NULL, 64) → malloc, +2 reallocarray → realloc → malloc |
//! | realloc        |        8 |             6 | +2 reallocarray(NULL, 8, 16) → realloc            |
//! | memalign       |        5 |             2 | same address as aligned_alloc: both probes fire on each of the 5 calls |
//! | aligned_alloc  |        5 |             3 | (same)                                            |
//! | others         |    equal |         equal | calloc 5, reallocarray 2, posix_memalign 4, valloc 2, pvalloc 1, free 17 |
//!
//! bpftrace's malloc sum(arg0) = 1148 = 7×100 + 3×64 + 2×128. Every hit had a fixture function
//! on its stack: nothing before `main` (ld.so uses its own allocator until libc is relocated, and
//! this fixture makes it call none) and nothing at exit (no stdio buffers) calls libc's malloc.
//! `fixture_raw_calls_match_bpftrace` re-checks this table on every run.
//! memalign (64-byte alignment) does not relay to malloc: glibc only does that for alignments
//! ≤ 16. Debian's libc.so.6 defines `memalign` and `aligned_alloc` at one address (check with
//! `nm -D`), so allocwatch reports them under one name and says so in `aliases`.

mod support;
// The tests of following what a command starts (kept apart: this file is long enough).
#[path = "libc/follow.rs"]
mod follow;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use serde_json::Value;
use support::{
    API_TOTALS, APIS, Allocwatch, AllocwatchBin, BPF_FREE_LIMIT, BpfIds, Fixture, KernelState,
    LIVE_ALLOCATIONS, LIVE_BYTES, LOSS_KEYS, Lines, SAMPLE_RATE, SAMPLE_SITES, SITES,
    TRACING_PREFIX, address_groups, allocwatch_bin, array, assert_single_error, dead_pid,
    libc_fixture, libc_path, path_str, process_by_pid, read_json, sample_bound, serial, signal,
    startup, str_at, u64_at,
};

/// The `loop` mode's block size: malloc(48) then free, every millisecond.
const LOOP_BLOCK: u64 = 48;

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn expected_tables_agree() {
    for &(api, calls, bytes) in API_TOTALS {
        let (c, b) = SITES
            .iter()
            .filter(|s| s.api == api)
            .fold((0, 0), |(c, b), s| (c + s.calls, b + s.bytes));
        assert_eq!(
            (c, b),
            (calls, bytes),
            "SITES and API_TOTALS disagree on {api}"
        );
    }
    let live = SITES.iter().filter(|s| s.api != "free");
    assert_eq!(live.clone().map(|s| s.live_bytes).sum::<u64>(), LIVE_BYTES);
    assert_eq!(
        live.map(|s| s.live_allocations).sum::<u64>(),
        LIVE_ALLOCATIONS
    );
    assert_eq!(API_TOTALS.len(), APIS.len());
}

/// (a) `top -- fixture run`: exact per-API and per-site numbers, frames down to `main`.
#[test]
fn top_command_exact_counts() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = path_str(&env.fixture);
    let (mut aw, out) = spawn_json(&env, "top-command", &["top"], &["--", fixture, "run"]);
    let pid = aw.wait_tracing_pid(Duration::from_secs(30));
    let status = aw.wait_exit(Duration::from_secs(60));
    aw.assert_success(status);
    let report = read_json(&out);
    assert_eq!(report["version"], 1, "report version\n{report:#}");
    let processes = array(&report, "processes");
    assert_eq!(processes.len(), 1, "one process traced\n{report:#}");
    let proc = &processes[0];
    assert_eq!(
        u64_at(proc, "pid"),
        u64::from(pid),
        "pid of the tracing line"
    );
    assert_eq!(proc["exit_code"], 0, "exit code of the fixture\n{proc:#}");
    check_fixture_top(proc);
}

/// (b) `leaks --min-age 0s -- fixture run`: what stays live, grouped by the allocating function.
/// The report goes to stdout here (no `-o`).
#[test]
fn leaks_command_exact_counts() {
    let env = TestEnv::get();
    let _serial = serial();
    let mut aw = Allocwatch::spawn_with_stdout(
        &env,
        &[
            "leaks",
            "--min-age",
            "0s",
            "--json",
            "--",
            path_str(&env.fixture),
            "run",
        ],
    );
    aw.wait_tracing_pid(Duration::from_secs(30));
    let status = aw.wait_exit(Duration::from_secs(60));
    aw.assert_success(status);
    let stdout = aw.stdout();
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("leaks --json stdout is not JSON ({e}):\n{stdout}"));
    assert_eq!(report["version"], 1);
    assert_eq!(
        report["min_age_seconds"].as_f64(),
        Some(0.0),
        "min_age_seconds\n{report:#}"
    );
    let processes = array(&report, "processes");
    assert_eq!(processes.len(), 1, "one process traced\n{report:#}");
    let proc = &processes[0];
    assert_eq!(proc["comm"], "libc_fixture");
    assert_eq!(
        u64_at(proc, "live_bytes"),
        LIVE_BYTES,
        "live_bytes\n{proc:#}"
    );
    assert_eq!(u64_at(proc, "live_allocations"), LIVE_ALLOCATIONS);
    assert_no_loss(proc);

    let aliases = aliases_of(proc);
    let mut got: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for leak in array(proc, "leaks") {
        let key = (str_at(leak, "api").to_owned(), frame0_function(leak));
        let e = got.entry(key).or_default();
        e.0 += u64_at(leak, "count");
        e.1 += u64_at(leak, "bytes");
        let age = leak["oldest_age_seconds"].as_f64();
        assert!(
            age.is_some_and(|a| a >= 0.0),
            "oldest_age_seconds\n{leak:#}"
        );
        assert_frames_reach_main(leak);
    }
    let want: BTreeMap<(String, String), (u64, u64)> = SITES
        .iter()
        .filter(|s| s.api != "free" && s.live_allocations > 0)
        .map(|s| {
            let key = (fold(&aliases, s.api), s.function.to_owned());
            (key, (s.live_allocations, s.live_bytes))
        })
        .collect();
    assert_eq!(
        got, want,
        "leaks per (api, frame 0 function): (count, bytes)\n{proc:#}"
    );
}

/// (c) `top --pid` on a running process: attach, then let it work; allocwatch ends by itself
/// when the process exits.
#[test]
fn top_pid_exact_counts() {
    let env = TestEnv::get();
    let _serial = serial();
    let mut fixture = Fixture::spawn(&env.fixture, "wait-run", "ready");
    let pid = fixture.pid;
    let (mut aw, out) = spawn_json(&env, "top-pid", &["top"], &["--pid", &pid.to_string()]);
    assert_eq!(
        aw.wait_tracing_pid(Duration::from_secs(30)),
        pid,
        "traced pid"
    );
    signal(pid, libc::SIGUSR1);
    // Reap the fixture as a shell would (a zombie still has a /proc entry).
    let fixture_status = fixture.wait_exit(Duration::from_secs(30));
    assert!(
        fixture_status.success(),
        "fixture wait-run failed: {fixture_status}"
    );
    let status = aw.wait_exit(Duration::from_secs(15));
    aw.assert_success(status);
    let report = read_json(&out);
    let proc = process_by_pid(&report, pid);
    assert!(
        proc["exit_code"].is_null() || proc["exit_code"] == 0,
        "exit_code of a process that exited with 0\n{proc:#}"
    );
    check_fixture_top(proc);
}

/// (d) A pid that does not exist: one error line, exit code 1.
#[test]
fn missing_pid_is_one_error_line() {
    let env = TestEnv::get();
    let _serial = serial();
    let pid = dead_pid();
    assert_single_error(&env, &["top", "--pid", &pid.to_string()]);
    assert_single_error(&env, &["leaks", "--pid", &pid.to_string()]);
}

/// (d) A command that cannot be started: one error line, exit code 1.
#[test]
fn missing_command_is_one_error_line() {
    let env = TestEnv::get();
    let _serial = serial();
    assert_single_error(&env, &["top", "--", "/nonexistent/allocwatch-test-command"]);
}

/// (e) SIGINT detaches cleanly: exit 0, a final report, the target keeps running, and every BPF
/// program, link and map allocwatch held is gone from the kernel afterwards.
#[test]
fn sigint_detaches_and_leaves_nothing() {
    detach_on_signal(libc::SIGINT);
}

/// (e) The same with SIGTERM.
#[test]
fn sigterm_detaches_and_leaves_nothing() {
    detach_on_signal(libc::SIGTERM);
}

/// (f) The traced command is SIGKILLed mid-trace: allocwatch still reports and exits 0.
#[test]
fn target_killed_mid_trace() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = path_str(&env.fixture);
    let (mut aw, out) = spawn_json(&env, "top-killed", &["top"], &["--", fixture, "loop"]);
    let pid = aw.wait_tracing_pid(Duration::from_secs(30));
    thread::sleep(Duration::from_millis(500));
    signal(pid, libc::SIGKILL);
    let status = aw.wait_exit(Duration::from_secs(15));
    aw.assert_success(status);
    let report = read_json(&out);
    let proc = process_by_pid(&report, pid);
    assert_eq!(
        proc["exited"], true,
        "killed target must be reported as exited\n{proc:#}"
    );
    assert_ne!(
        proc["exit_code"], 0,
        "a SIGKILLed process did not exit with 0\n{proc:#}"
    );
    check_loop_counts(proc);
}

/// (g) `top --mode count` / `count-stacks -- fixture run`: entry probes only, no return probe
/// and no in-flight marker, yet the same exact calls and bytes per API and per site as `full`.
/// glibc's relays in this fixture (realloc(NULL) → malloc and reallocarray → realloc → malloc
/// tail jumps) are recognized by their frame (same stack pointer and return address as the outer
/// call). The documented differences of count mode: `free` bytes are unknown (0), no failures
/// and no live allocations are reported (no return value is seen).
#[test]
fn count_modes_exact_counts() {
    let env = TestEnv::get();
    let _serial = serial();
    for (mode, stacks) in [("count", false), ("count-stacks", true)] {
        let (_, _, proc) = run_json(
            &env,
            &format!("top-{mode}"),
            &["top", "--mode", mode],
            &["--", path_str(&env.fixture), "run"],
        );
        assert_eq!(proc["exit_code"], 0, "exit code of the fixture\n{proc:#}");
        check_fixture_count(&proc, stacks);
    }
}

/// Sampling (`--sample-bytes`) on `libc_fixture sample`, in `full` and `count-stacks`, on
/// the same run: every call still counted exactly (per API, per immediate caller), and each
/// stack's scaled figures within the Poisson model's bound of the exact ones.
#[test]
fn sampled_top_estimates() {
    let env = TestEnv::get();
    let _serial = serial();
    let rate = SAMPLE_RATE.to_string();
    for (mode, live) in [("full", true), ("count-stacks", false)] {
        let (_, _, proc) = run_json(
            &env,
            &format!("top-sampled-{mode}"),
            &["top", "--mode", mode, "--sample-bytes", &rate],
            &["--", path_str(&env.fixture), "sample"],
        );
        assert_eq!(proc["exit_code"], 0, "exit code of the fixture\n{proc:#}");
        check_sampled(&proc, live);
    }
}

fn check_sampled(proc: &Value, live: bool) {
    assert_no_loss(proc);
    assert_eq!(u64_at(proc, "sample_bytes"), SAMPLE_RATE, "{proc:#}");
    // Per API, exact: call for call what the fixture did.
    let mut want_calls: BTreeMap<&str, u64> = APIS.iter().map(|a| (*a, 0)).collect();
    let mut want_bytes = want_calls.clone();
    for &(_, api, n, size, _) in SAMPLE_SITES {
        *want_calls.get_mut(api).unwrap() += n;
        *want_bytes.get_mut(api).unwrap() += n * size;
    }
    want_calls.insert("free", 20_000);
    for api in APIS {
        assert_eq!(
            u64_at(&proc["calls"], api),
            want_calls[api],
            "calls.{api}\n{proc:#}"
        );
        if *api != "free" {
            assert_eq!(u64_at(&proc["bytes"], api), want_bytes[api], "bytes.{api}");
        }
    }
    let sites = array(proc, "sites");
    let callers = array(proc, "callers");
    let of = |list: &'static str, rows: &Vec<Value>, func: &str, api: &str| -> Vec<Value> {
        let found: Vec<Value> = rows
            .iter()
            .filter(|r| r["api"] == api && frame0_function(r) == func)
            .cloned()
            .collect();
        assert_eq!(found.len(), 1, "one {api} {list} row in {func}\n{proc:#}");
        found
    };
    let (mut live_est, mut live_exact, mut live_slack) = (0.0, 0.0, 0.0);
    for &(func, api, n, size, stays) in SAMPLE_SITES {
        // Per immediate caller, exact.
        let c = &of("callers", callers, func, api)[0];
        assert_eq!(
            (u64_at(c, "calls"), u64_at(c, "bytes")),
            (n, n * size),
            "{c:#}"
        );
        // Per stack, estimated from what was sampled.
        let s = &of("sites", sites, func, api)[0];
        assert_frames_reach_main(s);
        let (k, kb) = (u64_at(s, "sampled_calls"), u64_at(s, "sampled_bytes"));
        assert!(
            k > 0 && k <= n && kb == k * size,
            "samples of {func}\n{s:#}"
        );
        let bound = sample_bound(n, size, SAMPLE_RATE);
        let exact = (n * size) as f64;
        let est = u64_at(s, "bytes") as f64;
        assert!(
            (est / exact - 1.0).abs() <= bound,
            "{func}: {est} bytes estimated, {exact} exact, bound {:.1} %\n{s:#}",
            bound * 100.0
        );
        let calls = u64_at(s, "calls") as f64;
        assert!(
            (calls / n as f64 - 1.0).abs() <= bound,
            "{func} calls\n{s:#}"
        );
        let live_bytes = u64_at(s, "live_bytes") as f64;
        if live && stays {
            assert!(
                (live_bytes / exact - 1.0).abs() <= bound,
                "{func}: {live_bytes} live bytes estimated, {exact} exact\n{s:#}"
            );
            live_est += live_bytes;
            live_exact += exact;
            live_slack += bound * exact;
        } else {
            assert_eq!(live_bytes, 0.0, "{func} live bytes\n{s:#}");
        }
    }
    // free is never sampled: its rows are exact per caller, without bytes.
    let f = &of("sites", sites, "fx_sample_small", "free")[0];
    assert_eq!(
        (u64_at(f, "calls"), u64_at(f, "bytes")),
        (20_000, 0),
        "{f:#}"
    );
    let total = u64_at(proc, "live_bytes") as f64;
    assert!(
        (total - live_exact).abs() <= live_slack,
        "live_bytes {total}, exact {live_exact} ± {live_slack}"
    );
    assert_eq!(total, live_est, "live_bytes is the sum of the sites'");
}

/// `--log-level debug` shows the probes' own log (aya-log): with a call-site table of one row,
/// every call the probes could not give a site of its own is one line saying so, exactly as
/// many as the report's `lost.site_spilled` (each counted in its process's row of unknown sites). At the default level the same run logs none of it (the
/// probes are loaded with their log off).
#[test]
fn probe_debug_log_says_why_events_were_lost() {
    let env = TestEnv::get();
    let _serial = serial();
    for debug in [true, false] {
        let mut args = vec!["top", "--max-sites", "1"];
        if debug {
            args.extend(["--log-level", "debug"]);
        }
        let name = format!("top-log-debug-{debug}");
        let (aw, pid, proc) = run_json(&env, &name, &args, &["--", path_str(&env.fixture), "run"]);
        let lost = u64_at(&proc["lost"], "site_spilled");
        assert!(lost > 0, "a one-row site table must spill sites\n{proc:#}");
        let stderr = aw.stderr.text();
        let want = format!("allocwatch: debug: probe: pid {pid}: event lost: site_spilled");
        let said = stderr.lines().filter(|l| *l == want).count() as u64;
        let probe_lines = stderr.lines().filter(|l| l.contains(": probe: ")).count();
        if debug {
            assert_eq!(said, lost, "one debug line per lost site\n{stderr}");
        } else {
            assert_eq!(probe_lines, 0, "no probe log below debug\n{stderr}");
        }
    }
}

/// `leaks` shows the outstanding allocations as it goes (every `--interval`), not only at the
/// end: the fixture's 13 allocations appear in a table while it still runs, holding them.
#[test]
fn leaks_shows_outstanding_allocations_as_it_goes() {
    let env = TestEnv::get();
    let _serial = serial();
    let mut fx = Fixture::spawn(&env.fixture, "wait-run-wait", "ready");
    let pid = fx.pid.to_string();
    let mut aw = KillOnDrop(
        Command::new(&env.bin)
            .args([
                "leaks",
                "--min-age",
                "0s",
                "--interval",
                "200ms",
                "--pid",
                &pid,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting allocwatch leaks"),
    );
    let stderr = Lines::follow(aw.0.stderr.take().unwrap());
    let mut stdout = Lines::follow(aw.0.stdout.take().unwrap());
    stderr.wait_for(TRACING_PREFIX, startup(Duration::from_secs(30)));
    let header = format!("allocwatch leaks — pid {pid} (libc_fixture): ");
    // A table before the fixture works: nothing outstanding of its own yet.
    let before = stdout.wait_for(&header, Duration::from_secs(10));
    assert!(
        before.starts_with(&format!("{header}0 allocations")),
        "{before}"
    );
    signal(fx.pid, libc::SIGUSR1);
    // The next tables, while the fixture holds its allocations (it waits for a second signal).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let want = format!("{header}{LIVE_ALLOCATIONS} allocations, ");
    loop {
        let line = stdout.wait_for(
            &header,
            deadline.saturating_duration_since(std::time::Instant::now()),
        );
        if line.starts_with(&want) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no live table with {LIVE_ALLOCATIONS} allocations:\n{}",
            stdout.text()
        );
    }
    assert!(
        aw.0.try_wait().expect("allocwatch's status").is_none(),
        "allocwatch ended before the fixture did"
    );
    signal(fx.pid, libc::SIGUSR1);
    let status = fx.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "fixture: {status}");
    let status = support::wait_child(&mut aw.0, Duration::from_secs(30)).expect("allocwatch ends");
    assert!(
        status.success(),
        "allocwatch leaks: {status}\n{}",
        stderr.text()
    );
    // The final report, after the live tables, has the same allocations.
    stdout.wait_closed(support::PIPE_DRAIN);
    let text = stdout.text();
    let last = text
        .lines()
        .rfind(|l| l.starts_with(&header))
        .unwrap_or_default()
        .to_owned();
    assert!(last.starts_with(&want), "final report: {last}\n{text}");
}

/// A child killed and reaped when dropped (a failed assertion must not leave a tracer running).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `leaks` needs the live table, which count mode does not keep: a usage error, not an empty
/// report.
#[test]
fn leaks_refuses_count_mode() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = env.fixture.display().to_string();
    assert_single_error(&env, &["leaks", "--mode", "count", "--", &fixture, "run"]);
}

/// The fixture's raw libc entries, counted by bpftrace, match the table at the top of this file:
/// proof that the fixture does what the expected numbers assume, independent of allocwatch.
#[test]
fn fixture_raw_calls_match_bpftrace() {
    let env = TestEnv::get();
    let _serial = serial();
    let libc = libc_path();
    let probes = APIS
        .iter()
        .map(|api| format!("uprobe:{}:{api}", libc.display()))
        .collect::<Vec<_>>()
        .join(",");
    // One action for all probes: bpftrace 0.17 fails to load two programs on one function.
    // @bytes is sum(arg0): meaningful for malloc only.
    let script =
        format!("{probes} /pid == cpid/ {{ @calls[probe] = count(); @bytes[probe] = sum(arg0); }}");
    let command = format!("{} run", env.fixture.display());
    let out = Command::new("bpftrace")
        .args(["-f", "json", "-e", &script, "-c", &command])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run bpftrace ({e}): ./x setup installs it"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bpftrace failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut calls: BTreeMap<String, u64> = BTreeMap::new();
    let mut malloc_bytes = None;
    for line in stdout.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if let Some(map) = v["data"]["@calls"].as_object() {
            for (probe, n) in map {
                let api = probe.rsplit(':').next().unwrap_or_default();
                calls.insert(api.to_owned(), n.as_u64().unwrap_or_default());
            }
        }
        if let Some(map) = v["data"]["@bytes"].as_object() {
            malloc_bytes = map
                .iter()
                .find(|(probe, _)| probe.ends_with(":malloc"))
                .and_then(|(_, n)| n.as_u64());
        }
    }
    // Program-level counts plus glibc's relays (see the table at the top of this file).
    let mut want: BTreeMap<String, u64> = API_TOTALS
        .iter()
        .map(|&(api, calls, _)| (api.to_owned(), calls))
        .collect();
    *want.get_mut("malloc").unwrap() += 3 + 2;
    *want.get_mut("realloc").unwrap() += 2;
    // Probes at one address all fire on each call to any of the names.
    for group in address_groups(&libc, APIS) {
        let sum: u64 = group.iter().map(|api| want[api]).sum();
        for api in &group {
            want.insert(api.clone(), sum);
        }
    }
    assert_eq!(
        calls, want,
        "bpftrace's raw uprobe hits on the fixture\n{stdout}"
    );
    // 7 × 100 from fx_malloc + 3 × 64 via realloc + 2 × 128 via reallocarray.
    assert_eq!(
        malloc_bytes,
        Some(700 + 192 + 256),
        "malloc sum(arg0)\n{stdout}"
    );
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the tests

/// The whole `top` report of one `libc_fixture run` process.
fn check_fixture_top(proc: &Value) {
    assert_eq!(proc["comm"], "libc_fixture", "comm\n{proc:#}");
    assert!(
        str_at(proc, "exe").ends_with("/libc_fixture"),
        "exe\n{proc:#}"
    );
    assert_eq!(proc["exited"], true, "exited\n{proc:#}");
    assert!(
        str_at(proc, "libc").ends_with("/libc.so.6"),
        "libc\n{proc:#}"
    );
    let aliases = aliases_of(proc);
    check_aliases(&aliases, Path::new(str_at(proc, "libc")));

    // Per API, aliases folded into the name they are reported under.
    let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for &(api, calls, bytes) in API_TOTALS {
        let e = want.entry(fold(&aliases, api)).or_default();
        e.0 += calls;
        e.1 += bytes;
    }
    for (api, (calls, bytes)) in &want {
        assert_eq!(u64_at(&proc["calls"], api), *calls, "calls.{api}\n{proc:#}");
        assert_eq!(u64_at(&proc["bytes"], api), *bytes, "bytes.{api}\n{proc:#}");
        assert_eq!(u64_at(&proc["failed"], api), 0, "failed.{api}\n{proc:#}");
    }
    for alias in aliases.keys() {
        for table in ["calls", "bytes"] {
            let v = &proc[table][alias];
            assert!(
                v.is_null() || *v == 0,
                "{table}.{alias} is an alias: must be 0 or absent"
            );
        }
    }
    assert_eq!(
        u64_at(proc, "live_bytes"),
        LIVE_BYTES,
        "live_bytes\n{proc:#}"
    );
    assert_eq!(
        u64_at(proc, "live_allocations"),
        LIVE_ALLOCATIONS,
        "live_allocations"
    );
    assert_no_loss(proc);
    check_fixture_sites(proc, &aliases);
}

/// A `top --mode count[-stacks]` report of one `libc_fixture run` process: [`API_TOTALS`] and
/// [`SITES`] exactly, except that count mode cannot know free bytes, failures or live blocks.
fn check_fixture_count(proc: &Value, stacks: bool) {
    assert_eq!(proc["comm"], "libc_fixture", "comm\n{proc:#}");
    let aliases = aliases_of(proc);
    let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for &(api, calls, bytes) in API_TOTALS {
        let e = want.entry(fold(&aliases, api)).or_default();
        e.0 += calls;
        e.1 += if api == "free" { 0 } else { bytes };
    }
    for (api, (calls, bytes)) in &want {
        assert_eq!(u64_at(&proc["calls"], api), *calls, "calls.{api}\n{proc:#}");
        assert_eq!(u64_at(&proc["bytes"], api), *bytes, "bytes.{api}\n{proc:#}");
        assert_eq!(u64_at(&proc["failed"], api), 0, "failed.{api}\n{proc:#}");
    }
    assert_eq!(u64_at(proc, "live_bytes"), 0, "live_bytes\n{proc:#}");
    assert_eq!(u64_at(proc, "live_allocations"), 0, "live_allocations");
    assert_no_loss(proc);

    let mut got: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for s in array(proc, "sites") {
        let e = got
            .entry((str_at(s, "api").to_owned(), frame0_function(s)))
            .or_default();
        e.0 += u64_at(s, "calls");
        e.1 += u64_at(s, "bytes");
        check_frame0_location(s);
        if stacks {
            assert_frames_reach_main(s);
        } else {
            assert_eq!(
                array(s, "frames").len(),
                1,
                "no stacks: frame 0 only\n{s:#}"
            );
        }
    }
    let want: BTreeMap<(String, String), (u64, u64)> = SITES
        .iter()
        .map(|s| {
            let bytes = if s.api == "free" { 0 } else { s.bytes };
            (
                (fold(&aliases, s.api), s.function.to_owned()),
                (s.calls, bytes),
            )
        })
        .collect();
    assert_eq!(got, want, "sites per (api, frame 0 function)\n{proc:#}");
}

/// Sites summed per (api, frame 0 function) must be exactly [`SITES`]: nothing else in the
/// process allocates (see the bpftrace table at the top).
fn check_fixture_sites(proc: &Value, aliases: &BTreeMap<String, String>) {
    #[derive(Debug, Default, PartialEq)]
    struct Sum {
        calls: u64,
        bytes: u64,
        failed: u64,
        live_bytes: u64,
        live_allocations: u64,
    }
    let mut got: BTreeMap<(String, String), Sum> = BTreeMap::new();
    for s in array(proc, "sites") {
        let api = str_at(s, "api");
        let e = got.entry((api.to_owned(), frame0_function(s))).or_default();
        e.calls += u64_at(s, "calls");
        e.bytes += u64_at(s, "bytes");
        e.failed += u64_at(s, "failed");
        if api != "free" {
            e.live_bytes += u64_at(s, "live_bytes");
            e.live_allocations += u64_at(s, "live_allocations");
        }
        check_frame0_location(s);
        assert_frames_reach_main(s);
    }
    let want: BTreeMap<(String, String), Sum> = SITES
        .iter()
        .map(|s| {
            let free = s.api == "free";
            let sum = Sum {
                calls: s.calls,
                bytes: s.bytes,
                failed: 0,
                live_bytes: if free { 0 } else { s.live_bytes },
                live_allocations: if free { 0 } else { s.live_allocations },
            };
            ((fold(aliases, s.api), s.function.to_owned()), sum)
        })
        .collect();
    assert_eq!(got, want, "sites per (api, frame 0 function)\n{proc:#}");
}

/// The `loop` fixture's report after it was stopped at an arbitrary point.
fn check_loop_counts(proc: &Value) {
    assert_eq!(proc["comm"], "libc_fixture", "comm\n{proc:#}");
    let mallocs = u64_at(&proc["calls"], "malloc");
    let frees = u64_at(&proc["calls"], "free");
    assert!(
        mallocs >= 10,
        "traced ≥ 0.5 s of a ~1 kHz loop: {mallocs} mallocs\n{proc:#}"
    );
    assert!(
        mallocs.abs_diff(frees) <= 1,
        "malloc {mallocs} vs free {frees}"
    );
    assert_eq!(u64_at(&proc["bytes"], "malloc"), mallocs * LOOP_BLOCK);
    let live = u64_at(proc, "live_allocations");
    assert!(
        live <= 1,
        "at most the block between malloc and free is live: {live}"
    );
    assert_eq!(
        u64_at(proc, "live_bytes"),
        live * LOOP_BLOCK,
        "live_bytes\n{proc:#}"
    );
    let loop_sites: BTreeSet<String> = array(proc, "sites")
        .iter()
        .filter(|s| frame0_function(s) == "fx_loop")
        .map(|s| str_at(s, "api").to_owned())
        .collect();
    let want = BTreeSet::from(["free".to_owned(), "malloc".to_owned()]);
    assert_eq!(loop_sites, want, "APIs called from fx_loop\n{proc:#}");
}

fn detach_on_signal(sig: libc::c_int) {
    let env = TestEnv::get();
    let _serial = serial();
    let before = KernelState::snapshot();
    let mut fixture = Fixture::spawn(&env.fixture, "loop", "loop");
    let pid = fixture.pid;
    let (mut aw, out) = spawn_json(
        &env,
        &format!("top-signal-{sig}"),
        &["top"],
        &["--pid", &pid.to_string()],
    );
    assert_eq!(
        aw.wait_tracing_pid(Duration::from_secs(30)),
        pid,
        "traced pid"
    );
    thread::sleep(Duration::from_millis(500));
    let held = BpfIds::held_by(aw.child.id());
    assert!(
        !held.progs.is_empty(),
        "allocwatch holds no BPF program while tracing: {held:?}"
    );
    signal(aw.child.id(), sig);
    let status = aw.wait_exit(Duration::from_secs(5));
    aw.assert_success(status);
    assert!(
        fixture.child.try_wait().ok().flatten().is_none(),
        "allocwatch must leave a --pid target running"
    );
    let report = read_json(&out);
    let proc = process_by_pid(&report, pid);
    assert_eq!(
        proc["exited"], false,
        "the loop fixture is still running\n{proc:#}"
    );
    check_loop_counts(proc);
    held.assert_all_gone("allocwatch", BPF_FREE_LIMIT);
    KernelState::snapshot().assert_nothing_added(&before);
    signal(pid, libc::SIGKILL);
    fixture.wait_exit(Duration::from_secs(5));
}

/// `allocwatch ARGS… --json -o FILE TARGET…` started (TARGET: `-- CMD…` or `--pid PID`),
/// and FILE, a fresh temporary file named after `name`.
/// Runs `allocwatch ARGS --json -o FILE TARGET` until the target exits on its own (allocwatch
/// must exit 0): allocwatch (for its stderr), the traced pid and that process's report.
fn run_json(env: &TestEnv, name: &str, args: &[&str], target: &[&str]) -> (Allocwatch, u32, Value) {
    let (mut aw, out) = spawn_json(env, name, args, target);
    let pid = aw.wait_tracing_pid(Duration::from_secs(30));
    let status = aw.wait_exit(Duration::from_secs(60));
    aw.assert_success(status);
    let report = read_json(&out);
    let proc = process_by_pid(&report, pid).clone();
    (aw, pid, proc)
}

fn spawn_json(env: &TestEnv, name: &str, args: &[&str], target: &[&str]) -> (Allocwatch, PathBuf) {
    let out = env.temp_file(&format!("{name}.json"));
    let mut all = args.to_vec();
    all.extend(["--json", "-o", path_str(&out)]);
    all.extend_from_slice(target);
    let aw = Allocwatch::spawn(env, &all);
    (aw, out)
}

/// One program's calls and bytes per API in a followed tree: the fixture's `run` work exactly.
fn check_program_counts(p: &Value, aliases: &BTreeMap<String, String>) {
    let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for &(api, calls, bytes) in API_TOTALS {
        let e = want.entry(fold(aliases, api)).or_default();
        e.0 += calls;
        e.1 += bytes;
    }
    for (api, (calls, bytes)) in &want {
        assert_eq!(u64_at(&p["calls"], api), *calls, "calls.{api}\n{p:#}");
        assert_eq!(u64_at(&p["bytes"], api), *bytes, "bytes.{api}\n{p:#}");
    }
}

fn assert_no_loss(proc: &Value) {
    for key in LOSS_KEYS {
        assert_eq!(u64_at(&proc["lost"], key), 0, "lost.{key}\n{proc:#}");
    }
}

/// Frame 0 is the fixture's own code, with file:line from its DWARF.
fn check_frame0_location(site: &Value) {
    let f = &array(site, "frames")[0];
    assert!(
        str_at(f, "file").ends_with("libc_fixture.c"),
        "frame 0 file\n{site:#}"
    );
    assert!(u64_at(f, "line") > 0, "frame 0 line\n{site:#}");
    assert!(
        str_at(f, "module").ends_with("/libc_fixture"),
        "frame 0 module\n{site:#}"
    );
}

fn assert_frames_reach_main(site: &Value) {
    let found = array(site, "frames")
        .iter()
        .any(|f| f["function"] == "main");
    assert!(
        found,
        "no `main` in the frames (frame-pointer walk cut short?)\n{site:#}"
    );
}

fn frame0_function(site: &Value) -> String {
    let frames = array(site, "frames");
    assert!(!frames.is_empty(), "site without frames\n{site:#}");
    str_at(&frames[0], "function").to_owned()
}

/// The `aliases` object: alias name -> the name its calls are reported under.
fn aliases_of(proc: &Value) -> BTreeMap<String, String> {
    proc["aliases"]
        .as_object()
        .unwrap_or_else(|| panic!("no aliases object\n{proc:#}"))
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str().expect("alias target is a string").to_owned(),
            )
        })
        .collect()
}

fn fold(aliases: &BTreeMap<String, String>, api: &str) -> String {
    aliases.get(api).map_or(api, String::as_str).to_owned()
}

/// `aliases` must describe exactly the APIs that share an address in `libc` (from `nm -D`, an
/// independent reading of the same ELF).
fn check_aliases(aliases: &BTreeMap<String, String>, libc: &Path) {
    for group in address_groups(libc, APIS) {
        let targets: BTreeSet<String> = group.iter().map(|a| fold(aliases, a)).collect();
        assert_eq!(
            targets.len(),
            1,
            "{group:?} share an address: one name expected, {aliases:?}"
        );
        let target = targets.first().unwrap();
        assert!(group.contains(target), "{target} is not in {group:?}");
        assert!(
            !aliases.contains_key(target),
            "alias target {target} is itself an alias"
        );
    }
    let grouped: BTreeSet<String> = address_groups(libc, APIS).into_iter().flatten().collect();
    for alias in aliases.keys() {
        assert!(
            grouped.contains(alias),
            "{alias} is reported as an alias but has its own address"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

struct TestEnv {
    bin: PathBuf,
    fixture: PathBuf,
}

impl TestEnv {
    /// Panics when anything the tests need is missing (`ALLOCWATCH_BIN` unset: plain `cargo
    /// test` without `./x test`): these tests must run, never pass by skipping.
    fn get() -> Self {
        Self {
            bin: allocwatch_bin("root and the built binary and fixtures"),
            fixture: libc_fixture(),
        }
    }

    fn temp_file(&self, name: &str) -> PathBuf {
        support::temp_file(name)
    }
}

impl AllocwatchBin for TestEnv {
    fn bin(&self) -> &Path {
        &self.bin
    }
}
