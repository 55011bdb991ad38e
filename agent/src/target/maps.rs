//! `/proc/<pid>/maps` parsing.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::TargetError;

/// Access flags of a mapping (`rwxp` / `rwxs` column).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Perms {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// `s` (shared) rather than `p` (private, copy-on-write).
    pub shared: bool,
}

/// Identity of a file as the kernel sees it: what a uprobe is really attached to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DevInode {
    pub major: u32,
    pub minor: u32,
    pub inode: u64,
}

impl DevInode {
    /// The identity of an opened or stat'ed file. Uses the kernel's `dev_t` encoding
    /// (the same split glibc's `major()`/`minor()` make).
    pub fn from_metadata(meta: &fs::Metadata) -> Self {
        let dev = meta.dev();
        DevInode {
            major: (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)) as u32,
            minor: ((dev & 0xff) | ((dev >> 12) & !0xff)) as u32,
            inode: meta.ino(),
        }
    }
}

/// What tells a file from a later one at the same [`DevInode`]: its size and modification and
/// change times. An inode number is free again once its file is deleted and nothing holds it,
/// and ext4 and overlayfs give it to the next file created (a redeployed binary often gets the
/// old one), so a verdict about a file that nothing holds is checked against it before reuse.
/// The change time is set when an inode is created, so a new file differs even with the old
/// one's size and modification time (a `cp -p`, an image layer unpacked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub fn of(m: &fs::Metadata) -> Self {
        Self {
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether a verdict made when its file was `then` holds for the file at the same device
    /// and inode now (`now`, asked only when `then` is known). Either unknown: it is taken to
    /// hold (what could not be looked at cannot be told apart).
    pub fn holds(then: Option<Stamp>, now: impl FnOnce() -> Option<Stamp>) -> bool {
        then.is_none_or(|then| now().is_none_or(|now| now == then))
    }
}

/// One line of `/proc/<pid>/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub perms: Perms,
    /// Offset of the mapping in the file.
    pub offset: u64,
    pub dev_inode: DevInode,
    /// Pathname column: a file path, a pseudo name such as `[heap]`, `[stack]`, `[vdso]`,
    /// `[anon:name]`, or `None` for an anonymous mapping. Without the ` (deleted)` suffix.
    pub path: Option<String>,
    /// The file was unlinked (or replaced, e.g. by a package upgrade) after it was mapped:
    /// its path now names another file or nothing.
    pub deleted: bool,
}

impl MapEntry {
    /// Whether the mapping is backed by a file (not anonymous, not a pseudo mapping).
    pub fn is_file(&self) -> bool {
        self.dev_inode.inode != 0 && self.path.as_deref().is_some_and(|p| p.starts_with('/'))
    }

    /// The entry's name under `/proc/<pid>/map_files/` (`%lx-%lx`, as the kernel prints it).
    pub fn map_files_name(&self) -> String {
        format!("{:x}-{:x}", self.start, self.end)
    }
}

const DELETED_SUFFIX: &str = " (deleted)";

/// Parses one maps line; `None` if it is malformed.
pub fn parse_line(line: &str) -> Option<MapEntry> {
    // The first five columns are separated by single spaces; the pathname column is padded
    // with spaces and may itself contain spaces, so it is "the rest of the line".
    let mut rest = line;
    let mut field = || -> Option<&str> {
        let trimmed = rest.trim_start_matches(' ');
        let end = trimmed.find(' ').unwrap_or(trimmed.len());
        let (f, r) = trimmed.split_at(end);
        rest = r;
        (!f.is_empty()).then_some(f)
    };
    let range = field()?;
    let perms = field()?;
    let offset = field()?;
    let dev = field()?;
    let inode = field()?;

    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = parse_perms(perms)?;
    let offset = u64::from_str_radix(offset, 16).ok()?;
    let (major, minor) = dev.split_once(':')?;
    let major = u32::from_str_radix(major, 16).ok()?;
    let minor = u32::from_str_radix(minor, 16).ok()?;
    let inode: u64 = inode.parse().ok()?;

    let name = rest.trim_start_matches(' ');
    let (path, deleted) = if name.is_empty() {
        (None, false)
    } else if inode != 0 && name.ends_with(DELETED_SUFFIX) {
        (Some(&name[..name.len() - DELETED_SUFFIX.len()]), true)
    } else {
        (Some(name), false)
    };
    Some(MapEntry {
        start,
        end,
        perms,
        offset,
        dev_inode: DevInode {
            major,
            minor,
            inode,
        },
        // The kernel escapes only '\n' in this column (as "\012").
        path: path.map(|p| p.replace("\\012", "\n")),
        deleted,
    })
}

