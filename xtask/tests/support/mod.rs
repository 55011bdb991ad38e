//! Helpers shared by the end-to-end tests xtask/tests/*.rs, each of which includes
//! this file with `mod support;` (cargo builds no test crate of tests/support/mod.rs itself):
//! finding the binary under test, running allocwatch and the fixtures, checking that a tracer
//! left nothing behind in the kernel, and reading JSON reports with messages that show them.

#![allow(
    dead_code,
    reason = "each test crate includes this module and uses a different subset of it"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    env, fs,
    io::{BufRead as _, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The strict Prometheus text reader the soak uses too.
#[path = "../../src/promtext.rs"]
pub mod promtext;

pub mod agent;

/// The line `allocwatch top`/`leaks` prints once its probes are attached.
pub const TRACING_PREFIX: &str = "allocwatch: tracing pid ";

/// A deadline for allocwatch's start (loading the probes, attaching), times
/// `ALLOCWATCH_TEST_STARTUP_FACTOR` when set: `./x test --vm` sets it in an emulated VM, where
/// the verifier alone takes tens of seconds. Host runs keep their deadlines.
pub fn startup(limit: Duration) -> Duration {
    let factor = env::var("ALLOCWATCH_TEST_STARTUP_FACTOR")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&f| f >= 1)
        .unwrap_or(1);
    limit * factor
}
/// The start of allocwatch's one error line.
pub const ERROR_PREFIX: &str = "allocwatch: error: ";

// ---------------------------------------------------------------------------------------------
// Environment (set by `./x test`)

/// A test crate's `TestEnv`, as far as the shared helpers need it.
pub trait AllocwatchBin {
    /// The allocwatch binary under test (`ALLOCWATCH_BIN`).
    fn bin(&self) -> &Path;
}

/// `ALLOCWATCH_BIN`: the binary under test. Panics, saying what the tests need (`needs`),
/// when it is unset (plain `cargo test` without `./x test`) or names no file: these tests must
/// run, never pass by skipping.
pub fn allocwatch_bin(needs: &str) -> PathBuf {
    let bin = env::var_os("ALLOCWATCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!("ALLOCWATCH_BIN is not set: these tests need {needs}; run them with `./x test`")
        });
    assert!(
        bin.is_file(),
        "ALLOCWATCH_BIN={} does not exist",
        bin.display()
    );
    bin
}

/// The path in the environment variable `name` (panics when it is unset).
pub fn env_path(name: &str) -> PathBuf {
    env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{name} is not set (./x test sets it)"))
}

/// `$ALLOCWATCH_FIXTURES/libc_fixture` (panics when it is missing).
pub fn libc_fixture() -> PathBuf {
    let fixture = env_path("ALLOCWATCH_FIXTURES").join("libc_fixture");
    assert!(
        fixture.is_file(),
        "{} missing: run ./x fixtures",
        fixture.display()
    );
    fixture
}

