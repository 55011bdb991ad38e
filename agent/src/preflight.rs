//! Checks that this kernel and this user can trace, so failures read as one clear sentence
//! instead of an errno from deep inside a load.

use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PreflightError {
    #[error(
        "allocwatch needs root, or the capabilities CAP_BPF and CAP_PERFMON (this process lacks \
         {missing}): run it as root (sudo allocwatch …), or grant them (`setcap \
         cap_bpf,cap_perfmon,cap_sys_resource+ep` on the binary, or the container's \
         capabilities)"
    )]
    NotPrivileged { missing: String },
    #[error(
        "this kernel has no uprobe support (no {0}): allocwatch needs a kernel built with \
         CONFIG_UPROBES=y and CONFIG_UPROBE_EVENTS=y"
    )]
    NoUprobes(&'static str),
    #[error(
        "this kernel exposes no BTF (no {0}): allocwatch needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (in a container, the host's /sys/kernel/btf must be visible)"
    )]
    NoBtf(&'static str),
    #[error(
        "the locked-memory limit is {limit_kib} KiB and this kernel ({kernel}, before 5.11) \
         charges eBPF maps to it: raise it (`ulimit -l unlimited`, LimitMEMLOCK=infinity in a \
         systemd unit), or grant CAP_SYS_RESOURCE so that allocwatch raises it itself"
    )]
    Memlock { limit_kib: u64, kernel: String },
    #[error(
        "kernel.perf_event_paranoid is {level} (a Debian/Ubuntu level above 2), at which the \
         kernel refuses perf_event_open to a process without CAP_SYS_ADMIN, even with \
         CAP_PERFMON; this kernel has no uprobe multi-links, so every probe would be one: grant \
         CAP_SYS_ADMIN, or set `sysctl kernel.perf_event_paranoid=2`"
    )]
    PerfParanoid { level: i32 },
    #[error(
        "this kernel ({kernel}) lacks {feature}, which allocwatch needs (Linux ≥ {since}; \
         kernel features: {summary})"
    )]
    Lacks {
        kernel: String,
        feature: &'static str,
        since: &'static str,
        summary: String,
    },
}

/// What this kernel offers of the BPF features allocwatch uses or could use, probed once (each
/// probe loads a tiny program or map; they need the privileges checked first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// BPF ring buffers (5.8): every event goes through one. Required.
    pub ring_buffer: bool,
    /// `bpf_get_attach_cookie` for uprobes (5.15): which function and site fired. Required.
    pub cookies: bool,
    /// Uprobe multi-links (6.6): one link per file; without them one perf-event link per
    /// probe site (the probe's `_single` programs).
    pub uprobe_multi: bool,
    /// `bpf_loop` (5.17): the table walk (`--unwind dwarf|auto`) goes 64 frames deep with it,
    /// 16 without.
    pub bpf_loop: bool,
    /// `bpf_map_lookup_percpu_elem` (5.19): the agent splits a process's size histograms at
    /// exec with it (without, what a program ran before an exec stays with the pid's next
    /// program).
    pub percpu_lookup: bool,
    /// Kernel BTF at /sys/kernel/btf/vmlinux. Required.
    pub btf: bool,
}

impl Features {
    fn probe() -> Self {
        use aya::{
            maps::MapType,
            programs::ProgramType,
            sys::{BpfHelper, UProbeMultiFeature},
        };
        let helper = |h| aya::sys::is_helper_supported(ProgramType::KProbe, h).unwrap_or(false);
        Self {
            ring_buffer: aya::sys::is_map_supported(MapType::RingBuf).unwrap_or(false),
            cookies: helper(BpfHelper::BPF_FUNC_get_attach_cookie),
            // The variable lets a newer kernel run (and test) the per-site path of older ones.
            uprobe_multi: std::env::var_os("ALLOCWATCH_NO_UPROBE_MULTI").is_none()
                && aya::sys::is_uprobe_multi_supported(UProbeMultiFeature::LinkCreation)
                    .unwrap_or(false),
            // The variable lets a newer kernel run (and test) the 16-frame table walk of older
            // ones.
            bpf_loop: std::env::var_os("ALLOCWATCH_NO_BPF_LOOP").is_none()
                && helper(BpfHelper::BPF_FUNC_loop),
            percpu_lookup: helper(BpfHelper::BPF_FUNC_map_lookup_percpu_elem),
            btf: Path::new(VMLINUX_BTF).exists(),
        }
    }

