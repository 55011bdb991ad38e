//! pprof profiles (gzipped `profile.proto`) of call sites, readable by `go tool pprof`.
//!
//! Sample types, in this order (Go's heap profile first, then Go growth as its own types):
//! `alloc_objects/count`, `alloc_space/bytes`, `inuse_objects/count`, `inuse_space/bytes`,
//! `map_grows/count`, `map_grow_space/bytes`, `slice_grows/count`, `slice_grow_space/bytes`,
//! `go_large_allocs/count`, `go_large_alloc_space/bytes`. malloc-family sites fill the first
//! four; `map_grow` and `slice_grow` sites the next four; Go's `large_alloc` sites (heap
//! allocations of 32 KiB or more, the only Go allocations with stacks) the last two, under
//! names that say so: in `alloc_space` a Go developer would read them as the whole heap
//! profile. `free` sites are not allocations and are left out. A profile whose `alloc_space`
//! is empty but has large Go allocations (a Go program without cgo) shows
//! `go_large_alloc_space` by default instead.
//!
//! One process's profile says which program it is (`File:` in `go tool pprof`, its first
//! mapping) and has one comment naming it; a profile of several processes (the node's) has
//! neither a `File:` (no process stands for the others) nor a comment per process: one comment
//! says how many there are, and the samples' `pid`/`comm` labels tell them apart.
//!
//! Each sample is one site of one process, labelled `pid` (number), `comm`, `api` and, inside
//! Kubernetes, `namespace`/`pod`/`container` (for `-tagfocus`). Every frame gets a function,
//! so pprof never tries to symbolize: an address the symbolizer could not name is called
//! `module+0xoffset` (or its hex address), as in the text report.

