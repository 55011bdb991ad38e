//! Symbolization of user stacks on one long-lived thread (blazesym).
//!
//! blazesym's `Symbolizer` is not `Send`, so one thread owns it and serves requests from a
//! channel; [`SymbolizerHandle`] is the cheap, cloneable way in. Processes are described by
//! our own snapshot of their executable mappings (see `maps.rs` for why blazesym's process
//! cache is not enough), and each address is symbolized by file offset in the mapped ELF file,
//! so addresses stay resolvable after the process exits. Go code is named from the binary's
//! `.gopclntab` instead (see `go.rs`), which blazesym cannot read. Symbols and lines of a
//! stripped file come from its separate debug file when one is found (see
//! `target/debuginfo.rs`).
//!
//! Frame-pointer stacks are checked before they are named: a "return address" outside every
//! executable mapping, or not right after a call instruction, means the walk went through
//! code without frame pointers and what follows is garbage; the chain is cut there (kept up to
//! it) and the cut counted (`stack_cut`; see `calls.rs`).

mod calls;
mod file;
mod go;
mod maps;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    panic::{self, AssertUnwindSafe},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::Instant,
};

use allocwatch_common::unwind::FRAME_EXACT;
use blazesym::symbolize::{
    CodeInfo, Input, Sym, Symbolized, Symbolizer,
    evict::{self, Evict},
    source::{Elf, Source},
};
use serde::Serialize;

use crate::target::maps::{DevInode, MapEntry};

use file::{FileKey, MAX_CACHED_OFFSETS, OpenFile, adopt};

pub use crate::target::debuginfo::{DEFAULT_DEBUG_DIR, set_debug_dirs};

/// One source-level frame. An address inside inlined code yields several frames, innermost
/// first, all with the same `address`/`module`/`offset`: that is how a reader expects the
/// stack, and each frame carries the line within its own function.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Frame {
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Path of the ELF file as the process sees it.
    pub module: Option<String>,
    /// File offset of `address` within `module`.
    pub offset: Option<u64>,
    pub address: u64,
}

impl Frame {
    /// A frame known only by its address.
    pub fn unknown(address: u64) -> Self {
        Self {
            function: None,
            file: None,
            line: None,
            module: None,
            offset: None,
            address,
        }
    }
}

/// Failures by cause: `no_symbol` once per file offset (results are cached per file), the
/// others on every request (nothing is cached for them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SymbolizeStats {
    /// Maps unavailable (process exited before it was noted).
    pub process_gone: u64,
    /// Address in no executable mapping: the chain ends there (counted in `stack_cut` too
    /// unless the process exited before its maps could be re-read).
    pub unknown_address: u64,
    /// Address in a mapping, but no symbol found for it.
    pub no_symbol: u64,
    /// Chains cut at an address that is no return address (in no executable mapping of the
    /// current maps, or not right after a call instruction): the walk went astray there.
    pub stack_cut: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SymbolizeError {
    #[error("process {0} exited before its memory map could be read")]
    ProcessGone(u32),
    #[error("the symbolizer thread is not running")]
    Stopped,
}

impl SymbolizeError {
    pub fn is_process_gone(&self) -> bool {
        matches!(self, Self::ProcessGone(_))
    }
}

type Reply = Box<dyn FnOnce(Result<Vec<Frame>, SymbolizeError>) + Send>;

enum Request {
    Note(u32, Vec<maps::RawMapping>),
    /// The process is gone and named: drop what is kept for it.
    Forget(u32),
    /// Drop processes noted a while ago that are not in the set (noted at exec, then never
    /// registered: rejected, or gone before the agent saw them).
    Retain(HashSet<u32>),
    Symbolize {
        pid: u32,
        addrs: Vec<u64>,
        /// Whether to cut the chain at the first address that is no return address (always,
        /// but in the unit tests that name arbitrary code addresses).
        checked: bool,
        reply: Reply,
    },
}

