//! `./x bench`: running one measured process (timed, isolated from other tracers), and the
//! statistics of repeated runs.

use super::*;

/// What a finished child printed.
pub(super) struct Finished {
    pub(super) stdout: String,
    pub(super) stderr: String,
    pub(super) success: bool,
}

/// Runs `cmd` to completion (killed after `limit`), output captured through files so a chatty
/// child never blocks on a pipe.
pub(super) fn run_captured(
    cmd: &mut Command,
    limit: Duration,
    tmp: &Path,
) -> anyhow::Result<Finished> {
    let out_path = tmp.join("run.stdout");
    let err_path = tmp.join("run.stderr");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::show(cmd)))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{}` did not finish within {limit:?}", cmd::show(cmd));
        }
        thread::sleep(Duration::from_millis(5));
    };
    Ok(Finished {
        stdout: fs::read_to_string(&out_path)?,
        stderr: fs::read_to_string(&err_path)?,
        success: status.success(),
    })
}

/// Processes other than this one holding BPF programs or links (another tracer: its uprobes
/// on libc would trap in every measured process, untraced ones included).
pub(super) fn foreign_bpf_holders() -> Vec<String> {
    foreign_bpf_holders_except(&[])
}

/// [`foreign_bpf_holders`] not counting `ours` (e.g. the bench's own agent).
pub(super) fn foreign_bpf_holders_except(ours: &[u32]) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit())
            || pid == me
            || ours.iter().any(|o| o.to_string() == pid)
        {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            fs::read_link(fd.path()).is_ok_and(|l| {
                let l = l.to_string_lossy();
                l == "anon_inode:bpf_link" || l == "anon_inode:bpf-prog"
            })
        });
        if holds {
            let comm = fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push(format!("{pid} ({})", comm.trim()));
        }
    }
    out
}

/// Waits (up to 10 minutes) until no other process holds BPF programs; returns how long.
pub(super) fn wait_for_no_tracers() -> Duration {
    let started = Instant::now();
    let mut said = false;
    loop {
        let holders = foreign_bpf_holders();
        if holders.is_empty() || started.elapsed() > Duration::from_secs(600) {
            if !holders.is_empty() {
                eprintln!(
                    "bench: warning: measuring while {} hold BPF programs",
                    holders.join(", ")
                );
            }
            return started.elapsed();
        }
        if !said {
            eprintln!(
                "bench: waiting for other tracers to finish: {}",
                holders.join(", ")
            );
            said = true;
        }
        thread::sleep(Duration::from_millis(500));
    }
}

pub(super) fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// `key=value` fields of the line starting with `prefix`.
pub(super) fn fields(stdout: &str, prefix: &str) -> Option<BTreeMap<String, String>> {
    let line = stdout.lines().find(|l| l.starts_with(prefix))?;
    Some(
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

pub(super) fn field_u64(f: &BTreeMap<String, String>, key: &str) -> anyhow::Result<u64> {
    f.get(key)
        .ok_or_else(|| anyhow!("no {key}= in the workload's line"))?
        .parse()
        .with_context(|| format!("{key}= is not a number"))
}

pub(super) fn libc_path(exe: &Path) -> anyhow::Result<String> {
    let out = cmd::stdout_if_ok(Command::new("ldd").arg(exe))
        .ok_or_else(|| anyhow!("ldd {} failed", exe.display()))?;
    let line = out
        .lines()
        .find(|l| l.contains("libc.so.6"))
        .ok_or_else(|| anyhow!("{} does not link libc.so.6", exe.display()))?;
    let path = line
        .split("=>")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .ok_or_else(|| anyhow!("cannot parse ldd line {line:?}"))?;
    Ok(fs::canonicalize(path)?.display().to_string())
}

// Statistics.

pub(super) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub(super) fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

pub(super) fn spread(v: &[f64], digits: usize) -> String {
    let (lo, hi) = min_max(v);
    format!("{lo:.digits$}–{hi:.digits$}")
}
