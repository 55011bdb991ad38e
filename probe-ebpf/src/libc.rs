//! Uprobes on the libc allocation API, one set of programs per mode (`agent/src/probes.rs`
//! picks them):
//!
//! - full (`libc_entry` + `libc_return`): the attach cookie says which function fired and how
//!   far the stack pointer moved before the probed instruction. Calls are counted at entry; the
//!   return probe only settles the outcome (new pointer, failure) and the live table, so a lost
//!   return never loses a count. A per-thread in-flight marker (`PENDING`) keeps libc's own
//!   relays from counting twice.
//! - count (`libc_count`): entry only, no live table. Relays are recognized without a return
//!   probe (see [`on_count`]).
//! - floor (`libc_floor`, `libc_floor_return`): empty programs at the same sites, the cost of
//!   the uprobe itself that every mode is measured against (`./x bench`).
//!
//! Sampling (`SAMPLE_BYTES` > 0, `maps::sampled`): every call is still counted, by API and
//! immediate caller; only a call chosen by bytes (Poisson, mean `SAMPLE_BYTES`) has its stack
//! walked (its row carries the stack id; the others count in the caller's row, `NO_STACK`)
//! and, in full mode, its block tracked in the live table. `free` has no size: it is never
//! sampled, counted per caller without bytes (a sampled block it frees still leaves the live
//! table and credits its allocating row).

use allocwatch_common::{
    config::FLAG_STACKS,
    libc::{
        Api, LastEntry, LibcFile, LiveAlloc, LiveKey, NO_STACK, Pending, RELAY_FRAMES, RelaySite,
        SITE_NONE, SITE_SP, SiteKey, cookie, has_api, relay_apis,
    },
    loss::LossCause,
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, pt_regs},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_get_attach_cookie,
    },
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use crate::{
    arch,
    maps::{
        FLAGS, LAST_ENTRY, LIBC_FILES, LIBC_HIST, LIVE, PENDING, RELAY_NAMED, begins, count_call,
        hist_add, lost, row_of, sampled, sampling, traced, why,
    },
    unwind::capture_libc_stack,
};

#[uprobe(multi)]
pub fn libc_entry(ctx: ProbeContext) -> u32 {
    on_entry(&ctx);
    0
}

#[uretprobe(multi)]
pub fn libc_return(ctx: RetProbeContext) -> u32 {
    on_return(&ctx);
    0
}

#[uprobe(multi)]
pub fn libc_count(ctx: ProbeContext) -> u32 {
    on_count(&ctx);
    0
}

/// The floor: an empty program at the sites of the entry programs.
#[uprobe(multi)]
pub fn libc_floor(_ctx: ProbeContext) -> u32 {
    0
}

/// The floor of the return probe.
#[uretprobe(multi)]
pub fn libc_floor_return(_ctx: RetProbeContext) -> u32 {
    0
}

// The same programs for kernels without uprobe multi-links (before 6.6): one perf-event link per
// probe site (agent/src/probes.rs picks `NAME_single` there).

#[uprobe]
pub fn libc_entry_single(ctx: ProbeContext) -> u32 {
    on_entry(&ctx);
    0
}

#[uretprobe]
pub fn libc_return_single(ctx: RetProbeContext) -> u32 {
    on_return(&ctx);
    0
}

#[uprobe]
pub fn libc_count_single(ctx: ProbeContext) -> u32 {
    on_count(&ctx);
    0
}

#[uprobe]
pub fn libc_floor_single(_ctx: ProbeContext) -> u32 {
    0
}

#[uretprobe]
pub fn libc_floor_return_single(_ctx: RetProbeContext) -> u32 {
    0
}

/// Whether the file offset `off` lies in one of `file`'s API functions.
#[inline(always)]
fn in_api(file: &LibcFile, off: u64) -> bool {
    for r in &file.ranges {
        if off >= u64::from(r[0]) && off < u64::from(r[1]) {
            return true;
        }
    }
    false
}