/// Serializes the tests of the including file (uprobes and BPF ids are system-wide state).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A path for a file `name` in the temp dir, unique to this process and call (removed if it
/// exists).
pub fn temp_file(name: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let path = env::temp_dir().join(format!(
        "allocwatch-test-{}-{}-{name}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_file(&path);
    path
}

// ---------------------------------------------------------------------------------------------
// libc aliases

/// The libc.so.6 this test process maps (the fixture uses the same one).
pub fn libc_path() -> PathBuf {
    let maps = fs::read_to_string("/proc/self/maps").expect("reading /proc/self/maps");
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libc.so.6"))
        .map(PathBuf::from)
        .expect("this test process maps no libc.so.6")
}

/// Sets of `apis` defined at one address in `libc` (groups of two or more; Debian's glibc:
/// aligned_alloc = memalign), from `nm -D`.
pub fn address_groups(libc: &Path, apis: &[&str]) -> Vec<Vec<String>> {
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(libc)
        .output()
        .unwrap_or_else(|e| panic!("cannot run nm ({e}): ./x setup installs binutils"));
    assert!(out.status.success(), "nm -D {} failed", libc.display());
    let mut by_addr: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut cols = line.split_whitespace();
        let (Some(addr), Some(_kind), Some(sym)) = (cols.next(), cols.next(), cols.next()) else {
            continue;
        };
        // `memalign@@GLIBC_2.2.5`: only the default version.
        let Some((name, _)) = sym.split_once("@@") else {
            continue;
        };
        if apis.contains(&name) {
            by_addr
                .entry(addr.to_owned())
                .or_default()
                .insert(name.to_owned());
        }
    }
    by_addr
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|g| g.into_iter().collect())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Leftover detection

/// BPF object ids a process holds open (from /proc/PID/fdinfo of its `bpf-prog`, `bpf-map` and
/// `bpf_link` fds: links are spelled with an underscore).
#[derive(Debug, Default)]
pub struct BpfIds {
    pub progs: BTreeSet<u32>,
    pub links: BTreeSet<u32>,
    pub maps: BTreeSet<u32>,
}

/// How long the kernel may take to free the BPF objects of a process that exited. It frees them
/// after RCU grace periods and in workqueues, which run late when every CPU is busy: with both
/// CPUs of a 2-CPU machine saturated (load 5-8), a program and the maps of an exited `top` were
/// still there when the rest of the one-second limit had passed. The process's exit (its fds closed, its probes detached) is what
/// the signal tests time; this only checks that nothing stays held for good.
/// The keys of a report's `lost` object that are events lost (checked zero by the libc and
/// allocator tests).
pub const LOSS_KEYS: &[&str] = &[
    "pending_full",
    "live_map_full",
    "site_map_full",
    "stack_collision",
    "stack_error",
    "ringbuf_full",
    "orphan_return",
    "site_spilled",
    "symbolize_process_gone",
    "symbolize_stack_evicted",
];

pub const BPF_FREE_LIMIT: Duration = Duration::from_secs(10);

/// bpf(2) commands that open an object by id: they fail with ENOENT once it is freed.
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

impl BpfIds {
    pub fn held_by(pid: u32) -> Self {
        let mut ids = Self::default();
        let fd_dir = format!("/proc/{pid}/fd");
        for entry in fs::read_dir(&fd_dir).unwrap_or_else(|e| panic!("{fd_dir}: {e}")) {
            let Ok(entry) = entry else { continue };
            let Ok(target) = fs::read_link(entry.path()) else {
                continue;
            };
            if !target.to_string_lossy().starts_with("anon_inode:bpf") {
                continue;
            }
            let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
            let Ok(text) = fs::read_to_string(&info) else {
                continue;
            };
            for line in text.lines() {
                let mut kv = line.split(':');
                let (Some(k), Some(v)) = (kv.next(), kv.next()) else {
                    continue;
                };
                let Ok(id) = v.trim().parse::<u32>() else {
                    continue;
                };
                match k {
                    "prog_id" => ids.progs.insert(id),
                    "link_id" => ids.links.insert(id),
                    "map_id" => ids.maps.insert(id),
                    _ => false,
                };
            }
        }
        ids
    }

    /// Every object must be freed by the kernel once `holder` (named in the message) exited:
    /// nothing stays attached, pinned or held. Freeing is deferred (RCU), hence the retries.
    pub fn assert_all_gone(&self, holder: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left: Vec<String> = [
                (BPF_PROG_GET_FD_BY_ID, "prog", &self.progs),
                (BPF_LINK_GET_FD_BY_ID, "link", &self.links),
                (BPF_MAP_GET_FD_BY_ID, "map", &self.maps),
            ]
            .into_iter()
            .flat_map(|(cmd, kind, ids)| {
                ids.iter()
                    .filter(move |&&id| bpf_object_exists(cmd, id))
                    .map(move |id| format!("{kind} {id}"))
            })
            .collect();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "BPF objects left after {holder} exited: {left:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Uprobe breakpoints in `pid`'s code: bytes of its executable file mappings that read as
/// `int3` (0xcc) in its memory but not in the file. The kernel writes them when a uprobe is
/// registered for the process and restores the file's byte when it is unregistered, so this
/// says, independently of the tracer, whether a process still traps into probes. (An `int3`
/// written by a debugger counts too; none runs in the tests.)
pub fn uprobe_breakpoints(pid: u32) -> usize {
    use std::{
        io::{Read as _, Seek as _, SeekFrom},
        os::unix::fs::FileExt as _,
    };
    let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return 0;
    };
    let Ok(mut mem) = fs::File::open(format!("/proc/{pid}/mem")) else {
        return 0;
    };
    let mut n = 0;
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || !f[1].contains('x') || !f[5].starts_with('/') {
            continue;
        }
        let (Some((lo, hi)), Ok(offset)) = (f[0].split_once('-'), u64::from_str_radix(f[2], 16))
        else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else {
            continue;
        };
        let Ok(file) = fs::File::open(f[5]) else {
            continue;
        };
        let len = (hi - lo) as usize;
        let mut in_mem = vec![0u8; len];
        let mut in_file = vec![0u8; len];
        if mem.seek(SeekFrom::Start(lo)).is_err() || mem.read_exact(&mut in_mem).is_err() {
            continue;
        }
        // Past the file's end the mapping reads zeros, as the buffer starts.
        let _ = file.read_at(&mut in_file, offset);
        n += in_mem
            .iter()
            .zip(&in_file)
            .filter(|&(&m, &f)| m == 0xcc && f != 0xcc)
            .count();
    }
    n
}

/// Waits until `pid` has no uprobe breakpoint left ([`uprobe_breakpoints`]); how long that
/// took, or `None` after `within`.
pub fn wait_no_breakpoints(pid: u32, within: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < within {
        if uprobe_breakpoints(pid) == 0 {
            return Some(t.elapsed());
        }
        thread::sleep(Duration::from_millis(5));
    }
    None
}

fn bpf_object_exists(cmd: libc::c_long, id: u32) -> bool {
    // union bpf_attr for *_GET_FD_BY_ID: { u32 id; u32 next_id; u32 open_flags; }
    let mut attr = [id, 0, 0, 0];
    // SAFETY: attr is a valid, writable bpf_attr prefix of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(&attr)) };
    if fd >= 0 {
        // SAFETY: fd was just returned to us and is closed once.
        unsafe { libc::close(fd as libc::c_int) };
        return true;
    }
    let err = std::io::Error::last_os_error();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOENT),
        "bpf({cmd}, id {id}): {err}"
    );
    false
}

