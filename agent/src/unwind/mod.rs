//! Unwinding without frame pointers (`--unwind`): each mapped file's `.eh_frame` compiled once
//! into rows (`table.rs`), loaded into the probe's maps per file and per process (`load.rs`),
//! walked by the libc probes (probe-ebpf/src/unwind.rs).

pub mod load;
pub mod table;
pub mod worker;

/// Whether this build can use the tables: their rows are x86-64 call-frame rules (CFA from
/// rsp or rbp, return address at CFA-8). An arm64 build walks frame records only, and
/// `--unwind dwarf` means `fp` there (README, "arm64").
pub const TABLES_SUPPORTED: bool = cfg!(target_arch = "x86_64");

/// How the libc probes walk user stacks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Unwind {
    /// Frame pointers only (the kernel's walk): cheapest, but a stack through code built
    /// without them (most distribution packages) is cut there.
    Fp,
    /// Call-frame information (`.eh_frame`) compiled into tables where a frame's code has it,
    /// frame pointers elsewhere.
    Dwarf,
    /// Tables only for the files built without frame pointers (decided per file from its
    /// call-frame information); a process whose files all keep them stays on the kernel's walk.
    #[default]
    Auto,
}

impl Unwind {
    /// The name of the flag's and the config file's value.
    pub fn name(self) -> &'static str {
        match self {
            Unwind::Fp => "fp",
            Unwind::Dwarf => "dwarf",
            Unwind::Auto => "auto",
        }
    }

    /// Whether the probes get unwind tables at all.
    pub fn tables(self) -> bool {
        self != Unwind::Fp
    }
}

impl std::str::FromStr for Unwind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fp" => Ok(Unwind::Fp),
            "dwarf" => Ok(Unwind::Dwarf),
            "auto" => Ok(Unwind::Auto),
            _ => Err(format!("unknown unwinder {s:?} (fp, dwarf, auto)")),
        }
    }
}
