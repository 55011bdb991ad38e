//! `/etc/ld.so.cache`: the loader's cache of library locations.

use std::fs;
use std::path::Path;

use crate::target::TargetError;

/// One entry of `/etc/ld.so.cache`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LdCacheEntry {
    /// Library name (`libc.so.6`).
    pub name: String,
    /// Full path.
    pub path: String,
    /// ABI flags: `FLAG_ELF_LIBC6 | FLAG_X8664_LIB64` (0x0303) for x86-64.
    pub flags: i32,
    /// Non-zero for `glibc-hwcaps` subdirectory variants.
    pub hwcap: u64,
}

/// The loader's cache of library locations, in glibc's "new" format (`glibc-ld.so.cache1.1`;
/// the only one glibc ≥ 2.32 writes), possibly after an old-format (`ld.so-1.7.0`) block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LdCache {
    pub entries: Vec<LdCacheEntry>,
}

pub(super) const CACHE_MAGIC_OLD: &[u8] = b"ld.so-1.7.0";
pub(super) const CACHE_MAGIC_NEW: &[u8] = b"glibc-ld.so.cache1.1";
pub(super) const CACHE_NEW_HEADER: usize = 48;
pub(super) const CACHE_NEW_ENTRY: usize = 24;
const CACHE_OLD_ENTRY: usize = 12;
/// `FLAG_ELF_LIBC6 | FLAG_X8664_LIB64`, or `| FLAG_AARCH64_LIB64` (0x0a00) in an arm64 build
/// (glibc's `elf/cache.c`): libraries of this build's own architecture.
const FLAG_NATIVE_LIBC6: i32 = if cfg!(target_arch = "aarch64") {
    0x0a03
} else {
    0x0303
};

impl LdCache {
    /// Reads and parses a cache file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, TargetError> {
        let path = path.as_ref();
        let buf = fs::read(path).map_err(|e| TargetError::io(path, e))?;
        Self::parse(&buf).map_err(|reason| TargetError::BadLdCache {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses the bytes of a cache file (host byte order: little-endian on x86-64).
    pub fn parse(buf: &[u8]) -> Result<Self, String> {
        let u32_at = |at: usize| -> Result<u32, String> {
            buf.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| format!("truncated at {at}"))
        };
        let mut start = 0;
        if buf.starts_with(CACHE_MAGIC_OLD) {
            // Old header: magic[11], pad, nlibs u32; 12-byte entries; the new block follows,
            // aligned to 8.
            let nlibs = u32_at(12)? as usize;
            let end = nlibs
                .checked_mul(CACHE_OLD_ENTRY)
                .and_then(|n| n.checked_add(16))
                .ok_or("old entry count overflows")?;
            start = end.next_multiple_of(8);
        }
        let new = buf.get(start..).ok_or("no new-format block")?;
        if !new.starts_with(CACHE_MAGIC_NEW) {
            return Err("not a glibc-ld.so.cache1.1 file".to_owned());
        }
        let nlibs = u32_at(start + 20)? as usize;
        let table_end = nlibs
            .checked_mul(CACHE_NEW_ENTRY)
            .and_then(|n| n.checked_add(CACHE_NEW_HEADER))
            .filter(|&n| n <= new.len())
            .ok_or_else(|| format!("{nlibs} entries do not fit in the file"))?;
        // Strings are offsets from the start of the new-format header.
        let string = |off: u32| -> Result<String, String> {
            let s = new
                .get(off as usize..)
                .ok_or_else(|| format!("string offset {off} out of range"))?;
            let end = s
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| format!("unterminated string at {off}"))?;
            Ok(String::from_utf8_lossy(&s[..end]).into_owned())
        };
        let mut entries = Vec::with_capacity(nlibs);
        for e in new[CACHE_NEW_HEADER..table_end]
            .as_chunks::<CACHE_NEW_ENTRY>()
            .0
        {
            let word = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
            let mut hwcap = [0u8; 8];
            hwcap.copy_from_slice(&e[16..24]);
            entries.push(LdCacheEntry {
                flags: word(0) as i32,
                name: string(word(4))?,
                path: string(word(8))?,
                hwcap: u64::from_le_bytes(hwcap),
            });
        }
        Ok(LdCache { entries })
    }

    /// Path of a library of this build's architecture by name, preferring the baseline (non-hwcaps) entry.
    pub fn lookup(&self, name: &str) -> Option<&str> {
        let mut matching = self
            .entries
            .iter()
            .filter(|e| e.name == name && e.flags == FLAG_NATIVE_LIBC6);
        let first = matching.clone().next();
        matching
            .find(|e| e.hwcap == 0)
            .or(first)
            .map(|e| e.path.as_str())
    }
}
