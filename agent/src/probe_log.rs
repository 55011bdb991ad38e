//! The probes' debug log (aya-log records: why a probe dropped or skipped an event) into the
//! agent's logger, read on a thread of its own while the probes are loaded. Only when debug
//! logging is on (`--log-level debug`, `RUST_LOG=debug`): otherwise the probes are loaded with
//! aya-log's level at 0 and the verifier removes their logging paths.

use std::{
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use aya::Ebpf;
use aya_log::EbpfLogger;

/// The log target of the probes' records (`why!` in probe-ebpf/src/maps.rs).
const TARGET: &str = "probe";

/// How often the reader looks at its stop flag while no record arrives.
const POLL_MS: i32 = 200;

/// `AYA_LOG_LEVEL` for the probes (aya-log's numbering: 0 off … 4 debug, 5 trace): the
/// agent's level for the probe target when it includes debug, else 0.
pub fn level() -> u8 {
    if log::log_enabled!(target: TARGET, log::Level::Debug) {
        log::max_level() as u8
    } else {
        0
    }
}

/// Reads the probes' records until dropped.
pub struct Reader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Starts reading the log of the probes in `ebpf` (loaded with [`level`]); `None` when debug
/// logging is off, or when the reader cannot start (said at warn level: tracing goes on).
pub fn start(ebpf: &mut Ebpf) -> Option<Reader> {
    if level() == 0 {
        return None;
    }
    let mut logger = EbpfLogger::init(ebpf)
        .inspect_err(|e| log::warn!("the probes' debug log cannot be read: {e}"))
        .ok()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("probe-log".into())
        .spawn(move || {
            let mut fd = libc::pollfd {
                fd: logger.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            while !stopped.load(Ordering::Relaxed) {
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut fd, 1, POLL_MS) };
                logger.flush();
            }
            logger.flush();
        })
        .inspect_err(|e| log::warn!("the probes' debug log cannot be read: {e}"))
        .ok()?;
    Some(Reader {
        stop,
        thread: Some(thread),
    })
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
