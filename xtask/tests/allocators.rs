//! Allocators other than the dynamic glibc: libc_fixture.c linked against each allocator Debian
//! ships (jemalloc, tcmalloc, tcmalloc_minimal, mimalloc), musl (dynamic and `musl-gcc
//! -static`) and a static glibc program (`xtask/src/fixtures.rs`, `build_allocators`), traced
//! with real uprobes. `./x test` runs them as root with `ALLOCWATCH_FIXTURES` set.
//!
//! Each fixture runs `wait-run`: it waits for SIGUSR1 before its work, so allocwatch (and
//! bpftrace) attach after the process's start-up (tcmalloc's libstdc++ allocates before
//! `main`) and count exactly the fixture's own calls, the numbers of `support::API_TOTALS`
//! (no `pvalloc` in the musl builds: musl has none).
//!
//! Which file serves which API follows the dynamic linker (the executable, then DT_NEEDED in
//! load order); the table below is what Debian 12's packages define (`nm -D`):
//!
//! | variant | serves malloc | files probed (the next serve what the first lacks) |
//! |---|---|---|
//! | jemalloc | libjemalloc.so.2 | + libc.so.6 (`reallocarray`, `pvalloc`) |
//! | tcmalloc, tcmalloc_minimal | libtcmalloc*.so.4.* | + libc.so.6 (`reallocarray`) |
//! | mimalloc | libmimalloc.so.2.* | none: it defines all ten |
//! | musl | musl's libc.so | none (no `pvalloc` anywhere) |
//! | musl-static, glibc-static | the executable | none |
//! | jemalloc-prefixed | libc.so.6 (the program calls `je_malloc`) | + the executable's `je_*` |
//! | glibc fixture, `LD_PRELOAD=libtcmalloc_minimal.so.4` | the preloaded tcmalloc | + libc.so.6 |
//!
//! The C++ tests (`cxx_new_*`, `agent_exports_cxx_operators`) run fixtures/c/cxx_new.cpp (every
//! `operator new`/`delete` overload) built with g++ against tcmalloc, mimalloc, jemalloc and
//! plain glibc; `redis_server_on_jemalloc` traces Debian's redis-server.

mod support;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde_json::Value;
use support::{
    API_TOTALS, Allocwatch, AllocwatchBin, Fixture, LOSS_KEYS, agent::Agent, agent::Identity,
    allocwatch_bin, env_path, path_str, process_by_pid, read_json, serial, signal, str_at,
};

/// Runs `top --pid` (JSON, or the text view with `json` false) on the `variant` fixture's
/// `wait-run`; the fixture's pid and the report (JSON) or the text.
fn trace_variant(
    env: &TestEnv,
    variant: &str,
    json: bool,
    during: impl FnOnce(u32),
) -> (u32, Value, String) {
    trace_variant_with(env, variant, &[], json, during)
}

/// [`trace_variant`] with `top`'s options `extra` (`--mode count`).
fn trace_variant_with(
    env: &TestEnv,
    variant: &str,
    extra: &[&str],
    json: bool,
    during: impl FnOnce(u32),
) -> (u32, Value, String) {
    trace_variant_mode(env, variant, "wait-run", extra, json, during)
}

/// [`trace_variant_with`] on the fixture's mode `mode` (one that waits for SIGUSR1 after
/// `ready <pid>`).
fn trace_variant_mode(
    env: &TestEnv,
    variant: &str,
    mode: &str,
    extra: &[&str],
    json: bool,
    during: impl FnOnce(u32),
) -> (u32, Value, String) {
    let fixture = env.fixture(variant);
    let mut fx = Fixture::spawn(&fixture, mode, "ready");
    let pid = fx.pid;
    let out = support::temp_file(&format!("allocators-{variant}.json"));
    let pid_arg = pid.to_string();
    let mut args = vec!["top"];
    args.extend(extra);
    if json {
        args.extend(["--json", "-o", path_str(&out)]);
    }
    args.extend(["--pid", &pid_arg]);
    let mut aw = Allocwatch::spawn_with_stdout(env, &args);
    assert_eq!(
        aw.wait_tracing_pid(Duration::from_secs(30)),
        pid,
        "traced pid"
    );
    during(pid);
    signal(pid, libc::SIGUSR1);
    let status = fx.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{variant} fixture failed: {status}");
    let status = aw.wait_exit(Duration::from_secs(15));
    aw.assert_success(status);
    let text = aw.stdout();
    if !json {
        return (pid, Value::Null, text);
    }
    let report = read_json(&out);
    (pid, process_by_pid(&report, pid).clone(), text)
}

/// The exact calls and bytes per API (aliases folded as reported), no loss, the allocator and
/// the files probed (`files`: the start of each file name, in order; `exe` for the executable).
fn check_report(proc: &Value, variant: &str, allocator: &str, files: &[&str]) {
    check_report_mode(proc, variant, allocator, files, false);
}

/// [`check_report`]; `count_mode`: `free`'s bytes are not known (reported 0) without the
/// live table.
fn check_report_mode(
    proc: &Value,
    variant: &str,
    allocator: &str,
    files: &[&str],
    count_mode: bool,
) {
    check_allocator_files(proc, allocator, files);
    let aliases = aliases_map(proc);
    // The prefixed build's own memalign is je_memalign, not glibc's alias of aligned_alloc
    // (which `aliases` names for the libc's memalign): nothing of the fixture's is folded.
    let aliases = if variant == "jemalloc-prefixed" {
        BTreeMap::new()
    } else {
        aliases
    };
    for (api, (calls, bytes)) in expected(variant, &aliases) {
        assert_eq!(
            count_at(&proc["calls"], &api),
            calls,
            "calls.{api}\n{proc:#}"
        );
        let bytes = if count_mode && api == "free" {
            0
        } else {
            bytes
        };
        assert_eq!(
            count_at(&proc["bytes"], &api),
            bytes,
            "bytes.{api}\n{proc:#}"
        );
    }
    check_no_loss(proc);
}

/// No event lost (symbolization notes such as `symbolize_stack_cut` are not losses).
fn check_no_loss(proc: &Value) {
    for cause in LOSS_KEYS {
        assert_eq!(count_at(&proc["lost"], cause), 0, "lost.{cause}\n{proc:#}");
    }
}

/// The allocator and the files probed (`files`: the start of each file name, in order; `exe`
/// for the executable); the first serves `malloc`.
fn check_allocator_files(proc: &Value, allocator: &str, files: &[&str]) {
    assert_eq!(proc["allocator"], allocator, "allocator\n{proc:#}");
    let probed: Vec<&str> = proc["allocator_files"]
        .as_array()
        .unwrap_or_else(|| panic!("no allocator_files\n{proc:#}"))
        .iter()
        .map(|f| f.as_str().unwrap_or_default())
        .collect();
    assert_eq!(probed.len(), files.len(), "allocator_files\n{proc:#}");
    for (path, want) in probed.iter().zip(files) {
        let name = path.rsplit('/').next().unwrap_or_default();
        let ok = if *want == "exe" {
            *path == str_at(proc, "exe")
        } else {
            name.starts_with(want)
        };
        assert!(ok, "{path}: expected {want}\n{proc:#}");
    }
    assert_eq!(
        str_at(proc, "libc"),
        probed[0],
        "libc: the file serving malloc"
    );
}

/// The fixture's work per API (`support::API_TOTALS`; no pvalloc in the musl builds), aliases
/// folded into the name they are counted under.
fn expected(variant: &str, aliases: &BTreeMap<String, String>) -> BTreeMap<String, (u64, u64)> {
    let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for &(api, calls, bytes) in API_TOTALS {
        let (calls, bytes) = if api == "pvalloc" && variant.starts_with("musl") {
            (0, 0)
        } else {
            (calls, bytes)
        };
        let e = want
            .entry(aliases.get(api).map_or(api, String::as_str).to_owned())
            .or_default();
        e.0 += calls;
        e.1 += bytes;
    }
    want
}

