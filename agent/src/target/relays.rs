//! Count mode's view of a libc file: which allocator functions may tail-jump into which
//! (x86 disassembly of each function; PLT stubs resolved through the GOT's dynamic
//! relocations), and the file ranges of those functions, so that the probe can tell libc's own
//! relays from the program's calls without a return probe.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use allocwatch_common::libc::{
    API_COUNT, Api, LIBC_FILE_RANGES, LIBC_FILE_SITES, RELAY_FRAMES, RelaySite, SITE_FP, SITE_SP,
};
use iced_x86::{
    Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, Mnemonic, OpAccess, OpKind,
    Register,
};

use super::{
    ProbePoint,
    elf::{Arch, ElfFile, Symbol},
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
    /// Calls of APIs from functions that an API calls or tail-jumps into ([`RelaySite`]), at
    /// most [`LIBC_FILE_SITES`]; only with `ranges`.
    pub sites: Vec<RelaySite>,
    /// Relay call sites found beyond [`LIBC_FILE_SITES`]: not followed (their calls count
    /// twice), said in a warning.
    pub sites_beyond: usize,
    /// The APIs (bit = API id) some function may tail-jump into through a PLT slot that names
    /// them: a relay into whichever file serves that API in the process (glibc's
    /// `reallocarray` into jemalloc's `realloc`), so every file's probe of them must look.
    pub named: u64,
}

impl Relays {
    /// Without the code: every API may relay to every other.
    pub fn unknown() -> Self {
        Self {
            masks: std::array::from_fn(|api| ALL_APIS & !(1 << api)),
            ranges: None,
            sites: Vec::new(),
            sites_beyond: 0,
            named: 0,
        }
    }

    /// The APIs some function may tail-jump into.
    pub fn targets(&self) -> u64 {
        self.masks.iter().fold(0, |acc, m| acc | m)
    }

    /// Disassembles the API functions of `elf` (whose probes are `points`).
    pub fn of(elf: &ElfFile, points: &[ProbePoint]) -> Self {
        let mut relays = Self::unknown();
        // A prefixed build's names (`_rjem_malloc`, `mi_free`): the functions its probes are on.
        let prefix = super::libc::prefix_of(elf).unwrap_or_default();
        let got = got_slots(elf.path(), prefix);
        // Entry address → the API its probe reports (the canonical one of an alias group).
        let mut entries: Vec<(u64, Api)> = Vec::new();
        let mut syms = Vec::new();
        // The C++ operators only where they are probed: a static program's libstdc++ `new`
        // calls `malloc`, and taking its range for a relay would hide those calls.
        let cxx = points.iter().any(|p| p.api.is_cxx());
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
                let (mask, named) = jumps.targets(&code, sym.address, 0);
                relays.masks[api as usize] = mask & !(1u64 << api as u32);
                relays.named |= named & !(1u64 << api as u32);
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
        if relays.ranges.is_some() && elf.arch() == Arch::X86_64 {
            let bias = bias.unwrap_or_default();
            (relays.sites, relays.sites_beyond) =
                jumps.sites(&syms, points, bias, &mut relays.masks);
            if relays.sites_beyond > 0 {
                log::warn!(
                    "count mode: {} has {} relay call sites, {LIBC_FILE_SITES} followed: calls \
                     of an API from the other {} count twice",
                    elf.path().display(),
                    relays.sites.len() + relays.sites_beyond,
                    relays.sites_beyond
                );
            }
        }
        for (api, mask) in Api::ALL.iter().zip(relays.masks) {
            if mask != 0 && syms.iter().any(|(a, _)| a == api) {
                log::debug!(
                    "count mode: {} may tail-jump into {mask:#05x}",
                    api.symbol()
                );
            }
        }
        if relays.named != 0 {
            log::debug!(
                "count mode: {} jumps through its PLT into {:#05x} wherever served",
                elf.path().display(),
                relays.named
            );
        }
        relays
    }
}

/// How deep [`TailJumps::targets`] follows tail jumps through functions that are not APIs.
const MAX_HOPS: u32 = 3;

/// Calls count mode's relay sites follow from an API function: the API calls (or jumps into) a
/// function in between, which calls another; the probe reads as many return slots up.
/// [`Between::via`] holds the one call between the two.
const MAX_FRAMES: usize = RELAY_FRAMES;
const _: () = assert!(MAX_FRAMES == 2);

/// What the tail jumps of a file's functions reach.
struct TailJumps<'a> {
    elf: &'a ElfFile,
    /// Entry address → the API its probe reports.
    entries: &'a [(u64, Api)],
    /// The GOT's slots bound to symbols ([`got_slots`]); `None`: unknown.
    got: Option<&'a [GotSlot]>,
    /// Entry address → size of every sized symbol (the functions a jump may enter).
    functions: HashMap<u64, u64>,
}

