//! Symbol probes: `--probe 'BINARY:SYMBOL[:ARG as NAME]…'` (count the calls of any function,
//! summing integer arguments) and the built-in container-growth kinds, found by name in an
//! ELF symbol table (mangled, or demangled for C++ and Rust):
//!
//! | kind | functions | where |
//! |---|---|---|
//! | `cxx_vector_grow` | `std::vector<…>::_M_realloc_insert` / `_M_realloc_append` | the executable (templates are instantiated there) |
//! | `cxx_hash_rehash` | `std::__detail::_Prime_rehash_policy::_M_next_bkt` | libstdc++ (or a static executable) |
//! | `rust_vec_grow` | `alloc::raw_vec::…::finish_grow` | the executable |
//! | `rust_hash_rehash` | `hashbrown::raw::RawTable<…>::reserve_rehash` | the executable |
//! | `py_dict` | CPython's `dictresize` | the interpreter (or libpython), or its debug file |
//! | `py_list` | CPython's `list_resize`, the calls that reallocate | the same |
//!
//! Why these functions: GCC inlines `_Hashtable::_M_rehash` into the insert at -O2 (no symbol
//! left in the binary), while every growth decision of the prime rehash policy calls
//! `_M_next_bkt` in libstdc++; `_M_realloc_insert` is out of line (cold). In Rust every
//! `RawVec` growth (`grow_one`, `reserve`, `try_reserve`) ends in the one out-of-line
//! `finish_grow`, so it alone counts each growth once; `reserve_rehash` is hashbrown's cold
//! out-of-line path of a full table.
//!
//! Python (CPython 3.11, the versions in [`CPYTHONS`]): `dictresize(PyDictObject *mp, uint8_t
//! log2_newsize, int unicode)` builds a new keys table on every call (growth on insert, a
//! presize in `dict.update`/`fromkeys`, a split table made combined), so every call counts.
//! `list_resize(PyListObject *self, Py_ssize_t newsize)` is also called when the allocation
//! already fits (every `list.pop`, an `extend` within the over-allocation) and returns early
//! when `allocated >= newsize && newsize >= (allocated >> 1)`: the probe reads `allocated`
//! from `self` (the offset is per version, below) and counts only the other calls, the ones
//! that reallocate. Reading the arguments at the entry, rather than probing the first
//! instruction past the check, keeps the rule independent of how a compiler laid the
//! function out (in Debian's LTO build the realloc path is reached by two branches, one of
//! them from a block placed after the function's return); the price is one trap (an emulated
//! `push`) per early return as well. Both are static functions: Debian's stripped
//! `/usr/bin/python3.11` has them only in its build-id debug file (`python3.11-dbg`), read
//! when the binary has no `.symtab` (see `debuginfo.rs`). Debian's build also inlines copies
//! of `list_resize` (into `PyList_Append` for C callers, `list.pop`, slice assignment);
//! those have no symbol and are not counted. Python-level `append`, `extend`, `insert` and
//! list comprehensions call the out-of-line function.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use allocwatch_common::symprobe::ARGS;

use super::{
    TargetError, debuginfo,
    elf::{ElfFile, Symbol},
    maps::MapEntry,
    placement::{self, Request},
};

/// Registers of the SysV integer arguments, in order (`arg0` = rdi …).
const ARG_REGS: [iced_x86::Register; ARGS] = [
    iced_x86::Register::RDI,
    iced_x86::Register::RSI,
    iced_x86::Register::RDX,
    iced_x86::Register::RCX,
    iced_x86::Register::R8,
    iced_x86::Register::R9,
];

/// One `--probe` as given: the file, the symbol (mangled or demangled), and the arguments to
/// sum (register index, name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    pub binary: PathBuf,
    pub symbol: String,
    pub args: Vec<(u8, String)>,
}

impl std::str::FromStr for ProbeSpec {
    type Err = String;

