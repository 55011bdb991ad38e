//! Reading and deleting hash-map entries in batches (`BPF_MAP_LOOKUP_BATCH`,
//! `BPF_MAP_DELETE_BATCH`, Linux 5.6): one syscall per few thousand entries, where walking a
//! map with aya costs two syscalls per entry (a 65k-row site table took ~0.5 s that way, and
//! deleting an exited process's rows walked a million-entry table key by key). aya has no
//! batch API, so this wraps the syscall. A kernel or map type without batch support falls back
//! to walking keys one at a time, with the same results.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use aya::{
    Pod,
    maps::{Map, MapData},
};

// bpf(2) commands (uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel's internal "operation not supported" (not in libc: it never reaches userspace
/// through glibc, but bpf(2) returns it as is).
const ENOTSUPP: i32 = 524;

/// Entries asked for per batch syscall.
const CHUNK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("map {name}: {call} failed")]
    Syscall {
        name: &'static str,
        call: &'static str,
        source: io::Error,
    },
    #[error("map {name}: key or value size differs from the probe's ({what})")]
    Layout { name: &'static str, what: String },
    #[error("map {name}: not a hash map")]
    NotHash { name: &'static str },
}

/// `bpf_attr` for the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `bpf_attr` for the single-element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value` for lookups, `next_key` for `BPF_MAP_GET_NEXT_KEY`.
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the size passed; the kernel
    // zero-extends shorter attrs and only writes fields of the command.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

/// Where a pass over a map stands between calls of [`RawMap::scan`].
#[derive(Clone, Debug, Default)]
pub struct Cursor {
    /// The kernel's batch token (a bucket index for hash maps).
    token: Option<u64>,
    /// Fallback walk: the last key visited.
    last_key: Option<Vec<u8>>,
    done: bool,
}

impl Cursor {
    /// Whether the pass has visited the whole map.
    pub fn done(&self) -> bool {
        self.done
    }
}

/// A hash map (plain, per-CPU or LRU) of the probe, by its descriptor and entry layout.
pub struct RawMap<'a> {
    name: &'static str,
    fd: BorrowedFd<'a>,
    key_size: usize,
    value_size: usize,
    /// Values per key: the number of possible CPUs for per-CPU maps, else 1.
    cpus: usize,
    per_cpu: bool,
    max_entries: u32,
    /// Whether batch syscalls work on this map (false after the kernel refused one).
    batch: std::cell::Cell<bool>,
}

impl<'a> RawMap<'a> {
    /// The map `name` with keys `K` and values `V` (per CPU for per-CPU maps).
    pub fn of<K: Pod, V: Pod>(map: &'a Map, name: &'static str) -> Result<Self, BatchError> {
        let (data, per_cpu): (&MapData, bool) = match map {
            Map::HashMap(d) | Map::LruHashMap(d) => (d, false),
            Map::PerCpuHashMap(d) | Map::PerCpuLruHashMap(d) => (d, true),
            _ => return Err(BatchError::NotHash { name }),
        };
        let info = data.info().map_err(|e| BatchError::Layout {
            name,
            what: e.to_string(),
        })?;
        if info.key_size() as usize != size_of::<K>()
            || info.value_size() as usize != size_of::<V>()
        {
            return Err(BatchError::Layout {
                name,
                what: format!(
                    "kernel {}+{} bytes, agent {}+{}",
                    info.key_size(),
                    info.value_size(),
                    size_of::<K>(),
                    size_of::<V>()
                ),
            });
        }
        // Read once: the sweeper makes a `RawMap` per table and gone process, and aya reads
        // and parses a sysfs file each time.
        static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let cpus = if per_cpu {
            *CPUS.get_or_init(|| aya::util::nr_cpus().map_or(1, |n| n.get() as usize))
        } else {
            1
        };
        Ok(Self {
            name,
            fd: data.fd().as_fd(),
            key_size: size_of::<K>(),
            value_size: size_of::<V>(),
            cpus,
            per_cpu,
            max_entries: info.max_entries(),
            batch: std::cell::Cell::new(true),
        })
    }

    /// The map's capacity.
    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    /// Bytes the kernel copies per entry: per-CPU values are each padded to 8 bytes.
    fn stride(&self) -> usize {
        if self.per_cpu {
            self.value_size.next_multiple_of(8) * self.cpus
        } else {
            self.value_size
        }
    }

