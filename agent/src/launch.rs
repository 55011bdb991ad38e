//! Starting the traced command so that probes are attached before its first instruction.
//!
//! `std::process::Command::spawn` returns only after `exec`, too late to attach. So the child is
//! forked by hand and parked on a pipe: the agent attaches its probes to the child's pid (the
//! kernel keeps a pid-scoped uprobe across `exec`), then releases it to `execvp`.
//!
//! The child also asks to be traced (`PTRACE_TRACEME`) so that the kernel stops it right after a
//! successful exec, before its first instruction: the agent snapshots its executable mapping
//! there (a short command can otherwise exit before the agent gets the CPU back), then detaches
//! and the command runs untraced by ptrace from then on.

use std::{
    ffi::{CString, OsStr},
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("empty command")]
    Empty,
    #[error("command argument contains a NUL byte")]
    Nul,
    #[error("cannot start {cmd}: {source}")]
    Fork { cmd: String, source: io::Error },
    #[error("cannot run {cmd}: {source}")]
    Exec { cmd: String, source: io::Error },
}

/// A forked child waiting to `exec` the command.
#[derive(Debug)]
pub struct Parked {
    pid: u32,
    cmd: String,
    go: Option<OwnedFd>,
    exec_status: OwnedFd,
}

/// Forks a child that waits until [`Parked::release`] and then execs `argv` (searched in PATH).
pub fn park(argv: &[String]) -> Result<Parked, LaunchError> {
    let cmd = argv.first().ok_or(LaunchError::Empty)?.clone();
    // Everything the child needs is allocated before fork: between fork and exec only
    // async-signal-safe calls are allowed.
    let c_argv = argv
        .iter()
        .map(|a| CString::new(OsStr::new(a).as_bytes()).map_err(|_| LaunchError::Nul))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ptrs: Vec<*const libc::c_char> = c_argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());

    let fork_err = |source| LaunchError::Fork {
        cmd: cmd.clone(),
        source,
    };
    let (go_r, go_w) = pipe().map_err(fork_err)?;
    let (st_r, st_w) = pipe().map_err(fork_err)?;

    // SAFETY: the child only calls async-signal-safe functions (close, read, execvp, write,
    // _exit) on memory prepared above.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(fork_err(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            libc::close(go_w.as_raw_fd());
            libc::close(st_r.as_raw_fd());
            let mut b = 0u8;
            if libc::read(go_r.as_raw_fd(), (&raw mut b).cast(), 1) == 1
                && libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) == 0
            {
                libc::execvp(ptrs[0], ptrs.as_ptr());
                let errno = *libc::__errno_location();
                let bytes = errno.to_ne_bytes();
                libc::write(st_w.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
            }
            libc::_exit(127);
        }
    }
    drop(go_r);
    drop(st_w);
    Ok(Parked {
        pid: pid as u32,
        cmd,
        go: Some(go_w),
        exec_status: st_r,
    })
}

