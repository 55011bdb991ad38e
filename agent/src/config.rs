//! The agent's config file (TOML), layered under command-line flags: defaults, then the file,
//! then [`Overrides`] from the flags. `allocwatch config print-default` prints
//! [`print_default`], a complete, commented file with every key at its default; the
//! Kubernetes ConfigMap (`deploy/kustomize/base/configmap.yaml`) uses exactly the same keys.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};

use crate::{
    probes::{Capacity, Mode},
    serve::{
        http::Limits,
        web_config::{WebConfig, WebConfigError},
    },
    values::{self, CountLimit, ValueError},
};

/// All interfaces, port 9464: the port the DaemonSet exposes as `metrics` (also the port
/// OpenTelemetry's Prometheus exporters default to, so scrape configs often expect it).
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9464);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Syntax, an unknown key, or a value out of its bounds ([`values`]): where, and the
    /// offending line with a caret under the value ([`ConfigError::pointer`]).
    #[error("config file {path}, line {line}{}: {message}", key.as_ref().map(|k| format!(", key {k}")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        line: usize,
        key: Option<String>,
        message: String,
        pointer: String,
    },
    /// Compiling a pattern that parsing already accepted (daemon/select.rs): cannot happen
    /// for a value that came through [`load`] or the flags.
    #[error("config key {key}: invalid regular expression")]
    Regex {
        key: String,
        source: Box<regex::Error>,
    },
    #[error("config key {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error(transparent)]
    WebConfig(#[from] WebConfigError),
}

impl ConfigError {
    /// For a [`ConfigError::Parse`]: the offending line of the file with a caret under the
    /// value, printed under the one-line error.
    pub fn pointer(&self) -> Option<&str> {
        match self {
            ConfigError::Parse { pointer, .. } => Some(pointer),
            ConfigError::Read { .. }
            | ConfigError::Regex { .. }
            | ConfigError::Invalid { .. }
            | ConfigError::WebConfig(_) => None,
        }
    }

    /// Locates toml's error in `text`: line, the dotted key written on that line (under its
    /// `[table]` header), and a caret pointer like toml's own.
    fn parse(path: &Path, text: &str, e: &toml::de::Error) -> Self {
        let span = e.span().unwrap_or(0..0);
        let start = span.start.min(text.len());
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line_no = text[..start].matches('\n').count() + 1;
        let line_text = &text[line_start..line_end];
        let col = text[line_start..start].chars().count();
        let width = text[start..span.end.clamp(start, line_end)]
            .chars()
            .count()
            .max(1);
        let gutter = " ".repeat(line_no.to_string().len());
        let pointer = format!(
            "{gutter} |\n{line_no} | {line_text}\n{gutter} | {}{}",
            " ".repeat(col),
            "^".repeat(width)
        );
        // `key = value` with the span in the value: name the key.
        let key = line_text.split_once('=').and_then(|(k, _)| {
            let k = k.trim();
            let in_value = col > line_text.find('=').unwrap_or(usize::MAX);
            let simple = !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            (in_value && simple).then(|| {
                let table = text[..line_start].lines().rev().find_map(|l| {
                    let l = l.trim();
                    l.strip_prefix('[')
                        .and_then(|l| l.strip_suffix(']'))
                        .map(str::trim)
                });
                match table {
                    Some(t) => format!("{t}.{k}"),
                    None => k.to_string(),
                }
            })
        });
        ConfigError::Parse {
            path: path.to_path_buf(),
            line: line_no,
            key,
            message: e.message().trim_end().replace('\n', " "),
            pointer,
        }
    }
}

