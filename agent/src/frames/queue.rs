//! The sites waiting to be named, served round-robin by process.
//!
//! One FIFO for the whole node let a process that makes sites by the ten thousand (a compiler,
//! a test harness built with debug info) hold up every other process's naming for minutes: a
//! Go service's map sites, queued behind them, stayed out of `/metrics` (measured: the agent
//! suite under a parallel build). Each process now has its own FIFO and the processes take
//! turns, so a process's first sites are named after at most one site of each other process.
//!
//! A process that is gone goes first ([`NamingQueue::hasten`]): its files are held only for a
//! while after its exit, and naming its sites used to be awaited whole inside the loop's sweep
//! step (2 s stalls when a build's large programs exited, measured in the hour's soak).

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

/// A site: process, stack id, caller.
pub type Site = (u32, i64, u64);

#[derive(Default)]
pub struct NamingQueue {
    by_pid: BTreeMap<u32, VecDeque<(i64, u64)>>,
    /// Every queued site, so that a site streaming events (a Go site per growth) is queued
    /// once.
    queued: HashSet<Site>,
    /// The process served last: the next turn goes to the first one after it.
    last: Option<u32>,
    /// Processes served before the others (gone ones), in turn among themselves, while they
    /// have a line; until [`NamingQueue::unhasten`] (a site put back keeps its urgency).
    urgent: BTreeSet<u32>,
}

impl NamingQueue {
    pub fn len(&self) -> usize {
        self.queued.len()
    }

    pub fn contains(&self, site: &Site) -> bool {
        self.queued.contains(site)
    }

    /// Queues `site` at the back of its process's line; past `max` sites in all, the longest
    /// line loses its oldest (the process that floods the queue pays for it, not the others).
    pub fn push_back(&mut self, site: Site, max: usize) {
        if !self.queued.insert(site) {
            return;
        }
        if self.queued.len() > max
            && let Some((&pid, _)) = self.by_pid.iter().max_by_key(|(_, q)| q.len())
            && let Some(old) = self.by_pid.get_mut(&pid).and_then(VecDeque::pop_front)
        {
            self.queued.remove(&(pid, old.0, old.1));
            self.drop_if_empty(pid);
        }
        self.by_pid
            .entry(site.0)
            .or_default()
            .push_back((site.1, site.2));
    }

    /// Puts back a site taken but not named (out of time): first in its line, and its
    /// process's turn again next.
    pub fn push_front(&mut self, site: Site) {
        if !self.queued.insert(site) {
            return;
        }
        self.by_pid
            .entry(site.0)
            .or_default()
            .push_front((site.1, site.2));
        self.last = self.by_pid.range(..site.0).next_back().map(|(&p, _)| p);
    }

    /// Serves `pid`'s line before those of processes not hastened.
    pub fn hasten(&mut self, pid: u32) {
        self.urgent.insert(pid);
    }

    pub fn unhasten(&mut self, pid: u32) {
        self.urgent.remove(&pid);
    }

    /// Whether any site of `pid` is waiting.
    pub fn has_line(&self, pid: u32) -> bool {
        self.by_pid.contains_key(&pid)
    }

    /// The oldest site of the next process in turn (a hastened one while there is one).
    pub fn pop(&mut self) -> Option<Site> {
        let after = self.last.map_or(0, |l| l.saturating_add(1));
        let urgent = self
            .urgent
            .range(after..)
            .chain(self.urgent.range(..after))
            .find(|p| self.by_pid.contains_key(p));
        let pid = match urgent {
            Some(&p) => p,
            None => self
                .by_pid
                .range(after..)
                .next()
                .or_else(|| self.by_pid.iter().next())
                .map(|(&p, _)| p)?,
        };
        let (stack_id, ret_addr) = self.by_pid.get_mut(&pid)?.pop_front()?;
        self.drop_if_empty(pid);
        self.last = Some(pid);
        let site = (pid, stack_id, ret_addr);
        self.queued.remove(&site);
        Some(site)
    }

    /// Drops a process's line (it is gone).
    pub fn forget(&mut self, pid: u32) {
        self.urgent.remove(&pid);
        if let Some(q) = self.by_pid.remove(&pid) {
            for (s, r) in q {
                self.queued.remove(&(pid, s, r));
            }
        }
    }

