//! Faults and losses, end to end as root (issue 9, "Never perturb or lose" and "Faults
//! survived"): traced programs print and exit exactly as untraced ones; every loss cause that can
//! be forced from outside is forced with tiny capacities and `seen + lost = produced` is checked
//! against what the fixture did; and the agent and `top` survive killed, forking, short-lived,
//! replaced and re-linked targets, their own SIGKILL and restart, and stop within a second.
//!
//! `./x test` sets `ALLOCWATCH_BIN`, `ALLOCWATCH_FIXTURES` (fixtures/c: `libc_fixture`,
//! `fault_fixture`), `ALLOCWATCH_GO_FIXTURES` and `ALLOCWATCH_GO_TOOLCHAINS`. Unlike a plain
//! `cargo test` of the other files, these tests fail (never skip) when any of them is missing.
//!
//! # Loss causes (common/src/loss.rs) and how each is forced
//!
//! | cause | forced by | produced = seen + lost |
//! |---|---|---|
//! | `site_map_full` | cannot be forced from outside: only a full `SPILL` table (one row per process and API, for 65,536 processes, no flag) loses a call's process; `--max-sites 4` is tested to lose none |
//! | `site_spilled` | `--max-sites 4`, 16 distinct stacks | calls at the process's unknown sites = site_spilled; its counts exact |
//! | `live_map_full` | `--max-live 5` | successful allocations = tracked + live_map_full |
//! | `pending_full` | `--max-pending 1`, one thread stalled inside `realloc` | mallocs = tracked + pending_full |
//! | `orphan_return` | a `realloc` left by `siglongjmp` | calls that never returned = orphan_return |
//! | `ringbuf_full` | `top` stopped (SIGSTOP) while 8,192 new sites are made | new sites = records that fit + ringbuf_full |
//! | `stack_map_full` | cannot be forced: STACKS is an LRU map, a full one evicts instead of failing; `--max-stacks 1` is tested to lose nothing |
//! | `stack_collision` | cannot be forced: needs two stacks with one 63-bit hash |
//! | `stack_error` | cannot be forced: `bpf_get_stack` of a user task always yields at least the probed address, and the return address at the probe is on the page the call just wrote (it can fail only while the kernel migrates that page) |
//! | `size_histogram_full` | cannot be forced from outside: 256 × 64 fixed rows, no flag |
//! | `stack_budget` | agent.rs `site_share_under_pressure_keeps_counts_exact`: a table three quarters full, a process past its share | calls at stacks past the share = stack_budget; counts exact |
//! | `site_budget` | agent.rs `site_share_under_pressure_keeps_counts_exact`: the same table, a process with 4,096 callers (8,192 rows wanted, 4 shares = 2,048 allowed) | calls at sites past the bound = site_budget; counts exact |
//! | `probe_site_spilled`, `probe_site_map_full` | not forced: the symbol-probe table (16,384 rows) has no capacity flag yet |
//! | `stack_undecided` | agent.rs `selection_lag_holds_undecided_rows_to_their_limit`: the agent stopped (SIGSTOP) while four processes make 2,048 stacks each | stacks past the undecided limit = stack_undecided; counts exact |
//! | `site_undecided` | agent.rs `selection_lag_holds_undecided_rows_to_their_limit`: the same lag, a rejected process with 4,096 callers (8,192 rows wanted, 32 allowed) | calls at sites past the bound = site_undecided |
//!
//! The agent's loss counters are global (one per cause for the node, like its kernel tables):
//! another process recorded in the same window (on a shared machine, a compiler starting) can
//! add to them. The agent tests therefore take a window again when the counter rose by more than
//! the fixture explains (at most 4 times), and fail at once when it rose by less.
//!
//! The tests share system state (uprobes on libc, the BPF id space), so each one holds
//! [`serial`] for its whole run.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::agent::{Agent, Identity, Metrics, value};
use support::{
    API_TOTALS, APIS, Allocwatch, AllocwatchBin, BPF_FREE_LIMIT, BpfIds, Fixture, KernelState,
    Lines, Scratch, address_groups, array, bpftool, env_path, go_toolchains, libc_path, path_str,
    process_by_pid, read_json, serial, signal, str_at, u64_at, uprobe_breakpoints, version_key,
    wait_child, wait_no_breakpoints,
};

// ---------------------------------------------------------------------------------------------
// What the fixtures do (fixtures/c/fault_fixture.c; libc_fixture's `run` is support::API_TOTALS)

/// `libc_fixture run`: every call (allocations and frees).
const RUN_CALLS: u64 = 49;
/// `libc_fixture run`: successful allocation calls (all but free; every one succeeds).
const RUN_ALLOCATIONS: u64 = 32;
/// `libc_fixture run`: frees.
const RUN_FREES: u64 = 17;
/// With `--max-sites 4`, `libc_fixture run` makes the rows of its first four sites: fx_malloc's
/// malloc (7 calls, 700 bytes), fx_calloc's calloc (5, 500) and fx_realloc's two reallocs
/// (3 × 64, 3 × 256); its later sites find the table full and are counted in its rows of unknown
/// sites, a table of their own. By bytes, as `top` lists them.
const NAMED_SITES: [(&str, &str, u64, u64); 4] = [
    ("fx_realloc", "realloc", 3, 768),
    ("fx_malloc", "malloc", 7, 700),
    ("fx_calloc", "calloc", 5, 500),
    ("fx_realloc", "realloc", 3, 192),
];
/// With `--max-live 5`, only the first five allocations of `libc_fixture run` are tracked:
/// fx_malloc's first five blocks (100 bytes each); fx_free_some frees three of them.
const FIVE_LIVE_TRACKED: u64 = 5;
const FIVE_LIVE_FREED: u64 = 3;

/// `fault_fixture stall`: fx_stall_malloc's mallocs (3 before, 10 and 5 during the two stalls),
/// each of 200 bytes, all kept.
const STALL_MALLOCS: u64 = 18;
const STALL_MALLOCS_DURING: u64 = 15;
const STALL_BLOCK: u64 = 200;
/// `fault_fixture stall`: the staller's two reallocs (16 KiB → 64 KiB); the second never returns.
const STALL_REALLOCS: u64 = 2;
const STALL_REALLOC_BYTES: u64 = 2 * 65536;

/// `fault_fixture gate-tree D PAD`: 2^D sites, each below more than 64 frames.
const TREE_DEPTH: u32 = 13;
const TREE_PAD: u32 = 50;
/// The probe's ring buffer (common `capacity::EVENTS_BYTES`).
const RING_BYTES: u64 = 4 << 20;
/// A new-site record with a full stack: the ring's 8-byte record header, `NewSiteEvent` (56
/// bytes) and 64 frames, a multiple of 8.
const FULL_SITE_RECORD: u64 = 8 + 56 + 8 * 64;

/// `fault_fixture fork-exec PATH N`: the parent's own calls (fx_parent_work).
const PARENT_MALLOCS: u64 = 5;
const PARENT_MALLOC_BYTES: u64 = 1500;
const PARENT_FREES: u64 = 2;

/// `fault_fixture gate-keep N`: blocks of 64 bytes.
const KEEP_BLOCK: u64 = 64;

/// `libc_fixture loop`: malloc(48) + free every millisecond.
const LOOP_BLOCK: u64 = 48;

/// Windows the agent's loss test may take (see the file's doc).
const WINDOWS: usize = 6;

/// What the issue allows for SIGTERM/SIGINT to detach.
const DETACH_LIMIT: Duration = Duration::from_secs(1);

/// The agents of the exact tests trace only the tests' fixture copies (all named `aw_…`): on a
/// shared machine, other programs (compilers) can fill the node-wide site table, and calls that
/// find it full are counted as lost, not under their process.
const SELECT_AW: &[&str] = &["--comm", "^aw_"];

/// A Python program that allocates, prints to both streams and exits 5.
const PYTHON_SCRIPT: &str = "import sys, json\n\
d = {str(i): [i] * 3 for i in range(5000)}\n\
s = sorted(d, key=lambda k: (-len(d[k]) * int(k)) % 977)\n\
print(json.dumps(s[:40]))\n\
print('python stderr', len(d), sum(map(len, d.values())), file=sys.stderr)\n\
sys.exit(5)\n";

/// gofmt input: valid Go, badly formatted (gofmt prints it formatted).
const GO_UNFORMATTED: &str = "package main\nimport \"fmt\"\nfunc main(){\nx:=map[string]int{\"a\":1,\"bb\":2}\nfor k,v:=range x{fmt.Println(k,v)}\n}\n";
/// gofmt input with a syntax error (gofmt reports it on stderr and exits 2).
const GO_BROKEN: &str = "package main\nfunc main() {\n\tx := \n}\n";

// ---------------------------------------------------------------------------------------------
// Never perturb

