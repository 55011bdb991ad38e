//! Deciding about one process: who it is (from /proc, or from its records once it is gone),
//! whether the selection takes it (registered) or not (ignored and denied in the kernel), and
//! attaching the files it runs.

use std::{collections::HashSet, fs, path::Path, sync::Arc, time::Instant};

use super::{LIBC_RETRIES, Proc, Registry, comm_text};
use crate::{
    daemon::{retained::Retained, select::Candidate, sweep::Fate},
    gostate::GoState,
    k8s::{cgroup, pods::PodMeta},
    model::ProcessLabels,
    probes::Probes,
    procfs,
    symbolize::SymbolizerHandle,
    target::{
        go::GoTarget,
        libc::Served,
        maps::{DevInode, MapEntry, read_maps},
        registry::{AttachFailure, Attacher as _, Kind, LOADERS, ProcessFiles, Target},
    },
};

/// What /proc says of a running process: what the selection looks at, and its labels.
struct Identity {
    exe: String,
    comm: String,
    cgroup_text: String,
    container: cgroup::ContainerRef,
    pod: Option<PodMeta>,
}

impl Identity {
    fn candidate(&self) -> Candidate<'_> {
        Candidate {
            comm: &self.comm,
            exe: &self.exe,
            cgroup: Some(cgroup_path(&self.cgroup_text)),
            namespace: self.pod.as_ref().map(|p| p.namespace.as_str()),
        }
    }
}

impl Registry {
    /// Registers `pid` if it is new (or a new process under a reused pid) and selected.
    pub fn ensure(&mut self, pid: u32, probes: &mut Probes, symbolizer: &SymbolizerHandle) {
        if pid == self.self_pid {
            return;
        }
        let Some(start_time) = procfs::start_time(pid) else {
            return;
        };
        if !self.is_new(pid, start_time) {
            return;
        }
        // A new process under a pid whose rows are still being swept: they are its own now.
        self.sweeper.cancel(pid);
        // Before anything the decision rests on: an exec after this read makes a denial
        // below stale in the kernel, and the exec's event classifies the new program.
        let stamp = exec_stamp(probes, pid);
        let Some(id) = self.identify(pid, start_time) else {
            return;
        };
        if self.selector.selects(&id.candidate()) {
            self.register(pid, start_time, stamp, id, probes, symbolizer);
        } else {
            self.reject(pid, start_time, stamp, id, probes);
        }
    }

    /// Whether `(pid, start_time)` is still to be decided about: neither registered nor
    /// ignored. A registered process under a reused pid is gone, and its rows are mixed with
    /// the new one's from now on.
    fn is_new(&mut self, pid: u32, start_time: u64) -> bool {
        if let Some(p) = self.procs.get(&pid) {
            if p.start_time == start_time {
                return false;
            }
            self.procs.remove(&pid);
            self.to_forget.insert(pid);
        }
        !self.ignored.contains(&(pid, start_time))
    }

    /// Who `pid` is; `None` without an executable. Kernel threads have none (ignored for
    /// good); a process that is exiting (its memory gone before it is a zombie) has none left
    /// either, but its records still name it (`ensure_seen`): ignoring it would drop them.
    fn identify(&mut self, pid: u32, start_time: u64) -> Option<Identity> {
        let Ok(exe) = procfs::exe(pid) else {
            if procfs::is_kernel_thread(pid) {
                self.ignored.insert((pid, start_time));
                self.ignored_pids.insert(pid);
            }
            return None;
        };
        let exe = exe.display().to_string();
        let comm = procfs::comm(pid).unwrap_or_default();
        let cgroup_text = procfs::cgroup(pid).unwrap_or_default();
        let container = cgroup::parse(&cgroup_text);
        let pod = self.pods.lookup(&container);
        Some(Identity {
            exe,
            comm,
            cgroup_text,
            container,
            pod,
        })
    }

