//! Snapshots of programs' memory maps at their exec, on a thread of their own: the symbolizer
//! can only name a process's addresses from maps read while it runs, a program can exit within
//! a millisecond of its exec, and the daemon's loop may be busy then (a scrape symbolizing, a
//! scan deleting rows). The exec record in the main ring stays where it is: its order among the
//! process's other records splits what the old and new program did.
//!
//! The thread runs at the lowest real-time priority (SCHED_FIFO 1) where the agent may set it
//! (CAP_SYS_NICE at startup): on a node whose CPUs are busy, a normal thread woke a few
//! milliseconds after the exec, and a program that lives that long was gone with its maps
//! (measured: the agent test `sites_are_named_after_the_fixture_functions` under two busy
//! loops on 2 CPUs, 92 frames `process_gone`). Its work per exec is bounded (a /proc read and a
//! few opens), and the kernel's real-time throttling caps it in any case.

use std::{
    collections::VecDeque,
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};

use crate::symbolize::SymbolizerHandle;

/// Stops the thread when dropped.
pub struct ExecSnapshots {
    stop: Arc<AtomicBool>,
}

impl Drop for ExecSnapshots {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How long the thread waits for a notification before it looks at its stop flag.
const POLL_MS: i32 = 200;

/// After the snapshot at exec, the maps are read again this long after it: at exec only the
/// program and ld.so are mapped, and a program that lives a few milliseconds is gone before a
/// later read, taking the addresses of its libraries (libc's frames) with it.
const RENOTE_AFTER: [Duration; 3] = [
    Duration::from_millis(2),
    Duration::from_millis(20),
    Duration::from_millis(200),
];

/// This thread at SCHED_FIFO priority 1, if allowed (said once in the log otherwise).
fn realtime() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: valid parameters; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        log::warn!(
            "exec snapshots run at normal priority ({}: needs CAP_SYS_NICE at startup): on a \
             busy node the frames of programs that live a few milliseconds may stay unnamed",
            std::io::Error::last_os_error()
        );
    }
}

/// poll(2)'s timeout for a re-read due in `left`: rounded up to whole milliseconds. Rounded
/// down, the last fraction of a millisecond before each re-read was `poll(…, 0)` in a loop: a
/// busy wait of up to 1 ms per re-read, three re-reads per exec, measured as most of this
/// thread's CPU and ~20 % of the agent's under process churn (issue 15).
fn poll_timeout(left: Duration) -> i32 {
    let ms = left.as_micros().div_ceil(1000);
    i32::try_from(ms).unwrap_or(POLL_MS).min(POLL_MS)
}

/// Starts the thread: for each pid in `ring`, the symbolizer notes its maps at once, and again
/// after each of [`RENOTE_AFTER`].
pub fn spawn(
    mut ring: RingBuf<MapData>,
    symbolizer: SymbolizerHandle,
) -> std::io::Result<ExecSnapshots> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    thread::Builder::new()
        .name("exec-snapshots".into())
        .spawn(move || {
            realtime();
            // (when, pid, which re-read), in order of `when` (every pid gets the same delays).
            let mut due: [VecDeque<(Instant, u32)>; RENOTE_AFTER.len()] = Default::default();
            while !flag.load(Ordering::Relaxed) {
                let now = Instant::now();
                for q in &mut due {
                    while let Some(&(when, pid)) = q.front() {
                        if when > now {
                            break;
                        }
                        q.pop_front();
                        symbolizer.note_process(pid);
                    }
                }
                let next = due.iter().filter_map(|q| q.front()).map(|(w, _)| *w).min();
                let timeout = next.map_or(POLL_MS, |w| {
                    poll_timeout(w.saturating_duration_since(Instant::now()))
                });
                let mut pfd = libc::pollfd {
                    fd: ring.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                let n = unsafe { libc::poll(&mut pfd, 1, timeout) };
                if n < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    log::warn!("exec snapshots: poll: {}", std::io::Error::last_os_error());
                    return;
                }
                while let Some(item) = ring.next() {
                    if let Some(pid) = item.get(..4).and_then(|b| b.try_into().ok()) {
                        let pid = u32::from_ne_bytes(pid);
                        symbolizer.note_process(pid);
                        let now = Instant::now();
                        for (q, after) in due.iter_mut().zip(RENOTE_AFTER) {
                            q.push_back((now + after, pid));
                        }
                    }
                }
            }
        })?;
    Ok(ExecSnapshots { stop })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_timeout_rounds_up_so_the_wait_never_spins() {
        assert_eq!(poll_timeout(Duration::ZERO), 0, "due now: no wait");
        assert_eq!(poll_timeout(Duration::from_micros(1)), 1);
        assert_eq!(poll_timeout(Duration::from_micros(999)), 1);
        assert_eq!(poll_timeout(Duration::from_millis(2)), 2);
        assert_eq!(poll_timeout(Duration::from_micros(2001)), 3);
        assert_eq!(poll_timeout(Duration::from_secs(5)), POLL_MS);
        assert_eq!(poll_timeout(Duration::MAX), POLL_MS);
    }
}
