//! Tests of the libc search: mapped-file search, command resolution, ld.so.cache.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use super::command::{LD_CACHE, SearchEnv, command_target};
use super::ld_cache::{CACHE_MAGIC_NEW, CACHE_MAGIC_OLD, CACHE_NEW_ENTRY, CACHE_NEW_HEADER};
use super::process::{self, FileError, Unexamined, Verdict, search};
use super::*;
use crate::target::maps::{self, MapEntry, Stamp};

/// The file serving `malloc` in process `pid`.
fn pid_target(pid: u32) -> Result<Arc<LibcTarget>, TargetError> {
    for_pid(pid).map(|s| s.primary().clone())
}

/// The file serving `malloc` for `program`.
fn cmd_target(program: impl AsRef<OsStr>) -> Result<Arc<LibcTarget>, TargetError> {
    for_command(program).map(|s| s.primary().clone())
}

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

/// A file at `path` that defines `apis`.
fn fake_file(inode: u64, path: &str, apis: &[Api], allocator: Allocator) -> Arc<LibcTarget> {
    Arc::new(LibcTarget {
        path: PathBuf::from(path),
        display_path: path.into(),
        dev_inode: DevInode {
            major: 8,
            minor: 1,
            inode,
        },
        probes: apis
            .iter()
            .enumerate()
            .map(|(i, &api)| ProbePoint {
                api,
                file_offset: 0x1000 * (i as u64 + 1),
                sp_delta: 0,
                emulated: true,
                with_return: api.needs_return(),
            })
            .collect(),
        aliases: Vec::new(),
        allocator,
        prefix: "",
    })
}

/// A libc that defines every API.
fn fake_target(inode: u64) -> Arc<LibcTarget> {
    fake_file(inode, "/lib/libc.so.6", &Api::ALL, Allocator::Glibc)
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
        let found = search(&maps, EXE, &[], &mut cache, no_stamp, |e| {
            examined.push(e.dev_inode.inode);
            Ok(match e.dev_inode.inode {
                100 => Verdict::NoMalloc,
                200 => Verdict::Malloc(Arc::clone(&libc)),
                other => panic!("inode {other} examined"),
            }
            .into())
        });
        assert_eq!(found.unwrap().files(), [Arc::clone(&libc)]);
    }
    // The executable first, then libc; the search stops there.
    assert_eq!(examined, [100, 200]);
}

/// The stamp of any file: unknown (a cached verdict is kept).
fn no_stamp(_: &MapEntry) -> Option<Stamp> {
    None
}

/// A static program without `malloc` deleted, and one with `malloc` given its device and inode
/// (a redeploy on ext4): the cached verdict is about another file (the stamp differs), so the
/// new file is examined and its `malloc` found. The same stamp, or an unknown one, keeps it.
#[test]
fn search_examines_a_file_again_once_another_has_its_inode() {
    use std::cell::Cell;
    let stamp_of = |path: &Path| Some(Stamp::of(&fs::metadata(path).unwrap()));
    let old = stamp_of(Path::new("/proc/self/exe"));
    let new = stamp_of(&elf::tests::own_libc().unwrap());
    assert_ne!(old, new);
    let static_exe = entries(&DYNAMIC[..2]);
    let with_malloc = fake_target(100);
    let (examined, asked) = (Cell::new(0), Cell::new(0));
    // One process's search, the file at the executable's device and inode being `now` (with
    // `malloc` or not).
    let look = |cache: &mut FileCache, now: Option<Stamp>, malloc: bool| {
        let stamp = |_: &MapEntry| {
            asked.set(asked.get() + 1);
            now
        };
        search(&static_exe, EXE, &[], cache, stamp, |_| {
            examined.set(examined.get() + 1);
            let verdict = if malloc {
                Verdict::Malloc(Arc::clone(&with_malloc))
            } else {
                Verdict::NoMalloc
            };
            Ok(process::Examined {
                stamp: now,
                ..verdict.into()
            })
        })
    };
    let mut cache = FileCache::default();
    assert!(matches!(look(&mut cache, old, false), Err(None)));
    assert_eq!((examined.get(), asked.get()), (1, 0));
    // The same file: its verdict (one stat).
    assert!(matches!(look(&mut cache, old, false), Err(None)));
    assert_eq!((examined.get(), asked.get()), (1, 1));
    // Not reachable now: kept.
    assert!(matches!(look(&mut cache, None, true), Err(None)));
    assert_eq!(examined.get(), 1);
    // Another file at the same identity: examined.
    let found = look(&mut cache, new, true).unwrap();
    assert_eq!(found.files(), [Arc::clone(&with_malloc)]);
    assert_eq!(examined.get(), 2);
    assert_eq!(cache.stamp(with_malloc.dev_inode), new);
    assert!(look(&mut cache, new, true).is_ok());
    assert_eq!(examined.get(), 2);
}