/// A count in a JSON object keyed by API; an absent API counts 0.
fn count_at(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn check_variant(variant: &str, allocator: &str, files: &[&str]) {
    let env = TestEnv::get();
    let _serial = serial();
    let (_, proc, _) = trace_variant(&env, variant, true, |_| {});
    check_report(&proc, variant, allocator, files);
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn jemalloc_exact_counts() {
    check_variant("jemalloc", "jemalloc", &["libjemalloc.so", "libc.so.6"]);
}

/// A `je_`-prefixed jemalloc inside the executable (fixtures/c/je_prefix.h): the fixture's own
/// calls go to `je_malloc` & co. (counted under the libc names), reallocarray and pvalloc to
/// glibc; glibc still serves `malloc` for everything else and is probed first.
#[test]
fn jemalloc_prefixed_exact_counts() {
    check_variant("jemalloc-prefixed", "jemalloc", &["libc.so.6", "exe"]);
}

#[test]
fn tcmalloc_exact_counts() {
    check_variant("tcmalloc", "tcmalloc", &["libtcmalloc.so", "libc.so.6"]);
}

#[test]
fn tcmalloc_minimal_exact_counts() {
    check_variant(
        "tcmalloc_minimal",
        "tcmalloc",
        &["libtcmalloc_minimal.so", "libc.so.6"],
    );
}

#[test]
fn mimalloc_exact_counts() {
    check_variant("mimalloc", "mimalloc", &["libmimalloc.so"]);
}

/// Count mode (entry probes only) on Debian's libmimalloc: its relays go through functions in
/// between (`posix_memalign` → `mi_posix_memalign` → `mi_malloc_aligned`; `realloc` →
/// `mi_heap_realloc` → a static function → `mi_free`; `aligned_alloc` → `mi_aligned_alloc`
/// and `valloc` → `mi_valloc` → `mi_memalign`, tail jumps through the PLT into
/// `mi_malloc_aligned`), each call still counted once (`agent/src/target/relays.rs`): no
/// `mi_malloc_aligned` call, which the fixture never makes itself. Then the fixture's
/// `wait-move` work: a `reallocarray` that moves its block reaches `mi_free` two functions
/// deep (`reallocarray` → `mi_reallocarray`, which calls `mi_reallocn`, whose tail jumps reach
/// the static function that calls `mi_free`): not counted as the program's `free`.
#[test]
fn mimalloc_count_mode_exact_counts() {
    check_count_mode("mimalloc", "mimalloc", &["libmimalloc.so"]);
    check_count_mode_move("mimalloc", "mimalloc", &["libmimalloc.so"]);
}

/// The fixture's `wait-move` work (5 × `malloc(16)`, each block moved by `reallocarray(p, 64,
/// 64)`, then freed) in full mode and in `--mode count`: each exactly those calls and bytes
/// (count mode: no bytes for `free`), no other API, and the same calls per immediate caller.
fn check_count_mode_move(variant: &str, allocator: &str, files: &[&str]) {
    let env = TestEnv::get();
    let _serial = serial();
    let want = [
        ("malloc", 5, 5 * 16),
        ("reallocarray", 5, 5 * 64 * 64),
        ("free", 5, 5 * 64 * 64),
    ];
    let mut reports = Vec::new();
    for extra in [&[][..], &["--mode", "count"]] {
        let (_, proc, _) = trace_variant_mode(&env, variant, "wait-move", extra, true, |_| {});
        let count_mode = !extra.is_empty();
        check_allocator_files(&proc, allocator, files);
        check_no_loss(&proc);
        let aliases = aliases_map(&proc);
        let name = |api: &str| aliases.get(api).cloned().unwrap_or_else(|| api.to_owned());
        for (api, calls, bytes) in want {
            let bytes = if count_mode && api == "free" {
                0
            } else {
                bytes
            };
            let api = name(api);
            assert_eq!(
                (
                    count_at(&proc["calls"], &api),
                    count_at(&proc["bytes"], &api)
                ),
                (calls, bytes),
                "{api} (count mode: {count_mode})\n{proc:#}"
            );
        }
        for key in ["calls", "bytes"] {
            for (api, n) in proc[key].as_object().into_iter().flatten() {
                assert!(
                    n.as_u64() == Some(0) || want.iter().any(|w| name(w.0) == *api),
                    "{key}.{api}: {n}, an API the fixture does not call (count mode: \
                     {count_mode})\n{proc:#}"
                );
            }
        }
        reports.push(proc);
    }
    assert_eq!(
        callers_of(&reports[1]),
        callers_of(&reports[0]),
        "count mode's callers vs full mode's\ncount: {:#}\nfull: {:#}",
        reports[1],
        reports[0]
    );
}

/// Count mode on the jemalloc fixture: glibc's `reallocarray` tail-jumps through its PLT into
/// `realloc`, which libjemalloc serves, a relay across files: the fixture's 2 reallocarray
/// calls count as reallocarray alone, its realloc calls 6 times, not 8 (the thread's record
/// names APIs by id, and `realloc` is read in every file as a name some PLT jumps to).
#[test]
fn jemalloc_count_mode_exact_counts() {
    check_count_mode("jemalloc", "jemalloc", &["libjemalloc.so", "libc.so.6"]);
}

/// [`jemalloc_count_mode_exact_counts`] with libtcmalloc (glibc's `reallocarray` into its
/// `realloc`).
#[test]
fn tcmalloc_count_mode_exact_counts() {
    check_count_mode("tcmalloc", "tcmalloc", &["libtcmalloc.so", "libc.so.6"]);
}

#[test]
fn tcmalloc_minimal_count_mode_exact_counts() {
    check_count_mode(
        "tcmalloc_minimal",
        "tcmalloc",
        &["libtcmalloc_minimal.so", "libc.so.6"],
    );
}

/// The `variant` fixture traced in full mode and then in `--mode count`: each exactly the
/// fixture's own calls and bytes per API, and count mode the same calls and bytes as full
/// mode per API and immediate caller (free bytes excepted: unknown without the live table).
fn check_count_mode(variant: &str, allocator: &str, files: &[&str]) {
    let env = TestEnv::get();
    let _serial = serial();
    let (_, full, _) = trace_variant(&env, variant, true, |_| {});
    check_report(&full, variant, allocator, files);
    check_only_fixture_apis(&full, variant);
    let (_, count, _) = trace_variant_with(&env, variant, &["--mode", "count"], true, |_| {});
    check_report_mode(&count, variant, allocator, files, true);
    check_only_fixture_apis(&count, variant);
    assert_eq!(
        callers_of(&count),
        callers_of(&full),
        "count mode's callers vs full mode's\ncount: {count:#}\nfull: {full:#}"
    );
}

/// Every API the report counts calls or bytes of is one the fixture calls ([`expected`]): an
/// allocator's relay into an API of its own (mimalloc's `aligned_alloc` into
/// `mi_malloc_aligned`) counted as the program's call shows up here.
fn check_only_fixture_apis(proc: &Value, variant: &str) {
    let want = expected(variant, &aliases_map(proc));
    for key in ["calls", "bytes"] {
        for (api, n) in proc[key].as_object().into_iter().flatten() {
            assert!(
                n.as_u64() == Some(0) || want.contains_key(api),
                "{key}.{api}: {n}, an API the fixture does not call\n{proc:#}"
            );
        }
    }
}

/// (API, the immediate caller's function) → (calls, bytes; 0 for frees), summed over a
/// report's `sites` (full mode's are whole stacks, count mode's immediate callers).
fn callers_of(proc: &Value) -> BTreeMap<(String, String), (u64, u64)> {
    let mut out: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for site in proc["sites"]
        .as_array()
        .unwrap_or_else(|| panic!("no sites\n{proc:#}"))
    {
        let api = str_at(site, "api").to_owned();
        let function = site["frames"][0]["function"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let bytes = if api == "free" {
            0
        } else {
            count_at(site, "bytes")
        };
        let e = out.entry((api, function)).or_default();
        e.0 += count_at(site, "calls");
        e.1 += bytes;
    }
    out
}

#[test]
fn musl_exact_counts() {
    check_variant("musl", "musl", &["libc.so"]);
}

#[test]
fn musl_static_exact_counts() {
    check_variant("musl-static", "musl", &["exe"]);
}

#[test]
fn glibc_static_exact_counts() {
    check_variant("glibc-static", "glibc", &["exe"]);
}

/// The glibc-linked fixture with `LD_PRELOAD=libtcmalloc_minimal.so.4`: the preloaded file
/// comes before the executable's DT_NEEDED libc in the resolution order (read from the
/// process's environment), so tcmalloc serves malloc, with the same exact counts.
#[test]
fn ld_preload_decides_the_allocator() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = support::libc_fixture();
    let mut child = KillOnDrop(
        Command::new(&fixture)
            .arg("wait-run")
            .env("LD_PRELOAD", "libtcmalloc_minimal.so.4")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", fixture.display())),
    );
    let pid = child.0.id();
    let stderr = support::Lines::follow(child.0.stderr.take().unwrap());
    let line = stderr.wait_for("ready ", Duration::from_secs(10));
    assert_eq!(line, format!("ready {pid}"), "fixture's ready line");
    let out = support::temp_file("allocators-preload.json");
    let pid_arg = pid.to_string();
    let mut aw = Allocwatch::spawn(
        &env,
        &["top", "--json", "-o", path_str(&out), "--pid", &pid_arg],
    );
    assert_eq!(
        aw.wait_tracing_pid(Duration::from_secs(30)),
        pid,
        "traced pid"
    );
    signal(pid, libc::SIGUSR1);
    let status = support::wait_child(&mut child.0, Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "fixture: {status:?}");
    let status = aw.wait_exit(Duration::from_secs(15));
    aw.assert_success(status);
    let report = read_json(&out);
    check_report(
        process_by_pid(&report, pid),
        "preload",
        "tcmalloc",
        &["libtcmalloc_minimal.so", "libc.so.6"],
    );
}

/// bpftrace on jemalloc's own `malloc`, `free` and `realloc` (and glibc's `reallocarray`,
/// which the process's calls reach in libc.so.6), entry probes only, attached after the
/// fixture's start-up, in the same run as allocwatch, in full mode and in `--mode count`: the
/// raw entries agree with allocwatch's program-level counts, `realloc`'s raw entries being
/// the program's calls plus each `reallocarray`'s relay into it (glibc's tail jump through
/// its PLT into libjemalloc), which allocwatch counts once, as `reallocarray`.
#[test]
fn jemalloc_counts_match_bpftrace() {
    let env = TestEnv::get();
    let _serial = serial();
    let jemalloc = mapped_file("libjemalloc.so");
    let libc = mapped_file("libc.so.6");
    for mode in [&[][..], &["--mode", "count"][..]] {
        let mut bpftrace = None;
        let (_, proc, _) = trace_variant_with(&env, "jemalloc", mode, true, |pid| {
            // BEGIN runs once every probe is attached ("attached_probes" comes before that).
            let script = format!(
                "BEGIN {{ printf(\"bpftrace-ready\\n\"); }} \
                 uprobe:{j}:malloc,uprobe:{j}:free,uprobe:{j}:realloc,\
                 uprobe:{l}:reallocarray /pid == {pid}/ \
                 {{ @calls[probe] = count(); }}",
                j = jemalloc.display(),
                l = libc.display()
            );
            bpftrace = Some(start_bpftrace(&script));
        });
        // The fixture has exited: stop bpftrace (SIGINT: it prints its maps and exits).
        interrupt_bpftrace();
        let raw = bpftrace_counts(bpftrace.expect("bpftrace started"));
        let counted = |api: &str| count_at(&proc["calls"], api);
        let mut want: BTreeMap<String, u64> = ["malloc", "free", "reallocarray"]
            .iter()
            .map(|api| (api.to_string(), counted(api)))
            .collect();
        want.insert(
            "realloc".into(),
            counted("realloc") + counted("reallocarray"),
        );
        assert_eq!(
            raw, want,
            "bpftrace's raw entries vs allocwatch's counts ({mode:?})\n{proc:#}"
        );
        assert_eq!(counted("malloc"), 7, "the fixture's 7 malloc calls");
        assert_eq!(counted("free"), 17, "the fixture's 17 free calls");
        assert_eq!(counted("realloc"), 6, "the fixture's 6 realloc calls");
        assert_eq!(
            counted("reallocarray"),
            2,
            "the fixture's 2 reallocarray calls"
        );
    }
}

/// The text view names the allocator and its files.
#[test]
fn text_view_names_the_allocator() {
    let env = TestEnv::get();
    let _serial = serial();
    let (pid, _, text) = trace_variant(&env, "tcmalloc", false, |_| {});
    let head = text.lines().next().unwrap_or_default();
    assert!(
        head.starts_with(&format!("allocwatch top — pid {pid} (libc_fixture)"))
            && head.contains(", allocator tcmalloc (/")
            && head.contains("libtcmalloc.so.4")
            && head.ends_with("/libc.so.6)"),
        "first line of the text view: {head}\n{text}"
    );
}

/// The agent's `/metrics`: `allocwatch_allocator_info{allocator="jemalloc"} 1` for the
/// jemalloc fixture's identity, its exact calls, and promtool's check of the whole page.
#[test]
fn agent_exports_the_allocator() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = support::Scratch::new("alloc-agent");
    let fixture = scratch.copy(&env.fixture("jemalloc"), "libc_fixture");
    let id = Identity::of(&fixture);
    // Every site its own series: the fixture's ten and any start-up ones (checked below).
    let mut agent = Agent::start(&env, &["--top-k", "100"]);
    let mut fx = Fixture::spawn(&fixture, "wait-run", "ready");
    agent.wait_for_identity(&id, fx.started);
    // Released only once the agent has found its allocator, which it says after attaching
    // the new file's probes: a process is listed as soon as it execs, before ld.so maps
    // libjemalloc, and the agent looks again every discovery pass (calls made before that
    // are not counted: glibc's probes are attached already, a new allocator's are not).
    let jemalloc = [("allocator", "jemalloc")];
    agent.scrape_until("the fixture's allocator", Duration::from_secs(20), |m| {
        m.value(&id, "allocwatch_allocator_info", &jemalloc) == Some(1.0)
    });
    signal(fx.pid, libc::SIGUSR1);
    let status = fx.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "fixture wait-run failed: {status}");
    // A bound, not a wait: under load the agent's drain and scrape take a few seconds. Every
    // site named too (a site not named yet is left out of the site series for a few scrapes).
    let m = agent.scrape_until("the fixture's final counts", Duration::from_secs(20), |m| {
        m.value(&id, "allocwatch_free_calls_total", &[]) == Some(17.0) && m.sites_complete(&id)
    });
    assert_eq!(
        m.of(&id, "allocwatch_allocator_info").len(),
        1,
        "one allocator\n{}",
        m.lines_of(&id)
    );
    // The fixture's own calls, exactly, by its `fx_` sites. The totals may hold start-up calls
    // as well: when the agent attaches libjemalloc's probes before libstdc++'s constructor has
    // run (libjemalloc needs libstdc++), that constructor's malloc of its exception emergency
    // pool (72,704 bytes) is counted too. Those are allowed only at sites outside the fixture's
    // code, and only before `main` (no fixture frame on their stacks either).
    let sites = m.sites(&id);
    for &(api, calls, bytes) in API_TOTALS.iter().filter(|(api, ..)| *api != "free") {
        let of_api = || sites.iter().filter(move |((a, _), _)| a == api);
        let own = of_api()
            .filter(|((_, site), _)| site.starts_with("fx_"))
            .fold((0, 0), |(c, b), (_, v)| (c + v.calls, b + v.bytes));
        assert_eq!(
            own,
            (calls, bytes),
            "{api}: the fixture's sites\n{}",
            m.lines_of(&id)
        );
        let startup: Vec<_> = of_api()
            .filter(|((_, site), _)| !site.starts_with("fx_"))
            .collect();
        for ((_, site), _) in &startup {
            let frames: Vec<&str> = site.split(" <- ").collect();
            assert!(
                site != "other" && !frames.iter().any(|f| f.starts_with("fx_") || *f == "main"),
                "{api}: a call at {site:?} that is not start-up\n{}",
                m.lines_of(&id)
            );
        }
        let total = m.value(&id, "allocwatch_alloc_calls_total", &[("api", api)]);
        let startup_calls: u64 = startup.iter().map(|(_, v)| v.calls).sum();
        assert_eq!(
            total,
            Some((calls + startup_calls) as f64),
            "{api}: totals = the fixture's calls + start-up calls\n{}",
            m.lines_of(&id)
        );
    }
    support::agent::promtool_check_metrics(&m.text);
    agent.stop();
}

