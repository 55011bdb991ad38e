//! The tracer: the agent's thread that owns the probes. One loop drains the ring buffer,
//! rescans /proc, sweeps gone processes' rows out of the kernel maps, watches the loss
//! counters and answers snapshot requests. Every step is bounded (batched map reads, a budget
//! per sweep step, a deadline for symbolizing during a scrape), so the loop comes round in
//! milliseconds whatever the node does, and its heartbeat says so.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, LazyLock, Mutex, MutexGuard, atomic::Ordering},
    time::{Duration, Instant},
};

use allocwatch_common::{ImageHists, event::GoEvent, libc::SiteKey, loss::LossCause, site_limit};
use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    Heartbeat, LastAnswers, Request, Snapshot, exec_snapshots,
    pressure::{self, SitePressure},
    registry::Registry,
    select::Selector,
};
use crate::{
    aggregate::Sampling,
    collect,
    config::Config,
    frames::FrameCache,
    k8s::watch::PodUpdate,
    pipeline::{Handler, Parts, Pipeline},
    probes::{Capacity, Filter, Links, ProbeConfig, Probes},
    serve::metrics::Exporter,
    symbolize::SymbolizerHandle,
    target::{
        go::GoProbeSet,
        maps::DevInode,
        registry::{AttachFailure, Loaded, Target, Targets},
        symprobe,
    },
    unwind::{
        load::{Tables, UnwindMaps},
        worker::TablesWorker,
    },
};

/// New processes are found within this (the issue asks for one second).
const SCAN_INTERVAL: Duration = Duration::from_millis(500);
/// The loop's housekeeping step: drain, sweep a bounded slice, check losses.
const TICK: Duration = Duration::from_millis(100);
/// Loss counters are checked (and warned about) this often.
const LOSS_CHECK: Duration = Duration::from_secs(5);
/// The same loss cause is warned about at most this often.
const LOSS_WARN_EVERY: Duration = Duration::from_secs(60);
/// Kernel maps are counted for their fill gauges this often.
const CENSUS_EVERY: Duration = Duration::from_secs(10);
/// Time per tick spent naming new sites in the background.
const NAMING_SLICE: Duration = Duration::from_millis(20);
/// Go maps are read from their processes this often (the verdicts count reads: see
/// `gostate::Verdicts`, whose thresholds assume about one read a second).
const MAP_READ_EVERY: Duration = Duration::from_secs(1);
/// How often the Go growth counted in the kernel (`GO_AGG`) is read (and at every scrape).
const GO_AGG_EVERY: Duration = Duration::from_secs(1);
/// Maps read per Go process at each read, the largest by their growth's bytes: what the
/// exporter can show (its top sites) with room, at a few microseconds a map.
const MAP_READS: usize = 64;
/// The symbolizer is told which processes still matter this often.
const RETAIN_EVERY: Duration = Duration::from_secs(5);
/// How often the files attached are checked for deletion (one fstat each; /proc is scanned
/// only for a deleted file whose last known holders no longer map it).
const RELEASE_EVERY: Duration = Duration::from_secs(10);
/// A gone process's own detail (its snapshot, its profile) is kept at most this long after its
/// exit (one or two scrapes); then it departs into its identity's sums, which `/metrics` keeps
/// for the TTL.
const DETAIL_KEPT: Duration = Duration::from_secs(30);

/// What the tracer thread needs; built on the agent's main thread.
pub struct Tracer {
    pub cfg: Config,
    pub selector: Selector,
    pub requests: mpsc::Receiver<Request>,
    pub pod_updates: mpsc::Receiver<PodUpdate>,
    pub stop: watch::Receiver<bool>,
    pub heartbeat: Arc<Heartbeat>,
    /// What was last answered, served when a request cannot wait for a fresh answer.
    pub last: Arc<LastAnswers>,
}