/// The whole configuration. Every field has a default, so an empty file is valid; unknown
/// keys are errors (a typo must not silently fall back to a default).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where `/metrics`, `/healthz` and (when enabled) `/debug/pprof/*` are served.
    #[serde(deserialize_with = "listen")]
    pub listen: SocketAddr,
    /// exporter-toolkit web config file (TLS, client certificates, basic auth); `""` in the
    /// file: none.
    #[serde(deserialize_with = "optional_path")]
    pub web_config: Option<PathBuf>,
    pub http: Http,
    /// Series of an exited process are dropped this long after it exits.
    #[serde(deserialize_with = "ttl")]
    pub ttl: Duration,
    /// Call sites per process identity with their own series; the rest are `site="other"`.
    #[serde(deserialize_with = "top_k")]
    pub top_k: usize,
    /// Hard cap on all `allocwatch_site_*` series of the agent.
    #[serde(deserialize_with = "max_site_series")]
    pub max_site_series: usize,
    /// What the libc probes record (`full`, `stacks-off`, `count`, `count-stacks`; costs in
    /// BENCHMARKS.md).
    #[serde(deserialize_with = "probe_mode")]
    pub mode: Mode,
    /// Mean bytes between sampled calls (stack walked, block tracked); 0: every call.
    #[serde(deserialize_with = "sample_bytes")]
    pub sample_bytes: u64,
    pub select: Select,
    #[serde(deserialize_with = "capacity")]
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
    #[serde(deserialize_with = "regexes")]
    pub comm: Vec<String>,
    /// Executable path (`/proc/<pid>/exe` as the process sees it).
    #[serde(deserialize_with = "regexes")]
    pub exe: Vec<String>,
    /// cgroup path (the v2 line, or any v1 line, of `/proc/<pid>/cgroup`).
    #[serde(deserialize_with = "regexes")]
    pub cgroup: Vec<String>,
    /// Kubernetes namespace of the process' pod (processes outside pods never match).
    #[serde(deserialize_with = "regexes")]
    pub k8s_namespace: Vec<String>,
    #[serde(deserialize_with = "regexes")]
    pub exclude_comm: Vec<String>,
    #[serde(deserialize_with = "regexes")]
    pub exclude_exe: Vec<String>,
    #[serde(deserialize_with = "regexes")]
    pub exclude_cgroup: Vec<String>,
    #[serde(deserialize_with = "regexes")]
    pub exclude_k8s_namespace: Vec<String>,
}

/// The keys of `[capacity]`, parsed into the probes' [`Capacity`] (each value checked like its
/// flag).
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CapacityKeys {
    #[serde(deserialize_with = "max_live")]
    max_live: u32,
    #[serde(deserialize_with = "max_sites")]
    max_sites: u32,
    #[serde(deserialize_with = "max_stacks")]
    max_stacks: u32,
    #[serde(deserialize_with = "max_pending")]
    max_pending: u32,
}

impl Default for CapacityKeys {
    fn default() -> Self {
        let Capacity {
            max_live,
            max_sites,
            max_stacks,
            max_pending,
        } = Capacity::default();
        CapacityKeys {
            max_live,
            max_sites,
            max_stacks,
            max_pending,
        }
    }
}

fn capacity<'de, D: Deserializer<'de>>(d: D) -> Result<Capacity, D::Error> {
    let k = CapacityKeys::deserialize(d)?;
    Ok(Capacity {
        max_live: k.max_live,
        max_sites: k.max_sites,
        max_stacks: k.max_stacks,
        max_pending: k.max_pending,
    })
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
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    #[serde(deserialize_with = "duration")]
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
            sample_bytes: 0,
            select: Select::default(),
            capacity: Capacity::default(),
            go: Go::default(),
            pprof: Pprof::default(),
            kubernetes: Kubernetes::default(),
            keep_privileges: false,
        }
    }
}

/// A path; empty means none (TOML has no null).
fn optional_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s = String::deserialize(d)?;
    Ok((!s.is_empty()).then(|| PathBuf::from(s)))
}

/// A duration without bounds of its own (checked by [`Config::validate`]).
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    values::parse_duration(&String::deserialize(d)?).map_err(de)
}

// Deserializers: each value goes through the same parser as its flag (`values`).

fn de<E: serde::de::Error>(e: ValueError) -> E {
    E::custom(e)
}

fn ttl<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    values::duration(&String::deserialize(d)?, &values::TTL).map_err(de)
}

fn listen<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    values::listen(&String::deserialize(d)?).map_err(de)
}

fn count<'de, D: Deserializer<'de>>(d: D, limit: &CountLimit) -> Result<u64, D::Error> {
    // i64 first, so that a negative number gets the same words as on the command line.
    let n = i64::deserialize(d)?;
    let n = u64::try_from(n).map_err(|_| {
        de::<D::Error>(
            values::count(&n.to_string(), limit).expect_err("negative counts are refused"),
        )
    })?;
    values::check_count(n, limit).map_err(de)
}

fn top_k<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    count(d, &values::TOP_K).map(|n| n as usize)
}

fn max_site_series<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    count(d, &values::MAX_SITE_SERIES).map(|n| n as usize)
}

