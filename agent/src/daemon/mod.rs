//! `allocwatch agent`: trace every (selected) process of the node and export what the CLI
//! shows as Prometheus metrics and pprof profiles, with bounded cost and cardinality.
//!
//! Two sides that never wait on each other for long:
//! - the *tracer* (`core.rs`), on a thread of its own, owns the probes: it drains the ring
//!   buffer, rescans /proc, sweeps the rows of gone processes out of the kernel maps, and
//!   answers snapshot requests — every step of it bounded;
//! - this thread serves HTTP and handles signals. A scrape asks the tracer for a fresh
//!   snapshot and, if none comes in time, serves the last one (counted); `/healthz` answers
//!   from the tracer's heartbeat without asking it anything; SIGTERM and SIGINT stop the
//!   tracer and, should it not stop in time, end the process (the kernel detaches the probes
//!   of a process that exits: nothing is left behind).

mod core;
pub(crate) mod exec_snapshots;
mod pressure;
mod registry;
mod retained;
mod select;
mod snapshot;
mod sweep;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc as std_mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot, watch},
};

use self::select::Selector;
use crate::{
    config::Config,
    k8s,
    model::{ProcessSnapshot, SelfStats},
    preflight, privilege,
    serve::{self, SnapshotSource, metrics::MetricsError},
};

/// How long a scrape waits for a fresh snapshot before it serves the last one.
const SNAPSHOT_WAIT: Duration = Duration::from_millis(800);
/// `/healthz` fails once the tracer has not completed a loop iteration for this long.
const STALL_LIMIT: Duration = Duration::from_secs(30);
/// After SIGTERM/SIGINT, how long the links' detach, the tracer's and the server's stop get
/// before the process just exits. The issue allows a second from the signal to the exit, and
/// the exit itself (every thread scheduled once more, every descriptor closed) took 260 ms
/// with both CPUs busy and a compile running.
const STOP_GRACE: Duration = Duration::from_millis(600);

type Snapshot = (Vec<ProcessSnapshot>, SelfStats);

/// What the server asks the tracer for.
pub enum Request {
    /// Every traced process, for a profile.
    Snapshot(std_mpsc::SyncSender<Snapshot>),
    /// `/metrics`, rendered by the tracer's exporter; the scrape began at the `Instant`.
    Metrics(Instant, std_mpsc::SyncSender<Result<String, MetricsError>>),
}

/// What the tracer last answered, served when it does not answer in time.
#[derive(Default)]
pub struct LastAnswers {
    pub snapshot: Mutex<Option<Snapshot>>,
    pub metrics: Mutex<Option<String>>,
    /// Requests answered from here (rendered into the next exposition).
    pub stale: AtomicU64,
}

/// When the tracer last went round its loop (ms since `start`).
pub struct Heartbeat {
    start: Instant,
    last_ms: AtomicU64,
}

