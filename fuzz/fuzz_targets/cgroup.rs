//! `/proc/<pid>/cgroup` files and cgroup paths (k8s/cgroup.rs).
#![no_main]

use allocwatch::k8s::cgroup::{parse, parse_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for r in [parse(&text), parse_path(&text)] {
        // What the parser returns is what labels and API lookups use: a container id is 64
        // lower-case hex digits.
        if let Some(id) = &r.container_id {
            assert_eq!(id.len(), 64);
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            );
        }
        let _ = r.is_empty();
    }
});
