//! User stacks walked with the agent's unwind tables (`--unwind dwarf`,
//! `allocwatch_common::unwind`): where a frame's code has a table, its row says where the CFA is
//! (rsp or rbp plus an offset), where the caller's rbp was saved, and the return address is at
//! CFA-8; elsewhere a frame-pointer step, as the kernel's walk does. Bounded: at most
//! `MAX_STACK_DEPTH` frames, each a fixed number of binary-search steps.

use allocwatch_common::{
    MAX_STACK_DEPTH,
    loss::LossCause,
    unwind::{
        UNWIND_MAP_STEPS, UNWIND_MAPPINGS_MAX, UNWIND_PROCS_MAX, UNWIND_ROW_STEPS,
        UNWIND_ROWS_MAX, UnwindProc, UnwindRow, kind,
    },
};
use aya_ebpf::{
    helpers::bpf_probe_read_user,
    macros::map,
    maps::{Array, HashMap},
};

use crate::maps::lost;

/// Every file's rows, each file's a contiguous run (the agent appends them).
#[map]
pub static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(UNWIND_ROWS_MAX, 0);
/// tgid → its mappings with a table.
#[map]
pub static UNWIND_PROCS: HashMap<u32, UnwindProc> = HashMap::with_max_entries(UNWIND_PROCS_MAX, 0);

/// The rule for code at `pc` as (kind, CFA offset, rbp words); `GAP` where no table covers it.
#[inline(always)]
fn rule_for(proc: Option<&UnwindProc>, pc: u64) -> (u8, u16, i8) {
    const NONE: (u8, u16, i8) = (kind::GAP, 0, 0);
    let Some(proc) = proc else {
        return NONE;
    };
    // The last mapping starting at or before pc.
    let (mut base, mut size) = (0usize, proc.len as usize);
    if size == 0 || size > UNWIND_MAPPINGS_MAX {
        return NONE;
    }
    for _ in 0..UNWIND_MAP_STEPS {
        if size <= 1 {
            break;
        }
        let half = size / 2;
        let mid = base + half;
        match proc.maps.get(mid) {
            Some(m) if m.start <= pc => base = mid,
            Some(_) => {}
            None => return NONE,
        }
        size -= half;
    }
    let Some(m) = proc.maps.get(base) else {
        return NONE;
    };
    if pc < m.start || pc >= m.end || m.len == 0 {
        return NONE;
    }
    let addr = pc.wrapping_sub(m.bias);
    if addr > u64::from(u32::MAX) {
        return NONE;
    }
    let addr = addr as u32;
    let (first, mut base, mut size) = (m.first, 0u32, m.len);
    for _ in 0..UNWIND_ROW_STEPS {
        if size <= 1 {
            break;
        }
        let half = size / 2;
        let mid = base + half;
        match UNWIND_ROWS.get(first.wrapping_add(mid)) {
            Some(r) if r.pc <= addr => base = mid,
            Some(_) => {}
            None => return NONE,
        }
        size -= half;
    }
    match UNWIND_ROWS.get(first.wrapping_add(base)) {
        Some(r) if r.pc <= addr => (r.kind, r.cfa_off, r.rbp_words),
        _ => NONE,
    }
}

#[inline(always)]
fn read(addr: u64) -> Option<u64> {
    // SAFETY: reading the traced task's own stack; a fault is an error, not a crash.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// Walks the stack of a libc probe into `frames` (the rest zeroed); returns the frame count.
/// `rip` and `rbp` are the registers at the probe, `entry_sp` the stack pointer at the
/// function's entry (where `ret_addr`, the caller's return address, is).
#[inline(always)]
pub fn walk(
    tgid: u32,
    rip: u64,
    rbp: u64,
    entry_sp: u64,
    ret_addr: u64,
    frames: &mut [u64; MAX_STACK_DEPTH],
) -> usize {
    // SAFETY: a plain value, read in place.
    let proc = unsafe { UNWIND_PROCS.get(&tgid) };
    frames[0] = rip;
    let (mut pc, mut sp, mut bp) = (ret_addr, entry_sp + 8, rbp);
    // A prologue with a frame pointer may have set rbp before the probed instruction.
    if bp == entry_sp.wrapping_sub(8) {
        bp = read(bp).unwrap_or(0);
    }
    let mut n = 1;
    let mut truncated = true;
    for slot in frames.iter_mut().skip(1) {
        if pc == 0 {
            truncated = false;
            break;
        }
        *slot = pc;
        n += 1;
        // A return address: the call is the instruction before it.
        let (k, cfa_off, rbp_words) = rule_for(proc, pc - 1);
        let (cfa, saved_bp) = match k {
            kind::CFA_RSP | kind::CFA_RBP => {
                let cfa = if k == kind::CFA_RSP { sp } else { bp } + u64::from(cfa_off);
                let saved = (rbp_words != 0)
                    .then(|| cfa.wrapping_add_signed(i64::from(rbp_words) * 8));
                (cfa, saved)
            }
            kind::GAP => {
                // Frame pointers: [rbp] = the caller's rbp, [rbp+8] = the return address.
                if bp == 0 {
                    truncated = false;
                    break;
                }
                (bp + 16, Some(bp))
            }
            kind::UNSUPPORTED => {
                lost(LossCause::UnwindUnsupported);
                truncated = false;
                break;
            }
            _ => {
                truncated = false;
                break;
            }
        };
        let Some(ra) = read(cfa - 8) else {
            lost(LossCause::UnwindReadError);
            truncated = false;
            break;
        };
        if let Some(at) = saved_bp {
            match read(at) {
                Some(v) => bp = v,
                None => {
                    lost(LossCause::UnwindReadError);
                    truncated = false;
                    break;
                }
            }
        }
        // The stack grows down: a caller's frame is above its callee's.
        if cfa <= sp && k != kind::GAP {
            truncated = false;
            break;
        }
        sp = cfa;
        pc = ra;
    }
    if truncated && pc != 0 {
        lost(LossCause::UnwindTruncated);
    }
    for slot in frames.iter_mut().skip(n) {
        *slot = 0;
    }
    n
}
