//! `./x test`: the whole suite. Integration tests (xtask/tests/) run the release binary against
//! real uprobes, so this needs root. Without cargo test arguments it ends with the short soak
//! (issue 17: `./x soak --minutes 2 --ttl 20s --scrape-every 10s`).

use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{agent, cmd, deny, fixtures, fuzz, lint, paths::Paths, setup, soak};

pub fn all(paths: &Paths, extra: &[OsString]) -> anyhow::Result<()> {
    if !crate::host::is_root() {
        bail!(
            "./x test must run as root: the integration tests load eBPF programs and attach \
             uprobes to libc (rerun as root, e.g. `sudo ./x test`)"
        );
    }
    setup::all(paths)?;
    lint::all(paths)?;
    let deny = deny::check(paths, deny::Source::FetchOrVendored)?;
    // deploy/: manifests against the Kubernetes schemas, the DaemonSet's security posture,
    // alert rules (promtool check + unit tests), dashboard queries.
    cmd::run(Command::new("bash").arg(paths.root.join("deploy/check.sh")))
        .context("deploy/check.sh")?;
    let bin = agent::build(paths)?;
    let fixtures = fixtures::build(paths)?;
    let mut cargo = cmd::cargo(paths);
    cargo
        .args([
            "test",
            "--workspace",
            "--exclude",
            "probe-ebpf",
            // Built by cargo-fuzz (below), with its own runtime.
            "--exclude",
            "allocwatch-fuzz",
            "--no-fail-fast",
        ])
        .args(extra)
        .env("ALLOCWATCH_BIN", &bin)
        .env("ALLOCWATCH_FIXTURES", &fixtures.c)
        .env("ALLOCWATCH_GO_FIXTURES", &fixtures.go)
        .env("ALLOCWATCH_GO_TOOLCHAINS", &fixtures.go_toolchains);
    let summary = run_teeing(&mut cargo)?;
    if extra.is_empty() && std::env::var_os("CI").is_some() {
        free_test_builds(paths);
    }
    // A few seconds per fuzz target, after the tests; not with a test filter (as the soak).
    let fuzzed = extra
        .is_empty()
        .then(|| fuzz::run(paths, fuzz::SHORT_SECONDS, &[]).map_err(|e| format!("{e:#}")));
    // The soak runs after the tests even when some failed: both outcomes are reported.
    let soak_args = soak::Args::short(bin);
    let soak = extra
        .is_empty()
        .then(|| soak::run(paths, &soak_args).map_err(|e| format!("{e:#}")));
    println!("\n==== test summary ====");
    for line in &summary.lines {
        println!("{line}");
    }
    println!("{deny}");
    match &fuzzed {
        None => println!("fuzz: skipped (cargo test arguments were given; run `./x fuzz`)"),
        Some(Ok(fuzz::Outcome::Passed { targets, seconds })) => {
            println!("fuzz: passed ({targets} targets, {seconds} s each, no crash)")
        }
        Some(Ok(fuzz::Outcome::Skipped(why))) => println!("fuzz: SKIPPED: {why}"),
        Some(Err(e)) => println!("fuzz: FAILED: {e}"),
    }
    match &soak {
        None => println!(
            "soak: skipped (cargo test arguments were given: a filter or selection; \
             run `./x soak` on its own)"
        ),
        Some(Ok(())) => println!("soak: passed (`{}`)", soak_args.command()),
        Some(Err(e)) => println!("soak: FAILED: {e}"),
    }
    let mut failed = Vec::new();
    if !summary.success {
        failed.push("cargo test (see the FAILED lines above)");
    }
    if matches!(fuzzed, Some(Err(_))) {
        failed.push("fuzzing (see the fuzz line above)");
    }
    if matches!(soak, Some(Err(_))) {
        failed.push("the soak (see its verdicts above)");
    }
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

/// CI only (a clean clone, thrown away after): the test builds are done with once the tests
/// ran, and the fuzz build that follows needs as much again. A clean run once filled a CI
/// machine's disk; this keeps its peak near the test build's (about 4 GB with `target/`'s
/// release agent and fixtures, measured 2026-12-04).
fn free_test_builds(paths: &Paths) {
    let build = paths.root.join("target/debug/build");
    match std::fs::remove_dir_all(&build) {
        Ok(()) => eprintln!(
            "CI: removed {} (tests done) before fuzzing",
            build.display()
        ),
        Err(e) => eprintln!("CI: could not remove {}: {e}", build.display()),
    }
}

struct Summary {
    /// `Running …`, `test result: …`, `… FAILED` and `error: …` lines, in order.
    lines: Vec<String>,
    success: bool,
}

/// Runs `cmd` with stdout and stderr merged into one pipe (so lines keep their order), echoing
/// everything and keeping the lines that make a summary.
fn run_teeing(cmd: &mut Command) -> anyhow::Result<Summary> {
    eprintln!("+ {}", cmd::show(cmd));
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    cmd.stdout(writer.try_clone().context("duplicating a pipe")?)
        .stderr(writer);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::show(cmd)))?;
    // Drop our copies of the write end (held by `cmd`), or the read below never ends.
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut lines = Vec::new();
    let mut filter = SummaryFilter::default();
    for line in BufReader::new(reader).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        lines.extend(filter.keep(&line));
    }
    let status = child.wait().context("waiting for cargo test")?;
    Ok(Summary {
        lines,
        success: status.success(),
    })
}

