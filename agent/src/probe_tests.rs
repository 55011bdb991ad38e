//! Probe-level tests in aya's style: the probe object the agent embeds (agent/build.rs builds
//! it, `probes.rs` includes it) is loaded as is, its programs are attached to `#[no_mangle]
//! #[inline(never)] extern "C"` trigger functions of this test binary, the triggers are called
//! a known number of times, and the kernel maps and ring buffer must hold exactly that. No
//! fixture process, no libc: what is tested is the BPF code and the shared layouts in `common`
//! (cookies, keys, event records, Go capture specs). Needs root, as `./x test` runs it.

use std::{
    hint::black_box,
    num::NonZeroU32,
    sync::{Mutex, MutexGuard},
};

use allocwatch_common::{
    Event, config,
    event::EventKind,
    globals,
    go::{self, Capture, GoReg, GoRole, GoSpec},
    libc::{self, Api, NO_STACK, SiteKey},
    map_names,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};

use crate::collect;

/// The object `probes.rs` loads: the same bytes from the same build.
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/allocwatch"));

/// Calls of each trigger: few enough to stay fast under load (each probe hit traps).
const CALLS: u64 = 1000;

/// A `malloc(size)` stand-in: returns a distinct fake pointer per call, never dereferenced.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn allocwatch_test_malloc(size: u64) -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0x10_0000);
    black_box(size);
    NEXT.fetch_add(16, std::sync::atomic::Ordering::Relaxed)
}

/// A `free(ptr)` stand-in.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn allocwatch_test_free(ptr: u64) {
    black_box(ptr);
}

/// A Go runtime function stand-in: the C ABI passes `a` in RDI and `b` in RSI, which the Go
/// capture spec names as [`GoReg::Rdi`] and [`GoReg::Rsi`].
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn allocwatch_test_go(a: u64, b: u64) {
    black_box((a, b));
}

/// One probe test at a time: uprobes on this binary are process-wide state.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The probe object, tracing only this process, without stacks.
fn load() -> Ebpf {
    let tgid = std::process::id();
    let flags = 0u32;
    let ebpf = EbpfLoader::new()
        .override_global(globals::TARGET_TGID, &tgid, true)
        .override_global(globals::FLAGS, &flags, true)
        .load(PROBE_OBJECT);
    assert!(
        flags & config::FLAG_STACKS == 0,
        "these tests compare sites without stacks"
    );
    ebpf.unwrap_or_else(|e| panic!("loading the probe object (needs root, as ./x test): {e}"))
}

/// Loads `program` and attaches it to `symbol` of this binary with `cookie`.
fn attach(ebpf: &mut Ebpf, program: &str, symbol: &str, cookie: u64) {
    let p: &mut UProbe = ebpf
        .program_mut(program)
        .unwrap_or_else(|| panic!("no program {program}"))
        .try_into()
        .unwrap();
    if p.fd().is_err() {
        p.load()
            .unwrap_or_else(|e| panic!("loading {program}: {e}"));
    }
    let pid = NonZeroU32::new(std::process::id()).unwrap();
    p.attach(
        [UProbeAttachPoint {
            location: UProbeAttachLocation::Symbol(symbol),
            cookie: Some(cookie),
        }],
        "/proc/self/exe",
        UProbeScope::OneProcess(pid),
    )
    .unwrap_or_else(|e| panic!("attaching {program} to {symbol}: {e}"));
}