fn max_live<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    count(d, &values::MAX_LIVE).map(|n| n as u32)
}

fn max_sites<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    count(d, &values::MAX_SITES).map(|n| n as u32)
}

fn max_stacks<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    count(d, &values::MAX_STACKS).map(|n| n as u32)
}

fn sample_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    count(d, &values::SAMPLE_BYTES)
}

fn max_pending<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    count(d, &values::MAX_PENDING).map(|n| n as u32)
}

fn regexes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    for (i, p) in list.iter().enumerate() {
        values::regex(p)
            .map_err(|e| de::<D::Error>(ValueError::new(format!("[{i}] {p:?}: {e}"))))?;
    }
    Ok(list)
}

/// A `--mode` value; the benchmark-only floor modes are refused.
fn probe_mode<'de, D: Deserializer<'de>>(d: D) -> Result<Mode, D::Error> {
    values::public_mode(&String::deserialize(d)?).map_err(de)
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
    pub comm: Vec<String>,
    pub exe: Vec<String>,
    pub cgroup: Vec<String>,
    pub k8s_namespace: Vec<String>,
    pub exclude_comm: Vec<String>,
    pub exclude_exe: Vec<String>,
    pub exclude_cgroup: Vec<String>,
    pub exclude_k8s_namespace: Vec<String>,
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
        set(&mut self.sample_bytes, o.sample_bytes);
        let s = &mut self.select;
        list(&mut s.comm, o.comm);
        list(&mut s.exe, o.exe);
        list(&mut s.cgroup, o.cgroup);
        list(&mut s.k8s_namespace, o.k8s_namespace);
        list(&mut s.exclude_comm, o.exclude_comm);
        list(&mut s.exclude_exe, o.exclude_exe);
        list(&mut s.exclude_cgroup, o.exclude_cgroup);
        list(&mut s.exclude_k8s_namespace, o.exclude_k8s_namespace);
        set(&mut self.go.growth, o.go_growth);
        set(&mut self.go.malloc, o.go_malloc);
        set(&mut self.go.gc, o.go_gc);
        set(&mut self.pprof.enabled, o.pprof);
        set(&mut self.kubernetes.enabled, o.kubernetes);
        set(&mut self.keep_privileges, o.keep_privileges);
        self.validate()
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
        Ok(())
    }
}

/// `["a", "b"]` for a TOML array of strings.
fn toml_list(v: &[String]) -> String {
    let items: Vec<String> = v
        .iter()
        .map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("[{}]", items.join(", "))
}