use std::{
    collections::HashMap,
    io::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use flate2::{Compression, write::GzEncoder};
use libdd_profiling_protobuf::prost_impls::{
    Function, Label, Line, Location, Mapping, Message as _, Profile, Sample, ValueType,
};

use crate::{
    model::{ProcessSnapshot, SiteSnapshot},
    symbolize::Frame,
};

/// `(type, unit)` of each sample value, in value order.
pub const SAMPLE_TYPES: [(&str, &str); 10] = [
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
    ("inuse_objects", "count"),
    ("inuse_space", "bytes"),
    ("map_grows", "count"),
    ("map_grow_space", "bytes"),
    ("slice_grows", "count"),
    ("slice_grow_space", "bytes"),
    ("go_large_allocs", "count"),
    ("go_large_alloc_space", "bytes"),
];

/// Index in [`SAMPLE_TYPES`] of `alloc_space` and of `go_large_alloc_space`.
const ALLOC_SPACE: usize = 1;
const GO_LARGE_ALLOC_SPACE: usize = 9;

#[derive(Debug, thiserror::Error)]
pub enum PprofError {
    #[error("compressing the profile: {0}")]
    Gzip(#[from] std::io::Error),
}

/// Which sample type pprof shows when none is chosen with `-sample_index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultSample {
    /// `/debug/pprof/allocs`: everything allocated.
    AllocSpace,
    /// `/debug/pprof/heap`: what is still allocated.
    InuseSpace,
}

impl DefaultSample {
    fn type_name(self) -> &'static str {
        match self {
            DefaultSample::AllocSpace => "alloc_space",
            DefaultSample::InuseSpace => "inuse_space",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ProfileOptions {
    pub default_sample: DefaultSample,
    /// Wall time the profile covers (a delta profile), if any.
    pub duration: Option<Duration>,
    /// When the profile was taken.
    pub time: SystemTime,
    /// Mean bytes between sampled calls: per-site values are then estimates, scaled as pprof
    /// scales Go's heap profile (0: every call recorded).
    pub sample_bytes: u64,
}

impl ProfileOptions {
    pub fn new(default_sample: DefaultSample) -> Self {
        ProfileOptions {
            default_sample,
            duration: None,
            time: SystemTime::now(),
            sample_bytes: 0,
        }
    }
}

/// The values of a site, by [`SAMPLE_TYPES`] index; `None` for sites that are no allocation
/// (`free`).
fn values(s: &SiteSnapshot) -> Option<[i64; SAMPLE_TYPES.len()]> {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut v = [0i64; SAMPLE_TYPES.len()];
    // Symbol probes count calls of functions, which are no allocation.
    if s.probe {
        return None;
    }
    match s.kind {
        "free" => return None,
        "map_grow" => {
            v[4] = n(s.calls);
            v[5] = n(s.bytes);
        }
        "slice_grow" => {
            v[6] = n(s.calls);
            v[7] = n(s.bytes);
        }
        "large_alloc" => {
            v[8] = n(s.calls);
            v[9] = n(s.bytes);
        }
        // The malloc family; an unknown kind is an allocation too.
        _ => {
            v[0] = n(s.calls);
            v[1] = n(s.bytes);
            v[2] = n(s.live_allocations);
            v[3] = n(s.live_bytes);
        }
    }
    Some(v)
}

/// What a frame known only by its address is called (perf's word): the address differs in
/// every process and names nothing.
pub const UNKNOWN: &str = "[unknown]";

/// A frame's function name: its symbol, else `module+0xoffset`, else [`UNKNOWN`].
pub fn function_name(f: &Frame) -> String {
    if let Some(func) = &f.function {
        return func.clone();
    }
    match (&f.module, f.offset) {
        (Some(m), Some(off)) => format!("{}+{off:#x}", m.rsplit('/').next().unwrap_or(m)),
        _ => UNKNOWN.to_owned(),
    }
}

#[derive(Default)]
struct Builder {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<Function>,
    function_ids: HashMap<(i64, i64), u64>,
    mappings: Vec<Mapping>,
    mapping_ids: HashMap<(u32, String), u64>,
    locations: Vec<Location>,
    location_ids: HashMap<(u32, u64, Vec<u64>), u64>,
}

impl Builder {
    fn new() -> Self {
        let mut b = Builder::default();
        // The string table starts with "" (index 0 means "unset").
        b.string("");
        b
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.string_ids.get(s) {
            return i;
        }
        let i = self.strings.len() as i64;
        self.strings.push(s.to_string());
        self.string_ids.insert(s.to_string(), i);
        i
    }

    fn function(&mut self, f: &Frame) -> u64 {
        let name = self.string(&function_name(f));
        let file = f.file.as_deref().map_or(0, |p| self.string(p));
        if let Some(&id) = self.function_ids.get(&(name, file)) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        self.functions.push(Function {
            id,
            name,
            system_name: name,
            filename: file,
        });
        self.function_ids.insert((name, file), id);
        id
    }

    /// One mapping per module of a process. The range is derived from the frames' file
    /// offsets (address − offset is where the file's start is mapped).
    fn mapping(&mut self, pid: u32, f: &Frame) -> u64 {
        let Some(module) = &f.module else {
            return 0;
        };
        let start = f
            .offset
            .map_or(f.address, |off| f.address.saturating_sub(off));
        let limit = f.address.saturating_add(1);
        let key = (pid, module.clone());
        if let Some(&id) = self.mapping_ids.get(&key) {
            let m = &mut self.mappings[id as usize - 1];
            // A mapping made before any of its frames ([`Self::first_mapping`]) has no range.
            if m.memory_limit == 0 {
                m.memory_start = start;
            }
            m.memory_start = m.memory_start.min(start);
            m.memory_limit = m.memory_limit.max(limit);
            return id;
        }
        self.new_mapping(pid, module, start, limit)
    }

    fn new_mapping(&mut self, pid: u32, module: &str, start: u64, limit: u64) -> u64 {
        let filename = self.string(module);
        let id = self.mappings.len() as u64 + 1;
        self.mappings.push(Mapping {
            id,
            memory_start: start,
            memory_limit: limit,
            file_offset: 0,
            filename,
            build_id: 0,
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        });
        self.mapping_ids.insert((pid, module.to_string()), id);
        id
    }

    /// Mapping 1, which `go tool pprof` reports as the profile's `File:`: the executable of a
    /// one-process profile; for several processes one without a file (no `File:` line), as no
    /// process's program stands for the node.
    fn first_mapping(&mut self, procs: &[ProcessSnapshot]) {
        match procs {
            [] => {}
            [one] if !one.labels.exe.is_empty() => {
                self.new_mapping(one.pid, &one.labels.exe, 0, 0);
            }
            [_] => {}
            _ => {
                // Keyed by no real pid's module: frames never land in it.
                self.new_mapping(u32::MAX, "", 0, 0);
            }
        }
    }

    /// One location per address of a process: the frames sharing it are the inlined chain,
    /// innermost first, which is pprof's order of `Location.line` too.
    fn location(&mut self, pid: u32, group: &[Frame]) -> u64 {
        let first = &group[0];
        let lines: Vec<u64> = group.iter().map(|f| self.function(f)).collect();
        let key = (pid, first.address, lines.clone());
        if let Some(&id) = self.location_ids.get(&key) {
            return id;
        }
        let mapping_id = self.mapping(pid, first);
        let id = self.locations.len() as u64 + 1;
        self.locations.push(Location {
            id,
            mapping_id,
            address: first.address,
            lines: lines
                .iter()
                .zip(group)
                .map(|(&function_id, f)| Line {
                    function_id,
                    line: i64::from(f.line.unwrap_or(0)),
                })
                .collect(),
            is_folded: false,
        });
        self.location_ids.insert(key, id);
        id
    }

    /// A one-frame stack of a pseudo function (no stack, sites folded away).
    fn named(&mut self, pid: u32, name: &str) -> Vec<u64> {
        let frame = Frame {
            function: Some(name.to_string()),
            ..Frame::unknown(0)
        };
        vec![self.location(pid, std::slice::from_ref(&frame))]
    }

    fn stack(&mut self, pid: u32, frames: &[Frame]) -> Vec<u64> {
        if frames.is_empty() {
            return self.named(pid, "(no stack)");
        }
        frames
            .chunk_by(|a, b| a.address == b.address && a.module == b.module)
            .map(|group| self.location(pid, group))
            .collect()
    }

    fn str_label(&mut self, key: &str, value: &str) -> Label {
        Label {
            key: self.string(key),
            str: self.string(value),
            num: 0,
            num_unit: 0,
        }
    }
}

/// The profile message of the sites of `procs`.
pub fn build(procs: &[ProcessSnapshot], opts: &ProfileOptions) -> Profile {
    let mut b = Builder::new();
    let sample_types: Vec<ValueType> = SAMPLE_TYPES
        .iter()
        .map(|(t, u)| ValueType {
            r#type: b.string(t),
            unit: b.string(u),
        })
        .collect();
    let mut samples = Vec::new();
    b.first_mapping(procs);
    let mut comment = match procs {
        [] => Vec::new(),
        [p] => vec![b.string(&format!(
            "pid {} comm {} exe {}",
            p.pid, p.labels.comm, p.labels.exe
        ))],
        _ => vec![b.string(&format!(
            "{} processes (sample labels pid and comm tell them apart)",
            procs.len()
        ))],
    };
    if opts.sample_bytes > 0 {
        comment.push(b.string(&format!(
            "sampled: one call per {} bytes on average (Poisson); per-stack values are \
             estimates, scaled as Go's heap profile (1/(1-exp(-avg/{})))",
            opts.sample_bytes, opts.sample_bytes
        )));
    }
    for p in procs {
        let l = &p.labels;
        for s in &p.sites {
            let Some(v) = values(s) else { continue };
            if v.iter().all(|&x| x == 0) {
                continue;
            }
            let location_ids = if s.remainder && s.frames.is_empty() {
                b.named(p.pid, "(other sites)")
            } else {
                b.stack(p.pid, &s.frames)
            };
            let mut labels = vec![
                Label {
                    key: b.string("pid"),
                    str: 0,
                    num: i64::from(p.pid),
                    num_unit: 0,
                },
                b.str_label("comm", &l.comm),
                b.str_label("api", s.kind),
            ];
            for (k, val) in [
                ("namespace", &l.namespace),
                ("pod", &l.pod),
                ("container", &l.container),
            ] {
                if !val.is_empty() {
                    labels.push(b.str_label(k, val));
                }
            }
            samples.push(Sample {
                location_ids,
                values: v.to_vec(),
                labels,
            });
        }
    }
    let time_nanos = opts
        .time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let duration_nanos = opts
        .duration
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let period_type = Some(ValueType {
        r#type: b.string("space"),
        unit: b.string("bytes"),
    });
    let total = |i: usize| samples.iter().map(|s: &Sample| s.values[i]).sum::<i64>();
    let default_type = if opts.default_sample == DefaultSample::AllocSpace
        && total(ALLOC_SPACE) == 0
        && total(GO_LARGE_ALLOC_SPACE) > 0
    {
        SAMPLE_TYPES[GO_LARGE_ALLOC_SPACE].0
    } else {
        opts.default_sample.type_name()
    };
    let default_sample_type = b.string(default_type);
    Profile {
        sample_types,
        samples,
        mappings: b.mappings,
        locations: b.locations,
        functions: b.functions,
        string_table: b.strings,
        drop_frames: 0,
        keep_frames: 0,
        time_nanos,
        duration_nanos,
        period_type,
        // Go's heap profile gives its sampling rate here; 1: every event recorded. The values
        // are already scaled either way.
        period: i64::try_from(opts.sample_bytes.max(1)).unwrap_or(i64::MAX),
        comment,
        default_sample_type,
    }
}

/// The gzipped profile of the sites of `procs`, as `go tool pprof` and `/debug/pprof` serve it.
pub fn encode(procs: &[ProcessSnapshot], opts: &ProfileOptions) -> Result<Vec<u8>, PprofError> {
    let raw = build(procs, opts).encode_to_vec();
    let mut gz = GzEncoder::new(
        Vec::with_capacity(raw.len() / 4 + 64),
        Compression::default(),
    );
    gz.write_all(&raw)?;
    Ok(gz.finish()?)
}

/// What happened between two snapshots: calls and bytes of each site minus its earlier
/// values (sites are matched by pid, kind and frames); live values are those of `after`.
/// Processes only in `before` are left out; those only in `after` count in full.
pub fn delta(after: &[ProcessSnapshot], before: &[ProcessSnapshot]) -> Vec<ProcessSnapshot> {
    let earlier: HashMap<u32, &ProcessSnapshot> = before.iter().map(|p| (p.pid, p)).collect();
    after
        .iter()
        .map(|p| {
            let mut p = p.clone();
            // The same pid with other labels is another process: nothing to subtract.
            if let Some(b) = earlier.get(&p.pid).filter(|b| b.labels == p.labels) {
                // The source keys sites by stack, so kind and addresses identify a site.
                let key = |s: &SiteSnapshot| -> (&'static str, Vec<u64>) {
                    (s.kind, s.frames.iter().map(|f| f.address).collect())
                };
                let old: HashMap<(&str, Vec<u64>), (u64, u64)> = b
                    .sites
                    .iter()
                    .map(|s| (key(s), (s.calls, s.bytes)))
                    .collect();
                for s in &mut p.sites {
                    if let Some(&(calls, bytes)) = old.get(&key(s)) {
                        s.calls = s.calls.saturating_sub(calls);
                        s.bytes = s.bytes.saturating_sub(bytes);
                    }
                }
            }
            p
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{path::PathBuf, process::Command};

    use flate2::read::GzDecoder;

    use super::*;
    use crate::model::ProcessLabels;

    fn frame(function: &str, file: &str, line: u32, address: u64) -> Frame {
        Frame {
            function: Some(function.to_string()),
            file: Some(file.to_string()),
            line: Some(line),
            module: Some("/usr/bin/fixture".to_string()),
            offset: Some(address - 0x40_0000),
            address,
        }
    }

    fn site(
        kind: &'static str,
        frames: Vec<Frame>,
        calls: u64,
        bytes: u64,
        live: u64,
    ) -> SiteSnapshot {
        SiteSnapshot {
            kind,
            frames: frames.into(),
            calls,
            bytes,
            live_allocations: live,
            live_bytes: live * 100,
            remainder: false,
            pending: false,
            probe: false,
        }
    }

    fn fixture() -> Vec<ProcessSnapshot> {
        let main = frame("main", "main.c", 40, 0x40_1000);
        let make_buf = frame("make_buffer", "buf.c", 12, 0x40_2000);
        // Inlined into make_buffer at the same address.
        let inlined = frame("grow_inline", "buf.c", 7, 0x40_2000);
        let go_fn = frame("main.fill", "fill.go", 22, 0x40_3000);
        let unknown = Frame {
            module: Some("/lib/libfoo.so".to_string()),
            offset: Some(0x1a2b),
            ..Frame::unknown(0x7f00_0000_1a2b)
        };
        vec![ProcessSnapshot {
            pid: 42,
            labels: ProcessLabels {
                comm: "fixture".into(),
                exe: "/usr/bin/fixture".into(),
                pod: "web-1".into(),
                ..Default::default()
            },
            sites: vec![
                site(
                    "malloc",
                    vec![inlined, make_buf.clone(), main.clone()],
                    10,
                    40_960,
                    3,
                ),
                site("calloc", vec![main.clone()], 5, 500, 0),
                site("free", vec![make_buf, main.clone()], 7, 0, 0),
                site("map_grow", vec![go_fn.clone(), main.clone()], 4, 8_192, 0),
                site("slice_grow", vec![go_fn, main.clone()], 6, 3_000, 0),
                site("malloc", vec![unknown, main], 1, 1_000_000, 1),
            ],
            ..Default::default()
        }]
    }

    fn decode(gz: &[u8]) -> Profile {
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut GzDecoder::new(gz), &mut raw).unwrap();
        Profile::decode(raw.as_slice()).unwrap()
    }

    /// A sampled profile says so (a comment naming the mean) and carries the mean as its
    /// period, as Go's heap profile carries MemProfileRate; an exact one has period 1.
    #[test]
    fn sampled_profile_says_so() {
        let mut opts = ProfileOptions::new(DefaultSample::AllocSpace);
        let p = decode(&encode(&fixture(), &opts).unwrap());
        assert_eq!(p.period, 1);
        assert!(!p.string_table.iter().any(|x| x.starts_with("sampled")));
        opts.sample_bytes = 512 << 10;
        let p = decode(&encode(&fixture(), &opts).unwrap());
        assert_eq!(p.period, 512 << 10);
        let comments: Vec<&str> = p
            .comment
            .iter()
            .map(|&i| p.string_table[i as usize].as_str())
            .collect();
        assert!(
            comments
                .iter()
                .any(|c| c.starts_with("sampled: one call per 524288 bytes")),
            "{comments:?}"
        );
    }

    #[test]
    fn profile_round_trips() {
        let opts = ProfileOptions::new(DefaultSample::InuseSpace);
        let p = decode(&encode(&fixture(), &opts).unwrap());
        let s = |i: i64| p.string_table[i as usize].as_str();
        let types: Vec<(&str, &str)> = p
            .sample_types
            .iter()
            .map(|t| (s(t.r#type), s(t.unit)))
            .collect();
        assert_eq!(types, SAMPLE_TYPES);
        assert_eq!(s(p.default_sample_type), "inuse_space");
        // `free` is left out.
        assert_eq!(p.samples.len(), 5);
        let total = |i: usize| p.samples.iter().map(|x| x.values[i]).sum::<i64>();
        assert_eq!(total(0), 16);
        assert_eq!(total(1), 1_041_460);
        assert_eq!(total(2), 4);
        assert_eq!(total(4), 4);
        assert_eq!(total(5), 8_192);
        assert_eq!(total(7), 3_000);
        // The inlined pair is one location with two lines, innermost first.
        let first = &p.samples[0];
        let loc = &p.locations[first.location_ids[0] as usize - 1];
        let names: Vec<&str> = loc
            .lines
            .iter()
            .map(|l| s(p.functions[l.function_id as usize - 1].name))
            .collect();
        assert_eq!(names, ["grow_inline", "make_buffer"]);
        assert_eq!(first.location_ids.len(), 2);
        // Unnamed frames are named after their module and offset.
        assert!(p.string_table.iter().any(|x| x == "libfoo.so+0x1a2b"));
        let labels: Vec<(&str, String)> = first
            .labels
            .iter()
            .map(|l| {
                let v = if l.str != 0 {
                    s(l.str).to_string()
                } else {
                    l.num.to_string()
                };
                (s(l.key), v)
            })
            .collect();
        assert_eq!(
            labels,
            [
                ("pid", "42".to_string()),
                ("comm", "fixture".to_string()),
                ("api", "malloc".to_string()),
                ("pod", "web-1".to_string())
            ]
        );
    }

    /// One process: `File:` is its executable, one comment names it. Several: no `File:` (no
    /// process stands for the node), one comment for all of them.
    #[test]
    fn header_names_one_process_or_counts_several() {
        let opts = ProfileOptions::new(DefaultSample::AllocSpace);
        let one = build(&fixture(), &opts);
        let file = |p: &Profile| p.string_table[p.mappings[0].filename as usize].clone();
        let comments = |p: &Profile| -> Vec<String> {
            p.comment
                .iter()
                .map(|&i| p.string_table[i as usize].clone())
                .collect()
        };
        assert_eq!(file(&one), "/usr/bin/fixture");
        assert_eq!(comments(&one), ["pid 42 comm fixture exe /usr/bin/fixture"]);
        // The executable's frames use that mapping, with their range.
        let exe_maps = one
            .mappings
            .iter()
            .filter(|m| file_of(&one, m) == "/usr/bin/fixture");
        assert_eq!(exe_maps.clone().count(), 1);
        assert!(
            exe_maps
                .clone()
                .all(|m| m.memory_start == 0x40_0000 && m.memory_limit > 0)
        );

        let mut procs: Vec<ProcessSnapshot> = (0..3)
            .map(|i| {
                let mut p = fixture().remove(0);
                p.pid = 42 + i;
                p
            })
            .collect();
        procs[1].labels.comm = "steady".into();
        let node = build(&procs, &opts);
        assert_eq!(file(&node), "");
        assert_eq!(
            comments(&node),
            ["3 processes (sample labels pid and comm tell them apart)"]
        );
        let dir = std::env::temp_dir().join(format!("allocwatch-node-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.pb.gz");
        std::fs::write(&path, encode(&procs, &opts).unwrap()).unwrap();
        let top = pprof_top(&path, &["-unit=B"]);
        std::fs::remove_dir_all(&dir).ok();
        assert!(!top.contains("File:") && !top.contains("pid 4"), "{top}");
        assert!(top.contains("of 3124380B total"), "{top}");
    }

    fn file_of<'a>(p: &'a Profile, m: &Mapping) -> &'a str {
        &p.string_table[m.filename as usize]
    }

    /// Go's large allocations are their own sample types, never in `alloc_space`; a profile
    /// with nothing else shows them by default.
    #[test]
    fn go_large_allocations_are_named_as_such() {
        let go_fn = frame("main.bigAlloc", "big.go", 9, 0x40_3000);
        let mut procs = fixture();
        procs[0].sites = vec![site("large_alloc", vec![go_fn], 2, 65_536, 0)];
        let p = build(&procs, &ProfileOptions::new(DefaultSample::AllocSpace));
        let s = |i: i64| p.string_table[i as usize].as_str();
        assert_eq!(s(p.default_sample_type), "go_large_alloc_space");
        let i = |name: &str| SAMPLE_TYPES.iter().position(|t| t.0 == name).unwrap();
        assert_eq!(p.samples[0].values[i("go_large_alloc_space")], 65_536);
        assert_eq!(p.samples[0].values[i("go_large_allocs")], 2);
        assert_eq!(p.samples[0].values[i("alloc_space")], 0);
        // With malloc-family allocations too, `alloc_space` stays the default.
        let mixed = build(&fixture(), &ProfileOptions::new(DefaultSample::AllocSpace));
        assert_eq!(
            mixed.string_table[mixed.default_sample_type as usize],
            "alloc_space"
        );
    }

    #[test]
    fn delta_subtracts_matching_sites() {
        let before = fixture();
        let mut after = fixture();
        after[0].sites[0].calls += 2;
        after[0].sites[0].bytes += 8192;
        let d = delta(&after, &before);
        assert_eq!(d[0].sites[0].calls, 2);
        assert_eq!(d[0].sites[0].bytes, 8192);
        assert_eq!(
            d[0].sites[0].live_allocations, 3,
            "live values are the later ones"
        );
        assert_eq!(d[0].sites[1].calls, 0);
        // Another process under the same pid: nothing subtracted.
        after[0].labels.comm = "other".into();
        assert_eq!(delta(&after, &before)[0].sites[1].calls, 5);
    }

    #[test]
    fn empty_profile_is_valid() {
        let p = decode(&encode(&[], &ProfileOptions::new(DefaultSample::AllocSpace)).unwrap());
        assert!(p.samples.is_empty());
        assert_eq!(p.sample_types.len(), SAMPLE_TYPES.len());
    }

    /// A Go toolchain cached by `./x setup` (DESIGN.md §2).
    pub(crate) fn cached_go() -> Option<(PathBuf, PathBuf)> {
        let home = std::env::var_os("HOME")?;
        let dir = PathBuf::from(home).join(".cache/allocwatch/go");
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("go")))
            .filter(|root| root.join("bin/go").is_file())
            .collect();
        found.sort();
        let root = found.pop()?;
        Some((root.join("bin/go"), root))
    }

    /// `go tool pprof -top` of a profile (a file or a URL), with the given extra arguments.
    pub(crate) fn pprof_top(source: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> String {
        let Some((go, root)) = cached_go() else {
            panic!(
                "no Go toolchain in ~/.cache/allocwatch/go: run ./x setup (it caches the Go \
                 toolchains the tests use)"
            );
        };
        let out = Command::new(&go)
            .env("GOROOT", &root)
            .env("GOTOOLCHAIN", "local")
            // pprof keeps a copy of fetched profiles in $PPROF_TMPDIR (default ~/pprof).
            .env(
                "PPROF_TMPDIR",
                std::env::temp_dir().join("allocwatch-pprof-tmp"),
            )
            .args(["tool", "pprof", "-top", "-nodecount=100"])
            .args(args)
            .arg(source)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", go.display()));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "go tool pprof failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    #[test]
    fn go_tool_pprof_reads_it() {
        let dir = std::env::temp_dir().join(format!("allocwatch-pprof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("allocs.pb.gz");
        let opts = ProfileOptions::new(DefaultSample::AllocSpace);
        std::fs::write(&file, encode(&fixture(), &opts).unwrap()).unwrap();

        let top = pprof_top(&file, &["-sample_index=alloc_space", "-unit=B"]);
        // Total of alloc_space: 40960 + 500 + 1000000 bytes.
        assert!(top.contains("of 1041460B total"), "{top}");
        for f in ["grow_inline", "main", "libfoo.so+0x1a2b"] {
            assert!(top.contains(f), "{f} missing in\n{top}");
        }
        let top = pprof_top(&file, &["-sample_index=alloc_objects"]);
        assert!(top.contains("of 16 total"), "{top}");
        let top = pprof_top(&file, &["-sample_index=map_grow_space", "-unit=B"]);
        assert!(
            top.contains("of 8192B total") && top.contains("main.fill"),
            "{top}"
        );
        let top = pprof_top(&file, &["-sample_index=slice_grows"]);
        assert!(
            top.contains("of 6 total") && top.contains("main.fill"),
            "{top}"
        );
        let top = pprof_top(
            &file,
            &[
                "-sample_index=inuse_space",
                "-unit=B",
                "-tagfocus=pod=web-1",
            ],
        );
        assert!(top.contains("of 400B total"), "{top}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
