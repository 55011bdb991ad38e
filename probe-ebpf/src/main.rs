//! allocwatch's kernel side: uprobes on the libc allocation API that aggregate per call site in
//! per-CPU maps and track outstanding allocations.
#![no_std]
#![no_main]

mod arch;
mod exec;
mod follow;
mod go;
mod libc;
mod maps;
mod symprobe;
mod unwind;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never called.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
