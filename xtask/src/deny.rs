//! `cargo deny` with deny.toml: bans (duplicate versions), licenses and sources for the
//! workspace, and RustSec advisories for every Cargo.lock of the repository (the workspace's and
//! the Rust allocator fixture's). The advisory database lives on github.com, which CI machines do
//! not reach: when fetching it fails, advisories are checked against the filtered snapshot
//! committed in deny/advisory-db/ (snapshot.rs), and the summary line says so with its date.

mod snapshot;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{cmd, paths::Paths};

/// How long fetching the advisory database may take (an unreachable host otherwise hangs for
/// minutes in TCP connects).
const FETCH_SECONDS: &str = "90";

/// The graph cargo-deny checks: deny.toml's `[graph] targets` (crates of other targets are not
/// downloaded, and `--offline` needs them on disk).
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// `./x deny`: where the advisories come from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A fresh fetch of the RustSec database, the vendored snapshot if fetching fails.
    FetchOrVendored,
    /// The vendored snapshot only (what a machine without github.com gets).
    Vendored,
}

/// `./x deny --refresh-advisories DB`: regenerates deny/advisory-db/ from an advisory-db checkout.
pub fn refresh(paths: &Paths, checkout: &Path) -> anyhow::Result<()> {
    let locks = lock_files(paths)?;
    let written = snapshot::refresh(checkout, &paths.root.join(snapshot::DIR), &locks)?;
    println!(
        "{}: {} advisories of {} crates (of {} in {}), RustSec advisory-db {} of {}",
        snapshot::DIR,
        written.advisories,
        written.crates_with_advisories,
        written.snapshot.crates.len(),
        show_locks(paths, &locks),
        written.snapshot.commit,
        written.snapshot.date,
    );
    Ok(())
}

/// Runs the checks; the line that says what was checked (for the test summary).
pub fn check(paths: &Paths, source: Source) -> anyhow::Result<String> {
    cmd::run(deny(paths).args(["check", "bans", "licenses", "sources"]))?;
    let locks = lock_files(paths)?;
    // `cargo deny --offline` reads every crate's manifest from disk: download what the lint
    // step (the workspace's clippy) has not, e.g. the allocator fixture's dependencies.
    for lock in &locks {
        cmd::run(
            cmd::cargo(paths)
                .args(["fetch", "--locked", "--target", TARGET, "--manifest-path"])
                .arg(manifest_of(lock)),
        )?;
    }
    let fetched = match source {
        Source::FetchOrVendored => fetch_db(paths),
        Source::Vendored => Err("not tried (`--offline`)".to_string()),
    };
    let (config, against) = match fetched {
        Ok(()) => (
            paths.root.join("deny.toml"),
            "a fresh copy of the RustSec database".to_string(),
        ),
        Err(why) => {
            let vendored = snapshot::materialize(
                &paths.root.join(snapshot::DIR),
                &paths.root.join("deny.toml"),
                &paths.target().join("deny"),
                &locks,
            )?;
            let s = &vendored.snapshot;
            (
                vendored.config,
                format!(
                    "the vendored RustSec snapshot of {} ({}, {} days old, {}); fetching failed: \
                     {why}",
                    s.date,
                    &s.commit[..7],
                    s.age_days(),
                    snapshot::DIR
                ),
            )
        }
    };
    for lock in &locks {
        cmd::run(&mut advisories(paths, &manifest_of(lock), &config))
            .with_context(|| format!("RustSec advisories of {}", lock.display()))?;
    }
    Ok(format!(
        "cargo deny: bans, licenses and sources passed; advisories of {} checked against \
         {against}",
        show_locks(paths, &locks)
    ))
}

/// `cargo deny --offline … check advisories` for one manifest, with `config` (deny.toml or its
/// copy pointed at the vendored snapshot). Run in the repository root.
fn advisories(paths: &Paths, manifest: &Path, config: &Path) -> Command {
    let mut c = deny(paths);
    c.arg("--offline")
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--config")
        .arg(config)
        .args(["check", "advisories"]);
    c
}

fn deny(paths: &Paths) -> Command {
    let mut c = cmd::cargo(paths);
    // cargo finds `cargo-deny` on PATH; ./x has put the tool cache there, a unit test has not.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let with_tools = std::env::join_paths(
        std::iter::once(paths.tools_bin()).chain(std::env::split_paths(&path)),
    );
    if let Ok(with_tools) = with_tools {
        c.env("PATH", with_tools);
    }
    c.args(["deny", "--all-features"]);
    c
}