impl Tracer {
    /// Runs the tracer on the calling thread until `stop`; `ready` gets the startup banner and
    /// the probes' links, or the error that prevented startup.
    pub fn run(self, ready: oneshot::Sender<anyhow::Result<Ready>>) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the tracer's runtime")?;
        rt.block_on(self.run_async(ready))
    }

    async fn run_async(self, ready: oneshot::Sender<anyhow::Result<Ready>>) -> anyhow::Result<()> {
        let Tracer {
            cfg,
            selector,
            mut requests,
            mut pod_updates,
            mut stop,
            heartbeat,
            last,
        } = self;
        let mut state = match State::start(&cfg, selector) {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("{e:#}");
                let _ = ready.send(Err(e));
                return Err(anyhow::anyhow!(msg));
            }
        };
        // Maps of new programs are read on a thread of their own, the moment they exec.
        let _exec_snapshots = collect::take_exec_notify(&mut state.pipe.parts.probes)
            .map_err(anyhow::Error::from)
            .and_then(|r| {
                Ok(exec_snapshots::spawn(
                    r,
                    state.pipe.parts.symbolizer.clone(),
                )?)
            })
            .inspect_err(|e| crate::say!("allocwatch: warning: exec snapshots: {e}"))
            .ok();
        state.scan();
        // Sampled figures are estimates: say so where the operator looks first.
        let sampling = match state.sampling.bytes {
            0 => String::new(),
            n => {
                format!(", one call per {n} bytes allocated sampled (--sample-bytes 0: every call)")
            }
        };
        let _ = ready.send(Ok(Ready {
            banner: format!(
                "{} processes, {} probes{sampling}",
                state.registry.procs.len(),
                state.registry.targets.points_attached
            ),
            links: state.pipe.parts.probes.links(),
        }));

        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            heartbeat.beat();
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                // Before requests and records: scrapes that each take longer than the time
                // between them (a slow snapshot under load), or a ring that is never empty,
                // must not starve the scan, the sweep, the naming and the map reads. The
                // step is bounded and the next is a tick after it, so a request waits at
                // most one of them.
                _ = tick.tick() => {
                    // The probe batches wakeups for frequent records (Go events): the last
                    // records of a burst wait for the next wakeup, so read them here at the
                    // latest.
                    state.drain()?;
                    state.housekeeping().await?;
                    // A full tick from the step's end, not its start: a step that outlasts
                    // the tick would otherwise find the next one due at once, and being first
                    // in this select it would keep requests out for as long as the node is
                    // that busy (scrapes then get "still starting" or the last rendering).
                    tick.reset();
                }
                Some(req) = requests.recv() => {
                    state.drain()?;
                    let mut snap = state.snapshot().await?;
                    snap.1.stale_snapshots = last.stale.load(Ordering::Relaxed);
                    match req {
                        Request::Snapshot(reply) => {
                            *lock(&last.snapshot) = Some(snap.clone());
                            let _ = reply.try_send(snap);
                        }
                        Request::Metrics(started, reply) => {
                            let text = state.exporter.render(&snap.0, &snap.1, Instant::now(), started);
                            if let Ok(t) = &text {
                                *lock(&last.metrics) = Some(t.clone());
                            }
                            let _ = reply.try_send(text);
                        }
                    }
                }
                ready = state.pipe.readable() => {
                    ready?;
                    state.drain()?;
                }
                Some(update) = pod_updates.recv() => state.registry.apply_pod(update),
            }
        }
        // Dropping the probes detaches them.
        let t = Instant::now();
        drop(state);
        if std::env::var_os("ALLOCWATCH_DEBUG_TIMING").is_some() {
            crate::say!(
                "allocwatch: debug: detaching took {:.1} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
        }
        Ok(())
    }
}

/// What the tracer hands over once its probes are attached.
pub struct Ready {
    /// What the agent says it traces.
    pub banner: String,
    /// The probes' links: the signal handler detaches them itself, whatever the tracer is
    /// doing then.
    pub links: Links,
}

