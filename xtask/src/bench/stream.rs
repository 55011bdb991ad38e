//! `./x bench`, section 8: the streaming path (Go events through the ring buffer).

use super::*;

pub(super) fn stream_section(
    paths: &Paths,
    b: &Bench,
    out_dir: &Path,
    rates: &[String],
    secs: f64,
) -> anyhow::Result<String> {
    let rates: Vec<(u64, u32, u32)> = rates
        .iter()
        .map(|r| {
            let (r, hogs) = r.split_once('+').unwrap_or((r, "0"));
            let (rate, g) = r.split_once('/').unwrap_or((r, "2"));
            Ok((rate.parse()?, g.parse()?, hogs.parse()?))
        })
        .collect::<anyhow::Result<_>>()
        .context("--stream-rates: RATE[/GOROUTINES][+HOGS]")?;
    let mut md = String::from("## 8. Streaming path: Go events through the ring buffer\n\n");
    let toolchains = match go::ensure_toolchains(&paths.cache) {
        Ok(t) if !t.is_empty() => t,
        Ok(_) | Err(_) => {
            md += "Not measured: no Go toolchain (run `./x fixtures`, which installs them).\n\n";
            return Ok(md);
        }
    };
    let tc = &toolchains[toolchains.len() - 1];
    let exe = out_dir.join(format!("gostream-{}", tc.version));
    go::build_fixture_with(
        tc,
        &paths.root.join("fixtures/bench/gostream"),
        &exe,
        false,
        None,
    )?;
    let reps = b.reps.min(3);
    md += &format!(
        "Producer `fixtures/bench/gostream RATE {secs} GOROUTINES` (Go {}): GOROUTINES (2 unless \
         said) goroutines grow a nil `[]int` by one element RATE times per second in total (0: as \
         fast as they can) for {secs} s (`+N`: N busy-loop shell processes compete for the CPUs); every growth is a `growslice` call, one ring-buffer record with its user \
         stack. Consumer: one `allocwatch agent --comm '^gostream'` (the DaemonSet's path; \
         default Go settings: growth and GC, no mallocgc) for the whole section; the producer \
         starts streaming once the agent has attached it (SIGUSR1). *Delivered*: the increase \
         of the producer's `allocwatch_go_slice_grows_total` over the run (after the \
         scrape's drain); *lost*: the increase of `allocwatch_events_lost_total` (all causes); \
         *agent CPU*: utime + stime of the agent (/proc/PID/stat) from the start signal to the \
         scrape after the producer's exit, which includes the agent's idle work (the first row). \
         {reps} runs per rate, rates in rotating order; every run checked (the producer exited 0, \
         delivered + lost ≥ the producer's own count; the runtime grows a few slices of its own).\n\n",
        tc.version
    );
    md += "| target rate, events/s | produced/s: median (min–max) | delivered/s: median | lost: total over runs (by cause) | agent CPU, % of one core: median | agent CPU s per million events: median (min–max) |\n";
    md += "|---|---:|---:|---:|---:|---:|\n";

    wait_for_no_tracers();
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let stderr = b.tmp.join("agent.stderr");
    let mut agent = KillOnDrop(vec![
        Command::new(&b.bin)
            .args(["agent", "--listen", &listen, "--comm", "^gostream"])
            .env(DEPLOYED_ALLOCATOR.0, DEPLOYED_ALLOCATOR.1)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr)?)
            .spawn()?,
    ]);
    let agent_pid = agent.0[0].id();
    poll_metrics(
        port,
        Duration::from_millis(50),
        Duration::from_secs(60),
        "the agent did not serve /metrics",
        &stderr,
        |_| true,
    )?;
    let tick = clock_ticks();
    // Idle: the agent with nothing to stream (its /proc scans), over the same time.
    let idle = {
        let c0 = cpu_ticks(agent_pid)?;
        let t0 = Instant::now();
        thread::sleep(Duration::from_secs_f64(secs));
        (cpu_ticks(agent_pid)? - c0) as f64 / tick / t0.elapsed().as_secs_f64()
    };
    md += &format!(
        "| idle (no producer) | — | — | — | {:.1} | — |\n",
        idle * 100.0
    );
    let mut runs: Vec<Vec<StreamRun>> = rates.iter().map(|_| Vec::new()).collect();
    for rep in 0..reps {
        for i in 0..rates.len() {
            let k = (i + rep) % rates.len();
            let (rate, goroutines, hogs) = rates[k];
            let r = stream_one(
                b,
                &exe,
                port,
                agent_pid,
                (rate, goroutines, hogs),
                secs,
                &stderr,
            )?;
            eprintln!(
                "  rep {} rate {rate:>7}/{goroutines}+{hogs}: produced {:.0}/s, delivered {:.0}/s, lost {:?}, cpu {:.1} %",
                rep + 1,
                r.produced,
                r.delivered,
                r.lost,
                r.cpu_frac * 100.0
            );
            runs[k].push(r);
        }
    }
    stop_agent(&mut agent);
    let mut notes = Vec::new();
    for (k, &(rate, goroutines, hogs)) in rates.iter().enumerate() {
        let get = |f: fn(&StreamRun) -> f64| runs[k].iter().map(f).collect::<Vec<f64>>();
        let produced = get(|r| r.produced);
        let per_m = get(|r| r.cpu_per_m);
        let mut lost: BTreeMap<&str, f64> = BTreeMap::new();
        for r in &runs[k] {
            for (c, v) in &r.lost {
                *lost.entry(c).or_default() += v;
            }
        }
        let total: f64 = lost.values().sum();
        let lost = if total == 0.0 {
            "0".to_owned()
        } else {
            let causes: Vec<String> = lost
                .iter()
                .filter(|(_, v)| **v != 0.0)
                .map(|(c, v)| format!("{c} {v:.0}"))
                .collect();
            format!("{total:.0} ({})", causes.join(", "))
        };
        let rate = if rate == 0 {
            "unpaced".to_owned()
        } else {
            rate.to_string()
        };
        let g = if goroutines == 2 {
            String::new()
        } else {
            format!(
                ", {goroutines} goroutine{}",
                if goroutines == 1 { "" } else { "s" }
            )
        };
        let with_foreign = runs[k].iter().filter(|r| !r.foreign.is_empty()).count();
        if with_foreign > 0 {
            let who: Vec<&str> = runs[k]
                .iter()
                .flat_map(|r| r.foreign.iter().map(String::as_str))
                .collect();
            notes.push(format!(
                "rate {rate}/{goroutines}+{hogs}: {with_foreign} run(s) with other BPF holders present ({})",
                who.join(", ")
            ));
        }
        let g = if hogs > 0 {
            format!("{g}, {hogs} busy loops beside")
        } else {
            g
        };
        md += &format!(
            "| {rate}{g} | {:.0} ({}) | {:.0} | {lost} | {:.1} | {:.2} ({}) |\n",
            median(&produced),
            spread(&produced, 0),
            median(&get(|r| r.delivered)),
            median(&get(|r| r.cpu_frac)) * 100.0,
            median(&per_m),
            spread(&per_m, 2),
        );
    }
    md.push('\n');
    if !notes.is_empty() {
        md += &format!("Other tracers were running: {}.\n\n", notes.join("; "));
    }
    Ok(md)
}

