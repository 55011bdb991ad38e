//! "The libc to probe" for a running process or for a command about to be run, and its probe
//! list.
//!
//! The file that provides `malloc` is the executable itself when it defines one (static
//! binaries), otherwise its libc (glibc's `libc.so.6`, musl's `libc.musl-x86_64.so.1` /
//! `ld-musl-x86_64.so.1`). Allocators interposed by `LD_PRELOAD` or linked as their own library
//! (jemalloc, tcmalloc, mimalloc) are not looked for.

use std::collections::{HashMap, HashSet, VecDeque, hash_map::Entry};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use allocwatch_common::libc::Api;

use super::TargetError;
use super::elf::{self, ElfFile};
use super::maps::{self, DevInode, MapEntry};
use super::placement::{self, Request};

/// Bytes of each function given to the placement disassembler; entry blocks are far shorter.
const CODE_WINDOW: u64 = 256;

/// One uprobe to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbePoint {
    /// The canonical API at this address (first in [`Api::ALL`] order among its aliases).
    pub api: Api,
    /// Where to attach in the file (already includes the placement offset).
    pub file_offset: u64,
    /// Stack-pointer movement before the site: the return address is at `[rsp + sp_delta]`.
    pub sp_delta: u32,
    /// The kernel emulates the probed instruction (cheap) rather than single-stepping it.
    pub emulated: bool,
    /// Attach a uretprobe at the same site too.
    pub with_return: bool,
}

/// The file to probe and the probes to put in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibcTarget {
    /// Path the agent can open (in its own mount namespace; may be under `/proc/<pid>/`).
    pub path: PathBuf,
    /// The path as the target process sees it.
    pub display_path: String,
    /// Identity of the file: uprobes attach to an inode, so targets with the same identity
    /// share probes.
    pub dev_inode: DevInode,
    pub probes: Vec<ProbePoint>,
    /// `(alias, canonical)`: APIs that are the same function as an earlier one (Debian's glibc
    /// 2.36 has `memalign` at the address of `aligned_alloc`). Their calls report as canonical.
    pub aliases: Vec<Alias>,
}

/// `(alias, canonical)`.
pub type Alias = (Api, Api);

/// Builds the probe list of an ELF file that defines `malloc`. Every API present is probed once
/// per distinct address; missing optional APIs are skipped; missing `malloc` or `free` is an
/// error.
pub fn probe_points(elf: &ElfFile) -> Result<(Vec<ProbePoint>, Vec<Alias>), TargetError> {
    // Group by address first, so one site serves every API at it.
    let mut groups: Vec<(elf::Symbol, Vec<Api>)> = Vec::new();
    for api in Api::ALL {
        let Some(sym) = elf.symbol(api.symbol()) else {
            if matches!(api, Api::Malloc | Api::Free) {
                return Err(TargetError::MissingSymbol {
                    path: elf.path().to_owned(),
                    symbol: api.symbol(),
                });
            }
            continue;
        };
        match groups.iter_mut().find(|(s, _)| s.address == sym.address) {
            Some((_, apis)) => apis.push(api),
            None => groups.push((sym, vec![api])),
        }
    }
    let mut probes = Vec::new();
    let mut aliases = Vec::new();
    for (sym, apis) in groups {
        let canonical = apis[0];
        aliases.extend(apis[1..].iter().map(|&a| (a, canonical)));
        let with_return = apis.iter().any(|a| a.needs_return());
        let code = elf.function_code(sym, CODE_WINDOW)?;
        let site = placement::place(&code, sym.address, &Request::libc(with_return));
        let vaddr = sym.address.wrapping_add(site.offset_in_function);
        let file_offset = elf.vaddr_to_file_offset(vaddr).ok_or_else(|| {
            TargetError::bad_elf(
                elf.path(),
                format!(
                    "{} at {vaddr:#x} is not in a loaded segment",
                    canonical.symbol()
                ),
            )
        })?;
        probes.push(ProbePoint {
            api: canonical,
            file_offset,
            sp_delta: site.sp_delta,
            emulated: site.emulated,
            with_return,
        });
    }
    aliases.sort();
    Ok((probes, aliases))
}

fn target_from(
    elf: &ElfFile,
    display_path: String,
    dev_inode: DevInode,
) -> Result<LibcTarget, TargetError> {
    let (probes, aliases) = probe_points(elf)?;
    Ok(LibcTarget {
        path: elf.path().to_owned(),
        display_path,
        dev_inode,
        probes,
        aliases,
    })
}

