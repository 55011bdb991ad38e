//! A file's call-frame information as the unwind tables and count mode's relay sites both read
//! it: the `.eh_frame` section with its bases, and the CFA rules a walker can follow.

use allocwatch_common::unwind::kind;
use gimli::{BaseAddresses, CfaRule, EhFrame, LittleEndian, RegisterRule, X86_64};
use object::{Object as _, ObjectSection as _};

/// What [`eh_frame`] gives.
pub type EhFrameOf<'a> = (EhFrame<gimli::EndianSlice<'a, LittleEndian>>, BaseAddresses);

/// A file's `.eh_frame` section (`None` without one) with the bases its pointer encodings
/// refer to.
pub fn eh_frame<'a>(file: &object::File<'a>) -> Option<Result<EhFrameOf<'a>, object::Error>> {
    let section = file.section_by_name(".eh_frame")?;
    Some(section.data().map(|bytes| {
        let mut bases = BaseAddresses::default().set_eh_frame(section.address());
        if let Some(text) = file.section_by_name(".text") {
            bases = bases.set_text(text.address());
        }
        if let Some(got) = file.section_by_name(".got") {
            bases = bases.set_got(got.address());
        }
        let mut eh = EhFrame::new(bytes, LittleEndian);
        eh.set_address_size(8);
        (eh, bases)
    }))
}

/// A row's CFA when a walker can follow it: ([`kind::CFA_RSP`] or [`kind::CFA_RBP`], the
/// offset), with the return address at CFA-8.
pub fn cfa_of(row: &gimli::UnwindTableRow<usize>) -> Option<(u8, u16)> {
    if row.register(X86_64::RA) != Some(RegisterRule::Offset(-8)) {
        return None;
    }
    match *row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let off = u16::try_from(offset).ok()?;
            match register {
                X86_64::RSP => Some((kind::CFA_RSP, off)),
                X86_64::RBP => Some((kind::CFA_RBP, off)),
                _ => None,
            }
        }
        CfaRule::Expression(_) => None,
    }
}
