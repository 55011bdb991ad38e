//! The command line as a user meets it, against the real binary (`ALLOCWATCH_BIN`, run as root
//! by `./x test`): `--help` of every subcommand and a bad value for every flag as snapshots
//! (tests/cli/*.trycmd; `agent/src/cli.rs` checks that every flag of clap's definition has a
//! case there), and bad targets and environments, each refused with one line
//! `allocwatch: error: …`, exit 1, nothing left attached.
//!
//! Update the snapshots with `TRYCMD=overwrite ./x test -- --test cli`.
//!
//! These tests fail (never skip) when `ALLOCWATCH_BIN` is unset.

mod support;

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use support::{
    AllocwatchBin, KernelState, Lines, assert_no_crash, assert_single_error, dead_pid, serial,
};

struct TestEnv {
    bin: PathBuf,
}

impl TestEnv {
    /// Panics when `ALLOCWATCH_BIN` is unset: these tests must run, not skip.
    fn get() -> Self {
        let bin = std::env::var_os("ALLOCWATCH_BIN")
            .map(PathBuf::from)
            .expect("ALLOCWATCH_BIN is not set: run these tests with `./x test` (as root)");
        assert!(bin.is_file(), "ALLOCWATCH_BIN={} is missing", bin.display());
        Self { bin }
    }
}

impl AllocwatchBin for TestEnv {
    fn bin(&self) -> &Path {
        &self.bin
    }
}

/// A scratch directory (removed when dropped), world-readable so that an unprivileged user
/// can run what is in it.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("allocwatch-cli-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating a scratch dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, bytes).expect("writing a scratch file");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `assert_single_error`, then nothing added to the kernel's uprobe list or bpffs, and the
/// line equal to `want`.
fn refused(env: &TestEnv, args: &[&str], want: &str) {
    let before = KernelState::snapshot();
    let line = assert_single_error(env, args);
    assert_eq!(
        line,
        want,
        "the error line of `allocwatch {}`",
        args.join(" ")
    );
    KernelState::snapshot().assert_nothing_added(&before);
}

// ---------------------------------------------------------------------------------------------
// Snapshots

/// tests/cli/help.trycmd (every subcommand's --help) and tests/cli/bad-values.trycmd.
#[test]
fn snapshots() {
    let env = TestEnv::get();
    let _serial = serial();
    trycmd::TestCases::new()
        .register_bin("allocwatch", env.bin.clone())
        .env("RUST_BACKTRACE", "1")
        .case("tests/cli/*.trycmd");
}

/// The README's Usage section and the `--help` pages name the same flags: every flag the
/// README mentions exists (in some subcommand's help), and every flag of the help pages is
/// documented. On a command line, what follows ` -- ` is the traced program's; a dotted flag
/// (`--web.config.file`) is another program's; `--exclude-*` stands for each `--exclude-` flag.
#[test]
fn readme_and_help_name_the_same_flags() {
    let env = TestEnv::get();
    let help = |args: &[&str]| -> String {
        let out = Command::new(&env.bin)
            .args(args)
            .arg("--help")
            .output()
            .expect("running allocwatch --help");
        assert!(
            out.status.success(),
            "allocwatch {args:?} --help: {}",
            out.status
        );
        String::from_utf8(out.stdout).expect("UTF-8 help")
    };
    let commands = |text: &str| -> Vec<String> {
        text.lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| *c != "help")
            .map(str::to_owned)
            .collect()
    };
    let mut pages = vec![help(&[])];
    for c in commands(&pages[0]) {
        let page = help(&[&c]);
        for sub in commands(&page) {
            pages.push(help(&[&c, &sub]));
        }
        pages.push(page);
    }
    let in_help: std::collections::BTreeSet<String> = pages
        .iter()
        .flat_map(|p| flags(p))
        .filter(|f| f != "--help" && f != "--version")
        .collect();

    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
        .expect("reading README.md");
    let usage: String = readme
        .lines()
        .skip_while(|l| !l.starts_with("## Usage"))
        .take_while(|l| !l.starts_with("## How it works"))
        .map(|l| l.split(" -- ").next().unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let in_readme: std::collections::BTreeSet<String> = flags(&usage)
        .filter(|f| f != "--help" && f != "--version")
        .collect();
    let named = |f: &String| {
        in_readme.contains(f) || (f.starts_with("--exclude-") && in_readme.contains("--exclude-*"))
    };
    let undocumented: Vec<&String> = in_help.iter().filter(|f| !named(f)).collect();
    let unknown: Vec<&String> = in_readme
        .iter()
        .filter(|f| {
            !in_help.contains(*f)
                && !(f.as_str() == "--exclude-*"
                    && in_help.iter().any(|h| h.starts_with("--exclude-")))
        })
        .collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "in --help but not in the README's Usage: {undocumented:?}; in the README but in no \
         --help: {unknown:?}"
    );
}

