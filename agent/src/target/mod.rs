//! Which process and which files to probe: /proc parsing, ELF symbols, probe placement.
//!
//! - [`maps`]: `/proc/<pid>/maps` parsing.
//! - [`elf`]: symbols, virtual address → file offset, function bytes, dynamic section.
//! - [`debuginfo`]: a stripped file's separate debug file (build-id, debug link), for the
//!   symbolizer's names and the growth probes' static functions.
//! - [`placement`]: where in a function's entry block a uprobe is cheapest and still correct
//!   (x86-64 decoding there, arm64's in [`arm64`], chosen by the file's ELF machine).
//! - [`libc`]: the libc (or static executable) that provides `malloc` for a process or a
//!   command, and the probe list for it.
//! - [`go`]: the Go runtime functions of a binary to probe.
//! - [`relays`]: count mode's view of a libc file (which allocator functions tail-jump into
//!   which), by disassembly.
//! - [`symprobe`]: `--probe` and the built-in C++/Rust/Python container-growth functions, by
//!   symbol.
//! - [`registry`]: every kind of target in one list; each file analysed and attached once, then
//!   a per-process step with its load bias.

pub mod arm64;
pub mod cfi;
pub mod check;
pub mod debuginfo;
pub mod elf;
pub mod go;
pub mod libc;
pub mod maps;
pub mod placement;
pub mod registry;
pub mod relays;
pub mod symprobe;

pub use libc::{ProbePoint, for_command as libc_for_command, for_pid as libc_for_pid};

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while finding what to probe.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no such process: {pid}")]
    NoSuchProcess { pid: u32 },
    #[error(
        "process {pid} ({comm}) is a kernel thread: it has no user-space memory and calls no \
         malloc; give the pid of a user-space process"
    )]
    KernelThread { pid: u32, comm: String },
    #[error(
        "process {pid} ({comm}) is a zombie: it has exited and waits for its parent to reap it, \
         so there is nothing left to trace"
    )]
    Zombie { pid: u32, comm: String },
    #[error("{tid} is a thread of process {tgid} ({comm}): give --pid {tgid}")]
    Thread { tid: u32, tgid: u32, comm: String },
    #[error("process {pid} exited while allocwatch was attaching to it: nothing was traced")]
    ExitedDuringAttach { pid: u32 },
    #[error(
        "{} is a script without a `#!` line: the kernel cannot run it; name its interpreter, \
         e.g. `-- sh {}`", path.display(), check::shown(path).display()
    )]
    ScriptWithoutShebang { path: PathBuf },
    #[error(
        "{} is not a program the kernel can run (neither ELF nor a `#!` script: it starts with \
         bytes {magic})", path.display()
    )]
    NotAProgram { path: PathBuf, magic: String },
    #[error(
        "{} is a truncated ELF file: it has {len} bytes, its headers describe {need}",
        path.display()
    )]
    TruncatedElf { path: PathBuf, len: u64, need: u64 },
    #[error("cannot read process {pid}'s memory map (needs root or CAP_SYS_PTRACE): {source}")]
    ProcessAccess {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: line {line}: malformed maps entry: {text:?}", path.display())]
    BadMaps {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("{}: not a usable ELF file: {reason}", path.display())]
    BadElf { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    BadLdCache { path: PathBuf, reason: String },
    #[error("process {pid} ({comm}) does not use a libc allocator (no malloc in its mapped files)")]
    ProcessNoLibc { pid: u32, comm: String },
    #[error(
        "process {pid} ({comm}): cannot open {display_path} as the process sees it \
         (tried {})", tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    MappedFileUnavailable {
        pid: u32,
        comm: String,
        display_path: String,
        tried: Vec<PathBuf>,
    },
    #[error("{}: defines malloc but not {symbol}", path.display())]
    MissingSymbol { path: PathBuf, symbol: &'static str },
    #[error("{command}: command not found")]
    CommandNotFound { command: String },
    #[error("{}: not an executable file", path.display())]
    NotExecutable { path: PathBuf },
    #[error(
        "{} is statically linked without malloc: allocwatch traces libc's malloc family and the \
         Go runtime, and this program has neither", path.display()
    )]
    StaticNoMalloc { path: PathBuf },
    #[error("{}: no libc found (searched for {wanted})", path.display())]
    LibcNotFound { path: PathBuf, wanted: String },
}

impl TargetError {
    fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        TargetError::Io {
            path: path.into(),
            source,
        }
    }

    fn bad_elf(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        TargetError::BadElf {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