    /// A running process the selection rejects: ignored, and denied in the kernel for the
    /// program of exec stamp `stamp`.
    fn reject(
        &mut self,
        pid: u32,
        start_time: u64,
        stamp: Option<u64>,
        id: Identity,
        probes: &mut Probes,
    ) {
        let Identity { comm, exe, .. } = id;
        log::debug!("pid {pid}: rejected (comm {comm:?}, exe {exe:?})");
        self.ignored.insert((pid, start_time));
        self.ignored_pids.insert(pid);
        // Without its stamp it stays traced: its rows are deleted as they are announced.
        if let Some(stamp) = stamp {
            self.deny(pid, stamp, probes);
        }
        // Its libc is probed all the same (once per file): a selected program that starts
        // later with this libc is then recorded from its first call, however briefly it
        // lives. Denied processes still take the uprobe trap of each call, and nothing more.
        let maps = read_maps(pid).unwrap_or_default();
        self.attach(pid, &comm, &maps, probes, &[Kind::Libc]);
    }

    /// A running process the selection takes: its files attached, registered, and admitted in
    /// the kernel for the program of exec stamp `stamp` (its rows are no longer held to the
    /// undecided limit).
    fn register(
        &mut self,
        pid: u32,
        start_time: u64,
        stamp: Option<u64>,
        id: Identity,
        probes: &mut Probes,
        symbolizer: &SymbolizerHandle,
    ) {
        let Identity {
            exe,
            comm,
            container,
            pod,
            ..
        } = id;
        // A reused pid of a denied process that exited since the last scan.
        self.undeny(pid, probes);
        // Without its stamp it stays undecided: stack detail past the limit is lost, counted.
        if let Some(stamp) = stamp
            && let Err(e) = probes.set_admitted(pid, Some(stamp))
        {
            log::debug!("admitting pid {pid}: {e}");
        }
        // One read of the memory map serves the libc search, the Go load bias and the
        // symbolizer's snapshot.
        let maps = read_maps(pid).unwrap_or_default();
        let (go, served) = self.attach(pid, &comm, &maps, probes, &LOADERS);
        self.load_unwind(pid, &maps);
        symbolizer.note_maps(pid, &maps);
        log::debug!("pid {pid}: selected (comm {comm:?}, exe {exe:?})");
        let labels = ProcessLabels {
            comm,
            exe,
            ..pod_labels(pod.as_ref())
        };
        self.procs.insert(
            pid,
            Proc {
                labels,
                container,
                start_time,
                exited_at: None,
                go: go.as_deref().map(GoState::new),
                libc_apis: served.as_ref().map(Served::apis),
                allocator: served.as_ref().map(Served::allocator),
                retained: Retained::default(),
            },
        );
    }

    /// Like [`Self::ensure`] for a process known from its events: one that already exited is
    /// still registered (as exited), named by the comm the probe recorded, so its counts are
    /// exported with a name instead of vanishing.
    pub fn ensure_seen(
        &mut self,
        pid: u32,
        comm: &[u8; 16],
        probes: &mut Probes,
        symbolizer: &SymbolizerHandle,
    ) {
        // Events come by the thousand on a busy node: known processes cost no /proc read.
        if self.procs.contains_key(&pid) {
            return;
        }
        if self.ignored_pids.contains(&pid) {
            // Recorded before it was denied (or the denylist is full).
            self.to_forget.insert(pid);
            return;
        }
        self.ensure(pid, probes, symbolizer);
        if self.procs.contains_key(&pid) || pid == self.self_pid {
            return;
        }
        // It has rows: unless it is selected below, they go.
        self.to_forget.insert(pid);
        if procfs::is_ending(pid) {
            self.admit_gone(pid, comm);
        }
    }

