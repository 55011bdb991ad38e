//! Tests of the routes (`serve/mod.rs`): /metrics, /healthz and the profiles over real HTTP.
//! The helpers here (a fake snapshot source, a server on 127.0.0.1:0, a response parser) also
//! serve the connection tests of `http/tests.rs`.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::SocketAddr,
};

use flate2::read::GzDecoder;
use libdd_profiling_protobuf::prost_impls::{Message as _, Profile};
use tokio::{sync::oneshot, task::JoinHandle};

use super::*;
use crate::{
    model::{ProcessLabels, SiteSnapshot},
    report::pprof::tests::pprof_top,
    symbolize::Frame,
};

/// A source whose snapshot the test changes.
pub(super) struct Fake(pub Mutex<Vec<ProcessSnapshot>>);

impl SnapshotSource for Fake {
    fn snapshot(&self) -> (Vec<ProcessSnapshot>, SelfStats) {
        let procs = self.0.lock().unwrap().clone();
        let stats = SelfStats {
            probes_attached: 3,
            events_processed: 7,
            ..Default::default()
        };
        (procs, stats)
    }
}

pub(super) fn process(pid: u32, pod: &str, bytes: u64) -> ProcessSnapshot {
    let frame = |f: &str, address| Frame {
        function: Some(f.to_string()),
        ..Frame::unknown(address)
    };
    ProcessSnapshot {
        pid,
        labels: ProcessLabels {
            namespace: "shop".into(),
            pod: pod.into(),
            container: "app".into(),
            comm: "web".into(),
            exe: "/app/web".into(),
        },
        calls: BTreeMap::from([("malloc", 2)]),
        bytes: BTreeMap::from([("malloc", bytes)]),
        live_bytes: 64,
        live_allocations: 1,
        sites: vec![SiteSnapshot {
            kind: "malloc",
            frames: vec![frame("make_buffer", 0x2000), frame("serve_request", 0x1000)].into(),
            calls: 2,
            bytes,
            live_allocations: 1,
            live_bytes: 64,
            remainder: false,
            pending: false,
            probe: false,
        }],
        ..Default::default()
    }
}

pub(super) struct Server {
    pub addr: SocketAddr,
    pub source: Arc<Fake>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

/// The test servers' configuration: default limits, no web config.
pub(super) fn config(pprof: bool) -> ServeConfig {
    ServeConfig {
        metrics: MetricsConfig {
            ttl: Duration::from_secs(60),
            top_k: 10,
            max_site_series: 100,
            live: true,
        },
        pprof,
        sample_bytes: 0,
        limits: Limits::default(),
        web_config: None,
    }
}

impl Server {
    async fn start(pprof: bool) -> Server {
        Self::start_with(config(pprof)).await
    }

