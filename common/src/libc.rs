//! The libc allocation API: ids, probe cookies, and the map keys/values the probes fill.

/// One libc allocation function. The discriminant is the id carried in probe cookies and keys.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(PartialOrd, Ord))]
pub enum Api {
    Malloc = 0,
    Calloc = 1,
    Realloc = 2,
    Reallocarray = 3,
    Free = 4,
    PosixMemalign = 5,
    AlignedAlloc = 6,
    Memalign = 7,
    Valloc = 8,
    Pvalloc = 9,
    // C++ `operator new`/`delete` (Itanium ABI, 64-bit `size_t`), probed only in allocators
    // that define them as their own with the fast path inlined (jemalloc, tcmalloc, mimalloc):
    // there a program's `new` never reaches `malloc`. libstdc++'s are wrappers over `malloc`
    // and `free`, already counted there.
    /// `_Znwm`: `operator new`.
    New = 10,
    /// `_Znam`: `operator new[]`.
    NewArray = 11,
    /// `_ZnwmRKSt9nothrow_t`: `operator new(nothrow)`.
    NewNothrow = 12,
    /// `_ZnamRKSt9nothrow_t`: `operator new[](nothrow)`.
    NewArrayNothrow = 13,
    /// `_ZnwmSt11align_val_t`: `operator new(align)`.
    NewAligned = 14,
    /// `_ZnamSt11align_val_t`: `operator new[](align)`.
    NewArrayAligned = 15,
    /// `_ZnwmSt11align_val_tRKSt9nothrow_t`: `operator new(align,nothrow)`.
    NewAlignedNothrow = 16,
    /// `_ZnamSt11align_val_tRKSt9nothrow_t`: `operator new[](align,nothrow)`.
    NewArrayAlignedNothrow = 17,
    /// `_ZdlPv`: `operator delete`.
    Delete = 18,
    /// `_ZdaPv`: `operator delete[]`.
    DeleteArray = 19,
    /// `_ZdlPvm`: `operator delete(size)`.
    DeleteSized = 20,
    /// `_ZdaPvm`: `operator delete[](size)`.
    DeleteArraySized = 21,
    /// `_ZdlPvSt11align_val_t`: `operator delete(align)`.
    DeleteAligned = 22,
    /// `_ZdaPvSt11align_val_t`: `operator delete[](align)`.
    DeleteArrayAligned = 23,
    /// `_ZdlPvmSt11align_val_t`: `operator delete(size,align)`.
    DeleteSizedAligned = 24,
    /// `_ZdaPvmSt11align_val_t`: `operator delete[](size,align)`.
    DeleteArraySizedAligned = 25,
    /// `_ZdlPvRKSt9nothrow_t`: `operator delete(nothrow)`.
    DeleteNothrow = 26,
    /// `_ZdaPvRKSt9nothrow_t`: `operator delete[](nothrow)`.
    DeleteArrayNothrow = 27,
    /// `_ZdlPvSt11align_val_tRKSt9nothrow_t`: `operator delete(align,nothrow)`.
    DeleteAlignedNothrow = 28,
    /// `_ZdaPvSt11align_val_tRKSt9nothrow_t`: `operator delete[](align,nothrow)`.
    DeleteArrayAlignedNothrow = 29,
    // Allocators' own entry points that a program calls instead of the malloc family: a Rust
    // program's `#[global_allocator]` (tikv-jemallocator, the mimalloc crate) or C code written
    // for the allocator. Only those such programs reach are here, not the whole API.
    /// jemalloc's `mallocx(size, flags)` (alignment, zeroing in `flags`).
    Mallocx = 30,
    /// jemalloc's `rallocx(ptr, size, flags)`.
    Rallocx = 31,
    /// jemalloc's `sdallocx(ptr, size, flags)`: a sized free.
    Sdallocx = 32,
    /// jemalloc's `dallocx(ptr, flags)`.
    Dallocx = 33,
    /// mimalloc's `mi_malloc_aligned(size, alignment)`.
    MiMallocAligned = 34,
    /// mimalloc's `mi_zalloc_aligned(size, alignment)`: zeroed.
    MiZallocAligned = 35,
    /// mimalloc's `mi_realloc_aligned(ptr, newsize, alignment)`.
    MiReallocAligned = 36,
}