/// System-wide places where a tracer could leave something behind.
pub struct KernelState {
    pub uprobe_events: BTreeSet<String>,
    pub bpffs: BTreeSet<String>,
}

impl KernelState {
    pub fn snapshot() -> Self {
        let uprobe_events = fs::read_to_string("/sys/kernel/tracing/uprobe_events")
            .expect("reading /sys/kernel/tracing/uprobe_events (./x setup mounts tracefs)")
            .lines()
            .map(str::to_owned)
            .collect();
        let bpffs = fs::read_dir("/sys/fs/bpf")
            .map(|d| {
                d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            uprobe_events,
            bpffs,
        }
    }

    pub fn assert_nothing_added(&self, before: &Self) {
        let events: Vec<_> = self
            .uprobe_events
            .difference(&before.uprobe_events)
            .collect();
        assert!(
            events.is_empty(),
            "uprobe_events entries left behind: {events:?}"
        );
        let pins: Vec<_> = self.bpffs.difference(&before.bpffs).collect();
        assert!(pins.is_empty(), "/sys/fs/bpf entries left behind: {pins:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// Lines of a child's pipe, read on a thread: kept for messages, and sent as they arrive.
pub struct Lines {
    all: Arc<Mutex<Vec<String>>>,
    /// Each line as it arrives (disconnected at EOF).
    pub rx: Receiver<String>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Lines {
    pub fn follow(pipe: impl Read + Send + 'static) -> Self {
        Self::follow_with(pipe, None)
    }

    /// [`Self::follow`], each line also written to `copy`.
    pub fn follow_into(pipe: impl Read + Send + 'static, copy: fs::File) -> Self {
        Self::follow_with(pipe, Some(copy))
    }

    fn follow_with(pipe: impl Read + Send + 'static, mut copy: Option<fs::File>) -> Self {
        let all = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let keep = Arc::clone(&all);
        let reader = thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(f) = copy.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(f, "{line}");
                }
                keep.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Self {
            all,
            rx,
            reader: Some(reader),
        }
    }

    /// Waits until every writer has closed the pipe and all of it has been read, at most
    /// `timeout` (a process that exited may have left a child holding the pipe). A fixed sleep
    /// after the writer's exit is not enough: under load the reader thread lags behind, and a
    /// line read too early is a test that fails only on busy machines.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.reader.as_ref().is_some_and(|r| !r.is_finished()) {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        true
    }

    /// The first line starting with `prefix` (panics after `timeout`).
    pub fn wait_for(&self, prefix: &str, timeout: Duration) -> String {
        self.try_wait_for(prefix, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The first line starting with `prefix`, or why there was none (all lines so far).
    pub fn try_wait_for(&self, prefix: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no line starting with {prefix:?} within {timeout:?}:\n{}",
                        self.text()
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "the process closed stderr (exited?) before a line starting with \
                         {prefix:?}:\n{}",
                        self.text()
                    ));
                }
            }
        }
    }

