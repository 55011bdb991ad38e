//! Every map and global of the probe, with the helpers that count into them, and [`why!`],
//! the debug log of the rare paths.

use allocwatch_common::{
    MAX_STACK_DEPTH, capacity,
    config::{FLAG_DENYLIST, FLAG_FOLLOW},
    errno::EEXIST,
    event::{EventHeader, EventKind, Followed, NEW_SITE_FIXED, NewSiteRecord, ProgramKey},
    go::{GO_HIST_BUCKETS, GO_SPECS_MAX, GoHistKey, GoHistVal, GoProc, GoSpec, StwState},
    libc::{
        API_COUNT, LIBC_FILES_MAX, LastEntry, LibcFile, LiveAlloc, LiveKey, NO_STACK, Overflow,
        Pending, SiteKey, SiteStats,
    },
    loss::{LOSS_CAUSES, LossCause},
    sample, site_limit,
};
use aya_ebpf::{
    EbpfContext, Global,
    bindings::{
        BPF_F_NO_PREALLOC, BPF_F_USER_STACK, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP,
        BPF_RB_NO_WAKEUP,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns,
        generated::bpf_get_stack,
    },
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};

/// Says why a probe dropped or skipped an event (aya-log, debug level; the agent prints it with
/// `--log-level debug` or `RUST_LOG=debug`). Only on rare paths: the agent sets aya-log's level
/// at load time, and below debug the verifier removes these branches as dead code, so the hot
/// path pays nothing. aya-log-ebpf 0.3 writes to its own ring buffer and ignores the context
/// argument, so helpers without a context log too.
macro_rules! why {
    ($($arg:tt)+) => {
        aya_log_ebpf::debug!(&(), target: "probe", $($arg)+)
    };
}
pub(crate) use why;

/// The current process (tgid), for log lines.
#[inline(always)]
pub fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// Traced process (tgid); 0 = every process the probes are attached to.
#[unsafe(no_mangle)]
pub static TARGET_TGID: Global<u32> = Global::new(0);
/// `allocwatch_common::config` flags.
#[unsafe(no_mangle)]
pub static FLAGS: Global<u32> = Global::new(0);

/// Mean bytes between sampled calls (`allocwatch_common::sample`); 0: every call is sampled.
#[unsafe(no_mangle)]
pub static SAMPLE_BYTES: Global<u64> = Global::new(0);

/// Per CPU: bytes left until the next sampled call (0: none drawn yet). One counter for every
/// process on the CPU: the exponential interval is memoryless, so each call is still sampled
/// with probability 1 - exp(-size/mean) whoever made the calls before it.
#[map]
static SAMPLE_LEFT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Whether a call of `size` bytes is sampled: its stack is walked and its block tracked. Every
/// call when sampling is off; never a call without a size (free) when it is on.
#[inline(always)]
pub fn sampled(size: u64, has_size: bool) -> bool {
    let mean = SAMPLE_BYTES.load();
    if mean == 0 {
        return true;
    }
    if !has_size {
        return false;
    }
    let Some(left) = SAMPLE_LEFT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot, ours for the program's run.
    let left = unsafe { &mut *left };
    // SAFETY: plain helper call.
    sample::step(left, size, mean, || unsafe { bpf_get_prandom_u32() })
}

/// Whether calls are sampled (`SAMPLE_BYTES` set).
#[inline(always)]
pub fn sampling() -> bool {
    SAMPLE_BYTES.load() != 0
}

/// What a `BPF_NOEXIST` insert returns when the key is already there.
const KEY_EXISTS: i32 = -EEXIST;

