//! `allocwatch agent`: trace every (selected) process of the node and export what the CLI
//! shows as Prometheus metrics and pprof profiles, with bounded cost and cardinality.
//!
//! One loop owns the probes: it drains the ring buffer, rescans /proc, and answers snapshot
//! requests from the HTTP server over a channel (so the server never touches kernel maps).

mod exec_snapshots;
mod registry;
mod select;
mod snapshot;

use std::{sync::Arc, time::Duration};

use allocwatch_common::Event;
use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

use self::{registry::Registry, select::Selector, snapshot::LoopStats};
use crate::{
    cli::CapacityArgs,
    collect,
    config::Config,
    frames::FrameCache,
    k8s, preflight,
    probes::{Filter, ProbeConfig, Probes},
    serve::{
        self, ServeConfig,
        model::{ProcessSnapshot, SelfStats, SnapshotSource},
    },
    symbolize::SymbolizerHandle,
    target::go::GoProbeSet,
};

/// New processes are found within this (the issue asks for one second).
const SCAN_INTERVAL: Duration = Duration::from_millis(500);

type Reply = oneshot::Sender<(Vec<ProcessSnapshot>, SelfStats)>;

/// The server's view of the daemon: a request over a channel, answered by the loop.
struct ChannelSource {
    tx: mpsc::Sender<Reply>,
}

