//! Human-readable views of `top` and `leaks`.

use std::fmt::Write as _;

use allocwatch_common::libc::Api;

use super::pprof::UNKNOWN;
use super::{GoReport, LeaksReport, PauseSummary, Site, TopReport, TreeProcess, human_bytes};
use crate::{
    aggregate::live_of,
    loss::{self, LossEffect},
    symbolize::Frame,
};

/// How many caller frames are printed under a site.
const CALLERS_SHOWN: usize = 4;

/// `fx_malloc (libc_fixture.c:12)`, `libfoo.so+0x1a2b`, or `[unknown]` (no module: the
/// process was gone before it was named; a bare address would mean nothing to a reader).
pub fn frame(f: &Frame) -> String {
    let file = f.file.as_deref().map(|p| p.rsplit('/').next().unwrap_or(p));
    match (&f.function, file, f.line) {
        (Some(func), Some(file), Some(line)) => format!("{func} ({file}:{line})"),
        (Some(func), _, _) => match &f.module {
            Some(m) => format!("{func} [{}]", m.rsplit('/').next().unwrap_or(m)),
            None => func.clone(),
        },
        (None, _, _) => match (&f.module, f.offset) {
            (Some(m), Some(off)) => format!("{}+{off:#x}", m.rsplit('/').next().unwrap_or(m)),
            _ => UNKNOWN.to_owned(),
        },
    }
}

/// Whether `f` is code inlined into `next` (the frame after it in a stack): the symbolizer
/// gives an inlined chain as several named frames at one address.
fn inlined_into(f: &Frame, next: Option<&Frame>) -> bool {
    next.is_some_and(|n| {
        n.address == f.address
            && n.module == f.module
            && f.function.is_some()
            && n.function.is_some()
    })
}

/// `frame(f)`, marked `(inlined)` when it is inlined into the next frame: the next line is then
/// the function its code sits in, not a call.
fn frame_in_stack(frames: &[Frame], i: usize) -> String {
    let f = &frames[i];
    if inlined_into(f, frames.get(i + 1)) {
        format!("{} (inlined)", frame(f))
    } else {
        frame(f)
    }
}

fn site_lines(out: &mut String, frames: &[Frame], indent: usize) {
    match frames.split_first() {
        None => out.push_str("(no stack)\n"),
        Some((_, callers)) => {
            out.push_str(&frame_in_stack(frames, 0));
            out.push('\n');
            for i in 1..=callers.len().min(CALLERS_SHOWN) {
                let _ = writeln!(out, "{:indent$}<- {}", "", frame_in_stack(frames, i));
            }
            if callers.len() > CALLERS_SHOWN {
                let _ = writeln!(
                    out,
                    "{:indent$}   … {} more",
                    "",
                    callers.len() - CALLERS_SHOWN
                );
            }
        }
    }
}

fn header(out: &mut String, r: &TopReport) {
    let i = &r.info;
    let state = if i.exited {
        match i.exit_code {
            Some(c) => format!("exited ({c})"),
            None => "exited".to_string(),
        }
    } else {
        "running".to_string()
    };
    // The allocator and its files: `jemalloc (…/libjemalloc.so.2 + …/libc.so.6)`.
    let allocator = match i.allocator {
        Some(a) => format!("allocator {a} ({})", i.allocator_files.join(" + ")),
        None => format!("libc {}", i.libc),
    };
    let _ = writeln!(
        out,
        "allocwatch top — pid {} ({}) {state}, {:.1}s traced, {allocator}",
        i.pid, i.comm, r.elapsed_secs
    );
    let mut calls = String::new();
    for api in Api::ALL {
        let n = r.totals.calls[api as usize];
        if n > 0 {
            let _ = write!(
                calls,
                " {} {n} ({})",
                api.name(),
                human_bytes(r.totals.bytes[api as usize])
            );
        }
    }
    if calls.is_empty() {
        calls.push_str(" none yet");
    }
    let _ = writeln!(out, "calls:{calls}");
    let _ = writeln!(
        out,
        "live: {} allocations, {}{}",
        r.totals.live_allocations,
        human_bytes(r.totals.live_bytes),
        if r.sample_bytes > 0 {
            " (estimated)"
        } else {
            ""
        }
    );
    sampling_note(out, r.sample_bytes);
    for (alias, canon) in &i.aliases {
        let _ = writeln!(
            out,
            "note: {} is the same function as {} in this allocator; counted as {}",
            alias.name(),
            canon.name(),
            canon.name()
        );
    }
    lost_line(out, &r.lost);
}