/// The agent's denylist (`config::FLAG_DENYLIST`): tgid → the exec stamp of the program the
/// agent rejected (see [`EXEC_STAMPS`]).
#[map]
pub static TGIDS: HashMap<u32, u64> = HashMap::with_max_entries(capacity::TGIDS, 0);
/// tgid → `bpf_ktime_get_ns()` at its last exec (absent: no exec since the probes loaded,
/// stamp 0). The agent reads a process's stamp *before* its /proc files and denies it with
/// that stamp: a denial decided on what the process ran before an exec the agent has not
/// read yet no longer matches, so the new program is traced from its first call rather than
/// lost until the agent catches up. LRU: nothing deletes the stamps of exited processes, and
/// an evicted stamp only makes a denied process traced again (its rows are then deleted by
/// the agent, never exported).
#[map]
pub static EXEC_STAMPS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(capacity::TGIDS, 0);

/// The exec stamp of `tgid` (0: none since the probes loaded).
#[inline(always)]
pub fn exec_stamp(tgid: u32) -> u64 {
    // SAFETY: a plain u64 value, read once.
    unsafe { EXEC_STAMPS.get(&tgid) }.copied().unwrap_or(0)
}

/// The followed process tree (`FLAG_FOLLOW`): tgid → its parent and exit status. The session
/// puts its root in; `follow.rs` adds each child as the kernel creates it (before it runs an
/// instruction) and removes a process when it exits, so a reused pid is not followed.
#[map]
pub static FOLLOWED: HashMap<u32, Followed> = HashMap::with_max_entries(capacity::FOLLOWED, 0);

/// Calls and bytes per API of each program a followed process ran (tgid, its exec count).
#[map]
pub static PROGRAMS: PerCpuHashMap<ProgramKey, Overflow> =
    PerCpuHashMap::with_max_entries(capacity::FOLLOWED * 4, 0);
/// Slot 0: calls `PROGRAMS` had no room for (counted at their site as always).
#[map]
pub static FOLLOW_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Counts a call in the program `tgid` runs now (following a tree only).
#[inline(always)]
fn count_program(tgid: u32, api: u32, bytes: u64) {
    if FLAGS.load() & FLAG_FOLLOW == 0 {
        return;
    }
    let Some(f) = FOLLOWED.get_ptr(&tgid) else {
        return;
    };
    let key = ProgramKey {
        tgid,
        // SAFETY: map value pointer from a successful lookup.
        execs: unsafe { (*f).execs },
        api,
        _pad: 0,
    };
    if let Some(row) = PROGRAMS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of this CPU.
        unsafe {
            (*row).calls += 1;
            (*row).bytes += bytes;
        }
        return;
    }
    let init = Overflow { calls: 1, bytes };
    // Per CPU: no other CPU writes this CPU's value, an existing key only means ours is 0.
    if PROGRAMS.insert(&key, &init, 0).is_err()
        && let Some(n) = FOLLOW_LOST.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot of this CPU.
        unsafe { *n += 1 };
    }
}

/// Whether `tgid` is in the followed tree.
#[inline(always)]
pub fn followed(tgid: u32) -> bool {
    FOLLOWED.get_ptr(&tgid).is_some()
}

/// Slot 0 set by the agent when a session ends (`top --pid` on a signal or at its duration):
/// from then on no entry probe counts a call, so the report is cut at one instant for every
/// API, although the links then detach some milliseconds apart. An array: its lookup is
/// inlined by the verifier (a bounds check and a load, no helper call).
#[map]
pub static STOPPED: Array<u32> = Array::with_max_entries(1, 0);

/// Whether a call that begins now, in `tgid`, is recorded: the session has not stopped and the
/// process is traced. Entry probes only; a return probe completes what its entry began.
#[inline(always)]
pub fn begins(tgid: u32) -> bool {
    !matches!(STOPPED.get(0), Some(&s) if s != 0) && traced(tgid)
}

