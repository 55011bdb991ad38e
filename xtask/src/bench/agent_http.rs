//! `./x bench`: talking to a running agent (/metrics over plain HTTP, its samples, signals,
//! stopping it).

use super::*;

pub(super) fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}

/// The sum of a gauge's series in a Prometheus text body (`None` without any).
pub(super) fn gauge(body: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = body
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(labels) => labels.split_once('}')?.1,
                None => rest,
            };
            rest.strip_prefix(' ')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The sum of the values of `name`'s series whose label set contains `label` (e.g.
/// `comm="gostream"`; `""` for all). `None` without any.
pub(super) fn sum_where(body: &str, name: &str, label: &str) -> Option<f64> {
    let values: Vec<f64> = body
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, rest) = match rest.strip_prefix('{') {
                Some(r) => {
                    let (labels, rest) = r.split_once('}')?;
                    (labels, rest)
                }
                None => ("", rest),
            };
            if !labels.contains(label) {
                return None;
            }
            rest.strip_prefix(' ')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// `allocwatch_events_lost_total` by cause.
pub(super) fn lost_by_cause(body: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for l in body.lines() {
        let Some(rest) = l.strip_prefix("allocwatch_events_lost_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let cause = labels
            .split(',')
            .find_map(|kv| kv.strip_prefix("cause=\""))
            .map(|c| c.trim_end_matches('"').to_owned())
            .unwrap_or_else(|| labels.to_owned());
        if let Ok(v) = value.trim().parse::<f64>() {
            *out.entry(cause).or_default() += v;
        }
    }
    out
}

/// Whether a `sites` process has blocked its signals: SIGTERM (15, bit 14 of `SigBlk`) is
/// blocked by the same call as SIGUSR1, which `sigwait` unblocks while it waits.
pub(super) fn blocks_usr1(pid: u32) -> anyhow::Result<bool> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| anyhow!("no SigBlk for {pid}"))?;
    Ok(mask & (1 << 14) != 0)
}

pub(super) fn signal(sig: &str, pids: &[u32]) -> anyhow::Result<()> {
    if pids.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("kill");
    cmd.arg(format!("-{sig}"));
    cmd.args(pids.iter().map(u32::to_string));
    cmd::run(&mut cmd)
}

/// Polls /metrics until `ready` holds for the body (every `every`), up to `limit`.
pub(super) fn poll_metrics(
    port: u16,
    every: Duration,
    limit: Duration,
    what: &str,
    stderr: &Path,
    mut ready: impl FnMut(&str) -> bool,
) -> anyhow::Result<(String, Duration)> {
    let started = Instant::now();
    loop {
        if let Ok(body) = http_get(port, "/metrics")
            && ready(&body)
        {
            return Ok((body, started.elapsed()));
        }
        if started.elapsed() > limit {
            bail!(
                "{what} within {limit:?}; agent stderr:\n{}",
                fs::read_to_string(stderr).unwrap_or_default()
            );
        }
        thread::sleep(every);
    }
}

/// Stops the agent with SIGTERM (it detaches cleanly) and reaps it.
pub(super) fn stop_agent(agent: &mut KillOnDrop) {
    for a in &mut agent.0 {
        let _ = Command::new("kill").arg(a.id().to_string()).status();
        let _ = a.wait();
    }
}
