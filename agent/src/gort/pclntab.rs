//! `.gopclntab`: the Go runtime's own table from PC to function, file and line. Stripping
//! (`-ldflags=-s -w`) removes `.symtab` and DWARF but never this table (the runtime needs it for
//! tracebacks and GC), so it is the only way to name functions in stripped Go binaries.
//!
//! Layout as read by Go's `debug/gosym` (pclntab.go) and written by the runtime's `pcHeader`
//! and `_func` (runtime/symtab.go, runtime/runtime2.go), go1.19.8 … go1.27.3:
//! - header: magic u32 (0xfffffffa Go 1.16/1.17, 0xfffffff0 Go 1.18/1.19, 0xfffffff1 Go ≥ 1.20),
//!   two zero bytes, PC quantum, pointer size, then pointer-sized words: nfunc, nfiles,
//!   [textStart, Go ≥ 1.18 only], and the offsets of funcnametab, cutab, filetab, pctab and the
//!   function table (pclntable), all from the header's start;
//! - the function table starts with `nfunc + 1` (entry, funcoff) pairs sorted by entry, the
//!   last entry being the end of text. Go ≥ 1.18 stores them as u32 offsets from the start of
//!   text; Go 1.16/1.17 as absolute pointer-sized PCs;
//! - each `_func` (at pclntable + funcoff) starts with its entry (u32 offset or pointer), then
//!   u32 fields: nameOff, args, deferreturn, pcsp, pcfile, pcln, npcdata, cuOffset, …;
//! - pcfile/pcln are pc-value tables in pctab: (zig-zag value delta, pc delta / quantum) uvarint
//!   pairs; a file number indexes the function's compilation unit in cutab, which gives the
//!   offset of a NUL-terminated name in filetab.
//!
//! Inlined frames (the `InlTree` funcdata) are not expanded: a PC inside inlined code is named
//! after the function it was inlined into, with the inlined code's own file and line, as
//! `debug/gosym` does.

use std::path::{Path, PathBuf};

use super::GoError;
use super::buildinfo::uvarint;
use super::image::Image;

const MAGIC_GO12: u32 = 0xffff_fffb;
const MAGIC_GO116: u32 = 0xffff_fffa;
const MAGIC_GO118: u32 = 0xffff_fff0;
const MAGIC_GO120: u32 = 0xffff_fff1;

/// `_func` field numbers after the entry field (runtime/runtime2.go `_func`; debug/gosym
/// `funcData.field`).
const FIELD_NAME_OFF: usize = 1;
const FIELD_PCFILE: usize = 5;
const FIELD_PCLN: usize = 6;
const FIELD_CU_OFFSET: usize = 8;

/// Offset of `text` in the runtime's `moduledata`, in pointers: pcHeader, six slices
/// (funcnametab, cutab, filetab, pctab, pclntable, ftab), findfunctab, minpc, maxpc
/// (runtime/symtab.go, unchanged go1.16 … go1.27).
const MODULEDATA_TEXT_WORD: usize = 1 + 6 * 3 + 3;
const MODULEDATA_FUNCNAMETAB_WORD: usize = 1;

/// Where the text start of a Go ≥ 1.18 table came from (see [`text_start`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextSource {
    /// Not needed: Go 1.16/1.17 entries are absolute.
    Absolute,
    Moduledata,
    Header,
    TextSection,
    /// Given by the caller of [`Pclntab::parse`].
    Caller,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Go116,
    Go118,
    Go120,
}

/// A function as the pclntab lists it: `[entry, end)` in link-time virtual addresses (add the
/// load bias for a PIE process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function<'a> {
    pub name: &'a str,
    pub entry: u64,
    pub end: u64,
}

/// What a PC maps to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub function: String,
    pub entry: u64,
    pub file: Option<String>,
    pub line: Option<u32>,
}

