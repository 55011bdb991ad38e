use std::{path::Path, process::Command};

use allocwatch_common::unwind::{UnwindRow, kind};

use super::{GAP, Rule, compile, lookup, rows_of};

fn rule(kind: u8, cfa_off: u16, rbp_words: i8) -> Rule {
    Rule {
        kind,
        cfa_off,
        rbp_words,
    }
}

#[test]
fn rows_merge_equal_rules_and_mark_gaps() {
    let a = rule(kind::CFA_RSP, 8, 0);
    let b = rule(kind::CFA_RSP, 16, 0);
    let rows = rows_of(vec![
        (0x1010, 0x1020, a),
        (0x1000, 0x1004, a),
        (0x1004, 0x1010, b),
        // A second function right after the first, starting with the same rule.
        (0x1020, 0x1030, a),
        (0x1040, 0x1050, a),
    ]);
    let pcs: Vec<(u32, u8, u16)> = rows.iter().map(|r| (r.pc, r.kind, r.cfa_off)).collect();
    assert_eq!(
        pcs,
        [
            (0x1000, kind::CFA_RSP, 8),
            (0x1004, kind::CFA_RSP, 16),
            (0x1010, kind::CFA_RSP, 8),
            (0x1030, kind::GAP, 0),
            (0x1040, kind::CFA_RSP, 8),
            (0x1050, kind::GAP, 0),
        ]
    );
    assert_eq!(lookup(&rows, 0xfff), None);
    assert_eq!(lookup(&rows, 0x1007).map(|r| r.cfa_off), Some(16));
    assert_eq!(lookup(&rows, 0x1035).map(|r| r.kind), Some(kind::GAP));
    assert_eq!(lookup(&rows, 0x9999).map(|r| r.kind), Some(kind::GAP));
    assert!(rows_of(Vec::new()).is_empty());
    let _ = GAP;
}

#[test]
fn not_an_elf_is_an_error() {
    assert!(compile(b"not an elf").is_err());
    assert!(compile(&[]).is_err());
}

/// One row of `readelf --debug-dump=frames-interp`: its address, CFA and rbp and ra columns,
/// and whether its FDE's CIE has the `S` augmentation (a signal trampoline).
struct Interp {
    loc: u64,
    cfa: String,
    rbp: String,
    ra: String,
    signal: bool,
}

/// Every row of every FDE readelf interprets in `path`.
fn readelf_rows(path: &Path) -> Vec<Interp> {
    let out = Command::new("readelf")
        .arg("--debug-dump=frames-interp")
        .arg(path)
        .output()
        .expect("readelf runs (binutils)");
    // Debian's readelf exits 1 on libc.so.6 (its debug link leads nowhere) after printing
    // every frame: the rows are checked, not the status.
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = Vec::new();
    let mut columns: Vec<String> = Vec::new();
    let mut in_fde = false;
    // CIE offsets with the `S` augmentation, and whether the current FDE has one.
    let mut signal_cies: Vec<String> = Vec::new();
    let mut signal = false;
    for line in text.lines() {
        // A register rule prints as `r10 (r10)`: one column, two words.
        let words: Vec<&str> = line
            .split_whitespace()
            .filter(|w| !(w.starts_with('(') && w.ends_with(')')))
            .collect();
        if line.contains(" FDE ") {
            in_fde = true;
            signal = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("cie="))
                .is_some_and(|cie| signal_cies.iter().any(|c| c == cie));
            continue;
        }
        // `0000252c 0000000000000010 00000000 CIE "zRS" cf=1 df=-8 ra=16`
        if let Some((_, aug)) = line.split_once(" CIE \"")
            && aug.split('"').next().is_some_and(|a| a.contains('S'))
        {
            signal_cies.extend(line.split_whitespace().next().map(str::to_owned));
        }
        if line.contains(" CIE") || line.contains("ZERO terminator") {
            in_fde = false;
            continue;
        }
        if words.first() == Some(&"LOC") {
            columns = words.iter().map(|w| w.to_string()).collect();
            continue;
        }
        if !in_fde || words.len() < 2 {
            continue;
        }
        let Ok(loc) = u64::from_str_radix(words[0], 16) else {
            continue;
        };
        let col = |name: &str| {
            columns
                .iter()
                .position(|c| c == name)
                .and_then(|i| words.get(i))
                .map_or_else(|| "u".to_string(), |w| w.to_string())
        };
        rows.push(Interp {
            loc,
            cfa: words[1].to_string(),
            rbp: col("rbp"),
            ra: col("ra"),
            signal,
        });
    }
    rows
}

