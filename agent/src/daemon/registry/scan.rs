//! The registry's periodic steps: the pass over /proc (new processes examined, vanished ones
//! marked exited, expired ones forgotten) and the sweeper's bounded steps (harvested rows handed
//! to their processes).

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use super::{Proc, Registry};
use crate::{
    daemon::{
        retained::Retained,
        sweep::{Fate, StepResult},
    },
    frames::FrameCache,
    probes::Probes,
    symbolize::SymbolizerHandle,
};

impl Registry {
    /// One pass over /proc: new processes are examined (and attached), vanished ones marked
    /// exited (their rows are harvested from the kernel maps by the sweeper), expired ones
    /// forgotten. Bounded: no kernel map is walked here.
    pub fn scan(
        &mut self,
        probes: &mut Probes,
        symbolizer: &SymbolizerHandle,
        frames: &mut FrameCache,
    ) {
        let now = Instant::now();
        let seen = self.examine_running(probes, symbolizer);
        self.retry_libc(&seen, probes);
        self.mark_exited(&seen, now, probes);
        self.expire(now, frames, symbolizer);
        self.prune_gone(&seen);
        self.undeny_exited(&seen, probes);
        self.forget_unselected(&seen, frames, symbolizer);
    }

    /// Every pid in /proc, each registered if it is new and selected.
    fn examine_running(
        &mut self,
        probes: &mut Probes,
        symbolizer: &SymbolizerHandle,
    ) -> HashSet<u32> {
        let mut seen = HashSet::new();
        for pid in crate::procfs::pids() {
            seen.insert(pid);
            self.ensure(pid, probes, symbolizer);
        }
        seen
    }

    /// Registered processes no longer in /proc: exited now, their rows to be harvested.
    fn mark_exited(&mut self, seen: &HashSet<u32>, now: Instant, probes: &mut Probes) {
        let mut exited = Vec::new();
        for (pid, p) in &mut self.procs {
            if p.exited_at.is_none() && !seen.contains(pid) {
                exited.push(*pid);
                p.exited_at = Some(now);
                // A reused pid is a new process, undecided until classified (the LRU would
                // drop the entry in time; its exec stamp may be the old process's until it
                // execs).
                let _ = probes.set_admitted(*pid, None);
                log::debug!("pid {pid}: exited, its rows to be harvested");
                // The keys stay noted: an exec read late still splits them off (`exec_seen`).
                let keys = self.image_sites.get(pid).map(|s| s.keys.clone());
                self.sweeper
                    .pid(*pid, Fate::Harvest, keys.unwrap_or_default());
            }
        }
        for pid in exited {
            self.forget_unwind(pid);
        }
    }

