//! allocwatch: which call sites allocate, leak and grow memory. Wiring only.

mod symbolize;
mod target;

fn main() {
    let mut ebpf = aya::Ebpf::load(aya::include_bytes_aligned!(concat!(
        env!("OUT_DIR"),
        "/allocwatch"
    )))
    .unwrap();
    for name in ["libc_entry", "libc_return"] {
        let p: &mut aya::programs::UProbe = ebpf.program_mut(name).unwrap().try_into().unwrap();
        match p.load() {
            Ok(()) => println!("{name} loaded"),
            Err(e) => println!("{name}: {e:?}"),
        }
    }
}
