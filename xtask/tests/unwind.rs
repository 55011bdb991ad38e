//! Unwinding without frame pointers (`--unwind auto`, the default, and `dwarf`), end to end
//! with real uprobes:
//! `allocwatch top` names every frame of a malloc made five calls deep in code built -O2
//! -fomit-frame-pointer, through a shared library built the same way
//! (fixtures/c/unwind/, target/fixtures/unwind/), and the chain is the one gdb's own unwinder
//! walks at the same call in the same run; `auto` loads tables only for the files built without
//! frame pointers. The split fixture's fake frame, which a frame-pointer walk cuts
//! (symbols.rs), is walked through. A malloc 43 frames deep is walked to `main` (`bpf_loop`),
//! and to the 16-frame limit without it. A malloc in a signal handler is walked through the
//! signal frame into the interrupted code and on to `main`, as gdb walks it. A C++ program, a Rust release binary and Debian's
//! python3.11 (named through python3.11-dbg's build-id debug file, inlined frames expanded) are
//! named frame by frame as gdb names them.

mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use support::{
    Allocwatch, AllocwatchBin, allocwatch_bin, array, c_function, env_path, path_str,
    python_and_debug_file, read_json, serial, u64_at,
};

/// fixtures/c/unwind/unwind_fixture.c's one allocation.
const UW_BYTES: u64 = 5151;

/// Its chain, innermost first: the program's and the library's frames.
const UW_STACK: &[&str] = &[
    "fx_uw_leaf",
    "fx_uw_callback",
    "fx_uw_lib_inner",
    "fx_uw_lib_outer",
    "fx_uw_outer",
    "main",
];

/// The same malloc through `libunwdl.so`, opened with dlopen (the fixture's `dlopen` mode).
const UW_DL_STACK: &[&str] = &[
    "fx_uw_leaf",
    "fx_uw_callback",
    "fx_uw_dl_inner",
    "fx_uw_dl_outer",
    "fx_uw_outer_dl",
    "main",
];

/// The deep mode's one allocation and its recursion's depth below `main`
/// (`UW_DEEP_BYTES`, `UW_DEEP_LEVELS` + 1 calls of `fx_uw_deep`).
const UW_DEEP_BYTES: u64 = 6161;
const UW_DEEP_CALLS: usize = 41;

/// The deep mode's chain, innermost first.
fn deep_stack() -> Vec<String> {
    let mut names = vec!["fx_uw_deep_leaf".to_owned()];
    names.extend(std::iter::repeat_n("fx_uw_deep".to_owned(), UW_DEEP_CALLS));
    names.push("main".to_owned());
    names
}

/// The signal modes' one allocation, made in the handler.
const UW_SIG_BYTES: u64 = 7171;

/// gdb's line for a signal trampoline's frame (`#3  <signal handler called>`) and the name
/// allocwatch gives the same frame: the trampoline's symbol, glibc's `__restore_rt`, which
/// `sigaction` makes every handler's return address.
const GDB_SIGNAL_FRAME: &str = "<signal handler called>";
const SIGNAL_TRAMPOLINE: &str = "__restore_rt";

/// The signal modes' chain, innermost first: the handler's frames, the trampoline, the
/// interrupted function (`fx_uw_sig_kill` after its tgkill syscall, or `fx_uw_sig_trap` at its
/// first instruction) and its callers.
fn signal_stack(interrupted: &str) -> Vec<String> {
    [
        "fx_uw_sig_leaf",
        "fx_uw_sig_handler_inner",
        "fx_uw_sig_handler",
        SIGNAL_TRAMPOLINE,
        interrupted,
        "fx_uw_sig_middle",
        "fx_uw_sig_outer",
        "main",
    ]
    .map(str::to_owned)
    .to_vec()
}

struct TestEnv {
    bin: PathBuf,
    fixtures: PathBuf,
}

impl TestEnv {
    fn get() -> Self {
        let fixtures = env_path("ALLOCWATCH_FIXTURES");
        assert!(
            fixtures.join("unwind/nofp/unwind_fixture").is_file(),
            "{} missing: run ./x fixtures",
            fixtures.display()
        );
        Self {
            bin: allocwatch_bin("root and the built binary and fixtures"),
            fixtures,
        }
    }

    fn unwind_fixture(&self, variant: &str) -> PathBuf {
        self.fixtures
            .join("unwind")
            .join(variant)
            .join("unwind_fixture")
    }
}

impl AllocwatchBin for TestEnv {
    fn bin(&self) -> &Path {
        &self.bin
    }
}

/// The functions of a site's frames, innermost first, up to and with `main`.
fn functions_to_main(site: &Value) -> Vec<String> {
    let mut names = Vec::new();
    for f in array(site, "frames") {
        let name = f["function"].as_str().unwrap_or("?").to_owned();
        let done = name == "main";
        names.push(name);
        if done {
            break;
        }
    }
    names
}

/// The one malloc site of `bytes` in the traced process's report.
fn site_of(proc: &Value, bytes: u64) -> &Value {
    api_site_of(proc, "malloc", bytes)
}

/// The one site of `api` (`malloc`, `realloc`, …) of `bytes` in the traced process's report.
fn api_site_of<'a>(proc: &'a Value, api: &str, bytes: u64) -> &'a Value {
    let sites: Vec<&Value> = array(proc, "sites")
        .iter()
        .filter(|s| s["api"] == api && u64_at(s, "bytes") == bytes)
        .collect();
    assert_eq!(sites.len(), 1, "one {api} site of {bytes} bytes\n{proc:#}");
    sites[0]
}

