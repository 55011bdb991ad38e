//! The exporter-toolkit web config file (serve/web_config.rs). Certificates it names are read
//! relative to its directory (the scratch directory here).
#![no_main]

use allocwatch::serve::web_config::WebConfig;
use allocwatch_fuzz::scratch_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A file named by the input is read whole: leave out device and kernel files (/dev/zero
    // never ends), which are not the parser under test, also when spelled with YAML escapes.
    let text = String::from_utf8_lossy(data);
    if ["dev", "proc", "sys", "\\"]
        .iter()
        .any(|d| text.contains(d))
    {
        return;
    }
    let path = scratch_file("web.yml", data);
    if let Ok(web) = WebConfig::load(&path) {
        let _ = web.summary();
    }
});
