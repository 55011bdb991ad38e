//! The soak's record (probes, scrapes, how the agent stopped, what it left) and what is made of
//! it: the verdict on each of issue 17's criteria and the Markdown table for BENCHMARKS.md.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use super::{
    kernel::{Ids, Leftovers},
    metrics::Reading,
};

/// Issue 17's limits.
pub const HEALTHZ_LIMIT: Duration = Duration::from_secs(1);
pub const METRICS_LIMIT: Duration = Duration::from_secs(1);
pub const SIGTERM_LIMIT: Duration = Duration::from_secs(1);
/// RSS at the end may differ from RSS after the first minute by this fraction of it.
pub const RSS_TOLERANCE: f64 = 0.20;
/// "After the first minute": the RSS baseline is the scrape planned at this time.
pub const RSS_BASELINE_AT: Duration = Duration::from_secs(60);

/// Why a request got no usable answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Nothing complete within the client's timeout (`Run::client_timeout`).
    TimedOut,
    /// Refused, reset, not 200, or a body the soak could not read: one line.
    Failed(String),
}

/// One `/healthz` probe; `at` is when it started, from the start of the churn.
#[derive(Debug, Clone)]
pub struct Probe {
    pub at: Duration,
    pub latency: Duration,
    pub answer: Result<(), Failure>,
}

/// One `/metrics` scrape with the agent's RSS and CPU time read just before it.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// When it was due (the schedule: every `--scrape-every`, at 60 s, and at the end).
    pub planned: Duration,
    /// When it started.
    pub at: Duration,
    pub rss_kib: Option<u64>,
    pub cpu_secs: Option<f64>,
    pub latency: Duration,
    pub reading: Result<Reading, Failure>,
}

/// How the agent ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    /// It exited `after` the SIGTERM.
    Exited {
        after: Duration,
        success: bool,
        status: String,
    },
    /// Still running `waited` after the SIGTERM: killed with SIGKILL.
    Killed { waited: Duration },
    /// It exited by itself during the soak.
    DiedEarly { at: Duration, status: String },
}

/// What the short-lived programs did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Churn {
    /// Programs started, by kind.
    pub started: BTreeMap<&'static str, u32>,
    /// One line per program that did not exit 0.
    pub failed: Vec<String>,
    /// Starts skipped because too many were still running (a slow machine).
    pub skipped: u32,
}

/// Everything one soak recorded.
#[derive(Debug, Clone)]
pub struct Run {
    /// The command that reproduces it (`./x soak …`).
    pub command: String,
    /// The churn's planned length.
    pub duration: Duration,
    pub client_timeout: Duration,
    pub probes: Vec<Probe>,
    pub scrapes: Vec<Scrape>,
    /// Planned scrapes not made because an earlier one was still in flight when the next was due.
    pub skipped_scrapes: Vec<Duration>,
    pub stop: Stop,
    /// Every BPF program and link the agent was seen holding.
    pub agent_held: Ids,
    pub agent_pid: u32,
    /// `Err`: the check itself failed (bpftool missing, tracefs unreadable): one line.
    pub leftovers: Result<Leftovers, String>,
    pub churn: Churn,
    /// The steady allocator's comm (its series' `comm` label).
    pub steady_comm: &'static str,
}

/// One criterion's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub criterion: String,
    pub pass: bool,
    pub measured: String,
}

impl Verdict {
    /// `PASS|FAIL criterion: measured`.
    pub fn line(&self) -> String {
        let word = if self.pass { "PASS" } else { "FAIL" };
        format!("{word} {}: {}", self.criterion, self.measured)
    }
}

/// Issue 17's six criteria, then two checks that the workload did what the soak claims (the
/// steady allocator stayed visible, every short-lived program ran to a clean exit).
pub fn verdicts(run: &Run) -> Vec<Verdict> {
    vec![
        healthz(run),
        metrics(run),
        rss(run),
        loss(run),
        sigterm(run),
        kernel(run),
        steady(run),
        churn(run),
    ]
}

fn verdict(criterion: impl Into<String>, pass: bool, measured: String) -> Verdict {
    Verdict {
        criterion: criterion.into(),
        pass,
        measured,
    }
}

