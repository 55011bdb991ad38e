//! The metric families as data (name, help, type, labels), in exposition order, like
//! ebpf_exporter's config: the exporter renders from these specs, and the tests check
//! deploy/README.md's metrics table (which deploy/check.sh checks the alerts and dashboard
//! against) row by row against them.

use std::time::Duration;

use prometheus::proto::{self, LabelPair, Metric, MetricFamily, MetricType};

use super::Exporter;
use super::identity::{Counters, Hist, Identity, Key};
use super::labels::label;
use crate::{gostate::Verdict, loss, model::SelfStats};

/// A family's Prometheus type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    /// The name the text format (`# TYPE`) and the README table use.
    #[cfg(test)]
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }

    fn proto(self) -> MetricType {
        match self {
            MetricKind::Counter => MetricType::COUNTER,
            MetricKind::Gauge => MetricType::GAUGE,
            MetricKind::Histogram => MetricType::HISTOGRAM,
        }
    }
}

/// Whose series a family has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One series set per process identity (`namespace`, `pod`, `container`, `comm`, `exe`),
    /// before the family's own labels.
    Process,
    /// The agent itself: only the family's own labels.
    Agent,
}

/// One metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilySpec {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: MetricKind,
    pub scope: Scope,
    /// Labels beyond the identity's, in output order.
    pub labels: &'static [&'static str],
}

const fn spec(
    name: &'static str,
    kind: MetricKind,
    scope: Scope,
    labels: &'static [&'static str],
    help: &'static str,
) -> FamilySpec {
    FamilySpec {
        name,
        help,
        kind,
        scope,
        labels,
    }
}

