//! Count mode's view of a libc file: which allocator functions may tail-jump into which
//! (x86 disassembly of each function; PLT stubs resolved through the GOT's dynamic
//! relocations), and the file ranges of those functions, so that the probe can tell libc's own
//! relays from the program's calls without a return probe.

use std::path::Path;

use allocwatch_common::libc::{API_COUNT, Api, LIBC_FILE_RANGES};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind};

use super::{
    ProbePoint,
    elf::{Arch, ElfFile},
};

/// Every API may relay to every other: what count mode assumes without the code.
pub const ALL_APIS: u64 = (1 << API_COUNT) - 1;

/// The relays between the API functions of one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relays {
    /// Per API id: the APIs its function may tail-jump into (bit = API id).
    pub masks: [u64; API_COUNT],
    /// File ranges of the API functions (sorted, distinct), when the probe can use them: one
    /// bias for all (one text segment), 32-bit offsets, few enough for its map entry.
    pub ranges: Option<Vec<[u32; 2]>>,
}

impl Relays {
    /// Without the code: every API may relay to every other.
    pub fn unknown() -> Self {
        Self {
            masks: std::array::from_fn(|api| ALL_APIS & !(1 << api)),
            ranges: None,
        }
    }

    /// The APIs some function may tail-jump into.
    pub fn targets(&self) -> u64 {
        self.masks.iter().fold(0, |acc, m| acc | m)
    }

    /// Disassembles the API functions of `elf` (whose probes are `points`).
    pub fn of(elf: &ElfFile, points: &[ProbePoint]) -> Self {
        let mut relays = Self::unknown();
        let got = got_slots(elf.path());
        // Entry address → the API its probe reports (the canonical one of an alias group).
        let mut entries: Vec<(u64, Api)> = Vec::new();
        let mut syms = Vec::new();
        // The C++ operators only where they are probed: a static program's libstdc++ `new`
        // calls `malloc`, and taking its range for a relay would hide those calls.
        let cxx = points.iter().any(|p| p.api.is_cxx());
        // A prefixed build's names (`_rjem_malloc`, `mi_free`): the functions its probes are on.
        let prefix = super::libc::prefix_of(elf).unwrap_or_default();
        for api in Api::ALL.into_iter().filter(|a| cxx || !a.is_cxx()) {
            let Some(sym) = elf.symbol(&super::libc::symbol_in(prefix, api)) else {
                continue;
            };
            if !entries.iter().any(|&(a, _)| a == sym.address) {
                entries.push((sym.address, api));
            }
            syms.push((api, sym));
        }
        // A C++ operator or allocator entry point the file does not define (or that is not
        // probed) has no function to relay from: the libc APIs keep what they had.
        for api in Api::ALL.into_iter().filter(|a| !a.is_libc()) {
            if !syms.iter().any(|(a, _)| *a == api) {
                relays.masks[api as usize] = 0;
            }
        }
        let jumps = TailJumps::new(elf, &entries, got.as_deref());
        let mut ranges = Vec::new();
        let mut bias = None;
        let mut consistent = true;
        for &(api, sym) in &syms {
            let code = elf.function_code(sym, sym.size).unwrap_or_default();
            // Tail jumps are decoded in x86-64 code only: an arm64 file keeps "any API may
            // relay to any other" (rule 1, the ranges, still applies).
            if elf.arch() == Arch::X86_64 && sym.size > 0 && code.len() as u64 == sym.size {
                // A jump back to its own entry is a loop, not a relay.
                relays.masks[api as usize] =
                    jumps.targets(&code, sym.address, 0) & !(1u64 << api as u32);
            }
            let Some(start) = elf.vaddr_to_file_offset(sym.address) else {
                consistent = false;
                continue;
            };
            // The probe turns return addresses into file offsets with one bias: every range
            // must share it (one text segment), and fit the map's 32-bit offsets.
            let b = sym.address.wrapping_sub(start);
            consistent &= *bias.get_or_insert(b) == b;
            match (u32::try_from(start), u32::try_from(start + sym.size)) {
                (Ok(s), Ok(e)) if sym.size > 0 => ranges.push([s, e]),
                _ => consistent = false,
            }
        }
        ranges.sort();
        ranges.dedup();
        consistent &= ranges.len() <= LIBC_FILE_RANGES
            && points.iter().all(|p| u32::try_from(p.file_offset).is_ok());
        relays.ranges = consistent.then_some(ranges);
        for (api, mask) in Api::ALL.iter().zip(relays.masks) {
            if mask != 0 && syms.iter().any(|(a, _)| a == api) {
                log::debug!(
                    "count mode: {} may tail-jump into {mask:#05x}",
                    api.symbol()
                );
            }
        }
        relays
    }
}

/// How deep [`TailJumps::targets`] follows tail jumps through functions that are not APIs.
const MAX_HOPS: u32 = 3;

/// What the tail jumps of a file's functions reach.
struct TailJumps<'a> {
    elf: &'a ElfFile,
    /// Entry address → the API its probe reports.
    entries: &'a [(u64, Api)],
    /// GOT slot → the address of the symbol bound to it ([`got_slots`]); `None`: unknown.
    got: Option<&'a [(u64, u64)]>,
    /// Entry address → size of every sized symbol (the functions a jump may enter).
    functions: std::collections::HashMap<u64, u64>,
}

impl<'a> TailJumps<'a> {
    fn new(elf: &'a ElfFile, entries: &'a [(u64, Api)], got: Option<&'a [(u64, u64)]>) -> Self {
        Self {
            elf,
            entries,
            got,
            functions: elf
                .symbols()
                .filter(|(_, s)| s.size > 0)
                .map(|(_, s)| (s.address, s.size))
                .collect(),
        }
    }

