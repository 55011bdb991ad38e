//! `.gopclntab` contents (gort/pclntab.rs). Input: the text start (8 bytes, little-endian),
//! the offset in the table's bytes of `moduledata.gofunc`, where the inline trees are (4 bytes,
//! little-endian; `0xffffffff`: none, every PC gives one frame), then the table. Go 1.27 keeps
//! the trees inside `.gopclntab`; for older tables the seeds append the bytes from `gofunc` on.
#![no_main]

use std::path::Path;

use allocwatch::gort::pclntab::{GoFunc, Pclntab};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((start, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    let Some((gofunc, table)) = rest.split_first_chunk::<4>() else {
        return;
    };
    let text_start = u64::from_le_bytes(*start);
    let Ok(mut tab) = Pclntab::parse(Path::new("fuzz"), table.to_vec(), text_start) else {
        return;
    };
    let gofunc = u32::from_le_bytes(*gofunc);
    if gofunc != u32::MAX {
        tab.set_gofunc(GoFunc::InTable(gofunc as usize));
    }
    let _ = (
        tab.format(),
        tab.len(),
        tab.is_empty(),
        tab.text_source(),
        tab.inlines(),
    );
    // Lookups the symbolizer makes: each function's entry and last byte, and a few PCs around;
    // inline expansion at PCs spread over each function.
    for f in tab.functions().take(64) {
        for pc in [f.entry, f.end.saturating_sub(1), f.entry.wrapping_add(1)] {
            if let Some(loc) = tab.lookup(pc) {
                let _ = tab.function_at(pc);
                let _ = loc.line;
            }
        }
        let step = (f.end.saturating_sub(f.entry) / 16).max(1);
        let mut pc = f.entry;
        while pc < f.end {
            let _ = tab.frames(pc);
            pc = pc.saturating_add(step);
        }
        let _ = tab.find_function(f.name);
    }
    let _ = tab.lookup(text_start);
    let _ = tab.frames(text_start);
});
