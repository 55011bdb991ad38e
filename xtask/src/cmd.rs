//! Running child processes: echo the command, fail with its name when it fails.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Renders a command the way a shell user would type it (for logs and errors).
pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with inherited stdio; an error if it cannot start or exits non-zero.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly; its stdout if it exits zero, `None` if it fails or cannot start.
pub fn stdout_if_ok(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo` from the pinned toolchain, run in the repository root.
pub fn cargo(paths: &crate::paths::Paths) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", &paths.channel, "cargo"])
        .current_dir(&paths.root);
    cmd
}
