//! The libc allocation API: ids, probe cookies, and the map keys/values the probes fill.

/// One libc allocation function. The discriminant is the id carried in probe cookies and keys.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(PartialOrd, Ord))]
pub enum Api {
    Malloc = 0,
    Calloc = 1,
    Realloc = 2,
    Reallocarray = 3,
    Free = 4,
    PosixMemalign = 5,
    AlignedAlloc = 6,
    Memalign = 7,
    Valloc = 8,
    Pvalloc = 9,
}

pub const API_COUNT: usize = 10;

/// Probe cookie: API id in the low 7 bits, and in the next byte how many bytes the stack pointer
/// has moved between the function's entry and the probed instruction (the probe may sit after
/// `push` instructions; see `agent/src/target/placement.rs`). The return address of the call
/// is at `[rsp + delta]`.
///
/// Count mode (entry probes only) adds what it needs to recognize libc's own relays without a
/// return probe: bit 7 ([`RELAY_TARGET`](cookie::RELAY_TARGET)), some API function of the file
/// may tail-jump into this one; bits 16–25, the APIs this function may tail-jump into (bit = API
/// id); bits
/// 26–31, the probed file's slot in the `LIBC_FILES` array ([`NO_FILE`](cookie::NO_FILE):
/// none); bits 32–63, the probed instruction's file offset, which turns a return address into a
/// file offset of the same file (`ret - rip + offset`).
pub mod cookie {
    /// Count mode: some API function of the file may tail-jump into this one.
    pub const RELAY_TARGET: u64 = 1 << 7;
    /// File slot meaning "no `LIBC_FILES` entry": return addresses are not classified.
    pub const NO_FILE: u32 = 0x3f;

    pub const fn encode(api: u32, sp_delta: u32) -> u64 {
        (api as u64 & 0x7f) | ((sp_delta as u64 & 0xff) << 8)
    }
    /// [`encode`] plus count mode's fields.
    pub const fn encode_count(
        api: u32,
        sp_delta: u32,
        relay_target: bool,
        relay_mask: u32,
        file_slot: u32,
        probe_offset: u32,
    ) -> u64 {
        encode(api, sp_delta)
            | if relay_target { RELAY_TARGET } else { 0 }
            | ((relay_mask as u64 & 0x3ff) << 16)
            | ((file_slot as u64 & 0x3f) << 26)
            | ((probe_offset as u64) << 32)
    }
    pub const fn api(cookie: u64) -> u32 {
        (cookie & 0x7f) as u32
    }
    pub const fn is_relay_target(cookie: u64) -> bool {
        cookie & RELAY_TARGET != 0
    }
    pub const fn sp_delta(cookie: u64) -> u64 {
        (cookie >> 8) & 0xff
    }
    /// Bit `1 << api` set: this function may tail-jump into `api`'s entry.
    pub const fn relay_mask(cookie: u64) -> u32 {
        ((cookie >> 16) & 0x3ff) as u32
    }
    pub const fn file_slot(cookie: u64) -> u32 {
        ((cookie >> 26) & 0x3f) as u32
    }
    pub const fn probe_offset(cookie: u64) -> u64 {
        cookie >> 32
    }
}

/// Capacity of the `LIBC_FILES` array: distinct libc files count mode classifies return
/// addresses in (more files are still traced, without that rule).
pub const LIBC_FILES_MAX: u32 = cookie::NO_FILE;
/// API functions per file in [`LibcFile`].
pub const LIBC_FILE_RANGES: usize = API_COUNT;

/// Count mode: where a libc file's allocation-API functions are, as file offsets `[start, end)`.
/// A call whose return address lies in one of them was made by the API itself (glibc's realloc
/// calling malloc or free): libc's own relay, not the program's call. Unused slots are `[0, 0)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LibcFile {
    pub ranges: [[u32; 2]; LIBC_FILE_RANGES],
}

/// Count mode: the last counted API entry of a thread (LRU map keyed by `pid_tgid`). A tail-jump
/// relay (glibc's `reallocarray` → `realloc` → `malloc`) enters the next API with the stack
/// pointer and return address of the outer call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastEntry {
    pub entry_sp: u64,
    pub ret_addr: u64,
    pub api: u32,
    /// The APIs the outer API may relay to by a tail jump ([`cookie::relay_mask`]).
    pub relay_mask: u32,
}

/// A call in flight on one thread, keyed by `pid_tgid`. Set at the outermost API entry; while it
/// exists, nested API entries on that thread (glibc's realloc calling malloc, memalign relaying to
/// malloc, …) are libc's own and are not counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// Stack pointer at the function's entry (return address slot).
    pub entry_sp: u64,
    /// Requested size in bytes (for calloc/reallocarray the product, saturated).
    pub size: u64,
    /// realloc/reallocarray: the old pointer; posix_memalign: `memptr`.
    pub arg_ptr: u64,
    /// Return address of the call (the immediate caller).
    pub ret_addr: u64,
    pub stack_id: i64,
    pub api: u32,
    pub _pad: u32,
}

