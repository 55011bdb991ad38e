//! `top -- CMD` following what CMD starts, and `--pid` with and without `--follow`: exact
//! counts per process against the C fixture (part of the libc test binary: its helpers).

use super::*;

/// `top -- sh -c 'fixture run'`: the shell and the fixture it starts are traced, each
/// program with its own exact counts (the fixture's equal to a run of it alone, the shell's
/// fork before its exec kept apart), and the tree's totals are their sum.
#[test]
fn follow_shell_wrapper_exact_counts() {
    let env = TestEnv::get();
    let _serial = serial();
    let script = format!("{} run; exit 0", path_str(&env.fixture));
    let (_aw, pid, proc) = run_json(&env, "follow-sh", &["top"], &["--", "sh", "-c", &script]);
    assert_eq!(proc["comm"], "sh", "the root is the wrapper\n{proc:#}");
    let followed = array(&proc, "followed");
    assert_eq!(u64_at(&followed[0], "pid"), u64::from(pid), "root first");
    assert!(followed[0]["parent_pid"].is_null());
    let fixtures: Vec<&Value> = followed
        .iter()
        .filter(|p| p["comm"] == "libc_fixture")
        .collect();
    assert_eq!(fixtures.len(), 1, "one fixture program\n{proc:#}");
    let fx = fixtures[0];
    assert_eq!(fx["replaced_by_exec"], false, "{fx:#}");
    assert_eq!(fx["exit_code"], 0, "{fx:#}");
    assert_eq!(fx["probes"], "attached", "{fx:#}");
    assert_eq!(u64_at(fx, "parent_pid"), u64::from(pid), "{fx:#}");
    check_program_counts(fx, &aliases_of(&proc));
    // The tree's totals are the sum of its programs'.
    for table in ["calls", "bytes"] {
        for api in proc[table].as_object().expect("per-API table").keys() {
            let sum: u64 = followed.iter().map(|p| u64_at(&p[table], api)).sum();
            assert_eq!(u64_at(&proc[table], api), sum, "{table}.{api}\n{proc:#}");
        }
    }
    for key in [
        "processes_not_followed",
        "processes_not_probed",
        "processes_probed_late",
        "processes_unchecked",
        "program_table_full",
    ] {
        assert_eq!(u64_at(&proc["lost"], key), 0, "lost.{key}\n{proc:#}");
    }
}