/// A parsed `.gopclntab`. Parsing reads only the header; lookups decode on demand.
#[derive(Debug)]
pub struct Pclntab {
    path: PathBuf,
    data: Vec<u8>,
    format: Format,
    big_endian: bool,
    quantum: u64,
    ptr_size: usize,
    nfunc: usize,
    text_start: u64,
    text_source: TextSource,
    funcnametab: usize,
    cutab: usize,
    filetab: usize,
    pctab: usize,
    /// Start of the pclntable, which begins with the function table.
    functab: usize,
    /// Bytes per function-table field: 4 (Go ≥ 1.18) or the pointer size.
    field: usize,
}

/// The numbers read from the header, before `text_start` is decided.
struct Header {
    format: Format,
    big_endian: bool,
    quantum: u64,
    ptr_size: usize,
    words: Vec<u64>,
}

impl Pclntab {
    /// Reads the pclntab of the ELF file at `path`; `Ok(None)` when the file is not ELF or has
    /// no Go pclntab.
    pub fn open(path: &Path) -> Result<Option<Self>, GoError> {
        match Image::open(path)? {
            Some(image) => Self::from_image(&image),
            None => Ok(None),
        }
    }

    pub(crate) fn from_image(image: &Image) -> Result<Option<Self>, GoError> {
        // PIE binaries linked externally keep it in .data.rel.ro (cmd/internal/objfile).
        let Some(section) = image
            .section(".gopclntab")
            .or_else(|| image.section(".data.rel.ro.gopclntab"))
        else {
            return Ok(None);
        };
        let data = image.section_data(section)?;
        let header = Self::header(&image.path, &data)?;
        let (text_start, source) = match header.format {
            Format::Go116 => (0, TextSource::Absolute),
            Format::Go118 | Format::Go120 => text_start(image, section.addr, &header)?,
        };
        Self::build(image.path.clone(), data, header, text_start, source).map(Some)
    }

    /// Parses a pclntab already in memory; `text_start` is the address function offsets are
    /// relative to (Go ≥ 1.18; ignored for Go 1.16/1.17, whose entries are absolute).
    pub fn parse(path: &Path, data: Vec<u8>, text_start: u64) -> Result<Self, GoError> {
        let header = Self::header(path, &data)?;
        let source = match header.format {
            Format::Go116 => TextSource::Absolute,
            Format::Go118 | Format::Go120 => TextSource::Caller,
        };
        Self::build(path.to_path_buf(), data, header, text_start, source)
    }

    fn header(path: &Path, data: &[u8]) -> Result<Header, GoError> {
        let bad = |reason: &str| GoError::BadPclntab {
            path: path.to_path_buf(),
            reason: reason.to_owned(),
        };
        let Some(head) = data.get(..8) else {
            return Err(bad("shorter than its header"));
        };
        let le = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let be = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        // The magics read differently in the other byte order, so they also tell endianness.
        let (format, big_endian) = match (le, be) {
            (MAGIC_GO116, _) => (Format::Go116, false),
            (_, MAGIC_GO116) => (Format::Go116, true),
            (MAGIC_GO118, _) => (Format::Go118, false),
            (_, MAGIC_GO118) => (Format::Go118, true),
            (MAGIC_GO120, _) => (Format::Go120, false),
            (_, MAGIC_GO120) => (Format::Go120, true),
            (MAGIC_GO12, _) | (_, MAGIC_GO12) => {
                return Err(GoError::UnsupportedPclntab {
                    path: path.to_path_buf(),
                    magic: MAGIC_GO12,
                });
            }
            _ => return Err(bad("unknown magic")),
        };
        let quantum = head[6];
        let ptr_size = usize::from(head[7]);
        if head[4] != 0
            || head[5] != 0
            || !matches!(quantum, 1 | 2 | 4)
            || !matches!(ptr_size, 4 | 8)
        {
            return Err(bad("bad header padding, PC quantum or pointer size"));
        }
        let nwords = if format == Format::Go116 { 7 } else { 8 };
        let mut words = Vec::with_capacity(nwords);
        for i in 0..nwords {
            let at = 8 + i * ptr_size;
            let word = data
                .get(at..at + ptr_size)
                .ok_or_else(|| bad("header truncated"))?;
            words.push(read_uint(word, big_endian));
        }
        Ok(Header {
            format,
            big_endian,
            quantum: u64::from(quantum),
            ptr_size,
            words,
        })
    }