/// "N requests, slowest X; K over the limit (first at t = T s), J timed out, …": the shared
/// measurement of the two latency criteria.
fn latency_summary<'a>(
    what: &str,
    limit: Duration,
    client_timeout: Duration,
    items: impl Iterator<Item = (Duration, Duration, Option<&'a Failure>)>,
) -> (bool, String) {
    let (mut n, mut slowest, mut slow, mut timeouts) = (0, Duration::ZERO, 0, 0);
    let mut first_bad: Option<Duration> = None;
    let mut errors: Vec<&str> = Vec::new();
    for (at, latency, failure) in items {
        n += 1;
        slowest = slowest.max(latency);
        let bad = match failure {
            None if latency > limit => {
                slow += 1;
                true
            }
            None => false,
            Some(Failure::TimedOut) => {
                timeouts += 1;
                true
            }
            Some(Failure::Failed(e)) => {
                errors.push(e);
                true
            }
        };
        if bad && first_bad.is_none() {
            first_bad = Some(at);
        }
    }
    if n == 0 {
        return (false, format!("no {what} was made"));
    }
    let mut s = format!("{n} {what}s, slowest {}", fmt_latency(slowest));
    if let Some(at) = first_bad {
        write!(s, "; first failure at t = {} s", at.as_secs()).ok();
    }
    if slow > 0 {
        write!(s, "; {slow} slower than {}", fmt_latency(limit)).ok();
    }
    if timeouts > 0 {
        let limit = client_timeout.as_secs();
        write!(s, "; {timeouts} unanswered within {limit} s").ok();
    }
    if let Some(first) = errors.first() {
        write!(s, "; {} failed (first: {first})", errors.len()).ok();
    }
    (first_bad.is_none(), s)
}

fn healthz(run: &Run) -> Verdict {
    let (pass, measured) = latency_summary(
        "probe",
        HEALTHZ_LIMIT,
        run.client_timeout,
        run.probes
            .iter()
            .map(|p| (p.at, p.latency, p.answer.as_ref().err())),
    );
    verdict(
        "/healthz answered within 1 s at every probe",
        pass,
        measured,
    )
}

fn metrics(run: &Run) -> Verdict {
    let (pass, mut measured) = latency_summary(
        "scrape",
        METRICS_LIMIT,
        run.client_timeout,
        run.scrapes
            .iter()
            .map(|s| (s.at, s.latency, s.reading.as_ref().err())),
    );
    let skipped = run.skipped_scrapes.len();
    if skipped > 0 {
        write!(
            measured,
            "; {skipped} planned scrapes skipped (the one before still in flight)"
        )
        .ok();
    }
    verdict(
        "/metrics answered within 1 s at every scrape",
        pass,
        measured,
    )
}

fn rss(run: &Run) -> Verdict {
    let criterion = "RSS at the end within 20 % of RSS after the first minute";
    let base = run
        .scrapes
        .iter()
        .position(|s| s.planned >= RSS_BASELINE_AT && s.rss_kib.is_some());
    let end = run.scrapes.len().checked_sub(1);
    let (Some(b), Some(e)) = (base, end) else {
        return verdict(
            criterion,
            false,
            "no RSS read after the first minute".into(),
        );
    };
    let (base, end) = (&run.scrapes[b], &run.scrapes[e]);
    let (Some(base_kib), Some(end_kib)) = (base.rss_kib, end.rss_kib) else {
        return verdict(criterion, false, "no RSS read at the end".into());
    };
    if b == e {
        let measured = format!(
            "the run ended at t = {} s, before a later RSS could be compared",
            end.at.as_secs()
        );
        return verdict(criterion, false, measured);
    }
    let change = (end_kib as f64 - base_kib as f64) / base_kib as f64;
    let measured = format!(
        "{} MiB at t = {} s, {} MiB at t = {} s ({:+.1} %)",
        fmt_mib(base_kib),
        base.at.as_secs(),
        fmt_mib(end_kib),
        end.at.as_secs(),
        change * 100.0
    );
    verdict(criterion, change.abs() <= RSS_TOLERANCE, measured)
}

