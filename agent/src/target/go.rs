//! Which Go runtime functions of a binary to probe, where, and how to read their arguments.
//!
//! The per-version knowledge (symbols, registers, field offsets) lives in
//! `crate::gort::versions`; this module binds it to one binary: finds each function through
//! `.gopclntab` (so stripped binaries work), places the probe after the stack-bound check
//! (`placement.rs`), finds the `ret` instructions where the end of a call matters, and turns
//! the table's arguments into the probe's capture spec.

use std::path::{Path, PathBuf};

use allocwatch_common::go::{Capture, GO_SPEC_STACK, GO_VALUES, GoReg, GoRole, GoSpec};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Register};

use super::{
    TargetError,
    elf::{ElfFile, Symbol},
    placement::{self, Request},
};
use crate::gort::{
    buildinfo::{self, GoVersion},
    pclntab::Pclntab,
    versions::{self, MapImpl, Resolved, RuntimeFunc, Unsupported},
};

/// Longest function body disassembled to find `ret`s (startTheWorldWithSema is ~1 KiB).
const MAX_FUNC_BYTES: u64 = 64 << 10;

/// A Go binary and the probes to put in it.
#[derive(Clone, Debug)]
pub struct GoTarget {
    /// Path the agent opens and attaches to.
    pub path: PathBuf,
    pub version: GoVersion,
    pub maps: MapImpl,
    /// Whether this Go release's table rows were measured on real binaries.
    pub measured: bool,
    pub probes: Vec<GoProbe>,
    /// Virtual address range of `runtime.mallocgc` (specialized mallocs called from it are not
    /// counted twice).
    pub mallocgc: Option<(u64, u64)>,
    /// Position-independent (ET_DYN): runtime addresses are the virtual addresses plus the
    /// load base, known only once the process has mapped the file.
    pub pie: bool,
    /// Before Go 1.21 a stop-the-world carries no reason; the GC's stops return into these
    /// address ranges (`runtime.systemstack`, measured on go1.19.8), every other stop does not.
    pub gc_stop_callers: Vec<(u64, u64)>,
    /// What is not traced on this binary and why (unknown version, missing symbols).
    pub warnings: Vec<String>,
}

/// One probe site in a Go binary.
#[derive(Clone, Debug)]
pub struct GoProbe {
    pub role: GoRole,
    pub symbol: String,
    pub file_offset: u64,
    pub sp_delta: u32,
    pub emulated: bool,
    pub spec: GoSpec,
}

/// Which groups of Go runtime functions to probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoProbeSet {
    /// Map and slice growth.
    pub growth: bool,
    /// Every heap allocation (`mallocgc`): a probe hit per allocation, the costly part.
    pub malloc: bool,
    /// GC cycles and stop-the-world pauses.
    pub gc: bool,
}

impl GoProbeSet {
    fn wants(&self, role: GoRole) -> bool {
        match role {
            GoRole::Malloc | GoRole::MallocSpecialized => self.malloc,
            GoRole::GcStart | GoRole::StopTheWorld | GoRole::StartTheWorld => self.gc,
            _ => self.growth,
        }
    }
}

