//! A Go map's state now, read from the traced process's memory (`process_vm_readv`): its
//! length, its slots and the bytes its buckets or tables hold. Go never shrinks a map, so a
//! header that is implausible, or smaller than what the growth probes (or an earlier read)
//! saw, is not that map any more (freed, its memory reused): it is dropped, never misread.
//!
//! Layouts: [`versions::HMAP_HEADER`] and [`versions::SWISS_HEADER`], with their sources.

use std::io;

use super::versions::{HMAP_HEADER, MapHeader, SWISS_HEADER};

/// Directory entries read at most (2^16 tables of up to 1,024 slots: 64 Mi slots).
const MAX_DIR_LEN: u64 = 1 << 16;
/// Bucket maps: the largest B read as plausible (2^40 buckets is far past any real heap).
const MAX_LOG2_BUCKETS: u8 = 40;

/// Reads another process's memory.
pub trait Memory {
    /// Fills `buf` from `addr`, entirely or not at all.
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// A live process's memory.
pub struct ProcessMemory {
    pub pid: u32,
}

impl Memory for ProcessMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` covers exactly `buf`, which we own mutably; the remote range is only
        // read by the kernel (a bad address is an error, not a fault here).
        let n =
            unsafe { libc::process_vm_readv(self.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read at {addr:#x}: {n} of {} bytes", buf.len()),
            ));
        }
        Ok(())
    }
}

/// What a map holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Live {
    /// Elements.
    pub len: u64,
    /// Slots of its buckets or tables (bucket maps: without overflow buckets).
    pub slots: u64,
    /// Bytes of its bucket array, or of its groups plus directory.
    pub bytes: u64,
}

/// The outcome of one read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Read {
    Live(Live),
    /// Not (or no longer) this map; why.
    Gone(String),
    /// The map changed while it was read (a writer between the header and the tables): try
    /// again at the next refresh.
    Torn,
    /// One step smaller than its last growth event said: the growth is still under way (the
    /// probe fires at the growth function's entry, before the header changes), or the map
    /// is gone; the caller decides after a few reads.
    Behind,
}

/// What the growth probes (and earlier reads) know of a map, to tell it from a stranger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Known {
    /// Bytes of one bucket (bucket maps) or one group (swiss maps), from the growth events.
    pub unit_bytes: u64,
    /// Bucket maps: the B it grew to. Swiss maps: its largest table capacity seen.
    pub size_class: u64,
    /// Slots at the last read (0 before the first).
    pub slots: u64,
}

/// Reads `buf` at `addr`: `Ok(false)` when the address is not mapped (the map is gone),
/// `Err` when the process cannot be read at all (it exited, or no permission): then nothing is
/// known of any of its maps, and none is dropped.
fn fetch(mem: &impl Memory, addr: u64, buf: &mut [u8]) -> io::Result<bool> {
    match mem.read(addr, buf) {
        Ok(()) => Ok(true),
        Err(e)
            if e.raw_os_error() == Some(libc::EFAULT)
                || e.kind() == io::ErrorKind::UnexpectedEof =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

/// A bucket map (`hmap`) at `ptr`.
pub fn read_buckets(mem: &impl Memory, ptr: u64, known: Known) -> io::Result<Read> {
    let h: &MapHeader = &HMAP_HEADER;
    let mut buf = [0u8; 24];
    if !fetch(mem, ptr, &mut buf[..h.header_len])? {
        return Ok(Read::Gone("header not mapped".into()));
    }
    Ok(buckets_header(&buf, known))
}

fn buckets_header(buf: &[u8], known: Known) -> Read {
    let h: &MapHeader = &HMAP_HEADER;
    let len = u64_at(buf, h.len);
    let b = buf[h.log2_buckets];
    let buckets = u64_at(buf, h.storage);
    if b > MAX_LOG2_BUCKETS || buckets == 0 {
        return Read::Gone(format!("implausible header (B {b}, buckets {buckets:#x})"));
    }
    if u64::from(b) + 1 == known.size_class {
        return Read::Behind;
    }
    if u64::from(b) < known.size_class {
        return Read::Gone(format!(
            "B {b} below the {} it grew to: another map",
            known.size_class
        ));
    }
    let slots = h.slots_per_unit << b;
    // The load factor (6.5 per bucket) keeps a live map's count below its slots.
    if len > slots {
        return Read::Gone(format!("{len} elements in {slots} slots: not a map header"));
    }
    if slots < known.slots {
        return Read::Gone(format!("{slots} slots, down from {}", known.slots));
    }
    Read::Live(Live {
        len,
        slots,
        bytes: known.unit_bytes << b,
    })
}

/// A swiss map (`Map`) at `ptr`.
pub fn read_swiss(mem: &impl Memory, ptr: u64, known: Known) -> io::Result<Read> {
    let h: &MapHeader = &SWISS_HEADER;
    let mut buf = [0u8; 40];
    if !fetch(mem, ptr, &mut buf[..h.header_len])? {
        return Ok(Read::Gone("header not mapped".into()));
    }
    let len = u64_at(&buf, h.len);
    let storage = u64_at(&buf, h.storage);
    let dir_len = u64_at(&buf, h.dir_len);
    let depth = buf[h.global_depth];
    if dir_len == 0 {
        // A small map: one group, no directory.
        let slots = h.slots_per_unit;
        if storage == 0 && len != 0 || len > slots {
            return Ok(Read::Gone(format!(
                "implausible small map ({len} elements)"
            )));
        }
        if known.size_class > slots || known.slots > slots {
            return Ok(Read::Gone(
                "a small map where a table was: another map".into(),
            ));
        }
        return Ok(Read::Live(Live {
            len,
            slots,
            bytes: if storage == 0 { 0 } else { known.unit_bytes },
        }));
    }
    if depth >= 64 || dir_len != 1 << depth || dir_len > MAX_DIR_LEN || storage == 0 {
        return Ok(Read::Gone(format!(
            "implausible directory (dirLen {dir_len}, globalDepth {depth})"
        )));
    }
    let mut dir = vec![0u8; dir_len as usize * 8];
    if !fetch(mem, storage, &mut dir)? {
        return Ok(Read::Gone("directory not mapped".into()));
    }
    // A table of local depth d fills 2^(globalDepth-d) consecutive entries.
    let (entries, _) = dir.as_chunks::<8>();
    let mut tables: Vec<u64> = entries.iter().map(|c| u64::from_le_bytes(*c)).collect();
    tables.dedup();
    let (mut used, mut slots, mut largest) = (0u64, 0u64, 0u64);
    for &t in &tables {
        let mut th = [0u8; 4];
        if t == 0 {
            return Ok(Read::Gone("a null table in the directory".into()));
        }
        if !fetch(mem, t, &mut th)? {
            return Ok(Read::Gone("table not mapped".into()));
        }
        let cap = u64::from(u16_at(&th, h.table_capacity));
        let t_used = u64::from(u16_at(&th, h.table_used));
        if !cap.is_power_of_two() || cap < h.slots_per_unit || cap > h.max_table_capacity {
            return Ok(Read::Gone(format!("implausible table capacity {cap}")));
        }
        if t_used > cap {
            return Ok(Read::Gone(format!("{t_used} elements in a table of {cap}")));
        }
        used += t_used;
        slots += cap;
        largest = largest.max(cap);
    }
    if used != len {
        // A writer moved between the header and the tables.
        return Ok(Read::Torn);
    }
    if largest * 2 == known.size_class && slots >= known.slots {
        return Ok(Read::Behind);
    }
    // Tables split into tables of their own capacity and never shrink.
    if largest < known.size_class || slots < known.slots {
        return Ok(Read::Gone(format!(
            "{slots} slots in {} tables, down from what it grew to: another map",
            tables.len()
        )));
    }
    Ok(Read::Live(Live {
        len,
        slots,
        bytes: slots / h.slots_per_unit * known.unit_bytes + dir_len * 8,
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Memory made of byte runs at addresses.
    #[derive(Default)]
    struct Fake(BTreeMap<u64, Vec<u8>>);

    impl Fake {
        fn put(&mut self, addr: u64, bytes: Vec<u8>) {
            self.0.insert(addr, bytes);
        }
    }

    impl Memory for Fake {
        fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
            let (start, run) = self
                .0
                .range(..=addr)
                .next_back()
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
            let off = (addr - start) as usize;
            let src = run
                .get(off..off + buf.len())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    fn hmap(count: u64, b: u8, buckets: u64) -> Vec<u8> {
        let mut v = vec![0u8; 48];
        v[0..8].copy_from_slice(&count.to_le_bytes());
        v[9] = b;
        v[12..16].copy_from_slice(&0x1234_5678u32.to_le_bytes());
        v[16..24].copy_from_slice(&buckets.to_le_bytes());
        v
    }

    fn swiss(used: u64, dir: u64, dir_len: u64, depth: u8) -> Vec<u8> {
        let mut v = vec![0u8; 48];
        v[0..8].copy_from_slice(&used.to_le_bytes());
        v[16..24].copy_from_slice(&dir.to_le_bytes());
        v[24..32].copy_from_slice(&dir_len.to_le_bytes());
        v[32] = depth;
        v
    }

    fn table(used: u16, cap: u16) -> Vec<u8> {
        let mut v = vec![0u8; 16];
        v[0..2].copy_from_slice(&used.to_le_bytes());
        v[2..4].copy_from_slice(&cap.to_le_bytes());
        v
    }

    const BUCKET: u64 = 144; // map[int]int: 8 tophash + 8*8 keys + 8*8 values + overflow

    #[test]
    fn a_bucket_map_reads_its_count_slots_and_bytes() {
        let mut m = Fake::default();
        m.put(0x1000, hmap(1000, 14, 0x9000));
        let known = Known {
            unit_bytes: BUCKET,
            size_class: 14,
            slots: 0,
        };
        assert_eq!(
            read_buckets(&m, 0x1000, known).unwrap(),
            Read::Live(Live {
                len: 1000,
                slots: 8 << 14,
                bytes: BUCKET << 14
            })
        );
    }

    #[test]
    fn a_bucket_map_smaller_than_it_grew_is_another_map() {
        let mut m = Fake::default();
        m.put(0x1000, hmap(3, 13, 0x9000));
        let known = Known {
            unit_bytes: BUCKET,
            size_class: 14,
            slots: 0,
        };
        // The growth event came before hashGrow set the new B.
        assert_eq!(read_buckets(&m, 0x1000, known).unwrap(), Read::Behind);
        m.put(0x1000, hmap(3, 0, 0x9000));
        assert!(matches!(
            read_buckets(&m, 0x1000, known).unwrap(),
            Read::Gone(_)
        ));
        // Implausible: more elements than slots; no buckets; a huge B; unmapped.
        for bytes in [hmap(100, 2, 0x9000), hmap(1, 2, 0), hmap(1, 60, 0x9000)] {
            m.put(0x1000, bytes);
            assert!(matches!(
                read_buckets(&m, 0x1000, Known::default()).unwrap(),
                Read::Gone(_)
            ));
        }
        assert!(matches!(
            read_buckets(&m, 0x50, Known::default()).unwrap(),
            Read::Gone(_)
        ));
    }

    #[test]
    fn a_swiss_map_sums_its_distinct_tables() {
        let mut m = Fake::default();
        // globalDepth 2: four entries, the first table (local depth 1) fills two of them.
        m.put(0x1000, swiss(1000 + 300 + 7, 0x2000, 4, 2));
        let dir: Vec<u8> = [0x3000u64, 0x3000, 0x4000, 0x5000]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        m.put(0x2000, dir);
        m.put(0x3000, table(1000, 1024));
        m.put(0x4000, table(300, 512));
        m.put(0x5000, table(7, 8));
        let group = 8 + 8 * 16;
        let known = Known {
            unit_bytes: group,
            size_class: 1024,
            slots: 0,
        };
        assert_eq!(
            read_swiss(&m, 0x1000, known).unwrap(),
            Read::Live(Live {
                len: 1307,
                slots: 1024 + 512 + 8,
                bytes: (1024 + 512 + 8) / 8 * group + 4 * 8,
            })
        );
        // A writer between the header and the tables: torn, read again later.
        m.put(0x1000, swiss(1308, 0x2000, 4, 2));
        assert_eq!(read_swiss(&m, 0x1000, known).unwrap(), Read::Torn);
    }

    #[test]
    fn a_small_swiss_map_is_one_group() {
        let mut m = Fake::default();
        m.put(0x1000, swiss(5, 0x2000, 0, 0));
        let known = Known {
            unit_bytes: 136,
            size_class: 8,
            slots: 0,
        };
        assert_eq!(
            read_swiss(&m, 0x1000, known).unwrap(),
            Read::Live(Live {
                len: 5,
                slots: 8,
                bytes: 136
            })
        );
        // Where a table was seen: another map now.
        let grown = Known {
            size_class: 1024,
            ..known
        };
        assert!(matches!(
            read_swiss(&m, 0x1000, grown).unwrap(),
            Read::Gone(_)
        ));
    }

    #[test]
    fn implausible_swiss_headers_are_gone() {
        let mut m = Fake::default();
        m.put(0x2000, 0x3000u64.to_le_bytes().to_vec());
        m.put(0x3000, table(3, 12));
        for h in [
            swiss(3, 0x2000, 3, 2),  // dirLen is not 2^globalDepth
            swiss(3, 0x2000, 1, 0),  // table capacity 12: not a power of two
            swiss(3, 0, 1, 0),       // no directory
            swiss(30, 0x2000, 0, 0), // 30 elements in a small map
        ] {
            m.put(0x1000, h);
            assert!(
                matches!(
                    read_swiss(&m, 0x1000, Known::default()).unwrap(),
                    Read::Gone(_)
                ),
                "{:?}",
                read_swiss(&m, 0x1000, Known::default()).unwrap()
            );
        }
    }
}
