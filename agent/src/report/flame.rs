//! Flamegraph SVGs of call sites (inferno), for `allocwatch top --flamegraph out.svg`.
//!
//! Each site is one stack, outermost frame at the bottom, with the allocating API (or Go
//! growth kind) as a `[kind]` frame on top, so the same call chain reaching `malloc` and
//! `calloc` shows as two towers.

use std::{collections::BTreeMap, io::Write};

use inferno::flamegraph::{self, Options};

use super::pprof::function_name;
use crate::{model::SiteSnapshot, symbolize::Frame};

#[derive(Debug, thiserror::Error)]
pub enum FlameError {
    #[error("no call site has a non-zero {0}: nothing to draw")]
    Empty(&'static str),
    #[error("writing the flamegraph: {0}")]
    Io(#[from] std::io::Error),
}

/// One stack to draw: its frames (innermost first, as symbolized), the API or growth kind,
/// and its weight.
#[derive(Clone, Copy, Debug)]
pub struct FlameStack<'a> {
    pub kind: &'a str,
    pub frames: &'a [Frame],
    pub value: u64,
}

/// What a site's width stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlameWeight {
    Bytes,
    Calls,
    LiveBytes,
}

impl FlameWeight {
    fn name(self) -> &'static str {
        match self {
            FlameWeight::Bytes => "bytes",
            FlameWeight::Calls => "calls",
            FlameWeight::LiveBytes => "live bytes",
        }
    }

    fn of(self, s: &SiteSnapshot) -> u64 {
        match self {
            FlameWeight::Bytes => s.bytes,
            FlameWeight::Calls => s.calls,
            FlameWeight::LiveBytes => s.live_bytes,
        }
    }
}

/// A frame name that cannot break the folded format (`;` separates frames, a line is a stack).
fn folded_name(f: &Frame) -> String {
    function_name(f).replace([';', '\n', '\r'], ":")
}

/// Folded stacks (`outer;…;inner;[kind] value`), identical stacks summed, sorted.
pub fn folded<'a>(stacks: impl IntoIterator<Item = FlameStack<'a>>) -> Vec<String> {
    let mut sums: BTreeMap<String, u64> = BTreeMap::new();
    for s in stacks {
        if s.value == 0 {
            continue;
        }
        let mut line: Vec<String> = s.frames.iter().rev().map(folded_name).collect();
        if line.is_empty() {
            line.push("(no stack)".to_string());
        }
        line.push(format!("[{}]", s.kind.replace([';', '\n', '\r', ' '], "_")));
        let slot = sums.entry(line.join(";")).or_default();
        *slot = slot.saturating_add(s.value);
    }
    sums.into_iter().map(|(k, v)| format!("{k} {v}")).collect()
}

/// Writes the flamegraph SVG of `stacks`; `count_name` names the unit (e.g. `bytes`).
pub fn write_svg<'a>(
    stacks: impl IntoIterator<Item = FlameStack<'a>>,
    title: &str,
    count_name: &'static str,
    out: impl Write,
) -> Result<(), FlameError> {
    let lines = folded(stacks);
    if lines.is_empty() {
        // inferno would draw an error picture and fail; say why instead.
        return Err(FlameError::Empty(count_name));
    }
    let mut opts = Options::default();
    opts.title = title.to_string();
    opts.count_name = count_name.to_string();
    // Same input, same picture: colours from function names, not random.
    opts.hash = true;
    opts.deterministic = true;
    flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), out)?;
    Ok(())
}

/// The flamegraph of `sites` weighted by `weight` (`free` sites only count by calls).
pub fn write_sites_svg(
    sites: &[SiteSnapshot],
    weight: FlameWeight,
    title: &str,
    out: impl Write,
) -> Result<(), FlameError> {
    let stacks = sites
        .iter()
        .filter(|s| weight == FlameWeight::Calls || s.kind != "free")
        .map(|s| FlameStack {
            kind: s.kind,
            frames: &s.frames,
            value: weight.of(s),
        });
    write_svg(stacks, title, weight.name(), out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, address: u64) -> Frame {
        Frame {
            function: Some(function.to_string()),
            ..Frame::unknown(address)
        }
    }

    fn sites() -> Vec<SiteSnapshot> {
        let s = |kind, frames: Vec<Frame>, bytes| SiteSnapshot {
            kind,
            frames: frames.into(),
            calls: 1,
            bytes,
            live_allocations: 0,
            live_bytes: 0,
            remainder: false,
            pending: false,
            probe: false,
        };
        vec![
            s(
                "malloc",
                vec![frame("make_buffer", 2), frame("main", 1)],
                4096,
            ),
            s(
                "calloc",
                vec![frame("zeroed;odd", 3), frame("main", 1)],
                512,
            ),
            s(
                "malloc",
                vec![frame("make_buffer", 2), frame("main", 1)],
                4096,
            ),
            s("free", vec![frame("release", 4)], 0),
            s("malloc", vec![], 10),
        ]
    }

    #[test]
    fn folded_lines() {
        let s = sites();
        let stacks = s.iter().map(|s| FlameStack {
            kind: s.kind,
            frames: &s.frames,
            value: s.bytes,
        });
        assert_eq!(
            folded(stacks),
            [
                "(no stack);[malloc] 10",
                "main;make_buffer;[malloc] 8192",
                "main;zeroed:odd;[calloc] 512",
            ]
        );
    }

    #[test]
    fn svg_names_the_functions() {
        let mut svg = Vec::new();
        write_sites_svg(&sites(), FlameWeight::Bytes, "allocwatch test", &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.starts_with("<?xml"), "{}", &svg[..100.min(svg.len())]);
        for name in [
            "make_buffer",
            "main",
            "zeroed:odd",
            "[malloc]",
            "[calloc]",
            "allocwatch test",
        ] {
            assert!(svg.contains(name), "{name} missing");
        }
        assert!(!svg.contains("release"), "free sites carry no bytes");
    }

    #[test]
    fn nothing_to_draw_is_an_error() {
        let err = write_sites_svg(&[], FlameWeight::LiveBytes, "t", Vec::new()).unwrap_err();
        assert!(matches!(err, FlameError::Empty("live bytes")), "{err}");
    }
}