#[derive(Default)]
struct Counters {
    process_gone: AtomicU64,
    unknown_address: AtomicU64,
    no_symbol: AtomicU64,
    stack_cut: AtomicU64,
    /// Gauges: processes noted and files held open.
    processes: AtomicU64,
    files: AtomicU64,
    /// Requests sent and not yet handled: a queue that keeps growing means the thread cannot
    /// keep up (every new site then waits behind it).
    queued: AtomicU64,
}

/// A noted process that nobody asked to keep is dropped this long after it was noted.
pub const UNCLAIMED_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

fn bump(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

/// Files the symbolizer thread holds open, by their identity in the maps: a snapshot leaves
/// them unopened (the thread finds them by identity, `Worker::identities`).
type Held = Arc<std::sync::Mutex<HashSet<DevInode>>>;

/// Handle to the symbolizer thread; the thread exits when the last handle is dropped.
#[derive(Clone)]
pub struct SymbolizerHandle {
    tx: mpsc::Sender<Request>,
    counters: Arc<Counters>,
    held: Held,
}

impl SymbolizerHandle {
    /// Every request goes through here, so that the queue gauge counts it.
    fn send(&self, req: Request) -> Result<(), SymbolizeError> {
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(req).map_err(|_| {
            self.counters.queued.fetch_sub(1, Ordering::Relaxed);
            SymbolizeError::Stopped
        })
    }

    pub fn spawn() -> Self {
        let (tx, rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let held = Held::default();
        let worker_counters = Arc::clone(&counters);
        let worker_held = Arc::clone(&held);
        let spawned = std::thread::Builder::new()
            .name("symbolizer".into())
            .spawn(move || Worker::new(worker_counters, worker_held).run(rx));
        // Without the thread the receiver is gone and every request reports `Stopped`.
        if let Err(err) = spawned {
            log::error!("cannot start the symbolizer thread: {err}");
        }
        Self { tx, counters, held }
    }

    /// Of the file identities in `maps`, those the symbolizer thread holds open now.
    fn held_of(&self, maps: &[MapEntry]) -> HashSet<DevInode> {
        let held = lock(&self.held);
        maps.iter()
            .map(|m| m.dev_inode)
            .filter(|id| held.contains(id))
            .collect()
    }

    /// Snapshots the executable mappings of `pid` and opens their files now, on the caller's
    /// thread (a /proc read and a few opens), so a short-lived process cannot exit while the
    /// request waits behind a slow symbolization. Call it when a process is first seen and
    /// again after it execs; it replaces the earlier snapshot.
    pub fn note_process(&self, pid: u32) {
        match crate::target::maps::read_maps(pid) {
            Ok(maps) => self.note_maps(pid, &maps),
            Err(err) => {
                log::debug!("pid {pid}: cannot read maps: {err}")
            }
        }
    }

    /// [`Self::note_process`] with `/proc/<pid>/maps` just read by the caller.
    pub fn note_maps(&self, pid: u32, maps: &[MapEntry]) {
        let held = self.held_of(maps);
        self.note(pid, maps::snapshot_of(pid, maps, |id| held.contains(id)));
    }

    /// Drops what is kept for `pid` (its mappings, cached frames, and the files only it maps).
    pub fn forget(&self, pid: u32) {
        drop(self.send(Request::Forget(pid)));
    }

    /// Drops the processes noted more than [`UNCLAIMED_AFTER`] ago that are not in `pids`.
    pub fn retain(&self, pids: HashSet<u32>) {
        drop(self.send(Request::Retain(pids)));
    }

    /// Processes and open files held by the symbolizer thread, and requests waiting for it,
    /// for self-metrics.
    pub fn held(&self) -> (u64, u64, u64) {
        let c = &*self.counters;
        (
            c.processes.load(Ordering::Relaxed),
            c.files.load(Ordering::Relaxed),
            c.queued.load(Ordering::Relaxed),
        )
    }

    fn note(&self, pid: u32, maps: Vec<maps::RawMapping>) {
        // An exited process (a zombie) has no mappings: keep the last snapshot.
        if !maps.is_empty() {
            // A send error means the thread is gone; symbolize() reports that.
            drop(self.send(Request::Note(pid, maps)));
        }
    }

    /// Symbolizes return addresses of `pid`, in order; each address gives one frame or, inside
    /// inlined code, several (innermost first). Addresses without a symbol still give a frame
    /// (module and offset); the chain ends before the first address that is no return address
    /// (counted in `stack_cut`). Blocks (the agent uses the async variant).
    #[cfg(test)]
    pub fn symbolize_checked(
        &self,
        pid: u32,
        addrs: Vec<u64>,
    ) -> Result<Vec<Frame>, SymbolizeError> {
        self.symbolize_with(pid, addrs, true)
    }

    /// [`Self::symbolize_checked`] for any code address (no return-address check).
    #[cfg(test)]
    pub fn symbolize(&self, pid: u32, addrs: Vec<u64>) -> Result<Vec<Frame>, SymbolizeError> {
        self.symbolize_with(pid, addrs, false)
    }

    #[cfg(test)]
    fn symbolize_with(
        &self,
        pid: u32,
        addrs: Vec<u64>,
        checked: bool,
    ) -> Result<Vec<Frame>, SymbolizeError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let reply: Reply = Box::new(move |frames| drop(tx.send(frames)));
        self.send(Request::Symbolize {
            pid,
            addrs,
            checked,
            reply,
        })?;
        rx.recv().map_err(|_| SymbolizeError::Stopped)?
    }

    /// [`Self::symbolize_checked`] without blocking the async runtime while a cold file is
    /// parsed.
    pub async fn symbolize_async(
        &self,
        pid: u32,
        addrs: Vec<u64>,
    ) -> Result<Vec<Frame>, SymbolizeError> {
        self.ask(pid, addrs)?.await
    }

    /// Sends the request of [`Self::symbolize_async`] now; the answer comes later. Several
    /// requests in flight keep the thread busy between them instead of a wake-up and a reply's
    /// wake-up per chain (issue 15: those round trips were a good part of the agent's CPU under
    /// process churn).
    pub fn ask(&self, pid: u32, addrs: Vec<u64>) -> Result<Answer, SymbolizeError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reply: Reply = Box::new(move |frames| drop(tx.send(frames)));
        self.send(Request::Symbolize {
            pid,
            addrs,
            checked: true,
            reply,
        })?;
        Ok(Answer(rx))
    }

    /// Requests sent and not yet taken up by the thread.
    pub fn queued(&self) -> u64 {
        self.counters.queued.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> SymbolizeStats {
        let c = &*self.counters;
        SymbolizeStats {
            process_gone: c.process_gone.load(Ordering::Relaxed),
            unknown_address: c.unknown_address.load(Ordering::Relaxed),
            no_symbol: c.no_symbol.load(Ordering::Relaxed),
            stack_cut: c.stack_cut.load(Ordering::Relaxed),
        }
    }
}

/// The answer to [`SymbolizerHandle::ask`], awaited.
pub struct Answer(tokio::sync::oneshot::Receiver<Result<Vec<Frame>, SymbolizeError>>);

impl Future for Answer {
    type Output = Result<Vec<Frame>, SymbolizeError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.map_err(|_| SymbolizeError::Stopped).and_then(|r| r))
    }
}

