//! The Go version and main module recorded by the linker in `.go.buildinfo`, which stripping
//! (`-ldflags=-s -w`) keeps. Format as read by Go's own `debug/buildinfo` (buildinfo.go,
//! go1.27.3): a 16-byte-aligned 32-byte header starting with `"\xff Go buildinf:"`, then
//! - flags bit 1 set (Go ≥ 1.18): the version and modinfo strings follow inline, each prefixed
//!   by its length as a uvarint;
//! - flags bit 1 clear (Go < 1.18): the header holds pointers (size in byte 14, byte order in
//!   flags bit 0) to two Go string headers elsewhere in the data segment.

use std::path::Path;

use super::GoError;
use super::image::Image;

const MAGIC: &[u8; 14] = b"\xff Go buildinf:";
const HEADER_SIZE: usize = 32;
const ALIGN: usize = 16;
const FLAG_BIG_ENDIAN: u8 = 0x1;
const FLAG_INLINE: u8 = 0x2;
/// Bounds for strings read through pointers: a version or modinfo larger than this is bogus.
const MAX_STRING: u64 = 16 << 20;
/// Without a `.go.buildinfo` section Go searches the first writable segment; the blob sits at
/// its start, so a bounded prefix is enough.
const MAX_SCAN: u64 = 16 << 20;

/// What `.go.buildinfo` says about a binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    /// As recorded, e.g. `go1.25.5 X:noswissmap` or `devel go1.24-abc1234 …`.
    pub version: String,
    /// The main module path (`path` line of the module info), when recorded.
    pub module_path: Option<String>,
}

/// A parsed Go version. Pre-releases (`go1.21rc2`) and devel builds count as patch 0 of
/// their release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    /// The whole recorded string.
    pub raw: String,
    /// GOEXPERIMENTs that differ from the toolchain's defaults (` X:noswissmap,…`); they
    /// change the runtime (e.g. which map implementation is linked in).
    pub experiments: Vec<String>,
}

impl GoVersion {
    /// Parses `go1.23.5`, `go1.21rc2`, `devel go1.24-abc123 Tue …`, `go1.25.5 X:noswissmap`.
    pub fn parse(raw: &str) -> Option<Self> {
        let start = raw.find("go1")?;
        let rest = &raw[start + 2..];
        let (major, rest) = number(rest)?;
        let (minor, rest) = match rest.strip_prefix('.') {
            Some(r) => number(r)?,
            None => (0, rest),
        };
        let patch = rest
            .strip_prefix('.')
            .and_then(number)
            .map_or(0, |(patch, _)| patch);
        let experiments = raw
            .split_whitespace()
            .find_map(|word| word.strip_prefix("X:"))
            .map(|list| {
                list.split(',')
                    .filter(|e| !e.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Some(Self {
            major,
            minor,
            patch,
            raw: raw.to_owned(),
            experiments,
        })
    }

    /// `(major, minor, patch)`, for ordering.
    pub fn triple(&self) -> (u32, u32, u32) {
        (self.major, self.minor, self.patch)
    }

    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }

    pub fn has_experiment(&self, name: &str) -> bool {
        self.experiments.iter().any(|e| e == name)
    }
}

impl std::fmt::Display for GoVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Leading decimal digits of `s` and what follows them.
fn number(s: &str) -> Option<(u32, &str)> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let value = s[..end].parse().ok()?;
    Some((value, &s[end..]))
}

/// The Go version of the binary at `path`; `Ok(None)` when it is not a Go binary.
pub fn go_version(path: &Path) -> Result<Option<GoVersion>, GoError> {
    let Some(info) = read_build_info(path)? else {
        return Ok(None);
    };
    GoVersion::parse(&info.version)
        .map(Some)
        .ok_or(GoError::BadVersion { raw: info.version })
}

/// The build info of the binary at `path`; `Ok(None)` when it is not a Go binary (not ELF, or
/// no build info blob).
pub fn read_build_info(path: &Path) -> Result<Option<BuildInfo>, GoError> {
    match Image::open(path)? {
        Some(image) => from_image(&image),
        None => Ok(None),
    }
}

pub(crate) fn from_image(image: &Image) -> Result<Option<BuildInfo>, GoError> {
    let data = if let Some(section) = image.section(".go.buildinfo") {
        image.section_data(section)?
    } else if let Some(seg) = image.segments.iter().find(|s| s.writable) {
        image.read_at(seg.offset, seg.filesz.min(MAX_SCAN))?
    } else {
        return Ok(None);
    };
    let Some(pos) = (0..data.len())
        .step_by(ALIGN)
        .take_while(|&o| o + HEADER_SIZE <= data.len())
        .find(|&o| data[o..].starts_with(MAGIC))
    else {
        return Ok(None);
    };
    let bad = |reason: &str| GoError::BadBuildInfo {
        path: image.path.clone(),
        reason: reason.to_owned(),
    };
    let header = &data[pos..pos + HEADER_SIZE];
    let flags = header[15];
    let (version, modinfo) = if flags & FLAG_INLINE != 0 {
        let (version, rest) = inline_string(&data[pos + HEADER_SIZE..])
            .ok_or_else(|| bad("version string runs past the section"))?;
        // A missing module info is not fatal: the version is what matters.
        let modinfo = inline_string(rest)
            .map(|(m, _)| m.to_vec())
            .unwrap_or_default();
        (String::from_utf8_lossy(version).into_owned(), modinfo)
    } else {
        let ptr_size = usize::from(header[14]);
        if ptr_size != 4 && ptr_size != 8 {
            return Err(bad("pointer size is neither 4 nor 8"));
        }
        let big = flags & FLAG_BIG_ENDIAN != 0;
        let version_ptr = uint(&header[16..16 + ptr_size], big);
        let mod_ptr = uint(&header[16 + ptr_size..16 + 2 * ptr_size], big);
        let version = pointer_string(image, version_ptr, ptr_size, big)?
            .ok_or_else(|| bad("version pointer does not lead to a string"))?;
        let modinfo = pointer_string(image, mod_ptr, ptr_size, big)?.unwrap_or_default();
        (String::from_utf8_lossy(&version).into_owned(), modinfo)
    };
    if version.is_empty() {
        return Ok(None);
    }
    Ok(Some(BuildInfo {
        version,
        module_path: module_path(&modinfo),
    }))
}

/// A uvarint-length-prefixed string at the start of `data`, and what follows it. Bytes, not
/// text: the module info's framing sentinels are not UTF-8.
fn inline_string(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, n) = uvarint(data)?;
    let len = usize::try_from(len).ok()?;
    let body = data.get(n..n.checked_add(len)?)?;
    Some((body, &data[n + len..]))
}

