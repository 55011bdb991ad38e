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
/// | 16 | relay target: a function of its file may tail-jump into this one (it reads the thread's [`LastEntry`]) | |
/// | 17 | relays: this function may tail-jump into an API (it writes the thread's [`LastEntry`]) | |
/// | 18–25 | unused | |
/// | 26–31 | the file's slot in the `LIBC_FILES` array ([`NO_FILE`](cookie::NO_FILE): none) | 63 files |
/// | 32–63 | the probed instruction's file offset: `ret - rip + offset` turns a return address into a file offset of the same file | 4 GiB |
///
/// Which APIs a function may tail-jump into is not in the cookie: the thread's record carries
/// it as API ids (from the file's [`LibcFile::relays`]), so that the API entered may be served
/// by another file (glibc's `reallocarray` into jemalloc's `realloc`). An API that some file
/// enters through a PLT slot naming it reads the record too, in every file (the probe's
/// `RELAY_NAMED`). Only API ids below 64 can take part in relays.
pub mod cookie {
    /// File slot meaning "no `LIBC_FILES` entry": return addresses are not classified.
    pub const NO_FILE: u32 = 0x3f;

    const API_BITS: u64 = 0xff;
    const SP_SHIFT: u32 = 8;
    const TARGET_BIT: u64 = 1 << 16;
    const RELAYS_BIT: u64 = 1 << 17;
    const FILE_SHIFT: u32 = 26;
    const OFFSET_SHIFT: u32 = 32;

    /// Full mode's cookie: the API id and the stack-pointer delta.
    pub const fn encode(api: u32, sp_delta: u32) -> u64 {
        (api as u64 & API_BITS) | ((sp_delta as u64 & 0xff) << SP_SHIFT)
    }

    /// [`encode`] plus count mode's fields. `target`: a function of the file may tail-jump
    /// into this API; `relays`: this API's function may tail-jump into one.
    pub const fn encode_count(
        api: u32,
        sp_delta: u32,
        target: bool,
        relays: bool,
        file_slot: u32,
        probe_offset: u32,
    ) -> u64 {
        encode(api, sp_delta)
            | if target { TARGET_BIT } else { 0 }
            | if relays { RELAYS_BIT } else { 0 }
            | ((file_slot as u64 & 0x3f) << FILE_SHIFT)
            | ((probe_offset as u64) << OFFSET_SHIFT)
    }

    pub const fn api(cookie: u64) -> u32 {
        (cookie & API_BITS) as u32
    }
    pub const fn sp_delta(cookie: u64) -> u64 {
        (cookie >> SP_SHIFT) & 0xff
    }
    /// A function of this one's file may tail-jump into it.
    pub const fn is_target(cookie: u64) -> bool {
        cookie & TARGET_BIT != 0
    }
    /// This function may tail-jump into an API.
    pub const fn relays(cookie: u64) -> bool {
        cookie & RELAYS_BIT != 0
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

/// Return slots count mode reads up from a relay call site ([`RelaySite`]): the function in
/// between that made the call, and the one in between that called it (Debian's libmimalloc:
/// `reallocarray` → `mi_reallocarray`, which calls `mi_reallocn`, whose tail jumps reach a
/// static function that calls `mi_free`). Beyond the first, only [`SITE_SP`] sites.
pub const RELAY_FRAMES: usize = 2;

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
/// (tail-jumped into from it, the thread's last entry), or the return address of another site:
/// a call of a function in between from another one (Debian's libmimalloc's `mi_reallocarray`
/// calling `mi_reallocn`, which reaches a call of `mi_free`); then that slot is the called
/// function's entry stack pointer, and the probe reads one frame further up from it plus that
/// site's `frame` ([`RELAY_FRAMES`], [`SITE_SP`] sites only).
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
/// calling malloc or free): libc's own relay, not the program's call. Unused slots are `[0, 0)`
/// (all of them when the file's ranges are not usable: rule 1 off).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LibcFile {
    pub ranges: [[u32; 2]; LIBC_FILE_RANGES],
    /// Calls of APIs from functions in between ([`RelaySite`]); unused slots have kind
    /// [`SITE_NONE`].
    pub sites: [RelaySite; LIBC_FILE_SITES],
    /// Per API id: the APIs (bit = API id) its function in this file may tail-jump into, in
    /// this file or, through a PLT slot that names one, in whichever file serves it in the
    /// process. What the thread's [`LastEntry`] carries, so that a probe in another file can
    /// read it (the cookie has no room for it). [`RELAY_IDS`] entries, the unused ones 0.
    pub relays: [u64; RELAY_IDS],
}

/// API ids that can take part in relays (a u64 mask names them): the entries of
/// [`LibcFile::relays`].
pub const RELAY_IDS: usize = 64;

// By hand: `Default` is derived for arrays of at most 32 elements.
impl Default for LibcFile {
    fn default() -> Self {
        Self {
            ranges: [[0; 2]; LIBC_FILE_RANGES],
            sites: [RelaySite::default(); LIBC_FILE_SITES],
            relays: [0; RELAY_IDS],
        }
    }
}

/// Whether the API set `mask` (bit = API id) holds API id `api` (ids ≥ 64 never).
pub const fn has_api(mask: u64, api: u32) -> bool {
    api < 64 && (mask >> api) & 1 != 0
}

/// The APIs a function of API id `api` may tail-jump into, for the thread's record: from its
/// file's entry, or every API when its file has none (`LIBC_FILES` full: count mode then
/// assumes any relay, as for a file whose code it cannot read).
#[inline(always)]
pub fn relay_apis(file: Option<&LibcFile>, api: u32) -> u64 {
    // A volatile read: else the compiler indexes with a copy of `api` recomputed from the
    // cookie, which the bounds check did not bound, and the verifier rejects the program.
    // SAFETY: a read of a local.
    let i = unsafe { core::ptr::read_volatile(&api) } as usize;
    match file {
        Some(f) => f.relays.get(i).copied().unwrap_or(0),
        None => u64::MAX,
    }
}

/// Count mode: the last counted API entry of a thread (LRU map keyed by `pid_tgid`). A tail-jump
/// relay (glibc's `reallocarray` → `realloc` → `malloc`) enters the next API with the stack
/// pointer and return address of the outer call, in the same file or in another one (glibc's
/// `reallocarray` → jemalloc's `realloc` through the PLT).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastEntry {
    pub entry_sp: u64,
    pub ret_addr: u64,
    /// The APIs (bit = API id, [`LibcFile::relays`]) the outer call may still tail-jump into:
    /// by API id, not by the file's relay index, so a relay into another file is seen.
    pub relay_apis: u64,
    pub api: u32,
    pub _pad: u32,
}