    pub fn text(&self) -> String {
        self.all.lock().unwrap().join("\n")
    }

    /// Like [`Self::wait_for`], but a line already read (and passed over by an earlier wait)
    /// counts too: a traced program's own lines on a shared stderr can come before ours.
    pub fn wait_for_seen(&self, prefix: &str, timeout: Duration) -> String {
        let seen = self
            .all
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.starts_with(prefix))
            .cloned();
        seen.unwrap_or_else(|| self.wait_for(prefix, timeout))
    }
}

/// All of a pipe, read on a thread.
pub fn read_all(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    })
}

/// How long a pipe may stay open after its writer exited (a child it started may hold it).
pub const PIPE_DRAIN: Duration = Duration::from_secs(10);

/// `allocwatch ARGS…` (killed and reaped when dropped).
pub struct Allocwatch {
    pub child: Child,
    pub stderr: Lines,
    stdout: Option<thread::JoinHandle<String>>,
    args: String,
}

impl Allocwatch {
    /// With stdout inherited.
    pub fn spawn(env: &impl AllocwatchBin, args: &[&str]) -> Self {
        Self::start(env, args, false)
    }

    /// With stdout captured, for [`Self::stdout`].
    pub fn spawn_with_stdout(env: &impl AllocwatchBin, args: &[&str]) -> Self {
        Self::start(env, args, true)
    }

    /// With stdout inherited and `vars` added to its environment.
    pub fn spawn_env(env: &impl AllocwatchBin, args: &[&str], vars: &[(&str, &str)]) -> Self {
        Self::start_env(env, args, false, vars)
    }

    fn start(env: &impl AllocwatchBin, args: &[&str], capture_stdout: bool) -> Self {
        Self::start_env(env, args, capture_stdout, &[])
    }

