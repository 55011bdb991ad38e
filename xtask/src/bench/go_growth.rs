//! `./x bench`, section 2: Go growth cost.

use super::*;

/// The Go workload's configurations, as (label, `allocwatch top` flags; None: untraced):
/// untraced, the floor (empty programs at exactly the instructions growth-only mode probes),
/// growth only, and with `with_malloc` growth + mallocgc.
pub(super) fn go_configs(
    with_malloc: bool,
) -> Vec<(&'static str, Option<&'static [&'static str]>)> {
    let mut configs: Vec<(&str, Option<&[&str]>)> = vec![
        ("untraced", None),
        (
            "floor (`--mode floor --no-go-malloc`)",
            Some(&["--mode", "floor", "--no-go-malloc"]),
        ),
        ("growth only (`--no-go-malloc`)", Some(&["--no-go-malloc"])),
    ];
    if with_malloc {
        configs.push(("growth + mallocgc", Some(&[])));
    }
    configs
}

/// `exe` untraced (`flags` None), or under `allocwatch top --json -o REPORT FLAGS -- exe`.
pub(super) fn go_workload(b: &Bench, exe: &Path, flags: Option<&[&str]>, report: &Path) -> Command {
    match flags {
        None => Command::new(exe),
        Some(flags) => {
            let mut c = Command::new(&b.bin);
            c.args(["top", "--json", "-o"])
                .arg(report)
                .args(flags)
                .arg("--")
                .arg(exe);
            c
        }
    }
}

pub(super) fn go_section(paths: &Paths, b: &Bench, out_dir: &Path) -> anyhow::Result<String> {
    let mut md = String::from("## 2. Go growth cost\n\n");
    let toolchains = match go::ensure_toolchains(&paths.cache) {
        Ok(t) if !t.is_empty() => t,
        Ok(_) | Err(_) => {
            md += "Not measured: no Go toolchain (run `./x fixtures`, which installs them).\n\n";
            return Ok(md);
        }
    };
    // The oldest (bucket maps) and the newest (swiss maps, size-specialized mallocgc).
    let mut picks = vec![&toolchains[0]];
    if toolchains.len() > 1 {
        picks.push(&toolchains[toolchains.len() - 1]);
    }
    let src = paths.root.join("fixtures/bench/gogrowth");
    md += "Workload `fixtures/bench/gogrowth` (100 rounds of a 10,000-key map and two 10,000-element \
           slices built from empty); time measured by the program around its loop. Growth events \
           and mallocgc hits are allocwatch's own counts from the same runs (every run checked: \
           zero loss, exit code 0). The floor is an empty program at exactly the instructions \
           growth-only mode probes (it records nothing: its µs per event divides by the \
           growth-only run's event count).\n\n";
    md += "| Go | configuration | run time, ms: median (min–max) | slowdown: medians (mins) | added time × floor | growth events | mallocgc hits | µs per event |\n";
    md += "|---|---|---:|---:|---:|---:|---:|---:|\n";
    let mut rates = Vec::new();
    for &tc in &picks {
        let exe = out_dir.join(format!("gogrowth-{}", tc.version));
        go::build_fixture_with(tc, &src, &exe, false, None)?;
        let configs = go_configs(true);
        const FLOOR: usize = 1;
        const GROWTH_ONLY: usize = 2;
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
        let mut events: Vec<(u64, u64)> = vec![(0, 0); configs.len()];
        eprintln!("bench: Go growth cost, Go {}", tc.version);
        for rep in 0..b.reps {
            for i in 0..configs.len() {
                let k = (i + rep) % configs.len();
                wait_for_no_tracers();
                let report = b.tmp.join("go-report.json");
                let mut cmd = go_workload(b, &exe, configs[k].1, &report);
                let done = run_captured(&mut cmd, Duration::from_secs(600), &b.tmp)?;
                if !done.success {
                    bail!("gogrowth under {} failed:\n{}", configs[k].0, done.stderr);
                }
                let f = fields(&done.stdout, "gogrowth ")
                    .ok_or_else(|| anyhow!("no gogrowth line:\n{}", done.stdout))?;
                let ns = field_u64(&f, "ns")? as f64;
                eprintln!(
                    "  rep {} {:<32} {:>9.2} ms",
                    rep + 1,
                    configs[k].0,
                    ns / 1e6
                );
                times[k].push(ns);
                if configs[k].1.is_some() {
                    events[k] = go_events(&report)?;
                    if k == FLOOR && events[k] != (0, 0) {
                        bail!("the floor recorded Go events: {:?}", events[k]);
                    }
                }
            }
        }
        let base = median(&times[0]);
        let base_min = min_max(&times[0]).0;
        let floor_added = median(&times[FLOOR]) - base;
        // Growth events per second of the untraced workload, for the per-event table.
        rates.push(events[GROWTH_ONLY].0 as f64 / (base / 1e9));
        for (k, (name, _)) in configs.iter().enumerate() {
            let ms: Vec<f64> = times[k].iter().map(|n| n / 1e6).collect();
            let m = median(&times[k]);
            let (growth, mallocs) = events[k];
            // The floor records nothing: it fires at the growth-only run's sites.
            let hits = if k == FLOOR {
                events[GROWTH_ONLY].0
            } else {
                growth + mallocs
            };
            let vs_floor = if k <= FLOOR || floor_added <= 0.0 {
                "—".to_owned()
            } else {
                format!("{:.2}", (m - base) / floor_added)
            };
            let per_event = if k == 0 || hits == 0 {
                "—".to_owned()
            } else {
                format!("{:.2}", (m - base) / 1e3 / hits as f64)
            };
            let slowdown = if k == 0 {
                "—".to_owned()
            } else {
                format!(
                    "{:+.1} % ({:+.1} %)",
                    (m / base - 1.0) * 100.0,
                    (min_max(&times[k]).0 / base_min - 1.0) * 100.0
                )
            };
            let n = |x: u64| {
                if k <= FLOOR {
                    "—".to_owned()
                } else {
                    x.to_string()
                }
            };
            md += &format!(
                "| {} | {name} | {:.2} ({}) | {slowdown} | {vs_floor} | {} | {} | {per_event} |\n",
                tc.version,
                median(&ms),
                spread(&ms, 2),
                n(growth),
                n(mallocs),
            );
        }
    }
    md.push('\n');
    md += &go_event_cost(paths, b, out_dir, &picks, &rates)?;
    Ok(md)
}

/// The cost of one growth event, measured where it dominates: `gostream count N 1` makes N
/// growslice calls back to back (~18 ns each untraced), under the floor and growth-only mode.
/// `rates`: growth events per second of the untraced gogrowth, per toolchain of `picks`.
pub(super) fn go_event_cost(
    paths: &Paths,
    b: &Bench,
    out_dir: &Path,
    picks: &[&go::GoToolchain],
    rates: &[f64],
) -> anyhow::Result<String> {
    const N: u64 = 100_000;
    let mut md = format!(
        "Per growth event: `fixtures/bench/gostream count {N} 1` makes {N} growslice calls back \
         to back in one goroutine (self-timed); *ns added per event* = (run time − median \
         untraced) / {N}. *Predicted for gogrowth*: that cost times the growth events per second \
         of the untraced gogrowth run above.\n\n"
    );
    md += "| Go | configuration | run time, ms: median (min–max) | ns added per event: median (min–max) | × floor | predicted slowdown of gogrowth |\n";
    md += "|---|---|---:|---:|---:|---:|\n";
    let src = paths.root.join("fixtures/bench/gostream");
    for (tc, &rate) in picks.iter().zip(rates) {
        let exe = out_dir.join(format!("gostream-{}", tc.version));
        go::build_fixture_with(tc, &src, &exe, false, None)?;
        let configs = go_configs(false);
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
        eprintln!("bench: Go growth event cost, Go {}", tc.version);
        for rep in 0..b.reps {
            for i in 0..configs.len() {
                let k = (i + rep) % configs.len();
                wait_for_no_tracers();
                let report = b.tmp.join("go-report.json");
                let mut cmd = go_workload(b, &exe, configs[k].1, &report);
                cmd.args(["count", &N.to_string(), "1"]);
                let done = run_captured(&mut cmd, Duration::from_secs(600), &b.tmp)?;
                if !done.success {
                    bail!("gostream under {} failed:\n{}", configs[k].0, done.stderr);
                }
                let f = fields(&done.stdout, "gostream ")
                    .ok_or_else(|| anyhow!("no gostream line:\n{}", done.stdout))?;
                if field_u64(&f, "events")? != N {
                    bail!("gostream made {} events, expected {N}", f["events"]);
                }
                if configs[k].1.is_some() {
                    let (growth, mallocs) = go_events(&report)?;
                    let ok = if k == 1 {
                        growth == 0 && mallocs == 0
                    } else {
                        // The runtime grows a few slices of its own.
                        (N..N + 1000).contains(&growth)
                    };
                    if !ok {
                        bail!("gostream under {}: {growth} growth events", configs[k].0);
                    }
                }
                times[k].push(field_u64(&f, "ns")? as f64);
            }
        }
        let base = median(&times[0]);
        let added =
            |k: usize| -> Vec<f64> { times[k].iter().map(|t| (t - base) / N as f64).collect() };
        let floor = median(&added(1));
        for (k, (name, _)) in configs.iter().enumerate() {
            let ms: Vec<f64> = times[k].iter().map(|n| n / 1e6).collect();
            let (cell, ratio, predicted) = if k == 0 {
                (
                    format!("{:.1} ns/event untraced", base / N as f64),
                    "—".to_owned(),
                    "—".to_owned(),
                )
            } else {
                let a = added(k);
                (
                    format!("{:.0} ({})", median(&a), spread(&a, 0)),
                    format!("{:.2}", median(&a) / floor),
                    format!("{:+.1} %", median(&a) * rate / 1e9 * 100.0),
                )
            };
            md += &format!(
                "| {} | {name} | {:.2} ({}) | {cell} | {ratio} | {predicted} |\n",
                tc.version,
                median(&ms),
                spread(&ms, 2),
            );
        }
        md += &format!(
            "| {} | (untraced gogrowth: {rate:.0} growth events/s) | | | | |\n",
            tc.version
        );
    }
    md.push('\n');
    Ok(md)
}

/// (growth events, mallocgc hits) of a `top --json` report of a Go program; an error if any
/// event was lost or the program did not exit with 0.
pub(super) fn go_events(report: &Path) -> anyhow::Result<(u64, u64)> {
    target_exited_ok(report)?;
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(report)?)?;
    let p = &v["processes"][0];
    for (cause, n) in p["lost"].as_object().into_iter().flatten() {
        if n.as_u64().unwrap_or(0) != 0 {
            bail!("Go workload: lost {cause} = {n}");
        }
    }
    let g = &p["go"];
    let growth = g["map_grows"]["total"].as_u64().unwrap_or(0)
        + g["slice_grows"].as_u64().unwrap_or(0)
        + g["slice_moves"].as_u64().unwrap_or(0);
    let mallocs = g["alloc_sizes"].as_array().map_or(0, |a| {
        a.iter().map(|b| b["count"].as_u64().unwrap_or(0)).sum()
    });
    Ok((growth, mallocs))
}
