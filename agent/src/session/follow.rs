//! The process tree a session follows (without `--no-follow`): the kernel adds each child of a
//! followed process to its followed set as it creates it (`probe-ebpf/src/follow.rs`), so a
//! child's calls are counted from its first instruction; this module keeps what the records
//! say about each process (its parent, its execs, how it ended), probes the programs the tree
//! execs through the target registry (the agent's path), and reports each process.
//!
//! A child that execs a program whose files are probed already (the same libc: a shell running
//! C programs) is counted exactly. One whose program needs new probes (another libc, a Go
//! binary) is probed when its exec record is read, a little after it started: its first calls
//! are lost, and it is reported as `late` and counted in `lost`, never silently.
//!
//! Go runtime events (growth, GC) are traced for the launched command (or `--pid`) only: a Go
//! program elsewhere in the tree is marked `go: not traced` (report and `lost`), its libc calls
//! counted as any program's. Its Go probes would go in only after its exec was read, so its
//! growth figures could not be exact, and the session's Go state is per process.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    time::{Duration, Instant},
};

use allocwatch_common::libc::{API_COUNT, Overflow, SiteKey, SiteStats};

use crate::{
    aggregate::{self, Sampling, Totals},
    collect::ProgramCounts,
    loss,
    probes::Probes,
    procfs,
    report::{ProcessInfo, TreeProcess},
    target::{
        self, elf, libc,
        maps::{DevInode, MapEntry, Stamp, read_maps},
        registry::{Kind, ProcessFiles, Targets},
    },
};

/// How a process's program was probed ([`TreeProcess::probes`]).
const ATTACHED: &str = "attached";
const LATE: &str = "late";
const NONE: &str = "none";
/// Exited before its maps could be read after an exec: exact if its program used files that
/// were probed already (the usual case: the same libc), else its calls were not counted.
const UNCHECKED: &str = "unchecked";

/// Whether a program's Go runtime is traced ([`TreeProcess::go`]).
const GO_TRACED: &str = "traced";
const GO_NOT_TRACED: &str = "not traced";

/// How long an exec'd program's libc is waited for (ld.so maps it within milliseconds).
const LIBC_WAIT: Duration = Duration::from_millis(500);

/// One followed process.
#[derive(Clone, Debug)]
struct Member {
    parent: Option<u32>,
    exited: bool,
    exit_code: Option<i32>,
    /// The programs it ran, by its exec count in the kernel (`ProgramKey::execs`): the last
    /// one runs now.
    programs: Vec<Program>,
}

/// One program a followed process ran.
#[derive(Clone, Debug, Default)]
struct Program {
    comm: String,
    exe: String,
    probes: &'static str,
    /// A Go program: whether its runtime is traced (`GO_TRACED`, the root's only).
    go: Option<&'static str>,
    /// allocwatch's own parked child before it execs the command: not reported.
    hidden: bool,
}

impl Member {
    fn new(parent: Option<u32>, program: Program) -> Self {
        Self {
            parent,
            exited: false,
            exit_code: None,
            programs: vec![program],
        }
    }

    fn current(&mut self) -> &mut Program {
        if self.programs.is_empty() {
            self.programs.push(Program::default());
        }
        let last = self.programs.len() - 1;
        &mut self.programs[last]
    }
}