/// The long flags in `text`: `--name` (and `--name-*`), not dotted ones.
fn flags(text: &str) -> impl Iterator<Item = String> + '_ {
    text.match_indices("--").filter_map(|(i, _)| {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-') {
            return None;
        }
        let rest = &text[i + 2..];
        let len = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
            .unwrap_or(rest.len());
        let name = &rest[..len];
        let next = rest[len..].chars().next();
        if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_lowercase()) {
            return None;
        }
        match next {
            Some('.') => None,
            Some('*') => Some(format!("--{name}*")),
            _ => Some(format!("--{name}")),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Targets

/// A kernel thread's pid (kthreadd is 2 on a host; found by its flags to be sure).
fn kernel_thread() -> (u32, String) {
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let flags: u64 = stat[close + 1..]
            .split_whitespace()
            .nth(6)
            .and_then(|f| f.parse().ok())
            .unwrap_or(0);
        if flags & 0x0020_0000 != 0 {
            let comm = stat[stat.find('(').unwrap() + 1..close].to_string();
            return (pid, comm);
        }
    }
    panic!("no kernel thread in /proc (a pid namespace?)");
}

#[test]
fn pid_that_cannot_be_traced() {
    let env = TestEnv::get();
    let _serial = serial();
    let (kthread, comm) = kernel_thread();
    refused(
        &env,
        &["top", "--pid", &kthread.to_string()],
        &format!(
            "allocwatch: error: process {kthread} ({comm}) is a kernel thread: it has no \
             user-space memory and calls no malloc; give the pid of a user-space process"
        ),
    );

    let gone = dead_pid();
    refused(
        &env,
        &["leaks", "--pid", &gone.to_string()],
        &format!("allocwatch: error: no such process: {gone}"),
    );

    // A zombie: our child, exited, not reaped yet.
    let mut child = Command::new("true").spawn().expect("spawning true");
    let zombie = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fs::read_to_string(format!("/proc/{zombie}/stat")).is_ok_and(|s| s.contains(") Z ")) {
        assert!(Instant::now() < deadline, "true did not exit");
        thread::sleep(Duration::from_millis(5));
    }
    refused(
        &env,
        &["maps", "--pid", &zombie.to_string()],
        &format!(
            "allocwatch: error: process {zombie} (true) is a zombie: it has exited and waits \
             for its parent to reap it, so there is nothing left to trace"
        ),
    );
    child.wait().unwrap();

    // A thread that is not its process's main thread.
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let t = thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tx.send(unsafe { libc::gettid() } as u32).unwrap();
        let _ = done_rx.recv();
    });
    let tid = rx.recv().unwrap();
    let me = std::process::id();
    let comm = fs::read_to_string(format!("/proc/{me}/comm")).unwrap();
    refused(
        &env,
        &["top", "--pid", &tid.to_string()],
        &format!(
            "allocwatch: error: {tid} is a thread of process {me} ({}): give --pid {me}",
            comm.trim_end()
        ),
    );
    done_tx.send(()).unwrap();
    t.join().unwrap();
}

