//! Program images: the sites each process announces, and what an `exec` does. The old image
//! stays as an exited process of its own (under the identity it had), the pid goes on as the
//! new program's.

use std::time::Instant;

use allocwatch_common::{ImageHists, libc::SiteKey};

use super::{ImageSites, PastImage, Proc, Registry, comm_text};
use crate::{
    daemon::{retained::Retained, select::Candidate},
    k8s::cgroup,
    model::ProcessLabels,
    probes::Probes,
    procfs,
    symbolize::SymbolizerHandle,
};

impl Registry {
    /// A new-site record (records arrive in ring order): the process's current image made it.
    pub fn note_site(&mut self, key: &SiteKey, comm: &[u8; 16]) {
        if key.tgid == self.self_pid {
            return;
        }
        // A row of a process whose rows are leaving the kernel (read late, or made by a
        // rejected process still running) goes the same way.
        self.sweeper.add_key(*key);
        let image = self.image_sites.entry(key.tgid).or_default();
        if image.keys.is_empty() {
            image.comm = comm_text(comm);
        }
        image.keys.insert(*key);
    }

    /// The size histograms `pid`'s program left at the exec whose record follows.
    pub fn image_hists(&mut self, pid: u32, hists: ImageHists) {
        if pid == self.self_pid {
            return;
        }
        let image = self.image_sites.entry(pid).or_default();
        image.hists.libc.extend(hists.libc);
        image.hists.go.extend(hists.go);
    }

    /// The number of `pid`'s current program image (0 before its first exec).
    pub fn image_of(&self, pid: u32) -> u32 {
        self.images.get(&pid).copied().unwrap_or(0)
    }

    /// Whether `key` was made by an earlier image of its process (one that ended at exec).
    pub fn is_past_site(&self, key: &SiteKey) -> bool {
        self.past
            .get(&key.tgid)
            .is_some_and(|images| images.iter().any(|i| i.keys.contains(key)))
    }

    /// `pid` exec'd `path`: its identity is the new program's from now on (a process that was
    /// skipped before may be selected now, and the other way round). What its old image did
    /// stays with the old identity, as an exited process of its own (a shell's work before
    /// `exec app` is not the app's).
    pub fn exec_seen(
        &mut self,
        pid: u32,
        comm: &[u8; 16],
        path: String,
        probes: &mut Probes,
        symbolizer: &SymbolizerHandle,
    ) {
        if pid == self.self_pid {
            return;
        }
        log::debug!("pid {pid}: exec of {path:?}");

        // The entry of this process: alive, marked exited by a scan that raced with the exec,
        // or registered from its records after it was gone (the agent reads the ring later
        // than the process runs); not that of an earlier process under the same pid.
        let start = procfs::start_time(pid);
        let old = if self.procs.get(&pid).is_some_and(|p| {
            p.exited_at.is_none() || start.is_none_or(|s| s == p.start_time || p.start_time == 0)
        }) {
            self.procs.remove(&pid)
        } else {
            None
        };
        if let Some(sites) = self
            .image_sites
            .remove(&pid)
            .filter(|s| !s.keys.is_empty() || s.hists != ImageHists::default())
        {
            self.end_image(pid, old, sites);
        }
        // What the new program records goes unless it is selected (the old image's stays,
        // above): a pid that ends up registered is not forgotten.
        self.to_forget.insert(pid);
        self.exec_paths.insert(pid, path);
        self.ignored.retain(|(p, _)| *p != pid);
        self.ignored_pids.remove(&pid);
        // The probe took it off the denylist at exec already; this keeps the books.
        self.undeny(pid, probes);
        self.forget_unwind(pid);
        self.ensure_seen(pid, comm, probes, symbolizer);
    }

    /// Keeps `pid`'s image that just ended at exec as an exited process of its own.
    fn end_image(&mut self, pid: u32, mut old: Option<Proc>, sites: ImageSites) {
        let mut exported = true;
        // Rows harvested before the exec was read (the process was gone by then) were made
        // by this image: every record of the old image precedes the exec's in the ring.
        let mut retained = old
            .as_mut()
            .map(|p| std::mem::take(&mut p.retained))
            .unwrap_or_default();
        // Its size histograms, taken out of the maps at the exec (the rows left there are the
        // new program's).
        retained.add_hists(sites.hists.libc, sites.hists.go);
        let proc = match old {
            // Registered while the old program ran.
            Some(p) if p.labels.comm == sites.comm => Proc {
                exited_at: Some(Instant::now()),
                ..p
            },
            // Registered only after it exec'd (/proc read late): its records name the old
            // image; it is in the same cgroup.
            Some(p) => Proc {
                labels: ProcessLabels {
                    comm: sites.comm,
                    exe: self.exec_paths.get(&pid).cloned().unwrap_or_default(),
                    ..p.labels
                },
                exited_at: Some(Instant::now()),
                go: None,
                libc_apis: None,
                allocator: None,
                ..p
            },
            None => {
                let candidate = Candidate {
                    comm: &sites.comm,
                    ..Candidate::default()
                };
                exported = !self.ignored_pids.contains(&pid) && self.selector.selects(&candidate);
                Proc {
                    labels: ProcessLabels {
                        comm: sites.comm,
                        // The path of its own exec, when the agent saw one.
                        exe: self.exec_paths.get(&pid).cloned().unwrap_or_default(),
                        ..ProcessLabels::default()
                    },
                    container: cgroup::ContainerRef::default(),
                    start_time: procfs::start_time(pid).unwrap_or(0),
                    exited_at: Some(Instant::now()),
                    go: None,
                    libc_apis: None,
                    allocator: None,
                    retained: Retained::default(),
                }
            }
        };
        let number = self.images.entry(pid).or_insert(0);
        let image = *number;
        *number += 1;
        // Its rows are final: harvested (or, not exported, deleted) out of the kernel maps.
        self.sweeper.image(pid, image, sites.keys.iter().copied());
        self.past.entry(pid).or_default().push(PastImage {
            image,
            proc,
            keys: sites.keys,
            exported,
            retained,
        });
    }
}
