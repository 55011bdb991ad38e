//! Snapshot of a process's executable mappings, taken while it is alive.
//!
//! blazesym's own `cache::Process` keeps the VMAs but opens the ELF files lazily through
//! `/proc/<pid>/map_files/…`, which is gone once the process exits (measured: "failed to stat
//! /proc/<pid>/map_files/…" after exit). So the snapshot opens each file right away; the open
//! descriptor keeps the file reachable (even if deleted or inside a container's mount namespace).

use std::fs::File;

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
    /// The mapped file, opened now; `None` for pseudo mappings or when opening failed.
    pub file: Option<File>,
}

/// Reads the executable mappings of `pid` and opens their files. Anonymous executable memory
/// (JIT code) is kept as `[anon]`: nothing to name there, but its addresses are frames (a JIT
/// keeps frame pointers), not a walk gone astray.
pub(super) fn snapshot(pid: u32) -> Result<Vec<RawMapping>, TargetError> {
    Ok(snapshot_of(pid, &read_maps(pid)?))
}

/// [`snapshot`] from maps the caller has just read.
pub(super) fn snapshot_of(pid: u32, maps: &[MapEntry]) -> Vec<RawMapping> {
    maps.iter()
        .filter(|m| m.perms.exec)
        .map(|m| {
            let module = m.path.clone().unwrap_or_else(|| ANON.to_owned());
            let file = m.is_file().then(|| open(pid, m, &module)).flatten();
            RawMapping {
                start: m.start,
                end: m.end,
                offset: m.offset,
                module,
                file,
            }
        })
        .collect()
}

/// The very file mapped in `m` (same device and inode), by the first way that reaches it:
/// map_files names the exact mapped inode (survives replacement and deletion) but is out of
/// reach after the privilege drop; the root/ path resolves through the process's mount
/// namespace while the process lives; the plain path in ours needs neither, and still opens
/// once the process has exited (a program that lives a millisecond is often gone by the time
/// its maps, read at exec, are opened), so it is tried whenever it is the same file.
fn open(pid: u32, m: &MapEntry, path: &str) -> Option<File> {
    let same_file = |f: File| {
        f.metadata()
            .is_ok_and(|meta| DevInode::from_metadata(&meta) == m.dev_inode)
            .then_some(f)
            .ok_or_else(|| std::io::Error::other("another file under that path"))
    };
    File::open(format!("/proc/{pid}/map_files/{}", m.map_files_name()))
        .or_else(|_| File::open(format!("/proc/{pid}/root{path}")).and_then(same_file))
        .or_else(|_| File::open(path).and_then(same_file))
        .inspect_err(|err| log::debug!("pid {pid}: cannot open {path}: {err}"))
        .ok()
}
