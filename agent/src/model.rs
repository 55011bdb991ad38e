//! The snapshot model: what the daemon and `top` hand to the export side, one snapshot of
//! every traced process and of the agent itself. This is the contract between the tracing loop
//! (which fills it) and `/metrics`, the pprof endpoints and the report files (`serve`,
//! `report`: both only read it, so it lives apart from either).
//!
//! Every counter here is cumulative since the process was first traced and must never go down
//! for the same pid; the exporter keeps Prometheus counters monotonic across process exits and
//! pid reuse on top of that (see `serve/metrics`).

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use crate::{gostate::Verdict, symbolize::Frame};

/// Who a process is, as Prometheus sees it. Processes with equal labels are summed into one
/// set of series (two replicas of a binary in one container are one identity).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProcessLabels {
    /// Kubernetes namespace, pod and container name; empty outside Kubernetes.
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// `/proc/<pid>/comm`.
    pub comm: String,
    /// Executable path as the process sees it.
    pub exe: String,
}

/// One call site of one process: an allocation API (or Go growth kind) and the symbolized
/// call chain, innermost frame first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SiteSnapshot {
    /// `"malloc"`, `"calloc"`, … or `"free"` for libc; `"map_grow"`, `"slice_grow"`,
    /// `"large_alloc"` (mallocgc of 32 KiB or more) for Go; a symbol probe's kind
    /// (`"cxx_vector_grow"`, …, or a `probe`'s symbol as given) with `probe` set.
    pub kind: &'static str,
    /// A symbol probe's site: calls only (no bytes), not an allocation to the profiles.
    pub probe: bool,
    /// Shared (`Arc`): the agent's chains are interned, and a snapshot copies none.
    pub frames: Arc<[Frame]>,
    pub calls: u64,
    pub bytes: u64,
    pub live_allocations: u64,
    pub live_bytes: u64,
    /// Not a site of its own in `/metrics`, counted in the kind's `site="other"`: the summed
    /// sites of a gone process beyond those it keeps (no frames), or a site not named yet
    /// (its caller's address as the only frame).
    pub remainder: bool,
    /// Not named yet, but soon (its naming ran out of the scrape's time while the site is
    /// young): `/metrics` leaves it out until a later scrape names it, since a value once
    /// exported in `other` can never leave it. Always with `remainder` (profiles show it by
    /// its caller's address meanwhile).
    pub pending: bool,
}

/// What the Go probes saw in one process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GoSnapshot {
    /// Go version from `.go.buildinfo`, e.g. `go1.25.5`.
    pub version: String,
    /// Map growths by kind: `double`, `same_size`, `small`, `to_table`, `grow`, `split`,
    /// `dir_grow`.
    pub map_grows: BTreeMap<&'static str, u64>,
    pub map_grow_bytes: u64,
    pub slice_grows: u64,
    pub slice_grow_bytes: u64,
    pub gc_cycles: u64,
    /// Stop-the-world pauses, seconds.
    pub gc_pauses: Histogram,
    /// `mallocgc` request sizes, bytes; `None` when `mallocgc` is not probed (`--go-malloc`
    /// off, or a Go release without that probe): an empty histogram would claim "no
    /// allocations".
    pub alloc_sizes: Option<Histogram>,
    /// The maps read from the running process at the last refresh, named by the site of
    /// their first growth (a map whose site is not named yet is left out until it is).
    pub maps: Vec<GoMapSnapshot>,
}

/// One Go map as last read from its process (`gort::live`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GoMapSnapshot {
    /// Where it first grew, innermost frame first.
    pub frames: Arc<[Frame]>,
    /// Elements.
    pub len: u64,
    /// Slots of its buckets or tables.
    pub slots: u64,
    /// Bytes its buckets or tables (and directory) hold.
    pub bytes: u64,
    pub verdict: Option<Verdict>,
}

/// A histogram as the probes produce it (cumulative over time, like every counter here).
///
/// `buckets` holds `(upper bound, count of observations in this bucket only)` — per-bucket,
/// *not* cumulative — in ascending order of bound; observations above the last bound are
/// `count - Σ buckets`. Per-bucket counts make histograms with different bounds mergeable.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

/// One traced process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessSnapshot {
    pub pid: u32,
    /// Which program image of the pid: 0 until its first traced `exec`, then 1, 2, … Each
    /// image is a process of its own to the exporter (its own identity and final counts).
    pub image: u32,
    pub labels: ProcessLabels,
    /// Malloc-family calls and requested bytes by API symbol (`malloc`, `calloc`, …): the
    /// APIs its libc has under their own address (an alias such as `memalign`, counted as
    /// `aligned_alloc`, is not listed), and any API with calls.
    pub calls: BTreeMap<&'static str, u64>,
    pub bytes: BTreeMap<&'static str, u64>,
    /// Calls to `free`.
    pub frees: u64,
    /// Calls to the freeing APIs other than `free`, by name: the C++ `operator delete`
    /// overloads an allocator defines as its own (`delete`, `delete[](size)`, …) and jemalloc's
    /// `sdallocx` and `dallocx`; only those with calls.
    pub deletes: BTreeMap<&'static str, u64>,
    pub live_bytes: u64,
    pub live_allocations: u64,
    /// libc malloc-family request sizes, bytes.
    pub alloc_sizes: Histogram,
    /// Events of this process lost, by cause.
    pub lost: BTreeMap<&'static str, u64>,
    pub sites: Vec<SiteSnapshot>,
    /// No libc is known in this process (a static Go program) and it made no malloc-family
    /// call: its libc series (`frees`, `live_*`, `alloc_sizes`) could only be zero and are
    /// not exported.
    pub without_libc: bool,
    /// The allocator serving its `malloc` (`glibc`, `jemalloc`, …), once known.
    pub allocator: Option<&'static str>,
    /// Symbol-probe calls by kind (the built-in C++/Rust growth kinds, each `probe` by its
    /// symbol as given): only kinds with calls.
    pub probe_calls: BTreeMap<&'static str, u64>,
    /// Sums of the probes' named arguments, by (kind, argument name).
    pub probe_args: BTreeMap<(&'static str, &'static str), u64>,
    pub go: Option<GoSnapshot>,
    /// When the process exited; its series are dropped `ttl` after this.
    pub exited_at: Option<Instant>,
}

/// The agent's own health.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SelfStats {
    pub probes_attached: u64,
    /// Failed attachments by reason.
    pub attach_failures: BTreeMap<String, u64>,
    pub events_processed: u64,
    /// Events lost by cause, all processes.
    pub events_lost: BTreeMap<&'static str, u64>,
    /// Fill level (0..=1) of each kernel map, by map name.
    pub map_fill: BTreeMap<&'static str, f64>,
    /// Addresses that could not be named, by cause.
    pub symbolization_failures: BTreeMap<&'static str, u64>,
    /// Scrapes served from the last snapshot because the tracer did not answer in time.
    pub stale_snapshots: u64,
    /// What the agent holds in memory, by kind (processes, chains, …), for its own bounds.
    pub held: BTreeMap<&'static str, u64>,
    /// Go growth events by how the kernel passed them on other than as records:
    /// `kernel_count`, counted by key (`GO_AGG`) and included in the Go counts; `table_full`,
    /// sent as records because that table was full.
    pub go_growth_aggregated: BTreeMap<&'static str, u64>,
}
