//! The node agent as the integration tests drive it (agent.rs, faults.rs): one running
//! `allocwatch agent` on a loopback port, its `/metrics` read with [`promtext`](super::promtext),
//! the process identities its series carry, and a minimal HTTP/1.1 client.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::promtext::{Sample, Scrape, Value as PromValue};
use super::{
    AllocwatchBin, BpfIds, Fixture, KernelState, Lines, assert_no_crash, path_str, signal,
    wait_child,
};

/// The agent's line once it serves.
pub const SERVING_PREFIX: &str = "allocwatch: agent serving on ";
/// How soon a new process must be in `/metrics` (issue 4).
pub const DISCOVERY_LIMIT: Duration = Duration::from_secs(1);
/// Label names a pid or a stack id would hide in (DESIGN.md §6: never a pid or a raw stack id
/// as a label).
pub const FORBIDDEN_LABELS: &[&str] = &["pid", "tgid", "stack", "stack_id"];

// ---------------------------------------------------------------------------------------------
// The agent

/// One running `allocwatch agent`.
pub struct Agent {
    pub child: Child,
    pub stderr: Lines,
    pub port: u16,
    pub what: String,
    pub before: KernelState,
    pub stopped: bool,
}

impl Agent {
    /// `allocwatch agent --listen 127.0.0.1:PORT ARGS…`, ready; with `--sample-bytes 0`
    /// unless `args` choose: these tests count every site call for call (the agent's
    /// default samples: `sampled_sites_estimated_totals_exact`, `agent_samples_by_default`).
    pub fn start(env: &impl AllocwatchBin, args: &[&str]) -> Self {
        let exact: &[&str] = if args.contains(&"--sample-bytes") {
            &[]
        } else {
            &["--sample-bytes", "0"]
        };
        Self::start_as_configured(env, &[exact, args].concat())
    }

    /// `allocwatch agent --listen 127.0.0.1:PORT ARGS…` with the agent's own defaults, ready.
    pub fn start_as_configured(env: &impl AllocwatchBin, args: &[&str]) -> Self {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut all = vec!["agent", "--listen", &listen];
        all.extend_from_slice(args);
        Self::start_on(env, port, &all)
    }

    /// `allocwatch ARGS…`, which must serve on `port`, ready.
    pub fn start_on(env: &impl AllocwatchBin, port: u16, args: &[&str]) -> Self {
        let mut cmd = Command::new(env.bin());
        cmd.args(args);
        let mut agent = Self::spawn(cmd, port, &args.join(" "));
        agent.wait_ready();
        agent
    }

    pub fn spawn(mut cmd: Command, port: u16, what: &str) -> Self {
        let before = KernelState::snapshot();
        let mut child = cmd
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        let pipe = child.stderr.take().expect("stderr");
        let stderr = match agent_log(child.id()) {
            Some(log) => Lines::follow_into(pipe, log),
            None => Lines::follow(pipe),
        };
        Self {
            child,
            stderr,
            port,
            what: what.to_owned(),
            before,
            stopped: false,
        }
    }

    /// Until `/healthz` answers `ok` (the agent has scanned /proc and attached by then).
    pub fn wait_ready(&mut self) {
        self.wait_ready_with(|port| try_get(port, "/healthz").map(|r| (r.status, r.body)));
    }

    /// Until `healthz(port)` (a GET of /healthz) answers `ok`.
    pub fn wait_ready_with(&mut self, healthz: impl Fn(u16) -> std::io::Result<(u16, Vec<u8>)>) {
        let limit = super::startup(Duration::from_secs(60));
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("waitpid") {
                thread::sleep(Duration::from_millis(50));
                panic!(
                    "`allocwatch {}` exited ({status}) before serving:\n{}",
                    self.what,
                    self.stderr.text()
                );
            }
            if let Ok((status, body)) = healthz(self.port) {
                assert_eq!(
                    (status, String::from_utf8_lossy(&body).trim()),
                    (200, "ok"),
                    "/healthz"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "`allocwatch {}` does not answer /healthz after {limit:?}:\n{}",
                self.what,
                self.stderr.text()
            );
            thread::sleep(Duration::from_millis(50));
        }
        let line = self.stderr.wait_for(SERVING_PREFIX, Duration::from_secs(5));
        assert!(
            line.contains(&format!("127.0.0.1:{}", self.port)),
            "the serving line names another address: {line:?}"
        );
    }

