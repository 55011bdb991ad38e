//! Loading the tables into the probe: each file's rows once (keyed by device and inode, so
//! every process that maps the file shares them), then per process the mappings that have a
//! table, with their load bias.

use std::{
    collections::{HashMap, hash_map::Entry},
    time::{Duration, Instant},
};

use allocwatch_common::{
    map_names,
    unwind::{
        FRAME_EXACT, UNWIND_MAPPINGS_MAX, UNWIND_ROWS_MAX, UnwindMapping, UnwindProc, UnwindRow,
    },
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

/// A file's table in `UNWIND_ROWS` and its executable loadable segments (file offset,
/// address, size).
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
    /// `--unwind auto`: no table for a file that keeps frame pointers.
    auto: bool,
    /// Per file: its table, or why it has none.
    files: HashMap<DevInode, FileState>,
    next_row: u32,
    /// Per process: the mappings last loaded (to load again only when they change).
    procs: HashMap<u32, Vec<UnwindMapping>>,
    /// Per process: its executable mappings at the last read of its memory map.
    seen: HashMap<u32, Seen>,
}

/// A process's executable mappings (start, end) at the last read of its memory map, sorted,
/// and when a stack outside them last made it read again ([`Tables::check`]).
#[derive(Default)]
struct Seen {
    exec: Vec<(u64, u64)>,
    checked: Option<Instant>,
}

/// A file as the tables know it.
#[derive(Clone, Debug)]
enum FileState {
    Table(FileTable),
    /// Walked with frame pointers: it keeps them (`--unwind auto`); its name.
    FramePointers(String),
    /// No `.eh_frame`, unreadable as an ELF file, or no room left.
    Without,
}

impl Tables {
    /// Tables for every file with call-frame information (`--unwind dwarf`), or with `auto`
    /// only for those built without frame pointers.
    pub fn new(maps: UnwindMaps, mode: super::Unwind) -> Self {
        Self {
            maps,
            auto: mode == super::Unwind::Auto,
            files: HashMap::new(),
            next_row: 0,
            procs: HashMap::new(),
            seen: HashMap::new(),
        }
    }
}

