//! The agent's unwind tables, loaded on a thread of their own: compiling a file's `.eh_frame`
//! takes from milliseconds (libc) to seconds (a 100 MB binary), and writing its rows one
//! syscall each, which the agent's loop must not wait for (its scrapes and profiles would go
//! stale). Requests are handled in order, so a pid forgotten and then loaded again (reused)
//! ends up with the new process's mappings.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
};

use super::load::Tables;
use crate::{symbolize::SymbolizerHandle, target::maps::MapEntry};

enum Request {
    Load(u32, Vec<MapEntry>),
    /// A new site's stack: outside the process's known mappings, they are read again.
    Check(u32, Vec<u64>),
    Forget(u32),
}

/// The loop's handle: requests go to the thread; usage comes back through atomics.
pub struct TablesWorker {
    tx: mpsc::Sender<Request>,
    /// Rows of every table loaded (the high half) and processes with tables (the low half).
    usage: Arc<AtomicU64>,
}

impl TablesWorker {
    /// `symbolizer` is told of a process whose mappings a stack showed changed (dlopen), so
    /// that the new library is named even in stacks symbolized after the process exits.
    pub fn spawn(mut tables: Tables, symbolizer: SymbolizerHandle) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let usage = Arc::new(AtomicU64::new(0));
        let shared = Arc::clone(&usage);
        thread::Builder::new()
            .name("unwind-tables".into())
            .spawn(move || {
                let mut warned = false;
                for req in rx {
                    let loaded = match req {
                        Request::Load(pid, maps) => tables.load_maps(pid, &maps),
                        Request::Check(pid, stack) => {
                            let loaded = tables.check(pid, &stack);
                            if matches!(loaded, Ok(Some(_))) {
                                symbolizer.note_process(pid);
                            }
                            loaded
                        }
                        Request::Forget(pid) => tables.forget(pid).map(|()| None),
                    };
                    let result = loaded.map(|loaded| {
                        // Once per file, not per process: a node's log stays short.
                        for (path, rows) in loaded.map(|l| l.new_files).unwrap_or_default() {
                            crate::say!("allocwatch: unwind table of {path}: {rows} rows");
                        }
                    });
                    match result {
                        Ok(()) => {}
                        Err(e) if !warned => {
                            warned = true;
                            crate::say!(
                                "allocwatch: warning: unwind tables: {e}: the stacks of the \
                                 processes concerned are walked with frame pointers"
                            );
                        }
                        Err(e) => log::debug!("unwind tables: {e}"),
                    }
                    let (rows, procs) = tables.usage();
                    shared.store(
                        (u64::from(rows) << 32) | procs as u64 & 0xffff_ffff,
                        Ordering::Relaxed,
                    );
                }
            })?;
        Ok(Self { tx, usage })
    }

    /// Loads the tables of `pid`'s files that have none yet, and its mappings.
    pub fn load(&self, pid: u32, maps: &[MapEntry]) {
        // The thread outlives the loop: a send fails only if it panicked (then: frame pointers).
        let _ = self.tx.send(Request::Load(pid, maps.to_vec()));
    }

    /// Loads `pid`'s tables again if `stack` has an address outside the mappings last read
    /// (a library it mapped since, dlopen).
    pub fn check(&self, pid: u32, stack: &[u64]) {
        let _ = self.tx.send(Request::Check(pid, stack.to_vec()));
    }

    pub fn forget(&self, pid: u32) {
        let _ = self.tx.send(Request::Forget(pid));
    }

    /// Rows of every table loaded, and the processes with tables.
    pub fn usage(&self) -> (u32, usize) {
        let v = self.usage.load(Ordering::Relaxed);
        ((v >> 32) as u32, (v & 0xffff_ffff) as usize)
    }
}