/// Processes that exit at every moment of the attach: each run either traces the process
/// (exit 0, a report of it) or says in one line that it is gone; never a panic, an errno from
/// deep inside, or probes left behind. (It found a process read before ld.so had mapped its
/// libc being called "a program without malloc".)
#[test]
fn pid_that_exits_during_attach() {
    let env = TestEnv::get();
    let _serial = serial();
    let before = KernelState::snapshot();
    let mut traced = 0;
    let mut gone = 0;
    // sleep's startup takes about a millisecond, allocwatch's load and attach some tens to
    // hundreds: delays from 5 to 295 ms cover before, during and after.
    for i in 0..30u32 {
        let delay = format!("{:.3}", f64::from(5 + i * 10) / 1000.0);
        let mut target = Command::new("sleep")
            .arg(&delay)
            .spawn()
            .expect("spawning sleep");
        let pid = target.id();
        let out = Command::new(&env.bin)
            .args(["top", "--json", "--pid", &pid.to_string()])
            .stdin(Stdio::null())
            .output()
            .expect("running allocwatch");
        target.wait().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_no_crash(&stderr);
        match out.status.code() {
            Some(0) => {
                let report: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .unwrap_or_else(|e| panic!("sleep {delay}: no JSON report ({e})\n{stderr}"));
                assert_eq!(report["processes"][0]["pid"], pid, "{report:#}");
                traced += 1;
            }
            Some(1) => {
                let lines: Vec<&str> = stderr.lines().collect();
                let ok = [
                    format!("allocwatch: error: no such process: {pid}"),
                    format!(
                        "allocwatch: error: process {pid} exited while allocwatch was \
                         attaching to it: nothing was traced"
                    ),
                    format!(
                        "allocwatch: error: process {pid} (sleep) is a zombie: it has exited \
                         and waits for its parent to reap it, so there is nothing left to trace"
                    ),
                ];
                assert!(
                    lines.len() == 1 && ok.iter().any(|w| w == lines[0]),
                    "sleep {delay}: one line saying the process is gone, got:\n{stderr}"
                );
                gone += 1;
            }
            other => panic!("sleep {delay}: exit {other:?}\n{stderr}"),
        }
    }
    // Which outcome a delay gets depends on the machine's load: both are right, only the
    // words of a refusal and the absence of leftovers are checked.
    eprintln!("{traced} traced, {gone} gone before or during the attach");
    KernelState::snapshot().assert_nothing_added(&before);
}

#[test]
fn command_that_is_not_a_program() {
    let env = TestEnv::get();
    let _serial = serial();
    let dir = Scratch::new("targets");
    let script = dir.file("x.sh", b"echo hello\n", 0o755);
    refused(
        &env,
        &["top", "--", s(&script)],
        &format!(
            "allocwatch: error: {0} is a script without a `#!` line: the kernel cannot run it; \
             name its interpreter, e.g. `-- sh {0}`",
            script.display()
        ),
    );
    // Relative, found in the current directory: the suggestion can be pasted.
    let out = Command::new(&env.bin)
        .args(["top", "--", "./x.sh"])
        .current_dir(&dir.0)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "allocwatch: error: ./x.sh is a script without a `#!` line: the kernel cannot run it; \
         name its interpreter, e.g. `-- sh ./x.sh`\n"
    );
    assert_eq!(out.status.code(), Some(1));

    let data = dir.file("data", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", 0o755);
    refused(
        &env,
        &["leaks", "--", s(&data)],
        &format!(
            "allocwatch: error: {} is not a program the kernel can run (neither ELF nor a `#!` \
             script: it starts with bytes 89 50 4e 47)",
            data.display()
        ),
    );

    let true_bin = fs::read("/bin/true").unwrap();
    let cut = dir.file("cut", &true_bin[..4096], 0o755);
    let line = assert_single_error(&env, &["top", "--", s(&cut)]);
    assert!(
        line.starts_with(&format!(
            "allocwatch: error: {} is a truncated ELF file: it has 4096 bytes, its headers \
             describe ",
            cut.display()
        )),
        "{line}"
    );

    // No libc at all: a static program that only makes syscalls.
    let src = dir.file(
        "nolibc.c",
        b"void _start(void) { __asm__ volatile(\"mov $60, %eax\\n xor %edi, %edi\\n syscall\"); }\n",
        0o644,
    );
    let nolibc = dir.0.join("nolibc");
    let st = Command::new("gcc")
        .args(["-static", "-nostdlib", "-O1", "-o", s(&nolibc), s(&src)])
        .status()
        .expect("running gcc (./x setup installs it)");
    assert!(st.success(), "gcc failed");
    refused(
        &env,
        &["top", "--", s(&nolibc)],
        &format!(
            "allocwatch: error: {} is statically linked without malloc: allocwatch traces \
             libc's malloc family and the Go runtime, and this program has neither",
            nolibc.display()
        ),
    );
}

