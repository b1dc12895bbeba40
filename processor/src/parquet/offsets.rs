//! Which Kafka offset may be committed per partition without losing a row.
//!
//! A Kafka partition carries many fleets, and rows are buffered per (partition, fleet,
//! hour) until their file is durable. The offset committed for a partition is where a
//! restarted consumer resumes, so it must not pass any row still held in memory:
//! it is the smallest first offset over the partition's open buffers, or, with none
//! open, one past the last record consumed from it. Rows below it are all in
//! durable files (or were deliberately skipped); rows at or above it are re-read after
//! a crash and the files already covering them are recognised by name (see
//! [`super::durable`]), so they are not written twice.

use std::collections::{BTreeSet, HashMap};

/// Per-partition consume position, open-buffer starts and last commit.
#[derive(Debug, Default)]
pub struct CommitTracker {
    partitions: HashMap<i32, PartitionState>,
}

#[derive(Debug, Default)]
struct PartitionState {
    /// One past the highest offset consumed.
    next: Option<i64>,
    /// First offsets of buffers not yet durable.
    open: BTreeSet<i64>,
    committed: Option<i64>,
}

impl CommitTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was read from `partition` (whatever became of it).
    pub fn consumed(&mut self, partition: i32, offset: i64) {
        let state = self.partitions.entry(partition).or_default();
        state.next = Some(state.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// A buffer holding rows of `partition` from `first` on was opened.
    pub fn opened(&mut self, partition: i32, first: i64) {
        self.partitions
            .entry(partition)
            .or_default()
            .open
            .insert(first);
    }

    /// The buffer opened at `first` is durable (or was dropped on revocation).
    pub fn closed(&mut self, partition: i32, first: i64) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.open.remove(&first);
        }
    }

    /// The offset a restarted consumer may resume `partition` from without losing an
    /// unflushed row; `None` before anything was consumed from it.
    pub fn safe_offset(&self, partition: i32) -> Option<i64> {
        let state = self.partitions.get(&partition)?;
        let next = state.next?;
        Some(state.open.first().map_or(next, |&first| first.min(next)))
    }

    /// Partitions whose safe offset moved past their last commit, with that offset.
    pub fn pending_commits(&self) -> Vec<(i32, i64)> {
        let mut out: Vec<(i32, i64)> = self
            .partitions
            .keys()
            .filter_map(|&p| {
                let safe = self.safe_offset(p)?;
                let state = &self.partitions[&p];
                (state.committed.is_none_or(|c| safe > c)).then_some((p, safe))
            })
            .collect();
        out.sort_unstable();
        out
    }

    pub fn committed(&mut self, partition: i32, offset: i64) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.committed = Some(offset);
        }
    }

    /// The partition was revoked: its state belongs to its next owner.
    pub fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn open_buffer_holds_the_commit_back() {
        let mut t = CommitTracker::new();
        assert_eq!(t.safe_offset(0), None);
        t.consumed(0, 10);
        t.opened(0, 10);
        t.consumed(0, 11);
        t.opened(0, 11);
        t.consumed(0, 12);
        assert_eq!(t.safe_offset(0), Some(10));
        t.closed(0, 11);
        assert_eq!(t.safe_offset(0), Some(10));
        t.closed(0, 10);
        assert_eq!(t.safe_offset(0), Some(13));
        assert_eq!(t.pending_commits(), vec![(0, 13)]);
        t.committed(0, 13);
        assert!(t.pending_commits().is_empty());
        t.forget(0);
        assert_eq!(t.safe_offset(0), None);
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Next record of `partition` goes to buffer `key` of that partition.
        Record { partition: i32, key: u8 },
        /// Buffer `key` of `partition` becomes durable.
        Flush { partition: i32, key: u8 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0i32..3, 0u8..4).prop_map(|(partition, key)| Step::Record { partition, key }),
            1 => (0i32..3, 0u8..4).prop_map(|(partition, key)| Step::Flush { partition, key }),
        ]
    }

    proptest! {
        /// Whatever the interleaving of fleets and flushes, the safe offset never
        /// passes a row still in memory, every row below it is durable, and it never
        /// moves backwards.
        #[test]
        fn commit_never_passes_an_unflushed_row(steps in prop::collection::vec(step(), 0..300)) {
            let mut t = CommitTracker::new();
            let mut next_offset: BTreeMap<i32, i64> = BTreeMap::new();
            // (partition, key) -> offsets buffered
            let mut buffers: BTreeMap<(i32, u8), Vec<i64>> = BTreeMap::new();
            let mut durable: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
            let mut last_safe: BTreeMap<i32, i64> = BTreeMap::new();
            for s in steps {
                match s {
                    Step::Record { partition, key } => {
                        let off = next_offset.entry(partition).or_insert(100);
                        let buf = buffers.entry((partition, key)).or_default();
                        if buf.is_empty() {
                            t.opened(partition, *off);
                        }
                        buf.push(*off);
                        t.consumed(partition, *off);
                        *off += 1;
                    }
                    Step::Flush { partition, key } => {
                        if let Some(rows) = buffers.remove(&(partition, key)) {
                            t.closed(partition, rows[0]);
                            durable.entry(partition).or_default().extend(rows);
                        }
                    }
                }
                for (&p, &end) in &next_offset {
                    let safe = t.safe_offset(p).expect("consumed something");
                    prop_assert!(safe <= end);
                    for ((bp, _), rows) in &buffers {
                        if *bp == p {
                            prop_assert!(rows.iter().all(|&o| o >= safe), "safe {safe} passes {rows:?}");
                        }
                    }
                    let done = durable.get(&p).cloned().unwrap_or_default();
                    prop_assert!((100..safe).all(|o| done.contains(&o)));
                    let prev = last_safe.insert(p, safe).unwrap_or(i64::MIN);
                    prop_assert!(safe >= prev);
                    t.committed(p, safe);
                }
            }
        }
    }
}