/// An executable mapping of a noted process.
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    module: String,
    /// The mapped file in `Worker::files`, if it could be opened.
    elf: Option<FileKey>,
}

/// A noted process: its mappings (frames are cached per file, see [`OpenFile::frames`]).
struct Process {
    maps: Vec<Mapping>,
    noted_at: Instant,
}

impl Process {
    /// Takes a newer snapshot (after exec, or with libraries mapped since).
    fn update(&mut self, maps: Vec<Mapping>) {
        self.maps = maps;
    }
}

struct Worker {
    symbolizer: Symbolizer,
    processes: HashMap<u32, Process>,
    /// One open descriptor per distinct file, shared by every process mapping it.
    files: HashMap<FileKey, OpenFile>,
    /// The entry in `files` of each file identity the maps showed (the maps' device and inode
    /// can differ from the open file's, e.g. on overlayfs).
    identities: HashMap<DevInode, FileKey>,
    /// The keys of `identities`, shared with the handles.
    held: Held,
    counters: Arc<Counters>,
}

impl Worker {
    fn new(counters: Arc<Counters>, held: Held) -> Self {
        Self {
            symbolizer: Symbolizer::new(),
            processes: HashMap::new(),
            files: HashMap::new(),
            identities: HashMap::new(),
            held,
            counters,
        }
    }

