//! allocwatch: which call sites allocate, leak and grow memory. Wiring only: parse the command
//! line, run the subcommand, turn any error into one line on stderr and exit code 1 (a config
//! file's error adds a pointer to the offending line).

use std::process::ExitCode;

use allocwatch::{
    cli::{self, AgentArgs, CliError, Command, ConfigCommand},
    config, daemon, preflight, report,
    session::{self, View},
};

/// Not glibc's malloc: the agent probes glibc's allocation functions in every process on the
/// node, its own included, so each of its allocations through glibc would trap into its own
/// uprobes (BENCHMARKS.md, section 6).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The agent: config file, then flags on top.
async fn agent(a: AgentArgs) -> anyhow::Result<()> {
    let mut cfg = config::load(a.config.as_deref())?;
    // Refusals first (not root, …); the warnings of what the agent can run without come once
    // `daemon::run` has made its own checks.
    preflight::check()?;
    cfg.apply(config::Overrides {
        listen: a.listen,
        web_config: a.web_config,
        ttl: a.ttl,
        top_k: a.top_k,
        mode: a.mode,
        sample_bytes: a.sample_bytes,
        unwind: a.unwind,
        comm: a.comm,
        exe: a.exe,
        cgroup: a.cgroup,
        k8s_namespace: a.k8s_namespace,
        exclude_comm: a.exclude_comm,
        exclude_exe: a.exclude_exe,
        exclude_cgroup: a.exclude_cgroup,
        exclude_k8s_namespace: a.exclude_k8s_namespace,
        probe: a.probes,
        go_malloc: a.go_malloc.then_some(true),
        pprof: a.pprof.then_some(true),
        keep_privileges: a.keep_privileges.then_some(true),
        ..config::Overrides::default()
    })?;
    daemon::run(cfg).await
}

/// The stderr logger: `--log-level`, else `RUST_LOG`, else warn. Lines read like the tool's
/// own (`allocwatch: warning: …`); debug and trace lines name their module (`probe`: the
/// probes' records).
fn init_logger(flag: Option<log::LevelFilter>) {
    let mut b = env_logger::Builder::new();
    b.filter_level(log::LevelFilter::Warn);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        b.parse_filters(&spec);
    }
    if let Some(level) = flag {
        b.filter_level(level);
    }
    b.format(|out, r| {
        use std::io::Write as _;
        let level = match r.level() {
            log::Level::Error => "error",
            log::Level::Warn => "warning",
            log::Level::Info => "info",
            log::Level::Debug => "debug",
            log::Level::Trace => "trace",
        };
        if r.level() >= log::Level::Debug {
            writeln!(out, "allocwatch: {level}: {}: {}", r.target(), r.args())
        } else {
            writeln!(out, "allocwatch: {level}: {}", r.args())
        }
    });
    // Only this call installs a logger.
    let _ = b.try_init();
}

fn main() -> ExitCode {
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        allocwatch::say!("allocwatch: internal error: {info}");
    }));
    let cli = match cli::parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        // --help, --version, or a malformed command line: clap's message and code (0 or 2).
        Err(CliError::Clap(e)) => e.exit(),
        Err(CliError::Value(msg)) => {
            allocwatch::say!("allocwatch: error: {msg}");
            return ExitCode::FAILURE;
        }
    };
    init_logger(cli.log_level);
    if !cli.debug_dir.is_empty() {
        allocwatch::symbolize::set_debug_dirs(cli.debug_dir.clone());
    }
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                match cli.command.unwrap_or(Command::Agent(AgentArgs::default())) {
                    Command::Agent(a) => agent(a).await,
                    Command::Config(ConfigCommand::PrintDefault) => {
                        report::files::print_stdout(&config::print_default())
                    }
                    Command::Top(a) => {
                        session::run(
                            View::Top {
                                interval: a.refresh.interval,
                                flamegraph: a.flamegraph,
                                pprof: a.pprof,
                            },
                            a.common,
                        )
                        .await
                    }
                    Command::Leaks(a) => {
                        session::run(
                            View::Leaks {
                                interval: a.refresh.interval,
                                min_age: a.min_age,
                                flamegraph: a.flamegraph,
                            },
                            a.common,
                        )
                        .await
                    }
                    Command::Maps(a) => session::run(View::Maps, a.common).await,
                }
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            allocwatch::say!("allocwatch: error: {msg}");
            // A config file's error points at the offending line, under the one-line error.
            if let Some(pointer) = e
                .downcast_ref::<config::ConfigError>()
                .and_then(config::ConfigError::pointer)
            {
                allocwatch::say!("{pointer}");
            }
            ExitCode::FAILURE
        }
    }
}
