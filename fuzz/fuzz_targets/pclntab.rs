//! `.gopclntab` contents (gort/pclntab.rs). Input: the text start (8 bytes, little-endian),
//! then the table.
#![no_main]

use std::path::Path;

use allocwatch::gort::pclntab::Pclntab;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((start, table)) = data.split_first_chunk::<8>() else {
        return;
    };
    let text_start = u64::from_le_bytes(*start);
    let Ok(tab) = Pclntab::parse(Path::new("fuzz"), table.to_vec(), text_start) else {
        return;
    };
    let _ = (tab.format(), tab.len(), tab.is_empty(), tab.text_source());
    // Lookups the symbolizer makes: each function's entry and last byte, and a few PCs around.
    for f in tab.functions().take(64) {
        for pc in [f.entry, f.end.saturating_sub(1), f.entry.wrapping_add(1)] {
            if let Some(loc) = tab.lookup(pc) {
                let _ = tab.function_at(pc);
                let _ = loc.line;
            }
        }
        let _ = tab.find_function(f.name);
    }
    let _ = tab.lookup(text_start);
});
