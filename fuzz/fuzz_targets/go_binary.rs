//! Go binaries (gort/, target/go.rs): `.go.buildinfo`, `.gopclntab` found through the ELF
//! tables, and the probe list built from them.
#![no_main]

use allocwatch::{
    gort::{buildinfo, pclntab::Pclntab},
    target::go::{GoProbeSet, for_exe},
};
use allocwatch_fuzz::scratch_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = scratch_file("go", data);
    if let Ok(Some(info)) = buildinfo::read_build_info(&path) {
        let _ = buildinfo::GoVersion::parse(&info.version);
    }
    if let Ok(Some(tab)) = Pclntab::open(&path) {
        for f in tab.functions().take(16) {
            let _ = tab.lookup(f.entry);
            let _ = tab.function_at(f.end.saturating_sub(1));
        }
    }
    let all = GoProbeSet {
        growth: true,
        malloc: true,
        gc: true,
    };
    let _ = for_exe(&path, all);
});