// ---------------------------------------------------------------------------------------------
// A running process.

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
enum Verdict {
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
enum FileError {
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
enum Unexamined {
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
fn search(
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

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// glibc `libc.so.6`, musl `libc.musl-x86_64.so.1` (Alpine) / `ld-musl-x86_64.so.1` (musl's
/// loader is its libc), and plain `libc.so` (musl's DT_NEEDED).
fn is_libc_name(name: &str) -> bool {
    name == "libc.so"
        || name.starts_with("libc.so.")
        || name.starts_with("libc.musl-")
        || name.starts_with("ld-musl-")
}

// ---------------------------------------------------------------------------------------------
// A command not yet run.

/// The libc (or static executable) that `program` will allocate through once exec'd, with
/// `PATH` and `LD_LIBRARY_PATH` taken from our environment (the child inherits it).
pub fn for_command(program: impl AsRef<OsStr>) -> Result<LibcTarget, TargetError> {
    let env = SearchEnv {
        path: std::env::var_os("PATH"),
        ld_library_path: std::env::var_os("LD_LIBRARY_PATH"),
        ld_cache: PathBuf::from(LD_CACHE),
    };
    command_target(program.as_ref(), &env)
}

const LD_CACHE: &str = "/etc/ld.so.cache";

/// Default library directories of the x86-64 loader (Debian multiarch first).
const DEFAULT_LIB_DIRS: [&str; 6] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

struct SearchEnv {
    path: Option<OsString>,
    ld_library_path: Option<OsString>,
    ld_cache: PathBuf,
}

/// The executable `program` names, searched in `PATH` like `execvp` (scripts not followed).
pub fn resolve_program(program: impl AsRef<OsStr>) -> Result<PathBuf, TargetError> {
    find_executable(program.as_ref(), std::env::var_os("PATH").as_deref())
}

fn command_target(program: &OsStr, env: &SearchEnv) -> Result<LibcTarget, TargetError> {
    let mut exe = find_executable(program, env.path.as_deref())?;
    // `#!` scripts: the interpreter is what allocates (bounded like the kernel's recursion).
    for _ in 0..4 {
        match shebang_interpreter(&exe) {
            Some(interp) => exe = find_executable(interp.as_os_str(), None)?,
            None => break,
        }
    }
    let elf = ElfFile::open(&exe)?;
    if elf.symbol("malloc").is_some() {
        return target_from_path(&elf);
    }
    if !elf.is_dynamic() {
        return Err(TargetError::StaticNoMalloc { path: exe });
    }
    let libc = find_libc(&elf, env)?;
    let libc_elf = ElfFile::open(&libc)?;
    if libc_elf.symbol("malloc").is_none() {
        return Err(TargetError::LibcNotFound {
            path: exe,
            wanted: format!("malloc in {}", libc.display()),
        });
    }
    target_from_path(&libc_elf)
}

fn target_from_path(elf: &ElfFile) -> Result<LibcTarget, TargetError> {
    let meta = fs::metadata(elf.path()).map_err(|e| TargetError::io(elf.path(), e))?;
    target_from(
        elf,
        elf.path().to_string_lossy().into_owned(),
        DevInode::from_metadata(&meta),
    )
}

/// `execvp`'s search: a name with a slash is used as is; otherwise each `PATH` entry in turn
/// (empty entries mean the current directory; unset `PATH` means `/bin:/usr/bin`).
fn find_executable(program: &OsStr, path_env: Option<&OsStr>) -> Result<PathBuf, TargetError> {
    let not_found = || TargetError::CommandNotFound {
        command: program.to_string_lossy().into_owned(),
    };
    if program.is_empty() {
        return Err(not_found());
    }
    if program.as_bytes().contains(&b'/') {
        let p = PathBuf::from(program);
        return match fs::metadata(&p) {
            Ok(m) if is_executable_file(&m) => Ok(p),
            Ok(_) => Err(TargetError::NotExecutable { path: p }),
            Err(_) => Err(not_found()),
        };
    }
    let path_env = path_env.unwrap_or(OsStr::new("/bin:/usr/bin"));
    let mut not_executable = None;
    for dir in path_env.as_bytes().split(|&b| b == b':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(OsStr::from_bytes(dir))
        };
        let candidate = dir.join(program);
        match fs::metadata(&candidate) {
            Ok(m) if is_executable_file(&m) => return Ok(candidate),
            Ok(m) if m.is_file() => {
                not_executable.get_or_insert(candidate);
            }
            _ => {}
        }
    }
    Err(not_executable.map_or_else(not_found, |path| TargetError::NotExecutable { path }))
}

fn is_executable_file(meta: &fs::Metadata) -> bool {
    meta.is_file() && meta.permissions().mode() & 0o111 != 0
}

/// The interpreter of a `#!` script, if `path` is one.
fn shebang_interpreter(path: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let n = fs::File::open(path).ok()?.read(&mut head).ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n')?];
    let interp = line
        .split(|b| *b == b' ' || *b == b'\t')
        .find(|w| !w.is_empty())?;
    Some(PathBuf::from(OsStr::from_bytes(interp)))
}

/// A loaded object during the dependency walk: where its `$ORIGIN` is and its search paths.
struct Loader {
    origin: PathBuf,
    info: elf::DynamicInfo,
}

impl Loader {
    fn new(path: &Path, info: elf::DynamicInfo) -> Self {
        // ld.so expands $ORIGIN to the directory of the object's real path.
        let real = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        let origin = real.parent().unwrap_or(Path::new("/")).to_owned();
        Loader { origin, info }
    }

