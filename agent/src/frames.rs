//! Symbolized call chains of sites, cached per (process, stack, caller). Filled when a site is
//! first seen, while its process is still alive; shared by the CLI sessions and the daemon.

use std::collections::{HashMap, HashSet};

use anyhow::anyhow;

/// Raw stacks kept in userspace (each up to 64 frames).
const MAX_RAW_STACKS: usize = 200_000;

use crate::{
    aggregate::call_chain,
    collect,
    probes::Probes,
    symbolize::{Frame, SymbolizerHandle},
};

/// Symbolized call chains by (process, stack, caller), filled while the process is alive.
#[derive(Default)]
pub struct FrameCache {
    chains: HashMap<(u32, i32, u64), Vec<Frame>>,
    /// Processes whose mappings were snapshotted.
    pub noted: HashSet<u32>,
    /// Chains that could not be symbolized because the process was gone.
    pub process_gone: u64,
    /// Raw stacks copied out of the kernel's LRU table when their site was first seen.
    raw: HashMap<i32, Vec<u64>>,
    /// Stack ids no longer in the kernel table when read (evicted): the chain keeps its caller.
    pub stacks_evicted: u64,
}

impl FrameCache {
    /// A chain already symbolized, without waiting.
    pub fn cached(&self, tgid: u32, stack_id: i32, ret_addr: u64) -> Option<&[Frame]> {
        self.chains
            .get(&(tgid, stack_id, ret_addr))
            .map(Vec::as_slice)
    }

    /// Drops everything about an exited process whose series expired.
    pub fn forget(&mut self, tgid: u32) {
        self.chains.retain(|&(t, _, _), _| t != tgid);
        self.noted.remove(&tgid);
    }

    /// Copies stack `id` out of the kernel table now, before the LRU table can evict it.
    pub fn remember_stack(&mut self, probes: &Probes, id: i32) -> anyhow::Result<()> {
        if id < 0 || self.raw.contains_key(&id) {
            return Ok(());
        }
        let stack = collect::stack(&probes.ebpf, id)?;
        self.keep(id, stack);
        Ok(())
    }

    /// Keeps the frames of stack `id` that a new-site event carried; without them (stacks
    /// off, or the kernel had already lost the stack) the stack is read from the table.
    pub fn remember_event_stack(
        &mut self,
        probes: &Probes,
        id: i32,
        frames: Vec<u64>,
    ) -> anyhow::Result<()> {
        if id < 0 || self.raw.contains_key(&id) {
            return Ok(());
        }
        if frames.is_empty() {
            return self.remember_stack(probes, id);
        }
        self.keep(id, frames);
        Ok(())
    }

    fn keep(&mut self, id: i32, stack: Vec<u64>) {
        if stack.is_empty() {
            return;
        }
        // Bounded: past this, stacks are re-read from the table as needed.
        if self.raw.len() >= MAX_RAW_STACKS {
            self.raw.clear();
        }
        self.raw.insert(id, stack);
    }

    /// The symbolized call chain of a site, innermost first; symbolized on first use.
    pub async fn frames(
        &mut self,
        probes: &Probes,
        symbolizer: &SymbolizerHandle,
        tgid: u32,
        stack_id: i32,
        ret_addr: u64,
    ) -> anyhow::Result<Vec<Frame>> {
        let key = (tgid, stack_id, ret_addr);
        if let Some(f) = self.chains.get(&key) {
            return Ok(f.clone());
        }
        let stack = match self.raw.get(&stack_id) {
            Some(s) => s.clone(),
            None => collect::stack(&probes.ebpf, stack_id)?,
        };
        if stack_id >= 0 && stack.is_empty() {
            self.stacks_evicted += 1;
        }
        let chain = call_chain(ret_addr, &stack);
        let frames = match symbolizer.symbolize_async(tgid, chain.clone()).await {
            Ok(frames) => frames,
            Err(e) if e.is_process_gone() => {
                self.process_gone += 1;
                chain.iter().map(|&a| Frame::unknown(a)).collect()
            }
            Err(e) => return Err(anyhow!("symbolizing pid {tgid}: {e}")),
        };
        self.chains.insert(key, frames.clone());
        Ok(frames)
    }
}