/// Whether events of `tgid` are recorded: the followed tree, the one traced process, or every
/// process the probes are attached to, narrowed by the agent's allow- or denylist.
#[inline(always)]
pub fn traced(tgid: u32) -> bool {
    if FLAGS.load() & FLAG_FOLLOW != 0 {
        return followed(tgid);
    }
    let target = TARGET_TGID.load();
    if target != 0 {
        return target == tgid;
    }
    if FLAGS.load() & FLAG_DENYLIST == 0 {
        return true;
    }
    // SAFETY: a plain u64 value, read once.
    match unsafe { TGIDS.get(&tgid) } {
        None => true,
        // Denied for the program it ran then, or exec'd since: traced.
        Some(&stamp) => exec_stamp(tgid) != stamp,
    }
}

#[map]
pub static PENDING: HashMap<u64, Pending> = HashMap::with_max_entries(capacity::PENDING, 0);
/// Count mode: each thread's last counted entry. LRU, because nothing removes the entry of a
/// thread that exits; a relay follows its outer entry at once, so that entry is never the
/// least recently used.
#[map]
pub static LAST_ENTRY: LruHashMap<u64, LastEntry> =
    LruHashMap::with_max_entries(capacity::PENDING, 0);
/// Count mode: the API functions of each probed libc file (index = the cookie's file slot).
#[map]
pub static LIBC_FILES: Array<LibcFile> = Array::with_max_entries(LIBC_FILES_MAX, 0);
/// Count mode, slot 0: the APIs (bit = API id) some probed file's function may tail-jump into
/// through a PLT slot naming them ([`LibcFile::relays`]), so into whichever file serves them
/// in the process (glibc's `reallocarray` into jemalloc's `realloc`). Their probes, in every
/// file, read the thread's last entry. Only set bits are added, before the probes of the file
/// that jumps are attached.
#[map]
pub static RELAY_NAMED: Array<u64> = Array::with_max_entries(1, 0);
#[map]
pub static LIVE: HashMap<LiveKey, LiveAlloc> = HashMap::with_max_entries(capacity::LIVE, 0);
#[map]
pub static SITES: PerCpuHashMap<SiteKey, SiteStats> =
    PerCpuHashMap::with_max_entries(capacity::SITES, 0);
/// Each process's rows of unknown sites, one per API it called ([`SiteKey::spill`]), kept
/// apart from `SITES` so that no churn of sites can fill it: a process that starts while
/// `SITES` is full still gets its rows here. Made on demand (a new site finding `SITES` full, or
/// a call with an unreadable caller), and sized for every process of the denylist's capacity
/// with every API; not preallocated, so only the rows in use take memory (the kernel's bucket
/// array, 16 bytes per slot of the next power of two, is what it costs empty: 16 MiB).
#[map]
pub static SPILL: PerCpuHashMap<SiteKey, SiteStats> =
    PerCpuHashMap::with_max_entries(capacity::SPILL, BPF_F_NO_PREALLOC);
/// Rows created in `SITES` per process (tgid), with a stack or keyed by the caller, counted
/// always, so that a limit set later applies at once. Only touched when a site is new; the
/// agent deletes a process's entry with its rows.
#[map]
pub static SITE_BUDGET: HashMap<u32, u32> = HashMap::with_max_entries(capacity::TGIDS, 0);
/// Rows with a stack one process may create in `SITES`, by [`site_limit`] slot; 0 = no limit.
#[map]
pub static SITE_LIMIT: Array<u32> = Array::with_max_entries(site_limit::SLOTS, 0);
/// The agent's admissions: tgid → the exec stamp of the program it selected (see
/// [`EXEC_STAMPS`]). A process without one, or that exec'd since, is undecided and held to
/// the `UNDECIDED` limit. LRU: an evicted entry only makes a running process undecided again,
/// which costs it stack detail, counted (`stack_undecided`).
#[map]
pub static ADMITTED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(capacity::TGIDS, 0);
/// Rows ever created in `SITES` (per CPU): with its own count of the rows it deleted, the agent
/// follows the table's fill between its censuses without walking it.
#[map]
pub static SITE_ROWS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// User stacks by id: the id is a 63-bit hash of the frames, and a different stack that lands
/// on a taken id is counted as a collision (`bpf_get_stackid`'s table collides as soon as two
/// stacks share a bucket, which a busy node does within seconds; 31-bit ids still collided
/// thousands of times in a 2-minute soak; 63 bits practically never do). LRU: on a node every process's stacks pass through this table, so
/// the least recently used make room; the agent copies a stack when its site is first seen.
#[map]
pub static STACKS: LruHashMap<u64, [u64; MAX_STACK_DEPTH]> =
    LruHashMap::with_max_entries(capacity::STACKS, 0);
