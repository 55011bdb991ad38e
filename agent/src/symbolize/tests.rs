use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use object::{Object as _, ObjectSymbol as _};

use super::*;

#[inline(never)]
#[unsafe(no_mangle)]
extern "C" fn allocwatch_symbolize_test_target(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_mul(3)
}
const TARGET_LINE: u32 = line!() - 3;

fn target_addr() -> u64 {
    allocwatch_symbolize_test_target as *const () as u64
}

#[test]
fn own_function_resolves_to_this_file() {
    let s = SymbolizerHandle::spawn();
    let pid = std::process::id();
    s.note_process(pid);
    // +1: addresses are return addresses; this makes the lookup hit the first instruction.
    let addr = target_addr() + 1;
    let t = Instant::now();
    let frames = s.symbolize(pid, vec![addr]).unwrap();
    let first = t.elapsed();
    let f = frames.last().unwrap();
    assert_eq!(
        f.function.as_deref(),
        Some("allocwatch_symbolize_test_target")
    );
    assert!(
        f.file.as_deref().unwrap().ends_with("symbolize/tests.rs"),
        "{f:?}"
    );
    let line = f.line.unwrap();
    assert!(
        (TARGET_LINE..TARGET_LINE + 3).contains(&line),
        "{line} vs {TARGET_LINE}"
    );
    assert_eq!(f.address, addr);
    assert!(f.module.is_some() && f.offset.is_some());

    let n = 1000;
    let t = Instant::now();
    for _ in 0..n {
        s.symbolize(pid, vec![addr]).unwrap();
    }
    eprintln!(
        "own binary: first symbolization {first:?}, warm round trip {:?}",
        t.elapsed() / n
    );
    assert_eq!(s.stats(), SymbolizeStats::default());
}

#[test]
fn libc_through_debug_link() {
    let s = SymbolizerHandle::spawn();
    let pid = std::process::id();
    let addr = libc::malloc as *const () as u64 + 1;
    let t = Instant::now();
    let frames = s.symbolize(pid, vec![addr]).unwrap();
    eprintln!("libc malloc: {frames:?} in {:?}", t.elapsed());
    let f = frames.last().unwrap();
    assert!(f.function.as_deref().unwrap().contains("malloc"), "{f:?}");
    assert!(f.module.as_deref().unwrap().contains("libc"), "{f:?}");
    // With debug symbols installed (libc6-dbg), blazesym must read their compressed DWARF.
    if Path::new("/usr/lib/debug/.build-id").is_dir() {
        assert!(f.file.as_deref().unwrap().contains("malloc.c"), "{f:?}");
        // malloc inlines its tcache helpers: some address in it must give an inlined frame
        // first and malloc itself last.
        let addrs = (1..512).map(|i| addr + i).collect();
        let frames = s.symbolize(pid, addrs).unwrap();
        let mut per_address = frames.chunk_by(|a, b| a.address == b.address);
        let inlined = per_address.find(|f| f.len() > 1).unwrap();
        eprintln!("inlined: {inlined:#?}");
        assert_eq!(inlined.last().unwrap().function, f.function);
        assert_ne!(inlined[0].function, f.function);
        assert!(inlined.iter().all(|i| i.line.is_some()));
    }
}

#[test]
fn unknown_and_gone() {
    let s = SymbolizerHandle::spawn();
    let pid = std::process::id();
    // An address in no mapping ends the chain: nothing after it is named, nothing is a bare
    // address.
    let frames = s.symbolize(pid, vec![0, 0x10]).unwrap();
    assert_eq!(frames, []);
    // Beyond any pid_max (4M), so never a live process.
    let err = s.symbolize(0x7fff_fff0, vec![0x1234]).unwrap_err();
    assert!(err.is_process_gone(), "{err}");
    let stats = s.stats();
    assert_eq!(
        (stats.unknown_address, stats.process_gone, stats.stack_cut),
        (1, 1, 1)
    );
}

#[inline(never)]
fn calls_the_target() -> u64 {
    allocwatch_symbolize_test_target(std::hint::black_box(7)).wrapping_add(1)
}