    /// Forgets the processes and past images that exited a TTL ago.
    fn expire(&mut self, now: Instant, frames: &mut FrameCache, symbolizer: &SymbolizerHandle) {
        let expired: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| {
                p.exited_at
                    .is_some_and(|t| now.duration_since(t) >= self.ttl)
            })
            .map(|(pid, _)| *pid)
            .collect();
        self.expire_past_images(now, frames, symbolizer);
        for pid in expired {
            self.procs.remove(&pid);
            self.past.remove(&pid);
            self.images.remove(&pid);
            self.image_sites.remove(&pid);
            frames.forget(pid);
            symbolizer.forget(pid);
            // Expired before its harvest finished: what is left goes unread.
            if self.sweeper.pending(pid) {
                self.sweeper.pid(pid, Fate::Drop, []);
            }
        }
    }

    /// Past images a TTL after their exec go; a pid with none left and no process forgets its
    /// frames.
    fn expire_past_images(
        &mut self,
        now: Instant,
        frames: &mut FrameCache,
        symbolizer: &SymbolizerHandle,
    ) {
        for images in self.past.values_mut() {
            images.retain(|i| {
                i.proc
                    .exited_at
                    .is_none_or(|t| now.duration_since(t) < self.ttl)
            });
        }
        let procs = &self.procs;
        self.past.retain(|pid, images| {
            let keep = !images.is_empty();
            if !keep && !procs.contains_key(pid) {
                frames.forget(*pid);
                symbolizer.forget(*pid);
            }
            keep
        });
    }

    /// Bookkeeping of pids that are gone and not registered: dropped.
    fn prune_gone(&mut self, seen: &HashSet<u32>) {
        self.image_sites
            .retain(|pid, _| seen.contains(pid) || self.procs.contains_key(pid));
        self.ignored.retain(|(pid, _)| seen.contains(pid));
        self.ignored_pids = self.ignored.iter().map(|(pid, _)| *pid).collect();
        self.exec_paths
            .retain(|pid, _| seen.contains(pid) || self.procs.contains_key(pid));
    }

    /// Denied processes that exited: their entries make room (a reused pid starts traced).
    fn undeny_exited(&mut self, seen: &HashSet<u32>, probes: &mut Probes) {
        let gone: Vec<u32> = self
            .denied
            .iter()
            .copied()
            .filter(|pid| !seen.contains(pid))
            .collect();
        for pid in gone {
            self.undeny(pid, probes);
        }
    }

    /// The rows of processes not selected (rejected, or gone before they were) leave the
    /// kernel maps.
    fn forget_unselected(
        &mut self,
        seen: &HashSet<u32>,
        frames: &mut FrameCache,
        symbolizer: &SymbolizerHandle,
    ) {
        for pid in forgettable(&mut self.to_forget, &self.procs) {
            // An earlier image still exported keeps its named sites.
            if !self.past.contains_key(&pid) {
                frames.forget(pid);
                symbolizer.forget(pid);
            }
            let fate = if seen.contains(&pid) {
                Fate::Reject
            } else {
                Fate::Drop
            };
            log::debug!("pid {pid}: its rows go ({fate:?})");
            let keys = self.image_sites.remove(&pid).unwrap_or_default().keys;
            self.sweeper.pid(pid, fate, keys);
        }
    }

    /// One bounded step of the sweeper; the rows it harvested go to their processes, and
    /// those whose harvest is complete are cut down to what can be exported.
    pub fn sweep(
        &mut self,
        probes: &mut Probes,
        frames: &mut FrameCache,
        max_live: u32,
    ) -> anyhow::Result<usize> {
        let StepResult {
            pids,
            images,
            done_pids,
            done_images,
            deleted,
        } = {
            let (procs, past, me) = (&self.procs, &self.past, self.self_pid);
            let known = |pid: u32| pid == me || procs.contains_key(&pid) || past.contains_key(&pid);
            self.sweeper.step(probes, max_live, &known)?
        };
        for (pid, h) in pids {
            if let Some(p) = self.procs.get_mut(&pid).filter(|p| p.exited_at.is_some()) {
                log::debug!("pid {pid}: {} rows harvested", h.rows.len());
                p.retained.absorb(h);
            } else if !h.rows.is_empty() {
                log::debug!(
                    "pid {pid}: {} harvested rows dropped (no exited process)",
                    h.rows.len()
                );
            }
        }
        for ((pid, image), h) in images {
            if let Some(i) = self.past_image_mut(pid, image) {
                i.retained.absorb(h);
            }
        }
        for pid in done_pids {
            self.finish_process(pid, frames);
        }
        for (pid, image) in done_images {
            self.finish_image(pid, image, frames);
        }
        Ok(deleted)
    }

    /// A gone process whose harvest is complete: cut down to the rows it keeps, which are
    /// named ahead of the living's sites in the background (its earlier images' too: their
    /// raw stacks go with it).
    fn finish_process(&mut self, pid: u32, frames: &mut FrameCache) {
        let keep = self.retain_sites;
        let Some(p) = self.procs.get_mut(&pid).filter(|p| p.exited_at.is_some()) else {
            return;
        };
        fold(&mut p.retained, keep, pid, frames);
        if let Some(go) = &mut p.go {
            let folded = go.compact(keep);
            frames.forget_chains(pid, folded.iter().map(|k| (k.stack_id, k.ret_addr)));
        }
        let go = p.go.iter().flat_map(|go| go.sites.keys());
        let sites: Vec<(i64, u64)> = chains(&p.retained)
            .chain(go.map(|k| (k.stack_id, k.ret_addr)))
            .chain(
                self.past
                    .get(&pid)
                    .into_iter()
                    .flatten()
                    .flat_map(|i| chains(&i.retained)),
            )
            .collect();
        frames.finish(pid, sites, true);
    }

    /// A past image whose harvest is complete: cut down to the rows it keeps, named ahead of
    /// the living's sites.
    fn finish_image(&mut self, pid: u32, image: u32, frames: &mut FrameCache) {
        let keep = self.retain_sites;
        let Some(i) = self.past_image_mut(pid, image) else {
            return;
        };
        fold(&mut i.retained, keep, pid, frames);
        let sites: Vec<(i64, u64)> = chains(&i.retained).collect();
        // None of its rows is in the kernel any more: a row made at the same key from now on
        // is the running image's.
        i.keys = HashSet::new();
        frames.finish(pid, sites, false);
    }
}

/// Cuts `retained` down to its `keep` largest rows; the chains of those folded away are
/// forgotten.
fn fold(retained: &mut Retained, keep: usize, pid: u32, frames: &mut FrameCache) {
    let folded = retained.compact(keep);
    frames.forget_chains(pid, folded.iter().map(|k| (k.stack_id, k.ret_addr)));
}

/// The (stack id, return address) of each row of `retained`.
fn chains(retained: &Retained) -> impl Iterator<Item = (i64, u64)> + '_ {
    retained.rows.iter().map(|(k, _)| (k.stack_id, k.ret_addr))
}

/// Takes the pids to forget out of `to_forget`: all but the registered ones (a pid reused by a
/// selected process, whose rows are its own now).
fn forgettable(to_forget: &mut HashSet<u32>, procs: &HashMap<u32, Proc>) -> HashSet<u32> {
    to_forget
        .drain()
        .filter(|pid| !procs.contains_key(pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{k8s::cgroup, model::ProcessLabels};

    /// Rows of a pid that is registered again (reused by a selected process) are its own.
    #[test]
    fn registered_pids_are_not_forgotten() {
        let mut to_forget = HashSet::from([1, 2, 3]);
        let procs = HashMap::from([(
            2,
            Proc {
                labels: ProcessLabels::default(),
                container: cgroup::ContainerRef::default(),
                start_time: 1,
                exited_at: None,
                go: None,
                libc_apis: None,
                allocator: None,
                retained: Retained::default(),
            },
        )]);
        assert_eq!(forgettable(&mut to_forget, &procs), HashSet::from([1, 3]));
        assert!(to_forget.is_empty());
    }
}