    fn build(
        path: PathBuf,
        data: Vec<u8>,
        h: Header,
        text_start: u64,
        text_source: TextSource,
    ) -> Result<Self, GoError> {
        let bad = |reason: String| GoError::BadPclntab {
            path: path.clone(),
            reason,
        };
        // Offsets of funcnametab, cutab, filetab, pctab, pclntable, after nfunc and nfiles
        // (and textStart for Go ≥ 1.18).
        let first = if h.format == Format::Go116 { 2 } else { 3 };
        let mut offsets = [0usize; 5];
        for (i, slot) in offsets.iter_mut().enumerate() {
            let value = h.words[first + i];
            *slot = usize::try_from(value)
                .ok()
                .filter(|&o| o <= data.len())
                .ok_or_else(|| bad(format!("table offset {value:#x} lies outside the table")))?;
        }
        let [funcnametab, cutab, filetab, pctab, functab] = offsets;
        let field = if h.format == Format::Go116 {
            h.ptr_size
        } else {
            4
        };
        let nfunc = usize::try_from(h.words[0]).unwrap_or(usize::MAX);
        let table_bytes = nfunc
            .checked_mul(2)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| n.checked_mul(field));
        if table_bytes
            .and_then(|b| b.checked_add(functab))
            .is_none_or(|end| end > data.len())
        {
            return Err(bad(format!("{nfunc} functions do not fit in the table")));
        }
        Ok(Self {
            path,
            data,
            format: h.format,
            big_endian: h.big_endian,
            quantum: h.quantum,
            ptr_size: h.ptr_size,
            nfunc,
            text_start,
            text_source,
            funcnametab,
            cutab,
            filetab,
            pctab,
            functab,
            field,
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The address Go ≥ 1.18 function offsets are relative to.
    pub fn text_start(&self) -> u64 {
        self.text_start
    }

    pub fn text_source(&self) -> TextSource {
        self.text_source
    }

    pub fn len(&self) -> usize {
        self.nfunc
    }

    pub fn is_empty(&self) -> bool {
        self.nfunc == 0
    }

    /// Every function, in address order. Entries whose metadata is malformed are skipped.
    pub fn functions(&self) -> impl Iterator<Item = Function<'_>> + '_ {
        (0..self.nfunc).filter_map(|i| self.function(i))
    }

    /// The function named exactly `name` (e.g. `runtime.hashGrow`,
    /// `internal/runtime/maps.(*table).grow`). Assembly functions share their name with their
    /// ABIInternal wrapper (`go tool nm` calls the assembly one `….abi0`); this returns the
    /// lowest address, [`Self::find_functions`] returns all.
    pub fn find_function(&self, name: &str) -> Option<Function<'_>> {
        self.functions().find(|f| f.name == name)
    }

    pub fn find_functions<'a>(&'a self, name: &'a str) -> impl Iterator<Item = Function<'a>> + 'a {
        self.functions().filter(move |f| f.name == name)
    }

