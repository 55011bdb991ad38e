//! Entry-only uprobes on the Go runtime: map and slice growth, heap allocation sizes, GC
//! stop-the-world pauses.
//!
//! Never a uretprobe here: Go moves goroutine stacks and a rewritten return address crashes
//! the program. Where the end of a call matters (the end of a pause), the agent probes the
//! function's `ret` instructions instead, as plain uprobes.

use allocwatch_common::{
    errno::EEXIST,
    event::{EventHeader, EventKind, GoEvent},
    go::{
        GO_LARGE_ALLOC, GO_SPEC_STACK, GO_VALUES, GoAggKey, GoRole, GoSpec, StwState, agg_ignored,
        cookie, reg,
    },
    libc::NO_STACK,
    loss::LossCause,
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_NOEXIST, pt_regs},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_get_attach_cookie,
    },
    macros::uprobe,
    programs::ProbeContext,
};

use crate::{
    arch,
    maps::{
        EVENTS, GO_AGG, GO_AGG_FULL, GO_HIST, GO_PROCS, GO_SPECS, GO_STW, begins, capture_stack,
        hist_add, lost, why,
    },
};

#[uprobe(multi)]
pub fn go_entry(ctx: ProbeContext) -> u32 {
    on_go(&ctx);
    0
}

/// The floor of the Go probes: an empty program at the sites `go_entry` uses (benchmark only,
/// `--mode floor`).
#[uprobe(multi)]
pub fn go_floor(_ctx: ProbeContext) -> u32 {
    0
}

/// `go_entry` and `go_floor` for kernels without uprobe multi-links (before 6.6).
#[uprobe]
pub fn go_entry_single(ctx: ProbeContext) -> u32 {
    on_go(&ctx);
    0
}

#[uprobe]
pub fn go_floor_single(_ctx: ProbeContext) -> u32 {
    0
}

#[inline(always)]
fn on_go(ctx: &ProbeContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !begins(tgid) {
        return;
    }
    // SAFETY: the context pointer is valid for the program's lifetime.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let Some(spec) = GO_SPECS.get(cookie::spec(cookie)) else {
        why!(
            "pid {}: no Go spec {}: event skipped",
            tgid,
            cookie::spec(cookie)
        );
        return;
    };
    // SAFETY: regs points at the probed task's saved registers.
    let regs = unsafe { &*ctx.regs };
    let sp = arch::sp(regs) + cookie::sp_delta(cookie);
    let ret_addr = match arch::return_address(regs, sp) {
        Ok(addr) => addr,
        Err(e) => {
            why!(
                "pid {}: Go return address at {:x} unreadable ({})",
                tgid,
                sp,
                e
            );
            0
        }
    };

    let Some(role) = GoRole::from_u32(spec.role) else {
        return;
    };
    let mut values = [0u64; GO_VALUES];
    match role {
        GoRole::Malloc | GoRole::MallocSpecialized => {
            on_malloc(ctx, spec, role, regs, tgid, pid_tgid, ret_addr);
            return;
        }
        GoRole::StopTheWorld => {
            let state = StwState {
                // SAFETY: plain helper call.
                ts_ns: unsafe { bpf_ktime_get_ns() },
                reason: capture(&arch::go_args(regs), spec, 0),
                ret_addr,
            };
            if GO_STW.insert(&tgid, &state, BPF_ANY as u64).is_err() {
                why!(
                    "pid {}: GO_STW full: this stop-the-world pause goes unmeasured",
                    tgid
                );
            }
            return;
        }
        GoRole::StartTheWorld => {
            let Some(stw) = GO_STW.get_ptr(&tgid) else {
                why!(
                    "pid {}: the world restarted without a recorded stop: pause skipped",
                    tgid
                );
                return;
            };
            // SAFETY: map value pointer from a successful lookup; copied before the delete.
            let stw: StwState = unsafe { *stw };
            let _ = GO_STW.remove(&tgid);
            // SAFETY: plain helper call.
            values[0] = unsafe { bpf_ktime_get_ns() }.saturating_sub(stw.ts_ns);
            values[1] = stw.reason;
            values[2] = stw.ret_addr;
        }
        _ => {
            let args = arch::go_args(regs);
            for (i, v) in values.iter_mut().enumerate() {
                *v = capture(&args, spec, i);
            }
        }
    }
    emit(ctx, spec, regs, tgid, pid_tgid, ret_addr, values);
}

/// `mallocgc` and the size-specialized mallocs: a size histogram in the kernel, and large
/// objects streamed with their stack.
#[inline(always)]
fn on_malloc(
    ctx: &ProbeContext,
    spec: &GoSpec,
    role: GoRole,
    regs: &pt_regs,
    tgid: u32,
    pid_tgid: u64,
    ret_addr: u64,
) {
    if role == GoRole::MallocSpecialized
        && let Some(p) = GO_PROCS.get_ptr(&tgid)
    {
        // SAFETY: map value pointer from a successful lookup.
        let (start, end) = unsafe { ((*p).mallocgc_start, (*p).mallocgc_end) };
        if ret_addr >= start && ret_addr < end {
            // Called by mallocgc itself, whose entry already counted this allocation.
            return;
        }
    }
    let size = capture(&arch::go_args(regs), spec, 0);
    hist_add(&GO_HIST, tgid, size);
    if size >= GO_LARGE_ALLOC {
        let mut values = [0u64; GO_VALUES];
        values[0] = size;
        emit(ctx, spec, regs, tgid, pid_tgid, ret_addr, values);
    }
}

