//! Where in a function a uprobe goes.
//!
//! At a probe site the x86 kernel *emulates* a few instructions (push of a general register,
//! `jmp`/`jcc`/`call` with a relative displacement, nops) and single-steps every other one out of
//! line, which costs a second trap: about 10× the whole probe in a VM (DESIGN.md §1). So instead
//! of offset 0 the probe goes on the first emulated instruction of the entry block that
//! - every call executes exactly once (it is not past the entry block's first branch),
//! - sees the arguments the probe reads (no earlier instruction writes those registers), and
//! - sees a known stack pointer: the probe reads the return address at `[rsp + sp_delta]`; when a
//!   uretprobe shares the site the kernel hijacks the return address at `[rsp]`, so then no
//!   earlier instruction may move RSP at all.
//!
//! Kernel reference: `arch/x86/kernel/uprobes.c` (`branch_setup_xol_ops`, `push_setup_xol_ops`).

use super::elf::Arch;
use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic,
    OpAccess, OpKind, Register,
};

/// Registers the libc allocation API passes its arguments in (SysV: up to three arguments).
pub const LIBC_ARG_REGS: [Register; 3] = [Register::RDI, Register::RSI, Register::RDX];

/// Largest stack-pointer delta a probe can use: the probe cookie carries it in one byte
/// (`allocwatch_common::libc::cookie`).
pub const MAX_SP_DELTA: u32 = 0xff;

/// At most this many instructions are examined; entry blocks are short.
const MAX_INSTRUCTIONS: usize = 64;

/// What the probe at the chosen site needs.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// Argument registers the probe reads; they must not have been written before the site.
    /// Any width may be given (sub-register writes count against the full register).
    pub needed: &'a [Register],
    /// A uretprobe shares the site: RSP must not have moved before it.
    pub with_return: bool,
    /// Go: start after the stack-bound check (`cmp rsp/r12, [g+0x10]; jbe morestack`). The
    /// morestack path jumps back to offset 0, so everything up to and including that `jbe`
    /// runs twice whenever the goroutine stack grows; the first instruction after it runs
    /// exactly once per call. Functions without the check are placed as usual.
    pub skip_stack_check: bool,
}

impl Request<'static> {
    /// A libc allocation-API function; `with_return` for the functions whose result is read.
    pub const fn libc(with_return: bool) -> Self {
        Request {
            needed: &LIBC_ARG_REGS,
            with_return,
            skip_stack_check: false,
        }
    }
}

/// The chosen probe site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Bytes from the function's start.
    pub offset_in_function: u64,
    /// How far RSP has moved down at the site: the return address is at `[rsp + sp_delta]`.
    pub sp_delta: u32,
    /// The kernel emulates the instruction at the site (cheap); otherwise it single-steps it.
    pub emulated: bool,
}

/// Chooses the probe site in a function of instruction set `arch` whose first bytes are
/// `code`, loaded at `address` (any consistent address: only offsets are returned). Never
/// fails: without a better site the answer is offset 0.
pub fn place(arch: Arch, code: &[u8], address: u64, req: &Request<'_>) -> Placement {
    match arch {
        Arch::X86_64 => place_x86_64(code, address, req),
        // arm64 has no push: the stack pointer only moves in the frame setup, after the sites
        // `arm64::place` chooses, and the registers to keep are those the stack check spares.
        Arch::Aarch64 => super::arm64::place(code, req.skip_stack_check),
    }
}

