//! The vendored RustSec snapshot, deny/advisory-db/: the advisories (`crates/NAME/*.md`) of every
//! crate named in the repository's Cargo.lock files, taken from one commit of
//! github.com/rustsec/advisory-db, whose id and date SNAPSHOT.toml records. `refresh` writes it
//! from a checkout; `materialize` turns it into what cargo-deny opens offline: a git repository in
//! `<db-path>/advisory-db-<hash>` (cargo-deny reads the fetch time from it) and a copy of
//! deny.toml whose `db-path` points there.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail, ensure};

/// The snapshot, relative to the repository root.
pub const DIR: &str = "deny/advisory-db";

/// Its commit id, date and the crates it was filtered for.
const META: &str = "SNAPSHOT.toml";

/// Where cargo-deny 0.20 looks for the default database (`https://github.com/RustSec/advisory-db`)
/// under `db-path`: the URL's last segment and the XXH64 of the lowercased URL (its
/// `url_to_db_path`). A cargo-deny that names it otherwise fails the unit test in deny.rs.
const DB_DIR_NAME: &str = "advisory-db-3157b0e258782691";

/// cargo-deny's `maximum-db-staleness` for the vendored snapshot. Its default (90 days) would
/// fail a clean clone's CI some months after a refresh with nothing changed in the repository;
/// the committed snapshot is what it is, and the summary line prints its age instead. Ten years:
/// the check stays on (a materialized repository whose date is lost fails it) without a calendar
/// deadline.
const MAX_STALENESS: &str = "P3650D";

pub struct Snapshot {
    /// The advisory-db commit, 40 hex digits.
    pub commit: String,
    /// Its committer date, `2026-08-21`.
    pub date: String,
    /// The same in seconds since the epoch (the materialized commit's date).
    pub commit_time: u64,
    /// Every crate of the lock files when it was filtered, with or without advisories.
    pub crates: BTreeSet<String>,
}

