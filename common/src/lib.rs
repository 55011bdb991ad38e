//! Types shared by the eBPF probes and the agent. Everything here crosses the kernel boundary, so
//! every struct is `#[repr(C)]` with explicit padding and a compile-time size/offset assert.
#![cfg_attr(not(any(feature = "user", test)), no_std)]

pub mod event;
pub mod go;
pub mod libc;
pub mod loss;
pub mod sample;
pub mod symprobe;
pub mod unwind;

/// Names of the maps the probe defines; the agent looks them up by these names.
pub mod map_names {
    pub const PENDING: &str = "PENDING";
    pub const LIVE: &str = "LIVE";
    pub const SITES: &str = "SITES";
    pub const SPILL: &str = "SPILL";
    pub const STACKS: &str = "STACKS";
    pub const LOST: &str = "LOST";
    pub const OVERFLOW: &str = "OVERFLOW";
    pub const EVENTS: &str = "EVENTS";
    pub const EXEC_NOTIFY: &str = "EXEC_NOTIFY";
    pub const GO_SPECS: &str = "GO_SPECS";
    pub const GO_PROCS: &str = "GO_PROCS";
    pub const GO_STW: &str = "GO_STW";
    pub const GO_HIST: &str = "GO_HIST";
    pub const GO_AGG: &str = "GO_AGG";
    pub const GO_AGG_FULL: &str = "GO_AGG_FULL";
    pub const LIBC_HIST: &str = "LIBC_HIST";
    pub const TGIDS: &str = "TGIDS";
    pub const EXEC_STAMPS: &str = "EXEC_STAMPS";
    pub const LAST_ENTRY: &str = "LAST_ENTRY";
    pub const LIBC_FILES: &str = "LIBC_FILES";
    pub const RELAY_NAMED: &str = "RELAY_NAMED";
    pub const SITE_BUDGET: &str = "SITE_BUDGET";
    pub const SITE_LIMIT: &str = "SITE_LIMIT";
    pub const STOPPED: &str = "STOPPED";
    pub const ADMITTED: &str = "ADMITTED";
    pub const SITE_ROWS: &str = "SITE_ROWS";
    pub const FOLLOWED: &str = "FOLLOWED";
    pub const PROGRAMS: &str = "PROGRAMS";
    pub const FOLLOW_LOST: &str = "FOLLOW_LOST";
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    pub const UNWIND_PROCS: &str = "UNWIND_PROCS";
    pub const PROBE_SITES: &str = "PROBE_SITES";
}

/// Names of the probe's global configuration variables (set with `EbpfLoader::override_global`).
pub mod globals {
    /// Process (tgid) traced; 0 traces every process the probes are attached to.
    pub const TARGET_TGID: &str = "TARGET_TGID";
    /// Bit set of [`crate::config`] flags.
    pub const FLAGS: &str = "FLAGS";
    /// Mean bytes between sampled calls (u64; 0: every call is sampled, see [`crate::sample`]).
    pub const SAMPLE_BYTES: &str = "SAMPLE_BYTES";
    /// 1 when `sched:sched_process_exit` has the `group_dead` field (Linux ≥ 6.16).
    pub const EXIT_HAS_GROUP_DEAD: &str = "EXIT_HAS_GROUP_DEAD";
    /// Possible CPUs (u32), for the histogram sums at exec (`config::FLAG_EXEC_HIST`).
    pub const NR_CPUS: &str = "NR_CPUS";
}