    pub async fn start_with(cfg: ServeConfig) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source = Arc::new(Fake(Mutex::new(vec![
            process(10, "web-1", 4096),
            process(11, "web-2", 100),
        ])));
        let (stop, stopped) = oneshot::channel::<()>();
        let src: Arc<dyn SnapshotSource> = source.clone();
        let task = tokio::spawn(serve_on(listener, src, cfg, async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            source,
            stop: Some(stop),
            task,
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

pub(super) struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A plain HTTP/1.1 GET over a TCP socket (the server sets Content-Length; no chunking).
async fn get(addr: SocketAddr, path: &str) -> Reply {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || get_blocking(addr, &path))
        .await
        .unwrap()
}

fn get_blocking(addr: SocketAddr, path: &str) -> Reply {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_reply(&raw)
}

/// One whole HTTP/1.1 response (the body must be all of the rest, as with `Connection: close`).
pub(super) fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let body = raw[split + 4..].to_vec();
    let reply = Reply {
        status,
        headers,
        body,
    };
    if let Some(len) = reply.header("content-length") {
        assert_eq!(len.parse::<usize>().unwrap(), reply.body.len());
    }
    reply
}

fn profile(r: &Reply) -> Profile {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    let mut raw = Vec::new();
    GzDecoder::new(r.body.as_slice())
        .read_to_end(&mut raw)
        .expect("gzip body");
    Profile::decode(raw.as_slice()).expect("profile.proto")
}

fn total(p: &Profile, type_name: &str) -> i64 {
    let i = p
        .sample_types
        .iter()
        .position(|t| p.string_table[t.r#type as usize] == type_name)
        .unwrap();
    p.samples.iter().map(|s| s.values[i]).sum()
}

#[tokio::test]
async fn healthz_and_metrics() {
    let server = Server::start(false).await;
    let r = get(server.addr, "/healthz").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));

    let r = get(server.addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let body = r.text();
    let web1 = r#"namespace="shop",pod="web-1",container="app",comm="web",exe="/app/web""#;
    assert!(
        body.contains(&format!(
            "allocwatch_alloc_bytes_total{{{web1},api=\"malloc\"}} 4096\n"
        )),
        "{body}"
    );
    assert!(body.contains("allocwatch_probes_attached 3\n"));
    let duration: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("allocwatch_scrape_duration_seconds "))
        .expect("scrape duration")
        .parse()
        .unwrap();
    assert!(duration > 0.0 && duration < 10.0, "{duration}");

    // Counters keep counting across scrapes.
    server.source.0.lock().unwrap()[0]
        .bytes
        .insert("malloc", 5000);
    let body = get(server.addr, "/metrics").await.text();
    assert!(body.contains(&format!(
        "allocwatch_alloc_bytes_total{{{web1},api=\"malloc\"}} 5000\n"
    )));

    // Profiles are off unless enabled.
    assert_eq!(get(server.addr, "/debug/pprof/heap").await.status, 404);
    assert_eq!(get(server.addr, "/debug/pprof/").await.status, 404);
    assert_eq!(get(server.addr, "/nope").await.status, 404);
    server.shutdown().await;
}

/// A source behind its requests: each answer is an earlier one, which has process 10 only.
struct Behind;

impl SnapshotSource for Behind {
    fn snapshot(&self) -> (Vec<ProcessSnapshot>, SelfStats) {
        (vec![process(10, "web-1", 4096)], SelfStats::default())
    }