    /// Our view of a snapshot of `pid`, sorted by start address; files not opened by the
    /// snapshot are found by their identity (or opened now, if let go of meanwhile).
    fn mappings(&mut self, pid: u32, raw: Vec<maps::RawMapping>) -> Vec<Mapping> {
        let mut maps: Vec<Mapping> = raw
            .into_iter()
            .map(|mut m| {
                let known = m
                    .identity
                    .and_then(|id| self.identities.get(&id))
                    .filter(|k| self.files.contains_key(k))
                    .copied();
                let elf = match known {
                    Some(key) => Some(key),
                    None => {
                        let file = m.file.take().or_else(|| maps::reopen(pid, &m));
                        let key = file.and_then(|f| adopt(&mut self.files, f));
                        if let (Some(key), Some(id)) = (key, m.identity) {
                            self.identities.insert(id, key);
                            lock(&self.held).insert(id);
                        }
                        key
                    }
                };
                Mapping {
                    start: m.start,
                    end: m.end,
                    offset: m.offset,
                    elf,
                    module: m.module,
                }
            })
            .collect();
        maps.sort_unstable_by_key(|m| m.start);
        maps
    }

    /// A fresh snapshot of `pid`, opening only the files not held already.
    fn snapshot(&self, pid: u32) -> Result<Vec<maps::RawMapping>, crate::target::TargetError> {
        maps::snapshot(pid, |id| {
            self.identities
                .get(id)
                .is_some_and(|k| self.files.contains_key(k))
        })
    }

    fn run(mut self, rx: mpsc::Receiver<Request>) {
        while let Ok(req) = rx.recv() {
            self.counters.queued.fetch_sub(1, Ordering::Relaxed);
            match req {
                Request::Note(pid, maps) => {
                    let started = Instant::now();
                    self.note(pid, maps);
                    slow(started, || format!("noting pid {pid}"));
                }
                Request::Symbolize {
                    pid,
                    addrs,
                    checked,
                    reply,
                } => {
                    let started = Instant::now();
                    let result = self.symbolize(pid, &addrs, checked);
                    slow(started, || {
                        let module = result
                            .as_ref()
                            .ok()
                            .and_then(|f| f.iter().find_map(|f| f.module.clone()));
                        format!(
                            "{} addresses of pid {pid} (in {})",
                            addrs.len(),
                            module.as_deref().unwrap_or("?")
                        )
                    });
                    reply(result);
                }
                Request::Forget(pid) => {
                    if let Some(p) = self.processes.remove(&pid) {
                        self.release(&p.maps);
                    }
                }
                Request::Retain(keep) => {
                    let now = Instant::now();
                    let drop: Vec<u32> = self
                        .processes
                        .iter()
                        .filter(|(pid, p)| {
                            !keep.contains(pid) && now.duration_since(p.noted_at) > UNCLAIMED_AFTER
                        })
                        .map(|(pid, _)| *pid)
                        .collect();
                    for pid in drop {
                        if let Some(p) = self.processes.remove(&pid) {
                            self.release(&p.maps);
                        }
                    }
                }
            }
            self.counters
                .processes
                .store(self.processes.len() as u64, Ordering::Relaxed);
            self.counters
                .files
                .store(self.files.len() as u64, Ordering::Relaxed);
        }
    }

