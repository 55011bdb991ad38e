//! This machine: whether we are root, and Debian packages (queried and installed with apt).

use std::{fs, process::Command};

use anyhow::bail;

use crate::cmd;

/// True when running with effective uid 0 (read from /proc to stay free of `unsafe`).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

pub fn require_root(what: &str) -> anyhow::Result<()> {
    if is_root() {
        Ok(())
    } else {
        bail!("need root to {what}: rerun as root (e.g. `sudo ./x …`)")
    }
}

pub fn dpkg_installed(package: &str) -> bool {
    cmd::stdout_if_ok(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", package]))
        .is_some_and(|s| s.starts_with("ii"))
}

/// `apt-get install PACKAGE`, with one `apt-get update` first if that fails (a fresh machine's
/// package index is usually empty or stale).
pub fn apt_install_package(package: &str) -> anyhow::Result<()> {
    require_root(&format!("apt-get install {package}"))?;
    let install = || {
        cmd::run(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", package])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install().is_err() {
        cmd::run(
            Command::new("apt-get")
                .args(["update", "-qq"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        install()?;
    }
    Ok(())
}