// ---------------------------------------------------------------------------------------------
// C++ operator new/delete (fixtures/c/cxx_new.cpp)

/// Every `operator new`/`delete` overload: (mangled symbol, the name allocwatch reports, the
/// fixture's calls, bytes: requested by a new, of the blocks freed by a delete). Keep in sync
/// with fixtures/c/cxx_new.cpp.
const CXX_CALLS: &[(&str, &str, u64, u64)] = &[
    ("_Znwm", "new", 7, 700),
    ("_Znam", "new[]", 5, 1000),
    ("_ZnwmRKSt9nothrow_t", "new(nothrow)", 4, 192),
    ("_ZnamRKSt9nothrow_t", "new[](nothrow)", 3, 192),
    ("_ZnwmSt11align_val_t", "new(align)", 6, 1536),
    ("_ZnamSt11align_val_t", "new[](align)", 2, 256),
    (
        "_ZnwmSt11align_val_tRKSt9nothrow_t",
        "new(align,nothrow)",
        2,
        192,
    ),
    (
        "_ZnamSt11align_val_tRKSt9nothrow_t",
        "new[](align,nothrow)",
        1,
        80,
    ),
    ("_ZdlPv", "delete", 5, 396),
    ("_ZdaPv", "delete[]", 3, 600),
    ("_ZdlPvm", "delete(size)", 2, 200),
    ("_ZdaPvm", "delete[](size)", 1, 200),
    ("_ZdlPvSt11align_val_t", "delete(align)", 4, 1024),
    ("_ZdaPvSt11align_val_t", "delete[](align)", 1, 128),
    ("_ZdlPvmSt11align_val_t", "delete(size,align)", 1, 256),
    ("_ZdaPvmSt11align_val_t", "delete[](size,align)", 1, 128),
    ("_ZdlPvRKSt9nothrow_t", "delete(nothrow)", 1, 48),
    ("_ZdaPvRKSt9nothrow_t", "delete[](nothrow)", 1, 64),
    (
        "_ZdlPvSt11align_val_tRKSt9nothrow_t",
        "delete(align,nothrow)",
        1,
        96,
    ),
    (
        "_ZdaPvSt11align_val_tRKSt9nothrow_t",
        "delete[](align,nothrow)",
        1,
        80,
    ),
];

