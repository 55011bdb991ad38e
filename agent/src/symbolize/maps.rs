//! Snapshot of a process's executable mappings, taken while it is alive.
//!
//! blazesym's own `cache::Process` keeps the VMAs but opens the ELF files lazily through
//! `/proc/<pid>/map_files/…`, which is gone once the process exits (measured: "failed to stat
//! /proc/<pid>/map_files/…" after exit). So the snapshot opens each file right away; the open
//! descriptor keeps the file reachable (even if deleted or inside a container's mount namespace).

use std::{fs::File, io};

use crate::gort::live::{Memory as _, ProcessMemory};
use crate::target::{
    TargetError,
    maps::{DevInode, MapEntry, read_maps},
};

/// The module name of anonymous executable memory.
pub(super) const ANON: &str = "[anon]";

/// One executable mapping of `/proc/<pid>/maps`.
pub(super) struct RawMapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// Path as the process sees it (or a pseudo name such as `[vdso]`).
    pub module: String,
    /// The mapped file's device and inode as the maps show them; `None` for pseudo and
    /// anonymous mappings.
    pub identity: Option<DevInode>,
    /// The mapped file, opened now; `None` for pseudo mappings, when opening failed, or when
    /// the symbolizer holds this file open already (by `identity`).
    pub file: Option<File>,
}

/// Reads the executable mappings of `pid` and opens their files, but those `held` says are
/// open already. Anonymous executable memory (JIT code) is kept as `[anon]`: nothing to name
/// there, but its addresses are frames (a JIT keeps frame pointers), not a walk gone astray.
pub(super) fn snapshot(
    pid: u32,
    held: impl Fn(&DevInode) -> bool,
) -> Result<Vec<RawMapping>, TargetError> {
    Ok(snapshot_of(pid, &read_maps(pid)?, held))
}

/// [`snapshot`] from maps the caller has just read. A file is opened once for every process
/// that maps it, not once per snapshot: an exec is snapshotted four times (`exec_snapshots`),
/// and the opens of the same few libraries were a good part of the agent's CPU under process
/// churn (issue 15).
pub(super) fn snapshot_of(
    pid: u32,
    maps: &[MapEntry],
    held: impl Fn(&DevInode) -> bool,
) -> Vec<RawMapping> {
    maps.iter()
        .filter(|m| m.perms.exec)
        .map(|m| {
            let module = m.path.clone().unwrap_or_else(|| ANON.to_owned());
            let identity = m.is_file().then_some(m.dev_inode);
            let file = identity
                .filter(|id| !held(id))
                .and_then(|id| open(pid, (m.start, m.end), id, &module));
            RawMapping {
                start: m.start,
                end: m.end,
                offset: m.offset,
                module,
                identity,
                file,
            }
        })
        .collect()
}

/// Opens the file of `m` now: the symbolizer let go of it since `held` said it held it.
pub(super) fn reopen(pid: u32, m: &RawMapping) -> Option<File> {
    open(pid, (m.start, m.end), m.identity?, &m.module)
}

/// The very file mapped at `start..end` (device and inode `identity`), by the first way that reaches it:
/// map_files names the exact mapped inode (survives replacement and deletion) but is out of
/// reach after the privilege drop; the root/ path resolves through the process's mount
/// namespace while the process lives; the plain path in ours needs neither, and still opens
/// once the process has exited (a program that lives a millisecond is often gone by the time
/// its maps, read at exec, are opened), so it is tried whenever it is the same file.
fn open(pid: u32, (start, end): (u64, u64), identity: DevInode, path: &str) -> Option<File> {
    let same_file = |f: File| {
        f.metadata()
            .is_ok_and(|meta| DevInode::from_metadata(&meta) == identity)
            .then_some(f)
            .ok_or_else(|| io::Error::other("another file under that path"))
    };
    // As the kernel names the entry (`%lx-%lx`, `MapEntry::map_files_name`).
    File::open(format!("/proc/{pid}/map_files/{start:x}-{end:x}"))
        .or_else(|_| File::open(format!("/proc/{pid}/root{path}")).and_then(same_file))
        .or_else(|_| File::open(path).and_then(same_file))
        .inspect_err(|err| log::debug!("pid {pid}: cannot open {path}: {err}"))
        .ok()
}

/// Whether `addr` is in no mapping of `pid` now: `Some(true)` when a one-byte read of it fails
/// with EFAULT, `Some(false)` when it succeeds; `None` when that cannot tell (the process is
/// gone, access denied). Far cheaper than reading `/proc/<pid>/maps`, which formats every
/// mapping. (An execute-only mapping, PROT_EXEC without PROT_READ, reads as unmapped: x86 has
/// none without memory protection keys.)
pub(super) fn unmapped(pid: u32, addr: u64) -> Option<bool> {
    let mut byte = [0u8; 1];
    match (ProcessMemory { pid }).read(addr, &mut byte) {
        Ok(()) => Some(false),
        Err(e) if e.raw_os_error() == Some(libc::EFAULT) => Some(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Some(true),
        Err(_) => None,
    }
}