pub mod config {
    /// Capture user stacks with `bpf_get_stackid`.
    pub const FLAG_STACKS: u32 = 1 << 0;
    /// Processes in the `TGIDS` map are not traced (the agent itself, exclusions), unless
    /// they exec'd since they were listed (`EXEC_STAMPS`). (Bit 1 was an allowlist nobody
    /// used.)
    pub const FLAG_DENYLIST: u32 = 1 << 2;
    /// Only the processes in the `FOLLOWED` map are traced; a followed process's new children
    /// join it in the kernel as they are created (`top -- CMD` without `--no-follow`).
    pub const FLAG_FOLLOW: u32 = 1 << 3;
    /// libc probes walk user stacks with the agent's `.eh_frame` tables where a frame's code
    /// has one, with frame pointers elsewhere (`--unwind dwarf`; `unwind.rs` in the probe).
    pub const FLAG_UNWIND_TABLES: u32 = 1 << 4;
    /// At exec, the old program's size histograms leave `LIBC_HIST`/`GO_HIST` in an
    /// [`ImageHistEvent`](crate::event::ImageHistEvent) (the agent, on kernels with
    /// `bpf_map_lookup_percpu_elem`, 5.19): the rows are keyed by pid, and what the program
    /// ran before an exec is not the new program's.
    pub const FLAG_EXEC_HIST: u32 = 1 << 5;
    /// The table walk (`FLAG_UNWIND_TABLES`) goes `MAX_STACK_DEPTH` frames deep with `bpf_loop`
    /// (the agent, on kernels with it, 5.17); without it, 16 frames unrolled.
    pub const FLAG_UNWIND_LOOP: u32 = 1 << 6;
}

/// Slots of the `SITE_LIMIT` array: rows with a stack one process may create in `SITES`
/// (0: no limit).
pub mod site_limit {
    /// Every process, while the table is under pressure (set and lifted by the agent).
    pub const UNDER_PRESSURE: u32 = 0;
    /// A process the agent has not admitted yet (`ADMITTED`), always, when its selection can
    /// reject: until classified, a process the selection will reject fills the table like a
    /// selected one. Rows of any kind: its stacks, then its callers.
    pub const UNDECIDED: u32 = 1;
    pub const SLOTS: u32 = 2;
    /// Under pressure, a process's rows of any kind (with a stack or keyed by the immediate
    /// caller) are bounded at this many times its share of rows with a stack: a compiler calls
    /// malloc from tens of thousands of places, each a row (four `rustc`s filled 65,536 rows
    /// with their callers alone). A process not admitted yet has `UNDECIDED` rows of any kind.
    pub const ROW_SHARES: u32 = 4;
}

/// Default capacities; each is overridable on the command line.
pub mod capacity {
    pub const PENDING: u32 = 16_384;
    /// Processes in the agent's denylist; exec stamps kept.
    pub const TGIDS: u32 = 65_536;
    pub const LIVE: u32 = 1 << 20;
    pub const SITES: u32 = 65_536;
    /// Rows of unknown sites (`SPILL`): one per API for every process the denylist can hold,
    /// so that only processes, never sites, fill it.
    pub const SPILL: u32 = TGIDS * crate::libc::API_COUNT as u32;
    pub const STACKS: u32 = 32_768;
    /// Processes of one followed tree alive at once (a child that finds it full is reported
    /// as not followed).
    pub const FOLLOWED: u32 = 16_384;
    /// Ring buffer size in bytes (a power of two multiple of the page size). 4 MiB holds the
    /// new-site records of ~100 processes starting at once (~24,000 sites with their stacks)
    /// and ~40,000 Go events while the agent is not scheduled.
    pub const EVENTS_BYTES: u32 = 4 << 20;
    /// The most possible CPUs whose histogram values are summed at exec
    /// (`config::FLAG_EXEC_HIST`); the verifier walks the sum once per CPU and bucket.
    pub const EXEC_HIST_MAX_CPUS: u32 = 256;
}

/// Kernel error numbers the probes test for (BPF helpers return them negated).
pub mod errno {
    /// `bpf_map_update_elem(…, BPF_NOEXIST)` on a key that exists: another CPU (or an earlier
    /// call) inserted it first.
    pub const EEXIST: i32 = 17;
}

/// Maximum user stack depth kept by the stack map (the kernel's limit is 127).
pub const MAX_STACK_DEPTH: usize = 64;

#[cfg(feature = "user")]
pub use event::{DecodeError, Event, ImageHists};
