//! The files a command not yet run will allocate through ([`Served`]): `PATH` like `execvp`,
//! `#!` scripts followed to their interpreter, and ld.so's library search in load order.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use super::{
    LdCache, LibcTarget, Served, basename, is_libc_name, prefix_of, process::split_preload,
    target_from,
};
use crate::target::TargetError;
use crate::target::elf::{self, ElfFile};
use crate::target::maps::DevInode;

/// The files that `program` will allocate through once exec'd, with `PATH`, `LD_PRELOAD` and
/// `LD_LIBRARY_PATH` taken from our environment (the child inherits it).
pub fn for_command(program: impl AsRef<OsStr>) -> Result<Served, TargetError> {
    let env = SearchEnv {
        path: std::env::var_os("PATH"),
        ld_library_path: std::env::var_os("LD_LIBRARY_PATH"),
        ld_preload: std::env::var_os("LD_PRELOAD"),
        ld_cache: PathBuf::from(LD_CACHE),
    };
    command_target(program.as_ref(), &env)
}

pub(super) const LD_CACHE: &str = "/etc/ld.so.cache";

/// Default library directories of the loader of this build's architecture (Debian multiarch
/// first).
const DEFAULT_LIB_DIRS: [&str; 6] = [
    #[cfg(not(target_arch = "aarch64"))]
    "/lib/x86_64-linux-gnu",
    #[cfg(not(target_arch = "aarch64"))]
    "/usr/lib/x86_64-linux-gnu",
    #[cfg(target_arch = "aarch64")]
    "/lib/aarch64-linux-gnu",
    #[cfg(target_arch = "aarch64")]
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

pub(super) struct SearchEnv {
    pub(super) path: Option<OsString>,
    pub(super) ld_library_path: Option<OsString>,
    pub(super) ld_preload: Option<OsString>,
    pub(super) ld_cache: PathBuf,
}

/// The executable `program` names, searched in `PATH` like `execvp` (scripts not followed).
pub fn resolve_program(program: impl AsRef<OsStr>) -> Result<PathBuf, TargetError> {
    find_executable(program.as_ref(), std::env::var_os("PATH").as_deref())
}

pub(super) fn command_target(program: &OsStr, env: &SearchEnv) -> Result<Served, TargetError> {
    let mut exe = find_executable(program, env.path.as_deref())?;
    // `#!` scripts: the interpreter is what allocates (bounded like the kernel's recursion).
    for _ in 0..4 {
        match shebang_interpreter(&exe) {
            Some(interp) => exe = find_executable(interp.as_os_str(), None)?,
            None => break,
        }
    }
    let elf = ElfFile::open(&exe)?;
    if !elf.is_dynamic() {
        if prefix_of(&elf).is_none() {
            return Err(TargetError::StaticNoMalloc { path: exe });
        }
        return served(vec![Arc::new(target_from_path(&elf)?)], &exe, "malloc");
    }
    // The executable first, then the libraries in load order: the first definition wins.
    let (order, wanted) = load_order(&elf, env);
    let mut found = Vec::new();
    if prefix_of(&elf).is_some() {
        found.push(Arc::new(target_from_path(&elf)?));
    }
    for path in order {
        if Served::new(found.clone()).is_some_and(|s| s.complete()) {
            break;
        }
        let Ok(lib) = ElfFile::open(&path) else {
            continue;
        };
        if prefix_of(&lib).is_some() {
            found.push(Arc::new(target_from_path(&lib)?));
        }
    }
    served(found, &exe, &wanted)
}

fn served(found: Vec<Arc<LibcTarget>>, exe: &Path, wanted: &str) -> Result<Served, TargetError> {
    Served::new(found).ok_or_else(|| TargetError::LibcNotFound {
        path: exe.to_owned(),
        wanted: wanted.to_owned(),
    })
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

/// The libraries the dynamic executable `exe` will load, in ld.so's order, searched with our
/// environment (a command's child inherits it).
pub fn libraries_of(exe: &ElfFile) -> Vec<PathBuf> {
    let env = SearchEnv {
        path: None,
        ld_library_path: std::env::var_os("LD_LIBRARY_PATH"),
        ld_preload: std::env::var_os("LD_PRELOAD"),
        ld_cache: PathBuf::from(LD_CACHE),
    };
    load_order(exe, &env).0
}

/// The files a dynamic executable will load, in ld.so's order: `LD_PRELOAD`, then `DT_NEEDED`
/// breadth-first, each name searched the way ld.so does: `DT_RPATH` (of the needing object,
/// then of the executable, when the needing object has no `DT_RUNPATH`), `LD_LIBRARY_PATH`,
/// `DT_RUNPATH`, `/etc/ld.so.cache`, default directories. musl's loader is its libc: it takes
/// the place of the libc name. Also what to call a missing libc in an error.
fn load_order(exe: &ElfFile, env: &SearchEnv) -> (Vec<PathBuf>, String) {
    let musl = exe
        .interpreter()
        .filter(|interp| basename(interp).starts_with("ld-musl-"))
        .map(PathBuf::from);
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
    let mut order = Vec::new();
    // Preloaded names are searched like the executable's own (index 0).
    let preload = env
        .ld_preload
        .as_deref()
        .map(|v| split_preload(&v.to_string_lossy()))
        .unwrap_or_default();
    let mut queue: VecDeque<(String, usize)> = preload
        .into_iter()
        .chain(loaders[0].info.needed.iter().cloned())
        .map(|n| (n, 0))
        .collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut wanted = Vec::new();
    let mut libc_found = false;
    while let Some((name, by)) = queue.pop_front() {
        if !seen.insert(name.clone()) || seen.len() > 512 {
            continue;
        }
        let found = if is_libc_name(&name)
            && let Some(interp) = &musl
        {
            Some(interp.clone())
        } else {
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
            search_library(&name, &dirs, &cache)
        };
        if is_libc_name(&name) {
            wanted.push(name.clone());
            libc_found |= found.is_some();
        }
        let Some(path) = found else {
            continue;
        };
        // Its own dependencies come after everything already queued (breadth-first).
        if let Ok(info) = elf::dynamic_info(&path) {
            let index = loaders.len();
            queue.extend(info.needed.iter().map(|n| (n.clone(), index)));
            loaders.push(Loader::new(&path, info));
        }
        order.push(path);
    }
    if let Some(interp) = musl.filter(|i| !order.contains(i)) {
        order.push(interp);
    }
    let wanted = if libc_found {
        "malloc in its libraries".to_owned()
    } else if wanted.is_empty() {
        "a libc.so.* among its DT_NEEDED libraries".to_owned()
    } else {
        wanted.join(", ")
    };
    (order, wanted)
}

fn search_library(name: &str, dirs: &[PathBuf], cache: &LdCache) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return elf::is_native_elf(&p).then_some(p);
    }
    let from_dirs = |dirs: &mut dyn Iterator<Item = &Path>| {
        dirs.map(|d| d.join(name)).find(|p| elf::is_native_elf(p))
    };
    from_dirs(&mut dirs.iter().map(PathBuf::as_path))
        .or_else(|| {
            cache
                .lookup(name)
                .map(PathBuf::from)
                .filter(|p| elf::is_native_elf(p))
        })
        .or_else(|| from_dirs(&mut DEFAULT_LIB_DIRS.iter().map(Path::new)))
}
