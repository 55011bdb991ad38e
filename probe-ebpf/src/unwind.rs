//! User stacks walked with the agent's unwind tables (`--unwind dwarf`,
//! `allocwatch_common::unwind`): where a frame's code has a table, its row says where the CFA is
//! (rsp or rbp plus an offset), where the caller's rbp was saved, and the return address is at
//! CFA-8; elsewhere a frame-pointer step, as the kernel's walk does. A signal trampoline's row
//! (`kind::SIGNAL`) leads to the interrupted code, its registers read from the signal frame.
//! Bounded: at most
//! `MAX_STACK_DEPTH` frames with `bpf_loop` (Linux 5.17, `FLAG_UNWIND_LOOP`), else
//! `UNWIND_FRAMES` unrolled; each frame a fixed number of binary-search steps.

use allocwatch_common::{
    MAX_STACK_DEPTH,
    config::{FLAG_UNWIND_LOOP, FLAG_UNWIND_TABLES},
    libc::NO_STACK,
    loss::LossCause,
    unwind::{
        FRAME_EXACT, UNWIND_MAP_STEPS, UNWIND_MAPPINGS_MAX, UNWIND_PROCS_MAX, UNWIND_ROW_STEPS,
        UNWIND_ROWS_MAX, UnwindProc, UnwindRow, kind, sigframe,
    },
};
use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_loop, bpf_probe_read_user},
    macros::map,
    maps::{Array, HashMap},
    programs::ProbeContext,
};

use crate::{
    arch,
    maps::{FLAGS, STACK_SCRATCH, capture_stack, current_tgid, lost, store_stack},
};

/// A libc probe's user stack: walked with the unwind tables (`FLAG_UNWIND_TABLES`) from the
/// registers at the probe, `entry_sp` (the stack pointer at the function's entry) and
/// `ret_addr` (the return address there), for a process the agent gave tables; else the
/// kernel's frame-pointer walk ([`capture_stack`]), which costs one lookup more here. On a node most processes have no table (their
/// files have frame pointers, or the agent has not read them yet).
#[inline(always)]
pub fn capture_libc_stack(ctx: &ProbeContext, entry_sp: u64, ret_addr: u64) -> i64 {
    if FLAGS.load() & FLAG_UNWIND_TABLES == 0 {
        return capture_stack(ctx);
    }
    // SAFETY: a plain value, read in place.
    let Some(proc) = (unsafe { UNWIND_PROCS.get(&current_tgid()) }) else {
        return capture_stack(ctx);
    };
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        return NO_STACK;
    };
    // SAFETY: the scratch slot is ours on this CPU for the program's run; regs points at the
    // probed task's saved registers.
    let (frames, regs) = unsafe { (&mut *buf, &*ctx.regs) };
    walk(
        proc,
        arch::pc(regs),
        arch::fp(regs),
        entry_sp,
        ret_addr,
        frames,
    );
    // Reads the frames from the same scratch slot.
    store_stack()
}

/// Every file's rows, each file's a contiguous run (the agent appends them).
#[map]
pub static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(UNWIND_ROWS_MAX, 0);
/// tgid → its mappings with a table.
#[map]
pub static UNWIND_PROCS: HashMap<u32, UnwindProc> = HashMap::with_max_entries(UNWIND_PROCS_MAX, 0);

/// Frames a table walk follows without `bpf_loop` (unrolled, the verifier checks every step of
/// every frame: at 64 frames it gave up at its million instructions).
const UNWIND_FRAMES: usize = 16;

/// 1 when `a <= b`, else 0, without a branch (both below 2^32). Binary searches without branches
/// keep the verifier's work linear: with an `if` per step it explored every path of every
/// step of every frame and gave up (a million instructions).
#[inline(always)]
fn le(a: u64, b: u64) -> u64 {
    a.wrapping_sub(b).wrapping_sub(1) >> 63
}

/// The rule for code at `pc` as (kind, CFA offset, rbp words); `GAP` where no table covers it.
/// Fixed-count steps (see [`le`]).
#[inline(always)]
fn rule_for(proc: &UnwindProc, pc: u64) -> (u8, u16, i8) {
    const NONE: (u8, u16, i8) = (kind::GAP, 0, 0);
    let len = u64::from(proc.len);
    if len == 0 || len > UNWIND_MAPPINGS_MAX as u64 {
        return NONE;
    }
    // The last mapping starting at or before pc (sorted by start; 0 if none is).
    let (mut base, mut size) = (0u64, len);
    for _ in 0..UNWIND_MAP_STEPS {
        let half = size / 2;
        let mid = (base + half) as usize & (UNWIND_MAPPINGS_MAX - 1);
        // Both below 2^47 (user addresses): `le` holds.
        base += half * le(proc.maps[mid].start, pc);
        size -= half;
    }
    let m = &proc.maps[base as usize & (UNWIND_MAPPINGS_MAX - 1)];
    if pc < m.start || pc >= m.end || m.len == 0 {
        return NONE;
    }
    let addr = pc.wrapping_sub(m.bias);
    if addr > u64::from(u32::MAX) {
        return NONE;
    }
    let (first, mut base, mut size) = (m.first, 0u32, m.len);
    for _ in 0..UNWIND_ROW_STEPS {
        let half = size / 2;
        let Some(r) = UNWIND_ROWS.get(first.wrapping_add(base + half)) else {
            return NONE;
        };
        base += half * le(u64::from(r.pc), addr) as u32;
        size -= half;
    }
    match UNWIND_ROWS.get(first.wrapping_add(base)) {
        Some(r) if u64::from(r.pc) <= addr => (r.kind, r.cfa_off, r.rbp_words),
        _ => NONE,
    }
}

