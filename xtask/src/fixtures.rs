//! Fixtures: fixtures/c/NAME.c -> target/fixtures/NAME, fixtures/c/split_fixture.c also in the
//! variants of target/fixtures/split/ (see [`build_split`]), fixtures/c/unwind/ -> target/fixtures/
//! unwind/ (see [`build_unwind`], and [`build_unwind_cxx_rust`] for its C++ and Rust programs),
//! fixtures/growth/ -> target/fixtures/growth/ (see
//! [`build_growth`]), fixtures/rust/alloc -> target/fixtures/rust-alloc/release/ (see
//! [`build_rust_alloc`]), and fixtures/go/growth built by
//! every Go toolchain (xtask/src/go.rs) -> target/gofixtures/growth-<version>[-noswissmap]
//! [-stripped].

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use anyhow::{Context as _, anyhow};

use crate::{cmd, go, paths::Paths};

/// What [`build`] produced: the directories and the Go toolchain list the tests are given.
pub struct Built {
    /// `target/fixtures`: the C fixtures.
    pub c: PathBuf,
    /// `target/gofixtures`: the Go fixture, one binary per toolchain and variant.
    pub go: PathBuf,
    /// `$cache/go/toolchains.tsv`: the toolchains those were built with.
    pub go_toolchains: PathBuf,
}

/// Builds every fixture whose binary is missing or older than its sources, installing the Go
/// toolchains first when they are missing (idempotent: a no-op on the second run).
pub fn build(paths: &Paths) -> anyhow::Result<Built> {
    let c = build_c(paths)?;
    build_rust_alloc(paths, &c.join("rust-alloc"))?;
    let toolchains = go::ensure_toolchains(&paths.cache)?;
    let go_dir = paths.go_fixtures_out();
    go::build_fixtures(&toolchains, &paths.root.join("fixtures/go/growth"), &go_dir)?;
    Ok(Built {
        c,
        go: go_dir,
        go_toolchains: paths.go_toolchains_manifest(),
    })
}

/// Frame pointers so allocwatch's stack walk reaches `main`; -O1 so the fixture has to defeat a
/// real optimizer (see the comment at the top of libc_fixture.c); -g for file:line.
const CFLAGS: &[&str] = &["-O1", "-g", "-fno-omit-frame-pointer", "-Wall", "-Wextra"];

/// Compiles every C fixture whose binary is missing or older than its source or a shared
/// header (fixtures/c/*.h); returns the output directory.
fn build_c(paths: &Paths) -> anyhow::Result<PathBuf> {
    let src_dir = paths.root.join("fixtures/c");
    let out_dir = paths.fixtures_out();
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let headers = files_ending(&src_dir, "h")?;
    for src in files_ending(&src_dir, "c")? {
        let stem = src
            .file_stem()
            .ok_or_else(|| anyhow!("no file name: {}", src.display()))?;
        let out = out_dir.join(stem);
        let inputs = std::iter::once(&src).chain(&headers);
        if is_stale(inputs, &out)? {
            cmd::run(
                Command::new("gcc")
                    .args(CFLAGS)
                    .arg("-o")
                    .arg(&out)
                    .arg(&src),
            )?;
        }
    }
    build_split(&src_dir, &out_dir.join("split"))?;
    build_allocators(&src_dir, &out_dir.join("alloc"))?;
    build_unwind(&src_dir, &out_dir.join("unwind"))?;
    build_unwind_cxx_rust(&paths.root, &out_dir.join("unwind/nofp"))?;
    build_growth(&paths.root.join("fixtures/growth"), &out_dir.join("growth"))?;
    Ok(out_dir)
}

/// The container-growth fixtures (xtask/tests/growth.rs), in `out`: `cxx_growth` (g++ -O2,
/// libstdc++'s vector and unordered_map) and `rust_growth` (rustc -O, Vec and HashMap), both
/// with frame pointers so the sites' stacks reach the fixture's functions, and the script
/// `py_growth.py` (CPython's list and dict).
fn build_growth(src_dir: &Path, out: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cxx_src = src_dir.join("cxx_growth.cpp");
    let cxx = out.join("cxx_growth");
    if is_stale([&cxx_src], &cxx)? {
        cmd::run(
            Command::new("g++")
                .args(["-O2", "-g", "-fno-omit-frame-pointer", "-Wall", "-o"])
                .arg(&cxx)
                .arg(&cxx_src),
        )?;
    }
    // A script, not built: copied next to the others so the tests find every growth fixture
    // in one place.
    let py_src = src_dir.join("py_growth.py");
    let py = out.join("py_growth.py");
    if is_stale([&py_src], &py)? {
        fs::copy(&py_src, &py)
            .with_context(|| format!("copying {} to {}", py_src.display(), py.display()))?;
    }
    let rust_src = src_dir.join("rust_growth.rs");
    let rust = out.join("rust_growth");
    if is_stale([&rust_src], &rust)? {
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        cmd::run(
            Command::new(rustc)
                .args(["-O", "-g", "-C", "force-frame-pointers=yes", "-o"])
                .arg(&rust)
                .arg(&rust_src),
        )?;
    }
    Ok(())
}