/// What our row should say for readelf's columns.
fn expected(r: &Interp) -> (u8, u16, i8) {
    let unsupported = (kind::UNSUPPORTED, 0, 0);
    // A signal trampoline's rules are expressions; which ones, readelf does not print here
    // (`signal_frames_of_the_system_libc` checks glibc's).
    if r.signal && [r.cfa.as_str(), &r.rbp, &r.ra] == ["exp"; 3] {
        return (kind::SIGNAL, 0, 0);
    }
    if r.ra == "u" {
        return (kind::END, 0, 0);
    }
    if r.ra != "c-8" {
        return unsupported;
    }
    let (k, off) = if let Some(off) = r.cfa.strip_prefix("rsp+") {
        (kind::CFA_RSP, off)
    } else if let Some(off) = r.cfa.strip_prefix("rbp+") {
        (kind::CFA_RBP, off)
    } else {
        return unsupported;
    };
    let Ok(off) = off.parse::<u16>() else {
        return unsupported;
    };
    let rbp = match r.rbp.as_str() {
        "u" | "s" => 0,
        c => match c.strip_prefix("c-").and_then(|n| n.parse::<i16>().ok()) {
            Some(n) if n % 8 == 0 => -(n / 8) as i8,
            _ => return unsupported,
        },
    };
    (k, off, rbp)
}

/// Every row readelf prints is what our table says for its address.
fn assert_agrees(path: &Path) -> Vec<UnwindRow> {
    let data = std::fs::read(path).unwrap();
    let rows = compile(&data).unwrap().rows;
    let interp = readelf_rows(path);
    assert!(
        !interp.is_empty(),
        "readelf found rows in {}",
        path.display()
    );
    let mut kinds = [0usize; 6];
    for r in &interp {
        let got = lookup(&rows, r.loc)
            .unwrap_or_else(|| panic!("{}: no row for {:#x}", path.display(), r.loc));
        let want = expected(r);
        assert_eq!(
            (got.kind, got.cfa_off, got.rbp_words),
            want,
            "{} at {:#x}: readelf says cfa {} rbp {} ra {}",
            path.display(),
            r.loc,
            r.cfa,
            r.rbp,
            r.ra
        );
        kinds[usize::from(got.kind)] += 1;
    }
    assert!(rows.windows(2).all(|w| w[0].pc < w[1].pc), "sorted");
    rows
}

