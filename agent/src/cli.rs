//! Command-line interface (clap derive). Parsing only; behaviour lives in the modules it names.

use std::{ffi::OsString, num::NonZeroU32, path::PathBuf, time::Duration};

use allocwatch_common::capacity;
use clap::{Args, Parser, Subcommand};

use crate::{
    probes::{Capacity, Mode},
    values::{self, CountLimit, DurationLimit},
};

/// Which call sites allocate, leak and grow memory — traced with eBPF uprobes, without touching
/// the traced program.
#[derive(Debug, Parser)]
#[command(
    name = "allocwatch",
    version,
    about,
    long_about = None,
    after_help = "Without a subcommand, allocwatch runs the node agent with its defaults \
                  (`allocwatch agent`: every process of the node, /metrics on 0.0.0.0:9464).\n\
                  Exit codes: 0 done; 1 error (one line `allocwatch: error: …`, also for a \
                  flag value that makes no sense); 2 invalid command line (unknown flag, \
                  missing value, flags that conflict)."
)]
pub struct Cli {
    /// Without a subcommand allocwatch runs as the node agent (`allocwatch agent`).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// What is logged on stderr: off, error, warn, info, debug, trace [default: warn, or as
    /// RUST_LOG says]; debug also says why a probe dropped or skipped an event.
    #[arg(long, global = true, value_name = "LEVEL", value_parser = values::log_level)]
    pub log_level: Option<log::LevelFilter>,
    /// Where separate debug files are looked for, as gdb's debug-file-directory: DIR/.build-id/
    /// by build-id, DIR/<binary's directory>/ by .gnu_debuglink (repeatable; inside a
    /// container, under its root first) [default: /usr/lib/debug].
    #[arg(long, global = true, value_name = "DIR")]
    pub debug_dir: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Node agent (also what plain `allocwatch` runs): trace every selected process, serve
    /// /metrics, /healthz and profiles on 0.0.0.0:9464.
    Agent(AgentArgs),
    /// Configuration file helpers.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Hot allocation sites by bytes and by calls, refreshed every interval; a final summary when
    /// the target exits or the duration ends.
    #[command(override_usage = TARGET_USAGE.replace("SUB", "top"))]
    Top(TopArgs),
    /// Outstanding allocations older than --min-age, grouped by stack, refreshed every interval;
    /// a final report when the target exits or the duration ends
    #[command(override_usage = TARGET_USAGE.replace("SUB", "leaks"))]
    Leaks(LeaksArgs),
    /// Go maps that grew, largest first: growth count, size, bytes and the site of their
    /// first growth.
    #[command(override_usage = TARGET_USAGE.replace("SUB", "maps"))]
    Maps(MapsArgs),
}

/// Usage line of the subcommands that trace one target.
const TARGET_USAGE: &str = "allocwatch SUB [OPTIONS] --pid <PID>\n       \
                            allocwatch SUB [OPTIONS] -- <CMD>...";

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print a complete configuration file with every key at its default.
    PrintDefault,
}

