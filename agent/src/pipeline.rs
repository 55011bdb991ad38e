//! The event pipeline of the CLI sessions and the agent alike: the loaded probes, the ring
//! buffer of their records, and the call chains named from them. One drain-and-handle: every
//! record is decoded here (malformed ones counted), its user stack copied out before the
//! kernel's LRU table can evict it, and its site queued to be named while its process lives;
//! what else a record means is the consumer's ([`Handler`]).

use allocwatch_common::{
    Event, ImageHists, event::GoEvent, go::GoAggKey, libc::SiteKey, map_names,
};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::{
    collect::{self, Cursor, RawMap},
    frames::FrameCache,
    goagg::{GoAgg, Take},
    probes::Probes,
    symbolize::SymbolizerHandle,
};

/// Counters of the pipeline itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopStats {
    pub events_processed: u64,
    pub malformed_records: u64,
}

/// The probes and what is made of their records.
pub struct Parts {
    pub probes: Probes,
    pub frames: FrameCache,
    pub symbolizer: SymbolizerHandle,
}

/// What a consumer does with each record, after the shared steps.
pub trait Handler {
    /// A process exec'd `path` (only the agent attaches the exec tracepoint).
    fn exec(&mut self, _parts: &mut Parts, _tgid: u32, _comm: &[u8; 16], _path: String) {}
    /// The size histograms a process's program left at its exec, just before that exec's
    /// record (only the agent asks for them).
    fn image_hists(&mut self, _parts: &mut Parts, _tgid: u32, _hists: ImageHists) {}
    /// A followed process created child process `child` (`followed`: the kernel follows it;
    /// false: its followed-set map was full). Only a session that follows a tree sees these.
    fn fork(&mut self, _parts: &mut Parts, _child: u32, _parent: u32, _followed: bool) {}
    /// A followed process exited (its `exit_group` status, if it called it).
    fn exit(&mut self, _parts: &mut Parts, _tgid: u32, _code: Option<u8>) {}
    /// A new call site of a libc allocator.
    fn new_site(&mut self, parts: &mut Parts, site: &SiteKey, comm: &[u8; 16]);
    /// A Go runtime event (a growth, a large allocation, a GC step).
    fn go(&mut self, parts: &mut Parts, event: &GoEvent);
    /// `n` more Go growth events like `event` (the first of their key, already handed to
    /// [`Self::go`]), counted in the kernel (`GO_AGG`).
    fn go_repeats(&mut self, event: &GoEvent, n: u64);
}

/// The ring buffer and the parts it feeds.
pub struct Pipeline {
    pub parts: Parts,
    ring: AsyncFd<RingBuf<MapData>>,
    events: Vec<Event>,
    pub stats: LoopStats,
    /// The first record of each Go growth key counted in the kernel.
    pub go_agg: GoAgg,
}

impl Pipeline {
    /// Takes the ring buffer out of the loaded probes (before anything can fill it unread).
    pub fn new(
        mut probes: Probes,
        frames: FrameCache,
        symbolizer: SymbolizerHandle,
    ) -> anyhow::Result<Self> {
        let ring = collect::take_events(&mut probes)?;
        // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from)?;
        Ok(Self {
            parts: Parts {
                probes,
                frames,
                symbolizer,
            },
            ring,
            events: Vec::new(),
            stats: LoopStats::default(),
            go_agg: GoAgg::default(),
        })
    }

