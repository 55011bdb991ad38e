//! What `/proc/<pid>/` says about a process: its stat line (state, flags, start time), comm,
//! executable, thread group; whether it is still there; a pidfd to wait for its exit. The one
//! place that parses these files (the memory map is `target::maps`).

use std::{
    fs, io,
    os::fd::{FromRawFd as _, OwnedFd},
    path::PathBuf,
};

/// `PF_KTHREAD` in the flags field of `/proc/PID/stat` (include/linux/sched.h).
pub const PF_KTHREAD: u64 = 0x0020_0000;
/// `PF_EXITING`: in `do_exit`, its memory (and so `/proc/PID/exe`) possibly released already.
pub const PF_EXITING: u64 = 0x0000_0004;

/// The fields of `/proc/<pid>/stat` allocwatch reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    /// `R`, `S`, `D`, `Z` (zombie), `X` (dead), …
    pub state: char,
    /// Field 9: `PF_*` flags.
    pub flags: u64,
    /// Field 22: start time in clock ticks since boot (tells pid reuse apart).
    pub start_time: Option<u64>,
}

impl Stat {
    /// Gone for good or waiting to be reaped.
    pub fn exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }

    /// Exited, or on its way out (nothing of it can be read any more, its records can).
    pub fn ending(&self) -> bool {
        self.exited() || self.flags & PF_EXITING != 0
    }
}

/// Parses a stat line: `pid (comm) S ppid …`, where comm may hold spaces and parentheses (so
/// it ends at the last `)`).
pub fn parse_stat(stat: &str) -> Option<Stat> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let mut fields = stat[close + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state: ppid, pgrp, session, tty_nr, tpgid, then flags (field 9).
    let flags = fields.nth(5)?.parse().ok()?;
    // Field 22, 13 fields after the flags.
    let start_time = fields.nth(12).and_then(|f| f.parse().ok());
    Some(Stat {
        comm,
        state,
        flags,
        start_time,
    })
}

/// `/proc/<pid>/stat`, parsed; `None` when the process is gone (or the line unreadable).
pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether `pid` is gone or a zombie.
pub fn has_exited(pid: u32) -> bool {
    stat(pid).is_none_or(|s| s.exited())
}

/// Whether `pid` has exited but is not reaped yet (state Z).
pub fn is_zombie(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.state == 'Z')
}

/// Whether `pid` is gone, a zombie, or exiting ([`Stat::ending`]).
pub fn is_ending(pid: u32) -> bool {
    stat(pid).is_none_or(|s| s.ending())
}

/// Whether `pid` is a kernel thread (no executable, never allocates through libc).
pub fn is_kernel_thread(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.flags & PF_KTHREAD != 0)
}

/// The start time of `pid` (field 22 of its stat line), `None` when it is gone.
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid)?.start_time
}

/// The thread group (process) of a task, from its `/proc/<pid>/status` text.
pub fn parse_tgid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// `/proc/<pid>/status`'s `Tgid:`.
pub fn tgid(pid: u32) -> Option<u32> {
    parse_tgid(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// `/proc/<pid>/comm` without its newline.
pub fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// `/proc/<pid>/cgroup` (one line per hierarchy; cgroup v2 has one, `0::/path`).
pub fn cgroup(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()
}

/// `/proc/<pid>/exe`: the path of the process's executable, a link the agent can open.
/// Every pid in /proc (none if it cannot be read).
pub fn pids() -> impl Iterator<Item = u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

pub fn exe_link(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/exe"))
}

/// What `/proc/<pid>/exe` points to (as the process sees it).
pub fn exe(pid: u32) -> io::Result<PathBuf> {
    fs::read_link(exe_link(pid))
}

/// Whether `pid` exists (signal 0; a zombie exists).
pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// A pidfd of `pid`: readable once it exits.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat() {
        let stat = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 3 0 0";
        let st = parse_stat(stat).unwrap();
        assert_eq!(st.comm, "kthreadd");
        assert_eq!(st.state, 'S');
        assert_eq!(st.flags, 2_129_984);
        assert_eq!(st.start_time, Some(3));
        assert!(st.flags & PF_KTHREAD != 0);
        let odd = "77 (a) b (c) Z 1 77 77 0 -1 4194560 0";
        let st = parse_stat(odd).unwrap();
        assert_eq!((st.comm.as_str(), st.state), ("a) b (c", 'Z'));
        assert_eq!(st.start_time, None);
        assert!(st.exited());
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_tgid("Name:\tkthreadd\nTgid:\t2\n"), Some(2));
        assert_eq!(parse_tgid("Tgid: x"), None);
    }

    #[test]
    fn own_process() {
        let me = std::process::id();
        let t = start_time(me).unwrap();
        assert!(t > 0);
        assert_eq!(start_time(me), Some(t));
        assert_eq!(start_time(0x7fff_fff0), None);
        assert!(!has_exited(me));
        assert!(has_exited(0x7fff_fff0));
        assert!(!is_zombie(me));
        assert_eq!(tgid(me), Some(me));
        assert!(alive(me));
        assert_eq!(exe(me).unwrap(), std::env::current_exe().unwrap());
    }

    #[test]
    fn zombie_child() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Generous: a loaded machine may take long to run `true`.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !is_zombie(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(is_zombie(pid));
        assert!(has_exited(pid));
        assert!(alive(pid), "a zombie still exists");
        child.wait().unwrap();
        assert!(has_exited(pid));
    }
}
