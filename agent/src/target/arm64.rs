//! arm64 code: where a uprobe goes in a function, and its `ret` instructions.
//!
//! Hand-decoded rather than with a disassembler crate: arm64 instructions are fixed 4-byte
//! little-endian words, and the placement needs exactly the handful of encodings Go's stack
//! check is made of (its compiler emits only these, `cmd/internal/obj/arm64/obj7.go`,
//! `stacksplit`) plus `ret`. Each class below is one mask from the Arm ARM (C4.1); anything
//! else ends the search with the safe answer, offset 0. A decoder crate would add a dependency
//! (and its license and duplicate checks) for five masks.
//!
//! Go's stack check, as `go tool objdump` prints it:
//! ```text
//! MOVD 16(R28), R16        f9400b90   ldr x16, [x28, #16]   (g.stackguard0)
//! CMP R16, RSP             eb3063ff   cmp sp, x16
//! BLS morestack            54xxxxx9   b.ls
//! ```
//! Larger frames compute `SP - framesize` into R17 first (`SUB $n, RSP, R17`, or for huge
//! frames `MOVD $n, R27; SUBS R27, RSP, R17; BCC morestack`) and compare R16 with R17. The probe
//! goes just past the `BLS`, as on x86-64: `morestack` jumps back to offset 0, so everything up
//! to the `BLS` runs twice whenever the stack grows. The check writes only R16, R17, R27 and the
//! flags: the argument registers (R0–R15), LR (x30, where the probe reads the return address)
//! and SP are what they were at the entry, so the stack-pointer delta is always 0.
//!
//! Kernel reference for what a probe site costs: `arch/arm64/kernel/probes/decode-insn.c`
//! (`arm_probe_decode_insn`): branches, `adr`/`adrp`, literal loads and `nop` are simulated,
//! every other instruction is single-stepped out of line.

use super::placement::Placement;

/// `ret` (to x30), the only return Go and C compilers emit.
pub const RET: u32 = 0xd65f_03c0;

/// `ldr x16, [x28, #16]`: Go loads the goroutine's stack guard (R28 = g).
const LOAD_STACK_GUARD: u32 = 0xf940_0b90;

/// Instructions the stack check may have between the guard load and its `BLS`.
const MAX_CHECK_INSNS: usize = 6;

/// Registers Go's stack check may write: R16/R17 (IP0/IP1) and R27 (REGTMP), none of them an
/// argument register.
const CHECK_SCRATCH: [u32; 3] = [16, 17, 27];

/// Condition codes of `b.cond`.
const COND_LO: u32 = 0x3;
const COND_LS: u32 = 0x9;

/// The 4-byte words of `code` (a trailing partial word is ignored).
fn words(code: &[u8]) -> impl Iterator<Item = u32> + '_ {
    code.as_chunks::<4>()
        .0
        .iter()
        .map(|w| u32::from_le_bytes(*w))
}

/// Chooses the probe site in an arm64 function whose first bytes are `code`: just past Go's
/// stack check when `skip_stack_check` and the function has one, else offset 0 (where x30
/// holds the return address and SP is the entry's).
pub fn place(code: &[u8], skip_stack_check: bool) -> Placement {
    let first = words(code).next();
    let at_entry = Placement {
        offset_in_function: 0,
        sp_delta: 0,
        emulated: first.is_some_and(is_simulated),
    };
    if !skip_stack_check {
        return at_entry;
    }
    match stack_check_end(code) {
        Some(offset) => Placement {
            offset_in_function: offset,
            sp_delta: 0,
            emulated: words(&code[offset as usize..])
                .next()
                .is_some_and(is_simulated),
        },
        None => at_entry,
    }
}

/// The offset just past Go's stack check at the start of `code`, if it starts with one (and
/// the instruction after it is in `code`).
fn stack_check_end(code: &[u8]) -> Option<u64> {
    let mut w = words(code);
    if w.next()? != LOAD_STACK_GUARD {
        return None;
    }
    for (i, insn) in w.take(MAX_CHECK_INSNS).enumerate() {
        // Offset of the instruction after `insn` (the guard load is word 0).
        let next = 4 * (i as u64 + 2);
        if let Some(cond) = b_cond(insn) {
            match cond {
                COND_LS if next < code.len() as u64 => return Some(next),
                // Huge frames: `SP - framesize` wrapped around, also morestack.
                COND_LO => continue,
                _ => return None,
            }
        }
        if !writes_only_scratch(insn) {
            return None;
        }
    }
    None
}

/// `b.cond`'s condition.
fn b_cond(insn: u32) -> Option<u32> {
    (insn & 0xff00_0010 == 0x5400_0000).then_some(insn & 0xf)
}

/// Whether `insn` is one of the stack check's data-processing forms (add/sub immediate,
/// add/sub shifted or extended register, move wide immediate) and writes only a scratch
/// register, or only the flags (`cmp`: `subs` to XZR).
fn writes_only_scratch(insn: u32) -> bool {
    let rd = insn & 0x1f;
    let sets_flags = insn & (1 << 29) != 0;
    let add_sub_imm = insn & 0x1f00_0000 == 0x1100_0000;
    let add_sub_reg = insn & 0x1f00_0000 == 0x0b00_0000;
    let move_wide = insn & 0x1f80_0000 == 0x1280_0000;
    if !(add_sub_imm || add_sub_reg || move_wide) {
        return false;
    }
    // Register 31 is SP for add/sub immediate and extended forms without flags, XZR with them.
    CHECK_SCRATCH.contains(&rd) || (rd == 31 && sets_flags && !move_wide)
}

