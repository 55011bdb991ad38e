//! "The libc to probe" for a running process or for a command about to be run, and its probe
//! list.
//!
//! The file that provides `malloc` is the executable itself when it defines one (static
//! binaries), otherwise its libc (glibc's `libc.so.6`, musl's `libc.musl-x86_64.so.1` /
//! `ld-musl-x86_64.so.1`). Allocators interposed by `LD_PRELOAD` or linked as their own library
//! (jemalloc, tcmalloc, mimalloc) are not looked for.
//!
//! Submodules: `process` (a running process's mapped files, searched in priority order, each
//! file examined once for all processes: [`FileCache`]), `command` (a command not yet run:
//! `PATH`, `#!` scripts, ld.so's library search), `ld_cache` (`/etc/ld.so.cache`).

mod command;
mod ld_cache;
mod process;
#[cfg(test)]
mod tests;

pub use command::{for_command, resolve_program};
pub use ld_cache::LdCache;
pub use process::{FileCache, for_pid, for_pid_cached};

use std::path::PathBuf;

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
}

/// `(alias, canonical)`.
pub type Alias = (Api, Api);

/// Builds the probe list of an ELF file that defines `malloc`. Every API present is probed once
/// per distinct address; missing optional APIs are skipped; missing `malloc` or `free` is an
/// error.
pub fn probe_points(elf: &ElfFile) -> Result<(Vec<ProbePoint>, Vec<Alias>), TargetError> {
    // Group by address first, so one site serves every API at it.
    let mut groups: Vec<(elf::Symbol, Vec<Api>)> = Vec::new();
    for api in Api::ALL {
        let Some(sym) = elf.symbol(api.symbol()) else {
            if matches!(api, Api::Malloc | Api::Free) {
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
        let with_return = apis.iter().any(|a| a.needs_return());
        let code = elf.function_code(sym, CODE_WINDOW)?;
        let site = placement::place(&code, sym.address, &Request::libc(with_return));
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
    let (probes, aliases) = probe_points(elf)?;
    Ok(LibcTarget {
        path: elf.path().to_owned(),
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