    fn expand(&self, dirs: &[String]) -> Vec<PathBuf> {
        let origin = self.origin.to_string_lossy();
        dirs.iter()
            .map(|d| PathBuf::from(d.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin)))
            .collect()
    }
}

/// Finds the libc a dynamic executable will load: musl's loader when that is the interpreter,
/// else the first `DT_NEEDED` libc in breadth-first (load) order, each name searched the way
/// ld.so does: `DT_RPATH` (of the needing object, then of the executable, when the needing
/// object has no `DT_RUNPATH`), `LD_LIBRARY_PATH`, `DT_RUNPATH`, `/etc/ld.so.cache`, default
/// directories.
fn find_libc(exe: &ElfFile, env: &SearchEnv) -> Result<PathBuf, TargetError> {
    if let Some(interp) = exe.interpreter()
        && basename(interp).starts_with("ld-musl-")
    {
        return Ok(PathBuf::from(interp));
    }
    // Like ld.so, carry on without a missing or unreadable cache: the default dirs remain.
    let cache = LdCache::read(&env.ld_cache)
        .inspect_err(|e| log::debug!("{e}"))
        .unwrap_or_default();
    let ld_library_path: Vec<PathBuf> = env
        .ld_library_path
        .as_deref()
        .map(|v| {
            v.as_bytes()
                .split(|&b| b == b':' || b == b';')
                .map(|d| match d {
                    b"" => PathBuf::from("."),
                    d => PathBuf::from(OsStr::from_bytes(d)),
                })
                .collect()
        })
        .unwrap_or_default();

    let exe_loader = Loader::new(exe.path(), exe.dynamic().clone());
    let exe_rpath = if exe_loader.info.runpath.is_empty() {
        exe_loader.expand(&exe_loader.info.rpath)
    } else {
        Vec::new()
    };
    let mut loaders = vec![exe_loader];
    let mut queue: VecDeque<(String, usize)> = loaders[0]
        .info
        .needed
        .iter()
        .map(|n| (n.clone(), 0))
        .collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut wanted = Vec::new();
    while let Some((name, by)) = queue.pop_front() {
        if !seen.insert(name.clone()) || seen.len() > 512 {
            continue;
        }
        let loader = &loaders[by];
        let mut dirs = Vec::new();
        if loader.info.runpath.is_empty() {
            dirs.extend(loader.expand(&loader.info.rpath));
            if by != 0 {
                dirs.extend(exe_rpath.iter().cloned());
            }
        }
        dirs.extend(ld_library_path.iter().cloned());
        dirs.extend(loader.expand(&loader.info.runpath));
        let found = search_library(&name, &dirs, &cache);
        if is_libc_name(&name) {
            wanted.push(name.clone());
            if let Some(path) = found {
                return Ok(path);
            }
            continue;
        }
        // Not libc: look through its own dependencies (libc may be needed only indirectly).
        if let Some(path) = found
            && let Ok(info) = elf::dynamic_info(&path)
        {
            let index = loaders.len();
            queue.extend(info.needed.iter().map(|n| (n.clone(), index)));
            loaders.push(Loader::new(&path, info));
        }
    }
    Err(TargetError::LibcNotFound {
        path: exe.path().to_owned(),
        wanted: if wanted.is_empty() {
            "a libc.so.* among its DT_NEEDED libraries".to_owned()
        } else {
            wanted.join(", ")
        },
    })
}

fn search_library(name: &str, dirs: &[PathBuf], cache: &LdCache) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return elf::is_x86_64_elf(&p).then_some(p);
    }
    let from_dirs = |dirs: &mut dyn Iterator<Item = &Path>| {
        dirs.map(|d| d.join(name)).find(|p| elf::is_x86_64_elf(p))
    };
    from_dirs(&mut dirs.iter().map(PathBuf::as_path))
        .or_else(|| {
            cache
                .lookup(name)
                .map(PathBuf::from)
                .filter(|p| elf::is_x86_64_elf(p))
        })
        .or_else(|| from_dirs(&mut DEFAULT_LIB_DIRS.iter().map(Path::new)))
}

