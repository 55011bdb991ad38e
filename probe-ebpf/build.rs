use which::which;

/// Rebuild the probe when bpf-linker changes (a new LLVM changes the object). Same as
/// aya-template.
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not on PATH: run ./x setup");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