/// Output read by a reader that stops early (`allocwatch maps … | head`): allocwatch finishes
/// its work and exits 0 without a word, as a Unix filter does, instead of panicking on the
/// broken pipe.
#[test]
fn a_reader_that_goes_away_is_no_error() {
    let env = TestEnv::get();
    let _serial = serial();
    for args in [
        &["config", "print-default"][..],
        &["top", "--", "/bin/true"],
        &["leaks", "--interval", "100ms", "--", "sleep", "0.5"],
    ] {
        let mut child = Command::new(&env.bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running allocwatch");
        // The read end closed before anything is written.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("waiting for allocwatch");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_no_crash(&stderr);
        assert!(
            out.status.success() && !stderr.contains("error"),
            "allocwatch {}: {}\n{stderr}",
            args.join(" "),
            out.status
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Config files

/// A bad config file: the one-line error, then the offending line with a caret under it.
#[test]
fn config_errors_point_at_the_line() {
    let env = TestEnv::get();
    let dir = Scratch::new("config");
    let file = dir.file(
        "bad.toml",
        b"# allocwatch\nttl = \"10m\"\n\n[select]\ncomm = [\"^api$\", \"(\"]\n",
        0o644,
    );
    let out = Command::new(&env.bin)
        .args(["agent", "--config", s(&file)])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "allocwatch: error: config file {}, line 5, key select.comm: [1] \"(\": not a \
             regular expression: unclosed group\n  |\n5 | comm = [\"^api$\", \"(\"]\n  |        \
             ^^^^^^^^^^^^^^\n",
            file.display()
        )
    );
    let ttl = dir.file("ttl.toml", b"ttl = \"0s\"\n", 0o644);
    let out = Command::new(&env.bin)
        .args(["agent", "--config", s(&ttl)])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "allocwatch: error: config file {}, line 1, key ttl: must be at least 1s: the \
             series of an exited process must outlive a scrape, or its final counts are never \
             read (make it longer than the scrape interval; default 10m)\n  |\n1 | ttl = \
             \"0s\"\n  |       ^^^^\n",
            ttl.display()
        )
    );
}

// ---------------------------------------------------------------------------------------------
// Environment