// ---------------------------------------------------------------------------------------------
// /etc/ld.so.cache

/// One entry of `/etc/ld.so.cache`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LdCacheEntry {
    /// Library name (`libc.so.6`).
    pub name: String,
    /// Full path.
    pub path: String,
    /// ABI flags: `FLAG_ELF_LIBC6 | FLAG_X8664_LIB64` (0x0303) for x86-64.
    pub flags: i32,
    /// Non-zero for `glibc-hwcaps` subdirectory variants.
    pub hwcap: u64,
}

/// The loader's cache of library locations, in glibc's "new" format (`glibc-ld.so.cache1.1`;
/// the only one glibc ≥ 2.32 writes), possibly after an old-format (`ld.so-1.7.0`) block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LdCache {
    pub entries: Vec<LdCacheEntry>,
}

const CACHE_MAGIC_OLD: &[u8] = b"ld.so-1.7.0";
const CACHE_MAGIC_NEW: &[u8] = b"glibc-ld.so.cache1.1";
const CACHE_NEW_HEADER: usize = 48;
const CACHE_NEW_ENTRY: usize = 24;
const CACHE_OLD_ENTRY: usize = 12;
const FLAG_X86_64_LIBC6: i32 = 0x0303;

impl LdCache {
    /// Reads and parses a cache file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, TargetError> {
        let path = path.as_ref();
        let buf = fs::read(path).map_err(|e| TargetError::io(path, e))?;
        Self::parse(&buf).map_err(|reason| TargetError::BadLdCache {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses the bytes of a cache file (host byte order: little-endian on x86-64).
    pub fn parse(buf: &[u8]) -> Result<Self, String> {
        let u32_at = |at: usize| -> Result<u32, String> {
            buf.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| format!("truncated at {at}"))
        };
        let mut start = 0;
        if buf.starts_with(CACHE_MAGIC_OLD) {
            // Old header: magic[11], pad, nlibs u32; 12-byte entries; the new block follows,
            // aligned to 8.
            let nlibs = u32_at(12)? as usize;
            let end = nlibs
                .checked_mul(CACHE_OLD_ENTRY)
                .and_then(|n| n.checked_add(16))
                .ok_or("old entry count overflows")?;
            start = end.next_multiple_of(8);
        }
        let new = buf.get(start..).ok_or("no new-format block")?;
        if !new.starts_with(CACHE_MAGIC_NEW) {
            return Err("not a glibc-ld.so.cache1.1 file".to_owned());
        }
        let nlibs = u32_at(start + 20)? as usize;
        let table_end = nlibs
            .checked_mul(CACHE_NEW_ENTRY)
            .and_then(|n| n.checked_add(CACHE_NEW_HEADER))
            .filter(|&n| n <= new.len())
            .ok_or_else(|| format!("{nlibs} entries do not fit in the file"))?;
        // Strings are offsets from the start of the new-format header.
        let string = |off: u32| -> Result<String, String> {
            let s = new
                .get(off as usize..)
                .ok_or_else(|| format!("string offset {off} out of range"))?;
            let end = s
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| format!("unterminated string at {off}"))?;
            Ok(String::from_utf8_lossy(&s[..end]).into_owned())
        };
        let mut entries = Vec::with_capacity(nlibs);
        for e in new[CACHE_NEW_HEADER..table_end]
            .as_chunks::<CACHE_NEW_ENTRY>()
            .0
        {
            let word = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
            let mut hwcap = [0u8; 8];
            hwcap.copy_from_slice(&e[16..24]);
            entries.push(LdCacheEntry {
                flags: word(0) as i32,
                name: string(word(4))?,
                path: string(word(8))?,
                hwcap: u64::from_le_bytes(hwcap),
            });
        }
        Ok(LdCache { entries })
    }

