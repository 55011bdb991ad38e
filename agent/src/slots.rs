//! Slots of the probe's fixed-size arrays (the unwind tables' rows, the Go probes' capture
//! specs), handed out in ranges to files and given back when a file's table or probes go: a
//! node runs new files for as long as the agent lives.

use std::collections::BTreeMap;

/// The free slots of a fixed-size array: disjoint ranges, first slot to length, merged with
/// their neighbours when freed.
#[derive(Debug)]
pub struct Ranges {
    free: BTreeMap<u32, u32>,
    capacity: u32,
}

impl Ranges {
    pub fn new(capacity: u32) -> Self {
        Self {
            free: BTreeMap::from([(0, capacity)]),
            capacity,
        }
    }

    /// The first free range of `len` slots (lowest first), taken.
    pub fn alloc(&mut self, len: u32) -> Option<u32> {
        let (&first, &have) = self.free.iter().find(|&(_, &have)| have >= len)?;
        self.free.remove(&first);
        if have > len {
            self.free.insert(first + len, have - len);
        }
        Some(first)
    }

    /// Gives back `first..first + len`, merged with the free ranges it touches.
    pub fn release(&mut self, first: u32, len: u32) {
        let (mut start, mut end) = (first, first + len);
        if let Some((&prev, &plen)) = self.free.range(..first).next_back()
            && prev + plen == first
        {
            self.free.remove(&prev);
            start = prev;
        }
        if let Some(&next_len) = self.free.get(&end) {
            self.free.remove(&end);
            end += next_len;
        }
        self.free.insert(start, end - start);
    }

    pub fn free_rows(&self) -> u32 {
        self.free.values().sum()
    }

    pub fn used(&self) -> u32 {
        self.capacity - self.free_rows()
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_space_reuses_freed_ranges_and_merges_neighbours() {
        let mut space = Ranges::new(100);
        let a = space.alloc(30).unwrap();
        let b = space.alloc(30).unwrap();
        let c = space.alloc(30).unwrap();
        assert_eq!((a, b, c), (0, 30, 60));
        assert_eq!(space.alloc(11), None, "10 rows left");
        assert_eq!(space.used(), 90);
        // A hole between two tables takes a table that fits it, lowest first.
        space.release(b, 30);
        assert_eq!(space.alloc(25), Some(30));
        assert_eq!(space.free, BTreeMap::from([(55, 5), (90, 10)]));
        // Freed neighbours on both sides make one range again.
        space.release(a, 30);
        space.release(c, 30);
        assert_eq!(space.free, BTreeMap::from([(0, 30), (55, 45)]));
        space.release(30, 25);
        assert_eq!(space.free, BTreeMap::from([(0, 100)]));
        assert_eq!(space.used(), 0);
        assert_eq!(space.alloc(100), Some(0));
        assert_eq!(space.free_rows(), 0);
    }
}
