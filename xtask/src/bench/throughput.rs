//! `./x bench`, section 3: throughput.

use super::*;

pub(super) fn throughput_section(b: &Bench, pairs: u64) -> anyhow::Result<String> {
    let mut md = String::from("## 3. Probe-hit throughput (in-kernel aggregation)\n\n");
    md += "allocwatch aggregates libc calls in per-CPU kernel maps: a probe hit is an \"event\" \
           that never crosses to user space. `alloc_bench pairs N T` runs T producer threads \
           (N malloc/free pairs each, timed from a start barrier to the last join). Exact: the \
           sites whose frame 0 is `bench_pairs` hold exactly T × N mallocs and T × N frees, \
           and every loss counter is 0.\n\n";
    md += "| configuration | threads | calls per run | hits/s: median (min–max) | ns per hit (wall) | exact |\n";
    md += "|---|---:|---:|---:|---:|---|\n";
    let n = pairs * 5;
    for mode in ["floor", "count", "full"] {
        for threads in [1u64, 2, 4] {
            eprintln!("bench: throughput, {mode}, {threads} threads");
            let calls = 2 * n * threads;
            let mut rates = Vec::new();
            let mut exact = if mode == "floor" {
                "—".to_owned()
            } else {
                "yes".to_owned()
            };
            for _ in 0..b.reps {
                wait_for_no_tracers();
                let report = b.tmp.join("tp-report.json");
                let mut cmd = Command::new(&b.bin);
                cmd.args(["top", "--mode", mode, "--json", "-o"])
                    .arg(&report)
                    .arg("--")
                    .arg(&b.alloc_bench)
                    .args(["pairs", &n.to_string(), &threads.to_string()]);
                let done = run_captured(&mut cmd, Duration::from_secs(600), &b.tmp)?;
                if !done.success {
                    bail!("throughput run failed:\n{}", done.stderr);
                }
                target_exited_ok(&report)?;
                let f = fields(&done.stdout, "alloc_bench ")
                    .ok_or_else(|| anyhow!("no alloc_bench line:\n{}", done.stdout))?;
                let ns = field_u64(&f, "ns")? as f64;
                rates.push(calls as f64 / (ns / 1e9));
                if mode != "floor" {
                    let got = loop_calls(&report, "bench_pairs")?;
                    let want = (n * threads, n * threads, 0);
                    if got != want {
                        exact = format!("no: (malloc, free, lost) {got:?}, want {want:?}");
                    }
                }
            }
            let m = median(&rates);
            md += &format!(
                "| allocwatch {mode} | {threads} | {calls} | {:.0} ({}) | {:.0} | {exact} |\n",
                m,
                spread(&rates, 0),
                1e9 / m,
            );
        }
    }
    md.push('\n');
    Ok(md)
}

/// (malloc calls, free calls) of the sites whose frame 0 is `function`, and the process's lost
/// total, from a `top --json` report.
pub(super) fn loop_calls(report: &Path, function: &str) -> anyhow::Result<(u64, u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(report)?)?;
    let p = &v["processes"][0];
    let lost: u64 = p["lost"].as_object().map_or(0, |o| {
        o.values().filter_map(serde_json::Value::as_u64).sum()
    });
    let (mut mallocs, mut frees) = (0, 0);
    for s in p["sites"].as_array().into_iter().flatten() {
        if s["frames"][0]["function"] != function {
            continue;
        }
        let calls = s["calls"].as_u64().unwrap_or(0);
        match s["api"].as_str() {
            Some("malloc") => mallocs += calls,
            Some("free") => frees += calls,
            _ => {}
        }
    }
    Ok((mallocs, frees, lost))
}
