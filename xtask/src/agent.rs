//! Building and running the allocwatch binary.

use std::{ffi::OsString, os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{cmd, paths::Paths, setup};

/// The agent's allocator setting in the image and the DaemonSet (deploy/Dockerfile): the bench
/// and the soak run the agent as deployed.
pub const DEPLOYED_ALLOCATOR: (&str, &str) = ("MIMALLOC_ARENA_EAGER_COMMIT", "0");

/// The architectures allocwatch builds for (`./x build --target`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    #[value(name = "x86_64")]
    X86_64,
    /// Cross-built on x86-64 with Debian's `gcc-aarch64-linux-gnu` as the linker.
    #[value(name = "aarch64")]
    Aarch64,
}

impl Arch {
    /// The Rust target triple of a cross build; `None` for the host's own (x86-64).
    pub fn cross_triple(self) -> Option<&'static str> {
        match self {
            Arch::X86_64 => None,
            Arch::Aarch64 => Some(setup::AARCH64_TRIPLE),
        }
    }
}

/// `cargo build --release -p allocwatch` (agent/build.rs builds the BPF probe through
/// aya-build, which needs bpf-linker); returns the binary's path.
pub fn build(paths: &Paths) -> anyhow::Result<PathBuf> {
    build_for(paths, Arch::X86_64)
}

/// [`build`] for `arch`. A cross build gets `--target TRIPLE`: cargo then tells aya-build the
/// target's arch (`CARGO_CFG_TARGET_ARCH`), which builds the probe with
/// `--cfg bpf_target_arch="aarch64"`, so the binary embeds the probe for its own registers.
/// The linker and the C compiler of the C dependencies (ring, mimalloc, xz) are Debian's
/// cross gcc.
pub fn build_for(paths: &Paths, arch: Arch) -> anyhow::Result<PathBuf> {
    setup::build_tools(paths)?;
    let mut cargo = cmd::cargo(paths);
    cargo.args(["build", "--release", "-p", "allocwatch"]);
    let bin = match arch.cross_triple() {
        None => paths.allocwatch_bin(),
        Some(triple) => {
            setup::cross_tools(paths, triple)?;
            let env = triple.replace('-', "_");
            cargo
                .args(["--target", triple])
                .env(
                    format!("CARGO_TARGET_{}_LINKER", env.to_uppercase()),
                    "aarch64-linux-gnu-gcc",
                )
                .env(format!("CC_{env}"), "aarch64-linux-gnu-gcc")
                .env(format!("AR_{env}"), "aarch64-linux-gnu-ar");
            paths.target().join(triple).join("release/allocwatch")
        }
    };
    cmd::run(&mut cargo)?;
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