/// An overload the allocator does not define is libstdc++'s, which calls another one (GCC 12's
/// libsupc++): Debian 12's mimalloc has no nothrow deletes.
const CXX_FALLBACK: &[(&str, &str)] = &[
    ("_ZdlPvRKSt9nothrow_t", "_ZdlPv"),
    ("_ZdaPvRKSt9nothrow_t", "_ZdaPv"),
    (
        "_ZdlPvSt11align_val_tRKSt9nothrow_t",
        "_ZdlPvSt11align_val_t",
    ),
    (
        "_ZdaPvSt11align_val_tRKSt9nothrow_t",
        "_ZdaPvSt11align_val_t",
    ),
];

/// What the fixture leaves live: (name, frame-0 function, blocks, bytes).
const CXX_LIVE: &[(&str, &str, u64, u64)] = &[
    ("new", "fx_new", 2, 200),
    ("new[]", "fx_new_array", 1, 200),
    ("new(nothrow)", "fx_new_nothrow", 1, 48),
    ("new[](nothrow)", "fx_new_array_nothrow", 2, 128),
    ("new(align)", "fx_new_aligned", 1, 256),
    ("new(align,nothrow)", "fx_new_aligned_nothrow", 1, 96),
];

/// bpftrace's rule for the outermost calls of `symbols` in `lib` by process `pid`: a call made
/// while none of them is in flight on the thread (its own uretprobes end it). The allocators'
/// overloads call or tail-jump into one another (jemalloc's `new[]` into its `new`, mimalloc's
/// sized delete into `free`), each program call is counted once.
fn outermost_rule(lib: &Path, symbols: &[String], pid: u32) -> String {
    nested_rule(lib, symbols, symbols, pid)
}

/// [`outermost_rule`] where only `nesting` (some of `symbols`) may call the others: only those
/// get return probes. A return probe replaces the return address on the stack at the entry,
/// before allocwatch's probe (placed past the entry) reads it: those calls' sites lose their
/// caller.
fn nested_rule(lib: &Path, symbols: &[String], nesting: &[String], pid: u32) -> String {
    let probes = |kind: &str, symbols: &mut dyn Iterator<Item = &String>| -> String {
        symbols
            .map(|s| format!("{kind}:\"{}\":{s}", lib.display()))
            .collect::<Vec<_>>()
            .join(",")
    };
    let leaves: Vec<&String> = symbols.iter().filter(|s| !nesting.contains(s)).collect();
    if nesting.is_empty() {
        // No depth to track (bpftrace refuses a map that is read but never written).
        return format!(
            "{} /pid == {pid}/ {{ @calls[probe] = count(); }}",
            probes("uprobe", &mut leaves.into_iter())
        );
    }
    let count = "if (@depth[tid] == 0) { @calls[probe] = count(); }";
    let mut rule = format!(
        "{} /pid == {pid}/ {{ {count} @depth[tid] = @depth[tid] + 1; }} \
         {} /pid == {pid}/ {{ @depth[tid] = @depth[tid] - 1; }}",
        probes("uprobe", &mut nesting.iter()),
        probes("uretprobe", &mut nesting.iter())
    );
    if !leaves.is_empty() {
        rule = format!(
            "{rule} {} /pid == {pid}/ {{ {count} }}",
            probes("uprobe", &mut leaves.into_iter())
        );
    }
    rule
}

/// One traced run of `alloc/cxx/VARIANT/cxx_new wait-run`: `top --json --pid` (with `mode`'s
/// arguments) and bpftrace on `symbols` of `lib` (their outermost calls: [`outermost_rule`]),
/// both attached before SIGUSR1. The report's process, and bpftrace's counts by symbol.
/// `--mode count` runs without bpftrace: its rule needs return probes, and another tracer's
/// return probe on an operator replaces the return address its relays re-enter with, which
/// count mode compares (README, "Limitations"); the fixture's own numbers are the check.
fn trace_cxx(
    variant: &str,
    mode: &[&str],
    lib: &Path,
    symbols: &[String],
) -> (Value, BTreeMap<String, u64>) {
    let (proc, raw, _) = trace_outermost(
        &TestEnv::get().cxx_fixture(variant),
        mode,
        lib,
        symbols,
        symbols,
        None,
    );
    (proc, raw)
}