/// Flags of the agent; each overrides the same key of the config file.
#[derive(Debug, Args, Default)]
pub struct AgentArgs {
    /// TOML configuration file (see `allocwatch config print-default`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of /metrics, /healthz and /debug/pprof/* [default: 0.0.0.0:9464]; a host name
    /// (localhost:9464) is resolved at start.
    #[arg(long, value_name = "HOST:PORT", value_parser = values::listen)]
    pub listen: Option<std::net::SocketAddr>,
    /// TLS, client certificates and basic auth: a Prometheus exporter-toolkit web config file
    /// (YAML, as node_exporter's --web.config.file; see deploy/README.md).
    #[arg(long, value_name = "FILE")]
    pub web_config: Option<PathBuf>,
    #[arg(
        long,
        value_name = "DURATION",
        allow_hyphen_values = true,
        value_parser = duration(values::TTL),
        help = duration_help("Keep the series of an exited process this long [default: 10m]", &values::TTL),
    )]
    pub ttl: Option<Duration>,
    #[arg(
        long,
        value_name = "N",
        allow_hyphen_values = true,
        value_parser = values::count_usize(values::TOP_K),
        help = count_help(
            "Call sites per process identity with their own series; the rest are site=\"other\" \
             [default: 10]",
            &values::TOP_K,
        ),
    )]
    pub top_k: Option<usize>,
    /// Trace only processes whose comm matches (regex; repeatable).
    #[arg(long, value_name = "REGEX", value_parser = values::regex)]
    pub comm: Vec<String>,
    /// Trace only processes whose executable path matches (regex; repeatable).
    #[arg(long, value_name = "REGEX", value_parser = values::regex)]
    pub exe: Vec<String>,
    /// Trace only processes whose cgroup path matches (regex; repeatable).
    #[arg(long, value_name = "REGEX", value_parser = values::regex)]
    pub cgroup: Vec<String>,
    /// Trace only processes of pods in matching Kubernetes namespaces (regex; repeatable).
    #[arg(long, value_name = "REGEX", value_parser = values::regex)]
    pub k8s_namespace: Vec<String>,
    /// Never trace processes whose comm matches (regex; repeatable).
    #[arg(long, value_name = "REGEX", value_parser = values::regex)]
    pub exclude_comm: Vec<String>,
    /// Never trace processes whose executable path matches (regex; repeatable).
    #[arg(long, value_name = "REGEX", value_parser = values::regex)]
    pub exclude_exe: Vec<String>,
    /// Never trace processes whose cgroup path matches (regex; repeatable).
    #[arg(long, value_name = "REGEX", value_parser = values::regex)]
    pub exclude_cgroup: Vec<String>,
    /// Never trace processes of pods in matching Kubernetes namespaces (regex; repeatable).
    #[arg(long, value_name = "REGEX", value_parser = values::regex)]
    pub exclude_k8s_namespace: Vec<String>,
    /// Count the calls of any function: `BINARY:SYMBOL[:argN as NAME]…` (repeatable; as `top
    /// --probe`), exported with the built-in C++ and Rust container-growth kinds.
    #[arg(long = "probe", value_name = "SPEC")]
    pub probes: Vec<crate::target::symprobe::ProbeSpec>,
    /// Count C++, Rust and Python container growth in every selected program (off: only in
    /// the files of `--probe`s): a probe hit per growth, 10⁵ a second in a compiler.
    #[arg(long)]
    pub native_growth: bool,
    /// Trace every Go heap allocation (mallocgc) too: a probe hit per allocation.
    #[arg(long)]
    pub go_malloc: bool,
    /// What the libc probes record [default: full]: `full`, `stacks-off`, `count`,
    /// `count-stacks` (see `allocwatch top --help`; the count modes export no live gauges,
    /// size histogram or heap profile).
    #[arg(long, value_name = "MODE", value_parser = values::public_mode)]
    pub mode: Option<Mode>,
    /// Walk the stack of (and, in the full modes, track the block of) one call per N bytes
    /// allocated on average (Poisson, as Go's heap profile); every call is still counted by
    /// API and immediate caller, and per-stack figures are scaled estimates; 0: every call
    /// [default: 524288 (512 KiB) in the modes with stacks or a live table, 0 in count]
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = values::sample_bytes)]
    pub sample_bytes: Option<u64>,
    /// How sampled stacks are walked [default: auto]: `auto` (`.eh_frame` as tables in the
    /// kernel for the files built without frame pointers), `dwarf` (tables for every file) or
    /// `fp` (frame pointers only: the cheapest, cut at code built without them).
    #[arg(long, value_enum, value_name = "HOW", hide_possible_values = true)]
    pub unwind: Option<crate::unwind::Unwind>,
    /// Serve /debug/pprof/allocs and /debug/pprof/heap.
    #[arg(long)]
    pub pprof: bool,
    /// Keep the user and capabilities the agent started with (by default it becomes user 65532
    /// with only what it still needs once its probes are attached).
    #[arg(long)]
    pub keep_privileges: bool,
}