/// Everything the loop owns.
struct State {
    /// The probes, their ring buffer and the sites named from it.
    pipe: Pipeline,
    registry: Registry,
    capacity: Capacity,
    top_k: usize,
    sampling: Sampling,
    next_scan: Instant,
    next_retain: Instant,
    losses: LossWatch,
    /// Fill of the kernel maps not read at every scrape, from the last census.
    fills: BTreeMap<&'static str, f64>,
    next_census: Instant,
    next_map_read: Instant,
    next_go_agg: Instant,
    next_release: Instant,
    /// `/metrics`: kept here, next to the processes, so that a gone process leaves its
    /// identity with its final values as soon as it departs.
    exporter: Exporter,
    /// How long a gone process's detail is kept (profiles of it, its own snapshot) before it
    /// departs into its identity's sums: the TTL, at most [`DETAIL_KEPT`].
    keep_detail: Duration,
    /// The site table's share per process under pressure.
    pressure: SitePressure,
}

impl State {
    fn start(cfg: &Config, selector: Selector) -> anyhow::Result<Self> {
        // Always a denylist, also when some include rule narrows the selection: the kernel
        // records a new process from its first call, before the agent can have classified it
        // (a selected program may live less than a millisecond); rejected processes are denied
        // once classified and their rows deleted (`registry`).
        let capacity = cfg.capacity;
        if cfg.sample_bytes() > 0 && !cfg.mode.samples(true) {
            anyhow::bail!(
                "sample_bytes samples stacks and outstanding allocations: mode {} records neither",
                cfg.mode.name()
            );
        }
        // Tables only where stacks are walked at all.
        let unwind = cfg.unwind.tables() && cfg.mode.stacks() && crate::unwind::TABLES_SUPPORTED;
        let mut probes = Probes::load_mode(
            &ProbeConfig {
                tgid: None,
                filter: Filter::Deny,
                stacks: cfg.mode.stacks(),
                sample_bytes: cfg.sample_bytes(),
                capacity,
                unwind_tables: unwind,
            },
            cfg.mode,
        )?;
        // Our own allocations must not be traced (each event we handle would allocate more).
        let me = std::process::id();
        probes.set_listed(me, Some(probes.exec_stamp(me)?))?;
        let go_probes = GoProbeSet {
            growth: cfg.go.growth,
            malloc: cfg.go.malloc,
            gc: cfg.go.gc,
        };
        if selector.may_reject() {
            probes.set_site_limit(
                site_limit::UNDECIDED,
                pressure::undecided_limit(capacity.max_sites),
            )?;
        }
        let mut targets = Targets::new(go_probes, None);
        if !cfg.native_growth {
            targets = targets.without_native_growth();
        }
        let mut registry = Registry::new(selector, targets, cfg.ttl, cfg.top_k);
        // Symbol probes: the program now (its load needs the capabilities dropped after
        // start), the `probe`s' files for every process (validated with the configuration).
        probes.load_sym()?;
        for t in symprobe::for_agent(&cfg.probe)? {
            let id = std::fs::metadata(&t.path)
                .map(|m| DevInode::from_metadata(&m))
                .with_context(|| format!("probe {}", t.path.display()))?;
            let file = Loaded {
                id,
                target: Target::Sym(Arc::new(t)),
            };
            registry
                .targets
                .attach(&mut probes, &file)
                .with_context(|| format!("attaching probe {}", file.target.path().display()))?;
        }
        registry.probe_kinds = symprobe::static_kinds(&cfg.probe);
        let symbolizer = SymbolizerHandle::spawn();
        if unwind {
            let maps = UnwindMaps::take(&mut probes)?;
            registry.unwind = Some(TablesWorker::spawn(
                Tables::new(maps, cfg.unwind),
                symbolizer.clone(),
            )?);
        }
        // exec events: identities change at exec, and short-lived programs get their path.
        if let Err(e) = probes.attach_exec() {
            crate::say!(
                "allocwatch: warning: {e}: processes are renamed after exec only by the /proc scan"
            );
            registry.targets.failed(AttachFailure::ExecTracepoint);
        }
        let now = Instant::now();
        Ok(Self {
            pipe: Pipeline::new(probes, FrameCache::interning(), symbolizer)?,
            registry,
            capacity,
            top_k: cfg.top_k,
            sampling: Sampling {
                bytes: cfg.sample_bytes(),
                stacks: cfg.mode.stacks(),
            },
            next_scan: now + SCAN_INTERVAL,
            next_retain: now + RETAIN_EVERY,
            losses: LossWatch::default(),
            fills: BTreeMap::new(),
            next_census: now,
            next_map_read: now + MAP_READ_EVERY,
            next_go_agg: now + GO_AGG_EVERY,
            next_release: now + RELEASE_EVERY,
            exporter: Exporter::new(cfg.serve_config().metrics),
            keep_detail: cfg.ttl.min(DETAIL_KEPT),
            pressure: SitePressure::new(cfg.capacity.max_sites),
        })
    }

