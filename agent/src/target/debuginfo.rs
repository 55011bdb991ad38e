//! Separate debug files, found the way gdb and perf find them: by the build-id note under
//! `DIR/.build-id/xx/yyyy.debug`, then by `.gnu_debuglink` next to the binary, in its `.debug/`
//! subdirectory and under `DIR/` + the binary's directory (CRC checked), for each debug
//! directory `DIR` (`--debug-dir`, default `/usr/lib/debug`).
//!
//! blazesym 0.2.7 follows debug links itself, but only when the binary has a `.gnu_debuglink`
//! (a binary known by build-id alone is missed), from the path it was given (ours are
//! `/proc/self/fd/N`, so never inside a container's root), and a CRC mismatch at the first
//! candidate fails the whole file, ELF symbols included. So the lookup is ours and blazesym
//! reads the file found. `.gnu_debugdata` (MiniDebugInfo) is blazesym's (its `xz` feature).
//!
//! The growth probes read it too ([`find_for`]): a distribution's interpreter keeps its static
//! functions (CPython's `dictresize`, `list_resize`) only in its debug file's `.symtab`.

use std::{
    fs::File,
    os::unix::fs::{FileExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use object::{Object as _, ObjectSection as _, ObjectSegment as _, read::ReadCache};

/// gdb's default `debug-file-directory`.
pub const DEFAULT_DEBUG_DIR: &str = "/usr/lib/debug";

static DEBUG_DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();

/// Sets the debug directories for the whole process (once, at startup; later calls are
/// ignored). Without it, [`DEFAULT_DEBUG_DIR`].
pub fn set_debug_dirs(dirs: Vec<PathBuf>) {
    if DEBUG_DIRS.set(dirs).is_err() {
        log::debug!("debug directories already set");
    }
}

pub(crate) fn debug_dirs() -> &'static [PathBuf] {
    DEBUG_DIRS.get_or_init(|| vec![PathBuf::from(DEFAULT_DEBUG_DIR)])
}

#[derive(Debug, thiserror::Error)]
pub enum DebugInfoError {
    #[error("not a readable ELF file: {0}")]
    Elf(#[from] object::Error),
}

/// What the symbolizer needs to know about a mapped ELF file.
#[derive(Debug, Default)]
pub(crate) struct ElfFacts {
    pub build_id: Option<Vec<u8>>,
    /// `.gnu_debuglink`: file name and CRC-32 of the debug file.
    pub debuglink: Option<(String, u32)>,
    /// DWARF in the file itself (`.debug_info`).
    pub has_dwarf: bool,
    /// A non-empty `.symtab`.
    pub has_symtab: bool,
    /// Loadable segments: (file offset, file size, virtual address).
    segments: Vec<(u64, u64, u64)>,
}

impl ElfFacts {
    /// Reads only the headers and notes it needs (not the whole file).
    pub fn read(file: &File) -> Result<Self, DebugInfoError> {
        let cache = ReadCache::new(file);
        let obj = object::File::parse(&cache)?;
        let debuglink = obj
            .gnu_debuglink()
            .ok()
            .flatten()
            .map(|(name, crc)| (String::from_utf8_lossy(name).into_owned(), crc));
        Ok(Self {
            build_id: obj.build_id().ok().flatten().map(<[u8]>::to_vec),
            debuglink,
            has_dwarf: obj.has_debug_symbols(),
            has_symtab: obj.section_by_name(".symtab").is_some_and(|s| s.size() > 0),
            segments: obj
                .segments()
                .map(|s| {
                    let (offset, size) = s.file_range();
                    (offset, size, s.address())
                })
                .collect(),
        })
    }

    /// The virtual address (as in the symbol tables) of file offset `offset`.
    pub fn vaddr_of(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|&&(start, size, _)| offset >= start && offset - start < size)
            .map(|&(start, _, vaddr)| vaddr + (offset - start))
    }

    /// Whether a separate debug file could add anything.
    pub fn wants_debug_file(&self) -> bool {
        !self.has_dwarf && (self.build_id.is_some() || self.debuglink.is_some())
    }
}

/// How a candidate is recognized as the binary's debug file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    BuildId(Vec<u8>),
    Crc(u32),
}

