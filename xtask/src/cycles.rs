//! The rule "no import cycle between the top-level modules of a crate", checked by `./x lint`.
//!
//! Every workspace crate's `src/` is read as text. A file `src/NAME.rs` or `src/NAME/…`
//! belongs to module NAME, and each `crate::OTHER` path in it (a `use` line, an item of a group
//! `use crate::{a::x, b}`, or a path written inline, `crate::b::f()`) is an edge NAME -> OTHER
//! when OTHER is a top-level module too. Comment lines are left out (a doc link is no
//! dependency); test modules count (they are compiled too). A reading of the text, not a parse:
//! it may see an edge that is not there (`crate::` in a string, or in a comment after code),
//! never miss one written as a path. `super::` paths are not followed: none climbs out of a
//! top-level module here.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fs,
    path::Path,
};

use anyhow::{Context as _, bail};

/// Top-level module -> the top-level modules it names, each with the first file that does.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// Fails with every cycle found in the crates of the workspace at `root` (its directories that
/// hold a `Cargo.toml` and a `src/`).
pub fn check(root: &Path) -> anyhow::Result<()> {
    let mut found = Vec::new();
    for src in crate_sources(root)? {
        let files = rust_files(&src)?;
        let graph = graph(files.iter().map(|(p, t)| (p.as_str(), t.as_str())));
        let shown = src.strip_prefix(root).unwrap_or(&src).display();
        found.extend(
            cycles(&graph)
                .into_iter()
                .map(|c| format!("{shown}: {}", describe(&graph, &c))),
        );
    }
    if !found.is_empty() {
        bail!(
            "import cycles between top-level modules (each module must depend on the others \
             one way only):\n  {}",
            found.join("\n  ")
        );
    }
    Ok(())
}

fn crate_sources(root: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut dirs = Vec::new();
    for entry in fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        let dir = entry?.path();
        if dir.join("Cargo.toml").is_file() && dir.join("src").is_dir() {
            dirs.push(dir.join("src"));
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Every `.rs` file below `dir`: its path relative to `dir` (with `/`) and its text.
fn rust_files(dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, String)>) -> anyhow::Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let rel = format!("{prefix}{name}");
            if path.is_dir() {
                walk(&path, &format!("{rel}/"), out)?;
            } else if name.ends_with(".rs") {
                let text = fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                out.push((rel, text));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

/// The module graph of one crate from its files (path relative to `src/`, text).
fn graph<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> Graph {
    let files: Vec<(&str, &str)> = files.into_iter().collect();
    let modules: BTreeSet<&str> = files.iter().filter_map(|(p, _)| module_of(p)).collect();
    let mut g = Graph::new();
    for (path, text) in &files {
        let Some(from) = module_of(path) else {
            continue;
        };
        for to in crate_paths(text) {
            if to != from && modules.contains(to) {
                g.entry(from.to_string())
                    .or_default()
                    .entry(to.to_string())
                    .or_insert_with(|| path.to_string());
            }
        }
    }
    g
}

/// `NAME` for `NAME.rs` and `NAME/…`. `None` for the crate root (`lib.rs`, `main.rs`: it
/// declares every module, and no module imports it as one) and for `bin/` (crates of their own).
fn module_of(path: &str) -> Option<&str> {
    match path.split_once('/') {
        Some(("bin", _)) => None,
        Some((dir, _)) => Some(dir),
        None => match path.strip_suffix(".rs")? {
            "lib" | "main" => None,
            name => Some(name),
        },
    }
}

/// The first segment of every `crate::` path in `text`, comment lines left out.
fn crate_paths(text: &str) -> BTreeSet<&str> {
    let mut out = BTreeSet::new();
    let mut group: Option<GroupScan> = None;
    for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        // A group `crate::{…}` that spans lines: its items until the closing brace.
        if let Some(g) = &mut group {
            match g.feed(rest, &mut out) {
                Some(after) => {
                    group = None;
                    rest = after;
                }
                None => continue,
            }
        }
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().next_back();
            rest = &rest[i + "crate::".len()..];
            // `other_crate::x` is not this crate (`$crate::x` in a macro is).
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(inner) = rest.strip_prefix('{') {
                let mut g = GroupScan::default();
                match g.feed(inner, &mut out) {
                    Some(after) => rest = after,
                    None => {
                        group = Some(g);
                        break;
                    }
                }
            } else {
                out.insert(ident(rest));
            }
        }
    }
    out.retain(|m| !m.is_empty() && *m != "self");
    out
}

/// Where a `crate::{…}` group is being read: its depth inside nested groups, and whether the
/// next word starts an item.
#[derive(Default)]
struct GroupScan {
    depth: usize,
    in_item: bool,
}

impl GroupScan {
    /// Adds the first segment of each top-level item in `text`; the text after the group's
    /// closing brace, or `None` if the group goes on past this text.
    fn feed<'a>(&mut self, text: &'a str, out: &mut BTreeSet<&'a str>) -> Option<&'a str> {
        for (i, c) in text.char_indices() {
            match c {
                '{' => self.depth += 1,
                '}' if self.depth == 0 => return Some(&text[i + 1..]),
                '}' => self.depth -= 1,
                ',' if self.depth == 0 => self.in_item = false,
                c if !self.in_item && self.depth == 0 && !c.is_whitespace() => {
                    out.insert(ident(&text[i..]));
                    self.in_item = true;
                }
                _ => {}
            }
        }
        None
    }
}