/// The followed tree and what the session learned about it.
pub struct Tree {
    /// `--no-follow`: only the root is traced and nothing here is reported.
    pub on: bool,
    root: u32,
    /// The launched command's exec is still to come (its record is not a replacement).
    launch_exec_pending: bool,
    members: BTreeMap<u32, Member>,
    /// The files probed so far, for the programs the tree execs (the root's are in already).
    targets: Targets,
    /// Children the kernel could not add to its followed set (the set was full).
    not_followed: u64,
    /// Processes whose exec'd program has nothing allocwatch can probe.
    not_probed: u64,
    /// Processes whose exec'd program was probed only after it started.
    probed_late: u64,
    /// Processes that exited before their exec'd program could be checked.
    unchecked: u64,
    /// Executables found to run with their files probed, by file, with the file judged (a
    /// build deletes and rewrites its programs, and a new one can get the old inode number).
    judged: HashMap<DevInode, (&'static str, Stamp)>,
    /// Calls the per-program table had no room for (`collect::programs`).
    pub programs_full: u64,
    /// Go programs in the tree whose runtime is not traced (not the root's).
    go_not_traced: u64,
}

impl Tree {
    pub fn new(on: bool, root: u32, launched: bool, targets: Targets, root_go: bool) -> Self {
        let go = root_go.then_some(GO_TRACED);
        let mut member = Member::new(
            None,
            Program {
                probes: ATTACHED,
                hidden: launched,
                go: if launched { None } else { go },
                ..Program::default()
            },
        );
        if launched {
            // Its exec (after the probes are in) starts the command, its program 1.
            member.programs.push(Program {
                probes: ATTACHED,
                go,
                ..Program::default()
            });
        }
        let members = BTreeMap::from([(root, member)]);
        Self {
            on,
            root,
            launch_exec_pending: launched,
            members,
            targets,
            not_followed: 0,
            not_probed: 0,
            probed_late: 0,
            unchecked: 0,
            programs_full: 0,
            go_not_traced: 0,
            judged: HashMap::new(),
        }
    }

    /// `child` was created by `parent`: it runs its parent's program until it execs.
    pub fn fork(&mut self, child: u32, parent: u32, followed: bool) {
        if !followed {
            self.not_followed += 1;
            return;
        }
        let mut program = self
            .members
            .get_mut(&parent)
            .map(|p| p.current().clone())
            .unwrap_or(Program {
                probes: ATTACHED,
                ..Program::default()
            });
        program.hidden = false;
        // The session's Go state is the root's: a forked Go program's runtime is not traced.
        if program.go.is_some() {
            program.go = Some(GO_NOT_TRACED);
            self.go_not_traced += 1;
        }
        self.members
            .insert(child, Member::new(Some(parent), program));
    }

    /// A record of a process the tree has no fork for (its fork record was lost to a full
    /// ring buffer, which `lost` counts): it is followed, its parent unknown.
    pub fn seen(&mut self, tgid: u32) {
        self.members.entry(tgid).or_insert_with(|| {
            Member::new(
                None,
                Program {
                    comm: procfs::comm(tgid).unwrap_or_default(),
                    exe: procfs::exe(tgid)
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    probes: ATTACHED,
                    go: None,
                    hidden: false,
                },
            )
        });
    }

    pub fn exit(&mut self, tgid: u32, code: Option<u8>) {
        self.seen(tgid);
        if let Some(m) = self.members.get_mut(&tgid) {
            m.exited = true;
            m.exit_code = code.map(i32::from);
        }
    }

    /// `tgid` exec'd `path`: its new program's files are probed through the registry, now if
    /// they are not yet (then late).
    pub fn exec(&mut self, probes: &mut Probes, tgid: u32, comm: String, path: String) {
        self.seen(tgid);
        if tgid == self.root && self.launch_exec_pending {
            // The launched command's own exec: resolved and probed before it ran.
            self.launch_exec_pending = false;
            if let Some(m) = self.members.get_mut(&tgid) {
                let p = m.current();
                p.comm = comm;
                p.exe = path;
            }
            return;
        }
        let probes = self.probe_program(probes, tgid, &comm, &path);
        let exe = procfs::exe(tgid).map_or(path, |p| p.display().to_string());
        let go = is_go(&exe).then(|| {
            self.go_not_traced += 1;
            GO_NOT_TRACED
        });
        if let Some(m) = self.members.get_mut(&tgid) {
            m.programs.push(Program {
                comm,
                exe,
                probes,
                go,
                hidden: false,
            });
        }
    }

