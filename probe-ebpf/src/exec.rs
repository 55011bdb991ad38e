//! `sched:sched_process_exec`: tells the node agent which program each process became, as it
//! happens (a process can exec and exit before the agent reads /proc). Attached by the agent, and by a session that follows a process tree.

use allocwatch_common::{
    config::{FLAG_DENYLIST, FLAG_EXEC_HIST, FLAG_FOLLOW},
    event::{EventHeader, EventKind, ExecEvent, ImageHistEvent},
    go::{GO_HIST_BUCKETS, GoHistKey, GoHistVal},
    loss::LossCause,
};
use aya_ebpf::{
    EbpfContext as _, Global,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_map_lookup_percpu_elem, bpf_probe_read_kernel_str_bytes,
    },
    macros::{map, tracepoint},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::TracePointContext,
};

use crate::maps::{
    EVENTS, EXEC_NOTIFY, EXEC_STAMPS, FLAGS, FOLLOWED, GO_HIST, LIBC_HIST, TGIDS, lost,
};

/// Possible CPUs (set by the agent with `FLAG_EXEC_HIST`): the per-CPU values summed at exec.
#[unsafe(no_mangle)]
pub static NR_CPUS: Global<u32> = Global::new(1);
/// Bound of the per-CPU sum for the compiler; the agent sets `FLAG_EXEC_HIST` only up to it.
pub const MAX_CPUS: u32 = allocwatch_common::capacity::EXEC_HIST_MAX_CPUS;

/// Per CPU: the image-histogram record being built (1.5 KiB: more than the BPF stack).
#[map]
static IMAGE_HIST: PerCpuArray<ImageHistEvent> = PerCpuArray::with_max_entries(1, 0);

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
    // Before the exec record, which ends the old image in the agent's books.
    if FLAGS.load() & FLAG_EXEC_HIST != 0 {
        send_image_hists(tgid);
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

/// Sends the size histograms of the program `tgid` ran until now and deletes them, so that the
/// rows left are the new program's. Exact: at this tracepoint the exec is past the point of no
/// return and every other thread of the process is gone, so nothing adds to them meanwhile.
/// Rows that cannot be sent (ring buffer full) stay, counted, and go to the new program.
#[inline(always)]
fn send_image_hists(tgid: u32) {
    let Some(rec) = IMAGE_HIST.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: our CPU's slot of a per-CPU array; nothing else runs on this CPU meanwhile.
    let rec = unsafe { &mut *rec };
    rec.header = EventHeader {
        kind: EventKind::ImageHist as u32,
        tgid,
    };
    rec.present = [0; 2];
    sum_map(&LIBC_HIST, tgid, 0, rec);
    sum_map(&GO_HIST, tgid, 1, rec);
    // Whether any was found is read back from the record, not carried in a register: a flag
    // that differs between the found and not-found paths would keep the verifier from merging
    // them, doubling its work at each of the 96 buckets.
    if rec.present[0] | rec.present[1] == 0 {
        return;
    }
    if EVENTS.output(rec, 0).is_err() {
        lost(LossCause::RingbufFull);
        return;
    }
    delete_sent(&LIBC_HIST, tgid, rec.present[0]);
    delete_sent(&GO_HIST, tgid, rec.present[1]);
}

/// Sums each of `tgid`'s buckets in `map` over the CPUs into slot `slot` of `rec`.
#[inline(always)]
fn sum_map(
    map: &PerCpuHashMap<GoHistKey, GoHistVal>,
    tgid: u32,
    slot: usize,
    rec: &mut ImageHistEvent,
) {
    let map_ptr = core::ptr::from_ref(map).cast_mut().cast();
    let ncpu = NR_CPUS.load();
    for bucket in 0..GO_HIST_BUCKETS {
        let key = GoHistKey { tgid, bucket };
        // A per-CPU row exists on every CPU or on none: this CPU's lookup says which.
        // SAFETY: a plain value, only tested for presence.
        if unsafe { map.get(&key) }.is_none() {
            continue;
        }
        let mut sum = GoHistVal::default();
        for cpu in 0..MAX_CPUS {
            if cpu >= ncpu {
                break;
            }
            // SAFETY: the helper reads `key` and returns the CPU's value or null.
            let v = unsafe {
                bpf_map_lookup_percpu_elem(
                    map_ptr,
                    core::ptr::from_ref(&key).cast_mut().cast(),
                    cpu,
                )
            }
            .cast::<GoHistVal>();
            if v.is_null() {
                continue;
            }
            // SAFETY: a value pointer the helper returned.
            let v = unsafe { *v };
            sum.count += v.count;
            sum.bytes += v.bytes;
        }
        if let Some(b) = rec.buckets[slot].get_mut(bucket as usize) {
            *b = sum;
            rec.present[slot] |= 1 << bucket;
        }
    }
}

#[inline(always)]
fn delete_sent(map: &PerCpuHashMap<GoHistKey, GoHistVal>, tgid: u32, present: u64) {
    for bucket in 0..GO_HIST_BUCKETS {
        if present & (1 << bucket) != 0 {
            let _ = map.remove(&GoHistKey { tgid, bucket });
        }
    }
}