/// A real return address: the instruction after the call to the test target in
/// `calls_the_target`, found by decoding that function in our own memory.
fn after_call() -> u64 {
    let start = calls_the_target as fn() -> u64 as *const u8;
    // SAFETY: our own code, mapped and readable for far more than 256 bytes from a function's
    // start (the text segment).
    let code = unsafe { std::slice::from_raw_parts(start, 256) };
    let mut decoder =
        iced_x86::Decoder::with_ip(64, code, start as u64, iced_x86::DecoderOptions::NONE);
    decoder
        .iter()
        .find(|i| i.is_call_near() && i.near_branch_target() == target_addr())
        .map(|i| i.next_ip())
        .expect("calls_the_target calls the target")
}

#[test]
fn chains_are_cut_at_an_address_that_follows_no_call() {
    let s = SymbolizerHandle::spawn();
    let pid = std::process::id();
    assert_eq!(calls_the_target(), 22);
    let after_call = after_call();
    let mid_function = target_addr() + 1;
    let frames = s
        .symbolize_checked(pid, vec![after_call, mid_function, after_call])
        .unwrap();
    assert_eq!(
        frames.iter().map(|f| f.address).collect::<Vec<_>>(),
        [after_call]
    );
    assert_eq!(s.stats().stack_cut, 1);
    // Out of the checked path (tests naming arbitrary code) nothing is cut.
    let frames = s.symbolize(pid, vec![after_call, mid_function]).unwrap();
    assert!(
        frames.iter().any(|f| f.address == mid_function),
        "{frames:?}"
    );
}

/// An address the walk marked `FRAME_EXACT` (a signal interrupted that instruction, or the
/// signal trampoline) is named at itself, not at the byte before, and is not cut for
/// following no call: here the target's first byte, between two return addresses; the frame
/// carries the address without the mark.
#[test]
fn exact_addresses_are_named_at_themselves() {
    let s = SymbolizerHandle::spawn();
    let pid = std::process::id();
    assert_eq!(calls_the_target(), 22);
    let after_call = after_call();
    let first_byte = target_addr();
    let frames = s
        .symbolize_checked(pid, vec![after_call, first_byte | FRAME_EXACT, after_call])
        .unwrap();
    let named: Vec<(Option<&str>, u64)> = frames
        .iter()
        .map(|f| (f.function.as_deref(), f.address))
        .collect();
    let caller = frames[0].function.as_deref();
    assert_eq!(
        named,
        [
            (caller, after_call),
            (Some("allocwatch_symbolize_test_target"), first_byte),
            (caller, after_call),
        ]
    );
    assert_eq!(s.stats().stack_cut, 0);
    // Its offset is the first byte's, also when the byte before (a return address's lookup)
    // was looked up first.
    let plain = s.symbolize(pid, vec![first_byte + 1]).unwrap();
    let exact = s.symbolize(pid, vec![first_byte | FRAME_EXACT]).unwrap();
    assert_eq!(plain[0].function, exact[0].function);
    assert_eq!(exact[0].offset.map(|o| o + 1), plain[0].offset);
}

const CHILD_C: &str = r#"
#include <unistd.h>
int main(void) {
    pause();
    return 0;
}
"#;

/// A running instance of CHILD_C, built with gcc into its own directory.
struct Child {
    process: std::process::Child,
    dir: PathBuf,
    exe: String,
    /// Runtime address and file offset of `main`.
    main: u64,
    main_offset: u64,
}

impl Child {
    /// Panics when gcc is unavailable (`./x setup` installs it).
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "allocwatch-symbolize-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("child.c");
        std::fs::write(&src, CHILD_C).unwrap();
        let exe = dir.join("child");
        let status = Command::new("gcc")
            .args(["-g", "-O0", "-fno-omit-frame-pointer", "-o"])
            .arg(&exe)
            .arg(&src)
            .status();
        assert!(
            status.as_ref().is_ok_and(|s| s.success()),
            "gcc failed ({status:?}): `./x setup` installs it"
        );
        let data = std::fs::read(&exe).unwrap();
        let elf = object::File::parse(&*data).unwrap();
        let main_vaddr = elf
            .symbols()
            .find(|s| s.name() == Ok("main"))
            .unwrap()
            .address();