    /// A process that exited before /proc was read: classified by what the probe saw (its
    /// comm, the path of its exec), and its cgroup if it is a zombie still; with the cgroup
    /// unknown, cgroup and namespace rules do not match it. Selected, it is registered as
    /// exited and its rows are harvested.
    fn admit_gone(&mut self, pid: u32, comm: &[u8; 16]) {
        let comm = comm_text(comm);
        let exe = self.exec_paths.get(&pid).cloned().unwrap_or_default();
        let cgroup_text = procfs::cgroup(pid).filter(|t| !t.is_empty());
        let container = cgroup_text
            .as_deref()
            .map(cgroup::parse)
            .unwrap_or_default();
        let pod = cgroup_text
            .as_ref()
            .and_then(|_| self.pods.lookup(&container));
        let candidate = Candidate {
            comm: &comm,
            exe: &exe,
            cgroup: cgroup_text.as_deref().map(cgroup_path),
            namespace: pod.as_ref().map(|p| p.namespace.as_str()),
        };
        if !self.selector.selects(&candidate) {
            log::debug!("pid {pid}: gone, rejected by its records (comm {comm:?}, exe {exe:?})");
            return;
        }
        // A Go program that ran through before its exec was read: its file was probed (its
        // events are coming), so its Go state is that file's; without it the growth it
        // recorded would be dropped. Only an absolute exec path names the file for sure (a
        // relative one was resolved in the process's directory).
        let go = Path::new(&exe)
            .is_absolute()
            .then(|| fs::metadata(&exe).ok())
            .flatten()
            .and_then(|m| self.targets.go_target(DevInode::from_metadata(&m)));
        log::debug!(
            "pid {pid}: gone, selected by its records (comm {comm:?}, exe {exe:?}, Go {})",
            go.is_some()
        );
        self.to_forget.remove(&pid);
        self.procs.insert(
            pid,
            Proc {
                labels: ProcessLabels {
                    comm,
                    exe,
                    ..pod_labels(pod.as_ref())
                },
                container,
                // A zombie still has its start time: later scans must see the same process.
                start_time: procfs::start_time(pid).unwrap_or(0),
                exited_at: Some(Instant::now()),
                go: go.as_deref().map(GoState::new),
                libc_apis: None,
                allocator: None,
                retained: Retained::default(),
            },
        );
        // The keys stay noted: its exec may still be in the ring (`exec_seen`).
        let keys = self.image_sites.get(&pid).map(|s| s.keys.clone());
        self.sweeper
            .pid(pid, Fate::Harvest, keys.unwrap_or_default());
    }

    /// Like [`Self::ensure`] for a process that recorded rows (a Go event, which names no comm):
    /// unless it is selected, they go.
    pub fn ensure_rows(&mut self, pid: u32, probes: &mut Probes, symbolizer: &SymbolizerHandle) {
        if !self.ignored_pids.contains(&pid) {
            self.ensure(pid, probes, symbolizer);
        }
        if !self.procs.contains_key(&pid) && pid != self.self_pid {
            self.to_forget.insert(pid);
        }
    }

    /// Adds a rejected process to the kernel's denylist for the program of exec stamp
    /// `stamp`; a failure (a full map) is counted.
    fn deny(&mut self, pid: u32, stamp: u64, probes: &mut Probes) {
        match probes.set_listed(pid, Some(stamp)) {
            Ok(()) => {
                self.denied.insert(pid);
            }
            Err(e) => {
                // It stays traced: its rows are deleted as they are announced, never exported.
                let why = match Probes::failure(&e) {
                    f if f.is_full() => AttachFailure::DenylistFull,
                    f => f,
                };
                log::warn!("denying pid {pid}: {e}");
                self.targets.failed(why);
            }
        }
    }

    /// Takes `pid` off the denylist, if it is on it.
    pub(super) fn undeny(&mut self, pid: u32, probes: &mut Probes) {
        if self.denied.remove(&pid) {
            let _ = probes.set_listed(pid, None);
        }
    }

