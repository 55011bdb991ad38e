//! `./x test --vm KERNEL [-- FILTER]`: the integration tests inside a throw-away qemu VM that
//! boots a Debian kernel (issue 12's kernel matrix).
//!
//! The kernel comes from a Debian package (`apt-get download`, unpacked into
//! `~/.cache/allocwatch/vm/PACKAGE/`). The VM has no disk and no network: a small initramfs
//! (busybox-static and the kernel's own virtio/9p modules) mounts the host's `/` read-only over
//! 9p, and the repository and the tool cache read-write at their host paths, then switches root
//! into it, so the tests run on the same files as on the host. The test binaries and fixtures are
//! built on the host; a script written into `target/vm/` runs them as root inside, and its exit
//! code comes back through the shared repository.

use std::{
    collections::{BTreeSet, HashMap},
    ffi::OsString,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};

use crate::{agent, cmd, fixtures, paths::Paths, setup, test::SummaryFilter};

/// What `--vm` accepts, for the one error line about a kernel it cannot find.
const KERNELS: &str = "5.10 (Debian bullseye), 6.1 (bookworm), 6.12 (bookworm-backports), a \
                       linux-image-* package name (bookworm) or a path to a linux-image .deb";

/// Modules the initramfs loads, in this order (with what they depend on first): PCI virtio and
/// the 9p file system over it. Debian builds them as modules; a kernel with them built in
/// simply has no such files.
const MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// qemu is killed after this long (a guest that hangs never powers off; TCG is slow, see
/// `Accel`).
const TIMEOUT_SECONDS: u64 = 3 * 3600;

pub fn run(paths: &Paths, kernel: &str, extra: &[OsString]) -> anyhow::Result<()> {
    let kernel = Kernel::resolve(paths, kernel)?;
    setup::all(paths)?;
    let unpacked = kernel.unpack(paths)?;
    let initramfs = initramfs(&unpacked)?;
    let bin = agent::build(paths)?;
    let fixtures = fixtures::build(paths)?;
    let split = split_args(extra);
    let binaries = build_tests(paths, &split.cargo)?;
    if binaries.is_empty() {
        bail!("cargo test selected no test binary for the VM (arguments: {extra:?})");
    }

    let out = paths.target().join("vm").join(&kernel.name);
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let rc_file = out.join("rc");
    let features = out.join("features");
    for stale in [&rc_file, &features] {
        let _ = fs::remove_file(stale);
    }
    let accel = Accel::detect();
    let env = [
        ("ALLOCWATCH_BIN", bin.as_os_str()),
        // The tests' deadlines for allocwatch's start (see xtask/tests/support): emulated, the
        // 6.1 verifier alone takes 30-60 s for the probes the host's checks in a second or two.
        (
            "ALLOCWATCH_TEST_STARTUP_FACTOR",
            std::ffi::OsStr::new(if accel == Accel::Tcg { "4" } else { "1" }),
        ),
        ("ALLOCWATCH_FIXTURES", fixtures.c.as_os_str()),
        ("ALLOCWATCH_GO_FIXTURES", fixtures.go.as_os_str()),
        (
            "ALLOCWATCH_GO_TOOLCHAINS",
            fixtures.go_toolchains.as_os_str(),
        ),
    ];
    let script = out.join("run.sh");
    fs::write(
        &script,
        guest_script(&env, &binaries, &split.binary, &rc_file, &features),
    )
    .with_context(|| format!("writing {}", script.display()))?;

    if let Some(why) = accel.note() {
        eprintln!("x: {why}");
    }
    let log = out.join("log");
    let shared = [paths.root.clone(), paths.cache.clone()];
    let mut qemu = qemu_command(accel, &unpacked.vmlinuz, &initramfs, &script, &shared)?;
    let summary = run_logged(&mut qemu, &log)?;
    println!(
        "\n==== test summary: kernel {} ({}) ====",
        unpacked.release, kernel.package
    );
    for line in &summary {
        println!("{line}");
    }
    if let Ok(line) = fs::read_to_string(&features) {
        println!("{}", line.trim());
    }
    println!("log: {}", log.display());
    let rc = fs::read_to_string(&rc_file).map_err(|_| {
        anyhow!(
            "the VM ended without a result (no {}): it did not boot or was killed; see {}",
            rc_file.display(),
            log.display()
        )
    })?;
    match rc.trim() {
        "0" => Ok(()),
        rc => bail!(
            "tests failed inside the VM on {} (exit {rc})",
            unpacked.release
        ),
    }
}