/// The last scrape that was read, and whether any after it was not.
fn last_reading(run: &Run) -> Option<(&Scrape, &Reading, bool)> {
    let i = run.scrapes.iter().rposition(|s| s.reading.is_ok())?;
    let s = &run.scrapes[i];
    let reading = s.reading.as_ref().ok()?;
    Some((s, reading, i + 1 < run.scrapes.len()))
}

/// Loss that counts or live bytes need, from the first answered scrape to the last: what
/// happened while the probes attached (calls in flight then: `orphan_return`) and causes that
/// only take call-site detail (`affects="detail"`: a node's deep or frame-pointer-less stacks,
/// every call still counted) are said, not failed.
fn loss(run: &Run) -> Verdict {
    let criterion = "no event lost that counts or live bytes need, after the first scrape";
    let Some((s, r, unread_after)) = last_reading(run) else {
        return verdict(criterion, false, "no /metrics was read".into());
    };
    let first = run
        .scrapes
        .iter()
        .find_map(|s| Some((s.at, s.reading.as_ref().ok()?)));
    let (first_at, before) = match first {
        Some((at, f)) if at < s.at => (at, Some(f)),
        _ => (s.at, None),
    };
    let since =
        |cause: &str, v: f64| v - before.map_or(0.0, |f| f.lost.get(cause).copied().unwrap_or(0.0));
    let counting: Vec<(&str, f64)> = r
        .lost_causes()
        .filter(|(c, _)| !r.is_detail(c))
        .map(|(c, v)| (c, since(c, v)))
        .filter(|(_, v)| *v != 0.0)
        .collect();
    let total: f64 = counting.iter().map(|(_, v)| v).sum();
    let mut measured = format!(
        "{} lost from t = {} s to t = {} s",
        fmt_count(total),
        first_at.as_secs(),
        s.at.as_secs()
    );
    let causes = fmt_cause_list(counting);
    if !causes.is_empty() {
        write!(measured, ": {causes}").ok();
    }
    if let Some(f) = before {
        let at_first = fmt_cause_list(f.lost_causes().filter(|(c, _)| !f.is_detail(c)).collect());
        if !at_first.is_empty() {
            write!(measured, "; by the first scrape: {at_first}").ok();
        }
    }
    let detail = fmt_cause_list(r.lost_causes().filter(|(c, _)| r.is_detail(c)).collect());
    if !detail.is_empty() {
        write!(measured, "; call-site detail only, counts exact: {detail}").ok();
    }
    if unread_after {
        // Zero loss must be seen at the end, not assumed across unanswered scrapes.
        measured += "; unknown after that (later scrapes unanswered)";
    }
    verdict(criterion, total == 0.0 && !unread_after, measured)
}

fn sigterm(run: &Run) -> Verdict {
    let criterion = "SIGTERM: the agent exits (status 0) within 1 s";
    let (pass, measured) = match &run.stop {
        Stop::Exited {
            after,
            success,
            status,
        } => (
            *after <= SIGTERM_LIMIT && *success,
            format!(
                "exited ({status}) {:.2} s after SIGTERM",
                after.as_secs_f64()
            ),
        ),
        Stop::Killed { waited } => (
            false,
            format!(
                "still running {:.1} s after SIGTERM: killed with SIGKILL",
                waited.as_secs_f64()
            ),
        ),
        Stop::DiedEarly { at, status } => (
            false,
            format!(
                "the agent ended by itself at t = {} s ({status}), before the SIGTERM",
                at.as_secs()
            ),
        ),
    };
    verdict(criterion, pass, measured)
}

