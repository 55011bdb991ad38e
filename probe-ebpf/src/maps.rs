//! Every map and global of the probe, with the helpers that count into them.

use allocwatch_common::{
    capacity,
    config::{FLAG_ALLOWLIST, FLAG_DENYLIST},
    go::{GO_HIST_BUCKETS, GO_SPECS_MAX, GoHistKey, GoHistVal, GoProc, GoSpec, StwState},
    libc::{
        API_COUNT, EventHeader, EventKind, LiveAlloc, LiveKey, NewSiteEvent, Overflow, Pending,
        SiteKey, SiteStats,
    },
    loss::{LOSS_CAUSES, LossCause},
};
use aya_ebpf::{
    Global,
    bindings::BPF_NOEXIST,
    helpers::bpf_get_current_comm,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
};

/// Traced process (tgid); 0 = every process the probes are attached to.
#[unsafe(no_mangle)]
pub static TARGET_TGID: Global<u32> = Global::new(0);
/// `allocwatch_common::config` flags.
#[unsafe(no_mangle)]
pub static FLAGS: Global<u32> = Global::new(0);

/// Processes named by the agent (`config::FLAG_ALLOWLIST` / `FLAG_DENYLIST`).
#[map]
pub static TGIDS: HashMap<u32, u8> = HashMap::with_max_entries(capacity::TGIDS, 0);

/// Whether events of `tgid` are recorded: the one traced process, or every process the probes
/// are attached to, narrowed by the agent's allow- or denylist.
#[inline(always)]
pub fn traced(tgid: u32) -> bool {
    let target = TARGET_TGID.load();
    if target != 0 {
        return target == tgid;
    }
    let flags = FLAGS.load();
    if flags & FLAG_ALLOWLIST != 0 {
        TGIDS.get_ptr(&tgid).is_some()
    } else if flags & FLAG_DENYLIST != 0 {
        TGIDS.get_ptr(&tgid).is_none()
    } else {
        true
    }
}

#[map]
pub static PENDING: HashMap<u64, Pending> = HashMap::with_max_entries(capacity::PENDING, 0);
#[map]
pub static LIVE: HashMap<LiveKey, LiveAlloc> = HashMap::with_max_entries(capacity::LIVE, 0);
#[map]
pub static SITES: PerCpuHashMap<SiteKey, SiteStats> =
    PerCpuHashMap::with_max_entries(capacity::SITES, 0);
#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(capacity::STACKS, 0);
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_CAUSES as u32, 0);
#[map]
pub static OVERFLOW: PerCpuArray<Overflow> = PerCpuArray::with_max_entries(API_COUNT as u32, 0);
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

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
            if map.insert(&key, &init, BPF_NOEXIST as u64).is_err() {
                lost(LossCause::HistFull);
            }
        }
    }
}

#[inline(always)]
pub fn lost(cause: LossCause) {
    if let Some(slot) = LOST.get_ptr_mut(cause as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

/// Finds or creates the row of `key`; a new row is announced on the ring buffer so the agent
/// symbolizes it while the process is still alive. Returns `None` (counted) when the table is
/// full; the call then lands in the per-API overflow row.
#[inline(always)]
pub fn site_row(key: &SiteKey) -> Option<*mut SiteStats> {
    if let Some(row) = SITES.get_ptr_mut(key) {
        return Some(row);
    }
    match SITES.insert(key, &SiteStats::default(), BPF_NOEXIST as u64) {
        Ok(()) => announce(key),
        // Another CPU created it between our lookup and insert: it announced it.
        Err(-17) => {}
        Err(_) => {
            lost(LossCause::SitesFull);
            return None;
        }
    }
    SITES.get_ptr_mut(key)
}

/// Counts one call of `key.api` with `bytes` at its site (or in the overflow row).
#[inline(always)]
pub fn count_call(key: &SiteKey, bytes: u64) {
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

#[inline(always)]
fn announce(key: &SiteKey) {
    let ev = NewSiteEvent {
        header: EventHeader {
            kind: EventKind::NewSite as u32,
            tgid: key.tgid,
        },
        site: *key,
        comm: bpf_get_current_comm().unwrap_or_default(),
    };
    if EVENTS.output(&ev, 0).is_err() {
        lost(LossCause::RingbufFull);
    }
}