    /// `BINARY:SYMBOL[:ARG as NAME]…`. The binary ends at the first `:`; `:argN as NAME`
    /// suffixes are taken from the end, so a C++ symbol may contain `::`.
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "expected BINARY:SYMBOL[:argN as NAME]…, e.g. \
                     /usr/bin/python3.11:dictresize:arg1 as log2_size";
        let (binary, mut rest) = s
            .split_once(':')
            .filter(|(b, r)| !b.is_empty() && !r.is_empty())
            .ok_or_else(|| usage.to_owned())?;
        let mut args = Vec::new();
        while let Some((head, tail)) = rest.rsplit_once(':') {
            let Some((arg, name)) = tail.split_once(" as ") else {
                break;
            };
            let reg = arg
                .trim()
                .strip_prefix("arg")
                .and_then(|n| n.parse::<u8>().ok())
                .filter(|&n| usize::from(n) < ARGS)
                .ok_or_else(|| format!("{arg:?}: an argument is arg0 … arg5"))?;
            let name = name.trim();
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(format!(
                    "{name:?}: an argument's name is letters, digits and `_`"
                ));
            }
            if args.iter().any(|(_, n)| n == name) {
                return Err(format!("argument name {name:?} given twice"));
            }
            args.push((reg, name.to_owned()));
            rest = head;
        }
        args.reverse();
        if rest.is_empty() || rest.ends_with(':') && !rest.ends_with("::") {
            return Err(usage.to_owned());
        }
        if args.len() > ARGS {
            return Err(format!("at most {ARGS} arguments per probe"));
        }
        Ok(ProbeSpec {
            binary: PathBuf::from(binary),
            symbol: rest.to_owned(),
            args,
        })
    }
}

impl std::fmt::Display for ProbeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.binary.display(), self.symbol)?;
        for (reg, name) in &self.args {
            write!(f, ":arg{reg} as {name}")?;
        }
        Ok(())
    }
}

/// What one probe id counts: a built-in kind or a `--probe`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeKind {
    /// The `kind` in reports and metrics: a built-in's name, or the probe's symbol as given.
    pub name: String,
    /// Names of the summed arguments, by slot.
    pub args: Vec<String>,
    /// Built in (counted wherever found) rather than asked for.
    pub builtin: bool,
}

/// The built-in kinds, ids 0.. in this order; `--probe`s follow.
pub const BUILTINS: [&str; 6] = [
    "cxx_vector_grow",
    "cxx_hash_rehash",
    "rust_vec_grow",
    "rust_hash_rehash",
    "py_dict",
    "py_list",
];
const CXX_VECTOR_GROW: u32 = 0;
const CXX_HASH_REHASH: u32 = 1;
const RUST_VEC_GROW: u32 = 2;
const RUST_HASH_REHASH: u32 = 3;
const PY_DICT: u32 = 4;
const PY_LIST: u32 = 5;

/// A CPython version whose growth functions were checked in its sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CPython {
    /// `(major, minor)`, as `Py_Version` (`PY_VERSION_HEX`, exported since 3.11) gives it.
    pub version: (u8, u8),
    /// Offset of `allocated` in `PyListObject`.
    pub list_allocated: u8,
}

/// 3.11: Include/cpython/listobject.h, `PyObject_VAR_HEAD` (refcnt, type, size: 24 bytes),
/// `ob_item`, `allocated` (the layout Debian's python3.11-dbg's DWARF gives too);
/// Objects/listobject.c `list_resize`'s early return and Objects/dictobject.c `dictresize` as
/// described above. Add a version only after reading its sources: 3.12 passes the
/// interpreter state to `dictresize` first, free-threaded builds have a larger header.
pub const CPYTHONS: &[CPython] = &[CPython {
    version: (3, 11),
    list_allocated: 32,
}];

/// The libstdc++ rehash policy's bucket-count choice (exact mangled name: a stable ABI).
const PRIME_NEXT_BKT: &str = "_ZNKSt8__detail20_Prime_rehash_policy11_M_next_bktEm";

