//! Least privilege for the agent: it starts as root with the DaemonSet's capabilities, and once
//! its probes are loaded and attached it becomes user and group 65532 with no supplementary
//! groups, keeps only the capabilities its steady state needs (in its permitted, effective and
//! bounding sets) and sets no_new_privs. `--keep-privileges` (config `keep_privileges`) opts out.
//!
//! What each phase needs (measured on Linux 6.18, kernel sources for older kernels):
//! - startup: CAP_SYS_RESOURCE (RLIMIT_MEMLOCK, kernels before 5.11; raised in preflight),
//!   CAP_BPF (maps, program load), CAP_PERFMON (tracing program load), tracefs as root (the exec
//!   tracepoint's id), CAP_SYS_PTRACE (/proc of other users' processes), CAP_SYS_NICE
//!   (optional: the exec-snapshot thread's real-time priority, `daemon::exec_snapshots`);
//! - steady state: CAP_SYS_PTRACE to open `/proc/<pid>/{maps,exe,root/…}` of processes of other
//!   users (every process, once the agent is not root) — it cannot be dropped; CAP_PERFMON where
//!   new attachments go through `perf_event_open` (no uprobe_multi links before Linux 6.6); CAP_BPF
//!   where every bpf() command needs it (before 6.5 with unprivileged BPF disabled). On newer
//!   kernels map reads, map updates and uprobe_multi links work on the descriptors the agent
//!   already holds, so both are dropped.
//!
//! Credentials are per thread in Linux (glibc applies setresuid and friends to every thread of
//! the process; capset, the bounding set and no_new_privs it does not), and the tracer, the
//! symbolizer and the exec-snapshot threads already run when startup ends. So each per-thread
//! step is broadcast the way glibc broadcasts setxid (and libcap's psx, Go's AllThreadsSyscall):
//! a real-time signal to every thread whose handler makes the raw syscalls, and afterwards
//! `/proc/self/task/*/status` must show the result in every thread.

use std::{
    collections::HashSet,
    sync::atomic::{AtomicI32, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use thiserror::Error;

/// distroless' `nonroot` user and group, which owns nothing on a node.
pub const UID: u32 = 65532;
pub const GID: u32 = 65532;

// linux/capability.h
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Every capability the agent may hold at some point, with why (for error lines and the log).
const NAMES: [(u32, &str); 8] = [
    (CAP_SETGID, "CAP_SETGID"),
    (CAP_SETUID, "CAP_SETUID"),
    (CAP_SETPCAP, "CAP_SETPCAP"),
    (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
    (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    (CAP_SYS_RESOURCE, "CAP_SYS_RESOURCE"),
    (CAP_PERFMON, "CAP_PERFMON"),
    (CAP_BPF, "CAP_BPF"),
];

/// What dropping needs at startup beyond what preflight checks (CAP_BPF, CAP_PERFMON), and why.
const NEEDED_TO_DROP: [(u32, &str); 4] = [
    (
        CAP_SYS_PTRACE,
        "to read /proc/<pid>/maps, exe and root of processes of other users, which every \
         process is once the agent runs as user 65532",
    ),
    (CAP_SETUID, "to become user 65532 after startup"),
    (
        CAP_SETGID,
        "to become group 65532 and leave root's groups after startup",
    ),
    (
        CAP_SETPCAP,
        "to drop the capabilities it no longer needs from its bounding set after startup",
    ),
];

/// How long the threads get to answer one broadcast (each answers within microseconds unless
/// the machine is starved).
const ANSWER_WAIT: Duration = Duration::from_secs(5);
/// Rounds of "signal every thread not yet done": threads started meanwhile are found by the
/// next round.
const ROUNDS: usize = 20;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PrivilegeError {
    #[error(
        "the agent lacks {name}, which it needs {why} (grant it as deploy/kustomize/base/daemonset.yaml \
         does, or pass --keep-privileges to run with the privileges it starts with)"
    )]
    Missing {
        name: &'static str,
        why: &'static str,
    },
    #[error(
        "this kernel has no CAP_BPF/CAP_PERFMON (before Linux 5.8): the agent would have to keep \
         CAP_SYS_ADMIN; pass --keep-privileges"
    )]
    NoBpfCapability,
    #[error("cannot read {what}: {error}")]
    Read { what: String, error: String },
    #[error("{call} failed: {error}")]
    Call { call: &'static str, error: String },
    #[error("no free real-time signal to reach the agent's threads")]
    NoSignal,
    #[error("{threads} thread(s) did not answer within {} s", ANSWER_WAIT.as_secs())]
    Unanswered { threads: usize },
    #[error("a thread could not {what}: {error}")]
    Thread { what: &'static str, error: String },
    #[error("after dropping privileges, thread {tid} still has {what}")]
    Kept { tid: i32, what: String },
}

/// The decision taken before anything is loaded; [`Plan::apply`] carries it out after startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The capabilities kept (bit mask).
    keep: u64,
}

/// What the agent runs with after [`Plan::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub threads: usize,
    pub keep: u64,
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "running as user {UID}, group {GID}, no supplementary groups, no_new_privs, \
             capabilities (permitted, effective, bounding) {} in all {} threads",
            names(self.keep),
            self.threads
        )
    }
}

