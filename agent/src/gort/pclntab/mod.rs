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
//! Inlined calls: [`Pclntab::lookup`] names a PC inside inlined code after the function it was
//! inlined into, with the inlined code's own file and line (as `debug/gosym` does);
//! [`Pclntab::frames`] expands the inline tree the way the runtime's tracebacks do
//! (runtime/symtabinl.go `newInlineUnwinder`, go1.21 … go1.27; the same loop is in
//! runtime/traceback.go and symtab.go of go1.18/go1.19):
//! - the `_func`'s `PCDATA_InlTreeIndex` (= 2) pc-value table gives, for a PC, the index of its
//!   innermost inlined call in the function's inline tree, or -1 outside inlined code;
//! - the tree is the function's `FUNCDATA_InlTree` (= 3): the u32 funcdata offsets follow the
//!   `npcdata` u32 pcdata offsets right after the fixed part of `_func` (40 bytes for Go
//!   1.18/1.19, 44 from Go 1.20, which added `startLine`; `nfuncdata` is its last byte), and
//!   are relative to `moduledata.gofunc` (`^0`: none);
//! - an entry (`inlinedCall`) names the inlined function (`nameOff` into funcnametab) and gives
//!   `parentPc`, the offset from the function's entry of an instruction whose position is the
//!   call site: the caller's frame is the same lookup at `entry + parentPc`, until the index
//!   is -1, which is the physical function. Every frame's file and line are the pcfile/pcln
//!   values at its PC. Layout: Go 1.18/1.19 `{parent i16, funcID u8, _ u8, file i32, line i32,
//!   func_ i32, parentPc i32}` (20 bytes, runtime/symtab.go go1.19.8); from Go 1.20
//!   `{funcID u8, _ [3]u8, nameOff i32, parentPc i32, startLine i32}` (16 bytes,
//!   runtime/symtabinl.go go1.23.9, go1.25.5, go1.26.6, go1.27.3).
//!
//! Where a tree cannot be read with confidence ([`Inlines::Unavailable`]: Go 1.16/1.17 tables,
//! whose funcdata are pointers; no moduledata; a Go version whose moduledata layout was not
//! read; an entry out of bounds), `frames` gives the one frame `lookup` gives: a missing
//! inlined frame, never a wrong one.

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
const FIELD_NPCDATA: usize = 7;
const FIELD_CU_OFFSET: usize = 8;

const GO116_INLINES: &str = "Go 1.16/1.17 tables keep their inline trees behind pointers";

/// The fields of an `inlinedCall` that the expansion uses.
#[derive(Clone, Copy, Debug)]
struct InlinedCall {
    name_off: i32,
    parent_pc: i32,
}

/// Offset of `text` in the runtime's `moduledata`, in pointers: pcHeader, six slices
/// (funcnametab, cutab, filetab, pctab, pclntable, ftab), findfunctab, minpc, maxpc
/// (runtime/symtab.go, unchanged go1.16 … go1.27).
const MODULEDATA_TEXT_WORD: usize = 1 + 6 * 3 + 3;
const MODULEDATA_FUNCNAMETAB_WORD: usize = 1;

/// Offset of `gofunc` (the base of funcdata offsets) in `moduledata`, in pointers, for Go
/// (major, minor); `None` where the layout was not read. After `text`: etext, noptrdata,
/// enoptrdata, data, edata, bss, ebss, noptrbss, enoptrbss, then
/// - go1.18/1.19: end, gcdata, gcbss, types, etypes, rodata, gofunc (runtime/symtab.go
///   go1.19.8; go1.18 as go1.18rc1's, quoted by github.com/Aoi-hosizora/ahlib xreflect);
/// - go1.20 … go1.26: covctrs, ecovctrs before end (go1.23.9, go1.25.5, go1.26.6, which adds
///   epclntab after gofunc; go1.20 as quoted by github.com/bytedance/sonic loader);
/// - go1.27: types, typedesclen, etypes, itaboffset, itabsize, rodata, gofunc (go1.27.3).
fn moduledata_gofunc_word(minor: u32) -> Option<usize> {
    match minor {
        18 | 19 => Some(MODULEDATA_TEXT_WORD + 16),
        20..=26 => Some(MODULEDATA_TEXT_WORD + 18),
        27 => Some(MODULEDATA_TEXT_WORD + 21),
        _ => None,
    }
}

