//! Where things live: the repository, its pinned toolchain, and the per-user tool cache.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};

/// Name of the Go toolchain manifest in `$cache/go` (written by `go::ensure_toolchains`; the
/// agent's tests and xtask/tests/go.rs read it).
pub const GO_MANIFEST: &str = "toolchains.tsv";

pub struct Paths {
    /// Repository root (the workspace).
    pub root: PathBuf,
    /// The toolchain pinned in rust-toolchain.toml, e.g. `nightly-2026-10-29`.
    pub channel: String,
    /// `~/.cache/allocwatch`: bpf-linker and the LLVM it links against, the Go toolchains.
    /// Outside `target/` so `cargo clean` keeps it (bpf-linker's rpath points into it).
    pub cache: PathBuf,
}

impl Paths {
    /// Locates the repository from this crate's manifest and puts the tool cache on PATH.
    pub fn discover() -> anyhow::Result<Self> {
        let paths = Self::locate()?;
        paths.put_tools_on_path()?;
        Ok(paths)
    }

    /// The paths alone, PATH untouched (for unit tests: setting the environment of a process
    /// whose tests run in threads is a data race).
    pub fn locate() -> anyhow::Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .ok_or_else(|| anyhow!("xtask has no parent directory"))?
            .to_path_buf();
        let channel = pinned_channel(&root.join("rust-toolchain.toml"))?;
        let home = env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set"))?;
        let cache = PathBuf::from(home).join(".cache/allocwatch");
        Ok(Self {
            root,
            channel,
            cache,
        })
    }

    pub fn tools_bin(&self) -> PathBuf {
        self.cache.join("tools/bin")
    }

    pub fn target(&self) -> PathBuf {
        self.root.join("target")
    }

    pub fn allocwatch_bin(&self) -> PathBuf {
        self.target().join("release/allocwatch")
    }

    pub fn fixtures_out(&self) -> PathBuf {
        self.target().join("fixtures")
    }

    /// The Go fixture builds (the directory agent/src/gort/tests.rs builds into too).
    pub fn go_fixtures_out(&self) -> PathBuf {
        self.target().join("gofixtures")
    }

    /// Written by `go::ensure_toolchains`: `version<TAB>goroot<TAB>go` per line.
    pub fn go_toolchains_manifest(&self) -> PathBuf {
        self.cache.join("go").join(GO_MANIFEST)
    }

    /// agent/build.rs (aya-build) and probe-ebpf/build.rs look bpf-linker up on PATH.
    fn put_tools_on_path(&self) -> anyhow::Result<()> {
        let tools = self.tools_bin();
        let old = env::var_os("PATH").unwrap_or_default();
        if env::split_paths(&old).any(|p| p == tools) {
            return Ok(());
        }
        let new = env::join_paths(std::iter::once(tools).chain(env::split_paths(&old)))
            .context("joining PATH")?;
        // SAFETY: called from main before any thread is spawned.
        unsafe { env::set_var("PATH", new) };
        Ok(())
    }
}

/// Reads `channel = "…"` from rust-toolchain.toml (the one place that names the toolchain).
fn pinned_channel(file: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.split('"').nth(1))
        .map(str::to_owned)
        .next()
        .ok_or_else(|| anyhow!("no channel in {}", file.display()))
}