    /// Closes the files of `maps` that no other process maps, and drops what blazesym cached
    /// for them (its cache is keyed by path; ours are `/proc/self/fd/N`, reused after close).
    fn release(&mut self, maps: &[Mapping]) {
        let mut keys: Vec<FileKey> = maps.iter().filter_map(|m| m.elf).collect();
        keys.sort_unstable();
        keys.dedup();
        keys.retain(|k| {
            !self
                .processes
                .values()
                .any(|p| p.maps.iter().any(|m| m.elf == Some(*k)))
        });
        if !keys.is_empty() {
            let mut held = lock(&self.held);
            self.identities.retain(|id, k| {
                let keep = !keys.contains(k);
                if !keep {
                    held.remove(id);
                }
                keep
            });
        }
        for k in keys {
            if let Some(f) = self.files.remove(&k) {
                let debug = f.debug.get().and_then(Option::as_ref).map(|d| &d.path);
                for path in std::iter::once(&f.path).chain(debug) {
                    let evict = Evict::from(evict::Elf::new(path));
                    if let Err(e) = self.symbolizer.evict(&evict) {
                        log::debug!("evicting {}: {e}", path.display());
                    }
                }
            }
        }
    }

    fn note(&mut self, pid: u32, raw: Vec<maps::RawMapping>) {
        let maps = self.mappings(pid, raw);
        match self.processes.entry(pid) {
            Entry::Occupied(entry) => entry.into_mut().update(maps),
            Entry::Vacant(entry) => {
                let p = entry.insert(Process {
                    maps,
                    noted_at: Instant::now(),
                });
                warm(&self.symbolizer, &self.files, pid, &p.maps);
            }
        }
    }

    fn symbolize(
        &mut self,
        pid: u32,
        addrs: &[u64],
        checked: bool,
    ) -> Result<Vec<Frame>, SymbolizeError> {
        if !self.processes.contains_key(&pid) {
            // Not noted: snapshot it now, if it still exists.
            match self.snapshot(pid) {
                Ok(raw) => {
                    let maps = self.mappings(pid, raw);
                    self.processes.insert(
                        pid,
                        Process {
                            maps,
                            noted_at: Instant::now(),
                        },
                    );
                }
                Err(err) => {
                    log::debug!("pid {pid}: cannot read maps: {err}");
                    bump(&self.counters.process_gone, addrs.len());
                    return Err(SymbolizeError::ProcessGone(pid));
                }
            }
        }
        // Libraries mapped after the snapshot (by ld.so after an early note, or dlopen) would
        // otherwise stay unknown: re-read the maps while the process is still there.
        // Whether the maps are known to be complete: an address in none of them is then no
        // return address; else it may be in a library mapped after the snapshot.
        let mut current = true;
        let reread = self.processes.get(&pid).is_some_and(|p| {
            needs_reread(&self.files, &p.maps, addrs, checked, |a| {
                maps::unmapped(pid, a)
            })
        });
        if reread {
            // A process that has exited (a zombie) reads as no mappings at all: keep what was
            // noted while it lived rather than wiping it.
            match self.snapshot(pid) {
                Ok(raw) if !raw.is_empty() => {
                    let maps = self.mappings(pid, raw);
                    if let Some(p) = self.processes.get_mut(&pid) {
                        p.update(maps);
                    }
                }
                _ => current = false,
            }
        }
        let Self {
            symbolizer,
            processes,
            files,
            counters,
            ..
        } = self;
        let Some(process) = processes.get(&pid) else {
            return Err(SymbolizeError::ProcessGone(pid));
        };
        let mut out = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            let cut = match return_address(files, &process.maps, addr) {
                ReturnAddress::Yes => false,
                ReturnAddress::NotAfterCall if !checked => false,
                ReturnAddress::NoMapping => {
                    bump(&counters.unknown_address, 1);
                    current
                }
                ReturnAddress::NotAfterCall => true,
            };
            if cut {
                log::debug!("pid {pid}: {addr:#x} is no return address: chain {addrs:x?} cut");
                bump(&counters.stack_cut, 1);
            }
            // Past an unknown address nothing is named (it would be a bare address), whether
            // the walk went astray or the process exited before its maps were complete.
            if cut || find(&process.maps, addr).is_none() {
                break;
            }
            out.extend(resolve(
                symbolizer,
                files,
                &process.maps,
                pid,
                addr,
                counters,
            ));
        }
        Ok(out)
    }
}