#[test]
fn search_order_and_what_is_remembered() {
    // A static executable with malloc wins over everything else.
    let exe = fake_target(100);
    let mut cache = FileCache::default();
    let found = search(&entries(&DYNAMIC), EXE, &[], &mut cache, no_stamp, |e| {
        assert_eq!(e.dev_inode.inode, 100);
        Ok(Verdict::Malloc(Arc::clone(&exe)).into())
    });
    assert_eq!(found.unwrap().files(), [exe]);

    // No libc-named file: the others are tried, the loader is not.
    let maps = entries(&[DYNAMIC[0], DYNAMIC[4], DYNAMIC[5]]);
    let mut examined = Vec::new();
    let found = search(&maps, EXE, &[], &mut FileCache::default(), no_stamp, |e| {
        examined.push(e.dev_inode.inode);
        Ok(Verdict::NoMalloc.into())
    });
    assert!(matches!(found, Err(None)));
    assert_eq!(examined, [100, 400]);

    // A file that cannot be opened now is asked about again for the next process; a broken
    // libc is remembered with its error.
    let maps = entries(&DYNAMIC);
    let mut cache = FileCache::default();
    let mut examined = Vec::new();
    for _ in 0..2 {
        let found = search(&maps, EXE, &[], &mut cache, no_stamp, |e| {
            examined.push(e.dev_inode.inode);
            match e.dev_inode.inode {
                100 => Err(Unexamined::Path(TargetError::NoSuchProcess { pid: 1 })),
                200 => Ok(Verdict::NotElf(FileError::BadElf {
                    path: "/lib/libc.so.6".into(),
                    reason: "truncated".into(),
                })
                .into()),
                _ => Ok(Verdict::NoMalloc.into()),
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
        let found = search(&maps, EXE, &[], &mut cache, no_stamp, |e| {
            Ok(match e.dev_inode.inode {
                200 => Verdict::Unprobeable(FileError::MissingSymbol {
                    path: "/lib/libc.so.6".into(),
                    symbol: "free",
                }),
                _ => Verdict::NoMalloc,
            }
            .into())
        });
        let err = found.unwrap_err().unwrap();
        assert_eq!(
            err.to_string(),
            "/lib/libc.so.6: defines malloc but not free"
        );
    }
}

/// A program linked with jemalloc (its DT_NEEDED before libc's), a font, the loader.
const JEMALLOC: [&str; 5] = [
    "55d000000000-55d000001000 r-xp 00000000 08:01 100 /usr/bin/app",
    "7e0000000000-7e0000028000 r-xp 00000000 08:01 200 /usr/lib/x86_64-linux-gnu/libc.so.6",
    "7f0000000000-7f0000001000 r-xp 00000000 08:01 500 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "7f0000200000-7f0000201000 r--p 00000000 08:01 300 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "7f0000300000-7f0000301000 r--s 00000000 08:01 400 /usr/share/fonts/a.ttf",
];

/// jemalloc's APIs (Debian 12): no reallocarray, no pvalloc.
const JEMALLOC_APIS: [Api; 8] = [
    Api::Malloc,
    Api::Calloc,
    Api::Realloc,
    Api::Free,
    Api::PosixMemalign,
    Api::AlignedAlloc,
    Api::Memalign,
    Api::Valloc,
];

/// `examine` for [`JEMALLOC`]: the executable needs `needed`, jemalloc needs libc.
fn jemalloc_world(
    needed: &[&str],
    jemalloc: &Arc<LibcTarget>,
    libc: &Arc<LibcTarget>,
) -> impl FnMut(&MapEntry) -> Result<process::Examined, Unexamined> {
    let needed: Vec<String> = needed.iter().map(|s| s.to_string()).collect();
    let (jemalloc, libc) = (Arc::clone(jemalloc), Arc::clone(libc));
    move |e| {
        Ok(match e.dev_inode.inode {
            100 => process::Examined {
                verdict: Verdict::NoMalloc,
                needed: needed.clone(),
                soname: None,
                stamp: None,
            },
            200 => process::Examined {
                verdict: Verdict::Malloc(Arc::clone(&libc)),
                needed: vec!["ld-linux-x86-64.so.2".into()],
                soname: Some("libc.so.6".into()),
                stamp: None,
            },
            // Found under its soname only (mapped as the symlink's target would be).
            500 => process::Examined {
                verdict: Verdict::Malloc(Arc::clone(&jemalloc)),
                needed: vec!["libc.so.6".into()],
                soname: Some("libjemalloc.so.2".into()),
                stamp: None,
            },
            _ => Verdict::NoMalloc.into(),
        })
    }
}

#[test]
fn search_follows_symbol_resolution_order() {
    let jemalloc = fake_file(
        500,
        "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
        &JEMALLOC_APIS,
        Allocator::Jemalloc,
    );
    let libc = fake_target(200);
    let maps = entries(&JEMALLOC);

    // DT_NEEDED: jemalloc before libc. jemalloc serves malloc; libc serves what it lacks.
    let found = search(
        &maps,
        EXE,
        &[],
        &mut FileCache::default(),
        no_stamp,
        jemalloc_world(&["libjemalloc.so.2", "libc.so.6"], &jemalloc, &libc),
    )
    .unwrap();
    assert_eq!(found.files(), [Arc::clone(&jemalloc), Arc::clone(&libc)]);
    assert_eq!(found.allocator(), Allocator::Jemalloc);
    assert_eq!(found.served_by(Api::Malloc), Some(&jemalloc));
    assert_eq!(found.served_by(Api::Free), Some(&jemalloc));
    assert_eq!(found.served_by(Api::Reallocarray), Some(&libc));
    assert_eq!(found.served_by(Api::Pvalloc), Some(&libc));
    let mut all = Api::ALL.to_vec();
    all.sort();
    assert_eq!(found.apis(), all);

    // libc first in DT_NEEDED: libc serves everything, jemalloc is not probed (nothing of
    // it would be called), though its address is higher and its name says jemalloc.
    let found = search(
        &maps,
        EXE,
        &[],
        &mut FileCache::default(),
        no_stamp,
        jemalloc_world(&["libc.so.6", "libjemalloc.so.2"], &jemalloc, &libc),
    )
    .unwrap();
    assert_eq!(found.files(), [Arc::clone(&libc)]);
    assert_eq!(found.allocator(), Allocator::Glibc);

    // LD_PRELOAD comes before DT_NEEDED, by path or by name.
    for preload in [
        "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
        "libjemalloc.so.2",
    ] {
        let found = search(
            &maps,
            EXE,
            &[preload.to_owned()],
            &mut FileCache::default(),
            no_stamp,
            jemalloc_world(&["libc.so.6"], &jemalloc, &libc),
        )
        .unwrap();
        assert_eq!(found.allocator(), Allocator::Jemalloc, "{preload}");
    }

    // A library found through its soname (the mapped name differs).
    let renamed: Vec<String> = JEMALLOC
        .iter()
        .map(|l| l.replace("libjemalloc.so.2", "libjemalloc.so.2.5.3"))
        .collect();
    let renamed: Vec<&str> = renamed.iter().map(String::as_str).collect();
    let found = search(
        &entries(&renamed),
        EXE,
        &[],
        &mut FileCache::default(),
        no_stamp,
        jemalloc_world(&["libjemalloc.so.2", "libc.so.6"], &jemalloc, &libc),
    )
    .unwrap();
    assert_eq!(found.allocator(), Allocator::Jemalloc);
}

#[test]
fn served_apis_and_aliases() {
    // glibc 2.36: memalign is aligned_alloc. Under jemalloc it is jemalloc's own function,
    // so glibc's alias does not apply.
    let mut glibc = (*fake_file(
        200,
        "/lib/libc.so.6",
        &Api::ALL[..7]
            .iter()
            .chain(&Api::ALL[8..])
            .copied()
            .collect::<Vec<_>>(),
        Allocator::Glibc,
    ))
    .clone();
    glibc.aliases = vec![(Api::Memalign, Api::AlignedAlloc)];
    let glibc = Arc::new(glibc);
    let alone = Served::new(vec![Arc::clone(&glibc)]).unwrap();
    assert_eq!(alone.aliases(), [(Api::Memalign, Api::AlignedAlloc)]);
    assert!(!alone.apis().contains(&Api::Memalign));
    assert!(alone.complete());
    let jemalloc = fake_file(500, "/j.so", &JEMALLOC_APIS, Allocator::Jemalloc);
    let both = Served::new(vec![Arc::clone(&jemalloc), Arc::clone(&glibc)]).unwrap();
    assert!(both.aliases().is_empty());
    assert!(both.apis().contains(&Api::Memalign));
    assert_eq!(both.display_paths(), "/j.so + /lib/libc.so.6");
    // A file that serves nothing after the first is dropped; none at all is no Served.
    let again = Served::new(vec![Arc::clone(&glibc), Arc::clone(&jemalloc)]).unwrap();
    assert_eq!(again.files(), [Arc::clone(&glibc)]);
    assert!(Served::new(Vec::new()).is_none());

    // A je_-prefixed jemalloc in the executable: probed after the libc, which still serves
    // every libc name; the program's allocator is jemalloc.
    let mut prefixed = (*fake_file(100, "/app", &JEMALLOC_APIS, Allocator::Jemalloc)).clone();
    prefixed.prefix = "je_";
    let prefixed = Arc::new(prefixed);
    let served = Served::new(vec![Arc::clone(&prefixed), Arc::clone(&glibc)]).unwrap();
    assert_eq!(served.files(), [Arc::clone(&glibc), Arc::clone(&prefixed)]);
    assert_eq!(served.served_by(Api::Malloc), Some(&glibc));
    assert_eq!(served.allocator(), Allocator::Jemalloc);
    assert!(served.complete());
    assert!(served.apis().contains(&Api::Memalign), "je_memalign");
}

#[test]
fn own_process() {
    let t = pid_target(std::process::id()).unwrap();
    check_own_libc(&t);
    // Same mount namespace: the plain path is used, not /proc/<pid>/root.
    assert_eq!(t.path, PathBuf::from(&t.display_path));
}

#[test]
fn child_process_and_missing_process() {
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    // The child may still be in exec: wait until it maps its libc.
    let mut result = pid_target(child.id());
    for _ in 0..100 {
        if result.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        result = pid_target(child.id());
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let t = result.unwrap();
    assert_eq!(
        t.dev_inode,
        pid_target(std::process::id()).unwrap().dev_inode
    );
    assert!(matches!(
        pid_target(u32::MAX),
        Err(TargetError::NoSuchProcess { .. })
    ));
}

/// A process in another mount namespace where libc is a different file (as in a container)
/// is traced through its own libc, via /proc/<pid>/root, and through map_files once that
/// file is deleted. Needs root (unshare, mount).
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
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare (util-linux) runs");
    let pid = child.id();
    let mut found = None;
    for _ in 0..300 {
        if let Ok(t) = pid_target(pid)
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
        panic!("unshare/mount did not run (this test needs root, as `./x test` runs it)");
    };
    let copy_id = DevInode::from_metadata(&fs::metadata(&copy).unwrap());
    assert_eq!(t.dev_inode, copy_id);
    assert_eq!(
        t.path,
        Path::new(&format!("/proc/{pid}/root")).join(t.display_path.trim_start_matches('/'))
    );

    // Deleted (as after an upgrade): only map_files still reaches the mapped file.
    fs::remove_file(&copy).unwrap();
    let deleted = pid_target(pid);
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
    let mut child = Command::new(&exe)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run files from {} (noexec?): {e}", dir.0.display()));
    let pid = child.id();
    let mut result = pid_target(pid);
    for _ in 0..100 {
        if fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "pause-forever")
        {
            result = pid_target(pid);
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
        cmd_target(&exe),
        Err(TargetError::StaticNoMalloc { .. })
    ));
}

#[test]
fn command_from_path() {
    let t = cmd_target("sleep").unwrap();
    let own = pid_target(std::process::id()).unwrap();
    assert_eq!(t.dev_inode, own.dev_inode);
    assert_eq!(t.probes, own.probes);
    assert_eq!(t.aliases, own.aliases);
}

#[test]
fn command_errors_and_scripts() {
    assert!(matches!(
        cmd_target("allocwatch-no-such-command-xyz"),
        Err(TargetError::CommandNotFound { .. })
    ));
    assert!(matches!(
        cmd_target("./no/such/file"),
        Err(TargetError::CommandNotFound { .. })
    ));
    let dir = TempDir::new("cmd");
    let plain = dir.0.join("plain");
    fs::write(&plain, b"not executable").unwrap();
    assert!(matches!(
        cmd_target(&plain),
        Err(TargetError::NotExecutable { .. })
    ));
    let env = SearchEnv {
        path: Some(dir.0.as_os_str().to_owned()),
        ld_library_path: None,
        ld_preload: None,
        ld_cache: LD_CACHE.into(),
    };
    assert!(matches!(
        command_target(OsStr::new("plain"), &env).map(|s| s.primary().clone()),
        Err(TargetError::NotExecutable { .. })
    ));
    // A script allocates through its interpreter.
    let script = dir.0.join("script");
    fs::write(&script, b"#!/bin/sh -e\necho hi\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let t = command_target(OsStr::new("script"), &env)
        .map(|s| s.primary().clone())
        .unwrap();
    assert_eq!(
        t.dev_inode,
        pid_target(std::process::id()).unwrap().dev_inode
    );
}

/// gcc-built fixtures (gcc and a static libc: `./x setup` installs them).
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
    assert!(
        gcc(&[
            "-O1".as_ref(),
            "-static".as_ref(),
            src.as_os_str(),
            "-o".as_ref(),
            stat.as_os_str(),
        ]),
        "gcc -static failed (gcc and libc6-dev: `./x setup` installs them)"
    );
    let t = cmd_target(&stat).unwrap();
    assert_eq!(t.path, stat);
    assert!(t.probes.iter().any(|p| p.api == Api::Malloc));
    assert!(t.probes.iter().any(|p| p.api == Api::Free));

    // Dynamic with DT_RUNPATH=$ORIGIN/lib holding a copy of libc: the copy is found first.
    let own = elf::tests::own_libc().unwrap();
    let lib = dir.0.join("lib");
    fs::create_dir_all(&lib).unwrap();
    fs::copy(&own, lib.join(own.file_name().unwrap())).unwrap();
    let dynamic = dir.0.join("dynamic");
    assert!(
        gcc(&[
            src.as_os_str(),
            "-Wl,--enable-new-dtags,-rpath,$ORIGIN/lib".as_ref(),
            "-o".as_ref(),
            dynamic.as_os_str(),
        ]),
        "gcc failed (`./x setup` installs it)"
    );
    let t = cmd_target(&dynamic).unwrap();
    assert_eq!(t.path, lib.join(own.file_name().unwrap()));
    // LD_LIBRARY_PATH comes before DT_RUNPATH.
    let sys = own.parent().unwrap();
    let env = SearchEnv {
        path: None,
        ld_library_path: Some(sys.as_os_str().to_owned()),
        ld_preload: None,
        ld_cache: LD_CACHE.into(),
    };
    let t = command_target(dynamic.as_os_str(), &env)
        .map(|s| s.primary().clone())
        .unwrap();
    assert_eq!(t.path, sys.join(own.file_name().unwrap()));
}

/// Allocators linked into a program under names of their own, only the functions it calls
/// kept by the linker (as in a Rust program's `#[global_allocator]`): tikv-jemallocator's
/// `_rjem_` jemalloc without `_rjem_free`, the mimalloc crate's without `mi_malloc`.
#[test]
fn prefixed_allocators_in_the_executable() {
    let dir = TempDir::new("prefixed");
    let build = |name: &str, functions: &[&str]| {
        let mut code = String::from("#include <stddef.h>\nstatic char heap[4096];\n");
        for f in functions {
            code += &format!(
                "__attribute__((noinline)) void *{f}(void *a, size_t b, size_t c) \
                 {{ (void)b; (void)c; return a ? a : heap; }}\n"
            );
        }
        code += "int main(void) { return 0; }\n";
        let src = dir.0.join(format!("{name}.c"));
        fs::write(&src, code).unwrap();
        let out = dir.0.join(name);
        let ok = Command::new("gcc")
            .args(["-O1", "-fno-builtin", "-w"])
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "gcc failed (`./x setup` installs it)");
        ElfFile::open(&out).unwrap()
    };
    let apis = |elf: &ElfFile, prefix: &str| -> Vec<Api> {
        let (points, _) = probe_points(elf, prefix, false).unwrap();
        let mut apis: Vec<Api> = points.iter().map(|p| p.api).collect();
        apis.sort();
        apis
    };

    let rjem = build(
        "rjem",
        &[
            "_rjem_malloc",
            "_rjem_mallocx",
            "_rjem_rallocx",
            "_rjem_sdallocx",
        ],
    );
    assert_eq!(prefix_of(&rjem), Some("_rjem_"));
    assert_eq!(Allocator::of(&rjem, "/app/rjem"), Allocator::Jemalloc);
    assert_eq!(
        apis(&rjem, "_rjem_"),
        [Api::Malloc, Api::Mallocx, Api::Rallocx, Api::Sdallocx]
    );

    let mi = build(
        "mi",
        &[
            "mi_malloc_aligned",
            "mi_zalloc_aligned",
            "mi_realloc_aligned",
            "mi_free",
        ],
    );
    assert_eq!(prefix_of(&mi), Some("mi_"));
    assert_eq!(Allocator::of(&mi, "/app/mi"), Allocator::Mimalloc);
    assert_eq!(
        apis(&mi, "mi_"),
        [
            Api::Free,
            Api::MiMallocAligned,
            Api::MiZallocAligned,
            Api::MiReallocAligned
        ]
    );

    // Allocating without freeing (or the reverse) is no allocator.
    let half = build("half", &["_rjem_malloc", "mi_free"]);
    assert_eq!(prefix_of(&half), None);
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
    let cache = LdCache::read(LD_CACHE).unwrap();
    assert!(!cache.entries.is_empty());
    let libc = cache.lookup("libc.so.6").expect("libc.so.6 in the cache");
    assert!(elf::is_native_elf(libc));
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("allocwatch-libc-{tag}-{}", std::process::id()));
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

/// Debian's arm64 glibc (`libc6-arm64-cross`, with `gcc-aarch64-linux-gnu`).
const ARM64_GLIBC: &str = "/usr/aarch64-linux-gnu/lib/libc.so.6";

/// `fixtures/c/libc_fixture.c` cross-built static for arm64 with Debian's
/// `aarch64-linux-gnu-gcc` into `target/fixtures/arm64/` (once per source change).
fn arm64_c_fixture() -> PathBuf {
    let repo = crate::gort::tests::repo();
    let src = repo.join("fixtures/c/libc_fixture.c");
    let dir = repo.join("target/fixtures/arm64");
    let out = dir.join("libc_fixture-static");
    let built = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    if built(&out) > built(&src) && built(&out) > built(&repo.join("fixtures/c/fixture.h")) {
        return out;
    }
    fs::create_dir_all(&dir).unwrap();
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let status = Command::new("aarch64-linux-gnu-gcc")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-static", "-o"])
        .arg(&tmp)
        .arg(&src)
        .args(["-lpthread", "-lm", "-ldl"])
        .status()
        .expect("aarch64-linux-gnu-gcc (Debian's gcc-aarch64-linux-gnu: `./x setup` installs it)");
    assert!(status.success(), "aarch64-linux-gnu-gcc {}", src.display());
    fs::rename(&tmp, &out).unwrap();
    out
}

/// `aarch64-linux-gnu-objdump -d` of `path`: the addresses of its `ret` instructions.
fn arm64_objdump_rets(path: &Path) -> Vec<u64> {
    let out = Command::new("aarch64-linux-gnu-objdump")
        .arg("-d")
        .arg(path)
        .output()
        .expect("aarch64-linux-gnu-objdump");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // `  400a78:\td65f03c0 \tret`
            let cols: Vec<&str> = line.split('\t').collect();
            let [addr, _, mnemonic, ..] = cols.as_slice() else {
                return None;
            };
            (mnemonic.trim() == "ret")
                .then(|| u64::from_str_radix(addr.trim().trim_end_matches(':'), 16).ok())
                .flatten()
        })
        .collect()
}

