//! Import cycles, formatting and clippy, warnings denied. The probe crate only builds for the
//! BPF target, so it gets its own clippy runs with `-Z build-std=core`: one per architecture
//! whose registers it reads.

use crate::{cmd, cycles, paths::Paths, setup};

pub fn all(paths: &Paths) -> anyhow::Result<()> {
    // First: it reads files only, so a cycle fails at once.
    cycles::check(&paths.root)?;
    // clippy runs agent/build.rs, which builds the probe with bpf-linker.
    setup::build_tools(paths)?;
    cmd::run(cmd::cargo(paths).args(["fmt", "--all", "--check"]))?;
    // The Rust allocator fixture is a crate of its own, outside the workspace.
    cmd::run(cmd::cargo(paths).args([
        "fmt",
        "--check",
        "--manifest-path",
        "fixtures/rust/alloc/Cargo.toml",
    ]))?;
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
    let probe_clippy = || {
        let mut c = cmd::cargo(paths);
        c.args([
            "clippy",
            "-p",
            "probe-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ]);
        c
    };
    // The host's registers (probe-ebpf/build.rs: `bpf_target_arch` of the host), then arm64's
    // (probe-ebpf/src/arch.rs) in a target dir of its own: switching the variable in one dir
    // would rebuild the probe's dependencies each time.
    cmd::run(probe_clippy().args(["--", "-D", "warnings"]))?;
    cmd::run(
        probe_clippy()
            .arg("--target-dir")
            .arg(paths.target().join("lint-aarch64"))
            .env("AYA_BPF_TARGET_ARCH", "aarch64")
            .args(["--", "-D", "warnings"]),
    )
}
