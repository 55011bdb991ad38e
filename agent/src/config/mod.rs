//! The agent's config file (TOML), layered under command-line flags: defaults, then the file,
//! then [`Overrides`] from the flags. `allocwatch config print-default` prints
//! [`print_default`], a complete, commented file with every key at its default; the
//! Kubernetes ConfigMap (`deploy/kustomize/base/configmap.yaml`) uses exactly the same keys.

mod de;
mod error;
mod print;
#[cfg(test)]
mod tests;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

pub use self::{error::ConfigError, print::print_default};
use crate::{
    probes::{Capacity, Mode},
    serve::{ServeConfig, http::Limits, metrics::MetricsConfig, web_config::WebConfig},
    target::symprobe::{self, ProbeSpec},
    unwind::Unwind,
};

/// All interfaces, port 9464: the port the DaemonSet exposes as `metrics` (also the port
/// OpenTelemetry's Prometheus exporters default to, so scrape configs often expect it).
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9464);

/// The whole configuration. Every field has a default, so an empty file is valid; unknown
/// keys are errors (a typo must not silently fall back to a default).
/// The agent's sampling mean when the configuration sets none (as Go's heap profile).
pub const DEFAULT_SAMPLE_BYTES: u64 = 512 << 10;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where `/metrics`, `/healthz` and (when enabled) `/debug/pprof/*` are served.
    #[serde(deserialize_with = "de::listen")]
    pub listen: SocketAddr,
    /// exporter-toolkit web config file (TLS, client certificates, basic auth); `""` in the
    /// file: none.
    #[serde(deserialize_with = "de::optional_path")]
    pub web_config: Option<PathBuf>,
    pub http: Http,
    /// Series of an exited process are dropped this long after it exits.
    #[serde(deserialize_with = "de::ttl")]
    pub ttl: Duration,
    /// Call sites per process identity with their own series; the rest are `site="other"`.
    #[serde(deserialize_with = "de::top_k")]
    pub top_k: usize,
    /// Hard cap on all `allocwatch_site_*` series of the agent.
    #[serde(deserialize_with = "de::max_site_series")]
    pub max_site_series: usize,
    /// What the libc probes record (`full`, `stacks-off`, `count`, `count-stacks`; costs in
    /// BENCHMARKS.md).
    #[serde(deserialize_with = "de::probe_mode")]
    pub mode: Mode,
    /// Mean bytes between sampled calls (stack walked, block tracked); 0: every call; unset:
    /// [`DEFAULT_SAMPLE_BYTES`] where the mode samples ([`Config::sample_bytes`]).
    #[serde(deserialize_with = "de::sample_bytes")]
    pub sample_bytes: Option<u64>,
    /// How sampled stacks are walked: frame pointers, or the programs' `.eh_frame` tables.
    #[serde(deserialize_with = "de::unwind")]
    pub unwind: Unwind,
    pub select: Select,
    /// User-defined probes, `BINARY:SYMBOL[:argN as NAME]…` each (as `--probe`): calls of any
    /// function counted per site, exported with the built-in C++/Rust growth kinds.
    #[serde(deserialize_with = "de::probes")]
    pub probe: Vec<ProbeSpec>,
    /// The built-in C++ (libstdc++), Rust and Python (CPython 3.11) container-growth kinds in
    /// every selected program.
    /// Off by default: a compiler or build tool grows vectors 10⁵ times a second, each a
    /// uprobe hit, and their sites filled the probe-site table of a busy node in minutes.
    pub native_growth: bool,
    #[serde(deserialize_with = "de::capacity")]
    pub capacity: Capacity,
    pub go: Go,
    pub pprof: Pprof,
    pub kubernetes: Kubernetes,
    /// Keep running as the user and with the capabilities the agent started with, instead of
    /// becoming user 65532 with only CAP_SYS_PTRACE once its probes are attached (`privilege`).
    pub keep_privileges: bool,
}

/// Which processes are traced. Every entry is a regular expression, matched anywhere in the
/// value unless anchored (`^…$`). Empty include lists include everything; excludes win.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Select {
    /// `/proc/<pid>/comm`.
    #[serde(deserialize_with = "de::regexes")]
    pub comm: Vec<String>,
    /// Executable path (`/proc/<pid>/exe` as the process sees it).
    #[serde(deserialize_with = "de::regexes")]
    pub exe: Vec<String>,
    /// cgroup path (the v2 line, or any v1 line, of `/proc/<pid>/cgroup`).
    #[serde(deserialize_with = "de::regexes")]
    pub cgroup: Vec<String>,
    /// Kubernetes namespace of the process' pod (processes outside pods never match).
    #[serde(deserialize_with = "de::regexes")]
    pub k8s_namespace: Vec<String>,
    #[serde(deserialize_with = "de::regexes")]
    pub exclude_comm: Vec<String>,
    #[serde(deserialize_with = "de::regexes")]
    pub exclude_exe: Vec<String>,
    #[serde(deserialize_with = "de::regexes")]
    pub exclude_cgroup: Vec<String>,
    #[serde(deserialize_with = "de::regexes")]
    pub exclude_k8s_namespace: Vec<String>,
}