/// Every probe id's kind: the built-ins, then the `specs` in order.
pub fn kinds(specs: &[ProbeSpec]) -> Vec<ProbeKind> {
    BUILTINS
        .iter()
        .map(|b| ProbeKind {
            name: (*b).to_owned(),
            args: Vec::new(),
            builtin: true,
        })
        .chain(specs.iter().map(|s| ProbeKind {
            name: s.symbol.clone(),
            args: s.args.iter().map(|(_, n)| n.clone()).collect(),
            builtin: false,
        }))
        .collect()
}

/// A probe id's kind with `'static` names, for the agent's export model (made once at start
/// from its configuration, so the names leaked are bounded by it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticKind {
    pub name: &'static str,
    /// Names of the summed arguments, by slot.
    pub args: Vec<&'static str>,
}

/// [`kinds`] with `'static` names, by probe id.
pub fn static_kinds(specs: &[ProbeSpec]) -> Vec<StaticKind> {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    kinds(specs)
        .into_iter()
        .enumerate()
        .map(|(i, k)| StaticKind {
            name: match BUILTINS.get(i) {
                Some(b) if k.builtin => b,
                _ => leak(k.name),
            },
            args: k.args.into_iter().map(leak).collect(),
        })
        .collect()
}

/// One probed instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymPoint {
    pub probe: u32,
    /// The symbol as found (mangled).
    pub symbol: String,
    pub file_offset: u64,
    pub sp_delta: u32,
    /// Argument register index per slot.
    pub args: [Option<u8>; ARGS],
    /// Count only the calls CPython's `list_resize` does not return early from; the offset of
    /// `allocated` in the list (see the module's doc).
    pub list_resize_check: Option<u8>,
}

/// One file's symbol probes.
#[derive(Clone, Debug)]
pub struct SymTarget {
    pub path: PathBuf,
    pub points: Vec<SymPoint>,
}

/// A `--probe` that names nothing.
#[derive(Debug, thiserror::Error)]
pub enum SymError {
    /// The file's error as text: its own chain repeats the path.
    #[error("--probe {}: {reason}", binary.display())]
    Binary { binary: PathBuf, reason: String },
    #[error(
        "--probe {}:{symbol}: no function {symbol} in {} (neither its mangled nor its demangled \
         name, in it or its debug file; `nm -C` lists them)", binary.display(), binary.display()
    )]
    NoSymbol { binary: PathBuf, symbol: String },
}

/// A symbol's names to match: the mangled one, and the demangled one (C++: also without its
/// parameter list; Rust: without the hash).
fn demangled(name: &str) -> Option<String> {
    if let Ok(d) = rustc_demangle::try_demangle(name) {
        return Some(format!("{d:#}"));
    }
    if name.starts_with("_Z") {
        return cpp_demangle::Symbol::new(name)
            .ok()
            .and_then(|s| s.demangle().ok());
    }
    None
}

/// A C++ demangled name without its parameter list and return type: `void ns::f<int>(long)`
/// → `ns::f<int>`.
fn cxx_bare(d: &str) -> &str {
    let mut depth = 0i32;
    let mut end = d.len();
    for (i, c) in d.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            '(' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let head = &d[..end];
    // A template function's demangled name starts with its return type.
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in head.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            ' ' if depth == 0 => start = i + 1,
            _ => {}
        }
    }
    &head[start..]
}

/// The points of `symbols` (unique by address) for probe `probe`.
fn points_of(
    elf: &ElfFile,
    symbols: &[(String, Symbol)],
    probe: u32,
    args: &[(u8, String)],
    list_resize_check: Option<u8>,
) -> Vec<SymPoint> {
    let mut seen = BTreeSet::new();
    let mut needed: Vec<_> = args
        .iter()
        .map(|(r, _)| ARG_REGS[usize::from(*r)])
        .collect();
    if list_resize_check.is_some() {
        // `self` and `newsize`.
        needed.extend([iced_x86::Register::RDI, iced_x86::Register::RSI]);
    }
    let mut slots = [None; ARGS];
    for (slot, (reg, _)) in slots.iter_mut().zip(args) {
        *slot = Some(*reg);
    }
    let mut out = Vec::new();
    for (name, sym) in symbols {
        if sym.address == 0 || !seen.insert(sym.address) {
            continue;
        }
        let Some(offset) = elf.vaddr_to_file_offset(sym.address) else {
            continue;
        };
        let req = Request {
            needed: &needed,
            with_return: false,
            skip_stack_check: false,
        };
        let site = match elf.function_code(*sym, 256) {
            Ok(code) => placement::place(elf.arch(), &code, sym.address, &req),
            Err(_) => placement::Placement {
                offset_in_function: 0,
                sp_delta: 0,
                emulated: false,
            },
        };
        out.push(SymPoint {
            probe,
            symbol: name.clone(),
            file_offset: offset + site.offset_in_function,
            sp_delta: site.sp_delta,
            args: slots,
            list_resize_check,
        });
    }
    out
}