    /// `ring buffer yes, BPF cookies yes, …` (the `kernel features:` line at start).
    pub fn summary(&self) -> String {
        self.list()
            .iter()
            .map(|(name, _, has)| format!("{name} {}", if *has { "yes" } else { "no" }))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// (name, Linux version that brought it, present).
    fn list(&self) -> [(&'static str, &'static str, bool); 6] {
        [
            ("ring buffer", "5.8", self.ring_buffer),
            ("BPF cookies", "5.15", self.cookies),
            ("bpf_loop", "5.17", self.bpf_loop),
            ("per-CPU lookup", "5.19", self.percpu_lookup),
            ("uprobe multi-links", "6.6", self.uprobe_multi),
            ("BTF", "CONFIG_DEBUG_INFO_BTF", self.btf),
        ]
    }

    /// The first required feature missing, as the refusal.
    fn refusal(&self, kernel: &str) -> Option<PreflightError> {
        let (feature, since) = if !self.ring_buffer {
            ("BPF ring buffers", "5.8")
        } else if !self.cookies {
            ("BPF cookies on uprobes (bpf_get_attach_cookie)", "5.15")
        } else {
            return None;
        };
        Some(PreflightError::Lacks {
            kernel: kernel.to_owned(),
            feature,
            since,
            summary: self.summary(),
        })
    }
}

/// This kernel's features (probed on first use).
pub fn features() -> Features {
    static FEATURES: std::sync::OnceLock<Features> = std::sync::OnceLock::new();
    *FEATURES.get_or_init(Features::probe)
}

const UPROBE_PMU: &str = "/sys/bus/event_source/devices/uprobe/type";
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Where aya looks for tracefs (the exec tracepoint's id), in its order.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

// Capability bit numbers from linux/capability.h.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

pub fn check() -> Result<(), PreflightError> {
    let eff = effective_caps();
    privileges(eff)?;
    if !Path::new(UPROBE_PMU).exists() {
        return Err(PreflightError::NoUprobes(UPROBE_PMU));
    }
    if !Path::new(VMLINUX_BTF).exists() {
        return Err(PreflightError::NoBtf(VMLINUX_BTF));
    }
    let has_sys_resource = eff & (1 << CAP_SYS_RESOURCE) != 0;
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; raising it is harmless after.
    if has_sys_resource {
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: valid pointer to an rlimit struct.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    }
    raise_nofile(has_sys_resource);
    let release = kernel_release();
    memlock(&release, has_sys_resource, memlock_limit())?;
    let features = features();
    log::info!("kernel {release}: kernel features: {}", features.summary());
    if let Some(refusal) = features.refusal(&release) {
        return Err(refusal);
    }
    let paranoid = perf_event_paranoid();
    if paranoid_blocks_perf(paranoid, eff) && !features.uprobe_multi {
        return Err(PreflightError::PerfParanoid {
            level: paranoid.unwrap_or_default(),
        });
    }
    Ok(())
}

/// `kernel.perf_event_paranoid`, if readable.
fn perf_event_paranoid() -> Option<i32> {
    std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether the kernel refuses `perf_event_open` to a process with the effective capabilities
/// `eff`: Debian's and Ubuntu's out-of-tree levels 3 and 4 (their default,
/// CONFIG_SECURITY_PERF_EVENTS_RESTRICT) check `capable(CAP_SYS_ADMIN)`, not CAP_PERFMON.
/// Measured on Debian's 6.1: the agent with the DaemonSet's capabilities attached nothing.
fn paranoid_blocks_perf(level: Option<i32>, eff: u64) -> bool {
    level.is_some_and(|l| l > 2) && eff & (1 << CAP_SYS_ADMIN) == 0
}

/// Problems the agent can run with, each a warning line saying what to do about it (the
/// one-shot commands keep stderr to their one line; `--log-level info` shows the features).
pub fn agent_warnings() -> Vec<String> {
    let mut out = Vec::new();
    if !features().uprobe_multi {
        let why = if std::env::var_os("ALLOCWATCH_NO_UPROBE_MULTI").is_some() {
            "ALLOCWATCH_NO_UPROBE_MULTI is set".to_owned()
        } else {
            format!(
                "this kernel ({}) has no uprobe multi-links (Linux ≥ 6.6)",
                kernel_release()
            )
        };
        out.push(format!(
            "{why}: each probe site gets its own perf-event link (attaching takes longer, same \
             counts)"
        ));
    }
    let paranoid = perf_event_paranoid();
    if features().uprobe_multi && paranoid_blocks_perf(paranoid, effective_caps()) {
        out.push(format!(
            "kernel.perf_event_paranoid is {} and this process lacks CAP_SYS_ADMIN: the kernel \
             refuses the exec tracepoint (a perf event), so execs are seen only by the /proc \
             scan and a program that lives a few milliseconds may go unnamed; grant \
             CAP_SYS_ADMIN or set `sysctl kernel.perf_event_paranoid=2`",
            paranoid.unwrap_or_default()
        ));
    }
    if !TRACEFS.iter().any(|d| Path::new(d).join("events").is_dir()) {
        out.push(format!(
            "tracefs is not mounted (no {}/events): the agent cannot see execs as they happen; \
             mount it with `mount -t tracefs nodev {}` (in a pod: mount the host's {})",
            TRACEFS[0], TRACEFS[0], TRACEFS[0]
        ));
    }
    out
}

/// Root (CAP_SYS_ADMIN), or CAP_BPF with CAP_PERFMON (uprobes are perf events).
fn privileges(eff: u64) -> Result<(), PreflightError> {
    let has = |cap: u32| eff & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return Ok(());
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|&(cap, _)| !has(cap))
        .map(|(_, name)| name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(PreflightError::NotPrivileged {
        missing: missing.join(" and "),
    })
}

/// Before 5.11 every map counts against RLIMIT_MEMLOCK; the default maps need over 100 MiB,
/// far above the usual 64 KiB or 8 MiB defaults. Without CAP_SYS_RESOURCE nothing can raise
/// it here, so anything short of unlimited is refused with what to do.
fn memlock(
    release: &str,
    has_sys_resource: bool,
    limit: Option<u64>,
) -> Result<(), PreflightError> {
    let version: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .filter_map(|p| p.parse().ok())
        .collect();
    let before_5_11 = matches!(version.as_slice(), [major, minor] if (*major, *minor) < (5, 11));
    match limit {
        Some(bytes) if before_5_11 && !has_sys_resource => Err(PreflightError::Memlock {
            limit_kib: bytes / 1024,
            kernel: release.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Kernels without uprobe multi-links (before 6.6) take one perf-event file descriptor per
/// probe site: the agent's probes of every libc and Go program on a busy node can need
/// thousands, beyond the usual soft limit of 1,024 (that of a VM's init, for one). The soft limit
/// goes up to the hard one, as Go's runtime does for its programs; with CAP_SYS_RESOURCE the
/// hard one goes up to `fs.nr_open` (at most 1 Mi) first. Best effort: a refusal leaves the
/// limits as they were, and a failing attach says why.
fn raise_nofile(has_sys_resource: bool) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return;
    }
    if has_sys_resource {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
            .unwrap_or(r.rlim_max)
            .min(1 << 20);
        if nr_open > r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: nr_open,
                rlim_max: nr_open,
            };
            // SAFETY: as above.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                return;
            }
        }
    }
    if r.rlim_cur < r.rlim_max {
        r.rlim_cur = r.rlim_max;
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    }
}

/// The soft RLIMIT_MEMLOCK in bytes; None when unlimited.
fn memlock_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0
        || r.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(r.rlim_cur)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
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
    fn perf_paranoid_levels_above_two_want_sys_admin() {
        let perfmon = (1 << CAP_BPF) | (1 << CAP_PERFMON);
        assert!(paranoid_blocks_perf(Some(3), perfmon));
        assert!(paranoid_blocks_perf(Some(4), perfmon));
        assert!(!paranoid_blocks_perf(Some(2), perfmon));
        assert!(!paranoid_blocks_perf(
            Some(3),
            perfmon | (1 << CAP_SYS_ADMIN)
        ));
        assert!(!paranoid_blocks_perf(None, perfmon));
    }

    /// A soft limit of 512 (the usual 1,024 of a shell or an init, lowered) goes up to the hard
    /// limit, which needs no capability. Runs in the test process; raising is harmless there.
    #[test]
    fn the_soft_open_files_limit_goes_up_to_the_hard_one() {
        let get = || {
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: valid pointer to an rlimit struct.
            assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
            r
        };
        let hard = get().rlim_max;
        if hard <= 512 {
            return;
        }
        let low = libc::rlimit {
            rlim_cur: 512,
            rlim_max: hard,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        raise_nofile(false);
        let r = get();
        assert_eq!((r.rlim_cur, r.rlim_max), (hard, hard));
    }

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\tx\nCapPrm:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }

    #[test]
    fn privileges_name_what_is_missing() {
        assert_eq!(privileges(1 << CAP_SYS_ADMIN), Ok(()));
        assert_eq!(privileges((1 << CAP_BPF) | (1 << CAP_PERFMON)), Ok(()));
        let err = privileges(1 << CAP_BPF).unwrap_err();
        assert_eq!(
            err,
            PreflightError::NotPrivileged {
                missing: "CAP_PERFMON".into()
            }
        );
        let err = privileges(0).unwrap_err().to_string();
        assert!(
            err.contains("lacks CAP_BPF and CAP_PERFMON") && err.contains("sudo"),
            "{err}"
        );
    }

    #[test]
    fn missing_required_features_are_refused_by_name() {
        let all = Features {
            ring_buffer: true,
            cookies: true,
            uprobe_multi: true,
            bpf_loop: true,
            percpu_lookup: true,
            btf: true,
        };
        assert_eq!(all.refusal("6.18.0"), None);
        let old = Features {
            uprobe_multi: false,
            ..all
        };
        assert_eq!(old.refusal("6.1.0"), None);
        assert_eq!(
            old.summary(),
            "ring buffer yes, BPF cookies yes, bpf_loop yes, per-CPU lookup yes, uprobe multi-links no, \
             BTF yes"
        );
        let err = Features {
            cookies: false,
            ..old
        }
        .refusal("5.10.0-28-amd64")
        .expect("refused")
        .to_string();
        assert!(
            err.contains("lacks BPF cookies") && err.contains("Linux ≥ 5.15"),
            "{err}"
        );
    }

    #[test]
    fn memlock_matters_before_5_11_only() {
        assert_eq!(memlock("6.18.44-fc-v1147", false, Some(65536)), Ok(()));
        assert_eq!(memlock("5.11.0", false, Some(65536)), Ok(()));
        assert_eq!(memlock("5.10.0-28-amd64", false, None), Ok(()));
        assert_eq!(memlock("5.10.0-28-amd64", true, Some(65536)), Ok(()));
        let err = memlock("5.10.0-28-amd64", false, Some(65536)).unwrap_err();
        assert_eq!(
            err,
            PreflightError::Memlock {
                limit_kib: 64,
                kernel: "5.10.0-28-amd64".into()
            }
        );
        assert!(err.to_string().contains("ulimit -l unlimited"), "{err}");
        assert!(
            memlock("4.19.0", false, Some(8 << 20))
                .unwrap_err()
                .to_string()
                .contains("8192 KiB")
        );
    }
}
