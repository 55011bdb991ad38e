//! Symbolized call chains of sites, cached per (process, stack, caller). Filled when a site is
//! first seen, while its process is still alive; shared by the CLI sessions and the daemon.
//! Everything here is per process and goes with it ([`FrameCache::forget`]), so a node's churn
//! of short-lived processes does not grow it.
//!
//! For the agent, chains are made position-independent (each frame's address becomes its file
//! offset in its module) and interned: every `python3` of a node shares one copy of each of its
//! chains, where a copy per process cost ~100 KB per exited process kept for the TTL.

mod queue;

pub use queue::Site;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use allocwatch_common::unwind::FRAME_EXACT;
use anyhow::anyhow;

use crate::{
    aggregate::call_chain,
    collect,
    probes::Probes,
    symbolize::{Frame, SymbolizerHandle},
};

/// Raw stacks kept in userspace at most (each up to 64 frames); past it, stacks are read from
/// the kernel's table again when needed (where an evicted one is counted).
const MAX_RAW_STACKS: usize = 100_000;

/// One process's chains by (stack id, caller).
type Chains = HashMap<(i64, u64), Arc<[Frame]>>;

/// Symbolized call chains by (process, stack, caller), filled while the process is alive.
#[derive(Default)]
pub struct FrameCache {
    chains: HashMap<u32, Chains>,
    /// Position-independent chains, shared by every process that has them (agent only).
    interned: Option<HashSet<Arc<[Frame]>>>,
    /// Processes whose mappings were snapshotted.
    pub noted: HashSet<u32>,
    /// Chains that could not be symbolized because the process was gone.
    pub process_gone: u64,
    /// Raw stacks copied out of the kernel's LRU table when their site was first seen, by
    /// process and stack id.
    raw: HashMap<u32, HashMap<i64, Vec<u64>>>,
    raw_count: usize,
    /// Stack ids no longer in the kernel table when read (evicted): the chain keeps its caller.
    pub stacks_evicted: u64,
    /// Sites of a gone process not named yet when its detail left (a starved node): exported
    /// in `other` for good.
    pub out_of_time: u64,
    /// Sites to name, oldest first per process, processes in turn: named while their process
    /// lives (the agent's in the background, before a scrape needs them; a session's as soon
    /// as they come).
    queue: queue::NamingQueue,
    /// Sites a scrape ran out of time to name, by process: since when (see [`Self::late_for`]).
    late: HashMap<u32, HashMap<(i64, u64), Instant>>,
    /// Gone processes (and ended program images) whose sites are named ahead of the others',
    /// in the background: whether the process's raw stacks go once none is left waiting.
    finishing: HashMap<u32, bool>,
}

/// Sites asked of the symbolizer at once by [`FrameCache::name_queued`]: enough to keep it
/// busy between wake-ups, few enough that sites given up at a deadline are few.
const PIPELINE: usize = 32;

/// Sites waiting to be named at most; past it the oldest of the process with most waiting
/// wait for a scrape or their process's exit instead.
const MAX_QUEUED: usize = 100_000;

impl FrameCache {
    /// A cache whose chains are position-independent and shared between processes (the
    /// agent's: it names sites by module and offset, never by a randomized address).
    pub fn interning() -> Self {
        Self {
            interned: Some(HashSet::new()),
            ..Self::default()
        }
    }

    /// A chain already symbolized, without waiting.
    pub fn cached(&self, tgid: u32, stack_id: i64, ret_addr: u64) -> Option<&Arc<[Frame]>> {
        self.chains.get(&tgid)?.get(&(stack_id, ret_addr))
    }

    /// Drops interned chains no process refers to any more.
    pub fn purge(&mut self) {
        if let Some(set) = &mut self.interned {
            set.retain(|c| Arc::strong_count(c) > 1);
        }
    }

    /// The shared copy of `frames` (made position-independent first), or `frames` itself.
    fn intern(&mut self, mut frames: Vec<Frame>) -> Arc<[Frame]> {
        let Some(set) = &mut self.interned else {
            return frames.into();
        };
        for f in &mut frames {
            if let Some(offset) = f.offset {
                f.address = offset;
            }
        }
        let chain: Arc<[Frame]> = frames.into();
        if let Some(shared) = set.get(&chain) {
            return Arc::clone(shared);
        }
        set.insert(Arc::clone(&chain));
        chain
    }