    /// Reads every record ready in the ring and handles it.
    fn drain(&mut self) -> anyhow::Result<()> {
        self.pipe.drain(&mut self.registry)
    }

    /// Records, then the Go growth counted in the kernel since the last call.
    fn drain_go_agg(&mut self) -> anyhow::Result<()> {
        self.pipe.drain_go_agg(&mut self.registry)
    }

    /// One pass over /proc (`Registry::scan`).
    fn scan(&mut self) {
        let Parts {
            probes,
            frames,
            symbolizer,
        } = &mut self.pipe.parts;
        self.registry.scan(probes, symbolizer, frames);
    }

    /// The periodic work, each part bounded.
    async fn housekeeping(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut sw = Stopwatch::new("housekeeping");
        if let Some(d) = *DEBUG_SLOW_STEP {
            tokio::time::sleep(d).await;
            sw.lap("debug delay");
        }
        if now >= self.next_scan {
            self.scan();
            self.next_scan = now + SCAN_INTERVAL;
            sw.lap("scan");
            self.depart(now).await?;
            sw.lap("depart");
        }
        if now >= self.next_release {
            self.registry
                .targets
                .release_deleted(&mut self.pipe.parts.probes);
            self.next_release = now + RELEASE_EVERY;
            sw.lap("release deleted files");
        }
        if now >= self.next_go_agg {
            self.drain_go_agg()?;
            self.next_go_agg = now + GO_AGG_EVERY;
            sw.lap("go aggregate");
        }
        if now >= self.next_map_read {
            self.registry.read_go_maps(MAP_READS);
            self.next_map_read = now + MAP_READ_EVERY;
            sw.lap("go maps");
        }
        if now >= self.next_retain {
            let keep: HashSet<u32> = self
                .registry
                .procs
                .keys()
                .chain(self.registry.past.keys())
                .copied()
                .collect();
            self.pipe.parts.symbolizer.retain(keep);
            self.pipe.parts.frames.purge();
            self.next_retain = now + RETAIN_EVERY;
        }
        let Parts { probes, frames, .. } = &mut self.pipe.parts;
        self.registry
            .sweep(probes, frames, self.capacity.max_live)?;
        sw.lap("sweep");
        // New sites are named while their processes live, a slice of each tick (gone
        // processes' first).
        self.pipe
            .name_queued(Some(Instant::now() + NAMING_SLICE))
            .await?;
        sw.lap("naming");
        if now >= self.losses.next_check {
            self.losses.check(&self.pipe.parts.probes, &self.capacity)?;
        }
        let change = if now >= self.next_census {
            self.fills = census(&self.pipe.parts.probes, &self.registry)?;
            self.next_census = now + CENSUS_EVERY;
            sw.lap("census");
            self.pressure.census(&mut self.pipe.parts.probes)?
        } else {
            self.pressure.tick(&mut self.pipe.parts.probes, now)?
        };
        if let Some(change) = change {
            crate::say!("allocwatch: warning: {change}");
        }
        sw.done();
        Ok(())
    }

    /// Gone processes whose detail has been kept long enough leave for their identity's sums.
    async fn depart(&mut self, now: Instant) -> anyhow::Result<()> {
        if !self.registry.departures(now, self.keep_detail).is_empty() {
            // Their last growth counted in the kernel, before their detail leaves.
            self.drain_go_agg()?;
        }
        let Parts {
            probes,
            frames,
            symbolizer,
        } = &mut self.pipe.parts;
        for d in self.registry.departures(now, self.keep_detail) {
            if d.exported
                && let Some(snap) = super::snapshot::departing(
                    probes,
                    &self.registry,
                    frames,
                    symbolizer,
                    self.top_k,
                    self.sampling,
                    (d.pid, d.image),
                )
                .await?
            {
                self.exporter.depart(&snap, d.exited_at);
            }
            self.registry.remove_departed(&d, frames, symbolizer);
        }
        Ok(())
    }