impl<'a> TailJumps<'a> {
    fn new(elf: &'a ElfFile, entries: &'a [(u64, Api)], got: Option<&'a [GotSlot]>) -> Self {
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

    /// The APIs a function (its whole `code`, loaded at `start`) may tail-jump into, and (the
    /// second mask) those of them entered through a PLT slot naming them. A jump to an API's
    /// entry names that API; a jump to a PLT stub whose GOT slot names an API enters it in
    /// whichever file serves it in the process, this one or another (glibc's `reallocarray`
    /// into jemalloc's `realloc`); a jump to another function of the file (directly or
    /// through its slot) names what that one's tail jumps reach, `hops` deep at most
    /// (mimalloc's sized aligned delete jumps through the PLT into `mi_free_size_aligned`,
    /// which jumps into the sized delete, which jumps into `free`: each re-enters with the
    /// outer call's frame); an indirect jump, or any stub when the relocations are unknown,
    /// may reach any of them.
    fn targets(&self, code: &[u8], start: u64, hops: u32) -> (u64, u64) {
        let end = start + code.len() as u64;
        let (mut mask, mut named) = (0, 0);
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
                            Some(got) => match got.iter().find(|s| s.slot == slot) {
                                Some(GotSlot { api: Some(api), .. }) => {
                                    let bit = 1u64 << *api as u32;
                                    mask |= bit;
                                    named |= bit;
                                    continue;
                                }
                                Some(GotSlot {
                                    addr: Some(addr), ..
                                }) => *addr,
                                // Another file's function that is no API: not a relay.
                                _ => continue,
                            },
                        },
                    };
                    let (m, n) = self.reached(target, hops);
                    mask |= m;
                    named |= n;
                }
                FlowControl::IndirectBranch => mask |= ALL_APIS,
                _ => {}
            }
        }
        (mask, named)
    }

    /// The APIs a tail jump to `addr` reaches: the API entered there, or what the function
    /// there reaches in turn (as [`targets`](Self::targets)).
    fn reached(&self, addr: u64, hops: u32) -> (u64, u64) {
        if let Some(&(_, api)) = self.entries.iter().find(|&&(a, _)| a == addr) {
            return (1u64 << api as u32, 0);
        }
        let Some(&size) = self.functions.get(&addr) else {
            return (0, 0);
        };
        if hops >= MAX_HOPS {
            return (0, 0);
        }
        match self.elf.read_at_vaddr(addr, size) {
            Ok(code) if code.len() as u64 == size => self.targets(&code, addr, hops + 1),
            _ => (0, 0),
        }
    }
}

/// How a function that is no API was reached from an API function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Reach {
    /// Called (then maybe tail-jumped on): its return slot holds a return address into the API.
    Called,
    /// Tail-jumped into: its return slot is the API's own entry slot.
    Jumped,
}

