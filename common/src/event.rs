//! Ring-buffer records: the common header, the record kinds, each record's layout, and (with
//! the `user` feature) their validated decoding. The kinds, APIs and Go roles convert from
//! their raw ids with `const fn`s usable by the probes too, so both sides match on enums.
//!
//! Dependencies point one way: this module uses [`crate::libc`] and [`crate::go`], which use
//! nothing of each other or of this module.

use crate::go::{GO_HIST_BUCKETS, GO_VALUES, GoHistVal};
use crate::libc::SiteKey;

/// Kinds of ring-buffer records.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A site row was created: symbolize it while the process is alive ([`NewSiteEvent`]).
    NewSite = 1,
    /// A Go runtime event ([`GoEvent`]).
    Go = 2,
    /// A process called `exec` ([`ExecEvent`]).
    Exec = 3,
    /// A followed process created a child process ([`ForkEvent`]; `header.tgid` = the child).
    Fork = 4,
    /// A followed process exited ([`ExitEvent`]).
    Exit = 5,
    /// The size histograms of the program a process ran until its exec ([`ImageHistEvent`]):
    /// sent just before that exec's record.
    ImageHist = 6,
}

impl EventKind {
    /// The kind of a raw header id, `None` for an unknown one.
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(EventKind::NewSite),
            2 => Some(EventKind::Go),
            3 => Some(EventKind::Exec),
            4 => Some(EventKind::Fork),
            5 => Some(EventKind::Exit),
            6 => Some(EventKind::ImageHist),
            _ => None,
        }
    }
}

/// Common header of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    pub tgid: u32,
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

/// Histogram rows (`LIBC_HIST`, `GO_HIST`): the map slots of [`ImageHistEvent::buckets`].
pub const IMAGE_HIST_MAPS: usize = 2;

/// The size histograms a program image left at its exec, summed over the CPUs and taken out of
/// the maps (`config::FLAG_EXEC_HIST`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHistEvent {
    pub header: EventHeader,
    /// Bit `b` of `present[m]`: `buckets[m][b]` holds bucket `b` of map `m` (0 `LIBC_HIST`,
    /// 1 `GO_HIST`); the other slots are not written.
    pub present: [u64; IMAGE_HIST_MAPS],
    pub buckets: [[GoHistVal; GO_HIST_BUCKETS as usize]; IMAGE_HIST_MAPS],
}

/// `task:task_newtask` of a followed process: its new child process (`header.tgid`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkEvent {
    pub header: EventHeader,
    pub parent: u32,
    /// 1: the child is followed; 0: the followed-set map was full, the child is not traced.
    pub followed: u32,
}

/// `sched:sched_process_exit` of a followed process's last thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitEvent {
    pub header: EventHeader,
    /// The status passed to `exit_group` (low 8 bits), when `code_known` is 1; a process
    /// killed by a signal never calls it.
    pub code: u32,
    pub code_known: u32,
}

/// A followed process, the value of the `FOLLOWED` map (key: its tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Followed {
    pub parent: u32,
    /// Set by `exit_group`: `EXIT_CODE_KNOWN | status`.
    pub exit: u32,
    /// Execs since it was followed: which of its programs is running ([`ProgramKey::execs`]).
    pub execs: u32,
    pub _pad: u32,
}

/// Key of the `PROGRAMS` map: one API's calls (value: `libc::Overflow`, calls and bytes) in
/// one program a followed process ran, so that the counts of a process that execs are split
/// exactly between its programs (a shell's fork before it execs the command).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProgramKey {
    pub tgid: u32,
    pub execs: u32,
    pub api: u32,
    pub _pad: u32,
}

/// Marks [`Followed::exit`] as set.
pub const EXIT_CODE_KNOWN: u32 = 1 << 31;

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