/// A kernel package and where apt finds it.
struct Kernel {
    /// Directory name under the caches: the package name, or the .deb's file stem.
    name: String,
    /// `linux-image-6.1.0-57-amd64`, or the .deb's path.
    package: String,
    deb: Option<PathBuf>,
    suite: &'static str,
}

impl Kernel {
    /// `5.10`, `6.1` and `6.12` are Debian's `linux-image-amd64` of bullseye, bookworm and
    /// bookworm-backports (whatever version that metapackage currently names); anything else
    /// must name a package or a .deb.
    fn resolve(paths: &Paths, arg: &str) -> anyhow::Result<Self> {
        let deb = Path::new(arg);
        if arg.ends_with(".deb") {
            if !deb.is_file() {
                bail!("no kernel package {arg}: the file does not exist");
            }
            let name = deb
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Ok(Self {
                name,
                package: arg.to_owned(),
                deb: Some(deb.to_path_buf()),
                suite: "",
            });
        }
        let (suite, package) = match arg {
            "5.10" => ("bullseye", None),
            "6.1" => ("bookworm", None),
            "6.12" => ("bookworm-backports", None),
            p if p.starts_with("linux-image-") => ("bookworm", Some(p.to_owned())),
            _ => bail!("no kernel `{arg}` for --vm: it takes {KERNELS}"),
        };
        let apt = Apt::new(paths, suite)?;
        let package = match package {
            Some(p) => p,
            None => apt.metapackage_target("linux-image-amd64")?,
        };
        Ok(Self {
            name: package.clone(),
            package,
            deb: None,
            suite,
        })
    }

    /// The package unpacked (`dpkg-deb -x`) into the cache, once.
    fn unpack(&self, paths: &Paths) -> anyhow::Result<Unpacked> {
        let dir = paths.cache.join("vm").join(&self.name);
        let done = dir.join(".unpacked");
        if !done.exists() {
            let deb = match &self.deb {
                Some(deb) => deb.clone(),
                None => Apt::new(paths, self.suite)?.download(&self.package)?,
            };
            let _ = fs::remove_dir_all(dir.join("root"));
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            cmd::run(
                Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(&deb)
                    .arg(dir.join("root")),
            )?;
            fs::write(&done, "").with_context(|| format!("writing {}", done.display()))?;
        }
        Unpacked::find(&dir.join("root"))
    }
}

/// apt with its own package lists for one Debian suite under `~/.cache/allocwatch/vm/apt/`,
/// so that backports never enter the machine's own apt sources.
struct Apt {
    suite: String,
    options: Vec<String>,
    debs: PathBuf,
}