/// Scratch space for one stack per CPU (too large for the BPF stack).
#[map]
pub static STACK_SCRATCH: PerCpuArray<[u64; MAX_STACK_DEPTH]> = PerCpuArray::with_max_entries(1, 0);

/// Captures the current user stack (the kernel's frame-pointer walk) into `STACKS` and returns
/// its id, or [`NO_STACK`] with the failure counted (collision, table full, unreadable stack).
#[inline(always)]
pub fn capture_stack<C: EbpfContext>(ctx: &C) -> i64 {
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        return NO_STACK;
    };
    // SAFETY: the per-CPU scratch slot, exactly `size_of` bytes; the helper zero-fills what the
    // stack does not use.
    let n = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            buf.cast(),
            size_of::<[u64; MAX_STACK_DEPTH]>() as u32,
            BPF_F_USER_STACK as u64,
        )
    };
    if n <= 0 {
        why!(
            "pid {}: user stack unwind failed (bpf_get_stack: {})",
            current_tgid(),
            n
        );
        lost(LossCause::StackError);
        return NO_STACK;
    }
    store_stack()
}

/// Stores the frames in this CPU's `STACK_SCRATCH` slot (where both walks write them) in
/// `STACKS` under the hash of its frames up to the first zero (a stack ends there: both walks
/// zero-fill the slots they do not use, and the agent reads a stack up to its first zero); the
/// id, or [`NO_STACK`] with the failure counted.
///
/// A global BPF function, as [`log_lost`]: the verifier checks its two 64-step loops once, on
/// their own. Inlined, they were checked again for every distinct state that the paths before
/// each call site left (the table walk's outcomes, the debug log's lines): with `--log-level
/// debug`, Linux 6.1's verifier gave up on `libc_entry` at its million instructions. No
/// argument: a global function's pointer arguments are checked against their BTF type, and
/// every caller's frames are in the scratch slot anyway.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn store_stack() -> i64 {
    let Some(frames) = STACK_SCRATCH.get_ptr(0) else {
        return NO_STACK;
    };
    // SAFETY: the scratch slot is ours on this CPU for the program's run.
    let frames = unsafe { &*frames };
    // Only the frames the walk wrote: a stack is typically a handful of frames, and hashing or
    // comparing all MAX_STACK_DEPTH slots cost ~150 ns per call (measured, BENCHMARKS.md).
    // Both loops end at a zero frame, not at a length: a loop bounded by the walk's length made
    // the verifier check the rest of the program once per possible length, and the compare
    // loop once per length again; a zero read from the frames leaves nothing to tell the paths
    // apart after the loop.
    // FNV-1a over the frames.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &f in frames {
        if f == 0 {
            break;
        }
        h = (h ^ f).wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64's finalizer: FNV over whole words leaves the low bits poorly mixed.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let id = h & 0x7fff_ffff_ffff_ffff;
    if let Some(existing) = STACKS.get_ptr(&id) {
        // SAFETY: map value pointer from a successful lookup.
        let existing = unsafe { &*existing };
        // Equal when the frames match up to and including the first zero.
        let mut same = true;
        for (a, b) in existing.iter().zip(frames.iter()) {
            if a != b {
                same = false;
                break;
            }
            if *b == 0 {
                break;
            }
        }
        if same {
            return id as i64;
        }
        lost(LossCause::StackCollision);
        return NO_STACK;
    }
    match STACKS.insert(&id, frames, BPF_NOEXIST as u64) {
        // Another CPU stored the same id first: the same stack, almost surely.
        Ok(()) | Err(KEY_EXISTS) => id as i64,
        Err(_) => {
            lost(LossCause::StackMapFull);
            NO_STACK
        }
    }
}
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_CAUSES as u32, 0);
#[map]
pub static OVERFLOW: PerCpuArray<Overflow> = PerCpuArray::with_max_entries(API_COUNT as u32, 0);
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);
/// The pid of each exec, for the agent's snapshot thread: a program can be gone within a
/// millisecond, and the agent's main loop may be busy (a scrape, a scan) when it execs.
#[map]
pub static EXEC_NOTIFY: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);
/// Per CPU: when a record last woke the agent (`bpf_ktime_get_ns`).
#[map]
static LAST_WAKEUP: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A record that may wake the agent at most this often per CPU ...
const WAKEUP_INTERVAL_NS: u64 = 10_000_000;
/// ... unless this much data is waiting.
const WAKEUP_BACKLOG: u64 = capacity::EVENTS_BYTES as u64 / 4;