/// Whether naming `addrs` needs the maps of their process read again: only when the chain
/// reaches an address in none of `maps` (the loop in `Worker::symbolize` stops at the first
/// address that is cut) and that address is mapped at all now (`unmapped` false or unknown).
/// Without frame pointers (Debian's `sh`, `python3`, `ls`…) a walk yields garbage
/// "return addresses", most of them in no mapping: re-reading the maps (and reopening every
/// file) for each such chain was the symbolizer's largest cost under process churn (issue 15),
/// and it could not find them anyway. An address mapped now may be in a library mapped since
/// the snapshot: the maps are re-read as before.
fn needs_reread(
    files: &HashMap<FileKey, OpenFile>,
    maps: &[Mapping],
    addrs: &[u64],
    checked: bool,
    unmapped: impl FnOnce(u64) -> Option<bool>,
) -> bool {
    for &addr in addrs {
        match return_address(files, maps, addr) {
            ReturnAddress::Yes => {}
            ReturnAddress::NotAfterCall if !checked => {}
            // Cut before any missed address: nothing past it is named.
            ReturnAddress::NotAfterCall => return false,
            ReturnAddress::NoMapping => {
                return code_at(addr).is_some_and(|a| unmapped(a) != Some(true));
            }
        }
    }
    false
}

/// A request that held the thread this long delays every site queued behind it: worth a
/// debug line saying what it was.
const SLOW_REQUEST: std::time::Duration = std::time::Duration::from_millis(100);

fn slow(started: Instant, what: impl FnOnce() -> String) {
    let took = started.elapsed();
    if took >= SLOW_REQUEST {
        log::debug!("symbolizer: {} took {took:.0?}", what());
    }
}

/// Parses the symbols of a newly noted process's executable now, off the scrape's path: a
/// scrape names chains within `SYMBOLIZE_TIME` (daemon/snapshot.rs) and a cold file (DWARF) can
/// take longer than that on a busy node, and the sites of a program that has already exited
/// would then be exported in `other` for good (a counter's value cannot move to a site named
/// later). Once per file: later lookups hit blazesym's cache.
fn warm(symbolizer: &Symbolizer, files: &HashMap<FileKey, OpenFile>, pid: u32, maps: &[Mapping]) {
    // The first file mapping is the executable (the kernel maps it first, at its lowest address
    // for a non-PIE and first in /proc/PID/maps order for a PIE's load segment).
    let Some(exe) = maps.iter().find(|m| m.elf.is_some()) else {
        return;
    };
    // A file with a cached frame is parsed already. `resolve` looks up `addr - 1`: the
    // mapping's first byte, cached, so the next process of this file skips this.
    let cold = exe
        .elf
        .and_then(|k| files.get(&k))
        .is_some_and(|f| f.frames.borrow().is_empty());
    if cold {
        // Not counted: a warm-up, not a request.
        let _ = resolve(
            symbolizer,
            files,
            maps,
            pid,
            exe.start + 1,
            &Counters::default(),
        );
    }
}