/// gdb's backtrace at `function`'s entry in `fixture GOFILE MODE…` (the go file written
/// first, so the fixture runs at once): function names, innermost first, up to `main`; a
/// signal trampoline's frame ([`GDB_SIGNAL_FRAME`]) as [`SIGNAL_TRAMPOLINE`]. The signals the
/// signal modes send themselves are passed to the program without a stop.
fn gdb_backtrace(fixture: &Path, mode: &[&str], function: &str) -> Vec<String> {
    let go = support::temp_file("unwind-go");
    std::fs::write(&go, b"").unwrap();
    let out = Command::new("gdb")
        .args([
            "-batch",
            "-nx",
            "-ex",
            "set debuginfod enabled off",
            "-ex",
            "handle SIGUSR1 SIGILL nostop noprint pass",
            "-ex",
            &format!("break {function}"),
            "-ex",
            "run",
            "-ex",
            "bt",
            "-ex",
            "kill",
            "--args",
        ])
        .arg(fixture)
        .arg(&go)
        .args(mode)
        .output()
        .expect("gdb runs");
    let _ = std::fs::remove_file(&go);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut names = Vec::new();
    for line in text.lines().filter(|l| l.starts_with('#')) {
        if line.ends_with(GDB_SIGNAL_FRAME) {
            names.push(SIGNAL_TRAMPOLINE.to_owned());
            continue;
        }
        // `#0  fx_uw_leaf () at …` or `#1  0x… in fx_uw_callback () at …`
        let rest = line
            .split_once(" in ")
            .map_or_else(|| line.split_whitespace().nth(1).unwrap_or(""), |(_, r)| r);
        let name = rest.split_whitespace().next().unwrap_or("").to_owned();
        let done = name == "main";
        names.push(name);
        if done {
            break;
        }
    }
    assert!(
        names.last().is_some_and(|n| n == "main"),
        "gdb's backtrace reaches main\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    names
}

/// What `allocwatch top` saw of one run of the unwind fixture: the process's report and
/// allocwatch's stderr.
struct Traced {
    proc: Value,
    stderr: String,
}

/// The unwind tables lines of allocwatch's stderr: (files with a table, files walked with
/// their frame pointers).
fn table_lines(stderr: &str) -> Vec<(String, String)> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("allocwatch: unwind tables for pid "))
        .map(|l| {
            let (tables, kept) = l.split_once("; frame pointers: ").unwrap_or((l, ""));
            (tables.to_owned(), kept.to_owned())
        })
        .collect()
}