    fn err(&self, call: &'static str) -> impl Fn(io::Error) -> BatchError + '_ {
        move |source| BatchError::Syscall {
            name: self.name,
            call,
            source,
        }
    }

    /// Visits at most about `budget` entries of the pass `cursor` (a fresh cursor starts a
    /// pass), calling `f` with each key and its values (one per CPU for per-CPU maps). Entries
    /// added or deleted during a pass may or may not be visited; the others are visited once.
    pub fn scan<K: Pod, V: Pod>(
        &self,
        cursor: &mut Cursor,
        budget: usize,
        mut f: impl FnMut(&K, &[V]),
    ) -> Result<(), BatchError> {
        let mut visited = 0;
        let mut values = Vec::with_capacity(self.cpus);
        while !cursor.done && visited < budget {
            let n = if self.batch.get() {
                match self.lookup_batch(cursor, CHUNK.min(budget - visited).max(1), &mut |k, v| {
                    decode_values(v, self.per_cpu, self.cpus, self.value_size, &mut values);
                    f(&read::<K>(k), &values);
                }) {
                    Ok(n) => n,
                    Err(e) if cursor.token.is_none() && unsupported(&e) => {
                        log::debug!("map {}: no batch lookup ({e}): walking keys", self.name);
                        self.batch.set(false);
                        continue;
                    }
                    Err(e) => return Err(self.err("BPF_MAP_LOOKUP_BATCH")(e)),
                }
            } else {
                self.walk(cursor, CHUNK.min(budget - visited).max(1), &mut |k, v| {
                    decode_values(v, self.per_cpu, self.cpus, self.value_size, &mut values);
                    f(&read::<K>(k), &values);
                })?
            };
            visited += n.max(1);
        }
        Ok(())
    }

    /// One `BPF_MAP_LOOKUP_BATCH` of up to `count` entries; how many came back.
    fn lookup_batch(
        &self,
        cursor: &mut Cursor,
        mut count: usize,
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> io::Result<usize> {
        loop {
            let mut keys = vec![0u8; count * self.key_size];
            let mut vals = vec![0u8; count * self.stride()];
            let in_token = cursor.token.unwrap_or(0);
            let mut out_token: u64 = 0;
            let mut attr = BatchAttr {
                in_batch: if cursor.token.is_some() {
                    std::ptr::from_ref(&in_token) as u64
                } else {
                    0
                },
                out_batch: std::ptr::from_mut(&mut out_token) as u64,
                keys: keys.as_mut_ptr() as u64,
                values: vals.as_mut_ptr() as u64,
                count: count as u32,
                map_fd: self.fd.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            let got = (attr.count as usize).min(count);
            match r {
                Ok(()) => {}
                // The end of the map: what came back is the last chunk.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => cursor.done = true,
                // A hash bucket holds more entries than asked for: ask for more.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && got == 0 => {
                    count *= 2;
                    continue;
                }
                Err(e) => return Err(e),
            }
            for i in 0..got {
                f(
                    &keys[i * self.key_size..(i + 1) * self.key_size],
                    &vals[i * self.stride()..(i + 1) * self.stride()],
                );
            }
            cursor.token = Some(out_token);
            return Ok(got);
        }
    }

    /// Up to `count` entries by `BPF_MAP_GET_NEXT_KEY` + lookup (kernels without batch ops).
    fn walk(
        &self,
        cursor: &mut Cursor,
        count: usize,
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<usize, BatchError> {
        let mut n = 0;
        let mut next = vec![0u8; self.key_size];
        let mut vals = vec![0u8; self.stride()];
        while n < count {
            let mut attr = ElemAttr {
                map_fd: self.fd.as_raw_fd() as u32,
                key: cursor.last_key.as_ref().map_or(0, |k| k.as_ptr() as u64),
                value: next.as_mut_ptr() as u64,
                ..ElemAttr::default()
            };
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    cursor.done = true;
                    break;
                }
                Err(e) => return Err(self.err("BPF_MAP_GET_NEXT_KEY")(e)),
            }
            let mut attr = ElemAttr {
                map_fd: self.fd.as_raw_fd() as u32,
                key: next.as_ptr() as u64,
                value: vals.as_mut_ptr() as u64,
                ..ElemAttr::default()
            };
            match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
                Ok(()) => {
                    f(&next, &vals);
                    n += 1;
                }
                // Deleted since: nothing to visit.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(self.err("BPF_MAP_LOOKUP_ELEM")(e)),
            }
            cursor.last_key = Some(next.clone());
        }
        Ok(n)
    }