    /// Probes the files `pid`'s new program maps; how it was probed.
    fn probe_program(
        &mut self,
        probes: &mut Probes,
        pid: u32,
        comm: &str,
        path: &str,
    ) -> &'static str {
        let Some(maps) = maps_with_libc(pid) else {
            // Gone already (a short program): judged by its file, once per file.
            let probes = self.judge_file(path);
            match probes {
                NONE => self.not_probed += 1,
                UNCHECKED => self.unchecked += 1,
                _ => {}
            }
            return probes;
        };
        let before = self.targets.points_attached;
        let found = self.targets.attach_process(
            probes,
            &ProcessFiles {
                pid,
                comm,
                maps: &maps,
            },
            // Its libc only: a Go runtime is traced for the root alone (module docs).
            &[Kind::Libc],
        );
        if found.is_empty() {
            self.not_probed += 1;
            NONE
        } else if self.targets.points_attached > before {
            log::warn!(
                "pid {pid} ({comm}) exec'd a program whose files were not probed yet: probed \
                 now, its first calls are not counted"
            );
            self.probed_late += 1;
            LATE
        } else {
            ATTACHED
        }
    }

    /// Whether the program at `path` (exec'd by a process that is gone) ran with its files
    /// probed: a Go program's executable, or else the libc it loads (found as a command's is).
    /// A file not probed yet is not probed now: that process's calls were not counted.
    fn judge_file(&mut self, path: &str) -> &'static str {
        let Ok(meta) = std::fs::metadata(path) else {
            return UNCHECKED;
        };
        let id = DevInode::from_metadata(&meta);
        let stamp = Stamp::of(&meta);
        if let Some(&(known, then)) = self.judged.get(&id)
            && then == stamp
        {
            return known;
        }
        // Its libc calls were counted if its libc was probed (a Go program's runtime is not
        // traced in a child either way, see `exec`).
        let verdict = match target::libc_for_command(path) {
            Ok(l)
                if l.files()
                    .iter()
                    .all(|f| self.targets.is_attached(Kind::Libc, f.dev_inode)) =>
            {
                ATTACHED
            }
            Ok(_) | Err(_) => NONE,
        };
        // Not remembered when not probed: a later run may find its files probed by then.
        if verdict == ATTACHED {
            self.judged.insert(id, (verdict, stamp));
        }
        verdict
    }

    /// The tree's processes other than the root, and whether each still runs (empty with
    /// `--no-follow`).
    pub fn children(&self) -> impl Iterator<Item = (u32, bool)> + '_ {
        self.members
            .iter()
            .filter(|&(&pid, _)| self.on && pid != self.root)
            .map(|(&pid, m)| (pid, !m.exited))
    }

    /// What the tree lost, added to the session's loss counters (all present when following).
    pub fn lost(&self, lost: &mut BTreeMap<&'static str, u64>) {
        if !self.on {
            return;
        }
        lost.insert(loss::PROCESSES_NOT_FOLLOWED, self.not_followed);
        lost.insert(loss::PROCESSES_NOT_PROBED, self.not_probed);
        lost.insert(loss::PROCESSES_PROBED_LATE, self.probed_late);
        lost.insert(loss::PROCESSES_UNCHECKED, self.unchecked);
        lost.insert(loss::PROGRAM_TABLE_FULL, self.programs_full);
        let failures: u64 = self.targets.failures.values().sum();
        lost.insert(loss::ATTACH_FAILURES, failures);
        lost.insert(loss::GO_PROGRAMS_NOT_TRACED, self.go_not_traced);
    }

    /// Each program of each process of the tree with its own figures, the root first (its
    /// identity from `root`). `rows` are the tree's site rows (failures and live blocks, per
    /// process: shown with its last program); `programs` the calls and bytes per program
    /// (`collect::programs`). Empty with `--no-follow`.
    pub fn report(
        &mut self,
        root: &ProcessInfo,
        rows: &BTreeMap<SiteKey, SiteStats>,
        programs: &ProgramCounts,
        sampling: Sampling,
    ) -> Vec<TreeProcess> {
        if !self.on {
            return Vec::new();
        }
        let mut by_pid: BTreeMap<u32, BTreeMap<SiteKey, SiteStats>> = BTreeMap::new();
        for (k, s) in rows {
            by_pid.entry(k.tgid).or_default().insert(*k, *s);
        }
        for &(pid, _) in programs.keys() {
            self.seen(pid);
        }
        for pid in by_pid.keys() {
            self.seen(*pid);
        }
        let mut out = Vec::new();
        for (&pid, m) in &mut self.members {
            // A program whose exec record was lost (a full ring buffer, counted) still shows.
            let known = programs
                .range((pid, 0)..=(pid, u32::MAX))
                .map(|(&(_, execs), _)| execs as usize + 1)
                .max()
                .unwrap_or(0);
            while m.programs.len() < known {
                m.programs.push(Program {
                    probes: UNCHECKED,
                    ..Program::default()
                });
            }
            if !m.exited && pid != root.pid {
                // Names after exec, read while it lives.
                let p = m.current();
                if let Some(c) = procfs::comm(pid) {
                    p.comm = c;
                }
                if let Ok(e) = procfs::exe(pid) {
                    p.exe = e.display().to_string();
                }
            }
            let last = m.programs.len() - 1;
            let pid_rows = by_pid.get(&pid);
            for (execs, program) in m.programs.iter().enumerate() {
                if program.hidden {
                    continue;
                }
                // Failures and live blocks are per process (its site rows): on its last
                // program. Calls and bytes are the program's own.
                let mut totals = match pid_rows {
                    Some(r) if execs == last => {
                        aggregate::totals(r.iter(), &[Overflow::default(); API_COUNT], sampling)
                    }
                    _ => Totals::default(),
                };
                let counts = programs.get(&(pid, execs as u32));
                for (i, c) in counts.iter().flat_map(|c| c.iter()).enumerate() {
                    totals.calls[i] = c.calls;
                    totals.bytes[i] = c.bytes;
                }
                if counts.is_none() {
                    totals.calls = [0; API_COUNT];
                    totals.bytes = [0; API_COUNT];
                }
                let mut p = TreeProcess {
                    pid,
                    parent_pid: m.parent,
                    comm: program.comm.clone(),
                    exe: program.exe.clone(),
                    exited: m.exited || execs < last,
                    exit_code: if execs == last { m.exit_code } else { None },
                    replaced_by_exec: execs < last,
                    probes: program.probes,
                    go: program.go,
                    totals,
                };
                if pid == root.pid && execs == last {
                    p.comm.clone_from(&root.comm);
                    p.exe.clone_from(&root.exe);
                    p.exited = root.exited;
                    // allocwatch's own child: its wait status (also a signal's 128+n).
                    p.exit_code = root.exit_code.or(m.exit_code);
                }
                out.push(p);
            }
        }
        // The root first, then the others by pid (a process's programs in order).
        out.sort_by_key(|p| (p.pid != root.pid, p.pid));
        out
    }
}