/// Says that per-site figures are estimates (calls above are exact either way).
fn sampling_note(out: &mut String, sample_bytes: u64) {
    if sample_bytes > 0 {
        let _ = writeln!(
            out,
            "sampled: one call per {} on average; per-stack figures and live bytes are \
             estimates (scaled as pprof), calls and bytes above are exact",
            human_bytes(sample_bytes)
        );
    }
}

/// One line per effect with a non-zero cause: what the loss takes comes first, so a reader
/// tells low counts from stacks that end early.
fn lost_line(out: &mut String, lost: &std::collections::BTreeMap<&'static str, u64>) {
    for effect in LossEffect::ALL {
        let nonzero: Vec<String> = lost
            .iter()
            .filter(|(k, n)| **n > 0 && loss::effect(k) == effect)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if !nonzero.is_empty() {
            let _ = writeln!(out, "{}{}", lost_prefix(effect), nonzero.join(", "));
        }
    }
}

/// The text view's loss line for `effect` (tests read the lines by it).
pub const fn lost_prefix(effect: LossEffect) -> &'static str {
    match effect {
        LossEffect::Counts => "LOST (counts are low): ",
        LossEffect::Live => "LOST (live bytes are low): ",
        LossEffect::Detail => "LESS DETAIL (counts exact): ",
    }
}

/// The followed tree, when it was more than the one process: each process's own calls and
/// bytes (the figures above are the tree's).
fn processes(out: &mut String, tree: &[TreeProcess]) {
    if tree.len() < 2 {
        return;
    }
    let _ = writeln!(out, "\nPROCESSES ({})", tree.len());
    let _ = writeln!(
        out,
        "{:>8} {:>8} {:>8} {:>10} {:<12} {:<9} PROGRAM",
        "PID", "PARENT", "CALLS", "BYTES", "STATE", "PROBES"
    );
    for p in tree {
        let calls: u64 = p.totals.calls.iter().sum();
        let bytes: u64 = Api::ALL
            .iter()
            .filter(|a| !a.is_free())
            .map(|a| p.totals.bytes[*a as usize])
            .sum();
        let state = match (p.replaced_by_exec, p.exited, p.exit_code) {
            (true, _, _) => "exec'd".into(),
            (_, true, Some(c)) => format!("exited ({c})"),
            (_, true, None) => "exited".into(),
            (_, false, _) => "running".into(),
        };
        let parent = p.parent_pid.map_or("-".into(), |n| n.to_string());
        let program = if p.exe.is_empty() { &p.comm } else { &p.exe };
        let go = match p.go {
            Some(g) => format!(" (Go runtime {g})"),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "{:>8} {parent:>8} {calls:>8} {:>10} {state:<12} {:<9} {program}{go}",
            p.pid,
            human_bytes(bytes),
            p.probes,
        );
    }
}

fn table(out: &mut String, title: &str, sites: &[&Site]) {
    let _ = writeln!(out, "\n{title}");
    let _ = writeln!(
        out,
        "{:>10} {:>8} {:>10} {:<14} SITE",
        "BYTES", "CALLS", "LIVE", "API"
    );
    for s in sites {
        let (_, live) = live_of(&s.stats);
        let _ = write!(
            out,
            "{:>10} {:>8} {:>10} {:<14} ",
            human_bytes(s.stats.bytes),
            s.stats.calls,
            human_bytes(live),
            s.api.name()
        );
        site_lines(out, &s.frames, 45);
    }
}

