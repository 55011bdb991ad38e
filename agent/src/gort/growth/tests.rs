//! Tests of the growth arithmetic: per-version rules, and the capacities real fixtures print.

use super::map::*;
use super::size_class::*;
use super::slice::*;
use super::*;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn v(raw: &str) -> GoVersion {
    GoVersion::parse(raw).unwrap()
}

const INT: TypeInfo = TypeInfo {
    size: 8,
    has_pointers: false,
};
const PTR: TypeInfo = TypeInfo {
    size: 8,
    has_pointers: true,
};
/// `map[int]int` old-map bucket: tophash 8 + 8 keys + 8 elems + overflow (a uintptr, as
/// neither key nor elem has pointers).
const INT_BUCKET: TypeInfo = TypeInfo {
    size: 144,
    has_pointers: false,
};
/// `map[int]int` swiss group: 8 control bytes + 8 × (key, elem).
const INT_GROUP: TypeInfo = TypeInfo {
    size: 136,
    has_pointers: false,
};

#[test]
fn lookup_tables_give_the_smallest_class_that_fits() {
    for size in 1..=MAX_SMALL_SIZE {
        let slot = size_class(size).unwrap();
        let below = CLASS_TO_SIZE
            .iter()
            .map(|&c| u64::from(c))
            .filter(|&c| c < slot)
            .max()
            .unwrap_or(0);
        assert!(below < size && size <= slot, "size {size}: slot {slot}");
    }
    assert_eq!(size_class(MAX_SMALL_SIZE + 1), None);
}

#[test]
fn roundupsize_per_version() {
    let (old, new) = (v("go1.19.8"), v("go1.23.9"));
    for (size, want) in [
        (1, 8),
        (9, 16),
        (17, 24),
        (33, 48),
        (1017, 1024),
        (1025, 1152),
        (32768, 32768),
        (32769, 40960),
    ] {
        assert_eq!(roundupsize(size, true, &old), want, "{size}");
        assert_eq!(roundupsize(size, true, &new), want, "{size}");
        assert_eq!(roundupsize(size, false, &old), want, "{size}");
    }
    // Pointerful objects over 512 bytes carry an 8-byte header from Go 1.22 on.
    assert_eq!(roundupsize(512, false, &new), 512);
    assert_eq!(roundupsize(513, false, &new), 568);
    assert_eq!(roundupsize(1024, false, &new), 1144);
    assert_eq!(roundupsize(1024, false, &v("go1.22.10")), 1144);
    assert_eq!(
        roundupsize(1024, false, &v("go1.22.1 X:noallocheaders")),
        1024
    );
    assert_eq!(roundupsize(1024, false, &v("go1.21.13")), 1024);
    assert_eq!(roundupsize(32760, false, &new), 32760);
    // Past the header-adjusted small limit: whole pages, no header.
    assert_eq!(roundupsize(32761, false, &new), 32768);
    assert_eq!(heap_reserved(32761, true, &new), 32768);
    assert_eq!(heap_reserved(1144, true, &new), 1152);
    assert_eq!(heap_reserved(1144, false, &new), 1152);
    assert_eq!(heap_reserved(1152, true, &new), 1280);
    assert_eq!(heap_reserved(1152, true, &old), 1152);
    assert_eq!(heap_reserved(40000, true, &new), 40960);
    assert_eq!(heap_reserved(0, true, &new), 0);
}

fn grow(old_cap: u64, new_len: u64, elem: TypeInfo, raw: &str) -> SliceGrowth {
    growslice(old_cap, new_len, elem, &v(raw)).unwrap()
}