/// What one process has, for the line that reports it.
#[derive(Debug, PartialEq, Eq)]
pub struct Loaded {
    /// Names of the files whose mappings have a table.
    pub files: Vec<String>,
    /// Names of the files walked with their frame pointers (`--unwind auto`).
    pub frame_pointers: Vec<String>,
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
        let mut exec: Vec<(u64, u64)> = maps
            .iter()
            .filter(|m| m.perms.exec)
            .map(|m| (m.start, m.end))
            .collect();
        exec.sort_unstable();
        self.seen.entry(pid).or_default().exec = exec;
        let mut mappings = Vec::new();
        let mut names = Vec::new();
        let mut frame_pointers = Vec::new();
        let mut new_files = Vec::new();
        for m in maps.iter().filter(|m| m.perms.exec && m.is_file()) {
            let known = self.files.contains_key(&m.dev_inode);
            let file = match self.file(pid, m)? {
                Some(FileState::Table(t)) => t,
                Some(FileState::FramePointers(name)) => {
                    if !frame_pointers.contains(&name) {
                        frame_pointers.push(name);
                    }
                    continue;
                }
                Some(FileState::Without) | None => continue,
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
        // Nothing with a table (with `auto`: every file keeps frame pointers): the probe walks
        // its stacks as without tables (the kernel's frame-pointer walk, and its deeper limit).
        if mappings.is_empty() {
            self.drop_proc(pid)?;
            return Ok(None);
        }
        self.maps.set_proc(pid, Some(&proc_of(&mappings)))?;
        self.procs.insert(pid, mappings);
        Ok(Some(Loaded {
            files: names,
            frame_pointers,
            rows: self.next_row,
            bytes: u64::from(self.next_row) * size_of::<UnwindRow>() as u64,
            new_files,
        }))
    }

    /// Rows of every table loaded, and the processes with tables.
    pub fn usage(&self) -> (u32, usize) {
        (self.next_row, self.procs.len())
    }

    /// A stack of `pid` with an address outside the executable mappings it had when last
    /// loaded (a library mapped since: dlopen) loads it again, at most once per
    /// [`CHECK_INTERVAL`] (a JIT's fresh code would otherwise re-read it at every new site).
    pub fn check(&mut self, pid: u32, stack: &[u64]) -> Result<Option<Loaded>, MapError> {
        let Some(seen) = self.seen.get_mut(&pid) else {
            return Ok(None);
        };
        if stack
            .iter()
            .all(|&a| a == 0 || within(&seen.exec, a & !FRAME_EXACT))
            || seen.checked.is_some_and(|t| t.elapsed() < CHECK_INTERVAL)
        {
            return Ok(None);
        }
        seen.checked = Some(Instant::now());
        self.load_process(pid)
    }

    /// Forgets an exited process (its files' rows stay for the next process that maps them).
    pub fn forget(&mut self, pid: u32) -> Result<(), MapError> {
        self.seen.remove(&pid);
        self.drop_proc(pid)
    }

    /// Takes `pid`'s mappings out of the probe (its stacks: the kernel's walk).
    fn drop_proc(&mut self, pid: u32) -> Result<(), MapError> {
        if self.procs.remove(&pid).is_some() {
            self.maps.set_proc(pid, None)?;
        }
        Ok(())
    }

    /// The table of the file mapped at `m`, compiled and loaded on first sight (`None`: not
    /// readable now, tried again at the next look).
    fn file(&mut self, pid: u32, m: &MapEntry) -> Result<Option<FileState>, MapError> {
        let next_row = self.next_row;
        let slot = match self.files.entry(m.dev_inode) {
            Entry::Occupied(e) => return Ok(Some(e.get().clone())),
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
            // Classified as the table is compiled: the CFI is parsed once either way.
            Ok(c) if self.auto && c.frame_pointers.kept() => {
                log::debug!(
                    "unwind: {path}: frame pointers kept ({:?}): no table",
                    c.frame_pointers
                );
                return Ok(Some(slot.insert(FileState::FramePointers(name)).clone()));
            }
            Ok(c) if !c.rows.is_empty() => c.rows,
            Ok(_) => return Ok(Some(slot.insert(FileState::Without).clone())),
            Err(e) => {
                log::debug!("unwind: {path}: no table: {e}");
                return Ok(Some(slot.insert(FileState::Without).clone()));
            }
        };
        let Ok(len) = u32::try_from(rows.len()) else {
            return Ok(Some(slot.insert(FileState::Without).clone()));
        };
        if UNWIND_ROWS_MAX - next_row < len {
            crate::say!(
                "allocwatch: warning: no room for the unwind table of {path} ({len} rows; \
                 {next_row} of {UNWIND_ROWS_MAX} used): its frames are walked with frame \
                 pointers"
            );
            return Ok(Some(slot.insert(FileState::Without).clone()));
        }
        // Executable segments only: only executable mappings are walked, and with lld's layout
        // (rustc's default linker) the read-only segment before the text shares the text's
        // first file page, so matching on file offsets alone took it (bias off by a page).
        let segments = object::File::parse(&*data)
            .map(|f| {
                f.segments()
                    .filter(|s| {
                        matches!(s.flags(), object::SegmentFlags::Elf { p_flags }
                            if p_flags & object::elf::PF_X != 0)
                    })
                    .map(|s| {
                        let (off, size) = s.file_range();
                        (off, s.address(), size)
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.maps.set_rows(next_row, &rows)?;
        self.next_row += len;
        Ok(Some(
            slot.insert(FileState::Table(FileTable {
                first: next_row,
                len,
                segments,
                name,
            }))
            .clone(),
        ))
    }
}

/// How often a process's memory map is read again for stacks outside it ([`Tables::check`]).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Whether `addr` is in one of the sorted, disjoint `ranges` (start inclusive, end exclusive).
fn within(ranges: &[(u64, u64)], addr: u64) -> bool {
    let i = ranges.partition_point(|&(start, _)| start <= addr);
    i > 0 && addr < ranges[i - 1].1
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
        // lld's layout (a Rust binary): the text segment's first page is also the last of the
        // read-only segment before it, which `segments` leaves out (executable segments only).
        let segs = [(0x13fb0, 0x14fb0, 0x3b710)];
        let m = parse_line("555555568000-5555555a4000 r-xp 00013000 08:01 44 /bin/r").unwrap();
        assert_eq!(0x5555_5556_9280 - bias(&segs, &m).unwrap(), 0x15280);
    }

    #[test]
    fn addresses_within_mappings() {
        let ranges = [(0x1000, 0x2000), (0x5000, 0x6000)];
        for (addr, inside) in [
            (0xfff, false),
            (0x1000, true),
            (0x1fff, true),
            (0x2000, false),
            (0x4fff, false),
            (0x5800, true),
            (0x6000, false),
        ] {
            assert_eq!(within(&ranges, addr), inside, "{addr:#x}");
        }
        assert!(!within(&[], 0x1000));
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
