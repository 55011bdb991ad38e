//! The libc (or static executable) that provides `malloc` to a running process: its mapped
//! files searched in priority order, opened as the process sees them, each examined once.

use std::collections::{HashMap, HashSet, hash_map::Entry};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{LibcTarget, basename, is_libc_name, target_from};
use crate::target::TargetError;
use crate::target::elf::ElfFile;
use crate::target::maps::{self, DevInode, MapEntry};

/// The libc (or static executable) that provides `malloc` to process `pid`, opened through the
/// process's own root so containers are traced through their own files.
pub fn for_pid(pid: u32) -> Result<LibcTarget, TargetError> {
    let maps = maps::read_maps(pid)?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_else(|_| "?".to_owned());
    let exe_id = fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| DevInode::from_metadata(&m));
    let target = for_pid_cached(pid, &comm, &maps, exe_id, &mut FileCache::default())?;
    Ok(Arc::unwrap_or_clone(target))
}

/// [`for_pid`] for many processes: `maps` and `exe_id` (the identity of `/proc/<pid>/exe`) are
/// read by the caller, and each file is examined only the first time any process maps it. A
/// cached target keeps the paths of the process it was found in.
pub fn for_pid_cached(
    pid: u32,
    comm: &str,
    maps: &[MapEntry],
    exe_id: Option<DevInode>,
    cache: &mut FileCache,
) -> Result<Arc<LibcTarget>, TargetError> {
    search(maps, exe_id, cache, |entry| examine(pid, comm, entry)).map_err(|e| {
        e.unwrap_or_else(|| TargetError::ProcessNoLibc {
            pid,
            comm: comm.to_owned(),
        })
    })
}

/// What the files already examined turned out to be, by identity (device + inode). A verdict
/// depends only on the file's content, and parsing glibc's symbol table took ~11 ms per process
/// here, for hundreds of processes sharing one libc.
#[derive(Debug, Default)]
pub struct FileCache {
    files: HashMap<DevInode, Verdict>,
}

/// What one mapped file is to the search for `malloc`.
#[derive(Debug)]
pub(super) enum Verdict {
    /// It provides `malloc`: the probes to attach.
    Malloc(Arc<LibcTarget>),
    /// It defines `malloc` but cannot be probed (e.g. no `free`): the search stops here.
    Unprobeable(FileError),
    /// An ELF file without `malloc`.
    NoMalloc,
    /// Not a usable ELF file (fonts, locale archives and other data files are mapped too).
    NotElf(FileError),
}

/// An error that depends only on a file's content, so it is remembered with the file.
#[derive(Clone, Debug)]
pub(super) enum FileError {
    BadElf { path: PathBuf, reason: String },
    MissingSymbol { path: PathBuf, symbol: &'static str },
}

impl FileError {
    /// `Err` when the error is not a property of the file (I/O: retried for a later process).
    fn try_from_error(e: TargetError) -> Result<Self, TargetError> {
        match e {
            TargetError::BadElf { path, reason } => Ok(Self::BadElf { path, reason }),
            TargetError::MissingSymbol { path, symbol } => Ok(Self::MissingSymbol { path, symbol }),
            e => Err(e),
        }
    }