/// Waits up to 30 s until allocwatch's stderr says `what` (`said`).
fn wait_stderr(aw: &Allocwatch, what: &str, said: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !said(&aw.stderr.text()) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {what}\n{}",
            aw.stderr.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The unwinder's loss causes: a walk that follows every frame counts none of them.
const UNWIND_LOSSES: [&str; 3] = [
    "unwind_unsupported",
    "unwind_read_error",
    "unwind_truncated",
];
/// [`UNWIND_LOSSES`] and the symbolizer's cut: a stack walked and named to its end.
const WHOLE_STACK: [&str; 4] = [
    "unwind_unsupported",
    "unwind_read_error",
    "unwind_truncated",
    "symbolize_stack_cut",
];

/// Each of `causes` is 0 in `proc`'s `lost` (absent counts as 0); `what` prefixes the message.
fn assert_nothing_lost(proc: &Value, causes: &[&str], what: &str) {
    for cause in causes {
        let n = proc["lost"][cause].as_u64().unwrap_or(0);
        assert_eq!(n, 0, "{what}{cause}\n{proc:#}");
    }
}

/// `allocwatch top [--unwind HOW] -- unwind_fixture GOFILE` for `variant`: the fixture makes
/// its call once the tables line names `libc.so.6` and the fixture's library (with a table,
/// or walked with its frame pointers). No unwind loss.
fn trace_fixture(env: &TestEnv, variant: &str, unwind: Option<&str>) -> Traced {
    let traced = trace_mode(env, variant, unwind, &[], &[]);
    assert_nothing_lost(&traced.proc, &UNWIND_LOSSES, "");
    traced
}

/// [`trace_fixture`] with the fixture's `mode` arguments after GOFILE and `vars` in
/// allocwatch's environment, losses not checked.
fn trace_mode(
    env: &TestEnv,
    variant: &str,
    unwind: Option<&str>,
    mode: &[&str],
    vars: &[(&str, &str)],
) -> Traced {
    let fixture = env.unwind_fixture(variant);
    let go = support::temp_file("unwind-go");
    let out = support::temp_file("unwind.json");
    let mut args = vec!["top", "--json", "-o", path_str(&out)];
    if let Some(how) = unwind {
        args.extend(["--unwind", how]);
    }
    args.extend(["--", path_str(&fixture), path_str(&go)]);
    args.extend(mode);
    let mut aw = Allocwatch::spawn_env(env, &args, vars);
    aw.wait_tracing_pid(Duration::from_secs(30));
    // Said before or after the tracing line, as the exec stop or a later look found them.
    wait_stderr(&aw, "unwind tables for the library and libc", |text| {
        table_lines(text).iter().any(|(t, k)| {
            t.contains("libc.so.6") && (t.contains("libunwfix.so") || k.contains("libunwfix.so"))
        })
    });
    run_to_report(aw, &go, &out)
}

/// Writes GOFILE `go` (the traced program then allocates), waits for `aw`'s exit and reads its
/// JSON report `out`: the one process traced.
fn run_to_report(mut aw: Allocwatch, go: &Path, out: &Path) -> Traced {
    std::fs::write(go, b"").unwrap();
    let status = aw.wait_exit(Duration::from_secs(60));
    aw.assert_success(status);
    let report = read_json(out);
    let _ = std::fs::remove_file(out);
    let _ = std::fs::remove_file(go);
    let processes = array(&report, "processes");
    assert_eq!(processes.len(), 1, "one process traced\n{report:#}");
    Traced {
        proc: processes[0].clone(),
        stderr: aw.stderr.text(),
    }
}

/// Five calls deep through a library, all -fomit-frame-pointer, with the default unwinder
/// (`auto`): every frame named, in order, as gdb walks it; no unwind loss.
#[test]
fn dwarf_unwinding_names_every_frame_without_frame_pointers() {
    let env = TestEnv::get();
    let _serial = serial();
    let traced = trace_fixture(&env, "nofp", None);
    let site = site_of(&traced.proc, UW_BYTES);
    let got = functions_to_main(site);
    assert_eq!(got, UW_STACK, "allocwatch\n{site:#}");

    // The peer: gdb's unwinder at the allocating function's entry, same binary, same run.
    let peer = gdb_backtrace(&env.unwind_fixture("nofp"), &[], "fx_uw_leaf");
    assert_eq!(got, peer, "allocwatch vs gdb\n{site:#}");
}

/// Four times the unwinder's frame limit without `bpf_loop`: the deep mode's malloc under
/// 41 recursive calls (-O2 -fomit-frame-pointer), walked with the tables through `bpf_loop`:
/// every frame named, in order, as gdb walks it; no unwind loss.
#[test]
fn table_walk_names_every_frame_of_a_deep_stack() {
    let env = TestEnv::get();
    let _serial = serial();
    let traced = trace_mode(&env, "nofp", None, &["deep"], &[]);
    assert_nothing_lost(&traced.proc, &UNWIND_LOSSES, "");
    let site = site_of(&traced.proc, UW_DEEP_BYTES);
    let got = functions_to_main(site);
    assert_eq!(got, deep_stack(), "allocwatch\n{site:#}");

    let peer = gdb_backtrace(&env.unwind_fixture("nofp"), &["deep"], "fx_uw_deep_leaf");
    assert_eq!(got, peer, "allocwatch vs gdb\n{site:#}");
}

/// A signal handler (installed with sigaction) that allocates two calls deep, run by a signal
/// the program sends itself three calls below `main` (-O2 -fomit-frame-pointer, rbp holding no
/// frame): with `dwarf` and `auto`, every frame named in order as gdb walks the same call in
/// the same run: the handler's, glibc's trampoline `__restore_rt` (gdb's `<signal handler
/// called>`), then the interrupted function and its callers, read from the signal frame. The
/// `trap` mode's interrupted pc is the first byte of `fx_uw_sig_trap` (a ud2, stepped over by
/// the handler): it is named at that byte, where a return address's lookup one byte before
/// would be outside the function, and the frame's offset says so. No unwind loss, nothing
/// cut. Without `bpf_loop` the walk stops at the trampoline, counted (`unwind_unsupported`).
#[test]
fn table_walk_follows_a_signal_frame_into_the_interrupted_code() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = env.unwind_fixture("nofp");
    for (mode, interrupted) in [("signal", "fx_uw_sig_kill"), ("trap", "fx_uw_sig_trap")] {
        let peer = gdb_backtrace(&fixture, &[mode], "fx_uw_sig_leaf");
        assert_eq!(peer, signal_stack(interrupted), "gdb, {mode}");
        for unwind in ["dwarf", "auto"] {
            let traced = trace_mode(&env, "nofp", Some(unwind), &[mode], &[]);
            assert_nothing_lost(&traced.proc, &WHOLE_STACK, &format!("{mode}, {unwind}: "));
            let site = site_of(&traced.proc, UW_SIG_BYTES);
            assert_eq!(
                functions_to_main(site),
                peer,
                "{mode}, {unwind}: allocwatch vs gdb\n{site:#}\n{}",
                traced.stderr
            );
            if mode == "trap" {
                // The fixture's text is mapped at file offsets equal to its addresses (ld's
                // layout for a PIE): the frame is the function's first byte.
                let frame = &array(site, "frames")[4];
                assert_eq!(
                    u64_at(frame, "offset"),
                    c_function(&fixture, interrupted),
                    "{unwind}: {frame:#}"
                );
            }
        }
    }
    // Without `bpf_loop` the trampoline ends the walk, counted: the handler's frames remain.
    let traced = trace_mode(
        &env,
        "nofp",
        Some("dwarf"),
        &["signal"],
        &[("ALLOCWATCH_NO_BPF_LOOP", "1")],
    );
    let site = site_of(&traced.proc, UW_SIG_BYTES);
    let got: Vec<String> = array(site, "frames")
        .iter()
        .map(|f| f["function"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_eq!(got, signal_stack("")[..3], "no bpf_loop\n{site:#}");
    let lost = &traced.proc["lost"];
    assert_eq!(lost["unwind_unsupported"].as_u64(), Some(1), "{lost:#}");
}

/// Without `bpf_loop` (kernels before 5.17; `ALLOCWATCH_NO_BPF_LOOP=1` here) the table walk
/// is unrolled to 16 frames: the deep stack's first 15 above malloc, and the cut counted.
#[test]
fn without_bpf_loop_the_table_walk_stops_at_16_frames() {
    let env = TestEnv::get();
    let _serial = serial();
    let traced = trace_mode(
        &env,
        "nofp",
        None,
        &["deep"],
        &[("ALLOCWATCH_NO_BPF_LOOP", "1")],
    );
    assert!(
        traced
            .stderr
            .lines()
            .all(|l| !l.contains("kernel features") || l.contains("bpf_loop no")),
        "{}",
        traced.stderr
    );
    let site = site_of(&traced.proc, UW_DEEP_BYTES);
    let got: Vec<String> = array(site, "frames")
        .iter()
        .map(|f| f["function"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_eq!(got, deep_stack()[..15], "allocwatch\n{site:#}");
    let lost = &traced.proc["lost"];
    assert_eq!(lost["unwind_truncated"].as_u64(), Some(1), "{lost:#}");
}

/// `--unwind auto` decides per file: the fixture built without frame pointers gets the tables
/// `dwarf` gives it and the same stack; built with them, the fixture and its library get no
/// table (libc, built without, does) and its frames are walked with their frame pointers,
/// every one named, no loss.
#[test]
fn auto_unwinding_loads_tables_only_where_frame_pointers_are_missing() {
    let env = TestEnv::get();
    let _serial = serial();
    let dwarf = trace_fixture(&env, "nofp", Some("dwarf"));
    let auto = trace_fixture(&env, "nofp", Some("auto"));
    let dwarf_stack = functions_to_main(site_of(&dwarf.proc, UW_BYTES));
    assert_eq!(dwarf_stack, UW_STACK, "dwarf\n{}", dwarf.stderr);
    assert_eq!(
        functions_to_main(site_of(&auto.proc, UW_BYTES)),
        dwarf_stack,
        "auto vs dwarf\n{}",
        auto.stderr
    );
    let last = |t: &Traced| table_lines(&t.stderr).pop().expect("a tables line");
    let (tables, kept) = last(&auto);
    for file in ["unwind_fixture", "libunwfix.so", "libc.so.6"] {
        assert!(
            tables.contains(file),
            "auto: a table for {file}\n{}",
            auto.stderr
        );
    }
    assert_eq!(
        kept, "",
        "auto: nothing walked with frame pointers\n{}",
        auto.stderr
    );

    let fp = trace_fixture(&env, "fp", None);
    assert_eq!(
        functions_to_main(site_of(&fp.proc, UW_BYTES)),
        UW_STACK,
        "frame pointers\n{}",
        fp.stderr
    );
    for (tables, _) in table_lines(&fp.stderr) {
        for file in ["unwind_fixture", "libunwfix.so"] {
            assert!(
                !tables.contains(file),
                "no table for the frame-pointer {file}\n{}",
                fp.stderr
            );
        }
    }
    let (tables, kept) = last(&fp);
    assert!(tables.contains("libc.so.6"), "{}", fp.stderr);
    for file in ["unwind_fixture", "libunwfix.so"] {
        assert!(
            kept.contains(file),
            "{file} walked with frame pointers\n{}",
            fp.stderr
        );
    }
}

/// Tables for what a traced program maps later: a library it opens with dlopen after its
/// tables were loaded gets one at the session's next look (its first call through it, made
/// before, is cut there: that frame-pointer step reads no frame), and the next call is named
/// frame by frame.
#[test]
fn tables_for_a_library_opened_later() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = env.unwind_fixture("nofp");
    let go = support::temp_file("unwind-dl-go");
    let go2 = support::temp_file("unwind-dl-go2");
    let out = support::temp_file("unwind-dl.json");
    let mut aw = Allocwatch::spawn(
        &env,
        &[
            "top",
            "--json",
            "-o",
            path_str(&out),
            "--",
            path_str(&fixture),
            path_str(&go),
            "dlopen",
            path_str(&go2),
        ],
    );
    aw.wait_tracing_pid(Duration::from_secs(30));
    wait_stderr(&aw, "unwind tables for libc", |text| {
        table_lines(text)
            .iter()
            .any(|(t, _)| t.contains("libc.so.6") && t.contains("libunwfix.so"))
    });
    assert!(
        !aw.stderr.text().contains("libunwdl.so"),
        "not opened yet\n{}",
        aw.stderr.text()
    );
    std::fs::write(&go, b"").unwrap();
    wait_stderr(&aw, "table for the library opened later", |text| {
        table_lines(text)
            .iter()
            .any(|(t, _)| t.contains("libunwdl.so"))
    });
    std::fs::write(&go2, b"").unwrap();
    let status = aw.wait_exit(Duration::from_secs(60));
    aw.assert_success(status);
    let report = read_json(&out);
    for f in [&out, &go, &go2] {
        let _ = std::fs::remove_file(f);
    }
    let proc = &array(&report, "processes")[0];
    let chains: Vec<Vec<String>> = array(proc, "sites")
        .iter()
        .filter(|s| s["api"] == "malloc" && u64_at(s, "bytes") == UW_BYTES)
        .map(functions_to_main)
        .collect();
    assert!(
        chains.iter().any(|c| c == UW_DL_STACK),
        "the call after the table came: {UW_DL_STACK:?}\n{chains:#?}\n{proc:#}"
    );
}

/// `top -- sh -c 'unwind_fixture GOFILE; …'`: the fixture is the shell's child; its files
/// get their tables as the session follows it, and its stack is named frame by frame.
#[test]
fn tables_for_the_children_of_a_launched_command() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = env.unwind_fixture("nofp");
    let go = support::temp_file("unwind-child-go");
    let out = support::temp_file("unwind-child.json");
    // Not the shell's last command: it forks the fixture instead of becoming it.
    let script = format!("{} {}; exit 0", path_str(&fixture), path_str(&go));
    let mut aw = Allocwatch::spawn(
        &env,
        &[
            "top",
            "--json",
            "-o",
            path_str(&out),
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    aw.wait_tracing_pid(Duration::from_secs(30));
    wait_stderr(&aw, "table for the child's library", |text| {
        text.lines().any(|l| {
            l.starts_with("allocwatch: unwind table of ")
                && l.contains("/libunwfix.so: ")
                && l.contains("(pid ")
        })
    });
    std::fs::write(&go, b"").unwrap();
    let status = aw.wait_exit(Duration::from_secs(60));
    aw.assert_success(status);
    let report = read_json(&out);
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&go);
    let proc = &array(&report, "processes")[0];
    assert_eq!(proc["comm"], "sh", "the root is the shell\n{proc:#}");
    let site = site_of(proc, UW_BYTES);
    assert_eq!(functions_to_main(site), UW_STACK, "{site:#}");
    assert_nothing_lost(proc, &UNWIND_LOSSES, "");
}

/// The rows of the `allocwatch: unwind table of PATH: N rows (pid …)` lines of `stderr` whose
/// path ends with `/file`.
fn child_table_rows(stderr: &str, file: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("allocwatch: unwind table of "))
        .filter_map(|l| l.split_once(": "))
        .filter(|(path, _)| path.ends_with(&format!("/{file}")))
        .filter_map(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The rows of every table loaded for the shell (its `rows in all` line, the last one before
/// any child's).
fn shell_rows(stderr: &str) -> u64 {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("allocwatch: unwind tables for pid "))
        .filter_map(|l| l.split_once(" rows in all").map(|(head, _)| head))
        .filter_map(|head| head.rsplit('(').next()?.trim().parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("a tables line for the shell\n{stderr}"))
}

/// The rows table is fixed in size and a node keeps running new programs: the table of a
/// program that has exited is given up for the next one's. With the table as large as a shell
/// running the fixture needs (`ALLOCWATCH_DEBUG_UNWIND_ROWS`, a test hook), a copy of the
/// fixture (another file, so another table) run after the fixture exits gets its table, and
/// both runs' stacks are named frame by frame; no unwind loss. Before eviction, the copy
/// found no room and its frames were walked with frame pointers (cut at its first frame).
#[test]
fn tables_of_exited_programs_make_room_for_new_ones() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = env.unwind_fixture("nofp");
    // Beside the original (its library is found through $ORIGIN): another inode, same rows.
    let copy = fixture.with_file_name(format!("unwind_fixture_copy{}", std::process::id()));
    support::copy_program(&fixture, &copy);
    let run = |script: &str, vars: &[(&str, &str)], gos: &[&Path], wait: &[&str]| {
        let out = support::temp_file("unwind-evict.json");
        let mut aw = Allocwatch::spawn_env(
            &env,
            &[
                "top",
                "--json",
                "-o",
                path_str(&out),
                "--",
                "sh",
                "-c",
                script,
            ],
            vars,
        );
        aw.wait_tracing_pid(Duration::from_secs(30));
        for (go, file) in gos.iter().zip(wait) {
            wait_stderr(&aw, &format!("a table for {file}"), |text| {
                !child_table_rows(text, file).is_empty()
            });
            std::fs::write(go, b"").unwrap();
        }
        let status = aw.wait_exit(Duration::from_secs(60));
        aw.assert_success(status);
        let report = read_json(&out);
        let _ = std::fs::remove_file(&out);
        (report, aw.stderr.text())
    };
    let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_owned();
    let (fixture_name, copy_name) = (name(&fixture), name(&copy));

    // How many rows the shell and one run of the fixture take.
    let go = support::temp_file("unwind-evict-go");
    let script = format!("{} {}; exit 0", path_str(&fixture), path_str(&go));
    let (_, stderr) = run(&script, &[], &[&go], &[&fixture_name]);
    let _ = std::fs::remove_file(&go);
    let needed = shell_rows(&stderr)
        + child_table_rows(&stderr, &fixture_name)[0]
        + child_table_rows(&stderr, "libunwfix.so")[0];

    // The same with the copy after it, in a table that holds exactly one run.
    let (go1, go2) = (
        support::temp_file("unwind-evict-go1"),
        support::temp_file("unwind-evict-go2"),
    );
    let script = format!(
        "{} {}; {} {}; exit 0",
        path_str(&fixture),
        path_str(&go1),
        path_str(&copy),
        path_str(&go2)
    );
    let capacity = needed.to_string();
    let (report, stderr) = run(
        &script,
        &[("ALLOCWATCH_DEBUG_UNWIND_ROWS", &capacity)],
        &[&go1, &go2],
        &[&fixture_name, &copy_name],
    );
    for f in [&go1, &go2, &copy] {
        let _ = std::fs::remove_file(f);
    }
    // Both runs' calls at one site, named alike: a chain cut in the copy would be a site of
    // its own.
    let proc = &array(&report, "processes")[0];
    let sites: Vec<&Value> = array(proc, "sites")
        .iter()
        .filter(|s| s["api"] == "malloc" && u64_at(s, "bytes").is_multiple_of(UW_BYTES))
        .collect();
    let got: Vec<(Vec<String>, u64, u64)> = sites
        .iter()
        .map(|s| (functions_to_main(s), u64_at(s, "calls"), u64_at(s, "bytes")))
        .collect();
    let stack: Vec<String> = UW_STACK.iter().map(|&f| f.to_owned()).collect();
    assert_eq!(
        got,
        [(stack, 2, 2 * UW_BYTES)],
        "both runs named (capacity {capacity} rows)\n{stderr}\n{proc:#}"
    );
    assert_nothing_lost(proc, &UNWIND_LOSSES, "");
}

/// The split fixture's `outside` mode points rbp at a fake frame: the frame-pointer walk is
/// cut there (symbols.rs); the tables walk past it to main.
#[test]
fn dwarf_unwinding_walks_past_a_fake_frame_pointer() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = env.fixtures.join("split/nofp/split_fixture");
    let out = support::temp_file("unwind-split.json");
    // The default unwinder (`auto`): the fixture is built without frame pointers.
    let mut aw = Allocwatch::spawn(
        &env,
        &[
            "top",
            "--json",
            "-o",
            path_str(&out),
            "--",
            path_str(&fixture),
            "outside",
        ],
    );
    aw.wait_tracing_pid(Duration::from_secs(30));
    let status = aw.wait_exit(Duration::from_secs(60));
    aw.assert_success(status);
    let report = read_json(&out);
    let _ = std::fs::remove_file(&out);
    let proc = &array(&report, "processes")[0];
    let site = site_of(proc, 4242);
    assert_eq!(
        functions_to_main(site),
        [
            "fx_split_inner",
            "fx_split_middle",
            "fx_split_outer",
            "main"
        ],
        "{site:#}"
    );
    assert_eq!(
        u64_at(&proc["lost"], "symbolize_stack_cut"),
        0,
        "nothing cut\n{proc:#}"
    );
}

/// fixtures/c/unwind/unwind_cxx.cpp's one allocation (`::operator new`, libstdc++'s, which
/// calls malloc).
const UWX_BYTES: u64 = 5353;

/// Its chain from malloc's caller, innermost first, as allocwatch names it (demangled): a
/// virtual call, the lambda (`operator()`: g++'s debug info gives it no other name) behind
/// a `std::function`, whose call operator is inlined into the function template.
const UWX_STACK: &[&str] = &[
    "operator new(unsigned long)",
    "uwx::leaf()",
    "uwx::Circle::grow(int)",
    "operator()",
    "std::function<void (uwx::Shape&)>::operator()(uwx::Shape&) const",
    "void uwx::run<uwx::Shape>(std::function<void (uwx::Shape&)> const&, uwx::Shape&)",
    "main",
];

/// fixtures/rust/unwind_rust.rs's one allocation (`Vec::with_capacity`).
const UWR_BYTES: u64 = 5454;

/// The fixture's own frames in that chain, innermost first: below them the standard
/// library's inlined allocation path, above them its runtime's start (lang_start) up to the
/// C `main`, both checked against gdb, not here (they change with the toolchain).
const UWR_OWN: &[&str] = &[
    "unwind_rust::leaf",
    "<unwind_rust::Circle as unwind_rust::Shape>::grow",
    "unwind_rust::main::{closure#0}",
    "unwind_rust::run::<dyn unwind_rust::Shape>",
    "unwind_rust::main",
];

/// gdb's names for the frames above malloc when `program GOFILE` first calls malloc in
/// `function` (a breakpoint there, then one at malloc), innermost first, up to `main`.
/// Each frame is named from its function's linkage name, demangled by gdb, when that is a
/// mangled one (C++ `_Z`, Rust v0 `_R`), else by gdb's frame name (the lambda's, `main`,
/// libstdc++'s operator new from its dynamic symbols): gdb's own frame names are DWARF's
/// (`uwx::leaf` without its parameters, Rust's `{impl#0}` for a trait impl), the linkage
/// names are what allocwatch demangles. The one normalisation, Rust's hashes, which gdb's
/// demangler writes and allocwatch's does not: each crate's disambiguator of a v0 name
/// (`std[79e685616d8acb06]::…`) and the `::h…` suffix of a legacy one (a stable rustc's own
/// crate) are removed. Which frames there are, and in which order, is gdb's unwinder's answer.
fn gdb_frames_above_malloc(program: &Path, function: &str) -> Vec<String> {
    let go = support::temp_file("unwind-lang-go");
    std::fs::write(&go, b"").unwrap();
    let script = support::temp_file("unwind-gdb.py");
    std::fs::write(
        &script,
        r#"import re
f = gdb.newest_frame()
while f is not None:
    s = f.function()
    ln = s.linkage_name if s is not None else None
    name = f.name()
    if ln and ln.startswith("_Z"):
        name = gdb.execute("demangle -l auto -- " + ln, to_string=True).strip()
        name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    elif ln and ln.startswith("_R"):
        name = gdb.execute("demangle -l rust -- " + ln, to_string=True).strip()
        name = re.sub(r"\[[0-9a-f]+\]", "", name)
    print("FRAME " + str(name))
    f = f.older()
"#,
    )
    .unwrap();
    let out = Command::new("gdb")
        .args([
            "-batch",
            "-nx",
            "-ex",
            "set debuginfod enabled off",
            "-ex",
            &format!("break {function}"),
            "-ex",
            "run",
            "-ex",
            "tbreak malloc",
            "-ex",
            "continue",
            "-ex",
            "bt",
            "-x",
        ])
        .arg(&script)
        .args(["-ex", "kill", "--args"])
        .arg(program)
        .arg(&go)
        .output()
        .expect("gdb runs");
    let _ = std::fs::remove_file(&go);
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut names = Vec::new();
    // The first frame is malloc's own.
    for name in text
        .lines()
        .filter_map(|l| l.strip_prefix("FRAME "))
        .skip(1)
    {
        names.push(name.to_owned());
        if name == "main" {
            break;
        }
    }
    assert!(
        names.last().is_some_and(|n| n == "main"),
        "gdb's frames reach main\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    names
}

/// `allocwatch top --unwind HOW -- PROGRAM ARGS… GOFILE`: the program allocates once the
/// tables line names every one of `files` (with a table); no unwind loss, nothing cut.
fn trace_program(
    env: &TestEnv,
    program: &Path,
    program_args: &[&str],
    unwind: &str,
    files: &[&str],
) -> Traced {
    let go = support::temp_file("unwind-lang-go");
    let out = support::temp_file("unwind-lang.json");
    let mut args = vec![
        "top",
        "--json",
        "-o",
        path_str(&out),
        "--unwind",
        unwind,
        "--",
        path_str(program),
    ];
    args.extend(program_args);
    args.push(path_str(&go));
    let mut aw = Allocwatch::spawn(env, &args);
    aw.wait_tracing_pid(Duration::from_secs(30));
    wait_stderr(
        &aw,
        "unwind tables for the program and its libraries",
        |text| {
            table_lines(text)
                .iter()
                .any(|(t, _)| files.iter().all(|f| t.contains(f)))
        },
    );
    let traced = run_to_report(aw, &go, &out);
    assert_nothing_lost(&traced.proc, &WHOLE_STACK, &format!("{unwind}: "));
    traced
}

/// A C++ program built g++ -O2 -fomit-frame-pointer: its operator new five calls deep
/// (a template, std::function, a lambda, a virtual call) is named frame by frame, demangled,
/// in order, with `auto` and `dwarf`, as gdb unwinds the same call in the same run.
#[test]
fn cxx_program_without_frame_pointers_named_as_gdb_names_it() {
    let env = TestEnv::get();
    let _serial = serial();
    let program = env.fixtures.join("unwind/nofp/unwind_cxx");
    let peer = gdb_frames_above_malloc(&program, "uwx::leaf");
    assert_eq!(peer, UWX_STACK, "gdb");
    assert_named_as_gdb(
        &env,
        &program,
        &["unwind_cxx", "libstdc++.so", "libc.so.6"],
        UWX_BYTES,
        &peer,
    );
}

/// A Rust release binary without frame pointers (rustc -C opt-level=2 -C
/// force-frame-pointers=no, linked by lld): its Vec allocation five calls deep (a trait
/// object's method, a closure, a generic function) is named frame by frame with the standard
/// library's inlined frames below and its runtime's above, in order, with `auto` and `dwarf`,
/// as gdb unwinds the same call in the same run. Before, every stack stopped at the first
/// frame of such a binary: lld puts the text's first file page in the read-only segment too,
/// and the table's bias was taken from that segment.
#[test]
fn rust_release_binary_without_frame_pointers_named_as_gdb_names_it() {
    let env = TestEnv::get();
    let _serial = serial();
    let program = env.fixtures.join("unwind/nofp/unwind_rust");
    let peer = gdb_frames_above_malloc(&program, "unwind_rust::leaf");
    let own = |names: &[String]| -> Vec<String> {
        let Some(i) = names.iter().position(|n| n == UWR_OWN[0]) else {
            return Vec::new();
        };
        names[i..].iter().take(UWR_OWN.len()).cloned().collect()
    };
    assert_eq!(own(&peer), UWR_OWN, "gdb\n{peer:#?}");
    assert_named_as_gdb(
        &env,
        &program,
        &["unwind_rust", "libc.so.6"],
        UWR_BYTES,
        &peer,
    );
}

/// `program` traced with `auto` and then `dwarf` (the tables of `files`): its site of `bytes`
/// has gdb's frames `peer`, in order, up to `main`.
fn assert_named_as_gdb(env: &TestEnv, program: &Path, files: &[&str], bytes: u64, peer: &[String]) {
    for unwind in ["auto", "dwarf"] {
        let traced = trace_program(env, program, &[], unwind, files);
        let site = site_of(&traced.proc, bytes);
        let got = functions_to_main(site);
        assert_eq!(
            got, peer,
            "{unwind}: allocwatch vs gdb\n{site:#}\n{}",
            traced.stderr
        );
    }
}

/// The script Debian's python3.11 runs (`python3.11 -I -S SCRIPT GOFILE`): once GOFILE exists,
/// two allocations of sizes nothing else in the run asks for, each made by CPython's C code
/// several calls below the interpreter loop:
/// - `x.extend(t)` on a one-item list: `list_resize` grows the item array pymalloc served to
///   12,348 slots; pymalloc hands a block that large to `malloc`: 98,784 bytes;
/// - `heapq.heappush` on `list(t)` (12,345 items in exactly 12,346 slots), twice: the second
///   push's `PyList_Append` has `list_resize` ask `realloc` for 12,347 + 12,347/8 + 6 slots,
///   rounded down to 4: 13,896, 111,168 bytes.
const PY_SCRIPT: &str = r#"import heapq
import os
import sys
import time

go = sys.argv[1]
deadline = time.monotonic() + 60
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("unwind script: gave up waiting for the go file")
    time.sleep(0.005)


def grow(t):
    x = [0]
    x.extend(t)
    heap = list(t)
    heapq.heappush(heap, -1)
    heapq.heappush(heap, -2)
    return x, heap


grow(tuple(range(12345)))
"#;

/// [`PY_SCRIPT`]'s malloc (`list_extend`) and realloc (`PyList_Append`).
const PY_EXTEND_BYTES: u64 = 98_784;
const PY_APPEND_BYTES: u64 = 111_168;

/// Frames each of those stacks must have, in this order (the append's first), among them
/// static functions and inlined ones, which only python3.11-dbg's debug file names.
const PY_EXTEND_CHAIN: &[&str] = &["list_resize", "list_extend", "method_vectorcall_O"];
const PY_APPEND_CHAIN: &[&str] = &[
    "list_resize",
    "_PyList_AppendTakeRefListResize",
    "_PyList_AppendTakeRef",
    "PyList_Append",
    "_heapq_heappush_impl",
    "_heapq_heappush",
];

/// The interpreter's outermost frame, where both stacks are compared up to: `main` tail-calls
/// `Py_BytesMain`, so neither unwinder sees `main`; above it is libc's start code.
const PY_OUTERMOST: &str = "Py_BytesMain";

/// gdb's frames above libc's allocation functions in `python3.11 -I -S SCRIPT GOFILE` (the go
/// file written first): a breakpoint on `malloc` for [`PY_EXTEND_BYTES`] and one on `realloc`
/// for [`PY_APPEND_BYTES`] (their size arguments, rdi and rsi), set once `Py_RunMain` runs,
/// when libc is mapped. Each frame is `function 0xPC` (an inlined frame has the pc of the frame
/// it is inlined into), innermost first, up to [`PY_OUTERMOST`]: (the stopped function, its
/// callers) for each stop, in the order they came.
fn gdb_python_stacks(python: &Path, script: &Path) -> Vec<(String, Vec<String>)> {
    let go = support::temp_file("unwind-py-go");
    std::fs::write(&go, b"").unwrap();
    let frames = support::temp_file("unwind-py-gdb.py");
    std::fs::write(
        &frames,
        r#"f = gdb.newest_frame()
print("STOP " + str(f.name()))
f = f.older()
while f is not None:
    print("FRAME %s %#x" % (f.name(), f.pc()))
    f = f.older()
"#,
    )
    .unwrap();
    let out = Command::new("gdb")
        .args([
            "-batch",
            "-nx",
            "-ex",
            "set debuginfod enabled off",
            "-ex",
            "break Py_RunMain",
            "-ex",
            "run",
            "-ex",
            &format!("break malloc if $rdi == {PY_EXTEND_BYTES}"),
            "-ex",
            &format!("break realloc if $rsi == {PY_APPEND_BYTES}"),
        ])
        .args(["-ex", "continue", "-x"])
        .arg(&frames)
        .args(["-ex", "continue", "-x"])
        .arg(&frames)
        .args(["-ex", "kill", "--args"])
        .arg(python)
        .args(["-I", "-S"])
        .arg(script)
        .arg(&go)
        .output()
        .expect("gdb runs");
    let _ = std::fs::remove_file(&go);
    let _ = std::fs::remove_file(&frames);
    let text = String::from_utf8_lossy(&out.stdout);
    let outermost = format!("{PY_OUTERMOST} ");
    let mut stops: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if let Some(stopped) = line.strip_prefix("STOP ") {
            stops.push((stopped.to_owned(), Vec::new()));
        } else if let (Some(frame), Some((_, names))) =
            (line.strip_prefix("FRAME "), stops.last_mut())
            && names.last().is_none_or(|n| !n.starts_with(&outermost))
        {
            names.push(frame.to_owned());
        }
    }
    let reached = stops
        .iter()
        .all(|(_, names)| names.last().is_some_and(|n| n.starts_with(&outermost)));
    assert!(
        stops.len() == 2 && reached,
        "gdb stops twice, its frames reaching {PY_OUTERMOST}\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stops
}

/// A site's frames up to [`PY_OUTERMOST`], each as `function 0xADDRESS` ([`gdb_python_stacks`]'
/// form) and as `function file:line` (the file's name without its directory).
fn python_frames(site: &Value) -> (Vec<String>, Vec<String>) {
    let (mut at, mut lines) = (Vec::new(), Vec::new());
    for f in array(site, "frames") {
        let function = f["function"].as_str().unwrap_or("?");
        at.push(format!("{function} {:#x}", u64_at(f, "address")));
        let file = f["file"].as_str().map_or("?", file_name);
        let line = f["line"].as_u64().unwrap_or(0);
        lines.push(format!("{function} {file}:{line}"));
        if function == PY_OUTERMOST {
            break;
        }
    }
    (at, lines)
}

/// The last component of a path.
fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// binutils' addr2line's frames (`function file:line`, inlined ones expanded) for the calls
/// that return to each of `addresses` in `debug_file` (for a non-PIE executable, whose
/// addresses are its own), each looked up at the address before the return address, the
/// call's last byte, as every unwinder does.
fn addr2line_frames(debug_file: &Path, addresses: &[u64]) -> Vec<String> {
    let out = Command::new("addr2line")
        .args(["-a", "-f", "-i", "-e"])
        .arg(debug_file)
        .args(addresses.iter().map(|a| format!("{:#x}", a - 1)))
        .output()
        .expect("addr2line");
    let text = String::from_utf8_lossy(&out.stdout);
    // After each `0x…` address line: (function, file:line) pairs, innermost first.
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("0x")).collect();
    lines
        .chunks(2)
        .map(|pair| {
            let function = pair[0];
            let place = pair.get(1).copied().unwrap_or("?");
            // `file:line (discriminator N)`
            let place = place.split(" (").next().unwrap_or(place);
            format!("{function} {}", file_name(place))
        })
        .collect()
}

/// Whether `chain` appears in `frames` (`function …`), consecutively.
fn has_chain(frames: &[String], chain: &[&str]) -> bool {
    let names: Vec<&str> = frames
        .iter()
        .map(|f| f.split_once(' ').map_or(f.as_str(), |(name, _)| name))
        .collect();
    names.windows(chain.len()).any(|w| w == chain)
}

/// The names python3.11's stacks are checked by come from its debug file alone: the binary has
/// no `.symtab` and no DWARF, its dynamic symbols lack the static functions, and the debug
/// file has them (`NAME.lto_priv.N`).
fn assert_named_only_by_debug_file(python: &Path, debug: &Path, statics: &[&str]) {
    let sections = Command::new("readelf")
        .arg("-SW")
        .arg(python)
        .output()
        .expect("readelf");
    let sections = String::from_utf8_lossy(&sections.stdout);
    for section in [" .symtab ", " .debug_info "] {
        assert!(
            !sections.contains(section),
            "{} has no {section}\n{sections}",
            python.display()
        );
    }
    let dynsym = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(python)
        .output()
        .expect("nm -D");
    let dynsym = String::from_utf8_lossy(&dynsym.stdout);
    for name in statics {
        assert!(
            dynsym
                .lines()
                .all(|l| l.split_whitespace().nth(2) != Some(*name)),
            "{name} is not a dynamic symbol of {}",
            python.display()
        );
        c_function(debug, name);
    }
}

/// A real program nobody here wrote: Debian's python3.11 (LTO, -O2, no frame pointers,
/// stripped; python3.11-dbg's debug file found by its build-id) runs a script whose list
/// growth allocates at sizes of its own. Its malloc under `list_extend` (pymalloc moving a
/// list's items out) and its realloc under `heapq.heappush` → `PyList_Append` →
/// `list_resize`, each from the allocation's caller up to `Py_BytesMain` (26 and 23 frames),
/// with `auto` and `dwarf` (python3.11 and libc get tables): every frame's function and
/// address equal to gdb's at the same call of the same script (inlined frames expanded,
/// `_PyList_AppendTakeRef`, `pymalloc_realloc`, … as gdb expands them), and its file:line
/// equal to binutils' addr2line's reading of the debug file at that address. Not gdb's lines:
/// where the line table has several rows at one address (location views), gdb shows the
/// statement row, allocwatch and addr2line the last, which is the one for the instructions
/// there: the call to `PyList_Append` is `_heapqmodule.c:133` (`if (PyList_Append(heap,
/// item))`), where gdb says 130 (`_heapq_heappush_impl`'s declaration, the inlined body's
/// entry row).
#[test]
fn python_interpreter_named_through_its_debug_file_as_gdb_names_it() {
    let env = TestEnv::get();
    let _serial = serial();
    let (python, debug) = python_and_debug_file();
    assert_named_only_by_debug_file(
        &python,
        &debug,
        &["list_resize", "list_extend", "_heapq_heappush", "run_mod"],
    );
    let script = support::temp_file("unwind-py.py");
    std::fs::write(&script, PY_SCRIPT).unwrap();
    let peer = gdb_python_stacks(&python, &script);
    let (stop_malloc, extend) = &peer[0];
    let (stop_realloc, append) = &peer[1];
    assert!(
        stop_malloc.ends_with("malloc") && stop_realloc.ends_with("realloc"),
        "gdb stops in malloc, then realloc: {stop_malloc}, {stop_realloc}"
    );
    assert!(
        has_chain(extend, PY_EXTEND_CHAIN),
        "gdb: {PY_EXTEND_CHAIN:?}\n{extend:#?}"
    );
    assert!(
        has_chain(&append[..PY_APPEND_CHAIN.len()], PY_APPEND_CHAIN),
        "gdb: {PY_APPEND_CHAIN:?} first\n{append:#?}"
    );
    for unwind in ["auto", "dwarf"] {
        let traced = trace_program(
            &env,
            &python,
            &["-I", "-S", path_str(&script)],
            unwind,
            &["python3.11", "libc.so.6"],
        );
        for (api, bytes, gdb) in [
            ("malloc", PY_EXTEND_BYTES, extend),
            ("realloc", PY_APPEND_BYTES, append),
        ] {
            let site = api_site_of(&traced.proc, api, bytes);
            let (at, lines) = python_frames(site);
            assert_eq!(
                &at, gdb,
                "{unwind}: allocwatch vs gdb, {api} of {bytes}\n{site:#}\n{}",
                traced.stderr
            );
            // One return address per frame on the stack: inlined frames share theirs.
            let mut returns: Vec<u64> = array(site, "frames")[..at.len()]
                .iter()
                .map(|f| u64_at(f, "address"))
                .collect();
            returns.dedup();
            assert_eq!(
                lines,
                addr2line_frames(&debug, &returns),
                "{unwind}: allocwatch vs addr2line, {api} of {bytes}\n{site:#}"
            );
        }
    }
    let _ = std::fs::remove_file(&script);
}