/// Ring-buffer flags for a frequent record (Go events): wake the agent at most every
/// [`WAKEUP_INTERVAL_NS`] per CPU, or when a quarter of the buffer is waiting. Waking it for
/// every record costs the producing thread an IPI and a context switch, several µs in a VM: the
/// Go growth workload ran ~40% slower with a wakeup per event than without (BENCHMARKS.md).
/// A record written without a wakeup is read at the next wakeup or drain (any CPU's).
#[inline(always)]
pub fn batched_wakeup() -> u64 {
    let Some(last) = LAST_WAKEUP.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot of this CPU.
    let due = now.wrapping_sub(unsafe { *last }) >= WAKEUP_INTERVAL_NS;
    if due || EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BACKLOG {
        // SAFETY: as above.
        unsafe { *last = now };
        // Forced: the kernel's adaptive wakeup only fires when the agent has read everything
        // before this record, which is never the case after a record without wakeup.
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// How to read each probed Go function (index = the cookie's spec number).
#[map]
pub static GO_SPECS: Array<GoSpec> = Array::with_max_entries(GO_SPECS_MAX, 0);
#[map]
pub static GO_PROCS: HashMap<u32, GoProc> = HashMap::with_max_entries(4096, 0);
#[map]
pub static GO_STW: HashMap<u32, StwState> = HashMap::with_max_entries(4096, 0);
#[map]
pub static GO_HIST: PerCpuHashMap<GoHistKey, GoHistVal> =
    PerCpuHashMap::with_max_entries(256 * GO_HIST_BUCKETS, 0);
/// Go growth events counted in the kernel after their key's first record (`probe-ebpf/src/go.rs`).
#[map]
pub static GO_AGG: PerCpuHashMap<allocwatch_common::go::GoAggKey, u64> =
    PerCpuHashMap::with_max_entries(allocwatch_common::go::GO_AGG_MAX, 0);
/// Growth events sent as records because `GO_AGG` was full (nothing lost: shown, not a loss).
#[map]
pub static GO_AGG_FULL: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// Request sizes of the libc malloc family, same layout as `GO_HIST`.
#[map]
pub static LIBC_HIST: PerCpuHashMap<GoHistKey, GoHistVal> =
    PerCpuHashMap::with_max_entries(256 * GO_HIST_BUCKETS, 0);

/// Adds one request of `size` bytes to `tgid`'s log2 size histogram in `map`.
#[inline(always)]
pub fn hist_add(map: &PerCpuHashMap<GoHistKey, GoHistVal>, tgid: u32, size: u64) {
    let b = 63 - (size | 1).leading_zeros();
    let key = GoHistKey {
        tgid,
        bucket: if b >= GO_HIST_BUCKETS {
            GO_HIST_BUCKETS - 1
        } else {
            b
        },
    };
    match map.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of this CPU.
        Some(h) => unsafe {
            (*h).count += 1;
            (*h).bytes += size;
        },
        None => {
            let init = GoHistVal {
                count: 1,
                bytes: size,
            };
            match map.insert(&key, &init, BPF_NOEXIST as u64) {
                Ok(()) => {}
                // Another CPU created the row between our lookup and insert: count in ours.
                Err(KEY_EXISTS) => match map.get_ptr_mut(&key) {
                    // SAFETY: per-CPU value of this CPU.
                    Some(h) => unsafe {
                        (*h).count += 1;
                        (*h).bytes += size;
                    },
                    None => lost(LossCause::HistFull),
                },
                Err(_) => lost(LossCause::HistFull),
            }
        }
    }
}

/// Counts one event lost to `cause` (and says so in the debug log).
#[inline(always)]
pub fn lost(cause: LossCause) {
    if let Some(slot) = LOST.get_ptr_mut(cause as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
    // The same level test as `why!`: below debug the verifier drops the call as dead code.
    if aya_log_ebpf::macro_support::level_enabled(aya_log_ebpf::macro_support::Level::Debug) {
        log_lost(cause as u32);
    }
}

/// The debug line of [`lost`], as a global BPF function: the verifier checks it once, on its
/// own, where an inlined log line (hundreds of instructions) was checked again on every path
/// that reached one of `lost`'s many call sites. With debug logging on, Linux 6.1's verifier
/// gave up on `go_entry` and `libc_entry` at its million instructions.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn log_lost(cause: u32) -> u32 {
    let name = LossCause::from_index(cause).map_or("unknown", LossCause::name);
    why!("pid {}: event lost: {}", current_tgid(), name);
    0
}

/// Finds or creates the row of `key`; a new row is announced on the ring buffer so the agent
/// symbolizes it while the process is still alive. A process past its budget of rows with a
/// stack gets a row for its immediate caller instead (`key.stack_id` becomes [`NO_STACK`], so
/// that the caller records the row it really counted in). A new site that finds `SITES` full is
/// counted in its process's row of unknown sites for the API (`SPILL`, `site_spilled`; `key`
/// becomes [`SiteKey::spill`]). Returns `None` (counted, `site_map_full`) only when `SPILL`
/// itself is full; the call then lands in the per-API overflow row.
#[inline(always)]
pub fn site_row(key: &mut SiteKey) -> Option<*mut SiteStats> {
    if key.is_spill() {
        // No caller to key it by (an unreadable return address): the unknown sites' row.
        return spill_row(key);
    }
    if let Some(row) = SITES.get_ptr_mut(key) {
        return Some(row);
    }
    let budget = budget(key.tgid, key.stack_id != NO_STACK);
    if let Some(cause) = budget.stack {
        lost(cause);
        key.stack_id = NO_STACK;
        if let Some(row) = SITES.get_ptr_mut(key) {
            return Some(row);
        }
    }
    if let Some(cause) = budget.rows {
        *key = SiteKey::spill(key.tgid, key.api);
        let row = spill_row(key)?;
        lost(cause);
        return Some(row);
    }
    match SITES.insert(key, &SiteStats::default(), BPF_NOEXIST as u64) {
        Ok(()) => created(key),
        // Another CPU created it between our lookup and insert: it announced it.
        Err(KEY_EXISTS) => {}
        Err(_) => {
            *key = SiteKey::spill(key.tgid, key.api);
            let row = spill_row(key)?;
            lost(LossCause::SiteSpilled);
            return Some(row);
        }
    }
    SITES.get_ptr_mut(key)
}

/// The row of `key`, a [`SiteKey::spill`] key, in `SPILL`: found, or made and announced (the
/// agent may learn of the process from it). `None`, counted (`site_map_full`), when `SPILL` is
/// full.
#[inline(always)]
fn spill_row(key: &SiteKey) -> Option<*mut SiteStats> {
    if let Some(row) = SPILL.get_ptr_mut(key) {
        return Some(row);
    }
    match SPILL.insert(key, &SiteStats::default(), BPF_NOEXIST as u64) {
        Ok(()) => announce(key),
        // Another CPU made it first and announced it.
        Err(KEY_EXISTS) => {}
        Err(_) => {
            lost(LossCause::SitesFull);
            return None;
        }
    }
    SPILL.get_ptr_mut(key)
}

/// The existing row of `key` (no row is made): `SITES`, or `SPILL` for a row of unknown sites.
/// For the return probe and `free`, which update the row their call's entry counted in.
#[inline(always)]
pub fn row_of(key: &SiteKey) -> Option<*mut SiteStats> {
    if key.is_spill() {
        SPILL.get_ptr_mut(key)
    } else {
        SITES.get_ptr_mut(key)
    }
}

/// A row just made: counted, charged to its process's budget when it has a stack, announced.
#[inline(always)]
fn created(key: &SiteKey) {
    if let Some(n) = SITE_ROWS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot of this CPU.
        unsafe { *n += 1 };
    }
    // Every row: rows keyed by the caller fill the table too (see `Budget::rows`).
    charge_budget(key.tgid);
    announce(key);
}

