//! The agent's HTTP connections: accept loop, TLS, per-connection time limits, the connection
//! cap, and the checks every request passes before it reaches a route (size, method, body,
//! basic auth). `axum::serve` has no limits at all, so connections are served with hyper
//! directly; the routes stay an axum `Router` (`serve/mod.rs`).
//!
//! What a client gets (defaults in `Limits::default`, the reasons in deploy/README.md):
//! - A request head (after the TLS handshake, on a fresh connection) must arrive within
//!   `header_timeout` of the connection's start, or of its first byte after a keep-alive pause;
//!   otherwise the connection is closed without an answer (slow-loris and half-sent requests).
//! - A keep-alive connection idle for `idle_timeout` is closed. Writing a response counts as
//!   idle: a client that stops reading its response is closed then too.
//! - A request is answered within `request_timeout` (plus the window of a delta profile), or
//!   gets 503.
//! - At most `max_connections` at once. When full, the connection that has waited longest for a
//!   request head or sat idle longest is closed to make room: a real client's head arrives
//!   within milliseconds, so a flood of slow or silent connections cannot keep a scrape out.
//!   Only when every connection is busy with a request is the new one closed at once.
//! - Heads of at most [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`] headers (else 431), URIs of at
//!   most [`MAX_URI_BYTES`] (else 414), only GET and HEAD (else 405 with `Allow`), no body
//!   (else 413); malformed requests get hyper's 400. Then basic auth (401) when configured.

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header},
};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
    task::JoinSet,
    time::Instant,
};
use tower_service::Service as _;

use super::web_config::{WebConfig, WebConfigWatch};

/// Largest request head (request line and headers) in bytes: 431 above.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers in a request: 431 above.
pub const MAX_HEADERS: usize = 64;
/// Longest request target in bytes: 414 above (a longer one that also makes the head exceed
/// [`MAX_HEAD_BYTES`] gets 431).
pub const MAX_URI_BYTES: usize = 4096;
/// How long connections may finish their request at shutdown before they are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// At most one warning per kind in this period.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Connection limits (config file section `[http]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // A scraper sends its head at once; Prometheus' default scrape timeout is 10 s.
            header_timeout: Duration::from_secs(10),
            // Go's HTTP clients (Prometheus) keep idle connections 90 s: scrapes every 15–60 s
            // reuse theirs.
            idle_timeout: Duration::from_secs(90),
            // /metrics takes milliseconds; this bounds a stuck snapshot, not a slow network.
            request_timeout: Duration::from_secs(30),
            // Scrapers (an HA pair), probes and a person with pprof need a handful.
            max_connections: 64,
        }
    }
}

/// What serves the requests of every connection.
pub struct Server {
    pub router: Router,
    pub limits: Limits,
    /// `None`: plain HTTP without authentication.
    pub web: Option<WebConfigWatch>,
    /// Time a request may take beyond `request_timeout` (a delta profile's window).
    pub extra_time: fn(&Uri) -> Duration,
}

// A connection's phase and its start, packed in one atomic: start in ms since the server's
// epoch << 2 | phase.
const HEAD: u64 = 0;
const BUSY: u64 = 1;
const IDLE: u64 = 2;
const CLOSE: u64 = 3;

/// A connection's phase, shared by its reads (first byte after idle), its requests and its
/// watchdog.
struct Clock {
    state: AtomicU64,
    wake: Notify,
}

impl Clock {
    fn new(epoch: Instant) -> Clock {
        Clock {
            state: AtomicU64::new(pack(epoch, HEAD)),
            wake: Notify::new(),
        }
    }

    fn get(&self) -> (u64, u64) {
        let s = self.state.load(Ordering::Acquire);
        (s & 3, s >> 2)
    }

    /// Moves to `phase` from now on; a connection marked [`CLOSE`] stays so.
    fn enter(&self, epoch: Instant, phase: u64) {
        let next = pack(epoch, phase);
        let _ = self
            .state
            .try_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s & 3 != CLOSE).then_some(next)
            });
        self.wake.notify_one();
    }

    /// Bytes arrived: a request head has started if the connection was idle.
    fn bytes_read(&self, epoch: Instant) {
        let cur = self.state.load(Ordering::Acquire);
        if cur & 3 == IDLE
            && self
                .state
                .compare_exchange(cur, pack(epoch, HEAD), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.wake.notify_one();
        }
    }
}