/// The relay site whose call returns to the file offset `off`, if one does.
#[inline(always)]
fn site_at(file: &LibcFile, off: u64) -> Option<RelaySite> {
    for site in &file.sites {
        if site.kind == SITE_NONE {
            break;
        }
        if off == u64::from(site.ret_off) {
            return Some(*site);
        }
    }
    None
}

/// Count mode's rule 1 through functions in between: whether an entry of `api_id` whose return
/// address is the file offset `ret_off` (the entry's stack pointer `entry_sp`) was made by a
/// function in between on an API's behalf. A site's calling function's return slot holds a
/// return address into an API, or it is the thread's last entry (tail-jumped into from it), or
/// it holds the return address of another site (a call from another function in between,
/// Debian's libmimalloc's `mi_reallocarray` calling `mi_reallocn`): then [`one_frame_up`].
/// The common case, a return address that is no site, costs the scan of the file's sites, as
/// it did with one frame.
#[inline(always)]
fn from_relay_site(
    file: &LibcFile,
    pid_tgid: u64,
    api_id: u32,
    ret_off: u64,
    entry_sp: u64,
    regs: &pt_regs,
    cookie: u64,
) -> bool {
    let Some(site) = site_at(file, ret_off) else {
        return false;
    };
    let base = if site.kind == SITE_SP {
        entry_sp
    } else {
        arch::fp(regs)
    };
    let slot = base.wrapping_add(u64::from(site.frame));
    // Return address − `bias` = its file offset (a uprobe reports the probed instruction's
    // address as the pc).
    let bias = arch::pc(regs).wrapping_sub(cookie::probe_offset(cookie));
    match outer_relays(file, pid_tgid, api_id, slot, bias) {
        Ok(relays) => relays,
        Err(outer_off) => one_frame_up(file, api_id, outer_off, slot, bias),
    }
}

/// Whether the return slot `slot` of a site's calling function shows a relay: it holds a
/// return address into an API of `file`, or it is the thread's last entry, which may relay
/// into `api_id`. `Err`: neither, with the file offset of the return address it holds
/// (`bias`: return address − file offset).
#[inline(always)]
fn outer_relays(
    file: &LibcFile,
    pid_tgid: u64,
    api_id: u32,
    slot: u64,
    bias: u64,
) -> Result<bool, u64> {
    // SAFETY: reading the traced task's own stack; a fault is an error, not a crash.
    let Ok(outer_ret) = (unsafe { bpf_probe_read_user(slot as *const u64) }) else {
        return Ok(false);
    };
    // Called from an API function.
    let outer_off = outer_ret.wrapping_sub(bias);
    if in_api(file, outer_off) {
        return Ok(true);
    }
    // Tail-jumped into from the thread's last counted entry, whose frame it took over.
    // SAFETY: map value from a successful lookup; only this thread writes it.
    if let Some(last) = unsafe { LAST_ENTRY.get(&pid_tgid) }
        && last.relays_into(slot, outer_ret, api_id)
    {
        return Ok(true);
    }
    Err(outer_off)
}

// [`one_frame_up`] is the second of them.
const _: () = assert!(RELAY_FRAMES == 2);