pub const PROCESSES: FamilySpec = spec(
    "allocwatch_processes",
    MetricKind::Gauge,
    Scope::Process,
    &[],
    "Running traced processes with these labels (their series are summed).",
);
pub const ALLOC_CALLS: FamilySpec = spec(
    "allocwatch_alloc_calls_total",
    MetricKind::Counter,
    Scope::Process,
    &["api"],
    "Malloc-family calls by API.",
);
pub const ALLOC_BYTES: FamilySpec = spec(
    "allocwatch_alloc_bytes_total",
    MetricKind::Counter,
    Scope::Process,
    &["api"],
    "Bytes requested from the malloc family, by API.",
);
pub const FREE_CALLS: FamilySpec = spec(
    "allocwatch_free_calls_total",
    MetricKind::Counter,
    Scope::Process,
    &[],
    "Calls to free.",
);
pub const DELETE_CALLS: FamilySpec = spec(
    "allocwatch_delete_calls_total",
    MetricKind::Counter,
    Scope::Process,
    &["api"],
    "Calls to freeing APIs other than free: C++ operator delete by overload where the allocator defines its own (jemalloc, tcmalloc, mimalloc), jemalloc's sdallocx and dallocx.",
);
pub const LIVE_BYTES: FamilySpec = spec(
    "allocwatch_live_bytes",
    MetricKind::Gauge,
    Scope::Process,
    &[],
    "Bytes of outstanding malloc-family allocations of running processes.",
);
pub const LIVE_ALLOCATIONS: FamilySpec = spec(
    "allocwatch_live_allocations",
    MetricKind::Gauge,
    Scope::Process,
    &[],
    "Outstanding malloc-family allocations of running processes.",
);
pub const ALLOC_SIZE: FamilySpec = spec(
    "allocwatch_alloc_size_bytes",
    MetricKind::Histogram,
    Scope::Process,
    &[],
    "Malloc-family request sizes.",
);
pub const PROCESS_EVENTS_LOST: FamilySpec = spec(
    "allocwatch_process_events_lost_total",
    MetricKind::Counter,
    Scope::Process,
    &["cause", "affects"],
    "Events of these processes lost, by cause (where the loss is attributable) and what it \
     takes from the figures (affects: counts, live, detail).",
);
pub const ALLOCATOR_INFO: FamilySpec = spec(
    "allocwatch_allocator_info",
    MetricKind::Gauge,
    Scope::Process,
    &["allocator"],
    "Allocator serving malloc in traced processes: glibc, musl, jemalloc, tcmalloc, mimalloc or \
     other (always 1).",
);
pub const GO_INFO: FamilySpec = spec(
    "allocwatch_go_info",
    MetricKind::Gauge,
    Scope::Process,
    &["version"],
    "Go version of traced Go processes (always 1).",
);
pub const GO_MAP_GROWS: FamilySpec = spec(
    "allocwatch_go_map_grows_total",
    MetricKind::Counter,
    Scope::Process,
    &["kind"],
    "Go map growths by kind.",
);
pub const GO_MAP_GROW_BYTES: FamilySpec = spec(
    "allocwatch_go_map_grow_bytes_total",
    MetricKind::Counter,
    Scope::Process,
    &[],
    "Bytes of new storage allocated by Go map growths.",
);
pub const GO_SLICE_GROWS: FamilySpec = spec(
    "allocwatch_go_slice_grows_total",
    MetricKind::Counter,
    Scope::Process,
    &[],
    "Go slice growths (runtime.growslice).",
);
pub const GO_SLICE_GROW_BYTES: FamilySpec = spec(
    "allocwatch_go_slice_grow_bytes_total",
    MetricKind::Counter,
    Scope::Process,
    &[],
    "Bytes of new backing arrays allocated by Go slice growths.",
);
pub const GO_GC_CYCLES: FamilySpec = spec(
    "allocwatch_go_gc_cycles_total",
    MetricKind::Counter,
    Scope::Process,
    &[],
    "Go garbage collection cycles started.",
);
pub const GO_GC_PAUSE: FamilySpec = spec(
    "allocwatch_go_gc_pause_seconds",
    MetricKind::Histogram,
    Scope::Process,
    &[],
    "Go stop-the-world GC pauses.",
);
pub const GO_ALLOC_SIZE: FamilySpec = spec(
    "allocwatch_go_alloc_size_bytes",
    MetricKind::Histogram,
    Scope::Process,
    &[],
    "Go heap allocation sizes (runtime.mallocgc).",
);
pub const PROBE_CALLS: FamilySpec = spec(
    "allocwatch_probe_calls_total",
    MetricKind::Counter,
    Scope::Process,
    &["kind"],
    "Calls of symbol-probed functions by kind: C++/Rust/Python container growth \
     (cxx_vector_grow, cxx_hash_rehash, rust_vec_grow, rust_hash_rehash, py_dict, py_list) and \
     each configured probe (kind = its symbol as given); by call site in \
     allocwatch_site_alloc_calls_total{api=kind}.",
);
pub const PROBE_ARG_SUM: FamilySpec = spec(
    "allocwatch_probe_arg_sum_total",
    MetricKind::Counter,
    Scope::Process,
    &["kind", "arg"],
    "Sum of a configured probe's named integer argument over its calls (`argN as NAME`).",
);
pub const GO_MAP_LEN: FamilySpec = spec(
    "allocwatch_go_map_len",
    MetricKind::Gauge,
    Scope::Process,
    &["site"],
    "Elements in the live Go maps first grown at this call site (running processes; top sites by bytes held).",
);
pub const GO_MAP_BYTES: FamilySpec = spec(
    "allocwatch_go_map_bytes",
    MetricKind::Gauge,
    Scope::Process,
    &["site"],
    "Bytes held by the buckets or tables of those maps.",
);
pub const GO_MAP_LOAD: FamilySpec = spec(
    "allocwatch_go_map_load_ratio",
    MetricKind::Gauge,
    Scope::Process,
    &["site"],
    "Elements per slot of those maps (Go never shrinks a map: far below 1 after deletes is memory kept).",
);
pub const GO_MAPS_FLAGGED: FamilySpec = spec(
    "allocwatch_go_maps_flagged",
    MetricKind::Gauge,
    Scope::Process,
    &["site", "verdict"],
    "Those maps judged growing (length rising while it grows) or bloated (under 1/8 full, over 1 MiB).",
);
pub const SITE_ALLOC_CALLS: FamilySpec = spec(
    "allocwatch_site_alloc_calls_total",
    MetricKind::Counter,
    Scope::Process,
    &["site", "api"],
    "Calls by call site (top sites per process identity; the rest in site=\"other\").",
);
pub const SITE_ALLOC_BYTES: FamilySpec = spec(
    "allocwatch_site_alloc_bytes_total",
    MetricKind::Counter,
    Scope::Process,
    &["site", "api"],
    "Bytes by call site (top sites per process identity; the rest in site=\"other\").",
);
pub const SITE_LIVE_ALLOCATIONS: FamilySpec = spec(
    "allocwatch_site_live_allocations",
    MetricKind::Gauge,
    Scope::Process,
    &["site", "api"],
    "Outstanding allocations by call site.",
);
pub const SITE_LIVE_BYTES: FamilySpec = spec(
    "allocwatch_site_live_bytes",
    MetricKind::Gauge,
    Scope::Process,
    &["site", "api"],
    "Bytes of outstanding allocations by call site.",
);
pub const PROBES_ATTACHED: FamilySpec = spec(
    "allocwatch_probes_attached",
    MetricKind::Gauge,
    Scope::Agent,
    &[],
    "Probes (uprobe links) attached.",
);
pub const ATTACH_FAILURES: FamilySpec = spec(
    "allocwatch_attach_failures_total",
    MetricKind::Counter,
    Scope::Agent,
    &["reason"],
    "Failed probe attachments by reason.",
);
pub const EVENTS_PROCESSED: FamilySpec = spec(
    "allocwatch_events_processed_total",
    MetricKind::Counter,
    Scope::Agent,
    &[],
    "Events read from the kernel.",
);
pub const EVENTS_LOST: FamilySpec = spec(
    "allocwatch_events_lost_total",
    MetricKind::Counter,
    Scope::Agent,
    &["cause", "affects"],
    "Events lost by cause, all processes, and what the loss takes: affects=\"counts\" (counts \
     are low while it rises), \"live\" (live bytes and outstanding allocations are low), \
     \"detail\" (every call counted exactly, its stack or site less precise).",
);
pub const GO_GROWTH_AGGREGATED: FamilySpec = spec(
    "allocwatch_go_growth_aggregated_total",
    MetricKind::Counter,
    Scope::Agent,
    &["how"],
    "Go growth events not streamed one by one: counted in the kernel by key (kernel_count, included in the Go counts), or streamed because that table was full (table_full).",
);
pub const MAP_FILL: FamilySpec = spec(
    "allocwatch_map_fill_ratio",
    MetricKind::Gauge,
    Scope::Agent,
    &["map"],
    "Fill level of each kernel map (1 = full: new entries are dropped).",
);
pub const SYMBOLIZATION_FAILURES: FamilySpec = spec(
    "allocwatch_symbolization_failures_total",
    MetricKind::Counter,
    Scope::Agent,
    &["cause"],
    "Addresses that could not be named, by cause.",
);
pub const STALE_SCRAPES: FamilySpec = spec(
    "allocwatch_stale_scrapes_total",
    MetricKind::Counter,
    Scope::Agent,
    &[],
    "Scrapes answered with the previous snapshot because the tracer was busy.",
);
pub const HELD_ENTRIES: FamilySpec = spec(
    "allocwatch_held_entries",
    MetricKind::Gauge,
    Scope::Agent,
    &["what"],
    "What the agent holds in memory, by kind (bounded by its configuration).",
);
pub const CALL_SITE_SERIES: FamilySpec = spec(
    "allocwatch_call_site_series",
    MetricKind::Gauge,
    Scope::Agent,
    &[],
    "Series labelled by call site exported at this scrape (allocwatch_site_*, allocwatch_go_map_* and allocwatch_go_maps_flagged).",
);
pub const CALL_SITE_SERIES_LIMIT: FamilySpec = spec(
    "allocwatch_call_site_series_limit",
    MetricKind::Gauge,
    Scope::Agent,
    &[],
    "Configured cap on the series labelled by call site (max_site_series).",
);
pub const SCRAPE_DURATION: FamilySpec = spec(
    "allocwatch_scrape_duration_seconds",
    MetricKind::Gauge,
    Scope::Agent,
    &[],
    "Time this scrape took to snapshot and render, up to this line.",
);

