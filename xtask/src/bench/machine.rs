//! `./x bench`, machine facts.

use super::*;

pub(super) fn machine_facts(b: &Bench) -> anyhow::Result<String> {
    let first = |cmd: &mut Command| {
        cmd::stdout_if_ok(cmd)
            .and_then(|s| s.lines().next().map(str::to_owned))
            .unwrap_or_else(|| "?".into())
    };
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let mem_kib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = String::from("## Machine\n\n| | |\n|---|---|\n");
    writeln!(
        md,
        "| kernel | {} |",
        first(Command::new("uname").arg("-r"))
    )?;
    writeln!(md, "| CPU | {cpus} × {cpu} |")?;
    writeln!(md, "| memory | {} MiB |", mem_kib / 1024)?;
    writeln!(
        md,
        "| glibc | {} |",
        first(Command::new("ldd").arg("--version"))
    )?;
    writeln!(md, "| libc probed | {} |", libc_path(&b.alloc_bench)?)?;
    writeln!(
        md,
        "| bpftrace | {} |",
        first(Command::new("bpftrace").arg("--version"))
    )?;
    writeln!(
        md,
        "| allocwatch | {} |",
        first(Command::new(&b.bin).arg("--version"))
    )?;
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    writeln!(md, "| load average at start | {} |\n", load.trim())?;
    Ok(md)
}

/// The line under a table: the 1-minute load average at the start of each repetition.
pub fn load_line(loads: &[f64]) -> String {
    let loads: Vec<String> = loads.iter().map(|l| format!("{l:.2}")).collect();
    format!(
        "1-minute load average at the start of each repetition: {}.\n\n",
        loads.join(", ")
    )
}