impl SnapshotSource for ChannelSource {
    fn snapshot(&self) -> (Vec<ProcessSnapshot>, SelfStats) {
        let (reply, rx) = oneshot::channel();
        if self.tx.blocking_send(reply).is_err() {
            return Default::default();
        }
        rx.blocking_recv().unwrap_or_default()
    }
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    preflight::check()?;
    let selector = Selector::new(&cfg.select)?;
    // Always a denylist, also when some include rule narrows the selection: the kernel records
    // a new process from its first call, before the agent can have classified it (a selected
    // program may live less than a millisecond); rejected processes are denied once classified
    // and their rows deleted (`registry`).
    let filter = Filter::Deny;
    let capacity = CapacityArgs {
        max_live: cfg.capacity.max_live,
        max_sites: cfg.capacity.max_sites,
        max_stacks: cfg.capacity.max_stacks,
        max_pending: cfg.capacity.max_pending,
    };
    let mut probes = Probes::load_mode(
        &ProbeConfig {
            tgid: None,
            filter,
            stacks: cfg.mode.stacks(),
            capacity,
        },
        cfg.mode,
    )?;
    // Our own allocations must not be traced (each event we handle would allocate more).
    probes.set_listed(std::process::id(), true)?;
    let ring = collect::take_events(&mut probes.ebpf)?;
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from)?;
    let symbolizer = SymbolizerHandle::spawn();
    let mut frames = FrameCache::default();
    let go_probes = GoProbeSet {
        growth: cfg.go.growth,
        malloc: cfg.go.malloc,
        gc: cfg.go.gc,
    };
    let mut registry = Registry::new(selector, go_probes, cfg.ttl);

    let (tx, mut requests) = mpsc::channel::<Reply>(8);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    // Bind before announcing anything: a taken port is a startup error, not a later one.
    let listener = serve::bind(cfg.listen).await?;
    let server = tokio::spawn(serve::serve_on(
        listener,
        Arc::new(ChannelSource { tx }),
        ServeConfig::from_config(&cfg),
        async {
            let _ = stop_rx.await;
        },
    ));
    let mut server = std::pin::pin!(server);

    // Maps of new programs are read on a thread of their own, the moment they exec.
    let _exec_snapshots = collect::take_exec_notify(&mut probes.ebpf)
        .map_err(anyhow::Error::from)
        .and_then(|ring| Ok(exec_snapshots::spawn(ring, symbolizer.clone())?))
        .inspect_err(|e| log::warn!("exec snapshots: {e}"))
        .ok();
    // exec events: identities change at exec, and short-lived programs get their path.
    if let Err(e) = probes.attach_exec() {
        eprintln!(
            "allocwatch: warning: {e}: processes are renamed after exec only by the /proc scan"
        );
        *registry
            .attach_failures
            .entry("exec_tracepoint".to_string())
            .or_default() += 1;
    }
    let (pod_tx, mut pod_updates) = mpsc::channel(256);
    if cfg.kubernetes.enabled && k8s::watch::in_cluster() {
        let node = std::env::var("NODE_NAME").ok();
        tokio::spawn(k8s::watch::watch_pods(node, pod_tx));
    } else {
        drop(pod_tx);
    }
    registry.scan(&mut probes, &symbolizer, &mut frames);
    eprintln!(
        "allocwatch: agent serving on http://{}/metrics: {} processes, {} probes",
        cfg.listen,
        registry.procs.len(),
        registry.probes_attached
    );
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut scan = tokio::time::interval(SCAN_INTERVAL);
    let mut stats = LoopStats::default();
    let mut events = Vec::new();
    let result: anyhow::Result<()> = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                stats.malformed_records += collect::drain(guard.get_inner_mut(), &mut events);
                guard.clear_ready();
                stats.events_processed += events.len() as u64;
                handle(&mut events, &mut registry, &mut probes, &symbolizer, &mut frames)?;
            }
            _ = scan.tick() => {
                // The probe batches wakeups for frequent records (Go events): the last records
                // of a burst wait for the next wakeup, so read them here at the latest.
                stats.malformed_records += collect::drain(ring.get_mut(), &mut events);
                stats.events_processed += events.len() as u64;
                handle(&mut events, &mut registry, &mut probes, &symbolizer, &mut frames)?;
                registry.scan(&mut probes, &symbolizer, &mut frames)
            }
            Some(update) = pod_updates.recv() => registry.apply_pod(update),
            Some(reply) = requests.recv() => {
                // Everything recorded so far is in the scrape, woken or not.
                stats.malformed_records += collect::drain(ring.get_mut(), &mut events);
                stats.events_processed += events.len() as u64;
                handle(&mut events, &mut registry, &mut probes, &symbolizer, &mut frames)?;
                let (snap, unexported) = snapshot::build(
                    &probes, &registry, &mut frames, &symbolizer, stats, capacity.max_sites, cfg.top_k,
                ).await?;
                let _ = reply.send(snap);
                // Rows whose announcement was lost (full ring buffer) or recorded while their
                // process was being denied: deleted at the next scan once it is rejected or gone.
                registry.unexported(unexported);
            }
            r = &mut server => {
                break match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.into()),
                    Err(e) => Err(anyhow::anyhow!("HTTP server task: {e}")),
                };
            }
            _ = sigint.recv() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };
    let _ = stop_tx.send(());
    // Detach before waiting on the server.
    drop(probes);
    if !server.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut server).await;
    }
    result.context("agent")
}

/// Events only register processes (so short-lived ones are named while they exist) and feed
/// the Go state; symbolization waits for a scrape, and only for the sites it exports.
fn handle(
    events: &mut Vec<Event>,
    registry: &mut Registry,
    probes: &mut Probes,
    symbolizer: &SymbolizerHandle,
    frames: &mut FrameCache,
) -> anyhow::Result<()> {
    for ev in events.drain(..) {
        match ev {
            Event::Exec(tgid, comm, path) => {
                registry.exec_seen(tgid, &comm, path, probes, symbolizer)
            }
            Event::NewSite(site, comm, stack) => {
                frames.remember_event_stack(probes, site.stack_id, stack)?;
                registry.note_site(&site, &comm);
                registry.ensure_seen(site.tgid, &comm, probes, symbolizer)
            }
            Event::Go(g) => {
                // Copy the stack out before the kernel's LRU table can evict it.
                frames.remember_stack(probes, g.stack_id)?;
                let tgid = g.header.tgid;
                if !registry.procs.contains_key(&tgid) {
                    registry.ensure_rows(tgid, probes, symbolizer);
                }
                if let Some(go) = registry.procs.get_mut(&tgid).and_then(|p| p.go.as_mut()) {
                    go.record(&g);
                }
            }
        }
    }
    Ok(())
}
