//! `./x bench`, section 7: /metrics end to end with 10k and 100k series.

use super::*;

/// Sites of one `sites` process: 12 leaves × 10 callers, malloc and free each, plus stdio's
/// buffer (`printf`).
pub(super) const SITES_PER_PROC: usize = 2 * 12 * 10 + 1;
/// Series per site (`allocwatch_site_*` families).
pub(super) const SITE_FAMILIES: usize = 4;

pub(super) fn build_sites(paths: &Paths, out_dir: &Path) -> anyhow::Result<PathBuf> {
    let src = paths.root.join("fixtures/bench/sites.c");
    let out = out_dir.join("sites");
    cmd::run(
        Command::new("gcc")
            .args([
                "-O1",
                "-g",
                "-fno-omit-frame-pointer",
                "-Wall",
                "-Wextra",
                "-o",
            ])
            .arg(&out)
            .arg(&src),
    )?;
    Ok(out)
}

/// How the agent's allocator (mimalloc, built in) is run: as the image and the DaemonSet run it
/// (arena memory committed as it is used), and with mimalloc's defaults.
pub(super) const AGENT_ALLOCATOR: [(&str, Option<(&str, &str)>); 2] = [
    (
        "mimalloc, `MIMALLOC_ARENA_EAGER_COMMIT=0` (as deployed)",
        Some(("MIMALLOC_ARENA_EAGER_COMMIT", "0")),
    ),
    ("mimalloc, defaults", None),
];

pub(super) fn metrics_section(
    paths: &Paths,
    b: &Bench,
    counts: &[usize],
) -> anyhow::Result<String> {
    let sites = build_sites(paths, &b.tmp)?;
    let mut md = String::from("## 7. /metrics end to end with 10k and 100k series\n\n");
    md += &format!(
        "A real agent (`allocwatch agent --config FILE`: `top_k = 1000`, `max_site_series = \
         1000000`, `comm = [\"^awsites_\"]`, `max_stacks = 65536`) traces N processes of \
         `fixtures/bench/sites.c`, each started under its own name (a symlink `awsites_NNN`: \
         one identity per process) with {SITES_PER_PROC} sites (12 leaf functions × 10 callers, \
         malloc and free, and stdio's buffer) = {} `allocwatch_site_*` series per process. The \
         processes make their calls once the agent has attached them (SIGUSR1), then wait. \
         *Until exported*: from that signal until a scrape holds every site series (each site is \
         symbolized once, then cached). Then sequential GETs of /metrics on loopback (20, or 10 \
         above 20,000 series): latency as the client sees it, and the agent's own \
         `allocwatch_scrape_duration_seconds` (snapshot of the kernel maps and the exporter's \
         update, up to its self-metrics; the text encoding of the rest and HTTP come after). \
         Checked: N processes reported, every site series present, every loss counter 0. The \
         agent allocates with mimalloc, not the glibc malloc it probes; run as deployed and with \
         mimalloc's defaults.\n\n",
        SITES_PER_PROC * SITE_FAMILIES
    );
    md += "| processes | agent's allocator | series | site series | bytes | until exported, s | scrape ms: median (max) | agent's own timing, ms: median (max) | agent RSS, MiB |\n";
    md += "|---:|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for &n in counts {
        for (label, env) in AGENT_ALLOCATOR {
            eprintln!("bench: /metrics end to end, {n} processes, {label}");
            match metrics_one(b, &sites, n, env) {
                Ok(row) => md += &format!("| {n} | {label} {row}\n"),
                Err(e) => {
                    md += &format!("| {n} | {label} | failed: {e:#} | | | | | | |\n");
                    eprintln!("bench: failed: {e:#}");
                }
            }
        }
    }
    md.push('\n');
    Ok(md)
}

/// One row after the first two cells.
pub(super) fn metrics_one(
    b: &Bench,
    sites: &Path,
    n: usize,
    env: Option<(&str, &str)>,
) -> anyhow::Result<String> {
    wait_for_no_tracers();
    let dir = b.tmp.join("sites-bin");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let mut procs = KillOnDrop(Vec::new());
    for i in 0..n {
        let link = dir.join(format!("awsites_{i:03}"));
        std::os::unix::fs::symlink(sites, &link)?;
        procs.0.push(
            Command::new(&link)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    let pids: Vec<u32> = procs.0.iter().map(Child::id).collect();
    let port = free_port()?;
    let config = b.tmp.join("metrics-agent.toml");
    fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ntop_k = 1000\nmax_site_series = 1000000\n\
             [select]\ncomm = [\"^awsites_\"]\n[capacity]\nmax_stacks = 65536\n\
             [kubernetes]\nenabled = false\n"
        ),
    )?;
    let stderr = b.tmp.join("agent.stderr");
    let mut cmd = Command::new(&b.bin);
    cmd.arg("agent")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr)?);
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let mut agent = KillOnDrop(vec![cmd.spawn()?]);
    let agent_pid = agent.0[0].id();
    poll_metrics(
        port,
        Duration::from_millis(50),
        Duration::from_secs(120),
        &format!("the agent did not report {n} processes"),
        &stderr,
        |body| {
            sum_where(body, "allocwatch_processes", "comm=\"awsites_").unwrap_or(0.0) >= n as f64
        },
    )?;
    // SIGUSR1 before the program blocks it would kill it.
    let t = Instant::now();
    for &pid in &pids {
        while !blocks_usr1(pid)? {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("process {pid} does not block SIGUSR1");
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
    signal("USR1", &pids)?;
    let want = n * SITES_PER_PROC * SITE_FAMILIES;
    let (_, until) = poll_metrics(
        port,
        Duration::from_millis(200),
        Duration::from_secs(300),
        &format!("the agent did not export {want} site series"),
        &stderr,
        |body| gauge(body, "allocwatch_call_site_series").unwrap_or(0.0) >= want as f64,
    )?;
    let scrapes = if want > 20_000 { 10 } else { 20 };
    let (mut lat, mut own) = (Vec::new(), Vec::new());
    let mut body = String::new();
    for _ in 0..scrapes {
        let t = Instant::now();
        body = http_get(port, "/metrics")?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        own.push(gauge(&body, "allocwatch_scrape_duration_seconds").unwrap_or(f64::NAN) * 1e3);
    }
    let lost: Vec<String> = lost_by_cause(&body)
        .into_iter()
        .filter(|(_, v)| *v != 0.0)
        .map(|(c, v)| format!("{c}={v}"))
        .collect();
    if !lost.is_empty() {
        bail!("the agent lost events: {}", lost.join(", "));
    }
    let site_series = gauge(&body, "allocwatch_call_site_series").unwrap_or(0.0) as usize;
    if site_series != want {
        bail!("{site_series} site series, expected {want}");
    }
    let running = sum_where(&body, "allocwatch_processes", "comm=\"awsites_").unwrap_or(0.0);
    if running != n as f64 {
        bail!("{running} processes reported, expected {n}");
    }
    let series = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count();
    let rss = rss_kib(agent_pid)? as f64 / 1024.0;
    stop_agent(&mut agent);
    Ok(format!(
        "| {series} | {site_series} | {} | {:.1} | {:.1} ({:.1}) | {:.1} ({:.1}) | {rss:.1} |",
        body.len(),
        until.as_secs_f64(),
        median(&lat),
        min_max(&lat).1,
        median(&own),
        min_max(&own).1,
    ))
}