#[test]
fn growslice_rules_per_version() {
    // Before Go 1.18: double below 1024, then +25%.
    assert_eq!(grow(512, 513, INT, "go1.17.13").new_cap, 1024);
    assert_eq!(grow(1024, 1025, INT, "go1.17.13").new_cap, 1280);
    // Since: smooth from 256 (512 + (512+768)/4 = 832, rounded to 6784 bytes).
    let g = grow(512, 513, INT, "go1.18.10");
    assert_eq!(
        (g.new_cap, g.heap.requested, g.heap.reserved),
        (848, 6784, 6784)
    );
    // Appending many at once takes the new length, then rounds.
    assert_eq!(grow(4, 13, INT, "go1.23.9").new_cap, 14);
    // 8-byte pointers: the malloc header shows in the capacity from Go 1.22.
    let g = grow(64, 65, PTR, "go1.23.9");
    assert_eq!(
        (g.new_cap, g.heap.requested, g.heap.reserved),
        (143, 1144, 1152)
    );
    let g = grow(64, 65, PTR, "go1.21.13");
    assert_eq!(
        (g.new_cap, g.heap.requested, g.heap.reserved),
        (128, 1024, 1024)
    );
    // Power-of-two elements: Go 1.19 asks mallocgc for the whole class, 1.20+ for
    // cap*size (2560 of a 2688 slot).
    let big = TypeInfo {
        size: 256,
        has_pointers: false,
    };
    let g = grow(5, 6, big, "go1.19.8");
    assert_eq!(
        (g.new_cap, g.heap.requested, g.heap.reserved),
        (10, 2688, 2688)
    );
    let g = grow(5, 6, big, "go1.20.14");
    assert_eq!(
        (g.new_cap, g.heap.requested, g.heap.reserved),
        (10, 2560, 2688)
    );
    // Other sizes likewise (24-byte elements, 3 → 8 bytes... 6 × 24 = 144 fits a class).
    let rec = TypeInfo {
        size: 24,
        has_pointers: false,
    };
    let g = grow(512, 513, rec, "go1.19.8");
    assert_eq!((g.new_cap, g.heap.requested), (853, 20480));
    let g = grow(512, 513, rec, "go1.23.9");
    assert_eq!(
        (g.new_cap, g.heap.requested, g.heap.reserved),
        (853, 20472, 20480)
    );
    // Bytes: capacity is the size class itself.
    let byte = TypeInfo {
        size: 1,
        has_pointers: false,
    };
    assert_eq!(grow(0, 1, byte, "go1.27.3").new_cap, 8);
    // Large: whole pages.
    let g = grow(9216, 9217, INT, "go1.27.3");
    assert_eq!((g.new_cap, g.heap.reserved), (12288, 98304));
    // Zero-size elements allocate nothing.
    let zst = TypeInfo {
        size: 0,
        has_pointers: false,
    };
    assert_eq!(grow(3, 7, zst, "go1.27.3").heap, HeapBytes::default());
    assert_eq!(grow(3, 7, zst, "go1.27.3").new_cap, 7);
}

/// The mallocgc sizes of an append loop's growslice calls, from cap 0 (or, with a stack
/// buffer of `buf` elements, from the first growth past it).
fn requested_chain(n: u64, elem: TypeInfo, buf: u64, raw: &str) -> Vec<u64> {
    let go = v(raw);
    let mut cap = 0;
    let mut sizes = Vec::new();
    for len in 1..=n {
        if len > cap {
            if len <= buf {
                cap = growslice_buf_cap(len, elem, &go).unwrap();
            } else {
                let g = growslice(cap, len, elem, &go).unwrap();
                sizes.push(g.heap.requested);
                cap = g.new_cap;
            }
        }
    }
    sizes
}

#[test]
fn growslice_requested_bytes_match_what_mallocgc_received() {
    // Measured here with bpftrace on the fixture: the size argument of the first mallocgc
    // entry after each growslice entry on the same thread (modes ptrs, nodes, structs).
    let node = TypeInfo {
        size: 24,
        has_pointers: true,
    };
    let rec = TypeInfo {
        size: 24,
        has_pointers: false,
    };
    let pow2 = [8, 16, 32, 64, 128, 256, 512];
    let ptrs_19: Vec<u64> = pow2
        .iter()
        .copied()
        .chain([1024, 2048, 4096, 6784, 10240])
        .collect();
    let ptrs_23: Vec<u64> = pow2
        .iter()
        .copied()
        .chain([1144, 2296, 4856, 8184])
        .collect();
    assert_eq!(requested_chain(1000, PTR, 0, "go1.19.8"), ptrs_19);
    assert_eq!(requested_chain(1000, PTR, 0, "go1.23.9"), ptrs_23);
    assert_eq!(
        requested_chain(1000, PTR, 4, "go1.27.3"),
        ptrs_23[3..].to_vec()
    );
    let small = [24, 48, 96, 192, 384];
    let nodes_19: Vec<u64> = small
        .iter()
        .copied()
        .chain([768, 1536, 3072, 6144, 12288, 20480, 32768])
        .collect();
    let nodes_23: Vec<u64> = small
        .iter()
        .copied()
        .chain([888, 1776, 4080, 8184, 16368, 27240])
        .collect();
    assert_eq!(requested_chain(1000, node, 0, "go1.19.8"), nodes_19);
    assert_eq!(requested_chain(1000, node, 0, "go1.23.9"), nodes_23);
    // Without pointers 1.19 and 1.23 agree on capacities, not on bytes: 1.19 asks for the
    // whole size class, 1.20+ for cap*size.
    assert_eq!(requested_chain(1000, rec, 0, "go1.19.8"), nodes_19);
    let structs_23: Vec<u64> = small
        .iter()
        .copied()
        .chain([768, 1536, 3072, 6144, 12288, 20472, 32760])
        .collect();
    assert_eq!(requested_chain(1000, rec, 0, "go1.23.9"), structs_23);
}