impl Parked {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Lets the child exec; returns once the exec succeeded (the child is then stopped right
    /// after it: see [`Stopped`]) or failed.
    pub fn release(mut self) -> Result<Stopped, LaunchError> {
        let go = self.go.take().expect("released once");
        // SAFETY: writing one byte from a valid buffer to an owned fd.
        unsafe { libc::write(go.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        drop(go);
        // The status pipe is close-on-exec: EOF means the exec succeeded, 4 bytes are its errno.
        let mut buf = [0u8; 4];
        let n = loop {
            // SAFETY: reading into a valid 4-byte buffer from an owned fd.
            let n = unsafe {
                libc::read(
                    self.exec_status.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break n;
            }
        };
        if n == 4 {
            reap(self.pid);
            return Err(LaunchError::Exec {
                cmd: self.cmd.clone(),
                source: io::Error::from_raw_os_error(i32::from_ne_bytes(buf)),
            });
        }
        // The exec succeeded: wait for the stop it causes in a traced child.
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(self.pid as i32, &mut status, 0) };
        if r != self.pid as i32 || !libc::WIFSTOPPED(status) {
            // Killed before its first instruction; the session reports its exit.
            return Ok(Stopped {
                pid: self.pid,
                stopped: false,
            });
        }
        Ok(Stopped {
            pid: self.pid,
            stopped: true,
        })
    }
}

/// A launched command stopped right after its exec: its executable is mapped, nothing of it
/// has run. Dropping it (or [`Stopped::resume`]) lets it run.
#[derive(Debug)]
pub struct Stopped {
    pid: u32,
    stopped: bool,
}

impl Stopped {
    #[cfg(test)]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Lets the command run, stopped at each of its system calls, until `ready` holds (asked
    /// before it runs and at each stop); at most [`MAX_SYSCALL_STOPS`] stops. ld.so maps the
    /// libraries in system calls before any code of theirs or the program's runs, so this is
    /// how a table of libc gets in before the program's first call into it. Returns whether
    /// `ready` held; the command is then stopped, else it may have run on or exited (its exit
    /// is left for the session to reap).
    pub fn run_until(&mut self, mut ready: impl FnMut() -> bool) -> bool {
        if ready() {
            return true;
        }
        if !self.stopped {
            return false;
        }
        let pid = self.pid as i32;
        // SAFETY: ptrace on our own stopped tracee; syscall stops then carry SIGTRAP | 0x80.
        unsafe {
            libc::ptrace(
                libc::PTRACE_SETOPTIONS,
                pid,
                0,
                libc::PTRACE_O_TRACESYSGOOD as usize,
            )
        };
        let mut signal = 0;
        for _ in 0..MAX_SYSCALL_STOPS {
            // SAFETY: as above; `signal` is one the command got while stopped, passed on.
            if unsafe { libc::ptrace(libc::PTRACE_SYSCALL, pid, 0, signal as usize) } != 0 {
                self.stopped = false;
                return false;
            }
            signal = 0;
            match next_stop(pid) {
                Some(s) if s == libc::SIGTRAP | 0x80 => {
                    if ready() {
                        return true;
                    }
                }
                // An exec's own SIGTRAP (the command runs another program) is not passed
                // on: it would kill it.
                Some(libc::SIGTRAP) => {}
                Some(s) => signal = s,
                None => {
                    self.stopped = false;
                    return false;
                }
            }
        }
        false
    }

    /// Detaches (ptrace) and lets the command run.
    pub fn resume(mut self) {
        self.detach();
    }

    fn detach(&mut self) {
        if std::mem::take(&mut self.stopped) {
            // SAFETY: detaching our own stopped tracee, with no signal to deliver.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, self.pid as i32, 0, 0) };
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.detach();
    }
}

impl Drop for Parked {
    /// A child never released (attach failed) exits without running the command.
    fn drop(&mut self) {
        if self.go.take().is_some() {
            reap(self.pid);
        }
    }
}

/// System-call stops [`Stopped::run_until`] waits at most (entry and exit count one each):
/// ld.so maps a program's libraries in a few dozen system calls (about 30 for a C program
/// linked to libc only).
pub const MAX_SYSCALL_STOPS: usize = 2_000;

/// Waits for the traced child's next ptrace stop: its signal, or `None` when it exited (the
/// exit is not reaped: the session reads its code).
fn next_stop(pid: i32) -> Option<i32> {
    loop {
        // SAFETY: a zeroed siginfo for waitid to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // Peeked (WNOWAIT): an exit stays for the session to reap.
        // SAFETY: waiting for our own child into a valid siginfo.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WSTOPPED | libc::WNOWAIT,
            )
        };
        if r != 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return None;
        }
        if info.si_code != libc::CLD_TRAPPED && info.si_code != libc::CLD_STOPPED {
            return None;
        }
        let mut status = 0;
        // SAFETY: consuming the stop just seen, of our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        return (r == pid && libc::WIFSTOPPED(status)).then(|| libc::WSTOPSIG(status));
    }
}

fn reap(pid: u32) {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid as i32, &mut status, 0) };
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh fds we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_after_release() {
        let parked = park(&["true".to_string()]).unwrap();
        let pid = parked.pid();
        let stopped = parked.release().unwrap();
        assert_eq!(stopped.pid(), pid);
        // Stopped after exec: the executable is mapped.
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        assert!(maps.contains("/true"), "{maps}");
        stopped.resume();
        let mut status = 0;
        // SAFETY: our child.
        unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    fn libc_text_mapped(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("/libc.so") && l.split_whitespace().nth(1) == Some("r-xp"))
    }

    /// Stopped at exec, libc is not mapped yet; run to its mapping, it is, and the command
    /// then runs to its end as usual.
    #[test]
    fn runs_until_libc_is_mapped() {
        let parked = park(&["true".to_string()]).unwrap();
        let pid = parked.pid();
        let mut stopped = parked.release().unwrap();
        assert!(!libc_text_mapped(pid), "not before ld.so runs");
        assert!(stopped.run_until(|| libc_text_mapped(pid)));
        assert!(libc_text_mapped(pid));
        stopped.resume();
        let mut status = 0;
        // SAFETY: our child.
        unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    /// A condition that never holds: the command runs on (or exits) and its exit code is
    /// still there to reap.
    #[test]
    fn run_until_leaves_the_exit_to_reap() {
        let parked = park(&["false".to_string()]).unwrap();
        let pid = parked.pid();
        let mut stopped = parked.release().unwrap();
        assert!(!stopped.run_until(|| false));
        stopped.resume();
        let mut status = 0;
        // SAFETY: our child.
        unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 1);
    }

    #[test]
    fn exec_failure_is_reported() {
        let parked = park(&["/nonexistent/allocwatch-test".to_string()]).unwrap();
        let err = parked.release().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot run /nonexistent/allocwatch-test: No such file"),
            "{err}"
        );
    }

    #[test]
    fn dropped_child_does_not_run() {
        let parked = park(&["false".to_string()]).unwrap();
        drop(parked);
    }
}
