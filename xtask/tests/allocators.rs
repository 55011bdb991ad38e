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
    let fixture = env.fixture(variant);
    let mut fx = Fixture::spawn(&fixture, "wait-run", "ready");
    let pid = fx.pid;
    let out = support::temp_file(&format!("allocators-{variant}.json"));
    let pid_arg = pid.to_string();
    let mut args = vec!["top"];
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
    let aliases: BTreeMap<String, String> = proc["aliases"]
        .as_object()
        .unwrap_or_else(|| panic!("no aliases\n{proc:#}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
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
        assert_eq!(
            count_at(&proc["bytes"], &api),
            bytes,
            "bytes.{api}\n{proc:#}"
        );
    }
    // Events lost (symbolization notes such as `symbolize_stack_cut` are not losses).
    for cause in LOSS_KEYS {
        assert_eq!(count_at(&proc["lost"], cause), 0, "lost.{cause}\n{proc:#}");
    }
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

/// bpftrace on jemalloc's own `malloc` and `free` (and glibc's `reallocarray`, which the
/// process's calls reach in libc.so.6), attached after the fixture's start-up, in the same run
/// as allocwatch: the raw entries agree with allocwatch's program-level counts.
#[test]
fn jemalloc_counts_match_bpftrace() {
    let env = TestEnv::get();
    let _serial = serial();
    let jemalloc = mapped_file("libjemalloc.so");
    let libc = mapped_file("libc.so.6");
    let (tx, rx) = mpsc::channel();
    let (_, proc, _) = trace_variant(&env, "jemalloc", true, |pid| {
        // BEGIN runs once every probe is attached ("attached_probes" comes before that).
        let script = format!(
            "BEGIN {{ printf(\"bpftrace-ready\\n\"); }} \
             uprobe:{j}:malloc,uprobe:{j}:free,uprobe:{l}:reallocarray /pid == {pid}/ \
             {{ @calls[probe] = count(); }}",
            j = jemalloc.display(),
            l = libc.display()
        );
        let mut bt = Command::new("bpftrace")
            .args(["-f", "json", "-e", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run bpftrace ({e}): ./x setup installs it"));
        let mut lines = BufReader::new(bt.stdout.take().unwrap()).lines();
        // Its probes are attached once it says so; only then may the fixture work.
        for line in lines.by_ref() {
            if line.unwrap_or_default().contains("bpftrace-ready") {
                break;
            }
        }
        thread::spawn(move || {
            // Stopped by SIGINT once the fixture exited (below); it prints its maps then.
            let out: Vec<String> = lines.map_while(Result::ok).collect();
            let _ = bt.wait();
            let _ = tx.send(out);
        });
    });
    // The fixture has exited: stop bpftrace (SIGINT: it prints its maps and exits).
    interrupt_bpftrace();
    let out = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("bpftrace's output");
    let mut raw: BTreeMap<String, u64> = BTreeMap::new();
    for line in out.iter().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if let Some(map) = v["data"]["@calls"].as_object() {
            for (probe, n) in map {
                let api = probe.rsplit(':').next().unwrap_or_default();
                raw.insert(api.to_owned(), n.as_u64().unwrap_or_default());
            }
        }
    }
    let counted = |api: &str| count_at(&proc["calls"], api);
    let want: BTreeMap<String, u64> = ["malloc", "free", "reallocarray"]
        .iter()
        .map(|api| (api.to_string(), counted(api)))
        .collect();
    assert_eq!(
        raw, want,
        "bpftrace's raw entries vs allocwatch's counts\n{out:#?}\n{proc:#}"
    );
    assert_eq!(want["malloc"], 7, "the fixture's 7 malloc calls");
    assert_eq!(want["free"], 17, "the fixture's 17 free calls");
    assert_eq!(
        want["reallocarray"], 2,
        "the fixture's 2 reallocarray calls"
    );
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
    let fixture = env_path("ALLOCWATCH_FIXTURES").join("alloc/jemalloc/libc_fixture");
    let out = Command::new("ldd")
        .arg(&fixture)
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
