//! Which allocator a file that defines `malloc` is, told by symbols only that allocator
//! exports (measured on Debian 12's packages: tcmalloc and mimalloc also define
//! `__libc_malloc`, so glibc is recognized by its own names, after the others).

use serde::Serialize;

use crate::target::elf::ElfFile;

/// The allocator behind a process's `malloc`: a report field and a metric label (a fixed set,
/// so the label's cardinality stays bounded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocator {
    Glibc,
    Musl,
    Jemalloc,
    Tcmalloc,
    Mimalloc,
    /// Defines `malloc` but is none of the above (a program's own allocator).
    #[default]
    Other,
}

impl Allocator {
    /// Every allocator, in the order reports list them.
    pub const ALL: [Allocator; 6] = [
        Allocator::Glibc,
        Allocator::Musl,
        Allocator::Jemalloc,
        Allocator::Tcmalloc,
        Allocator::Mimalloc,
        Allocator::Other,
    ];

    /// The name in reports, JSON and the `allocator` metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Allocator::Glibc => "glibc",
            Allocator::Musl => "musl",
            Allocator::Jemalloc => "jemalloc",
            Allocator::Tcmalloc => "tcmalloc",
            Allocator::Mimalloc => "mimalloc",
            Allocator::Other => "other",
        }
    }

    /// Whether the allocator defines C++ `operator new`/`delete` as its own, with its fast
    /// path inlined (Debian 12: libjemalloc2, libtcmalloc*, libmimalloc2, `nm -D`): a
    /// program's `new` there never reaches `malloc`, so they are probed. glibc's programs get
    /// libstdc++'s, a wrapper over `malloc` counted there.
    pub const fn defines_cxx(self) -> bool {
        matches!(
            self,
            Allocator::Jemalloc | Allocator::Tcmalloc | Allocator::Mimalloc
        )
    }

    /// What the file `elf` (seen by the process as `display_path`) is, by its symbols; musl's
    /// shared libc exports none of its own, so its file name tells (`is_libc_name`).
    pub fn of(elf: &ElfFile, display_path: &str) -> Self {
        Self::from_symbols(
            |name| elf.symbol(name).is_some(),
            super::is_libc_name(super::basename(display_path)),
        )
    }

    /// [`Self::of`] over a symbol lookup.
    pub fn from_symbols(has: impl Fn(&str) -> bool, libc_named: bool) -> Self {
        let any = |names: &[&str]| names.iter().any(|n| has(n));
        // tikv-jemalloc-sys's `_rjem_` and the mimalloc crate's static copy: only what the
        // program calls is linked (`_rjem_mallocx` and `mi_malloc_aligned` are what their
        // `GlobalAlloc` calls first).
        if any(&[
            "mallocx",
            "je_mallocx",
            "je_malloc",
            "_rjem_mallocx",
            "_rjem_malloc",
        ]) {
            Allocator::Jemalloc
        } else if any(&["tc_malloc"]) {
            Allocator::Tcmalloc
        } else if any(&["mi_malloc", "mi_malloc_aligned"]) {
            Allocator::Mimalloc
        } else if any(&["gnu_get_libc_version", "_int_malloc", "main_arena"]) {
            // The first is exported by libc.so.6; the others are in a static glibc program's
            // symbol table.
            Allocator::Glibc
        } else if any(&["__libc_malloc_impl", "__malloc_donate", "__malloc_context"]) || libc_named
        {
            // Static musl (mallocng, or oldmalloc's donate), or musl's shared libc.
            Allocator::Musl
        } else {
            Allocator::Other
        }
    }
}

impl std::fmt::Display for Allocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn told_by_symbols() {
        let from = |names: &[&str], libc_named| {
            Allocator::from_symbols(|n| names.contains(&n), libc_named)
        };
        // tcmalloc and mimalloc define __libc_malloc too: it tells nothing.
        assert_eq!(
            from(&["malloc", "__libc_malloc", "tc_malloc"], false),
            Allocator::Tcmalloc
        );
        assert_eq!(
            from(&["malloc", "__libc_malloc", "mi_malloc"], false),
            Allocator::Mimalloc
        );
        assert_eq!(from(&["malloc", "mallocx"], false), Allocator::Jemalloc);
        assert_eq!(
            from(&["je_malloc", "je_mallocx"], false),
            Allocator::Jemalloc
        );
        assert_eq!(
            from(&["_rjem_malloc", "_rjem_sdallocx"], false),
            Allocator::Jemalloc
        );
        assert_eq!(
            from(&["mi_malloc_aligned", "mi_free"], false),
            Allocator::Mimalloc
        );
        assert_eq!(
            from(&["malloc", "gnu_get_libc_version"], true),
            Allocator::Glibc
        );
        assert_eq!(from(&["malloc", "_int_malloc"], false), Allocator::Glibc);
        assert_eq!(
            from(&["malloc", "__libc_malloc_impl"], false),
            Allocator::Musl
        );
        assert_eq!(from(&["malloc"], true), Allocator::Musl);
        assert_eq!(from(&["malloc"], false), Allocator::Other);
        assert_eq!(
            Allocator::ALL.map(Allocator::name),
            ["glibc", "musl", "jemalloc", "tcmalloc", "mimalloc", "other"]
        );
    }
}
