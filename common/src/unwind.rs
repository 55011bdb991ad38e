//! In-kernel unwinding without frame pointers (x86_64): the compact tables the agent compiles
//! from each mapped file's `.eh_frame` (agent/src/unwind/) and the probe walks
//! (probe-ebpf/src/unwind.rs). The layout follows the OpenTelemetry eBPF profiler's "stack
//! deltas": per file, a sorted list of (start address → how to find the CFA, rbp and the return
//! address), shared by every process that maps the file; per process, its mappings with a table.

/// What a row says about the frame of a pc at or after its `pc` (until the next row).
pub mod kind {
    /// CFA = rsp + `cfa_off`.
    pub const CFA_RSP: u8 = 0;
    /// CFA = rbp + `cfa_off`.
    pub const CFA_RBP: u8 = 1;
    /// No call-frame information here (between functions): step with the frame pointer.
    pub const GAP: u8 = 2;
    /// A rule the walker does not follow (an expression, a CFA from another register, a return
    /// address not at CFA-8): the walk stops there, counted (`unwind_unsupported`).
    pub const UNSUPPORTED: u8 = 3;
    /// The return address is undefined: the outermost frame (`_start`, thread entry).
    pub const END: u8 = 4;
    /// A signal trampoline (glibc's `__restore_rt`: an FDE with the `S` augmentation whose CFA
    /// is the `rsp` saved in the `ucontext` at rsp): the caller is the interrupted code, whose
    /// registers are read from that `ucontext` ([`sigframe`]).
    pub const SIGNAL: u8 = 5;
}

/// Where the kernel's x86-64 `struct rt_sigframe` keeps the interrupted registers, as offsets
/// from the trampoline's rsp (which points at its `struct ucontext` once the handler has
/// returned): `uc_flags` (8), `uc_link` (8), `uc_stack` (24), then `uc_mcontext` (`struct
/// sigcontext`: r8..r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip). glibc's CFI for
/// `__restore_rt` says the same (`DW_OP_breg7 (rsp): 120` for rbp, 160 rsp, 168 rip); the agent
/// marks a row [`kind::SIGNAL`] only where the FDE's rules are exactly these.
pub mod sigframe {
    pub const MCONTEXT: u64 = 8 + 8 + 24;
    pub const RBP: u64 = MCONTEXT + 10 * 8;
    pub const RSP: u64 = MCONTEXT + 15 * 8;
    pub const RIP: u64 = MCONTEXT + 16 * 8;

    const _: () = {
        assert!(RBP == 120);
        assert!(RSP == 160);
        assert!(RIP == 168);
    };
}

/// Set on a stack frame whose address is not a return address but the very instruction (the
/// code a signal interrupted, and the signal trampoline itself): it is named at that address,
/// not at the call before it, and not checked for following a call. User addresses are below
/// 2^57, so the bit is free; the agent masks it off before using the address.
pub const FRAME_EXACT: u64 = 1 << 63;

/// One row of a file's table (8 bytes). `pc` is the file's own virtual address (as in its
/// program headers), so one table serves every process whatever its load address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRow {
    pub pc: u32,
    /// CFA offset from the register `kind` names (rows of larger frames are `UNSUPPORTED`).
    pub cfa_off: u16,
    /// One of [`kind`].
    pub kind: u8,
    /// Where the caller's rbp is saved, in 8-byte words from the CFA (`-2`: at CFA-16); 0: rbp
    /// is unchanged in this frame.
    pub rbp_words: i8,
}

/// One executable mapping of a process that has a table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindMapping {
    pub start: u64,
    pub end: u64,
    /// Address minus bias = the file's virtual address.
    pub bias: u64,
    /// The file's rows in `UNWIND_ROWS`: `first..first + len`.
    pub first: u32,
    pub len: u32,
}

/// Mappings with a table one process can have (further ones are walked with frame pointers).
pub const UNWIND_MAPPINGS_MAX: usize = 32;

/// A process's mappings with a table, sorted by `start` (`UNWIND_PROCS`, key: tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnwindProc {
    pub len: u32,
    pub _pad: u32,
    pub maps: [UnwindMapping; UNWIND_MAPPINGS_MAX],
}

impl Default for UnwindProc {
    fn default() -> Self {
        Self {
            len: 0,
            _pad: 0,
            maps: [UnwindMapping::default(); UNWIND_MAPPINGS_MAX],
        }
    }
}

/// Rows of every table together (`UNWIND_ROWS`; 8 bytes each: 8 MiB). glibc's libc.so.6 has
/// about 30,000.
pub const UNWIND_ROWS_MAX: u32 = 1 << 20;
/// Binary-search steps over `UNWIND_ROWS_MAX` rows.
pub const UNWIND_ROW_STEPS: usize = 21;
/// Binary-search steps over `UNWIND_MAPPINGS_MAX` mappings.
pub const UNWIND_MAP_STEPS: usize = 6;
/// Processes with tables at once.
pub const UNWIND_PROCS_MAX: u32 = 4096;

const _: () = {
    assert!(size_of::<UnwindRow>() == 8);
    assert!(size_of::<UnwindMapping>() == 32);
    assert!(size_of::<UnwindProc>() == 8 + 32 * UNWIND_MAPPINGS_MAX);
    assert!(1 << UNWIND_ROW_STEPS > UNWIND_ROWS_MAX as usize);
    assert!(1 << UNWIND_MAP_STEPS > UNWIND_MAPPINGS_MAX);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY (both): plain integers, no padding (sizes asserted above).
    unsafe impl aya::Pod for super::UnwindRow {}
    unsafe impl aya::Pod for super::UnwindProc {}
}
