//! ELF files as uprobes see them: symbols, virtual address → file offset, code bytes, and the
//! dynamic section (`DT_NEEDED`, `DT_RUNPATH`, `DT_RPATH`).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{Dyn, FileHeader, ProgramHeader, Sym};
use object::{Endianness, ReadCache, ReadRef};

use super::TargetError;

/// A defined symbol: its virtual address (as linked, before load bias) and size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub address: u64,
    pub size: u64,
}

/// The dynamic-linking view of a binary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DynamicInfo {
    pub needed: Vec<String>,
    /// `DT_RUNPATH` entries, `$ORIGIN` not expanded.
    pub runpath: Vec<String>,
    /// `DT_RPATH` entries (only honoured by ld.so when there is no `DT_RUNPATH`).
    pub rpath: Vec<String>,
    pub soname: Option<String>,
}

/// The instruction sets allocwatch can place probes in (the ELF header's `e_machine`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    /// The architecture this allocwatch was built for: its probes read this one's registers,
    /// so only files of it are traced.
    pub const NATIVE: Self = if cfg!(target_arch = "aarch64") {
        Self::Aarch64
    } else {
        Self::X86_64
    };

    pub fn from_machine(e_machine: u16) -> Option<Self> {
        match e_machine {
            elf::EM_X86_64 => Some(Self::X86_64),
            elf::EM_AARCH64 => Some(Self::Aarch64),
            _ => None,
        }
    }

    pub const fn machine(self) -> u16 {
        match self {
            Self::X86_64 => elf::EM_X86_64,
            Self::Aarch64 => elf::EM_AARCH64,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::X86_64 => "x86-64",
            Self::Aarch64 => "arm64",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct LoadSegment {
    vaddr: u64,
    offset: u64,
    filesz: u64,
}

/// Preference among several definitions of one name: a default-version (`@@`) global wins
/// over a hidden-version (`@`) one, global over weak over local, and a sized one over size 0.
type Rank = (bool, u8, bool);

/// A parsed x86-64 or arm64 ELF file. Symbols, segments and dynamic entries are read once at open; code
/// is read from the file on demand.
#[derive(Debug)]
pub struct ElfFile {
    path: PathBuf,
    file: File,
    arch: Arch,
    interpreter: Option<String>,
    segments: Vec<LoadSegment>,
    dynamic: DynamicInfo,
    symbols: HashMap<String, (Symbol, Rank)>,
    /// A non-empty `.symtab`: the file was not stripped.
    has_symtab: bool,
}

impl ElfFile {
    /// Opens and parses `path`, including its static (`.symtab`) and dynamic symbols.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, TargetError> {
        Self::parse(path.as_ref(), true, false)
    }

    /// Opens a separate debug file for its `.symtab` only (names at the binary's own virtual
    /// addresses). Its program headers describe the binary, whose contents (the interpreter
    /// name, the dynamic section, `.dynsym`) it does not hold: they are not read, and its code
    /// cannot be read either (no segments).
    pub fn open_debug_file(path: impl AsRef<Path>) -> Result<Self, TargetError> {
        Self::parse(path.as_ref(), true, true)
    }

    fn parse(path: &Path, with_symbols: bool, debug_file: bool) -> Result<Self, TargetError> {
        let file = File::open(path).map_err(|e| TargetError::io(path, e))?;
        let bad = |e: object::read::Error| TargetError::bad_elf(path, e);
        // Read lazily: a large executable only has its headers and symbol tables read.
        let cache = ReadCache::new(&file);
        let data = &cache;
        let header = elf::FileHeader64::<Endianness>::parse(data).map_err(bad)?;
        let endian = header.endian().map_err(bad)?;
        let Some(arch) = Arch::from_machine(header.e_machine(endian)) else {
            return Err(TargetError::bad_elf(
                path,
                "neither an x86-64 nor an arm64 binary",
            ));
        };

        let mut interpreter = None;
        let mut segments = Vec::new();
        let mut dyn_entries = None;
        let headers = if debug_file {
            &[]
        } else {
            header.program_headers(endian, data).map_err(bad)?
        };
        for ph in headers {
            match ph.p_type(endian) {
                elf::PT_LOAD => segments.push(LoadSegment {
                    vaddr: ph.p_vaddr(endian),
                    offset: ph.p_offset(endian),
                    filesz: ph.p_filesz(endian),
                }),
                elf::PT_INTERP => {
                    interpreter = ph
                        .interpreter(endian, data)
                        .map_err(bad)?
                        .map(|b| String::from_utf8_lossy(b).into_owned());
                }
                elf::PT_DYNAMIC => dyn_entries = ph.dynamic(endian, data).map_err(bad)?,
                _ => {}
            }
        }

        let dynamic = match dyn_entries {
            Some(entries) => read_dynamic(&segments, entries, endian, data),
            None => DynamicInfo::default(),
        };
        let mut symbols = HashMap::new();
        let mut has_symtab = false;
        if with_symbols {
            let sections = header.sections(endian, data).map_err(bad)?;
            let versions = if debug_file {
                None
            } else {
                sections.versions(endian, data).map_err(bad)?
            };
            let tables: &[u32] = if debug_file {
                &[elf::SHT_SYMTAB]
            } else {
                &[elf::SHT_DYNSYM, elf::SHT_SYMTAB]
            };
            for &sh_type in tables {
                let table = sections.symbols(endian, data, sh_type).map_err(bad)?;
                has_symtab |= sh_type == elf::SHT_SYMTAB && !table.is_empty();
                for (index, sym) in table.enumerate() {
                    if sym.is_undefined(endian)
                        || matches!(
                            sym.st_type(),
                            elf::STT_SECTION | elf::STT_FILE | elf::STT_TLS
                        )
                    {
                        continue;
                    }
                    let Ok(name) = table.symbol_name(endian, sym) else {
                        continue;
                    };
                    if name.is_empty() {
                        continue;
                    }
                    // In .dynsym the version lives in .gnu.version; in .symtab some
                    // toolchains spell it into the name (`malloc@@GLIBC_2.2.5`).
                    let hidden = sh_type == elf::SHT_DYNSYM
                        && versions
                            .as_ref()
                            .is_some_and(|v| v.version_index(endian, index).is_hidden());
                    let symbol = Symbol {
                        address: sym.st_value(endian),
                        size: sym.st_size(endian),
                    };
                    let bind = match sym.st_bind() {
                        elf::STB_GLOBAL => 2,
                        elf::STB_WEAK => 1,
                        _ => 0,
                    };
                    let sized = symbol.size > 0;
                    let name = String::from_utf8_lossy(name);
                    if let Some((bare, version)) = name.split_once('@') {
                        let default = version.starts_with('@');
                        add_symbol(&mut symbols, bare, symbol, (default, bind, sized));
                    }
                    add_symbol(&mut symbols, &name, symbol, (!hidden, bind, sized));
                }
            }
        }
        drop(cache);
        Ok(ElfFile {
            path: path.to_owned(),
            file,
            arch,
            interpreter,
            segments,
            dynamic,
            symbols,
            has_symtab,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The instruction set of its code (placement and `ret` sites decode by it).
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Looks up a defined symbol by name. Versioned names resolve to their default version
    /// (`malloc` finds `malloc@@GLIBC_2.2.5`); the exact versioned spelling works too when the
    /// file's `.symtab` spells it so.
    pub fn symbol(&self, name: &str) -> Option<Symbol> {
        self.symbols.get(name).map(|(s, _)| *s)
    }

    /// Whether the file has its static symbol table (`.symtab`): a stripped one has only the
    /// dynamic symbols (its static functions are in its separate debug file, if anywhere).
    pub fn has_symtab(&self) -> bool {
        self.has_symtab
    }

    /// Every defined symbol name (versioned spellings too) with its symbol.
    pub fn symbols(&self) -> impl Iterator<Item = (&str, Symbol)> {
        self.symbols.iter().map(|(n, (s, _))| (n.as_str(), *s))
    }

    /// `PT_INTERP`: the dynamic loader a dynamically linked executable asks for.
    pub fn interpreter(&self) -> Option<&str> {
        self.interpreter.as_deref()
    }

    /// Whether the file is run through a dynamic loader (has `PT_INTERP`). Static and
    /// static-PIE executables are not.
    pub fn is_dynamic(&self) -> bool {
        self.interpreter.is_some()
    }

    pub fn dynamic(&self) -> &DynamicInfo {
        &self.dynamic
    }

    /// File offset of a virtual address, through the `PT_LOAD` segment that maps it from the
    /// file (`vaddr - p_vaddr + p_offset`). Uprobes attach at file offsets.
    pub fn vaddr_to_file_offset(&self, vaddr: u64) -> Option<u64> {
        find_segment(&self.segments, vaddr).and_then(|s| (vaddr - s.vaddr).checked_add(s.offset))
    }

    /// Reads up to `len` bytes at virtual address `vaddr`, stopping at the end of the
    /// segment's file contents.
    pub fn read_at_vaddr(&self, vaddr: u64, len: u64) -> Result<Vec<u8>, TargetError> {
        let seg = find_segment(&self.segments, vaddr).ok_or_else(|| {
            TargetError::bad_elf(&self.path, format!("address {vaddr:#x} is not in the file"))
        })?;
        let offset = (vaddr - seg.vaddr)
            .checked_add(seg.offset)
            .ok_or_else(|| TargetError::bad_elf(&self.path, "segment offset overflows"))?;
        // Bound by the real file too: a corrupt header must not size the allocation.
        let file_len = self
            .file
            .metadata()
            .map_err(|e| TargetError::io(&self.path, e))?
            .len();
        let avail = (seg.filesz - (vaddr - seg.vaddr)).min(file_len.saturating_sub(offset));
        let n = usize::try_from(len.min(avail))
            .map_err(|_| TargetError::bad_elf(&self.path, "read too large"))?;
        let mut buf = vec![0; n];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| TargetError::io(&self.path, e))?;
        Ok(buf)
    }

    /// The first bytes of a function, for entry-block disassembly: `min(size, max_len)`, or
    /// `max_len` when the symbol has no size (hand-written assembly).
    pub fn function_code(&self, sym: Symbol, max_len: u64) -> Result<Vec<u8>, TargetError> {
        let len = if sym.size == 0 {
            max_len
        } else {
            sym.size.min(max_len)
        };
        self.read_at_vaddr(sym.address, len)
    }
}

fn add_symbol(
    symbols: &mut HashMap<String, (Symbol, Rank)>,
    name: &str,
    symbol: Symbol,
    rank: Rank,
) {
    match symbols.get(name) {
        Some((_, old)) if *old >= rank => {}
        _ => {
            symbols.insert(name.to_owned(), (symbol, rank));
        }
    }
}

fn find_segment(segments: &[LoadSegment], vaddr: u64) -> Option<&LoadSegment> {
    segments
        .iter()
        .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.filesz)
}

fn read_dynamic<'a>(
    segments: &[LoadSegment],
    entries: &[elf::Dyn64<Endianness>],
    endian: Endianness,
    data: &'a ReadCache<&File>,
) -> DynamicInfo {
    let tag = |t: u32| {
        entries
            .iter()
            .find(|d| d.d_tag(endian) == u64::from(t))
            .map(|d| d.d_val(endian))
    };
    // DT_STRTAB is a virtual address; the dynamic string table must be readable without
    // section headers (some binaries strip them).
    let strtab: &'a [u8] = match (tag(elf::DT_STRTAB), tag(elf::DT_STRSZ)) {
        (Some(addr), Some(size)) => find_segment(segments, addr)
            .and_then(|s| (addr - s.vaddr).checked_add(s.offset))
            .and_then(|off| data.read_bytes_at(off, size).ok())
            .unwrap_or_default(),
        _ => &[],
    };
    let string = |off: u64| -> Option<String> {
        let s = strtab.get(usize::try_from(off).ok()?..)?;
        let end = s.iter().position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&s[..end]).into_owned())
    };
    let split = |s: String| -> Vec<String> {
        s.split(':')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let mut info = DynamicInfo::default();
    for d in entries {
        let Some(t) = d.tag32(endian) else { continue };
        if !matches!(
            t,
            elf::DT_NEEDED | elf::DT_RUNPATH | elf::DT_RPATH | elf::DT_SONAME
        ) {
            continue;
        }
        let Some(s) = string(d.d_val(endian)) else {
            continue;
        };
        match t {
            elf::DT_NEEDED => info.needed.push(s),
            elf::DT_RUNPATH => info.runpath.extend(split(s)),
            elf::DT_RPATH => info.rpath.extend(split(s)),
            _ => info.soname = Some(s),
        }
    }
    info
}

