use which::which;

/// Rebuild the probe when bpf-linker changes (a new LLVM changes the object). Same as
/// aya-template. Also declares `bpf_target_arch` (the registers `arch.rs` reads): aya-build
/// passes it when the agent's build script builds the probe; a plain `cargo clippy` of this
/// crate gets the host's arch, or `AYA_BPF_TARGET_ARCH`'s.
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not on PATH: run ./x setup");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
    aya_build::emit_bpf_target_arch_cfg().expect("bpf_target_arch cfg");
}
