//! Loading the tables into the probe: each file's rows once (keyed by device and inode, so
//! every process that maps the file shares them), then per process the mappings that have a
//! table, with their load bias.

use std::collections::{HashMap, hash_map::Entry};

use allocwatch_common::{
    map_names,
    unwind::{UNWIND_MAPPINGS_MAX, UNWIND_ROWS_MAX, UnwindMapping, UnwindProc, UnwindRow},
};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError};
use object::{Object as _, ObjectSegment as _};

use super::table;
use crate::{
    probes::Probes,
    target::maps::{DevInode, MapEntry, read_maps},
};

/// The probe's two unwind maps, taken out of the loaded probes so that the tables can be
/// loaded away from the probes' owner (the agent does it on a thread of its own).
pub struct UnwindMaps {
    rows: Array<MapData, UnwindRow>,
    procs: BpfHashMap<MapData, u32, UnwindProc>,
}

impl UnwindMaps {
    pub fn take(probes: &mut Probes) -> Result<Self, MapError> {
        let mut take = |name: &str| {
            probes.take_map(name).ok_or_else(|| MapError::InvalidName {
                name: name.to_owned(),
            })
        };
        Ok(Self {
            rows: Array::try_from(take(map_names::UNWIND_ROWS)?)?,
            procs: BpfHashMap::try_from(take(map_names::UNWIND_PROCS)?)?,
        })
    }

    fn set_rows(&mut self, first: u32, rows: &[UnwindRow]) -> Result<(), MapError> {
        for (i, row) in (first..).zip(rows) {
            self.rows.set(i, row, 0)?;
        }
        Ok(())
    }

    fn set_proc(&mut self, tgid: u32, proc: Option<&UnwindProc>) -> Result<(), MapError> {
        match proc {
            Some(p) => self.procs.insert(&tgid, p, 0),
            None => match self.procs.remove(&tgid) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(e),
            },
        }
    }
}

/// A file's table in `UNWIND_ROWS` and its loadable segments (file offset, address, size).
#[derive(Clone, Debug)]
struct FileTable {
    first: u32,
    len: u32,
    segments: Vec<(u64, u64, u64)>,
    name: String,
}

/// What the probe holds: rows used, files and processes with tables.
pub struct Tables {
    maps: UnwindMaps,
    /// Per file: its table, or `None` when it has none (no `.eh_frame`, unreadable, no room).
    files: HashMap<DevInode, Option<FileTable>>,
    next_row: u32,
    /// Per process: the mappings last loaded (to load again only when they change).
    procs: HashMap<u32, Vec<UnwindMapping>>,
}

impl Tables {
    pub fn new(maps: UnwindMaps) -> Self {
        Self {
            maps,
            files: HashMap::new(),
            next_row: 0,
            procs: HashMap::new(),
        }
    }
}

/// What one process has, for the line that reports it.
#[derive(Debug, PartialEq, Eq)]
pub struct Loaded {
    /// Names of the files whose mappings have a table.
    pub files: Vec<String>,
    /// Rows of every table loaded so far, and their bytes.
    pub rows: u32,
    pub bytes: u64,
    /// Files whose table was compiled for this load (path, rows).
    pub new_files: Vec<(String, u32)>,
}

impl Tables {
    /// Capacity of the rows table, in bytes (preallocated by the kernel).
    pub const CAPACITY_BYTES: u64 = UNWIND_ROWS_MAX as u64 * size_of::<UnwindRow>() as u64;

    /// Loads the tables of `pid`'s executable mappings that have none yet and tells the probe
    /// the process's mappings; `Ok(None)` when they are as last loaded.
    pub fn load_process(&mut self, pid: u32) -> Result<Option<Loaded>, MapError> {
        let Ok(maps) = read_maps(pid) else {
            return Ok(None);
        };
        self.load_maps(pid, &maps)
    }

    /// [`Self::load_process`] with `pid`'s memory map read already.
    pub fn load_maps(&mut self, pid: u32, maps: &[MapEntry]) -> Result<Option<Loaded>, MapError> {
        let mut mappings = Vec::new();
        let mut names = Vec::new();
        let mut new_files = Vec::new();
        for m in maps.iter().filter(|m| m.perms.exec && m.is_file()) {
            let known = self.files.contains_key(&m.dev_inode);
            let Some(file) = self.file(pid, m)? else {
                continue;
            };
            let Some(bias) = bias(&file.segments, m) else {
                continue;
            };
            mappings.push(UnwindMapping {
                start: m.start,
                end: m.end,
                bias,
                first: file.first,
                len: file.len,
            });
            if !known {
                new_files.push((m.path.clone().unwrap_or_default(), file.len));
            }
            names.push(file.name.clone());
        }
        if self.procs.get(&pid) == Some(&mappings) {
            return Ok(None);
        }
        // Nothing with a table: the probe walks its stacks as without tables (the kernel's
        // frame-pointer walk, and its deeper limit).
        if mappings.is_empty() {
            self.forget(pid)?;
            return Ok(None);
        }
        self.maps.set_proc(pid, Some(&proc_of(&mappings)))?;
        self.procs.insert(pid, mappings);
        Ok(Some(Loaded {
            files: names,
            rows: self.next_row,
            bytes: u64::from(self.next_row) * size_of::<UnwindRow>() as u64,
            new_files,
        }))
    }

    /// Rows of every table loaded, and the processes with tables.
    pub fn usage(&self) -> (u32, usize) {
        (self.next_row, self.procs.len())
    }

