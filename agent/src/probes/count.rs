//! Count mode's view of a probed libc file: which API functions relay to which, and the
//! file's entry in `LIBC_FILES` (API ranges) that lets the probe tell libc's own relays from
//! the program's calls without a return probe.

use allocwatch_common::libc::{LibcFile, cookie, has_api};

use crate::target::{ProbePoint, elf::ElfFile, relays::Relays};

/// What count mode knows about one probed libc file.
pub(super) struct CountLayout {
    /// Slot in `LIBC_FILES`, or [`cookie::NO_FILE`].
    pub(super) slot: u32,
    pub(super) file: LibcFile,
    pub(super) relays: Relays,
}

impl CountLayout {
    pub(super) fn unknown() -> Self {
        Self {
            slot: cookie::NO_FILE,
            file: LibcFile::default(),
            relays: Relays::unknown(),
        }
    }

    /// The file's entry takes `slot` when there is one, with its API ranges only where the
    /// probe can use them (else rule 1 is off, and the tail jumps still known).
    pub(super) fn of(elf: &ElfFile, points: &[ProbePoint], slot: Option<u32>) -> Self {
        let mut layout = Self {
            relays: Relays::of(elf, points),
            ..Self::unknown()
        };
        let Some(slot) = slot else {
            return layout;
        };
        layout.slot = slot;
        for (slot, mask) in layout.file.relays.iter_mut().zip(layout.relays.masks) {
            *slot = mask;
        }
        if let Some(ranges) = &layout.relays.ranges {
            for (slot, r) in layout.file.ranges.iter_mut().zip(ranges) {
                *slot = *r;
            }
            for (slot, s) in layout.file.sites.iter_mut().zip(&layout.relays.sites) {
                *slot = *s;
            }
        }
        layout
    }

    pub(super) fn cookie(&self, p: &ProbePoint) -> u64 {
        let api = p.api as u32;
        cookie::encode_count(
            api,
            p.sp_delta,
            has_api(self.relays.targets(), api),
            self.relays.masks[p.api as usize] != 0,
            self.slot,
            u32::try_from(p.file_offset).unwrap_or(0),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use allocwatch_common::libc::{API_COUNT, Api};

    use super::*;
    use crate::target::libc::probe_points;

    /// Count mode's view of the machine's glibc (skipped where there is none): the relays
    /// between API functions found by disassembly, and one range per distinct function.
    #[test]
    fn count_layout_of_system_glibc() {
        let Some(path) = ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
        else {
            return;
        };
        let elf = ElfFile::open(path).unwrap();
        let (points, aliases) = probe_points(&elf, "", false).unwrap();
        let layout = CountLayout::of(&elf, &points, Some(0));
        assert_eq!(layout.slot, 0);
        let mask = |api: Api| layout.relays.masks[api as usize];
        let bit = |api: Api| 1u64 << api as u32;
        // The leaves relay to nothing; no function relays to itself.
        assert_eq!(mask(Api::Malloc), 0);
        assert_eq!(mask(Api::Free), 0);
        for api in Api::ALL {
            assert_eq!(mask(api) & bit(api), 0, "{api:?}");
        }
        // glibc 2.36: realloc(NULL, n) tail-jumps into malloc; reallocarray into realloc through
        // the PLT (its GOT slot names `realloc`: whichever file serves it, jemalloc's under
        // jemalloc); nothing else relays by a tail jump.
        assert_eq!(mask(Api::Realloc), bit(Api::Malloc));
        assert_eq!(mask(Api::Reallocarray), bit(Api::Realloc));
        assert_eq!(
            layout.relays.targets(),
            bit(Api::Malloc) | bit(Api::Realloc)
        );
        assert_eq!(layout.relays.named, bit(Api::Realloc));
        // The probe reads the relays by API id from the file's entry.
        assert_eq!(layout.file.relays[..API_COUNT], layout.relays.masks);
        assert!(layout.file.relays[API_COUNT..].iter().all(|&m| m == 0));
        let flags = |api: Api| {
            let p = points.iter().find(|p| p.api == api).expect("probed");
            let c = layout.cookie(p);
            (cookie::is_target(c), cookie::relays(c))
        };
        assert_eq!(flags(Api::Malloc), (true, false));
        assert_eq!(flags(Api::Realloc), (true, true));
        assert_eq!(flags(Api::Reallocarray), (false, true));
        assert_eq!(flags(Api::Free), (false, false));
        let distinct = Api::ALL.iter().filter(|a| a.is_libc()).count() - aliases.len();
        let used = layout.file.ranges.iter().filter(|r| r[1] > r[0]).count();
        assert_eq!(used, distinct);
        // Its API functions call no API from functions in between.
        assert!(layout.relays.sites.is_empty(), "{:?}", layout.relays.sites);
        for p in &points {
            let off = u32::try_from(p.file_offset).unwrap();
            assert!(
                layout.file.ranges.iter().any(|r| r[0] <= off && off < r[1]),
                "{:?} probe outside its function",
                p.api
            );
        }
        let c = layout.cookie(&points[0]);
        assert_eq!(cookie::api(c), points[0].api as u32);
        assert_eq!(cookie::probe_offset(c), points[0].file_offset);
    }
}
