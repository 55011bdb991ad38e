//! `sched:sched_process_exec`: tells the node agent which program each process became, as it
//! happens (a process can exec and exit before the agent reads /proc). Attached by the agent, and by a session that follows a process tree.

use allocwatch_common::{
    config::{FLAG_DENYLIST, FLAG_FOLLOW},
    event::{EventHeader, EventKind, ExecEvent},
    loss::LossCause,
};
use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_kernel_str_bytes,
    },
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::maps::{EVENTS, EXEC_NOTIFY, EXEC_STAMPS, FLAGS, FOLLOWED, TGIDS, lost};

/// Offset of the `__data_loc char[] filename` field in the tracepoint's record
/// (/sys/kernel/tracing/events/sched/sched_process_exec/format, stable since 3.x).
const FILENAME_LOC: usize = 8;

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    on_exec(&ctx);
    0
}

#[inline(always)]
fn on_exec(ctx: &TracePointContext) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // A session following a tree hears only of its own processes' execs.
    if FLAGS.load() & FLAG_FOLLOW != 0 {
        let Some(f) = FOLLOWED.get_ptr_mut(&tgid) else {
            return;
        };
        // Its calls from here on are the new program's (`PROGRAMS`). The exec record below
        // tells the session, in order, which program that is.
        // SAFETY: map value pointer from a successful lookup.
        unsafe { (*f).execs += 1 };
    }
    // A process denied for the program it ran is a new program now: traced from its first
    // call until the agent, told by this event, classifies it again.
    if FLAGS.load() & FLAG_DENYLIST != 0 {
        // The new stamp first: a denial the agent is about to write for the old program
        // carries the old stamp and so no longer applies (see EXEC_STAMPS). An LRU insert
        // does not fail for want of room.
        // SAFETY: a helper without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        let _ = EXEC_STAMPS.insert(&tgid, &now, 0);
        let _ = TGIDS.remove(&tgid);
    }
    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        lost(LossCause::RingbufFull);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is our exclusive ring-buffer reservation of an ExecEvent; every field is
    // written below before it is submitted (filename through the helper, NUL-terminated).
    unsafe {
        (*ev).header = EventHeader {
            kind: EventKind::Exec as u32,
            tgid,
        };
        (*ev).comm = bpf_get_current_comm().unwrap_or_default();
        (*ev).filename[0] = 0;
        // __data_loc: offset of the string in the record in the low 16 bits.
        if let Ok(loc) = ctx.read_at::<u32>(FILENAME_LOC) {
            let src = ctx.as_ptr().cast::<u8>().add((loc & 0xffff) as usize);
            let _ = bpf_probe_read_kernel_str_bytes(src, &mut (*ev).filename);
        }
    }
    // Woken now: the agent must read the new program's maps before a short one exits (the
    // kernel's adaptive wakeup does not fire while unwoken Go records wait in the ring).
    entry.submit(aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP as u64);
    // A lost notification only makes a short program's sites harder to name: not counted.
    let _ = EXEC_NOTIFY.output(&tgid, aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP as u64);
}