    /// Forgets an exited process (its files' rows stay for the next process that maps them).
    pub fn forget(&mut self, pid: u32) -> Result<(), MapError> {
        if self.procs.remove(&pid).is_some() {
            self.maps.set_proc(pid, None)?;
        }
        Ok(())
    }

    /// The table of the file mapped at `m`, compiled and loaded on first sight.
    fn file(&mut self, pid: u32, m: &MapEntry) -> Result<Option<FileTable>, MapError> {
        let next_row = self.next_row;
        let slot = match self.files.entry(m.dev_inode) {
            Entry::Occupied(e) => return Ok(e.get().clone()),
            Entry::Vacant(e) => e,
        };
        let path = m.path.as_deref().unwrap_or_default();
        let name = path.rsplit('/').next().unwrap_or(path).to_owned();
        // Through map_files: the mapped file itself, even in another mount namespace or
        // replaced on disk since.
        let data = match std::fs::read(format!("/proc/{pid}/map_files/{}", m.map_files_name()))
            .or_else(|_| std::fs::read(format!("/proc/{pid}/root{path}")))
        {
            Ok(d) => d,
            // Not remembered: a library ld.so is still mapping reads as missing for a moment;
            // the next look tries again.
            Err(e) => {
                log::debug!("unwind: pid {pid}: cannot read {path}: {e}");
                return Ok(None);
            }
        };
        let rows = match table::compile(&data) {
            Ok(rows) if !rows.is_empty() => rows,
            Ok(_) => return Ok(slot.insert(None).clone()),
            Err(e) => {
                log::debug!("unwind: {path}: no table: {e}");
                return Ok(slot.insert(None).clone());
            }
        };
        let Ok(len) = u32::try_from(rows.len()) else {
            return Ok(slot.insert(None).clone());
        };
        if UNWIND_ROWS_MAX - next_row < len {
            crate::say!(
                "allocwatch: warning: no room for the unwind table of {path} ({len} rows; \
                 {next_row} of {UNWIND_ROWS_MAX} used): its frames are walked with frame \
                 pointers"
            );
            return Ok(slot.insert(None).clone());
        }
        let segments = object::File::parse(&*data)
            .map(|f| {
                f.segments()
                    .map(|s| {
                        let (off, size) = s.file_range();
                        (off, s.address(), size)
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.maps.set_rows(next_row, &rows)?;
        self.next_row += len;
        Ok(slot
            .insert(Some(FileTable {
                first: next_row,
                len,
                segments,
                name,
            }))
            .clone())
    }
}

/// Address minus file virtual address for mapping `m`: from the loadable segment that holds
/// the mapping's file offset.
fn bias(segments: &[(u64, u64, u64)], m: &MapEntry) -> Option<u64> {
    let &(off, vaddr, _) = segments
        .iter()
        .find(|&&(off, _, size)| off & !0xfff <= m.offset && m.offset < off + size)?;
    Some(
        m.start
            .wrapping_sub(m.offset)
            .wrapping_add(off)
            .wrapping_sub(vaddr),
    )
}

/// The probe's record of a process: its mappings sorted by address, at most
/// `UNWIND_MAPPINGS_MAX` (the rest are walked with frame pointers).
fn proc_of(mappings: &[UnwindMapping]) -> UnwindProc {
    let mut sorted = mappings.to_vec();
    sorted.sort_by_key(|m| m.start);
    let mut p = UnwindProc::default();
    for (slot, m) in p.maps.iter_mut().zip(&sorted) {
        *slot = *m;
    }
    p.len = sorted.len().min(UNWIND_MAPPINGS_MAX) as u32;
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::maps::parse_line;

    #[test]
    fn bias_maps_addresses_to_file_addresses() {
        // A PIE's text segment: file offset 0x1000 at address 0x1000, mapped at 0x5555_5555_5000.
        let segs = [
            (0, 0, 0x6a8),
            (0x1000, 0x1000, 0x1b5),
            (0x2000, 0x2000, 0x100),
        ];
        let m = parse_line("555555555000-555555556000 r-xp 00001000 08:01 42 /bin/x").unwrap();
        let b = bias(&segs, &m).unwrap();
        assert_eq!(0x5555_5555_5123 - b, 0x1123);
        // A segment whose offset and address differ (ld.so style: vaddr = offset + 0x1000).
        let segs = [(0x1000, 0x2000, 0x500)];
        let m = parse_line("7f0000001000-7f0000002000 r-xp 00001000 08:01 43 /lib/y.so").unwrap();
        assert_eq!(0x7f00_0000_1010 - bias(&segs, &m).unwrap(), 0x2010);
        let m = parse_line("7f0000001000-7f0000002000 r-xp 00009000 08:01 43 /lib/y.so").unwrap();
        assert_eq!(bias(&segs, &m), None);
    }

    #[test]
    fn proc_record_is_sorted_and_bounded() {
        let m = |start| UnwindMapping {
            start,
            end: start + 0x1000,
            ..Default::default()
        };
        let many: Vec<_> = (0..40u64).rev().map(|i| m(i * 0x1000)).collect();
        let p = proc_of(&many);
        assert_eq!(p.len as usize, UNWIND_MAPPINGS_MAX);
        assert!(p.maps.windows(2).all(|w| w[0].start < w[1].start));
        assert_eq!(proc_of(&[]).len, 0);
    }
}