    async fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        let mut sw = Stopwatch::new("snapshot");
        // A scrape sees the Go growth counted in the kernel up to now.
        self.drain_go_agg()?;
        sw.lap("go aggregate");
        let Parts {
            probes,
            frames,
            symbolizer,
        } = &mut self.pipe.parts;
        let (mut snap, unexported) = super::snapshot::build(
            probes,
            &self.registry,
            frames,
            symbolizer,
            self.pipe.stats,
            (self.capacity.max_sites, self.top_k, self.sampling),
        )
        .await?;
        sw.lap("build and name");
        for (map, fill) in &self.fills {
            snap.1.map_fill.entry(map).or_insert(*fill);
        }
        // Known at every snapshot without a walk: the table thread counts what it loaded.
        if let Some(tables) = &self.registry.unwind {
            use allocwatch_common::{
                map_names,
                unwind::{UNWIND_PROCS_MAX, UNWIND_ROWS_MAX},
            };
            let (rows, procs) = tables.usage();
            snap.1.map_fill.insert(
                map_names::UNWIND_ROWS,
                f64::from(rows) / f64::from(UNWIND_ROWS_MAX),
            );
            snap.1.map_fill.insert(
                map_names::UNWIND_PROCS,
                procs as f64 / f64::from(UNWIND_PROCS_MAX),
            );
        }
        snap.1
            .go_growth_aggregated
            .insert("kernel_count", self.pipe.go_agg.repeats);
        snap.1
            .go_growth_aggregated
            .insert("table_full", self.pipe.go_agg_full()?);
        let (chains, distinct, raw) = self.pipe.parts.frames.sizes();
        let (sym_procs, sym_files, sym_queued) = self.pipe.parts.symbolizer.held();
        let held = &mut snap.1.held;
        held.insert("processes", self.registry.procs.len() as u64);
        held.insert(
            "exec_images",
            self.registry.past.values().map(|v| v.len() as u64).sum(),
        );
        held.insert("call_chains", chains as u64);
        held.insert("distinct_call_chains", distinct as u64);
        held.insert("raw_stacks", raw as u64);
        held.insert("late_sites", self.pipe.parts.frames.late_sites() as u64);
        held.insert("naming_queue", self.pipe.parts.frames.queued() as u64);
        held.insert("symbolizer_processes", sym_procs);
        held.insert("symbolizer_files", sym_files);
        held.insert("symbolizer_queue", sym_queued);
        // Rows whose announcement was lost (full ring buffer) or recorded while their process
        // was being denied: deleted at the next scan once it is rejected or gone.
        self.registry.unexported(unexported);
        sw.done();
        Ok(snap)
    }
}

/// Events only register processes (so short-lived ones are named while they exist) and
/// feed the Go state; sites are named in the background and at a scrape.
impl Handler for Registry {
    fn exec(&mut self, parts: &mut Parts, tgid: u32, comm: &[u8; 16], path: String) {
        self.exec_seen(tgid, comm, path, &mut parts.probes, &parts.symbolizer);
    }

    fn image_hists(&mut self, _parts: &mut Parts, tgid: u32, hists: ImageHists) {
        Registry::image_hists(self, tgid, hists);
    }

    fn new_site(&mut self, parts: &mut Parts, site: &SiteKey, comm: &[u8; 16]) {
        self.note_site(site, comm);
        self.ensure_seen(site.tgid, comm, &mut parts.probes, &parts.symbolizer);
        // A frame in a library mapped after the process was registered (dlopen) gets its
        // table: the first new site through it makes the table thread read the map again.
        if let Some(tables) = &self.unwind
            && let Some(stack) = parts.frames.raw_stack(site.tgid, site.stack_id)
        {
            tables.check(site.tgid, stack);
        }
    }