impl Apt {
    fn new(paths: &Paths, suite: &str) -> anyhow::Result<Self> {
        let dir = paths.cache.join("vm/apt").join(suite);
        let lists = dir.join("lists");
        fs::create_dir_all(lists.join("partial"))
            .with_context(|| format!("creating {}", lists.display()))?;
        let sources = dir.join("sources.list");
        // bookworm's kernel is updated in bookworm-security (and -updates) between point
        // releases: without them the metapackage names an older kernel.
        let suites: &[(&str, String)] = &if matches!(suite, "bookworm" | "bullseye") {
            vec![
                ("debian", format!("{suite} {suite}-updates")),
                ("debian-security", format!("{suite}-security")),
            ]
        } else {
            vec![("debian", suite.to_owned())]
        };
        let list: String = suites
            .iter()
            .flat_map(|(archive, names)| names.split(' ').map(move |n| (archive, n)))
            .map(|(archive, name)| {
                format!(
                    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                     http://deb.debian.org/{archive} {name} main\n"
                )
            })
            .collect();
        fs::write(&sources, list).with_context(|| format!("writing {}", sources.display()))?;
        let options = [
            format!("Dir::Etc::sourcelist={}", sources.display()),
            "Dir::Etc::sourceparts=-".to_owned(),
            format!("Dir::State::Lists={}", lists.display()),
            // No binary cache of the lists (it would be the machine's own).
            "Dir::Cache::pkgcache=".to_owned(),
            "Dir::Cache::srcpkgcache=".to_owned(),
            // Downloads into the cache as root, not as the sandbox user _apt.
            "APT::Sandbox::User=root".to_owned(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_owned(), o])
        .collect();
        let apt = Self {
            suite: suite.to_owned(),
            options,
            debs: paths.cache.join("vm/debs"),
        };
        let fresh = fs::read_dir(&lists).is_ok_and(|mut d| {
            d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().contains("_Packages")))
        });
        if !fresh {
            cmd::run(apt.command("apt-get").args(["update", "-qq"]))?;
        }
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.args(&self.options)
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    /// The `linux-image-<version>-amd64` a metapackage depends on.
    fn metapackage_target(&self, meta: &str) -> anyhow::Result<String> {
        let out = cmd::stdout_if_ok(self.command("apt-cache").args(["depends", meta]))
            .ok_or_else(|| anyhow!("`apt-cache depends {meta}` failed"))?;
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("{meta} names no linux-image package:\n{out}"))
    }

    fn download(&self, package: &str) -> anyhow::Result<PathBuf> {
        fs::create_dir_all(&self.debs)
            .with_context(|| format!("creating {}", self.debs.display()))?;
        let before = debs_of(&self.debs, package);
        if let Some(deb) = before.first() {
            return Ok(deb.clone());
        }
        let mut download = self.command("apt-get");
        download
            .args(["download", "-qq", package])
            .current_dir(&self.debs);
        if cmd::run(&mut download).is_err() {
            bail!(
                "no kernel package {package} in Debian {}: --vm takes {KERNELS}",
                self.suite
            );
        }
        debs_of(&self.debs, package)
            .into_iter()
            .next()
            .ok_or_else(|| {
                anyhow!(
                    "apt-get download {package} left no .deb in {}",
                    self.debs.display()
                )
            })
    }
}

fn debs_of(dir: &Path, package: &str) -> Vec<PathBuf> {
    let prefix = format!("{package}_");
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
                && p.extension().is_some_and(|e| e == "deb")
        })
        .collect()
}

/// An unpacked kernel package: its image and its modules.
struct Unpacked {
    /// `uname -r` of the kernel, e.g. `6.1.0-57-amd64`.
    release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

impl Unpacked {
    fn find(root: &Path) -> anyhow::Result<Self> {
        let boot = root.join("boot");
        let vmlinuz = fs::read_dir(&boot)
            .with_context(|| format!("listing {} (not a kernel package?)", boot.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .ok_or_else(|| anyhow!("no vmlinuz-* in {}", boot.display()))?;
        let release = vmlinuz
            .file_name()
            .and_then(|n| n.to_str()?.strip_prefix("vmlinuz-"))
            .unwrap_or_default()
            .to_owned();
        let modules = root.join("lib/modules").join(&release);
        Ok(Self {
            release,
            vmlinuz,
            modules,
        })
    }
}

/// Writes `initramfs.cpio` next to the kernel: busybox, the 9p modules and `/init`.
fn initramfs(kernel: &Unpacked) -> anyhow::Result<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    let busybox_bytes = fs::read(busybox)
        .with_context(|| format!("reading {} (apt package busybox-static)", busybox.display()))?;
    let modules = module_load_order(&kernel.modules, MODULES)?;
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        cpio.dir(dir);
    }
    cpio.file("bin/busybox", 0o755, &busybox_bytes);
    let mut order = String::new();
    for path in &modules {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".xz").to_owned())
            .unwrap_or_default();
        let bytes = read_module(path)?;
        cpio.file(&format!("modules/{name}"), 0o644, &bytes);
        order.push_str(&name);
        order.push('\n');
    }
    cpio.file("modules/order", 0o644, order.as_bytes());
    cpio.file("init", 0o755, INIT.as_bytes());
    let out = kernel
        .vmlinuz
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .unwrap_or(Path::new("."))
        .join("initramfs.cpio");
    fs::write(&out, cpio.finish()).with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

