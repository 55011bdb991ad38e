//! Loading the tables into the probe: each file's rows once (keyed by device and inode, so
//! every process that maps the file shares them), then per process the mappings that have a
//! table, with their load bias.
//!
//! The rows table is fixed in size (`UNWIND_ROWS_MAX`) and a node runs new files all the time
//! (builds, deployments, jobs): a table stays while a process that maps its file is loaded,
//! stays cached after the last one exits (the next run of the same program reuses it), and is
//! evicted, least recently used first, when a new file needs its room. Without eviction the
//! table filled within minutes beside a build and every later file was walked with frame
//! pointers for the rest of the agent's life.

use std::{
    collections::HashMap,
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
    slots::Ranges,
    target::maps::{DevInode, MapEntry, Stamp, read_maps},
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

/// What the tables hold: rows, files and processes with tables.
pub struct Tables {
    maps: UnwindMaps,
    /// `--unwind auto`: no table for a file that keeps frame pointers.
    auto: bool,
    /// Per file: its table, or why it has none.
    files: HashMap<DevInode, Cached>,
    space: Ranges,
    /// Rows of the tables some loaded process uses (the rest are cached, evictable).
    pinned: u32,
    /// Ticks of use, for least-recently-used eviction.
    clock: u64,
    /// Per process: the mappings last loaded (to load again only when they change) and the
    /// files whose tables they use.
    procs: HashMap<u32, LoadedProc>,
    /// Per process: its executable mappings at the last read of its memory map.
    seen: HashMap<u32, Seen>,
}

struct LoadedProc {
    mappings: Vec<UnwindMapping>,
    files: Vec<DevInode>,
}

/// A file's verdict with what makes it current.
struct Cached {
    state: FileState,
    /// The file when the verdict was made; an inode number is reused once its file is deleted
    /// and unmapped, so a verdict no process holds is checked against it before reuse.
    stamp: Option<Stamp>,
    /// Loaded processes whose mappings use its table.
    users: u32,
    /// [`Tables::clock`] when the last user left.
    idle_since: u64,
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
    /// No `.eh_frame`, or unreadable as an ELF file.
    Without,
    /// Its table (`rows` long) did not fit beside the tables of running programs: tried again
    /// once that much could be freed.
    NoRoom {
        rows: u32,
    },
}

impl Tables {
    /// Tables for every file with call-frame information (`--unwind dwarf`), or with `auto`
    /// only for those built without frame pointers.
    pub fn new(maps: UnwindMaps, mode: super::Unwind) -> Self {
        Self {
            maps,
            auto: mode == super::Unwind::Auto,
            files: HashMap::new(),
            space: Ranges::new(rows_capacity()),
            pinned: 0,
            clock: 0,
            procs: HashMap::new(),
            seen: HashMap::new(),
        }
    }
}

/// `UNWIND_ROWS_MAX`, or fewer with `ALLOCWATCH_DEBUG_UNWIND_ROWS=N` (a test hook: a table
/// that fills with two small programs).
fn rows_capacity() -> u32 {
    std::env::var("ALLOCWATCH_DEBUG_UNWIND_ROWS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(UNWIND_ROWS_MAX, |n| n.min(UNWIND_ROWS_MAX))
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
        // Held as they are found, so that finding room for a later file of this process
        // cannot evict an earlier one.
        let mut used = Vec::new();
        for m in maps.iter().filter(|m| m.perms.exec && m.is_file()) {
            // Said once per table compiled (again after an eviction or a refusal for room).
            let known = self
                .files
                .get(&m.dev_inode)
                .is_some_and(|c| matches!(c.state, FileState::Table(_)));
            let file = match self.file(pid, m) {
                Ok(Some(FileState::Table(t))) => t,
                Ok(Some(FileState::FramePointers(name))) => {
                    if !frame_pointers.contains(&name) {
                        frame_pointers.push(name);
                    }
                    continue;
                }
                Ok(Some(FileState::Without | FileState::NoRoom { .. }) | None) => continue,
                Err(e) => {
                    self.release(&used);
                    return Err(e);
                }
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
            if !used.contains(&m.dev_inode) {
                self.acquire(m.dev_inode);
                used.push(m.dev_inode);
            }
            if !known {
                new_files.push((m.path.clone().unwrap_or_default(), file.len));
            }
            names.push(file.name.clone());
        }
        if self.procs.get(&pid).is_some_and(|p| p.mappings == mappings) {
            self.release(&used);
            return Ok(None);
        }
        // Nothing with a table (with `auto`: every file keeps frame pointers): the probe walks
        // its stacks as without tables (the kernel's frame-pointer walk, and its deeper limit).
        if mappings.is_empty() {
            self.drop_proc(pid)?;
            return Ok(None);
        }
        if let Err(e) = self.maps.set_proc(pid, Some(&proc_of(&mappings))) {
            self.release(&used);
            return Err(e);
        }
        // The files of the mappings it had before are let go after the new ones are held
        // (those of both stay held throughout).
        if let Some(old) = self.procs.insert(
            pid,
            LoadedProc {
                mappings,
                files: used,
            },
        ) {
            self.release(&old.files);
        }
        let rows = self.space.used();
        Ok(Some(Loaded {
            files: names,
            frame_pointers,
            rows,
            bytes: u64::from(rows) * size_of::<UnwindRow>() as u64,
            new_files,
        }))
    }

    /// Rows of the tables loaded processes use, and the processes with tables. Tables of
    /// programs that have exited stay cached but are given up for a new file when needed, so
    /// they do not count as used.
    pub fn usage(&self) -> (u32, usize) {
        (self.pinned, self.procs.len())
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

    /// Forgets an exited process (its files' tables stay cached for the next process that
    /// maps them, until their room is needed).
    pub fn forget(&mut self, pid: u32) -> Result<(), MapError> {
        self.seen.remove(&pid);
        self.drop_proc(pid)
    }

    /// Takes `pid`'s mappings out of the probe (its stacks: the kernel's walk), then lets go
    /// of its files' tables.
    fn drop_proc(&mut self, pid: u32) -> Result<(), MapError> {
        if let Some(p) = self.procs.remove(&pid) {
            let removed = self.maps.set_proc(pid, None);
            // Kept held if the probe may still read them (the process's record stayed).
            if removed.is_err() {
                self.procs.insert(pid, p);
                return removed;
            }
            self.release(&p.files);
        }
        Ok(())
    }

    /// One more loaded process uses each of `ids`' tables.
    fn acquire(&mut self, id: DevInode) {
        if let Some(c) = self.files.get_mut(&id) {
            if c.users == 0
                && let FileState::Table(t) = &c.state
            {
                self.pinned += t.len;
            }
            c.users += 1;
        }
    }

    /// One process fewer uses each of `ids`' tables; a table without users is cached.
    fn release(&mut self, ids: &[DevInode]) {
        for id in ids {
            let Some(c) = self.files.get_mut(id) else {
                continue;
            };
            c.users = c.users.saturating_sub(1);
            if c.users == 0 {
                if let FileState::Table(t) = &c.state {
                    self.pinned -= t.len;
                }
                self.clock += 1;
                c.idle_since = self.clock;
            }
        }
    }

    /// Drops the verdict on `id` and frees its rows (no process uses them).
    fn evict(&mut self, id: DevInode) {
        if let Some(c) = self.files.remove(&id)
            && let FileState::Table(t) = c.state
        {
            log::debug!("unwind: table of {} ({} rows) evicted", t.name, t.len);
            self.space.release(t.first, t.len);
        }
    }

    /// Rows of the cached tables no loaded process uses.
    fn idle_rows(&self) -> u32 {
        self.files
            .values()
            .filter(|c| c.users == 0)
            .map(|c| match &c.state {
                FileState::Table(t) => t.len,
                _ => 0,
            })
            .sum()
    }

    /// `len` free rows, evicting cached tables no process uses, least recently used first.
    fn room(&mut self, len: u32) -> Option<u32> {
        loop {
            if let Some(first) = self.space.alloc(len) {
                return Some(first);
            }
            let lru = self
                .files
                .iter()
                .filter(|(_, c)| c.users == 0 && matches!(c.state, FileState::Table(_)))
                .min_by_key(|(_, c)| c.idle_since)
                .map(|(id, _)| *id)?;
            self.evict(lru);
        }
    }

    /// The table of the file mapped at `m`, compiled and loaded on first sight (`None`: not
    /// readable now, tried again at the next look).
    fn file(&mut self, pid: u32, m: &MapEntry) -> Result<Option<FileState>, MapError> {
        let path = m.path.as_deref().unwrap_or_default();
        // Through map_files: the mapped file itself, even in another mount namespace or
        // replaced on disk since.
        let mapped = format!("/proc/{pid}/map_files/{}", m.map_files_name());
        let rooted = format!("/proc/{pid}/root{path}");
        if let Some(c) = self.files.get(&m.dev_inode) {
            // A verdict nobody holds may be of a deleted file whose inode number came back.
            let stale = c.users == 0
                && !Stamp::holds(c.stamp, || {
                    std::fs::metadata(&mapped)
                        .or_else(|_| std::fs::metadata(&rooted))
                        .ok()
                        .map(|now| Stamp::of(&now))
                });
            let retry = match c.state {
                FileState::NoRoom { rows } => {
                    self.space.free_rows().saturating_add(self.idle_rows()) >= rows
                }
                _ => false,
            };
            if !stale && !retry {
                return Ok(Some(c.state.clone()));
            }
            self.evict(m.dev_inode);
        }
        let name = path.rsplit('/').next().unwrap_or(path).to_owned();
        let opened = std::fs::File::open(&mapped).or_else(|_| std::fs::File::open(&rooted));
        let read = opened.and_then(|mut f| {
            let stamp = f.metadata().ok().map(|m| Stamp::of(&m));
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut data).map(|_| (data, stamp))
        });
        let (data, stamp) = match read {
            Ok(d) => d,
            // Not remembered: a library ld.so is still mapping reads as missing for a moment;
            // the next look tries again.
            Err(e) => {
                log::debug!("unwind: pid {pid}: cannot read {path}: {e}");
                return Ok(None);
            }
        };
        let id = m.dev_inode;
        let rows = match table::compile(&data) {
            // Classified as the table is compiled: the CFI is parsed once either way.
            Ok(c) if self.auto && c.frame_pointers.kept() => {
                log::debug!(
                    "unwind: {path}: frame pointers kept ({:?}): no table",
                    c.frame_pointers
                );
                return Ok(Some(self.remember(
                    id,
                    FileState::FramePointers(name),
                    stamp,
                )));
            }
            Ok(c) if !c.rows.is_empty() => c.rows,
            Ok(_) => return Ok(Some(self.remember(id, FileState::Without, stamp))),
            Err(e) => {
                log::debug!("unwind: {path}: no table: {e}");
                return Ok(Some(self.remember(id, FileState::Without, stamp)));
            }
        };
        let Ok(len) = u32::try_from(rows.len()) else {
            return Ok(Some(self.remember(id, FileState::Without, stamp)));
        };
        let Some(first) = self.room(len) else {
            let (capacity, pinned) = (self.space.capacity(), self.pinned);
            crate::say!(
                "allocwatch: warning: no room for the unwind table of {path} ({len} rows; \
                 {pinned} of {capacity} held by the tables of running programs): its frames \
                 are walked with frame pointers"
            );
            return Ok(Some(self.remember(
                id,
                FileState::NoRoom { rows: len },
                stamp,
            )));
        };
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
        if let Err(e) = self.maps.set_rows(first, &rows) {
            self.space.release(first, len);
            return Err(e);
        }
        let table = FileTable {
            first,
            len,
            segments,
            name,
        };
        Ok(Some(self.remember(id, FileState::Table(table), stamp)))
    }

    /// Notes the verdict on file `id` (no process uses it yet).
    fn remember(&mut self, id: DevInode, state: FileState, stamp: Option<Stamp>) -> FileState {
        self.files.insert(
            id,
            Cached {
                state: state.clone(),
                stamp,
                users: 0,
                idle_since: self.clock,
            },
        );
        state
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