impl TailJumps<'_> {
    /// Where a branch to `target` enters: through a PLT stub, the function of this file its
    /// GOT slot is bound to (`None`: another file, or unknown).
    fn resolve(&self, target: u64) -> Option<u64> {
        match jump_stub_slot(self.elf, target) {
            None => Some(target),
            Some(slot) => self.got?.iter().find(|s| s.slot == slot)?.addr,
        }
    }

    /// The direct branches out of the function at `start` (whose code is `code`): (a call,
    /// the instruction's address, its end, where it enters).
    fn branches(&self, code: &[u8], start: u64) -> Vec<Branch> {
        let end = start + code.len() as u64;
        let mut out = Vec::new();
        let mut decoder = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
        while decoder.can_decode() {
            let instr = decoder.decode();
            let call = match instr.flow_control() {
                FlowControl::Call => true,
                FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => false,
                _ => continue,
            };
            if !matches!(
                instr.op0_kind(),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            ) {
                continue;
            }
            let target = instr.near_branch_target();
            if (start..end).contains(&target) {
                continue;
            }
            if let Some(to) = self.resolve(target) {
                out.push((call, instr.ip(), instr.next_ip(), to));
            }
        }
        out
    }

    /// The code of the function at `addr`: its symbol's size, else (`fdes`: a stripped file's
    /// static functions have no symbol) the `.eh_frame` entry that starts there.
    fn code_at(&self, addr: u64, fdes: &[(u64, u64)]) -> Option<Vec<u8>> {
        let size = match self.functions.get(&addr) {
            Some(&size) => size,
            None => {
                let i = fdes.binary_search_by_key(&addr, |f| f.0).ok()?;
                fdes[i].1
            }
        };
        self.elf
            .read_at_vaddr(addr, size)
            .ok()
            .filter(|c| c.len() as u64 == size)
    }

    /// Count mode's [`RelaySite`]s: the direct calls of APIs from functions that are no API
    /// but that an API function reaches by a call or by tail jumps ([`MAX_HOPS`] deep,
    /// through such functions), and, one call further ([`MAX_FRAMES`]), from the functions
    /// those call: then the call of that function is a site too, so that the probe can go up
    /// one more frame (Debian's libmimalloc: `reallocarray` jumps into `mi_reallocarray`,
    /// which calls `mi_reallocn`, whose tail jumps reach a static function that calls
    /// `mi_free`). Each site's return slot of the calling function comes from the file's
    /// call-frame information at the call. An API that tail-jumps into such a function gets
    /// the called API in its relay mask (the probe checks the thread's last entry against
    /// that slot). `bias`: vaddr − file offset of the API functions. Also how many more sites
    /// there are than the file's entry holds ([`keep_site`]).
    fn sites(
        &self,
        syms: &[(Api, Symbol)],
        points: &[ProbePoint],
        bias: u64,
        masks: &mut [u64; API_COUNT],
    ) -> (Vec<RelaySite>, usize) {
        let api_at = |addr: u64| {
            self.entries
                .iter()
                .find(|&&(a, _)| a == addr)
                .map(|&(_, api)| api)
        };
        let data = std::fs::read(self.elf.path()).ok();
        let fdes = data.as_deref().map(fde_extents).unwrap_or_default();
        // The branches of each function decoded once: an API's functions in between are
        // shared with others, and reached from many.
        let mut decoded: HashMap<u64, Option<Vec<Branch>>> = HashMap::new();
        let mut branches_of = |addr: u64| -> Option<Vec<Branch>> {
            decoded
                .entry(addr)
                .or_insert_with(|| {
                    self.code_at(addr, &fdes)
                        .map(|code| self.branches(&code, addr))
                })
                .clone()
        };
        let mut between = self.between(syms, &mut branches_of, &api_at);
        // The entry's room goes to the sites one frame up first: a file's second-frame sites
        // (11 in Debian's libtcmalloc_debug) must not crowd out the first (kept before them).
        between.sort_by_key(|b| b.via.is_some());
        // The site of a call at `ip` (returning to `ret`) of `callee` (`None`: of a function in
        // between, whose site the probe reads one frame up: from the stack pointer only).
        let site_of = |ip: u64, ret: u64, callee: Option<Api>| {
            let (cfa_rbp, cfa_off) = data.as_deref().and_then(|d| cfa_at(d, ip))?;
            // The calling function's return slot is at CFA − 8: at the callee's entry the
            // stack pointer is 8 below the call's (the return address pushed).
            let (kind, frame) = match callee {
                _ if !cfa_rbp => (SITE_SP, cfa_off),
                Some(callee)
                    if !fp_written_before_probe(self.elf, syms, points, callee) && cfa_off >= 8 =>
                {
                    (SITE_FP, cfa_off - 8)
                }
                _ => return None,
            };
            let ret_off = self
                .elf
                .vaddr_to_file_offset(ret)
                .filter(|&o| ret.wrapping_sub(o) == bias)
                .and_then(|o| u32::try_from(o).ok())?;
            Some(RelaySite {
                ret_off,
                frame,
                kind,
                _pad: 0,
            })
        };
        let mut sites: Vec<RelaySite> = Vec::new();
        // Return offsets of the sites found beyond the entry's room.
        let mut beyond: Vec<u32> = Vec::new();
        for b in &between {
            let Some(branches) = branches_of(b.start) else {
                continue;
            };
            for (call, ip, ret, to) in branches {
                let Some(callee) = api_at(to) else {
                    continue;
                };
                // The call of this function one frame up, when it is one ([`Between::via`]):
                // a site too when this one calls the API.
                let (site, up) = match (call, b.via) {
                    (true, None) => (site_of(ip, ret, Some(callee)), None),
                    (true, Some((vip, vret))) => match site_of(vip, vret, None) {
                        Some(up) => (site_of(ip, ret, Some(callee)), Some(up)),
                        None => continue,
                    },
                    // A tail jump into an API from a function called from a function in
                    // between enters it with that call's return address: that call is the
                    // site. One from a function reached from the API itself is rule 1 or 2.
                    (false, Some((vip, vret))) => (site_of(vip, vret, Some(callee)), None),
                    (false, None) => (None, None),
                };
                let Some(site) = site else {
                    continue;
                };
                if up.is_some_and(|u| !keep_site(&mut sites, &mut beyond, u))
                    || !keep_site(&mut sites, &mut beyond, site)
                {
                    continue;
                }
                if b.reach == Reach::Jumped && callee != b.api {
                    masks[b.api as usize] |= 1u64 << callee as u32;
                }
                log::debug!(
                    "count mode: {} reaches a {} of {} at {ret:#x} ({:?}{})",
                    b.api.symbol(),
                    if call { "call" } else { "tail jump" },
                    callee.symbol(),
                    b.reach,
                    b.via
                        .map(|(_, r)| format!(", one frame up from {r:#x}"))
                        .unwrap_or_default()
                );
            }
        }
        (sites, beyond.len())
    }

    /// The functions that are no API but that an API function reaches: by a call or by tail
    /// jumps ([`MAX_HOPS`] deep), and by a call from one of those and its tail jumps
    /// ([`MAX_FRAMES`] calls in all, [`MAX_HOPS`] jumps after each). `branches_of`: a
    /// function's branches ([`branches`](Self::branches)), `None` without its code.
    fn between(
        &self,
        syms: &[(Api, Symbol)],
        branches_of: &mut dyn FnMut(u64) -> Option<Vec<Branch>>,
        api_at: &dyn Fn(u64) -> Option<Api>,
    ) -> Vec<Between> {
        let mut between: Vec<Between> = Vec::new();
        let mut seen: HashSet<Between> = HashSet::new();
        for &(api, sym) in syms {
            // (function, how the API reached it, the call one frame up, hops).
            type Item = (u64, Option<Reach>, Option<(u64, u64)>, u32);
            let mut queue: Vec<Item> = vec![(sym.address, None, None, 0)];
            while let Some((start, reach, via, hops)) = queue.pop() {
                let Some(branches) = branches_of(start) else {
                    continue;
                };
                for (call, ip, ret, to) in branches {
                    // `next`: the hops of the function entered.
                    let (reach, via, next) = match (reach, via, call) {
                        (None, _, true) => (Reach::Called, None, hops + 1),
                        (None, _, false) => (Reach::Jumped, None, hops + 1),
                        // A call from a function in between: one frame more (its return
                        // slot holds a return address into that function: the probe reads
                        // that function's slot next), its tail jumps counted anew.
                        (Some(r), None, true) => (r, Some((ip, ret)), 0),
                        // A call from a function [`MAX_FRAMES`] calls down: not followed.
                        (Some(_), Some(_), true) => continue,
                        (Some(r), via, false) => (r, via, hops + 1),
                    };
                    if api_at(to).is_some() || next > MAX_HOPS {
                        continue;
                    }
                    let b = Between {
                        start: to,
                        api,
                        reach,
                        via,
                    };
                    if !seen.insert(b) {
                        continue;
                    }
                    between.push(b);
                    queue.push((to, Some(reach), via, next));
                }
            }
        }
        between
    }
}