pub const API_COUNT: usize = 37;

impl Api {
    pub const ALL: [Api; API_COUNT] = [
        Api::Malloc,
        Api::Calloc,
        Api::Realloc,
        Api::Reallocarray,
        Api::Free,
        Api::PosixMemalign,
        Api::AlignedAlloc,
        Api::Memalign,
        Api::Valloc,
        Api::Pvalloc,
        Api::New,
        Api::NewArray,
        Api::NewNothrow,
        Api::NewArrayNothrow,
        Api::NewAligned,
        Api::NewArrayAligned,
        Api::NewAlignedNothrow,
        Api::NewArrayAlignedNothrow,
        Api::Delete,
        Api::DeleteArray,
        Api::DeleteSized,
        Api::DeleteArraySized,
        Api::DeleteAligned,
        Api::DeleteArrayAligned,
        Api::DeleteSizedAligned,
        Api::DeleteArraySizedAligned,
        Api::DeleteNothrow,
        Api::DeleteArrayNothrow,
        Api::DeleteAlignedNothrow,
        Api::DeleteArrayAlignedNothrow,
        Api::Mallocx,
        Api::Rallocx,
        Api::Sdallocx,
        Api::Dallocx,
        Api::MiMallocAligned,
        Api::MiZallocAligned,
        Api::MiReallocAligned,
    ];