/// A program and a shared library built here the way distributions build them: -O2 without
/// frame pointers; one function keeps a frame pointer for its variable-length array (CFA from
/// rbp).
#[test]
fn tables_agree_with_readelf_on_binaries_built_here() {
    let dir = std::env::temp_dir().join(format!("allocwatch-unwind-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("prog.c");
    std::fs::write(
        &src,
        r#"
#include <stdlib.h>
#include <string.h>
__attribute__((noinline)) void *leaf(size_t n) { return malloc(n); }
__attribute__((noinline)) void *mid(size_t n) { void *p = leaf(n); memset(p, 1, n); return p; }
__attribute__((noinline)) size_t vla(size_t n) {
    char buf[n];
    memset(buf, 0, n);
    return (size_t)buf[n / 2] + (size_t)mid(n);
}
int main(int argc, char **argv) { (void)argv; return (int)vla((size_t)argc + 64); }
"#,
    )
    .unwrap();
    let bin = dir.join("prog");
    let lib = dir.join("libprog.so");
    for (out, extra) in [(&bin, &[][..]), (&lib, &["-shared", "-fPIC"][..])] {
        let status = Command::new("gcc")
            .args(["-O2", "-fomit-frame-pointer", "-o"])
            .arg(out)
            .args(extra)
            .arg(&src)
            .status()
            .expect("gcc runs");
        assert!(status.success());
    }
    let rows = assert_agrees(&bin);
    // The variable-length array's function walks from rbp.
    assert!(
        rows.iter()
            .any(|r| r.kind == kind::CFA_RBP && r.rbp_words == -2)
    );
    // _start: the outermost frame.
    assert!(rows.iter().any(|r| r.kind == kind::END));
    // The PLT's CFA is an expression.
    assert!(rows.iter().any(|r| r.kind == kind::UNSUPPORTED));
    assert_agrees(&lib);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The system's libc, built by its distribution: every row agrees, and the table is compact.
#[test]
fn tables_agree_with_readelf_on_the_system_libc() {
    let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
    if !libc.exists() {
        return;
    }
    let rows = assert_agrees(libc);
    assert!(
        rows.len() > 1000 && rows.len() < 200_000,
        "{} rows",
        rows.len()
    );
}

/// glibc's signal trampoline, `__restore_rt` (`sigaction` makes it the return address of
/// every handler): its FDE (the `S` augmentation) reads the interrupted registers from the
/// `ucontext` at rsp where the walker reads them, so its rows are `SIGNAL`, from the byte
/// before it (glibc starts the FDE there, in the padding before the trampoline, so that a
/// return address's lookup, at the address before, lands in it); nothing else in libc is.
#[test]
fn signal_frames_of_the_system_libc() {
    let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
    if !libc.exists() {
        return;
    }
    let rows = compile(&std::fs::read(libc).unwrap()).unwrap().rows;
    let signal: Vec<&UnwindRow> = rows.iter().filter(|r| r.kind == kind::SIGNAL).collect();
    assert_eq!(signal.len(), 1, "{signal:?}");
    let at = u64::from(signal[0].pc);
    let interp = readelf_rows(libc);
    let fde = interp.iter().find(|r| r.loc == at).expect("readelf's row");
    assert!(fde.signal, "an S FDE at {at:#x}");
    // The trampoline after that byte: `mov $15, %rax` (rt_sigreturn); `syscall`.
    let out = Command::new("objdump")
        .args(["-d", "--start-address"])
        .arg(format!("{:#x}", at + 1))
        .arg("--stop-address")
        .arg(format!("{:#x}", at + 10))
        .arg(libc)
        .output()
        .expect("objdump runs (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    let code: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split('\t').nth(2))
        .map(str::trim)
        .collect();
    assert_eq!(code, ["mov    $0xf,%rax", "syscall"], "{text}");
    // The row ends after the trampoline.
    assert_ne!(lookup(&rows, at + 10).map(|r| r.kind), Some(kind::SIGNAL));
}

/// `prog.c` of [`tables_agree_with_readelf_on_binaries_built_here`] and a library, built -O2
/// with `flag` into `dir`: (program, library).
fn build_with(dir: &Path, flag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = dir.join("fp.c");
    std::fs::write(
        &src,
        r#"
#include <stdlib.h>
#include <string.h>
__attribute__((noinline)) void *leaf(size_t n) { return malloc(n); }
__attribute__((noinline)) void *mid(size_t n) { void *p = leaf(n); memset(p, 1, n); return p; }
__attribute__((noinline)) void *outer(size_t n) { void *p = mid(n); return (char *)mid(n) + (p != 0); }
int main(int argc, char **argv) { (void)argv; return outer((size_t)argc + 64) != 0; }
"#,
    )
    .unwrap();
    let bin = dir.join(format!("prog{flag}"));
    let lib = dir.join(format!("libprog{flag}.so"));
    for (out, extra) in [(&bin, &[][..]), (&lib, &["-shared", "-fPIC"][..])] {
        let status = Command::new("gcc")
            .args(["-O2", flag, "-o"])
            .arg(out)
            .args(extra)
            .arg(&src)
            .status()
            .expect("gcc runs");
        assert!(status.success());
    }
    (bin, lib)
}

fn frame_pointers(path: &Path) -> super::FramePointers {
    compile(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .frame_pointers
}

/// `--unwind auto`'s choice: files built with frame pointers need no table, files built
/// without them do, whichever way gcc is told.
#[test]
fn files_built_with_frame_pointers_need_no_table() {
    let dir = std::env::temp_dir().join(format!("allocwatch-fp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (flag, kept) in [
        ("-fno-omit-frame-pointer", true),
        ("-fomit-frame-pointer", false),
    ] {
        let (bin, lib) = build_with(&dir, flag);
        for file in [&bin, &lib] {
            let fp = frame_pointers(file);
            assert_eq!(fp.kept(), kept, "{flag} {}: {fp:?}", file.display());
            assert!(!fp.go);
            // leaf, mid, outer and main hold a frame (the PLT is not counted).
            assert!(fp.framed >= 3, "{fp:?}");
            if kept {
                assert_eq!(fp.without, 0, "{fp:?}");
            } else {
                assert_eq!(fp.without, fp.framed, "{fp:?}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Debian builds its packages without frame pointers: libc, ld.so, libstdc++ and python3.11
/// get tables (those installed here).
#[test]
fn distribution_packages_need_tables() {
    let files = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
        "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
        "/usr/bin/python3.11",
    ];
    let mut seen = 0;
    for file in files.iter().map(Path::new).filter(|f| f.exists()) {
        let fp = frame_pointers(file);
        eprintln!("{}: {fp:?}", file.display());
        assert!(!fp.kept(), "{}: {fp:?}", file.display());
        assert!(
            fp.framed > 100 && fp.without > fp.framed / 2,
            "{}: {fp:?}",
            file.display()
        );
        seen += 1;
    }
    assert!(seen > 0, "none of {files:?}");
}

/// Go keeps frame pointers: its binaries (no `.eh_frame` without cgo, stripped or not) need
/// no table.
#[test]
fn go_binaries_need_no_table() {
    let built = crate::gort::tests::fixtures();
    assert!(!built.is_empty(), "no Go toolchain: run ./x setup");
    for b in built {
        for bin in [&b.plain, &b.stripped, &b.pie_stripped] {
            let c = compile(&std::fs::read(bin).unwrap()).unwrap();
            assert!(c.frame_pointers.go, "{}", bin.display());
            assert!(c.frame_pointers.kept(), "{}", bin.display());
        }
    }
}

#[test]
fn a_few_functions_without_frame_pointers_are_tolerated() {
    use super::FramePointers;
    let fp = |framed, without| FramePointers {
        go: false,
        framed,
        without,
    };
    assert!(fp(0, 0).kept(), "nothing framed: no caller frame to walk");
    assert!(fp(100, 2).kept());
    assert!(!fp(100, 3).kept());
    assert!(!fp(7, 7).kept());
    assert!(!fp(1, 1).kept());
}