/// [`place`] for x86-64 code.
fn place_x86_64(code: &[u8], address: u64, req: &Request<'_>) -> Placement {
    let needed: Vec<Register> = req.needed.iter().map(|r| r.full_register()).collect();
    let mut info = InstructionInfoFactory::new();
    let mut sp_delta: u32 = 0;
    // Skip mode: a candidate seen before the stack check is only good if there is no check.
    let mut in_prologue = req.skip_stack_check;
    let mut prologue_candidate = None;
    // Skip mode: the first instruction after the check, used if nothing emulated follows.
    let mut after_check = None;
    let mut prev: Option<Instruction> = None;

    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    for _ in 0..MAX_INSTRUCTIONS {
        if !decoder.can_decode() {
            break;
        }
        let instr = decoder.decode();
        if instr.is_invalid() {
            break;
        }
        let offset = instr.ip().wrapping_sub(address);
        let bytes = &code[offset as usize..][..instr.len()];
        if is_emulated(&instr, bytes) {
            let here = Placement {
                offset_in_function: offset,
                sp_delta,
                emulated: true,
            };
            if !in_prologue {
                return here;
            }
            prologue_candidate.get_or_insert(here);
        }

        // Effects of this instruction on what may follow it.
        if instr.flow_control() != FlowControl::Next {
            if in_prologue && is_stack_check(prev.as_ref(), &instr) {
                in_prologue = false;
                prologue_candidate = None;
                after_check = Some(Placement {
                    offset_in_function: instr.next_ip().wrapping_sub(address),
                    sp_delta,
                    emulated: false,
                });
                prev = Some(instr);
                continue;
            }
            break;
        }
        if writes_any(&mut info, &instr, &needed) {
            break;
        }
        match sp_effect(&mut info, &instr) {
            SpEffect::None => {}
            SpEffect::Down(_) if req.with_return => break,
            SpEffect::Down(d) => match sp_delta.checked_add_signed(d) {
                Some(v) if v <= MAX_SP_DELTA => sp_delta = v,
                _ => break,
            },
            SpEffect::Unknown => break,
        }
        prev = Some(instr);
    }

    if in_prologue && let Some(p) = prologue_candidate {
        return p;
    }
    if let Some(p) = after_check.filter(|p| p.offset_in_function < code.len() as u64) {
        return p;
    }
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let first = decoder.decode();
    Placement {
        offset_in_function: 0,
        sp_delta: 0,
        emulated: !first.is_invalid() && is_emulated(&first, &code[..first.len()]),
    }
}

/// Whether the kernel emulates `instr` (whose encoding is `bytes`) at a probe site.
pub fn is_emulated(instr: &Instruction, bytes: &[u8]) -> bool {
    if instr.code() == Code::Push_r64 {
        // push_setup_xol_ops: `50+r`, or `41 50+r` for r8–r15; any other prefix single-steps.
        return bytes.len() == 1 || (bytes.len() == 2 && bytes[0] == 0x41);
    }
    if instr.is_jmp_short_or_near() || instr.is_jcc_short_or_near() || instr.is_call_near() {
        // branch_setup_xol_ops rejects branches with an operand-size prefix (the probe would
        // not even register).
        let mut prefixes = bytes.iter().take_while(|b| is_legacy_prefix(**b));
        return !prefixes.any(|&b| b == 0x66);
    }
    instr.mnemonic() == Mnemonic::Nop
}

fn is_legacy_prefix(b: u8) -> bool {
    matches!(
        b,
        0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3
    ) || (0x40..=0x4f).contains(&b)
}

/// Go's stack-bound check: `jbe`/`jna` right after a `cmp` with the goroutine's stack guard
/// (`[g + 0x10]`; g is R14 since Go 1.17, loaded from TLS before).
fn is_stack_check(prev: Option<&Instruction>, instr: &Instruction) -> bool {
    let Some(cmp) = prev else { return false };
    matches!(instr.code(), Code::Jbe_rel8_64 | Code::Jbe_rel32_64)
        && cmp.mnemonic() == Mnemonic::Cmp
        && (0..cmp.op_count()).any(|i| cmp.op_kind(i) == OpKind::Memory)
        && !matches!(cmp.memory_base(), Register::None | Register::RIP)
        && cmp.memory_displacement64() == 0x10
}

fn writes_any(info: &mut InstructionInfoFactory, instr: &Instruction, regs: &[Register]) -> bool {
    info.info(instr).used_registers().iter().any(|u| {
        matches!(
            u.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        ) && regs.contains(&u.register().full_register())
    })
}

enum SpEffect {
    None,
    /// RSP moves down by this many bytes (negative: up).
    Down(i32),
    Unknown,
}