/// What the tracer needs from a Go binary, or `None` if `path` is not a Go program.
pub fn for_exe(path: &Path, set: GoProbeSet) -> Result<Option<GoTarget>, TargetError> {
    let bad = |e: crate::gort::GoError| TargetError::BadElf {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let Some(version) = buildinfo::go_version(path).map_err(bad)? else {
        return Ok(None);
    };
    let mut warnings = Vec::new();
    let lookup = match versions::lookup(&version) {
        Ok(l) => l,
        Err(e) => {
            let why = e.to_string();
            // An unknown newer version keeps the rows that are safe as counts and timestamps
            // (the error's text says so); anything else traces nothing of the runtime.
            let Unsupported::TooNew { safe, .. } = e else {
                warnings.push(format!("{why}: the Go runtime is not traced"));
                return Ok(Some(GoTarget {
                    path: path.to_owned(),
                    maps: versions::map_impl(&version),
                    version,
                    measured: false,
                    probes: Vec::new(),
                    mallocgc: None,
                    pie: false,
                    gc_stop_callers: Vec::new(),
                    warnings,
                }));
            };
            warnings.push(why);
            versions::Lookup {
                maps: versions::map_impl(&version),
                funcs: safe,
                measured: false,
            }
        }
    };
    let tab = Pclntab::open(path)
        .map_err(bad)?
        .ok_or_else(|| TargetError::BadElf {
            path: path.to_owned(),
            reason: "Go binary without .gopclntab".into(),
        })?;
    let resolved = match lookup.resolve(&version, &tab) {
        Ok(r) => r,
        Err(e) => {
            warnings.push(format!("{e}: the Go runtime is not traced"));
            Vec::new()
        }
    };
    let elf = ElfFile::open(path)?;
    let mut probes = Vec::new();
    let mut mallocgc = None;
    for r in &resolved {
        if r.func.role == GoRole::Malloc {
            mallocgc = Some((r.entry, r.end));
        }
        if !set.wants(r.func.role) {
            continue;
        }
        probes.extend(place_function(&elf, r)?);
    }
    let gc_stop_callers = if version.at_least(1, 21) {
        Vec::new()
    } else {
        tab.find_function("runtime.systemstack")
            .map(|f| vec![(f.entry, f.end)])
            .unwrap_or_default()
    };
    Ok(Some(GoTarget {
        path: path.to_owned(),
        maps: lookup.maps,
        measured: lookup.measured,
        version,
        probes,
        mallocgc,
        pie: is_pie(path)?,
        gc_stop_callers,
        warnings,
    }))
}

/// Whether the ELF header says ET_DYN (e_type at offset 16, little endian).
fn is_pie(path: &Path) -> Result<bool, TargetError> {
    use std::io::Read as _;
    let mut head = [0u8; 18];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|source| TargetError::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok(u16::from_le_bytes([head[16], head[17]]) == 3)
}

/// The probe sites of one resolved function: its entry (after the stack check), or its `ret`s
/// for the end of a stop-the-world.
fn place_function(elf: &ElfFile, r: &Resolved) -> Result<Vec<GoProbe>, TargetError> {
    let sym = Symbol {
        address: r.entry,
        size: r.end.saturating_sub(r.entry),
    };
    let code = elf.function_code(sym, MAX_FUNC_BYTES)?;
    let offset_of = |vaddr: u64| {
        elf.vaddr_to_file_offset(vaddr)
            .ok_or_else(|| TargetError::BadElf {
                path: elf.path().to_owned(),
                reason: format!("{} at {vaddr:#x} is in no loadable segment", r.symbol),
            })
    };
    let probe = |role: GoRole, vaddr: u64, sp_delta: u32, emulated: bool| {
        Ok(GoProbe {
            role,
            symbol: r.symbol.clone(),
            file_offset: offset_of(vaddr)?,
            sp_delta,
            emulated,
            spec: spec_for(role, r.func),
        })
    };
    let role = r.func.role;
    if role == GoRole::StartTheWorld {
        return ret_addresses(&code, r.entry)
            .into_iter()
            .map(|a| probe(role, a, 0, false))
            .collect();
    }
    let needed: Vec<Register> = r.func.args.iter().map(|a| register(a.reg)).collect();
    let p = placement::place(
        &code,
        r.entry,
        &Request {
            needed: &needed,
            with_return: false,
            skip_stack_check: true,
        },
    );
    Ok(vec![probe(
        role,
        r.entry + p.offset_in_function,
        p.sp_delta,
        p.emulated,
    )?])
}

/// Addresses of the `ret` instructions of a function body.
pub fn ret_addresses(code: &[u8], address: u64) -> Vec<u64> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let instr = decoder.decode();
        if instr.is_invalid() {
            break;
        }
        if instr.flow_control() == FlowControl::Return {
            out.push(instr.ip());
        }
    }
    out
}

fn register(r: GoReg) -> Register {
    match r {
        GoReg::Rax => Register::RAX,
        GoReg::Rbx => Register::RBX,
        GoReg::Rcx => Register::RCX,
        GoReg::Rdi => Register::RDI,
        GoReg::Rsi => Register::RSI,
        GoReg::R8 => Register::R8,
        GoReg::R9 => Register::R9,
        GoReg::R10 => Register::R10,
        GoReg::R11 => Register::R11,
    }
}