        let process = Command::new(&exe).spawn().unwrap();
        let pid = process.id();
        let exe = exe.into_os_string().into_string().unwrap();
        // spawn() can return while the kernel is still loading the executable: wait for it.
        // gcc builds a PIE whose first segment has vaddr 0: runtime = base of offset-0 mapping.
        let base = (0..1000)
            .find_map(|_| {
                let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
                let line = maps
                    .lines()
                    .find(|l| l.ends_with(&exe) && l.split(' ').nth(2) == Some("00000000"));
                if line.is_none() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                line.and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
            })
            .unwrap();
        Self {
            process,
            dir,
            exe,
            main: base + main_vaddr,
            main_offset: main_vaddr,
        }
    }

    fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Kills and reaps the child.
    fn exit(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }

    fn check_main(&self, f: &Frame) {
        assert_eq!(f.function.as_deref(), Some("main"), "{f:?}");
        assert!(f.file.as_deref().unwrap().ends_with("child.c"), "{f:?}");
        assert_eq!(f.line, Some(3));
        assert_eq!(f.module.as_deref(), Some(&*self.exe));
        assert_eq!(f.offset, Some(self.main_offset + 1));
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.exit();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn short_lived_process_after_exit() {
    let mut child = Child::start("exit");
    let pid = child.pid();
    let s = SymbolizerHandle::spawn();
    let t = Instant::now();
    s.note_process(pid);
    let note = t.elapsed();
    child.exit();
    assert!(!Path::new(&format!("/proc/{pid}")).exists());

    let t = Instant::now();
    let frames = s.symbolize(pid, vec![child.main + 1]).unwrap();
    let first = t.elapsed();
    child.check_main(&frames[0]);
    eprintln!("child: note_process {note:?}, first symbolization after exit {first:?}");
    assert_eq!(s.stats(), SymbolizeStats::default());
}

#[test]
fn mappings_after_the_note_are_picked_up() {
    let mut child = Child::start("late");
    let pid = child.pid();
    let mut worker = Worker::new(Arc::default(), Held::default());
    // As if noted before the loader mapped anything.
    worker.note(pid, Vec::new());
    let frames = worker.symbolize(pid, &[child.main + 1], false).unwrap();
    child.check_main(&frames[0]);
    // An exec (here: all mappings gone) invalidates what was cached for them.
    child.exit();
    worker.note(pid, Vec::new());
    let frames = worker.symbolize(pid, &[child.main + 1], false).unwrap();
    // Now in no known mapping: nothing named, nothing shown as a bare address.
    assert_eq!(frames, []);
}

/// The maps are re-read for a chain only where the first address in no known mapping could be
/// in a library mapped since the snapshot (issue 15: garbage addresses of walks without frame
/// pointers re-read them for every chain).
#[test]
fn maps_are_reread_only_for_an_address_mapped_now() {
    let files = HashMap::new();
    let maps = vec![Mapping {
        start: 0x1000,
        end: 0x2000,
        offset: 0,
        module: "[vdso]".into(),
        elf: None,
    }];
    let never = |_: u64| -> Option<bool> { panic!("asked without a missed address") };
    assert!(!needs_reread(&files, &maps, &[0x1001, 0x1fff], true, never));
    assert!(!needs_reread(&files, &maps, &[], true, never));
    // Address 0 (after the chain's end) is in no mapping and no address to look at.
    assert!(!needs_reread(&files, &maps, &[0x1001, 0], true, never));
    for (answer, reread) in [(Some(true), false), (Some(false), true), (None, true)] {
        let mut asked = Vec::new();
        let unmapped = |a: u64| {
            asked.push(a);
            answer
        };
        assert_eq!(
            needs_reread(&files, &maps, &[0x1001, 0x5000, 0x6000], true, unmapped),
            reread,
            "{answer:?}"
        );
        // The first missed address only (the chain stops there), as the call's address.
        assert_eq!(asked, [0x4fff]);
    }
}

/// A file is opened once for all the snapshots that map it (issue 15: every exec is
/// snapshotted four times); a file the worker let go of meanwhile is opened by the worker.
#[test]
fn files_are_opened_once_for_every_snapshot() {
    let pid = std::process::id();
    let held = Held::default();
    let mut worker = Worker::new(Arc::default(), Arc::clone(&held));
    let maps = crate::target::maps::read_maps(pid).unwrap();
    let named = |w: &Worker| {
        w.processes[&pid]
            .maps
            .iter()
            .filter(|m| m.elf.is_some())
            .count()
    };
    worker.note(pid, maps::snapshot_of(pid, &maps, |_| false));
    let (files, with_file) = (worker.files.len(), named(&worker));
    assert!(
        files > 0 && with_file >= files,
        "{files} files, {with_file} mappings"
    );
    let known = lock(&held).clone();
    assert_eq!(known.len(), files, "one identity per file here");
    let again = maps::snapshot_of(pid, &maps, |id| known.contains(id));
    assert!(
        again.iter().all(|m| m.file.is_none()),
        "held files opened again"
    );
    worker.note(pid, again);
    assert_eq!((worker.files.len(), named(&worker)), (files, with_file));
    // Let go of with its process; a snapshot taken before it knew still finds every file.
    let p = worker.processes.remove(&pid).unwrap();
    worker.release(&p.maps);
    assert!(worker.files.is_empty() && worker.identities.is_empty() && lock(&held).is_empty());
    worker.note(pid, maps::snapshot_of(pid, &maps, |id| known.contains(id)));
    assert_eq!((worker.files.len(), named(&worker)), (files, with_file));
    let frames = worker.symbolize(pid, &[target_addr() + 1], false).unwrap();
    assert_eq!(
        frames.last().and_then(|f| f.function.as_deref()),
        Some("allocwatch_symbolize_test_target")
    );
}

#[test]
fn unmapped_reads_one_byte_of_the_process() {
    let pid = std::process::id();
    let here = 7u64;
    assert_eq!(maps::unmapped(pid, &here as *const u64 as u64), Some(false));
    assert_eq!(maps::unmapped(pid, 0x10), Some(true));
    // Beyond any pid_max (4M), so never a live process.
    assert_eq!(maps::unmapped(0x7fff_fff0, 0x10), None);
}

#[tokio::test]
async fn async_variant_and_shutdown() {
    let s = SymbolizerHandle::spawn();
    let pid = std::process::id();
    let frames = s.symbolize_async(pid, vec![after_call()]).await.unwrap();
    let function = frames.last().unwrap().function.as_deref().unwrap();
    assert!(function.ends_with("calls_the_target"), "{frames:?}");
    let clone = s.clone();
    drop(s);
    assert!(clone.symbolize(pid, vec![1]).is_ok());
}

// Go binaries, named through `.gopclntab`: the growth fixture built by every Go toolchain the
// setup installs, plain and stripped, non-PIE and PIE. Without those toolchains these tests
// fail, never pass by testing nothing.

use crate::gort::tests::{fixtures, go_command, repo};

/// Where function `name` lies in the file, from the symbol table of an unstripped binary.
struct GoSymbol {
    size: u64,
    file_offset: u64,
}

fn go_symbol(elf: &object::File<'_>, name: &str) -> GoSymbol {
    use object::ObjectSegment as _;
    let sym = elf
        .symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("{name} not in the symbol table"));
    let (vaddr, size) = (sym.address(), sym.size());
    assert!(size > 0, "{name} has no size");
    let file_offset = elf
        .segments()
        .find_map(|s| {
            let (offset, filesz) = s.file_range();
            let skip = vaddr.checked_sub(s.address())?;
            (skip < filesz).then_some(offset + skip)
        })
        .unwrap_or_else(|| panic!("{name} is in no segment"));
    GoSymbol { size, file_offset }
}