/// Picks the summary's lines out of cargo test's output: the result lines and the first lines of
/// each panic's message (CI shows only the summary's tail, and a failure that cannot be read there
/// cannot be diagnosed).
#[derive(Default)]
pub struct SummaryFilter {
    /// Lines of the current panic's message still to keep.
    panic_left: usize,
}

impl SummaryFilter {
    /// At most this many lines of each panic's message, each clipped to `CLIP` characters (JSON
    /// dumps in messages are long).
    const PANIC_LINES: usize = 16;
    const CLIP: usize = 400;

    pub fn keep(&mut self, line: &str) -> Option<String> {
        if line.contains("' panicked at ") {
            self.panic_left = Self::PANIC_LINES;
        } else if line.starts_with("stack backtrace:")
            || line.starts_with("note: ")
            || line.starts_with("---- ")
        {
            self.panic_left = 0;
        }
        if self.panic_left > 0 {
            self.panic_left -= 1;
            return Some(match line.char_indices().nth(Self::CLIP) {
                Some((at, _)) => format!("{}…", &line[..at]),
                None => line.to_owned(),
            });
        }
        is_summary_line(line).then(|| line.to_owned())
    }
}

fn is_summary_line(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("Running ")
        || t.starts_with("error: ")
        || t.starts_with("Doc-tests ")
        || t.starts_with("test result:")
        || (t.starts_with("test ") && t.ends_with("FAILED"))
}

#[cfg(test)]
mod tests {
    use super::SummaryFilter;

    #[test]
    fn summary_keeps_results_and_panic_messages() {
        let long = "x".repeat(1000);
        let output = [
            "     Running tests/faults.rs (target/debug/faults-1)",
            "running 2 tests",
            "test a ... ok",
            "test b ... FAILED",
            "---- b stdout ----",
            "thread 'b' panicked at xtask/tests/faults.rs:157:9:",
            "assertion `left == right` failed: stdout differs",
            &long,
            "stack backtrace:",
            "   0: __rustc::rust_begin_unwind",
            "test result: FAILED. 1 passed; 1 failed",
        ];
        let mut filter = SummaryFilter::default();
        let kept: Vec<String> = output.iter().filter_map(|l| filter.keep(l)).collect();
        assert_eq!(kept.len(), 6, "{kept:#?}");
        assert_eq!(kept[0], output[0]);
        assert_eq!(kept[1], "test b ... FAILED");
        assert_eq!(kept[2], output[5]);
        assert_eq!(kept[3], output[6]);
        assert_eq!(kept[4].chars().count(), SummaryFilter::CLIP + 1);
        assert_eq!(kept[5], output[10]);
    }

    #[test]
    fn summary_keeps_at_most_sixteen_lines_of_a_panic() {
        let mut filter = SummaryFilter::default();
        let mut kept = filter
            .keep("thread 'main' panicked at src/x.rs:1:1:")
            .into_iter()
            .count();
        kept += (0..100)
            .filter_map(|i| filter.keep(&format!("line {i}")))
            .count();
        assert_eq!(kept, SummaryFilter::PANIC_LINES);
    }
}
