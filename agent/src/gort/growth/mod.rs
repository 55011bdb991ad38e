//! Exact growth facts from what an entry probe sees: given the arguments a runtime function
//! receives and the Go version, the capacities and heap bytes that Go version's runtime
//! computes. Pure functions, no I/O: the probes only read registers and a few fields at entry
//! (never return values, see `versions.rs`), and everything else follows from the runtime's
//! own arithmetic, reproduced here per version.
//!
//! Two byte counts are given for every growth ([`HeapBytes`]): `requested`, the sizes passed to
//! `mallocgc` (what a mallocgc probe sees for the same allocations), and `reserved`, the heap
//! the allocator really hands out for them (size-class slot, including the 8-byte malloc header
//! of Go ≥ 1.22, or whole pages for large objects).
//!
//! Sources, all linux/amd64, read per version: the cached toolchains' own `$GOROOT/src`
//! (go1.19.8, go1.23.9, go1.25.5, go1.27.3); for go1.17 (old growth rule), go1.20 (first with
//! the `capmem` recompute) and go1.22 (malloc headers as an experiment) copies of those
//! versions' golang/go files found in public repositories. Checked against real runs (see the
//! tests): the fixture's printed capacities on every cached toolchain, and mallocgc sizes
//! after growslice, hashGrow and the swiss-map functions measured with bpftrace.
//! - `runtime/slice.go` `growslice` / `nextslicecap` (threshold 1024 and `newcap/4` before Go
//!   1.18, threshold 256 and `(newcap + 3*256)/4` since; since Go 1.20 `capmem` is recomputed
//!   from the rounded capacity), `growsliceBuf` and `moveSlice*` (Go ≥ 1.26).
//! - `runtime/msize.go` `roundupsize` (Go ≥ 1.22: `msize_allocheaders.go`, then `msize.go`
//!   with the `noscan` argument) and `runtime/malloc.go` `mallocgc`.
//! - `runtime/sizeclasses.go` (≤ 1.24) / `internal/runtime/gc/sizeclasses.go` (≥ 1.25): the
//!   68 size classes. `class_to_size`, `size_to_class8` and `size_to_class128` are identical in
//!   go1.19.8, go1.23.9, go1.25.5 and go1.27.3 (compared byte for byte); the tables below are
//!   copied from go1.27.3.
//! - `runtime/mbitmap.go` / `internal/runtime/gc/malloc.go`: `mallocHeaderSize = 8`,
//!   `minSizeForMallocHeader = 8 * 64 = 512`. Malloc headers are GOEXPERIMENT `allocheaders`,
//!   on by default in Go 1.22 (`internal/buildcfg/exp.go` go1.22.0; `X:noallocheaders` turns
//!   it off) and unconditional from Go 1.23.
//! - `runtime/map.go` (`map_noswiss.go` in 1.24/1.25) `hashGrow`, `makeBucketArray`,
//!   `overLoadFactor` (via [`versions::RuntimeFunc::hash_grow_doubles`]).
//! - `internal/runtime/maps/map.go`, `table.go`, `group.go` go1.25.5 and go1.27.3 (the
//!   functions below are identical but for names): `growToSmall`, `growToTable`,
//!   `(*table).grow`, `(*table).split`, `installTableSplit`.//!
//! - [`size_class`]: the allocator's size classes, `roundupsize` and the heap a request takes.
//! - [`slice`]: `growslice` and the Go ≥ 1.26 stack-buffer moves.
//! - [`map`]: old bucket maps (`hashGrow`) and swiss maps.

mod map;
mod size_class;
mod slice;
#[cfg(test)]
mod tests;

pub use map::{
    hash_grow, swiss_grow_to_small, swiss_grow_to_table, swiss_install_split, swiss_table_grow,
    swiss_table_split,
};
pub use size_class::heap_reserved;
pub use slice::{growslice, move_slice};

use super::buildinfo::GoVersion;
use super::versions::{self, MapImpl, Unsupported};

/// `_type`/`abi.Type` field offsets the slice probe needs, identical in every Go ≥ 1.17:
/// `size`/`Size_` @0 and `ptrdata`/`PtrBytes` @8 (`runtime/type.go` go1.19.8,
/// `internal/abi/type.go` go1.21 … go1.27.3). The element type has pointers iff
/// `PtrBytes != 0`.
pub const TYPE_SIZE_OFFSET: u16 = 0;
pub const TYPE_PTR_BYTES_OFFSET: u16 = 8;
/// Map type offsets (old `maptype`/`abi.OldMapType` and swiss `abi.MapType` alike): the bucket
/// or group `*Type` @64. Whether buckets/groups hold pointers is `*(*(t+64) + 8) != 0`.
pub const MAP_TYPE_BUCKET_OFFSET: u16 = 64;
/// `maxAlloc` on linux/amd64: `1 << heapAddrBits` with 48 address bits (`runtime/malloc.go`).
pub(super) const MAX_ALLOC: u64 = 1 << 48;
pub(super) const PTR_SIZE: u64 = 8;
/// `cmd/compile` `-d=variablemakethreshold` default (base/flag.go go1.27.3): the stack buffer
/// a Go ≥ 1.26 append loop may start in holds `32 / elemSize` elements.
pub const APPEND_STACK_BUFFER_BYTES: u64 = 32;

