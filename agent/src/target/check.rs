//! Is this a target allocwatch can trace? A process that is a kernel thread, a zombie or a
//! thread of another process, and a command that is not a program the kernel can run, are
//! refused here in the user's terms, before anything is loaded or attached.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
};

use super::TargetError;
use crate::procfs;

/// Refuses a `--pid` that names no user-space process allocwatch can trace.
pub fn process(pid: u32) -> Result<(), TargetError> {
    let gone = || TargetError::NoSuchProcess { pid };
    let st = procfs::stat(pid).ok_or_else(gone)?;
    let tgid = procfs::tgid(pid).ok_or_else(gone)?;
    let comm = st.comm.clone();
    if st.flags & procfs::PF_KTHREAD != 0 {
        return Err(TargetError::KernelThread { pid, comm });
    }
    if st.exited() {
        return Err(TargetError::Zombie { pid, comm });
    }
    if tgid != pid {
        // The thread's own comm is its name; the user knows the process by the main thread's.
        let comm = procfs::comm(tgid).unwrap_or(comm);
        return Err(TargetError::Thread {
            tid: pid,
            tgid,
            comm,
        });
    }
    Ok(())
}

/// Refuses a command (already found in `PATH`) that the kernel cannot run as a program: a
/// text file without `#!`, a file that is not ELF, a truncated ELF file.
pub fn program(path: &Path) -> Result<(), TargetError> {
    let mut head = Vec::with_capacity(512);
    fs::File::open(path)
        .and_then(|f| f.take(512).read_to_end(&mut head))
        .map_err(|source| TargetError::Io {
            path: path.to_owned(),
            source,
        })?;
    if head.starts_with(b"#!") {
        return Ok(());
    }
    if !head.starts_with(b"\x7fELF") {
        return Err(if looks_like_text(&head) {
            TargetError::ScriptWithoutShebang {
                path: path.to_owned(),
            }
        } else {
            TargetError::NotAProgram {
                path: path.to_owned(),
                magic: head
                    .iter()
                    .take(4)
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            }
        });
    }
    let len = fs::metadata(path)
        .map_err(|source| TargetError::Io {
            path: path.to_owned(),
            source,
        })?
        .len();
    if let Some(need) = elf64_extent(&head)
        && need > len
    {
        return Err(TargetError::TruncatedElf {
            path: path.to_owned(),
            len,
            need,
        });
    }
    Ok(())
}

/// Text: no NUL byte and almost only printable characters (what a shell would run).
fn looks_like_text(head: &[u8]) -> bool {
    !head.is_empty()
        && !head.contains(&0)
        && head
            .iter()
            .filter(|&&b| b < 0x20 && !b"\t\n\r\x0c".contains(&b))
            .count()
            == 0
}

/// How long a little-endian ELF64 file must be to hold the program and section header tables
/// its header describes; None when the header itself is not a 64-bit little-endian one.
fn elf64_extent(head: &[u8]) -> Option<u64> {
    if head.get(4) != Some(&2) || head.get(5) != Some(&1) {
        return None;
    }
    let u16_at = |o: usize| {
        Some(u64::from(u16::from_le_bytes(
            head.get(o..o + 2)?.try_into().ok()?,
        )))
    };
    let u64_at = |o: usize| Some(u64::from_le_bytes(head.get(o..o + 8)?.try_into().ok()?));
    // An ELF64 header is 64 bytes.
    if head.len() < 64 {
        return Some(64);
    }
    let ph_end = u64_at(0x20)?.checked_add(u16_at(0x36)? * u16_at(0x38)?)?;
    let sh_end = u64_at(0x28)?.checked_add(u16_at(0x3a)? * u16_at(0x3c)?)?;
    Some(ph_end.max(sh_end))
}

/// The path a message shows for a command: as given, made relative-looking when it is in the
/// current directory (`./x.sh`), so that the suggested command can be pasted.
pub fn shown(path: &Path) -> PathBuf {
    if path.is_absolute() || path.starts_with(".") {
        path.to_owned()
    } else {
        Path::new(".").join(path)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn processes() {
        let me = std::process::id();
        process(me).unwrap();
        // Another thread of this test process.
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
        });
        let tid = rx.recv().unwrap();
        let err = process(tid).unwrap_err();
        assert!(
            matches!(err, TargetError::Thread { tgid, .. } if tgid == me),
            "{err}"
        );
        t.join().unwrap();
        // A zombie: our own child, exited and not yet reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        for _ in 0..500 {
            if procfs::is_zombie(pid) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let err = process(pid).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "process {pid} (true) is a zombie: it has exited and waits for its parent to \
                 reap it, so there is nothing left to trace"
            )
        );
        child.wait().unwrap();
    }

    #[test]
    fn programs() {
        let dir = std::env::temp_dir().join(format!("allocwatch-check-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            fs::write(&p, bytes).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        program(&write("shebang", b"#!/bin/sh\necho hi\n")).unwrap();
        let err = program(&write("script", b"echo hi\n")).unwrap_err();
        assert!(
            matches!(err, TargetError::ScriptWithoutShebang { .. }),
            "{err}"
        );
        let err = program(&write("bin", b"\x01\x02\x03\x04\x00rest")).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("it starts with bytes 01 02 03 04)"),
            "{err}"
        );
        let true_bin = fs::read("/bin/true").unwrap();
        program(&write("whole", &true_bin)).unwrap();
        let err = program(&write("cut", &true_bin[..3000])).unwrap_err();
        assert!(
            matches!(err, TargetError::TruncatedElf { len: 3000, .. }),
            "{err}"
        );
        let err = program(&write("header", &true_bin[..20])).unwrap_err();
        assert!(
            matches!(err, TargetError::TruncatedElf { need: 64, .. }),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(shown(Path::new("x.sh")), Path::new("./x.sh"));
        assert_eq!(shown(Path::new("/a/x.sh")), Path::new("/a/x.sh"));
    }
}