/// The binary where an unprivileged user can run it (the build tree may not be reachable).
fn world_runnable_bin(env: &TestEnv, dir: &Scratch) -> PathBuf {
    let bin = dir.0.join("allocwatch");
    support::copy_program(&env.bin, &bin);
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// `setpriv ARGS… BIN top -- /bin/true`: (exit code, stderr).
fn run_as(setpriv: &[&str], bin: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new("setpriv")
        .args(setpriv)
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .expect("running setpriv (util-linux)");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const NOBODY: [&str; 3] = ["--reuid=65534", "--regid=65534", "--clear-groups"];

#[test]
fn not_root_or_missing_capabilities() {
    let env = TestEnv::get();
    let _serial = serial();
    let dir = Scratch::new("privs");
    let bin = world_runnable_bin(&env, &dir);
    let before = KernelState::snapshot();
    let (code, stderr) = run_as(&NOBODY, &bin, &["top", "--", "/bin/true"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr,
        "allocwatch: error: allocwatch needs root, or the capabilities CAP_BPF and CAP_PERFMON \
         (this process lacks CAP_BPF and CAP_PERFMON): run it as root (sudo allocwatch …), or \
         grant them (`setcap cap_bpf,cap_perfmon,cap_sys_resource+ep` on the binary, or the \
         container's capabilities)\n"
    );
    let mut only_bpf = NOBODY.to_vec();
    only_bpf.extend(["--inh-caps=+bpf", "--ambient-caps=+bpf"]);
    let (code, stderr) = run_as(&only_bpf, &bin, &["agent"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with(
            "allocwatch: error: allocwatch needs root, or the capabilities CAP_BPF and \
             CAP_PERFMON (this process lacks CAP_PERFMON): "
        ) && stderr.lines().count() == 1,
        "{stderr}"
    );
    KernelState::snapshot().assert_nothing_added(&before);

    // Exactly CAP_BPF and CAP_PERFMON, no CAP_SYS_RESOURCE, a 64 KiB locked-memory limit: on
    // a kernel that charges maps to the memory cgroup (5.11 and later) that is all it takes.
    let mut least = NOBODY.to_vec();
    least.extend(["--inh-caps=+bpf,+perfmon", "--ambient-caps=+bpf,+perfmon"]);
    let out = Command::new("prlimit")
        .arg("--memlock=65536:65536")
        .arg("setpriv")
        .args(&least)
        .arg(&bin)
        .args(["top", "--json", "--", "/bin/true"])
        .stdin(Stdio::null())
        .output()
        .expect("running prlimit (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("allocwatch: tracing pid "),
        "CAP_BPF + CAP_PERFMON with memlock 64 KiB: {}\n{stderr}",
        out.status
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("a JSON report on stdout");
    assert_eq!(report["processes"][0]["exit_code"], 0, "{report:#}");
}

/// `GET path` on 127.0.0.1:port: the whole response.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).expect("reading the response");
    out
}

/// No BTF and no tracefs, each hidden in a mount namespace of its own (the machine's stay).
#[test]
fn no_btf_and_no_tracefs() {
    let env = TestEnv::get();
    let _serial = serial();
    let before = KernelState::snapshot();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /sys/kernel/btf && exec {} top -- /bin/true",
            env.bin.display()
        ))
        .stdin(Stdio::null())
        .output()
        .expect("running unshare");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "allocwatch: error: this kernel exposes no BTF (no /sys/kernel/btf/vmlinux): allocwatch \
         needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (in a container, the host's \
         /sys/kernel/btf must be visible)\n"
    );
    KernelState::snapshot().assert_nothing_added(&before);

    // top and leaks attach uprobes through the perf PMU: no tracefs needed (to follow children
    // it is).
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "umount /sys/kernel/tracing; umount /sys/kernel/debug 2>/dev/null; \
             exec {} top --json -- /bin/true",
            env.bin.display()
        ))
        .stdin(Stdio::null())
        .output()
        .expect("running unshare");
    assert!(
        out.status.success(),
        "top without tracefs: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // Following children needs tracepoints, which need tracefs: said, then the one process.
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("allocwatch: warning: cannot follow the processes pid "),
        "top without tracefs says it does not follow\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent runs, and says what to do to see execs.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let mut agent = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "umount /sys/kernel/tracing; umount /sys/kernel/debug 2>/dev/null; \
             exec {} agent --listen 127.0.0.1:{port}",
            env.bin.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running unshare");
    let lines = Lines::follow(agent.stderr.take().unwrap());
    let serving = lines.wait_for("allocwatch: agent serving", Duration::from_secs(60));
    // A scrape is answered by the agent's loop, which runs once its signal handlers are set.
    let metrics = http_get(port, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    support::signal(agent.id(), libc::SIGTERM);
    let status = support::wait_child(&mut agent, Duration::from_secs(10)).expect("agent stops");
    let text = lines.text();
    assert!(status.success(), "agent: {status}\n{text}");
    assert!(
        text.lines().next()
            == Some(
                "allocwatch: warning: tracefs is not mounted (no /sys/kernel/tracing/events): the \
             agent cannot see execs as they happen; mount it with `mount -t tracefs nodev \
             /sys/kernel/tracing` (in a pod: mount the host's /sys/kernel/tracing)"
            ),
        "{text}"
    );
    assert!(serving.contains(&port.to_string()), "{serving}");
    KernelState::snapshot().assert_nothing_added(&before);
}
