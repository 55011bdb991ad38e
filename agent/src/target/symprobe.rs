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
//!
//! Why these functions: GCC inlines `_Hashtable::_M_rehash` into the insert at -O2 (no symbol
//! left in the binary), while every growth decision of the prime rehash policy calls
//! `_M_next_bkt` in libstdc++; `_M_realloc_insert` is out of line (cold). In Rust every
//! `RawVec` growth (`grow_one`, `reserve`, `try_reserve`) ends in the one out-of-line
//! `finish_grow`, so it alone counts each growth once; `reserve_rehash` is hashbrown's cold
//! out-of-line path of a full table.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use allocwatch_common::symprobe::ARGS;

use super::{
    TargetError,
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
pub const BUILTINS: [&str; 4] = [
    "cxx_vector_grow",
    "cxx_hash_rehash",
    "rust_vec_grow",
    "rust_hash_rehash",
];
const CXX_VECTOR_GROW: u32 = 0;
const CXX_HASH_REHASH: u32 = 1;
const RUST_VEC_GROW: u32 = 2;
const RUST_HASH_REHASH: u32 = 3;

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
         name; `nm -C` lists them)", binary.display(), binary.display()
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
) -> Vec<SymPoint> {
    let mut seen = BTreeSet::new();
    let needed: Vec<_> = args
        .iter()
        .map(|(r, _)| ARG_REGS[usize::from(*r)])
        .collect();
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
    let found: Vec<(String, Symbol)> = match elf.symbol(&spec.symbol) {
        Some(sym) => vec![(spec.symbol.clone(), sym)],
        None => {
            let mut v: Vec<_> = elf
                .symbols()
                .filter(|(name, _)| {
                    demangled(name).is_some_and(|d| d == spec.symbol || cxx_bare(&d) == spec.symbol)
                })
                .map(|(n, s)| (n.to_owned(), s))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        }
    };
    let points = points_of(&elf, &found, probe, &spec.args);
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
    let mut by_kind: Vec<(u32, String, Symbol)> = elf
        .symbols()
        .filter_map(|(name, sym)| Some((builtin_kind(name)?, name.to_owned(), sym)))
        .collect();
    by_kind.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut points = Vec::new();
    for kind in 0..BUILTINS.len() as u32 {
        let syms: Vec<(String, Symbol)> = by_kind
            .iter()
            .filter(|(k, _, _)| *k == kind)
            .map(|(_, n, s)| (n.clone(), *s))
            .collect();
        points.extend(points_of(&elf, &syms, kind, &[]));
    }
    Ok((!points.is_empty()).then(|| SymTarget {
        path: path.to_owned(),
        points,
    }))
}

/// Whether a mapping is (the start of) a libstdc++, where the C++ rehash policy lives.
pub fn is_libstdcxx(m: &MapEntry) -> bool {
    m.path.as_deref().is_some_and(|p| {
        Path::new(p)
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("libstdc++.so"))
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
    // Only libstdc++ among the libraries: the other kinds are templates instantiated in the
    // executable.
    let files = std::iter::once(exe.to_owned()).chain(
        libraries
            .iter()
            .filter(|l| {
                l.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libstdc++.so"))
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
}
