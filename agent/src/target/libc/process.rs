//! The files that serve a running process's allocation API ([`Served`]): its mapped files
//! taken in the dynamic linker's symbol-resolution order, opened as the process sees them,
//! each examined once.

use std::collections::{HashMap, HashSet, VecDeque, hash_map::Entry};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{LibcTarget, Served, basename, is_libc_name, target_from};
use crate::target::TargetError;
use crate::target::elf::ElfFile;
use crate::target::maps::{self, DevInode, MapEntry, Stamp};

/// The files that serve process `pid`'s allocation API, opened through the process's own root
/// so containers are traced through their own files.
pub fn for_pid(pid: u32) -> Result<Served, TargetError> {
    let maps = maps::read_maps(pid)?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_else(|_| "?".to_owned());
    let exe_id = fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| DevInode::from_metadata(&m));
    for_pid_cached(pid, &comm, &maps, exe_id, &mut FileCache::default())
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
) -> Result<Served, TargetError> {
    let preload = preload_of(pid);
    search(
        maps,
        exe_id,
        &preload,
        cache,
        |entry| mapped_stamp(pid, entry),
        |entry| examine(pid, comm, entry),
    )
    .map_err(|e| {
        e.unwrap_or_else(|| TargetError::ProcessNoLibc {
            pid,
            comm: comm.to_owned(),
        })
    })
}

/// The process's `LD_PRELOAD` entries (empty when its environment cannot be read: preloaded
/// files are then looked at after the `DT_NEEDED` ones).
fn preload_of(pid: u32) -> Vec<String> {
    let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else {
        return Vec::new();
    };
    environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(b"LD_PRELOAD="))
        .map(|v| split_preload(&String::from_utf8_lossy(v)))
        .unwrap_or_default()
}

