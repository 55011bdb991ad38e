//! Snapshots of programs' memory maps at their exec, on a thread of their own: the symbolizer
//! can only name a process's addresses from maps read while it runs, a program can exit within
//! a millisecond of its exec, and the daemon's loop may be busy then (a scrape symbolizing, a
//! scan deleting rows). The exec record in the main ring stays where it is: its order among the
//! process's other records splits what the old and new program did.

use std::{
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
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

/// Starts the thread: for each pid in `ring`, the symbolizer notes its maps at once.
pub fn spawn(
    mut ring: RingBuf<MapData>,
    symbolizer: SymbolizerHandle,
) -> std::io::Result<ExecSnapshots> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    thread::Builder::new()
        .name("exec-snapshots".into())
        .spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: ring.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                let n = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
                if n < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    log::warn!("exec snapshots: poll: {}", std::io::Error::last_os_error());
                    return;
                }
                while let Some(item) = ring.next() {
                    if let Some(pid) = item.get(..4).and_then(|b| b.try_into().ok()) {
                        symbolizer.note_process(u32::from_ne_bytes(pid));
                    }
                }
            }
        })?;
    Ok(ExecSnapshots { stop })
}