/// The Rust global-allocator fixture (xtask/tests/allocators.rs, `rust_*`): fixtures/rust/alloc,
/// its own crate outside the workspace with its Cargo.lock, built by cargo (`--locked`, release:
/// fat LTO) into `out`, whose `release/` then holds `rust_alloc_system`, `rust_alloc_jemalloc`
/// (tikv-jemallocator) and `rust_alloc_mimalloc`. Cargo decides what is stale (a no-op build
/// takes a fraction of a second); tikv-jemalloc-sys's build script (jemalloc's configure and
/// make) is most of a clean build: 75 s of 85 s on 2 CPUs (2026-12-05).
fn build_rust_alloc(paths: &Paths, out: &Path) -> anyhow::Result<()> {
    let crate_dir = paths.root.join("fixtures/rust/alloc");
    cmd::run(
        cmd::cargo(paths)
            .current_dir(&crate_dir)
            .args(["build", "--release", "--locked", "--bins", "--target-dir"])
            .arg(out)
            // Frame pointers, so that `--unwind fp` stacks reach the fixture's functions; the
            // environment's own flags (a cargo that runs xtask may set them) do not apply.
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env("RUSTFLAGS", "-C force-frame-pointers=yes"),
    )
}

/// libc_fixture linked against each allocator Debian ships (xtask/tests/allocators.rs), each
/// `alloc/VARIANT/libc_fixture` in `out` (the name kept, so that comm and exe read alike):
/// (variant, compiler, flags after the source). `--no-as-needed`: the allocator's DT_NEEDED
/// is kept before libc's even where the linker drops unneeded libraries by default.
pub const ALLOCATOR_VARIANTS: &[(&str, &str, &[&str])] = &[
    ("jemalloc", "gcc", &["-Wl,--no-as-needed", "-ljemalloc"]),
    ("tcmalloc", "gcc", &["-Wl,--no-as-needed", "-ltcmalloc"]),
    (
        "tcmalloc_minimal",
        "gcc",
        &["-Wl,--no-as-needed", "-ltcmalloc_minimal"],
    ),
    ("mimalloc", "gcc", &["-Wl,--no-as-needed", "-lmimalloc"]),
    // musl has no pvalloc.
    ("musl", "musl-gcc", &["-DFX_NO_PVALLOC"]),
    ("musl-static", "musl-gcc", &["-static", "-DFX_NO_PVALLOC"]),
    ("glibc-static", "gcc", &["-static"]),
];

fn build_allocators(src_dir: &Path, out: &Path) -> anyhow::Result<()> {
    let src = src_dir.join("libc_fixture.c");
    let inputs = [src.clone(), src_dir.join("fixture.h")];
    for (variant, cc, flags) in ALLOCATOR_VARIANTS {
        let dir = out.join(variant);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let bin = dir.join("libc_fixture");
        if !is_stale(&inputs, &bin)? {
            continue;
        }
        cmd::run(
            Command::new(cc)
                .args(CFLAGS)
                .arg("-o")
                .arg(&bin)
                .arg(&src)
                .args(*flags),
        )?;
    }
    build_prefixed_jemalloc(src_dir, &out.join("jemalloc-prefixed"))?;
    build_cxx_new(src_dir, &out.join("cxx"))
}

/// fixtures/c/cxx_new.cpp (every C++ `operator new`/`delete` overload, known counts) built with
/// g++ against each allocator that defines the operators itself, and against plain glibc
/// (libstdc++'s operators over `malloc`): `DIR/VARIANT/cxx_new`. g++ puts libstdc++ after the
/// `-l` flags, so the allocator's operators come first in the resolution order.
pub const CXX_VARIANTS: &[(&str, &[&str])] = &[
    ("glibc", &[]),
    ("jemalloc", &["-Wl,--no-as-needed", "-ljemalloc"]),
    ("tcmalloc", &["-Wl,--no-as-needed", "-ltcmalloc"]),
    ("mimalloc", &["-Wl,--no-as-needed", "-lmimalloc"]),
];