    /// The values of `key` (one per CPU for per-CPU maps), or `None` if it is not in the map.
    pub fn lookup<K: Pod, V: Pod>(&self, key: &K, out: &mut Vec<V>) -> Result<bool, BatchError> {
        let mut vals = vec![0u8; self.stride()];
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: std::ptr::from_ref(key) as u64,
            value: vals.as_mut_ptr() as u64,
            ..ElemAttr::default()
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(()) => {
                decode_values(&vals, self.per_cpu, self.cpus, self.value_size, out);
                Ok(true)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(self.err("BPF_MAP_LOOKUP_ELEM")(e)),
        }
    }

    /// Deletes `keys` (those already gone are skipped); how many were deleted.
    pub fn delete<K: Pod>(&self, keys: &[K]) -> Result<usize, BatchError> {
        let mut deleted = 0;
        let mut start = 0;
        while start < keys.len() {
            if !self.batch.get() {
                for k in &keys[start..] {
                    let mut attr = ElemAttr {
                        map_fd: self.fd.as_raw_fd() as u32,
                        key: std::ptr::from_ref(k) as u64,
                        ..ElemAttr::default()
                    };
                    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
                        Ok(()) => deleted += 1,
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(self.err("BPF_MAP_DELETE_ELEM")(e)),
                    }
                }
                return Ok(deleted);
            }
            let rest = &keys[start..];
            let mut attr = BatchAttr {
                keys: rest.as_ptr() as u64,
                count: rest.len().min(u32::MAX as usize) as u32,
                map_fd: self.fd.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            let r = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
            let done = (attr.count as usize).min(rest.len());
            deleted += done;
            match r {
                Ok(()) => start += done.max(rest.len().min(u32::MAX as usize)),
                // The kernel stops at the first key that is gone: skip it.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => start += done + 1,
                Err(e) if deleted == 0 && start == 0 && unsupported(&e) => {
                    log::debug!("map {}: no batch delete ({e}): deleting keys", self.name);
                    self.batch.set(false);
                }
                Err(e) => return Err(self.err("BPF_MAP_DELETE_BATCH")(e)),
            }
        }
        Ok(deleted)
    }
}

/// A `T` from the start of `bytes` (which holds at least `size_of::<T>()`).
fn read<T: Pod>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: length checked; `T: Pod` is valid for any bit pattern; unaligned read.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// The per-CPU values of one entry (each padded to 8 bytes), or its one value.
fn decode_values<V: Pod>(bytes: &[u8], per_cpu: bool, cpus: usize, size: usize, out: &mut Vec<V>) {
    out.clear();
    let step = if per_cpu {
        size.next_multiple_of(8)
    } else {
        size
    };
    for cpu in 0..cpus {
        out.push(read::<V>(&bytes[cpu * step..]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_have_the_kernels_layout() {
        assert_eq!(size_of::<BatchAttr>(), 56);
        assert_eq!(std::mem::offset_of!(BatchAttr, count), 32);
        assert_eq!(std::mem::offset_of!(BatchAttr, map_fd), 36);
        assert_eq!(size_of::<ElemAttr>(), 32);
        assert_eq!(std::mem::offset_of!(ElemAttr, key), 8);
        assert_eq!(std::mem::offset_of!(ElemAttr, value), 16);
    }

    #[test]
    fn per_cpu_values_are_padded_to_eight_bytes() {
        // Two CPUs of a 12-byte value: each occupies 16 bytes.
        let mut bytes = vec![0u8; 32];
        bytes[0..4].copy_from_slice(&1u32.to_ne_bytes());
        bytes[16..20].copy_from_slice(&2u32.to_ne_bytes());
        let mut out: Vec<[u32; 3]> = Vec::new();
        decode_values(&bytes, true, 2, 12, &mut out);
        assert_eq!(out, vec![[1, 0, 0], [2, 0, 0]]);
    }
}
