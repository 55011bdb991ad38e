//! `./x bench`, section 4: agent footprint and /metrics.

use super::*;

pub(super) struct KillOnDrop(pub(super) Vec<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

pub(super) fn footprint_section(b: &Bench, counts: &[usize]) -> anyhow::Result<String> {
    let mut md = String::from("## 4. Agent footprint and /metrics\n\n");
    if !b.libc_fixture.is_file() {
        md += "Not measured: target/fixtures/libc_fixture is missing (run `./x fixtures`).\n\n";
        return Ok(md);
    }
    md += "`allocwatch agent --comm '^libc_fixture$'` (full mode, stacks) started after N \
           `libc_fixture` processes: idle ones (`wait-run`: blocked in sigwait) and busy ones \
           (`loop`: malloc(48) + free every millisecond, about 2,000 calls/s each). Time to \
           attach: from the agent's start (BPF load and verification included) until its \
           `allocwatch_processes` gauges sum to N. RSS and CPU of the agent over the next 10 s; \
           scrape latency: 20 sequential GETs of /metrics on loopback.\n\n";
    md += "| processes | time to attach all | agent RSS, MiB | agent CPU, % of one core | /metrics series | /metrics bytes | scrape ms: median (max) |\n";
    md += "|---|---:|---:|---:|---:|---:|---:|\n";
    let mut runs: Vec<(usize, &str)> = counts.iter().map(|&n| (n, "wait-run")).collect();
    runs.extend(counts.iter().filter(|&&n| n <= 100).map(|&n| (n, "loop")));
    for (n, mode) in runs {
        eprintln!("bench: footprint with {n} {mode} processes");
        let label = if mode == "loop" { "busy" } else { "idle" };
        match footprint_one(b, n, mode) {
            Ok(row) => md += &format!("| {n} {label} {row}\n"),
            Err(e) => md += &format!("| {n} {label} | failed: {e:#} | | | | | |\n"),
        }
    }
    md.push('\n');
    if let Some(&n) = counts.iter().max() {
        eprintln!("bench: {n} processes started while the agent runs");
        md += "Processes started while the agent runs (issue 4: picked up within one second): the \
               same agent, serving, with none of the fixtures yet; then N idle fixtures spawned back \
               to back. *Visible*: from the last spawn until the `allocwatch_processes` gauges have \
               grown by N; the slowest of the scrapes polled meanwhile (every 20 ms).\n\n";
        md += "| processes | spawning them took | all visible after the last spawn | slowest scrape meanwhile |\n";
        md += "|---:|---:|---:|---:|\n";
        match pickup_one(b, n) {
            Ok(row) => md += &format!("| {n} {row}\n"),
            Err(e) => md += &format!("| {n} | failed: {e:#} | | |\n"),
        }
        md.push('\n');
    }
    Ok(md)
}

/// One row of the pick-up table after the first cell: `| spawn | visible | slowest scrape |`.
pub(super) fn pickup_one(b: &Bench, n: usize) -> anyhow::Result<String> {
    wait_for_no_tracers();
    let port = 19464;
    let listen = format!("127.0.0.1:{port}");
    let agent = Command::new(&b.bin)
        .args(["agent", "--listen", &listen, "--comm", "^libc_fixture$"])
        .env(DEPLOYED_ALLOCATOR.0, DEPLOYED_ALLOCATOR.1)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(b.tmp.join("agent.stderr"))?)
        .spawn()?;
    let agent_pid = agent.id();
    let mut agent = KillOnDrop(vec![agent]);
    let deadline = Instant::now() + Duration::from_secs(120);
    // Processes of other users of the machine may match too: count from what it sees now.
    let base = loop {
        if let Ok(body) = http_get(port, "/metrics") {
            break gauge(&body, "allocwatch_processes").unwrap_or(0.0);
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not serve within 120 s: {}",
                fs::read_to_string(b.tmp.join("agent.stderr")).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    let started = Instant::now();
    let mut procs = KillOnDrop(Vec::new());
    for _ in 0..n {
        procs.0.push(
            Command::new(&b.libc_fixture)
                .arg("wait-run")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    let spawning = started.elapsed();
    let last = Instant::now();
    let mut slowest = Duration::ZERO;
    let visible = loop {
        let t = Instant::now();
        let body = http_get(port, "/metrics")?;
        slowest = slowest.max(t.elapsed());
        if gauge(&body, "allocwatch_processes").is_some_and(|v| v >= base + n as f64) {
            break last.elapsed();
        }
        if last.elapsed() > Duration::from_secs(60) {
            bail!("the agent did not report the {n} new processes within 60 s");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let _ = Command::new("kill").arg(agent_pid.to_string()).status();
    if let Some(a) = agent.0.first_mut() {
        let _ = a.wait();
    }
    drop(procs);
    Ok(format!(
        "| {:.0} ms | {:.0} ms | {:.0} ms |",
        spawning.as_secs_f64() * 1e3,
        visible.as_secs_f64() * 1e3,
        slowest.as_secs_f64() * 1e3,
    ))
}

/// One footprint row after the first cell: `| attach | rss | cpu | series | bytes | scrape |`.
pub(super) fn footprint_one(b: &Bench, n: usize, mode: &str) -> anyhow::Result<String> {
    wait_for_no_tracers();
    let mut procs = KillOnDrop(Vec::new());
    for _ in 0..n {
        procs.0.push(
            Command::new(&b.libc_fixture)
                .arg(mode)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    thread::sleep(Duration::from_millis(500));
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let agent = Command::new(&b.bin)
        .args(["agent", "--listen", &listen, "--comm", "^libc_fixture$"])
        .env(DEPLOYED_ALLOCATOR.0, DEPLOYED_ALLOCATOR.1)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(b.tmp.join("agent.stderr"))?)
        .spawn()?;
    let agent_pid = agent.id();
    let mut agent = KillOnDrop(vec![agent]);
    let deadline = started + Duration::from_secs(120);
    let attach = loop {
        if let Ok(body) = http_get(port, "/metrics")
            && gauge(&body, "allocwatch_processes").is_some_and(|v| v >= n as f64)
        {
            break started.elapsed();
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not report {n} processes within 120 s: {}",
                fs::read_to_string(b.tmp.join("agent.stderr")).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    let cpu0 = cpu_ticks(agent_pid)?;
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(10));
    let cpu = (cpu_ticks(agent_pid)? - cpu0) as f64 / clock_ticks() / t0.elapsed().as_secs_f64();
    let rss = rss_kib(agent_pid)? as f64 / 1024.0;
    let mut lat = Vec::new();
    let mut body = String::new();
    for _ in 0..20 {
        let t = Instant::now();
        body = http_get(port, "/metrics")?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let series = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count();
    let (_, max) = min_max(&lat);
    // SIGTERM: the agent detaches cleanly (KillOnDrop only reaps it then).
    let _ = Command::new("kill").arg(agent_pid.to_string()).status();
    if let Some(a) = agent.0.first_mut() {
        let _ = a.wait();
    }
    Ok(format!(
        "| {:.0} ms | {rss:.1} | {:.1} | {series} | {} | {:.1} ({max:.1}) |",
        attach.as_secs_f64() * 1e3,
        cpu * 100.0,
        body.len(),
        median(&lat),
    ))
}