/// The instruction a stack's address stands for: the call before a return address, or the
/// address itself where the walk marked it [`FRAME_EXACT`] (the code a signal interrupted,
/// the signal trampoline: gdb too names those frames at their pc).
fn code_at(addr: u64) -> Option<u64> {
    if addr & FRAME_EXACT != 0 {
        Some(addr & !FRAME_EXACT)
    } else {
        addr.checked_sub(1)
    }
}

/// The mapping holding the instruction of a stack's address `addr` ([`code_at`]).
fn find(maps: &[Mapping], addr: u64) -> Option<&Mapping> {
    let lookup = code_at(addr)?;
    let i = maps.partition_point(|m| m.start <= lookup).checked_sub(1)?;
    maps.get(i).filter(|m| lookup < m.end)
}

enum ReturnAddress {
    Yes,
    NoMapping,
    NotAfterCall,
}

/// Whether `addr` can be a return address: in an executable mapping and, where its file can
/// be read, right after a call instruction (not asked of an address marked [`FRAME_EXACT`]).
fn return_address(
    files: &HashMap<FileKey, OpenFile>,
    maps: &[Mapping],
    addr: u64,
) -> ReturnAddress {
    let Some(mapping) = find(maps, addr) else {
        return ReturnAddress::NoMapping;
    };
    if addr & FRAME_EXACT != 0 {
        return ReturnAddress::Yes;
    }
    let Some(elf) = mapping.elf.and_then(|key| files.get(&key)) else {
        // Nothing to read the code from ([vdso], JIT code): not cut on a guess.
        return ReturnAddress::Yes;
    };
    // Go code keeps frame pointers, and every goroutine's outermost frame returns to
    // `runtime.goexit+1`, which follows a NOP by design: not checked.
    if elf.go(&mapping.module).is_some() {
        return ReturnAddress::Yes;
    }
    if elf.follows_call((addr - mapping.start).wrapping_add(mapping.offset)) {
        ReturnAddress::Yes
    } else {
        ReturnAddress::NotAfterCall
    }
}

/// Symbolizes one return address of `pid`: the lookup uses `addr - 1` so that the line is the
/// call's line, not the one after it; an address marked [`FRAME_EXACT`] is looked up as is.
fn resolve(
    symbolizer: &Symbolizer,
    files: &HashMap<FileKey, OpenFile>,
    maps: &[Mapping],
    pid: u32,
    addr: u64,
    counters: &Counters,
) -> Vec<Frame> {
    let found = find(maps, addr).zip(code_at(addr));
    let addr = addr & !FRAME_EXACT;
    let Some((mapping, code)) = found else {
        // Not reached from `Worker::symbolize` (the chain ends before such an address).
        bump(&counters.unknown_address, 1);
        return vec![Frame::unknown(addr)];
    };
    let file_offset = |a: u64| (a - mapping.start).wrapping_add(mapping.offset);
    let frame = Frame {
        module: Some(mapping.module.clone()),
        offset: Some(file_offset(addr)),
        ..Frame::unknown(addr)
    };
    let Some(elf) = mapping.elf.and_then(|key| files.get(&key)) else {
        bump(&counters.no_symbol, 1);
        return vec![frame];
    };
    let lookup = file_offset(code);
    if let Some(cached) = elf.frames.borrow().get(&lookup) {
        // The same instruction may be one address's call and another's exact pc: the frame's
        // own address and offset.
        return cached
            .iter()
            .map(|f| Frame {
                module: frame.module.clone(),
                offset: frame.offset,
                address: addr,
                ..f.clone()
            })
            .collect();
    }
    let frames = resolve_in(symbolizer, elf, mapping, pid, &frame, lookup, counters);
    let mut cache = elf.frames.borrow_mut();
    if cache.len() >= MAX_CACHED_OFFSETS {
        cache.clear();
    }
    cache.insert(lookup, frames.clone());
    frames
}

