//! Per-device anti-replay over sequence numbers (RFC 4303-style sliding bitmap).
//! Guarantees: a seq is published at most once while it is inside the window; every
//! unseen seq newer than the window's low edge is accepted, in any order. A seq counts
//! as seen from the moment it is reserved; if its delivery fails it is released, so the
//! device's retry is accepted rather than mistaken for a duplicate. The map is sharded
//! (DashMap) and no lock is held across an await.

use std::sync::Arc;

use dashmap::DashMap;

use crate::identity::{DeviceId, FleetId};

/// What the window says about a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStatus {
    /// Never seen: reserved now, publish it.
    New,
    /// Already delivered to Kafka: acknowledge, never publish again.
    Duplicate,
    /// Reserved by a delivery still under way: the device must retry later.
    InFlight,
    /// Below the window's low edge: cannot be told from a replay.
    TooOld,
}

/// A sliding window of `width` sequence numbers ending at the highest seen.
#[derive(Debug, Clone)]
pub struct AntiReplayWindow {
    highest: u64,
    width: u64,
    /// Ring bitmap: bit `seq % width` is set when `seq` is inside the window and seen.
    bits: Box<[u64]>,
    /// Reserved but not yet delivered (small: bounded by events in flight per device).
    in_flight: Vec<u64>,
    gaps: u64,
}

impl AntiReplayWindow {
    /// `width` is rounded up to a multiple of 64 (at least 64).
    pub fn new(width: u64) -> Self {
        let words = width.max(64).div_ceil(64);
        Self {
            highest: 0,
            width: words * 64,
            bits: vec![0; words as usize].into_boxed_slice(),
            in_flight: Vec::new(),
            gaps: 0,
        }
    }

    /// A window restored from persisted state: every seq up to `highest` except
    /// `unstored` counts as seen (refused as duplicate or replay).
    pub fn seeded(width: u64, highest: u64, unstored: &[u64]) -> Self {
        let mut w = Self::new(width);
        w.highest = highest;
        w.bits.iter_mut().for_each(|word| *word = u64::MAX);
        for &s in unstored {
            if w.in_window(s) {
                w.set(s, false);
            }
        }
        w
    }

    /// Seqs inside the window that are not known to be stored (unseen or in flight):
    /// what must stay acceptable after a restart.
    pub fn unstored(&self) -> Vec<u64> {
        let low = self.highest.saturating_sub(self.width - 1).max(1);
        (low..=self.highest)
            .filter(|s| !self.bit(*s) || self.in_flight.contains(s))
            .collect()
    }

    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Sequence numbers skipped over when the window advanced (lost or still coming).
    pub fn gaps(&self) -> u64 {
        self.gaps
    }

    fn in_window(&self, seq: u64) -> bool {
        seq <= self.highest && seq + self.width > self.highest
    }

    fn bit(&self, seq: u64) -> bool {
        let i = seq % self.width;
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, seq: u64, on: bool) {
        let i = seq % self.width;
        let word = &mut self.bits[(i / 64) as usize];
        if on {
            *word |= 1 << (i % 64);
        } else {
            *word &= !(1 << (i % 64));
        }
    }

    /// Classifies `seq` without changing anything.
    pub fn status(&self, seq: u64) -> SeqStatus {
        if seq > self.highest {
            SeqStatus::New
        } else if !self.in_window(seq) {
            SeqStatus::TooOld
        } else if self.in_flight.contains(&seq) {
            SeqStatus::InFlight
        } else if self.bit(seq) {
            SeqStatus::Duplicate
        } else {
            SeqStatus::New
        }
    }

    /// Classifies `seq` and, if it is new, reserves it.
    pub fn reserve(&mut self, seq: u64) -> SeqStatus {
        let status = self.status(seq);
        if status != SeqStatus::New {
            return status;
        }
        if seq > self.highest {
            let advance = seq - self.highest;
            if advance >= self.width {
                self.bits.iter_mut().for_each(|w| *w = 0);
            } else {
                for s in self.highest + 1..seq {
                    self.set(s, false);
                }
            }
            self.gaps += advance - 1;
            self.highest = seq;
        } else {
            // An out-of-order arrival fills a gap counted earlier.
            self.gaps = self.gaps.saturating_sub(1);
        }
        self.set(seq, true);
        // Reservations that fell out of the window can never be released usefully.
        let (highest, width) = (self.highest, self.width);
        self.in_flight.retain(|s| s + width > highest);
        self.in_flight.push(seq);
        status
    }

    /// The reserved `seq` was delivered: from now on it is a duplicate.
    pub fn commit(&mut self, seq: u64) {
        self.in_flight.retain(|s| *s != seq);
    }

    /// The reserved `seq` was not delivered: forget it so a retry is accepted.
    pub fn release(&mut self, seq: u64) {
        let before = self.in_flight.len();
        self.in_flight.retain(|s| *s != seq);
        if before != self.in_flight.len() && self.in_window(seq) {
            self.set(seq, false);
        }
    }
}

/// Anti-replay windows of every device seen by this node.
#[derive(Debug)]
pub struct ReplayWindows {
    width: u64,
    devices: DashMap<(FleetId, DeviceId), AntiReplayWindow>,
}