/// [`trace_cxx`] for any fixture with a `wait-run` mode, bpftrace's rule [`nested_rule`]; with
/// `word`, also the rest of the fixture's stderr line that starts with it, written after its
/// work.
fn trace_outermost(
    fixture: &Path,
    mode: &[&str],
    lib: &Path,
    symbols: &[String],
    nesting: &[String],
    word: Option<&str>,
) -> (Value, BTreeMap<String, u64>, String) {
    let env = TestEnv::get();
    // `jemalloc-cxx_new`, `release-rust_alloc_jemalloc`: its directory and name.
    let name = |p: Option<&Path>| {
        p.and_then(Path::file_name)
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let variant = format!("{}-{}", name(fixture.parent()), name(Some(fixture)));
    let mut fx = Fixture::spawn(fixture, "wait-run", "ready");
    let pid = fx.pid;
    let out = support::temp_file(&format!("allocators-{variant}.json"));
    let pid_arg = pid.to_string();
    // Frame pointers (the fixture has them): the sites are checked by name, and with `auto`
    // an attached process's calls made before its unwind tables are loaded have no frames.
    let args: Vec<&str> = ["top", "--unwind", "fp", "--json", "-o", path_str(&out)]
        .into_iter()
        .chain(mode.iter().copied())
        .chain(["--pid", &pid_arg])
        .collect();
    let mut aw = Allocwatch::spawn(&env, &args);
    assert_eq!(
        aw.wait_tracing_pid(Duration::from_secs(30)),
        pid,
        "traced pid"
    );
    let peer = !mode.contains(&"count");
    let rx = peer.then(|| {
        start_bpftrace(&format!(
            "BEGIN {{ printf(\"bpftrace-ready\\n\"); }} {}",
            nested_rule(lib, symbols, nesting, pid)
        ))
    });
    signal(pid, libc::SIGUSR1);
    let said = word.map_or_else(String::new, |w| fx.wait_line(w, Duration::from_secs(30)));
    let status = fx.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{variant} failed: {status}");
    let status = aw.wait_exit(Duration::from_secs(15));
    aw.assert_success(status);
    let raw = rx.map_or_else(BTreeMap::new, |rx| {
        interrupt_bpftrace();
        bpftrace_counts(rx)
    });
    let report = read_json(&out);
    (process_by_pid(&report, pid).clone(), raw, said)
}

/// The C++ fixture under an allocator that defines the operators: exact calls and bytes per
/// overload as reported (aliases folded: tcmalloc's `new[]` is its `new`, its `delete` is
/// `free`), equal to bpftrace's entries from the fixture's code on the same symbols in the
/// same run; what stays live is exactly what no `delete` freed. In `--mode count` (entry
/// probes only: no live blocks, so no bytes freed) the calls and the bytes of each `new`.
fn check_cxx(variant: &str, lib_prefix: &str, mode: &[&str]) {
    let count = mode.contains(&"count");
    let _serial = serial();
    let lib = mapped_file_of(&TestEnv::get().cxx_fixture(variant), lib_prefix);
    let defined = defined_symbols(&lib);
    // One symbol per address: every probe at an address fires for each call there.
    let mut symbols: Vec<String> = Vec::new();
    for sym in CXX_CALLS.iter().map(|c| c.0).chain(["free"]) {
        let Some(addr) = defined.get(sym) else {
            continue;
        };
        if !symbols.iter().any(|s| defined[s] == *addr) {
            symbols.push(sym.to_owned());
        }
    }
    let (proc, raw) = trace_cxx(variant, mode, &lib, &symbols);
    assert_eq!(proc["allocator"], variant, "allocator\n{proc:#}");
    let aliases = aliases_map(&proc);
    let canonical = |name: &str| aliases.get(name).cloned().unwrap_or(name.to_owned());
    let name_of = |sym: &str| {
        CXX_CALLS
            .iter()
            .find(|c| c.0 == sym)
            .map_or(sym, |c| c.1)
            .to_owned()
    };
    // The fixture's own numbers, folded as reported (through libstdc++ where the allocator
    // lacks the overload).
    let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for &(sym, _, calls, bytes) in CXX_CALLS {
        let mut sym = sym;
        while !defined.contains_key(sym) {
            sym = CXX_FALLBACK
                .iter()
                .find(|f| f.0 == sym)
                .unwrap_or_else(|| panic!("{} has no {sym}", lib.display()))
                .1;
        }
        let e = want.entry(canonical(&name_of(sym))).or_default();
        e.0 += calls;
        e.1 += bytes;
    }
    for (api, (calls, bytes)) in &want {
        assert_eq!(
            count_at(&proc["calls"], api),
            *calls,
            "calls.{api}\n{proc:#}"
        );
        if count && (api.starts_with("delete") || api == "free") {
            continue;
        }
        assert_eq!(
            count_at(&proc["bytes"], api),
            *bytes,
            "bytes.{api}\n{proc:#}"
        );
    }
    for api in [
        "malloc",
        "calloc",
        "realloc",
        "aligned_alloc",
        "posix_memalign",
    ] {
        assert_eq!(count_at(&proc["calls"], api), 0, "calls.{api}\n{proc:#}");
    }
    // bpftrace: each address's outermost calls are the reported count of its canonical name.
    for sym in symbols.iter().filter(|_| !count) {
        let api = canonical(&name_of(sym));
        assert_eq!(
            raw.get(sym).copied().unwrap_or(0),
            count_at(&proc["calls"], &api),
            "bpftrace's {sym} (at {:#x}) vs allocwatch's {api}\nbpftrace: {raw:#?}\n{proc:#}",
            defined[sym]
        );
    }
    if !count {
        check_cxx_live(&proc, &canonical);
    }
    for cause in LOSS_KEYS {
        assert_eq!(count_at(&proc["lost"], cause), 0, "lost.{cause}\n{proc:#}");
    }
}

/// The live blocks per API: what no `delete` freed, nothing else; a site named has the
/// fixture function that allocated them. (Sites are not all named under `--pid`: some rows'
/// stacks come back without frames there, a symbolization matter this test leaves aside.)
fn check_cxx_live(proc: &Value, canonical: &dyn Fn(&str) -> String) {
    let mut got: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for site in proc["sites"].as_array().into_iter().flatten() {
        let n = count_at(site, "live_allocations");
        if n == 0 {
            continue;
        }
        let api = str_at(site, "api").to_owned();
        if let Some(f) = site["frames"][0]["function"].as_str() {
            assert!(
                CXX_LIVE
                    .iter()
                    .any(|&(a, func, ..)| canonical(a) == api && func == f),
                "live {api} blocks from {f}\n{proc:#}"
            );
        }
        let e = got.entry(api).or_default();
        e.0 += n;
        e.1 += count_at(site, "live_bytes");
    }
    let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for &(api, _, n, b) in CXX_LIVE {
        let e = want.entry(canonical(api)).or_default();
        e.0 += n;
        e.1 += b;
    }
    assert_eq!(got, want, "live blocks per api\n{proc:#}");
    assert_eq!(
        count_at(proc, "live_allocations"),
        8,
        "live_allocations\n{proc:#}"
    );
    assert_eq!(count_at(proc, "live_bytes"), 928, "live_bytes\n{proc:#}");
}

/// The agent's `/metrics` for the C++ fixture on jemalloc (every overload at its own address):
/// each `new` overload in `allocwatch_alloc_calls_total`, each `delete` in
/// `allocwatch_delete_calls_total`, by name, with the fixture's exact numbers; `free` none.
#[test]
fn agent_exports_cxx_operators() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = support::Scratch::new("alloc-agent-cxx");
    let fixture = scratch.copy(&env.cxx_fixture("jemalloc"), "cxx_new");
    let id = Identity::of(&fixture);
    let mut agent = Agent::start(&env, &[]);
    let mut fx = Fixture::spawn(&fixture, "wait-run", "ready");
    agent.wait_for_identity(&id, fx.started);
    let jemalloc = [("allocator", "jemalloc")];
    agent.scrape_until("the fixture's allocator", Duration::from_secs(20), |m| {
        m.value(&id, "allocwatch_allocator_info", &jemalloc) == Some(1.0)
    });
    signal(fx.pid, libc::SIGUSR1);
    let status = fx.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "cxx_new wait-run failed: {status}");
    let last = CXX_CALLS.last().expect("overloads");
    let m = agent.scrape_until("the fixture's final counts", Duration::from_secs(20), |m| {
        m.value(&id, "allocwatch_delete_calls_total", &[("api", last.1)]) == Some(last.2 as f64)
    });
    for &(_, name, calls, bytes) in CXX_CALLS {
        if name.starts_with("new") {
            let api = [("api", name)];
            assert_eq!(
                m.value(&id, "allocwatch_alloc_calls_total", &api),
                Some(calls as f64),
                "{name}\n{}",
                m.lines_of(&id)
            );
            assert_eq!(
                m.value(&id, "allocwatch_alloc_bytes_total", &api),
                Some(bytes as f64),
                "{name} bytes\n{}",
                m.lines_of(&id)
            );
        } else {
            assert_eq!(
                m.value(&id, "allocwatch_delete_calls_total", &[("api", name)]),
                Some(calls as f64),
                "{name}\n{}",
                m.lines_of(&id)
            );
        }
    }
    assert_eq!(
        m.value(&id, "allocwatch_free_calls_total", &[]),
        Some(0.0),
        "free: the deletes' own calls into jemalloc's free are theirs\n{}",
        m.lines_of(&id)
    );
    support::agent::promtool_check_metrics(&m.text);
    agent.stop();
}

/// `leaks --min-age 0s -- cxx_new run` on jemalloc: the blocks left live by `new` overloads,
/// per (overload, allocating function), exactly; a `new` freed by any `delete` is no leak.
/// (Start-up allocations through `malloc`, libstdc++'s emergency pool, are left aside.)
#[test]
fn cxx_leaks_jemalloc() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = env.cxx_fixture("jemalloc");
    let mut aw = Allocwatch::spawn_with_stdout(
        &env,
        &[
            "leaks",
            "--min-age",
            "0s",
            "--json",
            "--",
            path_str(&fixture),
            "run",
        ],
    );
    aw.wait_tracing_pid(Duration::from_secs(30));
    let status = aw.wait_exit(Duration::from_secs(60));
    aw.assert_success(status);
    let stdout = aw.stdout();
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("leaks --json stdout is not JSON ({e}):\n{stdout}"));
    let proc = report["processes"]
        .as_array()
        .and_then(|p| p.first())
        .unwrap_or_else(|| panic!("no process\n{report:#}"));
    let mut got: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for leak in proc["leaks"].as_array().into_iter().flatten() {
        let api = str_at(leak, "api");
        if !api.starts_with("new") && !api.starts_with("delete") {
            continue;
        }
        let f = leak["frames"][0]["function"].as_str().unwrap_or_default();
        let e = got.entry((api.to_owned(), f.to_owned())).or_default();
        e.0 += count_at(leak, "count");
        e.1 += count_at(leak, "bytes");
    }
    let want: BTreeMap<(String, String), (u64, u64)> = CXX_LIVE
        .iter()
        .map(|&(api, f, n, b)| ((api.to_owned(), f.to_owned()), (n, b)))
        .collect();
    assert_eq!(got, want, "C++ leaks per (api, frame 0)\n{proc:#}");
}

#[test]
fn cxx_new_tcmalloc() {
    check_cxx("tcmalloc", "libtcmalloc.so", &[]);
}

#[test]
fn cxx_new_mimalloc() {
    check_cxx("mimalloc", "libmimalloc.so", &[]);
}

#[test]
fn cxx_new_jemalloc() {
    check_cxx("jemalloc", "libjemalloc.so", &[]);
}

/// `--mode count` (entry probes only): the overloads' relays into one another (mimalloc's
/// deletes end in `free`, tcmalloc's and jemalloc's `new[]` in `new`) are told from the
/// program's calls without a return probe.
#[test]
fn cxx_new_count_mode() {
    check_cxx("tcmalloc", "libtcmalloc.so", &["--mode", "count"]);
    check_cxx("mimalloc", "libmimalloc.so", &["--mode", "count"]);
    check_cxx("jemalloc", "libjemalloc.so", &["--mode", "count"]);
}

