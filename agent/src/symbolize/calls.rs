//! Is a return address one? A frame-pointer walk through code built without frame pointers
//! reads whatever the register holds as the next frame, and gives "return addresses" that are
//! data or point into the middle of code. A real one follows a call instruction: decoding the
//! bytes before it (from the mapped file, not the process's memory) tells.

use std::{fs::File, os::unix::fs::FileExt as _};

use iced_x86::{Decoder, DecoderOptions, FlowControl};

/// The longest x86-64 instruction.
const MAX_INSN: usize = 15;

/// Whether the code at file offset `offset` of `file` follows a call instruction. Files that
/// cannot be read there count as yes: nothing is cut on a guess.
pub(super) fn follows_call(file: &File, offset: u64) -> bool {
    if !cfg!(target_arch = "x86_64") {
        return true;
    }
    let start = offset.saturating_sub(MAX_INSN as u64);
    let mut buf = [0u8; MAX_INSN];
    let want = (offset - start) as usize;
    match file.read_at(&mut buf[..want], start) {
        Ok(n) if n == want => ends_with_call(&buf[..want]),
        _ => true,
    }
}

/// Whether `code` ends with a complete call instruction (direct or indirect): some suffix of
/// it decodes as exactly one call.
pub(super) fn ends_with_call(code: &[u8]) -> bool {
    // The shortest call is `ff d0` (call rax).
    (2..=code.len().min(MAX_INSN)).any(|len| {
        let suffix = &code[code.len() - len..];
        let mut decoder = Decoder::new(64, suffix, DecoderOptions::NONE);
        let insn = decoder.decode();
        !insn.is_invalid()
            && insn.len() == len
            && matches!(
                insn.flow_control(),
                FlowControl::Call | FlowControl::IndirectCall
            )
    })
}

#[cfg(test)]
mod tests {
    use super::ends_with_call;

    #[test]
    fn calls_are_recognized() {
        // call rel32
        assert!(ends_with_call(&[0x90, 0xe8, 0x10, 0x00, 0x00, 0x00]));
        // call rax; call r8
        assert!(ends_with_call(&[0x48, 0x89, 0xc7, 0xff, 0xd0]));
        assert!(ends_with_call(&[0x41, 0xff, 0xd0]));
        // call [rip+disp32] (a PLT-less call through the GOT)
        assert!(ends_with_call(&[0xff, 0x15, 0x10, 0x20, 0x00, 0x00]));
        // call [rbx+rax*8+0x10]
        assert!(ends_with_call(&[0xff, 0x54, 0xc3, 0x10]));
        // notrack call rax (CET builds)
        assert!(ends_with_call(&[0x3e, 0xff, 0xd0]));
    }

    #[test]
    fn others_are_not() {
        // ret; int3 padding; a multi-byte nop; a jmp; data
        assert!(!ends_with_call(&[0xc3]));
        assert!(!ends_with_call(&[0xcc; 15]));
        assert!(!ends_with_call(&[
            0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00
        ]));
        assert!(!ends_with_call(&[0xe9, 0x10, 0x00, 0x00, 0x00]));
        assert!(!ends_with_call(&[0x00; 15]));
        assert!(!ends_with_call(&[]));
    }
}