    fn go(&mut self, parts: &mut Parts, event: &GoEvent) {
        let tgid = event.header.tgid;
        if !self.procs.contains_key(&tgid) {
            self.ensure_rows(tgid, &mut parts.probes, &parts.symbolizer);
        }
        if let Some(go) = self.procs.get_mut(&tgid).and_then(|p| p.go.as_mut()) {
            go.record(event);
        }
    }

    fn go_repeats(&mut self, event: &GoEvent, n: u64) {
        // Its first record registered the process; one that departed has no state to count in.
        if let Some(go) = self
            .procs
            .get_mut(&event.header.tgid)
            .and_then(|p| p.go.as_mut())
        {
            go.record_repeats(event, n);
        }
    }
}

/// Fill levels of the kernel hash maps that a scrape does not read (entries / capacity). The
/// LRU tables (stacks, last entries) are full by design and evict; they are left out.
fn census(probes: &Probes, registry: &Registry) -> anyhow::Result<BTreeMap<&'static str, f64>> {
    use allocwatch_common::{
        go::{GoHistKey, GoHistVal, GoProc, StwState},
        libc::Pending,
        map_names,
    };
    let mut out = BTreeMap::new();
    fn fill<K: aya::Pod, V: aya::Pod>(
        probes: &Probes,
        name: &'static str,
    ) -> Result<f64, collect::CollectError> {
        let (n, max) = collect::count_rows::<K, V>(probes, name)?;
        Ok(n as f64 / f64::from(max.max(1)))
    }
    out.insert(
        map_names::PENDING,
        fill::<u64, Pending>(probes, map_names::PENDING)?,
    );
    out.insert(
        map_names::GO_PROCS,
        fill::<u32, GoProc>(probes, map_names::GO_PROCS)?,
    );
    out.insert(
        map_names::GO_STW,
        fill::<u32, StwState>(probes, map_names::GO_STW)?,
    );
    for name in [map_names::LIBC_HIST, map_names::GO_HIST] {
        out.insert(name, fill::<GoHistKey, GoHistVal>(probes, name)?);
    }
    // Without Go programs (`--no-go`) the map is there, empty.
    out.insert(
        map_names::GO_AGG,
        fill::<allocwatch_common::go::GoAggKey, u64>(probes, map_names::GO_AGG)?,
    );
    out.insert(
        map_names::SITE_BUDGET,
        fill::<u32, u32>(probes, map_names::SITE_BUDGET)?,
    );
    let live_max = collect::RawMap::of::<
        allocwatch_common::libc::LiveKey,
        allocwatch_common::libc::LiveAlloc,
    >(collect::map_ref(probes, map_names::LIVE)?, map_names::LIVE)?
    .max_entries();
    out.insert(
        map_names::LIVE,
        registry.sweeper.live_entries as f64 / f64::from(live_max.max(1)),
    );
    Ok(out)
}

/// Warns when a loss counter rises, naming what to change.
struct LossWatch {
    last: BTreeMap<LossCause, u64>,
    warned: BTreeMap<LossCause, Instant>,
    next_check: Instant,
}

impl Default for LossWatch {
    fn default() -> Self {
        Self {
            last: BTreeMap::new(),
            warned: BTreeMap::new(),
            next_check: Instant::now() + LOSS_CHECK,
        }
    }
}

impl LossWatch {
    fn check(&mut self, probes: &Probes, capacity: &Capacity) -> anyhow::Result<()> {
        self.next_check = Instant::now() + LOSS_CHECK;
        let now = collect::lost(probes)?;
        for (&cause, &n) in &now {
            let before = self.last.get(&cause).copied().unwrap_or(0);
            if n <= before {
                continue;
            }
            let recent = self
                .warned
                .get(&cause)
                .is_some_and(|t| t.elapsed() < LOSS_WARN_EVERY);
            if !recent {
                crate::say!(
                    "allocwatch: warning: {} events lost ({}) in the last {} s, {}: {}",
                    n - before,
                    cause.name(),
                    LOSS_CHECK.as_secs(),
                    crate::loss::consequence(cause.effect()),
                    remedy(cause, capacity)
                );
                self.warned.insert(cause, Instant::now());
            }
        }
        self.last = now;
        Ok(())
    }
}