/// `DT_NEEDED`, `DT_RUNPATH`, `DT_RPATH` and `DT_SONAME` of the file at `path`.
pub fn dynamic_info(path: impl AsRef<Path>) -> Result<DynamicInfo, TargetError> {
    Ok(ElfFile::parse(path.as_ref(), false, false)?.dynamic)
}

/// Cheap check that `path` is a 64-bit little-endian ELF file of this allocwatch's own
/// architecture (the loader skips other files found on its search path, e.g. 32-bit libraries
/// in `/usr/lib`).
pub fn is_native_elf(path: impl AsRef<Path>) -> bool {
    let mut ident = [0u8; 20];
    let ok = File::open(path).and_then(|mut f| f.read_exact(&mut ident));
    ok.is_ok()
        && ident[..4] == elf::ELFMAG
        && ident[4] == elf::ELFCLASS64
        && ident[5] == elf::ELFDATA2LSB
        && u16::from_le_bytes([ident[18], ident[19]]) == Arch::NATIVE.machine()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The libc this test binary runs on (from its own maps), if it is a glibc or musl.
    pub(crate) fn own_libc() -> Option<PathBuf> {
        let maps = crate::target::maps::read_maps(std::process::id()).ok()?;
        maps.into_iter()
            .filter_map(|m| m.path)
            .find(|p| {
                let name = p.rsplit('/').next().unwrap_or_default();
                name.starts_with("libc.so") || name.starts_with("libc.musl")
            })
            .map(PathBuf::from)
    }

    /// A minimal ELF64 x86-64 executable: `code` loaded from file offset 0x1000 at vaddr
    /// 0x401000 (the entry point; offset and address differ on purpose), and a `PT_INTERP` when
    /// `interp` is given. Without one, and with code that never returns, it runs as a static
    /// program that maps no libc.
    pub(crate) fn test_elf(interp: Option<&str>, code: &[u8]) -> Vec<u8> {
        fn put(b: &mut [u8], at: usize, v: &[u8]) {
            b[at..at + v.len()].copy_from_slice(v);
        }
        let mut b = vec![0u8; 0x1100];
        put(&mut b, 0, &elf::ELFMAG);
        b[4] = elf::ELFCLASS64;
        b[5] = elf::ELFDATA2LSB;
        b[6] = 1; // EV_CURRENT
        put(&mut b, 16, &elf::ET_EXEC.to_le_bytes());
        put(&mut b, 18, &elf::EM_X86_64.to_le_bytes());
        put(&mut b, 20, &1u32.to_le_bytes());
        put(&mut b, 24, &0x401000u64.to_le_bytes()); // e_entry
        put(&mut b, 32, &64u64.to_le_bytes()); // e_phoff
        put(&mut b, 52, &64u16.to_le_bytes()); // e_ehsize
        put(&mut b, 54, &56u16.to_le_bytes()); // e_phentsize
        put(&mut b, 56, &(1 + u16::from(interp.is_some())).to_le_bytes()); // e_phnum
        // PT_LOAD: file 0x1000..0x1100 at 0x401000, memsz larger than filesz.
        let p = 64;
        put(&mut b, p, &elf::PT_LOAD.to_le_bytes());
        put(&mut b, p + 4, &(elf::PF_R | elf::PF_X).to_le_bytes());
        put(&mut b, p + 8, &0x1000u64.to_le_bytes());
        put(&mut b, p + 16, &0x401000u64.to_le_bytes());
        put(&mut b, p + 32, &0x100u64.to_le_bytes());
        put(&mut b, p + 40, &0x2000u64.to_le_bytes());
        put(&mut b, p + 48, &0x1000u64.to_le_bytes());
        if let Some(interp) = interp {
            let p = 64 + 56;
            let len = interp.len() as u64 + 1;
            put(&mut b, p, &elf::PT_INTERP.to_le_bytes());
            put(&mut b, p + 8, &0x200u64.to_le_bytes());
            put(&mut b, p + 16, &0x400200u64.to_le_bytes());
            put(&mut b, p + 32, &len.to_le_bytes());
            put(&mut b, p + 40, &len.to_le_bytes());
            put(&mut b, 0x200, interp.as_bytes());
        }
        for (i, x) in b[0x1000..].iter_mut().enumerate() {
            *x = i as u8;
        }
        put(&mut b, 0x1000, code);
        b
    }

    #[test]
    fn synthetic_offsets_and_interp() {
        let dir = std::env::temp_dir().join(format!("allocwatch-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny");
        std::fs::write(&path, test_elf(Some("/lib64/ld-linux-x86-64.so.2"), &[])).unwrap();
        let f = ElfFile::open(&path).unwrap();
        assert_eq!(f.interpreter(), Some("/lib64/ld-linux-x86-64.so.2"));
        assert!(ElfFile::open(&path).unwrap().is_dynamic());
        assert_eq!(f.arch(), Arch::X86_64);
        assert!(is_native_elf(&path));
        assert_eq!(f.vaddr_to_file_offset(0x401000), Some(0x1000));
        assert_eq!(f.vaddr_to_file_offset(0x4010ff), Some(0x10ff));
        // Past filesz (bss) and outside any segment: no file offset.
        assert_eq!(f.vaddr_to_file_offset(0x401100), None);
        assert_eq!(f.vaddr_to_file_offset(0x400fff), None);
        assert_eq!(
            f.read_at_vaddr(0x401010, 4).unwrap(),
            vec![0x10, 0x11, 0x12, 0x13]
        );
        // Reads stop at the segment's end rather than failing.
        assert_eq!(f.read_at_vaddr(0x4010fe, 16).unwrap(), vec![0xfe, 0xff]);
        assert!(f.read_at_vaddr(0x500000, 1).is_err());
        assert_eq!(f.symbol("malloc"), None);
        assert_eq!(f.dynamic(), &DynamicInfo::default());

        let garbage = dir.join("garbage");
        std::fs::write(&garbage, b"\x7fELF not really").unwrap();
        assert!(matches!(
            ElfFile::open(&garbage),
            Err(TargetError::BadElf { .. })
        ));
        assert!(!is_native_elf(&garbage));
        assert!(matches!(
            ElfFile::open(dir.join("missing")),
            Err(TargetError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn real_libc_symbols() {
        let libc = own_libc().expect("the test binary maps a libc.so");
        let f = ElfFile::open(&libc).unwrap();
        let malloc = f.symbol("malloc").expect("malloc");
        assert!(malloc.size > 0);
        let off = f.vaddr_to_file_offset(malloc.address).unwrap();
        let code = f.function_code(malloc, 64).unwrap();
        assert_eq!(code.len(), 64);
        // The bytes at the file offset are the bytes at the address.
        let mut raw = vec![0u8; 64];
        File::open(&libc)
            .unwrap()
            .read_exact_at(&mut raw, off)
            .unwrap();
        assert_eq!(raw, code);
        assert!(f.symbol("free").is_some());
        assert!(f.symbol("no_such_symbol_here").is_none());
        assert!(!f.dynamic().needed.is_empty(), "libc needs its loader");
        assert_eq!(
            f.dynamic().soname.as_deref(),
            libc.file_name().unwrap().to_str()
        );
    }

    #[test]
    fn own_executable_is_dynamic_and_needs_libc() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        assert!(ElfFile::open(&exe).unwrap().is_dynamic());
        let info = dynamic_info(&exe).unwrap();
        assert!(
            info.needed.iter().any(|n| n.starts_with("libc.so")),
            "{info:?}"
        );
    }
}