#[test]
fn growslice_rejects_what_go_cannot_do() {
    let go = v("go1.27.3");
    assert!(matches!(
        growslice(1, 1 << 62, INT, &go),
        Err(GrowthError::TooLarge { .. })
    ));
    assert!(matches!(
        growslice(8, 8, INT, &go),
        Err(GrowthError::BadInput { .. })
    ));
    assert!(matches!(
        growslice(0, u64::MAX, INT, &go),
        Err(GrowthError::BadInput { .. })
    ));
    assert!(matches!(
        growslice(0, 1, INT, &v("go1.16.15")),
        Err(GrowthError::Unsupported(Unsupported::TooOld { .. }))
    ));
    assert!(matches!(
        growslice(0, 1, INT, &v("go1.30.1")),
        Err(GrowthError::Unsupported(Unsupported::TooNew { .. }))
    ));
}

#[test]
fn move_slice_variants() {
    let go = v("go1.27.3");
    let rec = TypeInfo {
        size: 24,
        has_pointers: false,
    };
    let node = TypeInfo {
        size: 24,
        has_pointers: true,
    };
    // NoCapNoScan: 72 bytes → 80-byte class, asks for 80, capacity 3.
    let m = move_slice(3, None, rec, &go).unwrap();
    assert_eq!((m.new_cap, m.heap.requested, m.heap.reserved), (3, 80, 80));
    // NoCap: asks for cap*size.
    let m = move_slice(3, None, node, &go).unwrap();
    assert_eq!((m.new_cap, m.heap.requested, m.heap.reserved), (3, 72, 80));
    // With a capacity: exactly cap*size.
    let m = move_slice(1, Some(4), PTR, &go).unwrap();
    assert_eq!((m.new_cap, m.heap.requested, m.heap.reserved), (4, 32, 32));
    assert_eq!(move_slice(0, None, rec, &go).unwrap().heap.allocations, 0);
    assert!(matches!(
        move_slice(3, None, rec, &v("go1.25.5")),
        Err(GrowthError::NotInVersion { .. })
    ));
}

/// (count, B) at every hashGrow entry while inserting `keys` distinct int keys into a
/// `make(map[int]int)`, as the runtime calls it: when `overLoadFactor(count+1, B)`
/// (load factor 6.5, or 6 on Go 1.21), written out here independently of versions.rs.
fn simulate_inserts(keys: u64, raw: &str) -> Vec<(u64, u8, HashGrow)> {
    let go = v(raw);
    let load = |b: u8| -> u64 {
        let den_buckets = (1u64 << b) / 2;
        if go.minor == 21 {
            12 * den_buckets
        } else {
            13 * den_buckets
        }
    };
    let mut b = 0u8;
    let mut grows = Vec::new();
    for count in 0..keys {
        if count + 1 > 8 && count + 1 > load(b) {
            let g = hash_grow(count, b, INT_BUCKET, &go).unwrap();
            assert_eq!(g.kind, MapGrowKind::Double, "{raw} ({count},{b})");
            grows.push((count, b, g));
            b = g.new_b;
        }
    }
    grows
}

