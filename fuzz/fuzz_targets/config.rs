//! The agent's TOML config file (config.rs), with the error pointer shown under a bad line.
#![no_main]

use std::path::Path;

use allocwatch::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // config::load reads the file as UTF-8 (read_to_string): other bytes never get here.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse_file(Path::new("fuzz.toml"), text) {
        Ok(mut cfg) => {
            // The web config file it names is the web_config target's input.
            cfg.web_config = None;
            let _ = cfg.validate();
        }
        Err(e) => {
            if let Some(pointer) = e.pointer() {
                // The offending line and a caret line under it.
                assert!(pointer.lines().count() >= 3, "{pointer}");
            }
            let _ = e.to_string();
        }
    }
});