/// The default configuration as a commented TOML file (`allocwatch config print-default`).
pub fn print_default() -> String {
    let c = Config::default();
    let s = &c.select;
    format!(
        r#"# allocwatch agent configuration. Flags given on the command line override these values.

# Where /metrics and /healthz are served (and /debug/pprof/* when enabled). The default, all
# interfaces on port 9464, is the DaemonSet's `metrics` port.
listen = "{listen}"

# TLS and authentication: a Prometheus exporter-toolkit web config file, the format of
# node_exporter's --web.config.file (YAML: tls_server_config with cert_file, key_file,
# client_ca_file and client_auth_type = "RequireAndVerifyClientCert" for client certificates;
# basic_auth_users with bcrypt hashes). Empty: plain HTTP, no authentication. With basic auth,
# every path needs credentials, /healthz too (deploy/README.md: probes).
web_config = "{web_config}"

# Series of an exited process are dropped this long after it exits (units: ms, s, m, h).
ttl = "{ttl}"

# Call-site labels: only the top K sites of each process identity (namespace, pod, container,
# comm, exe) by recently allocated bytes get their own series; the rest are summed into
# site="other".
top_k = {top_k}

# Hard cap on all allocwatch_site_* series of this agent (4 series per site).
max_site_series = {max_site_series}

# What the libc probes record, from most to least costly per call (BENCHMARKS.md):
#   full          calls, bytes, failures per call site with its user stack; outstanding
#                 allocations (allocwatch_live_*, /debug/pprof/heap); request-size histogram
#   stacks-off    full without user stacks (sites by immediate caller)
#   count-stacks  entry probes only: calls and bytes per call site with its user stack
#   count         entry probes only: calls and bytes per API and immediate caller (cheapest)
# The count modes export no live gauges, size histogram or heap profile, and no free bytes.
mode = "{mode}"

# Sampling: the stack of one call per sample_bytes bytes allocated on average (Poisson, as Go's
# heap profile) is walked and, in full and stacks-off, its block tracked; every call is still
# counted by API and immediate caller. Per-site series, live gauges and profiles are then
# estimates, scaled as pprof scales Go's (README: "Sampling"). 0: every call.
sample_bytes = {sample_bytes}

# Once its probes are attached, the agent becomes user and group 65532 and keeps only the
# capabilities it still needs (CAP_SYS_PTRACE on Linux >= 6.6; deploy/README.md, "Required
# capabilities"), with no_new_privs. true: keep the user and capabilities it started with.
keep_privileges = {keep_privileges}

[select]
# Regular expressions (matched anywhere unless anchored with ^ and $). Empty include lists
# trace every process on the node; a process matching an exclude list is never traced. A
# process that exits before the agent reads /proc matches only comm and exe rules.
comm = {comm}
exe = {exe}
cgroup = {cgroup}
k8s_namespace = {k8s_namespace}
exclude_comm = {exclude_comm}
exclude_exe = {exclude_exe}
exclude_cgroup = {exclude_cgroup}
exclude_k8s_namespace = {exclude_k8s_namespace}

[capacity]
# Kernel map sizes; every drop caused by a full map is counted in allocwatch_events_lost_total.
max_live = {max_live}
max_sites = {max_sites}
max_stacks = {max_stacks}
max_pending = {max_pending}

[go]
# Go processes: map and slice growth, every heap allocation (mallocgc: one probe hit per
# allocation, costly), GC cycles and stop-the-world pauses.
growth = {growth}
malloc = {malloc}
gc = {gc}

[pprof]
# Serve /debug/pprof/allocs and /debug/pprof/heap (gzipped pprof protobuf) on `listen`.
enabled = {pprof}

[http]
# Limits of the HTTP server (units: ms, s, m, h). A connection is closed without an answer if
# its request head (and TLS handshake) is not complete header_timeout after it opened or sent
# its first byte after a pause; a keep-alive connection is closed after idle_timeout without a
# request; a request gets 503 if it is not answered within request_timeout (plus the window of
# a delta profile). At max_connections, the connection that has waited longest for a request
# head, or sat idle longest, is closed to make room for a new one.
header_timeout = "{header_timeout}"
idle_timeout = "{idle_timeout}"
request_timeout = "{request_timeout}"
max_connections = {max_connections}

[kubernetes]
# Name namespace/pod/container from the API server (this node's pods only, watched).
# Off, or without a cluster, those labels stay empty.
enabled = {kubernetes}
"#,
        listen = c.listen,
        web_config = c
            .web_config
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        header_timeout = values::duration_text(c.http.header_timeout),
        idle_timeout = values::duration_text(c.http.idle_timeout),
        request_timeout = values::duration_text(c.http.request_timeout),
        max_connections = c.http.max_connections,
        ttl = values::duration_text(c.ttl),
        top_k = c.top_k,
        max_site_series = c.max_site_series,
        mode = c.mode.name(),
        sample_bytes = c.sample_bytes,
        comm = toml_list(&s.comm),
        exe = toml_list(&s.exe),
        cgroup = toml_list(&s.cgroup),
        k8s_namespace = toml_list(&s.k8s_namespace),
        exclude_comm = toml_list(&s.exclude_comm),
        exclude_exe = toml_list(&s.exclude_exe),
        exclude_cgroup = toml_list(&s.exclude_cgroup),
        exclude_k8s_namespace = toml_list(&s.exclude_k8s_namespace),
        max_live = c.capacity.max_live,
        max_sites = c.capacity.max_sites,
        max_stacks = c.capacity.max_stacks,
        max_pending = c.capacity.max_pending,
        growth = c.go.growth,
        malloc = c.go.malloc,
        gc = c.go.gc,
        pprof = c.pprof.enabled,
        kubernetes = c.kubernetes.enabled,
        keep_privileges = c.keep_privileges,
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Dotted paths of every key of a TOML document.
    fn keys(text: &str) -> BTreeSet<String> {
        fn walk(prefix: &str, t: &toml::Table, out: &mut BTreeSet<String>) {
            for (k, v) in t {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    toml::Value::Table(inner) => walk(&path, inner, out),
                    _ => {
                        out.insert(path);
                    }
                }
            }
        }
        let table: toml::Table = toml::from_str(text).unwrap();
        let mut out = BTreeSet::new();
        walk("", &table, &mut out);
        out
    }

    /// The `config.toml` block of the ConfigMap, de-indented.
    fn configmap_toml() -> String {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kustomize/base/configmap.yaml");
        let yaml = std::fs::read_to_string(&path).unwrap();
        let mut lines = yaml.lines().skip_while(|l| l.trim() != "config.toml: |");
        assert!(
            lines.next().is_some(),
            "no config.toml block in {}",
            path.display()
        );
        let mut out = String::new();
        for l in lines {
            if !l.trim().is_empty() && !l.starts_with("    ") {
                break;
            }
            out.push_str(l.strip_prefix("    ").unwrap_or(""));
            out.push('\n');
        }
        out
    }

    #[test]
    fn print_default_round_trips() {
        let text = print_default();
        assert_eq!(Config::parse(&text).unwrap(), Config::default());
        assert_eq!(Config::parse("").unwrap(), Config::default());
        assert_eq!(load(None).unwrap(), Config::default());
    }

    #[test]
    fn configmap_has_exactly_the_default_keys() {
        let cm = configmap_toml();
        assert_eq!(keys(&cm), keys(&print_default()));
        let cfg = Config::parse(&cm).unwrap();
        assert_eq!(cfg.listen, DEFAULT_LISTEN);
    }

    #[test]
    fn file_values_and_flags_layer() {
        let mut cfg = Config::parse(
            r#"
            listen = "127.0.0.1:9999"
            ttl = "90s"
            top_k = 3
            [select]
            comm = ["^nginx$"]
            exclude_comm = ["^sh$"]
            [go]
            malloc = true
            "#,
        )
        .unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(cfg.ttl, Duration::from_secs(90));
        assert_eq!(cfg.top_k, 3);
        assert!(cfg.go.malloc && cfg.go.growth);
        assert_eq!(cfg.capacity, Capacity::default());
        assert_eq!(cfg.web_config, None);
        assert_eq!(cfg.http, Http::default());
        cfg.apply(Overrides {
            top_k: Some(7),
            comm: vec!["^redis".into()],
            pprof: Some(true),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.top_k, 7);
        assert_eq!(cfg.select.comm, ["^redis"]);
        assert_eq!(
            cfg.select.exclude_comm,
            ["^sh$"],
            "an empty flag list keeps the file's"
        );
        assert!(cfg.pprof.enabled);
        assert_eq!(cfg.listen, "127.0.0.1:9999".parse().unwrap());
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        // (file, the one-line error as `main` prints it, the pointer under it)
        let cases = [
            (
                "top_kk = 3",
                "config file <text>, line 1: unknown field `top_kk`, expected one of",
                "  |\n1 | top_kk = 3\n  | ^^^^^^",
            ),
            (
                "ttl = \"5 parsecs\"",
                "config file <text>, line 1, key ttl: unknown unit \" parsecs\" in \"5 parsecs\"",
                "  |\n1 | ttl = \"5 parsecs\"\n  |       ^^^^^^^^^^^",
            ),
            (
                "ttl = \"0s\"",
                "config file <text>, line 1, key ttl: must be at least 1s: the series of an \
                 exited process must outlive a scrape",
                "^^^^",
            ),
            (
                "ttl = 5",
                "key ttl: invalid type: integer `5`, expected a string",
                "^",
            ),
            (
                "listen = \"nowhere\"",
                "key listen: \"nowhere\" has no port: expected HOST:PORT",
                "^",
            ),
            (
                "# comment\n[select]\nexe = []\ncomm = [\"ok\", \"(\"]",
                "config file <text>, line 4, key select.comm: [1] \"(\": not a regular \
                 expression: unclosed group",
                "  |\n4 | comm = [\"ok\", \"(\"]\n  |        ^^^^^^^^^^^",
            ),
            (
                "[capacity]\nmax_live = 0",
                "line 2, key capacity.max_live: must be at least 1: a kernel map needs at least \
                 one entry",
                "^",
            ),
            (
                "[capacity]\nmax_live = -1",
                "key capacity.max_live: -1 is negative",
                "^",
            ),
            (
                "[capacity]\nmax_stacks = 4000000000",
                "key capacity.max_stacks: must be at most 524288: the kernel reserves memory",
                "^",
            ),
            (
                "top_k = 0",
                "key top_k: must be at least 1: 0 would give no call site",
                "^",
            ),
            (
                "top_k = ",
                "line 1, key top_k: string values must be quoted",
                "^",
            ),
            (
                "mode = \"cheap\"",
                "key mode: unknown mode `cheap`: expected one of full, stacks-off",
                "^",
            ),
            // The benchmark's empty programs are not a way to run the agent.
            ("mode = \"floor\"", "unknown mode `floor`", "^"),
        ];
        for (text, want, pointer) in cases {
            let err = Config::parse(text).unwrap_err();
            let line = err.to_string();
            assert!(!line.contains('\n'), "{text:?}: one line: {line}");
            assert!(line.contains(want), "{text:?}: {line}\nwant {want}");
            let p = err.pointer().unwrap();
            assert!(
                p.contains(pointer),
                "{text:?}: pointer\n{p}\nwant\n{pointer}"
            );
        }
        let err = load(Some(Path::new("/nonexistent/allocwatch.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(err.pointer().is_none());
        assert_eq!(
            Config::parse("max_site_series = 0")
                .unwrap()
                .max_site_series,
            0,
            "0 exports no call-site series"
        );
    }

    #[test]
    fn mode_from_file_and_flag() {
        assert_eq!(Config::default().mode, Mode::Full);
        let mut cfg = Config::parse("mode = \"count-stacks\"").unwrap();
        assert_eq!(cfg.mode, Mode::CountStacks);
        cfg.apply(Overrides::default()).unwrap();
        assert_eq!(cfg.mode, Mode::CountStacks, "no flag keeps the file's mode");
        cfg.apply(Overrides {
            mode: Some(Mode::Count),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.mode, Mode::Count);
        for m in Mode::public_names() {
            let cfg = Config::parse(&format!("mode = \"{m}\"")).unwrap();
            assert_eq!(cfg.mode.name(), m);
        }
    }

    #[test]
    fn sample_bytes_from_file_and_flag() {
        assert_eq!(Config::default().sample_bytes, 0);
        let mut cfg = Config::parse("sample_bytes = 524288").unwrap();
        assert_eq!(cfg.sample_bytes, 512 << 10);
        cfg.apply(Overrides::default()).unwrap();
        assert_eq!(
            cfg.sample_bytes,
            512 << 10,
            "no flag keeps the file's value"
        );
        cfg.apply(Overrides {
            sample_bytes: Some(0),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.sample_bytes, 0);
        let e = Config::parse("sample_bytes = -1").unwrap_err().to_string();
        assert!(e.contains("must be at least 0"), "{e}");
        let e = Config::parse("sample_bytes = 1099511627777")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be at most 1099511627776"), "{e}");
    }

    #[test]
    fn http_limits_and_web_config_from_file_and_flag() {
        let dir = std::env::temp_dir().join(format!("allocwatch-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let web = dir.join("web.yml");
        std::fs::write(&web, "").unwrap();
        let mut cfg = Config::parse(
            "[http]\nheader_timeout = \"2s\"\nidle_timeout = \"1m\"\nmax_connections = 8\n",
        )
        .unwrap();
        assert_eq!(
            cfg.http,
            Http {
                header_timeout: Duration::from_secs(2),
                idle_timeout: Duration::from_secs(60),
                max_connections: 8,
                ..Http::default()
            }
        );
        cfg.apply(Overrides {
            web_config: Some(web.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.web_config.as_deref(), Some(web.as_path()));
        let from_file = Config::parse(&format!("web_config = \"{}\"", web.display())).unwrap();
        assert_eq!(from_file.web_config, Some(web));
        for (text, want) in [
            (
                "[http]\nheader_timeout = \"0s\"",
                "config key http.header_timeout: must be more than 0s",
            ),
            (
                "[http]\nmax_connections = 0",
                "config key http.max_connections: 0 is outside 1..=10000",
            ),
            ("[http]\nidle_timeout = 5", "invalid type"),
            (
                "web_config = \"/nonexistent/web.yml\"",
                "reading web config /nonexistent/web.yml: No such file",
            ),
        ] {
            let err = Config::parse(text).and_then(|c| c.validate()).unwrap_err();
            // As the agent prints it: the error and its causes on one line.
            let err = format!("{:#}", anyhow::Error::from(err));
            assert!(!err.contains('\n'), "{text:?}: one line: {err}");
            assert!(err.contains(want), "{text:?}: {err}\nwant {want}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
