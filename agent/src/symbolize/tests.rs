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
    let frames = s.symbolize(pid, vec![0, 0x10]).unwrap();
    assert_eq!(frames, [Frame::unknown(0), Frame::unknown(0x10)]);
    // Beyond any pid_max (4M), so never a live process.
    let err = s.symbolize(0x7fff_fff0, vec![0x1234]).unwrap_err();
    assert!(err.is_process_gone(), "{err}");
    let stats = s.stats();
    assert_eq!((stats.unknown_address, stats.process_gone), (2, 1));
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
    /// `None` when gcc is unavailable.
    fn start(name: &str) -> Option<Self> {
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
        if !status.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("skipping: gcc unavailable ({status:?})");
            return None;
        }
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
        Some(Self {
            process,
            dir,
            exe,
            main: base + main_vaddr,
            main_offset: main_vaddr,
        })
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
    let Some(mut child) = Child::start("exit") else {
        return;
    };
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
    let Some(mut child) = Child::start("late") else {
        return;
    };
    let pid = child.pid();
    let mut worker = Worker::new(Arc::default());
    // As if noted before the loader mapped anything.
    worker.note(pid, Vec::new());
    let frames = worker.symbolize(pid, &[child.main + 1]).unwrap();
    child.check_main(&frames[0]);
    // An exec (here: all mappings gone) invalidates what was cached for them.
    child.exit();
    worker.note(pid, Vec::new());
    let frames = worker.symbolize(pid, &[child.main + 1]).unwrap();
    assert_eq!(frames, [Frame::unknown(child.main + 1)]);
}

#[tokio::test]
async fn async_variant_and_shutdown() {
    let s = SymbolizerHandle::spawn();
    let pid = std::process::id();
    let frames = s
        .symbolize_async(pid, vec![target_addr() + 1])
        .await
        .unwrap();
    assert_eq!(
        frames.last().unwrap().function.as_deref(),
        Some("allocwatch_symbolize_test_target")
    );
    let clone = s.clone();
    drop(s);
    assert!(clone.symbolize(pid, vec![1]).is_ok());
}