    /// The API of a raw id (cookie, key), `None` for an unknown one (a plain match: no table
    /// load in BPF).
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Api::Malloc,
            1 => Api::Calloc,
            2 => Api::Realloc,
            3 => Api::Reallocarray,
            4 => Api::Free,
            5 => Api::PosixMemalign,
            6 => Api::AlignedAlloc,
            7 => Api::Memalign,
            8 => Api::Valloc,
            9 => Api::Pvalloc,
            10 => Api::New,
            11 => Api::NewArray,
            12 => Api::NewNothrow,
            13 => Api::NewArrayNothrow,
            14 => Api::NewAligned,
            15 => Api::NewArrayAligned,
            16 => Api::NewAlignedNothrow,
            17 => Api::NewArrayAlignedNothrow,
            18 => Api::Delete,
            19 => Api::DeleteArray,
            20 => Api::DeleteSized,
            21 => Api::DeleteArraySized,
            22 => Api::DeleteAligned,
            23 => Api::DeleteArrayAligned,
            24 => Api::DeleteSizedAligned,
            25 => Api::DeleteArraySizedAligned,
            26 => Api::DeleteNothrow,
            27 => Api::DeleteArrayNothrow,
            28 => Api::DeleteAlignedNothrow,
            29 => Api::DeleteArrayAlignedNothrow,
            30 => Api::Mallocx,
            31 => Api::Rallocx,
            32 => Api::Sdallocx,
            33 => Api::Dallocx,
            34 => Api::MiMallocAligned,
            35 => Api::MiZallocAligned,
            36 => Api::MiReallocAligned,
            _ => return None,
        })
    }

    /// The ELF symbol that defines the API (mangled for the C++ operators), before the file's
    /// prefix if it has one ([`Self::takes_prefix`]).
    pub const fn symbol(self) -> &'static str {
        match self {
            Api::Malloc => "malloc",
            Api::Calloc => "calloc",
            Api::Realloc => "realloc",
            Api::Reallocarray => "reallocarray",
            Api::Free => "free",
            Api::PosixMemalign => "posix_memalign",
            Api::AlignedAlloc => "aligned_alloc",
            Api::Memalign => "memalign",
            Api::Valloc => "valloc",
            Api::Pvalloc => "pvalloc",
            Api::New => "_Znwm",
            Api::NewArray => "_Znam",
            Api::NewNothrow => "_ZnwmRKSt9nothrow_t",
            Api::NewArrayNothrow => "_ZnamRKSt9nothrow_t",
            Api::NewAligned => "_ZnwmSt11align_val_t",
            Api::NewArrayAligned => "_ZnamSt11align_val_t",
            Api::NewAlignedNothrow => "_ZnwmSt11align_val_tRKSt9nothrow_t",
            Api::NewArrayAlignedNothrow => "_ZnamSt11align_val_tRKSt9nothrow_t",
            Api::Delete => "_ZdlPv",
            Api::DeleteArray => "_ZdaPv",
            Api::DeleteSized => "_ZdlPvm",
            Api::DeleteArraySized => "_ZdaPvm",
            Api::DeleteAligned => "_ZdlPvSt11align_val_t",
            Api::DeleteArrayAligned => "_ZdaPvSt11align_val_t",
            Api::DeleteSizedAligned => "_ZdlPvmSt11align_val_t",
            Api::DeleteArraySizedAligned => "_ZdaPvmSt11align_val_t",
            Api::DeleteNothrow => "_ZdlPvRKSt9nothrow_t",
            Api::DeleteArrayNothrow => "_ZdaPvRKSt9nothrow_t",
            Api::DeleteAlignedNothrow => "_ZdlPvSt11align_val_tRKSt9nothrow_t",
            Api::DeleteArrayAlignedNothrow => "_ZdaPvSt11align_val_tRKSt9nothrow_t",
            Api::Mallocx => "mallocx",
            Api::Rallocx => "rallocx",
            Api::Sdallocx => "sdallocx",
            Api::Dallocx => "dallocx",
            Api::MiMallocAligned => "mi_malloc_aligned",
            Api::MiZallocAligned => "mi_zalloc_aligned",
            Api::MiReallocAligned => "mi_realloc_aligned",
        }
    }

    /// Whether a prefixed build names the API `PREFIX` + [`Self::symbol`] (`je_mallocx`,
    /// `_rjem_sdallocx`, `mi_free`); mimalloc's own names carry their `mi_` already.
    pub const fn takes_prefix(self) -> bool {
        !matches!(
            self,
            Api::MiMallocAligned | Api::MiZallocAligned | Api::MiReallocAligned
        )
    }

    /// The libc malloc family (`malloc` … `pvalloc`): what every process has, from its libc.
    pub const fn is_libc(self) -> bool {
        self as u32 <= Api::Pvalloc as u32
    }

    /// The name in reports, JSON keys and metric labels: the libc symbol, or the C++
    /// operator with its overload (`new[]`, `delete(size,align)`, …).
    pub const fn name(self) -> &'static str {
        match self {
            Api::New => "new",
            Api::NewArray => "new[]",
            Api::NewNothrow => "new(nothrow)",
            Api::NewArrayNothrow => "new[](nothrow)",
            Api::NewAligned => "new(align)",
            Api::NewArrayAligned => "new[](align)",
            Api::NewAlignedNothrow => "new(align,nothrow)",
            Api::NewArrayAlignedNothrow => "new[](align,nothrow)",
            Api::Delete => "delete",
            Api::DeleteArray => "delete[]",
            Api::DeleteSized => "delete(size)",
            Api::DeleteArraySized => "delete[](size)",
            Api::DeleteAligned => "delete(align)",
            Api::DeleteArrayAligned => "delete[](align)",
            Api::DeleteSizedAligned => "delete(size,align)",
            Api::DeleteArraySizedAligned => "delete[](size,align)",
            Api::DeleteNothrow => "delete(nothrow)",
            Api::DeleteArrayNothrow => "delete[](nothrow)",
            Api::DeleteAlignedNothrow => "delete(align,nothrow)",
            Api::DeleteArrayAlignedNothrow => "delete[](align,nothrow)",
            other => other.symbol(),
        }
    }

    /// A C++ `operator new` or `operator delete` overload.
    pub const fn is_cxx(self) -> bool {
        let id = self as u32;
        id >= Api::New as u32 && id <= Api::DeleteArrayAlignedNothrow as u32
    }

    /// Frees a block (`free`, every `operator delete`, jemalloc's `sdallocx` and `dallocx`):
    /// no size requested, no pointer returned; its argument 0 is the block.
    pub const fn is_free(self) -> bool {
        let id = self as u32;
        matches!(self, Api::Free | Api::Sdallocx | Api::Dallocx)
            || (id >= Api::Delete as u32 && id <= Api::DeleteArrayAlignedNothrow as u32)
    }

    /// Resizes a block (argument 0) to a new size; the old block is gone once it succeeds.
    pub const fn is_realloc(self) -> bool {
        matches!(
            self,
            Api::Realloc | Api::Reallocarray | Api::Rallocx | Api::MiReallocAligned
        )
    }

    /// Whether the probe needs a return probe: the new pointer of an allocation, or the end
    /// of an `operator delete` (its relays into `free` are its own until then). jemalloc's
    /// `sdallocx` and `dallocx`, like `free`, call no other API function.
    pub const fn needs_return(self) -> bool {
        !matches!(self, Api::Free | Api::Sdallocx | Api::Dallocx)
    }
}