/// Go runtime probes of Go processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Go {
    /// Map growth (hashGrow / swiss-map grow paths) and slice growth (growslice).
    pub growth: bool,
    /// Every heap allocation (mallocgc): one probe hit per Go allocation, so off by default.
    pub malloc: bool,
    /// GC cycles and stop-the-world pauses.
    pub gc: bool,
}

impl Default for Go {
    fn default() -> Self {
        Go {
            growth: true,
            malloc: false,
            gc: true,
        }
    }
}

/// `/debug/pprof/allocs` and `/debug/pprof/heap` on the listen address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Pprof {
    pub enabled: bool,
}

/// Limits of the HTTP server (`serve::http`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http {
    #[serde(deserialize_with = "de::duration")]
    pub header_timeout: Duration,
    #[serde(deserialize_with = "de::duration")]
    pub idle_timeout: Duration,
    #[serde(deserialize_with = "de::duration")]
    pub request_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Http {
    fn default() -> Self {
        let l = Limits::default();
        Http {
            header_timeout: l.header_timeout,
            idle_timeout: l.idle_timeout,
            request_timeout: l.request_timeout,
            max_connections: l.max_connections,
        }
    }
}

/// More connections than this is a typo, not a plan (each holds a file descriptor).
const MAX_CONNECTIONS_LIMIT: usize = 10_000;

/// Pod names from the API server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Kubernetes {
    pub enabled: bool,
}

impl Default for Kubernetes {
    fn default() -> Self {
        Kubernetes { enabled: true }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN,
            web_config: None,
            http: Http::default(),
            ttl: Duration::from_secs(600),
            top_k: 10,
            max_site_series: 5000,
            mode: Mode::Full,
            sample_bytes: None,
            // True stacks through the code built without frame pointers (most distribution
            // packages): on a node, 5 % more CPU than `fp` in the batch (BENCHMARKS.md §7).
            unwind: Unwind::Auto,
            select: Select::default(),
            probe: Vec::new(),
            native_growth: false,
            capacity: Capacity::default(),
            go: Go::default(),
            pprof: Pprof::default(),
            kubernetes: Kubernetes::default(),
            keep_privileges: false,
        }
    }
}

/// Values given on the command line; `None` (or an empty list) keeps the file's value.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub web_config: Option<PathBuf>,
    pub ttl: Option<Duration>,
    pub top_k: Option<usize>,
    pub max_site_series: Option<usize>,
    pub mode: Option<Mode>,
    pub sample_bytes: Option<u64>,
    pub unwind: Option<Unwind>,
    pub comm: Vec<String>,
    pub exe: Vec<String>,
    pub cgroup: Vec<String>,
    pub k8s_namespace: Vec<String>,
    pub exclude_comm: Vec<String>,
    pub exclude_exe: Vec<String>,
    pub exclude_cgroup: Vec<String>,
    pub exclude_k8s_namespace: Vec<String>,
    pub probe: Vec<ProbeSpec>,
    pub native_growth: Option<bool>,
    pub go_growth: Option<bool>,
    pub go_malloc: Option<bool>,
    pub go_gc: Option<bool>,
    pub pprof: Option<bool>,
    pub kubernetes: Option<bool>,
    pub keep_privileges: Option<bool>,
}

/// Reads the config file (defaults without one); every value is checked while parsing.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    let Some(path) = path else {
        return Ok(Config::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Config::parse_file(path, &text)
}