pub fn top(r: &TopReport, k: usize) -> String {
    let mut out = String::new();
    header(&mut out, r);
    let allocs: Vec<&Site> = r.sites.iter().filter(|s| !s.api.is_free()).collect();
    let mut by_bytes = allocs.clone();
    by_bytes.sort_by_key(|s| std::cmp::Reverse(s.stats.bytes));
    by_bytes.truncate(k);
    table(&mut out, "TOP SITES BY BYTES", &by_bytes);
    let mut by_calls = allocs;
    by_calls.sort_by_key(|s| std::cmp::Reverse(s.stats.calls));
    by_calls.truncate(k);
    table(&mut out, "TOP SITES BY CALLS", &by_calls);
    processes(&mut out, &r.tree);
    if let Some(go) = &r.go {
        go_section(&mut out, go, k);
    }
    probes_section(&mut out, r, k);
    out
}

/// The symbol probes: built-in container growth and `--probe`s, totals then top sites.
fn probes_section(out: &mut String, r: &TopReport, k: usize) {
    if r.probes.is_empty() {
        return;
    }
    let args = |a: &[(String, u64)]| {
        a.iter()
            .map(|(n, v)| format!(" {n}={v}"))
            .collect::<String>()
    };
    let _ = writeln!(out, "\nPROBES (container growth and --probe)");
    for t in &r.probes {
        let _ = writeln!(out, "  {}: {} calls{}", t.kind, t.calls, args(&t.args));
    }
    if r.probe_sites.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nTOP PROBE SITES");
    let _ = writeln!(out, "{:>8} {:<24} SITE", "CALLS", "KIND");
    for s in r.probe_sites.iter().take(k) {
        let _ = write!(out, "{:>8} {:<24} ", s.calls, s.kind);
        if !s.args.is_empty() {
            let _ = write!(out, "[{}] ", args(&s.args).trim_start());
        }
        site_lines(out, &s.frames, 34);
    }
}

fn pauses(p: &PauseSummary) -> String {
    if p.count == 0 {
        return "none".into();
    }
    format!(
        "{} pauses, total {:.3} ms, max {:.3} ms",
        p.count,
        p.sum * 1e3,
        p.max * 1e3
    )
}

fn go_section(out: &mut String, go: &GoReport, k: usize) {
    let grows: Vec<String> = go
        .map_grows
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let _ = writeln!(out, "\nGO {} ({} maps)", go.version, go.map_impl);
    for w in &go.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let _ = writeln!(
        out,
        "map grows: {} ({}), {} allocated",
        go.map_grows.values().sum::<u64>(),
        if grows.is_empty() {
            "none".to_string()
        } else {
            grows.join(", ")
        },
        human_bytes(go.map_grow_bytes)
    );
    let _ = writeln!(
        out,
        "slice grows: {}, {} allocated",
        go.slice_grows,
        human_bytes(go.slice_grow_bytes)
    );
    let _ = writeln!(
        out,
        "GC: {} cycles; GC stop-the-world: {}; all stop-the-world: {}",
        go.gc_cycles,
        pauses(&go.gc_pauses),
        pauses(&go.stw_pauses)
    );
    if go.large_allocs > 0 {
        let _ = writeln!(
            out,
            "large allocations (>= 32 KiB): {}, {}",
            go.large_allocs,
            human_bytes(go.large_alloc_bytes)
        );
    }
    // `large_alloc` rows are allocations of 32 KiB or more only: the title says so.
    let _ = writeln!(
        out,
        "\nTOP GO GROWTH AND LARGE (>= 32 KiB) ALLOCATION SITES"
    );
    let _ = writeln!(out, "{:>10} {:>8} {:<12} SITE", "BYTES", "COUNT", "KIND");
    for s in go.sites.iter().take(k) {
        let _ = write!(
            out,
            "{:>10} {:>8} {:<12} ",
            human_bytes(s.bytes),
            s.count,
            s.kind
        );
        site_lines(out, &s.frames, 32);
    }
}

