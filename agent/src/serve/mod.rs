//! The agent's HTTP side: `GET /metrics` (Prometheus text format), `GET /healthz`, and when
//! enabled `GET /debug/pprof/allocs` and `GET /debug/pprof/heap` (gzipped pprof protobuf),
//! listed by an index page at `GET /debug/pprof/` as Go's `net/http/pprof` has one.
//!
//! Profiles take `pid=N` and/or `pod=NAME` (optionally `namespace=NS`) to pick processes —
//! without them, every traced process of the node — and `seconds=N` for a delta profile:
//! calls and bytes of the next N seconds only (at most [`MAX_PROFILE_SECONDS`]), as Go's
//! `net/http/pprof` does. `allocs` defaults to `alloc_space`, `heap` to `inuse_space`; both
//! carry every sample type (see `report::pprof`).
//!
//! Connections, their limits, TLS and basic auth are `http.rs` (with the web-config file of
//! `web_config.rs`); this file holds the routes.

pub mod http;
pub mod metrics;
pub mod web_config;

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{Query, State},
    http::{StatusCode, Uri, header},
    response::{IntoResponse, Redirect, Response},
    routing::get,
};
use serde::Deserialize;
use tokio::{net::TcpListener, sync::watch};

use self::{
    http::Limits,
    metrics::{Exporter, MetricsConfig, MetricsError},
    web_config::{WebConfigError, WebConfigWatch},
};
use crate::{
    model::{ProcessSnapshot, SelfStats},
    report::pprof::{self, DefaultSample, ProfileOptions},
};

/// Longest delta profile (`seconds=`), so a request cannot hold a connection for hours.
pub const MAX_PROFILE_SECONDS: u64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    // The io error is the source: `{:#}` chains append it once.
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    WebConfig(#[from] WebConfigError),
}

/// What the server needs from the configuration (`Config::serve_config` builds it: the server
/// knows nothing of the config file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    pub metrics: MetricsConfig,
    /// Serve `/debug/pprof/*`.
    pub pprof: bool,
    /// Mean bytes between sampled calls (profiles say their values are estimates); 0: none.
    pub sample_bytes: u64,
    /// Timeouts and the connection cap.
    pub limits: Limits,
    /// exporter-toolkit web config (TLS, basic auth); `None`: plain HTTP, no auth.
    pub web_config: Option<PathBuf>,
}

/// Where the exporter gets its data. Called once per scrape or profile request, from a
/// blocking thread: it may take locks, but should copy and return quickly.
///
/// Keep an exited process listed (with `exited_at`) until its TTL has passed; the exporter
/// drops it then, and also copes with a source that drops it earlier (its series are then kept
/// frozen for the TTL). Once dropped, a pid may come back only as a new process.
pub trait SnapshotSource: Send + Sync + 'static {
    fn snapshot(&self) -> (Vec<ProcessSnapshot>, SelfStats);

    /// [`Self::snapshot`], and whether it is current: false when the source did not answer in
    /// time and this is an earlier answer (a process that started since is not in it).
    fn snapshot_fresh(&self) -> ((Vec<ProcessSnapshot>, SelfStats), bool) {
        (self.snapshot(), true)
    }

    /// `/healthz`: whether the source is working; the error says why not. Must not block.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }

    /// `/metrics` rendered by the source itself (the daemon keeps the exporter next to its
    /// processes, so that a process leaves its identity with its final values at once);
    /// `None`: the server renders [`Self::snapshot`] with an exporter of its own.
    /// `started` is when the scrape began.
    fn metrics(&self, _started: Instant) -> Option<Result<String, MetricsError>> {
        None
    }
}

struct AppState {
    source: Arc<dyn SnapshotSource>,
    exporter: Mutex<Exporter>,
    /// Becomes true at shutdown: cuts delta profiles short.
    stopping: watch::Receiver<bool>,
    sample_bytes: u64,
}

/// Binds `listen` (separate from serving, so a taken port fails at startup).
pub async fn bind(listen: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })
}

/// Binds `listen` and serves until `shutdown` completes.
#[cfg(test)]
pub async fn serve(
    listen: SocketAddr,
    source: Arc<dyn SnapshotSource>,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_on(bind(listen).await?, source, cfg, shutdown).await
}