/// Why a growth could not be computed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrowthError {
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    #[error("Go {version} has {has:?} maps, not {wanted:?}")]
    WrongMaps {
        version: String,
        has: MapImpl,
        wanted: MapImpl,
    },
    #[error("Go {version} has no {what} (Go {since} or newer)")]
    NotInVersion {
        version: String,
        what: &'static str,
        since: &'static str,
    },
    /// Go itself would panic ("growslice: len out of range"): the probe read garbage, or the
    /// program is about to crash.
    #[error("{what}: {bytes_hint} exceeds what Go can allocate")]
    TooLarge { what: &'static str, bytes_hint: u64 },
    /// Values a real call cannot have (e.g. a growslice whose new length fits the old cap).
    #[error("implausible {what}: {detail}")]
    BadInput { what: &'static str, detail: String },
}

/// An element, bucket or group type as the probe reads it: `Size_` and `PtrBytes != 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeInfo {
    pub size: u64,
    pub has_pointers: bool,
}

/// Heap bytes of one growth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapBytes {
    /// Sum of the sizes passed to `mallocgc`.
    pub requested: u64,
    /// Sum of what the allocator hands out for them: the size-class slot (with the malloc
    /// header when there is one) or whole pages. Allocations under 16 bytes without pointers
    /// share 16-byte tiny blocks; they count as their size class.
    pub reserved: u64,
    /// Number of `mallocgc` calls.
    pub allocations: u32,
}

impl HeapBytes {
    fn one(size: u64, has_pointers: bool, v: &GoVersion) -> Self {
        if size == 0 {
            // mallocgc(0) returns &zerobase.
            return Self::default();
        }
        Self {
            requested: size,
            reserved: heap_reserved(size, has_pointers, v),
            allocations: 1,
        }
    }

    fn plus(self, other: Self) -> Self {
        Self {
            requested: self.requested.saturating_add(other.requested),
            reserved: self.reserved.saturating_add(other.reserved),
            allocations: self.allocations.saturating_add(other.allocations),
        }
    }
}

/// A slice growth: `growslice`, or on Go ≥ 1.26 `moveSlice*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliceGrowth {
    pub old_cap: u64,
    pub new_cap: u64,
    pub heap: HeapBytes,
}

/// Map growth kinds, with the names events and JSON use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MapGrowKind {
    /// Old maps: `hashGrow` doubling the bucket array (B → B+1).
    Double,
    /// Old maps: `hashGrow` rebuilding a bucket array of the same size (too many overflow
    /// buckets).
    SameSize,
    /// Swiss: `growToSmall`, the first 8-slot group.
    Small,
    /// Swiss: `growToTable`, the small map becomes a 16-slot table and a 1-entry directory.
    ToTable,
    /// Swiss: `(*table).grow`, one table doubles its capacity (≤ 1024 slots).
    Grow,
    /// Swiss: `(*table).split`, a full 1024-slot table becomes two.
    Split,
    /// Swiss: `installTableSplit` doubling the directory.
    DirGrow,
}

impl MapGrowKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Double => "double",
            Self::SameSize => "same_size",
            Self::Small => "small",
            Self::ToTable => "to_table",
            Self::Grow => "grow",
            Self::Split => "split",
            Self::DirGrow => "dir_grow",
        }
    }
}

impl std::fmt::Display for MapGrowKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An old-map `hashGrow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashGrow {
    pub kind: MapGrowKind,
    pub old_b: u8,
    pub new_b: u8,
    /// Buckets in the new array: `2^new_b` plus `overflow_buckets`.
    pub buckets: u64,
    /// Overflow buckets `makeBucketArray` preallocates behind the `2^new_b` (new_b ≥ 4).
    pub overflow_buckets: u64,
    /// The new bucket array (one `newarray`). The old array stays alive until evacuated.
    pub heap: HeapBytes,
}

/// A swiss-map growth. `old_size`/`new_size` count slots (0 → 8 `small`, 8 → 16 `to_table`,
/// capacity → 2×capacity `grow`, 1024 → 2 × 1024 `split`), or directory entries for
/// `dir_grow` (dirLen → 2×dirLen).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwissGrowth {
    pub kind: MapGrowKind,
    pub old_size: u64,
    pub new_size: u64,
    pub heap: HeapBytes,
}

pub(super) fn minor(v: &GoVersion) -> (u32, u32) {
    (v.major, v.minor)
}

/// Rejects versions outside the table's range, with the table's own reasons.
pub(super) fn check_supported(v: &GoVersion) -> Result<(), GrowthError> {
    versions::lookup(v).map(|_| ()).map_err(GrowthError::from)
}
