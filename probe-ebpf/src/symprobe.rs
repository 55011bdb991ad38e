//! Symbol probes (`--probe`, and the built-in C++/Rust container-growth patterns): one entry
//! uprobe program for every probed function. The attach cookie names the probe and the
//! argument registers it sums; calls are counted per (process, probe, stack, immediate
//! caller) in a per-CPU table, as the libc sites are. A full table sends a new site to the
//! process's row of unknown sites (made with its first row), and counts it.
//!
//! CPython's `list_resize` is probed at its entry with a check (cookie bit): only the calls
//! that reallocate count (see `allocwatch_common::symprobe::cookie::list_resize_check`).

use allocwatch_common::{
    libc::NO_STACK,
    loss::LossCause,
    symprobe::{ARGS, ProbeSiteKey, ProbeSiteStats, SITES_MAX, cookie},
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_get_attach_cookie},
    macros::{map, uprobe},
    maps::PerCpuHashMap,
    programs::ProbeContext,
};

use crate::{
    arch,
    libc::{return_address, stacks_on},
    maps::{begins, lost},
    unwind::capture_libc_stack,
};

#[map]
pub static PROBE_SITES: PerCpuHashMap<ProbeSiteKey, ProbeSiteStats> =
    PerCpuHashMap::with_max_entries(SITES_MAX, 0);

#[uprobe(multi)]
pub fn sym_entry(ctx: ProbeContext) -> u32 {
    on_entry(&ctx);
    0
}

/// `sym_entry` for kernels without uprobe multi-links (before 6.6), as libc.rs's twins.
#[uprobe]
pub fn sym_entry_single(ctx: ProbeContext) -> u32 {
    on_entry(&ctx);
    0
}

#[inline(always)]
fn on_entry(ctx: &ProbeContext) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !begins(tgid) {
        return;
    }
    // SAFETY: the context pointer is valid for the program's lifetime.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    // SAFETY: regs points at the probed task's saved registers.
    let regs = unsafe { &*ctx.regs };
    if let Some(offset) = cookie::list_resize_check(cookie) {
        // SAFETY: a user-space read; the helper fails rather than fault.
        let allocated =
            unsafe { bpf_probe_read_user((arch::c_arg(regs, 1) + offset) as *const i64) };
        // The list is live (the function reads the same field next): a failed read would mean
        // a wrong layout, and is counted as a call, so that it shows rather than hides.
        if let Ok(allocated) = allocated
            && !cookie::list_resize_reallocates(allocated, arch::c_arg(regs, 2) as i64)
        {
            return;
        }
    }
    let entry_sp = arch::sp(regs) + cookie::sp_delta(cookie);
    let ret_addr = return_address(tgid, regs, entry_sp);
    let stack_id = if stacks_on() {
        capture_libc_stack(ctx, entry_sp, ret_addr)
    } else {
        NO_STACK
    };
    let mut args = [0u64; ARGS];
    for (slot, value) in args.iter_mut().enumerate() {
        *value = arch::c_arg(regs, cookie::arg(cookie, slot));
    }
    let mut key = ProbeSiteKey {
        tgid,
        probe: cookie::probe(cookie),
        stack_id,
        ret_addr,
    };
    let Some(row) = row(&mut key) else {
        return;
    };
    // SAFETY: per-CPU value of this CPU.
    let row = unsafe { &mut *row };
    row.calls += 1;
    for (sum, v) in row.args.iter_mut().zip(args.iter()) {
        *sum = sum.wrapping_add(*v);
    }
}

/// The row of `key`, made if new (with the process's row of unknown sites for the probe, so
/// that a full table still counts its calls); `None` (counted) when neither has room.
#[inline(always)]
fn row(key: &mut ProbeSiteKey) -> Option<*mut ProbeSiteStats> {
    if let Some(row) = PROBE_SITES.get_ptr_mut(key) {
        return Some(row);
    }
    let spill = ProbeSiteKey {
        tgid: key.tgid,
        probe: key.probe,
        stack_id: NO_STACK,
        ret_addr: 0,
    };
    let init = ProbeSiteStats::default();
    // Another CPU may have made either row meanwhile: an existing key is no failure.
    if PROBE_SITES.insert(key, &init, BPF_NOEXIST as u64).is_ok() {
        let _ = PROBE_SITES.insert(&spill, &init, BPF_NOEXIST as u64);
    }
    if let Some(row) = PROBE_SITES.get_ptr_mut(key) {
        return Some(row);
    }
    match PROBE_SITES.get_ptr_mut(&spill) {
        Some(row) => {
            lost(LossCause::ProbeSiteSpilled);
            *key = spill;
            Some(row)
        }
        None => {
            lost(LossCause::ProbeSitesFull);
            None
        }
    }
}
