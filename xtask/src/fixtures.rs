//! Fixtures: fixtures/c/NAME.c -> target/fixtures/NAME, and fixtures/go/growth built by every
//! Go toolchain (xtask/src/go.rs) -> target/gofixtures/growth-<version>[-noswissmap][-stripped].

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
    Ok(out_dir)
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