fn kernel(run: &Run) -> Verdict {
    let criterion = "nothing of the agent left in the kernel";
    let left = match &run.leftovers {
        Ok(l) => l,
        Err(e) => return verdict(criterion, false, format!("not checked: {e}")),
    };
    let held = &run.agent_held;
    let mut measured = if left.is_empty() {
        let pid = run.agent_pid;
        let (progs, links) = (held.progs.len(), held.links.len());
        if progs + links == 0 {
            // Nothing to follow: only new, unheld objects and uprobe events were looked for.
            format!(
                "nothing (it was not seen holding any BPF program or link); no `aya_{pid}_` \
                 uprobe event"
            )
        } else {
            format!(
                "nothing: the {progs} programs and {links} links it held are gone, no \
                 `aya_{pid}_` uprobe event"
            )
        }
    } else {
        let mut parts = Vec::new();
        if !left.ids.progs.is_empty() {
            parts.push(format!("programs {:?}", left.ids.progs));
        }
        if !left.ids.links.is_empty() {
            parts.push(format!("links {:?}", left.ids.links));
        }
        if !left.uprobe_events.is_empty() {
            let first = &left.uprobe_events[0];
            let n = left.uprobe_events.len();
            parts.push(format!("{n} uprobe events (first: `{first}`)"));
        }
        format!("left: {}", parts.join("; "))
    };
    if !left.foreign_uprobe_events.is_empty() {
        let n = left.foreign_uprobe_events.len();
        write!(
            measured,
            " ({n} new uprobe events of other tracers not counted)"
        )
        .ok();
    }
    verdict(criterion, left.is_empty(), measured)
}

fn steady(run: &Run) -> Verdict {
    let comm = run.steady_comm;
    let criterion =
        format!("workload: the steady allocator's calls (comm {comm}) rose at every scrape");
    if run.scrapes.len() < 2 {
        let measured = format!("{} scrapes: nothing to compare", run.scrapes.len());
        return verdict(criterion, false, measured);
    }
    let mut calls = Vec::new();
    for s in &run.scrapes {
        let at = s.at.as_secs();
        let Ok(r) = &s.reading else {
            let measured = format!("not seen at t = {at} s (/metrics unanswered)");
            return verdict(criterion, false, measured);
        };
        let Some(c) = r.steady_calls else {
            let measured = format!("no series for comm {comm} at t = {at} s");
            return verdict(criterion, false, measured);
        };
        calls.push((at, c));
    }
    for pair in calls.windows(2) {
        let ((t0, c0), (t1, c1)) = (pair[0], pair[1]);
        if c1 <= c0 {
            let measured = format!(
                "{} at t = {t0} s, {} at t = {t1} s",
                fmt_count(c0),
                fmt_count(c1)
            );
            return verdict(criterion, false, measured);
        }
    }
    let measured = format!(
        "{} → {} calls over {} scrapes",
        fmt_count(calls[0].1),
        fmt_count(calls[calls.len() - 1].1),
        calls.len()
    );
    verdict(criterion, true, measured)
}

fn churn(run: &Run) -> Verdict {
    let c = &run.churn;
    let total: u32 = c.started.values().sum();
    let kinds: Vec<String> = c.started.iter().map(|(k, n)| format!("{n} {k}")).collect();
    let secs = run.duration.as_secs_f64().max(1.0);
    let mut measured = format!(
        "{total} started ({}; {:.2}/s)",
        kinds.join(", "),
        f64::from(total) / secs
    );
    if c.skipped > 0 {
        write!(
            measured,
            ", {} starts skipped (too many still running)",
            c.skipped
        )
        .ok();
    }
    let pass = total > 0 && c.failed.is_empty();
    if let Some(first) = c.failed.first() {
        write!(
            measured,
            "; {} did not exit 0 (first: {first})",
            c.failed.len()
        )
        .ok();
    } else if total > 0 {
        measured += "; all exited 0";
    }
    verdict(
        "workload: every short-lived program exited 0",
        pass,
        measured,
    )
}

/// The report: the command, the table (one row per scrape), the verdicts.
pub fn markdown(run: &Run, header: &str, verdicts: &[Verdict]) -> String {
    let mut md = format!("### `{}`\n\n{header}\n\n", run.command);
    md += &table(
        &run.probes,
        &run.scrapes,
        run.client_timeout,
        run.steady_comm,
    );
    md += "\n| criterion | verdict | measured |\n|---|---|---|\n";
    for v in verdicts {
        let word = if v.pass { "PASS" } else { "**FAIL**" };
        writeln!(
            md,
            "| {} | {word} | {} |",
            v.criterion,
            v.measured.replace('|', "\\|")
        )
        .ok();
    }
    md
}