#[test]
fn hash_grow_sequences_for_the_fixture_maps() {
    // mallocgc sizes of the 14 new bucket arrays of map_big, measured here with bpftrace
    // (first mallocgc after each hashGrow entry) on go1.19.8 and go1.23.9.
    let measured_bytes: [u64; 14] = [
        288, 576, 1152, 2592, 5328, 10_224, 20_448, 40_896, 81_792, 163_728, 319_392, 630_720,
        1_253_376, 2_506_752,
    ];
    for raw in ["go1.19.8", "go1.23.9", "go1.25.5 X:noswissmap"] {
        let grows = simulate_inserts(70_000, raw);
        assert_eq!(grows.len(), 14, "{raw}");
        let points: Vec<(u64, u8)> = grows.iter().map(|&(c, b, _)| (c, b)).collect();
        // Measured with bpftrace (versions.rs sources): (8,0), (13,1), (26,2) … (53248,13).
        let mut want = vec![(8, 0)];
        want.extend((1..=13).map(|b| (13u64 << (b - 1), b)));
        assert_eq!(points, want, "{raw}");
        let bytes: Vec<u64> = grows.iter().map(|g| g.2.heap.requested).collect();
        assert_eq!(bytes, measured_bytes, "{raw}");
        let huge = simulate_inserts(430_000, raw);
        assert_eq!(huge.len(), 17, "{raw}");
        let last = huge.last().unwrap();
        assert_eq!((last.0, last.1, last.2.new_b), (425_984, 16, 17), "{raw}");
    }
    // Go 1.21: load factor 6 (49152 at B=13), still 14 and 17 grows.
    let grows = simulate_inserts(70_000, "go1.21.13");
    assert_eq!(grows.len(), 14);
    assert_eq!((grows[1].0, grows[1].1), (12, 1));
    assert_eq!((grows[13].0, grows[13].1), (49_152, 13));
    assert_eq!(simulate_inserts(430_000, "go1.21.13").len(), 17);
}

#[test]
fn hash_grow_bucket_arrays() {
    let go = v("go1.23.9");
    let at = |count, b| hash_grow(count, b, INT_BUCKET, &go).unwrap();
    // Doublings: (newB, buckets incl. preallocated overflow, requested, reserved).
    for (count, b, want) in [
        (8, 0, (1, 2, 288, 288)),
        (52, 3, (4, 18, 2592, 2688)),
        (104, 4, (5, 37, 5328, 5376)),
        (53_248, 13, (14, 17_408, 2_506_752, 2_506_752)),
        (425_984, 16, (17, 139_264, 20_054_016, 20_054_016)),
    ] {
        let g = at(count, b);
        assert_eq!(g.kind, MapGrowKind::Double);
        assert_eq!(
            (g.new_b, g.buckets, g.heap.requested, g.heap.reserved),
            want,
            "({count},{b})"
        );
        assert_eq!(g.overflow_buckets, g.buckets - (1 << g.new_b));
    }
    // Below the load factor: a same-size grow (too many overflow buckets).
    let g = at(100, 6);
    assert_eq!((g.kind, g.old_b, g.new_b), (MapGrowKind::SameSize, 6, 6));
    assert_eq!(
        (g.buckets, g.heap.requested, g.heap.reserved),
        (71, 10_224, 10_240)
    );
    assert_eq!(g.kind.as_str(), "same_size");
    // Pointerful buckets (map[string]struct{}: 8 + 8 × 16 + 8) get the header from 1.22.
    let set = TypeInfo {
        size: 144,
        has_pointers: true,
    };
    let g = hash_grow(52, 3, set, &go).unwrap();
    assert_eq!(
        (g.buckets, g.heap.requested, g.heap.reserved),
        (18, 2592, 2688)
    );
    let g = hash_grow(104, 4, set, &go).unwrap();
    assert_eq!(
        (g.buckets, g.heap.requested, g.heap.reserved),
        (37, 5328, 5376)
    );
    assert!(matches!(
        hash_grow(8, 0, INT_BUCKET, &v("go1.25.5")),
        Err(GrowthError::WrongMaps { .. })
    ));
}