impl LastEntry {
    /// Whether an entry of API id `api` at this frame (its stack pointer at entry and return
    /// address) re-enters the recorded call by a tail jump: the same frame, into another API
    /// that call may relay to, whichever file serves it.
    pub const fn relays_into(&self, entry_sp: u64, ret_addr: u64, api: u32) -> bool {
        self.entry_sp == entry_sp
            && self.ret_addr == ret_addr
            && self.api != api
            && has_api(self.relay_apis, api)
    }
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
    assert!(size_of::<LibcFile>() == 8 * LIBC_FILE_RANGES + 8 * LIBC_FILE_SITES + 8 * RELAY_IDS);
    assert!(offset_of!(LibcFile, sites) == 8 * LIBC_FILE_RANGES);
    assert!(offset_of!(LibcFile, relays) == 8 * LIBC_FILE_RANGES + 8 * LIBC_FILE_SITES);
    assert!(size_of::<LastEntry>() == 32);
    assert!(offset_of!(LastEntry, relay_apis) == 16);
    assert!(offset_of!(LastEntry, api) == 24);
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
        assert!(!cookie::is_target(c));
        assert!(!cookie::relays(c));
        // The widest values of every field, side by side.
        let c = cookie::encode_count(0xff, 0xff, true, true, 62, 0xffff_ffff);
        assert_eq!(cookie::api(c), 0xff);
        assert_eq!(cookie::sp_delta(c), 0xff);
        assert!(cookie::is_target(c));
        assert!(cookie::relays(c));
        assert_eq!(cookie::file_slot(c), 62);
        assert_eq!(cookie::probe_offset(c), 0xffff_ffff);
        let c = cookie::encode_count(Api::Free as u32, 0, false, true, cookie::NO_FILE, 0x26030);
        assert_eq!(cookie::api(c), Api::Free as u32);
        assert!(!cookie::is_target(c));
        assert!(cookie::relays(c));
        assert_eq!(cookie::file_slot(c), cookie::NO_FILE);
        assert_eq!(cookie::probe_offset(c), 0x26030);
    }

    /// glibc: reallocarray → realloc → malloc, each by a tail jump with the outer call's
    /// frame. The record is matched by API id, so the API entered may be another file's
    /// (jemalloc's `realloc` after glibc's `reallocarray`); nothing else is a relay.
    #[test]
    fn relays_by_api_id() {
        let bit = |a: Api| 1u64 << a as u32;
        let mut glibc = LibcFile::default();
        glibc.relays[Api::Realloc as usize] = bit(Api::Malloc);
        glibc.relays[Api::Reallocarray as usize] = bit(Api::Realloc);
        let record = |api: Api| LastEntry {
            entry_sp: 0x7ffc_0000_1000,
            ret_addr: 0x5555_0000_1234,
            relay_apis: relay_apis(Some(&glibc), api as u32),
            api: api as u32,
            _pad: 0,
        };
        let (sp, ret) = (0x7ffc_0000_1000, 0x5555_0000_1234);
        let reallocarray = record(Api::Reallocarray);
        assert!(reallocarray.relays_into(sp, ret, Api::Realloc as u32));
        assert!(!reallocarray.relays_into(sp, ret, Api::Malloc as u32));
        assert!(!reallocarray.relays_into(sp, ret, Api::Reallocarray as u32));
        // Another frame: the program's own call.
        assert!(!reallocarray.relays_into(sp - 8, ret, Api::Realloc as u32));
        assert!(!reallocarray.relays_into(sp, ret + 5, Api::Realloc as u32));
        let realloc = record(Api::Realloc);
        assert!(realloc.relays_into(sp, ret, Api::Malloc as u32));
        assert!(!realloc.relays_into(sp, ret, Api::Free as u32));
        // A chain: what realloc adds once reallocarray's record matched it.
        let mut chain = reallocarray;
        chain.relay_apis |= relay_apis(Some(&glibc), Api::Realloc as u32);
        assert!(chain.relays_into(sp, ret, Api::Malloc as u32));
        // A leaf writes nothing to relay to.
        assert_eq!(relay_apis(Some(&glibc), Api::Free as u32), 0);
        // No file entry: every API; ids beyond the table or 64: none.
        assert_eq!(relay_apis(None, Api::Free as u32), u64::MAX);
        assert_eq!(relay_apis(Some(&glibc), 200), 0);
        let all = LastEntry {
            relay_apis: u64::MAX,
            ..reallocarray
        };
        assert!(!all.relays_into(sp, ret, 64));
        assert!(has_api(u64::MAX, 63) && !has_api(u64::MAX, 64));
    }
}
