//! Symbolization end to end, with real uprobes: `allocwatch top` against split_fixture
//! (fixtures/c/split_fixture.c) in the variants the harness builds (target/fixtures/split/, see
//! xtask/src/fixtures.rs).
//!
//! - A stripped binary is named from its separate debug file (by build-id under `--debug-dir`,
//!   by `.gnu_debuglink` in its `.debug/` directory) or its MiniDebugInfo exactly as the
//!   unstripped build is: same functions, and the same file:line where the debug file has DWARF.
//! - A frame-pointer walk through code without frame pointers is cut at the first address that
//!   is no return address (in no mapping, or not after a call), and the cut is counted.

mod support;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;
use support::{
    Allocwatch, AllocwatchBin, allocwatch_bin, array, env_path, path_str, read_json, serial,
    str_at, u64_at,
};

/// fixtures/c/split_fixture.c's one allocation.
const SPLIT_BYTES: u64 = 4242;

/// The fixture's frames of its site, with frame pointers all the way: innermost first.
const FULL_STACK: &[&str] = &[
    "fx_split_inner",
    "fx_split_middle",
    "fx_split_outer",
    "main",
];

struct TestEnv {
    bin: PathBuf,
    split: PathBuf,
}

impl TestEnv {
    fn get() -> Self {
        let split = env_path("ALLOCWATCH_FIXTURES").join("split");
        assert!(
            split.join("minidebug/split_fixture").is_file(),
            "{} missing: run ./x fixtures",
            split.display()
        );
        Self {
            bin: allocwatch_bin("root and the built binary and fixtures"),
            split,
        }
    }

    fn variant(&self, name: &str) -> PathBuf {
        self.split.join(name).join("split_fixture")
    }
}

impl AllocwatchBin for TestEnv {
    fn bin(&self) -> &Path {
        &self.bin
    }
}

/// `allocwatch [EXTRA…] top --json -- FIXTURE MODE`: the traced process's report.
fn top(env: &TestEnv, extra: &[&str], fixture: &Path, mode: &str) -> Value {
    let out = support::temp_file("symbols.json");
    // Frame pointers: these tests are about names, and the frame-pointer walk ends in libc's
    // start code the same way every time; a table walk (`auto`) goes on to `_start`, which a
    // stripped file's debug file may or may not name.
    let mut args = vec!["top", "--unwind", "fp"];
    args.extend(extra);
    args.extend([
        "--json",
        "-o",
        path_str(&out),
        "--",
        path_str(fixture),
        mode,
    ]);
    let mut aw = Allocwatch::spawn(env, &args);
    aw.wait_tracing_pid(Duration::from_secs(30));
    let status = aw.wait_exit(Duration::from_secs(60));
    aw.assert_success(status);
    let report = read_json(&out);
    let _ = std::fs::remove_file(&out);
    let processes = array(&report, "processes");
    assert_eq!(processes.len(), 1, "one process traced\n{report:#}");
    processes[0].clone()
}

/// The one malloc site of SPLIT_BYTES.
fn split_site(proc: &Value) -> &Value {
    let sites: Vec<&Value> = array(proc, "sites")
        .iter()
        .filter(|s| s["api"] == "malloc" && u64_at(s, "bytes") == SPLIT_BYTES)
        .collect();
    assert_eq!(sites.len(), 1, "one site of {SPLIT_BYTES} bytes\n{proc:#}");
    sites[0]
}

/// (function, file name, line) of the site's frames in the fixture itself, innermost first.
fn fixture_frames(site: &Value) -> Vec<(String, Option<String>, Option<u64>)> {
    array(site, "frames")
        .iter()
        .filter(|f| {
            f["module"]
                .as_str()
                .is_some_and(|m| m.ends_with("/split_fixture"))
        })
        .map(|f| {
            let file = f["file"]
                .as_str()
                .map(|p| p.rsplit('/').next().unwrap_or(p).to_owned());
            (
                f["function"].as_str().unwrap_or("?").to_owned(),
                file,
                f["line"].as_u64(),
            )
        })
        .collect()
}

fn functions(frames: &[(String, Option<String>, Option<u64>)]) -> Vec<&str> {
    frames.iter().map(|f| f.0.as_str()).collect()
}

/// Every frame has a module (a name or `module+offset`, never a bare address).
fn assert_no_bare_frame(site: &Value) {
    for f in array(site, "frames") {
        assert!(
            f["module"].is_string(),
            "a frame without a module\n{site:#}"
        );
    }
}

/// The unstripped build, then each stripped one: the same functions (and lines where the debug
/// file has DWARF) in the same order.
#[test]
fn stripped_binaries_are_named_from_their_debug_files() {
    let env = TestEnv::get();
    let _serial = serial();
    let full = top(&env, &[], &env.variant("full"), "run");
    let site = split_site(&full);
    let want = fixture_frames(site);
    assert_eq!(functions(&want), FULL_STACK, "unstripped\n{site:#}");
    assert!(
        want.iter()
            .all(|f| f.1.as_deref() == Some("split_fixture.c") && f.2.is_some()),
        "file:line from DWARF\n{site:#}"
    );
    assert_no_bare_frame(site);

    let debug_dir = env.split.join("buildid/debug");
    let cases: [(&str, Vec<&str>, bool); 3] = [
        ("buildid", vec!["--debug-dir", path_str(&debug_dir)], true),
        ("debuglink", vec![], true),
        // MiniDebugInfo holds symbols, no lines.
        ("minidebug", vec![], false),
    ];
    for (variant, extra, lines) in cases {
        let proc = top(&env, &extra, &env.variant(variant), "run");
        let site = split_site(&proc);
        let got = fixture_frames(site);
        if lines {
            assert_eq!(got, want, "{variant}\n{site:#}");
        } else {
            assert_eq!(functions(&got), FULL_STACK, "{variant}\n{site:#}");
        }
        assert_no_bare_frame(site);
        assert_eq!(
            u64_at(&proc["lost"], "symbolize_stack_cut"),
            0,
            "{variant}\n{proc:#}"
        );
    }

    // The build-id variant without its debug directory: unnamed, but `module+offset`.
    let proc = top(&env, &[], &env.variant("buildid"), "run");
    let site = split_site(&proc);
    let frames = array(site, "frames");
    assert!(
        frames[0]["function"].is_null(),
        "no symbols without the debug file\n{site:#}"
    );
    assert!(frames[0]["offset"].is_u64(), "module+offset\n{site:#}");
    assert_no_bare_frame(site);
}

/// rbp pointing at a fake frame whose return address is in no mapping, or is code that follows
/// no call: the frame-pointer walk (`--unwind fp`; the default walks it with tables,
/// unwind.rs) ends at the last real frame (fx_split_inner, from the stack pointer) and the cut
/// is counted once (one site).
#[test]
fn walks_through_code_without_frame_pointers_are_cut() {
    let env = TestEnv::get();
    let _serial = serial();
    for mode in ["outside", "not-after-call"] {
        let proc = top(&env, &[], &env.variant("nofp"), mode);
        let site = split_site(&proc);
        let frames = array(site, "frames");
        assert_eq!(
            frames.len(),
            1,
            "{mode}: cut after fx_split_inner\n{site:#}"
        );
        assert_eq!(
            str_at(&frames[0], "function"),
            "fx_split_inner",
            "{mode}\n{site:#}"
        );
        assert_eq!(
            u64_at(&proc["lost"], "symbolize_stack_cut"),
            1,
            "{mode}\n{proc:#}"
        );
    }
}