/// Starts `exe`, stopped by ptrace right after execve has mapped it: no Go code has run, so
/// it cannot exit (or finish) before it is noted, however loaded the machine is.
fn spawn_stopped(exe: &Path) -> std::process::Child {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(exe);
    cmd.arg("noop")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure runs between fork and exec and only makes one syscall.
    unsafe {
        cmd.pre_exec(|| {
            let null = std::ptr::null_mut::<libc::c_void>();
            if libc::ptrace(libc::PTRACE_TRACEME, 0, null, null) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn Go fixture");
    let pid = i32::try_from(child.id()).unwrap();
    let mut status = 0;
    // SAFETY: plain waitpid on our own child.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        waited == pid && libc::WIFSTOPPED(status),
        "{} did not stop at exec: {status:#x}",
        exe.display()
    );
    child
}

/// Start of the mapping of `exe` in `pid` that holds file offset `offset`, and that
/// mapping's file offset.
fn mapping_of(pid: u32, exe: &Path, offset: u64) -> (u64, u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let exe = exe.to_str().unwrap();
    maps.lines()
        .filter(|l| l.ends_with(exe))
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let (start, end) = cols[0].split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            let map_offset = u64::from_str_radix(cols[2], 16).ok()?;
            (offset >= map_offset && offset - map_offset < end - start)
                .then_some((start, map_offset))
        })
        .unwrap_or_else(|| panic!("offset {offset:#x} of {exe} not mapped in {pid}:\n{maps}"))
}