/// The frames at file offset `lookup` of `elf` (a fresh lookup, cached by the caller).
fn resolve_in(
    symbolizer: &Symbolizer,
    elf: &OpenFile,
    mapping: &Mapping,
    pid: u32,
    frame: &Frame,
    lookup: u64,
    counters: &Counters,
) -> Vec<Frame> {
    let frame = frame.clone();
    let addr = frame.address;
    // Go code by the Go table first, for stripped and unstripped binaries alike (inlined calls
    // expanded from its inline trees); addresses outside it (cgo's C code) fall through to
    // blazesym.
    let go = elf
        .go(&mapping.module)
        .map(|go| go.frames(lookup))
        .unwrap_or_default();
    if !go.is_empty() {
        return go
            .into_iter()
            .map(|loc| Frame {
                function: Some(loc.function),
                file: loc.file,
                line: loc.line,
                ..frame.clone()
            })
            .collect();
    }
    let facts = elf.facts(&mapping.module);
    // The separate debug file first: it has the full symbol table and the lines. Its sections
    // are not where the binary's are in the file, so it is asked by virtual address.
    let vaddr = facts.and_then(|f| f.vaddr_of(lookup));
    if let Some(vaddr) = vaddr
        && let Some(debug) = elf.debug(pid, &mapping.module)
    {
        match symbolize_in(symbolizer, Elf::new(&debug.path), Input::VirtOffset(vaddr)) {
            Ok(sym) => return frames_of(&sym, &frame),
            Err(failure) => log::debug!("{addr:#x} in {}: {failure}", debug.found.display()),
        }
    }
    // DWARF only where the file has it: blazesym would otherwise follow the debug link itself
    // (see debuginfo.rs). `.symtab`, `.gnu_debugdata` and `.dynsym` are read either way.
    let mut source = Elf::new(&elf.path);
    source.debug_syms = facts.is_none_or(|f| f.has_dwarf);
    let mut result = symbolize_in(symbolizer, source.clone(), Input::FileOffset(lookup));
    if result.is_err() && source.debug_syms {
        // A broken debug link or DWARF must not cost the ELF symbols.
        source.debug_syms = false;
        result = symbolize_in(symbolizer, source, Input::FileOffset(lookup)).or(result);
    }
    match result {
        Ok(sym) => frames_of(&sym, &frame),
        Err(failure) => {
            log::debug!("{addr:#x} in {}: {failure}", mapping.module);
            bump(&counters.no_symbol, 1);
            vec![frame]
        }
    }
}

/// One lookup in one ELF file; the failure as text.
fn symbolize_in(symbolizer: &Symbolizer, elf: Elf, input: Input<u64>) -> Result<Sym<'_>, String> {
    let source = Source::from(elf);
    // A malformed file must cost one frame, not the thread every later request relies on.
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        symbolizer.symbolize_single(&source, input)
    }));
    match result {
        Ok(Ok(Symbolized::Sym(sym))) => Ok(sym),
        Ok(Ok(Symbolized::Unknown(reason))) => Err(reason.to_string()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("blazesym panicked".to_owned()),
    }
}

/// blazesym lists inlined callees outermost first, each with the location inside itself, and
/// `sym.code_info` is the location inside the outermost function; we emit innermost first.
fn frames_of(sym: &Sym<'_>, base: &Frame) -> Vec<Frame> {
    let located = |function: &str, info: Option<&CodeInfo<'_>>| Frame {
        function: Some(function.to_owned()),
        file: info.map(|i| i.to_path().to_string_lossy().into_owned()),
        line: info.and_then(|i| i.line),
        ..base.clone()
    };
    sym.inlined
        .iter()
        .rev()
        .map(|f| located(&f.name, f.code_info.as_ref()))
        .chain([located(&sym.name, sym.code_info.as_deref())])
        .collect()
}

/// A lock whose holder panicked is still usable: the set is replaced entry by entry.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
