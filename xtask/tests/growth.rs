//! C++, Rust and Python container growth and `--probe`, end to end: `allocwatch top` runs the
//! growth fixtures (fixtures/growth/, built by `./x fixtures` with g++ -O2 and rustc -O, and a
//! Python script run by Debian's python3.11) and reports each built-in kind and each `--probe`
//! with exact counts, compared with what the fixture counted itself (capacity() and
//! bucket_count() changes in its own functions, `sys.getsizeof` changes in the script) and
//! with bpftrace on the same functions in the same run.
//!
//! These tests fail (never skip) when `ALLOCWATCH_BIN` or `ALLOCWATCH_FIXTURES` is unset, and
//! the Python one when python3.11 or its debug file (`python3.11-dbg`, `./x setup`) is missing.

mod support;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::agent::{Agent, Identity, Metrics};
use support::{
    Allocwatch, AllocwatchBin, Fixture, Scratch, assert_single_error, bpftool, c_function,
    path_str, python_and_debug_file, read_json, serial,
};

struct TestEnv {
    bin: PathBuf,
    fixtures: PathBuf,
}

impl TestEnv {
    fn get() -> Self {
        Self {
            bin: support::allocwatch_bin("root and the growth fixtures"),
            fixtures: support::env_path("ALLOCWATCH_FIXTURES").join("growth"),
        }
    }

    fn fixture(&self, name: &str) -> PathBuf {
        let p = self.fixtures.join(name);
        assert!(p.is_file(), "{} missing: run ./x fixtures", p.display());
        p
    }
}

impl AllocwatchBin for TestEnv {
    fn bin(&self) -> &Path {
        &self.bin
    }
}

