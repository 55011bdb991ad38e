//! The event pipeline of the CLI sessions and the agent alike: the loaded probes, the ring
//! buffer of their records, and the call chains named from them. One drain-and-handle: every
//! record is decoded here (malformed ones counted), its user stack copied out before the
//! kernel's LRU table can evict it, and its site queued to be named while its process lives;
//! what else a record means is the consumer's ([`Handler`]).

use allocwatch_common::{Event, ImageHists, event::GoEvent, libc::SiteKey};
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::{collect, frames::FrameCache, probes::Probes, symbolize::SymbolizerHandle};

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
}

/// The ring buffer and the parts it feeds.
pub struct Pipeline {
    pub parts: Parts,
    ring: AsyncFd<RingBuf<MapData>>,
    events: Vec<Event>,
    pub stats: LoopStats,
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
                Event::Exec(tgid, comm, path) => handler.exec(parts, tgid, &comm, path),
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
                    handler.go(parts, &g);
                }
            }
        }
        Ok(())
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