    fn start_env(
        env: &impl AllocwatchBin,
        args: &[&str],
        capture_stdout: bool,
        vars: &[(&str, &str)],
    ) -> Self {
        let bin = env.bin();
        let mut child = Command::new(bin)
            .args(args)
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(if capture_stdout {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stderr = Lines::follow(child.stderr.take().unwrap());
        let stdout = child.stdout.take().map(read_all);
        Self {
            child,
            stderr,
            stdout,
            args: args.join(" "),
        }
    }

    /// Waits for `allocwatch: tracing pid N` and returns N.
    pub fn wait_tracing_pid(&mut self, timeout: Duration) -> u32 {
        self.try_wait_tracing_pid(timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Self::wait_tracing_pid`], with the stderr so far when there was no such line.
    pub fn try_wait_tracing_pid(&mut self, timeout: Duration) -> Result<u32, String> {
        let line = self.stderr.try_wait_for(TRACING_PREFIX, startup(timeout))?;
        let rest = &line[TRACING_PREFIX.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits
            .parse()
            .map_err(|_| format!("no pid in the tracing line {line:?}"))
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_child(&mut self.child, timeout).unwrap_or_else(|| {
            panic!(
                "`allocwatch {}` still running after {timeout:?} (killed):\n{}",
                self.args,
                self.stderr.text()
            )
        })
    }

    pub fn assert_success(&mut self, status: ExitStatus) {
        self.stderr.wait_closed(PIPE_DRAIN);
        let stderr = self.stderr.text();
        assert!(
            status.success(),
            "`allocwatch {}` failed: {status}\n{stderr}",
            self.args
        );
        assert_no_crash(&stderr);
    }

    /// Everything written to stdout (by the traced command: the report goes to `-o`).
    pub fn stdout(&mut self) -> String {
        self.stdout
            .take()
            .expect("stdout was not captured")
            .join()
            .expect("stdout reader")
    }
}

impl Drop for Allocwatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fixture started directly by the test (no shell; killed and reaped when dropped).
pub struct Fixture {
    pub child: Child,
    pub pid: u32,
    pub started: Instant,
    stderr: Option<Lines>,
}

impl Fixture {
    /// Starts `FIXTURE MODE` and waits for its `WORD <pid>` line on stderr.
    pub fn spawn(path: &Path, mode: &str, word: &str) -> Self {
        Self::spawn_args(path, &[mode], word)
    }

    /// Starts `FIXTURE ARGS…` and waits for its `WORD <pid>` line on stderr.
    pub fn spawn_args(path: &Path, args: &[&str], word: &str) -> Self {
        let started = Instant::now();
        let mut child = Command::new(path)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
        let stderr = Lines::follow(child.stderr.take().unwrap());
        let line = stderr.wait_for(&format!("{word} "), Duration::from_secs(10));
        let pid = child.id();
        assert_eq!(line, format!("{word} {pid}"), "fixture's ready line");
        Self {
            child,
            pid,
            started,
            stderr: Some(stderr),
        }
    }

    /// Starts `PROGRAM ARGS…` with its output discarded.
    pub fn spawn_quiet(path: &Path, args: &[&str]) -> Self {
        let started = Instant::now();
        let child = Command::new(path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
        Self {
            pid: child.id(),
            child,
            started,
            stderr: None,
        }
    }

    /// Waits for its `WORD <pid>` line on stderr (after the one [`Self::spawn`] waited for).
    pub fn wait_word(&self, word: &str, timeout: Duration) {
        let stderr = self.stderr.as_ref().expect("a fixture started with spawn");
        let line = stderr.wait_for(&format!("{word} "), timeout);
        assert_eq!(
            line,
            format!("{word} {}", self.pid),
            "fixture's {word} line"
        );
    }

    /// Waits for its next stderr line starting with `WORD ` and returns the rest of it.
    pub fn wait_line(&self, word: &str, timeout: Duration) -> String {
        let stderr = self.stderr.as_ref().expect("a fixture started with spawn");
        let line = stderr.wait_for(&format!("{word} "), timeout);
        line[word.len() + 1..].to_owned()
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_child(&mut self.child, timeout)
            .unwrap_or_else(|| panic!("fixture still running after {timeout:?} (killed)"))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long an allocwatch run that must fail at once may take.
const SINGLE_ERROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `allocwatch ARGS…`, which must fail: exit 1 within 30 s, exactly one stderr line
/// `allocwatch: error: …`, no backtrace even with RUST_BACKTRACE=1. Returns the line.
pub fn assert_single_error(env: &impl AllocwatchBin, args: &[&str]) -> String {
    let bin = env.bin();
    let timeout = SINGLE_ERROR_TIMEOUT;
    let mut child = Command::new(bin)
        .args(args)
        // A user's RUST_BACKTRACE=1 (set on these machines) must not turn errors into traces.
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let reader = read_all(child.stderr.take().expect("stderr"));
    let status = wait_child(&mut child, timeout);
    let stderr = reader.join().expect("stderr reader");
    let status = status.unwrap_or_else(|| {
        panic!(
            "`allocwatch {}` still running after {timeout:?} (killed):\n{stderr}",
            args.join(" ")
        )
    });
    assert_eq!(
        status.code(),
        Some(1),
        "exit code of `allocwatch {}`\n{stderr}",
        args.join(" ")
    );
    assert_no_crash(&stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one stderr line for `allocwatch {}`:\n{stderr}",
        args.join(" ")
    );
    assert!(
        lines[0].starts_with(ERROR_PREFIX),
        "error line format: {:?}",
        lines[0]
    );
    lines[0].to_owned()
}

pub fn assert_no_crash(stderr: &str) {
    assert!(
        !stderr.contains("panicked")
            && !stderr.contains("internal error")
            && !stderr.contains("stack backtrace"),
        "allocwatch crashed:\n{stderr}"
    );
}

/// Polls until `child` exits; kills it and returns None after `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waitpid") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

pub fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// A pid that exists no more: a reaped child's (not reused this soon: pids are allocated
/// cyclically).
pub fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().expect("spawning true");
    child.wait().expect("waiting for true");
    let pid = child.id();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} reused already"
    );
    pid
}

/// The message of a caught panic.
pub fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "(non-string panic)".to_owned())
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

// ---------------------------------------------------------------------------------------------
// JSON access with messages that show the document

/// `bpftool -j ARGS…`, parsed.
pub fn bpftool(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run bpftool ({e}): ./x setup installs it"));
    assert!(out.status.success(), "bpftool {args:?}: {}", out.status);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The JSON report at `path`, moved to [`kept_reports`] so that a failure can be looked into
/// after the run (a panic message shows one process or site; the report has the rest: loss
/// counters, every site, the aliases).
pub fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("report {} not written: {e}", path.display()));
    keep_report(path, &text);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("report {} is not JSON ({e}):\n{text}", path.display()))
}