/// The initramfs's `/init`: load the modules, mount the host's `/` (read-only) and the shares
/// named on the command line (`allocwatch.rw=PATH,PATH`, read-write, 9p tags rw0, rw1, …), a
/// tmpfs on /tmp, /run and /root, and run `allocwatch.run=SCRIPT` as the new root's init.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "init: insmod $m failed"; done
for a in $(cat /proc/cmdline); do
    case "$a" in
        allocwatch.run=*) run="${a#allocwatch.run=}" ;;
        allocwatch.rw=*) rw="${a#allocwatch.rw=}" ;;
    esac
done
o=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$o,ro,cache=loose" hostroot /newroot || { echo "init: no host root"; poweroff -f; }
for d in tmp run root; do mount -t tmpfs "$d" "/newroot/$d"; done
i=0
for p in $(echo "$rw" | tr , ' '); do
    mkdir -p "/newroot$p"
    mount -t 9p -o "$o" "rw$i" "/newroot$p" || echo "init: cannot mount $p"
    i=$((i + 1))
done
for d in proc sys dev; do mount --move "/$d" "/newroot/$d"; done
exec switch_root /newroot /bin/sh "$run"
"#;

/// `names` and everything they depend on (`depends=` in each module's `.modinfo`), dependencies
/// first. A name with no module file is taken as built in.
fn module_load_order(dir: &Path, names: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = HashMap::new();
    index_modules(dir, &mut files)?;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in names {
        visit_module(name, &files, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn index_modules(dir: &Path, files: &mut HashMap<String, PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, files)?;
        } else if let Some(name) = path.file_name().and_then(|n| {
            let n = n.to_str()?;
            n.strip_suffix(".ko").or_else(|| n.strip_suffix(".ko.xz"))
        }) {
            files.insert(name.replace('-', "_"), path);
        }
    }
    Ok(())
}

fn visit_module(
    name: &str,
    files: &HashMap<String, PathBuf>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let key = name.replace('-', "_");
    if !seen.insert(key.clone()) {
        return Ok(());
    }
    let Some(path) = files.get(&key) else {
        return Ok(());
    };
    let bytes = read_module(path)?;
    for dep in module_depends(&bytes) {
        visit_module(&dep, files, seen, order)?;
    }
    order.push(path.clone());
    Ok(())
}

/// A module's bytes: Debian compresses them with xz from 6.x on (`.ko.xz`), which busybox's
/// insmod cannot read, so they go into the initramfs decompressed.
fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .with_context(|| format!("starting xz -dc {}", path.display()))?;
        if !out.status.success() {
            bail!("xz -dc {} failed ({})", path.display(), out.status);
        }
        return Ok(out.stdout);
    }
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The `depends=a,b` entry of a module's `.modinfo` section.
fn module_depends(ko: &[u8]) -> Vec<String> {
    use object::{Object as _, ObjectSection as _};
    let Ok(file) = object::File::parse(ko) else {
        return Vec::new();
    };
    let Some(data) = file.section_by_name(".modinfo").and_then(|s| s.data().ok()) else {
        return Vec::new();
    };
    data.split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|deps| deps.split(|&b| b == b','))
        .filter(|d| !d.is_empty())
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .collect()
}

/// A `newc` cpio archive (what the kernel unpacks as an initramfs), uncompressed.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | mode, data);
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0,
            0,
            0,
            0,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// Test arguments split between `cargo test --no-run` (target selection: `--test go`, `-p x`)
/// and the test binaries (name filters, everything after `--`).
#[derive(Debug, PartialEq)]
struct SplitArgs {
    cargo: Vec<OsString>,
    binary: Vec<OsString>,
}

fn split_args(args: &[OsString]) -> SplitArgs {
    const WITH_VALUE: &[&str] = &[
        "--test",
        "-p",
        "--package",
        "--bin",
        "--example",
        "--bench",
        "--features",
        "-F",
        "--exclude",
        "-j",
        "--jobs",
        "--profile",
        "--target",
    ];
    let mut split = SplitArgs {
        cargo: Vec::new(),
        binary: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let s = arg.to_string_lossy();
        if s == "--" {
            split.binary.extend(it.by_ref().cloned());
        } else if s.starts_with('-') {
            split.cargo.push(arg.clone());
            if WITH_VALUE.contains(&s.as_ref())
                && let Some(value) = it.next()
            {
                split.cargo.push(value.clone());
            }
        } else {
            split.binary.push(arg.clone());
        }
    }
    split
}