    pub fn get(&self, path: &str) -> Response {
        try_get(self.port, path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\nagent stderr:\n{}", self.stderr.text()))
    }

    pub fn scrape(&self) -> Metrics {
        // A scrape the busy tracer cannot answer before it rendered anything is a 503 "still
        // starting": Prometheus would scrape again, and so does this.
        let deadline = Instant::now() + super::startup(Duration::from_secs(15));
        let mut r = self.get("/metrics");
        while r.status != 200
            && String::from_utf8_lossy(&r.body).contains("still starting")
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(200));
            r = self.get("/metrics");
        }
        assert_eq!(
            r.status,
            200,
            "/metrics: {}\nagent stderr:\n{}",
            String::from_utf8_lossy(&r.body),
            self.stderr.text()
        );
        let ct = r.header("content-type").unwrap_or_default();
        assert!(
            ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
            "/metrics content type {ct:?}"
        );
        Metrics::parse(String::from_utf8(r.body).expect("/metrics is UTF-8"))
    }

    pub fn try_scrape_until(
        &self,
        timeout: Duration,
        ok: impl Fn(&Metrics) -> bool,
    ) -> Option<Metrics> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.scrape();
            if ok(&m) {
                return Some(m);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn scrape_until(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&Metrics) -> bool,
    ) -> Metrics {
        self.try_scrape_until(timeout, ok).unwrap_or_else(|| {
            let m = self.scrape();
            panic!(
                "no {what} in /metrics within {timeout:?}\nseries of the tests' programs:\n{}\n\
                 {}\nagent stderr:\n{}",
                m.test_lines(),
                m.self_stats(),
                self.stderr.text()
            )
        })
    }

    /// Scrapes until the series of `id` are the same in two scrapes 300 ms apart.
    pub fn scrape_stable(&self, id: &Identity) -> Metrics {
        let mut last = self.scrape();
        for _ in 0..20 {
            thread::sleep(Duration::from_millis(300));
            let m = self.scrape();
            if m.lines_of(id) == last.lines_of(id) {
                return m;
            }
            last = m;
        }
        panic!("the series of {id} keep changing:\n{}", last.lines_of(id))
    }

    /// Scrapes until `family` has a series of `id`. Returns when it was found and the start of
    /// the last scrape that did not have it, both relative to `started`.
    pub fn discover(
        &self,
        id: &Identity,
        family: &str,
        started: Instant,
    ) -> (Duration, Option<Duration>) {
        let mut last_miss = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let at = started.elapsed();
            let m = self.scrape();
            if m.has(id, family) {
                return (at, last_miss);
            }
            last_miss = Some(at);
            assert!(
                Instant::now() < deadline,
                "no {family} of {id} within 30 s\nagent stderr:\n{}",
                self.stderr.text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `FIXTURE MODE`, a mode that says `ready PID` and waits for SIGUSR1: let go once the
    /// agent lists it (so its executable is read before it allocates and its sites are named as
    /// they appear), and waited for; it must succeed. The exited fixture (its `pid`).
    pub fn run_found(&self, fixture: &Path, mode: &str) -> Fixture {
        let mut fx = Fixture::spawn(fixture, mode, "ready");
        self.wait_for_identity(&Identity::of(fixture), fx.started);
        signal(fx.pid, libc::SIGUSR1);
        let status = fx.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "fixture {mode} failed: {status}");
        fx
    }

    /// Until the agent lists `id` (it was started at `started`); it must be found within a second
    /// (the limit: a scrape that starts later must have it). Returns that scrape.
    pub fn wait_for_identity(&self, id: &Identity, started: Instant) -> Metrics {
        let (found, last_miss) = self.discover(id, "allocwatch_processes", started);
        assert!(
            last_miss.is_none_or(|t| t < DISCOVERY_LIMIT),
            "{id} was still unknown to a scrape started {:.2?} after the process (found at \
             {found:.2?}); the issue asks for new processes within one second",
            last_miss.unwrap_or_default()
        );
        self.scrape()
    }

    /// A profile endpoint's body: 200 and gzip. A 503 (the agent's loop is behind, and its
    /// last answer lacks the process: a busy machine) is retried for up to 30 s.
    pub fn profile(&self, path: &str) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut r = self.get(path);
        while r.status == 503 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(250));
            r = self.get(path);
        }
        assert_eq!(
            r.status,
            200,
            "GET {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            r.body.starts_with(&[0x1f, 0x8b]),
            "GET {path}: not gzip ({} bytes)",
            r.body.len()
        );
        r.body
    }

    /// SIGTERM: exit 0 within 5 s, no crash on stderr, and every BPF object it held freed.
    pub fn stop(&mut self) {
        self.stop_within(libc::SIGTERM, Duration::from_secs(5));
    }

    /// `sig`: exit 0 within `limit`, no crash, every BPF object freed by the kernel soon after
    /// (`BPF_FREE_LIMIT`), nothing left in tracefs or bpffs.
    pub fn stop_within(&mut self, sig: libc::c_int, limit: Duration) {
        let pid = self.child.id();
        let held = BpfIds::held_by(pid);
        // Uprobes are attached through perf events (or BPF links): either way an attached probe
        // holds its program, so programs that are freed afterwards prove nothing stays attached.
        assert!(
            !held.progs.is_empty(),
            "the agent holds no BPF programs while running: {held:?}"
        );
        let t = Instant::now();
        signal(pid, sig);
        let status = wait_child(&mut self.child, limit + Duration::from_secs(5));
        let took = t.elapsed();
        self.stopped = true;
        if status.is_some() {
            self.stderr.wait_closed(super::PIPE_DRAIN);
        }
        let stderr = self.stderr.text();
        let status = status.unwrap_or_else(|| {
            panic!(
                "`allocwatch {}` ignored signal {sig} (killed):\n{stderr}",
                self.what
            )
        });
        assert!(
            status.success(),
            "`allocwatch {}` exited with {status} after signal {sig} (in {took:.1?}):\n{stderr}",
            self.what
        );
        assert_no_crash(&stderr);
        assert!(
            took <= limit,
            "the agent took {took:.2?} to exit after signal {sig} (limit {limit:?}):\n{stderr}"
        );
        held.assert_all_gone("the agent", super::BPF_FREE_LIMIT);
        KernelState::snapshot().assert_nothing_added(&self.before);
    }

    /// The Go map growth of `id` once two scrapes 300 ms apart agree.
    pub fn scrape_stable_grows(&self, id: &Identity) -> BTreeMap<String, u64> {
        let mut last = self.scrape().go_map_grows(id);
        for _ in 0..30 {
            thread::sleep(Duration::from_millis(300));
            let now = self.scrape().go_map_grows(id);
            if now == last {
                return now;
            }
            last = now;
        }
        panic!("the map growth of {id} keeps changing: {last:?}")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /metrics

/// A process identity as the series label it (namespace, pod and container are empty here).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Identity {
    pub comm: String,
    pub exe: String,
}

