//! The probe modes (`--mode`) and the programs that serve each.

pub(super) const LIBC_ENTRY: &str = "libc_entry";
pub(super) const LIBC_RETURN: &str = "libc_return";
pub(super) const LIBC_COUNT: &str = "libc_count";
pub(super) const LIBC_FLOOR: &str = "libc_floor";
pub(super) const LIBC_FLOOR_RETURN: &str = "libc_floor_return";
pub(super) const GO_ENTRY: &str = "go_entry";
pub(super) const GO_FLOOR: &str = "go_floor";
/// Symbol probes (`--probe`, C++/Rust growth), loaded on first use.
pub(super) const SYM_ENTRY: &str = "sym_entry";

/// What the libc probes record (`--mode`). Costs per call are measured in BENCHMARKS.md.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Entry and return probes: calls, bytes and failures per call site with its user stack,
    /// and every outstanding allocation (`leaks`, live bytes).
    #[default]
    Full,
    /// `full` without user stacks: sites are told apart by their immediate caller only.
    StacksOff,
    /// Entry probes only: calls and bytes requested per API and immediate caller. No return
    /// probe, so no live table, no failed calls, and `free` counts calls but not bytes.
    Count,
    /// `count` with user stacks.
    CountStacks,
    /// Benchmark only: empty entry programs at the sites `count` uses (and at the Go probes'
    /// sites).
    Floor,
    /// Benchmark only: empty entry and return programs at the sites `full` uses (and empty
    /// entry programs at the Go probes' sites).
    FloorReturn,
}

impl Mode {
    /// Every mode, in the order `--help` lists them.
    pub const ALL: [Mode; 6] = [
        Mode::Full,
        Mode::StacksOff,
        Mode::Count,
        Mode::CountStacks,
        Mode::Floor,
        Mode::FloorReturn,
    ];

    /// The mode `--mode` and the config file call `name`.
    pub fn from_name(name: &str) -> Option<Mode> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// What the mode records, for `--help`.
    pub fn help(self) -> &'static str {
        match self {
            Mode::Full => {
                "Entry and return probes: calls, bytes and failures per call site with its user \
                 stack, and every outstanding allocation (`leaks`, live bytes)"
            }
            Mode::StacksOff => {
                "`full` without user stacks: sites are told apart by their immediate caller only"
            }
            Mode::Count => {
                "Entry probes only: calls and bytes requested per API and immediate caller. No \
                 return probe, so no live table, no failed calls, and `free` counts calls but not \
                 bytes"
            }
            Mode::CountStacks => "`count` with user stacks",
            Mode::Floor => {
                "Benchmark only: empty entry programs at the sites `count` uses (and at the Go \
                 probes' sites)"
            }
            Mode::FloorReturn => {
                "Benchmark only: empty entry and return programs at the sites `full` uses (and \
                 empty entry programs at the Go probes' sites)"
            }
        }
    }

    /// The modes a user chooses from (the floors are the benchmark's).
    pub fn is_public(self) -> bool {
        !matches!(self, Mode::Floor | Mode::FloorReturn)
    }

    /// Names of the public modes, as `--mode` and the config file spell them.
    pub fn public_names() -> Vec<&'static str> {
        Self::ALL
            .iter()
            .filter(|m| m.is_public())
            .map(|m| m.name())
            .collect()
    }

    /// The name `--mode` and the config file use.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::StacksOff => "stacks-off",
            Mode::Count => "count",
            Mode::CountStacks => "count-stacks",
            Mode::Floor => "floor",
            Mode::FloorReturn => "floor-return",
        }
    }

    /// Whether this mode captures user stacks (unless `--no-stacks`).
    pub fn stacks(self) -> bool {
        matches!(self, Mode::Full | Mode::CountStacks)
    }

    /// Whether `--sample-bytes` has anything to sample: stacks (when `stacks` allows them) or
    /// outstanding allocations.
    pub fn samples(self, stacks: bool) -> bool {
        (self.stacks() && stacks) || self.tracks_live()
    }

    /// Whether outstanding allocations are tracked (a return probe reads the new pointer).
    pub fn tracks_live(self) -> bool {
        matches!(self, Mode::Full | Mode::StacksOff)
    }

    /// (entry program, return program) of the libc probes.
    pub(super) fn libc_programs(self) -> (&'static str, Option<&'static str>) {
        match self {
            Mode::Full | Mode::StacksOff => (LIBC_ENTRY, Some(LIBC_RETURN)),
            Mode::Count | Mode::CountStacks => (LIBC_COUNT, None),
            Mode::Floor => (LIBC_FLOOR, None),
            Mode::FloorReturn => (LIBC_FLOOR, Some(LIBC_FLOOR_RETURN)),
        }
    }

    /// The program at every Go probe site.
    pub(super) fn go_program(self) -> &'static str {
        match self {
            Mode::Floor | Mode::FloorReturn => GO_FLOOR,
            _ => GO_ENTRY,
        }
    }
}

/// The name of a multi-link program's twin for kernels before 6.6 (the same code in a plain
/// `uprobe` section).
pub(super) fn single_twin(program: &'static str) -> &'static str {
    match program {
        LIBC_ENTRY => "libc_entry_single",
        LIBC_RETURN => "libc_return_single",
        LIBC_COUNT => "libc_count_single",
        LIBC_FLOOR => "libc_floor_single",
        LIBC_FLOOR_RETURN => "libc_floor_return_single",
        GO_ENTRY => "go_entry_single",
        GO_FLOOR => "go_floor_single",
        SYM_ENTRY => "sym_entry_single",
        other => other,
    }
}