/// A streamed Go runtime event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoEvent {
    pub header: EventHeader,
    /// A [`crate::go::GoRole`] id.
    pub role: u32,
    pub tid: u32,
    pub ts_ns: u64,
    /// The goroutine (`g`, R14 under ABIInternal).
    pub goroutine: u64,
    pub ret_addr: u64,
    pub stack_id: i64,
    /// For `StartTheWorld`: [pause ns, stop reason, stop's return address, …].
    pub values: [u64; GO_VALUES],
    /// Growth events: the caller's own return address (one frame above `ret_addr`, through
    /// the frame pointer), part of the kernel's aggregation key (`crate::go::GoAggKey`); 0
    /// for other events.
    pub caller: u64,
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<EventHeader>() == 8);
    assert!(size_of::<NewSiteEvent>() == 56);
    assert!(offset_of!(NewSiteEvent, site) == 8);
    assert!(offset_of!(NewSiteEvent, comm) == 32);
    assert!(offset_of!(NewSiteEvent, nframes) == 48);
    assert!(offset_of!(NewSiteRecord, frames) == NEW_SITE_FIXED);
    assert!(size_of::<NewSiteRecord>() == NEW_SITE_FIXED + 8 * crate::MAX_STACK_DEPTH);
    assert!(size_of::<ExecEvent>() == 280);
    assert!(offset_of!(ExecEvent, filename) == 24);
    assert!(size_of::<GoEvent>() == 104);
    assert!(offset_of!(GoEvent, caller) == 96);
    assert!(offset_of!(ImageHistEvent, present) == 8);
    assert!(offset_of!(ImageHistEvent, buckets) == 24);
    assert!(size_of::<ImageHistEvent>() == 24 + 16 * 2 * GO_HIST_BUCKETS as usize);
    assert!(GO_HIST_BUCKETS <= 64);
    assert!(size_of::<ForkEvent>() == 16);
    assert!(size_of::<ExitEvent>() == 16);
    assert!(size_of::<Followed>() == 16);
    assert!(size_of::<ProgramKey>() == 16);
    assert!(offset_of!(GoEvent, ts_ns) == 16);
    assert!(offset_of!(GoEvent, stack_id) == 40);
    assert!(offset_of!(GoEvent, values) == 48);
};

#[cfg(feature = "user")]
mod user {
    use super::*;
    use crate::go::GoRole;
    use crate::libc::Api;

    // SAFETY: all of these are #[repr(C)] plain integers with explicit padding fields.
    unsafe impl aya::Pod for EventHeader {}
    unsafe impl aya::Pod for NewSiteEvent {}
    unsafe impl aya::Pod for ExecEvent {}
    unsafe impl aya::Pod for ImageHistEvent {}
    unsafe impl aya::Pod for GoEvent {}
    unsafe impl aya::Pod for ForkEvent {}
    unsafe impl aya::Pod for ExitEvent {}
    unsafe impl aya::Pod for Followed {}
    unsafe impl aya::Pod for ProgramKey {}

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

    impl TryFrom<u32> for Api {
        type Error = DecodeError;
        fn try_from(v: u32) -> Result<Self, Self::Error> {
            Api::from_u32(v).ok_or(DecodeError::UnknownApi(v))
        }
    }

    impl TryFrom<u32> for GoRole {
        type Error = DecodeError;
        fn try_from(v: u32) -> Result<Self, Self::Error> {
            GoRole::from_u32(v).ok_or(DecodeError::UnknownRole(v))
        }
    }

    impl TryFrom<u32> for EventKind {
        type Error = DecodeError;
        fn try_from(v: u32) -> Result<Self, Self::Error> {
            EventKind::from_u32(v).ok_or(DecodeError::UnknownKind(v))
        }
    }

