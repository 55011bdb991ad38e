//! The mapped files the symbolizer keeps open, one per (device, inode) however many processes
//! map it, with what was learnt about each (Go table, build-id and debug file, frames and
//! call-site checks by offset).

use std::{
    cell::OnceCell,
    collections::HashMap,
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    panic,
    path::PathBuf,
};

use super::{Frame, calls, go};
use crate::target::debuginfo;

/// (device, inode): one file however many processes map it, under whatever path.
pub(super) type FileKey = (u64, u64);

/// A mapped file we keep open, with what was learnt about it.
pub(super) struct OpenFile {
    /// Keeps the file readable after every process mapping it has exited.
    pub(super) _file: File,
    /// `/proc/self/fd/…` of `_file`: where blazesym and the Go reader read it.
    pub(super) path: PathBuf,
    /// Its Go symbol table, read at the first address symbolized in it; `None` when it is not
    /// Go (or its table is unreadable, then blazesym does what it can).
    pub(super) go: OnceCell<Option<go::GoFile>>,
    /// Frames by file offset (of the call instruction), for every process that maps the file:
    /// a node's hundred `python3`s are named once, not once each.
    pub(super) frames: std::cell::RefCell<HashMap<u64, Vec<Frame>>>,
    /// Whether the code at a file offset follows a call instruction, by offset.
    pub(super) calls: std::cell::RefCell<HashMap<u64, bool>>,
    /// Its (device, inode): its key in `Worker::files`.
    pub(super) key: FileKey,
    /// Build-id, debug link, segments: read at the first address symbolized in it.
    pub(super) facts: OnceCell<Option<debuginfo::ElfFacts>>,
    /// Its separate debug file, looked for once (see `debuginfo.rs`).
    pub(super) debug: OnceCell<Option<debuginfo::DebugFile>>,
}

/// Offsets whose frames a file keeps at most; past it the cache starts over.
pub(super) const MAX_CACHED_OFFSETS: usize = 500_000;

impl OpenFile {
    pub(super) fn new(file: File, key: FileKey) -> Self {
        Self {
            path: PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())),
            _file: file,
            go: OnceCell::new(),
            frames: std::cell::RefCell::new(HashMap::new()),
            calls: std::cell::RefCell::new(HashMap::new()),
            key,
            facts: OnceCell::new(),
            debug: OnceCell::new(),
        }
    }

    pub(super) fn facts(&self, module: &str) -> Option<&debuginfo::ElfFacts> {
        self.facts
            .get_or_init(|| {
                // Untrusted input, as for the Go table: a bad file costs its symbols only.
                let file = &self._file;
                let read = panic::catch_unwind(|| debuginfo::ElfFacts::read(file));
                match read {
                    Ok(Ok(facts)) => Some(facts),
                    Ok(Err(err)) => {
                        log::debug!("{module}: {err}");
                        None
                    }
                    Err(_) => {
                        log::warn!("{module}: reading its ELF headers panicked");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// The separate debug file, looked for in the file system of `pid` (then in ours).
    pub(super) fn debug(&self, pid: u32, module: &str) -> Option<&debuginfo::DebugFile> {
        self.debug
            .get_or_init(|| {
                let facts = self.facts(module)?;
                let root = PathBuf::from(format!("/proc/{pid}/root"));
                let dirs = debuginfo::debug_dirs();
                let key = self.key;
                let found =
                    panic::catch_unwind(|| debuginfo::find(Some(&root), module, facts, key, dirs));
                let found = found.ok().flatten();
                if let Some(d) = &found {
                    log::info!("{module}: symbols from {}", d.found.display());
                }
                found
            })
            .as_ref()
    }

    /// Whether the code at file offset `offset` follows a call (cached).
    pub(super) fn follows_call(&self, offset: u64) -> bool {
        if let Some(&known) = self.calls.borrow().get(&offset) {
            return known;
        }
        let known = calls::follows_call(&self._file, offset);
        let mut cache = self.calls.borrow_mut();
        if cache.len() >= MAX_CACHED_OFFSETS {
            cache.clear();
        }
        cache.insert(offset, known);
        known
    }

    pub(super) fn go(&self, module: &str) -> Option<&go::GoFile> {
        self.go
            .get_or_init(|| {
                // Parses untrusted binaries: as for blazesym below, a bad one costs its
                // symbols, not the thread.
                let path = &self.path;
                let opened = panic::catch_unwind(|| go::GoFile::open(path));
                match opened {
                    Ok(Ok(go)) => go,
                    Ok(Err(err)) => {
                        log::warn!("{module}: cannot read its Go symbol table: {err}");
                        None
                    }
                    Err(_) => {
                        log::warn!("{module}: reading its Go symbol table panicked");
                        None
                    }
                }
            })
            .as_ref()
    }
}

/// Keeps `file` open unless the same file already is, and returns its key in `files`.
pub(super) fn adopt(files: &mut HashMap<FileKey, OpenFile>, file: File) -> Option<FileKey> {
    let meta = file
        .metadata()
        .inspect_err(|err| log::debug!("fstat of a mapped file: {err}"))
        .ok()?;
    let key = (meta.dev(), meta.ino());
    files.entry(key).or_insert_with(|| OpenFile::new(file, key));
    Some(key)
}