/// `top -- CMD`: every program's stdout is byte-identical, its stderr line-identical (minus
/// allocwatch's own `allocwatch: …` lines on the shared stream) and its exit status the same as
/// untraced, and each was really traced.
#[test]
fn output_unchanged_under_top_command() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("perturb-top");
    for cmd in env.perturb_commands(&scratch) {
        let plain = cmd.run_plain();
        let out = support::temp_file("perturb.json");
        let mut args = vec!["top", "--json", "-o", path_str(&out), "--"];
        args.push(path_str(&cmd.program));
        args.extend(cmd.args.iter().map(String::as_str));
        let mut aw = Allocwatch::spawn_with_stdout(&env, &args);
        let pid = aw.wait_tracing_pid(Duration::from_secs(30));
        let status = aw.wait_exit(Duration::from_secs(120));
        aw.assert_success(status);
        let stdout = aw.stdout();
        let stderr: Vec<String> = aw
            .stderr
            .text()
            .lines()
            .filter(|l| !l.starts_with("allocwatch: "))
            .map(str::to_owned)
            .collect();
        let report = read_json(&out);
        let proc = process_by_pid(&report, pid);
        assert_eq!(
            stdout.as_bytes(),
            plain.stdout.as_slice(),
            "stdout of `{cmd}` under top (left) vs untraced (right)"
        );
        assert_eq!(
            stderr,
            lines(&plain.stderr),
            "stderr of `{cmd}` under top (left) vs untraced (right)"
        );
        assert_eq!(
            proc["exit_code"],
            plain.status.code().map_or(Value::Null, Value::from),
            "exit code of `{cmd}` in top's report vs untraced ({})",
            plain.status
        );
        cmd.assert_traced(proc);
    }
}

/// `top --pid` attached while the program waits for its stdin: its output and exit status are
/// those of an untraced run.
#[test]
fn output_unchanged_under_top_pid() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("perturb-pid");
    let fixture = scratch.copy(&env.fault_fixture, "fault_fixture");
    let gated = [
        PerturbCmd::new(&fixture, &["gate-print"], Traced::Malloc(64)),
        PerturbCmd::new(
            Path::new("/usr/bin/python3"),
            &[
                "-c",
                &format!("import sys\nsys.stdin.buffer.read(1)\n{PYTHON_SCRIPT}"),
            ],
            Traced::Malloc(100),
        ),
    ];
    for cmd in &gated {
        let plain = cmd.run_gated(|_| {});
        let out = support::temp_file("perturb-pid.json");
        let mut aw = None;
        let traced = cmd.run_gated(|pid| {
            let mut a = Allocwatch::spawn(
                &env,
                &[
                    "top",
                    "--json",
                    "-o",
                    path_str(&out),
                    "--pid",
                    &pid.to_string(),
                ],
            );
            assert_eq!(a.wait_tracing_pid(Duration::from_secs(30)), pid);
            aw = Some(a);
        });
        let mut aw = aw.expect("allocwatch started");
        let status = aw.wait_exit(Duration::from_secs(30));
        aw.assert_success(status);
        assert_eq!(
            traced.stdout, plain.stdout,
            "stdout of `{cmd}` under top --pid (left) vs untraced (right)"
        );
        assert_eq!(
            traced.stderr, plain.stderr,
            "stderr of `{cmd}` under top --pid (left) vs untraced (right)"
        );
        assert_eq!(
            traced.status.code(),
            plain.status.code(),
            "exit status of `{cmd}` under top --pid vs untraced"
        );
        let report = read_json(&out);
        cmd.assert_traced(process_by_pid(&report, traced.pid));
    }
}

/// The same programs while an agent traces the whole machine: identical output and status, and
/// the agent did count them (the C fixture's copy has its own identity).
#[test]
fn output_unchanged_under_the_agent() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("perturb-agent");
    let cmds = env.perturb_commands(&scratch);
    let plain: Vec<Output> = cmds.iter().map(PerturbCmd::run_plain).collect();
    let mut agent = Agent::start(&env, &[]);
    for (cmd, plain) in cmds.iter().zip(&plain) {
        let traced = cmd.run_plain();
        assert_eq!(
            traced.stdout, plain.stdout,
            "stdout of `{cmd}` under the agent (left) vs untraced (right)"
        );
        assert_eq!(
            traced.stderr, plain.stderr,
            "stderr of `{cmd}` under the agent (left) vs untraced (right)"
        );
        assert_eq!(
            traced.status.code(),
            plain.status.code(),
            "exit status of `{cmd}` under the agent vs untraced"
        );
    }
    // The C fixture copy's `print` ran under the agent: its 64 strdup calls and frees at least.
    let id = Identity::of(&cmds[0].program);
    let m = agent.scrape_until("the print fixture's calls", Duration::from_secs(10), |m| {
        m.sum(&id, "allocwatch_alloc_calls_total", &[("api", "malloc")]) >= 64
    });
    assert!(
        m.sum(&id, "allocwatch_free_calls_total", &[]) >= 64,
        "free calls of {id}\n{}",
        m.lines_of(&id)
    );
    agent.stop();
}

// ---------------------------------------------------------------------------------------------
// Never lose (without saying so): top

/// `--max-sites 4` and `--max-live 5` on `libc_fixture run`: the process totals stay exact, the
/// sites hold exactly the first four sites' calls and the process's unknown sites the rest
/// (`site_spilled`, none lost to `site_map_full`); only the first five allocations are tracked
/// and `live_map_full` counts the other 27.
#[test]
fn top_counts_site_and_live_table_losses() {
    let env = TestEnv::get();
    let _serial = serial();
    let proc = env.top_run(&["--max-sites", "4"]);
    env.check_run_totals_json(&proc);
    let named: Vec<(String, String, u64, u64)> = array(&proc, "sites")
        .iter()
        .filter_map(|s| {
            let f = array(s, "frames").first()?["function"]
                .as_str()?
                .to_string();
            Some((
                f,
                str_at(s, "api").to_string(),
                u64_at(s, "calls"),
                u64_at(s, "bytes"),
            ))
        })
        .collect();
    let want: Vec<(String, String, u64, u64)> = NAMED_SITES
        .iter()
        .map(|&(f, a, c, b)| (f.to_string(), a.to_string(), c, b))
        .collect();
    assert_eq!(named, want, "the named sites that fit\n{proc:#}");
    let (site_calls, spilled_calls) = calls_at_sites(&proc);
    assert_eq!(
        (site_calls, spilled_calls),
        (RUN_CALLS, u64_at(&proc["lost"], "site_spilled")),
        "calls at sites = the calls the fixture made; calls at its unknown sites = \
         site_spilled\n{proc:#}"
    );
    assert_only_losses(&proc, &["site_spilled"]);

    // 16 distinct stacks of malloc(32) + free: the first two of each make the four rows; the
    // other 14 of each are counted in the process's row of unknown sites for the API.
    let proc = env.top_fixture(&["--max-sites", "4"], &["stacks", "16"]);
    let (site_calls, spilled_calls) = calls_at_sites(&proc);
    assert_eq!(
        (
            u64_at(&proc["calls"], "malloc"),
            u64_at(&proc["bytes"], "malloc"),
            u64_at(&proc["calls"], "free"),
            site_calls,
            spilled_calls,
            u64_at(&proc["lost"], "site_spilled"),
        ),
        (16, 16 * 32, 16, 32, 28, 28),
        "malloc calls and bytes, free calls, calls at sites, at unknown sites, site_spilled\n\
         {proc:#}"
    );
    assert_only_losses(&proc, &["site_spilled"]);

    let proc = env.top_run(&["--max-live", "5"]);
    env.check_run_totals_json(&proc);
    let live = u64_at(&proc, "live_allocations");
    let freed_bytes = u64_at(&proc["bytes"], "free");
    let lost = u64_at(&proc["lost"], "live_map_full");
    assert_eq!(
        (live, u64_at(&proc, "live_bytes"), freed_bytes),
        (
            FIVE_LIVE_TRACKED - FIVE_LIVE_FREED,
            (FIVE_LIVE_TRACKED - FIVE_LIVE_FREED) * 100,
            FIVE_LIVE_FREED * 100
        ),
        "live allocations, live bytes and freed bytes of the five tracked blocks\n{proc:#}"
    );
    // Tracked = still live + freed (free bytes are those of tracked blocks only).
    let tracked = live + freed_bytes / 100;
    assert_eq!(
        tracked + lost,
        RUN_ALLOCATIONS,
        "tracked ({tracked}) + live_map_full ({lost}) = the fixture's allocations\n{proc:#}"
    );
    assert_only_losses(&proc, &["live_map_full"]);
}

/// `--max-stacks 1`: the stack table is LRU, so it cannot be made to refuse a stack: every site
/// keeps its whole chain (the new-site record carries it) and nothing is lost.
#[test]
fn top_stack_table_of_one_loses_nothing() {
    let env = TestEnv::get();
    let _serial = serial();
    let proc = env.top_run(&["--max-stacks", "1"]);
    env.check_run_totals_json(&proc);
    assert_only_losses(&proc, &[]);
    for site in array(&proc, "sites") {
        let functions: Vec<&str> = array(site, "frames")
            .iter()
            .filter_map(|f| f["function"].as_str())
            .collect();
        assert!(
            functions.first().is_some_and(|f| f.starts_with("fx_")) && functions.contains(&"main"),
            "a site's chain from an fx_ function down to main\n{site:#}"
        );
    }
}