#[inline(always)]
fn read(addr: u64) -> Option<u64> {
    // SAFETY: reading the traced task's own stack; a fault is an error, not a crash.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// How one frame's step ended.
#[derive(Clone, Copy)]
enum Step {
    /// `pc`, `sp`, `bp` are the caller's: go on.
    Next,
    /// The frame was a signal trampoline: `pc` (marked [`FRAME_EXACT`]), `sp`, `bp` are the
    /// interrupted code's; the trampoline's own frame is marked too.
    Signal,
    /// The walk ended where a stack ends (or where a frame-pointer walk ends, uncounted).
    End,
    /// The walk ended with a loss.
    Lost(LossCause),
}

/// One frame: from the return address `pc` in a frame whose stack pointer (before the call's
/// push) is `sp`, with `bp` the value rbp had there, to the caller's. With `SIGNALS`, a
/// signal trampoline's frame leads to the interrupted code, and a `pc` marked [`FRAME_EXACT`]
/// is the instruction a signal interrupted, `sp` and `bp` its registers; without (the
/// unrolled walk, whose every frame the verifier checks: with the signal step, its 16 frames
/// went past its million instructions with debug logging), a trampoline ends the walk.
#[inline(always)]
fn step<const SIGNALS: bool>(proc: &UnwindProc, pc: &mut u64, sp: &mut u64, bp: &mut u64) -> Step {
    // A return address: the call is the instruction before it (glibc starts `__restore_rt`'s
    // FDE a byte before it for this lookup). An interrupted instruction is its own.
    let at = if SIGNALS {
        (*pc & !FRAME_EXACT) - ((*pc >> 63) ^ 1)
    } else {
        *pc - 1
    };
    let (k, cfa_off, rbp_words) = rule_for(proc, at);
    let (cfa, saved_bp) = match k {
        kind::CFA_RSP | kind::CFA_RBP => {
            let base = if k == kind::CFA_RSP { *sp } else { *bp };
            let cfa = base + u64::from(cfa_off);
            let saved = (rbp_words != 0).then(|| cfa.wrapping_add_signed(i64::from(rbp_words) * 8));
            (cfa, saved)
        }
        kind::GAP => {
            // Frame pointers: [rbp] = the caller's rbp, [rbp+8] = the return address.
            if *bp == 0 {
                return Step::End;
            }
            (*bp + 16, Some(*bp))
        }
        kind::UNSUPPORTED => return Step::Lost(LossCause::UnwindUnsupported),
        kind::SIGNAL if SIGNALS => return signal_step(pc, sp, bp),
        kind::SIGNAL => return Step::Lost(LossCause::UnwindUnsupported),
        _ => return Step::End,
    };
    // A frame-pointer step through code without frame pointers (no table for it yet, as libc
    // in the first moments of a launched command) follows whatever rbp holds: its failed read
    // ends the walk as it ends the kernel's walk, uncounted. A failed read where a table gave
    // the rule is a loss.
    let ra = read(cfa - 8);
    let saved = match saved_bp {
        Some(at) => read(at).map(Some),
        None => Some(None),
    };
    let (Some(ra), Some(saved)) = (ra, saved) else {
        if k != kind::GAP {
            return Step::Lost(LossCause::UnwindReadError);
        }
        return Step::End;
    };
    if let Some(v) = saved {
        *bp = v;
    }
    // The stack grows down: a caller's frame is above its callee's.
    if cfa <= *sp && k != kind::GAP {
        return Step::End;
    }
    *sp = cfa;
    *pc = ra;
    Step::Next
}

/// Out of a signal trampoline: after the handler's return `sp` points at the kernel's
/// `struct ucontext`, which holds the interrupted registers ([`sigframe`]). The stack there may
/// be anywhere (`sigaltstack`): no check that it is above.
#[inline(always)]
fn signal_step(pc: &mut u64, sp: &mut u64, bp: &mut u64) -> Step {
    let uc = *sp;
    let (Some(rip), Some(rsp), Some(rbp)) = (
        read(uc + sigframe::RIP),
        read(uc + sigframe::RSP),
        read(uc + sigframe::RBP),
    ) else {
        return Step::Lost(LossCause::UnwindReadError);
    };
    if rip == 0 {
        return Step::End;
    }
    *pc = rip | FRAME_EXACT;
    *sp = rsp;
    *bp = rbp;
    Step::Signal
}

/// The walk's state between `bpf_loop` callbacks (on the program's stack, handed to each).
#[repr(C)]
struct LoopWalk {
    proc: *const UnwindProc,
    frames: *mut [u64; MAX_STACK_DEPTH],
    pc: u64,
    sp: u64,
    bp: u64,
    /// The step's end: 0 while walking, 1 ended, 2 ended with `loss`.
    end: u64,
    loss: LossCause,
}

/// `bpf_loop`'s callback: frame `i + 1`. The verifier checks this body once, not once per
/// frame, which is what lets the walk go `MAX_STACK_DEPTH` deep.
#[inline(never)]
extern "C" fn loop_step(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `LoopWalk` on the calling program's stack (`walk_loop`), whose
    // pointers are a map value and the per-CPU scratch slot, both valid for the program's run.
    let w = unsafe { &mut *ctx.cast::<LoopWalk>() };
    let slot = (i as usize).wrapping_add(1);
    if slot >= MAX_STACK_DEPTH {
        return 1;
    }
    if w.pc == 0 {
        w.end = 1;
        return 1;
    }
    // SAFETY: as above.
    let (proc, frames) = unsafe { (&*w.proc, &mut *w.frames) };
    frames[slot] = w.pc;
    match step::<true>(proc, &mut w.pc, &mut w.sp, &mut w.bp) {
        Step::Next => 0,
        Step::Signal => {
            frames[slot] |= FRAME_EXACT;
            0
        }
        Step::End => {
            w.end = 1;
            1
        }
        Step::Lost(cause) => {
            w.loss = cause;
            w.end = 2;
            1
        }
    }
}

/// Walks the stack of a libc probe into `frames` (the rest zeroed).
/// `rip` and `rbp` are the registers at the probe, `entry_sp` the stack pointer at the
/// function's entry (where `ret_addr`, the caller's return address, is).
#[inline(always)]
fn walk(
    proc: &UnwindProc,
    rip: u64,
    rbp: u64,
    entry_sp: u64,
    ret_addr: u64,
    frames: &mut [u64; MAX_STACK_DEPTH],
) {
    // Zeroed first, word by word: volatile, so that LLVM does not make it a byte-wise memset
    // after the walk, which the verifier then walked once per possible length (a million
    // instructions).
    for slot in frames.iter_mut() {
        // SAFETY: a valid, aligned slot of the array.
        unsafe { core::ptr::write_volatile(slot, 0) };
    }
    frames[0] = rip;
    let (mut pc, mut sp, mut bp) = (ret_addr, entry_sp + arch::RET_SP_DELTA, rbp);
    // A prologue with a frame pointer may have set rbp before the probed instruction.
    if bp == entry_sp.wrapping_sub(arch::FP_BELOW_ENTRY_SP) {
        bp = read(bp).unwrap_or(0);
    }
    // Counted once after the walk: a `lost` (with its debug log line) in each unrolled step
    // multiplied the verifier's work past its limit when debug logging is on.
    let loss = if FLAGS.load() & FLAG_UNWIND_LOOP != 0 {
        let mut w = LoopWalk {
            proc,
            frames,
            pc,
            sp,
            bp,
            end: 0,
            loss: LossCause::UnwindTruncated,
        };
        // SAFETY: the helper calls `loop_step` with `&mut w`, which outlives the call.
        unsafe {
            bpf_loop(
                (MAX_STACK_DEPTH - 1) as u32,
                loop_step as *mut c_void,
                (&raw mut w).cast(),
                0,
            )
        };
        match w.end {
            0 if w.pc != 0 => Some(LossCause::UnwindTruncated),
            2 => Some(w.loss),
            _ => None,
        }
    } else {
        walk_inline(proc, &mut pc, &mut sp, &mut bp, frames)
    };
    if let Some(cause) = loss {
        lost(cause);
    }
}

/// The walk without `bpf_loop` (kernels before 5.17): `UNWIND_FRAMES` frames, unrolled; a
/// signal frame ends it, counted (`unwind_unsupported`).
#[inline(always)]
fn walk_inline(
    proc: &UnwindProc,
    pc: &mut u64,
    sp: &mut u64,
    bp: &mut u64,
    frames: &mut [u64; MAX_STACK_DEPTH],
) -> Option<LossCause> {
    for slot in frames.iter_mut().skip(1).take(UNWIND_FRAMES - 1) {
        if *pc == 0 {
            return None;
        }
        *slot = *pc;
        match step::<false>(proc, pc, sp, bp) {
            Step::Next | Step::Signal => {}
            Step::End => return None,
            Step::Lost(cause) => return Some(cause),
        }
    }
    (*pc != 0).then_some(LossCause::UnwindTruncated)
}