    /// Sites waiting to be named.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Queues a new site to be named in the background ([`Self::name_queued`]).
    pub fn queue(&mut self, tgid: u32, stack_id: i64, ret_addr: u64) {
        let site = (tgid, stack_id, ret_addr);
        if self.queue.contains(&site) || self.cached(tgid, stack_id, ret_addr).is_some() {
            return;
        }
        self.queue.push_back(site, MAX_QUEUED);
    }

    /// Names queued sites until `deadline` (all of them without); how many were named. Up to
    /// [`PIPELINE`] sites are asked of the symbolizer at once while it has nothing else queued.
    pub async fn name_queued(
        &mut self,
        probes: &Probes,
        symbolizer: &SymbolizerHandle,
        deadline: Option<Instant>,
    ) -> anyhow::Result<usize> {
        let mut named = 0;
        while deadline.is_none_or(|d| Instant::now() < d) {
            // A busy symbolizer (a cold file being parsed) gets one site at a time, as sites
            // asked and then given up at the deadline are asked again.
            let take = if symbolizer.queued() == 0 {
                PIPELINE
            } else {
                1
            };
            let mut batch = Vec::with_capacity(take);
            while batch.len() < take {
                let Some(site) = self.queue.pop() else {
                    break;
                };
                if self.cached(site.0, site.1, site.2).is_none() {
                    batch.push(site);
                }
            }
            if batch.is_empty() {
                break;
            }
            let asked = batch.len();
            let late = self.name_sites(probes, symbolizer, batch, deadline).await?;
            named += asked - late.len();
            if !late.is_empty() {
                // Out of time: first in line next time, in their order.
                for site in late.into_iter().rev() {
                    self.queue.push_front(site);
                }
                break;
            }
        }
        self.settle();
        Ok(named)
    }

    /// Names `sites` of `tgid`, a process that is gone (`forget_raw`: its raw stacks go once
    /// they are named) or a program image that ended at exec, ahead of the living's, by
    /// [`Self::name_queued`]: never awaited whole in the loop (a cold, large module took
    /// seconds).
    pub fn finish(
        &mut self,
        tgid: u32,
        sites: impl IntoIterator<Item = (i64, u64)>,
        forget_raw: bool,
    ) {
        for (stack_id, ret_addr) in sites {
            self.queue(tgid, stack_id, ret_addr);
        }
        self.queue.hasten(tgid);
        let f = self.finishing.entry(tgid).or_default();
        *f |= forget_raw;
        self.settle();
    }

    /// Processes whose finishing sites are all named (or dropped): their raw stacks go.
    fn settle(&mut self) {
        let done: Vec<(u32, bool)> = self
            .finishing
            .iter()
            .filter(|(pid, _)| !self.queue.has_line(**pid))
            .map(|(&pid, &f)| (pid, f))
            .collect();
        for (pid, forget_raw) in done {
            self.finishing.remove(&pid);
            self.queue.unhasten(pid);
            if forget_raw {
                self.forget_raw(pid);
            }
        }
    }

    /// Drops everything about a process that is gone for good.
    pub fn forget(&mut self, tgid: u32) {
        self.finishing.remove(&tgid);
        self.chains.remove(&tgid);
        self.queue.forget(tgid);
        self.noted.remove(&tgid);
        self.late.remove(&tgid);
        self.forget_raw(tgid);
    }

    /// How long a site not named yet has been waiting since a scrape first ran out of time
    /// for it (zero the first time): a young one is held back from `/metrics`, not exported
    /// unnamed for good.
    pub fn late_for(
        &mut self,
        (tgid, stack_id, ret_addr): (u32, i64, u64),
        now: Instant,
    ) -> Duration {
        let since = *self
            .late
            .entry(tgid)
            .or_default()
            .entry((stack_id, ret_addr))
            .or_insert(now);
        now.saturating_duration_since(since)
    }

    /// Drops the raw stacks of a process whose chains are all symbolized (or never will be).
    pub fn forget_raw(&mut self, tgid: u32) {
        if let Some(r) = self.raw.remove(&tgid) {
            self.raw_count -= r.len();
        }
    }

    /// Drops the chains of sites that will not be shown again.
    pub fn forget_chains(&mut self, tgid: u32, sites: impl IntoIterator<Item = (i64, u64)>) {
        if let Some(c) = self.chains.get_mut(&tgid) {
            for s in sites {
                c.remove(&s);
            }
            c.shrink_to_fit();
        }
    }

    /// Sites a scrape had no time to name that are still not named (held back from
    /// `/metrics` for a while, then in `other`).
    pub fn late_sites(&self) -> usize {
        self.late.values().map(HashMap::len).sum()
    }