    fn to_error(&self) -> TargetError {
        match self.clone() {
            Self::BadElf { path, reason } => TargetError::BadElf { path, reason },
            Self::MissingSymbol { path, symbol } => TargetError::MissingSymbol { path, symbol },
        }
    }
}

/// Why one process's file could not be examined this time (not remembered).
#[derive(Debug)]
pub(super) enum Unexamined {
    /// No path to the mapped file could be opened (`MappedFileUnavailable`).
    Path(TargetError),
    /// The file could not be read as ELF.
    Read(TargetError),
    /// It defines `malloc` but its code could not be read: the search stops here.
    Probes(TargetError),
}

/// Opens `entry`'s file as `pid` sees it and decides what it is.
fn examine(pid: u32, comm: &str, entry: &MapEntry) -> Result<Verdict, Unexamined> {
    let display = entry.path.clone().unwrap_or_default();
    let path = open_mapped(pid, entry).map_err(|tried| {
        Unexamined::Path(TargetError::MappedFileUnavailable {
            pid,
            comm: comm.to_owned(),
            display_path: display.clone(),
            tried,
        })
    })?;
    let elf = match ElfFile::open(&path) {
        Ok(elf) => elf,
        Err(e) => {
            return FileError::try_from_error(e)
                .map(Verdict::NotElf)
                .map_err(Unexamined::Read);
        }
    };
    if elf.symbol("malloc").is_none() {
        return Ok(Verdict::NoMalloc);
    }
    match target_from(&elf, display, entry.dev_inode) {
        Ok(t) => Ok(Verdict::Malloc(Arc::new(t))),
        Err(e) => FileError::try_from_error(e)
            .map(Verdict::Unprobeable)
            .map_err(Unexamined::Probes),
    }
}

/// The search over a process's mapped files, in priority order: the executable, libc-named
/// files, the others. `examine` is asked only about files not in `cache`. `Err(None)`: no file
/// provides `malloc` and nothing failed that could have.
pub(super) fn search(
    maps: &[MapEntry],
    exe_id: Option<DevInode>,
    cache: &mut FileCache,
    mut examine: impl FnMut(&MapEntry) -> Result<Verdict, Unexamined>,
) -> Result<Arc<LibcTarget>, Option<TargetError>> {
    // One entry per mapped file.
    let mut seen = HashSet::new();
    let mut files: Vec<&MapEntry> = maps
        .iter()
        .filter(|m| m.is_file() && seen.insert(m.dev_inode))
        .collect();
    let rank = |m: &MapEntry| {
        if Some(m.dev_inode) == exe_id {
            0
        } else if m.path.as_deref().is_some_and(|p| is_libc_name(basename(p))) {
            1
        } else {
            2
        }
    };
    files.sort_by_key(|m| rank(m));

    let mut first_error = None;
    for entry in files {
        let r = rank(entry);
        // glibc's loader has no public malloc; skip it among the "others".
        if r == 2 && basename(entry.path.as_deref().unwrap_or_default()).starts_with("ld-linux") {
            continue;
        }
        let verdict = match cache.files.entry(entry.dev_inode) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(new) => match examine(entry) {
                Ok(v) => new.insert(v),
                Err(Unexamined::Path(e)) => {
                    if r < 2 {
                        first_error.get_or_insert(e);
                    }
                    continue;
                }
                Err(Unexamined::Read(e)) => {
                    if r == 1 {
                        first_error.get_or_insert(e);
                    }
                    continue;
                }
                Err(Unexamined::Probes(e)) => return Err(Some(e)),
            },
        };
        match verdict {
            Verdict::Malloc(t) => return Ok(Arc::clone(t)),
            Verdict::Unprobeable(e) => return Err(Some(e.to_error())),
            Verdict::NoMalloc => {}
            Verdict::NotElf(e) => {
                if r == 1 {
                    first_error.get_or_insert_with(|| e.to_error());
                }
            }
        }
    }
    Err(first_error)
}

/// A path the agent can open that is the very file mapped in `entry` (same device and inode):
/// the plain path when the process shares our mount namespace (it outlives the process), else
/// `/proc/<pid>/root/<path>`, else `/proc/<pid>/map_files/<range>` (deleted or replaced files,
/// and filesystems whose paths do not stat to the mapped inode). Errors list what was tried.
fn open_mapped(pid: u32, entry: &MapEntry) -> Result<PathBuf, Vec<PathBuf>> {
    let mut tried = Vec::new();
    if let Some(path) = entry.path.as_deref().filter(|_| !entry.deleted) {
        let rooted = Path::new(&format!("/proc/{pid}/root")).join(path.trim_start_matches('/'));
        for candidate in [PathBuf::from(path), rooted] {
            let same = fs::metadata(&candidate)
                .is_ok_and(|m| DevInode::from_metadata(&m) == entry.dev_inode);
            if same {
                return Ok(candidate);
            }
            tried.push(candidate);
        }
    }
    let map_file = PathBuf::from(format!("/proc/{pid}/map_files/{}", entry.map_files_name()));
    if fs::metadata(&map_file).is_ok() {
        return Ok(map_file);
    }
    tried.push(map_file);
    Err(tried)
}