/// ld.so splits `LD_PRELOAD` at spaces and colons.
pub(super) fn split_preload(value: &str) -> Vec<String> {
    value
        .split([' ', ':'])
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// What the files already examined turned out to be, by identity (device + inode). A verdict
/// depends only on the file's content, and parsing glibc's symbol table took ~11 ms per process
/// here, for hundreds of processes sharing one libc. Most files are held by nothing of the
/// agent's (those without `malloc`), and their inode numbers come back for new files once they
/// are deleted: each verdict is checked against the file's [`Stamp`] (one stat) before reuse.
#[derive(Debug, Default)]
pub struct FileCache {
    files: HashMap<DevInode, Examined>,
}

impl FileCache {
    /// Forgets the verdict on `id`: once the file's probes let go of a deleted inode, its
    /// number can come back for another file.
    pub fn forget(&mut self, id: DevInode) {
        self.files.remove(&id);
    }

    /// The file `id` as its verdict was made (checked by the search that returned it), for
    /// verdicts of the caller's own about the same file.
    pub fn stamp(&self, id: DevInode) -> Option<Stamp> {
        self.files.get(&id).and_then(|x| x.stamp)
    }
}

/// One mapped file as the search sees it: what it is, and what the loader reads from it to
/// order the others.
#[derive(Debug)]
pub(super) struct Examined {
    pub(super) verdict: Verdict,
    /// `DT_NEEDED`, in order.
    pub(super) needed: Vec<String>,
    pub(super) soname: Option<String>,
    /// The file when it was examined (`None`: unknown, the verdict is kept as it is).
    pub(super) stamp: Option<Stamp>,
}

impl From<Verdict> for Examined {
    fn from(verdict: Verdict) -> Self {
        Self {
            verdict,
            needed: Vec::new(),
            soname: None,
            stamp: None,
        }
    }
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
fn examine(pid: u32, comm: &str, entry: &MapEntry) -> Result<Examined, Unexamined> {
    let display = entry.path.clone().unwrap_or_default();
    let (path, meta) = find_mapped(pid, entry).map_err(|tried| {
        Unexamined::Path(TargetError::MappedFileUnavailable {
            pid,
            comm: comm.to_owned(),
            display_path: display.clone(),
            tried,
        })
    })?;
    let stamp = Some(Stamp::of(&meta));
    let elf = match ElfFile::open(&path) {
        Ok(elf) => elf,
        Err(e) => {
            return FileError::try_from_error(e)
                .map(|e| Examined {
                    stamp,
                    ..Verdict::NotElf(e).into()
                })
                .map_err(Unexamined::Read);
        }
    };
    let verdict = if super::prefix_of(&elf).is_none() {
        Verdict::NoMalloc
    } else {
        match target_from(&elf, display, entry.dev_inode) {
            Ok(t) => Verdict::Malloc(Arc::new(t)),
            Err(e) => FileError::try_from_error(e)
                .map(Verdict::Unprobeable)
                .map_err(Unexamined::Probes)?,
        }
    };
    Ok(Examined {
        verdict,
        needed: elf.dynamic().needed.clone(),
        soname: elf.dynamic().soname.clone(),
        stamp,
    })
}

/// glibc's loader: it has no public `malloc` and is never looked at.
fn is_glibc_loader(name: &str) -> bool {
    name.starts_with("ld-linux")
}

/// The search over a process's mapped files in the dynamic linker's symbol-resolution order:
/// the executable, the `LD_PRELOAD` files, the `DT_NEEDED` libraries breadth-first (ld.so's
/// load order), then the files nothing led to (dlopen'ed; libc-named ones first). Every file
/// that defines `malloc` is collected until every API has a file ([`Served::complete`]).
/// `examine` is asked only about files not in `cache`, or whose `stamp` now is not the one
/// their verdict was made with. `Err(None)`: no file provides `malloc` and nothing failed that
/// could have.
pub(super) fn search(
    maps: &[MapEntry],
    exe_id: Option<DevInode>,
    preload: &[String],
    cache: &mut FileCache,
    stamp: impl FnMut(&MapEntry) -> Option<Stamp>,
    examine: impl FnMut(&MapEntry) -> Result<Examined, Unexamined>,
) -> Result<Served, Option<TargetError>> {
    // One entry per mapped file.
    let mut seen = HashSet::new();
    let mut left: Vec<&MapEntry> = maps
        .iter()
        .filter(|m| m.is_file() && seen.insert(m.dev_inode))
        .filter(|m| !is_glibc_loader(basename(path_of(m))))
        .collect();
    let mut search = Search {
        cache,
        stamp,
        examine,
        checked: HashSet::new(),
        found: Vec::new(),
        first_error: None,
        queue: VecDeque::new(),
        stop: None,
    };

    if let Some(i) = left.iter().position(|m| Some(m.dev_inode) == exe_id) {
        let exe = left.remove(i);
        search.visit(exe, true);
    }
    let mut preload: VecDeque<&String> = preload.iter().collect();
    while !search.done() {
        // Preloaded names first, then what the visited files need, in the order they were
        // visited (breadth-first).
        let Some(name) = preload
            .pop_front()
            .cloned()
            .or_else(|| search.queue.pop_front())
        else {
            break;
        };
        let base = basename(&name);
        if is_glibc_loader(base) {
            continue;
        }
        let by_name = left
            .iter()
            .position(|m| path_of(m) == name || basename(path_of(m)) == base);
        // A library found through a symlink (libtcmalloc.so.4 → libtcmalloc.so.4.5.10) is
        // mapped under its target's name: its DT_SONAME says which it is.
        let index = by_name.or_else(|| {
            left.iter().position(|m| {
                search
                    .examined(m)
                    .is_ok_and(|x| x.soname.as_deref() == Some(base))
            })
        });
        if let Some(i) = index {
            let entry = left.remove(i);
            search.visit(entry, true);
        }
    }
    // What nothing led to: libc-named files first (no executable known), then the others.
    left.sort_by_key(|m| !is_libc_name(basename(path_of(m))));
    for entry in left {
        if search.done() {
            break;
        }
        search.visit(entry, false);
    }
    if search.found.is_empty()
        && let Some(e) = search.stop.take()
    {
        return Err(Some(e));
    }
    Served::new(search.found).ok_or(search.first_error)
}

fn path_of(m: &MapEntry) -> &str {
    m.path.as_deref().unwrap_or_default()
}

/// One process's search in progress.
struct Search<'c, S, F> {
    cache: &'c mut FileCache,
    stamp: S,
    examine: F,
    /// Files whose cached verdict this search has checked against the file already.
    checked: HashSet<DevInode>,
    /// The files that define `malloc`, in resolution order.
    found: Vec<Arc<LibcTarget>>,
    /// The first failure that may have hidden the file serving `malloc`.
    first_error: Option<TargetError>,
    /// `DT_NEEDED` names of the files visited, in visiting order.
    queue: VecDeque<String>,
    /// A file that defines `malloc` but cannot be probed: the search ends there.
    stop: Option<TargetError>,
}

impl<S, F> Search<'_, S, F>
where
    S: FnMut(&MapEntry) -> Option<Stamp>,
    F: FnMut(&MapEntry) -> Result<Examined, Unexamined>,
{
    /// `entry`'s examination, from the cache or new (then remembered unless it failed). A
    /// cached verdict about an earlier file at the same device and inode (deleted, its inode
    /// number given to a new file) is a miss.
    fn examined(&mut self, entry: &MapEntry) -> Result<&Examined, Unexamined> {
        let id = entry.dev_inode;
        // Once per search: the soname lookup asks about the same files again.
        if self.checked.insert(id)
            && let Some(known) = self.cache.files.get(&id)
            && !Stamp::holds(known.stamp, || (self.stamp)(entry))
        {
            log::debug!(
                "{}: another file than the one examined at its device and inode: examined again",
                path_of(entry)
            );
            self.cache.files.remove(&id);
        }
        Ok(match self.cache.files.entry(id) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(new) => new.insert((self.examine)(entry)?),
        })
    }

    /// Looks at `entry` in its turn; `linked`: the executable, or a file the loader was led
    /// to (its failure may hide the allocator).
    fn visit(&mut self, entry: &MapEntry, linked: bool) {
        let libc_named = is_libc_name(basename(path_of(entry)));
        let mut error = None;
        match self.examined(entry) {
            Ok(x) => {
                let needed = x.needed.clone();
                match &x.verdict {
                    Verdict::Malloc(t) => {
                        let t = Arc::clone(t);
                        self.found.push(t);
                    }
                    Verdict::Unprobeable(e) => {
                        let e = e.to_error();
                        self.stop.get_or_insert(e);
                    }
                    Verdict::NoMalloc => {}
                    Verdict::NotElf(e) => {
                        if libc_named {
                            error = Some(e.to_error());
                        }
                    }
                }
                self.queue.extend(needed);
            }
            Err(Unexamined::Path(e)) if linked || libc_named => error = Some(e),
            Err(Unexamined::Read(e)) if libc_named => error = Some(e),
            Err(Unexamined::Probes(e)) => {
                self.stop.get_or_insert(e);
            }
            Err(_) => {}
        }
        if let Some(e) = error {
            self.first_error.get_or_insert(e);
        }
    }

    /// Every API has a file, or the search has to end.
    fn done(&self) -> bool {
        self.stop.is_some() || Served::new(self.found.clone()).is_some_and(|s| s.complete())
    }
}