/// What `tgid`'s budget leaves a new row, from one read of the limits and of its count.
#[derive(Default)]
struct Budget {
    /// Why the row may not have its stack, if so: its share of a table under pressure is used
    /// up, or it has its rows as a process the agent has not admitted yet.
    stack: Option<LossCause>,
    /// Why it may have no new row at all, if so: under pressure, [`site_limit::ROW_SHARES`]
    /// shares reached in rows of any kind (rows keyed by the caller fill the table too); not
    /// admitted, its undecided limit reached (a process about to be rejected needs no rows).
    rows: Option<LossCause>,
}

/// `tgid`'s [`Budget`] for a new row, with a stack or keyed by its caller.
#[inline(always)]
fn budget(tgid: u32, with_stack: bool) -> Budget {
    let limit = |slot| SITE_LIMIT.get(slot).copied().unwrap_or(0);
    let (pressure, undecided) = (
        limit(site_limit::UNDER_PRESSURE),
        limit(site_limit::UNDECIDED),
    );
    if pressure == 0 && undecided == 0 {
        return Budget::default();
    }
    // SAFETY: a plain u32 value, read once.
    let rows = unsafe { SITE_BUDGET.get(&tgid) }.copied().unwrap_or(0);
    let under_pressure = pressure != 0 && rows >= pressure;
    // Only a process past the undecided limit looks up whether it is admitted.
    // SAFETY: a plain u64 value, read once.
    let unadmitted = undecided != 0
        && rows >= undecided
        && !unsafe { ADMITTED.get(&tgid) }.is_some_and(|&s| s == exec_stamp(tgid));
    let stack = if !with_stack {
        None
    } else if under_pressure {
        Some(LossCause::StackBudget)
    } else {
        unadmitted.then_some(LossCause::StackUndecided)
    };
    let rows = if under_pressure && rows >= pressure.saturating_mul(site_limit::ROW_SHARES) {
        Some(LossCause::SiteBudget)
    } else if unadmitted {
        Some(LossCause::SiteUndecided)
    } else {
        None
    };
    Budget { stack, rows }
}

