//! Unwinding without frame pointers (`--unwind dwarf`), end to end with real uprobes:
//! `allocwatch top` names every frame of a malloc made five calls deep in code built -O2
//! -fomit-frame-pointer, through a shared library built the same way
//! (fixtures/c/unwind/, target/fixtures/unwind/), and the chain is the one gdb's own unwinder
//! walks at the same call in the same run. The split fixture's fake frame, which a frame-pointer
//! walk cuts (symbols.rs), is walked through.

mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use support::{
    Allocwatch, AllocwatchBin, allocwatch_bin, array, env_path, path_str, read_json, serial, u64_at,
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
    let sites: Vec<&Value> = array(proc, "sites")
        .iter()
        .filter(|s| s["api"] == "malloc" && u64_at(s, "bytes") == bytes)
        .collect();
    assert_eq!(sites.len(), 1, "one site of {bytes} bytes\n{proc:#}");
    sites[0]
}

/// gdb's backtrace at `function`'s entry in `fixture ARGS…`: function names, innermost first,
/// up to `main`.
fn gdb_backtrace(fixture: &Path, args: &[&str], function: &str) -> Vec<String> {
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
            "bt",
            "-ex",
            "kill",
            "--args",
        ])
        .arg(fixture)
        .args(args)
        .output()
        .expect("gdb runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut names = Vec::new();
    for line in text.lines().filter(|l| l.starts_with('#')) {
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

/// Five calls deep through a library, all -fomit-frame-pointer: every frame named, in order,
/// as gdb walks it; no unwind loss.
#[test]
fn dwarf_unwinding_names_every_frame_without_frame_pointers() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = env.unwind_fixture("nofp");
    let go = support::temp_file("unwind-go");
    let out = support::temp_file("unwind.json");
    let mut aw = Allocwatch::spawn(
        &env,
        &[
            "top",
            "--json",
            "--unwind",
            "dwarf",
            "-o",
            path_str(&out),
            "--",
            path_str(&fixture),
            path_str(&go),
        ],
    );
    aw.wait_tracing_pid(Duration::from_secs(30));
    // The fixture waits for the go file: made once the library's and libc's tables are in
    // (said before or after the tracing line, as the exec stop or a later look found them).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !aw.stderr.text().lines().any(|l| {
        l.starts_with("allocwatch: unwind tables for pid")
            && l.contains("libunwfix.so")
            && l.contains("libc.so.6")
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "no unwind tables for the library and libc\n{}",
            aw.stderr.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&go, b"").unwrap();
    let status = aw.wait_exit(Duration::from_secs(60));
    aw.assert_success(status);
    let report = read_json(&out);
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&go);
    let processes = array(&report, "processes");
    assert_eq!(processes.len(), 1, "one process traced\n{report:#}");
    let proc = &processes[0];
    let site = site_of(proc, UW_BYTES);
    let got = functions_to_main(site);
    assert_eq!(got, UW_STACK, "allocwatch\n{site:#}");

    // The peer: gdb's unwinder at the allocating function's entry, same binary, same run.
    std::fs::write(&go, b"").unwrap();
    let peer = gdb_backtrace(&fixture, &[path_str(&go)], "fx_uw_leaf");
    let _ = std::fs::remove_file(&go);
    assert_eq!(got, peer, "allocwatch vs gdb\n{site:#}");
    for cause in [
        "unwind_unsupported",
        "unwind_read_error",
        "unwind_truncated",
    ] {
        let n = proc["lost"][cause].as_u64().unwrap_or(0);
        assert_eq!(n, 0, "{cause}\n{proc:#}");
    }
}

/// The split fixture's `outside` mode points rbp at a fake frame: the frame-pointer walk is
/// cut there (symbols.rs); the tables walk past it to main.
#[test]
fn dwarf_unwinding_walks_past_a_fake_frame_pointer() {
    let env = TestEnv::get();
    let _serial = serial();
    let fixture = env.fixtures.join("split/nofp/split_fixture");
    let out = support::temp_file("unwind-split.json");
    let mut aw = Allocwatch::spawn(
        &env,
        &[
            "top",
            "--json",
            "--unwind",
            "dwarf",
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