/// Every family, in exposition order: what the tests check deploy/README.md's table and the
/// exposition against (the exporter names each family it renders directly).
#[cfg(test)]
pub const FAMILIES: [&FamilySpec; 40] = [
    &PROCESSES,
    &ALLOC_CALLS,
    &ALLOC_BYTES,
    &FREE_CALLS,
    &DELETE_CALLS,
    &LIVE_BYTES,
    &LIVE_ALLOCATIONS,
    &ALLOC_SIZE,
    &PROCESS_EVENTS_LOST,
    &ALLOCATOR_INFO,
    &GO_INFO,
    &GO_MAP_GROWS,
    &GO_MAP_GROW_BYTES,
    &GO_SLICE_GROWS,
    &GO_SLICE_GROW_BYTES,
    &GO_GC_CYCLES,
    &GO_GC_PAUSE,
    &GO_ALLOC_SIZE,
    &PROBE_CALLS,
    &PROBE_ARG_SUM,
    &GO_MAP_LEN,
    &GO_MAP_BYTES,
    &GO_MAP_LOAD,
    &GO_MAPS_FLAGGED,
    &SITE_ALLOC_CALLS,
    &SITE_ALLOC_BYTES,
    &SITE_LIVE_ALLOCATIONS,
    &SITE_LIVE_BYTES,
    &PROBES_ATTACHED,
    &ATTACH_FAILURES,
    &EVENTS_PROCESSED,
    &EVENTS_LOST,
    &GO_GROWTH_AGGREGATED,
    &MAP_FILL,
    &SYMBOLIZATION_FAILURES,
    &STALE_SCRAPES,
    &HELD_ENTRIES,
    &CALL_SITE_SERIES,
    &CALL_SITE_SERIES_LIMIT,
    &SCRAPE_DURATION,
];