/// The points of one `--probe` (id `probe`) in its file: the exact symbol, else every
/// function whose demangled name (C++: without parameters and return type, too) is the one
/// given.
pub fn for_spec(spec: &ProbeSpec, probe: u32) -> Result<SymTarget, SymError> {
    let elf = ElfFile::open(&spec.binary).map_err(|e| SymError::Binary {
        binary: spec.binary.clone(),
        reason: match e {
            TargetError::Io { source, .. } => source.to_string(),
            e => e.to_string(),
        },
    })?;
    let mut found = named(&elf, &spec.symbol);
    // A static function of a stripped binary: its debug file names it, at the binary's own
    // addresses (which the binary's program headers turn into file offsets).
    if found.is_empty()
        && let Some(debug) = debug_symbols(&elf)
    {
        found = named(&debug, &spec.symbol);
    }
    let points = points_of(&elf, &found, probe, &spec.args, None);
    if points.is_empty() {
        return Err(SymError::NoSymbol {
            binary: spec.binary.clone(),
            symbol: spec.symbol.clone(),
        });
    }
    Ok(SymTarget {
        path: spec.binary.clone(),
        points,
    })
}

/// The functions of `elf` named `symbol`: the exact symbol, else every function whose
/// demangled name (C++: without parameters and return type, too), or whose name without a
/// GCC clone suffix (`dictresize.lto_priv.0`), is the one given.
fn named(elf: &ElfFile, symbol: &str) -> Vec<(String, Symbol)> {
    if let Some(sym) = elf.symbol(symbol) {
        return vec![(symbol.to_owned(), sym)];
    }
    let mut v: Vec<_> = elf
        .symbols()
        .filter(|(name, _)| {
            gcc_base(name).is_some_and(|b| b != *name && b == symbol)
                || demangled(name).is_some_and(|d| d == symbol || cxx_bare(&d) == symbol)
        })
        .map(|(n, s)| (n.to_owned(), s))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The symbols of the separate debug file of a binary without `.symtab`, if it has one.
fn debug_symbols(elf: &ElfFile) -> Option<ElfFile> {
    if elf.has_symtab() {
        return None;
    }
    let found = debuginfo::find_for(elf.path())?;
    ElfFile::open_debug_file(&found.path)
        .inspect_err(|e| log::debug!("{}: {e}", found.found.display()))
        .ok()
}

/// A C function's name without the suffix GCC gives a copy that keeps its signature
/// (`.lto_priv.N`: a static function renamed by link-time optimization). Other suffixes are
/// not the function as written: `.part.N`/`.cold` are pieces of it, `.isra.N`/`.constprop.N`
/// take other arguments.
fn gcc_base(name: &str) -> Option<&str> {
    match name.split_once('.') {
        None => Some(name),
        Some((base, "lto_priv")) => Some(base),
        Some((base, rest)) => rest
            .strip_prefix("lto_priv.")
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .map(|_| base),
    }
}

/// The CPython version a file is the interpreter (or libpython) of, from its `Py_Version`.
fn cpython_version(elf: &ElfFile, debug: Option<&ElfFile>) -> Option<(u8, u8)> {
    let sym = elf
        .symbol("Py_Version")
        .or_else(|| debug.and_then(|d| d.symbol("Py_Version")))?;
    let bytes = elf.read_at_vaddr(sym.address, 4).ok()?;
    let hex = u32::from_le_bytes(bytes.try_into().ok()?);
    Some(((hex >> 24) as u8, (hex >> 16) as u8))
}

/// Which Python kind a C symbol is, in a CPython of known layout.
fn py_kind(name: &str) -> Option<u32> {
    match gcc_base(name)? {
        "dictresize" => Some(PY_DICT),
        "list_resize" => Some(PY_LIST),
        _ => None,
    }
}

/// Which built-in kind a mangled symbol is, if any. The mangled name is checked for the
/// function's identifier first (cheap), the demangled one for its namespace.
pub fn builtin_kind(name: &str) -> Option<u32> {
    if name == PRIME_NEXT_BKT {
        return Some(CXX_HASH_REHASH);
    }
    let cxx_vector = name.contains("_M_realloc_insert") || name.contains("_M_realloc_append");
    let rust_vec = name.contains("finish_grow");
    let rust_hash = name.contains("reserve_rehash");
    if !(cxx_vector || rust_vec || rust_hash) {
        return None;
    }
    let d = demangled(name)?;
    let bare = if name.starts_with("_Z") && rustc_demangle::try_demangle(name).is_err() {
        cxx_bare(&d)
    } else {
        &d
    };
    if cxx_vector
        && bare.starts_with("std::vector<")
        && (bare.contains(">::_M_realloc_insert") || bare.contains(">::_M_realloc_append"))
    {
        return Some(CXX_VECTOR_GROW);
    }
    if rust_vec && bare.contains("raw_vec") && bare.contains("finish_grow") {
        return Some(RUST_VEC_GROW);
    }
    if rust_hash && bare.contains("hashbrown") && bare.contains("reserve_rehash") {
        return Some(RUST_HASH_REHASH);
    }
    None
}

/// The built-in growth functions of one file; `None` when it has none.
pub fn builtins_in(path: &Path) -> Result<Option<SymTarget>, TargetError> {
    let elf = ElfFile::open(path)?;
    let debug = debug_symbols(&elf);
    let cpython = cpython_version(&elf, debug.as_ref()).and_then(|v| {
        let known = CPYTHONS.iter().find(|c| c.version == v).copied();
        if known.is_none() {
            log::debug!(
                "{}: CPython {}.{}: its growth functions are not known",
                path.display(),
                v.0,
                v.1
            );
        }
        known
    });
    let mut by_kind: Vec<(u32, String, Symbol)> = elf
        .symbols()
        .chain(debug.iter().flat_map(ElfFile::symbols))
        .filter_map(|(name, sym)| {
            let kind = builtin_kind(name).or_else(|| cpython.and_then(|_| py_kind(name)))?;
            Some((kind, name.to_owned(), sym))
        })
        .collect();
    by_kind.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut points = Vec::new();
    for kind in 0..BUILTINS.len() as u32 {
        let syms: Vec<(String, Symbol)> = by_kind
            .iter()
            .filter(|(k, _, _)| *k == kind)
            .map(|(_, n, s)| (n.clone(), *s))
            .collect();
        let check = cpython
            .filter(|_| kind == PY_LIST)
            .map(|c| c.list_allocated);
        points.extend(points_of(&elf, &syms, kind, &[], check));
    }
    Ok((!points.is_empty()).then(|| SymTarget {
        path: path.to_owned(),
        points,
    }))
}

/// Whether a library (its file name) may hold built-in growth functions of its own:
/// libstdc++ (the C++ rehash policy) and libpython (CPython's, for programs that embed it).
fn builtins_library(name: &str) -> bool {
    name.starts_with("libstdc++.so") || name.starts_with("libpython3")
}

/// Whether a mapping is (the start of) a library with growth functions of its own: a
/// libstdc++ (the C++ rehash policy) or a libpython.
pub fn has_builtins(m: &MapEntry) -> bool {
    m.path.as_deref().is_some_and(|p| {
        Path::new(p)
            .file_name()
            .is_some_and(|n| builtins_library(&n.to_string_lossy()))
    })
}

/// The agent's `probe`s (ids after the built-ins), each file with the built-in kinds it has
/// too, merged per file: attached at start for every process, before discovery (which then
/// finds these files probed already).
pub fn for_agent(specs: &[ProbeSpec]) -> Result<Vec<SymTarget>, SymError> {
    let mut targets: Vec<SymTarget> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let t = for_spec(spec, (BUILTINS.len() + i) as u32)?;
        match targets.iter_mut().find(|o| o.path == t.path) {
            Some(o) => o.points.extend(t.points),
            None => targets.push(t),
        }
    }
    for t in &mut targets {
        match builtins_in(&t.path) {
            Ok(Some(b)) => t.points.extend(b.points),
            Ok(None) => {}
            Err(e) => log::debug!("growth functions of {}: {e}", t.path.display()),
        }
    }
    Ok(targets)
}

