//! Idempotent machine setup: every step checks first and does nothing when already done.
//! The pinned toolchain itself is installed by `./x` (this binary needs it to exist).

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

use crate::{
    cmd,
    host::{dpkg_installed, require_root},
    paths::Paths,
};

/// bpf-linker release built into the cache. Its LLVM feature follows the pinned rustc.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the build and tests use: gcc, binutils (`nm`, `objcopy`, `strip`) and
/// xz-utils (MiniDebugInfo) for the C fixtures, bpftrace as an independent peer that counts the
/// fixture's libc calls, bpftool to list the BPF programs and links the soak checks for
/// leftovers.
const APT_PACKAGES: &[&str] = &[
    "gcc",
    "binutils",
    "xz-utils",
    "bpftrace",
    "bpftool",
    // The allocator fixtures (xtask/src/fixtures.rs, build_allocators).
    "libjemalloc-dev",
    "libgoogle-perftools-dev",
    "libmimalloc-dev",
    "musl-tools",
    // A real program on jemalloc (xtask/tests/allocators.rs, redis_server_on_jemalloc): Debian's
    // redis-server links libjemalloc2; redis-cli (redis-tools) drives it.
    "redis-server",
    // The C++ growth fixture (xtask/tests/growth.rs) and the unwinder's peer (unwind.rs).
    "g++",
    "gdb",
    // The Python growth test (xtask/tests/growth.rs): Debian's python3.11 has its static
    // functions (dictresize, list_resize) only in this package's build-id debug file.
    "python3.11-dbg",
    // `./x build --target aarch64`: linker and C compiler of the cross build, and the arm64
    // C fixture and glibc of the arm64 unit tests (agent/src/target/libc/tests.rs).
    "gcc-aarch64-linux-gnu",
];

/// `./x test --vm` (xtask/src/vm.rs): qemu, and busybox for the VM's initramfs. Installed
/// without recommends (qemu's pull in a GUI stack).
const VM_APT_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static"];

const TRACEFS: &str = "/sys/kernel/tracing";

/// The Rust target of `./x build --target aarch64` (xtask/src/agent.rs).
pub const AARCH64_TRIPLE: &str = "aarch64-unknown-linux-gnu";

/// cargo-fuzz: `./x test` runs the fuzz targets of fuzz/ with it (`./x fuzz` for longer).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// cargo-deny: advisories, licenses, duplicate versions and sources (deny.toml) in `./x test`.
pub const CARGO_DENY_VERSION: &str = "0.20.2";

/// Everything: build tools, tracefs, apt packages, the Go toolchains of the Go fixtures.
pub fn all(paths: &Paths) -> anyhow::Result<()> {
    build_tools(paths)?;
    cargo_tool(paths, "cargo-deny", CARGO_DENY_VERSION)?;
    // The fuzzing step says why it is skipped when cargo-fuzz is missing: not a reason to stop.
    if let Err(e) = cargo_tool(paths, "cargo-fuzz", CARGO_FUZZ_VERSION) {
        eprintln!("x: warning: cargo-fuzz {CARGO_FUZZ_VERSION} could not be installed: {e:#}");
    }
    tracefs()?;
    rust_target(paths, AARCH64_TRIPLE)?;
    // Before the Go toolchains: Debian's Go 1.19 then installs from a fresh package index.
    apt_packages()?;
    install_missing(VM_APT_PACKAGES, &["--no-install-recommends"])?;
    crate::go::ensure_toolchains(&paths.cache)?;
    Ok(())
}