    /// A decoded ring-buffer record.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Event {
        /// A new site, its thread's comm and its user stack (innermost first; empty when the
        /// event carried none).
        NewSite(SiteKey, [u8; 16], Vec<u64>),
        Go(GoEvent),
        /// (tgid, comm, the exec'd path).
        Exec(u32, [u8; 16], String),
        /// (child tgid, parent tgid, whether the child is followed).
        Fork(u32, u32, bool),
        /// (tgid, its exit status when it called `exit_group`).
        Exit(u32, Option<u8>),
        /// (tgid, the histograms its program left at exec).
        ImageHist(u32, ImageHists),
    }

    /// The size histograms of one program image: (log2 bucket, calls and bytes), by bucket.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct ImageHists {
        pub libc: Vec<(u32, GoHistVal)>,
        pub go: Vec<(u32, GoHistVal)>,
    }

    impl From<&ImageHistEvent> for ImageHists {
        fn from(ev: &ImageHistEvent) -> Self {
            let take = |m: usize| -> Vec<(u32, GoHistVal)> {
                (0..GO_HIST_BUCKETS)
                    .filter(|b| ev.present[m] & (1 << b) != 0)
                    .map(|b| (b, ev.buckets[m][b as usize]))
                    .collect()
            };
            Self {
                libc: take(0),
                go: take(1),
            }
        }
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
                    let ev: GoEvent = read(buf)?;
                    GoRole::try_from(ev.role)?;
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
                EventKind::ImageHist => {
                    let ev: ImageHistEvent = read(buf)?;
                    Ok(Event::ImageHist(header.tgid, ImageHists::from(&ev)))
                }
                EventKind::Fork => {
                    let ev: ForkEvent = read(buf)?;
                    Ok(Event::Fork(header.tgid, ev.parent, ev.followed != 0))
                }
                EventKind::Exit => {
                    let ev: ExitEvent = read(buf)?;
                    let code = (ev.code_known != 0).then_some(ev.code as u8);
                    Ok(Event::Exit(header.tgid, code))
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
        fn ids_round_trip() {
            for api in Api::ALL {
                assert_eq!(Api::try_from(api as u32), Ok(api));
            }
            let past = crate::libc::API_COUNT as u32;
            assert_eq!(Api::try_from(past), Err(DecodeError::UnknownApi(past)));
            for r in GoRole::ALL {
                assert_eq!(GoRole::try_from(r as u32), Ok(r));
            }
            assert_eq!(GoRole::try_from(99), Err(DecodeError::UnknownRole(99)));
            for k in [
                EventKind::NewSite,
                EventKind::Go,
                EventKind::Exec,
                EventKind::Fork,
                EventKind::Exit,
                EventKind::ImageHist,
            ] {
                assert_eq!(EventKind::try_from(k as u32), Ok(k));
            }
            assert_eq!(EventKind::try_from(0), Err(DecodeError::UnknownKind(0)));
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

        #[test]
        fn decodes_go_and_exec() {
            let ev = GoEvent {
                header: EventHeader {
                    kind: EventKind::Go as u32,
                    tgid: 7,
                },
                role: GoRole::SliceGrow as u32,
                values: [1, 2, 3, 4, 5, 6],
                ..GoEvent::default()
            };
            assert_eq!(Event::try_from(bytes_of(&ev).as_slice()), Ok(Event::Go(ev)));
            let bad = GoEvent { role: 99, ..ev };
            assert_eq!(
                Event::try_from(bytes_of(&bad).as_slice()),
                Err(DecodeError::UnknownRole(99))
            );
            let mut filename = [0u8; EXEC_PATH_MAX];
            filename[..9].copy_from_slice(b"/bin/true");
            let exec = ExecEvent {
                header: EventHeader {
                    kind: EventKind::Exec as u32,
                    tgid: 8,
                },
                comm: *b"true\0\0\0\0\0\0\0\0\0\0\0\0",
                filename,
            };
            assert_eq!(
                Event::try_from(bytes_of(&exec).as_slice()),
                Ok(Event::Exec(8, exec.comm, "/bin/true".into()))
            );
        }

        #[test]
        fn decodes_image_hists_of_present_buckets_only() {
            let mut ev = ImageHistEvent {
                header: EventHeader {
                    kind: EventKind::ImageHist as u32,
                    tgid: 12,
                },
                present: [1 << 3 | 1 << 47, 1 << 0],
                // Slots not marked present hold whatever the probe's scratch held.
                buckets: [[GoHistVal { count: 9, bytes: 9 }; GO_HIST_BUCKETS as usize]; 2],
            };
            ev.buckets[0][3] = GoHistVal {
                count: 2,
                bytes: 20,
            };
            ev.buckets[0][47] = GoHistVal {
                count: 1,
                bytes: 1 << 47,
            };
            ev.buckets[1][0] = GoHistVal { count: 5, bytes: 5 };
            let want = ImageHists {
                libc: vec![
                    (
                        3,
                        GoHistVal {
                            count: 2,
                            bytes: 20,
                        },
                    ),
                    (
                        47,
                        GoHistVal {
                            count: 1,
                            bytes: 1 << 47,
                        },
                    ),
                ],
                go: vec![(0, GoHistVal { count: 5, bytes: 5 })],
            };
            assert_eq!(
                Event::try_from(bytes_of(&ev).as_slice()),
                Ok(Event::ImageHist(12, want))
            );
            let short = &bytes_of(&ev)[..100];
            assert!(matches!(
                Event::try_from(short),
                Err(DecodeError::Short { .. })
            ));
        }

        #[test]
        fn decodes_fork_and_exit() {
            let fork = ForkEvent {
                header: EventHeader {
                    kind: EventKind::Fork as u32,
                    tgid: 11,
                },
                parent: 10,
                followed: 1,
            };
            assert_eq!(
                Event::try_from(bytes_of(&fork).as_slice()),
                Ok(Event::Fork(11, 10, true))
            );
            let full = ForkEvent {
                followed: 0,
                ..fork
            };
            assert_eq!(
                Event::try_from(bytes_of(&full).as_slice()),
                Ok(Event::Fork(11, 10, false))
            );
            let exit = ExitEvent {
                header: EventHeader {
                    kind: EventKind::Exit as u32,
                    tgid: 11,
                },
                code: 3,
                code_known: 1,
            };
            assert_eq!(
                Event::try_from(bytes_of(&exit).as_slice()),
                Ok(Event::Exit(11, Some(3)))
            );
            let killed = ExitEvent {
                code_known: 0,
                ..exit
            };
            assert_eq!(
                Event::try_from(bytes_of(&killed).as_slice()),
                Ok(Event::Exit(11, None))
            );
            assert!(matches!(
                Event::try_from(&bytes_of(&exit)[..12]),
                Err(DecodeError::Short { got: 12, want: 16 })
            ));
        }
    }
}
#[cfg(feature = "user")]
pub use user::{DecodeError, Event, ImageHists};
