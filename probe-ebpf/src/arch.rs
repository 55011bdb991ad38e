//! The probed task's registers, per architecture: the one module that names `pt_regs` fields.
//! aya-ebpf selects `pt_regs` by `--cfg bpf_target_arch` (aya-build passes the agent's target
//! arch): the kernel's `pt_regs` on x86_64, `user_pt_regs` (`regs[0..=30]`, `sp`, `pc`) on
//! aarch64.
//!
//! Every accessor is `#[inline(always)]` and reads a field at a constant offset: the verifier
//! rejects context loads at offsets computed at run time.

use aya_ebpf::bindings::pt_regs;

/// Integer argument registers of Go's ABIInternal that the Go probes read, in ABI order
/// (`allocwatch_common::go::GoReg` is an index into this list).
pub const GO_ARGS: usize = 9;

#[cfg(bpf_target_arch = "x86_64")]
mod imp {
    use aya_ebpf::helpers::bpf_probe_read_user;

    use super::{GO_ARGS, pt_regs};

    /// How far `ret` moves the stack pointer above the entry's: it pops the return address.
    pub const RET_SP_DELTA: u64 = 8;
    /// Where a frame-pointer prologue (`push rbp; mov rbp, rsp`) leaves rbp, below the entry's
    /// stack pointer.
    pub const FP_BELOW_ENTRY_SP: u64 = 8;

    #[inline(always)]
    pub fn sp(regs: &pt_regs) -> u64 {
        regs.rsp
    }

    /// A uprobe reports the probed instruction's address here.
    #[inline(always)]
    pub fn pc(regs: &pt_regs) -> u64 {
        regs.rip
    }

    #[inline(always)]
    pub fn fp(regs: &pt_regs) -> u64 {
        regs.rbp
    }

    /// The integer return value (at a uretprobe).
    #[inline(always)]
    pub fn ret_value(regs: &pt_regs) -> u64 {
        regs.rax
    }

    /// C argument `n` (SysV, 1-based: rdi, rsi, rdx, rcx, r8, r9), 0 for any other `n`.
    #[inline(always)]
    pub fn c_arg(regs: &pt_regs, n: u64) -> u64 {
        // A plain match: no variable index into the context for the verifier to bound.
        match n {
            1 => regs.rdi,
            2 => regs.rsi,
            3 => regs.rdx,
            4 => regs.rcx,
            5 => regs.r8,
            6 => regs.r9,
            _ => 0,
        }
    }

    /// Go's ABIInternal integer argument registers (Go ≥ 1.17): rax, rbx, rcx, rdi, rsi,
    /// r8–r11. Loaded once with constant offsets.
    #[inline(always)]
    pub fn go_args(regs: &pt_regs) -> [u64; GO_ARGS] {
        // SAFETY: volatile reads of fields of the valid pt_regs snapshot.
        unsafe {
            [
                core::ptr::read_volatile(&regs.rax),
                core::ptr::read_volatile(&regs.rbx),
                core::ptr::read_volatile(&regs.rcx),
                core::ptr::read_volatile(&regs.rdi),
                core::ptr::read_volatile(&regs.rsi),
                core::ptr::read_volatile(&regs.r8),
                core::ptr::read_volatile(&regs.r9),
                core::ptr::read_volatile(&regs.r10),
                core::ptr::read_volatile(&regs.r11),
            ]
        }
    }

    /// Go's current goroutine (`g`, R14 under ABIInternal).
    #[inline(always)]
    pub fn go_g(regs: &pt_regs) -> u64 {
        regs.r14
    }

    /// The caller's return address at a function's entry, whose stack pointer was `entry_sp`:
    /// `call` pushed it at `[entry_sp]`. The error is `bpf_probe_read_user`'s.
    #[inline(always)]
    pub fn return_address(_regs: &pt_regs, entry_sp: u64) -> Result<u64, i32> {
        // SAFETY: reading the traced task's own stack; a fault is an error, not a crash.
        unsafe { bpf_probe_read_user(entry_sp as *const u64) }
    }
}

#[cfg(bpf_target_arch = "aarch64")]
mod imp {
    use super::{GO_ARGS, pt_regs};

    /// `ret` branches to x30 and leaves the stack pointer alone.
    pub const RET_SP_DELTA: u64 = 0;
    /// Where a frame-record prologue (`stp x29, x30, [sp, #-16]!; mov x29, sp`) leaves x29,
    /// below the entry's stack pointer.
    pub const FP_BELOW_ENTRY_SP: u64 = 16;

    /// The link register: `bl` leaves the return address here.
    const LR: usize = 30;
    const FP: usize = 29;
    /// Go's g register (R28) on arm64.
    const G: usize = 28;

    #[inline(always)]
    pub fn sp(regs: &pt_regs) -> u64 {
        regs.sp
    }

    #[inline(always)]
    pub fn pc(regs: &pt_regs) -> u64 {
        regs.pc
    }

    #[inline(always)]
    pub fn fp(regs: &pt_regs) -> u64 {
        regs.regs[FP]
    }

    #[inline(always)]
    pub fn ret_value(regs: &pt_regs) -> u64 {
        regs.regs[0]
    }

    /// C argument `n` (AAPCS64, 1-based: x0–x5 as the probes use at most six), 0 otherwise.
    #[inline(always)]
    pub fn c_arg(regs: &pt_regs, n: u64) -> u64 {
        match n {
            1 => regs.regs[0],
            2 => regs.regs[1],
            3 => regs.regs[2],
            4 => regs.regs[3],
            5 => regs.regs[4],
            6 => regs.regs[5],
            _ => 0,
        }
    }

    /// Go's ABIInternal on arm64 passes integer arguments in R0–R15, in the same order as
    /// amd64's nine registers: the first nine are the ones the tables use.
    #[inline(always)]
    pub fn go_args(regs: &pt_regs) -> [u64; GO_ARGS] {
        // SAFETY: volatile reads of fields of the valid user_pt_regs snapshot.
        unsafe {
            [
                core::ptr::read_volatile(&regs.regs[0]),
                core::ptr::read_volatile(&regs.regs[1]),
                core::ptr::read_volatile(&regs.regs[2]),
                core::ptr::read_volatile(&regs.regs[3]),
                core::ptr::read_volatile(&regs.regs[4]),
                core::ptr::read_volatile(&regs.regs[5]),
                core::ptr::read_volatile(&regs.regs[6]),
                core::ptr::read_volatile(&regs.regs[7]),
                core::ptr::read_volatile(&regs.regs[8]),
            ]
        }
    }

    #[inline(always)]
    pub fn go_g(regs: &pt_regs) -> u64 {
        regs.regs[G]
    }

    /// The caller's return address: in x30 from the `bl` until the callee saves or reuses it.
    /// The agent probes arm64 functions only where x30 still holds it (at the entry, just past
    /// Go's stack check, which does not touch x30, and at `ret`s, which branch to it).
    #[inline(always)]
    pub fn return_address(regs: &pt_regs, _entry_sp: u64) -> Result<u64, i32> {
        Ok(regs.regs[LR])
    }
}

#[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
compile_error!("allocwatch's probes know x86_64 and aarch64 registers only");

pub use imp::*;