/// The identifier at the start of `s` (empty if there is none).
fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// One cycle per group of modules that reach each other: `[a, b, …, a]`, the shortest through
/// the group's first module.
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    let reach: BTreeMap<&str, BTreeSet<&str>> =
        g.keys().map(|m| (m.as_str(), reachable(g, m))).collect();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut out = Vec::new();
    for (&m, from_m) in &reach {
        if done.contains(m) || !from_m.contains(m) {
            continue;
        }
        done.extend(
            from_m
                .iter()
                .filter(|o| reach.get(*o).is_some_and(|r| r.contains(m))),
        );
        out.push(shortest_cycle(g, m));
    }
    out
}

/// The modules reachable from `start` by one edge or more.
fn reachable<'a>(g: &'a Graph, start: &str) -> BTreeSet<&'a str> {
    let mut seen = BTreeSet::new();
    let mut queue: VecDeque<&str> = successors(g, start).collect();
    while let Some(m) = queue.pop_front() {
        if seen.insert(m) {
            queue.extend(successors(g, m));
        }
    }
    seen
}

fn successors<'a>(g: &'a Graph, m: &str) -> impl Iterator<Item = &'a str> {
    g.get(m)
        .into_iter()
        .flat_map(|to| to.keys().map(String::as_str))
}

/// The shortest path from `start` back to itself (breadth first); `start` is on a cycle.
fn shortest_cycle(g: &Graph, start: &str) -> Vec<String> {
    let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(m) = queue.pop_front() {
        for next in successors(g, m) {
            if next == start {
                let mut path = vec![start.to_string(), m.to_string()];
                let mut at = m;
                while at != start {
                    at = parent[at];
                    path.push(at.to_string());
                }
                path.reverse();
                return path;
            }
            if next != start && !parent.contains_key(next) {
                parent.insert(next, m);
                queue.push_back(next);
            }
        }
    }
    unreachable!("{start} is on a cycle")
}

/// `a -> b (a/x.rs) -> a (b.rs)`: each step with the file that makes it.
fn describe(g: &Graph, cycle: &[String]) -> String {
    let mut s = cycle[0].clone();
    for w in cycle.windows(2) {
        let file = &g[&w[0]][&w[1]];
        s += &format!(" -> {} ({file})", w[1]);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cycle_is_found_with_the_files_that_make_it() {
        let files = [
            (
                "lib.rs",
                "pub mod a;\npub mod b;\npub mod c;\nuse crate::a::X;\n",
            ),
            (
                "a.rs",
                "use crate::{\n    b::Thing,\n    c::{self, D},\n};\n",
            ),
            ("b/mod.rs", "mod inner;\n"),
            ("b/inner.rs", "pub fn f() -> u8 {\n    crate::a::g()\n}\n"),
            (
                "c.rs",
                "//! Unlike [`crate::a`], no edge: a doc comment.\n    // crate::b neither\n",
            ),
        ];
        let g = graph(files);
        assert_eq!(cycles(&g), vec![vec!["a", "b", "a"]]);
        assert_eq!(
            describe(&g, &cycles(&g)[0]),
            "a -> b (a.rs) -> a (b/inner.rs)"
        );
        assert!(!g.contains_key("c"), "comments are no edges: {g:?}");
    }

    #[test]
    fn a_longer_cycle_is_named_once() {
        let files = [
            ("a.rs", "use crate::b;"),
            ("b.rs", "use crate::c;"),
            ("c.rs", "use crate::a; use crate::d;"),
            ("d.rs", ""),
        ];
        assert_eq!(cycles(&graph(files)), vec![vec!["a", "b", "c", "a"]]);
    }

    #[test]
    fn one_way_dependencies_are_no_cycle() {
        let files = [
            ("a.rs", "use crate::{b, c::X};"),
            ("b.rs", "use crate::c::Y;\nuse other_crate::a;\n"),
            ("c.rs", "use super::x;"),
        ];
        let g = graph(files);
        assert_eq!(g["a"].len(), 2);
        assert!(cycles(&g).is_empty(), "{g:?}");
    }

    #[test]
    fn first_segments_of_groups_and_inline_paths() {
        let text = r#"use crate::{
    probes::{Capacity, Mode},
    serve::{
        http::Limits,
        web_config::{WebConfig, WebConfigError},
    },
    values::{self, X},
};
fn f() { crate::aggregate::live_of(); $crate::m!(); }
use crate::{self as c, other};
"#;
        assert_eq!(
            crate_paths(text),
            BTreeSet::from(["aggregate", "m", "other", "probes", "serve", "values"])
        );
    }

    /// The workspace itself, as `./x lint` checks it; the reader sees edges known to exist
    /// (issue 14 broke rings in each of these crates), so "no cycle" is not for want of edges.
    #[test]
    fn the_workspace_has_no_import_cycle() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask has a parent");
        check(root).unwrap();
        for (src, from, to) in [
            ("agent/src", "serve", "report"),
            ("agent/src", "report", "model"),
            ("agent/src", "config", "serve"),
            ("xtask/src", "setup", "cmd"),
            ("xtask/src", "cmd", "paths"),
            ("common/src", "event", "libc"),
        ] {
            let files = rust_files(&root.join(src)).unwrap();
            let g = graph(files.iter().map(|(p, t)| (p.as_str(), t.as_str())));
            assert!(g[from].contains_key(to), "{src}: {from} -> {to}: {g:?}");
        }
    }
}