/// [`from_relay_site`] one frame further: the return slot `slot` holds a return address at the
/// file offset `off`; when that is a site whose rule is the stack pointer's (the frame pointer
/// the probe sees is the innermost function's), `slot` is the called function's entry stack
/// pointer, and its caller's return slot shows the relay or not. A BPF subprogram: its code
/// stays off the common path, whose registers it would otherwise take (the site scan's loads
/// went to the stack when it was inlined).
#[inline(never)]
fn one_frame_up(file: &LibcFile, api_id: u32, off: u64, slot: u64, bias: u64) -> bool {
    let Some(site) = site_at(file, off) else {
        return false;
    };
    if site.kind != SITE_SP {
        return false;
    }
    let slot = slot.wrapping_add(u64::from(site.frame));
    outer_relays(file, bpf_get_current_pid_tgid(), api_id, slot, bias) == Ok(true)
}
/// Count mode: calls and bytes per (process, API, immediate caller[, stack]), from the entry
/// probe alone. Without a return probe nothing says when a call ends, so libc's own relays are
/// recognized by two rules instead of the in-flight marker:
///
/// 1. Nested call: the return address lies inside one of the probed file's API functions
///    (glibc's realloc calls malloc or free): the API called itself. The cookie carries the
///    probed instruction's file offset, so `ret - rip + offset` is the return address as a
///    file offset of the same file, compared with the file's API ranges (`LIBC_FILES`).
/// 2. Tail jump: the entry has the stack pointer and return address of the thread's last
///    counted entry, and that entry's function may tail-jump into this API (its file's
///    relays, found by disassembly: glibc's reallocarray → realloc → malloc re-enter with the
///    outer call's frame). The record names APIs by id, so the API entered may be served by
///    another file: glibc's reallocarray jumps through its PLT into jemalloc's realloc.
///
/// Rule 1 also looks one frame up when the return address is a known call of an API from a
/// function in between (`RelaySite`: mimalloc's `mi_realloc_aligned` tail-jumps into
/// `_mi_theap_realloc_zero`, which calls `mi_free`): that function's return slot holds a
/// return address into an API (it was called from one), or it is the thread's last entry
/// with its return address (an API tail-jumped into it). When it holds a known call of that
/// function from another function in between, it looks one frame further ([`from_relay_site`]).
#[inline(always)]
fn on_count(ctx: &ProbeContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !begins(tgid) {
        return;
    }
    // SAFETY: the context pointer is valid for the program's lifetime.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let api_id = cookie::api(cookie);
    // SAFETY: regs points at the probed task's saved registers.
    let regs = unsafe { &*ctx.regs };
    let entry_sp = arch::sp(regs) + cookie::sp_delta(cookie);
    let ret_addr = return_address(tgid, regs, entry_sp);

    let file = LIBC_FILES.get(cookie::file_slot(cookie));
    if let Some(file) = file {
        // A uprobe reports the probed instruction's address as the pc.
        let ret_off = ret_addr
            .wrapping_sub(arch::pc(regs))
            .wrapping_add(cookie::probe_offset(cookie));
        if in_api(file, ret_off) {
            return;
        }
        // Rule 1 up the frames of functions in between (`RelaySite`).
        if from_relay_site(file, pid_tgid, api_id, ret_off, entry_sp, regs, cookie) {
            return;
        }
    }
    // Rule 2 touches the thread's record only where it can matter: an API some function
    // tail-jumps into checks it (in its own file, or through a PLT slot naming it in any
    // file: `RELAY_NAMED`), an API that may tail-jump writes it (leaves such as free do
    // neither).
    let writes = cookie::relays(cookie);
    let reads = cookie::is_target(cookie)
        || matches!(RELAY_NAMED.get(0), Some(&named) if has_api(named, api_id));
    if reads || writes {
        let entry = LastEntry {
            entry_sp,
            ret_addr,
            relay_apis: if writes { relay_apis(file, api_id) } else { 0 },
            api: api_id,
            _pad: 0,
        };
        match LAST_ENTRY.get_ptr_mut(&pid_tgid) {
            Some(last) => {
                // SAFETY: map value pointer from a successful lookup; only this thread writes it.
                unsafe {
                    if (*last).relays_into(entry_sp, ret_addr, api_id) {
                        // Relays chain (reallocarray → realloc → malloc): the frame may now
                        // also reach what this API relays to.
                        (*last).relay_apis |= entry.relay_apis;
                        return;
                    }
                    // Replaced even by a non-relaying API: the record is the last entry.
                    *last = entry;
                }
            }
            None if writes => {
                // An LRU map makes room; a failure only weakens rule 2 for this thread.
                if LAST_ENTRY
                    .insert(&pid_tgid, &entry, BPF_ANY as u64)
                    .is_err()
                {
                    why!(
                        "pid {}: LAST_ENTRY insert failed: a relay may count twice",
                        tgid
                    );
                }
            }
            None => {}
        }
    }

    let Some(api) = Api::from_u32(api_id) else {
        why!(
            "pid {}: unknown API id {} in the attach cookie: call skipped",
            tgid,
            api_id
        );
        return;
    };
    let (size, _) = request(ctx, api);
    // Nothing but the stack is sampled here: without stacks the draw is skipped.
    let stack_id = if stacks_on() && sampled(size, !api.is_free()) {
        capture_libc_stack(ctx, entry_sp, ret_addr)
    } else {
        NO_STACK
    };
    let mut site = SiteKey {
        tgid,
        api: api_id,
        stack_id,
        ret_addr,
    };
    count_call(&mut site, size);
}