/// One thread stalled inside realloc holds the only in-flight slot (`--max-pending 1`): the 15
/// mallocs the other thread makes meanwhile are counted but not tracked (`pending_full` 15); the
/// realloc abandoned by siglongjmp is found by the thread's next call (`orphan_return` 1). With
/// the default table the same program loses nothing but the orphan.
#[test]
fn top_counts_pending_and_orphan_losses() {
    let env = TestEnv::get();
    let _serial = serial();
    for (args, pending_full) in [
        (&[][..], 0),
        (&["--max-pending", "1"][..], STALL_MALLOCS_DURING),
    ] {
        let out = support::temp_file("stall.json");
        let mut all = vec!["top", "--json", "-o", path_str(&out)];
        all.extend_from_slice(args);
        all.extend(["--", path_str(&env.fault_fixture), "stall"]);
        let mut aw = Allocwatch::spawn(&env, &all);
        let pid = aw.wait_tracing_pid(Duration::from_secs(30));
        let status = aw.wait_exit(Duration::from_secs(60));
        aw.assert_success(status);
        let report = read_json(&out);
        let proc = process_by_pid(&report, pid);
        assert_eq!(proc["exit_code"], 0, "the stall fixture's exit\n{proc:#}");
        let sites = sites_of(proc, "fx_stall_malloc", "malloc");
        let (calls, bytes, live, live_bytes) = sites;
        assert_eq!(
            (calls, bytes),
            (STALL_MALLOCS, STALL_MALLOCS * STALL_BLOCK),
            "fx_stall_malloc's malloc calls and bytes ({args:?})\n{proc:#}"
        );
        let lost = &proc["lost"];
        assert_eq!(
            (u64_at(lost, "pending_full"), u64_at(lost, "orphan_return")),
            (pending_full, 1),
            "pending_full and orphan_return ({args:?})\n{proc:#}"
        );
        assert_eq!(
            live + u64_at(lost, "pending_full"),
            STALL_MALLOCS,
            "tracked mallocs ({live}, all kept) + pending_full = fx_stall_malloc's mallocs \
             ({args:?})\n{proc:#}"
        );
        assert_eq!(live_bytes, live * STALL_BLOCK, "live bytes ({args:?})");
        assert_eq!(
            (
                u64_at(&proc["calls"], "realloc"),
                u64_at(&proc["bytes"], "realloc")
            ),
            (STALL_REALLOCS, STALL_REALLOC_BYTES),
            "realloc calls and bytes, the abandoned one included ({args:?})\n{proc:#}"
        );
        assert_only_losses(proc, &["pending_full", "orphan_return"]);
    }
}

/// `top` stopped (SIGSTOP) while the program makes 8,192 new call sites, each announced by a
/// 576-byte record: the 4 MiB ring buffer takes 7,281 of them, `ringbuf_full` counts the others,
/// and no call is lost (the sites are read from the table). With frame pointers (`--unwind
/// fp`): the tree's 8,192 paths are 64 frames deep, and a table walk (`auto`, which Debian's
/// libc gets) keeps 16 on kernels without `bpf_loop`, where most paths look alike.
#[test]
fn top_counts_ring_buffer_losses() {
    let env = TestEnv::get();
    let _serial = serial();
    let sites = 1u64 << TREE_DEPTH;
    let mut fx = Gated::spawn(
        &env.fault_fixture,
        &[
            "gate-tree".to_owned(),
            TREE_DEPTH.to_string(),
            TREE_PAD.to_string(),
        ],
        &[],
    );
    // The text report: JSON would spell out 8,192 chains of 64 frames.
    let out = support::temp_file("ring.txt");
    let mut aw = Allocwatch::spawn(
        &env,
        &[
            "top",
            "-o",
            path_str(&out),
            "--top",
            "3",
            "--unwind",
            "fp",
            "--pid",
            &fx.pid.to_string(),
        ],
    );
    assert_eq!(aw.wait_tracing_pid(Duration::from_secs(30)), fx.pid);
    // Let it drain whatever attaching produced: the ring is empty when it stops.
    thread::sleep(Duration::from_millis(300));
    signal(aw.child.id(), libc::SIGSTOP);
    fx.open_gate();
    fx.stderr.wait_for("tree done", Duration::from_secs(60));
    signal(aw.child.id(), libc::SIGCONT);
    fx.close_stdin();
    let status = fx.wait(Duration::from_secs(10));
    assert!(status.success(), "gate-tree: {status}");
    let status = aw.wait_exit(Duration::from_secs(120));
    aw.assert_success(status);
    let text = fs::read_to_string(&out).expect("reading the report");
    let _ = fs::remove_file(&out);
    // `calls: malloc N (…)` and, one line per effect, `LOST (counts are low): cause N, …`.
    let calls_line = text
        .lines()
        .find_map(|l| l.strip_prefix("calls:"))
        .unwrap_or_else(|| panic!("no calls line in\n{text}"));
    assert!(
        calls_line.starts_with(&format!(" malloc {sites} (")),
        "every malloc of the tree is counted: {calls_line:?}\n{text}"
    );
    let lost: BTreeMap<String, u64> = text
        .lines()
        .filter_map(|l| {
            [
                "LOST (counts are low): ",
                "LOST (live bytes are low): ",
                "LESS DETAIL (counts exact): ",
            ]
            .iter()
            .find_map(|p| l.strip_prefix(p))
        })
        .flat_map(|l| l.split(", "))
        .map(|kv| {
            let (k, v) = kv.rsplit_once(' ').expect("cause N");
            (k.to_owned(), v.parse().expect("a count"))
        })
        .collect();
    let fit = (RING_BYTES - 1) / FULL_SITE_RECORD;
    assert_eq!(
        lost.get("ringbuf_full").copied(),
        Some(sites - fit),
        "new-site records: {fit} fit in the ring, the other {} are ringbuf_full\n{text}",
        sites - fit
    );
    let others: Vec<_> = lost
        .iter()
        .filter(|(k, _)| !["ringbuf_full", "symbolize_process_gone"].contains(&k.as_str()))
        .collect();
    assert!(others.is_empty(), "other losses: {others:?}\n{text}");
}

// ---------------------------------------------------------------------------------------------
// Never lose: the agent

/// The agent's global loss counters with tiny tables: `max_sites = 4` (`libc_fixture run`: its
/// identity's calls + site_map_full = the 49 calls it made, site_map_full 0: the calls that find
/// the table full are its process's, in its rows of unknown sites) and `max_live = 5`
/// (`gate-keep 20`: its live gauge + live_map_full = 20).
#[test]
fn agent_counts_site_and_live_table_losses() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("agent-loss");
    let sites_fx = scratch.copy(&env.libc_fixture, "aw_loss_sites");
    let keep_fx = scratch.copy(&env.fault_fixture, "aw_loss_keep");
    // Capacities are config-file keys for the agent.
    let config = scratch.path.join("tiny.toml");
    fs::write(&config, "[capacity]\nmax_sites = 4\nmax_live = 5\n").expect("writing config");
    let agent = Agent::start(
        &env,
        &["--comm", "^aw_loss_", "--config", path_str(&config)],
    );
    let sites_id = Identity::of(&sites_fx);
    lossy_window(&agent, "site_map_full", RUN_CALLS, |agent| {
        let before = agent.scrape().calls_of(&sites_id);
        let status = run(&sites_fx, &["run"]);
        assert!(status.success(), "libc_fixture run: {status}");
        let m = agent.scrape_until("the fixture's exit", Duration::from_secs(10), |m| {
            m.value(&sites_id, "allocwatch_processes", &[]) == Some(0.0)
        });
        // Every call: at the rows of its first sites or its process's rows of unknown sites
        // (top's test checks them).
        m.calls_of(&sites_id) - before
    });

    let keep_id = Identity::of(&keep_fx);
    let produced = 20;
    lossy_window(&agent, "live_map_full", produced, |agent| {
        // The sites window filled the 4-row site table (and a busy machine's processes that
        // are not classified yet keep it full): the kept blocks may be counted in the
        // process's rows of unknown sites, which track them the same way.
        let mut fx = Gated::spawn(
            &keep_fx,
            &["gate-keep".to_owned(), produced.to_string()],
            &[],
        );
        let m = agent.scrape_until("the keep fixture", Duration::from_secs(15), |m| {
            m.value(&keep_id, "allocwatch_processes", &[]) == Some(1.0)
        });
        // The identity sums the windows' processes.
        let before = m.sum(
            &keep_id,
            "allocwatch_alloc_calls_total",
            &[("api", "malloc")],
        );
        fx.open_gate();
        fx.stderr.wait_for("kept", Duration::from_secs(10));
        // Waits are deadlines, not speed checks: at load 8 on 2 CPUs the count came after 5 s.
        let m = agent.scrape_until("the kept blocks", Duration::from_secs(15), |m| {
            m.sum(
                &keep_id,
                "allocwatch_alloc_calls_total",
                &[("api", "malloc")],
            ) == before + produced
        });
        let live = m.value(&keep_id, "allocwatch_live_allocations", &[]);
        let live_bytes = m.value(&keep_id, "allocwatch_live_bytes", &[]);
        fx.close_stdin();
        fx.wait(Duration::from_secs(10));
        let live = live.unwrap_or_else(|| panic!("no live gauge\n{}", m.lines_of(&keep_id)));
        assert_eq!(
            live_bytes,
            Some(live * KEEP_BLOCK as f64),
            "live bytes of {keep_id}"
        );
        assert!(live <= 5.0, "{live} tracked in a table of 5");
        live as u64
    });
    assert_losses_are_said(&agent);
    let mut agent = agent;
    agent.stop();
}