/// A direct branch out of a function ([`TailJumps::branches`]): (a call, the instruction's
/// address, its end, where it enters).
type Branch = (bool, u64, u64, u64);

/// A function that is no API, reached from an API function ([`TailJumps::between`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Between {
    /// Its entry address.
    start: u64,
    /// The API whose function reaches it.
    api: Api,
    /// How the API's function reached the first function in between.
    reach: Reach,
    /// The call of it (or of the function that tail-jumps into it) from a function in
    /// between: (the call instruction's address, its return address). `None`: reached
    /// directly from the API's function.
    via: Option<(u64, u64)>,
}

/// Adds `site` to `sites` unless one with its return address is there already; beyond
/// [`LIBC_FILE_SITES`] its return address goes to `beyond` instead (once). Whether the site is
/// followed (new or already there).
fn keep_site(sites: &mut Vec<RelaySite>, beyond: &mut Vec<u32>, site: RelaySite) -> bool {
    if sites.iter().any(|s| s.ret_off == site.ret_off) {
        return true;
    }
    if sites.len() < LIBC_FILE_SITES {
        sites.push(site);
        return true;
    }
    if !beyond.contains(&site.ret_off) {
        beyond.push(site.ret_off);
    }
    false
}

/// The `.eh_frame` entries of the ELF file `data`: (start, length), sorted.
fn fde_extents(data: &[u8]) -> Vec<(u64, u64)> {
    use gimli::{CieOrFde, EhFrame, UnwindSection as _};
    let Ok(file) = object::File::parse(data) else {
        return Vec::new();
    };
    let Some(Ok((eh, bases))) = super::cfi::eh_frame(&file) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut entries = eh.entries(&bases);
    while let Ok(Some(entry)) = entries.next() {
        if let CieOrFde::Fde(partial) = entry
            && let Ok(fde) = partial.parse(EhFrame::cie_from_offset)
            && fde.len() > 0
        {
            out.push((fde.initial_address(), fde.len()));
        }
    }
    out.sort_unstable();
    out
}