#[derive(Debug, Args)]
pub struct MapsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `--interval` of the views that redraw while they trace (`top`, `leaks`).
#[derive(Debug, Args)]
pub struct Refresh {
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1s",
        allow_hyphen_values = true,
        value_parser = duration(values::INTERVAL),
        help = duration_help("How often the live view is refreshed", &values::INTERVAL),
    )]
    pub interval: Duration,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub refresh: Refresh,
    /// Also write a flamegraph (SVG) of the allocation sites, weighted by bytes.
    #[arg(long, value_name = "FILE", value_parser = values::output_file)]
    pub flamegraph: Option<PathBuf>,
    /// Also write a pprof profile (gzipped protobuf, for `go tool pprof`).
    #[arg(long, value_name = "FILE", value_parser = values::output_file)]
    pub pprof: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LeaksArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub refresh: Refresh,
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1s",
        allow_hyphen_values = true,
        value_parser = duration(values::MIN_AGE),
        help = duration_help(
            "Only report allocations at least this old (0s: every outstanding allocation)",
            &values::MIN_AGE,
        ),
    )]
    pub min_age: Duration,
    /// Also write a flamegraph (SVG) of the outstanding bytes by stack.
    #[arg(long, value_name = "FILE", value_parser = values::output_file)]
    pub flamegraph: Option<PathBuf>,
}

/// What to trace, for how long, and where the report goes.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Trace this running process (with --follow, also the processes it starts after
    /// allocwatch attached).
    #[arg(
        long,
        short = 'p',
        conflicts_with = "command",
        allow_hyphen_values = true,
        value_parser = values::pid
    )]
    pub pid: Option<NonZeroU32>,
    /// Run this command and trace it from its first instruction, with every process it
    /// starts (unless --no-follow).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
    /// Trace only the command itself, not the processes it starts (its children are then
    /// not counted; the libc probes are planted in that one process only).
    #[arg(long, conflicts_with = "follow")]
    pub no_follow: bool,
    /// With --pid: also trace the processes it starts after allocwatch attached (the libc
    /// probes are then planted in every process, filtered in the kernel). A command is
    /// followed unless --no-follow.
    #[arg(long)]
    pub follow: bool,
    #[arg(
        long,
        value_name = "DURATION",
        allow_hyphen_values = true,
        value_parser = duration(values::SESSION),
        help = duration_help(
            "Stop after this long (e.g. 30s, 5m); default: until the target exits or Ctrl-C",
            &values::SESSION,
        ),
    )]
    pub duration: Option<Duration>,
    /// Print the final report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write the final report to this file instead of standard output.
    #[arg(long, short = 'o', value_name = "FILE", value_parser = values::output_file)]
    pub output: Option<PathBuf>,
    #[arg(
        long,
        value_name = "N",
        default_value = "10",
        allow_hyphen_values = true,
        value_parser = values::count_usize(values::TOP),
        help = count_help("Number of sites shown per table", &values::TOP),
    )]
    pub top: usize,
    /// Do not capture user stacks (sites are then identified by their immediate caller only).
    #[arg(long)]
    pub no_stacks: bool,
    /// How user stacks are walked: `auto` (call-frame information, `.eh_frame`, loaded into
    /// the kernel as tables for the files built without frame pointers, decided per file;
    /// frame pointers elsewhere), `dwarf` (tables for every file that has call-frame
    /// information) or `fp` (frame pointers only, the kernel's walk: the cheapest, cut at code
    /// built without them).
    #[arg(long, value_enum, value_name = "HOW", default_value = "auto")]
    pub unwind: crate::unwind::Unwind,
    /// Count the calls of any function: `BINARY:SYMBOL[:argN as NAME]…` (repeatable). SYMBOL
    /// is its ELF symbol, mangled or demangled (C++, Rust); each `argN as NAME` (arg0 … arg5,
    /// the integer arguments) is summed per call site. Reported by site with the built-in
    /// C++ and Rust container-growth kinds, under the symbol's name as given.
    #[arg(long = "probe", value_name = "SPEC")]
    pub probes: Vec<crate::target::symprobe::ProbeSpec>,
    /// Go programs: trace growth and GC only, not every heap allocation (`runtime.mallocgc`
    /// fires for each one; this mode costs the least).
    #[arg(long)]
    pub no_go_malloc: bool,
    #[command(flatten)]
    pub capacity: CapacityArgs,
    /// What the libc probes record: `full` (calls, bytes, failures, outstanding allocations,
    /// user stacks), `stacks-off` (full without stacks), `count` (entry probes only: calls
    /// and bytes per API and immediate caller; cheapest), `count-stacks` (count with stacks).
    #[arg(long, value_parser = values::mode_parser(), default_value = "full")]
    pub mode: Mode,
    /// Walk the stack of (and, in the full modes, track the block of) one call per N bytes
    /// allocated on average (Poisson, as Go's heap profile; 0: every call). Every call is
    /// still counted exactly by API and immediate caller; per-stack figures, live bytes and
    /// `leaks` become estimates, scaled as pprof scales Go's heap profiles.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_hyphen_values = true,
        value_parser = values::sample_bytes
    )]
    pub sample_bytes: u64,
}