/// Whether the kernel simulates `insn` at a probe site instead of single-stepping it
/// (`arm_probe_decode_insn`): b, bl, b.cond, cbz/cbnz, tbz/tbnz, adr/adrp, ldr/ldrsw
/// (literal), br/blr/ret, nop.
pub fn is_simulated(insn: u32) -> bool {
    let b_bl = insn & 0x7c00_0000 == 0x1400_0000;
    let bcond = b_cond(insn).is_some();
    let cbz = insn & 0x7e00_0000 == 0x3400_0000;
    let tbz = insn & 0x7e00_0000 == 0x3600_0000;
    let adr = insn & 0x1f00_0000 == 0x1000_0000;
    let ldr_lit = insn & 0xbf00_0000 == 0x1800_0000 || insn & 0xff00_0000 == 0x9800_0000;
    let br_blr_ret = insn & 0xff9f_fc1f == 0xd61f_0000;
    let nop = insn == 0xd503_201f;
    b_bl || bcond || cbz || tbz || adr || ldr_lit || br_blr_ret || nop
}

/// Addresses of the `ret` instructions of a function body loaded at `address`.
pub fn ret_addresses(code: &[u8], address: u64) -> Vec<u64> {
    words(code)
        .enumerate()
        .filter(|&(_, w)| w == RET)
        .map(|(i, _)| address + 4 * i as u64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// The first instructions of functions of a go1.25.5 arm64 binary (`go tool objdump`).
    #[test]
    fn go_stack_checks() {
        // runtime.growslice: small frame.
        let small = code(&[
            0xf940_0b90,
            0xeb30_63ff,
            0x5400_30a9,
            0xf81a_0ffe,
            0xf81f_83fd,
        ]);
        let p = place(&small, true);
        assert_eq!(
            (p.offset_in_function, p.sp_delta, p.emulated),
            (12, 0, false)
        );
        // Large frame: SUB $16, RSP, R17; CMP R16, R17; BLS.
        let large = code(&[
            0xf940_0b90,
            0xd100_43f1,
            0xeb10_023f,
            0x5400_2509,
            0xf817_0ffe,
        ]);
        assert_eq!(place(&large, true).offset_in_function, 16);
        // Huge frame: MOVD $65424, R27; SUBS R27, RSP, R17; BCC; CMP R16, R17; BLS.
        let huge = code(&[
            0xf940_0b90,
            0xd29f_f21b,
            0xeb3b_63f1,
            0x5400_0263,
            0xeb10_023f,
            0x5400_0229,
            0xd100_43f4,
        ]);
        assert_eq!(place(&huge, true).offset_in_function, 24);
        // SUBS $3984, RSP, R17; BCC; CMP; BLS.
        let subs = code(&[
            0xf940_0b90,
            0xf13e_43f1,
            0x5400_0263,
            0xeb10_023f,
            0x5400_0229,
            0xd282_021b,
        ]);
        assert_eq!(place(&subs, true).offset_in_function, 20);
    }

    #[test]
    fn no_stack_check_means_the_entry() {
        // Not asked for: the entry even with a check.
        let small = code(&[0xf940_0b90, 0xeb30_63ff, 0x5400_30a9, 0xf81a_0ffe]);
        assert_eq!(place(&small, false).offset_in_function, 0);
        // A NOSPLIT function: MOVD.W R30, -32(RSP) first.
        assert_eq!(
            place(&code(&[0xf81e_0ffe, RET]), true).offset_in_function,
            0
        );
        // Something writes an argument register (x0) before the BLS: not Go's check.
        let odd = code(&[0xf940_0b90, 0xd100_43e0, 0xeb10_001f, 0x5400_2509, RET]);
        assert_eq!(place(&odd, true).offset_in_function, 0);
        // SUB $16, RSP, RSP would move SP: not Go's check.
        let sp = code(&[0xf940_0b90, 0xd100_43ff, 0x5400_2509, RET]);
        assert_eq!(place(&sp, true).offset_in_function, 0);
        // The check ends the code: no instruction after it to probe.
        let cut = code(&[0xf940_0b90, 0xeb30_63ff, 0x5400_30a9]);
        assert_eq!(place(&cut, true).offset_in_function, 0);
        assert_eq!(place(&[], true).offset_in_function, 0);
        assert_eq!(place(&[0x90, 0x0b], true).offset_in_function, 0);
    }

    #[test]
    fn simulated_instructions() {
        // glibc's malloc starts with `stp x29, x30, [sp, #-N]!`: single-stepped.
        assert!(!is_simulated(0xa9bd_7bfd));
        for insn in [
            RET,
            0xd65f_0000 | (5 << 5), // ret x5
            0xd61f_0200,            // br x16
            0x9400_0010,            // bl
            0x1400_0010,            // b
            0x5400_0229,            // b.ls
            0xb400_0800,            // cbz x0
            0xb7f8_2f41,            // tbnz x1, #63
            0x9000_0010,            // adrp x16
            0x5800_0050,            // ldr x16, literal
            0xd503_201f,            // nop
        ] {
            assert!(is_simulated(insn), "{insn:#010x}");
        }
    }

    #[test]
    fn finds_rets() {
        // stp; ret; ldr (data-looking); ret
        let c = code(&[0xa9bd_7bfd, RET, 0xf940_0085, RET]);
        assert_eq!(ret_addresses(&c, 0x1000), vec![0x1004, 0x100c]);
        // A trailing partial word is not an instruction.
        let mut c = code(&[RET]);
        c.push(0xc0);
        assert_eq!(ret_addresses(&c, 0), vec![0]);
    }
}
