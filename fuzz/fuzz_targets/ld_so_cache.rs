//! `/etc/ld.so.cache` (target/libc.rs), read to find the libc a program loads.
#![no_main]

use allocwatch::target::libc::LdCache;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cache) = LdCache::parse(data) {
        let _ = cache.lookup("libc.so.6");
    }
});