/// Serves on an already bound listener (tests bind port 0 and read the port back).
#[cfg(test)]
pub async fn serve_on(
    listener: TcpListener,
    source: Arc<dyn SnapshotSource>,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let web = load_web_config(&cfg)?;
    serve_with(listener, source, cfg, web, shutdown).await
}

/// Reads the web config and the files it names (the agent does so before it drops root: a
/// key file may be root's alone).
pub fn load_web_config(cfg: &ServeConfig) -> Result<Option<WebConfigWatch>, ServeError> {
    let Some(path) = &cfg.web_config else {
        return Ok(None);
    };
    let web = WebConfigWatch::load(path)?;
    crate::say!(
        "allocwatch: web config {}: {}",
        path.display(),
        web.current().summary()
    );
    Ok(Some(web))
}

/// [`serve_on`] with the web config already read ([`load_web_config`]).
pub async fn serve_with(
    listener: TcpListener,
    source: Arc<dyn SnapshotSource>,
    cfg: ServeConfig,
    web: Option<WebConfigWatch>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (stop_tx, stopping) = watch::channel(false);
    let state = Arc::new(AppState {
        source,
        exporter: Mutex::new(Exporter::new(cfg.metrics)),
        stopping,
        sample_bytes: cfg.sample_bytes,
    });
    let mut app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler));
    if cfg.pprof {
        app = app.route("/debug/pprof/allocs", get(allocs_handler));
        // The in-use profile needs the live table (modes `full` and `stacks-off`).
        let heap = cfg.metrics.live;
        if heap {
            app = app.route("/debug/pprof/heap", get(heap_handler));
        }
        // The index's links are relative: without the slash they would miss.
        app = app
            .route(
                "/debug/pprof/",
                get(move || async move { pprof_index(heap) }),
            )
            .route(
                "/debug/pprof",
                get(|| async { Redirect::permanent("/debug/pprof/") }),
            );
    }
    let server = http::Server {
        router: app.with_state(state),
        limits: cfg.limits,
        web,
        extra_time: profile_window,
    };
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    http::serve(listener, server, shutdown).await;
    Ok(())
}

/// A delta profile's `seconds=` window: time its request may take beyond the request timeout.
fn profile_window(uri: &Uri) -> Duration {
    if !uri.path().starts_with("/debug/pprof/") {
        return Duration::ZERO;
    }
    let seconds = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("seconds="))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_secs(seconds.min(MAX_PROFILE_SECONDS))
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Answers from the source's own health check, never from a snapshot: a liveness probe must
/// not wait behind a scrape.
async fn healthz_handler(State(state): State<Arc<AppState>>) -> Response {
    match state.source.health() {
        Ok(()) => text(StatusCode::OK, "ok\n".to_string()),
        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn metrics_handler(State(state): State<Arc<AppState>>) -> Response {
    let started = Instant::now();
    // Snapshotting may take the daemon's locks and rendering is proportional to the series:
    // neither belongs on the async workers.
    let rendered = tokio::task::spawn_blocking(move || {
        if let Some(body) = state.source.metrics(started) {
            return body;
        }
        let (procs, stats) = state.source.snapshot();
        // A panic while holding the lock cannot leave the exporter half-updated in a way that
        // breaks the format, so a poisoned lock is still usable.
        let mut exporter = state
            .exporter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        exporter.render(&procs, &stats, Instant::now(), started)
    })
    .await;
    match rendered {
        Ok(Ok(body)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
            body,
        )
            .into_response(),
        // Transient, as Prometheus and load balancers understand it: not a server error.
        Ok(Err(e @ MetricsError::NotReady)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::RETRY_AFTER, "1"),
            ],
            format!("{e}\n"),
        )
            .into_response(),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering metrics failed: {e}\n"),
        ),
    }
}