/// The places a debug file of `module` (its path as the process sees it) may be, in gdb's
/// order, each with how to check it.
pub(crate) fn candidates(
    module: &str,
    facts: &ElfFacts,
    debug_dirs: &[PathBuf],
) -> Vec<(PathBuf, Check)> {
    let mut out = Vec::new();
    if let Some(id) = facts.build_id.as_deref().filter(|id| id.len() >= 2) {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let (first, rest) = hex.split_at(2);
        for dir in debug_dirs {
            let path = dir
                .join(".build-id")
                .join(first)
                .join(format!("{rest}.debug"));
            out.push((path, Check::BuildId(id.to_vec())));
        }
    }
    if let Some((name, crc)) = &facts.debuglink
        && !name.is_empty()
        && !name.contains('/')
    {
        let dir = Path::new(module).parent().unwrap_or(Path::new("/"));
        let check = Check::Crc(*crc);
        out.push((dir.join(name), check.clone()));
        out.push((dir.join(".debug").join(name), check.clone()));
        let relative = dir.strip_prefix("/").unwrap_or(dir);
        for debug_dir in debug_dirs {
            out.push((debug_dir.join(relative).join(name), check.clone()));
        }
    }
    out
}

/// A debug file found for a mapped file, kept open.
pub(crate) struct DebugFile {
    _file: File,
    /// `/proc/self/fd/…` of the open file: where blazesym reads it.
    pub path: PathBuf,
    /// Where it was found, for logs.
    pub found: PathBuf,
}

/// Finds and opens the debug file of `module`, whose own (device, inode) is `own`. Paths are
/// tried under `root` (`/proc/PID/root`: the process's own file system, a container's
/// included) and then as they are in ours; a file counts only if its build-id or CRC matches,
/// so a wrong file under the same name is never used.
pub(crate) fn find(
    root: Option<&Path>,
    module: &str,
    facts: &ElfFacts,
    own: (u64, u64),
    debug_dirs: &[PathBuf],
) -> Option<DebugFile> {
    if !facts.wants_debug_file() {
        return None;
    }
    let roots = roots(root);
    for (path, check) in candidates(module, facts, debug_dirs) {
        for root in &roots {
            let full = match root {
                Some(r) => r.join(path.strip_prefix("/").unwrap_or(&path)),
                None => path.clone(),
            };
            if let Some(found) = try_candidate(&full, &check, own) {
                log::debug!("{module}: debug file {}", full.display());
                return Some(found);
            }
        }
    }
    None
}

/// The debug file of `path`, if `path` is a stripped ELF file that has one: its `.symtab`
/// names the file's static functions at the file's own virtual addresses. A process's
/// `/proc/PID/exe` is looked up in that process's file system first (a container's), under
/// the name the process sees, then in ours.
pub(crate) fn find_for(path: &Path) -> Option<DebugFile> {
    let file = File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    let facts = ElfFacts::read(&file)
        .inspect_err(|err| log::debug!("{}: {err}", path.display()))
        .ok()?;
    let pid_dir = path
        .strip_prefix("/proc")
        .ok()
        .and_then(|rest| rest.iter().next())
        .filter(|pid| pid.to_str().is_some_and(|p| p.parse::<u32>().is_ok()))
        .map(|pid| Path::new("/proc").join(pid));
    let root = pid_dir.as_ref().map(|d| d.join("root"));
    let module = pid_dir
        .and_then(|_| std::fs::read_link(path).ok())
        .unwrap_or_else(|| path.to_owned());
    find(
        root.as_deref(),
        &module.to_string_lossy(),
        &facts,
        (meta.dev(), meta.ino()),
        debug_dirs(),
    )
}

/// `root` and our own root, or ours alone when they are the same directory.
fn roots(root: Option<&Path>) -> Vec<Option<PathBuf>> {
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    match root {
        Some(r) if id(r).is_some() && id(r) != id(Path::new("/")) => {
            vec![Some(r.to_path_buf()), None]
        }
        _ => vec![None],
    }
}