/// The attach cookie of a libc probe (64 bits). Full mode uses the API id and the stack-pointer
/// delta; count mode (entry probes only) adds what it needs to recognize an allocator's own
/// relays without a return probe (`on_count` in `probe-ebpf/src/libc.rs`).
///
/// | bits | field | limit |
/// |---|---|---|
/// | 0–7 | API id ([`Api`]; room for other allocators' entry points) | 256 ids |
/// | 8–15 | bytes RSP moved between the function's entry and the probed instruction: the return address is at `[rsp + delta]` (`agent/src/target/placement.rs`) | 255 bytes |
/// | 16–18 | this function's relay-target index in its file (0: no function of the file tail-jumps into it) | 7 indices |
/// | 19–25 | relay mask: bit `index - 1` set, this function may tail-jump into relay target `index` | 7 indices |
/// | 26–31 | the file's slot in the `LIBC_FILES` array ([`NO_FILE`](cookie::NO_FILE): none) | 63 files |
/// | 32–63 | the probed instruction's file offset: `ret - rip + offset` turns a return address into a file offset of the same file | 4 GiB |
///
/// Relay targets are numbered per file (in API id order), not by API id, so an allocator with
/// many entry points (jemalloc's `mallocx`, `rallocx`, `sdallocx`, …) fits as long as at most 7
/// of them are jumped into; glibc has 2 (`malloc`, `realloc`). Beyond 7, the 7th index is
/// shared by the rest: a relay into one of them is then also assumed into the others, which
/// errs toward recognizing a relay, as count mode does for a file whose code it cannot read.
/// The encoder takes the file's relay structure as masks over API ids (bit = id), so only API
/// ids below 64 can take part in relays.
pub mod cookie {
    /// File slot meaning "no `LIBC_FILES` entry": return addresses are not classified.
    pub const NO_FILE: u32 = 0x3f;
    /// Relay-target indices a cookie can name; further targets share the last one.
    pub const RELAY_INDICES: u32 = 7;

    const API_BITS: u64 = 0xff;
    const SP_SHIFT: u32 = 8;
    const TARGET_SHIFT: u32 = 16;
    const TARGET_BITS: u64 = 0x7;
    const MASK_SHIFT: u32 = 19;
    const MASK_BITS: u64 = 0x7f;
    const FILE_SHIFT: u32 = 26;
    const OFFSET_SHIFT: u32 = 32;

    /// Full mode's cookie: the API id and the stack-pointer delta.
    pub const fn encode(api: u32, sp_delta: u32) -> u64 {
        (api as u64 & API_BITS) | ((sp_delta as u64 & 0xff) << SP_SHIFT)
    }

    /// The relay-target index (1 ..= [`RELAY_INDICES`]) of API id `api` among the file's
    /// relay targets `targets` (bit = API id), 0 when `api` is not one of them.
    pub const fn relay_index(targets: u64, api: u32) -> u32 {
        if api >= 64 || (targets >> api) & 1 == 0 {
            return 0;
        }
        let rank = (targets & ((1u64 << api) - 1)).count_ones() + 1;
        if rank > RELAY_INDICES {
            RELAY_INDICES
        } else {
            rank
        }
    }

