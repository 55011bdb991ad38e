//! `cargo deny` with deny.toml: bans (duplicate versions), licenses and sources always fail the
//! suite when they fail; advisories need the RustSec database from github.com, which a CI
//! machine may not reach: then an earlier copy is used, or the check is skipped and says so.

use std::{path::PathBuf, process::Command};

use crate::{cmd, paths::Paths};

/// How long fetching the advisory database may take (an unreachable host otherwise hangs for
/// minutes in TCP connects).
const FETCH_SECONDS: &str = "90";

/// Runs the checks; the line that says what was checked (for the test summary).
pub fn check(paths: &Paths) -> anyhow::Result<String> {
    cmd::run(deny(paths).args(["check", "bans", "licenses", "sources"]))?;
    let fetched = cmd::run(
        Command::new("timeout")
            .arg(FETCH_SECONDS)
            .arg("rustup")
            .args(["run", &paths.channel, "cargo", "deny", "fetch", "db"])
            .current_dir(&paths.root),
    );
    let advisories = match fetched {
        Ok(()) => {
            cmd::run(deny(paths).args(["--offline", "check", "advisories"]))?;
            "advisories checked against a fresh copy of the RustSec database".to_string()
        }
        Err(e) if advisory_db().is_some_and(|d| has_database(&d)) => {
            cmd::run(deny(paths).args(["--offline", "check", "advisories"]))?;
            format!(
                "advisories checked against the copy of an earlier fetch in {} (fetching failed: \
                 {e:#})",
                advisory_db().unwrap_or_default().display()
            )
        }
        Err(e) => format!(
            "advisories NOT checked: the RustSec database (github.com/rustsec/advisory-db) \
             could not be fetched ({e:#}) and there is no earlier copy"
        ),
    };
    Ok(format!(
        "cargo deny: bans, licenses and sources passed; {advisories}"
    ))
}

fn deny(paths: &Paths) -> Command {
    let mut c = cmd::cargo(paths);
    c.args(["deny", "--all-features"]);
    c
}

/// Whether `dir` holds a fetched database (a failed clone leaves only a lock file there).
fn has_database(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir)
        .is_ok_and(|entries| entries.flatten().any(|e| e.path().join("crates").is_dir()))
}

/// Where cargo-deny keeps advisory databases by default (deny.toml does not move it).
fn advisory_db() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("advisory-dbs"))
}