/// Whether user stacks are captured (`FLAG_STACKS`).
#[inline(always)]
pub(crate) fn stacks_on() -> bool {
    FLAGS.load() & FLAG_STACKS != 0
}

/// The user stack id of a sampled call when stacks are on (a failure is counted and yields
/// [`NO_STACK`]).
#[inline(always)]
fn stack_id(ctx: &ProbeContext, sampled: bool, entry_sp: u64, ret_addr: u64) -> i64 {
    if !sampled || !stacks_on() {
        return NO_STACK;
    }
    capture_libc_stack(ctx, entry_sp, ret_addr)
}

/// (bytes requested, pointer argument) of a call of `api`: realloc's old block, the block freed
/// (free, operator delete), posix_memalign's `memptr`.
#[inline(always)]
fn request(ctx: &ProbeContext, api: Api) -> (u64, u64) {
    let a0: u64 = ctx.arg(0).unwrap_or(0);
    let a1: u64 = ctx.arg(1).unwrap_or(0);
    let a2: u64 = ctx.arg(2).unwrap_or(0);
    match api {
        Api::Malloc => (a0, 0),
        Api::Calloc => (mul_sat(a0, a1), 0),
        Api::Realloc => (a1, a0),
        Api::Reallocarray => (mul_sat(a1, a2), a0),
        Api::Free => (0, a0),
        Api::PosixMemalign => (a2, a0),
        Api::AlignedAlloc | Api::Memalign => (a1, 0),
        Api::Valloc | Api::Pvalloc => (a0, 0),
        // `operator new(size_t, …)`: the size first, whatever the overload.
        Api::New
        | Api::NewArray
        | Api::NewNothrow
        | Api::NewArrayNothrow
        | Api::NewAligned
        | Api::NewArrayAligned
        | Api::NewAlignedNothrow
        | Api::NewArrayAlignedNothrow => (a0, 0),
        // `operator delete(void*, …)`: the block first.
        Api::Delete
        | Api::DeleteArray
        | Api::DeleteSized
        | Api::DeleteArraySized
        | Api::DeleteAligned
        | Api::DeleteArrayAligned
        | Api::DeleteSizedAligned
        | Api::DeleteArraySizedAligned
        | Api::DeleteNothrow
        | Api::DeleteArrayNothrow
        | Api::DeleteAlignedNothrow
        | Api::DeleteArrayAlignedNothrow => (0, a0),
        // jemalloc's `mallocx(size, flags)`, mimalloc's `mi_*alloc_aligned(size, alignment)`.
        Api::Mallocx | Api::MiMallocAligned | Api::MiZallocAligned => (a0, 0),
        // `rallocx(ptr, size, flags)`, `mi_realloc_aligned(ptr, newsize, alignment)`.
        Api::Rallocx | Api::MiReallocAligned => (a1, a0),
        // `sdallocx(ptr, size, flags)`, `dallocx(ptr, flags)`: the block first.
        Api::Sdallocx | Api::Dallocx => (0, a0),
    }
}