    /// Waits until records are ready; [`Self::drain`] reads them.
    pub async fn readable(&mut self) -> std::io::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        // Cleared before the drain reads: a record arriving after it wakes the loop again.
        guard.clear_ready();
        Ok(())
    }

    /// Reads every record ready in the ring and handles it.
    pub fn drain(&mut self, handler: &mut impl Handler) -> anyhow::Result<()> {
        self.stats.malformed_records += collect::drain(self.ring.get_mut(), &mut self.events);
        self.stats.events_processed += self.events.len() as u64;
        let parts = &mut self.parts;
        for ev in self.events.drain(..) {
            match ev {
                Event::Exec(tgid, comm, path) => {
                    // The old program's counts go to it, before its state becomes the past.
                    flush_go_agg(parts, &mut self.go_agg, tgid, handler)?;
                    handler.exec(parts, tgid, &comm, path);
                }
                Event::ImageHist(tgid, hists) => handler.image_hists(parts, tgid, hists),
                Event::Fork(child, parent, followed) => {
                    handler.fork(parts, child, parent, followed);
                }
                Event::Exit(tgid, code) => handler.exit(parts, tgid, code),
                Event::NewSite(site, comm, stack) => {
                    parts.frames.remember_event_stack(
                        &parts.probes,
                        site.tgid,
                        site.stack_id,
                        stack,
                    )?;
                    // A process's row of unknown sites has nothing to name.
                    if !site.is_spill() {
                        parts.frames.queue(site.tgid, site.stack_id, site.ret_addr);
                    }
                    handler.new_site(parts, &site, &comm);
                }
                Event::Go(g) => {
                    let tgid = g.header.tgid;
                    parts
                        .frames
                        .remember_stack(&parts.probes, tgid, g.stack_id)?;
                    parts.frames.queue(tgid, g.stack_id, g.ret_addr);
                    self.go_agg.note(&g);
                    handler.go(parts, &g);
                }
            }
        }
        Ok(())
    }

    /// Hands on what the kernel counted in `GO_AGG` since the last drain (records first: a
    /// count whose record is still in the ring waits for it), then takes the keys of gone
    /// processes out of the kernel (their counts are final once read after they were gone).
    pub fn drain_go_agg(&mut self, handler: &mut impl Handler) -> anyhow::Result<()> {
        self.drain(handler)?;
        let parts = &mut self.parts;
        let name = map_names::GO_AGG;
        let Some(map) = parts.probes.map(name) else {
            // Probes without Go programs (the benchmark's floors) have no aggregate.
            return Ok(());
        };
        let map = RawMap::of::<GoAggKey, u64>(map, name)?;
        // Gone before the read: nothing adds to their keys any more.
        let gone: Vec<u32> = self
            .go_agg
            .tgids()
            .into_iter()
            .filter(|&t| !process_exists(t))
            .collect();
        let mut counts: Vec<(GoAggKey, u64)> = Vec::new();
        let mut cursor = Cursor::default();
        map.scan(
            &mut cursor,
            map.max_entries() as usize,
            |k: &GoAggKey, v: &[u64]| {
                counts.push((*k, v.iter().sum()));
            },
        )?;
        // Key order: a map's growths at a reused address in the order of its (count, B).
        counts.sort_unstable();
        let mut orphans = Vec::new();
        for (key, total) in counts {
            match self.go_agg.take(&key, total) {
                Take::Repeat(first, n) => handler.go_repeats(&first, n),
                Take::Nothing => {}
                Take::Pending => {
                    if !process_exists(key.tgid) && self.go_agg.orphan(key) {
                        log::debug!(
                            "GO_AGG: {} counts of pid {} without a record",
                            total,
                            key.tgid
                        );
                        orphans.push(key);
                    }
                }
            }
        }
        let mut done: Vec<GoAggKey> = gone
            .into_iter()
            .flat_map(|t| self.go_agg.keys_of(t))
            .collect();
        done.extend(orphans);
        map.delete(&done)?;
        self.go_agg.forget(&done);
        Ok(())
    }

    /// Growth events sent as records because `GO_AGG` was full (all CPUs).
    pub fn go_agg_full(&self) -> anyhow::Result<u64> {
        let Some(map) = self.parts.probes.map(map_names::GO_AGG_FULL) else {
            return Ok(0);
        };
        let a = PerCpuArray::<_, u64>::try_from(map)?;
        Ok(a.get(&0, 0)?.iter().sum())
    }

    /// Names the queued sites until `deadline` (every one without).
    pub async fn name_queued(
        &mut self,
        deadline: Option<std::time::Instant>,
    ) -> anyhow::Result<usize> {
        let Parts {
            probes,
            frames,
            symbolizer,
        } = &mut self.parts;
        frames.name_queued(probes, symbolizer, deadline).await
    }
}

/// Hands on and deletes `tgid`'s keys now (its program is replaced at exec: its threads are
/// gone, so their counts are final).
fn flush_go_agg(
    parts: &mut Parts,
    agg: &mut GoAgg,
    tgid: u32,
    handler: &mut impl Handler,
) -> anyhow::Result<()> {
    let keys = agg.keys_of(tgid);
    if keys.is_empty() {
        return Ok(());
    }
    let name = map_names::GO_AGG;
    let Some(map) = parts.probes.map(name) else {
        return Ok(());
    };
    let map = RawMap::of::<GoAggKey, u64>(map, name)?;
    let mut values = Vec::new();
    for key in &keys {
        if map.lookup(key, &mut values)?
            && let Take::Repeat(first, n) = agg.take(key, values.iter().sum())
        {
            handler.go_repeats(&first, n);
        }
    }
    map.delete(&keys)?;
    agg.forget(&keys);
    Ok(())
}

fn process_exists(tgid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{tgid}")).exists()
}