    fn drop_if_empty(&mut self, pid: u32) {
        if self.by_pid.get(&pid).is_some_and(VecDeque::is_empty) {
            self.by_pid.remove(&pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut NamingQueue) -> Vec<Site> {
        std::iter::from_fn(|| q.pop()).collect()
    }

    /// A process with thousands of sites queued does not delay another's first site by more
    /// than one turn; each process's own sites keep their order.
    #[test]
    fn processes_take_turns() {
        let mut q = NamingQueue::default();
        for i in 0..1000 {
            q.push_back((7, i, 0), usize::MAX);
        }
        q.push_back((9, 1, 0), usize::MAX);
        q.push_back((9, 2, 0), usize::MAX);
        q.push_back((3, 5, 0), usize::MAX);
        // A site streamed again is not queued twice.
        q.push_back((9, 1, 0), usize::MAX);
        assert_eq!(q.len(), 1003);
        let order = drain(&mut q);
        assert_eq!(
            &order[..6],
            &[
                (3, 5, 0),
                (7, 0, 0),
                (9, 1, 0),
                (7, 1, 0),
                (9, 2, 0),
                (7, 2, 0)
            ]
        );
        assert_eq!(order.len(), 1003);
        let sevens: Vec<i64> = order.iter().filter(|s| s.0 == 7).map(|s| s.1).collect();
        assert_eq!(sevens, (0..1000).collect::<Vec<_>>());
        assert_eq!(q.len(), 0);
        assert!(q.pop().is_none());
    }

    /// A hastened process (gone) is served before the others, also with a site put back, and
    /// in turn with another hastened one; unhastened, it takes turns again.
    #[test]
    fn hastened_processes_go_first() {
        let mut q = NamingQueue::default();
        for s in [
            (1, 1, 0),
            (1, 2, 0),
            (5, 1, 0),
            (5, 2, 0),
            (5, 3, 0),
            (8, 1, 0),
            (8, 2, 0),
        ] {
            q.push_back(s, usize::MAX);
        }
        q.hasten(8);
        q.hasten(5);
        // A hastened pid without a line yet is skipped.
        q.hasten(3);
        assert_eq!(q.pop(), Some((5, 1, 0)));
        assert_eq!(q.pop(), Some((8, 1, 0)));
        let taken = q.pop().expect("a site");
        assert_eq!(taken, (5, 2, 0));
        assert_eq!(q.pop(), Some((8, 2, 0)));
        // 8's line is empty; 5's site put back is served before 1's.
        q.push_front(taken);
        assert_eq!(q.pop(), Some((5, 2, 0)));
        q.unhasten(5);
        q.push_back((3, 1, 0), usize::MAX);
        assert_eq!(q.pop(), Some((3, 1, 0)));
        q.unhasten(3);
        assert_eq!(drain(&mut q), [(5, 3, 0), (1, 1, 0), (1, 2, 0)]);
    }

    /// A site put back (out of time) is first in line and its process's turn comes next.
    #[test]
    fn a_site_put_back_goes_first() {
        let mut q = NamingQueue::default();
        for s in [(1, 1, 0), (1, 2, 0), (2, 1, 0)] {
            q.push_back(s, usize::MAX);
        }
        let first = q.pop().expect("a site");
        assert_eq!(first, (1, 1, 0));
        q.push_front(first);
        assert_eq!(drain(&mut q), [(1, 1, 0), (2, 1, 0), (1, 2, 0)]);
    }

    /// Over the cap, the longest line loses its oldest site; a forgotten process's sites go.
    #[test]
    fn the_flooding_process_pays_for_the_cap() {
        let mut q = NamingQueue::default();
        for i in 0..4 {
            q.push_back((1, i, 0), 5);
        }
        q.push_back((2, 0, 0), 5);
        q.push_back((2, 1, 0), 5);
        assert_eq!(q.len(), 5);
        assert!(
            !q.contains(&(1, 0, 0)),
            "the oldest of the longest line went"
        );
        assert!(q.contains(&(2, 0, 0)) && q.contains(&(2, 1, 0)));
        q.forget(1);
        assert_eq!(drain(&mut q), [(2, 0, 0), (2, 1, 0)]);
    }
}