/// What to do about a loss cause, in the user's terms.
fn remedy(cause: LossCause, c: &Capacity) -> String {
    match cause {
        LossCause::PendingFull => format!(
            "the in-flight call table is full; raise capacity.max_pending in the config file \
             (now {})",
            c.max_pending
        ),
        LossCause::LiveFull => format!(
            "the live-allocation table is full; raise capacity.max_live in the config file \
             (now {}) or use --mode \
             count-stacks (no live tracking)",
            c.max_live
        ),
        LossCause::SitesFull => format!(
            "the call-site table is full and so is the table of rows of unknown sites (SPILL, \
             one row per process and API, {} rows: more processes than the agent can hold \
             have rows at once): calls are counted for the node only, not for their process; \
             narrow the selection (--comm, --exclude-comm, …), or raise capacity.max_sites in \
             the config file (now {}) so that fewer processes need those rows",
            allocwatch_common::capacity::SPILL,
            c.max_sites
        ),
        LossCause::SiteSpilled => format!(
            "the call-site table is full: new sites are counted exactly in their process's \
             `other` site, without their call chain; raise capacity.max_sites in the config \
             file (now {}), narrow the selection (--comm, --exclude-comm, …), or sample \
             (sample_bytes) for fewer rows",
            c.max_sites
        ),
        LossCause::StackMapFull => format!(
            "the stack table is full; raise capacity.max_stacks in the config file \
             (now {})",
            c.max_stacks
        ),
        LossCause::StackBudget => format!(
            "the call-site table is three quarters full and a process made more distinct stacks \
             than its share ({} rows, 1/{} of capacity.max_sites; code without frame pointers \
             yields garbage stacks); its new sites keep only their immediate caller, counts \
             stay exact; raise capacity.max_sites in the config file for a larger share",
            c.max_sites / pressure::SHARE,
            pressure::SHARE
        ),
        LossCause::StackUndecided => format!(
            "a process the agent had not classified yet made more distinct stacks than it may \
             before its selection is known ({} rows, 1/{} of capacity.max_sites): its new sites \
             keep only their immediate caller until it is admitted, counts stay exact; the agent \
             is late classifying new processes (check its CPU limit)",
            pressure::undecided_limit(c.max_sites),
            pressure::UNDECIDED_SHARE
        ),
        LossCause::SiteBudget => format!(
            "the call-site table is three quarters full and a process made more sites than {} \
             times its share ({} rows of capacity.max_sites; a compiler calls malloc from \
             tens of thousands of places): its new sites are counted exactly in its `other` \
             site, without their call chain; raise capacity.max_sites in the config file, or \
             exclude such programs (--exclude-comm)",
            site_limit::ROW_SHARES,
            (c.max_sites / pressure::SHARE).saturating_mul(site_limit::ROW_SHARES)
        ),
        LossCause::SiteUndecided => format!(
            "a process the agent had not classified yet made more sites than it may before its \
             selection is known ({} rows, 1/{} of capacity.max_sites): its new sites are \
             counted exactly in its `other` site, without their call chain, until it is \
             admitted; the agent is late classifying new processes (check its CPU limit)",
            pressure::undecided_limit(c.max_sites),
            pressure::UNDECIDED_SHARE
        ),
        LossCause::StackCollision => {
            "two stacks hashed to the same id; the site keeps only its caller".to_string()
        }
        LossCause::StackError => "user stacks could not be read".to_string(),
        LossCause::UnwindUnsupported => "a stack walked with unwind tables reached code whose \
                                          rule the walker does not follow (a PLT stub, a CFA \
                                          expression); those stacks end there"
            .to_string(),
        LossCause::UnwindReadError => "a stack walked with unwind tables could not be read \
                                        where a rule pointed; those stacks end there"
            .to_string(),
        LossCause::UnwindTruncated => "stacks deeper than the walker's frame limit keep their \
                                        innermost frames"
            .to_string(),
        LossCause::RingbufFull => "the event ring buffer overflowed: the agent was not \
                                    scheduled in time (check its CPU limit)"
            .to_string(),
        LossCause::OrphanReturn => {
            "returns without their entry (calls in flight when probes were attached)".to_string()
        }
        LossCause::ProbeSiteSpilled => format!(
            "the symbol-probe site table (growth kinds and probes, {} rows) is full: new sites \
             are counted exactly in their process's `other` site, without their call chain; \
             turn native_growth off (counts C++/Rust growth in every program), or narrow the \
             selection or the probes",
            allocwatch_common::symprobe::SITES_MAX
        ),
        LossCause::ProbeSitesFull => format!(
            "the symbol-probe site table (growth kinds and probes, {} rows) is full, with no \
             row for the process's other sites: those calls are not counted; turn \
             native_growth off (counts C++/Rust growth in every program), or narrow the \
             selection or the probes",
            allocwatch_common::symprobe::SITES_MAX
        ),
        LossCause::HistFull => "the size-histogram table is full (too many processes at \
                                 once); sizes of new processes are not histogrammed"
            .to_string(),
    }
}