/// A test binary and the package directory cargo would run it in.
struct TestBinary {
    path: PathBuf,
    dir: PathBuf,
}

/// `cargo test --no-run` with the selection (every integration test when none is given); the
/// executables it built.
fn build_tests(paths: &Paths, selection: &[OsString]) -> anyhow::Result<Vec<TestBinary>> {
    let mut cargo = cmd::cargo(paths);
    cargo
        .args([
            "test",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .args([
            "--workspace",
            "--exclude",
            "probe-ebpf",
            "--exclude",
            "allocwatch-fuzz",
        ]);
    if selection.is_empty() {
        cargo.args(["--test", "*"]);
    }
    cargo.args(selection).stdout(Stdio::piped());
    eprintln!("+ {}", cmd::show(&cargo));
    let out = cargo
        .spawn()
        .and_then(|c| c.wait_with_output())
        .context("starting cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed ({})", out.status);
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(manifest)) =
            (msg["executable"].as_str(), msg["manifest_path"].as_str())
        else {
            continue;
        };
        binaries.push(TestBinary {
            path: PathBuf::from(exe),
            dir: Path::new(manifest)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        });
    }
    Ok(binaries)
}

/// The script the VM runs as its init (through `switch_root`): the kernel file systems the tests
/// use, loopback up, each test binary in its package directory, the exit code into `rc`, power
/// off.
fn guest_script(
    env: &[(&str, &std::ffi::OsStr)],
    binaries: &[TestBinary],
    args: &[OsString],
    rc: &Path,
    features: &Path,
) -> String {
    let q = |s: &std::ffi::OsStr| shell_quote(&s.to_string_lossy());
    let mut s = String::from(
        "#!/bin/sh\n\
         # Written by `./x test --vm` (xtask/src/vm.rs); runs as the VM's init.\n\
         mount -t tracefs nodev /sys/kernel/tracing\n\
         mount -t debugfs nodev /sys/kernel/debug\n\
         mount -t cgroup2 nodev /sys/fs/cgroup\n\
         mount -t bpf nodev /sys/fs/bpf\n\
         mkdir -p /dev/pts /dev/shm && mount -t devpts nodev /dev/pts && mount -t tmpfs nodev /dev/shm\n\
         ip link set lo up\n\
         ulimit -l unlimited\n\
         export HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
    );
    for (k, v) in env {
        s.push_str(&format!("export {k}={}\n", q(v)));
    }
    // The agent's `kernel features:` line (printed before it loads anything) for the README's
    // kernel matrix; `top` is stopped as soon as the line is there (a pipe into `grep -m1`
    // would wait for `top` itself: the probes' load, then the whole `sleep`, a minute per run
    // under TCG).
    s.push_str(&format!(
        "echo \"kernel: $(uname -r)\"\n\
         \"$ALLOCWATCH_BIN\" --log-level info top -- /bin/sleep 60 > /tmp/features.log 2>&1 &\n\
         top=$!\n\
         for _ in $(seq 600); do\n\
         \x20   grep -q 'kernel features' /tmp/features.log && break\n\
         \x20   kill -0 $top 2>/dev/null || break\n\
         \x20   sleep 0.1\n\
         done\n\
         kill $top 2>/dev/null; wait $top\n\
         grep -m1 'kernel features' /tmp/features.log > {}\n\
         rc=0\n",
        q(features.as_os_str())
    ));
    let mut args: Vec<String> = args.iter().map(|a| q(a)).collect();
    // The console is a terminal: without this the results are colored, and the summary's
    // `… FAILED` lines are not found.
    if !args.iter().any(|a| a.starts_with("'--color")) {
        args.splice(0..0, ["--color".to_owned(), "never".to_owned()]);
    }
    for b in binaries {
        let (path, dir) = (q(b.path.as_os_str()), q(b.dir.as_os_str()));
        s.push_str(&format!(
            "echo \"     Running {path}\"\n\
             (cd {dir} && CARGO_MANIFEST_DIR={dir} {path} {}) || rc=1\n",
            args.join(" ")
        ));
    }
    s.push_str(&format!(
        "echo $rc > {}\nsync\necho o > /proc/sysrq-trigger\nsleep 60\n",
        q(rc.as_os_str())
    ));
    s
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// How qemu runs the guest.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Accel {
    Kvm,
    /// Emulation: this machine's /dev/kvm is PVM (`kvm_pvm`), which boots only kernels built as
    /// PVM guests; Debian's kernel hangs there right after decompression.
    Tcg,
}