impl Snapshot {
    fn read(dir: &Path) -> anyhow::Result<Self> {
        let file = dir.join(META);
        let text =
            fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let table: toml::Table = text
            .parse()
            .with_context(|| format!("parsing {}", file.display()))?;
        let string = |key: &str| {
            table
                .get(key)
                .and_then(toml::Value::as_str)
                .map(str::to_owned)
                .with_context(|| format!("{}: no string `{key}`", file.display()))
        };
        let commit_time = table
            .get("commit-time")
            .and_then(toml::Value::as_integer)
            .and_then(|t| u64::try_from(t).ok())
            .with_context(|| format!("{}: no `commit-time` (seconds)", file.display()))?;
        let crates = table
            .get("crates")
            .and_then(toml::Value::as_array)
            .with_context(|| format!("{}: no `crates` list", file.display()))?
            .iter()
            .map(|c| c.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .with_context(|| format!("{}: `crates` is not a list of names", file.display()))?;
        Ok(Self {
            commit: string("commit")?,
            date: string("date")?,
            commit_time,
            crates,
        })
    }

    fn render(&self) -> String {
        let mut s = format!(
            "# The RustSec advisory database (https://github.com/rustsec/advisory-db) at one \
             commit,\n# filtered to the crates of this repository's Cargo.lock files (the list \
             below). Written by\n# `./x deny --refresh-advisories PATH_TO_ADVISORY_DB_CHECKOUT` \
             (xtask/src/deny/snapshot.rs);\n# not edited by hand. CC0-1.0 (LICENSE.txt).\n\
             commit = \"{}\"\ndate = \"{}\"\ncommit-time = {}\ncrates = [\n",
            self.commit, self.date, self.commit_time
        );
        for c in &self.crates {
            s.push_str(&format!("    \"{c}\",\n"));
        }
        s.push_str("]\n");
        s
    }

    /// Whole days since the snapshot's commit.
    pub fn age_days(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        now.saturating_sub(self.commit_time) / 86_400
    }
}

pub struct Refreshed {
    pub snapshot: Snapshot,
    /// Advisory files written.
    pub advisories: usize,
    /// Crates that have at least one.
    pub crates_with_advisories: usize,
}

/// Writes `dir` from the HEAD commit of `checkout` (a clone of the advisory database, bare or
/// not: what is committed, not the work tree), keeping the advisories of the crates in `locks`.
pub fn refresh(checkout: &Path, dir: &Path, locks: &[PathBuf]) -> anyhow::Result<Refreshed> {
    let crates = registry_crates(locks)?;
    let commit = text(git(checkout, &["rev-parse", "--verify", "HEAD^{commit}"])?)?;
    let when = text(git(checkout, &["show", "-s", "--format=%cs %ct", "HEAD"])?)?;
    let (date, commit_time) = when
        .split_once(' ')
        .and_then(|(d, t)| Some((d.to_owned(), t.parse().ok()?)))
        .with_context(|| format!("unexpected commit date `{when}`"))?;
    let listed = git(
        checkout,
        &[
            "ls-tree",
            "-r",
            "-z",
            "--name-only",
            "HEAD",
            "--",
            "crates/",
        ],
    )?;
    let listed = String::from_utf8(listed).context("non-UTF-8 path in the advisory database")?;
    let all: Vec<&str> = listed.split('\0').filter(|p| !p.is_empty()).collect();
    ensure!(
        !all.is_empty(),
        "{} has no crates/ directory at HEAD: not a RustSec advisory-db checkout",
        checkout.display()
    );
    let ours: Vec<&str> = all
        .iter()
        .copied()
        .filter(|p| {
            p.ends_with(".md")
                && p.split('/')
                    .nth(1)
                    .is_some_and(|name| crates.contains(name))
        })
        .collect();

    // Written next to `dir` and renamed over it: a failed refresh leaves the old one whole.
    let staging = dir.with_extension("new");
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    for path in &ours {
        write(
            &staging.join(path),
            &git(checkout, &["cat-file", "blob", &format!("HEAD:{path}")])?,
        )?;
    }
    write(
        &staging.join("LICENSE.txt"),
        &git(checkout, &["cat-file", "blob", "HEAD:LICENSE.txt"])?,
    )?;
    let snapshot = Snapshot {
        commit,
        date,
        commit_time,
        crates,
    };
    write(&staging.join(META), snapshot.render().as_bytes())?;
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::rename(&staging, dir).with_context(|| format!("renaming {}", staging.display()))?;
    let with_advisories: BTreeSet<&str> = ours.iter().filter_map(|p| p.split('/').nth(1)).collect();
    Ok(Refreshed {
        snapshot,
        advisories: ours.len(),
        crates_with_advisories: with_advisories.len(),
    })
}

pub struct Materialized {
    /// `base_config` with `db-path` pointing at the snapshot.
    pub config: PathBuf,
    pub snapshot: Snapshot,
}

/// Makes the snapshot in `dir` openable by `cargo deny --offline` under `out` (emptied first),
/// after checking that it was filtered for every crate of `locks`.
pub fn materialize(
    dir: &Path,
    base_config: &Path,
    out: &Path,
    locks: &[PathBuf],
) -> anyhow::Result<Materialized> {
    let snapshot = Snapshot::read(dir)?;
    let missing: Vec<String> = registry_crates(locks)?
        .difference(&snapshot.crates)
        .cloned()
        .collect();
    ensure!(
        missing.is_empty(),
        "{} was filtered before {} entered the lock files, so it has none of their \
         advisories: refresh it with `./x deny --refresh-advisories PATH` (PATH: a clone of \
         https://github.com/rustsec/advisory-db)",
        dir.display(),
        missing.join(", ")
    );

    if out.exists() {
        fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    let dbs = out.join("advisory-dbs");
    let db = dbs.join(DB_DIR_NAME);
    copy_tree(&dir.join("crates"), &db.join("crates"))?;
    fs::copy(dir.join(META), db.join(META))
        .with_context(|| format!("copying {}", dir.join(META).display()))?;
    // A commit dated as the snapshot's: cargo-deny takes the later of the HEAD commit's date and
    // .git/HEAD's mtime as the time of the last fetch, so both say when the snapshot was taken.
    let date = format!("@{} +0000", snapshot.commit_time);
    let message = format!(
        "RustSec advisory-db {} of {}, filtered (allocwatch {DIR})",
        snapshot.commit, snapshot.date
    );
    git(&db, &["-c", "init.defaultBranch=main", "init", "-q"])?;
    git(&db, &["add", "-A"])?;
    let mut commit = git_command(&db);
    commit
        .args([
            "-c",
            "user.name=allocwatch xtask",
            "-c",
            "user.email=xtask@allocwatch.invalid",
        ])
        .args([
            "-c",
            "commit.gpgsign=false",
            "commit",
            "-q",
            "--no-verify",
            "-m",
            &message,
        ])
        .env("GIT_AUTHOR_DATE", &date)
        .env("GIT_COMMITTER_DATE", &date);
    output(&mut commit)?;
    let head = db.join(".git/HEAD");
    fs::File::options()
        .write(true)
        .open(&head)
        .and_then(|f| f.set_modified(UNIX_EPOCH + Duration::from_secs(snapshot.commit_time)))
        .with_context(|| format!("dating {}", head.display()))?;

    let config = out.join("deny.toml");
    write(&config, vendored_config(base_config, &dbs)?.as_bytes())?;
    Ok(Materialized { config, snapshot })
}

/// `base_config`'s text with `db-path` and `maximum-db-staleness` added to its `[advisories]`.
fn vendored_config(base_config: &Path, dbs: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(base_config)
        .with_context(|| format!("reading {}", base_config.display()))?;
    // Set here, so the base must not: `db-urls` would also move the database to another name.
    for key in ["db-path", "db-urls", "maximum-db-staleness"] {
        ensure!(
            !text.lines().any(|l| l.trim_start().starts_with(key)),
            "{} sets `{key}`, which the check against the vendored snapshot sets itself",
            base_config.display()
        );
    }
    let dbs = dbs
        .to_str()
        .filter(|p| !p.contains(['\'', '\n']))
        .with_context(|| {
            format!(
                "{} cannot be written as a TOML literal string",
                dbs.display()
            )
        })?;
    let mut out = String::with_capacity(text.len() + 512);
    let mut found = false;
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        if line.trim() == "[advisories]" {
            found = true;
            out.push_str(&format!(
                "# Added by xtask (deny/snapshot.rs): the vendored RustSec snapshot, materialized \
                 here,\n# with a staleness limit that does not expire (the summary line prints \
                 its age).\ndb-path = '{dbs}'\nmaximum-db-staleness = \"{MAX_STALENESS}\"\n"
            ));
        }
    }
    ensure!(found, "{} has no [advisories] table", base_config.display());
    Ok(out)
}

/// The names of the crates.io packages in `locks` (path crates have no advisories).
fn registry_crates(locks: &[PathBuf]) -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for lock in locks {
        let text =
            fs::read_to_string(lock).with_context(|| format!("reading {}", lock.display()))?;
        let table: toml::Table = text
            .parse()
            .with_context(|| format!("parsing {}", lock.display()))?;
        let packages = table
            .get("package")
            .and_then(toml::Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for p in packages {
            let source = p.get("source").and_then(toml::Value::as_str);
            if source.is_some_and(|s| s.starts_with("registry+") || s.starts_with("sparse+")) {
                let name = p
                    .get("name")
                    .and_then(toml::Value::as_str)
                    .with_context(|| format!("{}: a package without a name", lock.display()))?;
                names.insert(name.to_owned());
            }
        }
    }
    Ok(names)
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry.with_context(|| format!("reading {}", from.display()))?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn write(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// git in `repo`, without the machine's or user's configuration (hooks, signing, templates).
fn git_command(repo: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(repo)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null");
    c
}

fn git(repo: &Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    output(git_command(repo).args(args))
}

/// The command's stdout; its stderr in the error when it fails.
fn output(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let out = cmd
        .output()
        .with_context(|| format!("starting `{}`", crate::cmd::show(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            crate::cmd::show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn text(bytes: Vec<u8>) -> anyhow::Result<String> {
    Ok(String::from_utf8(bytes)
        .context("non-UTF-8 output from git")?
        .trim()
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deny::tests::Scratch;

    const LOCK: &str = "version = 4\n\n[[package]]\nname = \"ours\"\nversion = \"0.1.0\"\n\n\
                        [[package]]\nname = \"regex\"\nversion = \"1.5.4\"\nsource = \
                        \"registry+https://github.com/rust-lang/crates.io-index\"\n\n\
                        [[package]]\nname = \"quiet\"\nversion = \"1.0.0\"\nsource = \
                        \"registry+https://github.com/rust-lang/crates.io-index\"\n";

    /// An advisory-db with advisories for regex (ours), for `theirs` (not in our lock files), a
    /// README outside crates/, committed on a known date.
    fn upstream(dir: &Path) -> String {
        for (path, contents) in [
            ("crates/regex/RUSTSEC-2022-0013.md", "regex advisory"),
            (
                "crates/theirs/RUSTSEC-2020-0001.md",
                "another crate's advisory",
            ),
            ("crates/regex/notes.txt", "not an advisory"),
            ("LICENSE.txt", "CC0"),
            ("README.md", "readme"),
        ] {
            write(&dir.join(path), contents.as_bytes()).unwrap();
        }
        git(dir, &["-c", "init.defaultBranch=main", "init", "-q"]).unwrap();
        git(dir, &["add", "-A"]).unwrap();
        let mut commit = git_command(dir);
        commit
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t.invalid",
                "commit",
                "-q",
                "-m",
                "x",
            ])
            .env("GIT_AUTHOR_DATE", "@1787293720 +0200")
            .env("GIT_COMMITTER_DATE", "@1787293720 +0200");
        output(&mut commit).unwrap();
        // Uncommitted: not part of the snapshot.
        write(&dir.join("crates/regex/RUSTSEC-2099-0001.md"), b"draft").unwrap();
        text(git(dir, &["rev-parse", "HEAD"]).unwrap()).unwrap()
    }

    #[test]
    fn refresh_keeps_the_committed_advisories_of_our_crates() {
        let scratch = Scratch::new("deny-refresh");
        let commit = upstream(&scratch.0.join("upstream"));
        let lock = scratch.0.join("Cargo.lock");
        write(&lock, LOCK.as_bytes()).unwrap();
        let dir = scratch.0.join("repo/deny/advisory-db");
        // A file of an earlier snapshot that the new one does not have.
        write(&dir.join("crates/gone/RUSTSEC-2019-0001.md"), b"old").unwrap();

        let written = refresh(
            &scratch.0.join("upstream"),
            &dir,
            std::slice::from_ref(&lock),
        )
        .unwrap();
        assert_eq!((written.advisories, written.crates_with_advisories), (1, 1));
        let mut files: Vec<String> = walk(&dir)
            .into_iter()
            .map(|p| p.strip_prefix(&dir).unwrap().display().to_string())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "LICENSE.txt",
                "SNAPSHOT.toml",
                "crates/regex/RUSTSEC-2022-0013.md"
            ]
        );
        let read = Snapshot::read(&dir).unwrap();
        assert_eq!(read.commit, commit);
        // The committer's own date (+02:00), as `git log` shows it.
        assert_eq!(read.date, "2026-08-21");
        assert_eq!(read.commit_time, 1_787_293_720);
        assert_eq!(
            read.crates.iter().map(String::as_str).collect::<Vec<_>>(),
            ["quiet", "regex"]
        );

        // Materialized: a repository dated as the snapshot, and the config pointing at it.
        let base = scratch.0.join("deny.toml");
        write(
            &base,
            b"[graph]\nall-features = true\n\n[advisories]\nversion = 2\n",
        )
        .unwrap();
        let out = scratch.0.join("target/deny");
        let m = materialize(&dir, &base, &out, std::slice::from_ref(&lock)).unwrap();
        let db = out.join("advisory-dbs").join(DB_DIR_NAME);
        assert!(db.join("crates/regex/RUSTSEC-2022-0013.md").is_file());
        let date = text(git(&db, &["show", "-s", "--format=%ct", "HEAD"]).unwrap()).unwrap();
        assert_eq!(date, "1787293720");
        let head = fs::metadata(db.join(".git/HEAD"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(head, UNIX_EPOCH + Duration::from_secs(1_787_293_720));
        let config: toml::Table = fs::read_to_string(&m.config).unwrap().parse().unwrap();
        let advisories = config["advisories"].as_table().unwrap();
        assert_eq!(
            advisories["db-path"].as_str(),
            out.join("advisory-dbs").to_str()
        );
        assert_eq!(
            advisories["maximum-db-staleness"].as_str(),
            Some(MAX_STALENESS)
        );
        assert_eq!(advisories["version"].as_integer(), Some(2));
        assert_eq!(config["graph"]["all-features"].as_bool(), Some(true));

        // A crate that entered a lock file after the snapshot was filtered: refused, named.
        write(
            &lock,
            format!(
                "{LOCK}\n[[package]]\nname = \"newcomer\"\nversion = \"1.0.0\"\nsource = \
                 \"registry+https://github.com/rust-lang/crates.io-index\"\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let err = materialize(&dir, &base, &out, &[lock]).err().unwrap();
        assert!(
            format!("{err:#}").contains("before newcomer entered"),
            "{err:#}"
        );
    }

    /// deny.toml gets the two keys in its own [advisories] table, everything else unchanged.
    #[test]
    fn the_vendored_config_is_deny_toml_pointed_at_the_snapshot() {
        let paths = crate::paths::Paths::locate().unwrap();
        let base = paths.root.join("deny.toml");
        let text = vendored_config(&base, Path::new("/x/advisory-dbs")).unwrap();
        let mut vendored: toml::Table = text.parse().unwrap();
        let original: toml::Table = fs::read_to_string(&base).unwrap().parse().unwrap();
        let added = vendored["advisories"].as_table_mut().unwrap();
        assert_eq!(
            added
                .remove("db-path")
                .and_then(|v| v.as_str().map(str::to_owned)),
            Some("/x/advisory-dbs".to_string())
        );
        assert!(added.remove("maximum-db-staleness").is_some());
        assert_eq!(vendored, original);
        // And a base that sets one of them is refused rather than given a second one.
        let set = Scratch::new("deny-config");
        let base = set.0.join("deny.toml");
        write(&base, b"[advisories]\ndb-path = \"/elsewhere\"\n").unwrap();
        assert!(vendored_config(&base, Path::new("/x")).is_err());
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }
}