/// The fixture's own counts: `key=value` words of its one output line.
fn fixture_counts(stdout: &str) -> BTreeMap<String, u64> {
    stdout
        .split_whitespace()
        .filter_map(|w| {
            let (k, v) = w.split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// bpftrace running a script whose BEGIN prints `bpftrace-ready`, started and attached:
/// `stop` it once the traced program exited (killed if the test fails first).
struct Bpftrace {
    pid: u32,
    rx: mpsc::Receiver<Vec<String>>,
}

impl Bpftrace {
    /// Counts the calls of `probes` (`FILE`, `SYMBOL`) made by processes named `comm`.
    fn count_calls(comm: &str, probes: &[(PathBuf, String)]) -> Self {
        let list: Vec<String> = probes
            .iter()
            // Quoted: bpftrace's parser rejects `++` in a bare path (libstdc++).
            .map(|(f, s)| format!("uprobe:\"{}\":{s}", f.display()))
            .collect();
        Self::start(&format!(
            "{} /comm == \"{comm}\"/ {{ @calls[probe] = count(); }}",
            list.join(",")
        ))
    }

    fn start(probes: &str) -> Self {
        let script = format!("BEGIN {{ printf(\"bpftrace-ready\\n\"); }} {probes}");
        let mut bt = Command::new("bpftrace")
            .args(["-f", "json", "-e", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run bpftrace ({e}): ./x setup installs it"));
        let mut lines = BufReader::new(bt.stdout.take().unwrap()).lines();
        let pid = bt.id();
        let ready = lines
            .by_ref()
            .any(|l| l.unwrap_or_default().contains("bpftrace-ready"));
        if !ready {
            let _ = bt.wait();
            panic!("bpftrace ended before attaching: {script}");
        }
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let out: Vec<String> = lines.map_while(Result::ok).collect();
            let _ = bt.wait();
            let _ = tx.send(out);
        });
        Self { pid, rx }
    }

    /// Stops it (SIGINT: it prints its maps and exits) and returns its JSON lines. SIGINT is
    /// sent again every 2 s: under load one was seen lost (bpftrace ran on for minutes).
    fn stop(mut self) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let out = loop {
            // SAFETY: plain syscall on our child's pid (reaped only by the reader thread, after
            // it exits: then the output is there and the loop ends).
            unsafe { libc::kill(self.pid as i32, libc::SIGINT) };
            match self.rx.recv_timeout(Duration::from_secs(2)) {
                Ok(out) => break out,
                Err(_) if Instant::now() < deadline => {}
                Err(e) => panic!("bpftrace's output: {e}"),
            }
        };
        self.pid = 0;
        out.iter()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Calls per probed symbol in `@calls`.
    fn calls(out: &[Value]) -> BTreeMap<String, u64> {
        Self::map(out, "@calls")
    }

    /// The values of map `name`, by probed symbol.
    fn map(out: &[Value], name: &str) -> BTreeMap<String, u64> {
        let mut values = BTreeMap::new();
        for v in out {
            if let Some(map) = v["data"][name].as_object() {
                for (probe, n) in map {
                    let symbol = probe.rsplit(':').next().unwrap_or_default();
                    *values.entry(symbol.to_owned()).or_default() += n.as_u64().unwrap_or(0);
                }
            }
        }
        values
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        if self.pid != 0 {
            // SAFETY: plain syscall: a test that failed before `stop` leaves no bpftrace.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
    }
}

/// `nm` symbols of `file` whose demangled name satisfies `keep` (mangled names).
fn symbols(file: &Path, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let out = Command::new("nm")
        .args(["--defined-only"])
        .arg(file)
        .output()
        .expect("nm");
    let mangled: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .collect();
    let out = Command::new("nm")
        .args(["--defined-only", "-C"])
        .arg(file)
        .output()
        .expect("nm -C");
    let demangled: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.splitn(3, ' ').nth(2).unwrap_or_default().to_owned())
        .collect();
    mangled
        .into_iter()
        .zip(demangled)
        .filter(|(_, d)| keep(d))
        .map(|(m, _)| m)
        .collect()
}

/// The libstdc++ the C++ fixture loads (`ldd`).
fn libstdcxx(fixture: &Path) -> PathBuf {
    let out = Command::new("ldd").arg(fixture).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("libstdc++.so"))
        .and_then(|l| l.split_whitespace().nth(2))
        .map(|p| std::fs::canonicalize(p).expect("libstdc++ path"))
        .expect("the C++ fixture loads libstdc++")
}

/// Runs `allocwatch top --json ARGS -- fixture N ROUNDS` and returns (the fixture's counts,
/// the report of its process).
fn trace(env: &TestEnv, fixture: &Path, args: &[&str]) -> (BTreeMap<String, u64>, Value) {
    let out = support::temp_file("growth.json");
    let mut all = vec!["top", "--json", "-o", path_str(&out)];
    all.extend(args);
    all.extend(["--", path_str(fixture), "1000", "3"]);
    let mut aw = Allocwatch::spawn_with_stdout(env, &all);
    let status = aw.wait_exit(Duration::from_secs(60));
    aw.assert_success(status);
    let counts = fixture_counts(&aw.stdout());
    let report = read_json(&out);
    let proc = report["processes"][0].clone();
    (counts, proc)
}

/// Runs `allocwatch top --json -- COMMAND…` and returns (the command's counts, the report of
/// its process).
fn trace_command(env: &TestEnv, command: &[&str]) -> (BTreeMap<String, u64>, Value) {
    let out = support::temp_file("growth.json");
    let mut all = vec!["top", "--json", "-o", path_str(&out), "--"];
    all.extend(command);
    let mut aw = Allocwatch::spawn_with_stdout(env, &all);
    let status = aw.wait_exit(Duration::from_secs(60));
    aw.assert_success(status);
    let counts = fixture_counts(&aw.stdout());
    let report = read_json(&out);
    (counts, report["processes"][0].clone())
}

/// Calls by kind, from the report's `probes.kinds`.
fn kinds(proc: &Value) -> BTreeMap<String, u64> {
    proc["probes"]["kinds"]
        .as_array()
        .unwrap_or_else(|| panic!("no probes in the report\n{proc:#}"))
        .iter()
        .map(|k| {
            (
                k["kind"].as_str().unwrap_or_default().to_owned(),
                k["calls"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Calls of `kind` at sites whose stack passes through a function whose name contains
/// `function`.
fn site_calls(proc: &Value, kind: &str, function: &str) -> u64 {
    proc["probes"]["sites"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|s| s["kind"] == kind)
        .filter(|s| {
            s["frames"].as_array().is_some_and(|f| {
                f.iter().any(|fr| {
                    fr["function"]
                        .as_str()
                        .is_some_and(|n| n.contains(function))
                })
            })
        })
        .map(|s| s["calls"].as_u64().unwrap_or(0))
        .sum()
}

/// libstdc++: every `std::vector` reallocation and every rehash of `std::unordered_map`, as
/// the fixture counted them (capacity and bucket-count changes), by site, and as bpftrace
/// counted the same functions in the same run.
#[test]
fn cxx_growth_counts_exact() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = env.fixture("cxx_growth");
    let stdcxx = libstdcxx(&fixture);
    let realloc = symbols(&fixture, |d| {
        d.contains("std::vector<") && d.contains("::_M_realloc_")
    });
    assert_eq!(realloc.len(), 2, "two vector instantiations: {realloc:?}");
    let mut probes: Vec<(PathBuf, String)> = realloc
        .iter()
        .map(|s| (fixture.clone(), s.clone()))
        .collect();
    let next_bkt = "_ZNKSt8__detail20_Prime_rehash_policy11_M_next_bktEm".to_owned();
    probes.push((stdcxx, next_bkt.clone()));
    let bt = Bpftrace::count_calls("cxx_growth", &probes);
    let (counts, proc) = trace(&env, &fixture, &[]);
    let raw = Bpftrace::calls(&bt.stop());
    let by_kind = kinds(&proc);
    let vector = counts["vector_grows"] + counts["string_vector_grows"];
    assert_eq!(
        vector, 63,
        "the fixture's own count (3 × (11 + 10)): {counts:?}"
    );
    assert_eq!(counts["map_rehashes"], 21, "3 × 7 rehashes: {counts:?}");
    assert_eq!(by_kind["cxx_vector_grow"], vector, "{proc:#}");
    assert_eq!(
        by_kind["cxx_hash_rehash"], counts["map_rehashes"],
        "{proc:#}"
    );
    assert_eq!(
        site_calls(&proc, "cxx_vector_grow", "grow_vector"),
        counts["vector_grows"],
        "{proc:#}"
    );
    assert_eq!(
        site_calls(&proc, "cxx_vector_grow", "grow_strings"),
        counts["string_vector_grows"],
        "{proc:#}"
    );
    // Called by the policy in libstdc++, which keeps no frame pointers: the frame-pointer
    // walk skips `grow_map` (its caller), but frame 0 is always the real caller.
    assert_eq!(
        site_calls(
            &proc,
            "cxx_hash_rehash",
            "_Prime_rehash_policy::_M_need_rehash"
        ),
        counts["map_rehashes"],
        "{proc:#}"
    );
    let bt_vector: u64 = realloc
        .iter()
        .map(|s| raw.get(s).copied().unwrap_or(0))
        .sum();
    assert_eq!(bt_vector, vector, "bpftrace {raw:?}");
    assert_eq!(
        raw.get(&next_bkt).copied(),
        Some(counts["map_rehashes"]),
        "bpftrace {raw:?}"
    );
}

/// Rust: every `RawVec` growth (`finish_grow`) and hashbrown rehash (`reserve_rehash`), as the
/// fixture counted them in its functions, and every call in the program as bpftrace counted
/// the same functions in the same run.
#[test]
fn rust_growth_counts_exact() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = env.fixture("rust_growth");
    let finish_grow = symbols(&fixture, |d| {
        d.contains("raw_vec") && d.contains("finish_grow")
    });
    let rehash = symbols(&fixture, |d| {
        d.contains("hashbrown") && d.contains("reserve_rehash")
    });
    assert!(!finish_grow.is_empty() && !rehash.is_empty());
    let probes: Vec<(PathBuf, String)> = finish_grow
        .iter()
        .chain(&rehash)
        .map(|s| (fixture.clone(), s.clone()))
        .collect();
    let bt = Bpftrace::count_calls("rust_growth", &probes);
    let (counts, proc) = trace(&env, &fixture, &[]);
    let raw = Bpftrace::calls(&bt.stop());
    let by_kind = kinds(&proc);
    assert_eq!(counts["vec_grows"], 27, "3 × 9 growths: {counts:?}");
    assert_eq!(counts["map_rehashes"], 30, "3 × 10 rehashes: {counts:?}");
    assert_eq!(
        site_calls(&proc, "rust_vec_grow", "grow_vec"),
        counts["vec_grows"],
        "{proc:#}"
    );
    assert_eq!(
        site_calls(&proc, "rust_hash_rehash", "grow_map"),
        counts["map_rehashes"],
        "{proc:#}"
    );
    let sum =
        |syms: &[String]| -> u64 { syms.iter().map(|s| raw.get(s).copied().unwrap_or(0)).sum() };
    assert_eq!(
        by_kind["rust_vec_grow"],
        sum(&finish_grow),
        "bpftrace {raw:?}\n{proc:#}"
    );
    assert_eq!(
        by_kind["rust_hash_rehash"],
        sum(&rehash),
        "bpftrace {raw:?}\n{proc:#}"
    );
}

/// CPython 3.11 (Debian's python3.11, its static functions named by python3.11-dbg's build-id
/// debug file): `py_dict` counts every `dictresize`, `py_list` the `list_resize` calls that
/// reallocate. The script counts its own growth from `sys.getsizeof` changes; the interpreter
/// grows lists and dicts while it starts too, the same number of times on every start (the
/// same program, `-I -S`: no environment, no site), so a run with N = 0 gives the start's
/// share and the difference is the script's: exact. bpftrace in the same runs, on the same two
/// functions' entries with the same 3.11 check (`allocated` at offset 32 of the list), counts
/// every call of both processes. The interpreter runs as a copy under its own name, so no other
/// python3.11 on the machine is traced or counted.
#[test]
fn python_growth_counts_exact() {
    let env = TestEnv::get();
    let _serial = serial();
    let (python, debug) = python_and_debug_file();
    let scratch = Scratch::new("py-growth");
    // The copy keeps the build-id: its debug file is the same one.
    let copy = scratch.copy(&python, "py_growth");
    let script = env.fixture("py_growth.py");
    let (dict_at, list_at) = (
        c_function(&debug, "dictresize"),
        c_function(&debug, "list_resize"),
    );
    let bt = Bpftrace::start(&format!(
        "uprobe:\"{copy}\":{dict_at:#x} /comm == \"py_growth\"/ {{ @calls[\"py_dict\"] = count(); }} \
         uprobe:\"{copy}\":{list_at:#x} /comm == \"py_growth\"/ {{ \
           $allocated = *(int64 *)(arg0 + 32); $newsize = (int64)arg1; \
           if (!($allocated >= $newsize && $newsize >= ($allocated >> 1))) {{ \
             @calls[\"py_list\"] = count(); }} }}",
        copy = copy.display()
    ));
    let run = |n: &str| trace_command(&env, &[path_str(&copy), "-I", "-S", path_str(&script), n]);
    let (start_counts, start) = run("0");
    let (counts, proc) = run("100000");
    let raw = Bpftrace::calls(&bt.stop());
    assert_eq!(
        (start_counts["list_grows"], start_counts["dict_grows"]),
        (0, 0),
        "{start_counts:?}"
    );
    // CPython 3.11's growth rules: the list's capacity (n + n/8 + 6) & !3 reallocates 66 times
    // on the way to 100,000 items, the dict's table doubles 15 times past its first 8 slots.
    assert_eq!(
        counts["list_grows"], 66,
        "the script's own count: {counts:?}"
    );
    assert_eq!(
        counts["dict_grows"], 15,
        "the script's own count: {counts:?}"
    );
    let (k0, k1) = (kinds(&start), kinds(&proc));
    for (kind, own) in [
        ("py_list", counts["list_grows"]),
        ("py_dict", counts["dict_grows"]),
    ] {
        let (at_start, total) = (k0[kind], k1[kind]);
        assert!(
            at_start > 0,
            "the interpreter's start grows {kind} too\n{start:#}"
        );
        assert_eq!(
            total - at_start,
            own,
            "{kind}: the script's run minus the start's ({total} - {at_start})\n{proc:#}"
        );
        assert_eq!(
            raw.get(kind).copied(),
            Some(at_start + total),
            "{kind}: bpftrace's count of both runs: {raw:?}"
        );
    }
}

/// The node agent finds CPython's functions through the interpreter's debug file as `top`
/// does: a copy of python3.11 (its own identity), attached when the agent first sees a hard
/// link of it growing lists and dicts, then run with the script, has in `/metrics`
/// `allocwatch_probe_calls_total{kind="py_dict"|"py_list"}` equal to `top`'s counts of the
/// same run (the whole process: the interpreter's start grows the same each time).
#[test]
fn agent_exports_python_growth() {
    let env = TestEnv::get();
    let _serial = serial();
    let (python, _) = python_and_debug_file();
    let scratch = Scratch::new("py-growth-agent");
    let python = scratch.copy(&python, "py_growth");
    let script = env.fixture("py_growth.py");
    let args = ["-I", "-S", path_str(&script), "100000"];
    let command: Vec<&str> = std::iter::once(path_str(&python)).chain(args).collect();
    let (_, reference) = trace_command(&env, &command);
    let want = kinds(&reference);
    let warm = scratch.path.join("py_warm");
    std::fs::hard_link(&python, &warm).expect("hard link of the interpreter");
    let mut agent = Agent::start(&env, &["--native-growth"]);
    let calls = "allocwatch_probe_calls_total";
    {
        let loop_forever = "import time\nwhile True:\n    d = {i: i for i in range(100)}\n    \
                            l = [i for i in range(100)]\n    time.sleep(0.01)";
        let _warmer = Fixture::spawn_quiet(&warm, &["-I", "-S", "-c", loop_forever]);
        let w = Identity::of(&warm);
        agent.scrape_until("growth of the warm-up run", Duration::from_secs(30), |m| {
            ["py_dict", "py_list"]
                .iter()
                .all(|k| m.sum(&w, calls, &[("kind", k)]) > 0)
        });
    }
    let out = Command::new(&python)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the script's run");
    assert!(out.status.success(), "{}: {}", python.display(), out.status);
    let counts = fixture_counts(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(counts["list_grows"], 66, "{counts:?}");
    let id = Identity::of(&python);
    agent.scrape_until("the script's growth", Duration::from_secs(40), |m| {
        ["py_dict", "py_list"]
            .iter()
            .all(|k| m.sum(&id, calls, &[("kind", k)]) > 0)
    });
    let m = agent.scrape_stable(&id);
    for kind in ["py_dict", "py_list"] {
        assert_eq!(
            m.counter(&id, calls, &[("kind", kind)]),
            want[kind],
            "{kind}: top's count of the same run ({want:?})\n{}",
            m.lines_of(&id)
        );
    }
    agent.stop();
}

/// `--probe` by demangled name with an argument summed: `_Prime_rehash_policy::_M_next_bkt(n)`
/// in libstdc++, whose argument is the bucket count asked for: counted exactly, and the
/// argument's sum equal to bpftrace's in the same run.
#[test]
fn user_probe_counts_calls_and_sums_an_argument() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = env.fixture("cxx_growth");
    let stdcxx = libstdcxx(&fixture);
    let next_bkt = "_ZNKSt8__detail20_Prime_rehash_policy11_M_next_bktEm";
    let bt = Bpftrace::start(&format!(
        "uprobe:\"{}\":{next_bkt} /comm == \"cxx_growth\"/ \
         {{ @calls[probe] = count(); @sum[probe] = sum(arg1); }}",
        stdcxx.display()
    ));
    let spec = format!(
        "{}:std::__detail::_Prime_rehash_policy::_M_next_bkt:arg1 as buckets",
        stdcxx.display()
    );
    let (counts, proc) = trace(&env, &fixture, &["--probe", &spec]);
    let out = bt.stop();
    let calls = Bpftrace::map(&out, "@calls").get(next_bkt).copied();
    let sum = Bpftrace::map(&out, "@sum").get(next_bkt).copied();
    let kind = "std::__detail::_Prime_rehash_policy::_M_next_bkt";
    let k = proc["probes"]["kinds"]
        .as_array()
        .and_then(|a| a.iter().find(|k| k["kind"] == kind))
        .unwrap_or_else(|| panic!("no kind {kind}\n{proc:#}"));
    assert_eq!(k["builtin"], false);
    assert_eq!(
        k["calls"].as_u64(),
        Some(counts["map_rehashes"]),
        "{proc:#}"
    );
    assert_eq!(k["calls"].as_u64(), calls, "bpftrace's calls");
    assert_eq!(
        k["args"]["buckets"].as_u64(),
        sum,
        "bpftrace's sum of arg1\n{proc:#}"
    );
    assert_eq!(
        site_calls(&proc, kind, "_M_need_rehash"),
        counts["map_rehashes"],
        "{proc:#}"
    );
}

/// A binary or a symbol that does not exist: one line `allocwatch: error: …`, exit 1.
#[test]
fn user_probe_errors_are_one_line() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = env.fixture("cxx_growth");
    let missing_file = "/nonexistent/binary:foo";
    let err = assert_single_error(
        &env,
        &["top", "--probe", missing_file, "--", path_str(&fixture)],
    );
    assert_eq!(
        err,
        "allocwatch: error: --probe /nonexistent/binary: No such file or directory (os error 2)"
    );
    let spec = format!("{}:no_such_function", fixture.display());
    let err = assert_single_error(&env, &["top", "--probe", &spec, "--", path_str(&fixture)]);
    assert!(err.contains("no function no_such_function"), "{err}");
}

/// The node agent (issue 11): started first, it finds the built-in C++ and Rust growth
/// functions in the programs it traces (their executables, libstdc++) and counts a `--probe`
/// given on its command line. `/metrics` then has, under each fixture's identity, exact
/// counts per kind (`allocwatch_probe_calls_total`, equal to `allocwatch top`'s on the same
/// binary, and the C++ ones to the fixture's own counts), the probe's argument sum, and the
/// calls by site (`allocwatch_site_alloc_calls_total{api=KIND}`: the fixture's functions with
/// the fixture's counts). Once a fixture has exited and the agent's sweeper has run, its rows
/// are out of the kernel's `PROBE_SITES` table, and its series keep their values.
///
/// The executables are attached when the agent first sees a process running them: a *hard
/// link* of each (same inode, another identity) runs first, until its growth shows up, so the
/// measured runs are traced from their first instruction.
#[test]
fn agent_exports_growth_kinds_and_probes() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("growth-agent");
    let cxx = scratch.copy(&env.fixture("cxx_growth"), "cxx_growth");
    let rust = scratch.copy(&env.fixture("rust_growth"), "rust_growth");
    // The reference, with no agent running.
    let (_, cxx_ref) = trace(&env, &cxx, &[]);
    let (_, rust_ref) = trace(&env, &rust, &[]);
    let warm = |path: &Path, name: &str| {
        let link = scratch.path.join(name);
        std::fs::hard_link(path, &link).expect("hard link of the fixture");
        link
    };
    let (cxx_warm, rust_warm) = (warm(&cxx, "cxx_warm"), warm(&rust, "rust_warm"));
    // A static function of the fixture, called once per round with n in rdi.
    let spec = format!("{}:grow_vector:arg0 as n", cxx.display());
    let mut agent = Agent::start(
        &env,
        &["--probe", &spec, "--native-growth", "--top-k", "100"],
    );
    let calls = "allocwatch_probe_calls_total";
    {
        let _warmers = [
            Fixture::spawn_quiet(&cxx_warm, &["1000", "1000000000"]),
            Fixture::spawn_quiet(&rust_warm, &["1000", "1000000000"]),
        ];
        let (cw, rw) = (Identity::of(&cxx_warm), Identity::of(&rust_warm));
        agent.scrape_until("growth of the warm-up runs", Duration::from_secs(30), |m| {
            let has = |id: &Identity, kind: &str| m.sum(id, calls, &[("kind", kind)]) > 0;
            ["cxx_vector_grow", "cxx_hash_rehash", "grow_vector"]
                .iter()
                .all(|k| has(&cw, k))
                && ["rust_vec_grow", "rust_hash_rehash"]
                    .iter()
                    .all(|k| has(&rw, k))
        });
    }

    let run = |path: &Path| -> (u32, BTreeMap<String, u64>) {
        let child = Command::new(path)
            .args(["1000", "3"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
        let pid = child.id();
        let out = child.wait_with_output().expect("fixture output");
        assert!(out.status.success(), "{}: {}", path.display(), out.status);
        (pid, fixture_counts(&String::from_utf8_lossy(&out.stdout)))
    };
    let (cxx_pid, cxx_counts) = run(&cxx);
    let (rust_pid, _) = run(&rust);
    let (ci, ri) = (Identity::of(&cxx), Identity::of(&rust));
    let vector = cxx_counts["vector_grows"] + cxx_counts["string_vector_grows"];
    assert_eq!(vector, 63, "the fixture's own count: {cxx_counts:?}");
    let want: Vec<(&Identity, &str, u64)> = vec![
        (&ci, "cxx_vector_grow", vector),
        (&ci, "cxx_hash_rehash", cxx_counts["map_rehashes"]),
        // One call per round.
        (&ci, "grow_vector", 3),
        (&ri, "rust_vec_grow", kinds(&rust_ref)["rust_vec_grow"]),
        (
            &ri,
            "rust_hash_rehash",
            kinds(&rust_ref)["rust_hash_rehash"],
        ),
    ];
    assert_eq!(
        kinds(&cxx_ref)["cxx_vector_grow"],
        vector,
        "top's reference"
    );
    let site_sum = |m: &Metrics, id: &Identity, kind: &str, function: &str| -> u64 {
        m.sites(id)
            .iter()
            .filter(|((api, site), _)| api == kind && site.contains(function))
            .map(|(_, v)| v.calls)
            .sum()
    };
    let complete = |m: &Metrics| {
        want.iter().all(|(id, kind, n)| {
            m.sum(id, calls, &[("kind", kind)]) == *n && site_sum(m, id, kind, "") == *n
        })
    };
    let check = |m: &Metrics, when: &str| {
        for (id, kind, n) in &want {
            assert_eq!(
                m.counter(id, calls, &[("kind", kind)]),
                *n,
                "{when}: {kind} of {id}\n{}",
                m.lines_of(id)
            );
            assert_eq!(
                site_sum(m, id, kind, ""),
                *n,
                "{when}: the site series of {kind} add up to its calls\n{}",
                m.lines_of(id)
            );
        }
        assert_eq!(
            m.counter(
                &ci,
                "allocwatch_probe_arg_sum_total",
                &[("kind", "grow_vector"), ("arg", "n")]
            ),
            3 * 1000,
            "{when}: grow_vector's n over its 3 calls\n{}",
            m.lines_of(&ci)
        );
        for (id, kind, function, n) in [
            (
                &ci,
                "cxx_vector_grow",
                "grow_vector",
                cxx_counts["vector_grows"],
            ),
            (
                &ci,
                "cxx_vector_grow",
                "grow_strings",
                cxx_counts["string_vector_grows"],
            ),
            // Rust's sites are not checked by function: a site label holds the two innermost
            // frames, both inside std there (`grow_amortized <- grow_one`, `reserve <-
            // find_or_find_insert_index`); the fixture's counts are checked by `top` above.
        ] {
            assert_eq!(
                site_sum(m, id, kind, function),
                n,
                "{when}: {kind} at sites of {function}\n{}",
                m.lines_of(id)
            );
        }
    };
    let m = agent.scrape_until(
        "the fixtures' growth, every site named",
        Duration::from_secs(40),
        complete,
    );
    check(&m, "after the runs");
    assert!(
        m.global_sum("allocwatch_map_fill_ratio", &[("map", "PROBE_SITES")]) > 0.0,
        "PROBE_SITES' fill\n{}",
        m.self_stats()
    );

    // The sweeper takes the exited fixtures' rows out of the kernel (the targeted step once
    // their exit is read, else the backstop pass every 20 s).
    let table = probe_sites_map(agent.child.id());
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let left: Vec<u32> = probe_site_tgids(table)
            .into_iter()
            .filter(|t| [cxx_pid, rust_pid].contains(t))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "PROBE_SITES still has rows of the exited fixtures ({left:?}) after 45 s\nagent \
             stderr:\n{}",
            agent.stderr.text()
        );
        thread::sleep(Duration::from_millis(250));
    }
    // Harvested, not lost: the same values from what the agent kept.
    check(&agent.scrape(), "after the sweep");
    agent.stop();
}

/// The id of the `PROBE_SITES` map the process `pid` holds.
fn probe_sites_map(pid: u32) -> u64 {
    let ids = support::BpfIds::held_by(pid);
    ids.maps
        .iter()
        .find(|id| bpftool(&["map", "show", "id", &id.to_string()])["name"] == "PROBE_SITES")
        .map(|id| u64::from(*id))
        .unwrap_or_else(|| panic!("pid {pid} holds no PROBE_SITES map: {ids:?}"))
}

/// The tgids (the key's first field) of the rows of map `id`.
fn probe_site_tgids(id: u64) -> Vec<u32> {
    let dump = bpftool(&["map", "dump", "id", &id.to_string()]);
    dump.as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let bytes: Vec<u8> = e["key"]
                .as_array()
                .unwrap_or_else(|| panic!("no key bytes in {e}"))
                .iter()
                .take(4)
                .map(|b| {
                    let s = b.as_str().unwrap_or_default().trim_start_matches("0x");
                    u8::from_str_radix(s, 16).unwrap_or_else(|e| panic!("key byte {b}: {e}"))
                })
                .collect();
            u32::from_le_bytes(bytes.try_into().expect("4 key bytes"))
        })
        .collect()
}
