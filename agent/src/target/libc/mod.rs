//! "The libc to probe" for a running process or for a command about to be run, and its probe
//! list.
//!
//! The files that serve a process's allocation API follow the dynamic linker's symbol
//! resolution: the executable first, then `LD_PRELOAD`, then the libraries in load order
//! (breadth-first over `DT_NEEDED`). The first file that defines `malloc` serves it — the
//! executable itself in static programs, a jemalloc, tcmalloc or mimalloc library linked in or
//! preloaded, else the libc (glibc's `libc.so.6`, musl's `libc.so` / `ld-musl-x86_64.so.1`).
//! An API that file lacks is served by the next file in the order that defines it (glibc's
//! `reallocarray` and `pvalloc` under jemalloc): each such file is probed too ([`Served`]).
//!
//! Submodules: `allocator` (which allocator a file is), `process` (a running process's mapped
//! files, in resolution order, each file examined once for all processes: [`FileCache`]),
//! `command` (a command not yet run: `PATH`, `#!` scripts, ld.so's library search),
//! `ld_cache` (`/etc/ld.so.cache`).

mod allocator;
mod command;
mod ld_cache;
mod process;
#[cfg(test)]
mod tests;

pub use allocator::Allocator;
pub use command::{for_command, libraries_of, resolve_program};
pub use ld_cache::LdCache;
pub use process::{FileCache, find_mapped, for_pid, for_pid_cached, mapped_stamp, open_mapped};

use std::path::PathBuf;
use std::sync::Arc;

use allocwatch_common::libc::Api;

use super::TargetError;
use super::elf::{self, ElfFile};
use super::maps::DevInode;
use super::placement::{self, Request};

/// Bytes of each function given to the placement disassembler; entry blocks are far shorter.
const CODE_WINDOW: u64 = 256;

/// One uprobe to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbePoint {
    /// The canonical API at this address (first in [`Api::ALL`] order among its aliases).
    pub api: Api,
    /// Where to attach in the file (already includes the placement offset).
    pub file_offset: u64,
    /// Stack-pointer movement before the site: the return address is at `[rsp + sp_delta]`.
    pub sp_delta: u32,
    /// The kernel emulates the probed instruction (cheap) rather than single-stepping it.
    pub emulated: bool,
    /// Attach a uretprobe at the same site too.
    pub with_return: bool,
}

/// The file to probe and the probes to put in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibcTarget {
    /// Path the agent can open (in its own mount namespace; may be under `/proc/<pid>/`).
    pub path: PathBuf,
    /// The path as the target process sees it.
    pub display_path: String,
    /// Identity of the file: uprobes attach to an inode, so targets with the same identity
    /// share probes.
    pub dev_inode: DevInode,
    pub probes: Vec<ProbePoint>,
    /// `(alias, canonical)`: APIs that are the same function as an earlier one (Debian's glibc
    /// 2.36 has `memalign` at the address of `aligned_alloc`). Their calls report as canonical.
    pub aliases: Vec<Alias>,
    /// Which allocator the file is.
    pub allocator: Allocator,
    /// What the file's API names start with: `""`, or a prefix of [`PREFIXES`] for an
    /// allocator whose API has names of its own (`je_malloc`, not `malloc`): the program calls
    /// it by those names, next to the libc's `malloc` that everything else calls.
    pub prefix: &'static str,
}

/// Prefixes of allocator builds whose API has its own names (see [`LibcTarget::prefix`]):
/// jemalloc built with `--with-jemalloc-prefix=je_` (Redis bundles one), tikv-jemalloc-sys's
/// `_rjem_` (a Rust program's `#[global_allocator]`), and mimalloc's own `mi_` names (the
/// mimalloc crate links it in without overriding `malloc`).
const PREFIXES: [&str; 3] = ["je_", "_rjem_", "mi_"];

/// The name of `api` in a file whose API names start with `prefix`.
pub fn symbol_in(prefix: &str, api: Api) -> String {
    if api.takes_prefix() {
        format!("{prefix}{}", api.symbol())
    } else {
        api.symbol().to_owned()
    }
}

/// The API a symbol named `name` is, under its libc name or a known prefix ([`PREFIXES`]):
/// what a PLT slot naming it enters, in whichever file serves it.
pub fn api_named(name: &str) -> Option<Api> {
    Api::ALL.into_iter().find(|&api| {
        std::iter::once("")
            .chain(PREFIXES)
            .any(|p| symbol_in(p, api) == name)
    })
}