/// Per-site key: one row per (process, API, user stack, immediate caller).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(PartialOrd, Ord))]
pub struct SiteKey {
    pub tgid: u32,
    pub api: u32,
    /// Stack map id (a 63-bit hash of the frames: two different stacks practically never
    /// share one), or a negative value when no stack was captured (see [`NO_STACK`]).
    pub stack_id: i64,
    pub ret_addr: u64,
}

/// `stack_id` when stacks are disabled or the capture failed (the loss is counted).
pub const NO_STACK: i64 = -1;

/// Per-site counters, per CPU; the agent sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteStats {
    /// Calls made (successful or not).
    pub calls: u64,
    /// Bytes requested by those calls.
    pub bytes: u64,
    /// Calls that returned NULL / an error.
    pub failed: u64,
    /// Allocations from this site entered into the live table.
    pub tracked: u64,
    pub tracked_bytes: u64,
    /// Of those, how many were freed (or moved by realloc) since, and their bytes.
    pub freed: u64,
    pub freed_bytes: u64,
}

/// Key of the live-allocation table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LiveKey {
    pub tgid: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// An outstanding allocation: enough to find its site again and age it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveAlloc {
    pub size: u64,
    /// `bpf_ktime_get_ns()` at allocation (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub site: SiteKey,
}

/// Per-API totals of calls that could not get a site row (site table full), per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Overflow {
    pub calls: u64,
    pub bytes: u64,
}

/// Kinds of ring-buffer records.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A site row was created: symbolize it while the process is alive.
    NewSite = 1,
    /// A Go runtime event ([`crate::go::GoEvent`]).
    Go = 2,
    /// A process called `exec` ([`ExecEvent`]).
    Exec = 3,
}

/// Longest executable path an [`ExecEvent`] carries (longer ones are cut).
pub const EXEC_PATH_MAX: usize = 256;

/// `sched_process_exec`: which program a process became. Names a process that exits before
/// the agent reads /proc, and tells the agent its identity changed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecEvent {
    pub header: EventHeader,
    pub comm: [u8; 16],
    /// The path given to `execve`, NUL-terminated.
    pub filename: [u8; EXEC_PATH_MAX],
}

/// Common header of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    pub tgid: u32,
}

/// A new site, followed in its record by `nframes` frames ([`NewSiteRecord`]): the record is
/// as long as the stack, so a burst of new sites (a process starting) fits the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NewSiteEvent {
    pub header: EventHeader,
    pub site: SiteKey,
    /// The thread's comm: names a process that exits before the agent reads /proc.
    pub comm: [u8; 16],
    /// Frames of the site's user stack (`site.stack_id`) that follow; 0 when stacks are off or
    /// the stack was gone. The stack travels with the site because the kernel's stack table is
    /// LRU: on a busy node it could be evicted before the agent read it by id.
    pub nframes: u32,
    pub _pad: u32,
}

/// The longest new-site record: the kernel builds it here and sends its first
/// `NEW_SITE_FIXED + 8 * nframes` bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewSiteRecord {
    pub event: NewSiteEvent,
    pub frames: [u64; crate::MAX_STACK_DEPTH],
}