#[test]
fn swiss_growth_sizes() {
    // The mallocgc sizes below were measured here with bpftrace on map_big (go1.25.5,
    // go1.27.3): growToTable 32, 272, 8; grow 32 + n/8 × 136; split 32, 17408, 32, 17408;
    // installTableSplit 16, 32, 64 … 1024 as the directory doubles from 1 to 128 entries.
    for raw in ["go1.24.11", "go1.25.5", "go1.27.3"] {
        let go = v(raw);
        let small = swiss_grow_to_small(INT_GROUP, &go).unwrap();
        assert_eq!(
            (small.kind.as_str(), small.old_size, small.new_size),
            ("small", 0, 8)
        );
        assert_eq!(
            small.heap,
            HeapBytes {
                requested: 136,
                reserved: 144,
                allocations: 1
            }
        );
        // Table struct 32 + 2 groups (272 → 288) + 1-entry directory 8.
        let table = swiss_grow_to_table(INT_GROUP, &go).unwrap();
        assert_eq!((table.kind.as_str(), table.new_size), ("to_table", 16));
        assert_eq!(
            table.heap,
            HeapBytes {
                requested: 312,
                reserved: 328,
                allocations: 3
            }
        );
        let g = swiss_table_grow(16, 32, INT_GROUP, &go).unwrap();
        assert_eq!((g.kind.as_str(), g.old_size, g.new_size), ("grow", 16, 32));
        assert_eq!((g.heap.requested, g.heap.reserved), (32 + 544, 32 + 576));
        let g = swiss_table_grow(512, 1024, INT_GROUP, &go).unwrap();
        assert_eq!(
            (g.heap.requested, g.heap.reserved),
            (32 + 17_408, 32 + 18_432)
        );
        let s = swiss_table_split(INT_GROUP, &go).unwrap();
        assert_eq!(
            (s.kind.as_str(), s.old_size, s.new_size),
            ("split", 1024, 2048)
        );
        assert_eq!(
            s.heap,
            HeapBytes {
                requested: 2 * (32 + 17_408),
                reserved: 2 * (32 + 18_432),
                allocations: 4
            }
        );
        // Directory: doubles only when the split table was at the global depth; a
        // 128-entry directory (1024 bytes of pointers) gets the malloc header.
        assert_eq!(swiss_install_split(1, 2, 4, &go).unwrap(), None);
        let d = swiss_install_split(0, 0, 1, &go).unwrap().unwrap();
        assert_eq!(
            (d.kind.as_str(), d.old_size, d.new_size),
            ("dir_grow", 1, 2)
        );
        assert_eq!((d.heap.requested, d.heap.reserved), (16, 16));
        let d = swiss_install_split(6, 6, 64, &go).unwrap().unwrap();
        assert_eq!((d.heap.requested, d.heap.reserved), (1024, 1152));
        // A group with pointers (200 bytes, seen in the runtime's own maps): 4 groups are
        // 800 bytes + the malloc header → an 896-byte slot.
        let ptr_group = TypeInfo {
            size: 200,
            has_pointers: true,
        };
        let g = swiss_table_grow(16, 32, ptr_group, &go).unwrap();
        assert_eq!((g.heap.requested, g.heap.reserved), (32 + 800, 32 + 896));
        assert!(matches!(
            swiss_table_grow(1024, 2048, INT_GROUP, &go),
            Err(GrowthError::BadInput { .. })
        ));
    }
    for raw in ["go1.23.9", "go1.25.5 X:noswissmap"] {
        assert!(matches!(
            swiss_grow_to_small(INT_GROUP, &v(raw)),
            Err(GrowthError::WrongMaps { .. })
        ));
    }
}

// ---- ground truth: the fixture prints the capacities it saw ----

struct Toolchain {
    version: String,
    goroot: PathBuf,
    go: PathBuf,
}

fn cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("ALLOCWATCH_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").expect("HOME is not set");
    Path::new(&home).join(".cache/allocwatch")
}

/// Every cached toolchain; fails (never skips) when the setup has not installed them.
fn toolchains() -> Vec<Toolchain> {
    let manifest = cache().join("go/toolchains.tsv");
    let text = fs::read_to_string(&manifest).unwrap_or_else(|e| {
        panic!(
            "Go toolchains are not set up ({}: {e}): run the setup (xtask/src/go.rs \
             ensure_toolchains) first",
            manifest.display()
        )
    });
    let list: Vec<Toolchain> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(cols.len(), 3, "{}: bad line {line:?}", manifest.display());
            let tc = Toolchain {
                version: cols[0].to_owned(),
                goroot: PathBuf::from(cols[1]),
                go: PathBuf::from(cols[2]),
            };
            assert!(tc.go.exists(), "{} is listed but missing", tc.go.display());
            tc
        })
        .collect();
    for minor in ["1.19.", "1.23.", "1.27."] {
        assert!(
            list.iter().any(|t| t.version.starts_with(minor)),
            "no Go {minor}x toolchain in {}: rerun the setup",
            manifest.display()
        );
    }
    list
}

fn go_command(tc: &Toolchain) -> Command {
    let mut cmd = Command::new(&tc.go);
    cmd.env("GOROOT", &tc.goroot)
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .env("GOCACHE", cache().join("go-build").join(&tc.version))
        .env("GOPATH", cache().join("gopath"))
        .env("CGO_ENABLED", "0")
        .env_remove("GOEXPERIMENT");
    cmd
}