/// Every loss cause the agent exports as risen has its warning on stderr, saying what the loss
/// takes (by the metric's `affects` label) and, for the tables, the setting to change.
fn assert_losses_are_said(agent: &Agent) {
    let m = agent.scrape();
    let risen: Vec<(String, String)> = m
        .samples
        .iter()
        .filter(|s| s.metric == "allocwatch_events_lost_total" && value(s) > 0.0)
        .map(|s| {
            let label = |k: &str| s.labels.get(k).map(str::to_owned);
            let cause = label("cause").expect("a cause label");
            let affects = label("affects").unwrap_or_else(|| panic!("{cause} has no affects"));
            (cause, affects)
        })
        .collect();
    assert!(
        risen
            .iter()
            .any(|(c, a)| c == "live_map_full" && a == "live"),
        "live_map_full rose in the window, affects=\"live\": {}",
        m.self_stats()
    );
    for (cause, affects) in &risen {
        let said = match affects.as_str() {
            "counts" => "counts are low",
            "live" => "live bytes and outstanding allocations are low",
            "detail" => "counts stay exact, only call sites are less detailed",
            other => panic!("{cause}: affects={other:?}"),
        };
        // Checked every 5 s: the last rise may not be said yet.
        let needle = format!("events lost ({cause}) in the last");
        let deadline = Instant::now() + Duration::from_secs(20);
        let line = loop {
            let text = agent.stderr.text();
            if let Some(l) = text.lines().find(|l| l.contains(&needle)) {
                break l.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no warning for {cause} on stderr:\n{text}"
            );
            thread::sleep(Duration::from_millis(200));
        };
        assert!(
            line.starts_with("allocwatch: warning: ") && line.contains(said),
            "{cause} ({affects}): {line}"
        );
        if cause == "live_map_full" {
            assert!(line.contains("capacity.max_live"), "{line}");
        }
    }
}

/// Runs `window` (which returns what the agent saw of `produced` events) until the global
/// `cause` counter rose by exactly `produced - seen`; a rise short of it fails at once (events
/// lost without being counted), a larger one (another process recorded in the window) is taken
/// again, at most [`WINDOWS`] times.
fn lossy_window(agent: &Agent, cause: &str, produced: u64, window: impl Fn(&Agent) -> u64) {
    let mut tries = Vec::new();
    for _ in 0..WINDOWS {
        let lost0 = agent
            .scrape()
            .global_sum("allocwatch_events_lost_total", &[("cause", cause)]);
        let seen = window(agent);
        let lost1 = agent
            .scrape()
            .global_sum("allocwatch_events_lost_total", &[("cause", cause)]);
        let lost = (lost1 - lost0) as u64;
        assert!(
            seen + lost >= produced,
            "seen {seen} + {cause} {lost} < the {produced} events the fixture produced: events \
             lost without being counted"
        );
        if seen + lost == produced {
            return;
        }
        tries.push(format!("seen {seen} + {cause} {lost}"));
    }
    panic!(
        "{cause}: never seen + lost = {produced} in {WINDOWS} windows (another process recorded in \
         each?): {tries:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Faults survived: the agent

/// A traced process SIGKILLed mid-trace: the agent keeps its counts (every malloc of 48 bytes
/// matched by a free but the one in flight), sees it gone (live gauges 0), does not count it
/// again when it sweeps its rows, and goes on counting a new program exactly.
#[test]
fn agent_target_killed_mid_trace() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("agent-killed");
    let looping = scratch.copy(&env.libc_fixture, "aw_killed");
    let after = scratch.copy(&env.libc_fixture, "aw_after_kill");
    let (id, after_id) = (Identity::of(&looping), Identity::of(&after));
    let mut agent = Agent::start(&env, SELECT_AW);
    let mut fx = Gated::spawn(&looping, &["loop".to_owned()], &[]);
    fx.stderr.wait_for("loop ", Duration::from_secs(10));
    agent.scrape_until("50 mallocs of the loop", Duration::from_secs(10), |m| {
        m.sum(&id, "allocwatch_alloc_calls_total", &[("api", "malloc")]) >= 50
    });
    signal(fx.pid, libc::SIGKILL);
    fx.wait(Duration::from_secs(5));
    let m = agent.scrape_until("the killed process gone", Duration::from_secs(10), |m| {
        m.value(&id, "allocwatch_processes", &[]) == Some(0.0)
    });
    let mallocs = m.sum(&id, "allocwatch_alloc_calls_total", &[("api", "malloc")]);
    let frees = m.sum(&id, "allocwatch_free_calls_total", &[]);
    assert!(
        mallocs - frees <= 1,
        "malloc {mallocs}, free {frees}: at most one block between them\n{}",
        m.lines_of(&id)
    );
    assert_eq!(
        m.sum(&id, "allocwatch_alloc_bytes_total", &[("api", "malloc")]),
        mallocs * LOOP_BLOCK,
        "bytes of {id}"
    );
    for gauge in ["allocwatch_live_allocations", "allocwatch_live_bytes"] {
        assert_eq!(
            m.value(&id, gauge, &[]),
            Some(0.0),
            "{gauge} of a killed process"
        );
    }
    // Its rows leave the kernel tables for the agent's memory: the same numbers afterwards.
    thread::sleep(Duration::from_secs(2));
    let later = agent.scrape();
    for family in [
        "allocwatch_alloc_calls_total",
        "allocwatch_free_calls_total",
    ] {
        assert_eq!(
            later.sum(&id, family, &[]),
            m.sum(&id, family, &[]),
            "{family} of {id} changed after its rows were swept"
        );
    }
    let status = run(&after, &["run"]);
    assert!(status.success(), "libc_fixture run: {status}");
    let m = agent.scrape_until("the next program's counts", Duration::from_secs(10), |m| {
        m.sum(&after_id, "allocwatch_free_calls_total", &[]) == RUN_FREES
    });
    env.check_run_totals(&m, &after_id, 1);
    agent.stop();
}

/// A program that forks and execs children: the parent's own calls under its identity, the
/// children's under theirs, each exactly (3 children × libc_fixture's calls).
#[test]
fn agent_counts_forked_and_execed_children() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("agent-fork");
    let parent = scratch.copy(&env.fault_fixture, "aw_forker");
    let child = scratch.copy(&env.libc_fixture, "aw_forked");
    let (parent_id, child_id) = (Identity::of(&parent), Identity::of(&child));
    let mut agent = Agent::start(&env, SELECT_AW);
    let children = 3;
    let status = run(
        &parent,
        &["fork-exec", path_str(&child), &children.to_string()],
    );
    assert!(status.success(), "fork-exec: {status}");
    let m = agent.scrape_until("the children's counts", Duration::from_secs(10), |m| {
        m.sum(&child_id, "allocwatch_free_calls_total", &[]) >= children * RUN_FREES
            && m.value(&parent_id, "allocwatch_processes", &[]) == Some(0.0)
    });
    env.check_run_totals(&m, &child_id, children);
    let parent_calls = (
        m.sum(&parent_id, "allocwatch_alloc_calls_total", &[]),
        m.sum(
            &parent_id,
            "allocwatch_alloc_calls_total",
            &[("api", "malloc")],
        ),
        m.sum(&parent_id, "allocwatch_alloc_bytes_total", &[]),
        m.sum(&parent_id, "allocwatch_free_calls_total", &[]),
    );
    assert_eq!(
        parent_calls,
        (
            PARENT_MALLOCS,
            PARENT_MALLOCS,
            PARENT_MALLOC_BYTES,
            PARENT_FREES
        ),
        "the parent's calls (all, malloc), bytes and frees\n{}",
        m.lines_of(&parent_id)
    );
    agent.stop();
}

