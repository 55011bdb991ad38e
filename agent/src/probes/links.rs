//! The probes' links, owned apart from the programs so that they can be detached from any
//! thread, all at once: on SIGTERM the agent's main thread detaches them whatever step its
//! tracer is in, and the links' kernel-side waits overlap instead of adding up.

use std::sync::{Arc, Mutex, PoisonError};

/// How many threads detach the links.
const DETACH_THREADS: usize = 16;

/// An owned aya link (a uprobe or tracepoint link): dropping it detaches it.
type Link = Box<dyn Send>;

/// Every link of a [`super::Probes`]; a clone shares them.
#[derive(Clone, Default)]
pub struct Links(Arc<Mutex<Set>>);

#[derive(Default)]
struct Set {
    /// Each with its group: [`PERMANENT`], or a file's, detached with [`Links::detach_group`].
    links: Vec<(u64, Link)>,
    /// Detached: a link added later (a file attached while the agent stops) is detached at
    /// once.
    closed: bool,
}

/// The group of the links kept until the end.
pub const PERMANENT: u64 = 0;

impl Links {
    /// Keeps `link` of `group` until [`Links::detach_all`] or [`Links::detach_group`].
    pub fn add(&self, group: u64, link: impl Send + 'static) {
        let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if set.closed {
            drop(set);
            drop(link);
        } else {
            set.links.push((group, Box::new(link)));
        }
    }

    /// Detaches the links of `group` (not [`PERMANENT`]), concurrently; returns how many there
    /// were. When it returns, no probe of theirs runs any more.
    pub fn detach_group(&self, group: u64) -> usize {
        let taken: Vec<Link> = {
            let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let (taken, kept) = std::mem::take(&mut set.links)
                .into_iter()
                .partition(|(g, _)| *g == group && group != PERMANENT);
            set.links = kept;
            taken.into_iter().map(|(_, l)| l).collect()
        };
        let n = taken.len();
        detach_concurrently(taken);
        n
    }

    /// How many links are held.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .links
            .len()
    }

    /// Detaches every link, concurrently; returns how many there were. Links added after
    /// this are detached as they come.
    pub fn detach_all(&self) -> usize {
        let links = {
            let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            set.closed = true;
            std::mem::take(&mut set.links)
        };
        let links: Vec<Link> = links.into_iter().map(|(_, l)| l).collect();
        let n = links.len();
        detach_concurrently(links);
        n
    }
}

/// Drops `links` from several threads. Each detach waits for an RCU grace period in the
/// kernel (a uprobe's `uprobe_unregister_sync`, a tracepoint's
/// `tracepoint_synchronize_unregister`): one after another, 7 links took 180 ms on a 2-CPU
/// machine with two busy loops, and the wait grows with the load and the links. Waiting
/// together, they share grace periods (measured: 6 uprobe links in 95 ms, as one).
fn detach_concurrently(links: Vec<Link>) {
    let n = links.len().min(DETACH_THREADS);
    if n <= 1 {
        return drop(links);
    }
    let mut groups: Vec<Vec<Link>> = (0..n).map(|_| Vec::new()).collect();
    for (i, link) in links.into_iter().enumerate() {
        groups[i % n].push(link);
    }
    std::thread::scope(|s| {
        for group in groups {
            // A thread that cannot be started: its group is dropped here, in turn.
            let _ = std::thread::Builder::new()
                .name("detach".into())
                .spawn_scoped(s, move || drop(group));
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts its drops, as a link counts its detaches.
    struct Probe(Arc<AtomicUsize>);
    impl Drop for Probe {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn detaches_each_link_once_and_later_ones_at_once() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let links = Links::default();
        for i in 0..40 {
            links.add(i % 3, Probe(Arc::clone(&dropped)));
        }
        let other = links.clone();
        assert_eq!(other.held(), 40);
        assert_eq!(dropped.load(Ordering::SeqCst), 0);
        // A file's group goes alone; the permanent one only with the rest.
        assert_eq!(links.detach_group(2), 13);
        assert_eq!(dropped.load(Ordering::SeqCst), 13);
        assert_eq!(links.detach_group(PERMANENT), 0);
        assert_eq!(other.held(), 27);
        assert_eq!(other.detach_all(), 27);
        assert_eq!(dropped.load(Ordering::SeqCst), 40);
        links.add(PERMANENT, Probe(Arc::clone(&dropped)));
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            41,
            "added after: detached at once"
        );
        assert_eq!(links.held(), 0);
        assert_eq!(links.detach_all(), 0);
    }
}