#[inline(always)]
fn emit(
    ctx: &ProbeContext,
    spec: &GoSpec,
    regs: &pt_regs,
    tgid: u32,
    pid_tgid: u64,
    ret_addr: u64,
    values: [u64; GO_VALUES],
) {
    // A growth whose key was seen before is only counted: no stack walk, no record (the agent
    // reads the counts and gives them the stack of the key's first record).
    let caller = if agg_ignored(spec.role).is_some() {
        caller_return_address(regs, ret_addr)
    } else {
        0
    };
    let key = GoAggKey::of(tgid, spec.role, ret_addr, caller, &values);
    if let Some(key) = &key
        && let Some(n) = GO_AGG.get_ptr_mut(key)
    {
        // SAFETY: this CPU's value.
        unsafe { *n += 1 };
        return;
    }
    let stack_id = if spec.flags & GO_SPEC_STACK != 0 {
        capture_stack(ctx)
    } else {
        NO_STACK
    };
    let ev = GoEvent {
        header: EventHeader {
            kind: EventKind::Go as u32,
            tgid,
        },
        role: spec.role,
        tid: pid_tgid as u32,
        // SAFETY: plain helper call.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        goroutine: arch::go_g(regs),
        ret_addr,
        stack_id,
        values,
        caller,
    };
    if EVENTS.output(&ev, crate::maps::batched_wakeup()).is_err() {
        lost(LossCause::RingbufFull);
        // No key without its record: the agent could not name its counts.
        return;
    }
    // The key after its record: a count the agent reads always has a record before it in the
    // ring. Another CPU may have inserted it meanwhile (its event went as a record too).
    if let Some(key) = &key {
        // From the stack: a `&0` is a constant in .rodata, which the compiler may share with
        // a global of the same value that the loader overrides (SAMPLE_BYTES: with the
        // agent's default sampling every key started at 2^19).
        let mut zero = 0u64;
        // SAFETY: a write to a local.
        unsafe { core::ptr::write_volatile(&mut zero, 0) };
        match GO_AGG.insert(key, &zero, BPF_NOEXIST as u64) {
            Ok(()) => {}
            Err(e) if e == -EEXIST => {}
            Err(_) => {
                if let Some(n) = GO_AGG_FULL.get_ptr_mut(0) {
                    // SAFETY: this CPU's slot.
                    unsafe { *n += 1 };
                }
            }
        }
    }
}

/// The probed function's caller's own return address, through the frame pointer (Go keeps
/// frame pointers; the caller calls, so it has a frame): at the entry the frame pointer is the
/// caller's, its return address one word above. A probe placed past the callee's own
/// `push rbp; mov rbp, rsp` finds its own return address there: one frame further. 0 when
/// unreadable (the key is then only less specific).
#[inline(always)]
fn caller_return_address(regs: &pt_regs, ret_addr: u64) -> u64 {
    let fp = arch::fp(regs);
    // SAFETY: reading the traced task's memory; a fault yields 0.
    let above = unsafe { bpf_probe_read_user((fp + 8) as *const u64) }.unwrap_or(0);
    if above != ret_addr {
        return above;
    }
    // SAFETY: as above.
    let up = unsafe { bpf_probe_read_user(fp as *const u64) }.unwrap_or(0);
    if up == 0 {
        return 0;
    }
    // SAFETY: as above.
    unsafe { bpf_probe_read_user((up + 8) as *const u64) }.unwrap_or(0)
}

/// Value `i` of the spec: a register, or a field loaded through one.
#[inline(always)]
fn capture(args: &[u64; arch::GO_ARGS], spec: &GoSpec, i: usize) -> u64 {
    let Some(c) = spec.captures.get(i) else {
        return 0;
    };
    // `reg` is a `GoReg` (argument index + 1) or `reg::NONE`.
    if c.reg == reg::NONE {
        return 0;
    }
    let Some(&base) = args.get(usize::from(c.reg) - 1) else {
        return 0;
    };
    let mut raw = base;
    if c.deref >= 1 {
        // SAFETY: reading the traced task's memory; a fault yields 0.
        raw = unsafe { bpf_probe_read_user((raw + c.offset as u64) as *const u64) }.unwrap_or(0);
    }
    if c.deref >= 2 && raw != 0 {
        // SAFETY: as above.
        raw = unsafe { bpf_probe_read_user((raw + c.offset2 as u64) as *const u64) }.unwrap_or(0);
    }
    match c.size {
        1 => raw & 0xff,
        2 => raw & 0xffff,
        4 => raw & 0xffff_ffff,
        _ => raw,
    }
}