impl Accel {
    fn detect() -> Self {
        let hardware = ["kvm_intel", "kvm_amd"]
            .iter()
            .any(|m| Path::new("/sys/module").join(m).exists());
        if hardware && Path::new("/dev/kvm").exists() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    fn note(self) -> Option<&'static str> {
        (self == Accel::Tcg).then_some(
            "no hardware KVM here (no kvm_intel/kvm_amd module; a PVM /dev/kvm cannot boot a \
             stock kernel): the VM is emulated (TCG), several times slower",
        )
    }
}

fn qemu_command(
    accel: Accel,
    vmlinuz: &Path,
    initramfs: &Path,
    script: &Path,
    shared: &[PathBuf],
) -> anyhow::Result<Command> {
    let mut rw = Vec::new();
    for p in shared {
        let s = p.to_str().filter(|s| !s.contains([' ', ',', '\t', '\n']));
        rw.push(s.ok_or_else(|| {
            anyhow!(
                "{} cannot be shared with the VM (spaces or commas in the path)",
                p.display()
            )
        })?);
    }
    let mut c = Command::new("timeout");
    c.args([
        "-k",
        "10",
        &TIMEOUT_SECONDS.to_string(),
        "qemu-system-x86_64",
    ]);
    match accel {
        Accel::Kvm => c.args(["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => c.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
    };
    c.args([
        "-smp",
        "2",
        "-m",
        "4G",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
    ])
    .arg("-kernel")
    .arg(vmlinuz)
    .arg("-initrd")
    .arg(initramfs)
    .arg("-append")
    .arg(format!(
        "console=ttyS0 quiet panic=-1 rdinit=/init allocwatch.run={} allocwatch.rw={}",
        script.display(),
        rw.join(",")
    ))
    .args([
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ]);
    for (i, p) in rw.iter().enumerate() {
        c.arg("-virtfs").arg(format!(
            "local,path={p},mount_tag=rw{i},security_model=none,multidevs=remap"
        ));
    }
    c.stdin(Stdio::null());
    Ok(c)
}

/// Runs qemu with its console (stdout and stderr merged) echoed, written to `log` and filtered
/// into the summary lines of `./x test`.
fn run_logged(qemu: &mut Command, log: &Path) -> anyhow::Result<Vec<String>> {
    eprintln!("+ {}", cmd::show(qemu));
    let mut file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    qemu.stdout(writer.try_clone().context("duplicating a pipe")?)
        .stderr(writer);
    let mut child = qemu
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::show(qemu)))?;
    qemu.stdout(Stdio::null()).stderr(Stdio::null());
    let mut filter = SummaryFilter::default();
    let mut summary = Vec::new();
    let mut reader = BufReader::new(reader);
    let mut raw = Vec::new();
    while reader
        .read_until(b'\n', &mut raw)
        .context("reading the VM's console")?
        > 0
    {
        let text = String::from_utf8_lossy(&raw);
        let line = text.trim_end_matches(['\n', '\r']);
        println!("{line}");
        writeln!(file, "{line}").with_context(|| format!("writing {}", log.display()))?;
        summary.extend(filter.keep(line));
        raw.clear();
    }
    let status = child.wait().context("waiting for qemu")?;
    if !status.success() {
        eprintln!("x: qemu exited with {status}");
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn args_split_between_cargo_and_the_test_binaries() {
        let split = split_args(&os(&["--test", "go", "map_", "--", "--nocapture"]));
        assert_eq!(split.cargo, os(&["--test", "go"]));
        assert_eq!(split.binary, os(&["map_", "--nocapture"]));
        let split = split_args(&os(&["--lib", "-p", "allocwatch"]));
        assert_eq!(split.cargo, os(&["--lib", "-p", "allocwatch"]));
        assert!(split.binary.is_empty());
    }

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"#!/bin/sh\n");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        // mode field (second) of the first entry: regular file 0755.
        assert_eq!(&out[14..22], b"000081ed");
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
