//! Symbol probes: entry uprobes on any function found by name (`--probe`, and the built-in C++
//! and Rust container-growth patterns), counted per call site with up to [`ARGS`] integer
//! arguments summed, aggregated per CPU in the kernel like the libc sites.

/// Integer arguments one probe can read (x86-64 SysV: rdi, rsi, rdx, rcx, r8, r9).
pub const ARGS: usize = 6;

/// Probe ids a cookie can carry (one id per user probe or built-in kind).
pub const PROBES_MAX: u32 = 1 << 16;

/// Rows of the `PROBE_SITES` table.
pub const SITES_MAX: u32 = 16_384;

/// Per-site key: one row per (process, probe, user stack, immediate caller).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(PartialOrd, Ord))]
pub struct ProbeSiteKey {
    pub tgid: u32,
    /// The probe's id ([`cookie::probe`]).
    pub probe: u32,
    /// Stack map id, or `libc::NO_STACK`.
    pub stack_id: i64,
    pub ret_addr: u64,
}

/// Per-site counters, per CPU; the agent sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeSiteStats {
    pub calls: u64,
    /// Sum of each named argument over the calls (slot order of the probe's `ARG as NAME`).
    pub args: [u64; ARGS],
}

/// The attach cookie of a symbol probe.
///
/// | bits | field |
/// |---|---|
/// | 0–15 | probe id |
/// | 16–23 | bytes RSP moved between the function's entry and the probed instruction |
/// | 24–41 | per argument slot, 3 bits: 0 = unused, n = argument n-1 (`arg0` = rdi … `arg5` = r9) |
/// | 42 | count only the calls that reallocate, by CPython's `list_resize` check ([`list_resize_check`]) |
/// | 43–50 | for that check: the offset of `allocated` in the list object (rdi) |
///
/// [`list_resize_check`]: cookie::list_resize_check
pub mod cookie {
    use super::ARGS;

    const SP_SHIFT: u32 = 16;
    const ARG_SHIFT: u32 = 24;
    const CHECK_BIT: u64 = 1 << 42;
    const CHECK_OFFSET_SHIFT: u32 = 43;

    /// `args[slot]`: the argument register index (0..6) summed in that slot, if any.
    pub const fn encode(probe: u32, sp_delta: u32, args: [Option<u8>; ARGS]) -> u64 {
        let mut c = (probe as u64 & 0xffff) | ((sp_delta as u64 & 0xff) << SP_SHIFT);
        let mut slot = 0;
        while slot < ARGS {
            if let Some(reg) = args[slot] {
                c |= ((reg as u64 % ARGS as u64) + 1) << (ARG_SHIFT + 3 * slot as u32);
            }
            slot += 1;
        }
        c
    }

    pub const fn probe(cookie: u64) -> u32 {
        (cookie & 0xffff) as u32
    }

    pub const fn sp_delta(cookie: u64) -> u64 {
        (cookie >> SP_SHIFT) & 0xff
    }

    /// The argument index summed in `slot` plus one (0: the slot is unused).
    pub const fn arg(cookie: u64, slot: usize) -> u64 {
        (cookie >> (ARG_SHIFT + 3 * slot as u32)) & 0x7
    }

    /// `cookie` counting only the calls of CPython's `list_resize(self, newsize)` that
    /// reallocate: it returns early, without touching the allocation, when `allocated >=
    /// newsize && newsize >= (allocated >> 1)`, `allocated` being the `Py_ssize_t` at
    /// `allocated_offset` in `*self`.
    pub const fn with_list_resize_check(cookie: u64, allocated_offset: u8) -> u64 {
        cookie | CHECK_BIT | ((allocated_offset as u64) << CHECK_OFFSET_SHIFT)
    }

    /// The offset of `allocated` when the cookie asks for the `list_resize` check.
    pub const fn list_resize_check(cookie: u64) -> Option<u64> {
        if cookie & CHECK_BIT == 0 {
            None
        } else {
            Some((cookie >> CHECK_OFFSET_SHIFT) & 0xff)
        }
    }

    /// Whether `list_resize(self, newsize)` reallocates, `allocated` being `self->allocated`
    /// (CPython 3.11 Objects/listobject.c: the early return's condition, negated).
    pub const fn list_resize_reallocates(allocated: i64, newsize: i64) -> bool {
        !(allocated >= newsize && newsize >= (allocated >> 1))
    }
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<ProbeSiteKey>() == 24);
    assert!(offset_of!(ProbeSiteKey, stack_id) == 8);
    assert!(size_of::<ProbeSiteStats>() == 8 + 8 * ARGS);
};

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: #[repr(C)] plain integers without padding.
    unsafe impl aya::Pod for ProbeSiteKey {}
    unsafe impl aya::Pod for ProbeSiteStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_round_trips() {
        let c = cookie::encode(0xfffe, 0x18, [Some(1), None, Some(5), None, None, Some(0)]);
        assert_eq!(cookie::probe(c), 0xfffe);
        assert_eq!(cookie::sp_delta(c), 0x18);
        assert_eq!(cookie::arg(c, 0), 2);
        assert_eq!(cookie::arg(c, 1), 0);
        assert_eq!(cookie::arg(c, 2), 6);
        assert_eq!(cookie::arg(c, 5), 1);
        assert_eq!(cookie::encode(3, 0, [None; ARGS]), 3);
        assert_eq!(cookie::list_resize_check(c), None);
        let checked = cookie::with_list_resize_check(c, 32);
        assert_eq!(cookie::list_resize_check(checked), Some(32));
        assert_eq!(cookie::probe(checked), 0xfffe);
        assert_eq!(cookie::arg(checked, 5), 1);
        assert_eq!(
            cookie::list_resize_check(cookie::with_list_resize_check(0, 0xff)),
            Some(0xff)
        );
    }

    #[test]
    fn list_resize_reallocates_as_cpython_decides() {
        // Room left: no reallocation (appends within the over-allocation, pops down to half).
        assert!(!cookie::list_resize_reallocates(8, 5));
        assert!(!cookie::list_resize_reallocates(8, 8));
        assert!(!cookie::list_resize_reallocates(8, 4));
        // Growth past the allocation, a shrink below half, the first append to [].
        assert!(cookie::list_resize_reallocates(8, 9));
        assert!(cookie::list_resize_reallocates(8, 3));
        assert!(cookie::list_resize_reallocates(0, 1));
        // clear() of an empty list: 0 >= 0 && 0 >= 0.
        assert!(!cookie::list_resize_reallocates(0, 0));
    }
}