/// Bytes of a new-site record before its frames.
pub const NEW_SITE_FIXED: usize = size_of::<NewSiteEvent>();

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<Pending>() == 48);
    assert!(offset_of!(Pending, stack_id) == 32);
    assert!(offset_of!(Pending, api) == 40);
    assert!(size_of::<SiteKey>() == 24);
    assert!(offset_of!(SiteKey, stack_id) == 8);
    assert!(offset_of!(SiteKey, ret_addr) == 16);
    assert!(size_of::<SiteStats>() == 56);
    assert!(offset_of!(SiteStats, freed_bytes) == 48);
    assert!(size_of::<LiveKey>() == 16);
    assert!(offset_of!(LiveKey, addr) == 8);
    assert!(size_of::<LiveAlloc>() == 40);
    assert!(offset_of!(LiveAlloc, site) == 16);
    assert!(size_of::<Overflow>() == 16);
    assert!(size_of::<EventHeader>() == 8);
    assert!(size_of::<NewSiteEvent>() == 56);
    assert!(offset_of!(NewSiteEvent, nframes) == 48);
    assert!(offset_of!(NewSiteRecord, frames) == NEW_SITE_FIXED);
    assert!(size_of::<NewSiteRecord>() == NEW_SITE_FIXED + 8 * crate::MAX_STACK_DEPTH);
    assert!(size_of::<LibcFile>() == 8 * LIBC_FILE_RANGES);
    assert!(size_of::<LastEntry>() == 24);
    assert!(offset_of!(LastEntry, api) == 16);
    assert!(offset_of!(NewSiteEvent, comm) == 32);
    assert!(size_of::<ExecEvent>() == 280);
    assert!(offset_of!(ExecEvent, filename) == 24);
    assert!(offset_of!(NewSiteEvent, site) == 8);
};

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are #[repr(C)] plain integers with explicit padding fields.
    unsafe impl aya::Pod for Pending {}
    unsafe impl aya::Pod for SiteKey {}
    unsafe impl aya::Pod for SiteStats {}
    unsafe impl aya::Pod for LiveKey {}
    unsafe impl aya::Pod for LiveAlloc {}
    unsafe impl aya::Pod for Overflow {}
    unsafe impl aya::Pod for EventHeader {}
    unsafe impl aya::Pod for NewSiteEvent {}
    unsafe impl aya::Pod for ExecEvent {}
    unsafe impl aya::Pod for LibcFile {}
    unsafe impl aya::Pod for LastEntry {}

    #[derive(Debug, thiserror::Error, PartialEq, Eq)]
    pub enum DecodeError {
        #[error("unknown libc API id {0}")]
        UnknownApi(u32),
        #[error("unknown event kind {0}")]
        UnknownKind(u32),
        #[error("unknown Go role {0}")]
        UnknownRole(u32),
        #[error("event record of {got} bytes, expected at least {want}")]
        Short { got: usize, want: usize },
    }

    impl Api {
        pub const ALL: [Api; API_COUNT] = [
            Api::Malloc,
            Api::Calloc,
            Api::Realloc,
            Api::Reallocarray,
            Api::Free,
            Api::PosixMemalign,
            Api::AlignedAlloc,
            Api::Memalign,
            Api::Valloc,
            Api::Pvalloc,
        ];

        /// The libc symbol, also the name used in JSON keys and metric labels.
        pub const fn symbol(self) -> &'static str {
            match self {
                Api::Malloc => "malloc",
                Api::Calloc => "calloc",
                Api::Realloc => "realloc",
                Api::Reallocarray => "reallocarray",
                Api::Free => "free",
                Api::PosixMemalign => "posix_memalign",
                Api::AlignedAlloc => "aligned_alloc",
                Api::Memalign => "memalign",
                Api::Valloc => "valloc",
                Api::Pvalloc => "pvalloc",
            }
        }

        /// Whether the probe needs the return value (the new pointer) of this call.
        pub const fn needs_return(self) -> bool {
            !matches!(self, Api::Free)
        }
    }

    impl TryFrom<u32> for Api {
        type Error = DecodeError;
        fn try_from(v: u32) -> Result<Self, Self::Error> {
            Api::ALL
                .get(v as usize)
                .copied()
                .ok_or(DecodeError::UnknownApi(v))
        }
    }

    impl TryFrom<u32> for EventKind {
        type Error = DecodeError;
        fn try_from(v: u32) -> Result<Self, Self::Error> {
            match v {
                1 => Ok(EventKind::NewSite),
                2 => Ok(EventKind::Go),
                3 => Ok(EventKind::Exec),
                other => Err(DecodeError::UnknownKind(other)),
            }
        }
    }

    /// A decoded ring-buffer record.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Event {
        /// A new site, its thread's comm and its user stack (innermost first; empty when the
        /// event carried none).
        NewSite(SiteKey, [u8; 16], Vec<u64>),
        Go(crate::go::GoEvent),
        /// (tgid, comm, the exec'd path).
        Exec(u32, [u8; 16], String),
    }

    impl TryFrom<&[u8]> for Event {
        type Error = DecodeError;
        fn try_from(buf: &[u8]) -> Result<Self, Self::Error> {
            let header: EventHeader = read(buf)?;
            match EventKind::try_from(header.kind)? {
                EventKind::NewSite => {
                    let ev: NewSiteEvent = read(buf)?;
                    Api::try_from(ev.site.api)?;
                    let n = (ev.nframes as usize).min(crate::MAX_STACK_DEPTH);
                    let want = NEW_SITE_FIXED + 8 * n;
                    let frames = buf.get(NEW_SITE_FIXED..want).ok_or(DecodeError::Short {
                        got: buf.len(),
                        want,
                    })?;
                    let stack = frames
                        .as_chunks::<8>()
                        .0
                        .iter()
                        .map(|b| u64::from_le_bytes(*b))
                        .collect();
                    Ok(Event::NewSite(ev.site, ev.comm, stack))
                }
                EventKind::Go => {
                    let ev: crate::go::GoEvent = read(buf)?;
                    crate::go::GoRole::try_from(ev.role)?;
                    Ok(Event::Go(ev))
                }
                EventKind::Exec => {
                    let ev: ExecEvent = read(buf)?;
                    let len = ev
                        .filename
                        .iter()
                        .position(|&b| b == 0)
                        .unwrap_or(ev.filename.len());
                    let path = String::from_utf8_lossy(&ev.filename[..len]).into_owned();
                    Ok(Event::Exec(header.tgid, ev.comm, path))
                }
            }
        }
    }

    /// Copies a `T` out of the front of `buf` (ring-buffer records carry no alignment promise).
    fn read<T: aya::Pod>(buf: &[u8]) -> Result<T, DecodeError> {
        let want = size_of::<T>();
        if buf.len() < want {
            return Err(DecodeError::Short {
                got: buf.len(),
                want,
            });
        }
        // SAFETY: T is Pod (any bit pattern is valid) and buf holds at least size_of::<T>() bytes.
        Ok(unsafe { core::ptr::read_unaligned(buf.as_ptr().cast::<T>()) })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn bytes_of<T: aya::Pod>(v: &T) -> Vec<u8> {
            // SAFETY: T is Pod, so viewing it as bytes is sound.
            unsafe {
                core::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()).to_vec()
            }
        }

        #[test]
        fn api_ids_round_trip() {
            for api in Api::ALL {
                assert_eq!(Api::try_from(api as u32), Ok(api));
            }
            assert_eq!(Api::try_from(10), Err(DecodeError::UnknownApi(10)));
        }

        #[test]
        fn cookie_round_trip() {
            let c = cookie::encode(Api::PosixMemalign as u32, 24);
            assert_eq!(cookie::api(c), 5);
            assert_eq!(cookie::sp_delta(c), 24);
            assert_eq!(cookie::relay_mask(c), 0);
            let c = cookie::encode_count(Api::Realloc as u32, 8, true, 0x3ff, 62, 0xffff_ffff);
            assert_eq!(cookie::api(c), Api::Realloc as u32);
            assert!(cookie::is_relay_target(c));
            assert_eq!(cookie::sp_delta(c), 8);
            assert_eq!(cookie::relay_mask(c), 0x3ff);
            assert_eq!(cookie::file_slot(c), 62);
            assert_eq!(cookie::probe_offset(c), 0xffff_ffff);
            let c = cookie::encode_count(Api::Free as u32, 0, false, 1, cookie::NO_FILE, 0x26030);
            assert_eq!(cookie::api(c), Api::Free as u32);
            assert!(!cookie::is_relay_target(c));
            assert_eq!(cookie::relay_mask(c), 1);
            assert_eq!(cookie::file_slot(c), cookie::NO_FILE);
            assert_eq!(cookie::probe_offset(c), 0x26030);
        }

        #[test]
        fn decodes_new_site() {
            let site = SiteKey {
                tgid: 42,
                api: Api::Calloc as u32,
                stack_id: 7,
                ret_addr: 0xdead_beef,
            };
            let ev = NewSiteEvent {
                header: EventHeader {
                    kind: EventKind::NewSite as u32,
                    tgid: 42,
                },
                site,
                comm: *b"fixture\0\0\0\0\0\0\0\0\0",
                nframes: 0,
                _pad: 0,
            };
            let buf = bytes_of(&ev);
            assert_eq!(
                Event::try_from(buf.as_slice()),
                Ok(Event::NewSite(
                    site,
                    *b"fixture\0\0\0\0\0\0\0\0\0",
                    Vec::new()
                ))
            );
            // The record is as long as its stack.
            let stack = [0x401000u64, 0x401234, 0x7f00_0000_1000];
            let mut with_stack = bytes_of(&NewSiteEvent { nframes: 3, ..ev });
            for f in stack {
                with_stack.extend_from_slice(&f.to_le_bytes());
            }
            assert_eq!(
                Event::try_from(with_stack.as_slice()),
                Ok(Event::NewSite(
                    site,
                    *b"fixture\0\0\0\0\0\0\0\0\0",
                    stack.to_vec()
                ))
            );
            assert_eq!(
                Event::try_from(&with_stack[..NEW_SITE_FIXED + 16]),
                Err(DecodeError::Short {
                    got: NEW_SITE_FIXED + 16,
                    want: NEW_SITE_FIXED + 24
                })
            );
            assert!(matches!(
                Event::try_from(&buf[..12]),
                Err(DecodeError::Short { got: 12, want: 56 })
            ));
            let mut bad = buf.clone();
            bad[0] = 9;
            assert_eq!(
                Event::try_from(bad.as_slice()),
                Err(DecodeError::UnknownKind(9))
            );
            let mut bad_api = buf;
            bad_api[12] = 200;
            assert_eq!(
                Event::try_from(bad_api.as_slice()),
                Err(DecodeError::UnknownApi(200))
            );
        }
    }
}
#[cfg(feature = "user")]
pub use user::{DecodeError, Event};