    fn snapshot_fresh(&self) -> ((Vec<ProcessSnapshot>, SelfStats), bool) {
        (self.snapshot(), false)
    }
}

/// An earlier answer without the process is no proof it is unknown: 503 and Retry-After, not
/// 404 (a client that gave up on the 404 missed a process the tracer had seen).
#[tokio::test]
async fn stale_answer_without_the_process_says_retry() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_on(listener, Arc::new(Behind), config(true), async {
        let _ = stopped.await;
    }));
    let r = get(addr, "/debug/pprof/allocs?pid=999").await;
    assert_eq!(
        (r.status, r.header("retry-after")),
        (503, Some("1")),
        "{}",
        r.text()
    );
    // What the earlier answer has is served from it.
    assert_eq!(get(addr, "/debug/pprof/allocs?pid=10").await.status, 200);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn profiles() {
    let server = Server::start(true).await;
    let all = profile(&get(server.addr, "/debug/pprof/allocs").await);
    assert_eq!(total(&all, "alloc_space"), 4196);
    assert_eq!(
        all.string_table[all.default_sample_type as usize],
        "alloc_space"
    );

    let heap = profile(&get(server.addr, "/debug/pprof/heap?pod=web-2&namespace=shop").await);
    assert_eq!(total(&heap, "alloc_space"), 100);
    assert_eq!(total(&heap, "inuse_space"), 64);
    assert_eq!(
        heap.string_table[heap.default_sample_type as usize],
        "inuse_space"
    );
    let one = profile(&get(server.addr, "/debug/pprof/allocs?pid=10").await);
    assert_eq!(total(&one, "alloc_space"), 4096);

    // The index lists both profiles, with links that resolve against /debug/pprof/.
    let r = get(server.addr, "/debug/pprof/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let html = r.text();
    for want in [
        "<a href=\"allocs\">allocs</a>",
        "<a href=\"heap\">heap</a>",
        "seconds=N",
    ] {
        assert!(html.contains(want), "{want} not in\n{html}");
    }
    let r = get(server.addr, "/debug/pprof").await;
    assert_eq!(
        (r.status, r.header("location")),
        (308, Some("/debug/pprof/"))
    );
    let r = get(server.addr, "/debug/pprof/allocs?pid=999").await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = get(server.addr, "/debug/pprof/allocs?pid=abc").await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = get(server.addr, "/debug/pprof/allocs?seconds=100000").await;
    assert_eq!(r.status, 400, "{}", r.text());

    // A delta profile counts only what happens during its window.
    let source = Arc::clone(&server.source);
    let bump = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut procs = source.0.lock().unwrap();
        procs[0].sites[0].calls += 3;
        procs[0].sites[0].bytes += 1000;
    });
    let delta = profile(&get(server.addr, "/debug/pprof/allocs?pid=10&seconds=1").await);
    bump.await.unwrap();
    assert_eq!(total(&delta, "alloc_space"), 1000);
    assert_eq!(total(&delta, "alloc_objects"), 3);
    assert_eq!(delta.duration_nanos, 1_000_000_000);
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_cuts_a_delta_profile_short() {
    let server = Server::start(true).await;
    let addr = server.addr;
    let pending = tokio::spawn(async move { get(addr, "/debug/pprof/allocs?seconds=300").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    server.shutdown().await;
    let r = pending.await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A tracer that has not rendered anything yet: "still starting" is transient (503 and
/// Retry-After, which Prometheus and probes retry), not a server error.
#[tokio::test]
async fn metrics_before_the_first_rendering_is_503_with_retry_after() {
    struct Starting;
    impl SnapshotSource for Starting {
        fn snapshot(&self) -> (Vec<ProcessSnapshot>, SelfStats) {
            (Vec::new(), SelfStats::default())
        }
        fn metrics(&self, _started: Instant) -> Option<Result<String, MetricsError>> {
            Some(Err(MetricsError::NotReady))
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_on(
        listener,
        Arc::new(Starting),
        config(false),
        async {
            let _ = stopped.await;
        },
    ));
    let r = get(addr, "/metrics").await;
    assert_eq!(
        (r.status, r.header("retry-after")),
        (503, Some("1")),
        "{}",
        r.text()
    );
    assert!(r.text().contains("still starting"), "{}", r.text());
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn bind_failure_is_an_error() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let src: Arc<dyn SnapshotSource> = Arc::new(Fake(Mutex::new(Vec::new())));
    let cfg = config(false);
    let err = serve(addr, src, cfg, async {}).await.unwrap_err();
    assert!(matches!(err, ServeError::Bind { .. }), "{err}");
}

/// `go tool pprof` fetches the profile over HTTP, as a person would.
#[tokio::test]
async fn go_tool_pprof_fetches_the_served_profile() {
    let server = Server::start(true).await;
    let url = format!("http://{}/debug/pprof/allocs?pod=web-1", server.addr);
    let top = tokio::task::spawn_blocking(move || {
        pprof_top(&url, &["-sample_index=alloc_space", "-unit=B"])
    })
    .await
    .unwrap();
    assert!(top.contains("of 4096B total"), "{top}");
    assert!(
        top.contains("make_buffer") && top.contains("serve_request"),
        "{top}"
    );
    let url = format!("http://{}/debug/pprof/heap", server.addr);
    let top = tokio::task::spawn_blocking(move || pprof_top(&url, &["-unit=B"]))
        .await
        .unwrap();
    assert!(top.contains("Type: inuse_space"), "{top}");
    assert!(top.contains("of 128B total"), "{top}");
    server.shutdown().await;
}
