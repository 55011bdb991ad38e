//! Checks that this kernel and this user can trace, so failures read as one clear sentence
//! instead of an errno from deep inside a load.

use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PreflightError {
    #[error("allocwatch needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_SYS_RESOURCE")]
    NotPrivileged,
    #[error("this kernel has no uprobe support (no {0}); it needs CONFIG_UPROBE_EVENTS=y")]
    NoUprobes(&'static str),
    #[error("this kernel exposes no BTF (no {0}); it needs CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf(&'static str),
}

const UPROBE_PMU: &str = "/sys/bus/event_source/devices/uprobe/type";
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

// Capability bit numbers from linux/capability.h.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

pub fn check() -> Result<(), PreflightError> {
    let eff = effective_caps();
    let has = |cap: u32| eff & (1 << cap) != 0;
    let bpf_ok = has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON));
    if !bpf_ok {
        return Err(PreflightError::NotPrivileged);
    }
    if !Path::new(UPROBE_PMU).exists() {
        return Err(PreflightError::NoUprobes(UPROBE_PMU));
    }
    if !Path::new(VMLINUX_BTF).exists() {
        return Err(PreflightError::NoBtf(VMLINUX_BTF));
    }
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; raising it is harmless after.
    if has(CAP_SYS_RESOURCE) {
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: valid pointer to an rlimit struct.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    }
    Ok(())
}

/// The effective capability set of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s))
        .unwrap_or(0)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\tx\nCapPrm:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }
}
