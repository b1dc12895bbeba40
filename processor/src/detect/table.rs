//! Bounded per-key detector state. A processor sees every device of its partitions for
//! as long as it runs, so state must not grow with the fleet's lifetime: entries idle
//! for longer than `idle_ttl` are dropped first, and when the table is still full the
//! least recently seen tenth goes, so inserts stay amortised O(1).

use std::collections::HashMap;
use std::hash::Hash;

/// A map whose size never exceeds `capacity`; "now" is always a parameter.
#[derive(Debug)]
pub struct StateTable<K, T> {
    entries: HashMap<K, (T, i64)>,
    capacity: usize,
    idle_ttl_ms: i64,
}

impl<K: Hash + Eq + Clone, T> StateTable<K, T> {
    pub fn new(capacity: usize, idle_ttl_ms: i64) -> Self {
        Self {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            idle_ttl_ms,
        }
    }

    /// The state of `key`, created by `init` when absent; marks it seen at `now_ms`.
    pub fn entry(&mut self, key: &K, now_ms: i64, init: impl FnOnce() -> T) -> &mut T {
        if !self.entries.contains_key(key) {
            if self.entries.len() >= self.capacity {
                self.evict(now_ms);
            }
            self.entries.insert(key.clone(), (init(), now_ms));
        }
        let (state, seen) = self.entries.get_mut(key).expect("inserted above");
        *seen = (*seen).max(now_ms);
        state
    }

    pub fn get(&self, key: &K) -> Option<&T> {
        self.entries.get(key).map(|(t, _)| t)
    }

    pub fn remove(&mut self, key: &K) -> Option<T> {
        self.entries.remove(key).map(|(t, _)| t)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn evict(&mut self, now_ms: i64) {
        let cutoff = now_ms.saturating_sub(self.idle_ttl_ms);
        self.entries.retain(|_, (_, seen)| *seen >= cutoff);
        if self.entries.len() < self.capacity {
            return;
        }
        let mut seen: Vec<i64> = self.entries.values().map(|(_, s)| *s).collect();
        let drop = (self.capacity / 10).max(1).min(seen.len() - 1);
        let (_, nth, _) = seen.select_nth_unstable(drop);
        let nth = *nth;
        let mut budget = drop;
        // Ties at the cut-off are dropped only up to the budget, so eviction never
        // empties a table whose entries were all seen at the same instant.
        self.entries.retain(|_, (_, s)| {
            let evict = *s < nth || (*s == nth && budget > 0);
            if evict && *s == nth {
                budget -= 1;
            }
            !evict
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_exceeds_capacity_and_drops_the_idlest() {
        let mut t: StateTable<u32, ()> = StateTable::new(10, 1_000_000);
        for k in 0..100u32 {
            t.entry(&k, i64::from(k), || ());
            assert!(t.len() <= 10);
        }
        assert!(t.get(&99).is_some());
        assert!(t.get(&0).is_none());
    }

    #[test]
    fn idle_entries_go_first() {
        let mut t: StateTable<u32, u32> = StateTable::new(3, 100);
        t.entry(&1, 0, || 1);
        t.entry(&2, 500, || 2);
        t.entry(&3, 500, || 3);
        t.entry(&4, 550, || 4);
        assert!(t.get(&1).is_none(), "idle past ttl");
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn same_instant_ties_keep_most_entries() {
        let mut t: StateTable<u32, ()> = StateTable::new(20, 1_000_000);
        for k in 0..21u32 {
            t.entry(&k, 7, || ());
        }
        assert!(t.len() >= 18, "{}", t.len());
        assert!(t.get(&20).is_some());
    }
}