/// The flags of [`Capacity`], the probes' kernel map capacities. Every drop caused by a full
/// map is counted and reported.
#[derive(Debug, Args, Clone, Copy)]
pub struct CapacityArgs {
    #[arg(
        long,
        value_name = "N",
        default_value_t = capacity::LIVE,
        allow_hyphen_values = true,
        value_parser = values::count_u32(values::MAX_LIVE),
        help = count_help("Outstanding allocations tracked at once", &values::MAX_LIVE),
    )]
    pub max_live: u32,
    #[arg(
        long,
        value_name = "N",
        default_value_t = capacity::SITES,
        allow_hyphen_values = true,
        value_parser = values::count_u32(values::MAX_SITES),
        help = count_help("Distinct (process, API, stack) sites", &values::MAX_SITES),
    )]
    pub max_sites: u32,
    #[arg(
        long,
        value_name = "N",
        default_value_t = capacity::STACKS,
        allow_hyphen_values = true,
        value_parser = values::count_u32(values::MAX_STACKS),
        help = count_help("Distinct user stacks", &values::MAX_STACKS),
    )]
    pub max_stacks: u32,
    #[arg(
        long,
        value_name = "N",
        default_value_t = capacity::PENDING,
        allow_hyphen_values = true,
        value_parser = values::count_u32(values::MAX_PENDING),
        help = count_help("Threads inside an allocation call at once", &values::MAX_PENDING),
    )]
    pub max_pending: u32,
}

impl From<CapacityArgs> for Capacity {
    fn from(a: CapacityArgs) -> Capacity {
        Capacity {
            max_live: a.max_live,
            max_sites: a.max_sites,
            max_stacks: a.max_stacks,
            max_pending: a.max_pending,
        }
    }
}

/// A duration limit as a clap value parser.
fn duration(limit: DurationLimit) -> impl Fn(&str) -> Result<Duration, values::ValueError> + Clone {
    move |s| values::duration(s, &limit)
}

/// Help text with the allowed range, from the limit itself.
fn duration_help(text: &str, limit: &DurationLimit) -> String {
    format!(
        "{text} (from {} to {})",
        values::duration_text(limit.min),
        values::duration_text(limit.max)
    )
}

fn count_help(text: &str, limit: &CountLimit) -> String {
    format!("{text} (from {} to {})", limit.min, limit.max)
}

/// Why a command line was not run.
#[derive(Debug)]
pub enum CliError {
    /// `--help`, `--version`, or a malformed command line (unknown flag, missing value,
    /// conflicting flags): clap prints it and exits with its code (0, or 2).
    Clap(clap::Error),
    /// A value that makes no sense, or no target: one line, exit code 1.
    Value(String),
}