    /// Chains (per process, and distinct) and raw stacks held, for the agent's self-metrics.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (
            self.chains.values().map(HashMap::len).sum(),
            self.interned.as_ref().map_or(0, HashSet::len),
            self.raw_count,
        )
    }

    /// Copies stack `id` of `tgid` out of the kernel table now, before the LRU table can evict
    /// it.
    pub fn remember_stack(&mut self, probes: &Probes, tgid: u32, id: i64) -> anyhow::Result<()> {
        if id < 0 || self.raw_of(tgid, id).is_some() {
            return Ok(());
        }
        let stack = collect::stack(probes, id)?;
        self.keep(tgid, id, stack);
        Ok(())
    }

    /// Keeps the frames of stack `id` that a new-site event carried; without them (stacks
    /// off, or the kernel had already lost the stack) the stack is read from the table.
    pub fn remember_event_stack(
        &mut self,
        probes: &Probes,
        tgid: u32,
        id: i64,
        frames: Vec<u64>,
    ) -> anyhow::Result<()> {
        if id < 0 || self.raw_of(tgid, id).is_some() {
            return Ok(());
        }
        if frames.is_empty() {
            return self.remember_stack(probes, tgid, id);
        }
        self.keep(tgid, id, frames);
        Ok(())
    }

    /// The frames of stack `id` of `tgid` kept from its event or read from the table.
    pub fn raw_stack(&self, tgid: u32, id: i64) -> Option<&[u64]> {
        self.raw_of(tgid, id).map(Vec::as_slice)
    }

    fn raw_of(&self, tgid: u32, id: i64) -> Option<&Vec<u64>> {
        self.raw.get(&tgid)?.get(&id)
    }

    fn keep(&mut self, tgid: u32, id: i64, stack: Vec<u64>) {
        if stack.is_empty() {
            return;
        }
        // A new site under a finishing pid is a new process's (the pid reused): its stacks stay.
        if let Some(forget_raw) = self.finishing.get_mut(&tgid) {
            *forget_raw = false;
        }
        // Bounded: past this, stacks are re-read from the table as needed.
        if self.raw_count >= MAX_RAW_STACKS {
            self.raw.clear();
            self.raw_count = 0;
        }
        if self
            .raw
            .entry(tgid)
            .or_default()
            .insert(id, stack)
            .is_none()
        {
            self.raw_count += 1;
        }
    }

    /// The symbolized call chain of a site, innermost first; symbolized on first use.
    pub async fn frames(
        &mut self,
        probes: &Probes,
        symbolizer: &SymbolizerHandle,
        tgid: u32,
        stack_id: i64,
        ret_addr: u64,
    ) -> anyhow::Result<Vec<Frame>> {
        let chain = self
            .frames_until(probes, symbolizer, (tgid, stack_id, ret_addr), None)
            .await?;
        Ok(chain.map(|c| c.to_vec()).unwrap_or_default())
    }

    /// [`Self::frames`], or `None` if the symbolizer has not answered by `deadline` (a cold
    /// file being parsed): the answer is cached on its side, so a later call is quick.
    pub async fn frames_until(
        &mut self,
        probes: &Probes,
        symbolizer: &SymbolizerHandle,
        site @ (tgid, stack_id, ret_addr): (u32, i64, u64),
        deadline: Option<Instant>,
    ) -> anyhow::Result<Option<Arc<[Frame]>>> {
        self.name_sites(probes, symbolizer, vec![site], deadline)
            .await?;
        Ok(self.cached(tgid, stack_id, ret_addr).map(Arc::clone))
    }

    /// Names and caches the call chains of `sites` (not cached yet are asked of the
    /// symbolizer all at once, then awaited in order); returns those not answered by
    /// `deadline`, in order.
    pub async fn name_sites(
        &mut self,
        probes: &Probes,
        symbolizer: &SymbolizerHandle,
        sites: Vec<Site>,
        deadline: Option<Instant>,
    ) -> anyhow::Result<Vec<Site>> {
        let mut asked = Vec::with_capacity(sites.len());
        let mut seen = HashSet::with_capacity(sites.len());
        for site @ (tgid, stack_id, ret_addr) in sites {
            if self.cached(tgid, stack_id, ret_addr).is_some() || !seen.insert(site) {
                continue;
            }
            let stack = match self.raw_of(tgid, stack_id) {
                Some(s) => s.clone(),
                None => collect::stack(probes, stack_id)?,
            };
            if stack_id >= 0 && stack.is_empty() {
                self.stacks_evicted += 1;
            }
            let chain = call_chain(ret_addr, &stack);
            let answer = symbolizer
                .ask(tgid, chain.clone())
                .map_err(|e| anyhow!("symbolizing pid {tgid}: {e}"))?;
            asked.push((site, chain, answer));
        }
        let mut asked = asked.into_iter();
        while let Some((site @ (tgid, stack_id, ret_addr), chain, answer)) = asked.next() {
            let answer = match deadline {
                None => answer.await,
                Some(d) => match tokio::time::timeout_at(d.into(), answer).await {
                    Ok(a) => a,
                    Err(_) => {
                        let late = std::iter::once(site).chain(asked.map(|(s, ..)| s));
                        return Ok(late.collect());
                    }
                },
            };
            let frames = match answer {
                Ok(frames) => frames,
                Err(e) if e.is_process_gone() => {
                    self.process_gone += 1;
                    chain
                        .iter()
                        .map(|&a| Frame::unknown(a & !FRAME_EXACT))
                        .collect()
                }
                Err(e) => return Err(anyhow!("symbolizing pid {tgid}: {e}")),
            };
            let frames = self.intern(frames);
            self.chains
                .entry(tgid)
                .or_default()
                .insert((stack_id, ret_addr), frames);
            if let Some(late) = self.late.get_mut(&tgid) {
                late.remove(&(stack_id, ret_addr));
                if late.is_empty() {
                    self.late.remove(&tgid);
                }
            }
        }
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, module: &str, offset: u64, address: u64) -> Frame {
        Frame {
            function: Some(function.into()),
            module: Some(module.into()),
            offset: Some(offset),
            ..Frame::unknown(address)
        }
    }

    /// Two processes of one program, at randomized addresses: one shared, position-independent
    /// chain; an unnamed frame without a module keeps its address (it identifies nothing else).
    #[test]
    fn agent_chains_are_interned_by_module_and_offset() {
        let mut cache = FrameCache::interning();
        let a = cache.intern(vec![
            frame("leaf", "/bin/app", 0x1010, 0x5555_0000_1010),
            Frame::unknown(0x7fff_0000),
        ]);
        let b = cache.intern(vec![
            frame("leaf", "/bin/app", 0x1010, 0x6666_0000_1010),
            Frame::unknown(0x7fff_0000),
        ]);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a[0].address, 0x1010);
        assert_eq!(a[1].address, 0x7fff_0000);
        let c = cache.intern(vec![frame("other", "/bin/app", 0x2020, 0x5555_0000_2020)]);
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(cache.sizes().1, 2);
        drop((a, b, c));
        cache.purge();
        assert_eq!(cache.sizes().1, 0, "unreferenced chains are dropped");
        // The CLI's cache keeps real addresses.
        let mut cli = FrameCache::default();
        let d = cli.intern(vec![frame("leaf", "/bin/app", 0x1010, 0x5555_0000_1010)]);
        assert_eq!(d[0].address, 0x5555_0000_1010);
    }

    /// A gone process's raw stacks stay while any of its sites waits to be named (its sites
    /// served before a living process's), and go once none does; a new site under a finishing
    /// pid (reused by a new process) keeps them.
    #[test]
    fn finishing_keeps_raw_stacks_until_named() {
        let mut c = FrameCache::interning();
        c.keep(7, 1, vec![0x10, 0x20]);
        c.keep(8, 2, vec![0x30]);
        c.queue(3, 5, 0x40);
        c.finish(7, [(1, 0x11)], true);
        c.finish(8, [], true);
        assert!(c.raw_stack(7, 1).is_some());
        assert!(c.raw_stack(8, 2).is_none(), "nothing to name: gone at once");
        assert_eq!(c.queue.pop(), Some((7, 1, 0x11)), "the gone process first");
        assert!(c.raw_stack(7, 1).is_some());
        c.settle();
        assert!(c.raw_stack(7, 1).is_none());
        assert_eq!(c.queue.pop(), Some((3, 5, 0x40)));

        c.keep(10, 4, vec![0x60]);
        c.finish(10, [(4, 0x61)], true);
        c.keep(10, 6, vec![0x70]);
        assert_eq!(c.queue.pop(), Some((10, 4, 0x61)));
        c.settle();
        assert!(c.raw_stack(10, 4).is_some() && c.raw_stack(10, 6).is_some());
        assert!(c.finishing.is_empty());
        // An ended image's sites: named first, the process's stacks stay.
        c.finish(10, [(6, 0x71)], false);
        assert_eq!(c.queue.pop(), Some((10, 6, 0x71)));
        c.settle();
        assert!(c.raw_stack(10, 6).is_some());
    }
}
