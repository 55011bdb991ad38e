//! The Go runtime probes: roles, capture specs, and the records they stream.
//!
//! Go's register ABI and struct layouts change between versions, so the probe does not know
//! them: for every probed function the agent writes a [`GoSpec`] (which registers to read,
//! which fields to load through them) into the `GO_SPECS` array, and the attach cookie names
//! the spec. The probe copies the values into a [`GoEvent`]; the agent interprets them with
//! the per-version table in `agent/src/gort/versions.rs`.

/// What a probed runtime function means. Discriminants are part of the cookie.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(PartialOrd, Ord))]
pub enum GoRole {
    MapHashGrow = 0,
    MapGrowToSmall = 1,
    MapGrowToTable = 2,
    MapTableGrow = 3,
    MapTableSplit = 4,
    MapDirectoryGrow = 5,
    SliceGrow = 6,
    SliceMoveToHeap = 7,
    Malloc = 8,
    MallocSpecialized = 9,
    GcStart = 10,
    StopTheWorld = 11,
    /// A `ret` instruction of `startTheWorldWithSema`: the end of a stop-the-world pause.
    StartTheWorldRet = 12,
}

pub const GO_ROLES: usize = 13;

/// Values captured per event.
pub const GO_VALUES: usize = 6;

/// Capacity of the `GO_SPECS` array (distinct (binary, function) pairs probed at once).
pub const GO_SPECS_MAX: u32 = 1024;

/// Allocations at least this large are streamed with their stack (Go's large-object size).
pub const GO_LARGE_ALLOC: u64 = 32 << 10;

/// Buckets of the `mallocgc` size histogram: bucket `i` counts sizes in `[2^i, 2^(i+1))`
/// (bucket 0 also holds size 0).
pub const GO_HIST_BUCKETS: u32 = 48;

/// Register numbers used in [`Capture::reg`] (0 = nothing captured).
pub mod reg {
    pub const NONE: u8 = 0;
    pub const RAX: u8 = 1;
    pub const RBX: u8 = 2;
    pub const RCX: u8 = 3;
    pub const RDI: u8 = 4;
    pub const RSI: u8 = 5;
    pub const R8: u8 = 6;
    pub const R9: u8 = 7;
    pub const R10: u8 = 8;
    pub const R11: u8 = 9;
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

/// A streamed Go runtime event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoEvent {
    pub header: crate::libc::EventHeader,
    pub role: u32,
    pub tid: u32,
    pub ts_ns: u64,
    /// The goroutine (`g`, R14 under ABIInternal).
    pub goroutine: u64,
    pub ret_addr: u64,
    pub stack_id: i64,
    /// For `StartTheWorldRet`: [pause ns, stop reason, stop's return address, …].
    pub values: [u64; GO_VALUES],
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
    assert!(size_of::<GoEvent>() == 96);
    assert!(offset_of!(GoEvent, ts_ns) == 16);
    assert!(offset_of!(GoEvent, stack_id) == 40);
    assert!(offset_of!(GoEvent, values) == 48);
};

#[cfg(feature = "user")]
mod user {
    use super::*;
    use crate::libc::DecodeError;

    // SAFETY: #[repr(C)] plain integers with explicit padding.
    unsafe impl aya::Pod for Capture {}
    unsafe impl aya::Pod for GoSpec {}
    unsafe impl aya::Pod for GoProc {}
    unsafe impl aya::Pod for StwState {}
    unsafe impl aya::Pod for GoHistKey {}
    unsafe impl aya::Pod for GoHistVal {}
    unsafe impl aya::Pod for GoEvent {}

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
            GoRole::StartTheWorldRet,
        ];
    }

    impl TryFrom<u32> for GoRole {
        type Error = DecodeError;
        fn try_from(v: u32) -> Result<Self, Self::Error> {
            GoRole::ALL
                .get(v as usize)
                .copied()
                .ok_or(DecodeError::UnknownRole(v))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn roles_round_trip() {
            for r in GoRole::ALL {
                assert_eq!(GoRole::try_from(r as u32), Ok(r));
            }
            assert_eq!(GoRole::try_from(99), Err(DecodeError::UnknownRole(99)));
        }

        #[test]
        fn cookie_round_trip() {
            let c = cookie::encode(1023, 8);
            assert_eq!((cookie::spec(c), cookie::sp_delta(c)), (1023, 8));
        }
    }
}
