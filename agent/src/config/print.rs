//! `allocwatch config print-default`: the default configuration as a complete, commented TOML
//! file (the Kubernetes ConfigMap holds exactly its keys).

use super::Config;
use crate::values;

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

# Hard cap on the series with a site label (4 per call site, 2 to 5 per Go map site;
# call sites are served first).
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
# estimates, scaled as pprof scales Go's (README: "Sampling"). 0: every call (exact per-site
# figures, at 2-4x the probe cost: BENCHMARKS.md). Unset: 524288 (512 KiB) in the modes with
# stacks or a live table, 0 in count.
{sample_bytes}

# How the sampled stacks are walked: "auto" (the .eh_frame of each file built without frame
# pointers, decided per file: most distribution packages, release C++ and Rust builds,
# compiled into tables the probe walks, up to 16 frames; frame pointers elsewhere; a process
# whose files all keep frame pointers gets the kernel's walk), "dwarf" (tables for every file
# with .eh_frame) or "fp" (frame pointers only: the kernel's walk, up to 64 frames, cut at
# code built without them). Tables: ~8 bytes of kernel memory per row (libc: ~30,000 rows).
unwind = "{unwind}"

# Once its probes are attached, the agent becomes user and group 65532 and keeps only the
# capabilities it still needs (CAP_SYS_PTRACE on Linux >= 6.6; deploy/README.md, "Required
# capabilities"), with no_new_privs. true: keep the user and capabilities it started with.
keep_privileges = {keep_privileges}

# User-defined probes: count the calls of any function, "BINARY:SYMBOL[:argN as NAME]...",
# each exported like the built-in C++/Rust container-growth kinds (allocwatch_probe_calls_total
# and the site series, kind = SYMBOL as given); arg0 ... arg5 (the integer arguments) are summed
# (allocwatch_probe_arg_sum_total). SYMBOL is mangled or demangled (nm -C); a binary or symbol
# that does not exist is refused at start. Example:
#   probe = ["/usr/bin/python3.11:dictresize:arg1 as log2_size"]
probe = {probe}

# The built-in C++ (libstdc++ unordered_map rehash, vector reallocation), Rust (hashbrown
# rehash, Vec growth) and Python (CPython 3.11 dictresize, list_resize) container-growth kinds
# in every selected program. Each growth is a
# probe hit (over a microsecond), and a compiler or build tool grows vectors 100,000 times a
# second, so off by default: the files of the `probe`s above get them either way.
native_growth = {native_growth}

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
        unwind = c.unwind.name(),
        sample_bytes = c.sample_bytes.map_or_else(
            || format!("# sample_bytes = {}", c.sample_bytes()),
            |n| format!("sample_bytes = {n}")
        ),
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
        native_growth = c.native_growth,
        probe = toml_list(&c.probe.iter().map(ToString::to_string).collect::<Vec<_>>()),
    )
}
