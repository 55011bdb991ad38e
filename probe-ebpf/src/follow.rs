//! Following a process tree in the kernel (`top -- CMD` and `--pid N` without `--no-follow`):
//! a followed process's child joins the `FOLLOWED` set when the kernel creates it, before it
//! runs an instruction, so its first call is counted whatever the agent is doing; it leaves the
//! set when its last thread exits. Attached by the CLI session only.

use allocwatch_common::{
    config::FLAG_FOLLOW,
    event::{EXIT_CODE_KNOWN, EventHeader, EventKind, ExitEvent, Followed, ForkEvent},
};
use aya_ebpf::{
    Global,
    bindings::{BPF_NOEXIST, BPF_RB_FORCE_WAKEUP},
    helpers::bpf_get_current_pid_tgid,
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::maps::{FLAGS, FOLLOWED, current_tgid, emit};

/// `task:task_newtask` record offsets (/sys/kernel/tracing/events/task/task_newtask/format,
/// unchanged since 3.x): the new task's pid and its clone flags.
const NEWTASK_PID: usize = 8;
const NEWTASK_CLONE_FLAGS: usize = 32;
/// `sched:sched_process_exit`'s `group_dead` (Linux ≥ 6.16): true for a process's last thread.
const EXIT_GROUP_DEAD: usize = 32;
/// Set by the session when this kernel's `sched_process_exit` has `group_dead`.
#[unsafe(no_mangle)]
pub static EXIT_HAS_GROUP_DEAD: Global<u32> = Global::new(0);
/// `syscalls:sys_enter_exit_group`'s status argument.
const EXIT_GROUP_CODE: usize = 16;
/// A new thread, not a new process.
const CLONE_THREAD: u64 = 0x0001_0000;

#[tracepoint(category = "task", name = "task_newtask")]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    on_newtask(&ctx);
    0
}

/// Runs in the parent, inside fork/clone, before the child can run.
#[inline(always)]
fn on_newtask(ctx: &TracePointContext) {
    if FLAGS.load() & FLAG_FOLLOW == 0 {
        return;
    }
    let parent = current_tgid();
    if FOLLOWED.get_ptr(&parent).is_none() {
        return;
    }
    // SAFETY: reads within the tracepoint's record, at the offsets of its format.
    let (Ok(child), Ok(flags)) = (unsafe { ctx.read_at::<i32>(NEWTASK_PID) }, unsafe {
        ctx.read_at::<u64>(NEWTASK_CLONE_FLAGS)
    }) else {
        return;
    };
    if flags & CLONE_THREAD != 0 || child <= 0 {
        return;
    }
    let child = child as u32;
    let entry = Followed {
        parent,
        ..Followed::default()
    };
    let followed = FOLLOWED.insert(&child, &entry, BPF_NOEXIST as u64).is_ok();
    emit(
        &ForkEvent {
            header: EventHeader {
                kind: EventKind::Fork as u32,
                tgid: child,
            },
            parent,
            followed: followed as u32,
        },
        0,
    );
}

#[tracepoint(category = "syscalls", name = "sys_enter_exit_group")]
pub fn sys_enter_exit_group(ctx: TracePointContext) -> u32 {
    if FLAGS.load() & FLAG_FOLLOW != 0 {
        let tgid = current_tgid();
        if let Some(f) = FOLLOWED.get_ptr_mut(&tgid) {
            // SAFETY: reads within the record; the value pointer comes from a lookup.
            if let Ok(code) = unsafe { ctx.read_at::<u64>(EXIT_GROUP_CODE) } {
                unsafe { (*f).exit = EXIT_CODE_KNOWN | (code as u32 & 0xff) };
            }
        }
    }
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    on_exit(&ctx);
    0
}

#[inline(always)]
fn on_exit(ctx: &TracePointContext) {
    if FLAGS.load() & FLAG_FOLLOW == 0 {
        return;
    }
    // SAFETY: a read within the record.
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // Before Linux 6.16 the record has no `group_dead`: the leader's exit stands for the
    // process's (a leader that exits before its other threads ends the process early here).
    let last = if EXIT_HAS_GROUP_DEAD.load() != 0 {
        unsafe { ctx.read_at::<u8>(EXIT_GROUP_DEAD) }.unwrap_or(0) != 0
    } else {
        pid_tgid as u32 == tgid
    };
    if !last {
        return;
    }
    // SAFETY: a plain value read once.
    let Some(f) = (unsafe { FOLLOWED.get(&tgid) }).copied() else {
        return;
    };
    let _ = FOLLOWED.remove(&tgid);
    // Woken now: the session may be waiting for this process's end.
    emit(
        &ExitEvent {
            header: EventHeader {
                kind: EventKind::Exit as u32,
                tgid,
            },
            code: f.exit & 0xff,
            code_known: (f.exit & EXIT_CODE_KNOWN != 0) as u32,
        },
        BPF_RB_FORCE_WAKEUP as u64,
    );
}