/// Where the reports a test read are kept: `target/tmp/reports/TEST/` (the last run's).
pub fn kept_reports(test: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("reports")
        .join(test.replace("::", "-"))
}

thread_local! {
    /// Whether this test thread kept a report.
    static KEPT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn keep_report(path: &Path, text: &str) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    let _ = fs::remove_file(path);
    let Some(test) = thread::current().name().map(str::to_owned) else {
        return;
    };
    let dir = kept_reports(&test);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    // temp_file's names carry the test process id and a counter: keep only the given name.
    let name = name
        .as_deref()
        .and_then(|n| n.splitn(5, '-').nth(4))
        .unwrap_or("report.json")
        .to_owned();
    if fs::create_dir_all(&dir).is_err() || fs::write(dir.join(&name), text).is_err() {
        return;
    }
    KEPT.set(true);
    // Say where they are when the test fails, after the default message.
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            if let Some(test) = thread::current().name().filter(|_| KEPT.get()) {
                let dir = kept_reports(test).display().to_string();
                eprintln!("the JSON reports this test read are kept in {dir}");
            }
        }));
    });
}

pub fn process_by_pid(report: &Value, pid: u32) -> &Value {
    array(report, "processes")
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("no process {pid} in the report\n{report:#}"))
}

pub fn array<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("`{key}` is not an array in\n{v:#}"))
}