/// The `allocwatch_site_*` families; one site label set costs one series in each.
pub const SITE_FAMILY_SPECS: [&FamilySpec; super::SITE_FAMILIES] = [
    &SITE_ALLOC_CALLS,
    &SITE_ALLOC_BYTES,
    &SITE_LIVE_ALLOCATIONS,
    &SITE_LIVE_BYTES,
];

impl Exporter {
    pub(super) fn process_families(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        let totals: Vec<(&Identity, Counters)> =
            self.ids.values().map(|id| (id, id.totals())).collect();

        let mut f = Family::new(&PROCESSES);
        for (id, _) in &totals {
            f.gauge(&id.labels, &[], id.running as f64);
        }
        f.push_to(&mut out);

        let mut calls = Family::new(&ALLOC_CALLS);
        let mut bytes = Family::new(&ALLOC_BYTES);
        let mut frees = Family::new(&FREE_CALLS);
        let mut deletes = Family::new(&DELETE_CALLS);
        let mut lost = Family::new(&PROCESS_EVENTS_LOST);
        let mut grows = Family::new(&GO_MAP_GROWS);
        for (id, t) in &totals {
            for (k, &v) in &t.ints {
                match *k {
                    Key::Calls(api) => calls.counter(&id.labels, &[api], v),
                    Key::Bytes(api) => bytes.counter(&id.labels, &[api], v),
                    Key::Frees => frees.counter(&id.labels, &[], v),
                    Key::Deletes(api) => deletes.counter(&id.labels, &[api], v),
                    Key::Lost(cause) => {
                        lost.counter(&id.labels, &[cause, loss::effect(cause).name()], v)
                    }
                    Key::MapGrows(kind) => grows.counter(&id.labels, &[kind], v),
                    _ => {}
                }
            }
        }
        calls.push_to(&mut out);
        bytes.push_to(&mut out);
        frees.push_to(&mut out);
        deletes.push_to(&mut out);

        if self.cfg.live {
            let mut live_b = Family::new(&LIVE_BYTES);
            let mut live_a = Family::new(&LIVE_ALLOCATIONS);
            let mut sizes = Family::new(&ALLOC_SIZE);
            // Identities with a libc: a static Go program's would only be zero.
            for (id, t) in totals.iter().filter(|(_, t)| t.has(Key::Frees)) {
                live_b.gauge(&id.labels, &[], id.live.bytes as f64);
                live_a.gauge(&id.labels, &[], id.live.allocations as f64);
                sizes.histogram(&id.labels, t, Hist::AllocSize);
            }
            live_b.push_to(&mut out);
            live_a.push_to(&mut out);
            sizes.push_to(&mut out);
        }
        lost.push_to(&mut out);

        let mut allocators = Family::new(&ALLOCATOR_INFO);
        for (id, _) in &totals {
            for a in &id.allocators {
                allocators.gauge(&id.labels, &[a], 1.0);
            }
        }
        allocators.push_to(&mut out);

        let mut info = Family::new(&GO_INFO);
        let mut grow_bytes = Family::new(&GO_MAP_GROW_BYTES);
        let mut slices = Family::new(&GO_SLICE_GROWS);
        let mut slice_bytes = Family::new(&GO_SLICE_GROW_BYTES);
        let mut cycles = Family::new(&GO_GC_CYCLES);
        let mut pauses = Family::new(&GO_GC_PAUSE);
        let mut go_sizes = Family::new(&GO_ALLOC_SIZE);
        for (id, t) in &totals {
            for v in &id.go_versions {
                info.gauge(&id.labels, &[v], 1.0);
            }
            // Present once any process of the identity had a Go snapshot.
            if !t.ints.contains_key(&Key::GcCycles) {
                continue;
            }
            grow_bytes.counter(&id.labels, &[], t.get(Key::MapGrowBytes));
            slices.counter(&id.labels, &[], t.get(Key::SliceGrows));
            slice_bytes.counter(&id.labels, &[], t.get(Key::SliceGrowBytes));
            cycles.counter(&id.labels, &[], t.get(Key::GcCycles));
            pauses.histogram(&id.labels, t, Hist::GoPause);
            // Only where mallocgc is probed: otherwise an empty histogram would claim "no
            // allocations".
            if t.has(Key::Count(Hist::GoAllocSize)) {
                go_sizes.histogram(&id.labels, t, Hist::GoAllocSize);
            }
        }
        for f in [
            info,
            grows,
            grow_bytes,
            slices,
            slice_bytes,
            cycles,
            pauses,
            go_sizes,
        ] {
            f.push_to(&mut out);
        }

        let mut probe_calls = Family::new(&PROBE_CALLS);
        let mut probe_args = Family::new(&PROBE_ARG_SUM);
        for (id, t) in &totals {
            for (k, &v) in &t.ints {
                match *k {
                    Key::ProbeCalls(kind) => probe_calls.counter(&id.labels, &[kind], v),
                    Key::ProbeArg(kind, arg) => probe_args.counter(&id.labels, &[kind, arg], v),
                    _ => {}
                }
            }
        }
        probe_calls.push_to(&mut out);
        probe_args.push_to(&mut out);

        // Maps: the identity's top sites by bytes held; a verdict's series only where a map
        // has it (an alert tests for presence).
        let [mut len, mut held, mut load, mut flagged] =
            [&GO_MAP_LEN, &GO_MAP_BYTES, &GO_MAP_LOAD, &GO_MAPS_FLAGGED].map(Family::new);
        for id in self.ids.values() {
            for (site, m) in &id.map_rows {
                len.gauge(&id.labels, &[site], m.len as f64);
                held.gauge(&id.labels, &[site], m.bytes as f64);
                if m.slots > 0 {
                    load.gauge(&id.labels, &[site], m.len as f64 / m.slots as f64);
                }
                for (verdict, n) in [(Verdict::Growing, m.growing), (Verdict::Bloated, m.bloated)] {
                    let verdict = verdict.name();
                    if n > 0 {
                        flagged.gauge(&id.labels, &[site, verdict], n as f64);
                    }
                }
            }
        }
        for f in [len, held, load, flagged] {
            f.push_to(&mut out);
        }

        let [s_calls, s_bytes, s_live_a, s_live_b] = SITE_FAMILY_SPECS.map(Family::new);
        let (mut s_calls, mut s_bytes, mut s_live_a, mut s_live_b) =
            (s_calls, s_bytes, s_live_a, s_live_b);
        for id in self.ids.values() {
            for r in &id.rows {
                let values = [&*r.site, r.kind];
                s_calls.counter(&id.labels, &values, r.value.calls);
                s_bytes.counter(&id.labels, &values, r.value.bytes);
                if self.cfg.live {
                    s_live_a.gauge(&id.labels, &values, r.live.allocations as f64);
                    s_live_b.gauge(&id.labels, &values, r.live.bytes as f64);
                }
            }
        }
        s_calls.push_to(&mut out);
        s_bytes.push_to(&mut out);
        if self.cfg.live {
            s_live_a.push_to(&mut out);
            s_live_b.push_to(&mut out);
        }
        out
    }