/// One row per scrape.
pub fn table(
    probes: &[Probe],
    scrapes: &[Scrape],
    client_timeout: Duration,
    steady: &str,
) -> String {
    let mut md = format!(
        "| t, s | agent RSS, MiB | /metrics | slowest /healthz since the last scrape | events \
         lost | sample lines | map fill ratio | agent CPU, s | {steady} calls |\n\
         |---:|---:|---:|---:|---|---:|---|---:|---:|\n"
    );
    // Each row's /healthz cell: the probes that started after the previous scrape ended and
    // before this one ended.
    let mut since = None;
    for s in scrapes {
        let end = s.at + s.latency;
        let health = slowest_probe(probes, since, end, client_timeout);
        since = Some(end);
        let (lost, lines, fill, calls) = match &s.reading {
            Ok(r) => {
                let mut lost = fmt_count(r.lost_total());
                let causes = fmt_causes(r);
                if !causes.is_empty() {
                    write!(lost, " ({causes})").ok();
                }
                let fill: Vec<String> = r.fill.iter().map(|(m, v)| format!("{m} {v:.2}")).collect();
                let calls = r.steady_calls.map_or("—".to_owned(), fmt_count);
                (lost, r.sample_lines.to_string(), fill.join(", "), calls)
            }
            Err(_) => ("—".into(), "—".into(), "—".into(), "—".into()),
        };
        writeln!(
            md,
            "| {} | {} | {} | {health} | {lost} | {lines} | {fill} | {} | {calls} |",
            s.at.as_secs(),
            s.rss_kib.map_or("—".to_owned(), fmt_mib),
            fmt_answer(s.latency, s.reading.as_ref().err(), client_timeout),
            s.cpu_secs.map_or("—".to_owned(), |c| format!("{c:.1}")),
        )
        .ok();
    }
    md
}

/// The slowest probe that started in (`after`, `until`], as a table cell.
fn slowest_probe(
    probes: &[Probe],
    after: Option<Duration>,
    until: Duration,
    client_timeout: Duration,
) -> String {
    probes
        .iter()
        .filter(|p| after.is_none_or(|a| p.at > a) && p.at <= until)
        .max_by_key(|p| (p.answer.is_err(), p.latency))
        .map_or("—".to_owned(), |p| {
            fmt_answer(p.latency, p.answer.as_ref().err(), client_timeout)
        })
}

fn fmt_answer(latency: Duration, failure: Option<&Failure>, timeout: Duration) -> String {
    match failure {
        None => fmt_latency(latency),
        Some(Failure::TimedOut) => format!("timeout ({} s)", timeout.as_secs()),
        Some(Failure::Failed(e)) => {
            let e: String = e.chars().take(60).collect();
            format!("failed: {}", e.replace('|', "\\|"))
        }
    }
}

/// `0.8 ms`, `14 ms`, `1.47 s`.
pub fn fmt_latency(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

fn fmt_mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// `0`, `9,999`, `57.0 k`, `11.7 M`, `1.20 G`.
pub fn fmt_count(v: f64) -> String {
    if v < 10_000.0 {
        let n = v.round() as u64;
        if n >= 1000 {
            format!("{},{:03}", n / 1000, n % 1000)
        } else {
            n.to_string()
        }
    } else if v < 1e6 {
        format!("{:.1} k", v / 1e3)
    } else if v < 1e9 {
        format!("{:.1} M", v / 1e6)
    } else {
        format!("{:.2} G", v / 1e9)
    }
}

/// The non-zero loss causes, largest first: `ringbuf_full 103.0 k, symbolize_process_gone 445`.
fn fmt_causes(r: &Reading) -> String {
    fmt_cause_list(r.lost_causes().collect())
}

fn fmt_cause_list(mut causes: Vec<(&str, f64)>) -> String {
    causes.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    causes
        .iter()
        .map(|(c, v)| format!("{c} {}", fmt_count(*v)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