/// Under glibc the program's operators are libstdc++'s, wrappers over malloc, aligned_alloc
/// and free: not probed (no double count), the calls counted once under the libc names —
/// equal to bpftrace on libc's functions, and to the fixture's operator calls (bpftrace on
/// libstdc++'s operators, outermost calls). libstdc++ rounds an aligned size up to its
/// alignment (80 at 32 → 96).
#[test]
fn cxx_new_glibc() {
    let _serial = serial();
    let fixture = TestEnv::get().cxx_fixture("glibc");
    let libstdcxx = mapped_file_of(&fixture, "libstdc++.so");
    let libc = mapped_file_of(&fixture, "libc.so.6");
    let env = TestEnv::get();
    let mut fx = Fixture::spawn(&fixture, "wait-run", "ready");
    let pid = fx.pid;
    let out = support::temp_file("allocators-cxx-glibc.json");
    let pid_arg = pid.to_string();
    let mut aw = Allocwatch::spawn(
        &env,
        &["top", "--json", "-o", path_str(&out), "--pid", &pid_arg],
    );
    assert_eq!(
        aw.wait_tracing_pid(Duration::from_secs(30)),
        pid,
        "traced pid"
    );
    let ops: Vec<String> = CXX_CALLS.iter().map(|c| c.0.to_owned()).collect();
    // libstdc++'s `new[]` tail-jumps into its `new`, its sized delete into its delete: the
    // outermost calls are the program's.
    let script = format!(
        "BEGIN {{ printf(\"bpftrace-ready\\n\"); }} {} \
         uprobe:{l}:malloc,uprobe:{l}:aligned_alloc,uprobe:{l}:free /pid == {pid}/ \
         {{ @calls[probe] = count(); }}",
        outermost_rule(&libstdcxx, &ops, pid),
        l = libc.display()
    );
    let rx = start_bpftrace(&script);
    signal(pid, libc::SIGUSR1);
    let status = fx.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "glibc cxx_new failed: {status}");
    let status = aw.wait_exit(Duration::from_secs(15));
    aw.assert_success(status);
    interrupt_bpftrace();
    let raw = bpftrace_counts(rx);
    let report = read_json(&out);
    let proc = process_by_pid(&report, pid);
    assert_eq!(proc["allocator"], "glibc", "allocator\n{proc:#}");
    let files = proc["allocator_files"].as_array().map_or(0, Vec::len);
    assert_eq!(
        files, 1,
        "only libc.so.6 is probed, not libstdc++\n{proc:#}"
    );
    for &(sym, name, calls, _) in CXX_CALLS {
        assert_eq!(
            raw.get(sym).copied(),
            Some(calls),
            "bpftrace's {sym}\n{raw:#?}"
        );
        assert_eq!(count_at(&proc["calls"], name), 0, "calls.{name}\n{proc:#}");
    }
    let sum = |pred: &dyn Fn(&str) -> bool| -> u64 {
        CXX_CALLS.iter().filter(|c| pred(c.1)).map(|c| c.2).sum()
    };
    let plain_new = sum(&|n| n.starts_with("new") && !n.contains("align"));
    let aligned_new = sum(&|n| n.starts_with("new") && n.contains("align"));
    let deletes = sum(&|n| n.starts_with("delete"));
    for (api, calls, bytes) in [
        ("malloc", plain_new, 2084),
        ("aligned_alloc", aligned_new, 2080),
        ("free", deletes, 0),
    ] {
        assert_eq!(
            count_at(&proc["calls"], api),
            calls,
            "calls.{api}\n{proc:#}"
        );
        assert_eq!(
            raw.get(api).copied(),
            Some(calls),
            "bpftrace's {api}\n{raw:#?}"
        );
        if api != "free" {
            assert_eq!(
                count_at(&proc["bytes"], api),
                bytes,
                "bytes.{api}\n{proc:#}"
            );
        }
    }
    assert_eq!(
        count_at(proc, "live_allocations"),
        8,
        "live_allocations\n{proc:#}"
    );
    for cause in LOSS_KEYS {
        assert_eq!(count_at(&proc["lost"], cause), 0, "lost.{cause}\n{proc:#}");
    }
}

