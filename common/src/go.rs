//! The Go runtime probes: roles, capture specs, and the records they stream.
//!
//! Go's register ABI and struct layouts change between versions, so the probe does not know
//! them: for every probed function the agent writes a [`GoSpec`] (which registers to read,
//! which fields to load through them) into the `GO_SPECS` array, and the attach cookie names
//! the spec. The probe copies the values into a [`GoEvent`]; the agent interprets them with
//! the per-version table in `agent/src/gort/versions.rs`.

/// What a traced runtime function tells us: one enum for the per-version table
/// (`agent/src/gort/versions.rs`), the probe placement (`agent/src/target/go.rs`), the probe and
/// the decoder. Discriminants are the ids in [`GoSpec::role`] and event records.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(PartialOrd, Ord))]
pub enum GoRole {
    /// Old (bucket) maps: `runtime.hashGrow`, a doubling or a same-size grow.
    MapHashGrow = 0,
    /// Swiss maps: first group of a small map allocated.
    MapGrowToSmall = 1,
    /// Swiss maps: the 8-slot small map became a 16-slot table.
    MapGrowToTable = 2,
    /// Swiss maps: one table doubled its capacity (≤ 1024 slots).
    MapTableGrow = 3,
    /// Swiss maps: a full 1024-slot table split in two.
    MapTableSplit = 4,
    /// Swiss maps: a split installed; the directory doubles when the old table's local depth
    /// equals the map's global depth.
    MapDirectoryGrow = 5,
    SliceGrow = 6,
    /// Go ≥ 1.26: an append-built slice moved from its stack buffer to the heap when it
    /// escapes (`moveSlice*`); a heap allocation for a slice that grew without `growslice`.
    SliceMoveToHeap = 7,
    Malloc = 8,
    /// Size-specialized allocation entry points the compiler may call directly.
    MallocSpecialized = 9,
    GcStart = 10,
    StopTheWorld = 11,
    /// `startTheWorldWithSema`, probed on its `ret` instructions (never with a uretprobe): the
    /// end of a stop-the-world pause.
    StartTheWorld = 12,
}

pub const GO_ROLES: usize = 13;

impl GoRole {
    pub const ALL: [GoRole; GO_ROLES] = [
        GoRole::MapHashGrow,
        GoRole::MapGrowToSmall,
        GoRole::MapGrowToTable,
        GoRole::MapTableGrow,
        GoRole::MapTableSplit,
        GoRole::MapDirectoryGrow,
        GoRole::SliceGrow,
        GoRole::SliceMoveToHeap,
        GoRole::Malloc,
        GoRole::MallocSpecialized,
        GoRole::GcStart,
        GoRole::StopTheWorld,
        GoRole::StartTheWorld,
    ];

    /// The role of a raw id, `None` for an unknown one (a plain match: no table load in BPF).
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => GoRole::MapHashGrow,
            1 => GoRole::MapGrowToSmall,
            2 => GoRole::MapGrowToTable,
            3 => GoRole::MapTableGrow,
            4 => GoRole::MapTableSplit,
            5 => GoRole::MapDirectoryGrow,
            6 => GoRole::SliceGrow,
            7 => GoRole::SliceMoveToHeap,
            8 => GoRole::Malloc,
            9 => GoRole::MallocSpecialized,
            10 => GoRole::GcStart,
            11 => GoRole::StopTheWorld,
            12 => GoRole::StartTheWorld,
            _ => return None,
        })
    }
}

/// Values captured per event.
pub const GO_VALUES: usize = 6;

/// Capacity of the `GO_SPECS` array (distinct (binary, function) pairs probed at once).
pub const GO_SPECS_MAX: u32 = 1024;

/// Allocations at least this large are streamed with their stack (Go's large-object size).
pub const GO_LARGE_ALLOC: u64 = 32 << 10;

/// Buckets of the `mallocgc` size histogram: bucket `i` counts sizes in `[2^i, 2^(i+1))`
/// (bucket 0 also holds size 0).
pub const GO_HIST_BUCKETS: u32 = 48;