impl ReplayWindows {
    pub fn new(width: u64) -> Arc<Self> {
        Arc::new(Self {
            width,
            devices: DashMap::new(),
        })
    }

    /// Runs `f` on the device's window under its shard lock (never across an await).
    pub fn with<R>(
        &self,
        fleet: &FleetId,
        device: &DeviceId,
        f: impl FnOnce(&mut AntiReplayWindow) -> R,
    ) -> R {
        let mut entry = self
            .devices
            .entry((fleet.clone(), device.clone()))
            .or_insert_with(|| AntiReplayWindow::new(self.width));
        f(entry.value_mut())
    }

    /// Restores a device's persisted high-water mark (never lowers what is known).
    pub fn seed(&self, fleet: FleetId, device: DeviceId, highest: u64, unstored: &[u64]) {
        let width = self.width;
        self.devices
            .entry((fleet, device))
            .and_modify(|w| {
                if w.highest() <= highest {
                    *w = AntiReplayWindow::seeded(width, highest, unstored);
                }
            })
            .or_insert_with(|| AntiReplayWindow::seeded(width, highest, unstored));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn new_duplicate_out_of_order_and_too_old() {
        let mut w = AntiReplayWindow::new(64);
        assert_eq!(w.reserve(10), SeqStatus::New);
        w.commit(10);
        assert_eq!(w.reserve(10), SeqStatus::Duplicate);
        assert_eq!(
            w.reserve(7),
            SeqStatus::New,
            "out of order, inside the window"
        );
        assert_eq!(
            w.reserve(7),
            SeqStatus::InFlight,
            "same seq while its delivery is pending"
        );
        w.release(7);
        assert_eq!(
            w.reserve(7),
            SeqStatus::New,
            "a failed delivery may be retried"
        );
        w.commit(7);
        assert_eq!(w.reserve(200), SeqStatus::New);
        assert_eq!(
            w.reserve(136),
            SeqStatus::TooOld,
            "200 - 64 = 136 is below the window"
        );
        assert_eq!(w.reserve(137), SeqStatus::New);
        assert_eq!(w.highest(), 200);
    }

    #[test]
    fn a_seeded_window_refuses_everything_up_to_the_mark() {
        let mut live = AntiReplayWindow::new(64);
        for s in [97u64, 99, 100] {
            live.reserve(s);
            live.commit(s);
        }
        live.reserve(98); // in flight: its outcome is unknown
        let unstored = live.unstored();
        assert!(unstored.contains(&98) && unstored.contains(&50) && !unstored.contains(&99));
        let mut w = AntiReplayWindow::seeded(64, live.highest(), &unstored);
        assert_eq!(w.reserve(100), SeqStatus::Duplicate);
        assert_eq!(w.reserve(97), SeqStatus::Duplicate);
        assert_eq!(
            w.reserve(98),
            SeqStatus::New,
            "an unsettled seq stays acceptable"
        );
        assert_eq!(w.reserve(36), SeqStatus::TooOld);
        assert_eq!(w.reserve(101), SeqStatus::New);
    }

    #[test]
    fn gaps_are_counted_and_filled() {
        let mut w = AntiReplayWindow::new(64);
        w.reserve(1);
        w.reserve(5);
        assert_eq!(w.gaps(), 3);
        w.reserve(3);
        assert_eq!(w.gaps(), 2);
    }

    #[test]
    fn memory_per_device_is_fixed() {
        let w = AntiReplayWindow::new(1024);
        let bytes = std::mem::size_of::<AntiReplayWindow>() + w.bits.len() * 8;
        // 1024-bit bitmap + header; in-flight list is empty when idle.
        assert_eq!(w.bits.len(), 16);
        assert!(bytes <= 256, "{bytes}");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Deliver(u64),
        Fail(u64),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        proptest::collection::vec(
            prop_oneof![
                4 => (1u64..400).prop_map(Op::Deliver),
                1 => (1u64..400).prop_map(Op::Fail),
            ],
            0..300,
        )
    }

    proptest! {
        // No seq is ever published twice, and every unseen seq above the low edge is
        // accepted, whatever the order of arrivals and delivery failures.
        #[test]
        fn never_twice_and_never_wrongly_refused(ops in ops(), width in 64u64..256) {
            let mut w = AntiReplayWindow::new(width);
            let width = w.width;
            let mut delivered: HashSet<u64> = HashSet::new();
            let mut highest = 0u64;
            for op in ops {
                let (seq, ok) = match op { Op::Deliver(s) => (s, true), Op::Fail(s) => (s, false) };
                let status = w.reserve(seq);
                let above_edge = seq + width > highest;
                match status {
                    SeqStatus::New => {
                        prop_assert!(!delivered.contains(&seq), "seq {} accepted twice", seq);
                        highest = highest.max(seq);
                        if ok { w.commit(seq); delivered.insert(seq); } else { w.release(seq); }
                    }
                    SeqStatus::Duplicate => prop_assert!(delivered.contains(&seq)),
                    SeqStatus::TooOld => prop_assert!(!above_edge, "seq {} refused inside window", seq),
                    SeqStatus::InFlight => prop_assert!(false, "nothing is left in flight here"),
                }
            }
        }
    }
}