/// The JSON `aliases`: alias name → the name its calls are counted under.
fn aliases_map(proc: &Value) -> BTreeMap<String, String> {
    proc["aliases"]
        .as_object()
        .unwrap_or_else(|| panic!("no aliases\n{proc:#}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// The dynamic symbols `lib` defines, with their addresses (`nm -D --defined-only`).
fn defined_symbols(lib: &Path) -> BTreeMap<String, u64> {
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(lib)
        .output()
        .unwrap_or_else(|e| panic!("nm: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let addr = u64::from_str_radix(f.first()?, 16).ok()?;
            Some((f.get(2)?.to_string(), addr))
        })
        .collect()
}

/// Starts bpftrace on `script` (which prints `bpftrace-ready` in BEGIN) and returns once its
/// probes are attached; its output lines arrive on the channel after SIGINT.
fn start_bpftrace(script: &str) -> mpsc::Receiver<Vec<String>> {
    let (tx, rx) = mpsc::channel();
    let mut bt = Command::new("bpftrace")
        .args(["-f", "json", "-e", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run bpftrace ({e}): ./x setup installs it"));
    let mut lines = BufReader::new(bt.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap_or_default().contains("bpftrace-ready") {
            break;
        }
    }
    thread::spawn(move || {
        let out: Vec<String> = lines.map_while(Result::ok).collect();
        let _ = bt.wait();
        let _ = tx.send(out);
    });
    rx
}

/// bpftrace's `@calls` map (after SIGINT), by the probe's last `:` field (symbol). SIGINT is
/// repeated every 5 s: bpftrace 0.17 ignores one that arrives between two of its `epoll_wait`s
/// (README, "Under load").
fn bpftrace_counts(rx: mpsc::Receiver<Vec<String>>) -> BTreeMap<String, u64> {
    let mut out = None;
    for _ in 0..6 {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(lines) => {
                out = Some(lines);
                break;
            }
            Err(_) => interrupt_bpftrace(),
        }
    }
    let out = out.expect("bpftrace's output within 30 s of SIGINT");
    let mut raw: BTreeMap<String, u64> = BTreeMap::new();
    for line in out.iter().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if let Some(map) = v["data"]["@calls"].as_object() {
            for (probe, n) in map {
                let sym = probe.rsplit(':').next().unwrap_or_default();
                *raw.entry(sym.to_owned()).or_default() += n.as_u64().unwrap_or_default();
            }
        }
    }
    raw
}

// ---------------------------------------------------------------------------------------------
// Rust programs' `#[global_allocator]` (fixtures/rust/alloc)

/// What the Rust fixture says it did (its `counts` line): `GlobalAlloc` method → (calls,
/// bytes; a realloc's new sizes, a dealloc's freed sizes). Keep in sync with
/// fixtures/rust/alloc/src/lib.rs.
const RUST_FIXTURE: &[(&str, u64, u64)] = &[
    ("alloc", 12, 1980),
    ("alloc_zeroed", 7, 1184),
    ("realloc", 6, 3248),
    ("dealloc", 19, 5500),
];

/// One build of the Rust fixture: which allocator serves its `GlobalAlloc`, and what its calls
/// reach there (the table in fixtures/rust/alloc/src/lib.rs).
struct RustVariant {
    bin: &'static str,
    allocator: &'static str,
    /// The files probed, as `check_allocator_files` takes them.
    files: &'static [&'static str],
    /// Whether the symbols below are libc.so.6's (else the executable's).
    in_libc: bool,
    /// (symbol, the API allocwatch counts its calls under, calls, bytes).
    calls: &'static [(&'static str, &'static str, u64, u64)],
    /// The symbols that call others of `calls` (bpftrace counts those inner calls as theirs).
    nesting: &'static [&'static str],
}

/// Rust's `System` allocator: glibc's malloc family, each call counted once (the executable's
/// `__rust_alloc` & co. are not probed). An over-aligned realloc is `posix_memalign` + copy +
/// `free` in std (`realloc_fallback`): the 2 aligned growths are 2 more of each.
const RUST_SYSTEM: RustVariant = RustVariant {
    bin: "rust_alloc_system",
    allocator: "glibc",
    files: &["libc.so.6"],
    in_libc: true,
    calls: &[
        ("malloc", "malloc", 7, 700),
        ("calloc", "calloc", 4, 800),
        ("realloc", "realloc", 4, 1200),
        ("posix_memalign", "posix_memalign", 10, 3712),
        ("free", "free", 21, 6012),
    ],
    nesting: &[],
};

/// tikv-jemallocator: `_rjem_`-prefixed jemalloc in the executable, counted under jemalloc's
/// own names; glibc still serves `malloc` (probed first).
const RUST_JEMALLOC: RustVariant = RustVariant {
    bin: "rust_alloc_jemalloc",
    allocator: "jemalloc",
    files: &["libc.so.6", "exe"],
    in_libc: false,
    calls: &[
        ("_rjem_malloc", "malloc", 7, 700),
        ("_rjem_mallocx", "mallocx", 8, 1664),
        ("_rjem_calloc", "calloc", 4, 800),
        ("_rjem_realloc", "realloc", 4, 1200),
        ("_rjem_rallocx", "rallocx", 2, 2048),
        ("_rjem_sdallocx", "sdallocx", 19, 5500),
    ],
    nesting: &[],
};

/// The mimalloc crate: static mimalloc in the executable, `malloc` not overridden.
/// `mi_realloc_aligned` frees the old block with `mi_free` itself: part of the realloc.
const RUST_MIMALLOC: RustVariant = RustVariant {
    bin: "rust_alloc_mimalloc",
    allocator: "mimalloc",
    files: &["libc.so.6", "exe"],
    in_libc: false,
    calls: &[
        ("mi_malloc_aligned", "mi_malloc_aligned", 12, 1980),
        ("mi_zalloc_aligned", "mi_zalloc_aligned", 7, 1184),
        ("mi_realloc_aligned", "mi_realloc_aligned", 6, 3248),
        ("mi_free", "free", 19, 5500),
    ],
    nesting: &["mi_realloc_aligned"],
};

/// Functions of the fixture whose calls reach the allocator (frame 0 of every site).
const RUST_FIXTURE_FUNCTIONS: &[&str] = &[
    "alloc_small",
    "alloc_aligned",
    "zeroed_small",
    "zeroed_aligned",
    "grow",
    "free_all",
];

/// `top --json --unwind fp --pid` on the variant's `wait-run` and, in the same run, bpftrace on
/// the same symbols (outermost calls): the fixture's own counts, allocwatch's exact calls and
/// bytes per API equal to the variant's table and to bpftrace's, the same totals per
/// `GlobalAlloc` method as the fixture's, every site in a fixture function, nothing lost.
/// With `mode` `--mode count` (entry probes only) there is no bpftrace (its return probes
/// would change the return addresses count mode reads) and no bytes freed: the fixture's own
/// numbers are the check.
fn check_rust(v: &RustVariant, mode: &[&str]) {
    let count = mode.contains(&"count");
    let _serial = serial();
    let fixture = TestEnv::get().rust_fixture(v.bin);
    let lib = if v.in_libc {
        mapped_file_of(&fixture, "libc.so.6")
    } else {
        fixture.clone()
    };
    let symbols: Vec<String> = v.calls.iter().map(|c| c.0.to_owned()).collect();
    let nesting: Vec<String> = v.nesting.iter().map(|s| s.to_string()).collect();
    let (proc, raw, said) =
        trace_outermost(&fixture, mode, &lib, &symbols, &nesting, Some("counts"));
    let said: Value = serde_json::from_str(&said).unwrap_or_else(|e| panic!("{e}: {said}"));
    let said_of = |method: &str| {
        let pair = |i: usize| said[method][i].as_u64().unwrap_or_else(|| panic!("{said}"));
        (pair(0), pair(1))
    };
    for &(method, calls, bytes) in RUST_FIXTURE {
        assert_eq!(said_of(method), (calls, bytes), "the fixture's {method}");
    }
    check_allocator_files(&proc, v.allocator, v.files);
    check_no_loss(&proc);
    for &(sym, api, calls, bytes) in v.calls {
        let frees = matches!(api, "free" | "sdallocx");
        let bytes = if count && frees { 0 } else { bytes };
        let got = (count_at(&proc["calls"], api), count_at(&proc["bytes"], api));
        assert_eq!(got, (calls, bytes), "{api} ({sym}): calls, bytes\n{proc:#}");
        if count {
            continue;
        }
        assert_eq!(
            raw.get(sym).copied().unwrap_or(0),
            calls,
            "bpftrace's outermost {sym} calls vs allocwatch's {api}\n{raw:?}"
        );
    }
    // Nothing else counted: every API with calls is one of the table's.
    for (api, n) in proc["calls"].as_object().expect("calls") {
        assert!(
            n.as_u64() == Some(0) || v.calls.iter().any(|c| c.1 == api),
            "{api}: {n} calls the fixture did not make\n{proc:#}"
        );
    }
    // The same work by `GlobalAlloc` method: allocations, resizes, frees. Under System, std's
    // over-aligned realloc is an allocation and a free (of the old 256-byte blocks).
    let kind = |api: &str| match api {
        "realloc" | "rallocx" | "mi_realloc_aligned" => 1,
        "free" | "sdallocx" => 2,
        _ => 0,
    };
    let mut by_kind = [(0, 0); 3];
    for &(_, api, calls, bytes) in v.calls {
        let k = &mut by_kind[kind(api)];
        *k = (k.0 + calls, k.1 + bytes);
    }
    let (alloc, zeroed) = (said_of("alloc"), said_of("alloc_zeroed"));
    let (realloc, dealloc) = (said_of("realloc"), said_of("dealloc"));
    let (moved, moved_new, moved_old) = if v.in_libc { (2, 2048, 512) } else { (0, 0, 0) };
    assert_eq!(
        by_kind,
        [
            (alloc.0 + zeroed.0 + moved, alloc.1 + zeroed.1 + moved_new),
            (realloc.0 - moved, realloc.1 - moved_new),
            (dealloc.0 + moved, dealloc.1 + moved_old),
        ],
        "allocations, reallocations, frees vs the fixture's {said}"
    );
    // Every site is in one of the fixture's functions (frame 0's inlined frames: the
    // `GlobalAlloc` shims inlined by LTO, then the function), but where bpftrace's return probe
    // took the return address first ([`nested_rule`]).
    for site in proc["sites"].as_array().expect("sites") {
        let api = site["api"].as_str().unwrap_or_default();
        let frames = site["frames"].as_array().expect("frames");
        let returned = !count
            && v.calls
                .iter()
                .any(|c| c.1 == api && v.nesting.contains(&c.0));
        if frames.is_empty() && returned {
            continue;
        }
        assert!(
            frames
                .iter()
                .any(|f| RUST_FIXTURE_FUNCTIONS
                    .contains(&f["function"].as_str().unwrap_or_default())),
            "a site outside the fixture's functions: {site:#}"
        );
    }
}

/// The agent's `/metrics` for the Rust fixture under tikv-jemallocator and the mimalloc crate:
/// `allocwatch_allocator_info` names the allocator, and the fixture's work adds exactly its
/// calls and bytes per API. By differences: the agent counts a new process from its first
/// call, and under load it may attach the executable's probes while the runtime still starts
/// up (the same `__rust_alloc` sites as the fixture's), besides glibc's start-up calls under the
/// names it shares (`malloc`, `free`). The fixture does nothing between its `ready` line and
/// SIGUSR1: the series taken then, once stable, are the start-up's.
#[test]
fn agent_exports_rust_allocators() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = support::Scratch::new("rust-alloc-agent");
    let mut agent = Agent::start(&env, &["--top-k", "100"]);
    for v in [&RUST_JEMALLOC, &RUST_MIMALLOC] {
        let fixture = scratch.copy(&env.rust_fixture(v.bin), v.bin);
        let id = Identity::of(&fixture);
        let mut fx = Fixture::spawn(&fixture, "wait-run", "ready");
        agent.wait_for_identity(&id, fx.started);
        // Released once the agent has attached the executable's probes (it names the
        // allocator after that).
        let label = [("allocator", v.allocator)];
        agent.scrape_until("the fixture's allocator", Duration::from_secs(20), |m| {
            m.value(&id, "allocwatch_allocator_info", &label) == Some(1.0)
        });
        // (calls, bytes) per API of the table: the frees' calls only (`free`, and `sdallocx`
        // in the family of the other frees).
        let counts = |m: &support::agent::Metrics| -> Vec<(u64, u64)> {
            let of = |family: &str, api: &str| {
                let labels: &[(&str, &str)] = if api == "free" { &[] } else { &[("api", api)] };
                m.value(&id, family, labels).unwrap_or(0.0) as u64
            };
            v.calls
                .iter()
                .map(|&(_, api, ..)| match api {
                    "free" => (of("allocwatch_free_calls_total", api), 0),
                    "sdallocx" => (of("allocwatch_delete_calls_total", api), 0),
                    _ => (
                        of("allocwatch_alloc_calls_total", api),
                        of("allocwatch_alloc_bytes_total", api),
                    ),
                })
                .collect()
        };
        let before = counts(&agent.scrape_stable(&id));
        signal(fx.pid, libc::SIGUSR1);
        let status = fx.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "{} failed: {status}", v.bin);
        let want: Vec<(u64, u64)> = v
            .calls
            .iter()
            .zip(&before)
            .map(|(&(_, api, calls, bytes), &(c, b))| {
                let frees = matches!(api, "free" | "sdallocx");
                (c + calls, if frees { 0 } else { b + bytes })
            })
            .collect();
        // Until the counts are the expected ones (a bound, not a wait: the agent's drain and
        // scrape take seconds under load), then stable: nothing more comes.
        let _ = agent.try_scrape_until(Duration::from_secs(20), |m| counts(m) == want);
        let m = agent.scrape_stable(&id);
        let apis: Vec<&str> = v.calls.iter().map(|c| c.1).collect();
        assert_eq!(
            counts(&m),
            want,
            "{apis:?}: start-up {before:?} + the fixture's work\n{}",
            m.lines_of(&id)
        );
        assert_eq!(
            m.of(&id, "allocwatch_allocator_info").len(),
            1,
            "one allocator\n{}",
            m.lines_of(&id)
        );
        support::agent::promtool_check_metrics(&m.text);
    }
    agent.stop();
}