fn parse_perms(s: &str) -> Option<Perms> {
    let b = s.as_bytes();
    if b.len() != 4 {
        return None;
    }
    let flag = |i: usize, c: u8| match b[i] {
        x if x == c => Some(true),
        b'-' => Some(false),
        _ => None,
    };
    Some(Perms {
        read: flag(0, b'r')?,
        write: flag(1, b'w')?,
        exec: flag(2, b'x')?,
        shared: match b[3] {
            b's' => true,
            b'p' => false,
            _ => return None,
        },
    })
}

/// Parses a whole maps file; `path` only names it in errors.
pub fn parse_maps(text: &str, path: &std::path::Path) -> Result<Vec<MapEntry>, TargetError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            parse_line(l).ok_or_else(|| TargetError::BadMaps {
                path: path.to_owned(),
                line: i + 1,
                text: l.to_owned(),
            })
        })
        .collect()
}

/// Reads and parses `/proc/<pid>/maps`.
pub fn read_maps(pid: u32) -> Result<Vec<MapEntry>, TargetError> {
    let path = PathBuf::from(format!("/proc/{pid}/maps"));
    let bytes = fs::read(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => TargetError::NoSuchProcess { pid },
        // A process that exits while being read reports ESRCH.
        _ if e.raw_os_error() == Some(::libc::ESRCH) => TargetError::NoSuchProcess { pid },
        io::ErrorKind::PermissionDenied => TargetError::ProcessAccess { pid, source: e },
        _ => TargetError::io(&path, e),
    })?;
    // Paths are bytes; the rare non-UTF-8 one is kept lossily rather than failing the process.
    parse_maps(&String::from_utf8_lossy(&bytes), &path)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    /// Held by a test from the creation of a file to its [`recreate_at_same_inode`]: the tests'
    /// files share inode numbers (the lowest free one is taken).
    pub(crate) fn inode_reuse_lock() -> std::sync::MutexGuard<'static, ()> {
        static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        ONE.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deletes the file `path` and creates a new one there with the same inode number, as a
    /// redeploy does on ext4 or overlayfs: files are created at `path`, and moved aside while
    /// they get another number, until the filesystem gives the number back. `None` when it has
    /// not within 2 s: tmpfs never gives a number back, and ext4 gives the lowest free number
    /// of a group that the directories near this one share (a file created anywhere near, by
    /// another test or another program, may take it first).
    pub(crate) fn recreate_at_same_inode(path: &Path) -> Option<fs::File> {
        use std::time::{Duration, Instant, SystemTime};
        let ino = fs::metadata(path).unwrap().ino();
        // ext4 without a journal keeps a number deleted in an earlier second from new files for
        // 5-10 s: deleted early in a second, it is free again within that second.
        let into_second = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .subsec_millis();
        if into_second > 300 {
            std::thread::sleep(Duration::from_millis(u64::from(1000 - into_second)));
        }
        fs::remove_file(path).unwrap();
        let aside = path.with_extension("aside");
        fs::create_dir_all(&aside).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut found = None;
        for i in 0.. {
            let f = fs::File::create_new(path).unwrap();
            if f.metadata().unwrap().ino() == ino {
                found = Some(f);
                break;
            }
            fs::rename(path, aside.join(i.to_string())).unwrap();
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        fs::remove_dir_all(&aside).unwrap();
        if found.is_none() {
            eprintln!(
                "{}: inode {ino} not given back to a new file (not checked here)",
                path.display()
            );
        }
        found
    }

    /// A file deleted and a new one of the same size and modification time (`cp -p`) at the
    /// same device and inode: the stamps differ (the change time is the new file's). Checked
    /// where the filesystem gives the inode number back (ext4 does).
    #[test]
    fn a_new_file_at_a_reused_inode_has_another_stamp() {
        let dir = std::env::temp_dir().join(format!("allocwatch-stamp-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("program");
        let _one = inode_reuse_lock();
        fs::write(&path, b"old program").unwrap();
        let old = fs::metadata(&path).unwrap();
        let (id, then) = (DevInode::from_metadata(&old), Stamp::of(&old));
        assert!(Stamp::holds(Some(then), || Some(then)));
        // The change time has the kernel's coarse clock (a tick, 1-10 ms).
        std::thread::sleep(std::time::Duration::from_millis(20));
        if let Some(new) = recreate_at_same_inode(&path) {
            io::Write::write_all(&mut &new, b"new program").unwrap();
            new.set_modified(old.modified().unwrap()).unwrap();
            drop(new);
            let meta = fs::metadata(&path).unwrap();
            assert_eq!(DevInode::from_metadata(&meta), id);
            assert_eq!(
                (meta.size(), meta.modified().unwrap()),
                (old.size(), old.modified().unwrap())
            );
            let now = Stamp::of(&meta);
            assert_ne!(now, then);
            assert!(!Stamp::holds(Some(then), || Some(now)));
        }
        // Unknown either way: the verdict is kept.
        assert!(Stamp::holds(None, || panic!("not asked without a stamp")));
        assert!(Stamp::holds(Some(then), || None));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn file_backed_line() {
        let e = parse_line(
            "7f3a1c028000-7f3a1c17d000 r-xp 00028000 fd:01 1835110                    \
             /usr/lib/x86_64-linux-gnu/libc.so.6",
        )
        .unwrap();
        assert_eq!(e.start, 0x7f3a1c028000);
        assert_eq!(e.end, 0x7f3a1c17d000);
        assert_eq!(
            e.perms,
            Perms {
                read: true,
                write: false,
                exec: true,
                shared: false
            }
        );
        assert_eq!(e.offset, 0x28000);
        assert_eq!(
            e.dev_inode,
            DevInode {
                major: 0xfd,
                minor: 1,
                inode: 1835110
            }
        );
        assert_eq!(
            e.path.as_deref(),
            Some("/usr/lib/x86_64-linux-gnu/libc.so.6")
        );
        assert!(!e.deleted);
        assert!(e.is_file());
        assert_eq!(e.map_files_name(), "7f3a1c028000-7f3a1c17d000");
    }

    #[test]
    fn anonymous_and_pseudo() {
        let anon = parse_line("7f3a1c1d7000-7f3a1c1e4000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(anon.path, None);
        assert!(!anon.is_file());
        let anon2 = parse_line("7f3a1c1d7000-7f3a1c1e4000 rw-p 00000000 00:00 0").unwrap();
        assert_eq!(anon2.path, None);

        let heap = parse_line(
            "55d0c2a5f000-55d0c2a80000 rw-p 00000000 00:00 0                          [heap]",
        )
        .unwrap();
        assert_eq!(heap.path.as_deref(), Some("[heap]"));
        assert!(!heap.is_file());

        let vsys = parse_line(
            "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]",
        )
        .unwrap();
        assert_eq!(vsys.start, 0xffffffffff600000);
        assert_eq!(vsys.path.as_deref(), Some("[vsyscall]"));

        let named =
            parse_line("7f00000000-7f00001000 rw-p 00000000 00:00 0    [anon:glibc malloc]")
                .unwrap();
        assert_eq!(named.path.as_deref(), Some("[anon:glibc malloc]"));
    }

    #[test]
    fn spaces_deleted_and_shared() {
        let e = parse_line(
            "7f0000000000-7f0000001000 r--s 00001000 103:02 42   /tmp/my dir/lib x.so (deleted)",
        )
        .unwrap();
        assert_eq!(e.path.as_deref(), Some("/tmp/my dir/lib x.so"));
        assert!(e.deleted);
        assert!(e.perms.shared && e.perms.read && !e.perms.write);
        assert_eq!(e.dev_inode.major, 0x103);
        assert_eq!(e.dev_inode.minor, 2);
        assert_eq!(e.offset, 0x1000);

        // memfd mappings end in " (deleted)" too; a pseudo name (inode 0) is left alone.
        let memfd = parse_line("7f00-7f01 r-xp 00000000 00:01 77   /memfd:jit (deleted)").unwrap();
        assert_eq!(memfd.path.as_deref(), Some("/memfd:jit"));
        assert!(memfd.deleted);

        let nl = parse_line("7f00-7f01 r-xp 00000000 08:01 9 /odd\\012name").unwrap();
        assert_eq!(nl.path.as_deref(), Some("/odd\nname"));
    }

    #[test]
    fn malformed_lines() {
        for bad in [
            "",
            "7f00 r-xp 00000000 08:01 9",
            "7f00-zz r-xp 00000000 08:01 9",
            "7f00-7f01 r-x 00000000 08:01 9",
            "7f00-7f01 r-xq 00000000 08:01 9",
            "7f00-7f01 r-xp 00000000 0801 9",
            "7f00-7f01 r-xp 00000000 08:01 nine",
            "7f00-7f01 r-xp 00000000 08:01",
        ] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
        let err = parse_maps("7f00-7f01 r-xp 0 08:01 9 /a\ngarbage\n", "/x".as_ref()).unwrap_err();
        assert!(matches!(err, TargetError::BadMaps { line: 2, .. }), "{err}");
    }

    #[test]
    fn own_maps() {
        let maps = read_maps(std::process::id()).unwrap();
        let exe = fs::read_link("/proc/self/exe").unwrap();
        assert!(
            maps.iter()
                .any(|m| m.perms.exec && m.path.as_deref() == exe.to_str())
        );
        let meta = fs::metadata(&exe).unwrap();
        let id = DevInode::from_metadata(&meta);
        assert!(maps.iter().any(|m| m.dev_inode == id));
        assert!(matches!(
            read_maps(u32::MAX),
            Err(TargetError::NoSuchProcess { pid: u32::MAX })
        ));
    }
}