/// A Go string header (data pointer, length) at virtual address `addr`, followed.
fn pointer_string(
    image: &Image,
    addr: u64,
    ptr_size: usize,
    big: bool,
) -> Result<Option<Vec<u8>>, GoError> {
    let want = 2 * ptr_size as u64;
    let Some(hdr) = image.read_vaddr_upto(addr, want)? else {
        return Ok(None);
    };
    if hdr.len() < 2 * ptr_size {
        return Ok(None);
    }
    let data_addr = uint(&hdr[..ptr_size], big);
    let len = uint(&hdr[ptr_size..], big);
    if len > MAX_STRING {
        return Ok(None);
    }
    match image.read_vaddr_upto(data_addr, len)? {
        Some(bytes) if bytes.len() as u64 == len => Ok(Some(bytes)),
        _ => Ok(None),
    }
}

fn uint(b: &[u8], big: bool) -> u64 {
    let fold = |acc: u64, &byte: &u8| (acc << 8) | u64::from(byte);
    if big {
        b.iter().fold(0, fold)
    } else {
        b.iter().rev().fold(0, fold)
    }
}

/// Go's `binary.Uvarint`: the value and the number of bytes read; `None` when truncated or
/// longer than 10 bytes.
pub(crate) fn uvarint(data: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &byte) in data.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f).checked_shl(7 * i as u32)?;
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// The main module path from the module info. cmd/go frames the text with 16-byte binary
/// sentinels (`modload.infoStart`/`infoEnd`); the path is on the `path\t` line.
fn module_path(modinfo: &[u8]) -> Option<String> {
    let body = if modinfo.len() >= 33 && modinfo[modinfo.len() - 17] == b'\n' {
        &modinfo[16..modinfo.len() - 16]
    } else {
        modinfo
    };
    body.split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"path\t"))
        .map(|path| String::from_utf8_lossy(path).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_version_strings() {
        let v = GoVersion::parse("go1.23.5").unwrap();
        assert_eq!((v.major, v.minor, v.patch), (1, 23, 5));
        assert!(v.experiments.is_empty());
        let v = GoVersion::parse("go1.27.3").unwrap();
        assert_eq!(v.triple(), (1, 27, 3));
        let v = GoVersion::parse("devel go1.24-abc1234 Tue Jan 7 2025").unwrap();
        assert_eq!(v.triple(), (1, 24, 0));
        let v = GoVersion::parse("go1.21rc2").unwrap();
        assert_eq!(v.triple(), (1, 21, 0));
        let v = GoVersion::parse("go1.25.5 X:noswissmap,nosynchashtriemap").unwrap();
        assert_eq!(v.triple(), (1, 25, 5));
        assert!(v.has_experiment("noswissmap"));
        assert!(v.has_experiment("nosynchashtriemap"));
        assert!(v.at_least(1, 25) && !v.at_least(1, 26));
        assert_eq!(GoVersion::parse("rustc 1.90"), None);
        assert_eq!(
            GoVersion::parse("go1"),
            Some(GoVersion {
                major: 1,
                minor: 0,
                patch: 0,
                raw: "go1".into(),
                experiments: vec![],
            })
        );
    }

    #[test]
    fn uvarint_is_bounded() {
        assert_eq!(uvarint(&[0x05]), Some((5, 1)));
        assert_eq!(uvarint(&[0x80, 0x01]), Some((128, 2)));
        assert_eq!(uvarint(&[0x80]), None);
        assert_eq!(uvarint(&[0xff; 11]), None);
        assert_eq!(uvarint(&[]), None);
    }

    #[test]
    fn inline_strings_are_bounds_checked() {
        assert_eq!(inline_string(&[3, b'a', b'b']), None);
        let (s, rest) = inline_string(&[2, b'a', b'b', 9]).unwrap();
        assert_eq!((s, rest), (&b"ab"[..], &[9u8][..]));
        assert_eq!(
            inline_string(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            None
        );
    }

    #[test]
    fn module_path_from_framed_modinfo() {
        // cmd/go's sentinels are 16 binary bytes each; the body ends with a newline.
        let sentinel = [
            0x30, 0x77, 0xaf, 0x0c, 0x92, 0x74, 0x08, 0x02, 0x41, 0xe1, 0xc1, 0x07, 0xe6, 0xd6,
            0x18, 0xe6,
        ];
        let mut framed = sentinel.to_vec();
        framed.extend_from_slice(b"path\tallocwatch.test/growth\nmod\tx\n");
        framed.extend_from_slice(&sentinel);
        assert_eq!(
            module_path(&framed).as_deref(),
            Some("allocwatch.test/growth")
        );
        assert_eq!(module_path(b"path\tx\n").as_deref(), Some("x"));
        assert_eq!(module_path(b""), None);
    }
}