impl Plan {
    /// Checks, before anything is loaded, that this process can drop its privileges after
    /// startup, and works out what it keeps on this kernel.
    pub fn check() -> Result<Self, PrivilegeError> {
        let status = read("/proc/self/status")?;
        let eff = status_mask(&status, "CapEff").unwrap_or(0);
        let last_cap: u32 = read("/proc/sys/kernel/cap_last_cap")?
            .trim()
            .parse()
            .map_err(|e: std::num::ParseIntError| PrivilegeError::Read {
                what: "/proc/sys/kernel/cap_last_cap".into(),
                error: e.to_string(),
            })?;
        if last_cap < CAP_BPF {
            return Err(PrivilegeError::NoBpfCapability);
        }
        if let Some(&(cap, why)) = NEEDED_TO_DROP.iter().find(|(cap, _)| eff & bit(*cap) == 0) {
            return Err(PrivilegeError::Missing {
                name: name(cap),
                why,
            });
        }
        let release = read("/proc/sys/kernel/osrelease")?;
        Ok(Plan {
            keep: steady_state(kernel_version(&release)),
        })
    }

    /// Becomes [`UID`]/[`GID`] and keeps only [`Plan::keep`] in every thread. On an error the
    /// process may be half-way: the caller must exit.
    pub fn apply(self) -> Result<Dropped, PrivilegeError> {
        let last_cap = read("/proc/sys/kernel/cap_last_cap")?
            .trim()
            .parse::<u32>()
            .unwrap_or(CAP_BPF);
        KEEP.store(self.keep, Ordering::SeqCst);
        LAST_CAP.store(last_cap, Ordering::SeqCst);
        let signal = install_handler()?;
        // 1. Every thread keeps its permitted set across the change of user (the kernel empties
        //    it when all of a thread's user ids leave 0, unless keep-caps is set).
        broadcast(signal, Op::KeepCaps)?;
        // 2. glibc changes the ids of every thread.
        // SAFETY: plain syscalls with valid arguments (an empty group list).
        check_call("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
        // SAFETY: as above.
        check_call("setresgid", unsafe { libc::setresgid(GID, GID, GID) })?;
        // SAFETY: as above.
        check_call("setresuid", unsafe { libc::setresuid(UID, UID, UID) })?;
        // 3. Every thread: bounding set, no_new_privs, permitted = effective = keep.
        broadcast(signal, Op::Restrict)?;
        let threads = verify(self.keep)?;
        Ok(Dropped {
            threads,
            keep: self.keep,
        })
    }
}

/// The capabilities the agent's steady state needs on kernel `version` (major, minor).
fn steady_state(version: (u32, u32)) -> u64 {
    let mut keep = bit(CAP_SYS_PTRACE);
    // Before 6.6 there are no uprobe_multi links: new attachments are perf events of the
    // uprobe PMU, which need CAP_PERFMON.
    if version < (6, 6) {
        keep |= bit(CAP_PERFMON);
    }
    // Before 6.5 every bpf() command (map reads and deletes too) needs CAP_BPF while
    // kernel.unprivileged_bpf_disabled is set, the default of distributions.
    if version < (6, 5) {
        keep |= bit(CAP_BPF);
    }
    keep
}

fn kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn bit(cap: u32) -> u64 {
    1 << cap
}

fn name(cap: u32) -> &'static str {
    NAMES
        .iter()
        .find(|(c, _)| *c == cap)
        .map_or("CAP_?", |(_, n)| n)
}

/// `CAP_A, CAP_B` (or `none`), other bits by number.
pub fn names(mask: u64) -> String {
    let out: Vec<String> = (0..64)
        .filter(|c| mask & bit(*c) != 0)
        .map(|c| match NAMES.iter().find(|(n, _)| *n == c) {
            Some((_, s)) => (*s).to_owned(),
            None => format!("capability {c}"),
        })
        .collect();
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

fn read(path: &str) -> Result<String, PrivilegeError> {
    std::fs::read_to_string(path).map_err(|e| PrivilegeError::Read {
        what: path.into(),
        error: e.to_string(),
    })
}

fn check_call(call: &'static str, rc: libc::c_int) -> Result<(), PrivilegeError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(PrivilegeError::Call {
            call,
            error: std::io::Error::last_os_error().to_string(),
        })
    }
}