/// What a frame says about the source, without where it was found.
fn source_of(f: &Frame) -> (Option<&str>, Option<&str>, Option<u32>) {
    (f.function.as_deref(), f.file.as_deref(), f.line)
}

#[test]
fn go_binaries_are_named_by_pclntab_stripped_or_not() {
    let decl = {
        let src = std::fs::read_to_string(repo().join("fixtures/go/growth/main.go")).unwrap();
        let line = src
            .lines()
            .position(|l| l.starts_with("func fillMapBig("))
            .expect("func fillMapBig in main.go");
        u32::try_from(line + 1).unwrap()
    };
    for built in fixtures() {
        let tc = &built.tc;
        for pie in [false, true] {
            let (plain, stripped) = if pie {
                (&built.pie, &built.pie_stripped)
            } else {
                (&built.plain, &built.stripped)
            };
            let data = std::fs::read(plain).unwrap();
            let elf = object::File::parse(&*data).unwrap();
            let targets = [
                go_symbol(&elf, "main.fillMapBig"),
                go_symbol(&elf, "runtime.growslice"),
            ];
            let mut by_binary = Vec::new();
            for exe in [plain, stripped] {
                let what = format!("Go {} {}", tc.version, exe.display());
                let exe = exe.canonicalize().unwrap();
                let s = SymbolizerHandle::spawn();
                let mut child = spawn_stopped(&exe);
                let pid = child.id();
                s.note_process(pid);
                // Runtime address = mapping start + distance from the mapping's file offset:
                // the same for PIE (random base) and fixed-address executables.
                let runtime: Vec<u64> = targets
                    .iter()
                    .map(|t| {
                        let (start, map_offset) = mapping_of(pid, &exe, t.file_offset);
                        start + (t.file_offset - map_offset)
                    })
                    .collect();
                let _ = child.kill();
                let _ = child.wait();
                assert!(!Path::new(&format!("/proc/{pid}")).exists(), "{what}");

                // Every return address inside each function, i.e. lookups at [entry, end).
                let addrs: Vec<u64> = targets
                    .iter()
                    .zip(&runtime)
                    .flat_map(|(t, &at)| (1..=t.size).map(move |i| at + i))
                    .collect();
                let t = Instant::now();
                let first = s.symbolize(pid, vec![addrs[0]]).unwrap();
                let first_time = t.elapsed();
                let t = Instant::now();
                let frames = s.symbolize(pid, addrs.clone()).unwrap();
                let batch_time = t.elapsed();
                eprintln!(
                    "{what}: first symbolization {first_time:?}, then {} addresses in \
                     {batch_time:?}",
                    addrs.len()
                );
                // One frame per address, or several inside inlined code (innermost first),
                // all carrying the address they were asked for.
                let groups: Vec<&[Frame]> =
                    frames.chunk_by(|a, b| a.address == b.address).collect();
                assert_eq!(groups.len(), addrs.len(), "{what}");
                assert_eq!(first[..], groups[0][..], "{what}");
                assert_eq!(s.stats(), SymbolizeStats::default(), "{what}");

                let module = exe.to_str().unwrap();
                for (group, &addr) in groups.iter().zip(&addrs) {
                    for f in group.iter() {
                        assert_eq!(f.address, addr, "{what}");
                        assert_eq!(f.module.as_deref(), Some(module), "{what}");
                        assert!(f.function.is_some() && f.line.is_some(), "{what} {f:?}");
                    }
                }
                let (map_groups, slice_groups) = groups.split_at(targets[0].size as usize);
                for (i, g) in map_groups.iter().enumerate() {
                    let f = g.last().unwrap();
                    assert_eq!(f.offset, Some(targets[0].file_offset + i as u64 + 1));
                    assert_eq!(
                        f.function.as_deref(),
                        Some("main.fillMapBig"),
                        "{what} {g:?}"
                    );
                    let file = f.file.as_deref().unwrap_or_default();
                    assert!(file.ends_with("fixtures/go/growth/main.go"), "{what} {f:?}");
                    let line = f.line.unwrap_or_default();
                    assert!(
                        (decl..decl + 8).contains(&line),
                        "{what} {f:?}, decl {decl}"
                    );
                }
                // Code inlined into growslice is expanded: every address ends in growslice,
                // and some carry the inlined calls above it, with their own names.
                assert!(
                    slice_groups
                        .iter()
                        .all(|g| g.last().unwrap().function.as_deref() == Some("runtime.growslice")),
                    "{what}: {slice_groups:#?}"
                );
                let inlined = slice_groups.iter().filter(|g| g.len() > 1).count();
                assert!(
                    inlined * 5 > slice_groups.len(),
                    "{what}: only {inlined} of growslice's {} addresses are in inlined code",
                    slice_groups.len()
                );
                assert!(
                    slice_groups
                        .iter()
                        .flat_map(|g| &g[..g.len() - 1])
                        .all(|f| f.function.as_deref() != Some("runtime.growslice")),
                    "{what}: growslice inlined into itself"
                );
                let entry = &slice_groups[0][0];
                assert!(
                    entry
                        .file
                        .as_deref()
                        .unwrap_or_default()
                        .ends_with("runtime/slice.go"),
                    "{what} {entry:?}"
                );
                by_binary.push(frames);
            }
            // The same frames whether stripped or not: the unstripped binary's symbols and
            // DWARF are not used for Go code.
            let [plain_frames, stripped_frames] = &by_binary[..] else {
                unreachable!()
            };
            assert_eq!(
                plain_frames.iter().map(source_of).collect::<Vec<_>>(),
                stripped_frames.iter().map(source_of).collect::<Vec<_>>(),
                "Go {} pie={pie}",
                tc.version
            );
        }
    }
}

