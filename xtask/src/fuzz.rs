//! Fuzzing the parsers of outside data (fuzz/, cargo-fuzz and libFuzzer on the pinned
//! nightly): `./x test` runs every target for a few seconds, `./x fuzz` as long as asked.
//! Each run starts from the committed seeds (fuzz/corpus/TARGET) and what earlier runs found
//! (target/fuzz/corpus/TARGET, where libFuzzer writes); a crash is saved under
//! target/fuzz/artifacts/TARGET/ and fails the run.

use std::{fs, process::Command};

use anyhow::{Context as _, bail};

use crate::{cmd, paths::Paths};

/// Seconds each target runs in `./x test`.
pub const SHORT_SECONDS: u32 = 5;

/// What a fuzzing run did.
pub enum Outcome {
    Passed {
        targets: usize,
        seconds: u32,
    },
    /// cargo-fuzz cannot run here; the reason.
    Skipped(String),
}

/// Builds the targets and runs each of `only` (all when empty) for `seconds`.
pub fn run(paths: &Paths, seconds: u32, only: &[String]) -> anyhow::Result<Outcome> {
    if cmd::stdout_if_ok(cmd::cargo(paths).args(["fuzz", "--version"])).is_none() {
        return Ok(Outcome::Skipped(format!(
            "cargo-fuzz does not run (`cargo fuzz --version` failed; `./x setup` installs \
             cargo-fuzz {})",
            crate::setup::CARGO_FUZZ_VERSION
        )));
    }
    let listed = cmd::stdout_if_ok(cmd::cargo(paths).args(["fuzz", "list"]))
        .context("`cargo fuzz list` failed")?;
    let all: Vec<String> = listed.split_whitespace().map(str::to_owned).collect();
    let targets: Vec<String> = if only.is_empty() {
        all
    } else {
        for t in only {
            if !all.contains(t) {
                bail!("no fuzz target {t:?} (targets: {})", all.join(", "));
            }
        }
        only.to_vec()
    };
    // One build for every target; a build error is a failure (it is this repository's code).
    cmd::run(&mut fuzz(paths, "build"))?;
    let mut failed = Vec::new();
    for t in &targets {
        let corpus = paths.target().join("fuzz/corpus").join(t);
        let artifacts = paths.target().join("fuzz/artifacts").join(t);
        for dir in [&corpus, &artifacts] {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut c = fuzz(paths, "run");
        c.arg(t)
            // New inputs go to the first directory: the committed seeds stay as they are.
            .arg(&corpus)
            .arg(paths.root.join("fuzz/corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()));
        if let Err(e) = cmd::run(&mut c) {
            failed.push(format!("{t}: {e:#} (inputs in {})", artifacts.display()));
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzzing found crashes: {}; reproduce with `cargo fuzz run TARGET FILE`",
            failed.join("; ")
        );
    }
    Ok(Outcome::Passed {
        targets: targets.len(),
        seconds,
    })
}

/// `cargo fuzz SUB` with cargo-fuzz's defaults (optimized, debug assertions and overflow
/// checks on, AddressSanitizer), the same for build and run so that run does not rebuild.
fn fuzz(paths: &Paths, sub: &str) -> Command {
    let mut c = cmd::cargo(paths);
    c.args(["fuzz", sub]);
    c
}