/// An integer argument register of Go's ABIInternal on amd64, in argument order (RAX, RBX, RCX,
/// RDI, RSI, R8, R9, R10, R11; cmd/compile/abi-internal.md). The discriminant is the number
/// in [`Capture::reg`]: argument index + 1, 0 ([`reg::NONE`]) being "nothing captured".
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GoReg {
    Rax = 1,
    Rbx = 2,
    Rcx = 3,
    Rdi = 4,
    Rsi = 5,
    R8 = 6,
    R9 = 7,
    R10 = 8,
    R11 = 9,
}

impl GoReg {
    /// Position in the argument order (0 for RAX).
    pub const fn arg_index(self) -> usize {
        self as usize - 1
    }
}

/// [`Capture::reg`] values that are not a register.
pub mod reg {
    /// Nothing captured.
    pub const NONE: u8 = 0;
}

/// One captured value: a register (`deref` 0), a field loaded through a register
/// (`*(reg + offset)`, `deref` 1), or a field of a struct a field points to
/// (`*(*(reg + offset) + offset2)`, `deref` 2), truncated to `size` bytes (1, 2, 4 or 8).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capture {
    pub reg: u8,
    pub size: u8,
    pub deref: u8,
    pub offset2: u8,
    pub offset: u32,
}

/// How to read one probed function's arguments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoSpec {
    pub captures: [Capture; GO_VALUES],
    pub role: u32,
    /// `GO_SPEC_*` flags.
    pub flags: u32,
}

/// Capture a user stack for each event of this function.
pub const GO_SPEC_STACK: u32 = 1 << 0;

/// Capacity of `GO_AGG`: growth keys counted in the kernel at once (a full table sends the
/// event as a record, counted in `GO_AGG_FULL`).
pub const GO_AGG_MAX: u32 = 16384;

/// Key of the in-kernel growth aggregate (`GO_AGG`, per-CPU `u64` counts): everything the
/// agent's arithmetic reads from a growth event, not its stack. The first event of a key is
/// streamed as a record (its stack names the key's site) and then inserts the key; a later
/// event with the same key only counts. Values the agent never reads are zeroed
/// ([`agg_ignored`]) so that they do not split keys.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(PartialOrd, Ord))]
pub struct GoAggKey {
    pub tgid: u32,
    pub role: u32,
    pub ret_addr: u64,
    /// One frame above `ret_addr`: growth functions are often called from the runtime
    /// (`mapassign`, `growsliceBuf`), whose return address alone would not tell the program's
    /// call sites apart.
    pub caller: u64,
    pub values: [u64; GO_VALUES],
}

/// Which events are counted in `GO_AGG`, and the values (bit `i`: value `i`) their key
/// leaves out; `None`: never aggregated (allocations, GC events, whose values are summed or
/// timed per event). The agent's decoder (`agent/src/gostate.rs`) reads every other value:
/// the map pointer and the counts at a growth stay in the key, since the agent keeps them per
/// map instance.
pub const fn agg_ignored(role: u32) -> Option<u32> {
    let Some(role) = GoRole::from_u32(role) else {
        return None;
    };
    Some(match role {
        // flags
        GoRole::MapHashGrow => 1 << 3,
        // used, dirLen, globalDepth
        GoRole::MapGrowToSmall => (1 << 1) | (1 << 2) | (1 << 3),
        // dirLen, globalDepth
        GoRole::MapGrowToTable => (1 << 2) | (1 << 3),
        GoRole::MapTableGrow | GoRole::MapDirectoryGrow | GoRole::SliceMoveToHeap => 0,
        // capacity (always 1024), localDepth
        GoRole::MapTableSplit => (1 << 1) | (1 << 2),
        // oldPtr
        GoRole::SliceGrow => 1 << 4,
        GoRole::Malloc
        | GoRole::MallocSpecialized
        | GoRole::GcStart
        | GoRole::StopTheWorld
        | GoRole::StartTheWorld => return None,
    })
}

impl GoAggKey {
    /// The aggregation key of an event, `None` for a role that is not aggregated.
    #[inline(always)]
    pub fn of(
        tgid: u32,
        role: u32,
        ret_addr: u64,
        caller: u64,
        values: &[u64; GO_VALUES],
    ) -> Option<Self> {
        let ignored = agg_ignored(role)?;
        let mut key = GoAggKey {
            tgid,
            role,
            ret_addr,
            caller,
            values: *values,
        };
        let mut i = 0;
        while i < GO_VALUES {
            if ignored & (1 << i) != 0 {
                key.values[i] = 0;
            }
            i += 1;
        }
        Some(key)
    }
}