/// The cost of the first symbolization in a Go binary is reading its pclntab (and ELF
/// headers); measured on the largest Go binary at hand, the go command, against what
/// blazesym takes for the same file (DWARF/ELF symbols, when present).
#[test]
fn go_table_cost_on_a_large_binary() {
    for tc in fixtures().iter().map(|b| &b.tc) {
        let size = std::fs::metadata(&tc.go).unwrap().len();
        let t = Instant::now();
        let go = go::GoFile::open(&tc.go)
            .unwrap()
            .expect("the go command is Go");
        let open = t.elapsed();
        // An offset in its text: the entry of main.main, through the table itself.
        let data = std::fs::read(&tc.go).unwrap();
        let elf = object::File::parse(&*data).unwrap();
        let text = elf.section_by_name(".text").expect(".text");
        let (text_offset, _) = object::ObjectSection::file_range(&text).unwrap();
        let probe = text_offset + 0x100;
        let t = Instant::now();
        let frames = go.frames(probe);
        let loc = frames.last().expect("a function at the start of text");
        let lookup = t.elapsed();

        let symbolizer = Symbolizer::new();
        let source = Source::from(Elf::new(&tc.go));
        let t = Instant::now();
        let blaze = symbolizer.symbolize_single(&source, Input::FileOffset(probe));
        let blaze_time = t.elapsed();
        let blaze_name = match blaze {
            Ok(Symbolized::Sym(sym)) => sym.name.into_owned(),
            other => format!("{other:?}"),
        };
        eprintln!(
            "go {} ({} MB): pclntab first use {open:?}, lookup {lookup:?} → {}; blazesym \
             first use {blaze_time:?} → {blaze_name}",
            tc.version,
            size >> 20,
            loc.function
        );
        // Generous for debug builds on a loaded machine: guards against decoding the whole
        // table up front, not a benchmark.
        assert!(open < Duration::from_secs(2), "{open:?}");
    }
    // Every other file pays for finding out it is not Go: its section headers are read.
    for path in [
        std::env::current_exe().unwrap(),
        PathBuf::from("/proc/self/exe"),
    ] {
        let t = Instant::now();
        assert!(go::GoFile::open(&path).unwrap().is_none());
        eprintln!("{}: not Go, found in {:?}", path.display(), t.elapsed());
    }
}