impl Identity {
    /// Of a program started from `path`: comm is its file name cut to 15 bytes (TASK_COMM_LEN).
    pub fn of(path: &Path) -> Self {
        let name = path.file_name().expect("file name").to_string_lossy();
        Self {
            comm: name.chars().take(15).collect(),
            exe: path_str(path).to_owned(),
        }
    }

    pub fn from_labels(s: &Sample) -> Self {
        Self {
            comm: s.labels.get("comm").unwrap_or_default().to_owned(),
            exe: s.labels.get("exe").unwrap_or_default().to_owned(),
        }
    }

    pub fn matches(&self, s: &Sample) -> bool {
        s.labels.get("comm") == Some(self.comm.as_str())
            && s.labels.get("exe") == Some(self.exe.as_str())
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{{comm=\"{}\", exe=\"{}\"}}", self.comm, self.exe)
    }
}

/// A parsed `/metrics` body (xtask's strict promtext reader, an implementation of the text
/// format independent of the agent's encoder), with the text for messages.
pub struct Metrics {
    pub text: String,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Default)]
pub struct HistogramValue {
    pub count: f64,
    pub sum: f64,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SiteValue {
    pub calls: u64,
    pub bytes: u64,
}

impl Metrics {
    pub fn parse(text: String) -> Self {
        let scrape =
            Scrape::parse(&text).unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"));
        Self {
            text,
            samples: scrape.samples,
        }
    }