/// A path the agent can open that is the very file mapped in `entry` (same device and inode):
/// the plain path when the process shares our mount namespace (it outlives the process), else
/// `/proc/<pid>/root/<path>`, else `/proc/<pid>/map_files/<range>` (deleted or replaced files,
/// and filesystems whose paths do not stat to the mapped inode). Errors list what was tried.
pub fn open_mapped(pid: u32, entry: &MapEntry) -> Result<PathBuf, Vec<PathBuf>> {
    find_mapped(pid, entry).map(|(path, _)| path)
}

/// The [`Stamp`] of the file mapped in `entry` now, found as [`open_mapped`] finds it (one
/// stat in the common case); `None` when it cannot be reached.
pub fn mapped_stamp(pid: u32, entry: &MapEntry) -> Option<Stamp> {
    find_mapped(pid, entry).ok().map(|(_, m)| Stamp::of(&m))
}

/// [`open_mapped`], with the file's metadata.
pub fn find_mapped(pid: u32, entry: &MapEntry) -> Result<(PathBuf, fs::Metadata), Vec<PathBuf>> {
    let mut tried = Vec::new();
    if let Some(path) = entry.path.as_deref().filter(|_| !entry.deleted) {
        let rooted = Path::new(&format!("/proc/{pid}/root")).join(path.trim_start_matches('/'));
        for candidate in [PathBuf::from(path), rooted] {
            match fs::metadata(&candidate) {
                Ok(m) if DevInode::from_metadata(&m) == entry.dev_inode => {
                    return Ok((candidate, m));
                }
                _ => tried.push(candidate),
            }
        }
    }
    let map_file = PathBuf::from(format!("/proc/{pid}/map_files/{}", entry.map_files_name()));
    match fs::metadata(&map_file) {
        Ok(m) => Ok((map_file, m)),
        Err(_) => {
            tried.push(map_file);
            Err(tried)
        }
    }
}
