//! Symbolized call chains of sites, cached per (process, stack, caller). Filled when a site is
//! first seen, while its process is still alive; shared by the CLI sessions and the daemon.
//! Everything here is per process and goes with it ([`FrameCache::forget`]), so a node's churn
//! of short-lived processes does not grow it.

use std::collections::{HashMap, HashSet};

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

/// Symbolized call chains by (process, stack, caller), filled while the process is alive.
#[derive(Default)]
pub struct FrameCache {
    chains: HashMap<u32, HashMap<(i64, u64), Vec<Frame>>>,
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
}

impl FrameCache {
    /// A chain already symbolized, without waiting.
    pub fn cached(&self, tgid: u32, stack_id: i64, ret_addr: u64) -> Option<&[Frame]> {
        self.chains
            .get(&tgid)?
            .get(&(stack_id, ret_addr))
            .map(Vec::as_slice)
    }

    /// Drops everything about a process that is gone for good.
    pub fn forget(&mut self, tgid: u32) {
        self.chains.remove(&tgid);
        self.noted.remove(&tgid);
        self.forget_raw(tgid);
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

    /// Chains and raw stacks held, for the agent's self-metrics.
    pub fn sizes(&self) -> (usize, usize) {
        (self.chains.values().map(HashMap::len).sum(), self.raw_count)
    }

    /// Copies stack `id` of `tgid` out of the kernel table now, before the LRU table can evict
    /// it.
    pub fn remember_stack(&mut self, probes: &Probes, tgid: u32, id: i64) -> anyhow::Result<()> {
        if id < 0 || self.raw_of(tgid, id).is_some() {
            return Ok(());
        }
        let stack = collect::stack(&probes.ebpf, id)?;
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

    fn raw_of(&self, tgid: u32, id: i64) -> Option<&Vec<u64>> {
        self.raw.get(&tgid)?.get(&id)
    }

    fn keep(&mut self, tgid: u32, id: i64, stack: Vec<u64>) {
        if stack.is_empty() {
            return;
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
        Ok(chain.unwrap_or_default())
    }

    /// [`Self::frames`], or `None` if the symbolizer has not answered by `deadline` (a cold
    /// file being parsed): the answer is cached on its side, so a later call is quick.
    pub async fn frames_until(
        &mut self,
        probes: &Probes,
        symbolizer: &SymbolizerHandle,
        (tgid, stack_id, ret_addr): (u32, i64, u64),
        deadline: Option<std::time::Instant>,
    ) -> anyhow::Result<Option<Vec<Frame>>> {
        if let Some(f) = self.cached(tgid, stack_id, ret_addr) {
            return Ok(Some(f.to_vec()));
        }
        let stack = match self.raw_of(tgid, stack_id) {
            Some(s) => s.clone(),
            None => collect::stack(&probes.ebpf, stack_id)?,
        };
        if stack_id >= 0 && stack.is_empty() {
            self.stacks_evicted += 1;
        }
        let chain = call_chain(ret_addr, &stack);
        let asked = symbolizer.symbolize_async(tgid, chain.clone());
        let answer = match deadline {
            None => asked.await,
            Some(d) => match tokio::time::timeout_at(d.into(), asked).await {
                Ok(a) => a,
                Err(_) => return Ok(None),
            },
        };
        let frames = match answer {
            Ok(frames) => frames,
            Err(e) if e.is_process_gone() => {
                self.process_gone += 1;
                chain.iter().map(|&a| Frame::unknown(a)).collect()
            }
            Err(e) => return Err(anyhow!("symbolizing pid {tgid}: {e}")),
        };
        self.chains
            .entry(tgid)
            .or_default()
            .insert((stack_id, ret_addr), frames.clone());
        Ok(Some(frames))
    }
}