/// What `cargo build` needs beyond the toolchain: bpf-linker, built against the pinned nightly's
/// own libLLVM so the LLVM versions match exactly (a plain `cargo install bpf-linker` finds
/// Debian's LLVM 14 and fails).
pub fn build_tools(paths: &Paths) -> anyhow::Result<()> {
    let llvm = NightlyLlvm::probe(paths)?;
    let stamp_file = paths.cache.join("tools/bpf-linker.stamp");
    let stamp = format!("bpf-linker {BPF_LINKER_VERSION} {}\n", llvm.lib_name);
    if bpf_linker_ok(paths) && fs::read_to_string(&stamp_file).ok().as_deref() == Some(&stamp) {
        return Ok(());
    }
    let prefix = paths.cache.join("llvm");
    link_llvm(&llvm, &prefix)?;
    cmd::run(
        cmd::cargo(paths)
            .args(["install", "bpf-linker", "--force", "--locked"])
            .args(["--version", BPF_LINKER_VERSION, "--no-default-features"])
            .args(["--features", &format!("llvm-{}", llvm.major)])
            .arg("--root")
            .arg(paths.cache.join("tools"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !bpf_linker_ok(paths) {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` does not report {BPF_LINKER_VERSION}"
        );
    }
    fs::write(&stamp_file, stamp).with_context(|| format!("writing {}", stamp_file.display()))
}

/// What a cross build for `triple` needs: the Rust standard library for it (rustup does not
/// install targets on demand: RUSTUP_AUTO_INSTALL=0 here) and Debian's cross gcc.
pub fn cross_tools(paths: &Paths, triple: &str) -> anyhow::Result<()> {
    rust_target(paths, triple)?;
    install_missing(&["gcc-aarch64-linux-gnu"], &[])
}

/// `rustup target add TRIPLE` for the pinned toolchain, unless it is installed.
fn rust_target(paths: &Paths, triple: &str) -> anyhow::Result<()> {
    let installed = cmd::stdout_if_ok(Command::new("rustup").args([
        "target",
        "list",
        "--installed",
        "--toolchain",
        &paths.channel,
    ]));
    if installed.is_some_and(|list| list.lines().any(|l| l.trim() == triple)) {
        return Ok(());
    }
    cmd::run(Command::new("rustup").args(["target", "add", "--toolchain", &paths.channel, triple]))
}

/// The pinned nightly's LLVM: major version and the shared library in its sysroot.
struct NightlyLlvm {
    major: String,
    lib_dir: PathBuf,
    /// e.g. `libLLVM.so.23.1-rust-1.101.0-nightly`
    lib_name: String,
}

impl NightlyLlvm {
    fn probe(paths: &Paths) -> anyhow::Result<Self> {
        let rustc = |args: &[&str]| {
            cmd::stdout_if_ok(
                Command::new("rustup")
                    .args(["run", &paths.channel, "rustc"])
                    .args(args),
            )
            .ok_or_else(|| anyhow!("rustc of {} does not run: run ./x first", paths.channel))
        };
        let version = rustc(&["-vV"])?;
        let major = version
            .lines()
            .find_map(|l| l.strip_prefix("LLVM version: "))
            .and_then(|v| v.split('.').next())
            .ok_or_else(|| anyhow!("no LLVM version in `rustc -vV`:\n{version}"))?
            .to_owned();
        let lib_dir = PathBuf::from(rustc(&["--print", "sysroot"])?.trim()).join("lib");
        let lib_name = fs::read_dir(&lib_dir)
            .with_context(|| format!("listing {}", lib_dir.display()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|n| n.starts_with("libLLVM.so."))
            .ok_or_else(|| anyhow!("no libLLVM.so.* in {}", lib_dir.display()))?;
        Ok(Self {
            major,
            lib_dir,
            lib_name,
        })
    }
}

/// PREFIX/lib/{libLLVM.so.<ver>, libLLVM.so} -> the nightly's library (bpf-linker's build script
/// links `-lLLVM` from `LLVM_PREFIX/lib`, and its rpath keeps pointing there).
fn link_llvm(llvm: &NightlyLlvm, prefix: &Path) -> anyhow::Result<()> {
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let target = llvm.lib_dir.join(&llvm.lib_name);
    for name in [llvm.lib_name.as_str(), "libLLVM.so"] {
        let link = lib.join(name);
        // Replace whatever is there: an older toolchain's link would point at a removed file.
        let _ = fs::remove_file(&link);
        symlink(&target, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(())
}

/// `cargo install KRATE --version VERSION` into the tool cache, unless that version is there
/// (`cargo-x --version` prints `cargo-x VERSION`).
fn cargo_tool(paths: &Paths, krate: &str, version: &str) -> anyhow::Result<()> {
    let installed = cmd::stdout_if_ok(Command::new(paths.tools_bin().join(krate)).arg("--version"));
    if installed.is_some_and(|v| v.split_whitespace().nth(1) == Some(version)) {
        return Ok(());
    }
    cmd::run(
        cmd::cargo(paths)
            .args([
                "install",
                krate,
                "--force",
                "--locked",
                "--version",
                version,
            ])
            .arg("--root")
            .arg(paths.cache.join("tools")),
    )
}

fn bpf_linker_ok(paths: &Paths) -> bool {
    cmd::stdout_if_ok(Command::new(paths.tools_bin().join("bpf-linker")).arg("--version"))
        .is_some_and(|v| v.split_whitespace().nth(1) == Some(BPF_LINKER_VERSION))
}

/// Mounts tracefs when /sys/kernel/tracing is empty (uprobes work without it, but the tests read
/// uprobe_events there to check that nothing is left behind).
pub fn tracefs() -> anyhow::Result<()> {
    let dir = Path::new(TRACEFS);
    let mounted = fs::read_dir(dir)
        .with_context(|| format!("listing {TRACEFS}"))?
        .next()
        .is_some();
    if mounted {
        return Ok(());
    }
    require_root("mount tracefs")?;
    cmd::run(Command::new("mount").args(["-t", "tracefs", "nodev", TRACEFS]))?;
    if !dir.join("uprobe_events").exists() {
        bail!("mounted tracefs on {TRACEFS}, but it has no uprobe_events (CONFIG_UPROBE_EVENTS?)");
    }
    Ok(())
}

/// Installs the missing ones of the build's and tests' Debian packages.
pub fn apt_packages() -> anyhow::Result<()> {
    install_missing(APT_PACKAGES, &[])
}

/// Installs missing Debian packages (one `apt-get update` first, only if something is missing).
fn install_missing(packages: &[&str], options: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root(&format!("apt-get install {}", missing.join(" ")))?;
    let apt = || {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    cmd::run(apt().args(["update", "-qq"]))?;
    cmd::run(
        apt()
            .args(["install", "-y", "-qq"])
            .args(options)
            .args(&missing),
    )
}