/// A cgo program: Go code is named by the pclntab, the C code linked into the same
/// executable falls through to blazesym.
const CGO_MAIN: &str = r#"package main

/*
#include <unistd.h>
__attribute__((noinline)) int allocwatch_c_leaf(int x) { return x * 3 + (int)getpid(); }
*/
import "C"

import "fmt"

//go:noinline
func goCaller() int { return int(C.allocwatch_c_leaf(2)) }

func main() { fmt.Println(goCaller()) }
"#;

#[test]
fn cgo_binary_mixes_pclntab_and_blazesym() {
    for tc in fixtures().iter().map(|b| &b.tc) {
        let dir = std::env::temp_dir().join(format!(
            "allocwatch-symbolize-{}-cgo-{}",
            std::process::id(),
            tc.version
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("main.go"), CGO_MAIN).unwrap();
        std::fs::write(dir.join("go.mod"), "module cgotest\n\ngo 1.19\n").unwrap();
        let exe = dir.join("cgotest");
        let out = go_command(tc)
            .current_dir(&dir)
            .env("CGO_ENABLED", "1")
            .args(["build", "-buildvcs=false", "-o"])
            .arg(&exe)
            .arg(".")
            .output()
            .expect("run go build");
        assert!(
            out.status.success(),
            "go {} cgo build failed (gcc missing? run ./x setup): {}",
            tc.version,
            String::from_utf8_lossy(&out.stderr)
        );
        let data = std::fs::read(&exe).unwrap();
        let elf = object::File::parse(&*data).unwrap();
        let targets = [
            go_symbol(&elf, "main.goCaller"),
            go_symbol(&elf, "allocwatch_c_leaf"),
        ];
        let exe = exe.canonicalize().unwrap();
        let s = SymbolizerHandle::spawn();
        let mut child = spawn_stopped(&exe);
        let pid = child.id();
        s.note_process(pid);
        let addrs: Vec<u64> = targets
            .iter()
            .map(|t| {
                let (start, map_offset) = mapping_of(pid, &exe, t.file_offset);
                start + (t.file_offset - map_offset) + 1
            })
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        let frames = s.symbolize(pid, addrs).unwrap();
        let what = format!("Go {} cgo", tc.version);
        let go_frame = &frames[0];
        assert_eq!(
            go_frame.function.as_deref(),
            Some("main.goCaller"),
            "{what} {frames:#?}"
        );
        assert!(
            go_frame
                .file
                .as_deref()
                .unwrap_or_default()
                .ends_with("/main.go"),
            "{what} {go_frame:?}"
        );
        let c_frame = frames.last().unwrap();
        assert_eq!(
            c_frame.function.as_deref(),
            Some("allocwatch_c_leaf"),
            "{what} {frames:#?}"
        );
        assert_eq!(s.stats(), SymbolizeStats::default(), "{what}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