#[inline(always)]
fn on_entry(ctx: &ProbeContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !begins(tgid) {
        return;
    }
    // SAFETY: the context pointer is valid for the program's lifetime.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let api_id = cookie::api(cookie);
    // SAFETY: regs points at the probed task's saved registers.
    let regs = unsafe { &*ctx.regs };
    let entry_sp = arch::sp(regs) + cookie::sp_delta(cookie);

    if let Some(p) = PENDING.get_ptr(&pid_tgid) {
        // SAFETY: map value pointer from a successful lookup.
        let outer_sp = unsafe { (*p).entry_sp };
        if entry_sp <= outer_sp {
            // Called from inside an API call of this thread (deeper, or a tail call at the same
            // depth): libc's own relay, not the program's.
            return;
        }
        // The outer call never returned (longjmp, attach mid-call): drop the stale marker, so
        // that it is counted once, not again at each later call that does not replace it (free).
        why!(
            "pid {}: API {} entered above a call that never returned (longjmp, or attached \
             mid-call): its marker dropped",
            tgid,
            api_id
        );
        lost(LossCause::OrphanReturn);
        let _ = PENDING.remove(&pid_tgid);
    }

    let ret_addr = return_address(tgid, regs, entry_sp);
    let Some(api) = Api::from_u32(api_id) else {
        why!(
            "pid {}: unknown API id {} in the attach cookie: call skipped",
            tgid,
            api_id
        );
        return;
    };
    let (size, arg_ptr) = request(ctx, api);
    let sampled = sampled(size, !api.is_free());
    let stack_id = stack_id(ctx, sampled, entry_sp, ret_addr);
    let mut site = SiteKey {
        tgid,
        api: api_id,
        stack_id,
        ret_addr,
    };

    if api.is_free() {
        let freed = if arg_ptr != 0 {
            untrack(tgid, arg_ptr)
        } else {
            0
        };
        // Sampling: only sampled blocks are in the live table, so the freed bytes would be a
        // sample's; free then counts calls without bytes (as count mode does).
        count_call(&mut site, if sampling() { 0 } else { freed });
        if api.is_cxx() {
            // An allocator's `operator delete` may call or tail-jump into its `free` or another
            // overload (tcmalloc's aligned delete, jemalloc's sized one): in flight until its
            // return probe, so those count as its own relay, not the program's call.
            let pending = Pending {
                entry_sp,
                size: 0,
                arg_ptr,
                ret_addr: site.ret_addr,
                stack_id: site.stack_id,
                api: api_id,
                sampled: 0,
            };
            if PENDING.insert(&pid_tgid, &pending, BPF_ANY as u64).is_err() {
                lost(LossCause::PendingFull);
            }
        }
        return;
    }

    count_call(&mut site, size);
    hist_add(&LIBC_HIST, tgid, size);
    let pending = Pending {
        entry_sp,
        size,
        arg_ptr,
        // The row counted in: without its stack when the process is past its budget, its
        // row of unknown sites when the table was full.
        ret_addr: site.ret_addr,
        stack_id: site.stack_id,
        api: api_id,
        sampled: u32::from(sampled),
    };
    if PENDING.insert(&pid_tgid, &pending, BPF_ANY as u64).is_err() {
        lost(LossCause::PendingFull);
    }
}

