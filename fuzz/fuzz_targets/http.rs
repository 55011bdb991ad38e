//! HTTP requests as the agent's server reads them (serve/http.rs and the routes of
//! serve/mod.rs): each input is sent as the whole byte stream of one connection to a real
//! server on loopback, in this process, with /debug/pprof enabled.
#![no_main]

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{Arc, LazyLock},
    time::Duration,
};

use allocwatch::{
    model::{ProcessLabels, ProcessSnapshot, SelfStats},
    serve::{ServeConfig, SnapshotSource, http::Limits, metrics::MetricsConfig, serve_with},
};
use libfuzzer_sys::fuzz_target;

/// One process with a few counters: enough for /metrics and the profiles to render something.
struct Source;

impl SnapshotSource for Source {
    fn snapshot(&self) -> (Vec<ProcessSnapshot>, SelfStats) {
        let p = ProcessSnapshot {
            pid: 42,
            labels: ProcessLabels {
                comm: "fuzz".into(),
                exe: "/bin/fuzz".into(),
                ..ProcessLabels::default()
            },
            calls: [("malloc", 3)].into(),
            bytes: [("malloc", 300)].into(),
            ..ProcessSnapshot::default()
        };
        (vec![p], SelfStats::default())
    }
}

static SERVER: LazyLock<SocketAddr> = LazyLock::new(|| {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("binding loopback");
            tx.send(listener.local_addr().expect("local address"))
                .expect("sending the address");
            let cfg = ServeConfig {
                metrics: MetricsConfig {
                    ttl: Duration::from_secs(60),
                    top_k: 10,
                    max_site_series: 1000,
                    live: true,
                },
                pprof: true,
                sample_bytes: 0,
                // Short: an input that stops mid-head must not hold the run for 10 s.
                limits: Limits {
                    header_timeout: Duration::from_millis(500),
                    idle_timeout: Duration::from_millis(500),
                    request_timeout: Duration::from_secs(1),
                    max_connections: 64,
                },
                web_config: None,
            };
            serve_with(
                listener,
                Arc::new(Source),
                cfg,
                None,
                std::future::pending(),
            )
            .await
            .expect("serving");
        });
    });
    rx.recv().expect("the server's address")
});

fuzz_target!(|data: &[u8]| {
    let mut conn = TcpStream::connect(*SERVER).expect("connecting to the fuzzed server");
    conn.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("read timeout");
    // The server may close early (a bad head): a failed write is an answer too.
    let _ = conn.write_all(data);
    let _ = conn.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    // Until the server closes (or the timeout: a delta profile's `seconds=` window).
    let _ = conn.read_to_end(&mut answer);
    if answer.is_empty() {
        return;
    }
    // An HTTP/1.0 request is answered in HTTP/1.0.
    assert!(
        answer.starts_with(b"HTTP/1.1 ") || answer.starts_with(b"HTTP/1.0 "),
        "not an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
    // A request the server does not like is a 4xx; a 500 is a bug.
    let status = &answer[9..answer.len().min(12)];
    assert_ne!(status, b"500", "{:?}", String::from_utf8_lossy(&answer));
});
