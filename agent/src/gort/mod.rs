//! The Go runtime as a tracing target: which Go built a binary, how to name its functions
//! when it is stripped, and which runtime functions and registers carry map growth, slice
//! growth, allocation sizes and GC pauses in that Go version.
//!
//! - [`buildinfo`]: the Go version (and main module) from `.go.buildinfo`.
//! - [`pclntab`]: `.gopclntab`, the runtime's own PC → function/file/line table, present even
//!   in stripped binaries.
//! - [`live`]: a map's length and size now, read from the traced process's memory.
//! - [`versions`]: the one table of per-version runtime knowledge, each row with its source.
//!
//! These read untrusted binaries: every offset is bounds-checked and a malformed file is an
//! error, never a panic.

#![allow(
    dead_code,
    reason = "complete readers of Go's formats: some accessors serve only tests and diagnostics"
)]

pub mod buildinfo;
pub mod growth;
mod image;
pub mod live;
pub mod pclntab;
pub mod versions;

#[cfg(test)]
pub(crate) mod tests;

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while reading a Go binary.
#[derive(Debug, thiserror::Error)]
pub enum GoError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: malformed ELF file: {reason}", path.display())]
    BadElf { path: PathBuf, reason: String },
    #[error("{}: malformed .go.buildinfo: {reason}", path.display())]
    BadBuildInfo { path: PathBuf, reason: String },
    #[error("unrecognised Go version string {raw:?}")]
    BadVersion { raw: String },
    #[error("{}: malformed .gopclntab: {reason}", path.display())]
    BadPclntab { path: PathBuf, reason: String },
    #[error("{}: .gopclntab format {magic:#010x} is not supported (Go 1.16 or newer needed)", path.display())]
    UnsupportedPclntab { path: PathBuf, magic: u32 },
}