    /// Looks again for the libc of the processes that had none mapped when they were
    /// registered (see `libc_retry`).
    pub(super) fn retry_libc(&mut self, alive: &HashSet<u32>, probes: &mut Probes) {
        let pids: Vec<u32> = self.libc_retry.keys().copied().collect();
        for pid in pids {
            if !alive.contains(&pid) {
                self.libc_retry.remove(&pid);
                continue;
            }
            let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|s| s.trim_end().to_string())
                .unwrap_or_default();
            let maps = read_maps(pid).unwrap_or_default();
            // A registered process's libstdc++ is mapped with its libc (growth probes).
            let kinds: &[Kind] = if self.procs.contains_key(&pid) {
                &[Kind::Libc, Kind::Sym]
            } else {
                &[Kind::Libc]
            };
            self.attach(pid, &comm, &maps, probes, kinds);
            // Read at its exec, it had no libraries yet: their tables now.
            if self.procs.contains_key(&pid) {
                self.load_unwind(pid, &maps);
            }
        }
    }

    /// Attaches the files `pid` runs that are not probed yet, of the `kinds` asked for: those
    /// serving its malloc family, its executable when it is a Go program, and the files with
    /// C++/Rust growth functions (its executable, libstdc++). Returns its Go target and the
    /// files serving its malloc family, if any (and notes their APIs and allocator on the
    /// process when it is registered already).
    fn attach(
        &mut self,
        pid: u32,
        comm: &str,
        maps: &[MapEntry],
        probes: &mut Probes,
        kinds: &[Kind],
    ) -> (Option<Arc<GoTarget>>, Option<Served>) {
        let proc = ProcessFiles { pid, comm, maps };
        let found = self.targets.attach_process(probes, &proc, kinds);
        // In resolution order, the file serving malloc first (`Targets::attach_process`).
        let served = Served::new(
            found
                .iter()
                .filter_map(|t| match t {
                    Target::Libc(l) => Some(Arc::clone(l)),
                    Target::Go(_) | Target::Sym(_) => None,
                })
                .collect(),
        );
        if let Some(served) = &served {
            log::debug!(
                "pid {pid}: allocator {} ({})",
                served.allocator(),
                served.display_paths()
            );
            self.libc_retry.remove(&pid);
            if let Some(p) = self.procs.get_mut(&pid) {
                p.libc_apis = Some(served.apis());
                p.allocator = Some(served.allocator());
            }
        } else {
            let tries = self.libc_retry.entry(pid).or_default();
            *tries += 1;
            log::debug!("pid {pid}: no libc mapped yet (look {tries})");
            if *tries > LIBC_RETRIES {
                // A static program, or one that never maps a libc: nothing to attach.
                self.libc_retry.remove(&pid);
                // Replaced: a file it maps is deleted (renamed over), and it still runs (an
                // exiting process's files are out of reach too, and that is no failure).
                let replaced = maps
                    .iter()
                    .any(|m| m.deleted && m.perms.exec && m.is_file());
                if self.targets.take_libc_unreachable(pid) && replaced && !procfs::is_ending(pid) {
                    log::warn!(
                        "pid {pid} ({comm}): its libc was replaced on disk before the agent \
                         could probe it, and the file it still maps is out of reach after the \
                         privilege drop (/proc/{pid}/map_files): its calls are not counted \
                         (--keep-privileges reaches it)"
                    );
                    self.targets.failed(AttachFailure::MappedFileReplaced);
                }
            }
        }
        let go = found.into_iter().find_map(|t| match t {
            Target::Go(g) => Some(g),
            Target::Libc(_) | Target::Sym(_) => None,
        });
        (go, served)
    }
}

/// `pid`'s exec stamp; `None` (logged) if it cannot be read.
fn exec_stamp(probes: &Probes, pid: u32) -> Option<u64> {
    match probes.exec_stamp(pid) {
        Ok(stamp) => Some(stamp),
        Err(e) => {
            log::warn!("exec stamp of pid {pid}: {e}");
            None
        }
    }
}

/// Namespace, pod and container labels of a process in `pod` (empty outside pods).
fn pod_labels(pod: Option<&PodMeta>) -> ProcessLabels {
    ProcessLabels {
        namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
        pod: pod.map(|p| p.pod.clone()).unwrap_or_default(),
        container: pod
            .and_then(|p| p.container_name.clone())
            .unwrap_or_default(),
        ..ProcessLabels::default()
    }
}

/// The cgroup path of /proc/<pid>/cgroup: the v2 line, else the first v1 hierarchy's.
fn cgroup_path(text: &str) -> &str {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| text.lines().next().and_then(|l| l.splitn(3, ':').nth(2)))
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_path_prefers_the_v2_line() {
        assert_eq!(cgroup_path("0::/kubepods.slice/a\n"), "/kubepods.slice/a");
        assert_eq!(
            cgroup_path("9:name=systemd:/x\n8:pids:/y\n0::/z\n"),
            "/z",
            "hybrid: the unified line"
        );
        assert_eq!(cgroup_path("4:memory:/docker/ab\n3:cpu:/c\n"), "/docker/ab");
        assert_eq!(cgroup_path(""), "");
    }
}