#[test]
fn rust_system_allocator_counted_once() {
    check_rust(&RUST_SYSTEM, &[]);
}

#[test]
fn rust_tikv_jemallocator_exact_counts() {
    check_rust(&RUST_JEMALLOC, &[]);
}

#[test]
fn rust_mimalloc_crate_exact_counts() {
    check_rust(&RUST_MIMALLOC, &[]);
}

/// `--mode count` on the Rust fixture's allocators: each call counted once. The mimalloc
/// crate's `mi_realloc_aligned` frees the old block through functions that are no API
/// (`_mi_theap_realloc_zero`, reached by a tail jump, calls `mi_free`; the aligned fallback
/// `mi_theap_malloc_zero_aligned_at_generic`, reached by a call, too): those frees are its own.
#[test]
fn rust_allocators_count_mode() {
    for v in [&RUST_SYSTEM, &RUST_JEMALLOC, &RUST_MIMALLOC] {
        check_rust(v, &["--mode", "count"]);
    }
}

// ---------------------------------------------------------------------------------------------
// A real program on jemalloc: Debian's redis-server (libjemalloc2)

/// Debian's `redis-server` (linked against libjemalloc.so.2) on a free loopback port, driven
/// by `redis-cli` with a known workload: allocwatch (`top --pid`) and bpftrace on the same
/// libjemalloc symbols count the same calls per API. Both attach while the server is stopped
/// (SIGSTOP), so their windows are the same: from SIGCONT to the server's exit.
#[test]
fn redis_server_on_jemalloc() {
    let env = TestEnv::get();
    let _serial = serial();
    let server = Path::new("/usr/bin/redis-server");
    assert!(
        server.exists(),
        "{} is missing: `./x setup` installs redis-server",
        server.display()
    );
    let jemalloc = mapped_file_of(server, "libjemalloc.so");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        l.local_addr().expect("its address").port()
    };
    let port_arg = port.to_string();
    let mut redis = KillOnDrop(
        Command::new(server)
            .args([
                "--port",
                &port_arg,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", server.display())),
    );
    let pid = redis.0.id();
    let cli = |args: &[&str], input: &str| -> String {
        let mut c = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port_arg])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): ./x setup installs it"));
        use std::io::Write as _;
        let _ = c.stdin.take().unwrap().write_all(input.as_bytes());
        let out = c.wait_with_output().expect("redis-cli's output");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while cli(&["ping"], "").trim() != "PONG" {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server never answered PING"
        );
        thread::sleep(Duration::from_millis(100));
    }
    // Both tracers attach to a stopped server: neither counts a call the other cannot see.
    signal(pid, libc::SIGSTOP);
    let out = support::temp_file("allocators-redis.json");
    let pid_arg = pid.to_string();
    let mut aw = Allocwatch::spawn(
        &env,
        &["top", "--json", "-o", path_str(&out), "--pid", &pid_arg],
    );
    assert_eq!(
        aw.wait_tracing_pid(Duration::from_secs(30)),
        pid,
        "traced pid"
    );
    let apis = ["malloc", "calloc", "realloc", "free"];
    let probes: Vec<String> = apis
        .iter()
        .map(|a| format!("uprobe:{}:{a}", jemalloc.display()))
        .collect();
    let script = format!(
        "BEGIN {{ printf(\"bpftrace-ready\\n\"); }} {} /pid == {pid}/ {{ @calls[probe] = count(); }}",
        probes.join(",")
    );
    let rx = start_bpftrace(&script);
    signal(pid, libc::SIGCONT);
    // The workload: 500 SETs of 100-byte values, 500 GETs, one DEL of 250 keys, on one
    // connection; then the server is shut down (its exit ends both traces).
    let value = "v".repeat(100);
    let mut input = String::new();
    for i in 0..500 {
        input.push_str(&format!("SET key:{i} {value}\n"));
    }
    for i in 0..500 {
        input.push_str(&format!("GET key:{i}\n"));
    }
    input.push_str("DEL");
    for i in 0..250 {
        input.push_str(&format!(" key:{i}"));
    }
    input.push('\n');
    let replies = cli(&[], &input);
    assert_eq!(
        replies.lines().filter(|l| *l == "OK").count(),
        500,
        "SET replies"
    );
    assert_eq!(
        replies.lines().filter(|l| *l == value).count(),
        500,
        "GET replies"
    );
    assert_eq!(cli(&["dbsize"], "").trim(), "250", "keys left");
    cli(&["shutdown", "nosave"], "");
    let status = support::wait_child(&mut redis.0, Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "redis-server: {status:?}"
    );
    let status = aw.wait_exit(Duration::from_secs(15));
    aw.assert_success(status);
    interrupt_bpftrace();
    let raw = bpftrace_counts(rx);
    let report = read_json(&out);
    let proc = process_by_pid(&report, pid);
    assert_eq!(proc["allocator"], "jemalloc", "allocator\n{proc:#}");
    assert_eq!(str_at(proc, "comm"), "redis-server", "comm\n{proc:#}");
    let counted: BTreeMap<String, u64> = apis
        .iter()
        .map(|a| (a.to_string(), count_at(&proc["calls"], a)))
        .collect();
    let raw: BTreeMap<String, u64> = apis
        .iter()
        .map(|a| (a.to_string(), raw.get(*a).copied().unwrap_or(0)))
        .collect();
    assert_eq!(
        counted, raw,
        "allocwatch's counts vs bpftrace's on libjemalloc, same window\n{proc:#}"
    );
    // The workload is there: every SET allocates its key and value.
    assert!(
        counted["malloc"] + counted["calloc"] >= 1000,
        "the 500 SETs' allocations\n{counted:?}"
    );
    for cause in LOSS_KEYS {
        assert_eq!(count_at(&proc["lost"], cause), 0, "lost.{cause}\n{proc:#}");
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// SIGINT to every `bpftrace` process whose parent is this test process.
fn interrupt_bpftrace() {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        let ppid = rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok());
        if comm.ends_with("(bpftrace") && ppid == Some(me) {
            signal(pid, libc::SIGINT);
        }
    }
}

/// The library whose file name starts with `prefix`, as the jemalloc fixture maps it (`ldd`).
fn mapped_file(prefix: &str) -> PathBuf {
    mapped_file_of(
        &env_path("ALLOCWATCH_FIXTURES").join("alloc/jemalloc/libc_fixture"),
        prefix,
    )
}

/// The library whose file name starts with `prefix`, as `fixture` maps it (`ldd`).
fn mapped_file_of(fixture: &Path, prefix: &str) -> PathBuf {
    let out = Command::new("ldd")
        .arg(fixture)
        .output()
        .unwrap_or_else(|e| panic!("ldd: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.split("=> ").nth(1))
        .filter_map(|r| r.split(" (").next())
        .map(|p| std::fs::canonicalize(p.trim()).unwrap_or_else(|_| PathBuf::from(p.trim())))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .unwrap_or_else(|| panic!("no {prefix} in `ldd {}`:\n{text}", fixture.display()))
}

/// A child killed and reaped when the test ends (also by a failed assertion).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct TestEnv {
    bin: PathBuf,
    fixtures: PathBuf,
}

impl TestEnv {
    /// Panics when anything the tests need is missing: these tests must run, never pass by
    /// skipping.
    fn get() -> Self {
        Self {
            bin: allocwatch_bin("root and the built binary and fixtures"),
            fixtures: env_path("ALLOCWATCH_FIXTURES"),
        }
    }

    /// `target/fixtures/alloc/cxx/VARIANT/cxx_new`.
    fn cxx_fixture(&self, variant: &str) -> PathBuf {
        let path = self
            .fixtures
            .join("alloc/cxx")
            .join(variant)
            .join("cxx_new");
        assert!(
            path.exists(),
            "{} is missing: `./x fixtures` builds it",
            path.display()
        );
        path
    }

    /// `target/fixtures/rust-alloc/release/BIN` (fixtures/rust/alloc).
    fn rust_fixture(&self, bin: &str) -> PathBuf {
        let path = self.fixtures.join("rust-alloc/release").join(bin);
        assert!(
            path.exists(),
            "{} is missing: `./x fixtures` builds it",
            path.display()
        );
        path
    }

    /// `target/fixtures/alloc/VARIANT/libc_fixture`.
    fn fixture(&self, variant: &str) -> PathBuf {
        let path = self
            .fixtures
            .join("alloc")
            .join(variant)
            .join("libc_fixture");
        assert!(
            path.exists(),
            "{} is missing: `./x fixtures` builds it (and `./x setup` installs the allocators)",
            path.display()
        );
        path
    }
}

impl AllocwatchBin for TestEnv {
    fn bin(&self) -> &Path {
        &self.bin
    }
}
