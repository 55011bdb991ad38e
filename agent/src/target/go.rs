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
    elf::{Arch, ElfFile, Symbol},
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
    for_file(path, set, true)
}

/// [`for_exe`]; `native_only: false` also places probes in a binary of the other architecture
/// (the unit tests read cross-built arm64 binaries on x86-64).
fn for_file(
    path: &Path,
    set: GoProbeSet,
    native_only: bool,
) -> Result<Option<GoTarget>, TargetError> {
    let bad = |e: crate::gort::GoError| TargetError::BadElf {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let Some(version) = buildinfo::go_version(path).map_err(bad)? else {
        return Ok(None);
    };
    if native_only && !super::elf::is_native_elf(path) {
        // The probes read this build's registers (g, arguments): another architecture's
        // program would be read wrong.
        return Err(TargetError::bad_elf(
            path,
            format!(
                "not an {} program, the architecture this allocwatch is built for",
                Arch::NATIVE.name()
            ),
        ));
    }
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
        return ret_addresses(elf.arch(), &code, r.entry)
            .into_iter()
            .map(|a| probe(role, a, 0, false))
            .collect();
    }
    let needed: Vec<Register> = r.func.args.iter().map(|a| register(a.reg)).collect();
    let p = placement::place(
        elf.arch(),
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

/// Addresses of the `ret` instructions of a function body of instruction set `arch`.
pub fn ret_addresses(arch: Arch, code: &[u8], address: u64) -> Vec<u64> {
    if arch == Arch::Aarch64 {
        return super::arm64::ret_addresses(code, address);
    }
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
        assert_eq!(
            ret_addresses(Arch::X86_64, &code, 0x1000),
            vec![0x1004, 0x1007]
        );
    }

    /// `go tool objdump` of `bin`: each function's instructions as (address, mnemonic and
    /// operands), in order, by symbol name.
    fn objdump(
        tc: &crate::gort::tests::Toolchain,
        bin: &Path,
    ) -> std::collections::HashMap<String, Vec<(u64, String)>> {
        let out = crate::gort::tests::go_command(tc)
            .args(["tool", "objdump"])
            .arg(bin)
            .output()
            .expect("run go tool objdump");
        assert!(out.status.success(), "go tool objdump {}", bin.display());
        let mut funcs: Vec<(String, Vec<(u64, String)>)> = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // `TEXT runtime.growslice(SB) /path/slice.go`
            if let Some(rest) = line.strip_prefix("TEXT ") {
                let name = rest.split("(SB)").next().unwrap_or(rest).to_owned();
                funcs.push((name, Vec::new()));
                continue;
            }
            // `  slice.go:177\t0x7ed70\t\tf9400b90\t\tMOVD 16(R28), R16\t`
            let cols: Vec<&str> = line.split('\t').filter(|c| !c.is_empty()).collect();
            let addr = cols
                .get(1)
                .and_then(|a| a.strip_prefix("0x"))
                .and_then(|a| u64::from_str_radix(a, 16).ok());
            if let (Some((_, f)), Some(addr), Some(asm)) = (funcs.last_mut(), addr, cols.get(3)) {
                f.push((addr, asm.trim().to_owned()));
            }
        }
        funcs.into_iter().collect()
    }

    /// Every probe the agent places in the growth fixture cross-built for arm64 by every Go
    /// toolchain, against `go tool objdump` of the same binary: growth, map growth, mallocgc
    /// and GC entries just past the stack check (`... BLS`), or at the entry of a function
    /// without one; stop-the-world ends at exactly the `RET`s.
    #[test]
    fn arm64_probes_match_go_objdump() {
        let all = GoProbeSet {
            growth: true,
            malloc: true,
            gc: true,
        };
        for (tc, bin) in crate::gort::tests::arm64_fixtures() {
            let elf = ElfFile::open(bin).expect("open arm64 fixture");
            assert_eq!(elf.arch(), Arch::Aarch64);
            let native = for_exe(bin, all);
            if Arch::NATIVE != Arch::Aarch64 {
                assert!(
                    native.is_err(),
                    "go {}: an arm64 program is refused",
                    tc.version
                );
            }
            let target = for_file(bin, all, false)
                .expect("read arm64 fixture")
                .expect("a Go binary");
            assert!(
                target.warnings.is_empty(),
                "go {}: {:?}",
                tc.version,
                target.warnings
            );
            let roles: Vec<GoRole> = target.probes.iter().map(|p| p.role).collect();
            let map_growth = if target.version.at_least(1, 24) {
                GoRole::MapTableGrow
            } else {
                GoRole::MapHashGrow
            };
            for role in [
                GoRole::SliceGrow,
                GoRole::Malloc,
                map_growth,
                GoRole::StartTheWorld,
            ] {
                assert!(
                    roles.contains(&role),
                    "go {}: no {role:?} probe",
                    tc.version
                );
            }
            let dump = objdump(tc, bin);
            let mut rets_seen = std::collections::HashMap::<&str, usize>::new();
            for p in &target.probes {
                let code = dump
                    .get(p.symbol.as_str())
                    .unwrap_or_else(|| panic!("go {}: objdump has no {}", tc.version, p.symbol));
                let entry = code
                    .first()
                    .map(|&(a, _)| a)
                    .expect("objdump lists the function");
                let entry_off = elf.vaddr_to_file_offset(entry).expect("entry in a segment");
                let vaddr = entry + (p.file_offset - entry_off);
                let what = format!("go {} {} {:?}", tc.version, p.symbol, p.role);
                assert_eq!(p.sp_delta, 0, "{what}");
                if p.role == GoRole::StartTheWorld {
                    let rets: Vec<u64> = code
                        .iter()
                        .filter(|(_, asm)| asm == "RET")
                        .map(|&(a, _)| a)
                        .collect();
                    assert!(
                        rets.contains(&vaddr),
                        "{what}: {vaddr:#x} is no RET of {rets:x?}"
                    );
                    *rets_seen.entry(&p.symbol).or_default() += 1;
                    assert!(rets_seen[p.symbol.as_str()] <= rets.len(), "{what}");
                    continue;
                }
                // Just past the BLS of `MOVD 16(R28), R16; [...]; BLS`, else the entry.
                let expected = match code.first() {
                    Some((_, first)) if first == "MOVD 16(R28), R16" => code
                        .iter()
                        .take(8)
                        .find(|(_, asm)| asm.starts_with("BLS "))
                        .map_or(entry, |&(a, _)| a + 4),
                    _ => entry,
                };
                assert_eq!(
                    vaddr, expected,
                    "{what}: probe at {vaddr:#x}, objdump says {expected:#x}"
                );
                if matches!(p.role, GoRole::SliceGrow | GoRole::Malloc) || p.role == map_growth {
                    assert_ne!(vaddr, entry, "{what}: these functions have a stack check");
                }
            }
            // Every RET of the stop-the-world end has its probe.
            for (symbol, n) in rets_seen {
                let rets = dump[symbol].iter().filter(|(_, asm)| asm == "RET").count();
                assert_eq!(n, rets, "go {} {symbol}: RET probes", tc.version);
            }
        }
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