/// Counts a new row against `tgid`'s budget. Not atomic: two CPUs creating rows
/// at once may count one; the budget is a bound on the table's share, not an exact figure.
#[inline(always)]
fn charge_budget(tgid: u32) {
    match SITE_BUDGET.get_ptr_mut(&tgid) {
        // SAFETY: map value pointer from a successful lookup.
        Some(n) => unsafe { *n += 1 },
        // A full budget table leaves the process unbounded (SITES still bounds it).
        None => {
            // From the stack: a `&1` is a constant in .rodata, which the compiler shared with
            // the global NR_CPUS (also 1 at build time, the CPU count once loaded): every
            // process's first row was charged as NR_CPUS rows.
            let mut one = 0u32;
            // SAFETY: a write to a local.
            unsafe { core::ptr::write_volatile(&mut one, 1) };
            let _ = SITE_BUDGET.insert(&tgid, &one, BPF_NOEXIST as u64);
        }
    }
}

/// Counts one call of `key.api` with `bytes` at its site (or in the overflow row); `key` is
/// left naming the row counted in (see [`site_row`]).
#[inline(always)]
pub fn count_call(key: &mut SiteKey, bytes: u64) {
    count_program(key.tgid, key.api, bytes);
    match site_row(key) {
        // SAFETY: per-CPU value of this CPU.
        Some(row) => unsafe {
            (*row).calls += 1;
            (*row).bytes += bytes;
        },
        None => {
            if let Some(o) = OVERFLOW.get_ptr_mut(key.api) {
                // SAFETY: per-CPU slot of this CPU.
                unsafe {
                    (*o).calls += 1;
                    (*o).bytes += bytes;
                }
            }
        }
    }
}