    pub(super) fn self_families(&self, s: &SelfStats, scrape: Duration) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        let mut f = Family::new(&PROBES_ATTACHED);
        f.gauge(&[], &[], s.probes_attached as f64);
        f.push_to(&mut out);

        let mut f = Family::new(&ATTACH_FAILURES);
        for (reason, &n) in &s.attach_failures {
            f.counter(&[], &[reason], n);
        }
        f.push_to(&mut out);

        let mut f = Family::new(&EVENTS_PROCESSED);
        f.counter(&[], &[], s.events_processed);
        f.push_to(&mut out);

        let mut f = Family::new(&EVENTS_LOST);
        for (cause, &n) in &s.events_lost {
            f.counter(&[], &[cause, loss::effect(cause).name()], n);
        }
        f.push_to(&mut out);

        let mut f = Family::new(&GO_GROWTH_AGGREGATED);
        for (how, &n) in &s.go_growth_aggregated {
            f.counter(&[], &[how], n);
        }
        f.push_to(&mut out);

        let mut f = Family::new(&MAP_FILL);
        for (map, &v) in &s.map_fill {
            f.gauge(&[], &[map], v);
        }
        f.push_to(&mut out);

        let mut f = Family::new(&SYMBOLIZATION_FAILURES);
        for (cause, &n) in &s.symbolization_failures {
            f.counter(&[], &[cause], n);
        }
        f.push_to(&mut out);