/// The call-frame rule at `pc` of the ELF file `data`, when the CFA is rsp or rbp plus an
/// offset and the return address at CFA − 8: (from rbp, the offset).
fn cfa_at(data: &[u8], pc: u64) -> Option<(bool, u16)> {
    use allocwatch_common::unwind::kind;
    use gimli::{EhFrame, UnwindContext, UnwindSection as _};
    let file = object::File::parse(data).ok()?;
    let (eh, bases) = super::cfi::eh_frame(&file)?.ok()?;
    let mut ctx = Box::new(UnwindContext::new());
    let row = eh
        .unwind_info_for_address(&bases, &mut ctx, pc, EhFrame::cie_from_offset)
        .ok()?;
    let (cfa, off) = super::cfi::cfa_of(row)?;
    Some((cfa == kind::CFA_RBP, off))
}

/// Whether the probe of `api` runs after an instruction of its function that writes the frame
/// pointer (rbp): the probe then cannot read its caller's.
fn fp_written_before_probe(
    elf: &ElfFile,
    syms: &[(Api, Symbol)],
    points: &[ProbePoint],
    api: Api,
) -> bool {
    let (Some(&(_, sym)), Some(point)) = (
        syms.iter().find(|(a, _)| *a == api),
        points.iter().find(|p| p.api == api),
    ) else {
        return true;
    };
    let Some(start) = elf.vaddr_to_file_offset(sym.address) else {
        return true;
    };
    let Some(len) = point.file_offset.checked_sub(start) else {
        return true;
    };
    if len == 0 {
        return false;
    }
    let Ok(code) = elf.read_at_vaddr(sym.address, len) else {
        return true;
    };
    let mut info = InstructionInfoFactory::new();
    let mut decoder = Decoder::with_ip(64, &code, sym.address, DecoderOptions::NONE);
    while decoder.can_decode() {
        let instr = decoder.decode();
        if info.info(&instr).used_registers().iter().any(|u| {
            u.register().full_register() == Register::RBP
                && !matches!(u.access(), OpAccess::Read | OpAccess::CondRead)
        }) {
            return true;
        }
    }
    false
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

/// A GOT slot bound by a dynamic relocation to a symbol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GotSlot {
    slot: u64,
    /// The symbol's address when the file defines it.
    addr: Option<u64>,
    /// The API the symbol names ([`api_named`](super::libc::api_named)), defined here or not:
    /// the loader binds the slot to whichever file serves that name in the process. Not for a
    /// name the file defines under another prefix than its own ([`got_slots`]).
    api: Option<Api>,
}

