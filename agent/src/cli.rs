//! Command-line interface (clap derive). Parsing only; behaviour lives in the modules it names.

use std::{num::NonZeroU32, path::PathBuf, time::Duration};

use allocwatch_common::capacity;
use clap::{Args, Parser, Subcommand};

/// Which call sites allocate, leak and grow memory — traced with eBPF uprobes, without touching
/// the traced program.
#[derive(Debug, Parser)]
#[command(name = "allocwatch", version, about, long_about = None)]
pub struct Cli {
    /// Without a subcommand allocwatch runs as the node agent (`allocwatch agent`).
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Node agent: trace every selected process, serve /metrics, /healthz and profiles.
    Agent(AgentArgs),
    /// Configuration file helpers.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Hot allocation sites by bytes and by calls, refreshed every interval; a final summary when
    /// the target exits or the duration ends.
    Top(TopArgs),
    /// Outstanding allocations older than --min-age, grouped by stack.
    Leaks(LeaksArgs),
    /// Go maps that grew, largest first: growth count, size, bytes and the site of their
    /// first growth.
    Maps(MapsArgs),
}

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
    /// Address of /metrics, /healthz and /debug/pprof/* [default: 0.0.0.0:9464].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// TLS, client certificates and basic auth: a Prometheus exporter-toolkit web config file
    /// (YAML, as node_exporter's --web.config.file; see deploy/README.md).
    #[arg(long, value_name = "FILE")]
    pub web_config: Option<PathBuf>,
    /// Keep the series of an exited process this long (e.g. 10m).
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Call sites per process identity with their own series; the rest are site="other".
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Trace only processes whose comm matches (regex; repeatable).
    #[arg(long, value_name = "REGEX")]
    pub comm: Vec<String>,
    /// Trace only processes whose executable path matches (regex; repeatable).
    #[arg(long, value_name = "REGEX")]
    pub exe: Vec<String>,
    /// Trace only processes whose cgroup path matches (regex; repeatable).
    #[arg(long, value_name = "REGEX")]
    pub cgroup: Vec<String>,
    /// Trace only processes of pods in matching Kubernetes namespaces (regex; repeatable).
    #[arg(long, value_name = "REGEX")]
    pub k8s_namespace: Vec<String>,
    /// Never trace processes whose comm matches (regex; repeatable).
    #[arg(long, value_name = "REGEX")]
    pub exclude_comm: Vec<String>,
    /// Never trace processes whose executable path matches (regex; repeatable).
    #[arg(long, value_name = "REGEX")]
    pub exclude_exe: Vec<String>,
    /// Trace every Go heap allocation (mallocgc) too: a probe hit per allocation.
    #[arg(long)]
    pub go_malloc: bool,
    /// What the libc probes record [default: full]: `full`, `stacks-off`, `count`,
    /// `count-stacks` (see `allocwatch top --help`; the count modes export no live gauges,
    /// size histogram or heap profile).
    #[arg(long, value_enum)]
    pub mode: Option<crate::probes::Mode>,
    /// Serve /debug/pprof/allocs and /debug/pprof/heap.
    #[arg(long)]
    pub pprof: bool,
}

#[derive(Debug, Args)]
pub struct MapsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// How often the live view is refreshed.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Also write a flamegraph (SVG) of the allocation sites, weighted by bytes.
    #[arg(long, value_name = "FILE")]
    pub flamegraph: Option<PathBuf>,
    /// Also write a pprof profile (gzipped protobuf, for `go tool pprof`).
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LeaksArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Only report allocations at least this old.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub min_age: Duration,
    /// Also write a flamegraph (SVG) of the outstanding bytes by stack.
    #[arg(long, value_name = "FILE")]
    pub flamegraph: Option<PathBuf>,
}

/// What to trace, for how long, and where the report goes.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Trace this running process.
    #[arg(
        long,
        short = 'p',
        conflicts_with = "command",
        required_unless_present = "command"
    )]
    pub pid: Option<NonZeroU32>,
    /// Run this command and trace it from its first instruction.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
    /// Stop after this long (e.g. 30s, 5m); default: until the target exits or Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print the final report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write the final report to this file instead of standard output.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Number of sites shown per table.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Do not capture user stacks (sites are then identified by their immediate caller only).
    #[arg(long)]
    pub no_stacks: bool,
    /// Go programs: trace growth and GC only, not every heap allocation (`runtime.mallocgc`
    /// fires for each one; this mode costs the least).
    #[arg(long)]
    pub no_go_malloc: bool,
    #[command(flatten)]
    pub capacity: CapacityArgs,
    /// What the libc probes record: `full` (calls, bytes, failures, outstanding allocations,
    /// user stacks), `stacks-off` (full without stacks), `count` (entry probes only: calls
    /// and bytes per API and immediate caller; cheapest), `count-stacks` (count with stacks).
    #[arg(long, value_enum, default_value_t = crate::probes::Mode::Full)]
    pub mode: crate::probes::Mode,
}

/// Kernel map capacities. Every drop caused by a full map is counted and reported.
#[derive(Debug, Args, Clone, Copy)]
pub struct CapacityArgs {
    /// Outstanding allocations tracked at once.
    #[arg(long, default_value_t = capacity::LIVE)]
    pub max_live: u32,
    /// Distinct (process, API, stack) sites.
    #[arg(long, default_value_t = capacity::SITES)]
    pub max_sites: u32,
    /// Distinct user stacks.
    #[arg(long, default_value_t = capacity::STACKS)]
    pub max_stacks: u32,
    /// Threads inside an allocation call at once.
    #[arg(long, default_value_t = capacity::PENDING)]
    pub max_pending: u32,
}

/// Parses durations like `500ms`, `1s`, `2.5s`, `5m`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: 500ms, 1s, 5m)"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?} in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("1x").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_subcommand_means_agent() {
        assert!(
            Cli::try_parse_from(["allocwatch"])
                .unwrap()
                .command
                .is_none()
        );
        let cli =
            Cli::try_parse_from(["allocwatch", "agent", "--comm", "^api$", "--ttl", "5m"]).unwrap();
        let Some(Command::Agent(a)) = cli.command else {
            panic!("expected agent")
        };
        assert_eq!(a.comm, ["^api$"]);
        assert_eq!(a.ttl, Some(Duration::from_secs(300)));
    }

    #[test]
    fn target_is_required_and_exclusive() {
        assert!(Cli::try_parse_from(["allocwatch", "top"]).is_err());
        assert!(Cli::try_parse_from(["allocwatch", "top", "--pid", "1", "--", "ls"]).is_err());
        let cli = Cli::try_parse_from(["allocwatch", "top", "--", "ls", "-l"]).unwrap();
        let Some(Command::Top(top)) = cli.command else {
            panic!("expected top")
        };
        assert_eq!(top.common.command, ["ls", "-l"]);
        let cli =
            Cli::try_parse_from(["allocwatch", "leaks", "--pid", "42", "--min-age", "0s"]).unwrap();
        let Some(Command::Leaks(leaks)) = cli.command else {
            panic!("expected leaks")
        };
        assert_eq!(leaks.common.pid.map(NonZeroU32::get), Some(42));
        assert_eq!(leaks.min_age, Duration::ZERO);
    }
}