/// `/debug/pprof/`: the profiles this agent serves, with what they hold and how to query them
/// (Go's index lists its profiles the same way).
fn pprof_index(heap: bool) -> Response {
    let mut rows = vec![(
        "allocs",
        "Every allocation since each process was first traced, by call site: malloc-family \
         calls and bytes (alloc_objects, alloc_space), Go map and slice growth, and Go heap \
         allocations of 32 KiB or more (go_large_allocs, go_large_alloc_space)",
    )];
    if heap {
        rows.push((
            "heap",
            "The same, shown as what is still allocated (inuse_objects, inuse_space: outstanding \
             malloc-family allocations by call site)",
        ));
    }
    let mut body = String::from(
        "<html>\n<head><title>/debug/pprof/</title></head>\n<body>\n/debug/pprof/<br>\n<br>\n\
         Types of profiles available:\n<table>\n<thead><td>Profile</td><td>Description</td></thead>\n",
    );
    for (name, what) in rows {
        body.push_str(&format!(
            "<tr><td><a href=\"{name}\">{name}</a></td><td>{what}</td></tr>\n"
        ));
    }
    body.push_str(&format!(
        "</table>\n<p>Every traced process of the node by default; <code>pid=N</code>, \
         <code>pod=NAME</code> and <code>namespace=NS</code> pick processes, \
         <code>seconds=N</code> (at most {MAX_PROFILE_SECONDS}) profiles the next N seconds \
         only.</p>\n<p>Read one with <code>go tool pprof http://HOST:PORT/debug/pprof/allocs\
         </code>.</p>\n</body>\n</html>\n"
    ));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Query of the profile endpoints.
#[derive(Debug, Default, Deserialize)]
struct ProfileQuery {
    pid: Option<u32>,
    pod: Option<String>,
    namespace: Option<String>,
    seconds: Option<u64>,
}

impl ProfileQuery {
    fn matches(&self, p: &ProcessSnapshot) -> bool {
        self.pid.is_none_or(|pid| p.pid == pid)
            && self.pod.as_deref().is_none_or(|pod| p.labels.pod == pod)
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| p.labels.namespace == ns)
    }
}

async fn allocs_handler(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ProfileQuery>,
) -> Response {
    profile(state, q, DefaultSample::AllocSpace).await
}

async fn heap_handler(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ProfileQuery>,
) -> Response {
    profile(state, q, DefaultSample::InuseSpace).await
}

/// The matching processes of a snapshot, and whether it is current.
async fn snapshot(
    state: &Arc<AppState>,
    q: &Arc<ProfileQuery>,
) -> Option<(Vec<ProcessSnapshot>, bool)> {
    let (state, q) = (Arc::clone(state), Arc::clone(q));
    tokio::task::spawn_blocking(move || {
        let ((procs, _), fresh) = state.source.snapshot_fresh();
        (procs.into_iter().filter(|p| q.matches(p)).collect(), fresh)
    })
    .await
    .ok()
}

/// No process matches: a 404 only when the answer is current. From an earlier answer (the
/// tracer is behind: a busy node) the process may be one it has seen since, so the client is
/// told to retry rather than that the process is unknown.
fn no_match(fresh: bool) -> Response {
    if fresh {
        return text(
            StatusCode::NOT_FOUND,
            "no traced process matches the query\n".to_string(),
        );
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::RETRY_AFTER, "1"),
        ],
        "the tracer is behind and its last answer has no process matching the query; retry\n",
    )
        .into_response()
}

async fn profile(state: Arc<AppState>, q: ProfileQuery, default_sample: DefaultSample) -> Response {
    let seconds = q.seconds.unwrap_or(0);
    if seconds > MAX_PROFILE_SECONDS {
        return text(
            StatusCode::BAD_REQUEST,
            format!("seconds={seconds} is more than {MAX_PROFILE_SECONDS}\n"),
        );
    }
    let q = Arc::new(q);
    let Some((mut procs, fresh)) = snapshot(&state, &q).await else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "taking a snapshot failed\n".to_string(),
        );
    };
    if procs.is_empty() {
        return no_match(fresh);
    }
    let mut opts = ProfileOptions::new(default_sample);
    opts.sample_bytes = state.sample_bytes;
    if seconds > 0 {
        let mut stopping = state.stopping.clone();
        let window = Duration::from_secs(seconds);
        tokio::select! {
            () = tokio::time::sleep(window) => {}
            _ = stopping.wait_for(|s| *s) => {
                return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".to_string());
            }
        }
        let Some((after, after_fresh)) = snapshot(&state, &q).await else {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "taking a snapshot failed\n".to_string(),
            );
        };
        procs = pprof::delta(&after, &procs);
        opts.duration = Some(window);
        // Every matching process may have exited (and been forgotten) during the window.
        if procs.is_empty() {
            return no_match(after_fresh);
        }
    }
    match tokio::task::spawn_blocking(move || pprof::encode(&procs, &opts)).await {
        Ok(Ok(body)) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"profile.pb.gz\"",
                ),
            ],
            body,
        )
            .into_response(),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the profile failed: {e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests;