fn pack(epoch: Instant, phase: u64) -> u64 {
    (epoch.elapsed().as_millis() as u64) << 2 | phase
}

/// Ends when the connection has overstayed its phase, or was closed to make room.
async fn watchdog(clock: &Clock, limits: &Limits, epoch: Instant) {
    loop {
        let notified = clock.wake.notified();
        let (phase, since) = clock.get();
        let limit = match phase {
            HEAD => limits.header_timeout,
            IDLE => limits.idle_timeout,
            // The request's own timeout bounds it.
            BUSY => {
                notified.await;
                continue;
            }
            _ => return,
        };
        let deadline = epoch + Duration::from_millis(since) + limit;
        if Instant::now() >= deadline {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {}
            () = notified => {}
        }
    }
}

/// The stream of a connection (TCP, or TLS over it), telling its clock when bytes arrive.
struct Watched<S> {
    io: S,
    clock: Arc<Clock>,
    epoch: Instant,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.clock.bytes_read(this.epoch);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The open connections, for the cap.
struct Conns {
    next_id: u64,
    clocks: HashMap<u64, Arc<Clock>>,
}

impl Conns {
    /// Makes room for a new connection if the cap is reached: closes the one waiting longest
    /// (for a head, or idle). False if every connection is busy with a request.
    fn make_room(&mut self, max: usize, epoch: Instant, warnings: &Warnings) -> bool {
        let open = self.clocks.values().filter(|c| c.get().0 != CLOSE).count();
        if open < max {
            return true;
        }
        let victim = self
            .clocks
            .values()
            .map(|c| (c, c.get()))
            .filter(|(_, (phase, _))| *phase == HEAD || *phase == IDLE)
            .min_by_key(|(_, (_, since))| *since);
        match victim {
            Some((c, _)) => {
                c.enter(epoch, CLOSE);
                warnings.warn("evicted", |n| {
                    format!(
                        "HTTP: {n} waiting or idle connection(s) closed to make room: \
                         {max} connections open (http.max_connections)"
                    )
                });
                true
            }
            None => false,
        }
    }
}

/// Removes a connection from [`Conns`] when its task ends, however it ends.
struct Registered {
    conns: Arc<Mutex<Conns>>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clocks
            .remove(&self.id);
    }
}

/// Rate-limited warnings (one per kind per [`WARN_EVERY`], with the count since the last one).
#[derive(Default)]
struct Warnings {
    /// Per kind: when it was last printed, and how often it happened since.
    last: Mutex<HashMap<&'static str, (Option<Instant>, u64)>>,
}

impl Warnings {
    fn warn(&self, kind: &'static str, what: impl FnOnce(u64) -> String) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let entry = last.entry(kind).or_insert((None, 0));
        entry.1 += 1;
        if entry.0.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
            crate::say!("allocwatch: warning: {}", what(entry.1));
            *entry = (Some(now), 0);
        }
    }
}

/// Serves `listener` until `shutdown` completes; then in-flight requests get
/// [`SHUTDOWN_GRACE`] to finish.
pub async fn serve(
    listener: TcpListener,
    server: Server,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let server = Arc::new(server);
    let epoch = Instant::now();
    let conns = Arc::new(Mutex::new(Conns {
        next_id: 0,
        clocks: HashMap::new(),
    }));
    let warnings = Arc::new(Warnings::default());
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        if !is_connection_error(&e) {
                            // Out of file descriptors or memory: let some connections end.
                            warnings.warn("accept", |n| {
                                format!("HTTP: accepting a connection failed {n} time(s): {e}")
                            });
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        continue;
                    }
                };
                let max = server.limits.max_connections;
                let (id, clock) = {
                    let mut c = conns.lock().unwrap_or_else(PoisonError::into_inner);
                    if !c.make_room(max, epoch, &warnings) {
                        warnings.warn("full", |n| format!(
                            "HTTP: {n} connection(s) refused: all {max} connections (http.\
                             max_connections) are busy with requests"
                        ));
                        continue;
                    }
                    let clock = Arc::new(Clock::new(epoch));
                    c.next_id += 1;
                    let id = c.next_id;
                    c.clocks.insert(id, Arc::clone(&clock));
                    (id, clock)
                };
                let registered = Registered { conns: Arc::clone(&conns), id };
                let web = server.web.as_ref().map(WebConfigWatch::current);
                let server = Arc::clone(&server);
                let stop = stop.clone();
                tasks.spawn(async move {
                    let _registered = registered;
                    connection(server, stream, clock, epoch, web, stop).await;
                });
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drain = async { while tasks.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, drain).await;
    tasks.shutdown().await;
}