/// The prefix of `elf`'s malloc family: `""` when it defines `malloc`, else a known prefix
/// under which it defines an allocating API and a freeing one; `None`: no malloc family. A
/// program that links its allocator statically keeps only the functions it calls (the linker
/// drops the rest): tikv-jemallocator's programs have `_rjem_sdallocx` and no `_rjem_free`,
/// the mimalloc crate's have `mi_malloc_aligned` and no `mi_malloc`.
pub fn prefix_of(elf: &ElfFile) -> Option<&'static str> {
    if elf.symbol("malloc").is_some() {
        return Some("");
    }
    PREFIXES.into_iter().find(|p| {
        // mimalloc's own names count for `mi_` only.
        let has = |api: &Api| {
            let name = symbol_in(p, *api);
            name.starts_with(p) && elf.symbol(&name).is_some()
        };
        let (frees, allocs): (Vec<Api>, Vec<Api>) = Api::ALL
            .into_iter()
            .filter(|a| !a.is_cxx())
            .partition(|a| a.is_free());
        allocs.iter().any(has) && frees.iter().any(has)
    })
}

impl LibcTarget {
    /// The APIs the file defines (probed, or an alias of one probed).
    pub fn apis(&self) -> impl Iterator<Item = Api> + '_ {
        self.probes
            .iter()
            .map(|p| p.api)
            .chain(self.aliases.iter().map(|&(alias, _)| alias))
    }
}

/// The files that serve one process's allocation API, in symbol-resolution order: the first
/// serves `malloc` (its allocator is the process's); each later one defines an API no earlier
/// one does. Every file is probed whole (probes are per file, shared by every process that
/// maps it); a call reaches only the file that serves its API, and a relay from one file into
/// another (glibc's `reallocarray` tail-jumping into jemalloc's `realloc` through the PLT)
/// is nested in the outer call like a relay inside one file.
///
/// Files with a prefixed API (`je_malloc`, [`LibcTarget::prefix`]) serve no libc name: they
/// are probed as well (after the others), their calls counted under the unprefixed names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// The files serving the libc names, then the prefixed ones.
    files: Vec<Arc<LibcTarget>>,
    /// How many of `files` serve the libc names.
    chain: usize,
}

impl Served {
    /// `files` in resolution order; files that serve nothing (every API they define is served
    /// earlier) are dropped. `None` when nothing is left.
    pub fn new(files: Vec<Arc<LibcTarget>>) -> Option<Self> {
        let mut kept: Vec<Arc<LibcTarget>> = Vec::new();
        let mut prefixed: Vec<Arc<LibcTarget>> = Vec::new();
        for f in files {
            if kept
                .iter()
                .chain(&prefixed)
                .any(|k| k.dev_inode == f.dev_inode)
            {
                continue;
            }
            if !f.prefix.is_empty() {
                prefixed.push(f);
                continue;
            }
            if f.apis()
                .any(|api| !kept.iter().any(|k| k.apis().any(|a| a == api)))
            {
                kept.push(f);
            }
        }
        let chain = kept.len();
        kept.extend(prefixed);
        (!kept.is_empty()).then_some(Self { files: kept, chain })
    }

    /// The file that serves `malloc` (a prefixed one if none does).
    pub fn primary(&self) -> &Arc<LibcTarget> {
        &self.files[0]
    }

    /// Every file to probe, the one serving `malloc` first.
    pub fn files(&self) -> &[Arc<LibcTarget>] {
        &self.files
    }

    /// The allocator the program allocates through: a prefixed one when it has one (it
    /// calls `je_malloc` by name for its own allocations), else the one serving `malloc`.
    pub fn allocator(&self) -> Allocator {
        self.files
            .get(self.chain)
            .unwrap_or(self.primary())
            .allocator
    }

    /// Whether every libc name is defined by some file (nothing more to look for). The C++
    /// operators and the allocators' own entry points are left out: only an allocator file
    /// defines them here (libstdc++'s own, over `malloc`, are not looked for), and most
    /// processes have none.
    pub fn complete(&self) -> bool {
        Api::ALL
            .iter()
            .filter(|api| api.is_libc())
            .all(|api| self.served_by(*api).is_some())
    }

    /// The file whose definition of `api` (the libc name) the process's calls reach.
    pub fn served_by(&self, api: Api) -> Option<&Arc<LibcTarget>> {
        self.files[..self.chain]
            .iter()
            .find(|f| f.apis().any(|a| a == api))
    }

    /// The APIs served (by libc name or prefixed), each under the name its calls are counted
    /// as.
    pub fn apis(&self) -> Vec<Api> {
        let canonical = |file: &LibcTarget, api: Api| {
            file.aliases
                .iter()
                .find(|(alias, _)| *alias == api)
                .map_or(api, |&(_, canonical)| canonical)
        };
        let mut apis: Vec<Api> = Api::ALL
            .iter()
            .filter_map(|&api| Some(canonical(self.served_by(api)?, api)))
            .chain(
                self.files[self.chain..]
                    .iter()
                    .flat_map(|f| f.probes.iter().map(|p| p.api)),
            )
            .collect();
        apis.sort();
        apis.dedup();
        apis
    }