fn status_mask(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

fn status_field<'a>(status: &'a str, field: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

// ---------------------------------------------------------------------------------------------
// Every thread

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    KeepCaps = 1,
    Restrict = 2,
}

/// What the handler does; set before the signals are sent.
static OP: AtomicU8 = AtomicU8::new(0);
static KEEP: AtomicU64 = AtomicU64::new(0);
static LAST_CAP: AtomicU32 = AtomicU32::new(CAP_BPF);
/// Threads that ran the handler in the current round.
static ANSWERS: AtomicUsize = AtomicUsize::new(0);
/// The first errno a thread met, and in which step (0: none).
static FAILED_ERRNO: AtomicI32 = AtomicI32::new(0);
static FAILED_STEP: AtomicU8 = AtomicU8::new(0);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

const STEPS: [&str; 6] = [
    "",
    "set keep-caps",
    "read its capabilities",
    "drop from its bounding set",
    "set no_new_privs",
    "set its capabilities",
];

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// prctl's unused and flag arguments, at the width the kernel reads.
const NO: libc::c_ulong = 0;
const YES: libc::c_ulong = 1;

/// The calling thread's part of `OP`. Async-signal-safe: raw syscalls and atomics only, so
/// the `caps` crate's allocating helpers cannot be used here.
fn run_op() {
    fn fail(step: u8) {
        // SAFETY: reads the calling thread's errno.
        let errno = unsafe { *libc::__errno_location() };
        if FAILED_STEP
            .compare_exchange(0, step, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            FAILED_ERRNO.store(errno, Ordering::SeqCst);
        }
    }
    let op = OP.load(Ordering::SeqCst);
    // SAFETY (all calls below): prctl/capget/capset on the calling thread with valid pointers.
    unsafe {
        if op == Op::KeepCaps as u8 {
            if libc::prctl(libc::PR_SET_KEEPCAPS, YES, NO, NO, NO) != 0 {
                fail(1);
            }
            return;
        }
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
            fail(2);
            return;
        }
        // The change of user emptied the effective set: raise what is permitted (CAP_SETPCAP
        // for the bounding set) before the final set.
        for d in &mut data {
            d.effective = d.permitted;
            d.inheritable = 0;
        }
        header.pid = 0;
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
            fail(5);
            return;
        }
        let keep = KEEP.load(Ordering::SeqCst);
        for cap in 0..=LAST_CAP.load(Ordering::SeqCst).min(63) {
            if keep & (1 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(cap), NO, NO, NO) == 1
                && libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), NO, NO, NO) != 0
            {
                fail(3);
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, YES, NO, NO, NO) != 0 {
            fail(4);
        }
        let words = [keep as u32, (keep >> 32) as u32];
        for (d, w) in data.iter_mut().zip(words) {
            d.permitted &= w;
            d.effective = d.permitted;
            d.inheritable = 0;
        }
        header.pid = 0;
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
            fail(5);
        }
        if libc::prctl(libc::PR_SET_KEEPCAPS, NO, NO, NO, NO) != 0 {
            fail(1);
        }
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    // SAFETY: the thread's errno, saved and restored around the handler's syscalls.
    let saved = unsafe { *libc::__errno_location() };
    run_op();
    ANSWERS.fetch_add(1, Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}

/// A real-time signal nobody handles, with [`on_signal`] as its handler (it stays installed: a
/// late duplicate must not kill the process, which is the default action).
fn install_handler() -> Result<libc::c_int, PrivilegeError> {
    let installed = SIGNAL.load(Ordering::SeqCst);
    if installed != 0 {
        return Ok(installed);
    }
    for sig in (libc::SIGRTMIN()..=libc::SIGRTMAX()).rev() {
        // SAFETY: sigaction with valid pointers; the handler is async-signal-safe.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                || old.sa_sigaction != libc::SIG_DFL
            {
                continue;
            }
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            new.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut new.sa_mask);
            if libc::sigaction(sig, &new, std::ptr::null_mut()) == 0 {
                SIGNAL.store(sig, Ordering::SeqCst);
                return Ok(sig);
            }
        }
    }
    Err(PrivilegeError::NoSignal)
}