/// Cookie of a Go probe: spec index in the low 16 bits, stack-pointer delta (see
/// `crate::libc::cookie`) in bits 16..24.
pub mod cookie {
    pub const fn encode(spec: u32, sp_delta: u32) -> u64 {
        (spec as u64 & 0xffff) | ((sp_delta as u64 & 0xff) << 16)
    }
    pub const fn spec(cookie: u64) -> u32 {
        (cookie & 0xffff) as u32
    }
    pub const fn sp_delta(cookie: u64) -> u64 {
        (cookie >> 16) & 0xff
    }
}

/// Per-process facts the probe needs (`GO_PROCS`, keyed by tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoProc {
    /// Runtime address range of `runtime.mallocgc`: specialized mallocs called from inside it
    /// are not counted twice.
    pub mallocgc_start: u64,
    pub mallocgc_end: u64,
}

/// A stop-the-world in progress (`GO_STW`, keyed by tgid: the runtime stops one world at a
/// time per process).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StwState {
    pub ts_ns: u64,
    pub reason: u64,
    /// Return address of the stop call (names the caller on versions without a reason).
    pub ret_addr: u64,
}

/// Key of the `mallocgc` size histogram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GoHistKey {
    pub tgid: u32,
    pub bucket: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoHistVal {
    pub count: u64,
    pub bytes: u64,
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<Capture>() == 8);
    assert!(offset_of!(Capture, offset) == 4);
    assert!(size_of::<GoSpec>() == 56);
    assert!(offset_of!(GoSpec, role) == 48);
    assert!(size_of::<GoProc>() == 16);
    assert!(size_of::<StwState>() == 24);
    assert!(size_of::<GoHistKey>() == 8);
    assert!(size_of::<GoHistVal>() == 16);
    assert!(size_of::<GoAggKey>() == 72);
    assert!(offset_of!(GoAggKey, role) == 4);
    assert!(offset_of!(GoAggKey, ret_addr) == 8);
    assert!(offset_of!(GoAggKey, caller) == 16);
    assert!(offset_of!(GoAggKey, values) == 24);
};

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: #[repr(C)] plain integers with explicit padding.
    unsafe impl aya::Pod for Capture {}
    unsafe impl aya::Pod for GoSpec {}
    unsafe impl aya::Pod for GoProc {}
    unsafe impl aya::Pod for StwState {}
    unsafe impl aya::Pod for GoHistKey {}
    unsafe impl aya::Pod for GoHistVal {}
    unsafe impl aya::Pod for GoAggKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_registers() {
        for r in GoRole::ALL {
            assert_eq!(GoRole::from_u32(r as u32), Some(r));
        }
        assert_eq!(GoRole::from_u32(GO_ROLES as u32), None);
        assert_eq!(GoReg::Rax as u8, 1);
        assert_eq!(GoReg::R11.arg_index(), 8);
        assert_ne!(GoReg::Rax as u8, reg::NONE);
    }

    #[test]
    fn agg_keys_leave_out_ignored_values_only() {
        let v = [1, 2, 3, 4, 5, 6];
        let slice = GoAggKey::of(7, GoRole::SliceGrow as u32, 0x40, 0x50, &v).unwrap();
        assert_eq!(slice.values, [1, 2, 3, 4, 0, 6]);
        assert_eq!((slice.tgid, slice.ret_addr, slice.caller), (7, 0x40, 0x50));
        let grow = GoAggKey::of(7, GoRole::MapTableGrow as u32, 0x40, 0x50, &v).unwrap();
        assert_eq!(grow.values, v);
        for r in [GoRole::Malloc, GoRole::GcStart, GoRole::StartTheWorld] {
            assert_eq!(GoAggKey::of(7, r as u32, 0x40, 0, &v), None);
        }
        assert_eq!(GoAggKey::of(7, GO_ROLES as u32, 0x40, 0, &v), None);
    }

    #[test]
    fn cookie_round_trip() {
        let c = cookie::encode(1023, 8);
        assert_eq!((cookie::spec(c), cookie::sp_delta(c)), (1023, 8));
    }
}
