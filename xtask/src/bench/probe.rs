//! `./x bench`, section 1: probe cost on the traced program.

use super::*;

#[derive(Clone, Debug)]
pub(super) enum Tracer {
    Untraced,
    /// `allocwatch top --mode MODE` (stacks walked as `--unwind auto`, the default).
    Allocwatch(&'static str),
    /// `allocwatch top --mode MODE --sample-bytes N`.
    Sampled(&'static str, u64),
    /// `allocwatch top --mode MODE --sample-bytes N --unwind HOW`: the agent's default
    /// (`full`, 512 KiB, `fp`) and its alternative.
    SampledUnwind(&'static str, u64, &'static str),
    /// `allocwatch top --mode MODE --unwind HOW`: stacks walked with frame pointers only
    /// (`fp`) or with tables for every file (`dwarf`).
    Unwind(&'static str, &'static str),
    /// A bpftrace script (its name in the table, the script).
    Bpftrace(&'static str, String),
}

impl Tracer {
    fn name(&self) -> String {
        match self {
            Tracer::Untraced => "untraced".into(),
            Tracer::Allocwatch(m) => format!("allocwatch {m}"),
            Tracer::Sampled(m, n) => format!("allocwatch {m} --sample-bytes {n}"),
            Tracer::SampledUnwind(m, n, how) => {
                format!("allocwatch {m} --sample-bytes {n} --unwind {how}")
            }
            Tracer::Unwind(m, how) => format!("allocwatch {m} --unwind {how}"),
            Tracer::Bpftrace(n, _) => format!("bpftrace {n}"),
        }
    }
}

/// A workload of `alloc_bench`: its arguments and the libc calls it times.
pub(super) struct Workload {
    pub(super) name: &'static str,
    pub(super) args: Vec<String>,
    pub(super) calls: u64,
    /// Expected (malloc, free) calls seen by a tracer of the whole process: the timed calls,
    /// one untimed warm-up pair, and stdio's buffer after the timed loop.
    pub(super) expect: (u64, u64),
    /// Runs `alloc_bench_nofp` (no frame pointers) instead of `alloc_bench`.
    pub(super) nofp: bool,
}

/// bpftrace scripts giving the information of each allocwatch mode (uprobes at offset 0:
/// bpftrace cannot probe inside a function here). `cpid` is the `-c` child.
pub(super) fn bpftrace_scripts(libc: &str) -> Vec<Tracer> {
    let all: Vec<String> = APIS.iter().map(|a| format!("uprobe:{libc}:{a}")).collect();
    let on = |apis: &[&str]| {
        apis.iter()
            .map(|a| format!("uprobe:{libc}:{a}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    // The return address at offset 0: the immediate caller, as count mode keys sites.
    let caller = r#"*(uint64 *)reg("sp")"#;
    let by_caller = |apis: &[&str], bytes: &str| {
        format!(
            "{} /pid == cpid/ {{ @calls[probe, {caller}] = count(); @bytes[probe, {caller}] = sum({bytes}); }}\n",
            on(apis)
        )
    };
    let count_caller = [
        by_caller(&["malloc", "valloc", "pvalloc"], "arg0"),
        by_caller(&["calloc"], "arg0 * arg1"),
        by_caller(&["realloc"], "arg1"),
        by_caller(&["reallocarray"], "arg1 * arg2"),
        by_caller(&["posix_memalign"], "arg2"),
        // One block for the two names glibc defines at one address (bpftrace 0.17 cannot load
        // two programs on one function).
        by_caller(&["aligned_alloc", "memalign"], "arg1"),
        format!(
            "{} /pid == cpid/ {{ @calls[probe, {caller}] = count(); }}\n",
            on(&["free"])
        ),
    ]
    .concat();
    // bcc memleak's shape: size at entry, (size, stack) by pointer at return, delete at free.
    let req = |apis: &[&str], size: &str| {
        format!("{} /pid == cpid/ {{ @req[tid] = {size}; }}\n", on(apis))
    };
    let rets: Vec<String> = [
        "malloc",
        "calloc",
        "realloc",
        "reallocarray",
        "aligned_alloc",
        "valloc",
        "pvalloc",
    ]
    .iter()
    .map(|a| format!("uretprobe:{libc}:{a}"))
    .collect();
    let memleak = [
        req(&["malloc", "valloc", "pvalloc"], "arg0"),
        req(&["calloc"], "arg0 * arg1"),
        format!(
            "{} /pid == cpid/ {{ @req[tid] = arg1; delete(@live_size[arg0]); delete(@live_stack[arg0]); }}\n",
            on(&["realloc"])
        ),
        req(&["reallocarray"], "arg1 * arg2"),
        req(&["aligned_alloc", "memalign"], "arg1"),
        format!(
            "{} /pid == cpid/ {{ @req[tid] = arg2; @memptr[tid] = arg0; }}\n",
            on(&["posix_memalign"])
        ),
        format!(
            "{} /pid == cpid && @req[tid] != 0/ {{ if (retval != 0) {{ @live_size[retval] = @req[tid]; @live_stack[retval] = ustack; }} delete(@req[tid]); }}\n",
            rets.join(",")
        ),
        format!(
            "uretprobe:{libc}:posix_memalign /pid == cpid && @memptr[tid] != 0/ {{ if (retval == 0) {{ $p = *(uint64 *)@memptr[tid]; @live_size[$p] = @req[tid]; @live_stack[$p] = ustack; }} delete(@req[tid]); delete(@memptr[tid]); }}\n"
        ),
        format!(
            "{} /pid == cpid/ {{ delete(@live_size[arg0]); delete(@live_stack[arg0]); }}\n",
            on(&["free"])
        ),
        "END { clear(@live_size); clear(@live_stack); clear(@req); clear(@memptr); }\n".into(),
    ]
    .concat();
    vec![
        Tracer::Bpftrace(
            "count by API",
            format!(
                "{} /pid == cpid/ {{ @[probe] = count(); }}\n",
                all.join(",")
            ),
        ),
        Tracer::Bpftrace("count+bytes by API and caller", count_caller),
        Tracer::Bpftrace(
            "count by API and user stack",
            format!(
                "{} /pid == cpid/ {{ @[probe, ustack] = count(); }}\n",
                all.join(",")
            ),
        ),
        Tracer::Bpftrace("live allocations (memleak-like)", memleak),
    ]
}

/// One timed run of `alloc_bench ARGS` under `tracer`: the workload's ns.
pub(super) fn run_alloc_bench(b: &Bench, tracer: &Tracer, w: &Workload) -> anyhow::Result<f64> {
    wait_for_no_tracers();
    let report = b.tmp.join("report.json");
    let exe = if w.nofp {
        &b.alloc_bench_nofp
    } else {
        &b.alloc_bench
    };
    let mut cmd = match tracer {
        Tracer::Untraced => {
            let mut c = Command::new(exe);
            c.args(&w.args);
            c
        }
        Tracer::Allocwatch(mode)
        | Tracer::Sampled(mode, _)
        | Tracer::Unwind(mode, _)
        | Tracer::SampledUnwind(mode, ..) => {
            let mut c = Command::new(&b.bin);
            c.args(["top", "--mode", mode, "--json", "-o"]).arg(&report);
            if let Tracer::Sampled(_, n) | Tracer::SampledUnwind(_, n, _) = tracer {
                c.args(["--sample-bytes", &n.to_string()]);
            }
            if let Tracer::Unwind(_, how) | Tracer::SampledUnwind(_, _, how) = tracer {
                c.args(["--unwind", how]);
            }
            c.arg("--").arg(exe).args(&w.args);
            c
        }
        Tracer::Bpftrace(_, script) => {
            let mut c = Command::new("bpftrace");
            let child = std::iter::once(exe.display().to_string())
                .chain(w.args.iter().cloned())
                .collect::<Vec<_>>()
                .join(" ");
            // As many keys as allocwatch's site table holds (bpftrace's default is 4,096: the
            // live-allocation script would silently drop entries).
            c.env("BPFTRACE_MAP_KEYS_MAX", "65536")
                .args(["-e", script, "-c", &child]);
            c
        }
    };
    let done = run_captured(&mut cmd, Duration::from_secs(600), &b.tmp)?;
    if !done.success {
        bail!(
            "{} failed on {}:\n{}\n{}",
            tracer.name(),
            w.name,
            done.stdout,
            done.stderr
        );
    }
    if let Tracer::Allocwatch(_)
    | Tracer::Sampled(..)
    | Tracer::Unwind(..)
    | Tracer::SampledUnwind(..) = tracer
    {
        target_exited_ok(&report)?;
    }
    let f = fields(&done.stdout, "alloc_bench ")
        .ok_or_else(|| anyhow!("{}: no alloc_bench line:\n{}", tracer.name(), done.stdout))?;
    if field_u64(&f, "calls")? != w.calls {
        bail!(
            "alloc_bench made {} calls, expected {}",
            f["calls"],
            w.calls
        );
    }
    if let Tracer::Allocwatch(mode)
    | Tracer::Sampled(mode, _)
    | Tracer::Unwind(mode, _)
    | Tracer::SampledUnwind(mode, ..) = tracer
        && !mode.starts_with("floor")
    {
        check_exact(&report, mode, w)?;
    }
    Ok(field_u64(&f, "ns")? as f64)
}

/// allocwatch exits 0 whatever its target did: the report says how the target ended.
pub(super) fn target_exited_ok(report: &Path) -> anyhow::Result<()> {
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(report)?)?;
    let code = &v["processes"][0]["exit_code"];
    if *code != 0 {
        bail!("the traced workload did not exit with 0 (exit_code {code})");
    }
    Ok(())
}

/// Zero loss, and every call of the process counted exactly once.
pub(super) fn check_exact(report: &Path, mode: &str, w: &Workload) -> anyhow::Result<()> {
    let text = fs::read_to_string(report)?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let p = &v["processes"][0];
    let got = (
        p["calls"]["malloc"].as_u64().unwrap_or(0),
        p["calls"]["free"].as_u64().unwrap_or(0),
    );
    if got != w.expect {
        bail!(
            "allocwatch {mode} on {}: (malloc, free) calls {got:?}, expected {:?}",
            w.name,
            w.expect
        );
    }
    if let Some(lost) = p["lost"].as_object() {
        for (k, n) in lost {
            if n.as_u64().unwrap_or(0) != 0 {
                bail!("allocwatch {mode} on {}: lost {k} = {n}", w.name);
            }
        }
    }
    Ok(())
}

pub(super) struct Row {
    pub(super) name: String,
    /// Workload wall time per rep, ns.
    pub(super) ns: Vec<f64>,
}

pub(super) fn probe_section(b: &Bench, pairs: u64) -> anyhow::Result<String> {
    let libc = libc_path(&b.alloc_bench)?;
    let mut tracers = vec![
        Tracer::Untraced,
        Tracer::Allocwatch("floor"),
        Tracer::Allocwatch("floor-return"),
        Tracer::Allocwatch("count"),
        Tracer::Allocwatch("count-stacks"),
        Tracer::Allocwatch("stacks-off"),
        Tracer::Allocwatch("full"),
        // The same stacks walked by the kernel with frame pointers only (`full` is `auto`: the
        // workload keeps frame pointers, libc does not and gets a table), and with a table
        // for every file.
        Tracer::Unwind("full", "fp"),
        Tracer::Unwind("full", "dwarf"),
        // Go's default mean (512 KiB), and a mean that samples ~1 call in 30 of this workload.
        Tracer::Sampled("count-stacks", 512 << 10),
        Tracer::Sampled("full", 512 << 10),
        Tracer::SampledUnwind("full", 512 << 10, "fp"),
        Tracer::Sampled("full", 4096),
    ];
    tracers.extend(bpftrace_scripts(&libc));
    let workloads = [
        Workload {
            name: "pairs",
            args: vec!["pairs".into(), pairs.to_string()],
            calls: 2 * pairs,
            expect: (pairs + 2, pairs + 1),
            nofp: false,
        },
        Workload {
            name: "malloc",
            args: vec!["malloc".into(), (2 * pairs).to_string()],
            calls: 2 * pairs,
            expect: (2 * pairs + 2, 1),
            nofp: false,
        },
        // The table walk at depth: `alloc_bench_nofp deep` (no frame pointers, as Debian
        // builds C) makes its mallocs 40 calls below main, 45 frames with libc's: `full` is
        // `auto` and walks all of them with the tables (`bpf_loop`), `--unwind fp` stops
        // where the first frame without a frame pointer is.
        Workload {
            name: "deep",
            args: vec!["deep".into(), (2 * pairs).to_string(), "40".into()],
            calls: 2 * pairs,
            expect: (2 * pairs + 2, 1),
            nofp: true,
        },
    ];
    // The deep workload's rows: the floor, the unwinders and the stack scripts.
    let deep_row = |t: &Tracer| match t {
        Tracer::Untraced | Tracer::Unwind(..) => true,
        Tracer::Allocwatch(m) => ["floor", "count", "full"].contains(m),
        Tracer::Sampled(m, n) | Tracer::SampledUnwind(m, n, _) => *m == "full" && *n == 512 << 10,
        Tracer::Bpftrace(n, _) => n.contains("stack") || n.contains("memleak"),
    };
    let mut md = String::from("## 1. Probe cost on the traced program\n\n");
    for w in &workloads {
        eprintln!("bench: probe cost, workload {} ({} calls)", w.name, w.calls);
        let tracers: Vec<Tracer> = tracers
            .iter()
            .filter(|t| !w.nofp || deep_row(t))
            .cloned()
            .collect();
        let mut rows: Vec<Row> = tracers
            .iter()
            .map(|t| Row {
                name: t.name(),
                ns: Vec::new(),
            })
            .collect();
        let mut loads = Vec::new();
        for rep in 0..b.reps {
            loads.push(load_average());
            // Rotate the order so slow drifts of the machine spread over every configuration.
            for i in 0..tracers.len() {
                let k = (i + rep) % tracers.len();
                let ns = run_alloc_bench(b, &tracers[k], w)?;
                eprintln!(
                    "  rep {} {:<45} {:>10.3} ms",
                    rep + 1,
                    tracers[k].name(),
                    ns / 1e6
                );
                rows[k].ns.push(ns);
            }
        }
        md += &probe_table(w, &rows);
        md += &load_line(&loads);
    }
    Ok(md)
}

pub(super) fn probe_table(w: &Workload, rows: &[Row]) -> String {
    let base = median(&rows[0].ns);
    let added =
        |r: &Row| -> Vec<f64> { r.ns.iter().map(|ns| (ns - base) / w.calls as f64).collect() };
    let floor = rows
        .iter()
        .find(|r| r.name == "allocwatch floor")
        .map(|r| median(&added(r)));
    let floor_ret = rows
        .iter()
        .find(|r| r.name == "allocwatch floor-return")
        .map(|r| median(&added(r)));
    let mut md = format!(
        "### Workload `{}`{}: {} libc calls per run, {} runs per row\n\n",
        w.name,
        if w.nofp {
            " (`alloc_bench_nofp`, no frame pointers)"
        } else {
            ""
        },
        w.calls,
        rows[0].ns.len()
    );
    md += "| configuration | run time, ms: median (min–max) | ns added per call: median (min–max) | × floor | × floor-return |\n";
    md += "|---|---:|---:|---:|---:|\n";
    for r in rows {
        let ms: Vec<f64> = r.ns.iter().map(|n| n / 1e6).collect();
        let a = added(r);
        let ratio = |f: Option<f64>| match f {
            Some(f) if r.name != "untraced" && f > 0.0 => format!("{:.2}", median(&a) / f),
            _ => "—".into(),
        };
        let added_cell = if r.name == "untraced" {
            format!("{:.1} ns/call untraced", base / w.calls as f64)
        } else {
            format!("{:.0} ({})", median(&a), spread(&a, 0))
        };
        md += &format!(
            "| {} | {:.2} ({}) | {} | {} | {} |\n",
            r.name,
            median(&ms),
            spread(&ms, 2),
            added_cell,
            ratio(floor),
            ratio(floor_ret)
        );
    }
    md.push('\n');
    md
}
