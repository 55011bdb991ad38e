//! `./x bench`, section 5/6: symbolization and /metrics rendering (agent internals).

use super::*;

pub(super) fn internals_section(paths: &Paths) -> anyhow::Result<String> {
    eprintln!("bench: agent internals (release test build)");
    let mut cargo = cmd::cargo(paths);
    cargo.args([
        "test",
        "--release",
        "-p",
        "allocwatch",
        // The benchmarks live in the library (`agent/src/bench.rs`); `--bin` found none.
        "--lib",
        "bench::",
        "--",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    eprintln!("+ {}", cmd::show(&cargo));
    let out = cargo.output().context("running the agent's benchmarks")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("BENCH ") {
        bail!(
            "the agent's benchmarks failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let lines = |name: &str| -> Vec<BTreeMap<String, String>> {
        stdout
            .lines()
            .filter_map(|l| l.find(&format!("BENCH {name} ")).map(|i| &l[i..]))
            .filter_map(|l| fields(l, "BENCH "))
            .collect()
    };
    let get = |f: &BTreeMap<String, String>, k: &str| f.get(k).cloned().unwrap_or_default();
    let mut md = String::from("## 5. Symbolization\n\n");
    md += "The agent's symbolizer thread (blazesym behind a channel), asked by the test process \
           about its own addresses: the first request (maps noted, the binary's symbol table \
           parsed cold), then 8-frame stacks back to back for 2 s, all addresses seen before \
           (warm cache) or new ones each time (binary already parsed); then the first request \
           for an address in libc (its DWARF through the debug link when the distribution's \
           debug package is installed). One request at a time: each includes a round trip to \
           the symbolizer thread.\n\n";
    md += "| binary | first request, ms | warm stacks/s | stacks/s, new addresses |\n|---|---:|---:|---:|\n";
    for f in lines("symbolize") {
        let mib = get(&f, "binary_bytes").parse::<f64>().unwrap_or(0.0) / 1048576.0;
        md += &format!(
            "| allocwatch test binary, {mib:.1} MiB (release, symbols, no DWARF) | {} | {} | {} |\n",
            get(&f, "first_ms"),
            get(&f, "warm_stacks_per_s"),
            get(&f, "new_stacks_per_s"),
        );
        let dwarf = if get(&f, "libc_dwarf") == "true" {
            "with DWARF through its debug link"
        } else {
            "symbols only (no debug package)"
        };
        md += &format!(
            "| libc.so.6, {dwarf} | {} | | |\n",
            get(&f, "libc_first_ms")
        );
    }
    md += "\n## 6. /metrics rendering\n\n";
    md += "The exporter's update and text encoding (what a scrape does after the loop hands over \
           its snapshot) on a synthetic model: processes with their own identity, 5 APIs, a size \
           histogram and 20 four-frame sites each. First render, then the median and max of 9.\n\n";
    md += "| processes | series | response bytes | first render, ms | render ms: median (max) |\n|---:|---:|---:|---:|---:|\n";
    for f in lines("metrics") {
        md += &format!(
            "| {} | {} | {} | {} | {} ({}) |\n",
            get(&f, "processes"),
            get(&f, "series"),
            get(&f, "bytes"),
            get(&f, "first_ms"),
            get(&f, "median_ms"),
            get(&f, "max_ms"),
        );
    }
    md += "\n### Go map reads (issue 13)\n\n";
    md += "`GoState::refresh_maps` over 1,000 maps laid out in the benchmark's own memory as the \
           Go runtime lays them out, read with `process_vm_readv` as the agent and `allocwatch \
           maps` read a traced program (the agent reads at most 64 maps per process a second, \
           `maps` at most 10,000). Median and max of 51 refreshes.\n\n";
    md += "| maps | per refresh of 1,000 maps, ms: median (max) |\n|---|---:|\n";
    for f in lines("maprefresh") {
        md += &format!(
            "| {} | {} ({}) |\n",
            get(&f, "kind"),
            get(&f, "median_ms"),
            get(&f, "max_ms"),
        );
    }
    md.push('\n');
    Ok(md)
}