/// One producer run.
pub(super) struct StreamRun {
    /// Events per second, the producer's count and time.
    pub(super) produced: f64,
    /// Events per second the agent counted.
    pub(super) delivered: f64,
    /// Loss counters' increase by cause (non-zero only).
    pub(super) lost: BTreeMap<String, f64>,
    /// Agent CPU over the run, fraction of one core.
    pub(super) cpu_frac: f64,
    /// Agent CPU seconds per million delivered events.
    pub(super) cpu_per_m: f64,
    /// Other processes holding BPF programs during the run (their uprobes may trap in the
    /// producer too).
    pub(super) foreign: Vec<String>,
}

/// `(rate, goroutines, hogs)`: `hogs` busy-loop processes compete for the CPUs during the run.
pub(super) fn stream_one(
    b: &Bench,
    exe: &Path,
    port: u16,
    agent_pid: u32,
    (rate, goroutines, hogs): (u64, u32, u32),
    secs: f64,
    stderr: &Path,
) -> anyhow::Result<StreamRun> {
    // The executable is gostream-VERSION.
    const COMM: &str = "comm=\"gostream";
    let out_path = b.tmp.join("gostream.stdout");
    let mut child = KillOnDrop(vec![
        Command::new(exe)
            .args([rate.to_string(), secs.to_string(), goroutines.to_string()])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path)?)
            .stderr(Stdio::inherit())
            .spawn()?,
    ]);
    let pid = child.0[0].id();
    // SIGUSR1 before the program's signal.Notify would be ignored (Go catches every signal).
    let t = Instant::now();
    while !fs::read_to_string(&out_path)?.starts_with("ready") {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("gostream did not get ready within 30 s");
        }
        thread::sleep(Duration::from_millis(5));
    }
    let (before, _) = poll_metrics(
        port,
        Duration::from_millis(50),
        Duration::from_secs(60),
        "the agent did not attach gostream",
        stderr,
        |body| sum_where(body, "allocwatch_processes", COMM).unwrap_or(0.0) >= 1.0,
    )?;
    let grows0 = sum_where(&before, "allocwatch_go_slice_grows_total", COMM).unwrap_or(0.0);
    let lost0 = lost_by_cause(&before);
    // The agent holds the section's own programs; anyone else's are noted with the run.
    let mut foreign = foreign_bpf_holders_except(&[agent_pid]);
    let mut busy = KillOnDrop(Vec::new());
    for _ in 0..hogs {
        busy.0.push(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .spawn()?,
        );
    }
    let cpu0 = cpu_ticks(agent_pid)?;
    let t0 = Instant::now();
    signal("USR1", &[pid])?;
    let limit = Duration::from_secs_f64(secs + 60.0);
    let status = loop {
        if let Some(st) = child.0[0].try_wait()? {
            break st;
        }
        if t0.elapsed() > limit {
            bail!("gostream did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    drop(busy);
    for f in foreign_bpf_holders_except(&[agent_pid]) {
        if !foreign.contains(&f) {
            foreign.push(f);
        }
    }
    let after = http_get(port, "/metrics")?;
    let cpu = (cpu_ticks(agent_pid)? - cpu0) as f64 / clock_ticks();
    let wall = t0.elapsed().as_secs_f64();
    if !status.success() {
        bail!("gostream {rate} exited with {status}");
    }
    let out = fs::read_to_string(&out_path)?;
    let f = fields(&out, "gostream ").ok_or_else(|| anyhow!("no gostream line: {out:?}"))?;
    let (events, ns) = (field_u64(&f, "events")? as f64, field_u64(&f, "ns")? as f64);
    let delivered =
        sum_where(&after, "allocwatch_go_slice_grows_total", COMM).unwrap_or(0.0) - grows0;
    let mut lost = lost_by_cause(&after);
    for (c, v) in &mut lost {
        *v -= lost0.get(c).copied().unwrap_or(0.0);
    }
    lost.retain(|_, v| *v != 0.0);
    let lost_total: f64 = lost.values().sum();
    // The runtime grows a few slices of its own (start-up, GC): a little more, never less,
    // unless counted as lost.
    if delivered + lost_total < events || delivered > events * 1.001 + 100.0 {
        bail!(
            "gostream {rate}: produced {events}, delivered {delivered}, lost {lost:?}: \
             the counts do not add up"
        );
    }
    Ok(StreamRun {
        produced: events / (ns / 1e9),
        delivered: delivered / (ns / 1e9),
        lost,
        cpu_frac: cpu / wall,
        cpu_per_m: if delivered > 0.0 {
            cpu / (delivered / 1e6)
        } else {
            f64::NAN
        },
        foreign,
    })
}