    /// [`encode`] plus count mode's fields. `targets`: the APIs of the file that some API
    /// function of it may tail-jump into; `relay_mask`: those this one may tail-jump into
    /// (both bit = API id).
    pub const fn encode_count(
        api: u32,
        sp_delta: u32,
        targets: u64,
        relay_mask: u64,
        file_slot: u32,
        probe_offset: u32,
    ) -> u64 {
        let mut mask = 0u64;
        let mut id = 0;
        while id < 64 {
            let index = relay_index(targets, id);
            if (relay_mask >> id) & 1 != 0 && index != 0 {
                mask |= 1 << (index - 1);
            }
            id += 1;
        }
        encode(api, sp_delta)
            | ((relay_index(targets, api) as u64 & TARGET_BITS) << TARGET_SHIFT)
            | ((mask & MASK_BITS) << MASK_SHIFT)
            | ((file_slot as u64 & 0x3f) << FILE_SHIFT)
            | ((probe_offset as u64) << OFFSET_SHIFT)
    }

    pub const fn api(cookie: u64) -> u32 {
        (cookie & API_BITS) as u32
    }
    pub const fn sp_delta(cookie: u64) -> u64 {
        (cookie >> SP_SHIFT) & 0xff
    }
    /// This function's relay-target index in its file (1 ..= [`RELAY_INDICES`]), 0 if nothing
    /// tail-jumps into it.
    pub const fn target_index(cookie: u64) -> u32 {
        ((cookie >> TARGET_SHIFT) & TARGET_BITS) as u32
    }
    /// Bit `index - 1` set: this function may tail-jump into relay target `index`.
    pub const fn relay_mask(cookie: u64) -> u32 {
        ((cookie >> MASK_SHIFT) & MASK_BITS) as u32
    }
    /// Whether a function with `relay_mask` may tail-jump into the one with `target_index`.
    pub const fn may_relay_to(relay_mask: u32, target_index: u32) -> bool {
        target_index != 0 && (relay_mask >> (target_index - 1)) & 1 != 0
    }
    pub const fn file_slot(cookie: u64) -> u32 {
        ((cookie >> FILE_SHIFT) & 0x3f) as u32
    }
    pub const fn probe_offset(cookie: u64) -> u64 {
        cookie >> OFFSET_SHIFT
    }
}

/// Capacity of the `LIBC_FILES` array: distinct libc files count mode classifies return
/// addresses in (more files are still traced, without that rule).
pub const LIBC_FILES_MAX: u32 = cookie::NO_FILE;
/// API functions per file in [`LibcFile`].
pub const LIBC_FILE_RANGES: usize = API_COUNT;

/// Relay call sites per file in [`LibcFile`].
pub const LIBC_FILE_SITES: usize = 8;

/// [`RelaySite::kind`]: unused slot.
pub const SITE_NONE: u8 = 0;
/// [`RelaySite::kind`]: the calling function's return slot is at the callee's entry stack
/// pointer plus `frame`.
pub const SITE_SP: u8 = 1;
/// [`RelaySite::kind`]: the calling function's return slot is at its frame pointer (rbp) plus
/// `frame` (the callee's probe runs before anything writes rbp).
pub const SITE_FP: u8 = 2;

/// Count mode: a direct call of an API from a function that is no API but that an API calls or
/// tail-jumps into (mimalloc's `mi_realloc_aligned` jumps into `_mi_theap_realloc_zero`,
/// which calls `mi_free`). The return address alone cannot tell (other code reaches that
/// function too): the calling function's own return slot can. It holds a return address into
/// an API (called from it), or it is the outer API's entry slot with its return address
/// (tail-jumped into from it, the thread's last entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelaySite {
    /// The call's return address as a file offset.
    pub ret_off: u32,
    /// Bytes from the base register ([`kind`](Self::kind)) to the calling function's return slot.
    pub frame: u16,
    /// [`SITE_NONE`], [`SITE_SP`] or [`SITE_FP`].
    pub kind: u8,
    pub _pad: u8,
}