    /// Samples of `family` (exact name; `NAME_sum`/`NAME_count` for histograms) of `id`.
    pub fn of(&self, id: &Identity, family: &str) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.metric == family && id.matches(s))
            .collect()
    }

    pub fn has(&self, id: &Identity, family: &str) -> bool {
        !self.of(id, family).is_empty()
    }

    /// The one sample of `family` of `id` with the `extra` labels, if any.
    pub fn value(&self, id: &Identity, family: &str, extra: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self
            .of(id, family)
            .into_iter()
            .filter(|s| extra.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .collect();
        assert!(
            found.len() <= 1,
            "{} samples of {family}{extra:?} for {id}\n{}",
            found.len(),
            self.lines_of(id)
        );
        found.first().map(|s| value(s))
    }

    /// A counter that must exist, as an integer.
    pub fn counter(&self, id: &Identity, family: &str, extra: &[(&str, &str)]) -> u64 {
        let v = self
            .value(id, family, extra)
            .unwrap_or_else(|| panic!("no {family}{extra:?} for {id}\n{}", self.lines_of(id)));
        assert!(
            v >= 0.0 && v.fract() == 0.0,
            "{family}{extra:?} of {id} is not a count: {v}"
        );
        v as u64
    }

    /// The sum of the samples of `family` of `id` with the `extra` labels (0 when none).
    pub fn sum(&self, id: &Identity, family: &str, extra: &[(&str, &str)]) -> u64 {
        self.of(id, family)
            .into_iter()
            .filter(|s| extra.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| {
                let v = value(s);
                assert!(v >= 0.0 && v.fract() == 0.0, "{family} of {id}: {v}");
                v as u64
            })
            .sum()
    }

    /// Every allocation and free call of `id`.
    pub fn calls_of(&self, id: &Identity) -> u64 {
        self.sum(id, "allocwatch_alloc_calls_total", &[])
            + self.sum(id, "allocwatch_free_calls_total", &[])
    }

    /// The agent's own series of `family` with the `extra` labels, summed (0 when none).
    pub fn global_sum(&self, family: &str, extra: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.metric == family && s.labels.get("comm").is_none())
            .filter(|s| extra.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(value)
            .sum()
    }

    /// Go map growth of `id` by kind (the kinds that grew).
    pub fn go_map_grows(&self, id: &Identity) -> BTreeMap<String, u64> {
        self.of(id, "allocwatch_go_map_grows_total")
            .iter()
            .map(|s| {
                (
                    s.labels.get("kind").unwrap_or_default().to_owned(),
                    value(s) as u64,
                )
            })
            .filter(|(_, v)| *v > 0)
            .collect()
    }

    /// Series of the tests' programs (copies in the tests' scratch directories,
    /// `/tmp/allocwatch-…`), without histogram buckets, for messages.
    pub fn test_lines(&self) -> String {
        self.text
            .lines()
            .filter(|l| l.contains("exe=\"/tmp/allocwatch-") && !l.contains("_bucket{"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A series without identity labels (the agent's own).
    pub fn global(&self, family: &str) -> f64 {
        let found: Vec<&Sample> = self.samples.iter().filter(|s| s.metric == family).collect();
        assert_eq!(found.len(), 1, "one {family} sample");
        value(found[0])
    }

    pub fn histogram(&self, id: &Identity, name: &str) -> HistogramValue {
        let one = |family: String| {
            self.value(id, &family, &[])
                .unwrap_or_else(|| panic!("no {family} of {id}\n{}", self.lines_of(id)))
        };
        let count = one(format!("{name}_count"));
        let sum = one(format!("{name}_sum"));
        let buckets: Vec<(f64, f64)> = self
            .of(id, name)
            .iter()
            .flat_map(|s| match &s.value {
                PromValue::Histogram(b) => {
                    b.iter().map(|b| (b.less_than, b.count)).collect::<Vec<_>>()
                }
                other => panic!("{name} is not a histogram: {other:?}"),
            })
            .collect();
        let mut sorted = buckets.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            sorted.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name} buckets of {id} are not cumulative: {sorted:?}"
        );
        assert_eq!(
            sorted.last().map(|b| (b.0, b.1)),
            Some((f64::INFINITY, count)),
            "{name}: the +Inf bucket must equal _count"
        );
        HistogramValue { count, sum }
    }

    /// `allocwatch_site_*` of `id`: calls and bytes by (api, site).
    pub fn sites(&self, id: &Identity) -> BTreeMap<(String, String), SiteValue> {
        let mut out: BTreeMap<(String, String), SiteValue> = BTreeMap::new();
        for (family, bytes) in [
            ("allocwatch_site_alloc_calls_total", false),
            ("allocwatch_site_alloc_bytes_total", true),
        ] {
            for s in self.of(id, family) {
                let key = (
                    s.labels.get("api").unwrap_or_default().to_owned(),
                    s.labels.get("site").unwrap_or_default().to_owned(),
                );
                let e = out.entry(key).or_default();
                let v = value(s) as u64;
                if bytes {
                    e.bytes += v;
                } else {
                    e.calls += v;
                }
            }
        }
        out
    }

    /// Whether `id`'s site series add up to its totals for every libc API it has: a site not
    /// named yet is left out of the site series for a few scrapes (never put in `other` for
    /// good), so a test of sites scrapes until this holds.
    pub fn sites_complete(&self, id: &Identity) -> bool {
        let sites = self.sites(id);
        let totals = self.of(id, "allocwatch_alloc_calls_total");
        !totals.is_empty()
            && totals.iter().all(|s| {
                let api = s.labels.get("api").unwrap_or_default();
                let (calls, bytes) = sites
                    .iter()
                    .filter(|((a, _), _)| a == api)
                    .fold((0, 0), |(c, b), (_, v)| (c + v.calls, b + v.bytes));
                let labels = [("api", api)];
                self.value(id, "allocwatch_alloc_calls_total", &labels) == Some(calls as f64)
                    && self.value(id, "allocwatch_alloc_bytes_total", &labels) == Some(bytes as f64)
            })
    }

    /// The raw lines of `id` (empty when it has none).
    pub fn lines_of(&self, id: &Identity) -> String {
        let comm = format!("comm=\"{}\"", id.comm);
        let exe = format!("exe=\"{}\"", id.exe);
        self.text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(&comm) && l.contains(&exe))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// [`Self::lines_of`] without histogram buckets and call sites.
    pub fn core_lines_of(&self, id: &Identity) -> String {
        self.lines_of(id)
            .lines()
            .filter(|l| !l.contains("_bucket{") && !l.starts_with("allocwatch_site_"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The raw lines of any identity with this comm (empty when there is none).
    pub fn lines_with_comm(&self, comm: &str) -> String {
        let needle = format!("comm=\"{comm}\"");
        self.text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(&needle))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The lines of processes whose comm is not `comm` (empty when there is none).
    pub fn foreign_lines(&self, comm: &str) -> String {
        self.samples
            .iter()
            .filter(|s| s.labels.get("comm").is_some_and(|c| c != comm))
            .map(|s| format!("{} {:?}", s.metric, s.labels))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `allocwatch_events_lost_total{cause}` (0 when absent).
    pub fn lost(&self, cause: &str) -> u64 {
        self.samples
            .iter()
            .find(|s| {
                s.metric == "allocwatch_events_lost_total" && s.labels.get("cause") == Some(cause)
            })
            .map_or(0, |s| value(s) as u64)
    }

    /// The agent's own counters (loss, symbolization, attach) in one line, for messages.
    pub fn self_stats(&self) -> String {
        self.text
            .lines()
            .filter(|l| {
                l.starts_with("allocwatch_events_lost_total")
                    || l.starts_with("allocwatch_symbolization_failures_total")
                    || l.starts_with("allocwatch_attach_failures_total")
                    || l.starts_with("allocwatch_map_fill_ratio")
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Every line of `id` was understood by the parser: the text and the parse agree.
    pub fn assert_parsed_completely(&self, id: &Identity) {
        let raw = self.lines_of(id).lines().count();
        let parsed: usize = self
            .samples
            .iter()
            .filter(|s| id.matches(s))
            .map(|s| match &s.value {
                PromValue::Histogram(b) => b.len(),
                _ => 1,
            })
            .sum();
        assert_eq!(
            parsed,
            raw,
            "the parser read {parsed} of the {raw} lines of {id}\n{}",
            self.lines_of(id)
        );
    }

    /// DESIGN.md §6 on the whole scrape: the `allocwatch_` prefix, counters end in `_total`,
    /// no pid or stack-id labels, ASCII `site` labels; and `promtool check metrics` passes.
    pub fn assert_conventions(&self) {
        let mut types: BTreeMap<&str, &str> = BTreeMap::new();
        for line in self.text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(name), Some(ty)) = (it.next(), it.next()) {
                    types.insert(name, ty);
                }
            }
        }
        assert!(!types.is_empty(), "no # TYPE lines in /metrics");
        for (name, ty) in &types {
            assert!(
                name.starts_with("allocwatch_"),
                "{name}: no allocwatch_ prefix"
            );
            assert_eq!(
                *ty == "counter",
                name.ends_with("_total"),
                "{name} is a {ty}: counters, and only counters, end in _total"
            );
        }
        for s in &self.samples {
            // Typed as printed by the CLI, in any PromQL matcher: ASCII.
            if let Some(site) = s.labels.get("site") {
                assert!(
                    site.is_ascii(),
                    "{}: site label {site:?} is not ASCII",
                    s.metric
                );
            }
            for label in FORBIDDEN_LABELS {
                assert!(
                    s.labels.get(label).is_none(),
                    "{} has a `{label}` label (DESIGN.md §6: never pids or stack ids)",
                    s.metric
                );
            }
        }
        promtool_check_metrics(&self.text);
    }
}

/// `promtool check metrics` (Debian's prometheus package, installed by deploy/check.sh) on a
/// real scrape: names, units, help, types.
pub fn promtool_check_metrics(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool (`./x test` installs it through deploy/check.sh)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .expect("writing the scrape to promtool");
    let out = child.wait_with_output().expect("promtool check metrics");
    assert!(
        out.status.success(),
        "promtool check metrics on a scrape:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn value(s: &Sample) -> f64 {
    match &s.value {
        PromValue::Counter(v) | PromValue::Gauge(v) | PromValue::Untyped(v) => *v,
        other => panic!("{}: not a single value: {other:?}", s.metric),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP (a minimal HTTP/1.1 client: one request per connection)

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn try_get(port: u16, path: &str) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of the response head"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let r = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if r.header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        body = dechunk(&body)?;
    } else if let Some(len) = r
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        && body.len() != len
    {
        return Err(std::io::Error::other(format!(
            "content-length {len}, got {} bytes",
            body.len()
        )));
    }
    Ok(Response { body, ..r })
}

pub fn dechunk(mut data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| std::io::Error::other("bad chunk"))?;
        let size_text = String::from_utf8_lossy(&data[..end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {size_text:?}")))?;
        data = &data[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(std::io::Error::other("truncated chunk"));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// A port nothing listens on right now (the kernel's pick for port 0).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding port 0")
        .port()
}

/// With `ALLOCWATCH_TEST_AGENT_LOGS=DIR`, each agent's whole stderr also goes to
/// `DIR/TEST-PID.log`: a failure under load can then be read with the agent's debug log
/// (`RUST_LOG`), not only the lines a test prints.
fn agent_log(pid: u32) -> Option<fs::File> {
    let dir = std::env::var_os("ALLOCWATCH_TEST_AGENT_LOGS")?;
    let test = thread::current()
        .name()
        .unwrap_or("agent")
        .replace("::", "-");
    let path = Path::new(&dir).join(format!("{test}-{pid}.log"));
    fs::File::create(&path)
        .inspect_err(|e| eprintln!("cannot create {}: {e}", path.display()))
        .ok()
}