/// `cargo deny fetch db` into cargo-deny's default place (~/.cargo/advisory-dbs); why it failed,
/// in cargo-deny's or git's words (the last line of its error output).
fn fetch_db(paths: &Paths) -> Result<(), String> {
    let mut fetch = Command::new("timeout");
    fetch
        .arg(FETCH_SECONDS)
        .arg("rustup")
        .args(["run", &paths.channel, "cargo", "deny", "fetch", "db"])
        .current_dir(&paths.root);
    eprintln!("+ {}", cmd::show(&fetch));
    let out = fetch
        .output()
        .map_err(|e| format!("starting `{}`: {e}", cmd::show(&fetch)))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stderr}");
    if out.status.success() {
        return Ok(());
    }
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
    Err(match (out.status.code(), last) {
        (Some(124), _) => format!("no answer within {FETCH_SECONDS} s"),
        (_, Some(line)) => line.trim().to_string(),
        (_, None) => format!("`cargo deny fetch db` failed ({})", out.status),
    })
}

/// The repository's committed Cargo.lock files (`git ls-files`: a clean clone's set, not
/// scratch projects under target/), the workspace's first.
fn lock_files(paths: &Paths) -> anyhow::Result<Vec<PathBuf>> {
    let mut git = Command::new("git");
    git.args(["ls-files", "-z", "--", "Cargo.lock", "**/Cargo.lock"])
        .current_dir(&paths.root);
    let listed =
        cmd::stdout_if_ok(&mut git).with_context(|| format!("`{}` failed", cmd::show(&git)))?;
    let mut locks: Vec<PathBuf> = listed
        .split('\0')
        .filter(|l| !l.is_empty())
        .map(|l| paths.root.join(l))
        .collect();
    locks.sort_by_key(|l| (l.parent() != Some(paths.root.as_path()), l.clone()));
    anyhow::ensure!(
        locks.first().and_then(|l| l.parent()) == Some(paths.root.as_path()),
        "no Cargo.lock at the repository root ({})",
        paths.root.display()
    );
    Ok(locks)
}

fn manifest_of(lock: &Path) -> PathBuf {
    lock.with_file_name("Cargo.toml")
}