        let mut f = Family::new(&STALE_SCRAPES);
        f.counter(&[], &[], s.stale_snapshots);
        f.push_to(&mut out);

        let mut f = Family::new(&HELD_ENTRIES);
        for (what, &n) in &s.held {
            f.gauge(&[], &[what], n as f64);
        }
        f.push_to(&mut out);

        let mut f = Family::new(&CALL_SITE_SERIES);
        f.gauge(&[], &[], self.site_series as f64);
        f.push_to(&mut out);

        let mut f = Family::new(&CALL_SITE_SERIES_LIMIT);
        f.gauge(&[], &[], self.cfg.max_site_series as f64);
        f.push_to(&mut out);

        let mut f = Family::new(&SCRAPE_DURATION);
        f.gauge(&[], &[], scrape.as_secs_f64());
        f.push_to(&mut out);
        out
    }
}

/// A metric family under construction: its name, help, type and label names come from its
/// spec; callers give only label values, in the spec's order.
struct Family {
    spec: &'static FamilySpec,
    mf: MetricFamily,
}

impl Family {
    fn new(spec: &'static FamilySpec) -> Self {
        let mut mf = MetricFamily::default();
        mf.set_name(spec.name.to_string());
        mf.set_help(spec.help.to_string());
        mf.set_field_type(spec.kind.proto());
        Family { spec, mf }
    }