/// `top -- fixture fork 4`: four children, each with its own exact calls, bytes and exit
/// status; the parent allocates nothing.
#[test]
fn follow_forked_children_exact_per_process() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = path_str(&env.fixture);
    let (_aw, pid, proc) = run_json(&env, "follow-fork", &["top"], &["--", fixture, "fork", "4"]);
    let followed = array(&proc, "followed");
    assert_eq!(
        followed.len(),
        5,
        "the fixture and its 4 children\n{proc:#}"
    );
    assert_eq!(u64_at(&followed[0], "pid"), u64::from(pid));
    assert_eq!(u64_at(&followed[0]["calls"], "malloc"), 0, "{proc:#}");
    let mut children: Vec<(u64, u64, u64, i64)> = followed[1..]
        .iter()
        .map(|c| {
            assert_eq!(u64_at(c, "parent_pid"), u64::from(pid), "{c:#}");
            assert_eq!(c["replaced_by_exec"], false, "{c:#}");
            assert_eq!(c["comm"], "libc_fixture", "{c:#}");
            assert_eq!(
                u64_at(&c["calls"], "malloc"),
                u64_at(&c["calls"], "free"),
                "{c:#}"
            );
            (
                u64_at(&c["calls"], "malloc"),
                u64_at(&c["bytes"], "malloc"),
                u64_at(&c["bytes"], "free"),
                c["exit_code"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    children.sort_unstable();
    // Child i: (i+1) x malloc(100 (i+1)), all freed, exit status i+1.
    let want: Vec<(u64, u64, u64, i64)> = (1..=4u64)
        .map(|n| (n, n * n * 100, n * n * 100, n as i64))
        .collect();
    assert_eq!(children, want, "{proc:#}");
    assert_eq!(u64_at(&proc["calls"], "malloc"), 1 + 2 + 3 + 4);
    assert_eq!(u64_at(&proc, "live_bytes"), 0, "all freed\n{proc:#}");
}

/// `top --no-follow -- sh -c 'fixture run'`: the wrapper only, as before following existed.
#[test]
fn no_follow_traces_only_the_wrapper() {
    let env = TestEnv::get();
    let _serial = serial();
    let script = format!("{} run; exit 0", path_str(&env.fixture));
    let (_aw, _pid, proc) = run_json(
        &env,
        "no-follow",
        &["top", "--no-follow"],
        &["--", "sh", "-c", &script],
    );
    assert_eq!(proc["comm"], "sh", "{proc:#}");
    assert!(proc["followed"].is_null(), "no process list\n{proc:#}");
    assert!(proc["lost"]["processes_not_followed"].is_null(), "{proc:#}");
    // The fixture's APIs the shell never calls.
    for api in ["posix_memalign", "valloc", "pvalloc", "calloc"] {
        assert_eq!(u64_at(&proc["calls"], api), 0, "calls.{api}\n{proc:#}");
    }
    assert!(
        u64_at(&proc["calls"], "malloc") > 0,
        "the shell's own\n{proc:#}"
    );
}

/// `top --pid P` and `top --pid P --follow` on a fixture that forks 3 children once
/// allocwatch is attached: without `--follow` the one process (it allocates nothing itself),
/// with it the children too, each with its exact counts and exit status (like `strace -p` and
/// `strace -f -p`).
#[test]
fn pid_follows_children_only_with_follow() {
    let env = TestEnv::get();
    let _serial = serial();
    for follow in [false, true] {
        let mut fixture = Fixture::spawn_args(&env.fixture, &["wait-fork", "3"], "ready");
        let pid = fixture.pid;
        let pid_arg = pid.to_string();
        let mut args = vec!["top", "--pid", &pid_arg];
        if follow {
            args.push("--follow");
        }
        let (mut aw, out) = spawn_json(&env, "top-pid-follow", &["top"], &args[1..]);
        assert_eq!(aw.wait_tracing_pid(Duration::from_secs(30)), pid);
        signal(pid, libc::SIGUSR1);
        let fixture_status = fixture.wait_exit(Duration::from_secs(30));
        assert!(fixture_status.success(), "fixture: {fixture_status}");
        let status = aw.wait_exit(Duration::from_secs(15));
        aw.assert_success(status);
        let report = read_json(&out);
        let proc = process_by_pid(&report, pid);
        if !follow {
            assert!(proc["followed"].is_null(), "one process\n{proc:#}");
            assert_eq!(u64_at(&proc["calls"], "malloc"), 0, "{proc:#}");
            continue;
        }
        let followed = array(proc, "followed");
        assert_eq!(followed.len(), 4, "the fixture and 3 children\n{proc:#}");
        assert_eq!(u64_at(&followed[0], "pid"), u64::from(pid));
        let mut children: Vec<(u64, u64, i64)> = followed[1..]
            .iter()
            .map(|c| {
                assert_eq!(u64_at(c, "parent_pid"), u64::from(pid), "{c:#}");
                (
                    u64_at(&c["calls"], "malloc"),
                    u64_at(&c["bytes"], "malloc"),
                    c["exit_code"].as_i64().unwrap_or(-1),
                )
            })
            .collect();
        children.sort_unstable();
        let want: Vec<(u64, u64, i64)> = (1..=3u64).map(|n| (n, n * n * 100, n as i64)).collect();
        assert_eq!(children, want, "{proc:#}");
        assert_eq!(u64_at(&proc["calls"], "malloc"), 1 + 2 + 3, "{proc:#}");
    }
}

/// SIGTERM to a following session (`top -- sh -c 'fixture fork 2; exec sleep 60'`): it is
/// forwarded to the command, allocwatch exits 0 with the children's exact counts, and every
/// BPF object it held, the follow tracepoints too, is freed; nothing is left in the kernel.
#[test]
fn following_session_frees_everything_on_sigterm() {
    let env = TestEnv::get();
    let _serial = serial();
    let before = KernelState::snapshot();
    let script = format!(
        "{} fork 2; echo forked >&2; exec sleep 60",
        path_str(&env.fixture)
    );
    let (mut aw, out) = spawn_json(&env, "follow-term", &["top"], &["--", "sh", "-c", &script]);
    let pid = aw.wait_tracing_pid(Duration::from_secs(30));
    // The script's line shares stderr with ours and may come before the tracing line.
    aw.stderr.wait_for_seen("forked", Duration::from_secs(30));
    let held = BpfIds::held_by(aw.child.id());
    assert!(!held.progs.is_empty(), "no BPF program held: {held:?}");
    signal(aw.child.id(), libc::SIGTERM);
    let status = aw.wait_exit(Duration::from_secs(5));
    aw.assert_success(status);
    let report = read_json(&out);
    let proc = process_by_pid(&report, pid);
    let children: Vec<&Value> = array(proc, "followed")
        .iter()
        .filter(|p| p["comm"] == "libc_fixture" && p["parent_pid"] != u64::from(pid))
        .collect();
    let mut calls: Vec<u64> = children
        .iter()
        .map(|c| u64_at(&c["calls"], "malloc"))
        .collect();
    calls.sort_unstable();
    assert_eq!(calls, [1, 2], "the fixture's two children\n{proc:#}");
    held.assert_all_gone("allocwatch", BPF_FREE_LIMIT);
    KernelState::snapshot().assert_nothing_added(&before);
}