    /// The aliases of the APIs as served: those of the file that serves the alias.
    pub fn aliases(&self) -> Vec<Alias> {
        let mut aliases: Vec<Alias> = Api::ALL
            .iter()
            .filter_map(|&api| {
                let file = self.served_by(api)?;
                file.aliases
                    .iter()
                    .find(|(alias, _)| *alias == api)
                    .copied()
            })
            .collect();
        aliases.sort();
        aliases
    }

    /// The files as the process sees them, the primary first, joined by `+`.
    pub fn display_paths(&self) -> String {
        let paths: Vec<&str> = self.files.iter().map(|f| f.display_path.as_str()).collect();
        paths.join(" + ")
    }
}

/// `(alias, canonical)`.
pub type Alias = (Api, Api);

/// Builds the probe list of an ELF file that defines `malloc` (or, with a `prefix`, its
/// prefixed family). Every API present is probed once per distinct address; missing optional
/// APIs are skipped; without a prefix, missing `malloc` or `free` is an error (a prefixed
/// file has some of each kind: [`prefix_of`]).
/// `prefix`: what the file's API names start with ([`LibcTarget::prefix`]); `cxx`: the file's
/// C++ `operator new`/`delete` are its own ([`Allocator::defines_cxx`]) and are probed too.
pub fn probe_points(
    elf: &ElfFile,
    prefix: &str,
    cxx: bool,
) -> Result<(Vec<ProbePoint>, Vec<Alias>), TargetError> {
    // Group by address first, so one site serves every API at it.
    let mut groups: Vec<(elf::Symbol, Vec<Api>)> = Vec::new();
    for api in Api::ALL.into_iter().filter(|a| cxx || !a.is_cxx()) {
        let Some(sym) = elf.symbol(&symbol_in(prefix, api)) else {
            if prefix.is_empty() && matches!(api, Api::Malloc | Api::Free) {
                return Err(TargetError::MissingSymbol {
                    path: elf.path().to_owned(),
                    symbol: api.symbol(),
                });
            }
            continue;
        };
        match groups.iter_mut().find(|(s, _)| s.address == sym.address) {
            Some((_, apis)) => apis.push(api),
            None => groups.push((sym, vec![api])),
        }
    }
    let mut probes = Vec::new();
    let mut aliases = Vec::new();
    for (sym, apis) in groups {
        let canonical = apis[0];
        aliases.extend(apis[1..].iter().map(|&a| (a, canonical)));
        // Calls at a shared address report as the canonical API: its needs decide (tcmalloc's
        // `free` is its `operator delete` too, counted as `free`).
        let with_return = canonical.needs_return();
        let code = elf.function_code(sym, CODE_WINDOW)?;
        let site = placement::place(elf.arch(), &code, sym.address, &Request::libc(with_return));
        let vaddr = sym.address.wrapping_add(site.offset_in_function);
        let file_offset = elf.vaddr_to_file_offset(vaddr).ok_or_else(|| {
            TargetError::bad_elf(
                elf.path(),
                format!(
                    "{} at {vaddr:#x} is not in a loaded segment",
                    canonical.symbol()
                ),
            )
        })?;
        probes.push(ProbePoint {
            api: canonical,
            file_offset,
            sp_delta: site.sp_delta,
            emulated: site.emulated,
            with_return,
        });
    }
    aliases.sort();
    Ok((probes, aliases))
}

pub(super) fn target_from(
    elf: &ElfFile,
    display_path: String,
    dev_inode: DevInode,
) -> Result<LibcTarget, TargetError> {
    let prefix = prefix_of(elf).unwrap_or_default();
    let allocator = Allocator::of(elf, &display_path);
    // A prefixed build's operators (if any) would be the program's plain `new`, not its own.
    let cxx = prefix.is_empty() && allocator.defines_cxx();
    let (probes, aliases) = probe_points(elf, prefix, cxx)?;
    Ok(LibcTarget {
        prefix,
        path: elf.path().to_owned(),
        allocator,
        display_path,
        dev_inode,
        probes,
        aliases,
    })
}

pub(super) fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// glibc `libc.so.6`, musl `libc.musl-x86_64.so.1` (Alpine) / `ld-musl-x86_64.so.1` (musl's
/// loader is its libc), and plain `libc.so` (musl's DT_NEEDED).
pub fn is_libc_name(name: &str) -> bool {
    name == "libc.so"
        || name.starts_with("libc.so.")
        || name.starts_with("libc.musl-")
        || name.starts_with("ld-musl-")
}