/// Parses the command line: values are checked here, once, by the parsers of [`values`].
pub fn parse_from<I, T>(args: I) -> Result<Cli, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args).map_err(|e| match e.kind() {
        clap::error::ErrorKind::ValueValidation | clap::error::ErrorKind::InvalidValue => {
            CliError::Value(one_line(&e))
        }
        _ => CliError::Clap(e),
    })?;
    let (sub, common) = match &cli.command {
        Some(Command::Top(a)) => ("top", &a.common),
        Some(Command::Leaks(a)) => ("leaks", &a.common),
        Some(Command::Maps(a)) => ("maps", &a.common),
        _ => return Ok(cli),
    };
    if common.pid.is_none() && common.command.is_empty() {
        return Err(CliError::Value(format!(
            "no target: give --pid PID to trace a running process, or -- CMD [ARGS...] to run \
             one (e.g. `allocwatch {sub} -- ./server`)"
        )));
    }
    Ok(cli)
}

/// clap's message for a refused value (`invalid value 'X' for '--flag <V>': why`, possible
/// values on the next line) as one line.
fn one_line(e: &clap::Error) -> String {
    e.render()
        .to_string()
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:")
        })
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, path::Path};

    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_subcommand_means_agent() {
        assert!(parse_from(["allocwatch"]).unwrap().command.is_none());
        let cli = parse_from(["allocwatch", "agent", "--comm", "^api$", "--ttl", "5m"]).unwrap();
        let Some(Command::Agent(a)) = cli.command else {
            panic!("expected agent")
        };
        assert_eq!(a.comm, ["^api$"]);
        assert_eq!(a.ttl, Some(Duration::from_secs(300)));
        let cli = parse_from(["allocwatch", "agent", "--listen", "localhost:9464"]).unwrap();
        let Some(Command::Agent(a)) = cli.command else {
            panic!("expected agent")
        };
        assert!(a.listen.unwrap().ip().is_loopback());
    }

    #[test]
    fn target_is_required_and_exclusive() {
        let Err(CliError::Value(msg)) = parse_from(["allocwatch", "top"]) else {
            panic!("no target must be refused")
        };
        assert!(msg.contains("--pid PID") && msg.contains("-- CMD"), "{msg}");
        let Err(CliError::Clap(e)) = parse_from(["allocwatch", "top", "--pid", "1", "--", "ls"])
        else {
            panic!("--pid with a command must be refused")
        };
        assert_eq!(e.exit_code(), 2);
        let cli = parse_from(["allocwatch", "top", "--", "ls", "-l"]).unwrap();
        let Some(Command::Top(top)) = cli.command else {
            panic!("expected top")
        };
        assert_eq!(top.common.command, ["ls", "-l"]);
        let cli = parse_from(["allocwatch", "leaks", "--pid", "42", "--min-age", "0s"]).unwrap();
        let Some(Command::Leaks(leaks)) = cli.command else {
            panic!("expected leaks")
        };
        assert_eq!(leaks.common.pid.map(NonZeroU32::get), Some(42));
        assert_eq!(leaks.min_age, Duration::ZERO);
    }

    /// One case of the bad-value snapshot: the command line, the expected exit status and
    /// output.
    struct Case {
        args: Vec<String>,
        status: i32,
        output: Vec<String>,
    }

    /// The cases of `xtask/tests/cli/bad-values.trycmd`, the snapshot that
    /// `xtask/tests/cli.rs` runs against the real binary.
    fn bad_value_cases() -> Vec<Case> {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/tests/cli/bad-values.trycmd");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut cases: Vec<Case> = Vec::new();
        let mut in_block = false;
        for line in text.lines() {
            if line.starts_with("```") {
                in_block = !in_block;
                continue;
            }
            if !in_block {
                continue;
            }
            if let Some(cmd) = line.strip_prefix("$ ") {
                let args = split_shell(cmd);
                assert_eq!(args[0], "allocwatch", "{line}");
                cases.push(Case {
                    args,
                    status: 0,
                    output: Vec::new(),
                });
            } else if let Some(code) = line.strip_prefix("? ") {
                cases.last_mut().expect("a status after a command").status =
                    code.parse().expect("a numeric status");
            } else {
                cases
                    .last_mut()
                    .expect("output after a command")
                    .output
                    .push(line.into());
            }
        }
        // A blank line separates one case's output from the next command.
        for c in &mut cases {
            while c.output.last().is_some_and(|l| l.is_empty()) {
                c.output.pop();
            }
        }
        cases
    }

    /// Words of a command line as the snapshot writes them (single quotes only).
    fn split_shell(cmd: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut word = String::new();
        let mut quoted = false;
        let mut any = false;
        for c in cmd.chars() {
            match c {
                '\'' => {
                    quoted = !quoted;
                    any = true;
                }
                ' ' if !quoted => {
                    if any {
                        out.push(std::mem::take(&mut word));
                        any = false;
                    }
                }
                c => {
                    word.push(c);
                    any = true;
                }
            }
        }
        if any {
            out.push(word);
        }
        out
    }

    /// trycmd's `[..]`: anything within the line.
    fn matches(pattern: &str, line: &str) -> bool {
        let mut rest = line;
        let parts: Vec<&str> = pattern.split("[..]").collect();
        for (i, part) in parts.iter().enumerate() {
            if i == 0 {
                let Some(r) = rest.strip_prefix(part) else {
                    return false;
                };
                rest = r;
            } else if i == parts.len() - 1 {
                return rest.ends_with(part);
            } else {
                let Some(at) = rest.find(part) else {
                    return false;
                };
                rest = &rest[at + part.len()..];
            }
        }
        rest.is_empty()
    }

    /// Every flag of every subcommand, from clap's own definition, has a bad-value case in
    /// the snapshot, and each case is refused as the snapshot says: a value the parsers refuse
    /// is one line and exit 1 (checked here in-process; `xtask/tests/cli.rs` runs the same
    /// cases through the real binary), a malformed command line is clap's exit 2.
    #[test]
    fn every_flag_has_bad_values_refused_in_one_line() {
        let cases = bad_value_cases();
        let mut missing = Vec::new();
        let mut walked = 0;
        let root = Cli::command();
        let mut subs: Vec<(String, &clap::Command)> = Vec::new();
        for sub in root.get_subcommands() {
            if sub.has_subcommands() {
                for inner in sub.get_subcommands() {
                    subs.push((format!("{} {}", sub.get_name(), inner.get_name()), inner));
                }
            } else {
                subs.push((sub.get_name().to_string(), sub));
            }
        }
        for (name, sub) in &subs {
            let words: Vec<&str> = name.split(' ').collect();
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                walked += 1;
                let spellings: Vec<String> = match (arg.get_long(), arg.get_short()) {
                    (Some(l), s) => std::iter::once(format!("--{l}"))
                        .chain(s.map(|s| format!("-{s}")))
                        .collect(),
                    // The positional CMD: after `--`.
                    (None, _) => vec!["--".to_string()],
                };
                let covered = cases.iter().any(|c| {
                    c.args.len() > words.len()
                        && c.args[1..=words.len()] == words[..]
                        && c.args.iter().any(|a| {
                            spellings
                                .iter()
                                .any(|s| a == s || a.starts_with(&format!("{s}=")))
                        })
                });
                if !covered {
                    missing.push(format!("allocwatch {name} {}", spellings[0]));
                }
            }
        }
        assert!(walked > 40, "walked only {walked} arguments");
        assert!(
            missing.is_empty(),
            "no bad-value case in xtask/tests/cli/bad-values.trycmd for:\n{}",
            missing.join("\n")
        );

        let mut wrong = Vec::new();
        for case in &cases {
            let cmd = case.args.join(" ");
            match parse_from(&case.args) {
                Err(CliError::Value(msg)) => {
                    let line = format!("allocwatch: error: {msg}");
                    if case.status != 1
                        || case.output.len() != 1
                        || !matches(&case.output[0], &line)
                    {
                        wrong.push(format!(
                            "{cmd}\n  now: ? 1 {line}\n  snapshot: ? {} {:?}",
                            case.status, case.output
                        ));
                    }
                }
                Err(CliError::Clap(e)) => {
                    if case.status != e.exit_code() || e.exit_code() != 2 {
                        wrong.push(format!(
                            "{cmd}: clap exits {}, snapshot {}",
                            e.exit_code(),
                            case.status
                        ));
                    }
                }
                // Refused after parsing (a missing config file, a command not found): the
                // real binary's run checks the line.
                Ok(_) => {
                    if case.status != 1
                        || case.output.len() != 1
                        || !case.output[0].starts_with("allocwatch: error: ")
                    {
                        wrong.push(format!("{cmd}: parses, so must fail later with one line"));
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "cases that differ:\n{}", wrong.join("\n"));
    }

    /// Each limit appears in its flag's help, from the same constant.
    #[test]
    fn help_shows_the_limits() {
        let mut top = Cli::command();
        let help = top
            .find_subcommand_mut("top")
            .unwrap()
            .render_long_help()
            .to_string();
        for want in [
            format!("(from 1 to {})", values::MAX_LIVE.max),
            "(from 100ms to 1h)".to_string(),
            format!("(from 1 to {})", values::TOP.max),
        ] {
            assert!(help.contains(&want), "{want} not in\n{help}");
        }
    }

    /// Every flag the README shows with `allocwatch SUB` (its usage examples and the text
    /// about them) is in that subcommand's --help; flags it names without a subcommand are in
    /// some subcommand's.
    #[test]
    fn readme_flags_are_in_help() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
                .unwrap();
        // Built: global flags (`--log-level`) are then listed by every subcommand.
        let mut root = Cli::command();
        root.build();
        let flags_of = |sub: &clap::Command| -> BTreeSet<String> {
            sub.get_arguments()
                .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
                .chain(["--help".to_string()])
                .collect()
        };
        let all: BTreeSet<String> = root.get_subcommands().flat_map(flags_of).collect();
        let flag_re = regex::Regex::new(r"--[a-z][a-z0-9-]*").unwrap();
        let mut missing = Vec::new();
        let mut checked = 0;
        for line in readme.lines() {
            let sub = line
                .split_whitespace()
                .skip_while(|w| !w.trim_start_matches('`').starts_with("allocwatch"))
                .nth(1)
                .and_then(|w| root.find_subcommand(w.trim_matches('`')));
            // What follows ` -- ` belongs to the traced command.
            let ours = line.split(" -- ").next().unwrap_or(line);
            for m in flag_re.find_iter(ours) {
                let flag = m.as_str().trim_end_matches('-');
                // Not ours: cargo's, bpftrace's, a toolchain's, node_exporter's
                // (`--web.config.file`), rustc's (`--cfg`), the project's `./x soak`,
                // `./x fuzz`, `./x test --vm`, `./x build --target` and `./x deny`.
                if [
                    "--workspace",
                    "--cfg",
                    "--target",
                    "--exclude",
                    "--no-fail-fast",
                    "--features",
                    "--web",
                    "--minutes",
                    "--scrape-every",
                    "--idle",
                    "--out",
                    "--seconds",
                    "--vm",
                    "--offline",
                    "--refresh-advisories",
                ]
                .contains(&flag)
                    || line.contains("cargo ")
                {
                    continue;
                }
                checked += 1;
                let ok = match sub {
                    Some(sub) if line.trim_start().starts_with("allocwatch ") => {
                        flags_of(sub).contains(flag)
                    }
                    _ => all.contains(flag),
                };
                if !ok {
                    missing.push(format!("{flag} in README line: {line}"));
                }
            }
        }
        for flag in [
            "--exclude-cgroup",
            "--exclude-k8s-namespace",
            "--listen",
            "--mode",
        ] {
            assert!(
                flags_of(root.find_subcommand("agent").unwrap()).contains(flag),
                "agent --help lacks {flag}"
            );
        }
        assert!(checked > 20, "only {checked} README flags seen");
        assert!(
            missing.is_empty(),
            "README flags not in --help:\n{}",
            missing.join("\n")
        );
    }
}