    fn labels(&self, base: &[LabelPair], values: &[&str]) -> Vec<LabelPair> {
        debug_assert_eq!(
            values.len(),
            self.spec.labels.len(),
            "{}: label values",
            self.spec.name
        );
        let mut v = Vec::with_capacity(base.len() + values.len());
        v.extend_from_slice(base);
        v.extend(
            self.spec
                .labels
                .iter()
                .zip(values)
                .map(|(n, val)| label(n, val)),
        );
        v
    }

    // Counters are rendered as f64 by the text format; values above 2^53 lose precision only.
    fn counter(&mut self, base: &[LabelPair], values: &[&str], v: u64) {
        debug_assert_eq!(self.spec.kind, MetricKind::Counter, "{}", self.spec.name);
        let mut m = Metric::from_label(self.labels(base, values));
        let mut c = proto::Counter::default();
        c.set_value(v as f64);
        m.set_counter(c);
        self.mf.mut_metric().push(m);
    }

    fn gauge(&mut self, base: &[LabelPair], values: &[&str], v: f64) {
        debug_assert_eq!(self.spec.kind, MetricKind::Gauge, "{}", self.spec.name);
        let mut m = Metric::from_label(self.labels(base, values));
        let mut g = proto::Gauge::default();
        g.set_value(v);
        m.set_gauge(g);
        self.mf.mut_metric().push(m);
    }

    /// Renders per-bucket counts as Prometheus' cumulative buckets.
    fn histogram(&mut self, base: &[LabelPair], t: &Counters, which: Hist) {
        debug_assert_eq!(self.spec.kind, MetricKind::Histogram, "{}", self.spec.name);
        let mut bounds: Vec<(f64, u64)> = t
            .ints
            .iter()
            .filter_map(|(k, &n)| match *k {
                Key::Bucket(h, bound) if h == which => Some((f64::from_bits(bound.0), n)),
                _ => None,
            })
            .collect();
        bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut cumulative = 0u64;
        let mut buckets = Vec::with_capacity(bounds.len());
        for (bound, n) in bounds {
            cumulative = cumulative.saturating_add(n);
            // An explicit +Inf bucket is the count line the encoder writes anyway.
            if bound == f64::INFINITY {
                continue;
            }
            let mut b = proto::Bucket::default();
            b.set_upper_bound(bound);
            b.set_cumulative_count(cumulative);
            buckets.push(b);
        }
        let mut h = proto::Histogram::default();
        h.set_bucket(buckets);
        h.set_sample_count(t.get(Key::Count(which)).max(cumulative));
        h.set_sample_sum(t.sums.get(&which).copied().unwrap_or(0.0));
        let mut m = Metric::from_label(self.labels(base, &[]));
        m.set_histogram(h);
        self.mf.mut_metric().push(m);
    }

    /// Families without series are left out (the format has no empty family).
    fn push_to(self, out: &mut Vec<MetricFamily>) {
        if !self.mf.get_metric().is_empty() {
            out.push(self.mf);
        }
    }
}
