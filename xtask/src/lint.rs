//! Import cycles, formatting and clippy, warnings denied. The probe crate only builds for the
//! BPF target, so it gets its own clippy run with `-Z build-std=core`.

use crate::{cmd, cycles, paths::Paths, setup};

pub fn all(paths: &Paths) -> anyhow::Result<()> {
    // First: it reads files only, so a cycle fails at once.
    cycles::check(&paths.root)?;
    // clippy runs agent/build.rs, which builds the probe with bpf-linker.
    setup::build_tools(paths)?;
    cmd::run(cmd::cargo(paths).args(["fmt", "--all", "--check"]))?;
    cmd::run(cmd::cargo(paths).args([
        "clippy",
        "--workspace",
        "--exclude",
        "probe-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    cmd::run(cmd::cargo(paths).args([
        "clippy",
        "-p",
        "probe-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))
}
