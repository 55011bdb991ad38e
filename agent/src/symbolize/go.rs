//! Go code named through `.gopclntab` instead of blazesym.
//!
//! blazesym does not read `.gopclntab`, so stripped Go binaries (`-ldflags=-s -w`) would stay
//! unnamed, and in unstripped ones it can blame zero-size ELF symbols for Go code. The pclntab
//! is in every Go binary, stripped or not, and it is what the Go runtime's own tracebacks use,
//! so Go code is named from it in both cases: the same binary gives the same frames whether
//! stripped or not. Addresses outside the table (cgo's C code) still go to blazesym.
//!
//! Inlining: an address inside inlined code gives one frame per inlined call, innermost first,
//! then the physical function, each with its own file and line, as the Go runtime's own
//! tracebacks expand its inline tree (`FUNCDATA_InlTree`, see `gort/pclntab.rs`). That is what
//! blazesym reads from DWARF for unstripped binaries (about half of `runtime.growslice`'s bytes
//! are inlined code), and stripped builds get it too. Where a binary's tree cannot be read
//! (Go 1.16/1.17, a Go version whose moduledata layout was not read) an address gives one frame
//! named after the physical function, with the inlined code's file and line (what
//! `go tool addr2line` prints).

use std::fs::File;
use std::path::Path;

use object::read::elf::{FileHeader, ProgramHeader as _};
use object::{Endianness, FileKind, ReadCache, ReadRef, elf};

use crate::gort::GoError;
use crate::gort::pclntab::{Location, Pclntab};

/// A loadable segment's bytes in the file and where they are linked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    offset: u64,
    filesz: u64,
    vaddr: u64,
}

/// The pclntab of one Go ELF file and its PT_LOAD segments, which turn the file offsets the
/// symbolizer works with into the link-time virtual addresses the pclntab is keyed by.
#[derive(Debug)]
pub(super) struct GoFile {
    table: Pclntab,
    segments: Vec<Segment>,
}

impl GoFile {
    /// Reads the pclntab of the ELF file at `path`; `Ok(None)` for files that are not Go.
    pub(super) fn open(path: &Path) -> Result<Option<Self>, GoError> {
        let Some(table) = Pclntab::open(path)? else {
            return Ok(None);
        };
        let segments = segments(path)?;
        Ok(Some(Self { table, segments }))
    }

    /// The source frames (function, file and line) of the code at file offset `offset`,
    /// innermost inlined call first; empty outside the Go text (e.g. cgo's C code) or in bytes
    /// no segment loads.
    pub(super) fn frames(&self, offset: u64) -> Vec<Location> {
        vaddr(&self.segments, offset)
            .map(|pc| self.table.frames(pc))
            .unwrap_or_default()
    }
}

/// The link-time address of file offset `offset`.
fn vaddr(segments: &[Segment], offset: u64) -> Option<u64> {
    segments
        .iter()
        .find(|s| offset >= s.offset && offset - s.offset < s.filesz)
        .and_then(|s| s.vaddr.checked_add(offset - s.offset))
}

/// The PT_LOAD program headers of `path`, read without loading the rest of the file.
fn segments(path: &Path) -> Result<Vec<Segment>, GoError> {
    let file = File::open(path).map_err(|source| GoError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let cache = ReadCache::new(&file);
    let parsed = match FileKind::parse(&cache) {
        Ok(FileKind::Elf64) => load_segments::<elf::FileHeader64<Endianness>, _>(&cache),
        Ok(FileKind::Elf32) => load_segments::<elf::FileHeader32<Endianness>, _>(&cache),
        // Pclntab::open has just read it as ELF: only a file changed underneath gets here.
        Ok(kind) => Err(format!("not an ELF file ({kind:?})")),
        Err(err) => Err(err.to_string()),
    };
    parsed.map_err(|reason| GoError::BadElf {
        path: path.to_path_buf(),
        reason,
    })
}

fn load_segments<'data, Elf: FileHeader<Endian = Endianness>, R: ReadRef<'data>>(
    data: R,
) -> Result<Vec<Segment>, String> {
    let text = |e: object::read::Error| e.to_string();
    let header = Elf::parse(data).map_err(text)?;
    let endian = header.endian().map_err(text)?;
    Ok(header
        .program_headers(endian, data)
        .map_err(text)?
        .iter()
        .filter(|ph| ph.p_type(endian) == elf::PT_LOAD)
        .map(|ph| Segment {
            offset: ph.p_offset(endian).into(),
            filesz: ph.p_filesz(endian).into(),
            vaddr: ph.p_vaddr(endian).into(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_offsets_map_through_load_segments() {
        // A Go PIE's layout: text from offset 0, data further on at a larger distance.
        let segments = [
            Segment {
                offset: 0,
                filesz: 0x9_39c0,
                vaddr: 0x40_0000,
            },
            Segment {
                offset: 0xd_e000,
                filesz: 0x1000,
                vaddr: 0x4d_e000 + 0x1000,
            },
        ];
        assert_eq!(vaddr(&segments, 0x6_1234), Some(0x46_1234));
        assert_eq!(vaddr(&segments, 0xd_e010), Some(0x4d_f010));
        // Between segments, past the last one, and overflowing addresses: nothing.
        assert_eq!(vaddr(&segments, 0x9_39c0), None);
        assert_eq!(vaddr(&segments, 0xd_f000), None);
        let wrap = [Segment {
            offset: 0,
            filesz: u64::MAX,
            vaddr: u64::MAX,
        }];
        assert_eq!(vaddr(&wrap, 2), None);
    }
}