/// Count mode: where a libc file's allocation-API functions are, as file offsets `[start, end)`.
/// A call whose return address lies in one of them was made by the API itself (glibc's realloc
/// calling malloc or free): libc's own relay, not the program's call. Unused slots are `[0, 0)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LibcFile {
    pub ranges: [[u32; 2]; LIBC_FILE_RANGES],
    /// Calls of APIs from functions in between ([`RelaySite`]); unused slots have kind
    /// [`SITE_NONE`].
    pub sites: [RelaySite; LIBC_FILE_SITES],
}

// By hand: `Default` is derived for arrays of at most 32 elements.
impl Default for LibcFile {
    fn default() -> Self {
        Self {
            ranges: [[0; 2]; LIBC_FILE_RANGES],
            sites: [RelaySite::default(); LIBC_FILE_SITES],
        }
    }
}

/// Count mode: the last counted API entry of a thread (LRU map keyed by `pid_tgid`). A tail-jump
/// relay (glibc's `reallocarray` → `realloc` → `malloc`) enters the next API with the stack
/// pointer and return address of the outer call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastEntry {
    pub entry_sp: u64,
    pub ret_addr: u64,
    pub api: u32,
    /// The relay targets the outer API may tail-jump into ([`cookie::relay_mask`]).
    pub relay_mask: u32,
}

/// A call in flight on one thread, keyed by `pid_tgid`. Set at the outermost API entry; while it
/// exists, nested API entries on that thread (glibc's realloc calling malloc, memalign relaying to
/// malloc, …) are libc's own and are not counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// Stack pointer at the function's entry (return address slot).
    pub entry_sp: u64,
    /// Requested size in bytes (for calloc/reallocarray the product, saturated).
    pub size: u64,
    /// realloc/reallocarray: the old pointer; posix_memalign: `memptr`.
    pub arg_ptr: u64,
    /// Return address of the call (the immediate caller).
    pub ret_addr: u64,
    pub stack_id: i64,
    pub api: u32,
    /// 1 when the call was sampled (its block goes into the live table), else 0.
    pub sampled: u32,
}

/// Per-site key: one row per (process, API, user stack, immediate caller).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(PartialOrd, Ord))]
pub struct SiteKey {
    pub tgid: u32,
    pub api: u32,
    /// Stack map id (a 63-bit hash of the frames: two different stacks practically never
    /// share one), or a negative value when no stack was captured (see [`NO_STACK`]).
    pub stack_id: i64,
    pub ret_addr: u64,
}

/// `stack_id` when stacks are disabled or the capture failed (the loss is counted).
pub const NO_STACK: i64 = -1;

impl SiteKey {
    /// The row of `tgid`'s calls of `api` whose site is not known, in its own table (`SPILL`,
    /// which site churn cannot fill): once the site table is full, a process's new sites are
    /// counted in it (`site_spilled`), even a process that starts then; also where the agent
    /// folds sites away (`other`). A caller at address 0 (an unreadable return address) is as
    /// unknown, and lands here too.
    pub const fn spill(tgid: u32, api: u32) -> Self {
        Self {
            tgid,
            api,
            stack_id: NO_STACK,
            ret_addr: 0,
        }
    }

    pub const fn is_spill(&self) -> bool {
        self.stack_id == NO_STACK && self.ret_addr == 0
    }
}

/// Per-site counters, per CPU; the agent sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteStats {
    /// Calls made (successful or not).
    pub calls: u64,
    /// Bytes requested by those calls.
    pub bytes: u64,
    /// Calls that returned NULL / an error.
    pub failed: u64,
    /// Allocations from this site entered into the live table.
    pub tracked: u64,
    pub tracked_bytes: u64,
    /// Of those, how many were freed (or moved by realloc) since, and their bytes.
    pub freed: u64,
    pub freed_bytes: u64,
}