/// Full mode (entry + return probes): every call counted at its call site, every allocation
/// in the live table with its size, frees matched with their allocations.
#[test]
fn full_mode_counts_calls_bytes_and_live_allocations_exactly() {
    let _serial = serial();
    let mut ebpf = load();
    let malloc = libc::cookie::encode(Api::Malloc as u32, 0);
    let free = libc::cookie::encode(Api::Free as u32, 0);
    attach(&mut ebpf, "libc_entry", "allocwatch_test_malloc", malloc);
    attach(&mut ebpf, "libc_return", "allocwatch_test_malloc", malloc);
    attach(&mut ebpf, "libc_entry", "allocwatch_test_free", free);

    let ptrs: Vec<u64> = (0..CALLS)
        .map(|_| allocwatch_test_malloc(black_box(24)))
        .collect();
    for &p in &ptrs[..CALLS as usize / 2] {
        allocwatch_test_free(black_box(p));
    }

    let tgid = std::process::id();
    let sites = collect::sites(&ebpf, Some(tgid)).unwrap();
    let of = |api: Api| -> Vec<_> {
        sites
            .iter()
            .filter(|(k, _)| k.api == api as u32 && !k.is_spill())
            .map(|(k, v)| (*k, *v))
            .collect()
    };
    // Rows of unknown sites are made only when needed (a full site table): none here.
    for api in [Api::Malloc, Api::Free] {
        let spill = SiteKey::spill(tgid, api as u32);
        assert_eq!(sites.get(&spill), None, "{api:?}");
    }
    // One call instruction each: one site each, keyed by its return address.
    let [(mk, m)] = of(Api::Malloc)[..] else {
        panic!("malloc sites: {:?}", of(Api::Malloc));
    };
    assert_eq!(mk.stack_id, NO_STACK);
    assert_ne!(mk.ret_addr, 0);
    assert_eq!((m.calls, m.bytes, m.failed), (CALLS, 24 * CALLS, 0));
    assert_eq!((m.tracked, m.tracked_bytes), (CALLS, 24 * CALLS));
    assert_eq!((m.freed, m.freed_bytes), (CALLS / 2, 24 * CALLS / 2));
    let [(_, f)] = of(Api::Free)[..] else {
        panic!("free sites: {:?}", of(Api::Free));
    };
    // free's bytes are those of the blocks it released.
    assert_eq!((f.calls, f.bytes), (CALLS / 2, 24 * CALLS / 2));

    let live = collect::live(&ebpf, Some(tgid)).unwrap();
    assert_eq!(live.len() as u64, CALLS / 2);
    let mut live_addrs: Vec<u64> = live.iter().map(|(k, _)| k.addr).collect();
    live_addrs.sort_unstable();
    assert_eq!(live_addrs, ptrs[CALLS as usize / 2..]);
    assert!(live.iter().all(|(_, a)| a.size == 24 && a.site == mk));
    assert!(collect::lost(&ebpf).unwrap().values().all(|&n| n == 0));
}

/// Count mode (entry probe only): calls and bytes per site from the cookie's API id.
#[test]
fn count_mode_counts_entries_exactly() {
    let _serial = serial();
    let mut ebpf = load();
    let cookie = libc::cookie::encode_count(
        Api::Malloc as u32,
        0,
        false,
        false,
        libc::cookie::NO_FILE,
        0,
    );
    attach(&mut ebpf, "libc_count", "allocwatch_test_malloc", cookie);
    for size in 0..CALLS {
        allocwatch_test_malloc(black_box(size));
    }
    let sites = collect::sites(&ebpf, Some(std::process::id())).unwrap();
    let rows: Vec<_> = sites.iter().filter(|(k, _)| !k.is_spill()).collect();
    let [(k, s)] = rows[..] else {
        panic!("sites: {sites:?}");
    };
    assert_eq!(k.api, Api::Malloc as u32);
    assert_eq!((s.calls, s.bytes), (CALLS, CALLS * (CALLS - 1) / 2));
    // No return probe: nothing tracked.
    assert_eq!((s.tracked, s.freed), (0, 0));
}

/// The Go entry program reads the registers its capture spec names, by the shared register
/// encoding, and streams a record the agent's decoder accepts, with the role it was given.
#[test]
fn go_probe_captures_named_registers_into_events() {
    let _serial = serial();
    let mut ebpf = load();
    let spec = GoSpec {
        captures: [
            Capture {
                reg: GoReg::Rdi as u8,
                size: 8,
                ..Capture::default()
            },
            Capture {
                reg: GoReg::Rsi as u8,
                size: 2,
                ..Capture::default()
            },
            Capture::default(),
            Capture::default(),
            Capture::default(),
            Capture::default(),
        ],
        role: GoRole::SliceGrow as u32,
        flags: 0,
    };
    let mut specs: Array<_, GoSpec> =
        Array::try_from(ebpf.map_mut(map_names::GO_SPECS).unwrap()).unwrap();
    specs.set(3, &spec, 0).unwrap();
    let mut ring = collect::take_events(&mut ebpf).unwrap();
    attach(
        &mut ebpf,
        "go_entry",
        "allocwatch_test_go",
        go::cookie::encode(3, 0),
    );
    for i in 0..CALLS {
        allocwatch_test_go(black_box(i), black_box(0x1_0000 + i));
    }
    let mut events = Vec::new();
    let bad = collect::drain(&mut ring, &mut events);
    assert_eq!(bad, 0);
    assert_eq!(events.len() as u64, CALLS);
    for (i, ev) in events.iter().enumerate() {
        let Event::Go(g) = ev else {
            panic!("not a Go event: {ev:?}");
        };
        assert_eq!(g.header.kind, EventKind::Go as u32);
        assert_eq!(g.header.tgid, std::process::id());
        assert_eq!(GoRole::from_u32(g.role), Some(GoRole::SliceGrow));
        // Value 1 is truncated to the spec's 2 bytes.
        assert_eq!(
            g.values,
            [i as u64, (0x1_0000 + i as u64) & 0xffff, 0, 0, 0, 0]
        );
        assert_eq!(g.stack_id, NO_STACK);
        assert_ne!(g.ret_addr, 0);
    }
}