/// The values each role's events carry, in order: names of the table row's arguments or
/// fields. The agent decodes events by these positions (`crate::gostate`).
pub fn value_names(role: GoRole) -> &'static [&'static str] {
    match role {
        GoRole::MapHashGrow => &["h", "count", "B", "flags", "bucketsize", "bucketPtrBytes"],
        GoRole::MapGrowToSmall | GoRole::MapGrowToTable => &[
            "m",
            "used",
            "dirLen",
            "globalDepth",
            "groupSize",
            "groupPtrBytes",
        ],
        GoRole::MapTableGrow => &[
            "m",
            "capacity",
            "newCapacity",
            "used",
            "groupSize",
            "groupPtrBytes",
        ],
        GoRole::MapTableSplit => &[
            "m",
            "capacity",
            "localDepth",
            "groupSize",
            "mapUsed",
            "groupPtrBytes",
        ],
        GoRole::MapDirectoryGrow => &["m", "globalDepth", "dirLen", "oldLocalDepth"],
        GoRole::SliceGrow => &["newLen", "oldCap", "elemSize", "ptrBytes", "oldPtr"],
        GoRole::SliceMoveToHeap => &["len", "cap", "elemSize", "ptrBytes"],
        GoRole::Malloc | GoRole::MallocSpecialized => &["size"],
        GoRole::GcStart => &["triggerKind"],
        GoRole::StopTheWorld => &["reason"],
        // Filled by the probe itself: pause ns, stop reason, stop's return address.
        GoRole::StartTheWorld => &[],
    }
}

use crate::gort::growth::{MAP_TYPE_BUCKET_OFFSET, TYPE_PTR_BYTES_OFFSET};

/// The capture spec of `role` from the table row: each value is an argument register or a
/// field loaded through one.
fn spec_for(role: GoRole, func: &RuntimeFunc) -> GoSpec {
    let mut spec = GoSpec {
        role: role as u32,
        flags: if stacks_for(role) { GO_SPEC_STACK } else { 0 },
        ..GoSpec::default()
    };
    for (slot, name) in spec
        .captures
        .iter_mut()
        .zip(value_names(role).iter())
        .take(GO_VALUES)
    {
        *slot = capture_for(func, name).unwrap_or_default();
    }
    spec
}

fn capture_for(func: &RuntimeFunc, name: &str) -> Option<Capture> {
    let by_arg = |n: &str| func.args.iter().find(|a| a.name == n);
    if let Some(a) = by_arg(name) {
        return Some(Capture {
            reg: a.reg as u8,
            size: a.size,
            ..Capture::default()
        });
    }
    if let Some(f) = func.fields.iter().find(|f| f.name == name) {
        let base = by_arg(f.base)?;
        return Some(Capture {
            reg: base.reg as u8,
            size: f.size,
            deref: 1,
            offset2: 0,
            offset: u32::from(f.offset),
        });
    }
    // Pointerfulness of the element, bucket or group type decides the size-class rounding
    // (malloc headers since Go 1.22): `_type.PtrBytes` of the element type, or of the type
    // the map type's bucket/group field points to.
    match name {
        "ptrBytes" => {
            let et = by_arg("et")?;
            Some(Capture {
                reg: et.reg as u8,
                size: 8,
                deref: 1,
                offset2: 0,
                offset: u32::from(TYPE_PTR_BYTES_OFFSET),
            })
        }
        // Old maps: `t *maptype`; swiss maps: `typ *MapType` (`t` is the table there).
        "bucketPtrBytes" | "groupPtrBytes" => {
            let t = by_arg(if name == "bucketPtrBytes" { "t" } else { "typ" })?;
            Some(Capture {
                reg: t.reg as u8,
                size: 8,
                deref: 2,
                offset2: TYPE_PTR_BYTES_OFFSET as u8,
                offset: u32::from(MAP_TYPE_BUCKET_OFFSET),
            })
        }
        _ => None,
    }
}

/// Growth events carry stacks (their sites are the point); GC events do not.
fn stacks_for(role: GoRole) -> bool {
    !matches!(
        role,
        GoRole::GcStart | GoRole::StopTheWorld | GoRole::StartTheWorld
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_rets() {
        // push rbp; mov rbp,rsp; ret; nop; pop rbp; ret
        let code = [0x55, 0x48, 0x89, 0xe5, 0xc3, 0x90, 0x5d, 0xc3];
        assert_eq!(ret_addresses(&code, 0x1000), vec![0x1004, 0x1007]);
    }

    #[test]
    fn every_role_value_is_in_some_row() {
        for f in versions::TABLE {
            let role = f.role;
            for name in value_names(role) {
                // Optional names (e.g. oldPtr, noverflow) may be absent in old rows; the ones
                // decoding depends on must be there.
                let essential = matches!(
                    (role, *name),
                    (GoRole::MapHashGrow, "h" | "count" | "B" | "bucketsize")
                        | (
                            GoRole::SliceGrow,
                            "newLen" | "oldCap" | "elemSize" | "ptrBytes"
                        )
                        | (GoRole::MapTableGrow, "m" | "capacity" | "newCapacity")
                        | (GoRole::Malloc, "size")
                );
                if essential {
                    assert!(capture_for(f, name).is_some(), "{} lacks {name}", f.source);
                }
            }
        }
    }
}