fn sp_effect(info: &mut InstructionInfoFactory, instr: &Instruction) -> SpEffect {
    let rsp_imm = |i: &Instruction| {
        i.op_count() == 2
            && i.op0_kind() == OpKind::Register
            && i.op0_register() == Register::RSP
            && matches!(
                i.op1_kind(),
                OpKind::Immediate8to64 | OpKind::Immediate32to64
            )
    };
    match instr.mnemonic() {
        Mnemonic::Push | Mnemonic::Pushfq | Mnemonic::Pop | Mnemonic::Popfq => {
            return SpEffect::Down(-instr.stack_pointer_increment());
        }
        Mnemonic::Sub | Mnemonic::Add if rsp_imm(instr) => {
            let imm = instr.immediate(1) as i64;
            let down = if instr.mnemonic() == Mnemonic::Sub {
                imm
            } else {
                -imm
            };
            return i32::try_from(down).map_or(SpEffect::Unknown, SpEffect::Down);
        }
        _ => {}
    }
    if writes_any(info, instr, &[Register::RSP]) {
        SpEffect::Unknown
    } else {
        SpEffect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x98930;

    fn libc_place(code: &[u8], with_return: bool) -> Placement {
        place_x86_64(code, BASE, &Request::libc(with_return))
    }

    const fn at(offset_in_function: u64, sp_delta: u32, emulated: bool) -> Placement {
        Placement {
            offset_in_function,
            sp_delta,
            emulated,
        }
    }

    /// Entry bytes of Debian 12's glibc 2.36 (`/lib/x86_64-linux-gnu/libc.so.6`, objdump):
    /// (symbol, bytes, needs a return probe, expected placement).
    pub(super) const DEBIAN_GLIBC: &[(&str, &[u8], bool, Placement)] = &[
        // push %r12; push %rbp; push %rbx; mov %rdi,%rbx; sub $0x10,%rsp
        (
            "malloc",
            &[
                0x41, 0x54, 0x55, 0x53, 0x48, 0x89, 0xfb, 0x48, 0x83, 0xec, 0x10, 0x80, 0x3d, 0x46,
                0x1b, 0x14, 0x00, 0x00, 0x0f, 0x84, 0xf8, 0x01, 0x00, 0x00,
            ],
            true,
            at(0, 0, true),
        ),
        // test %rdi,%rdi; je …; push %rbp
        (
            "free",
            &[
                0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55, 0x48, 0x8d, 0x77, 0xf0,
            ],
            false,
            at(3, 0, true),
        ),
        // cmpb $0x0,…(%rip); push %r12; mov %rdx,%r12; push %rbp; …; je …
        (
            "posix_memalign",
            &[
                0x80, 0x3d, 0x01, 0x02, 0x14, 0x00, 0x00, 0x41, 0x54, 0x49, 0x89, 0xd4, 0x55, 0x48,
                0x89, 0xfd, 0x53, 0x48, 0x89, 0xf3, 0x74, 0x5a,
            ],
            true,
            at(7, 0, true),
        ),
        // cmpb $0x0,…(%rip); je …; jmp …
        (
            "memalign",
            &[
                0x80, 0x3d, 0x71, 0x0e, 0x14, 0x00, 0x00, 0x74, 0x07, 0xe9, 0x32, 0xf6, 0xff, 0xff,
            ],
            true,
            at(7, 0, true),
        ),
        (
            "aligned_alloc",
            &[
                0x80, 0x3d, 0x71, 0x0e, 0x14, 0x00, 0x00, 0x74, 0x07, 0xe9, 0x32, 0xf6, 0xff, 0xff,
            ],
            true,
            at(7, 0, true),
        ),
        // cmpb $0x0,…(%rip); push %rbx; mov %rdi,%rbx; je …
        (
            "valloc",
            &[
                0x80, 0x3d, 0x31, 0x0e, 0x14, 0x00, 0x00, 0x53, 0x48, 0x89, 0xfb, 0x74, 0x1b,
            ],
            true,
            at(7, 0, true),
        ),
        (
            "pvalloc",
            &[
                0x80, 0x3d, 0x01, 0x0e, 0x14, 0x00, 0x00, 0x53, 0x48, 0x89, 0xfb, 0x74, 0x2b,
            ],
            true,
            at(7, 0, true),
        ),
        // mov %rsi,%rax; mul %rdx (clobbers RDX, an argument); mov %rax,%rsi; jo …
        (
            "reallocarray",
            &[
                0x48, 0x89, 0xf0, 0x48, 0xf7, 0xe2, 0x48, 0x89, 0xc6, 0x70, 0x05, 0xe9, 0x40, 0xb8,
                0xf8, 0xff,
            ],
            true,
            at(0, 0, false),
        ),
        // push %r13; mov %rdi,%rax; …
        (
            "calloc",
            &[0x41, 0x55, 0x48, 0x89, 0xf8, 0x41, 0x54],
            true,
            at(0, 0, true),
        ),
        // push %r15; push %r14; …
        (
            "realloc",
            &[0x41, 0x57, 0x41, 0x56, 0x41, 0x55],
            true,
            at(0, 0, true),
        ),
    ];

    #[test]
    fn debian_glibc_shapes() {
        for (name, code, with_return, want) in DEBIAN_GLIBC {
            assert_eq!(libc_place(code, *with_return), *want, "{name}");
        }
    }

    #[test]
    fn stack_moves_before_the_site() {
        // sub $0x28,%rsp; test %rdi,%rdi; je …
        let code = [0x48, 0x83, 0xec, 0x28, 0x48, 0x85, 0xff, 0x74, 0x02];
        assert_eq!(libc_place(&code, false), at(7, 0x28, true));
        // A uretprobe needs RSP untouched: back to the entry.
        assert_eq!(libc_place(&code, true), at(0, 0, false));

        // `push` with REX.W is single-stepped (only `41` is emulated), and counts 8.
        let code = [0x48, 0x55, 0x48, 0x85, 0xff, 0x74, 0x02];
        assert_eq!(libc_place(&code, false), at(5, 8, true));

        // memalign's slow path: sub $0x18,%rsp; mov %rsi,8(%rsp); mov %rdi,(%rsp); call …
        let code = [
            0x48, 0x83, 0xec, 0x18, 0x48, 0x89, 0x74, 0x24, 0x08, 0x48, 0x89, 0x3c, 0x24, 0xe8,
            0xbe, 0xbc, 0xff, 0xff,
        ];
        assert_eq!(libc_place(&code, false), at(13, 0x18, true));

        // mov %rbp,%rsp / and $-16,%rsp: unknown movement, give up.
        for code in [
            &[0x48, 0x89, 0xec, 0x74, 0x02][..],
            &[0x48, 0x83, 0xe4, 0xf0, 0x74, 0x02],
        ] {
            assert_eq!(libc_place(code, false), at(0, 0, false));
        }
        // Too far for the one-byte cookie: sub $0x1000,%rsp
        let code = [0x48, 0x81, 0xec, 0x00, 0x10, 0x00, 0x00, 0x74, 0x02];
        assert_eq!(libc_place(&code, false), at(0, 0, false));
    }

    #[test]
    fn argument_writes_stop_the_scan() {
        // xor %edx,%edx (32-bit write of RDX); je …
        assert_eq!(
            libc_place(&[0x31, 0xd2, 0x74, 0x00], false),
            at(0, 0, false)
        );
        // mov $1,%sil (8-bit write of RSI); je …
        assert_eq!(
            libc_place(&[0x40, 0xb6, 0x01, 0x74, 0x00], false),
            at(0, 0, false)
        );
        // Writing a register the probe does not read is fine: xor %eax,%eax; je …
        assert_eq!(libc_place(&[0x31, 0xc0, 0x74, 0x00], false), at(2, 0, true));
    }

    #[test]
    fn entry_block_ends_at_the_first_branch() {
        // test %rdi,%rdi; jne → (not emulated past it); ret first: nothing to gain.
        assert_eq!(libc_place(&[0xc3], false), at(0, 0, false));
        // test; mov (%rdi),%rax; jmp *%rax (indirect: single-stepped, ends the block); push
        let code = [0x48, 0x85, 0xff, 0x48, 0x8b, 0x07, 0xff, 0xe0, 0x55];
        assert_eq!(libc_place(&code, false), at(0, 0, false));
        // endbr64; push %rbp
        assert_eq!(
            libc_place(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55], true),
            at(4, 0, true)
        );
        // nops are emulated: test; nopl 0(%rax,%rax,1); xchg %ax,%ax
        assert_eq!(
            libc_place(&[0x48, 0x85, 0xff, 0x0f, 0x1f, 0x44, 0x00, 0x00], false),
            at(3, 0, true)
        );
        assert_eq!(
            libc_place(&[0x48, 0x85, 0xff, 0x66, 0x90], false),
            at(3, 0, true)
        );
        // A 0x66-prefixed branch is rejected by the kernel: not a site.
        let code = [0x48, 0x85, 0xff, 0x66, 0xe9, 0x00, 0x00, 0x00, 0x00];
        assert_eq!(libc_place(&code, false), at(0, 0, false));
        // Empty or undecodable code: offset 0.
        assert_eq!(libc_place(&[], false), at(0, 0, false));
        assert_eq!(libc_place(&[0x0f], false), at(0, 0, false));
    }

    /// Go ABIInternal argument registers (DESIGN.md §3).
    const GO_ARGS: [Register; 3] = [Register::RAX, Register::RBX, Register::RCX];

    fn go_place(code: &[u8]) -> Placement {
        let req = Request {
            needed: &GO_ARGS,
            with_return: false,
            skip_stack_check: true,
        };
        place_x86_64(code, 0x4a0000, &req)
    }

    #[test]
    fn go_stack_check() {
        // cmp 0x10(%r14),%rsp; jbe …; push %rbp; mov %rsp,%rbp; sub $0x30,%rsp
        let small = [
            0x49, 0x3b, 0x66, 0x10, 0x76, 0x3a, 0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x30,
        ];
        assert_eq!(go_place(&small), at(6, 0, true));
        // Without skip_stack_check the jbe itself is chosen (it runs twice on stack growth).
        assert_eq!(
            place_x86_64(
                &small,
                0,
                &Request {
                    needed: &GO_ARGS,
                    with_return: false,
                    skip_stack_check: false
                }
            ),
            at(4, 0, true)
        );
        // Near jbe (rel32).
        let near = [
            0x49, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0x10, 0x01, 0x00, 0x00, 0x55, 0x48, 0x89, 0xe5,
        ];
        assert_eq!(go_place(&near), at(10, 0, true));
        // Large frame: lea -0x38(%rsp),%r12; cmp 0x10(%r14),%r12; jbe …; push %rbp
        let large = [
            0x4c, 0x8d, 0x64, 0x24, 0xc8, 0x4d, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0x10, 0x01, 0x00,
            0x00, 0x55,
        ];
        assert_eq!(go_place(&large), at(15, 0, true));
        // No emulated instruction after the check: the first one after it (runs once).
        let plain = [
            0x49, 0x3b, 0x66, 0x10, 0x76, 0x3a, 0x48, 0x83, 0xec, 0x18, 0xc3,
        ];
        assert_eq!(go_place(&plain), at(6, 0, false));
        // A nosplit function (no check): placed as usual.
        assert_eq!(go_place(&[0x55, 0x48, 0x89, 0xe5]), at(0, 0, true));
        // No check and a first branch: the branch is fine (reached once).
        assert_eq!(go_place(&[0x48, 0x85, 0xc0, 0x74, 0x02]), at(3, 0, true));
    }

    #[test]
    fn arbitrary_bytes_do_not_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20_000 {
            let len = (next() % 48) as usize;
            let code: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let address = if round % 2 == 0 { next() } else { u64::MAX - 8 };
            for with_return in [false, true] {
                for skip_stack_check in [false, true] {
                    let req = Request {
                        needed: &LIBC_ARG_REGS,
                        with_return,
                        skip_stack_check,
                    };
                    let p = place_x86_64(&code, address, &req);
                    assert!(
                        p.offset_in_function == 0 || (p.offset_in_function as usize) < code.len()
                    );
                    assert!(p.sp_delta <= MAX_SP_DELTA);
                    assert!(!with_return || p.sp_delta == 0);
                }
            }
        }
    }

    #[test]
    fn real_libc() {
        let path = crate::target::elf::tests::own_libc().expect("the test binary maps a libc.so");
        let f = crate::target::elf::ElfFile::open(&path).unwrap();
        let mut same_build = 0;
        for (name, known, with_return, want) in DEBIAN_GLIBC {
            let Some(sym) = f.symbol(name) else { continue };
            let code = f.function_code(sym, 256).unwrap();
            let got = libc_place(&code, *with_return);
            assert!(got.offset_in_function < code.len() as u64, "{name}");
            if *with_return {
                assert_eq!(got.sp_delta, 0, "{name}");
            }
            if code.starts_with(known) {
                same_build += 1;
                assert_eq!(got, *want, "{name} in {}", path.display());
            }
        }
        crate::say!(
            "{}: {same_build}/{} functions are the recorded Debian build",
            path.display(),
            DEBIAN_GLIBC.len()
        );
    }
}
