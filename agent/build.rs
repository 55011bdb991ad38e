use std::{fs, path::Path};

use anyhow::{Context as _, anyhow};
// Listed as a build-dependency only so that cargo rebuilds the agent when the probe changes.
use probe_ebpf as _;

/// Builds the probe crate for bpfel-unknown-none with the toolchain pinned in
/// rust-toolchain.toml, the one place that names it (`AYA_BUILD_SKIP=1` skips the probe build
/// for lint/unit-only builds).
fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("agent has no parent dir"))?;
    let pin = root.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", pin.display());
    let text = fs::read_to_string(&pin).with_context(|| format!("reading {}", pin.display()))?;
    let channel = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.split('"').nth(1))
        .next()
        .ok_or_else(|| anyhow!("no channel in {}", pin.display()))?;
    let probe_dir = root.join("probe-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "probe-ebpf",
            root_dir: probe_dir
                .to_str()
                .ok_or_else(|| anyhow!("non-UTF-8 path"))?,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(channel),
    )
}
