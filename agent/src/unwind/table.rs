//! A file's `.eh_frame` compiled into the walker's rows (`allocwatch_common::unwind`): for each
//! address range, the CFA (rsp or rbp plus an offset), where rbp was saved, and the return
//! address at CFA-8. gimli evaluates the call-frame instructions; this module only keeps the
//! rules the probe follows and marks the others.

use allocwatch_common::unwind::{UnwindRow, kind};
use gimli::{
    BaseAddresses, CfaRule, CieOrFde, EhFrame, LittleEndian, RegisterRule, UnwindContext,
    UnwindSection as _, X86_64,
};
use object::{Object as _, ObjectSection as _};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TableError {
    #[error("not an ELF file: {0}")]
    Elf(#[from] object::Error),
    #[error("no .eh_frame section")]
    NoEhFrame,
    #[error("malformed .eh_frame: {0}")]
    Cfi(#[from] gimli::Error),
}

/// The rule of one address range, as one FDE row says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rule {
    kind: u8,
    cfa_off: u16,
    rbp_words: i8,
}

const GAP: Rule = Rule {
    kind: kind::GAP,
    cfa_off: 0,
    rbp_words: 0,
};

/// What the walker can follow of a row: CFA = rsp/rbp + offset, rbp unchanged or saved at a
/// multiple of 8 from the CFA, return address at CFA-8 (or undefined: the outermost frame).
fn rule(row: &gimli::UnwindTableRow<usize>) -> Rule {
    let unsupported = Rule {
        kind: kind::UNSUPPORTED,
        ..GAP
    };
    match row.register(X86_64::RA) {
        Some(RegisterRule::Offset(-8)) => {}
        Some(RegisterRule::Undefined) => {
            return Rule {
                kind: kind::END,
                ..GAP
            };
        }
        _ => return unsupported,
    }
    let (kind, cfa_off) = match *row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let Ok(off) = u16::try_from(offset) else {
                return unsupported;
            };
            match register {
                X86_64::RSP => (kind::CFA_RSP, off),
                X86_64::RBP => (kind::CFA_RBP, off),
                _ => return unsupported,
            }
        }
        CfaRule::Expression(_) => return unsupported,
    };
    let rbp_words = match row.register(X86_64::RBP) {
        None | Some(RegisterRule::Undefined | RegisterRule::SameValue) => 0,
        Some(RegisterRule::Offset(off)) if off % 8 == 0 && off != 0 => {
            match i8::try_from(off / 8) {
                Ok(w) => w,
                Err(_) => return unsupported,
            }
        }
        Some(_) => return unsupported,
    };
    Rule {
        kind,
        cfa_off,
        rbp_words,
    }
}

/// Compiles the `.eh_frame` of the ELF file `data` into rows sorted by address: each row holds
/// from its `pc` to the next row's; after a function's last byte, a `GAP` row (walked with the
/// frame pointer) until the next function with call-frame information. Addresses past 4 GiB
/// (not in any ordinary file) are left out.
pub fn compile(data: &[u8]) -> Result<Vec<UnwindRow>, TableError> {
    let file = object::File::parse(data)?;
    let section = file
        .section_by_name(".eh_frame")
        .ok_or(TableError::NoEhFrame)?;
    let bytes = section.data()?;
    let mut bases = BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = file.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(got) = file.section_by_name(".got") {
        bases = bases.set_got(got.address());
    }
    let mut eh = EhFrame::new(bytes, LittleEndian);
    eh.set_address_size(8);
    let mut ctx = Box::new(UnwindContext::new());
    let mut ranges: Vec<(u64, u64, Rule)> = Vec::new();
    let mut entries = eh.entries(&bases);
    while let Some(entry) = entries.next()? {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let fde = partial.parse(|s, b, o| s.cie_from_offset(b, o))?;
        let mut table = fde.rows(&eh, &bases, &mut ctx)?;
        while let Some(row) = table.next_row()? {
            if row.start_address() < row.end_address() {
                ranges.push((row.start_address(), row.end_address(), rule(row)));
            }
        }
    }
    Ok(rows_of(ranges))
}

/// The sorted rows of (start, end, rule) ranges: consecutive equal rules merged, a `GAP` row
/// where no range covers the addresses after one.
fn rows_of(mut ranges: Vec<(u64, u64, Rule)>) -> Vec<UnwindRow> {
    ranges.sort_by_key(|r| r.0);
    let mut rows: Vec<UnwindRow> = Vec::with_capacity(ranges.len() + ranges.len() / 4);
    let mut covered_to = 0u64;
    let push = |rows: &mut Vec<UnwindRow>, pc: u64, r: Rule| {
        let Ok(pc) = u32::try_from(pc) else {
            return;
        };
        let row = UnwindRow {
            pc,
            cfa_off: r.cfa_off,
            kind: r.kind,
            rbp_words: r.rbp_words,
        };
        match rows.last_mut() {
            Some(last) if last.pc == pc => *last = row,
            Some(last)
                if (last.kind, last.cfa_off, last.rbp_words)
                    == (row.kind, row.cfa_off, row.rbp_words) => {}
            _ => rows.push(row),
        }
    };
    for (start, end, r) in ranges {
        if !rows.is_empty() && covered_to < start {
            push(&mut rows, covered_to, GAP);
        }
        push(&mut rows, start, r);
        covered_to = covered_to.max(end);
    }
    if !rows.is_empty() {
        push(&mut rows, covered_to, GAP);
    }
    rows
}

/// The row that holds for `pc` (the last one at or before it), as the probe looks it up.
pub fn lookup(rows: &[UnwindRow], pc: u64) -> Option<&UnwindRow> {
    let i = rows.partition_point(|r| u64::from(r.pc) <= pc);
    i.checked_sub(1).map(|i| &rows[i])
}

#[cfg(test)]
mod tests;