    /// The APIs a function (its whole `code`, loaded at `start`) may tail-jump into: a jump
    /// to an API's entry, or to a PLT stub whose GOT slot is bound to one, names that API; a
    /// jump to another function of the file names what that one's tail jumps reach, `hops`
    /// deep at most (mimalloc's sized aligned delete jumps through the PLT into
    /// `mi_free_size_aligned`, which jumps into the sized delete, which jumps into `free`:
    /// each re-enters with the outer call's frame); an indirect jump, or any stub when the
    /// relocations are unknown, may reach any of them.
    fn targets(&self, code: &[u8], start: u64, hops: u32) -> u64 {
        let end = start + code.len() as u64;
        let mut mask = 0;
        let mut decoder = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
        while decoder.can_decode() {
            let instr = decoder.decode();
            match instr.flow_control() {
                FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                    let target = instr.near_branch_target();
                    if (start..end).contains(&target) {
                        continue;
                    }
                    let target = match jump_stub_slot(self.elf, target) {
                        None => target,
                        Some(slot) => match self.got {
                            None => {
                                mask |= ALL_APIS;
                                continue;
                            }
                            Some(got) => match got.iter().find(|&&(s, _)| s == slot) {
                                Some(&(_, addr)) => addr,
                                // Bound to another file: not a relay inside this one.
                                None => continue,
                            },
                        },
                    };
                    mask |= self.reached(target, hops);
                }
                FlowControl::IndirectBranch => mask |= ALL_APIS,
                _ => {}
            }
        }
        mask
    }

    /// The APIs a tail jump to `addr` reaches: the API entered there, or what the function
    /// there reaches in turn.
    fn reached(&self, addr: u64, hops: u32) -> u64 {
        if let Some(&(_, api)) = self.entries.iter().find(|&&(a, _)| a == addr) {
            return 1u64 << api as u32;
        }
        let Some(&size) = self.functions.get(&addr) else {
            return 0;
        };
        if hops >= MAX_HOPS {
            return 0;
        }
        match self.elf.read_at_vaddr(addr, size) {
            Ok(code) if code.len() as u64 == size => self.targets(&code, addr, hops + 1),
            _ => 0,
        }
    }
}

/// The GOT slot a stub at `vaddr` jumps through, when it starts (after an optional `endbr64`)
/// with `jmp [rip + disp]`, as PLT entries do.
fn jump_stub_slot(elf: &ElfFile, vaddr: u64) -> Option<u64> {
    let code = elf.read_at_vaddr(vaddr, 16).ok()?;
    let mut decoder = Decoder::with_ip(64, &code, vaddr, DecoderOptions::NONE);
    let mut instr = decoder.decode();
    if instr.mnemonic() == Mnemonic::Endbr64 {
        instr = decoder.decode();
    }
    (instr.flow_control() == FlowControl::IndirectBranch
        && instr.op0_kind() == OpKind::Memory
        && instr.is_ip_rel_memory_operand())
    .then(|| instr.ip_rel_memory_address())
}

/// Every GOT slot bound by a dynamic relocation to a symbol the file defines: (slot, the
/// symbol's address). `None` when the file or its relocations cannot be read.
fn got_slots(path: &Path) -> Option<Vec<(u64, u64)>> {
    use object::{Object as _, ObjectSymbol as _, ObjectSymbolTable as _, RelocationTarget};
    let data = std::fs::read(path).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let symbols = file.dynamic_symbol_table()?;
    let relocations = file.dynamic_relocations()?;
    Some(
        relocations
            .filter_map(|(slot, rel)| match rel.target() {
                RelocationTarget::Symbol(index) => {
                    let sym = symbols.symbol_by_index(index).ok()?;
                    (!sym.is_undefined()).then(|| (slot, sym.address()))
                }
                _ => None,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian 12's libmimalloc (`./x setup` installs `libmimalloc-dev`): its sized aligned
    /// delete jumps through the PLT into `mi_free_size_aligned`, a function that is no API,
    /// which jumps into the sized delete; its aligned delete through `mi_free_aligned` into
    /// `free`. Both reach their API through the function in between.
    #[test]
    fn tail_jumps_through_functions_that_are_no_api() {
        let path = "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2.0";
        let elf = ElfFile::open(path).expect("libmimalloc (run ./x setup)");
        let entries: Vec<(u64, Api)> = [Api::Free, Api::DeleteSized, Api::DeleteAligned]
            .into_iter()
            .map(|api| (elf.symbol(api.symbol()).expect("API symbol").address, api))
            .collect();
        let got = got_slots(elf.path());
        let jumps = TailJumps::new(&elf, &entries, got.as_deref());
        let reach = |name: &str, hops: u32| {
            let sym = elf.symbol(name).expect(name);
            let code = elf.function_code(sym, sym.size).expect("code");
            jumps.targets(&code, sym.address, hops)
        };
        let bit = |api: Api| 1u64 << api as u32;
        assert_eq!(reach("_ZdlPvmSt11align_val_t", 0), bit(Api::DeleteSized));
        assert_eq!(reach("_ZdlPvSt11align_val_t", 0), bit(Api::Free));
        assert_eq!(reach("_ZdlPvm", 0), bit(Api::Free));
        // No hop left: the function in between is not followed.
        assert_eq!(reach("_ZdlPvmSt11align_val_t", MAX_HOPS), 0);
    }
}
