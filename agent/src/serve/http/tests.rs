//! Tests of `serve::http` with raw sockets against a real server on 127.0.0.1:0: slow and
//! half-sent requests, idle keep-alive, the connection cap, the request time limit, methods and
//! sizes, TLS (a test CA made with rcgen), client certificates and basic auth. Limits are short
//! (hundreds of ms) so that each test takes a few seconds; margins are generous so that they
//! hold on a loaded 2-CPU machine.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

use super::Limits;
use crate::model::{ProcessSnapshot, SelfStats};
use crate::serve::{
    ServeConfig, ServeError, SnapshotSource, serve_on,
    tests::{Reply, config, parse_reply, process},
    web_config::tests::{Pki, Scratch},
};

/// How late a closed connection may be noticed beyond its limit (a loaded machine).
const MARGIN: Duration = Duration::from_millis(1500);

/// Two processes; snapshots take `delay` (a daemon busy elsewhere).
struct Source {
    delay: Mutex<Duration>,
}

impl SnapshotSource for Source {
    fn snapshot(&self) -> (Vec<ProcessSnapshot>, SelfStats) {
        let delay = *self.delay.lock().unwrap();
        std::thread::sleep(delay);
        (
            vec![process(10, "web-1", 4096), process(11, "web-2", 100)],
            SelfStats::default(),
        )
    }
}

struct Running {
    addr: SocketAddr,
    source: Arc<Source>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

fn limits() -> Limits {
    Limits {
        header_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_millis(1200),
        request_timeout: Duration::from_millis(1000),
        max_connections: 8,
    }
}

impl Running {
    async fn start(limits: Limits, web_config: Option<PathBuf>) -> Running {
        Self::try_start(limits, web_config).await.unwrap()
    }

    async fn try_start(limits: Limits, web_config: Option<PathBuf>) -> Result<Running, ServeError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source = Arc::new(Source {
            delay: Mutex::new(Duration::ZERO),
        });
        let cfg = ServeConfig {
            limits,
            web_config,
            ..config(true)
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let src: Arc<dyn SnapshotSource> = source.clone();
        let mut task = tokio::spawn(serve_on(listener, src, cfg, async {
            let _ = stopped.await;
        }));
        // A bad web config ends the server at once.
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(100), &mut task).await {
            r.unwrap()?;
            panic!("the server ended without an error");
        }
        Ok(Running {
            addr,
            source,
            stop: Some(stop),
            task,
        })
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }

    /// `GET path` on a new connection, `Connection: close`.
    async fn get(&self, path: &str) -> Reply {
        let mut s = self.connect().await;
        exchange(&mut s, &get_close(path)).await.unwrap()
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}

fn get_close(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
}

/// Sends `request` and reads to the end of the stream.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    request: &str,
) -> std::io::Result<Reply> {
    s.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    if !raw.starts_with(b"HTTP/1.1 ") {
        return Err(std::io::Error::other(format!(
            "not an HTTP response: {:?}",
            String::from_utf8_lossy(&raw)
        )));
    }
    Ok(parse_reply(&raw))
}

/// Reads one response of a keep-alive connection (by its Content-Length).
async fn read_response(s: &mut TcpStream) -> Reply {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if raw.len() >= end + 4 + len {
                return parse_reply(&raw);
            }
        }
    }
}