impl Config {
    /// Parses a config file's text (`path` names it in errors).
    pub fn parse_file(path: &Path, text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::parse(path, text, &e))
    }

    #[cfg(test)]
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Self::parse_file(Path::new("<text>"), text)
    }

    /// Puts the command line's values over the file's (the flags' parsers checked them).
    pub fn apply(&mut self, o: Overrides) -> Result<(), ConfigError> {
        fn set<T>(slot: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *slot = v;
            }
        }
        fn list(slot: &mut Vec<String>, v: Vec<String>) {
            if !v.is_empty() {
                *slot = v;
            }
        }
        set(&mut self.listen, o.listen);
        if o.web_config.is_some() {
            self.web_config = o.web_config;
        }
        set(&mut self.ttl, o.ttl);
        set(&mut self.top_k, o.top_k);
        set(&mut self.max_site_series, o.max_site_series);
        set(&mut self.mode, o.mode);
        if o.sample_bytes.is_some() {
            self.sample_bytes = o.sample_bytes;
        }
        set(&mut self.unwind, o.unwind);
        let s = &mut self.select;
        list(&mut s.comm, o.comm);
        list(&mut s.exe, o.exe);
        list(&mut s.cgroup, o.cgroup);
        list(&mut s.k8s_namespace, o.k8s_namespace);
        list(&mut s.exclude_comm, o.exclude_comm);
        list(&mut s.exclude_exe, o.exclude_exe);
        list(&mut s.exclude_cgroup, o.exclude_cgroup);
        list(&mut s.exclude_k8s_namespace, o.exclude_k8s_namespace);
        if !o.probe.is_empty() {
            self.probe = o.probe;
        }
        set(&mut self.go.growth, o.go_growth);
        set(&mut self.go.malloc, o.go_malloc);
        set(&mut self.go.gc, o.go_gc);
        set(&mut self.pprof.enabled, o.pprof);
        set(&mut self.kubernetes.enabled, o.kubernetes);
        set(&mut self.keep_privileges, o.keep_privileges);
        set(&mut self.native_growth, o.native_growth);
        self.validate()
    }

    /// Mean bytes between sampled calls: as set, else Go's 512 KiB where the mode has stacks
    /// or a live table to sample (a node-wide agent pays the stack walk and the live record on
    /// one call in a few hundred; BENCHMARKS.md, "Sampling"), else 0.
    pub fn sample_bytes(&self) -> u64 {
        self.sample_bytes.unwrap_or(if self.mode.samples(true) {
            DEFAULT_SAMPLE_BYTES
        } else {
            0
        })
    }

    /// What the HTTP server and the exporter take from the configuration.
    pub fn serve_config(&self) -> ServeConfig {
        ServeConfig {
            metrics: MetricsConfig {
                ttl: self.ttl,
                top_k: self.top_k,
                max_site_series: self.max_site_series,
                live: self.mode.tracks_live(),
            },
            pprof: self.pprof.enabled,
            sample_bytes: self.sample_bytes(),
            limits: Limits {
                header_timeout: self.http.header_timeout,
                idle_timeout: self.http.idle_timeout,
                request_timeout: self.http.request_timeout,
                max_connections: self.http.max_connections,
            },
            web_config: self.web_config.clone(),
        }
    }

    /// Checks what the value parsers (`values`) do not: the HTTP limits are sane and the web
    /// config file is valid (read here, before anything is attached).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let h = &self.http;
        for (key, v) in [
            ("http.header_timeout", h.header_timeout),
            ("http.idle_timeout", h.idle_timeout),
            ("http.request_timeout", h.request_timeout),
        ] {
            if v.is_zero() {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be more than 0s".to_string(),
                });
            }
        }
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&h.max_connections) {
            return Err(ConfigError::Invalid {
                key: "http.max_connections",
                reason: format!(
                    "{} is outside 1..={MAX_CONNECTIONS_LIMIT}",
                    h.max_connections
                ),
            });
        }
        if let Some(path) = &self.web_config {
            WebConfig::load(path)?;
        }
        // A probe's kind is its symbol: one named like a kind the agent exports already would
        // be summed into that kind's series.
        let taken = |k: &str| {
            allocwatch_common::libc::Api::ALL
                .iter()
                .any(|a| a.name() == k || a.symbol() == k)
                || ["map_grow", "slice_grow", "large_alloc"].contains(&k)
                || symprobe::BUILTINS.contains(&k)
        };
        if let Some(p) = self.probe.iter().find(|p| taken(&p.symbol)) {
            return Err(ConfigError::Invalid {
                key: "probe",
                reason: format!(
                    "{p}: {} is the name of a kind the agent exports already (the probe's calls \
                     would be summed into that kind's series)",
                    p.symbol
                ),
            });
        }
        // Each binary read and each symbol found now, before anything is loaded.
        symprobe::for_agent(&self.probe).map_err(|e| {
            let text = e.to_string();
            ConfigError::Invalid {
                key: "probe",
                // The key says it already (the flag and the file share it).
                reason: text.strip_prefix("--probe ").unwrap_or(&text).to_owned(),
            }
        })?;
        Ok(())
    }
}