fn build_cxx_new(src_dir: &Path, out: &Path) -> anyhow::Result<()> {
    let src = src_dir.join("cxx_new.cpp");
    for (variant, flags) in CXX_VARIANTS {
        let dir = out.join(variant);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let bin = dir.join("cxx_new");
        if !is_stale([&src], &bin)? {
            continue;
        }
        cmd::run(
            Command::new("g++")
                .args(CFLAGS)
                .arg("-o")
                .arg(&bin)
                .arg(&src)
                .args(*flags),
        )?;
    }
    Ok(())
}

/// Debian's static jemalloc (position-independent), for the `je_`-prefixed build.
const JEMALLOC_PIC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc_pic.a";

/// jemalloc's public API, renamed `je_NAME` for the prefixed build.
const JEMALLOC_API: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "free",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "malloc_usable_size",
    "mallocx",
    "rallocx",
    "xallocx",
    "sallocx",
    "dallocx",
    "sdallocx",
    "nallocx",
    "mallctl",
    "mallctlnametomib",
    "mallctlbymib",
    "malloc_stats_print",
    "malloc_conf",
    "malloc_message",
];

/// `DIR/libc_fixture` calling a `je_`-prefixed jemalloc linked into it (as Redis bundles
/// one): Debian ships no prefixed build, so its static library's API is renamed with
/// `objcopy --redefine-syms` and the fixture compiled with fixtures/c/je_prefix.h.
fn build_prefixed_jemalloc(src_dir: &Path, dir: &Path) -> anyhow::Result<()> {
    let src = src_dir.join("libc_fixture.c");
    let header = src_dir.join("je_prefix.h");
    let bin = dir.join("libc_fixture");
    if !is_stale(&[src.clone(), header.clone()], &bin)? {
        return Ok(());
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let syms = dir.join("je.syms");
    let renames: String = JEMALLOC_API
        .iter()
        .map(|s| format!("{s} je_{s}\n"))
        .collect();
    fs::write(&syms, renames).with_context(|| format!("writing {}", syms.display()))?;
    let lib = dir.join("libjemalloc_je.a");
    cmd::run(
        Command::new("objcopy")
            .arg(format!("--redefine-syms={}", syms.display()))
            .arg(JEMALLOC_PIC)
            .arg(&lib),
    )
    .with_context(|| format!("{JEMALLOC_PIC} (libjemalloc-dev: `./x setup` installs it)"))?;
    cmd::run(
        Command::new("gcc")
            .args(CFLAGS)
            .arg("-include")
            .arg(&header)
            .arg("-o")
            .arg(&bin)
            .arg(&src)
            .arg(&lib)
            .args(["-lpthread", "-lm", "-ldl"]),
    )
}

/// fixtures/c/unwind/: `unwind_fixture` and its `libunwfix.so` (found through an `$ORIGIN`
/// rpath), and `libunwdl.so` (opened by its `dlopen` mode, not linked) in `out/nofp` (-O2 -fomit-frame-pointer -DUW_NO_FP, as distributions build) and
/// `out/fp` (-O2 with frame pointers), with -g for names and lines (xtask/tests/unwind.rs).
fn build_unwind(src_dir: &Path, out: &Path) -> anyhow::Result<()> {
    let dir = src_dir.join("unwind");
    let exe_src = dir.join("unwind_fixture.c");
    let lib_src = dir.join("unwind_lib.c");
    let dl_src = dir.join("unwind_dl.c");
    let inputs = [
        exe_src.clone(),
        lib_src.clone(),
        dl_src.clone(),
        dir.join("unwind_lib.h"),
        src_dir.join("fixture.h"),
    ];
    for (variant, flags) in [
        ("nofp", &["-fomit-frame-pointer", "-DUW_NO_FP"][..]),
        ("fp", &["-fno-omit-frame-pointer"][..]),
    ] {
        let vdir = out.join(variant);
        let exe = vdir.join("unwind_fixture");
        if !is_stale(&inputs, &exe)? {
            continue;
        }
        fs::create_dir_all(&vdir).with_context(|| format!("creating {}", vdir.display()))?;
        let gcc = || {
            let mut c = Command::new("gcc");
            c.args(["-O2", "-g", "-Wall", "-Wextra"]).args(flags);
            c
        };
        cmd::run(
            gcc()
                .args(["-shared", "-fPIC", "-o"])
                .arg(vdir.join("libunwfix.so"))
                .arg(&lib_src),
        )?;
        cmd::run(
            gcc()
                .args(["-shared", "-fPIC", "-o"])
                .arg(vdir.join("libunwdl.so"))
                .arg(&dl_src),
        )?;
        cmd::run(
            gcc()
                .arg("-o")
                .arg(&exe)
                .arg(&exe_src)
                .arg("-L")
                .arg(&vdir)
                .args(["-lunwfix", "-Wl,-rpath,$ORIGIN"]),
        )?;
    }
    Ok(())
}

/// The C++ and Rust programs of the unwinding tests (xtask/tests/unwind.rs), in `out`, both
/// without frame pointers and with debug info for names and inlined frames:
/// fixtures/c/unwind/unwind_cxx.cpp -> `unwind_cxx` (g++ -O2 -fomit-frame-pointer -g) and
/// fixtures/rust/unwind_rust.rs -> `unwind_rust` (rustc, a release build: opt-level 2, no
/// frame pointers, debuginfo 1; linked by rustc's default linker, lld on x86_64).
fn build_unwind_cxx_rust(root: &Path, out: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cxx_src = root.join("fixtures/c/unwind/unwind_cxx.cpp");
    let cxx = out.join("unwind_cxx");
    if is_stale([&cxx_src], &cxx)? {
        cmd::run(
            Command::new("g++")
                .args([
                    "-O2",
                    "-g",
                    "-fomit-frame-pointer",
                    "-Wall",
                    "-Wextra",
                    "-o",
                ])
                .arg(&cxx)
                .arg(&cxx_src),
        )?;
    }
    let rust_src = root.join("fixtures/rust/unwind_rust.rs");
    let rust = out.join("unwind_rust");
    if is_stale([&rust_src], &rust)? {
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        cmd::run(
            Command::new(rustc)
                .args(["-C", "opt-level=2", "-C", "force-frame-pointers=no"])
                .args(["-C", "debuginfo=1", "-o"])
                .arg(&rust)
                .arg(&rust_src),
        )?;
    }
    Ok(())
}

/// split_fixture's variants, each `DIR/split_fixture` in `out` (xtask/tests/symbols.rs):
/// - `full`: -O2 -g with frame pointers, unstripped (the reference);
/// - `buildid`: `full` stripped, its debug file at `buildid/debug/.build-id/xx/yyyy.debug`
///   (`debug` is the test's `--debug-dir`);
/// - `debuglink`: `full` stripped with a `.gnu_debuglink` to `debuglink/.debug/split_fixture.debug`;
/// - `minidebug`: `full` stripped with a `.gnu_debugdata` section, made as Fedora's
///   find-debuginfo makes it (the function symbols not in `.dynsym`, in an xz'd ELF);
/// - `nofp`: -O2 -fomit-frame-pointer -DSPLIT_NO_FP (its fake-frame modes).
fn build_split(src_dir: &Path, out: &Path) -> anyhow::Result<()> {
    let src = src_dir.join("split_fixture.c");
    let inputs = [src.clone(), src_dir.join("fixture.h")];
    // Built last: every variant is there and newer than the sources.
    if !is_stale(&inputs, &out.join("minidebug/split_fixture"))? {
        return Ok(());
    }
    if out.exists() {
        fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    let dir = |name: &str| -> anyhow::Result<PathBuf> {
        let d = out.join(name);
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(d)
    };
    let gcc = |flags: &[&str], bin: &Path| {
        cmd::run(
            Command::new("gcc")
                .args(["-O2", "-Wall", "-Wextra"])
                .args(flags)
                .arg("-o")
                .arg(bin)
                .arg(&src),
        )
    };
    let bin = "split_fixture";
    let full = dir("full")?.join(bin);
    gcc(&["-g", "-fno-omit-frame-pointer"], &full)?;
    gcc(
        &["-g", "-fomit-frame-pointer", "-DSPLIT_NO_FP"],
        &dir("nofp")?.join(bin),
    )?;
    let strip = |to: &Path| {
        cmd::run(
            Command::new("strip")
                .arg("--strip-all")
                .arg("-o")
                .arg(to)
                .arg(&full),
        )
    };
    let keep_debug = |to: &Path| {
        cmd::run(
            Command::new("objcopy")
                .arg("--only-keep-debug")
                .arg(&full)
                .arg(to),
        )
    };

    // By build-id only: no debug link in the stripped binary.
    let id = build_id(&full)?;
    let by_id = dir("buildid/debug/.build-id")?.join(&id[..2]);
    fs::create_dir_all(&by_id)?;
    keep_debug(&by_id.join(format!("{}.debug", &id[2..])))?;
    strip(&dir("buildid")?.join(bin))?;

    // By debug link, in the binary's .debug/ directory (objcopy computes the CRC).
    let link_dir = dir("debuglink")?;
    let debug = dir("debuglink/.debug")?.join(format!("{bin}.debug"));
    keep_debug(&debug)?;
    let linked = link_dir.join(bin);
    strip(&linked)?;
    cmd::run(
        Command::new("objcopy")
            .arg(format!("--add-gnu-debuglink={}", debug.display()))
            .arg(&linked),
    )?;

    // MiniDebugInfo.
    let mini_dir = dir("minidebug")?;
    let work = dir("minidebug/work")?;
    let names = |dynamic: bool| -> anyhow::Result<Vec<String>> {
        let mut nm = Command::new("nm");
        if dynamic {
            nm.arg("-D");
        }
        nm.args(["--format=posix", "--defined-only"]).arg(&full);
        let text =
            cmd::stdout_if_ok(&mut nm).ok_or_else(|| anyhow!("`{}` failed", cmd::show(&nm)))?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (name, kind) = (f.next()?, f.next()?);
                (dynamic || matches!(kind, "T" | "t")).then(|| name.to_owned())
            })
            .collect())
    };
    let dynamic = names(true)?;
    let keep: Vec<String> = names(false)?
        .into_iter()
        .filter(|n| !dynamic.contains(n))
        .collect();
    let keep_file = work.join("keep_symbols");
    fs::write(&keep_file, keep.join("\n") + "\n")?;
    let debug = work.join("debug");
    keep_debug(&debug)?;
    let mini = work.join("mini_debuginfo");
    cmd::run(
        Command::new("objcopy")
            .args([
                "-S",
                "--remove-section",
                ".gdb_index",
                "--remove-section",
                ".comment",
            ])
            .arg(format!("--keep-symbols={}", keep_file.display()))
            .arg(&debug)
            .arg(&mini),
    )?;
    cmd::run(Command::new("xz").arg("-f").arg(&mini))?;
    let stripped = work.join(bin);
    strip(&stripped)?;
    cmd::run(
        Command::new("objcopy")
            .arg(format!(
                "--add-section=.gnu_debugdata={}.xz",
                mini.display()
            ))
            .arg(&stripped)
            .arg(mini_dir.join(bin)),
    )?;
    Ok(())
}