fn tasks() -> Result<Vec<i32>, PrivilegeError> {
    let dir = std::fs::read_dir("/proc/self/task").map_err(|e| PrivilegeError::Read {
        what: "/proc/self/task".into(),
        error: e.to_string(),
    })?;
    Ok(dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

fn task_exists(tid: i32) -> bool {
    std::path::Path::new(&format!("/proc/self/task/{tid}")).exists()
}

/// Runs `op` on this thread, then on every other thread of the process, including threads
/// started while it runs.
fn broadcast(signal: libc::c_int, op: Op) -> Result<(), PrivilegeError> {
    OP.store(op as u8, Ordering::SeqCst);
    FAILED_STEP.store(0, Ordering::SeqCst);
    FAILED_ERRNO.store(0, Ordering::SeqCst);
    run_op();
    // SAFETY: no arguments.
    let me = unsafe { libc::gettid() };
    // SAFETY: no arguments.
    let pid = unsafe { libc::getpid() };
    let mut done: HashSet<i32> = HashSet::from([me]);
    for _ in 0..ROUNDS {
        let todo: Vec<i32> = tasks()?.into_iter().filter(|t| !done.contains(t)).collect();
        if todo.is_empty() {
            break;
        }
        ANSWERS.store(0, Ordering::SeqCst);
        let mut sent = Vec::new();
        for tid in todo {
            // SAFETY: tgkill to a thread of this process.
            let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) };
            if rc == 0 {
                sent.push(tid);
            }
            // ESRCH: the thread has exited.
            done.insert(tid);
        }
        let deadline = Instant::now() + ANSWER_WAIT;
        while ANSWERS.load(Ordering::SeqCst) < sent.len() {
            if Instant::now() > deadline {
                let alive = sent.iter().filter(|t| task_exists(**t)).count();
                if ANSWERS.load(Ordering::SeqCst) < alive {
                    return Err(PrivilegeError::Unanswered {
                        threads: alive - ANSWERS.load(Ordering::SeqCst),
                    });
                }
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let step = FAILED_STEP.load(Ordering::SeqCst);
    if step != 0 {
        return Err(PrivilegeError::Thread {
            what: STEPS[usize::from(step).min(STEPS.len() - 1)],
            error: std::io::Error::from_raw_os_error(FAILED_ERRNO.load(Ordering::SeqCst))
                .to_string(),
        });
    }
    Ok(())
}

/// Every thread's status must show the new user, group, groups and capabilities; returns the
/// number of threads.
fn verify(keep: u64) -> Result<usize, PrivilegeError> {
    let mut n = 0;
    let ids = format!("{UID}\t{UID}\t{UID}\t{UID}");
    let gids = format!("{GID}\t{GID}\t{GID}\t{GID}");
    for tid in tasks()? {
        let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
            continue; // exited
        };
        n += 1;
        let kept = |what: String| PrivilegeError::Kept { tid, what };
        if status_field(&status, "Uid") != Some(ids.as_str()) {
            return Err(kept(format!("user ids {:?}", status_field(&status, "Uid"))));
        }
        if status_field(&status, "Gid") != Some(gids.as_str()) {
            return Err(kept(format!(
                "group ids {:?}",
                status_field(&status, "Gid")
            )));
        }
        if status_field(&status, "Groups").is_some_and(|g| !g.is_empty()) {
            return Err(kept(format!(
                "groups {:?}",
                status_field(&status, "Groups")
            )));
        }
        if status_field(&status, "NoNewPrivs") != Some("1") {
            return Err(kept("no no_new_privs".into()));
        }
        for field in ["CapPrm", "CapEff", "CapBnd", "CapInh", "CapAmb"] {
            let mask = status_mask(&status, field).unwrap_or(u64::MAX);
            // A thread may hold less than `keep` (one started between two steps), never more.
            if mask & !keep != 0 {
                return Err(kept(format!("{field} {}", names(mask & !keep))));
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_state_by_kernel() {
        let ptrace = bit(CAP_SYS_PTRACE);
        assert_eq!(steady_state((6, 18)), ptrace);
        assert_eq!(steady_state((6, 6)), ptrace);
        assert_eq!(steady_state((6, 5)), ptrace | bit(CAP_PERFMON));
        assert_eq!(
            steady_state((5, 15)),
            ptrace | bit(CAP_PERFMON) | bit(CAP_BPF)
        );
        assert_eq!(kernel_version("6.18.44-fc-v1147\n"), (6, 18));
        assert_eq!(kernel_version("5.10.0-28-amd64"), (5, 10));
    }

    #[test]
    fn names_of_masks() {
        assert_eq!(names(0), "none");
        assert_eq!(names(bit(CAP_SYS_PTRACE)), "CAP_SYS_PTRACE");
        assert_eq!(
            names(bit(CAP_BPF) | bit(CAP_SETUID) | bit(1)),
            "capability 1, CAP_SETUID, CAP_BPF"
        );
    }

    #[test]
    fn status_fields() {
        let s = "Uid:\t0\t0\t0\t0\nCapEff:\t000000c000080000\nNoNewPrivs:\t1\nGroups:\t\n";
        assert_eq!(
            status_mask(s, "CapEff"),
            Some(bit(CAP_SYS_PTRACE) | bit(CAP_PERFMON) | bit(CAP_BPF))
        );
        assert_eq!(status_field(s, "Uid"), Some("0\t0\t0\t0"));
        assert_eq!(status_field(s, "Groups"), Some(""));
        assert_eq!(status_field(s, "Gid"), None);
    }
}