/// Errors of one connection that say nothing about the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn connection(
    server: Arc<Server>,
    stream: TcpStream,
    clock: Arc<Clock>,
    epoch: Instant,
    web: Option<Arc<WebConfig>>,
    stop: watch::Receiver<bool>,
) {
    // Responses are written whole; no reason to wait for ACKs of earlier segments.
    let _ = stream.set_nodelay(true);
    let limits = server.limits;
    let work = async {
        match web.as_ref().and_then(|w| w.tls.clone()) {
            Some(tls) => {
                // A failed handshake (plain HTTP, no or an untrusted client certificate) ends
                // the connection; rustls has already sent the client an alert.
                if let Ok(tls) = tokio_rustls::TlsAcceptor::from(tls).accept(stream).await {
                    http(server, tls, &clock, epoch, web, stop).await;
                }
            }
            None => http(server, stream, &clock, epoch, web, stop).await,
        }
    };
    // Dropping the connection closes it, mid-head or idle.
    tokio::select! {
        () = work => {}
        () = watchdog(&clock, &limits, epoch) => {}
    }
}

async fn http<S>(
    server: Arc<Server>,
    io: S,
    clock: &Arc<Clock>,
    epoch: Instant,
    web: Option<Arc<WebConfig>>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = Watched {
        io,
        clock: Arc::clone(clock),
        epoch,
    };
    let service = {
        let clock = Arc::clone(clock);
        service_fn(move |req: Request<Incoming>| {
            let (server, clock, web) = (Arc::clone(&server), Arc::clone(&clock), web.clone());
            async move {
                clock.enter(epoch, BUSY);
                let response = respond(&server, web.as_deref(), req).await;
                clock.enter(epoch, IDLE);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let conn = http1::Builder::new()
        .keep_alive(true)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEAD_BYTES)
        // The watchdog times heads (hyper's timer would also cut idle keep-alive connections).
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.wait_for(|s| *s) => {}
    }
    // Finish the request in flight, then close.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// A plain-text response.
fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Body::from(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn closing(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn respond(
    server: &Server,
    web: Option<&WebConfig>,
    req: Request<Incoming>,
) -> Response<Body> {
    let mut response = checked(server, web, req).await;
    if let Some(web) = web {
        for (name, value) in &web.headers {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

async fn checked(
    server: &Server,
    web: Option<&WebConfig>,
    req: Request<Incoming>,
) -> Response<Body> {
    // No route takes a body and none is ever read: a request with one is answered, then its
    // connection closed (rather than reading and discarding what the client sends).
    let has_body = !hyper::body::Body::is_end_stream(req.body());
    let refuse = |r: Response<Body>| if has_body { closing(r) } else { r };
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len())
        + req.uri().authority().map_or(0, |a| a.as_str().len());
    if uri_len > MAX_URI_BYTES {
        return refuse(text(
            StatusCode::URI_TOO_LONG,
            format!("request target longer than {MAX_URI_BYTES} bytes\n"),
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {} not allowed: GET or HEAD\n", req.method()),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return refuse(r);
    }
    if has_body {
        return refuse(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "GET and HEAD requests take no body\n",
        ));
    }
    let limit = server.limits.request_timeout + (server.extra_time)(req.uri());
    let answer = async {
        if let Some(web) = web
            && !web
                .authorized(req.headers().get(header::AUTHORIZATION))
                .await
        {
            let mut r = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"allocwatch\""),
            );
            return r;
        }
        match server.router.clone().call(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    };
    match tokio::time::timeout(limit, answer).await {
        Ok(r) => r,
        Err(_) => closing(text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no answer within {limit:?} (http.request_timeout)\n"),
        )),
    }
}

#[cfg(test)]
mod tests;
