//! `/proc/<pid>/maps` lines and files (target/maps.rs).
#![no_main]

use std::path::Path;

use allocwatch::target::maps::{parse_line, parse_maps};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // read_maps takes the file's bytes lossily, as here.
    let text = String::from_utf8_lossy(data);
    let whole = parse_maps(&text, Path::new("/proc/1/maps"));
    let lines: Vec<_> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(parse_line)
        .collect();
    // The file parses exactly when every non-empty line does, into the same entries.
    match whole {
        Ok(entries) => {
            let each: Vec<_> = lines.into_iter().map(Option::unwrap).collect();
            assert_eq!(entries, each);
            for e in &entries {
                let _ = (e.is_file(), e.map_files_name());
            }
        }
        Err(_) => assert!(lines.iter().any(Option::is_none)),
    }
});