/// Every GOT slot bound by a dynamic relocation to a symbol that the file defines or that
/// names an API. `None` when the file or its relocations cannot be read. `prefix`: the file's
/// own ([`prefix_of`](super::libc::prefix_of)). A symbol it defines that names an API only
/// under another prefix is no API here but a function in between: Debian's libmimalloc
/// (prefix `""`) has `aligned_alloc` jump through the PLT into its own `mi_aligned_alloc`
/// (the mimalloc crate's `aligned_alloc` under `mi_`), which jumps into `mi_malloc_aligned`.
fn got_slots(path: &Path, prefix: &str) -> Option<Vec<GotSlot>> {
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
                    let name = sym.name().unwrap_or_default();
                    let defined = !sym.is_undefined();
                    let got = GotSlot {
                        slot,
                        addr: defined.then(|| sym.address()),
                        api: super::libc::api_named(name)
                            .filter(|&api| !defined || super::libc::symbol_in(prefix, api) == name),
                    };
                    (got.addr.is_some() || got.api.is_some()).then_some(got)
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
        let got = got_slots(elf.path(), "");
        let jumps = TailJumps::new(&elf, &entries, got.as_deref());
        let reach = |name: &str, hops: u32| {
            let sym = elf.symbol(name).expect(name);
            let code = elf.function_code(sym, sym.size).expect("code");
            jumps.targets(&code, sym.address, hops).0
        };
        let bit = |api: Api| 1u64 << api as u32;
        assert_eq!(reach("_ZdlPvmSt11align_val_t", 0), bit(Api::DeleteSized));
        assert_eq!(reach("_ZdlPvSt11align_val_t", 0), bit(Api::Free));
        assert_eq!(reach("_ZdlPvm", 0), bit(Api::Free));
        // No hop left: the function in between is not followed.
        assert_eq!(reach("_ZdlPvmSt11align_val_t", MAX_HOPS), 0);
    }

    /// Debian 12's libmimalloc: `posix_memalign` and the aligned nothrow `new`s tail-jump into
    /// `mi_posix_memalign` and `mi_new_aligned_nothrow` (no APIs), which call
    /// `mi_malloc_aligned` through the PLT, their return slot 32 bytes above the callee's entry
    /// stack pointer (CFA = rsp + 32 at the call); `realloc` reaches `mi_free` through
    /// `mi_heap_realloc` and a static function without a symbol (stripped: its extent from
    /// `.eh_frame`). The jumping APIs may relay into the called ones.
    #[test]
    fn calls_from_functions_in_between() {
        let path = "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2.0";
        let elf = ElfFile::open(path).expect("libmimalloc (run ./x setup)");
        let (points, _) = crate::target::libc::probe_points(&elf, "", true).expect("points");
        let relays = Relays::of(&elf, &points);
        let range = |name: &str| {
            let sym = elf.symbol(name).expect(name);
            let start = elf.vaddr_to_file_offset(sym.address).expect("offset");
            start..start + sym.size
        };
        let (a, b) = (range("mi_posix_memalign"), range("mi_new_aligned_nothrow"));
        let in_named: Vec<&RelaySite> = relays
            .sites
            .iter()
            .filter(|s| a.contains(&u64::from(s.ret_off)) || b.contains(&u64::from(s.ret_off)))
            .collect();
        assert_eq!(in_named.len(), 2, "{:?}", relays.sites);
        for s in in_named {
            assert_eq!((s.kind, s.frame), (SITE_SP, 32), "{s:?}");
        }
        // The unnamed function's call of `mi_free` (Debian's mimalloc 2.0.9: at 0x114b8).
        let off = elf.vaddr_to_file_offset(0x114bd).expect("offset");
        assert!(
            relays.sites.iter().any(|s| u64::from(s.ret_off) == off),
            "{:?}",
            relays.sites
        );
        assert_ne!(
            relays.masks[Api::Realloc as usize] & (1 << Api::Free as u32),
            0
        );
        let bit = 1u64 << Api::MiMallocAligned as u32;
        for api in [
            Api::PosixMemalign,
            Api::NewAlignedNothrow,
            Api::NewArrayAlignedNothrow,
        ] {
            assert_ne!(relays.masks[api as usize] & bit, 0, "{api:?}");
        }
        assert_eq!(relays.masks[Api::Free as usize], 0);
    }

    /// Debian 12's libmimalloc: `aligned_alloc`, `memalign`, `valloc` and `pvalloc` jump
    /// through the PLT into the file's own `mi_aligned_alloc`, `mi_memalign`, `mi_valloc` and
    /// `mi_pvalloc` (named like the APIs of a `mi_`-prefixed build, but no APIs in this file),
    /// which jump into `mi_malloc_aligned` (`valloc` two functions deep: `mi_valloc` jumps into
    /// `mi_memalign`), each through its PLT slot: a relay into `mi_malloc_aligned` wherever it
    /// is served. The slots are not taken for relays into the APIs themselves.
    #[test]
    fn prefixed_names_defined_here_are_functions_in_between() {
        let path = "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2.0";
        let elf = ElfFile::open(path).expect("libmimalloc (run ./x setup)");
        let slots = got_slots(elf.path(), "").expect("relocations");
        let slot = |name: &str| {
            let addr = elf.symbol(name).expect(name).address;
            *slots
                .iter()
                .find(|s| s.addr == Some(addr))
                .unwrap_or_else(|| panic!("{name}: no slot in {slots:?}"))
        };
        assert_eq!(slot("mi_aligned_alloc").api, None);
        assert_eq!(slot("mi_malloc_aligned").api, Some(Api::MiMallocAligned));
        // Under the prefix `mi_` the name is the API (a file that defines `aligned_alloc` so).
        let prefixed = got_slots(elf.path(), "mi_").expect("relocations");
        assert!(
            prefixed
                .iter()
                .any(|s| s.api == Some(Api::AlignedAlloc) && s.addr.is_some()),
            "{prefixed:?}"
        );

        let (points, _) = crate::target::libc::probe_points(&elf, "", true).expect("points");
        let relays = Relays::of(&elf, &points);
        let bit = 1u64 << Api::MiMallocAligned as u32;
        for api in [Api::AlignedAlloc, Api::Memalign, Api::Valloc, Api::Pvalloc] {
            assert_eq!(relays.masks[api as usize], bit, "{api:?}");
        }
        assert_ne!(relays.named & bit, 0);
    }

    /// A file's entry holds [`LIBC_FILE_SITES`] relay call sites: the rest are counted once each
    /// (by return address), not kept, and not followed; a site found again is kept once.
    #[test]
    fn sites_beyond_the_entry_are_counted() {
        let site = |ret_off: u32| RelaySite {
            ret_off,
            frame: 16,
            kind: SITE_SP,
            _pad: 0,
        };
        let (mut sites, mut beyond) = (Vec::new(), Vec::new());
        for off in 0..LIBC_FILE_SITES as u32 {
            assert!(keep_site(&mut sites, &mut beyond, site(0x100 + off)));
        }
        assert!(
            keep_site(&mut sites, &mut beyond, site(0x100)),
            "already kept"
        );
        assert!(!keep_site(&mut sites, &mut beyond, site(0x900)));
        assert!(!keep_site(&mut sites, &mut beyond, site(0x900)));
        assert!(!keep_site(&mut sites, &mut beyond, site(0xa00)));
        assert_eq!(sites.len(), LIBC_FILE_SITES);
        assert_eq!(beyond, [0x900, 0xa00]);
    }

    /// A jump through a PLT slot that names an API enters that API in whichever file serves
    /// it: Debian 12's libstdc++ `operator delete` jumps to `free@plt` (undefined there: glibc's,
    /// or the allocator's that serves `free`), its sized and array deletes to `_ZdlPv@plt`
    /// (defined there, and interposed by tcmalloc's or jemalloc's). Both are named relays; a
    /// jump to another file's function that is no API is none.
    #[test]
    fn plt_slots_naming_an_api_relay_wherever_it_is_served() {
        let path = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6";
        let elf = ElfFile::open(path).expect("libstdc++ (Debian's g++)");
        let got = got_slots(elf.path(), "");
        let slots = got.as_deref().expect("relocations");
        // `free` is undefined in libstdc++: its slot is kept for the name alone.
        assert!(
            slots
                .iter()
                .any(|s| s.api == Some(Api::Free) && s.addr.is_none()),
            "{slots:?}"
        );
        let entries: Vec<(u64, Api)> = Vec::new();
        let jumps = TailJumps::new(&elf, &entries, got.as_deref());
        let reach = |name: &str| {
            let sym = elf.symbol(name).expect(name);
            let code = elf.function_code(sym, sym.size).expect("code");
            jumps.targets(&code, sym.address, 0)
        };
        let bit = |api: Api| 1u64 << api as u32;
        assert_eq!(reach("_ZdlPv"), (bit(Api::Free), bit(Api::Free)));
        assert_eq!(reach("_ZdlPvm"), (bit(Api::Delete), bit(Api::Delete)));
        assert_eq!(reach("_ZdaPv"), (bit(Api::Delete), bit(Api::Delete)));
    }

    /// Debian 12's jemalloc, tcmalloc and libmimalloc: the APIs their functions enter through
    /// a PLT slot naming them (what every file's probes of those APIs then check), next to
    /// glibc's `realloc` (`agent/src/probes`' glibc test). libmimalloc's operators jump to
    /// `mi_free@plt`, its own name of `free` (same address), not `free` under its prefix `""`:
    /// a relay into its own `free`, not named.
    #[test]
    fn named_relays_of_debian_allocators() {
        let bit = |api: Api| 1u64 << api as u32;
        for (path, named) in [
            (
                "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                bit(Api::Free) | bit(Api::Sdallocx),
            ),
            ("/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4", 0),
            ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", 0),
            (
                "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2.0",
                bit(Api::MiMallocAligned),
            ),
        ] {
            let elf = ElfFile::open(path).expect("allocator (run ./x setup)");
            let prefix = crate::target::libc::prefix_of(&elf).expect("malloc family");
            let (points, _) = crate::target::libc::probe_points(&elf, prefix, true).expect(path);
            let relays = Relays::of(&elf, &points);
            assert_eq!(relays.named, named, "{path}");
            // A named API is a target too: the relaying function writes the record.
            assert_eq!(relays.targets() & named, named, "{path}");
        }
    }

    /// Debian 12's libmimalloc: `reallocarray` jumps through the PLT into `mi_reallocarray`,
    /// which *calls* `mi_reallocn`, whose tail jumps (`mi_heap_reallocn`, `mi_heap_realloc`)
    /// reach the static function that calls `mi_free` (a block that moves). That call of
    /// `mi_reallocn` is a site (its return slot 16 bytes above `mi_reallocn`'s entry stack
    /// pointer: `push rbx`), the call of `mi_free` is one already (`realloc`'s), and
    /// `reallocarray`, which jumped into the first, may relay into `free`.
    #[test]
    fn calls_two_functions_deep() {
        let path = "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2.0";
        let elf = ElfFile::open(path).expect("libmimalloc (run ./x setup)");
        let (points, _) = crate::target::libc::probe_points(&elf, "", true).expect("points");
        let relays = Relays::of(&elf, &points);
        let sym = elf.symbol("mi_reallocarray").expect("mi_reallocarray");
        let start = elf.vaddr_to_file_offset(sym.address).expect("offset");
        let in_between: Vec<&RelaySite> = relays
            .sites
            .iter()
            .filter(|s| (start..start + sym.size).contains(&u64::from(s.ret_off)))
            .collect();
        assert_eq!(in_between.len(), 1, "{:?}", relays.sites);
        assert_eq!((in_between[0].kind, in_between[0].frame), (SITE_SP, 16));
        // Its return address follows the call of `mi_reallocn` (through the PLT).
        let ret = in_between[0].ret_off as u64 + sym.address - start;
        let code = elf.function_code(sym, sym.size).expect("code");
        let mut decoder = Decoder::with_ip(64, &code, sym.address, DecoderOptions::NONE);
        let call = std::iter::from_fn(|| decoder.can_decode().then(|| decoder.decode()))
            .find(|i| i.next_ip() == ret)
            .expect("an instruction ending at the site");
        assert_eq!(call.flow_control(), FlowControl::Call);
        let slot = jump_stub_slot(&elf, call.near_branch_target()).expect("a PLT stub");
        let got = got_slots(elf.path(), "").expect("relocations");
        let reallocn = elf.symbol("mi_reallocn").expect("mi_reallocn").address;
        assert!(
            got.iter()
                .any(|s| s.slot == slot && s.addr == Some(reallocn)),
            "{slot:#x}"
        );
        assert_eq!(
            relays.masks[Api::Reallocarray as usize],
            1 << Api::Free as u32
        );
        // The static function's call of `mi_free` (Debian's mimalloc 2.0.9: at 0x114b8).
        let off = elf.vaddr_to_file_offset(0x114bd).expect("offset");
        assert!(relays.sites.iter().any(|s| u64::from(s.ret_off) == off));
        assert_eq!(relays.sites_beyond, 0);
    }

    /// The second frame finds no site where no API is reached through two calls: Debian 12's
    /// glibc (its API functions call internal functions that call no API) has none at all.
    /// In Debian 12's jemalloc it finds the one such chain there is: `operator new(size_t,
    /// nothrow_t)` jumps into its slow path, which on failure calls the out-of-memory loop
    /// that calls `malloc` after each new-handler (that call already a site: `operator new`'s
    /// slow path jumps into the loop); the slow path's call of the loop is the new site.
    #[test]
    fn second_frame_without_false_sites() {
        let elf = ElfFile::open("/usr/lib/x86_64-linux-gnu/libc.so.6").expect("glibc");
        let (points, _) = crate::target::libc::probe_points(&elf, "", true).expect("points");
        let relays = Relays::of(&elf, &points);
        assert!(relays.sites.is_empty(), "{:?}", relays.sites);
        assert_eq!(relays.masks[Api::Free as usize], 0);
        assert_eq!(
            relays.masks[Api::Reallocarray as usize],
            1 << Api::Realloc as u32
        );

        let elf = ElfFile::open("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2").expect("jemalloc");
        let prefix = crate::target::libc::prefix_of(&elf).expect("malloc family");
        let (points, _) = crate::target::libc::probe_points(&elf, prefix, true).expect("points");
        let relays = Relays::of(&elf, &points);
        let site = |ret: u64, frame: u16| RelaySite {
            ret_off: u32::try_from(elf.vaddr_to_file_offset(ret).expect("offset")).unwrap(),
            frame,
            kind: SITE_SP,
            _pad: 0,
        };
        // Debian's jemalloc 5.3.0: the loop's call of `malloc` at 0xadd7d (below its entry
        // 0xadd50: four pushes and 8 bytes), the slow path's (0xade10) call of the loop at
        // 0xade28 (one push).
        assert_eq!(relays.sites, [site(0xadd82, 48), site(0xade2d, 16)]);
        let bit = 1u64 << Api::Malloc as u32;
        assert_eq!(relays.masks[Api::New as usize], bit);
        assert_eq!(relays.masks[Api::NewNothrow as usize], bit);
        assert_eq!(relays.sites_beyond, 0);
    }
}