impl Heartbeat {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub fn beat(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silence(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// The server's view of the tracer: a request over a channel, answered by the tracer's loop,
/// or what it last answered when it does not answer in time.
struct ChannelSource {
    tx: mpsc::Sender<Request>,
    last: Arc<LastAnswers>,
    heartbeat: Arc<Heartbeat>,
}

impl ChannelSource {
    /// Sends `req` and waits for its answer, up to [`SNAPSHOT_WAIT`].
    fn ask<T: Send>(&self, req: Request, rx: std_mpsc::Receiver<T>) -> Option<T> {
        // A full queue means the tracer is behind already: do not add to it.
        self.tx.try_send(req).ok()?;
        rx.recv_timeout(SNAPSHOT_WAIT).ok()
    }

    fn stale<T: Clone>(&self, last: &Mutex<Option<T>>) -> Option<T> {
        self.last.stale.fetch_add(1, Ordering::Relaxed);
        last.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl SnapshotSource for ChannelSource {
    fn snapshot(&self) -> Snapshot {
        self.snapshot_fresh().0
    }

    fn snapshot_fresh(&self) -> (Snapshot, bool) {
        let (reply, rx) = std_mpsc::sync_channel(1);
        match self.ask(Request::Snapshot(reply), rx) {
            Some(s) => (s, true),
            None => (self.stale(&self.last.snapshot).unwrap_or_default(), false),
        }
    }

    fn metrics(&self, started: Instant) -> Option<Result<String, MetricsError>> {
        let (reply, rx) = std_mpsc::sync_channel(1);
        let answer = self
            .ask(Request::Metrics(started, reply), rx)
            .or_else(|| self.stale(&self.last.metrics).map(Ok))
            .unwrap_or(Err(MetricsError::NotReady));
        Some(answer)
    }

    fn health(&self) -> Result<(), String> {
        let silence = self.heartbeat.silence();
        if silence > STALL_LIMIT {
            Err(format!(
                "the tracing loop has not run for {:.0} s",
                silence.as_secs_f64()
            ))
        } else {
            Ok(())
        }
    }
}

/// Runs the agent (the caller has run the preflight checks).
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let selector = Selector::new(&cfg.select)?;
    // Whether privileges can be dropped after startup is checked before anything is loaded.
    // Without uprobe multi-links (before 6.6, or ALLOCWATCH_NO_UPROBE_MULTI) every later
    // attachment is a perf event of the uprobe PMU, which the kernel refused to the dropped
    // agent: EACCES on Debian's 6.1, whose perf_event_paranoid level 3 wants CAP_SYS_ADMIN,
    // and on 6.18 with per-site links, where the kept set (by kernel version) has no
    // CAP_PERFMON. Programs started after the agent would go untraced: it keeps its
    // privileges there.
    let multi_links = preflight::features().uprobe_multi;
    let privileges = (!cfg.keep_privileges && multi_links)
        .then(privilege::Plan::check)
        .transpose()?;
    // Bind before loading anything: a taken port is a startup error, not a later one.
    let listener = serve::bind(cfg.listen).await?;
    // After every refusal: a refusal stays one line (before 6.6 the multi-link warning came
    // first, and a missing capability was two lines).
    for w in preflight::agent_warnings() {
        crate::say!("allocwatch: warning: {w}");
    }
    if !cfg.keep_privileges && !multi_links {
        crate::say!(
            "allocwatch: warning: the agent keeps the privileges it starts with: without uprobe \
             multi-links, the kernel refuses the probes of programs started later to a process \
             that has dropped them"
        );
    }

    let (tx, requests) = mpsc::channel::<Request>(8);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = oneshot::channel::<anyhow::Result<core::Ready>>();
    let (done_tx, done_rx) = oneshot::channel::<anyhow::Result<()>>();
    let (pod_tx, pod_updates) = mpsc::channel(256);
    let heartbeat = Arc::new(Heartbeat::new());
    let last = Arc::new(LastAnswers::default());

    let tracer = core::Tracer {
        cfg: cfg.clone(),
        selector,
        requests,
        pod_updates,
        stop: stop_rx,
        heartbeat: Arc::clone(&heartbeat),
        last: Arc::clone(&last),
    };
    std::thread::Builder::new()
        .name("tracer".into())
        .spawn(move || {
            let result = tracer.run(ready_tx);
            let _ = done_tx.send(result);
        })
        .context("starting the tracer thread")?;
    let mut done_rx = std::pin::pin!(done_rx);
    // Loading and attaching happen on the tracer thread; their errors end the agent here.
    let banner = tokio::select! {
        ready = ready_rx => ready,
        // The tracer failed before it was ready: its error is the one to report.
        done = &mut done_rx => {
            return match done {
                Ok(Err(e)) => Err(e),
                _ => Err(anyhow::anyhow!("the tracer thread stopped while starting")),
            };
        }
    };
    let core::Ready { banner, links } = match banner {
        Ok(Ok(ready)) => ready,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return match done_rx.await {
                Ok(Err(e)) => Err(e),
                _ => Err(anyhow::anyhow!("the tracer thread stopped while starting")),
            };
        }
    };

    // Read while still root: a TLS key may be readable by root alone.
    let serve_cfg = cfg.serve_config();
    let web = serve::load_web_config(&serve_cfg)?;
    // Probes loaded and attached: from here on the agent runs as an unprivileged user.
    if let Some(plan) = privileges {
        let dropped = plan.apply().context("dropping privileges after startup")?;
        crate::say!("allocwatch: {dropped}");
    }

    if cfg.kubernetes.enabled && k8s::watch::in_cluster() {
        let node = std::env::var("NODE_NAME").ok();
        tokio::spawn(k8s::watch::watch_pods(node, pod_tx));
    } else {
        drop(pod_tx);
    }
    let (server_stop, server_stopped) = oneshot::channel::<()>();
    let source = Arc::new(ChannelSource {
        tx,
        last,
        heartbeat,
    });
    let server = tokio::spawn(serve::serve_with(listener, source, serve_cfg, web, async {
        let _ = server_stopped.await;
    }));
    let mut server = std::pin::pin!(server);
    // Handlers first: whoever reads the line below may signal at once.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    crate::say!(
        "allocwatch: agent serving on http://{}/metrics: {banner}",
        cfg.listen
    );
    let mut tracer_done = false;
    let result: anyhow::Result<()> = tokio::select! {
        _ = sigint.recv() => Ok(()),
        _ = sigterm.recv() => Ok(()),
        done = &mut done_rx => {
            tracer_done = true;
            match done {
                Ok(r) => r.and(Err(anyhow::anyhow!("the tracer stopped"))),
                Err(_) => Err(anyhow::anyhow!("the tracer thread stopped")),
            }
        }
        r = &mut server => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(anyhow::anyhow!("HTTP server task: {e}")),
        },
    };
    let stopping = Instant::now();
    let debug = std::env::var_os("ALLOCWATCH_DEBUG_TIMING").is_some();
    let _ = stop_tx.send(true);
    let _ = server_stop.send(());
    // Detached here, at once: the tracer stops only between its steps, and a step (a scan
    // of a busy node) can outlast the second the probes are given.
    let detach = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        (links.detach_all(), t.elapsed())
    });
    // One deadline for the detach, the tracer and the server; a stuck tracer is not waited
    // for: exiting closes its descriptors (the programs and maps; their links are gone).
    let deadline = tokio::time::Instant::from_std(stopping + STOP_GRACE);
    let stopped = tokio::time::timeout_at(deadline, async {
        if let Ok((n, took)) = detach.await
            && debug
        {
            crate::say!("allocwatch: debug: detaching {n} links took {took:?}");
        }
        if !tracer_done {
            let _ = (&mut done_rx).await;
        }
        if debug {
            crate::say!(
                "allocwatch: debug: tracer stopped after {:?}",
                stopping.elapsed()
            );
        }
        if !server.is_finished() {
            let _ = (&mut server).await;
        }
    })
    .await;
    if stopped.is_err() {
        crate::say!(
            "allocwatch: warning: stopping took over {} ms; exiting (the kernel detaches what \
             is left)",
            STOP_GRACE.as_millis()
        );
        let code = i32::from(result.is_err());
        if let Err(e) = &result {
            crate::say!("allocwatch: error: agent: {e:#}");
        }
        std::process::exit(code);
    }
    if debug {
        crate::say!(
            "allocwatch: debug: server stopped after {:?}",
            stopping.elapsed()
        );
    }
    result.context("agent")
}