/// The `maps` view: Go map instances that grew, largest first.
pub fn maps(r: &TopReport, k: usize) -> String {
    let mut out = String::new();
    let Some(go) = &r.go else {
        let _ = writeln!(
            out,
            "allocwatch maps — pid {} ({}) is not a Go program",
            r.info.pid, r.info.comm
        );
        return out;
    };
    let _ = writeln!(
        out,
        "allocwatch maps — pid {} ({}) Go {} ({} maps): {} maps grew, {} grows, {}",
        r.info.pid,
        r.info.comm,
        go.version,
        go.map_impl,
        go.maps_tracked,
        go.map_grows.values().sum::<u64>(),
        human_bytes(go.map_grow_bytes)
    );
    if go.maps_dropped > 0 {
        let _ = writeln!(
            out,
            "{} more grew and were freed since (their memory holds other data now): not shown",
            go.maps_dropped
        );
    }
    let bloated = go
        .maps
        .iter()
        .filter(|m| m.verdict == Some("bloated"))
        .count();
    let growing = go
        .maps
        .iter()
        .filter(|m| m.verdict == Some("growing"))
        .count();
    if growing > 0 {
        let _ = writeln!(
            out,
            "{growing} growing: its length keeps rising and it keeps growing (a leak suspect: \
             are entries ever deleted?)"
        );
    }
    if bloated > 0 {
        let _ = writeln!(
            out,
            "{bloated} bloated: under 1/8 full and holding over 1 MiB (Go never shrinks a map: \
             copy the live entries into a new map and drop the old one)"
        );
    }
    let _ = writeln!(
        out,
        "{:<8} {:>9} {:>9} {:>9} {:>5} {:>9} {:>6} {:>9} {:>9} {:<14} FIRST GROWN AT",
        "VERDICT", "LEN", "LEN MAX", "SLOTS", "LOAD", "HELD", "GROWS", "GROWN", "SIZE", "MAP"
    );
    for m in go.maps.iter().take(k) {
        let size = if go.map_impl == "swiss" {
            format!("{}x{}", m.dir_len.max(1), m.size_class)
        } else {
            format!("B={}", m.size_class)
        };
        let dash = || "-".to_string();
        let _ = write!(
            out,
            "{:<8} {:>9} {:>9} {:>9} {:>5} {:>9} {:>6} {:>9} {:>9} {:<14} ",
            m.verdict.unwrap_or("-"),
            m.live.map_or_else(dash, |l| l.len.to_string()),
            m.len_max,
            m.live.map_or_else(dash, |l| l.slots.to_string()),
            m.load.map_or_else(dash, |l| format!("{:.0}%", l * 100.0)),
            m.live.map_or_else(dash, |l| human_bytes(l.bytes)),
            m.grows,
            human_bytes(m.bytes),
            size,
            format!("{:#x}", m.ptr)
        );
        site_lines(&mut out, &m.frames, 60);
    }
    if go.maps.iter().any(|m| m.live.is_none()) {
        let _ = writeln!(
            out,
            "(LEN, SLOTS, LOAD and HELD are read from the process every second; `-`: not read \
             before it exited. LEN MAX also counts the length at each growth.)"
        );
    }
    out
}

