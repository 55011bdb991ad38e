//! Building and running the allocwatch binary.

use std::{ffi::OsString, os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{cmd, paths::Paths, setup};

/// The agent's allocator setting in the image and the DaemonSet (deploy/Dockerfile): the bench
/// and the soak run the agent as deployed.
pub const DEPLOYED_ALLOCATOR: (&str, &str) = ("MIMALLOC_ARENA_EAGER_COMMIT", "0");

/// `cargo build --release -p allocwatch` (agent/build.rs builds the BPF probe through
/// aya-build, which needs bpf-linker); returns the binary's path.
pub fn build(paths: &Paths) -> anyhow::Result<PathBuf> {
    setup::build_tools(paths)?;
    cmd::run(cmd::cargo(paths).args(["build", "--release", "-p", "allocwatch"]))?;
    let bin = paths.allocwatch_bin();
    if !bin.is_file() {
        bail!("cargo build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// Builds, then replaces this process with allocwatch (in the caller's working directory, so
/// relative paths in ARGS mean what the caller meant).
pub fn run(paths: &Paths, args: &[OsString]) -> anyhow::Result<()> {
    let asks_help = args.iter().any(|a| {
        ["-h", "--help", "-V", "--version", "help"].contains(&a.to_string_lossy().as_ref())
    });
    if !crate::host::is_root() && !asks_help {
        bail!(
            "allocwatch loads eBPF programs and attaches uprobes, which needs root \
             (CAP_BPF + CAP_PERFMON): rerun as root, e.g. `sudo ./x run -- top -- ./server`"
        );
    }
    let bin = build(paths)?;
    if crate::host::is_root() {
        setup::tracefs()?;
    }
    let err = Command::new(&bin).args(args).exec();
    Err(err).with_context(|| format!("executing {}", bin.display()))
}
