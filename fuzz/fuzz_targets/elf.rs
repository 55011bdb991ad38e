//! Executables and libraries as the libc side reads them (target/elf.rs, target/libc.rs):
//! headers, symbol tables, the dynamic section, and the entry blocks the probes are placed in.
#![no_main]

use allocwatch::target::{
    elf,
    libc::{Allocator, probe_points},
};
use allocwatch_fuzz::scratch_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = scratch_file("elf", data);
    let _ = elf::is_native_elf(&path);
    let _ = elf::dynamic_info(&path);
    let Ok(file) = elf::ElfFile::open(&path) else {
        return;
    };
    let _ = (file.interpreter(), file.is_dynamic(), file.dynamic());
    // Symbols, their code and the placement of every probe of the malloc family.
    let _ = probe_points(&file, "", true);
    let _ = probe_points(&file, "je_", false);
    let _ = Allocator::of(&file, "libc.so.6");
    if let Some(sym) = file.symbol("malloc") {
        let _ = file.vaddr_to_file_offset(sym.address);
        let _ = file.function_code(sym, 64);
    }
});