    /// Path of an x86-64 library by name, preferring the baseline (non-hwcaps) entry.
    pub fn lookup(&self, name: &str) -> Option<&str> {
        let mut matching = self
            .entries
            .iter()
            .filter(|e| e.name == name && e.flags == FLAG_X86_64_LIBC6);
        let first = matching.clone().next();
        matching
            .find(|e| e.hwcap == 0)
            .or(first)
            .map(|e| e.path.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn is_glibc(elf: &ElfFile) -> bool {
        elf.symbol("gnu_get_libc_version").is_some()
    }

    /// Checks a target against the libc this test binary itself runs on.
    fn check_own_libc(t: &LibcTarget) {
        let libc = elf::tests::own_libc().expect("test binary maps a libc");
        assert_eq!(t.display_path, libc.to_str().unwrap());
        let elf = ElfFile::open(&t.path).unwrap();
        assert_eq!(
            DevInode::from_metadata(&fs::metadata(&t.path).unwrap()),
            t.dev_inode
        );
        let present: Vec<Api> = Api::ALL
            .into_iter()
            .filter(|a| elf.symbol(a.symbol()).is_some())
            .collect();
        assert_eq!(t.probes.len() + t.aliases.len(), present.len());
        for p in &t.probes {
            assert_eq!(p.with_return, p.api.needs_return(), "{:?}", p.api);
            if p.with_return {
                assert_eq!(p.sp_delta, 0, "{:?}", p.api);
            }
        }
        if !is_glibc(&elf) {
            return;
        }
        let free = t.probes.iter().find(|p| p.api == Api::Free).unwrap();
        let free_sym = elf.symbol("free").unwrap();
        assert_eq!(
            free.file_offset,
            elf.vaddr_to_file_offset(free_sym.address).unwrap() + 3,
            "free: probe on the je after test %rdi,%rdi"
        );
        assert!(free.emulated);
        let malloc = t.probes.iter().find(|p| p.api == Api::Malloc).unwrap();
        assert_eq!(
            malloc.file_offset,
            elf.vaddr_to_file_offset(elf.symbol("malloc").unwrap().address)
                .unwrap()
        );
        if elf.symbol("aligned_alloc") == elf.symbol("memalign") {
            // Debian 12's glibc 2.36: 10 APIs, 9 functions.
            assert_eq!(present.len(), 10);
            assert_eq!(t.probes.len(), 9);
            assert_eq!(t.aliases, vec![(Api::Memalign, Api::AlignedAlloc)]);
            assert!(!t.probes.iter().any(|p| p.api == Api::Memalign));
        }
    }

    fn entries(lines: &[&str]) -> Vec<MapEntry> {
        lines.iter().map(|l| maps::parse_line(l).unwrap()).collect()
    }

    fn fake_target(inode: u64) -> Arc<LibcTarget> {
        Arc::new(LibcTarget {
            path: PathBuf::from("/lib/libc.so.6"),
            display_path: "/lib/libc.so.6".into(),
            dev_inode: DevInode {
                major: 8,
                minor: 1,
                inode,
            },
            probes: Vec::new(),
            aliases: Vec::new(),
        })
    }

    /// A dynamically linked program: executable, libc (mapped several times), loader, a data
    /// file.
    const DYNAMIC: [&str; 6] = [
        "55d000000000-55d000001000 r--p 00000000 08:01 100 /usr/bin/app",
        "55d000001000-55d000002000 r-xp 00001000 08:01 100 /usr/bin/app",
        "7f0000000000-7f0000028000 r--p 00000000 08:01 200 /usr/lib/x86_64-linux-gnu/libc.so.6",
        "7f0000028000-7f000019d000 r-xp 00028000 08:01 200 /usr/lib/x86_64-linux-gnu/libc.so.6",
        "7f0000200000-7f0000201000 r--p 00000000 08:01 300 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "7f0000300000-7f0000301000 r--s 00000000 08:01 400 /usr/share/fonts/a.ttf",
    ];

    const EXE: Option<DevInode> = Some(DevInode {
        major: 8,
        minor: 1,
        inode: 100,
    });

    #[test]
    fn search_examines_each_file_once_for_all_processes() {
        let libc = fake_target(200);
        let maps = entries(&DYNAMIC);
        let mut cache = FileCache::default();
        let mut examined = Vec::new();
        for _ in 0..3 {
            let found = search(&maps, EXE, &mut cache, |e| {
                examined.push(e.dev_inode.inode);
                Ok(match e.dev_inode.inode {
                    100 => Verdict::NoMalloc,
                    200 => Verdict::Malloc(Arc::clone(&libc)),
                    other => panic!("inode {other} examined"),
                })
            });
            assert!(Arc::ptr_eq(&found.unwrap(), &libc));
        }
        // The executable first, then libc; the search stops there.
        assert_eq!(examined, [100, 200]);
    }

    #[test]
    fn search_order_and_what_is_remembered() {
        // A static executable with malloc wins over everything else.
        let exe = fake_target(100);
        let mut cache = FileCache::default();
        let found = search(&entries(&DYNAMIC), EXE, &mut cache, |e| {
            assert_eq!(e.dev_inode.inode, 100);
            Ok(Verdict::Malloc(Arc::clone(&exe)))
        });
        assert!(Arc::ptr_eq(&found.unwrap(), &exe));

        // No libc-named file: the others are tried, the loader is not.
        let maps = entries(&[DYNAMIC[0], DYNAMIC[4], DYNAMIC[5]]);
        let mut examined = Vec::new();
        let found = search(&maps, EXE, &mut FileCache::default(), |e| {
            examined.push(e.dev_inode.inode);
            Ok(Verdict::NoMalloc)
        });
        assert!(matches!(found, Err(None)));
        assert_eq!(examined, [100, 400]);

        // A file that cannot be opened now is asked about again for the next process; a broken
        // libc is remembered with its error.
        let maps = entries(&DYNAMIC);
        let mut cache = FileCache::default();
        let mut examined = Vec::new();
        for _ in 0..2 {
            let found = search(&maps, EXE, &mut cache, |e| {
                examined.push(e.dev_inode.inode);
                match e.dev_inode.inode {
                    100 => Err(Unexamined::Path(TargetError::NoSuchProcess { pid: 1 })),
                    200 => Ok(Verdict::NotElf(FileError::BadElf {
                        path: "/lib/libc.so.6".into(),
                        reason: "truncated".into(),
                    })),
                    _ => Ok(Verdict::NoMalloc),
                }
            });
            // The executable's error came first.
            assert!(matches!(
                found,
                Err(Some(TargetError::NoSuchProcess { .. }))
            ));
        }
        assert_eq!(examined, [100, 200, 400, 100]);

        // Defines malloc but cannot be probed: the search ends with the file's error, also
        // when it is remembered.
        let mut cache = FileCache::default();
        for _ in 0..2 {
            let found = search(&maps, EXE, &mut cache, |e| {
                Ok(match e.dev_inode.inode {
                    200 => Verdict::Unprobeable(FileError::MissingSymbol {
                        path: "/lib/libc.so.6".into(),
                        symbol: "free",
                    }),
                    _ => Verdict::NoMalloc,
                })
            });
            let err = found.unwrap_err().unwrap();
            assert_eq!(
                err.to_string(),
                "/lib/libc.so.6: defines malloc but not free"
            );
        }
    }

    #[test]
    fn own_process() {
        let t = for_pid(std::process::id()).unwrap();
        check_own_libc(&t);
        // Same mount namespace: the plain path is used, not /proc/<pid>/root.
        assert_eq!(t.path, PathBuf::from(&t.display_path));
    }

    #[test]
    fn child_process_and_missing_process() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        // The child may still be in exec: wait until it maps its libc.
        let mut result = for_pid(child.id());
        for _ in 0..100 {
            if result.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            result = for_pid(child.id());
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let t = result.unwrap();
        assert_eq!(t.dev_inode, for_pid(std::process::id()).unwrap().dev_inode);
        assert!(matches!(
            for_pid(u32::MAX),
            Err(TargetError::NoSuchProcess { .. })
        ));
    }

    /// A process in another mount namespace where libc is a different file (as in a container)
    /// is traced through its own libc, via /proc/<pid>/root, and through map_files once that
    /// file is deleted. Needs root (unshare, mount); skipped otherwise.
    #[test]
    fn other_mount_namespace_uses_its_own_libc() {
        let dir = TempDir::new("mntns");
        let own = elf::tests::own_libc().unwrap();
        let copy = dir.0.join("libc.so.6");
        fs::copy(&own, &copy).unwrap();
        let script = format!(
            "mount --bind {} {} && exec sleep 30",
            copy.display(),
            own.display()
        );
        let Ok(mut child) = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stderr(Stdio::null())
            .spawn()
        else {
            eprintln!("no unshare; skipping");
            return;
        };
        let pid = child.id();
        let mut found = None;
        for _ in 0..300 {
            if let Ok(t) = for_pid(pid)
                && t.path.starts_with("/proc")
            {
                found = Some(t);
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let Some(t) = found else {
            let _ = child.kill();
            child.wait().unwrap();
            eprintln!("unshare/mount did not run (not root?); skipping");
            return;
        };
        let copy_id = DevInode::from_metadata(&fs::metadata(&copy).unwrap());
        assert_eq!(t.dev_inode, copy_id);
        assert_eq!(
            t.path,
            Path::new(&format!("/proc/{pid}/root")).join(t.display_path.trim_start_matches('/'))
        );

        // Deleted (as after an upgrade): only map_files still reaches the mapped file.
        fs::remove_file(&copy).unwrap();
        let deleted = for_pid(pid);
        child.kill().unwrap();
        child.wait().unwrap();
        let deleted = deleted.unwrap();
        assert!(
            deleted.path.starts_with(format!("/proc/{pid}/map_files/")),
            "{}",
            deleted.path.display()
        );
        assert_eq!(deleted.dev_inode, copy_id);
        assert_eq!(deleted.display_path, t.display_path);
        assert_eq!(deleted.probes, t.probes);
    }

    #[test]
    fn process_without_libc() {
        let dir = TempDir::new("nolibc");
        let exe = dir.0.join("pause-forever");
        // mov $34,%eax (pause); syscall; jmp back
        let code = [0xb8, 0x22, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xeb, 0xf7];
        fs::write(&exe, elf::tests::test_elf(None, &code)).unwrap();
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
        let Ok(mut child) = Command::new(&exe).spawn() else {
            eprintln!(
                "cannot run files from {} (noexec?); skipping",
                dir.0.display()
            );
            return;
        };
        let pid = child.id();
        let mut result = for_pid(pid);
        for _ in 0..100 {
            if fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "pause-forever")
            {
                result = for_pid(pid);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let err = result.unwrap_err();
        assert!(
            matches!(&err, TargetError::ProcessNoLibc { comm, .. } if comm == "pause-forever"),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "process {pid} (pause-forever) does not use a libc allocator (no malloc in its mapped files)"
            )
        );
        // The same file as a command: static, no malloc.
        assert!(matches!(
            for_command(&exe),
            Err(TargetError::StaticNoMalloc { .. })
        ));
    }

    #[test]
    fn command_from_path() {
        let t = for_command("sleep").unwrap();
        let own = for_pid(std::process::id()).unwrap();
        assert_eq!(t.dev_inode, own.dev_inode);
        assert_eq!(t.probes, own.probes);
        assert_eq!(t.aliases, own.aliases);
    }

    #[test]
    fn command_errors_and_scripts() {
        assert!(matches!(
            for_command("allocwatch-no-such-command-xyz"),
            Err(TargetError::CommandNotFound { .. })
        ));
        assert!(matches!(
            for_command("./no/such/file"),
            Err(TargetError::CommandNotFound { .. })
        ));
        let dir = TempDir::new("cmd");
        let plain = dir.0.join("plain");
        fs::write(&plain, b"not executable").unwrap();
        assert!(matches!(
            for_command(&plain),
            Err(TargetError::NotExecutable { .. })
        ));
        let env = SearchEnv {
            path: Some(dir.0.as_os_str().to_owned()),
            ld_library_path: None,
            ld_cache: LD_CACHE.into(),
        };
        assert!(matches!(
            command_target(OsStr::new("plain"), &env),
            Err(TargetError::NotExecutable { .. })
        ));
        // A script allocates through its interpreter.
        let script = dir.0.join("script");
        fs::write(&script, b"#!/bin/sh -e\necho hi\n").unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let t = command_target(OsStr::new("script"), &env).unwrap();
        assert_eq!(t.dev_inode, for_pid(std::process::id()).unwrap().dev_inode);
    }

    /// gcc-built fixtures (skipped where gcc or a static libc is missing).
    #[test]
    fn compiled_fixtures() {
        let dir = TempDir::new("gcc");
        let src = dir.0.join("main.c");
        fs::write(
            &src,
            b"#include <stdlib.h>\nint main(int c, char **v) { free(malloc(c)); return v == 0; }\n",
        )
        .unwrap();
        let gcc = |args: &[&OsStr]| {
            Command::new("gcc")
                .args(args)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };

        // Static: the executable is the target.
        let stat = dir.0.join("static");
        if gcc(&[
            "-O1".as_ref(),
            "-static".as_ref(),
            src.as_os_str(),
            "-o".as_ref(),
            stat.as_os_str(),
        ]) {
            let t = for_command(&stat).unwrap();
            assert_eq!(t.path, stat);
            assert!(t.probes.iter().any(|p| p.api == Api::Malloc));
            assert!(t.probes.iter().any(|p| p.api == Api::Free));
        } else {
            eprintln!("no static gcc; skipping the static case");
        }

        // Dynamic with DT_RUNPATH=$ORIGIN/lib holding a copy of libc: the copy is found first.
        let own = elf::tests::own_libc().unwrap();
        let lib = dir.0.join("lib");
        fs::create_dir_all(&lib).unwrap();
        fs::copy(&own, lib.join(own.file_name().unwrap())).unwrap();
        let dynamic = dir.0.join("dynamic");
        if gcc(&[
            src.as_os_str(),
            "-Wl,--enable-new-dtags,-rpath,$ORIGIN/lib".as_ref(),
            "-o".as_ref(),
            dynamic.as_os_str(),
        ]) {
            let t = for_command(&dynamic).unwrap();
            assert_eq!(t.path, lib.join(own.file_name().unwrap()));
            // LD_LIBRARY_PATH comes before DT_RUNPATH.
            let sys = own.parent().unwrap();
            let env = SearchEnv {
                path: None,
                ld_library_path: Some(sys.as_os_str().to_owned()),
                ld_cache: LD_CACHE.into(),
            };
            let t = command_target(dynamic.as_os_str(), &env).unwrap();
            assert_eq!(t.path, sys.join(own.file_name().unwrap()));
        } else {
            eprintln!("no gcc; skipping the RUNPATH case");
        }
    }

    /// Builds a new-format cache: (flags, name, path, hwcap) entries.
    fn build_cache(entries: &[(i32, &str, &str, u64)]) -> Vec<u8> {
        let mut strings = Vec::new();
        let table = CACHE_NEW_HEADER + entries.len() * CACHE_NEW_ENTRY;
        let mut offsets = Vec::new();
        for (_, name, path, _) in entries {
            let k = table + strings.len();
            strings.extend_from_slice(name.as_bytes());
            strings.push(0);
            let v = table + strings.len();
            strings.extend_from_slice(path.as_bytes());
            strings.push(0);
            offsets.push((k as u32, v as u32));
        }
        let mut b = Vec::new();
        b.extend_from_slice(CACHE_MAGIC_NEW);
        b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        b.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        b.extend_from_slice(&[2, 0, 0, 0]); // flags: little-endian
        b.extend_from_slice(&[0; 16]); // extension offset, unused
        assert_eq!(b.len(), CACHE_NEW_HEADER);
        for ((flags, _, _, hwcap), (k, v)) in entries.iter().zip(offsets) {
            b.extend_from_slice(&flags.to_le_bytes());
            b.extend_from_slice(&k.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&hwcap.to_le_bytes());
        }
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn ld_cache_constructed() {
        let buf = build_cache(&[
            (0x0003, "libc.so.6", "/lib/i386-linux-gnu/libc.so.6", 0),
            (
                0x0303,
                "libfoo.so.1",
                "/opt/hwcaps/x86-64-v3/libfoo.so.1",
                1 << 62,
            ),
            (0x0303, "libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6", 0),
            (0x0303, "libfoo.so.1", "/opt/libfoo.so.1", 0),
            (0x0803, "libbar.so", "/libx32/libbar.so", 0),
        ]);
        let cache = LdCache::parse(&buf).unwrap();
        assert_eq!(cache.entries.len(), 5);
        assert_eq!(
            cache.lookup("libc.so.6"),
            Some("/lib/x86_64-linux-gnu/libc.so.6")
        );
        assert_eq!(cache.lookup("libfoo.so.1"), Some("/opt/libfoo.so.1"));
        assert_eq!(cache.lookup("libbar.so"), None, "x32 only");
        assert_eq!(cache.lookup("libnone.so"), None);

        // After an old-format block (nlibs = 1, 16 + 12 bytes, aligned to 32).
        let mut old = Vec::new();
        old.extend_from_slice(CACHE_MAGIC_OLD);
        old.push(0);
        old.extend_from_slice(&1u32.to_le_bytes());
        old.extend_from_slice(&[0; 12]);
        old.resize(32, 0);
        old.extend_from_slice(&buf);
        assert_eq!(LdCache::parse(&old).unwrap(), cache);

        assert!(LdCache::parse(b"garbage").is_err());
        assert!(LdCache::parse(&buf[..CACHE_NEW_HEADER + 10]).is_err());
        let mut bad = buf.clone();
        bad[CACHE_NEW_HEADER + 4..CACHE_NEW_HEADER + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(LdCache::parse(&bad).is_err());
        let mut huge = buf;
        huge[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(LdCache::parse(&huge).is_err());
    }

    #[test]
    fn ld_cache_real() {
        if !Path::new(LD_CACHE).exists() {
            return;
        }
        let cache = LdCache::read(LD_CACHE).unwrap();
        assert!(!cache.entries.is_empty());
        let libc = cache.lookup("libc.so.6").expect("libc.so.6 in the cache");
        assert!(elf::is_x86_64_elf(libc));
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("allocwatch-libc-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}
