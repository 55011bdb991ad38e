//! Ring-buffer records as the agent decodes them (`Event::try_from` in common/src/libc.rs).
#![no_main]

use allocwatch_common::Event;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Event::NewSite(_, _, stack)) = Event::try_from(data) {
        assert!(stack.len() <= allocwatch_common::MAX_STACK_DEPTH);
    }
});