/// Key of the live-allocation table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LiveKey {
    pub tgid: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// An outstanding allocation: enough to find its site again and age it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveAlloc {
    pub size: u64,
    /// `bpf_ktime_get_ns()` at allocation (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub site: SiteKey,
}

/// Per-API totals of calls that could not get a site row (site table full), per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Overflow {
    pub calls: u64,
    pub bytes: u64,
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<Pending>() == 48);
    assert!(offset_of!(Pending, stack_id) == 32);
    assert!(offset_of!(Pending, api) == 40);
    assert!(size_of::<SiteKey>() == 24);
    assert!(offset_of!(SiteKey, stack_id) == 8);
    assert!(offset_of!(SiteKey, ret_addr) == 16);
    assert!(size_of::<SiteStats>() == 56);
    assert!(offset_of!(SiteStats, freed_bytes) == 48);
    assert!(size_of::<LiveKey>() == 16);
    assert!(offset_of!(LiveKey, addr) == 8);
    assert!(size_of::<LiveAlloc>() == 40);
    assert!(offset_of!(LiveAlloc, site) == 16);
    assert!(size_of::<Overflow>() == 16);
    assert!(size_of::<RelaySite>() == 8);
    assert!(offset_of!(RelaySite, frame) == 4);
    assert!(offset_of!(RelaySite, kind) == 6);
    assert!(size_of::<LibcFile>() == 8 * LIBC_FILE_RANGES + 8 * LIBC_FILE_SITES);
    assert!(offset_of!(LibcFile, sites) == 8 * LIBC_FILE_RANGES);
    assert!(size_of::<LastEntry>() == 24);
    assert!(offset_of!(LastEntry, api) == 16);
};

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are #[repr(C)] plain integers with explicit padding fields.
    unsafe impl aya::Pod for Pending {}
    unsafe impl aya::Pod for SiteKey {}
    unsafe impl aya::Pod for SiteStats {}
    unsafe impl aya::Pod for LiveKey {}
    unsafe impl aya::Pod for LiveAlloc {}
    unsafe impl aya::Pod for Overflow {}
    unsafe impl aya::Pod for LibcFile {}
    unsafe impl aya::Pod for LastEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_ids_round_trip() {
        for api in Api::ALL {
            assert_eq!(Api::from_u32(api as u32), Some(api));
        }
        assert_eq!(Api::from_u32(API_COUNT as u32), None);
    }

    #[test]
    fn cxx_operators() {
        let names: Vec<&str> = Api::ALL.iter().map(|a| a.name()).collect();
        let mut distinct = names.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), API_COUNT, "names are distinct: {names:?}");
        let plain_free = [Api::Free, Api::Sdallocx, Api::Dallocx];
        for api in Api::ALL {
            assert_eq!(api.is_cxx(), api.symbol().starts_with("_Z"), "{api:?}");
            let delete = api.symbol().starts_with("_Zd");
            assert_eq!(
                api.is_free(),
                delete || plain_free.contains(&api),
                "{api:?}"
            );
            assert_eq!(api.name().starts_with("delete"), delete, "{api:?}");
            assert_eq!(api.needs_return(), !plain_free.contains(&api), "{api:?}");
            let resizes = api.symbol().contains("realloc") || api == Api::Rallocx;
            assert_eq!(api.is_realloc(), resizes, "{api:?}");
            assert_eq!(
                api.takes_prefix(),
                !api.symbol().starts_with("mi_"),
                "{api:?}"
            );
            assert_eq!(api.is_libc(), (api as u32) < Api::New as u32, "{api:?}");
            if !api.is_cxx() {
                assert_eq!(api.name(), api.symbol());
            }
        }
        assert_eq!(Api::NewArrayAligned.symbol(), "_ZnamSt11align_val_t");
        assert_eq!(Api::NewArrayAligned.name(), "new[](align)");
        assert_eq!(Api::DeleteSizedAligned.symbol(), "_ZdlPvmSt11align_val_t");
        assert_eq!(Api::DeleteSizedAligned.name(), "delete(size,align)");
    }

    #[test]
    fn cookie_fields_round_trip() {
        let c = cookie::encode(Api::PosixMemalign as u32, 24);
        assert_eq!(cookie::api(c), 5);
        assert_eq!(cookie::sp_delta(c), 24);
        assert_eq!(cookie::target_index(c), 0);
        assert_eq!(cookie::relay_mask(c), 0);
        // The widest values of every field, side by side.
        let c = cookie::encode_count(0xff, 0xff, 1 << 63, 1 << 63, 62, 0xffff_ffff);
        assert_eq!(cookie::api(c), 0xff);
        assert_eq!(cookie::sp_delta(c), 0xff);
        assert_eq!(
            cookie::target_index(c),
            0,
            "ids ≥ 64 take no part in relays"
        );
        assert_eq!(cookie::file_slot(c), 62);
        assert_eq!(cookie::probe_offset(c), 0xffff_ffff);
        let c = cookie::encode_count(Api::Free as u32, 0, 0, 0, cookie::NO_FILE, 0x26030);
        assert_eq!(cookie::api(c), Api::Free as u32);
        assert_eq!(cookie::file_slot(c), cookie::NO_FILE);
        assert_eq!(cookie::probe_offset(c), 0x26030);
    }

    /// glibc: reallocarray → realloc → malloc. Targets are malloc and realloc (indices 1 and
    /// 2, in id order); each relay is recognized, nothing else is.
    #[test]
    fn glibc_relays() {
        let bit = |a: Api| 1u64 << a as u32;
        let targets = bit(Api::Malloc) | bit(Api::Realloc);
        let c = |a: Api, mask: u64| cookie::encode_count(a as u32, 8, targets, mask, 0, 0x1000);
        let malloc = c(Api::Malloc, 0);
        let realloc = c(Api::Realloc, bit(Api::Malloc));
        let reallocarray = c(Api::Reallocarray, bit(Api::Realloc));
        let free = c(Api::Free, 0);
        assert_eq!(cookie::target_index(malloc), 1);
        assert_eq!(cookie::target_index(realloc), 2);
        assert_eq!(cookie::target_index(reallocarray), 0);
        assert_eq!(cookie::target_index(free), 0);
        let relays = |from: u64, to: u64| {
            cookie::may_relay_to(cookie::relay_mask(from), cookie::target_index(to))
        };
        assert!(relays(realloc, malloc));
        assert!(relays(reallocarray, realloc));
        assert!(!relays(reallocarray, malloc));
        assert!(!relays(malloc, realloc));
        assert!(!relays(free, malloc));
        assert!(!relays(realloc, free));
        assert_eq!(cookie::sp_delta(realloc), 8);
    }

    /// An allocator with more jump targets than indices (ids 10.. as another allocator's entry
    /// points): the first six keep their own index, the rest share the seventh, so a relay
    /// into any of them is assumed into all of them (never missed).
    #[test]
    fn more_targets_than_indices_share_the_last() {
        let targets: u64 = (10..20).map(|id| 1u64 << id).sum();
        for (i, id) in (10..16).enumerate() {
            assert_eq!(cookie::relay_index(targets, id), i as u32 + 1);
        }
        for id in 16..20 {
            assert_eq!(cookie::relay_index(targets, id), cookie::RELAY_INDICES);
        }
        assert_eq!(cookie::relay_index(targets, 9), 0);
        let into_17 = cookie::encode_count(30, 0, targets, 1 << 17, 1, 0);
        let c18 = cookie::encode_count(18, 0, targets, 0, 1, 0);
        let c12 = cookie::encode_count(12, 0, targets, 0, 1, 0);
        assert!(cookie::may_relay_to(
            cookie::relay_mask(into_17),
            cookie::target_index(c18)
        ));
        assert!(!cookie::may_relay_to(
            cookie::relay_mask(into_17),
            cookie::target_index(c12)
        ));
        // Every target at once (count mode's assumption for a file it cannot read).
        let all = cookie::encode_count(30, 0, targets, targets, 1, 0);
        assert_eq!(cookie::relay_mask(all), 0x7f);
    }
}