/// Every file to probe for a session: each `--probe` (ids after the built-ins) and the
/// built-in kinds in the executable and the libraries it loads (`libraries`), merged per
/// file.
pub fn for_session(
    specs: &[ProbeSpec],
    exe: &Path,
    libraries: &[PathBuf],
) -> Result<Vec<Arc<SymTarget>>, SymError> {
    let mut targets: Vec<SymTarget> = Vec::new();
    let mut add = |t: SymTarget| match targets.iter_mut().find(|o| o.path == t.path) {
        Some(o) => o.points.extend(t.points),
        None => targets.push(t),
    };
    for (i, spec) in specs.iter().enumerate() {
        add(for_spec(spec, (BUILTINS.len() + i) as u32)?);
    }
    // Only libstdc++ and libpython among the libraries: the other kinds are templates
    // instantiated in the executable.
    let files = std::iter::once(exe.to_owned()).chain(
        libraries
            .iter()
            .filter(|l| {
                l.file_name()
                    .is_some_and(|n| builtins_library(&n.to_string_lossy()))
            })
            .cloned(),
    );
    for file in files {
        match builtins_in(&file) {
            Ok(Some(t)) => add(t),
            Ok(None) => {}
            Err(e) => log::debug!("growth functions of {}: {e}", file.display()),
        }
    }
    Ok(targets.into_iter().map(Arc::new).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let s: ProbeSpec = "/bin/x:foo".parse().unwrap();
        assert_eq!(s.binary, PathBuf::from("/bin/x"));
        assert_eq!(s.symbol, "foo");
        assert!(s.args.is_empty());
        let s: ProbeSpec = "/bin/x:ns::Map<int>::grow:arg1 as size:arg0 as self"
            .parse()
            .unwrap();
        assert_eq!(s.symbol, "ns::Map<int>::grow");
        assert_eq!(s.args, vec![(1, "size".to_owned()), (0, "self".to_owned())]);
        for bad in [
            "",
            "/bin/x",
            ":foo",
            "/bin/x:",
            "/bin/x:foo:arg6 as x",
            "/bin/x:foo:argx as x",
            "/bin/x:foo:arg1 as ",
            "/bin/x:foo:arg1 as a-b",
            "/bin/x:foo:arg1 as a:arg2 as a",
        ] {
            assert!(bad.parse::<ProbeSpec>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cxx_names_without_signature() {
        assert_eq!(
            cxx_bare(
                "void std::vector<long, std::allocator<long> >::_M_realloc_insert<long const&>(__gnu_cxx::__normal_iterator<long*, std::vector<long, std::allocator<long> > >, long const&)"
            ),
            "std::vector<long, std::allocator<long> >::_M_realloc_insert<long const&>"
        );
        assert_eq!(cxx_bare("foo(int)"), "foo");
        assert_eq!(cxx_bare("ns::f"), "ns::f");
    }

    #[test]
    fn builtin_kinds_by_name() {
        assert_eq!(
            builtin_kind(
                "_ZNSt6vectorIlSaIlEE17_M_realloc_insertIJRKlEEEvN9__gnu_cxx17__normal_iteratorIPlS1_EEDpOT_"
            ),
            Some(CXX_VECTOR_GROW)
        );
        assert_eq!(builtin_kind(PRIME_NEXT_BKT), Some(CXX_HASH_REHASH));
        assert_eq!(
            builtin_kind(
                "_RNvMs8_NtCs15659r05rDE_5alloc7raw_vecNtB5_11RawVecInner11finish_growCs4IfoOjSBTMP_11rust_growth"
            ),
            Some(RUST_VEC_GROW)
        );
        assert_eq!(
            builtin_kind(
                "_RINvMs6_NtCsh8YaJyklTqy_9hashbrown3rawINtB6_8RawTableTyyEE14reserve_rehashNCINvNtB8_3map11make_hasheryyNtNtNtCsasS9baBqQMk_3std4hash6random11RandomStateE0ECs4IfoOjSBTMP_11rust_growth"
            ),
            Some(RUST_HASH_REHASH)
        );
        // Legacy Rust mangling.
        assert_eq!(
            builtin_kind("_ZN5alloc7raw_vec11finish_grow17h0123456789abcdefE"),
            Some(RUST_VEC_GROW)
        );
        assert_eq!(builtin_kind("finish_grow"), None);
        assert_eq!(builtin_kind("malloc"), None);
    }

    #[test]
    fn gcc_clone_suffixes() {
        assert_eq!(gcc_base("dictresize"), Some("dictresize"));
        assert_eq!(gcc_base("dictresize.lto_priv.0"), Some("dictresize"));
        assert_eq!(gcc_base("list_resize.lto_priv.12"), Some("list_resize"));
        // Pieces of a function, or copies with other arguments.
        for other in [
            "dictresize.lto_priv.0.cold",
            "list_resize.part.0",
            "list_resize.isra.0",
            "list_resize.constprop.0",
            "list_resize.lto_priv.",
            "list_resize.cold",
        ] {
            assert_eq!(gcc_base(other), None, "{other}");
        }
        assert_eq!(py_kind("dictresize.lto_priv.0"), Some(PY_DICT));
        assert_eq!(py_kind("list_resize"), Some(PY_LIST));
        assert_eq!(py_kind("dictresize.lto_priv.0.cold"), None);
        assert_eq!(py_kind("PyList_Append"), None);
    }

    /// Debian's stripped python3.11: its CPython kinds come from python3.11-dbg's debug file
    /// (skipped where that package is not installed: `./x setup` installs it).
    #[test]
    fn python_kinds_from_the_debug_file() {
        let python = Path::new("/usr/bin/python3.11");
        let Ok(elf) = ElfFile::open(python) else {
            eprintln!("skipped: no {}", python.display());
            return;
        };
        assert!(!elf.has_symtab(), "Debian's python3.11 is stripped");
        if debuginfo::find_for(python).is_none() {
            eprintln!(
                "skipped: no debug file for {} (python3.11-dbg)",
                python.display()
            );
            return;
        }
        assert_eq!(cpython_version(&elf, None), Some((3, 11)));
        let t = builtins_in(python)
            .unwrap()
            .expect("CPython's growth functions");
        let of = |kind| -> Vec<&SymPoint> { t.points.iter().filter(|p| p.probe == kind).collect() };
        let (dict, list) = (of(PY_DICT), of(PY_LIST));
        assert_eq!(dict.len(), 1, "{:?}", t.points);
        assert_eq!(list.len(), 1, "{:?}", t.points);
        assert!(dict[0].symbol.starts_with("dictresize"));
        assert_eq!(dict[0].list_resize_check, None);
        assert!(list[0].symbol.starts_with("list_resize"));
        assert_eq!(list[0].list_resize_check, Some(32));
        // The file offset holds the function's first bytes (the binary's own program headers).
        let sym = elf.symbol("PyList_Append").unwrap();
        assert!(elf.vaddr_to_file_offset(sym.address).is_some());
        // A `--probe` by a static function's name, without the LTO suffix.
        let spec: ProbeSpec = "/usr/bin/python3.11:dictresize:arg1 as log2_size"
            .parse()
            .unwrap();
        let t = for_spec(&spec, 9).unwrap();
        assert_eq!(t.points.len(), 1);
        assert_eq!(t.points[0].file_offset, dict[0].file_offset);
    }
}