/// Where a new-site record is built (too large for the BPF stack).
#[map]
static NEW_SITE_SCRATCH: PerCpuArray<NewSiteRecord> = PerCpuArray::with_max_entries(1, 0);

/// Announces the new row of `key` to the agent (its record, with the stack's frames).
#[inline(always)]
fn announce(key: &SiteKey) {
    announce_site(key.tgid, key.api, key.stack_id, key.ret_addr);
}

/// [`announce`]'s body, as a global BPF function (scalar arguments: a global function's pointer
/// arguments are checked against their BTF type): the verifier checks it once, on its own.
/// Inlined, its copy of the frames (one path per stack length, each to its own record size)
/// was checked again for every distinct state that reached one of its call sites (Linux 6.1).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn announce_site(tgid: u32, api: u32, stack_id: i64, ret_addr: u64) -> u32 {
    let key = SiteKey {
        tgid,
        api,
        stack_id,
        ret_addr,
    };
    let key = &key;
    let Some(rec) = NEW_SITE_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch slot, ours for the program's run.
    let rec = unsafe { &mut *rec };
    rec.event.header = EventHeader {
        kind: EventKind::NewSite as u32,
        tgid: key.tgid,
    };
    rec.event.site = *key;
    rec.event.comm = bpf_get_current_comm().unwrap_or_default();
    // The stack travels with the site: the LRU table may evict it before the agent reads it by
    // id on a busy node. Only its frames are sent (a site is new once, stacks are short).
    let mut n = 0;
    if key.stack_id != NO_STACK
        && let Some(frames) = STACKS.get_ptr(&(key.stack_id as u64))
    {
        // SAFETY: map value pointer from a successful lookup.
        let frames = unsafe { &*frames };
        for (slot, &f) in rec.frames.iter_mut().zip(frames.iter()) {
            if f == 0 {
                break;
            }
            *slot = f;
            n += 1;
        }
    }
    rec.event.nframes = n as u32;
    // SAFETY: the scratch record as bytes: plain integers, no padding.
    let bytes = unsafe {
        core::slice::from_raw_parts(
            (rec as *const NewSiteRecord).cast::<u8>(),
            size_of::<NewSiteRecord>(),
        )
    };
    let Some(record) = bytes.get(..NEW_SITE_FIXED + 8 * n) else {
        return 0;
    };
    // Not the adaptive wakeup: it never fires after an unwoken record (Go events).
    emit(record, batched_wakeup());
    0
}

/// Sends `record` to the agent through `EVENTS` with the wakeup `flags`; a full ring buffer is
/// counted (`ringbuf_full`), never silent.
#[inline(always)]
pub fn emit<T: ?Sized>(record: &T, flags: u64) {
    if EVENTS.output(record, flags).is_err() {
        lost(LossCause::RingbufFull);
    }
}