/// The build-id of `elf` in hex (readelf's `Build ID:` line).
fn build_id(elf: &Path) -> anyhow::Result<String> {
    let mut readelf = Command::new("readelf");
    readelf.arg("-n").arg(elf);
    let notes = cmd::stdout_if_ok(&mut readelf)
        .ok_or_else(|| anyhow!("`{}` failed", cmd::show(&readelf)))?;
    notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .map(str::to_owned)
        .filter(|id| id.len() > 2)
        .ok_or_else(|| anyhow!("no build-id in {}", elf.display()))
}

/// The files of `dir` with extension `ext`, sorted.
fn files_ending(dir: &Path, ext: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut sources: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    sources.sort();
    Ok(sources)
}

/// Whether `out` is missing or older than one of `inputs`.
fn is_stale<'a>(inputs: impl IntoIterator<Item = &'a PathBuf>, out: &Path) -> anyhow::Result<bool> {
    let modified = |p: &Path| -> anyhow::Result<SystemTime> {
        fs::metadata(p)
            .and_then(|m| m.modified())
            .with_context(|| format!("reading the mtime of {}", p.display()))
    };
    if !out.exists() {
        return Ok(true);
    }
    let built = modified(out)?;
    for input in inputs {
        if modified(input)? > built {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `fixtures/bench/NAME.c` -> `out_dir/OUT`, -O1 with `fp` (frame pointers or not): the
/// benchmarks' C programs, and the soak's idle processes.
pub fn build_bench_c(
    paths: &Paths,
    out_dir: &Path,
    name: &str,
    out: &str,
    fp: &str,
) -> anyhow::Result<PathBuf> {
    let src = paths.root.join(format!("fixtures/bench/{name}.c"));
    let out = out_dir.join(out);
    cmd::run(
        Command::new("gcc")
            .args(["-O1", "-g", fp, "-Wall", "-Wextra"])
            .args(["-pthread", "-o"])
            .arg(&out)
            .arg(&src),
    )?;
    Ok(out)
}