/// `Cargo.lock, fixtures/rust/alloc/Cargo.lock`.
fn show_locks(paths: &Paths, locks: &[PathBuf]) -> String {
    locks
        .iter()
        .map(|l| {
            l.strip_prefix(&paths.root)
                .unwrap_or(l)
                .as_os_str()
                .to_string_lossy()
                .into_owned()
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// A directory under the system's temporary directory, removed when dropped.
    pub struct Scratch(pub PathBuf);

    impl Scratch {
        pub fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("allocwatch-xtask-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Whether `s` names `id` as a word (RUSTSEC-2022-0013 is not RUSTSEC-2022-00130).
    fn names_advisory(s: &str, id: &str) -> bool {
        s.match_indices(id).any(|(at, _)| {
            !s[at + id.len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
        })
    }

    /// A crate depending on `krate` `=version`, which cargo takes from a directory source that
    /// replaces crates.io (as `cargo vendor` sets up): nothing is downloaded, and Cargo.lock and
    /// `cargo metadata` still say the package comes from crates.io, which is what RustSec
    /// advisories are about. The vendored crate is an empty library under that name.
    fn project_depending_on(dir: &Path, krate: &str, version: &str) {
        let files = [
            (
                "Cargo.toml".to_string(),
                format!(
                    "[package]\nname = \"advisory-probe\"\nversion = \"0.0.0\"\nedition = \
                     \"2021\"\npublish = false\n\n[dependencies]\n{krate} = \"={version}\"\n\n\
                     [workspace]\n"
                ),
            ),
            ("src/lib.rs".to_string(), String::new()),
            (
                ".cargo/config.toml".to_string(),
                "[source.crates-io]\nreplace-with = \"local\"\n\n[source.local]\ndirectory = \
                 \"vendor\"\n"
                    .to_string(),
            ),
            (
                format!("vendor/{krate}/Cargo.toml"),
                format!(
                    "[package]\nname = \"{krate}\"\nversion = \"{version}\"\nedition = \"2018\"\n"
                ),
            ),
            (format!("vendor/{krate}/src/lib.rs"), String::new()),
            (
                format!("vendor/{krate}/.cargo-checksum.json"),
                "{\"files\":{}}".to_string(),
            ),
            // The advisories check alone: the empty stand-in has no license, and whether the
            // real version was yanked is crates.io's index business, not this test's.
            (
                "deny.toml".to_string(),
                "[advisories]\nversion = 2\ndisable-yank-checking = true\n".to_string(),
            ),
        ];
        for (path, contents) in files {
            let path = dir.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, contents).unwrap();
        }
    }

    /// The check can fail: regex 1.5.4 has RUSTSEC-2022-0013 (a regex that takes very long to
    /// parse), fixed in 1.5.5. Against the committed snapshot, the first fails and names it, the
    /// second passes: the snapshot is complete enough to open, holds the advisory, and cargo-deny
    /// finds it where the check of our lock files looks (the same materialized database, the same
    /// command).
    #[test]
    fn vendored_snapshot_fails_a_lock_with_a_vulnerable_version() {
        const ADVISORY: &str = "RUSTSEC-2022-0013";
        let paths = Paths::locate().unwrap();
        let snapshot = paths.root.join(snapshot::DIR);
        assert!(
            snapshot
                .join("crates/regex")
                .join(format!("{ADVISORY}.md"))
                .is_file(),
            "{} has no {ADVISORY}: regex is no longer in our lock files? Pick another crate",
            snapshot.display()
        );
        let scratch = Scratch::new("deny-advisories");
        for (version, vulnerable) in [("1.5.4", true), ("1.5.5", false)] {
            let project = scratch.0.join(version);
            project_depending_on(&project, "regex", version);
            let mut lock = cmd::cargo(&paths);
            lock.args(["generate-lockfile", "--offline"])
                .current_dir(&project);
            cmd::run(&mut lock).unwrap();
            let vendored = snapshot::materialize(
                &snapshot,
                &project.join("deny.toml"),
                &project.join("target/deny"),
                &[project.join("Cargo.lock")],
            )
            .unwrap();
            let mut deny = advisories(&paths, &project.join("Cargo.toml"), &vendored.config);
            // In the project, whose .cargo/config.toml replaces crates.io.
            deny.current_dir(&project);
            let out = deny
                .output()
                .unwrap_or_else(|e| panic!("`{}`: {e}", cmd::show(&deny)));
            // The diagnostics go to stderr, the `advisories FAILED` line to stdout.
            let output = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
            assert!(
                !output.contains("no such command"),
                "cargo-deny is not installed (`./x setup`): {output}"
            );
            if vulnerable {
                assert!(
                    !out.status.success(),
                    "regex {version} passed the advisories check: {output}"
                );
                assert!(
                    names_advisory(&output, ADVISORY) && output.contains("advisories FAILED"),
                    "regex {version}: {ADVISORY} not named: {output}"
                );
            } else {
                assert!(
                    out.status.success() && !names_advisory(&output, ADVISORY),
                    "regex {version}, patched, failed the advisories check: {output}"
                );
            }
        }
    }

    #[test]
    fn names_advisory_needs_the_whole_id() {
        assert!(names_advisory(
            "error[vulnerability]: RUSTSEC-2022-0013\n",
            "RUSTSEC-2022-0013"
        ));
        assert!(!names_advisory("RUSTSEC-2022-00130", "RUSTSEC-2022-0013"));
        assert!(!names_advisory("advisories ok", "RUSTSEC-2022-0013"));
    }

    /// The repository's lock files: the workspace's first, the fixture's own too.
    #[test]
    fn every_committed_lock_file_is_checked() {
        let paths = Paths::locate().unwrap();
        let locks = lock_files(&paths).unwrap();
        assert_eq!(locks[0], paths.root.join("Cargo.lock"));
        assert!(
            locks.contains(&paths.root.join("fixtures/rust/alloc/Cargo.lock")),
            "{locks:?}"
        );
        assert!(
            locks
                .iter()
                .all(|l| l.is_file() && manifest_of(l).is_file()),
            "{locks:?}"
        );
    }
}