/// 1,000 processes started as fast as four threads can (100 selected by `--comm`, 900 not):
/// exactly 100 × the fixture's calls under the selected identity, nothing of the others.
#[test]
fn agent_thousand_short_lived_processes() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("agent-churn");
    let selected = scratch.copy(&env.libc_fixture, "aw_churn_sel");
    let rejected = scratch.copy(&env.libc_fixture, "aw_churn_rej");
    let id = Identity::of(&selected);
    let mut agent = Agent::start(&env, &["--comm", "^aw_churn_sel$"]);
    let started = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (selected, rejected) = (selected.clone(), rejected.clone());
            thread::spawn(move || {
                for i in 0..250 {
                    // One in ten selected, spread over the whole run.
                    let path = if (t + i * 4) % 10 == 0 {
                        &selected
                    } else {
                        &rejected
                    };
                    let status = run(path, &["run"]);
                    assert!(status.success(), "{}: {status}", path.display());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a starter thread");
    }
    let took = started.elapsed();
    let want = 100;
    let m = agent.scrape_until(
        "the selected processes' counts",
        Duration::from_secs(20),
        |m| m.sum(&id, "allocwatch_free_calls_total", &[]) >= want * RUN_FREES,
    );
    env.check_run_totals(&m, &id, want);
    let foreign = m.foreign_lines(&id.comm);
    assert!(
        foreign.is_empty(),
        "series of processes the selection rejects:\n{foreign}"
    );
    eprintln!("1,000 processes in {took:.2?}");
    agent.stop();
}

/// The agent SIGKILLed: none of its programs, links or maps outlive it (bpftool lists none of
/// them, nor a perf-event attachment of it), tracefs has no uprobe left; a new agent attaches
/// cleanly and counts a program once, not twice.
#[test]
fn agent_sigkill_and_restart() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("agent-restart");
    let fixture = scratch.copy(&env.libc_fixture, "aw_restart");
    let id = Identity::of(&fixture);
    let before = KernelState::snapshot();
    let mut first = Agent::start(&env, SELECT_AW);
    assert!(run(&fixture, &["run"]).success());
    let m = first.scrape_until("the first run", Duration::from_secs(10), |m| {
        m.sum(&id, "allocwatch_free_calls_total", &[]) == RUN_FREES
    });
    env.check_run_totals(&m, &id, 1);
    let pid = first.child.id();
    let held = BpfIds::held_by(pid);
    assert!(
        !held.progs.is_empty(),
        "the agent holds no programs: {held:?}"
    );
    // Its uprobes are BPF links (uprobe_multi): bpftool lists them while it runs.
    let links = bpftool_ids(&["link", "show"]);
    assert!(
        !held.links.is_empty() && held.links.iter().all(|l| links.contains(&u64::from(*l))),
        "bpftool link show {links:?} does not list the running agent's links {:?}",
        held.links
    );
    signal(pid, libc::SIGKILL);
    let status = wait_child(&mut first.child, Duration::from_secs(5)).expect("SIGKILLed agent");
    first.stopped = true;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    held.assert_all_gone("the SIGKILLed agent", BPF_FREE_LIMIT);
    for (what, ids, held) in [
        ("prog", bpftool_ids(&["prog", "show"]), &held.progs),
        ("link", bpftool_ids(&["link", "show"]), &held.links),
        ("map", bpftool_ids(&["map", "show"]), &held.maps),
    ] {
        let left: Vec<&u32> = held
            .iter()
            .filter(|i| ids.contains(&u64::from(**i)))
            .collect();
        assert!(
            left.is_empty(),
            "bpftool {what} show lists the dead agent's {left:?}"
        );
    }
    let attached: Vec<Value> = bpftool_perf()
        .into_iter()
        .filter(|p| {
            p["pid"] == pid
                || p["prog_id"]
                    .as_u64()
                    .is_some_and(|id| held.progs.contains(&(id as u32)))
        })
        .collect();
    assert!(
        attached.is_empty(),
        "perf-event attachments of the dead agent: {attached:?}"
    );
    KernelState::snapshot().assert_nothing_added(&before);

    let mut second = Agent::start(&env, SELECT_AW);
    let m = second.scrape();
    assert!(
        m.of(&id, "allocwatch_free_calls_total").is_empty(),
        "the new agent shows the run it never saw\n{}",
        m.lines_of(&id)
    );
    assert!(run(&fixture, &["run"]).success());
    let m = second.scrape_until("the second run", Duration::from_secs(10), |m| {
        m.sum(&id, "allocwatch_free_calls_total", &[]) >= RUN_FREES
    });
    thread::sleep(Duration::from_millis(500));
    let m2 = second.scrape();
    env.check_run_totals(&m, &id, 1);
    env.check_run_totals(&m2, &id, 1);
    second.stop();
}

/// SIGTERM and SIGINT: the agent exits 0 within a second of the signal, `top --pid` has
/// detached every probe within a second (and exits 0 with its report after), and every BPF
/// object they held is freed.
#[test]
fn signals_detach_within_one_second() {
    let env = TestEnv::get();
    let _serial = serial();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut agent = Agent::start(&env, &[]);
        agent.stop_within(sig, DETACH_LIMIT);

        let mut fx = Gated::spawn(&env.libc_fixture, &["loop".to_owned()], &[]);
        fx.stderr.wait_for("loop ", Duration::from_secs(10));
        let mut aw = Allocwatch::spawn(&env, &["top", "--pid", &fx.pid.to_string()]);
        assert_eq!(aw.wait_tracing_pid(Duration::from_secs(30)), fx.pid);
        thread::sleep(Duration::from_millis(300));
        let held = BpfIds::held_by(aw.child.id());
        assert!(!held.progs.is_empty(), "top holds no BPF program");
        let traps = uprobe_breakpoints(fx.pid);
        assert!(traps > 0, "no uprobe breakpoint in the traced process");
        signal(aw.child.id(), sig);
        // `top` lets the process go first, then drains and names its sites for the report,
        // which may take longer on a loaded machine: the limit is on the process being free of
        // the probes, seen in its own code.
        let detached = wait_no_breakpoints(fx.pid, Duration::from_secs(5));
        let status = aw.wait_exit(Duration::from_secs(15));
        aw.assert_success(status);
        let took = detached.unwrap_or_else(|| {
            panic!("{traps} breakpoints: some still in the traced process 5 s after signal {sig}")
        });
        assert!(
            took <= DETACH_LIMIT,
            "top took {took:.2?} to detach after signal {sig}"
        );
        held.assert_all_gone("top", BPF_FREE_LIMIT);
        assert!(
            fx.child.try_wait().expect("waitpid").is_none(),
            "top --pid must leave its target running"
        );
    }
}

/// A traced Go program whose file is replaced (a new file renamed over it) while it runs: the
/// running process keeps being counted (its probes are on the old inode), a process of the new
/// file is attached and counted too, each exactly (per map_big: the growth `top` measured).
/// Each file is first run by a warm-up process until the agent has attached its probes, so that
/// the measured process is counted from its first instruction (a program that begins its work
/// before the agent has attached its file is counted from the attach on only).
#[test]
fn binary_replaced_while_traced() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("replaced");
    let path = scratch.copy(&env.go_fixture, "aw_replaced");
    let id = Identity::of(&path);
    // The growth of one map_big, and of the runtime around it, from top.
    let one = env.go_map_grows(&path, 1);
    let two = env.go_map_grows(&path, 2);
    let per_call = diff(&two, &one);
    let base = diff(&one, &per_call);
    let expected = |n: u64| -> BTreeMap<String, u64> {
        per_call
            .iter()
            .map(|(k, v)| (k.clone(), v * n + base.get(k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v > 0)
            .collect()
    };
    let calls = 40;

    let mut agent = Agent::start(&env, SELECT_AW);
    // Attaches the probes of the file at `path` now; returns the identity's growth so far.
    let warm = |agent: &Agent, what: &str| {
        let probes = agent.scrape().global_sum("allocwatch_probes_attached", &[]);
        // Long enough for the agent to find it (a Go program that exits within milliseconds
        // is gone before the agent reads its executable: see the report).
        let mut warm = Command::new(&path)
            .args(std::iter::repeat_n("map_huge", 20))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the Go fixture");
        agent.scrape_until(what, Duration::from_secs(10), |m| {
            m.global_sum("allocwatch_probes_attached", &[]) > probes
        });
        let _ = warm.kill();
        let _ = warm.wait();
        agent.scrape_until("the warm-up's exit", Duration::from_secs(10), |m| {
            m.value(&id, "allocwatch_processes", &[]) == Some(0.0)
        });
        agent.scrape_stable_grows(&id)
    };
    let before = warm(&agent, "the probes of the first file");
    let modes: Vec<String> = std::iter::repeat_n("map_big".to_owned(), calls).collect();
    let mut old = Command::new(&path)
        .args(&modes)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting the Go fixture");
    agent.scrape_until("the running Go program", Duration::from_secs(10), |m| {
        m.go_map_grows(&id) != before
    });
    let fresh = scratch.path.join("aw_replaced.new");
    support::copy_program(&env.go_fixture, &fresh);
    fs::rename(&fresh, &path).expect("renaming the new file over the old");
    let status = wait_child(&mut old, Duration::from_secs(60)).expect("the old process's exit");
    assert!(status.success(), "the replaced program: {status}");
    agent.scrape_until("the old process's exit", Duration::from_secs(10), |m| {
        m.value(&id, "allocwatch_processes", &[]) == Some(0.0)
    });
    let after_old = agent.scrape_stable_grows(&id);
    assert_eq!(
        diff(&after_old, &before),
        with_zeros(&expected(calls as u64), &after_old),
        "map grows of the process whose file was replaced ({calls} map_big; top: one map_big \
         {one:?}, two {two:?})"
    );

    let before = warm(&agent, "the probes of the file renamed over it");
    assert!(run(&path, &["map_big"]).success(), "the new file's program");
    let after_new = agent.scrape_stable_grows(&id);
    assert_eq!(
        diff(&after_new, &before),
        with_zeros(&expected(1), &after_new),
        "map grows of a process of the new file (one map_big)"
    );
    agent.stop();
}

/// Programs deleted from disk (a redeployed binary, an upgraded library) after their last
/// process exited: the agent lets go of their probes, and so of their inodes and disk space.
/// Three kinds of file on a tmpfs of the test's own (its used space is the inodes still held):
/// a static musl program (the allocator's probes on the executable), a C++ program (growth
/// kinds on the executable) and a Go program (the Go runtime's probes). Each runs until the
/// agent has attached it, then exits; once the three are deleted, the agent's probe count
/// goes back to what it was and the tmpfs frees their space. Failed before (2026-12-05): the
/// probes held the three inodes for the agent's life.
#[test]
fn agent_lets_go_of_deleted_files() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("gone");
    let fs_dir = scratch.path.join("tmpfs");
    let tmpfs = Tmpfs::mount(&fs_dir);
    let empty = tmpfs.used_bytes();
    let c = env_path("ALLOCWATCH_FIXTURES");
    let programs: [(PathBuf, Vec<&str>); 3] = [
        (c.join("alloc/musl-static/libc_fixture"), vec!["wait-run"]),
        (c.join("growth/cxx_growth"), vec!["1000", "1000000"]),
        (env.go_fixture.clone(), vec!["map_huge"; 50]),
    ];
    let copies: Vec<(PathBuf, &Vec<&str>)> = programs
        .iter()
        .enumerate()
        .map(|(i, (src, args))| {
            let dst = fs_dir.join(format!("aw_gone_{i}"));
            support::copy_program(src, &dst);
            (dst, args)
        })
        .collect();
    let only = format!("^{}/", scratch.path.display());
    // The C++ growth kinds are off by default (`native_growth`).
    let config = scratch.path.join("growth.toml");
    fs::write(&config, "native_growth = true\n").expect("writing config");
    let mut agent = Agent::start(&env, &["--exe", &only, "--config", path_str(&config)]);
    let probes = |agent: &Agent| agent.scrape().global_sum("allocwatch_probes_attached", &[]);
    // Runs `path` until the agent has attached what it will for it (the probe count rose and
    // then held for a second), then kills it; the count then.
    let attach = |agent: &Agent, path: &Path, args: &[&str]| {
        let before = probes(agent);
        let fx = Fixture::spawn_quiet(path, args);
        agent.scrape_until(
            &format!("the probes of {}", path.display()),
            Duration::from_secs(20),
            |m| m.global_sum("allocwatch_probes_attached", &[]) > before,
        );
        let mut last = probes(agent);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            thread::sleep(Duration::from_secs(1));
            let now = probes(agent);
            if now == last || Instant::now() > deadline {
                break;
            }
            last = now;
        }
        drop(fx);
        last
    };
    // The C++ program's shared libraries (libc, libstdc++, …) attached first, through a copy of
    // it off the tmpfs: what stays attached after the deletions.
    let warm = scratch.copy(&c.join("growth/cxx_growth"), "aw_gone_warm");
    let baseline = attach(&agent, &warm, &["1000", "1000000"]);
    for (path, args) in &copies {
        attach(&agent, path, args);
    }
    let held = tmpfs.used_bytes();
    assert!(
        held > empty + (1 << 20),
        "the three programs take space: {held} bytes"
    );
    for (path, _) in &copies {
        fs::remove_file(path).expect("deleting a program");
    }
    // Checked every 10 s by the agent.
    let deleted = Instant::now();
    let attached = probes(&agent);
    let back = agent.try_scrape_until(Duration::from_secs(30), |m| {
        m.global_sum("allocwatch_probes_attached", &[]) == baseline
    });
    assert!(
        back.is_some(),
        "30 s after the deletions: {} probe points attached (before the three programs: \
         {baseline}; with them: {attached})\n{}",
        probes(&agent),
        agent.stderr.text()
    );
    eprintln!(
        "probes detached {:.1?} after the deletions",
        deleted.elapsed()
    );
    // The agent's symbolizer keeps the files of an exited process mapped while it may still
    // name its sites (30 s): the space comes back after that.
    let deadline = deleted + Duration::from_secs(90);
    loop {
        let used = tmpfs.used_bytes();
        if used == empty {
            eprintln!("space freed {:.1?} after the deletions", deleted.elapsed());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "90 s after deleting them the tmpfs uses {used} bytes (empty: {empty}; with the \
             three: {held})\n{}",
            agent.stderr.text()
        );
        thread::sleep(Duration::from_millis(500));
    }
    agent.stop();
    drop(tmpfs);
}