/// A plain build of the fixture of its own (gort/tests.rs builds the shared ones; a name
/// of our own keeps concurrent test threads from writing the same file).
fn build_fixture(tc: &Toolchain) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let src = repo.join("fixtures/go/growth");
    let dir = repo.join("target/gofixtures");
    fs::create_dir_all(&dir).expect("create target/gofixtures");
    let out = dir.join(format!("growth-caps-{}", tc.version));
    let tmp = dir.join(format!(
        "growth-caps-{}.{}.tmp",
        tc.version,
        std::process::id()
    ));
    let status = go_command(tc)
        .current_dir(&src)
        .args(["build", "-buildvcs=false", "-o"])
        .arg(&tmp)
        .arg(".")
        .status()
        .expect("run go build");
    assert!(
        status.success(),
        "go {} build of {}",
        tc.version,
        src.display()
    );
    fs::rename(&tmp, &out).expect("rename fixture");
    out
}

/// Whether `main.<func>` calls runtime.growsliceBuf (Go ≥ 1.26 may start an append loop
/// in a stack buffer when the loop reads the capacity), from the binary itself.
fn uses_stack_buffer(tc: &Toolchain, bin: &Path, func: &str) -> bool {
    let out = go_command(tc)
        .args(["tool", "objdump", "-s", &format!("^main\\.{func}$")])
        .arg(bin)
        .output()
        .expect("run go tool objdump");
    assert!(
        out.status.success(),
        "objdump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("TEXT main.{func}(")),
        "{func} not in {}",
        bin.display()
    );
    text.contains("CALL runtime.growsliceBuf(SB)")
}

/// The capacities an append loop of `n` single appends goes through, from growslice
/// alone (oldCap → newCap from 0 with newLen = oldCap + 1), or with a stack buffer of
/// `buf` elements first.
fn modelled_caps(n: u64, elem: TypeInfo, buf: Option<u64>, go: &GoVersion) -> Vec<u64> {
    let mut caps = Vec::new();
    let mut cap = 0;
    for len in 1..=n {
        if len > cap {
            cap = match buf {
                Some(k) if len <= k => growslice_buf_cap(len, elem, go).unwrap(),
                _ => growslice(cap, len, elem, go).unwrap().new_cap,
            };
            caps.push(cap);
        }
    }
    caps
}

#[test]
fn growslice_reproduces_the_capacities_the_fixture_prints() {
    // (mode, function, elements appended, element type), as in fixtures/go/growth.
    let rec = TypeInfo {
        size: 24,
        has_pointers: false,
    };
    let node = TypeInfo {
        size: 24,
        has_pointers: true,
    };
    let byte = TypeInfo {
        size: 1,
        has_pointers: false,
    };
    let cases = [
        ("ints", "appendInts", 10_000, INT),
        ("structs", "appendStructs", 1000, rec),
        ("bytes", "appendBytes", 10_000, byte),
        ("ptrs", "appendPointers", 1000, PTR),
        ("nodes", "appendNodes", 1000, node),
    ];
    for tc in toolchains() {
        let go = v(&format!("go{}", tc.version));
        let bin = build_fixture(&tc);
        let out = Command::new(&bin)
            .args(cases.iter().map(|c| c.0))
            .output()
            .expect("run fixture");
        assert!(out.status.success(), "{}", bin.display());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let printed: BTreeMap<&str, Vec<u64>> = stdout
            .lines()
            .filter_map(|l| l.split_once(" caps="))
            .map(|(mode, caps)| {
                let caps = caps
                    .split(',')
                    .map(|c| {
                        c.parse()
                            .unwrap_or_else(|_| panic!("Go {}: caps={caps}", tc.version))
                    })
                    .collect();
                (mode, caps)
            })
            .collect();
        for (mode, func, n, elem) in cases {
            let buffered = uses_stack_buffer(&tc, &bin, func);
            // growsliceBuf exists from Go 1.26; measured on go1.27.3: every loop here uses
            // it (they read cap() and escape once, at the sink) except appendInts.
            assert_eq!(
                buffered,
                go.at_least(1, 26) && func != "appendInts",
                "Go {} {func}",
                tc.version
            );
            let buf = buffered.then(|| APPEND_STACK_BUFFER_BYTES / elem.size);
            let want = modelled_caps(n, elem, buf, &go);
            let got = printed
                .get(mode)
                .unwrap_or_else(|| panic!("Go {}: no `{mode} caps=` in {stdout}", tc.version));
            assert_eq!(got, &want, "Go {} {mode}", tc.version);
        }
    }
}