pub fn u64_at(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not an unsigned integer in\n{v:#}"))
}

pub fn f64_at(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in\n{v:#}"))
}

pub fn str_at<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` is not a string in\n{v:#}"))
}

// ---------------------------------------------------------------------------------------------
// Go toolchains

/// One Go toolchain installed by `./x setup` (xtask/src/go.rs).
pub struct GoToolchain {
    pub version: String,
    pub goroot: PathBuf,
    pub go: PathBuf,
}

impl GoToolchain {
    /// `go tool TOOL` of this toolchain, hermetic like xtask/src/go.rs.
    pub fn tool(&self, tool: &str) -> Command {
        let mut cmd = Command::new(&self.go);
        cmd.env("GOROOT", &self.goroot)
            .env("GOTOOLCHAIN", "local")
            .env_remove("GOEXPERIMENT")
            .args(["tool", tool]);
        cmd
    }
}

/// The toolchains of `$ALLOCWATCH_GO_TOOLCHAINS` (`$cache/go/toolchains.tsv`, written by
/// xtask/src/go.rs): `version<TAB>goroot<TAB>go` per line, each of them present.
pub fn go_toolchains() -> Vec<GoToolchain> {
    let manifest = env_path("ALLOCWATCH_GO_TOOLCHAINS");
    let text = fs::read_to_string(&manifest)
        .unwrap_or_else(|e| panic!("{}: {e} (./x setup writes it)", manifest.display()));
    let list: Vec<GoToolchain> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(cols.len(), 3, "{}: bad line {line:?}", manifest.display());
            let tc = GoToolchain {
                version: cols[0].to_owned(),
                goroot: PathBuf::from(cols[1]),
                go: PathBuf::from(cols[2]),
            };
            assert!(
                tc.go.is_file(),
                "{} is listed but missing: run ./x setup",
                tc.go.display()
            );
            tc
        })
        .collect();
    assert!(
        !list.is_empty(),
        "no Go toolchain in {}: run ./x setup",
        manifest.display()
    );
    list
}

/// `1.25.5` → `[1, 25, 5]`, for ordering versions.
pub fn version_key(v: &str) -> Vec<u32> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

// ---------------------------------------------------------------------------------------------
// What libc_fixture's `run` mode does (keep in sync with fixtures/c/libc_fixture.c); the libc
// tests check these numbers against bpftrace and `expected_tables_agree` checks they agree.

/// Per API, program-level calls and bytes requested, before folding aliases.
pub const API_TOTALS: &[(&str, u64, u64)] = &[
    // fx_malloc: 7 × malloc(100) = 700.
    ("malloc", 7, 700),
    // fx_calloc: 5 × calloc(4, 25) = 5 × 100 = 500.
    ("calloc", 5, 500),
    // fx_realloc: 3 × realloc(NULL, 64) + 3 × realloc(p, 256) = 192 + 768 = 960.
    ("realloc", 6, 960),
    // fx_reallocarray: 2 × reallocarray(NULL, 8, 16) = 2 × 128 = 256.
    ("reallocarray", 2, 256),
    // fx_posix_memalign: 4 × posix_memalign(&p, 64, 200) = 800.
    ("posix_memalign", 4, 800),
    // fx_aligned_alloc: 3 × aligned_alloc(64, 128) = 384.
    ("aligned_alloc", 3, 384),
    // fx_memalign: 2 × memalign(64, 96) = 192 (reported under aligned_alloc where aliased).
    ("memalign", 2, 192),
    // fx_valloc: 2 × valloc(1000) = 2000.
    ("valloc", 2, 2000),
    // fx_pvalloc: 1 × pvalloc(5000) = 5000 (requested; glibc rounds it up to a page).
    ("pvalloc", 1, 5000),
    // fx_free_some: 3 malloc blocks (3 × 100) + 5 calloc (5 × 100) + 3 realloc'ed (3 × 256)
    // + 4 posix_memalign (4 × 200) + 1 aligned_alloc (128) + free(NULL) (0)
    // = 17 calls, 300 + 500 + 768 + 800 + 128 = 2496 bytes of tracked allocations freed.
    ("free", 17, 2496),
];

/// Live at exit: malloc 4 × 100 + reallocarray 2 × 128 + aligned_alloc 2 × 128 + memalign 2 × 96
/// + valloc 2 × 1000 + pvalloc 1 × 5000 = 400 + 256 + 256 + 192 + 2000 + 5000 = 8104 bytes.
pub const LIVE_BYTES: u64 = 8104;
/// 4 + 2 + 2 + 2 + 2 + 1 = 13 (calloc, realloc and posix_memalign blocks are all freed; the
/// three 64-byte realloc blocks were moved to 256 by the second realloc of each).
pub const LIVE_ALLOCATIONS: u64 = 13;

/// One call site of the fixture: the API as the program calls it (before alias folding) and
/// the fx_ function that calls it (frame 0). fx_realloc has two call sites, fx_free_some ten
/// (gcc unrolls the short loops): the test sums the sites of one (API, frame 0 function).
pub struct Site {
    pub function: &'static str,
    pub api: &'static str,
    pub calls: u64,
    pub bytes: u64,
    pub live_bytes: u64,
    pub live_allocations: u64,
}

pub const fn site(
    function: &'static str,
    api: &'static str,
    (calls, bytes): (u64, u64),
    (live_allocations, live_bytes): (u64, u64),
) -> Site {
    Site {
        function,
        api,
        calls,
        bytes,
        live_bytes,
        live_allocations,
    }
}

/// Per site: (calls, bytes) and (live allocations, live bytes) at exit.
pub const SITES: &[Site] = &[
    site("fx_malloc", "malloc", (7, 700), (4, 400)),
    site("fx_calloc", "calloc", (5, 500), (0, 0)),
    site("fx_realloc", "realloc", (6, 960), (0, 0)),
    site("fx_reallocarray", "reallocarray", (2, 256), (2, 256)),
    site("fx_posix_memalign", "posix_memalign", (4, 800), (0, 0)),
    site("fx_aligned_alloc", "aligned_alloc", (3, 384), (2, 256)),
    site("fx_memalign", "memalign", (2, 192), (2, 192)),
    site("fx_valloc", "valloc", (2, 2000), (2, 2000)),
    site("fx_pvalloc", "pvalloc", (1, 5000), (1, 5000)),
    // Live numbers of a free site mean nothing: not checked.
    site("fx_free_some", "free", (17, 2496), (0, 0)),
];

/// Every libc API allocwatch traces.
pub const APIS: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "free",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
];

/// A fresh directory of one test (removed at the end), `$TMPDIR/allocwatch-CRATE-PID-N-NAME`:
/// fixture copies get unique `exe` labels.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = env::temp_dir().join(format!(
            "allocwatch-{}-{}-{}-{name}",
            env!("CARGO_CRATE_NAME"),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // The canonical path: it is what /proc/PID/exe (the `exe` label) shows.
        let path = path.canonicalize().expect("canonical temp dir");
        Self { path }
    }

    /// An executable copy of `src` named `name` in this directory.
    pub fn copy(&self, src: &Path, name: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let dst = self.path.join(name);
        copy_program(src, &dst);
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).expect("chmod");
        dst
    }
}

/// Copies a program that a test will run, by `cp` in a process of its own: a copy written by
/// this process holds a writable descriptor that a child another test thread forks meanwhile
/// inherits until its exec, and running the copy then fails with ETXTBSY ("Text file busy",
/// seen in `faults::output_unchanged_under_the_agent`).
pub fn copy_program(src: &Path, dst: &Path) {
    let status = Command::new("cp")
        .arg("--")
        .arg(src)
        .arg(dst)
        .status()
        .unwrap_or_else(|e| panic!("running cp: {e}"));
    assert!(
        status.success(),
        "cp {} {}: {status}",
        src.display(),
        dst.display()
    );
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// Debian's python3.11 and its debug file (growth.rs, unwind.rs)

/// Debian's CPython 3.11: stripped, built without frame pointers, LTO (its static functions
/// are `NAME.lto_priv.N` in the debug file).
pub const PYTHON: &str = "/usr/bin/python3.11";

/// [`PYTHON`] and its build-id debug file (python3.11-dbg's), both of which must exist: a
/// missing one fails the test, naming `./x setup`.
pub fn python_and_debug_file() -> (PathBuf, PathBuf) {
    let python = PathBuf::from(PYTHON);
    assert!(
        python.is_file(),
        "{PYTHON} missing: ./x setup installs python3.11-dbg, which needs it"
    );
    let debug = build_id_debug_file(&python);
    (python, debug)
}

/// The build-id debug file of `binary` (`readelf -n`), which must exist.
pub fn build_id_debug_file(binary: &Path) -> PathBuf {
    let out = Command::new("readelf")
        .arg("-n")
        .arg(binary)
        .output()
        .expect("readelf");
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("{} has no build-id note", binary.display()));
    let path = PathBuf::from(format!(
        "/usr/lib/debug/.build-id/{}/{}.debug",
        &id[..2],
        &id[2..]
    ));
    assert!(
        path.is_file(),
        "{} missing: the debug file of {} (Debian's python3.11-dbg, installed by ./x setup)",
        path.display(),
        binary.display()
    );
    path
}

/// The address of the function of `debug_file` named `name` or `name.lto_priv.N` (`nm`).
pub fn c_function(debug_file: &Path, name: &str) -> u64 {
    let out = Command::new("nm").arg(debug_file).output().expect("nm");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            let (addr, kind, sym) = (w.next()?, w.next()?, w.next()?);
            let base = sym.split_once(".lto_priv.").map_or(sym, |(b, _)| b);
            (kind.eq_ignore_ascii_case("t") && base == name && !sym.ends_with(".cold"))
                .then(|| u64::from_str_radix(addr, 16).ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no function {name} in {}", debug_file.display()))
}

// ---------------------------------------------------------------------------------------------
// Sampling (`--sample-bytes`) on `libc_fixture sample`

/// The sampling mean of the sampling tests (`libc.rs`, `agent.rs`): small enough that every site is sampled
/// hundreds of times (bounds of a few %), large enough that most small calls are not.
pub const SAMPLE_RATE: u64 = 512;

/// `libc_fixture sample` (fixtures/c/libc_fixture.c): (function, API, calls, block size,
/// live at exit).
pub const SAMPLE_SITES: &[(&str, &str, u64, u64, bool)] = &[
    ("fx_sample_small", "malloc", 20_000, 64, false),
    ("fx_sample_mid", "malloc", 4_000, 1000, true),
    ("fx_sample_large", "calloc", 100, 65_536, true),
];

/// Relative error bound of a scaled estimate of `n` calls of `size` bytes sampled with mean
/// `rate`: the number of samples is Binomial(n, p), p = 1 - exp(-size/rate), and the estimate
/// k/p × size has a relative standard deviation of sqrt((1 - p) / (n p)). Six of them (a
/// miss about once in 10^9 checks), plus 0.1 % for the truncation of the scaled figures.
/// For this fixture at 512 bytes: 11.6 % (small), 3.9 % (mid), 0.1 % (large).
pub fn sample_bound(n: u64, size: u64, rate: u64) -> f64 {
    let p = 1.0 - (-(size as f64) / rate as f64).exp();
    6.0 * ((1.0 - p) / (n as f64 * p)).sqrt() + 0.001
}
