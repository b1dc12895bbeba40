//! Drops redelivered events by `(device, seq)` in bounded memory.
//!
//! Guarantee: a `(device, seq)` pair is reported [`Seen::Fresh`] at most once, for any
//! input order. Per device the state is a high-water mark plus a bitmap of the
//! [`WINDOW`] sequence numbers ending at it (8 + 128 bytes), the same scheme as the
//! IPsec/DTLS anti-replay window. A seq further than [`WINDOW`] behind the highest one
//! seen cannot be told apart from a replay and is reported [`Seen::TooOld`], never
//! passed. Memory therefore grows with the number of devices only, not with events.

use std::collections::HashMap;

/// How many sequence numbers behind the high-water mark are still tracked exactly.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

/// A device as named by its certificate. Device ids are only unique within a fleet,
/// so the fleet is part of the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    pub fleet_id: String,
    pub device_id: String,
}

impl DeviceKey {
    pub fn new(fleet_id: impl Into<String>, device_id: impl Into<String>) -> Self {
        Self {
            fleet_id: fleet_id.into(),
            device_id: device_id.into(),
        }
    }
}

/// What the deduplicator decided about one `(device, seq)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First time: process it.
    Fresh,
    /// Already passed once: drop it.
    Duplicate,
    /// Older than the window: cannot be proven fresh, so it is dropped.
    TooOld,
}

impl Seen {
    pub fn is_fresh(self) -> bool {
        self == Seen::Fresh
    }
}

/// Sliding window of one device: bit `i` of `bits` means `high - i` was seen.
#[derive(Debug, Clone, Default)]
struct SeqWindow {
    high: u64,
    bits: [u64; WORDS],
}

impl SeqWindow {
    fn observe(&mut self, seq: u64) -> Seen {
        if seq > self.high {
            self.shift(seq - self.high);
            self.high = seq;
            self.set(0);
            return Seen::Fresh;
        }
        let behind = self.high - seq;
        if behind >= WINDOW {
            return Seen::TooOld;
        }
        if self.get(behind) {
            Seen::Duplicate
        } else {
            self.set(behind);
            Seen::Fresh
        }
    }

    /// Moves every bit `by` positions further behind, dropping those past the window.
    fn shift(&mut self, by: u64) {
        if by >= WINDOW {
            self.bits = [0; WORDS];
            return;
        }
        let words = (by / 64) as usize;
        let bits = (by % 64) as u32;
        for i in (0..WORDS).rev() {
            let src = i.checked_sub(words);
            let lo = src.map_or(0, |s| self.bits[s]);
            let carry = match src.and_then(|s| s.checked_sub(1)) {
                Some(s) if bits > 0 => self.bits[s] >> (64 - bits),
                _ => 0,
            };
            self.bits[i] = (lo << bits) | carry;
        }
    }

    fn get(&self, behind: u64) -> bool {
        self.bits[(behind / 64) as usize] & (1 << (behind % 64)) != 0
    }

    fn set(&mut self, behind: u64) {
        self.bits[(behind / 64) as usize] |= 1 << (behind % 64);
    }
}

/// Per-device anti-replay windows; see the module docs for the memory bound.
#[derive(Debug, Default)]
pub struct Deduplicator {
    devices: HashMap<DeviceKey, SeqWindow>,
}

impl Deduplicator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `(device, seq)` and says whether it should be processed.
    pub fn observe(&mut self, device: &DeviceKey, seq: u64) -> Seen {
        match self.devices.get_mut(device) {
            Some(window) => window.observe(seq),
            None => self.devices.entry(device.clone()).or_default().observe(seq),
        }
    }

    /// Number of devices with state.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn car(n: u8) -> DeviceKey {
        DeviceKey::new("fleet", format!("car-{n}"))
    }

    #[test]
    fn repeats_are_duplicates_and_devices_are_independent() {
        let mut d = Deduplicator::new();
        assert_eq!(d.observe(&car(1), 1), Seen::Fresh);
        assert_eq!(d.observe(&car(1), 1), Seen::Duplicate);
        assert_eq!(d.observe(&car(2), 1), Seen::Fresh);
        assert_eq!(d.observe(&car(1), 3), Seen::Fresh);
        assert_eq!(d.observe(&car(1), 2), Seen::Fresh);
        assert_eq!(d.observe(&car(1), 2), Seen::Duplicate);
        assert_eq!(d.devices(), 2);
    }

    #[test]
    fn same_device_id_in_two_fleets_is_two_devices() {
        let mut d = Deduplicator::new();
        assert!(d.observe(&DeviceKey::new("a", "car-0000"), 1).is_fresh());
        assert!(d.observe(&DeviceKey::new("b", "car-0000"), 1).is_fresh());
    }

    #[test]
    fn window_edge_and_beyond() {
        let mut d = Deduplicator::new();
        let k = car(1);
        assert!(d.observe(&k, WINDOW + 10).is_fresh());
        // Exactly WINDOW - 1 behind: still tracked.
        assert!(d.observe(&k, 11).is_fresh());
        assert_eq!(d.observe(&k, 11), Seen::Duplicate);
        // WINDOW behind: too old, never passed.
        assert_eq!(d.observe(&k, 10), Seen::TooOld);
    }

    #[test]
    fn bits_survive_shifts_across_word_boundaries() {
        let mut d = Deduplicator::new();
        let k = car(1);
        for seq in [5, 70, 140, 141, 700, 1000] {
            assert!(d.observe(&k, seq).is_fresh());
        }
        for seq in [5, 70, 140, 141, 700, 1000] {
            assert_eq!(d.observe(&k, seq), Seen::Duplicate, "seq {seq}");
        }
        for seq in [6, 69, 71, 139, 142, 999] {
            assert!(d.observe(&k, seq).is_fresh(), "seq {seq}");
        }
    }

    proptest! {
        /// For any order with repeats, within the window every distinct pair passes
        /// exactly once; no pair ever passes twice.
        #[test]
        fn no_pair_passes_twice(
            input in prop::collection::vec((0u8..4, 1u64..=WINDOW), 0..600)
        ) {
            let mut d = Deduplicator::new();
            let mut passed = HashSet::new();
            let mut distinct = HashSet::new();
            for (dev, seq) in &input {
                distinct.insert((*dev, *seq));
                if d.observe(&car(*dev), *seq).is_fresh() {
                    prop_assert!(passed.insert((*dev, *seq)), "({dev}, {seq}) passed twice");
                }
            }
            prop_assert_eq!(passed, distinct);
        }

        /// Outside the window nothing is promised except that no pair passes twice.
        #[test]
        fn no_pair_passes_twice_for_any_seqs(
            input in prop::collection::vec((0u8..2, 1u64..20 * WINDOW), 0..600)
        ) {
            let mut d = Deduplicator::new();
            let mut passed = HashSet::new();
            for (dev, seq) in &input {
                if d.observe(&car(*dev), *seq).is_fresh() {
                    prop_assert!(passed.insert((*dev, *seq)));
                }
            }
        }
    }
}
