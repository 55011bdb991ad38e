//! Just enough of an ELF file for the Go readers: section and segment tables, and bounded reads
//! by file offset or virtual address. Both ELF classes and byte orders are accepted, because a
//! Go version is worth reporting for any Go binary we are pointed at.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use object::read::elf::{FileHeader, ProgramHeader as _, SectionHeader as _};
use object::{Endianness, FileKind, ReadCache, ReadRef, elf};

use super::GoError;

#[derive(Clone, Debug)]
pub(crate) struct Section {
    pub name: String,
    pub addr: u64,
    pub offset: u64,
    pub size: u64,
    /// False for `SHT_NOBITS` (.bss): no bytes in the file.
    pub in_file: bool,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Segment {
    pub vaddr: u64,
    pub offset: u64,
    pub filesz: u64,
    pub writable: bool,
}

#[derive(Debug)]
pub(crate) struct Image {
    pub path: PathBuf,
    file: File,
    len: u64,
    pub big_endian: bool,
    pub sections: Vec<Section>,
    pub segments: Vec<Segment>,
}

type Tables = (Vec<Section>, Vec<Segment>, bool);

impl Image {
    /// Opens `path`; `Ok(None)` when it is not an ELF file at all.
    pub fn open(path: &Path) -> Result<Option<Self>, GoError> {
        let io = |source| GoError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let tables = {
            // Only the headers are read here; section contents are read on demand.
            let cache = ReadCache::new(&file);
            let data = &cache;
            match FileKind::parse(data) {
                Ok(FileKind::Elf64) => tables::<elf::FileHeader64<Endianness>, _>(data, path)?,
                Ok(FileKind::Elf32) => tables::<elf::FileHeader32<Endianness>, _>(data, path)?,
                _ => return Ok(None),
            }
        };
        let (sections, segments, big_endian) = tables;
        Ok(Some(Self {
            path: path.to_path_buf(),
            file,
            len,
            big_endian,
            sections,
            segments,
        }))
    }

    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    pub fn bad_elf(&self, reason: impl ToString) -> GoError {
        GoError::BadElf {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    /// Reads exactly `len` bytes at file offset `offset`.
    pub fn read_at(&self, offset: u64, len: u64) -> Result<Vec<u8>, GoError> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.len)
            .ok_or_else(|| {
                self.bad_elf(format!(
                    "{len} bytes at offset {offset:#x} lie past the end of the file"
                ))
            })?;
        let size = usize::try_from(end - offset).map_err(|e| self.bad_elf(e))?;
        let mut buf = vec![0; size];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|source| GoError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(buf)
    }

    pub fn section_data(&self, section: &Section) -> Result<Vec<u8>, GoError> {
        if !section.in_file {
            return Err(self.bad_elf(format!("section {} has no file contents", section.name)));
        }
        self.read_at(section.offset, section.size)
    }

    /// Reads up to `max` bytes at virtual address `addr`, stopping at the end of the loadable
    /// segment's file contents; `None` when no segment maps `addr`.
    pub fn read_vaddr_upto(&self, addr: u64, max: u64) -> Result<Option<Vec<u8>>, GoError> {
        let Some(seg) = self
            .segments
            .iter()
            .find(|s| addr >= s.vaddr && addr - s.vaddr < s.filesz)
        else {
            return Ok(None);
        };
        let skip = addr - seg.vaddr;
        let len = max.min(seg.filesz - skip);
        let offset = seg
            .offset
            .checked_add(skip)
            .ok_or_else(|| self.bad_elf("segment offset overflows"))?;
        self.read_at(offset, len).map(Some)
    }
}

fn tables<'data, Elf: FileHeader<Endian = Endianness>, R: ReadRef<'data>>(
    data: R,
    path: &Path,
) -> Result<Tables, GoError> {
    let bad = |e: object::read::Error| GoError::BadElf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let header = Elf::parse(data).map_err(bad)?;
    let endian = header.endian().map_err(bad)?;
    let mut segments = Vec::new();
    for ph in header.program_headers(endian, data).map_err(bad)? {
        if ph.p_type(endian) == elf::PT_LOAD {
            segments.push(Segment {
                vaddr: ph.p_vaddr(endian).into(),
                offset: ph.p_offset(endian).into(),
                filesz: ph.p_filesz(endian).into(),
                writable: ph.p_flags(endian) & elf::PF_W != 0,
            });
        }
    }
    let table = header.sections(endian, data).map_err(bad)?;
    let mut sections = Vec::with_capacity(table.len());
    for sh in table.iter() {
        let name = table.section_name(endian, sh).unwrap_or_default();
        sections.push(Section {
            name: String::from_utf8_lossy(name).into_owned(),
            addr: sh.sh_addr(endian).into(),
            offset: sh.sh_offset(endian).into(),
            size: sh.sh_size(endian).into(),
            in_file: sh.sh_type(endian) != elf::SHT_NOBITS,
        });
    }
    Ok((sections, segments, endian == Endianness::Big))
}