/// A program redeployed at a deleted one's inode number (ext4 and overlayfs give a freed number
/// to the next file created near it): the agent had looked at the old program, a dynamically
/// linked `sleep` (its executable defines no `malloc`: the libc search's verdict on it), and the
/// new program, the static musl fixture, gets its device and inode on an ext4 image of the
/// test's own. Its calls are counted exactly. Failed before (2026-12-06): the verdict on the
/// old file was the new one's, and the new program went untraced.
#[test]
fn agent_probes_a_new_program_at_a_reused_inode() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("reused");
    let fs_dir = scratch.path.join("ext4");
    let ext4 = Ext4Image::mount(&scratch.path.join("ext4.img"), &fs_dir);
    let old = fs_dir.join("aw_old");
    support::copy_program(Path::new("/bin/sleep"), &old);
    let ino = fs::metadata(&old).expect("the old program").ino();
    let mut agent = Agent::start(&env, SELECT_AW);
    let mut sleep = Command::new(&old)
        .arg("60")
        .spawn()
        .expect("starting the old program");
    agent.wait_for_identity(&Identity::of(&old), Instant::now());
    let _ = sleep.kill();
    let _ = sleep.wait();
    fs::remove_file(&old).expect("deleting the old program");
    // The number is free once nothing holds the inode: the agent's symbolizer keeps an exited
    // process's files mapped for 30 s.
    let new = fs_dir.join("aw_reused");
    let aside = fs_dir.join("aside");
    fs::create_dir(&aside).expect("mkdir");
    let deadline = Instant::now() + Duration::from_secs(90);
    for i in 0.. {
        let file = fs::File::create_new(&new).expect("creating the new program");
        if file.metadata().expect("stat").ino() == ino {
            break;
        }
        drop(file);
        fs::rename(&new, aside.join(i.to_string())).expect("moving a file aside");
        assert!(
            Instant::now() < deadline,
            "inode {ino} not given back to a new file on the ext4 image within 90 s\n{}",
            agent.stderr.text()
        );
        thread::sleep(Duration::from_millis(200));
    }
    eprintln!("inode {ino} given back");
    // Written over the reserved file (the same inode).
    let fixture = env_path("ALLOCWATCH_FIXTURES").join("alloc/musl-static/libc_fixture");
    support::copy_program(&fixture, &new);
    fs::set_permissions(&new, fs::Permissions::from_mode(0o755)).expect("chmod");
    assert_eq!(fs::metadata(&new).expect("stat").ino(), ino);
    let id = Identity::of(&new);
    agent.run_found(&new, "wait-run");
    let m = agent
        .try_scrape_until(Duration::from_secs(10), |m| {
            m.value(&id, "allocwatch_free_calls_total", &[]) == Some(RUN_FREES as f64)
        })
        .unwrap_or_else(|| {
            panic!(
                "the new program's calls were not counted\n{}\n{}",
                agent.scrape().lines_of(&id),
                agent.stderr.text()
            )
        });
    // Every call musl has (it has no pvalloc), exactly.
    for &(api, calls, bytes) in API_TOTALS
        .iter()
        .filter(|a| !matches!(a.0, "pvalloc" | "free"))
    {
        let got = |family: &str| m.sum(&id, family, &[("api", api)]);
        assert_eq!(
            (
                got("allocwatch_alloc_calls_total"),
                got("allocwatch_alloc_bytes_total")
            ),
            (calls, bytes),
            "{api} calls and bytes of the new program\n{}",
            m.lines_of(&id)
        );
    }
    agent.stop();
    drop(ext4);
}

/// A small ext4 filesystem in an image file, mounted through a loop device for one test, and
/// unmounted (lazily, which frees the loop device) when dropped, also on a panic.
struct Ext4Image(PathBuf);

impl Ext4Image {
    fn mount(image: &Path, dir: &Path) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        fs::File::create(image)
            .and_then(|f| f.set_len(64 << 20))
            .expect("creating the image");
        let run = |cmd: &mut Command| {
            let status = cmd.status().expect("running mkfs/mount");
            assert!(status.success(), "{cmd:?}: {status}");
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(image));
        fs::create_dir_all(dir).expect("creating the mount point");
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "loop"])
            .arg(image)
            .arg(dir));
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        Self(dir.to_owned())
    }
}

impl Drop for Ext4Image {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A tmpfs mounted for one test, unmounted (lazily) when dropped, also on a panic.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Self {
        fs::create_dir_all(dir).expect("creating the mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256m,mode=0755", "aw-gone"])
            .arg(dir)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mount -t tmpfs {}: {status}",
            dir.display()
        );
        Self(dir.to_owned())
    }

    /// Bytes in use: the files, and the deleted inodes something still holds.
    fn used_bytes(&self) -> u64 {
        let path = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).expect("a path");
        // SAFETY: a struct of integers, for which all zeroes is a value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: statvfs writes the struct it is given; the path is NUL-terminated.
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs {}", self.0.display());
        (st.f_blocks - st.f_bfree) * st.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `want` with a 0 for every kind of `like` it lacks (diffs keep zero entries).
fn with_zeros(want: &BTreeMap<String, u64>, like: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = like.keys().map(|k| (k.clone(), 0)).collect();
    out.extend(want.iter().map(|(k, v)| (k.clone(), *v)));
    out
}