/// arm64 C code: the allocation API of a static arm64 executable and of Debian's arm64 glibc
/// is probed at each function's entry (where x30 holds the return address and SP is the
/// entry's: no stack-pointer delta), and the `ret`s of the fixture's functions and of glibc's
/// malloc family (each symbol's address range) are where `aarch64-linux-gnu-objdump` puts
/// them.
#[test]
fn arm64_c_entries_and_rets() {
    let fixture = arm64_c_fixture();
    for path in [fixture.as_path(), Path::new(ARM64_GLIBC)] {
        let elf = ElfFile::open(path).unwrap();
        assert_eq!(elf.arch(), elf::Arch::Aarch64, "{}", path.display());
        // A static executable keeps only what it calls of glibc.
        assert_eq!(path == Path::new(ARM64_GLIBC), is_glibc(&elf));
        let (points, _) = probe_points(&elf, "", false).unwrap();
        for api in [Api::Malloc, Api::Free, Api::Calloc, Api::Realloc] {
            assert!(
                points.iter().any(|p| p.api == api),
                "{}: no {api:?}",
                path.display()
            );
        }
        for p in &points {
            let sym = elf.symbol(p.api.symbol()).unwrap();
            assert_eq!(
                Some(p.file_offset),
                elf.vaddr_to_file_offset(sym.address),
                "{} {:?}",
                path.display(),
                p.api
            );
            assert_eq!(p.sp_delta, 0);
        }
        let rets = arm64_objdump_rets(path);
        let mut checked = 0;
        for (name, sym) in elf.symbols() {
            let wanted = name.starts_with("fx_") || Api::ALL.iter().any(|a| a.symbol() == name);
            if !wanted || sym.size == 0 {
                continue;
            }
            let code = elf.function_code(sym, sym.size).unwrap();
            let found = crate::target::go::ret_addresses(elf::Arch::Aarch64, &code, sym.address);
            let expected: Vec<u64> = rets
                .iter()
                .copied()
                .filter(|&a| a >= sym.address && a < sym.address + sym.size)
                .collect();
            assert_eq!(found, expected, "{} {name}", path.display());
            checked += 1;
        }
        assert!(
            checked >= 5,
            "{}: {checked} functions checked",
            path.display()
        );
    }
}