    /// The function containing `pc`. For a return address, pass `pc - 1` to name the call.
    pub fn function_at(&self, pc: u64) -> Option<Function<'_>> {
        self.function(self.index_of(pc)?)
    }

    /// Function, file and line of `pc`.
    pub fn lookup(&self, pc: u64) -> Option<Location> {
        let i = self.index_of(pc)?;
        let func = self.function(i)?;
        let base = self.func_data(i)?;
        let file = self
            .pcvalue(self.func_field(base, FIELD_PCFILE)?, func.entry, pc)
            .and_then(|fno| self.file_name(base, fno));
        let line = self
            .pcvalue(self.func_field(base, FIELD_PCLN)?, func.entry, pc)
            .and_then(|l| u32::try_from(l).ok());
        Some(Location {
            function: func.name.to_owned(),
            entry: func.entry,
            file: file.map(str::to_owned),
            line,
        })
    }

    /// Index of the function containing `pc`, by binary search over the sorted entries.
    fn index_of(&self, pc: u64) -> Option<usize> {
        if self.nfunc == 0 || pc < self.entry(0)? || pc >= self.entry(self.nfunc)? {
            return None;
        }
        let (mut lo, mut hi) = (0, self.nfunc);
        // Invariant: entry(lo) <= pc < entry(hi).
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.entry(mid)? <= pc {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(lo)
    }

    fn function(&self, i: usize) -> Option<Function<'_>> {
        let entry = self.entry(i)?;
        let end = self.entry(i + 1)?;
        let base = self.func_data(i)?;
        let name_off = self.func_field(base, FIELD_NAME_OFF)?;
        let name = self.cstr(self.funcnametab.checked_add(name_off as usize)?)?;
        Some(Function { name, entry, end })
    }

    /// Entry PC of function `i` (`i == nfunc` gives the end of text).
    fn entry(&self, i: usize) -> Option<u64> {
        let raw = self.uint_at(self.functab.checked_add(2 * i * self.field)?, self.field)?;
        Some(match self.format {
            Format::Go116 => raw,
            Format::Go118 | Format::Go120 => self.text_start.wrapping_add(raw),
        })
    }

    /// Offset of function `i`'s `_func` in `data`.
    fn func_data(&self, i: usize) -> Option<usize> {
        let off = self.uint_at(
            self.functab.checked_add((2 * i + 1) * self.field)?,
            self.field,
        )?;
        self.functab.checked_add(usize::try_from(off).ok()?)
    }

    fn func_field(&self, base: usize, n: usize) -> Option<u32> {
        let first = if self.format == Format::Go116 {
            self.ptr_size
        } else {
            4
        };
        let at = base.checked_add(first + (n - 1) * 4)?;
        self.u32_at(at)
    }

    /// Name of file number `fno` of the function at `base` (Go ≥ 1.16: through its CU).
    fn file_name(&self, base: usize, fno: i32) -> Option<&str> {
        let fno = u32::try_from(fno).ok()?;
        let cu = self.func_field(base, FIELD_CU_OFFSET)?;
        if cu == u32::MAX {
            return None;
        }
        let index = usize::try_from(cu.checked_add(fno)?).ok()?;
        let name_off = self.u32_at(self.cutab.checked_add(index.checked_mul(4)?)?)?;
        if name_off == u32::MAX {
            return None;
        }
        self.cstr(self.filetab.checked_add(name_off as usize)?)
    }

    /// The value of the pc-value table at `off` (in pctab) for `target`, in the function
    /// starting at `entry`; as `debug/gosym`'s `pcvalue`.
    fn pcvalue(&self, off: u32, entry: u64, target: u64) -> Option<i32> {
        if off == 0 {
            return None;
        }
        let mut p = self.pctab.checked_add(off as usize)?;
        let mut val: i32 = -1;
        let mut pc = entry;
        loop {
            let first = pc == entry;
            let (uv, n) = uvarint(self.data.get(p..)?)?;
            p += n;
            if uv == 0 && !first {
                return None;
            }
            // Zig-zag in 32 bits, as the runtime's readvarint/step.
            let uv = uv as u32;
            let delta = if uv & 1 != 0 { !(uv >> 1) } else { uv >> 1 } as i32;
            let (pc_delta, n) = uvarint(self.data.get(p..)?)?;
            p += n;
            pc = pc.wrapping_add(pc_delta.wrapping_mul(self.quantum));
            val = val.wrapping_add(delta);
            if target < pc {
                return Some(val);
            }
        }
    }

    /// The NUL-terminated UTF-8 string at `at`.
    fn cstr(&self, at: usize) -> Option<&str> {
        let rest = self.data.get(at..)?;
        let len = rest.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&rest[..len]).ok()
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        self.uint_at(at, 4).map(|v| v as u32)
    }

    fn uint_at(&self, at: usize, size: usize) -> Option<u64> {
        let bytes = self.data.get(at..at.checked_add(size)?)?;
        Some(read_uint(bytes, self.big_endian))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_uint(bytes: &[u8], big_endian: bool) -> u64 {
    let fold = |acc: u64, &b: &u8| (acc << 8) | u64::from(b);
    if big_endian {
        bytes.iter().fold(0, fold)
    } else {
        bytes.iter().rev().fold(0, fold)
    }
}

/// Where Go ≥ 1.18 function offsets start. In order of trust:
/// 1. the runtime's `moduledata.text` (what the runtime itself uses), found as the data word
///    that points at the pclntab header followed by the funcnametab slice;
/// 2. the header's textStart word (Go 1.18–1.25; since Go 1.26 runtime/symtab.go says it is
///    "no longer stored", and it reads 0 in go1.27.3 binaries);
/// 3. the `.text` section address (what `cmd/internal/objfile` uses).
fn text_start(image: &Image, pcln_addr: u64, h: &Header) -> Result<(u64, TextSource), GoError> {
    if let Some(text) = moduledata_text(image, pcln_addr, h)? {
        return Ok((text, TextSource::Moduledata));
    }
    let header_text = h.words[2];
    if header_text != 0 {
        return Ok((header_text, TextSource::Header));
    }
    image
        .section(".text")
        .map(|s| (s.addr, TextSource::TextSection))
        .ok_or_else(|| GoError::BadPclntab {
            path: image.path.clone(),
            reason: "cannot find where text starts (no moduledata, header field or .text)".into(),
        })
}

fn moduledata_text(image: &Image, pcln_addr: u64, h: &Header) -> Result<Option<u64>, GoError> {
    // firstmoduledata is in .noptrdata up to Go 1.25 and in its own .go.module section since
    // Go 1.26 (measured here: go1.25.5 vs go1.26.6, go1.27.3). PIE binaries carry the
    // link-time values in the file too (plus a RELATIVE relocation); should a linker leave
    // zeros there, the scan finds nothing and the next source is used.
    let funcnametab = pcln_addr.wrapping_add(h.words[3]);
    let ptr = h.ptr_size;
    for name in [".go.module", ".noptrdata", ".data.rel.ro", ".data"] {
        let Some(section) = image.section(name) else {
            continue;
        };
        if !section.in_file {
            continue;
        }
        let data = image.section_data(section)?;
        let words = data.len() / ptr;
        let need = MODULEDATA_TEXT_WORD + 1;
        for i in 0..words.saturating_sub(need) {
            let at = i * ptr;
            let word = |n: usize| read_uint(&data[at + n * ptr..at + (n + 1) * ptr], h.big_endian);
            if word(0) == pcln_addr && word(MODULEDATA_FUNCNAMETAB_WORD) == funcnametab {
                let text = word(MODULEDATA_TEXT_WORD);
                if text != 0 {
                    return Ok(Some(text));
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Go 1.20-format table with two functions, built by hand.
    fn synthetic() -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&MAGIC_GO120.to_le_bytes());
        d.extend_from_slice(&[0, 0, 1, 8]);
        // nfunc, nfiles, textStart, funcname, cu, filetab, pctab, pclntab offsets
        let header_words = 8;
        let funcname = 8 + header_words * 8;
        let names = b"main.a\0main.b\0";
        let cu = funcname + names.len();
        let cutab: [u32; 1] = [0];
        let filetab = cu + 4;
        let files = b"a.go\0";
        let pctab = filetab + files.len();
        // pcfile: value 0 for 0x20 bytes; pcln: value 10 for 0x10 bytes, then 12 for 0x10.
        // value delta zig-zag: +1 → 2, +11 → 22, +2 → 4; pc deltas with quantum 1.
        let pcdata: Vec<u8> = vec![2, 0x20, 0, 22, 0x10, 4, 0x10, 0];
        let pcfile_off = 1u32; // offset 0 means "no table"
        let pcln_off = 4u32;
        let pclntab = pctab + pcdata.len() + 1;
        for w in [
            2u64,
            1,
            0x1000,
            funcname as u64,
            cu as u64,
            filetab as u64,
            pctab as u64,
            pclntab as u64,
        ] {
            d.extend_from_slice(&w.to_le_bytes());
        }
        d.extend_from_slice(names);
        for c in cutab {
            d.extend_from_slice(&c.to_le_bytes());
        }
        d.extend_from_slice(files);
        d.push(0xee); // pctab offset 0 is reserved
        d.extend_from_slice(&pcdata);
        assert_eq!(d.len(), pclntab);
        // functab: (entryoff, funcoff) × 2, then the end of text.
        let functab_len = (2 * 2 + 1) * 4;
        let func_size = 44;
        for (i, entry) in [0u32, 0x20].iter().enumerate() {
            d.extend_from_slice(&entry.to_le_bytes());
            d.extend_from_slice(&((functab_len + i * func_size) as u32).to_le_bytes());
        }
        d.extend_from_slice(&0x40u32.to_le_bytes());
        for (entry, name_off) in [(0u32, 0u32), (0x20, 7)] {
            let fields = [entry, name_off, 0, 0, 0, pcfile_off, pcln_off, 0, 0, 0];
            for f in fields {
                d.extend_from_slice(&f.to_le_bytes());
            }
            d.extend_from_slice(&[0, 0, 0, 0]);
        }
        d
    }

    #[test]
    fn decodes_synthetic_table() {
        let t = Pclntab::parse(Path::new("synthetic"), synthetic(), 0x40_1000).unwrap();
        assert_eq!(t.format(), Format::Go120);
        let names: Vec<_> = t.functions().map(|f| (f.name, f.entry, f.end)).collect();
        assert_eq!(
            names,
            [
                ("main.a", 0x40_1000, 0x40_1020),
                ("main.b", 0x40_1020, 0x40_1040)
            ]
        );
        let loc = t.lookup(0x40_1015).unwrap();
        assert_eq!(loc.function, "main.a");
        assert_eq!(loc.file.as_deref(), Some("a.go"));
        assert_eq!(loc.line, Some(12));
        assert_eq!(t.lookup(0x40_1001).unwrap().line, Some(10));
        assert_eq!(t.lookup(0x40_1021).unwrap().function, "main.b");
        assert_eq!(t.lookup(0x40_0fff), None);
        assert_eq!(t.lookup(0x40_1040), None);
        assert_eq!(t.find_function("main.b").map(|f| f.entry), Some(0x40_1020));
    }

    #[test]
    fn truncated_tables_never_panic() {
        let full = synthetic();
        for len in 0..full.len() {
            let Ok(t) = Pclntab::parse(Path::new("cut"), full[..len].to_vec(), 0x1000) else {
                continue;
            };
            for pc in (0x1000..0x1050).step_by(3) {
                let _ = t.lookup(pc);
            }
            let _ = t.functions().count();
        }
        // Corrupt every byte in turn.
        for i in 0..full.len() {
            let mut bad = full.clone();
            bad[i] ^= 0xa5;
            if let Ok(t) = Pclntab::parse(Path::new("flip"), bad, 0x1000) {
                for pc in (0x1000..0x1050).step_by(3) {
                    let _ = t.lookup(pc);
                }
                let _ = t.functions().count();
            }
        }
    }

    #[test]
    fn rejects_unknown_and_old_formats() {
        assert!(matches!(
            Pclntab::parse(Path::new("x"), vec![0; 64], 0),
            Err(GoError::BadPclntab { .. })
        ));
        let mut old = vec![0u8; 64];
        old[..4].copy_from_slice(&MAGIC_GO12.to_le_bytes());
        old[6] = 1;
        old[7] = 8;
        assert!(matches!(
            Pclntab::parse(Path::new("x"), old, 0),
            Err(GoError::UnsupportedPclntab { .. })
        ));
    }
}