/// `PCDATA_InlTreeIndex` and `FUNCDATA_InlTree` (runtime/symtab.go go1.19.8,
/// internal/abi/symtab.go go1.23.9 … go1.27.3).
const PCDATA_INL_TREE_INDEX: usize = 2;
const FUNCDATA_INL_TREE: usize = 3;
/// Inlined calls followed at most at one PC: the compiler's trees are far shallower, and a
/// corrupt table whose parent PCs loop must end.
const MAX_INLINE_DEPTH: usize = 100;

/// Whether [`Pclntab::frames`] can expand inlined calls, and why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inlines {
    Expanded,
    /// Every PC gives one frame, as [`Pclntab::lookup`].
    Unavailable(String),
}

/// Where the inline trees are: the bytes from `moduledata.gofunc` on. Go 1.27 puts `go:func.*`
/// inside `.gopclntab`; earlier versions in `.rodata`.
#[derive(Debug)]
pub enum GoFunc {
    /// At this offset of the table's own bytes.
    InTable(usize),
    /// From `gofunc` to the end of the section holding it.
    Bytes(Vec<u8>),
}

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
    /// The inline trees, when they can be read (see [`Inlines`]).
    gofunc: Result<GoFunc, String>,
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
        let moduledata = match header.format {
            Format::Go116 => None,
            Format::Go118 | Format::Go120 => find_moduledata(image, section.addr, &header)?,
        };
        let (text_start, source) = match header.format {
            Format::Go116 => (0, TextSource::Absolute),
            Format::Go118 | Format::Go120 => text_start(image, moduledata.as_deref(), &header)?,
        };
        let gofunc = gofunc(image, section, &header, moduledata.as_deref());
        let mut tab = Self::build(image.path.clone(), data, header, text_start, source)?;
        tab.gofunc = gofunc;
        Ok(Some(tab))
    }

    /// Parses a pclntab already in memory; `text_start` is the address function offsets are
    /// relative to (Go ≥ 1.18; ignored for Go 1.16/1.17, whose entries are absolute). Inlined
    /// calls are not expanded until [`Self::set_gofunc`] says where the trees are.
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
            gofunc: Err("where the inline trees are (moduledata.gofunc) is not known".into()),
        })
    }

    /// Where `moduledata.gofunc` is, so that [`Self::frames`] expands inlined calls. Go
    /// 1.16/1.17 tables keep their funcdata elsewhere: they ignore it.
    pub fn set_gofunc(&mut self, gofunc: GoFunc) {
        self.gofunc = match self.format {
            Format::Go116 => Err(GO116_INLINES.into()),
            Format::Go118 | Format::Go120 => Ok(gofunc),
        };
    }

    /// Whether [`Self::frames`] expands inlined calls.
    pub fn inlines(&self) -> Inlines {
        match &self.gofunc {
            Ok(_) => Inlines::Expanded,
            Err(why) => Inlines::Unavailable(why.clone()),
        }
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

    /// The source frames at `pc`, innermost first: one per inlined call it is inside, each
    /// named after the inlined function with its own file and line, then the physical function
    /// (whose `entry` every frame carries). Empty when no function contains `pc`. For a return
    /// address, pass `pc - 1`. Where the inline tree cannot be read, the one frame of
    /// [`Self::lookup`].
    pub fn frames(&self, pc: u64) -> Vec<Location> {
        let Some(i) = self.index_of(pc) else {
            return Vec::new();
        };
        match self.expand(i, pc) {
            Some(frames) => frames,
            None => self.lookup(pc).into_iter().collect(),
        }
    }

    /// [`Self::frames`] for `pc` in function `i`; `None` when anything on the way is malformed.
    fn expand(&self, i: usize, pc: u64) -> Option<Vec<Location>> {
        let gofunc = self.gofunc.as_ref().ok()?;
        let func = self.function(i)?;
        let base = self.func_data(i)?;
        let located = |name: &str, at: u64| {
            let file = self
                .pcvalue(self.func_field(base, FIELD_PCFILE)?, func.entry, at)
                .and_then(|fno| self.file_name(base, fno));
            let line = self
                .pcvalue(self.func_field(base, FIELD_PCLN)?, func.entry, at)
                .and_then(|l| u32::try_from(l).ok());
            Some(Location {
                function: name.to_owned(),
                entry: func.entry,
                file: file.map(str::to_owned),
                line,
            })
        };
        let Some(tree) = self.funcdata(base, FUNCDATA_INL_TREE) else {
            return Some(vec![located(func.name, pc)?]);
        };
        let index_table = self.pcdata(base, PCDATA_INL_TREE_INDEX);
        let mut frames = Vec::new();
        let mut at = pc;
        for _ in 0..MAX_INLINE_DEPTH {
            // A missing table or a PC it does not cover is -1, as the runtime's pcvalue says.
            let index = index_table
                .and_then(|t| self.pcvalue(t, func.entry, at))
                .unwrap_or(-1);
            let Ok(index) = usize::try_from(index) else {
                frames.push(located(func.name, at)?);
                return Some(frames);
            };
            let call = self.inlined_call(gofunc, tree, index)?;
            frames.push(located(self.inlined_name(call.name_off)?, at)?);
            // The caller's position: an instruction of the physical function.
            let parent = func
                .entry
                .checked_add(u64::try_from(call.parent_pc).ok()?)?;
            if parent >= func.end {
                return None;
            }
            at = parent;
        }
        None
    }

    /// Offset in pctab of pc-value table `n` of the `_func` at `base` (`None`: it has none).
    fn pcdata(&self, base: usize, n: usize) -> Option<u32> {
        let npcdata = self.func_field(base, FIELD_NPCDATA)? as usize;
        if n >= npcdata {
            return None;
        }
        let at = base
            .checked_add(self.func_fixed_size())?
            .checked_add(n.checked_mul(4)?)?;
        self.u32_at(at).filter(|&off| off != 0)
    }

    /// Offset from `gofunc` of funcdata `n` of the `_func` at `base` (`None`: it has none).
    fn funcdata(&self, base: usize, n: usize) -> Option<u32> {
        let fixed = self.func_fixed_size();
        let nfuncdata = usize::from(*self.data.get(base.checked_add(fixed - 1)?)?);
        if n >= nfuncdata {
            return None;
        }
        let npcdata = self.func_field(base, FIELD_NPCDATA)? as usize;
        let at = base
            .checked_add(fixed)?
            .checked_add(npcdata.checked_add(n)?.checked_mul(4)?)?;
        self.u32_at(at).filter(|&off| off != u32::MAX)
    }

    /// Bytes of `_func` before its pcdata offsets (runtime2.go `_func`): Go 1.20 added
    /// `startLine`.
    fn func_fixed_size(&self) -> usize {
        match self.format {
            Format::Go120 => 44,
            Format::Go118 | Format::Go116 => 40,
        }
    }

    /// Entry `index` of the inline tree at `tree` (an offset from `gofunc`).
    fn inlined_call(&self, gofunc: &GoFunc, tree: u32, index: usize) -> Option<InlinedCall> {
        let size = match self.format {
            Format::Go120 => 16,
            Format::Go118 => 20,
            Format::Go116 => return None,
        };
        let offset = (tree as usize).checked_add(index.checked_mul(size)?)?;
        let (bytes, at) = match gofunc {
            GoFunc::InTable(start) => (&self.data[..], start.checked_add(offset)?),
            GoFunc::Bytes(bytes) => (&bytes[..], offset),
        };
        let entry = bytes.get(at..at.checked_add(size)?)?;
        let i32_at = |o: usize| read_uint(&entry[o..o + 4], self.big_endian) as u32 as i32;
        Some(match self.format {
            Format::Go120 => InlinedCall {
                name_off: i32_at(4),
                parent_pc: i32_at(8),
            },
            _ => InlinedCall {
                name_off: i32_at(12),
                parent_pc: i32_at(16),
            },
        })
    }

    /// The function name at `name_off` in funcnametab, which must be the start of a name (the
    /// names are NUL-terminated back to back): a misread tree gives no name, not a wrong one.
    fn inlined_name(&self, name_off: i32) -> Option<&str> {
        let at = self
            .funcnametab
            .checked_add(usize::try_from(name_off).ok()?)?;
        if name_off > 0 && *self.data.get(at - 1)? != 0 {
            return None;
        }
        self.cstr(at).filter(|name| !name.is_empty())
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
/// 1. the runtime's `moduledata.text` (what the runtime itself uses), see [`find_moduledata`];
/// 2. the header's textStart word (Go 1.18–1.25; since Go 1.26 runtime/symtab.go says it is
///    "no longer stored", and it reads 0 in go1.27.3 binaries);
/// 3. the `.text` section address (what `cmd/internal/objfile` uses).
fn text_start(
    image: &Image,
    moduledata: Option<&[u64]>,
    h: &Header,
) -> Result<(u64, TextSource), GoError> {
    let text = moduledata.and_then(|m| m.get(MODULEDATA_TEXT_WORD).copied());
    if let Some(text) = text.filter(|&t| t != 0) {
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

/// Words of the runtime's `moduledata` read from the file (as many as its section holds, up
/// to [`MODULEDATA_MAX_WORDS`]), found as the data word that points at the pclntab header
/// followed by the funcnametab slice.
fn find_moduledata(image: &Image, pcln_addr: u64, h: &Header) -> Result<Option<Vec<u64>>, GoError> {
    // firstmoduledata is in .noptrdata up to Go 1.25 and in its own .go.module section since
    // Go 1.26 (measured here: go1.25.5 vs go1.26.6, go1.27.3). PIE binaries carry the
    // link-time values in the file too (plus a RELATIVE relocation); should a linker leave
    // zeros there, the scan finds nothing (or zero words) and the next source is used.
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
        let word = |n: usize| read_uint(&data[n * ptr..(n + 1) * ptr], h.big_endian);
        for i in 0..words.saturating_sub(need) {
            if word(i) == pcln_addr && word(i + MODULEDATA_FUNCNAMETAB_WORD) == funcnametab {
                let end = words.min(i + MODULEDATA_MAX_WORDS);
                return Ok(Some((i..end).map(word).collect()));
            }
        }
    }
    Ok(None)
}

/// `moduledata` words read: past `gofunc` in every layout of [`moduledata_gofunc_word`].
const MODULEDATA_MAX_WORDS: usize = 48;

/// Where the inline trees of the table in `pcln` are, or why they cannot be read.
fn gofunc(
    image: &Image,
    pcln: &super::image::Section,
    h: &Header,
    moduledata: Option<&[u64]>,
) -> Result<GoFunc, String> {
    if h.format == Format::Go116 {
        return Err(GO116_INLINES.into());
    }
    // The moduledata layout depends on the Go version, which .go.buildinfo records.
    let version = super::buildinfo::from_image(image)
        .ok()
        .flatten()
        .and_then(|info| super::buildinfo::GoVersion::parse(&info.version))
        .ok_or("no readable Go version in .go.buildinfo")?;
    let formats_agree = match h.format {
        Format::Go118 => !version.at_least(1, 20),
        _ => version.at_least(1, 20),
    };
    if version.major != 1 || !formats_agree {
        return Err(format!("Go {version} with a {:?} table", h.format));
    }
    let word = moduledata_gofunc_word(version.minor)
        .ok_or_else(|| format!("the moduledata layout of Go {version} was not read"))?;
    let moduledata = moduledata.ok_or("no moduledata found")?;
    let gofunc = *moduledata
        .get(word)
        .ok_or("moduledata cut short by its section")?;
    // rodata comes right before gofunc in every layout: a misplaced word shows here.
    if gofunc == 0 || moduledata[word - 1] > gofunc {
        return Err(format!("implausible moduledata.gofunc {gofunc:#x}"));
    }
    if let Some(off) = gofunc.checked_sub(pcln.addr).filter(|&o| o < pcln.size) {
        return usize::try_from(off)
            .map(GoFunc::InTable)
            .map_err(|e| e.to_string());
    }
    let section = image
        .sections
        .iter()
        .find(|s| s.in_file && s.addr != 0 && gofunc >= s.addr && gofunc - s.addr < s.size)
        .ok_or_else(|| format!("moduledata.gofunc {gofunc:#x} is in no section"))?;
    let skip = gofunc - section.addr;
    image
        .read_at(section.offset + skip, section.size - skip)
        .map(GoFunc::Bytes)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