fn try_candidate(path: &Path, check: &Check, own: (u64, u64)) -> Option<DebugFile> {
    let file = File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    // Debian's `.build-id/xx/yyyy` (no `.debug`) links to the binary itself.
    if !meta.is_file() || (meta.dev(), meta.ino()) == own {
        return None;
    }
    let facts = ElfFacts::read(&file)
        .inspect_err(|err| log::debug!("{}: {err}", path.display()))
        .ok()?;
    let matches = match check {
        Check::BuildId(id) => facts.build_id.as_deref() == Some(id),
        Check::Crc(crc) => crc32_of(&file).is_some_and(|c| c == *crc),
    };
    if !matches {
        log::debug!("{}: not the debug file it names", path.display());
        return None;
    }
    if !facts.has_dwarf && !facts.has_symtab {
        return None;
    }
    Some(DebugFile {
        path: PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&file)
        )),
        _file: file,
        found: path.to_path_buf(),
    })
}

/// The `.gnu_debuglink` CRC (plain CRC-32, as zlib's) of the whole file. By offset: reading
/// its headers moved the file's position.
fn crc32_of(file: &File) -> Option<u32> {
    let mut crc = flate2::Crc::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut at = 0u64;
    loop {
        match file.read_at(&mut buf, at) {
            Ok(0) => return Some(crc.sum()),
            Ok(n) => {
                crc.update(&buf[..n]);
                at += n as u64;
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(build_id: Option<&[u8]>, link: Option<(&str, u32)>) -> ElfFacts {
        ElfFacts {
            build_id: build_id.map(<[u8]>::to_vec),
            debuglink: link.map(|(n, c)| (n.to_owned(), c)),
            ..ElfFacts::default()
        }
    }

    #[test]
    fn candidates_in_gdb_order() {
        let dirs = [PathBuf::from("/usr/lib/debug"), PathBuf::from("/scratch")];
        let f = facts(Some(&[0xab, 0xcd, 0x01]), Some(("prog.debug", 7)));
        let got: Vec<_> = candidates("/opt/app/bin/prog", &f, &dirs)
            .into_iter()
            .map(|(p, c)| (p.to_string_lossy().into_owned(), c))
            .collect();
        let id = Check::BuildId(vec![0xab, 0xcd, 0x01]);
        let crc = Check::Crc(7);
        assert_eq!(
            got,
            [
                ("/usr/lib/debug/.build-id/ab/cd01.debug".into(), id.clone()),
                ("/scratch/.build-id/ab/cd01.debug".into(), id),
                ("/opt/app/bin/prog.debug".into(), crc.clone()),
                ("/opt/app/bin/.debug/prog.debug".into(), crc.clone()),
                ("/usr/lib/debug/opt/app/bin/prog.debug".into(), crc.clone()),
                ("/scratch/opt/app/bin/prog.debug".into(), crc),
            ]
        );
    }

    #[test]
    fn no_candidates_without_id_or_link() {
        let dirs = [PathBuf::from("/usr/lib/debug")];
        assert!(candidates("/bin/x", &facts(None, None), &dirs).is_empty());
        // A one-byte build-id has no `xx/` directory; a link with a path in it is malformed.
        assert!(candidates("/bin/x", &facts(Some(&[1]), Some(("a/b", 1))), &dirs).is_empty());
    }

    #[test]
    fn vaddr_of_file_offset() {
        let f = ElfFacts {
            segments: vec![(0, 0x1000, 0), (0x1000, 0x500, 0x401000)],
            ..ElfFacts::default()
        };
        assert_eq!(f.vaddr_of(0x10), Some(0x10));
        assert_eq!(f.vaddr_of(0x1234), Some(0x401234));
        assert_eq!(f.vaddr_of(0x1500), None);
    }

    #[test]
    fn crc_is_the_debuglink_crc() {
        // gdb's gnu_debuglink_crc32 of "123456789" is the standard CRC-32 check value.
        let path = std::env::temp_dir().join(format!("aw-crc-{}", std::process::id()));
        std::fs::write(&path, b"123456789").unwrap();
        let crc = crc32_of(&File::open(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(crc, Some(0xcbf4_3926));
    }
}