/// Waits until the server closes `s` (EOF or reset); returns when, and what it sent before.
async fn until_closed(s: &mut TcpStream, within: Duration) -> (Instant, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
            Err(_) => panic!("still open after {within:?}"),
            Ok(Ok(0) | Err(_)) => return (Instant::now(), got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Whether the server has closed `s` (checked without waiting long).
async fn is_closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

fn assert_between(what: &str, took: Duration, min: Duration, max: Duration) {
    assert!(
        took >= min && took <= max,
        "{what}: {took:?}, expected between {min:?} and {max:?}"
    );
}

#[tokio::test]
async fn slow_loris_is_closed_after_the_header_timeout_and_scrapes_are_still_served() {
    let server = Running::start(limits(), None).await;
    let mut slow = server.connect().await;
    let opened = Instant::now();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    // One header line every 100 ms: always sending, never done.
    let mut scraped = false;
    let closed_at = loop {
        if is_closed(&mut slow).await {
            break Instant::now();
        }
        if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
            break Instant::now();
        }
        // Meanwhile a normal scrape is answered at once.
        if !scraped && opened.elapsed() > Duration::from_millis(200) {
            let started = Instant::now();
            assert_eq!(server.get("/metrics").await.status, 200);
            assert!(started.elapsed() < Duration::from_secs(1));
            scraped = true;
        }
        assert!(opened.elapsed() < Duration::from_secs(10), "never closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_between(
        "slow head closed after",
        closed_at - opened,
        limits().header_timeout - Duration::from_millis(50),
        limits().header_timeout + MARGIN,
    );
    assert!(scraped, "the slow connection was closed before the scrape");
    assert_eq!(server.get("/healthz").await.status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn half_sent_and_silent_connections_are_closed() {
    let server = Running::start(limits(), None).await;
    let mut half = server.connect().await;
    let mut silent = server.connect().await;
    let opened = Instant::now();
    half.write_all(b"GET /met").await.unwrap();
    for (what, s) in [
        ("half-sent request", &mut half),
        ("silent connection", &mut silent),
    ] {
        let (at, got) = until_closed(s, Duration::from_secs(10)).await;
        assert!(
            got.is_empty(),
            "{what}: answered {:?}",
            String::from_utf8_lossy(&got)
        );
        assert_between(
            what,
            at - opened,
            limits().header_timeout - Duration::from_millis(50),
            limits().header_timeout + MARGIN,
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let l = limits();
    let server = Running::start(l, None).await;
    let mut s = server.connect().await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n";
    s.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut s).await.status, 200);
    // Idle longer than the header timeout but within the idle timeout: still open, and the
    // next request is served.
    tokio::time::sleep(l.header_timeout + Duration::from_millis(200)).await;
    s.write_all(request).await.unwrap();
    let r = read_response(&mut s).await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    let last = Instant::now();
    let (at, got) = until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(got.is_empty());
    assert_between(
        "idle connection closed after",
        at - last,
        l.idle_timeout - Duration::from_millis(50),
        l.idle_timeout + MARGIN,
    );
    server.shutdown().await;
}

#[tokio::test]
async fn requests_over_the_time_limit_get_503_but_delta_profiles_get_their_window() {
    let l = limits();
    let server = Running::start(l, None).await;
    *server.source.delay.lock().unwrap() = l.request_timeout + Duration::from_secs(1);
    let started = Instant::now();
    let r = server.get("/metrics").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("http.request_timeout"), "{}", r.text());
    assert_between(
        "503 after",
        started.elapsed(),
        l.request_timeout - Duration::from_millis(50),
        l.request_timeout + MARGIN,
    );
    *server.source.delay.lock().unwrap() = Duration::ZERO;
    // A 2 s window is longer than the 1 s limit; the profile is still served.
    let r = server.get("/debug/pprof/allocs?seconds=2").await;
    assert_eq!(r.status, 200, "{}", r.text());
    server.shutdown().await;
}

#[tokio::test]
async fn a_flood_cannot_keep_a_scrape_out() {
    let l = Limits {
        max_connections: 4,
        ..limits()
    };
    let server = Running::start(l, None).await;
    let mut flood = Vec::new();
    for _ in 0..40 {
        let mut s = server.connect().await;
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        flood.push(s);
    }
    // The oldest waiting connections made room: a scrape gets through during the flood, well
    // before the flood could have drained by its header timeouts (40 / 4 × 500 ms = 5 s). Half
    // of that, not a tighter bound: a loaded 2-CPU machine once took over 1 s here.
    let started = Instant::now();
    let r = server.get("/metrics").await;
    assert_eq!(r.status, 200);
    let drained = l.header_timeout * (flood.len() / l.max_connections) as u32;
    assert!(
        started.elapsed() < drained / 2,
        "{:?}, the flood drains by itself in {drained:?}",
        started.elapsed()
    );
    let mut open = 0;
    for s in &mut flood {
        if !is_closed(s).await {
            open += 1;
        }
    }
    assert!(
        (1..=l.max_connections).contains(&open),
        "{open} flood connections still open, at most {} allowed",
        l.max_connections
    );
    drop(flood);
    assert_eq!(server.get("/metrics").await.status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn a_new_connection_is_closed_at_once_when_every_connection_is_busy() {
    let l = Limits {
        max_connections: 2,
        ..limits()
    };
    let server = Running::start(l, None).await;
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut s = server.connect().await;
        s.write_all(get_close("/debug/pprof/allocs?seconds=2").as_bytes())
            .await
            .unwrap();
        busy.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut extra = server.connect().await;
    let opened = Instant::now();
    let (at, got) = until_closed(&mut extra, Duration::from_secs(5)).await;
    assert!(
        got.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        at - opened < Duration::from_millis(500),
        "{:?}",
        at - opened
    );
    for mut s in busy {
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        assert_eq!(parse_reply(&raw).status, 200);
    }
    // After the flood, scrapes are served again.
    assert_eq!(server.get("/metrics").await.status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn only_get_and_head_within_the_size_limits() {
    let server = Running::start(limits(), None).await;
    let send = |raw: String| {
        let addr = server.addr;
        async move {
            let started = Instant::now();
            let mut s = TcpStream::connect(addr).await.unwrap();
            let r = exchange(&mut s, &raw).await.unwrap();
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{:?} for {:?}",
                started.elapsed(),
                &raw[..raw.len().min(80)]
            );
            r
        }
    };
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let r = send(format!(
            "{method} /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method}");
    }
    // A body, even on GET, is refused (and the connection closed).
    let r = send("GET /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello".into()).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.header("connection"), Some("close"));
    let r = send(
        "GET /metrics HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            .into(),
    )
    .await;
    assert_eq!(r.status, 413);
    let r =
        send("POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello".into()).await;
    assert_eq!(r.status, 405);
    // Content-Length: 0 is no body.
    let r = send(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
    )
    .await;
    assert_eq!(r.status, 200);

    // HEAD: the head of GET's answer (with its Content-Length), no body.
    let mut s = server.connect().await;
    s.write_all(b"HEAD /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let head = String::from_utf8(raw).unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200 ") && head.ends_with("\r\n\r\n"),
        "{head}"
    );

    let big = "x".repeat(super::MAX_HEAD_BYTES);
    let r = send(format!(
        "GET /metrics HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n"
    ))
    .await;
    assert_eq!(r.status, 431);
    let many: String = (0..super::MAX_HEADERS + 1)
        .map(|i| format!("X-H{i}: v\r\n"))
        .collect();
    let r = send(format!("GET /metrics HTTP/1.1\r\nHost: t\r\n{many}\r\n")).await;
    assert_eq!(r.status, 431);
    let long = format!("/metrics?{}", "a".repeat(super::MAX_URI_BYTES));
    let r = send(get_close(&long)).await;
    assert_eq!(r.status, 414);
    // Just within the limits: served.
    let within = format!("/healthz?{}", "a".repeat(super::MAX_URI_BYTES - 9));
    assert_eq!(send(get_close(&within)).await.status, 200);
    let r = send("HELLO\r\n\r\n".into()).await;
    assert_eq!(r.status, 400);
    let r = send("GET /metrics HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n".into()).await;
    assert_eq!(r.status, 400);
    server.shutdown().await;
}

fn tls_client(
    pki: &Pki,
    cert: Option<&(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let cfg = match cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// `GET path` over TLS; any TLS or HTTP failure is an error.
async fn tls_get(
    server: &Running,
    connector: &tokio_rustls::TlsConnector,
    path: &str,
    extra: &str,
) -> std::io::Result<Reply> {
    let tcp = server.connect().await;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    exchange(
        &mut tls,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n"),
    )
    .await
}

#[tokio::test]
async fn tls_scrape_with_a_test_ca() {
    let pki = Pki::new();
    let web = pki.web_config(
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n\
         http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n",
    );
    let server = Running::start(limits(), Some(web)).await;
    let r = tls_get(&server, &tls_client(&pki, None), "/metrics", "")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("allocwatch_alloc_bytes_total{"),
        "{}",
        r.text()
    );
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = server.connect().await;
    let Err(e) = exchange(&mut plain, &get_close("/metrics")).await else {
        panic!("plain HTTP answered on the TLS port")
    };
    assert!(e.to_string().contains("not an HTTP response"), "{e}");
    // A TCP connection that never starts its handshake is closed after the header timeout.
    let mut idle = server.connect().await;
    let opened = Instant::now();
    let (at, _) = until_closed(&mut idle, Duration::from_secs(10)).await;
    assert_between(
        "silent TLS connection closed after",
        at - opened,
        limits().header_timeout - Duration::from_millis(50),
        limits().header_timeout + MARGIN,
    );
    server.shutdown().await;
}

#[tokio::test]
async fn client_certificates_are_required_and_verified() {
    let pki = Pki::new();
    let web = pki.web_config(
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  \
         client_ca_file: ca.pem\n  client_auth_type: RequireAndVerifyClientCert\n",
    );
    let server = Running::start(limits(), Some(web)).await;
    let r = tls_get(
        &server,
        &tls_client(&pki, Some(&pki.client)),
        "/metrics",
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    for (what, client) in [
        ("no certificate", tls_client(&pki, None)),
        (
            "a certificate of another CA",
            tls_client(&pki, Some(&pki.stranger)),
        ),
    ] {
        match tls_get(&server, &client, "/healthz", "").await {
            Ok(r) => panic!("{what}: answered {}", r.status),
            Err(e) => assert!(
                e.to_string().contains("received fatal alert"),
                "{what}: {e}"
            ),
        }
    }
    server.shutdown().await;
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Authorization: Basic {raw}\r\n")
}

#[tokio::test]
async fn basic_auth_guards_every_path() {
    let pki = Pki::new();
    let hash = bcrypt::hash("correct horse", 4).unwrap();
    let web = pki.web_config(&format!(
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n\
         basic_auth_users:\n  prometheus: '{hash}'\n"
    ));
    let server = Running::start(limits(), Some(web)).await;
    let client = tls_client(&pki, None);
    for (path, auth) in [
        ("/metrics", String::new()),
        ("/healthz", String::new()),
        ("/metrics", basic("prometheus", "wrong")),
        ("/metrics", basic("nobody", "correct horse")),
        ("/debug/pprof/allocs", basic("prometheus", "")),
    ] {
        let r = tls_get(&server, &client, path, &auth).await.unwrap();
        assert_eq!(r.status, 401, "{path} {auth:?}");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Basic realm=\"allocwatch\"")
        );
    }
    let good = basic("prometheus", "correct horse");
    for path in ["/metrics", "/healthz", "/debug/pprof/allocs"] {
        let r = tls_get(&server, &client, path, &good).await.unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_rewritten_web_config_applies_to_new_connections() {
    let dir = Scratch::new("web");
    let path = dir.write("web.yml", "");
    let server = Running::start(limits(), Some(path.clone())).await;
    assert_eq!(server.get("/healthz").await.status, 200);
    let hash = bcrypt::hash("pw", 4).unwrap();
    std::fs::write(&path, format!("basic_auth_users:\n  bob: '{hash}'\n")).unwrap();
    assert_eq!(server.get("/healthz").await.status, 401);
    let mut s = server.connect().await;
    let r = exchange(
        &mut s,
        &format!(
            "GET /healthz HTTP/1.1\r\nHost: t\r\n{}Connection: close\r\n\r\n",
            basic("bob", "pw")
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn a_bad_web_config_stops_the_server() {
    let dir = Scratch::new("web");
    let path = dir.write("web.yml", "tls_server_config:\n  cert_file: nope.pem\n");
    let Err(e) = Running::try_start(limits(), Some(path)).await else {
        panic!("served with a bad web config")
    };
    assert!(e.to_string().contains("key_file: missing"), "{e}");
}