/// "A libc upgrade": a copy of libc in a directory on LD_LIBRARY_PATH is replaced by rename
/// while a process maps it. The process's calls are still counted (its old inode stays mapped)
/// by an agent that was running (and had attached it), by one started after the rename, and by
/// `top --pid` attached after it; processes started afterwards use the new file and are counted
/// too (the first one once the agent has attached the new file).
#[test]
fn libc_replaced_under_a_running_process() {
    let env = TestEnv::get();
    let _serial = serial();
    let scratch = Scratch::new("libc-upgrade");
    let libdir = scratch.path.join("lib");
    fs::create_dir(&libdir).expect("lib dir");
    let libc = libdir.join("libc.so.6");
    fs::copy(libc_path(), &libc).expect("copying libc");
    let upgrade = || {
        let fresh = libdir.join("libc.so.6.new");
        fs::copy(libc_path(), &fresh).expect("copying libc");
        fs::rename(&fresh, &libc).expect("renaming the new libc over the old");
    };
    let ld_path = [("LD_LIBRARY_PATH", path_str(&libdir).to_owned())];
    let old_fx = scratch.copy(&env.libc_fixture, "aw_oldlibc");
    let new_fx = scratch.copy(&env.libc_fixture, "aw_newlibc");
    let late_fx = scratch.copy(&env.libc_fixture, "aw_latelibc");
    let (old_id, new_id, late_id) = (
        Identity::of(&old_fx),
        Identity::of(&new_fx),
        Identity::of(&late_fx),
    );

    // An agent running before and after the upgrade. The upgrade waits until the agent has
    // attached the copy the process maps: after its privilege drop the agent cannot reach a
    // file replaced before it looked (/proc/<pid>/map_files is its owner's only), which it
    // counts as attach failure "mapped file replaced" (deploy/README.md).
    let mut agent = Agent::start(&env, SELECT_AW);
    let probes = agent.scrape().global_sum("allocwatch_probes_attached", &[]);
    let mut old = Gated::spawn(&old_fx, &["wait-run".to_owned()], &ld_path);
    old.stderr.wait_for("ready ", Duration::from_secs(10));
    assert_maps(old.pid, &libc, false);
    agent.scrape_until(
        "the waiting process and its libc's probes",
        Duration::from_secs(5),
        |m| {
            m.value(&old_id, "allocwatch_processes", &[]) == Some(1.0)
                && m.global_sum("allocwatch_probes_attached", &[]) > probes
        },
    );
    upgrade();
    assert_maps(old.pid, &libc, true);
    // The first process of the new file waits until the agent has found it and attached the
    // new file's probes: one that ran before that could not be counted (see the report).
    let probes = agent.scrape().global_sum("allocwatch_probes_attached", &[]);
    let mut new = Gated::spawn(&new_fx, &["wait-run".to_owned()], &ld_path);
    new.stderr.wait_for("ready ", Duration::from_secs(10));
    assert_maps(new.pid, &libc, false);
    agent.scrape_until("the new libc's probes", Duration::from_secs(5), |m| {
        m.value(&new_id, "allocwatch_processes", &[]) == Some(1.0)
            && m.global_sum("allocwatch_probes_attached", &[]) > probes
    });
    signal(new.pid, libc::SIGUSR1);
    assert!(new.wait(Duration::from_secs(10)).success());
    signal(old.pid, libc::SIGUSR1);
    assert!(old.wait(Duration::from_secs(10)).success());
    // Later processes of the new file, however short, are counted from their first call.
    let status = run_env(&new_fx, &["run"], &ld_path);
    assert!(
        status.success(),
        "a later process of the new libc: {status}"
    );
    let m = agent.scrape_until("both processes' counts", Duration::from_secs(10), |m| {
        m.sum(&old_id, "allocwatch_free_calls_total", &[]) >= RUN_FREES
            && m.sum(&new_id, "allocwatch_free_calls_total", &[]) >= RUN_FREES
    });
    env.check_run_totals(&m, &old_id, 1);
    let m = agent.scrape_until("the new libc's processes", Duration::from_secs(10), |m| {
        m.sum(&new_id, "allocwatch_free_calls_total", &[]) >= 2 * RUN_FREES
    });
    env.check_run_totals(&m, &new_id, 2);
    agent.stop();

    // An agent started after the upgrade, and top --pid attached after it: the process maps a
    // libc file that is no longer on disk under its name.
    let mut late = Gated::spawn(&late_fx, &["wait-run".to_owned()], &ld_path);
    late.stderr.wait_for("ready ", Duration::from_secs(10));
    upgrade();
    assert_maps(late.pid, &libc, true);
    let mut agent = Agent::start(&env, SELECT_AW);
    let out = support::temp_file("libc-upgrade.json");
    let mut aw = Allocwatch::spawn(
        &env,
        &[
            "top",
            "--json",
            "-o",
            path_str(&out),
            "--pid",
            &late.pid.to_string(),
        ],
    );
    assert_eq!(aw.wait_tracing_pid(Duration::from_secs(30)), late.pid);
    signal(late.pid, libc::SIGUSR1);
    assert!(late.wait(Duration::from_secs(10)).success());
    let status = aw.wait_exit(Duration::from_secs(30));
    aw.assert_success(status);
    let report = read_json(&out);
    env.check_run_totals_json(process_by_pid(&report, late.pid));
    let m = agent.scrape_until("the late process's counts", Duration::from_secs(10), |m| {
        m.sum(&late_id, "allocwatch_free_calls_total", &[]) >= RUN_FREES
    });
    env.check_run_totals(&m, &late_id, 1);
    agent.stop();
}

// ---------------------------------------------------------------------------------------------
// Checks

fn assert_only_losses(proc: &Value, allowed: &[&str]) {
    let lost = proc["lost"]
        .as_object()
        .unwrap_or_else(|| panic!("no lost object\n{proc:#}"));
    for (cause, n) in lost {
        if !allowed.contains(&cause.as_str()) && cause != "symbolize_process_gone" {
            assert_eq!(n, 0, "lost.{cause}\n{}", summary(proc));
        }
    }
}

/// Calls at every site of the report, and at its unknown sites (no frames: the process's rows
/// that took the calls the full site table had no row for).
fn calls_at_sites(proc: &Value) -> (u64, u64) {
    let sites = array(proc, "sites");
    let calls = |unknown: bool| {
        sites
            .iter()
            .filter(|s| !unknown || array(s, "frames").is_empty())
            .map(|s| u64_at(s, "calls"))
            .sum()
    };
    (calls(false), calls(true))
}

/// (calls, bytes, live allocations, live bytes) summed over the sites of `api` whose frame 0 is
/// `function`.
fn sites_of(proc: &Value, function: &str, api: &str) -> (u64, u64, u64, u64) {
    array(proc, "sites")
        .iter()
        .filter(|s| str_at(s, "api") == api)
        .filter(|s| {
            array(s, "frames")
                .first()
                .is_some_and(|f| f["function"] == function)
        })
        .fold((0, 0, 0, 0), |acc, s| {
            (
                acc.0 + u64_at(s, "calls"),
                acc.1 + u64_at(s, "bytes"),
                acc.2 + u64_at(s, "live_allocations"),
                acc.3 + u64_at(s, "live_bytes"),
            )
        })
}

/// A process's report without its sites (for messages).
fn summary(proc: &Value) -> String {
    let mut p = proc.clone();
    if let Some(o) = p.as_object_mut() {
        let n = o.get("sites").and_then(Value::as_array).map_or(0, Vec::len);
        o.insert("sites".to_owned(), Value::from(format!("({n} sites)")));
    }
    format!("{p:#}")
}

/// Whether `pid` maps `lib` (`deleted`: the file was replaced since).
fn assert_maps(pid: u32, lib: &Path, deleted: bool) {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).expect("reading maps");
    let want = if deleted {
        format!("{} (deleted)", lib.display())
    } else {
        lib.display().to_string()
    };
    assert!(
        maps.lines().any(|l| l.ends_with(&want)),
        "process {pid} does not map {want}:\n{maps}"
    );
}

fn diff(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    a.iter()
        .map(|(k, v)| {
            let sub = b.get(k).copied().unwrap_or(0);
            assert!(*v >= sub, "{a:?} - {b:?}");
            (k.clone(), v - sub)
        })
        .collect()
}

fn lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The `id`s `bpftool -j ARGS…` lists.
fn bpftool_ids(args: &[&str]) -> BTreeSet<u64> {
    bpftool(args)
        .as_array()
        .unwrap_or_else(|| panic!("bpftool {args:?}: not an array"))
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// `bpftool perf`: BPF programs attached through perf events (uprobes among them), with the
/// pid holding each.
fn bpftool_perf() -> Vec<Value> {
    bpftool(&["perf"])
        .as_array()
        .expect("bpftool perf: an array")
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Programs

struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: ExitStatus,
}

/// What shows that a perturbation run was traced.
#[derive(Clone, Copy)]
enum Traced {
    /// At least this many malloc calls.
    Malloc(u64),
    /// A Go program (the report has its `go` object).
    Go,
}

/// A program run with and without tracing.
struct PerturbCmd {
    program: PathBuf,
    args: Vec<String>,
    traced: Traced,
}

impl std::fmt::Display for PerturbCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| a.lines().next().unwrap_or_default().to_owned())
            .collect();
        write!(f, "{} {}", self.program.display(), args.join(" "))
    }
}

impl PerturbCmd {
    fn new(program: &Path, args: &[&str], traced: Traced) -> Self {
        Self {
            program: program.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            traced,
        }
    }

    fn run_plain(&self) -> Output {
        let out = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {self}: {e}"));
        Output {
            stdout: out.stdout,
            stderr: out.stderr,
            status: out.status,
        }
    }

    /// Runs the program (it reads one byte of stdin before it works): `attach(pid)` first, then
    /// the byte.
    fn run_gated(&self, attach: impl FnOnce(u32)) -> GatedOutput {
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {self}: {e}"));
        let stdout = read_all_bytes(child.stdout.take().expect("stdout"));
        let stderr = read_all_bytes(child.stderr.take().expect("stderr"));
        let pid = child.id();
        attach(pid);
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"x").expect("writing the gate byte");
        drop(stdin);
        let status = wait_child(&mut child, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{self} still running after 60 s"));
        GatedOutput {
            pid,
            stdout: stdout.join().expect("stdout reader"),
            stderr: stderr.join().expect("stderr reader"),
            status,
        }
    }