#[inline(always)]
fn on_return(ctx: &RetProbeContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !traced(tgid) {
        return;
    }
    let Some(p) = PENDING.get_ptr(&pid_tgid) else {
        return;
    };
    // SAFETY: map value pointer from a successful lookup; copied before the delete.
    let p: Pending = unsafe { *p };
    // SAFETY: regs points at the task's registers after the `ret`.
    let regs = unsafe { &*ctx.regs };
    if arch::sp(regs) != p.entry_sp + arch::RET_SP_DELTA {
        // A nested libc-internal call returning inside the outer call.
        return;
    }
    let _ = PENDING.remove(&pid_tgid);

    let api = Api::from_u32(p.api);
    if api.is_some_and(Api::is_free) {
        // `operator delete` in flight: its block left the live table at entry.
        return;
    }
    let rv = arch::ret_value(regs);
    let new_ptr = if api == Some(Api::PosixMemalign) {
        if rv as u32 == 0 {
            // SAFETY: memptr was checked by libc before it returned 0.
            unsafe { bpf_probe_read_user(p.arg_ptr as *const u64) }.unwrap_or(0)
        } else {
            0
        }
    } else {
        rv
    };
    let site = SiteKey {
        tgid,
        api: p.api,
        stack_id: p.stack_id,
        ret_addr: p.ret_addr,
    };

    let is_realloc = api.is_some_and(Api::is_realloc);
    if is_realloc && p.arg_ptr != 0 && (new_ptr != 0 || p.size == 0) {
        // The old block is gone: moved, resized in place (same address, re-entered below), or
        // freed by realloc(p, 0).
        untrack(tgid, p.arg_ptr);
    }
    // The entry made the site's row, or counted the call as lost (`SitesFull`) when the table
    // was full: the return only looks the row up, so one call is never lost twice.
    if new_ptr == 0 {
        let freed_by_realloc = is_realloc && p.arg_ptr != 0 && p.size == 0;
        if !freed_by_realloc && let Some(row) = row_of(&site) {
            // SAFETY: per-CPU value of this CPU.
            unsafe { (*row).failed += 1 };
        }
        return;
    }
    if p.sampled == 0 {
        // Sampling: only sampled blocks are tracked (the agent scales them).
        return;
    }
    let key = LiveKey {
        tgid,
        _pad: 0,
        addr: new_ptr,
    };
    let alloc = LiveAlloc {
        size: p.size,
        // SAFETY: plain helper call.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        site,
    };
    if LIVE.insert(&key, &alloc, BPF_ANY as u64).is_err() {
        lost(LossCause::LiveFull);
        return;
    }
    if let Some(row) = row_of(&site) {
        // SAFETY: per-CPU value of this CPU.
        unsafe {
            (*row).tracked += 1;
            (*row).tracked_bytes += p.size;
        }
    }
}

/// The return address of the call that entered with stack pointer `entry_sp` (the caller that
/// makes the site; `arch::return_address`); 0, said in the debug log, when the traced task's
/// stack cannot be read.
#[inline(always)]
pub(crate) fn return_address(tgid: u32, regs: &pt_regs, entry_sp: u64) -> u64 {
    match arch::return_address(regs, entry_sp) {
        Ok(addr) => addr,
        Err(e) => {
            why!(
                "pid {}: return address at {:x} unreadable ({}): site without its caller",
                tgid,
                entry_sp,
                e
            );
            // Counted: without a caller (and unsampled, without a stack) the call lands in
            // its process's row of unknown sites, a site with no frames.
            lost(LossCause::StackError);
            0
        }
    }
}

/// `a * b`, saturated. Written with 32-bit halves: LLVM turns the usual overflow checks into a
/// 128-bit multiply (`__multi3`), which BPF lacks.
#[inline(always)]
fn mul_sat(a: u64, b: u64) -> u64 {
    let (a_hi, a_lo, b_hi, b_lo) = (a >> 32, a & 0xffff_ffff, b >> 32, b & 0xffff_ffff);
    if a_hi != 0 && b_hi != 0 {
        return u64::MAX;
    }
    // At most one of the cross terms is non-zero, and it must fit in 32 bits.
    let cross = a_hi * b_lo + a_lo * b_hi;
    if cross > 0xffff_ffff {
        return u64::MAX;
    }
    (cross << 32).saturating_add(a_lo * b_lo)
}

/// Removes `addr` from the live table and credits its site; returns its size (0 if unknown).
#[inline(always)]
fn untrack(tgid: u32, addr: u64) -> u64 {
    let key = LiveKey {
        tgid,
        _pad: 0,
        addr,
    };
    let Some(a) = LIVE.get_ptr(&key) else {
        return 0;
    };
    // SAFETY: map value pointer from a successful lookup; copied before the delete.
    let a: LiveAlloc = unsafe { *a };
    if LIVE.remove(&key).is_err() {
        // A concurrent free of the same pointer already took it.
        return 0;
    }
    if let Some(row) = row_of(&a.site) {
        // SAFETY: per-CPU value of this CPU.
        unsafe {
            (*row).freed += 1;
            (*row).freed_bytes += a.size;
        }
    }
    a.size
}