/// Whether the executable at `path` is a Go program (its build info says so).
fn is_go(path: &str) -> bool {
    crate::gort::buildinfo::go_version(Path::new(path)).is_ok_and(|v| v.is_some())
}

/// `pid`'s memory map once its libc is mapped (if its program needs one: ld.so maps it a few
/// milliseconds after the exec); `None` if it exited first.
fn maps_with_libc(pid: u32) -> Option<Vec<MapEntry>> {
    let needs_libc = elf::dynamic_info(procfs::exe_link(pid))
        .is_ok_and(|d| d.needed.iter().any(|n| n.starts_with("libc.")));
    let deadline = Instant::now() + LIBC_WAIT;
    loop {
        let maps = read_maps(pid).ok().filter(|m| !m.is_empty());
        match maps {
            Some(maps) if !needs_libc || maps.iter().any(maps_libc) => return Some(maps),
            Some(maps) if Instant::now() >= deadline => return Some(maps),
            _ if procfs::has_exited(pid) => return None,
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Whether a mapping is a libc (its file name `libc.so*` or `libc-*.so`).
fn maps_libc(m: &MapEntry) -> bool {
    m.path
        .as_deref()
        .and_then(|p| p.rsplit('/').next())
        .is_some_and(libc::is_libc_name)
}

#[cfg(test)]
mod tests {
    use allocwatch_common::libc::Overflow;

    use super::*;
    use crate::target::go::GoProbeSet;

    fn tree() -> Tree {
        let set = GoProbeSet {
            growth: true,
            malloc: true,
            gc: true,
        };
        Tree::new(true, 10, false, Targets::new(set, None), false)
    }

    fn row(tgid: u32, calls: u64) -> (SiteKey, SiteStats) {
        (
            SiteKey {
                tgid,
                api: 0,
                stack_id: -1,
                ret_addr: 0x1000,
            },
            SiteStats {
                calls,
                bytes: calls * 100,
                ..SiteStats::default()
            },
        )
    }

    fn counts(calls: u64) -> [Overflow; API_COUNT] {
        let mut c = [Overflow::default(); API_COUNT];
        c[0] = Overflow {
            calls,
            bytes: calls * 100,
        };
        c
    }

    /// Children are reported under their parents with their own rows; a child the kernel
    /// could not follow, and one seen only by its rows, are accounted for.
    #[test]
    fn tree_reports_each_process() {
        let mut t = tree();
        t.fork(4_000_001, 10, true);
        t.fork(4_000_002, 4_000_001, true);
        t.fork(4_000_003, 10, false);
        t.exit(4_000_002, Some(3));
        let rows = BTreeMap::from([row(10, 2), row(4_000_002, 5), row(4_000_009, 1)]);
        let root = ProcessInfo {
            pid: 10,
            comm: "sh".into(),
            exited: true,
            exit_code: Some(0),
            ..ProcessInfo::default()
        };
        let sampling = Sampling {
            bytes: 0,
            stacks: true,
        };
        let programs = BTreeMap::from([
            ((10, 0), counts(2)),
            ((4_000_002, 0), counts(1)),
            ((4_000_002, 1), counts(4)),
            ((4_000_009, 0), counts(1)),
        ]);
        let r = t.report(&root, &rows, &programs, sampling);
        let pids: Vec<u32> = r.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [10, 4_000_001, 4_000_002, 4_000_002, 4_000_009]);
        assert_eq!(r[0].comm, "sh");
        assert_eq!(r[0].exit_code, Some(0));
        assert_eq!(r[0].totals.calls[0], 2);
        assert_eq!(r[1].parent_pid, Some(10));
        assert_eq!(r[1].totals.calls[0], 0);
        // 4_000_002 exec'd once (its exec record lost): each program its own counts.
        assert_eq!(r[2].parent_pid, Some(4_000_001));
        assert!(r[2].replaced_by_exec && r[2].exit_code.is_none());
        assert_eq!(r[2].totals.calls[0], 1);
        assert!(!r[3].replaced_by_exec);
        assert_eq!((r[3].exited, r[3].exit_code), (true, Some(3)));
        assert_eq!(r[3].totals.bytes[0], 400);
        assert_eq!(r[3].probes, UNCHECKED);
        assert_eq!(r[4].parent_pid, None, "fork record lost");
        let mut lost = BTreeMap::new();
        t.lost(&mut lost);
        assert_eq!(lost["processes_not_followed"], 1);
        assert_eq!(lost["processes_probed_late"], 0);

        assert!(r.iter().all(|p| p.go.is_none()));
        assert_eq!(lost["go_programs_not_traced"], 0);

        let mut off = tree();
        off.on = false;
        assert!(off.report(&root, &rows, &programs, sampling).is_empty());
        let mut lost = BTreeMap::new();
        off.lost(&mut lost);
        assert!(lost.is_empty());
    }

    /// The root's Go runtime is traced; a Go program it forks is marked not traced.
    #[test]
    fn go_runtime_is_the_roots_only() {
        let set = GoProbeSet {
            growth: true,
            malloc: true,
            gc: true,
        };
        let mut t = Tree::new(true, 10, true, Targets::new(set, None), true);
        t.fork(11, 10, true);
        let root = ProcessInfo {
            pid: 10,
            ..ProcessInfo::default()
        };
        let sampling = Sampling {
            bytes: 0,
            stacks: true,
        };
        let r = t.report(&root, &BTreeMap::new(), &BTreeMap::new(), sampling);
        let go: Vec<_> = r.iter().map(|p| (p.pid, p.go)).collect();
        assert_eq!(go, [(10, Some(GO_TRACED)), (11, Some(GO_NOT_TRACED))]);
        let mut lost = BTreeMap::new();
        t.lost(&mut lost);
        assert_eq!(lost["go_programs_not_traced"], 1);
    }
}
