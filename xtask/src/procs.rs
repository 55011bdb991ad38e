//! Facts about a running process read from /proc (RSS, CPU time), and a free loopback port:
//! what the bench and the soak measure an agent with.

use std::{fs, process::Command};

use anyhow::anyhow;

use crate::cmd;

/// utime + stime of `pid`, in clock ticks (see [`clock_ticks`]).
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    cpu_ticks_in(&stat).ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))
}

/// utime + stime from the text of /proc/PID/stat.
fn cpu_ticks_in(stat: &str) -> Option<u64> {
    // The comm (field 2) may hold spaces and parentheses: count fields after its last ')'.
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the comm.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 when that fails, Linux's value).
pub fn clock_ticks() -> f64 {
    cmd::stdout_if_ok(Command::new("getconf").arg("CLK_TCK"))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// VmRSS of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))
}

/// A loopback port nobody listens on now (other agents, e.g. of tests, may run beside us).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_comm_with_spaces_and_parentheses() {
        let stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 3 0 9 0";
        assert_eq!(cpu_ticks_in(stat), Some(42));
        assert_eq!(cpu_ticks_in("4242 (x) S 1"), None);
    }

    #[test]
    fn own_process_has_rss_and_cpu() {
        let me = std::process::id();
        assert!(rss_kib(me).expect("VmRSS") > 0);
        cpu_ticks(me).expect("utime + stime");
    }
}