pub fn leaks(r: &LeaksReport, k: usize) -> String {
    let mut out = String::new();
    let shown: u64 = r.leaks.iter().map(|l| l.count).sum();
    let shown_bytes: u64 = r.leaks.iter().map(|l| l.bytes).sum();
    let _ = writeln!(
        out,
        "allocwatch leaks — pid {} ({}): {shown} allocations, {} outstanding for at least {:.1}s \
         (all live: {}, {})",
        r.info.pid,
        r.info.comm,
        human_bytes(shown_bytes),
        r.min_age_secs,
        r.live_allocations,
        human_bytes(r.live_bytes)
    );
    if r.sample_bytes > 0 {
        let _ = writeln!(
            out,
            "sampled: one allocation per {} on average is tracked; counts and bytes are \
             estimates (scaled as pprof)",
            human_bytes(r.sample_bytes)
        );
    }
    lost_line(&mut out, &r.lost);
    let _ = writeln!(
        out,
        "{:>10} {:>8} {:>9} {:<14} SITE",
        "BYTES", "COUNT", "OLDEST", "API"
    );
    for l in r.leaks.iter().take(k) {
        let _ = write!(
            out,
            "{:>10} {:>8} {:>8.1}s {:<14} ",
            human_bytes(l.bytes),
            l.count,
            l.oldest_age_secs,
            l.api.name()
        );
        site_lines(&mut out, &l.frames, 44);
    }
    if r.leaks.len() > k {
        let _ = writeln!(out, "… {} more sites (raise --top)", r.leaks.len() - k);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(function: Option<&str>, file: Option<&str>, line: Option<u32>) -> Frame {
        Frame {
            function: function.map(String::from),
            file: file.map(String::from),
            line,
            module: Some("/usr/lib/libx.so".into()),
            offset: Some(0x1a2b),
            address: 0x7f00_0000_1a2b,
        }
    }

    #[test]
    fn frames_render_with_best_available_detail() {
        assert_eq!(
            frame(&f(Some("fx_malloc"), Some("/src/fx.c"), Some(12))),
            "fx_malloc (fx.c:12)"
        );
        assert_eq!(frame(&f(Some("g"), None, None)), "g [libx.so]");
        assert_eq!(frame(&f(None, None, None)), "libx.so+0x1a2b");
    }

    /// An inlined chain (frames sharing one address) reads as inlined code, not as calls.
    #[test]
    fn inlined_frames_are_marked() {
        let at = |function: &str, line: u32, address: u64| Frame {
            address,
            ..f(Some(function), Some("/src/buf.c"), Some(line))
        };
        let frames = [
            at("grow_inline", 7, 0x1000),
            at("make_buffer", 20, 0x1000),
            at("main", 31, 0x2000),
            Frame::unknown(0x3000),
            Frame::unknown(0x3000),
        ];
        let mut out = String::new();
        site_lines(&mut out, &frames, 2);
        assert_eq!(
            out,
            "grow_inline (buf.c:7) (inlined)\n  <- make_buffer (buf.c:20)\n  <- main (buf.c:31)\n  \
             <- [unknown]\n  <- [unknown]\n"
        );
    }

    /// One row per process of a followed tree, only when there is more than the root.
    #[test]
    fn processes_table_lists_the_tree() {
        let mut root = TreeProcess {
            pid: 10,
            comm: "sh".into(),
            exe: "/usr/bin/dash".into(),
            exited: true,
            exit_code: Some(0),
            probes: "attached",
            ..TreeProcess::default()
        };
        root.totals.calls[Api::Malloc as usize] = 3;
        root.totals.bytes[Api::Malloc as usize] = 300;
        root.totals.calls[Api::Free as usize] = 2;
        root.totals.bytes[Api::Free as usize] = 200;
        let mut out = String::new();
        processes(&mut out, std::slice::from_ref(&root));
        assert_eq!(out, "", "one process: no table");
        let child = TreeProcess {
            pid: 11,
            parent_pid: Some(10),
            comm: "libc_fixture".into(),
            exe: "/f/libc_fixture".into(),
            replaced_by_exec: true,
            probes: "attached",
            go: Some("not traced"),
            ..TreeProcess::default()
        };
        processes(&mut out, &[root, child]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[1], "PROCESSES (2)");
        assert_eq!(
            lines[3],
            "      10        -        5      300 B exited (0)   attached  /usr/bin/dash"
        );
        assert_eq!(
            lines[4],
            "      11       10        0        0 B exec'd       attached  /f/libc_fixture (Go \
             runtime not traced)"
        );
    }
}