    fn assert_traced(&self, proc: &Value) {
        match self.traced {
            Traced::Malloc(n) => {
                let calls = u64_at(&proc["calls"], "malloc");
                assert!(
                    calls >= n,
                    "`{self}`: {calls} malloc calls traced, want ≥ {n}\n{}",
                    summary(proc)
                );
            }
            Traced::Go => assert!(
                proc["go"].is_object(),
                "`{self}` was not traced as a Go program\n{}",
                summary(proc)
            ),
        }
    }
}

struct GatedOutput {
    pid: u32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: ExitStatus,
}

fn read_all_bytes(mut pipe: impl std::io::Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = pipe.read_to_end(&mut v);
        v
    })
}

/// A fixture started by the test with a pipe on stdin (its gate) and its stderr followed.
struct Gated {
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
    stderr: Lines,
}

impl Gated {
    fn spawn(path: &Path, args: &[String], env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(path);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
        let stderr = Lines::follow(child.stderr.take().expect("stderr"));
        Self {
            pid: child.id(),
            stdin: child.stdin.take(),
            child,
            stderr,
        }
    }

    fn open_gate(&mut self) {
        self.stdin
            .as_mut()
            .expect("stdin open")
            .write_all(b"x")
            .expect("writing the gate byte");
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        self.stdin = None;
        wait_child(&mut self.child, timeout).unwrap_or_else(|| {
            panic!(
                "fixture {} still running after {timeout:?} (killed):\n{}",
                self.pid,
                self.stderr.text()
            )
        })
    }
}

impl Drop for Gated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(path: &Path, args: &[&str]) -> ExitStatus {
    run_env(path, args, &[])
}

/// `PATH ARGS…` to its end, stdin and stdout closed.
fn run_env(path: &Path, args: &[&str], env: &[(&str, String)]) -> ExitStatus {
    let mut cmd = Command::new(path);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Environment

struct TestEnv {
    bin: PathBuf,
    libc_fixture: PathBuf,
    fault_fixture: PathBuf,
    /// growth built by the newest Go toolchain.
    go_fixture: PathBuf,
    /// growth built by the oldest (old bucket maps).
    old_go_fixture: PathBuf,
    gofmt: PathBuf,
    alias_classes: Vec<Vec<String>>,
}

impl TestEnv {
    /// Everything these tests need; panics (never skips) on anything missing.
    fn get() -> Self {
        let bin = env_path("ALLOCWATCH_BIN");
        assert!(bin.is_file(), "ALLOCWATCH_BIN={} is no file", bin.display());
        let c = env_path("ALLOCWATCH_FIXTURES");
        let file = |p: PathBuf| {
            assert!(p.is_file(), "{} missing: run ./x fixtures", p.display());
            p
        };
        let mut toolchains = go_toolchains();
        toolchains.sort_by_key(|t| version_key(&t.version));
        let (oldest, newest) = (&toolchains[0], &toolchains[toolchains.len() - 1]);
        let go = env_path("ALLOCWATCH_GO_FIXTURES");
        let groups = address_groups(&libc_path(), APIS);
        let mut alias_classes: Vec<Vec<String>> = groups.clone();
        for api in APIS {
            if !groups.iter().flatten().any(|a| a == api) {
                alias_classes.push(vec![(*api).to_owned()]);
            }
        }
        Self {
            bin,
            libc_fixture: file(c.join("libc_fixture")),
            fault_fixture: file(c.join("fault_fixture")),
            go_fixture: file(go.join(format!("growth-{}", newest.version))),
            old_go_fixture: file(go.join(format!("growth-{}", oldest.version))),
            gofmt: file(newest.goroot.join("bin/gofmt")),
            alias_classes,
        }
    }

    /// The programs of the perturbation tests (inputs written to `scratch`); the first is the C
    /// fixture's copy.
    fn perturb_commands(&self, scratch: &Scratch) -> Vec<PerturbCmd> {
        let fixture = scratch.copy(&self.fault_fixture, "aw_perturb_fx");
        let unformatted = scratch.path.join("unformatted.go");
        fs::write(&unformatted, GO_UNFORMATTED).expect("writing a Go file");
        let broken = scratch.path.join("broken.go");
        fs::write(&broken, GO_BROKEN).expect("writing a Go file");
        let go_modes = ["map_small", "map_big", "ints", "structs", "big", "noop"];
        vec![
            PerturbCmd::new(&fixture, &["print"], Traced::Malloc(64)),
            PerturbCmd::new(&self.libc_fixture, &["run"], Traced::Malloc(7)),
            PerturbCmd::new(&self.fault_fixture, &["stall"], Traced::Malloc(18)),
            PerturbCmd::new(&self.go_fixture, &go_modes, Traced::Go),
            PerturbCmd::new(&self.old_go_fixture, &go_modes, Traced::Go),
            PerturbCmd::new(
                Path::new("/usr/bin/python3"),
                &["-c", PYTHON_SCRIPT],
                Traced::Malloc(100),
            ),
            PerturbCmd::new(&self.gofmt, &[path_str(&unformatted)], Traced::Go),
            PerturbCmd::new(&self.gofmt, &[path_str(&broken)], Traced::Go),
        ]
    }

    /// `top ARGS… --json -- libc_fixture run`: the process's report (exit code 0 checked).
    fn top_run(&self, args: &[&str]) -> Value {
        self.top_fixture(args, &["run"])
    }

    /// `top --json ARGS -- libc_fixture FIXTURE_ARGS…`: the fixture's process in the report.
    fn top_fixture(&self, args: &[&str], fixture_args: &[&str]) -> Value {
        let out = support::temp_file("top-run.json");
        let mut all = vec!["top", "--json", "-o", path_str(&out)];
        all.extend_from_slice(args);
        all.extend(["--", path_str(&self.libc_fixture)]);
        all.extend_from_slice(fixture_args);
        let mut aw = Allocwatch::spawn(self, &all);
        let pid = aw.wait_tracing_pid(Duration::from_secs(30));
        let status = aw.wait_exit(Duration::from_secs(60));
        aw.assert_success(status);
        let report = read_json(&out);
        let proc = process_by_pid(&report, pid).clone();
        assert_eq!(proc["exit_code"], 0, "libc_fixture's exit\n{proc:#}");
        proc
    }

    /// `top --json -- GO map_big × n`: map grows by kind.
    fn go_map_grows(&self, path: &Path, n: usize) -> BTreeMap<String, u64> {
        let out = support::temp_file("go-grows.json");
        let mut args = vec!["top", "--json", "-o", path_str(&out), "--", path_str(path)];
        args.extend(std::iter::repeat_n("map_big", n));
        let mut aw = Allocwatch::spawn(self, &args);
        let pid = aw.wait_tracing_pid(Duration::from_secs(30));
        let status = aw.wait_exit(Duration::from_secs(60));
        aw.assert_success(status);
        let report = read_json(&out);
        let proc = process_by_pid(&report, pid);
        proc["go"]["map_grows"]["by_kind"]
            .as_object()
            .unwrap_or_else(|| panic!("no go.map_grows.by_kind\n{}", summary(proc)))
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().expect("a count")))
            .filter(|(_, v)| *v > 0)
            .collect()
    }

    /// `times` runs of `libc_fixture run` under `id`: calls and bytes per API (summed over each
    /// set of names at one libc address) and frees.
    fn check_run_totals(&self, m: &Metrics, id: &Identity, times: u64) {
        self.check_totals(
            |api| {
                (
                    m.sum(id, "allocwatch_alloc_calls_total", &[("api", api)]),
                    m.sum(id, "allocwatch_alloc_bytes_total", &[("api", api)]),
                )
            },
            m.sum(id, "allocwatch_free_calls_total", &[]),
            times,
            &|| m.lines_of(id),
        );
    }

    /// The same for one process of a `top --json` report.
    fn check_run_totals_json(&self, proc: &Value) {
        self.check_totals(
            |api| (u64_at(&proc["calls"], api), u64_at(&proc["bytes"], api)),
            u64_at(&proc["calls"], "free"),
            1,
            &|| summary(proc),
        );
    }

    fn check_totals(
        &self,
        get: impl Fn(&str) -> (u64, u64),
        frees: u64,
        times: u64,
        show: &dyn Fn() -> String,
    ) {
        for class in &self.alias_classes {
            if class == &["free"] {
                continue;
            }
            let want = API_TOTALS
                .iter()
                .filter(|a| class.iter().any(|c| c == a.0))
                .fold((0, 0), |acc, a| (acc.0 + a.1 * times, acc.1 + a.2 * times));
            let got = class.iter().fold((0, 0), |acc, api| {
                let (c, b) = get(api);
                (acc.0 + c, acc.1 + b)
            });
            assert_eq!(
                got,
                want,
                "calls and bytes of {class:?} ({times} × libc_fixture run)\n{}",
                show()
            );
        }
        assert_eq!(frees, RUN_FREES * times, "free calls\n{}", show());
    }
}

impl AllocwatchBin for TestEnv {
    fn bin(&self) -> &Path {
        &self.bin
    }
}