/// A step of the loop this long delays every scrape behind it past the server's wait (it then
/// answers with the last rendering, or "still starting" before the first): said on stderr with
/// its parts, at most once per [`SLOW_STEP_EVERY`], so an operator (or a failed test's log)
/// sees where the time went.
const SLOW_STEP: Duration = Duration::from_secs(2);
const SLOW_STEP_EVERY: Duration = Duration::from_secs(60);

/// `ALLOCWATCH_DEBUG_SLOW_STEP_MS=N`: every housekeeping step takes N ms longer, as on a node
/// busy enough that each step outlasts [`TICK`] (the agent suite's
/// `scrapes_are_answered_when_every_step_outlasts_the_tick`).
static DEBUG_SLOW_STEP: LazyLock<Option<Duration>> = LazyLock::new(|| {
    std::env::var("ALLOCWATCH_DEBUG_SLOW_STEP_MS")
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
});

/// When a slow step was last said (the loop runs on one thread; the lock is never contended).
static SLOW_STEP_SAID: Mutex<Option<Instant>> = Mutex::new(None);

/// `ALLOCWATCH_DEBUG_TIMING=1`: steps of the loop that took long, with their parts, on
/// stderr (how the soak's stalls are diagnosed); a step past [`SLOW_STEP`] is said anyway.
struct Stopwatch {
    what: &'static str,
    start: Instant,
    last: Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl Stopwatch {
    fn new(what: &'static str) -> Self {
        let now = Instant::now();
        Self {
            what,
            start: now,
            last: now,
            laps: Vec::new(),
        }
    }

    fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        self.laps.push((name, now - self.last));
        self.last = now;
    }

    fn done(self) {
        let total = self.start.elapsed();
        let debug = total >= Duration::from_millis(20)
            && std::env::var_os("ALLOCWATCH_DEBUG_TIMING").is_some();
        let slow = total >= SLOW_STEP && {
            let mut said = lock(&SLOW_STEP_SAID);
            let due = said.is_none_or(|t| t.elapsed() >= SLOW_STEP_EVERY);
            if due {
                *said = Some(Instant::now());
            }
            due
        };
        if !debug && !slow {
            return;
        }
        let laps: Vec<String> = self
            .laps
            .iter()
            .map(|(n, d)| format!("{n} {:.1} ms", d.as_secs_f64() * 1e3))
            .collect();
        let line = format!(
            "{} took {:.1} ms ({})",
            self.what,
            total.as_secs_f64() * 1e3,
            laps.join(", ")
        );
        if slow {
            crate::say!(
                "allocwatch: warning: the tracing loop's {line}: scrapes meanwhile got the \
                 last rendering (at most one such line a minute)"
            );
        } else {
            crate::say!("allocwatch: debug: {line}");
        }
    }
}

/// A lock whose holder panicked is still usable here: the answers are replaced whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
