//! Per-device anti-replay over sequence numbers (RFC 4303-style sliding bitmap).
//! Guarantees: a seq is published at most once while it is inside the window; every
//! unseen seq newer than the window's low edge is accepted, in any order. A seq counts
//! as seen from the moment it is reserved; if its delivery fails it is released, so the
//! device's retry is accepted rather than mistaken for a duplicate. Seqs another node
//! reported as in flight are in doubt here until that node settles them or their TTL
//! passes. The map is sharded (DashMap) and no lock is held across an await.

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

/// A seq whose delivery is under way: this node's own, or another node's that is in
/// doubt here until `doubt_until_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reservation {
    seq: u64,
    /// `LOCAL` for this node's reservations.
    doubt_until_ms: i64,
}

impl Reservation {
    const LOCAL: i64 = 0;

    fn is_local(&self) -> bool {
        self.doubt_until_ms == Self::LOCAL
    }
}

/// A sliding window of `width` sequence numbers ending at the highest seen.
#[derive(Debug, Clone)]
pub struct AntiReplayWindow {
    highest: u64,
    width: u64,
    /// Ring bitmap: bit `seq % width` is set when `seq` is inside the window and seen.
    bits: Box<[u64]>,
    /// Reserved but not yet delivered, here or (in doubt) on another node; small,
    /// bounded by events in flight per device.
    in_flight: Vec<Reservation>,
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
            .filter(|s| !self.bit(*s) || self.is_in_flight(*s))
            .collect()
    }

    /// Seqs whose delivery is under way (here, or in doubt from another node): the
    /// subset of [`Self::unstored`] another node must not accept yet.
    pub fn pending(&self) -> Vec<u64> {
        let mut seqs: Vec<u64> = self.in_flight.iter().map(|r| r.seq).collect();
        seqs.sort_unstable();
        seqs
    }

    /// True while this node has a delivery of its own under way for the device.
    pub fn has_local_in_flight(&self) -> bool {
        self.in_flight.iter().any(Reservation::is_local)
    }

    fn is_in_flight(&self, seq: u64) -> bool {
        self.in_flight.iter().any(|r| r.seq == seq)
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
        } else if self.is_in_flight(seq) {
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
        self.in_flight.retain(|r| r.seq + width > highest);
        self.in_flight.push(Reservation {
            seq,
            doubt_until_ms: Reservation::LOCAL,
        });
        status
    }

    /// The reserved `seq` was delivered: from now on it is a duplicate.
    pub fn commit(&mut self, seq: u64) {
        self.in_flight.retain(|r| !(r.seq == seq && r.is_local()));
    }

    /// Reservations whose delivery is still under way (or in doubt).
    pub fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }

    /// Folds in another node's record: every seq up to `highest` that is in neither
    /// `unstored` nor `pending` becomes seen (stored by someone), advancing the window
    /// if `highest` is newer; a `pending` seq not already seen is in doubt until
    /// `doubt_until_ms`; an `unstored` seq settles a doubt as not stored. Reservations
    /// of this node are left alone: their outcome is still decided by their own delivery.
    pub fn merge(&mut self, highest: u64, unstored: &[u64], pending: &[u64], doubt_until_ms: i64) {
        if highest > self.highest {
            let advance = highest - self.highest;
            if advance >= self.width {
                self.bits.iter_mut().for_each(|w| *w = 0);
            } else {
                for s in self.highest + 1..=highest {
                    self.set(s, false);
                }
            }
            self.highest = highest;
            let (h, width) = (self.highest, self.width);
            self.in_flight.retain(|r| r.seq + width > h);
        }
        let low = self.highest.saturating_sub(self.width - 1).max(1);
        let sorted = |seqs: &[u64]| {
            let mut v = seqs.to_vec();
            v.sort_unstable();
            v
        };
        let (unstored, pending) = (sorted(unstored), sorted(pending));
        let foreign = |r: &Reservation, s: u64| r.seq == s && !r.is_local();
        for s in low..=highest.min(self.highest) {
            if pending.binary_search(&s).is_ok() {
                let known = self.bit(s) || self.is_in_flight(s);
                if !known && doubt_until_ms > Reservation::LOCAL {
                    self.in_flight.push(Reservation {
                        seq: s,
                        doubt_until_ms,
                    });
                }
            } else if unstored.binary_search(&s).is_ok() {
                self.in_flight.retain(|r| !foreign(r, s));
            } else {
                self.in_flight.retain(|r| !foreign(r, s));
                self.set(s, true);
            }
        }
    }

    /// Ends the doubts that outlived their TTL: those seqs are acceptable again (a
    /// copy that did reach Kafka is removed downstream by `(device_id, seq)`).
    pub fn expire_doubts(&mut self, now_ms: i64) -> usize {
        let before = self.in_flight.len();
        self.in_flight
            .retain(|r| r.is_local() || r.doubt_until_ms > now_ms);
        before - self.in_flight.len()
    }

    /// The reserved `seq` was not delivered: forget it so a retry is accepted.
    pub fn release(&mut self, seq: u64) {
        let before = self.in_flight.len();
        self.in_flight.retain(|r| !(r.seq == seq && r.is_local()));
        if before != self.in_flight.len() && self.in_window(seq) {
            self.set(seq, false);
        }
    }
}

/// What this node tracks per active device: its window, when it was last used, and
/// an EWMA of its clock offset (server receipt time minus the device's `sent_at`).
#[derive(Debug, Clone)]
pub struct DeviceSlot {
    pub window: AntiReplayWindow,
    pub last_seen_ms: i64,
    /// Positive when the device clock is behind the server's; `None` before a sample.
    pub clock_offset_ms: Option<f64>,
}

/// Weight of the newest clock-offset sample in the EWMA.
const CLOCK_EWMA_ALPHA: f64 = 0.2;

/// The compact form of an evicted device: enough to refuse every replay it could send.
#[derive(Debug, Clone)]
struct Dormant {
    highest: u64,
    unstored: Box<[u64]>,
}

/// A point-in-time view of one device, for the operator endpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceView {
    pub highest_seq: u64,
    pub gaps: u64,
    pub in_flight: usize,
    pub last_seen_ms: i64,
    pub clock_offset_ms: Option<f64>,
    /// True when the device is evicted: only its high-water mark is held.
    pub dormant: bool,
}

/// One device-state record as the window needs it.
#[derive(Debug, Clone, Copy)]
pub struct StateUpdate<'a> {
    pub highest: u64,
    pub unstored: &'a [u64],
    /// Seqs whose delivery was under way at the writer; in doubt until `doubt_until_ms`.
    pub pending: &'a [u64],
    pub doubt_until_ms: i64,
}

impl<'a> StateUpdate<'a> {
    /// A record with nothing in doubt.
    pub fn settled(highest: u64, unstored: &'a [u64]) -> Self {
        Self {
            highest,
            unstored,
            pending: &[],
            doubt_until_ms: Reservation::LOCAL,
        }
    }
}

type SlotRef<'a> = dashmap::mapref::one::RefMut<'a, (FleetId, DeviceId), DeviceSlot>;

/// Anti-replay windows of every device seen by this node. Idle devices are evicted to a
/// compact dormant record (high-water mark plus unstored seqs), never forgotten, so an
/// evicted device falls back to "everything up to the mark is a replay", not to
/// "accept anything".
#[derive(Debug)]
pub struct ReplayWindows {
    width: u64,
    devices: DashMap<(FleetId, DeviceId), DeviceSlot>,
    dormant: DashMap<(FleetId, DeviceId), Dormant>,
}

impl ReplayWindows {
    pub fn new(width: u64) -> Arc<Self> {
        Arc::new(Self {
            width,
            devices: DashMap::new(),
            dormant: DashMap::new(),
        })
    }

    fn slot(&self, key: (FleetId, DeviceId)) -> SlotRef<'_> {
        let width = self.width;
        let dormant = &self.dormant;
        self.devices.entry(key.clone()).or_insert_with(|| {
            let window = match dormant.remove(&key) {
                Some((_, d)) => AntiReplayWindow::seeded(width, d.highest, &d.unstored),
                None => AntiReplayWindow::new(width),
            };
            DeviceSlot {
                window,
                last_seen_ms: 0,
                clock_offset_ms: None,
            }
        })
    }

    /// Runs `f` on the device's window under its shard lock (never across an await).
    pub fn with<R>(
        &self,
        fleet: &FleetId,
        device: &DeviceId,
        f: impl FnOnce(&mut AntiReplayWindow) -> R,
    ) -> R {
        let mut slot = self.slot((fleet.clone(), device.clone()));
        f(&mut slot.window)
    }

    /// Records a batch from the device at server time `now_ms` that the device sent at
    /// `sent_at_ms`; returns the updated clock-offset EWMA in milliseconds.
    pub fn observe_clock(
        &self,
        fleet: &FleetId,
        device: &DeviceId,
        sent_at_ms: i64,
        now_ms: i64,
    ) -> f64 {
        let mut slot = self.slot((fleet.clone(), device.clone()));
        let sample = now_ms.saturating_sub(sent_at_ms) as f64;
        let ewma = match slot.clock_offset_ms {
            Some(prev) => prev + CLOCK_EWMA_ALPHA * (sample - prev),
            None => sample,
        };
        slot.clock_offset_ms = Some(ewma);
        slot.last_seen_ms = now_ms;
        ewma
    }

    /// Restores a device's persisted high-water mark (never lowers what is known).
    pub fn seed(&self, fleet: FleetId, device: DeviceId, highest: u64, unstored: &[u64]) {
        self.merge(fleet, device, StateUpdate::settled(highest, unstored));
    }

    /// Folds in what another node stored for the device (see
    /// [`AntiReplayWindow::merge`]). Never forgets what this node knows.
    pub fn merge(&self, fleet: FleetId, device: DeviceId, update: StateUpdate<'_>) {
        let StateUpdate {
            highest,
            unstored,
            pending,
            doubt_until_ms,
        } = update;
        if !pending.is_empty() {
            // Doubts need a live window; the device is evicted again once they settle.
            let mut slot = self.slot((fleet, device));
            slot.window
                .merge(highest, unstored, pending, doubt_until_ms);
            return;
        }
        // Lock order everywhere: the device shard, then the dormant shard.
        match self.devices.entry((fleet, device)) {
            dashmap::Entry::Occupied(mut slot) => {
                slot.get_mut()
                    .window
                    .merge(highest, unstored, &[], Reservation::LOCAL)
            }
            dashmap::Entry::Vacant(vacant) => {
                let mut d = self
                    .dormant
                    .entry(vacant.key().clone())
                    .or_insert_with(|| Dormant {
                        highest: 0,
                        unstored: Box::new([]),
                    });
                let mut w = AntiReplayWindow::seeded(self.width, d.highest, &d.unstored);
                w.merge(highest, unstored, &[], Reservation::LOCAL);
                *d = Dormant {
                    highest: w.highest(),
                    unstored: w.unstored().into_boxed_slice(),
                };
            }
        }
    }

    /// Ends every doubt older than its TTL; returns how many ended.
    pub fn expire_doubts(&self, now_ms: i64) -> usize {
        let mut n = 0;
        self.devices
            .iter_mut()
            .for_each(|mut slot| n += slot.window.expire_doubts(now_ms));
        n
    }

    /// Moves devices not seen since `idle_before_ms` (and with nothing in flight) to
    /// their dormant form. Returns how many were evicted.
    pub fn evict_idle(&self, idle_before_ms: i64) -> usize {
        let mut n = 0;
        // The dormant record is written while the device's shard is still locked, so no
        // batch can see the device absent from both maps.
        self.devices.retain(|key, slot| {
            let idle = slot.last_seen_ms < idle_before_ms && slot.window.in_flight_len() == 0;
            if idle {
                n += 1;
                self.dormant.insert(
                    key.clone(),
                    Dormant {
                        highest: slot.window.highest(),
                        unstored: slot.window.unstored().into_boxed_slice(),
                    },
                );
            }
            !idle
        });
        if n > 0 {
            // Retained buckets would keep the freed windows' memory in use.
            self.devices.shrink_to_fit();
        }
        n
    }

    /// Active (windowed) and dormant (mark only) device counts.
    pub fn counts(&self) -> (usize, usize) {
        (self.devices.len(), self.dormant.len())
    }

    pub fn view(&self, fleet: &FleetId, device: &DeviceId) -> Option<DeviceView> {
        let key = (fleet.clone(), device.clone());
        if let Some(slot) = self.devices.get(&key) {
            return Some(DeviceView {
                highest_seq: slot.window.highest(),
                gaps: slot.window.gaps(),
                in_flight: slot.window.in_flight_len(),
                last_seen_ms: slot.last_seen_ms,
                clock_offset_ms: slot.clock_offset_ms,
                dormant: false,
            });
        }
        self.dormant.get(&key).map(|d| DeviceView {
            highest_seq: d.highest,
            gaps: 0,
            in_flight: 0,
            last_seen_ms: 0,
            clock_offset_ms: None,
            dormant: true,
        })
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

    fn ids(d: &str) -> (FleetId, DeviceId) {
        (FleetId::parse("f").unwrap(), DeviceId::parse(d).unwrap())
    }

    #[test]
    fn merge_marks_what_another_node_stored_and_keeps_its_holes() {
        let mut w = AntiReplayWindow::new(64);
        w.reserve(5);
        w.commit(5);
        w.merge(20, &[12, 13], &[], 0);
        assert_eq!(w.highest(), 20);
        assert_eq!(w.status(20), SeqStatus::Duplicate);
        assert_eq!(w.status(11), SeqStatus::Duplicate);
        assert_eq!(
            w.status(12),
            SeqStatus::New,
            "unstored elsewhere stays open"
        );
        assert_eq!(w.status(5), SeqStatus::Duplicate, "own knowledge is kept");
        assert_eq!(w.status(21), SeqStatus::New);
        w.merge(10, &[], &[], 0);
        assert_eq!(w.highest(), 20, "an older record never lowers the mark");
        assert_eq!(
            w.status(12),
            SeqStatus::New,
            "nor closes a hole it does not cover"
        );
    }

    #[test]
    fn an_evicted_device_refuses_replays_and_accepts_new_seqs() {
        let windows = ReplayWindows::new(64);
        let (f, d) = ids("car-1");
        windows.observe_clock(&f, &d, 1_000, 1_000);
        for s in 1..=10 {
            windows.with(&f, &d, |w| {
                w.reserve(s);
                w.commit(s);
            });
        }
        assert_eq!(windows.evict_idle(2_000), 1);
        assert_eq!(windows.counts(), (0, 1));
        let view = windows.view(&f, &d).unwrap();
        assert!(view.dormant && view.highest_seq == 10);
        assert_eq!(windows.with(&f, &d, |w| w.reserve(7)), SeqStatus::Duplicate);
        assert_eq!(windows.with(&f, &d, |w| w.reserve(11)), SeqStatus::New);
        assert_eq!(windows.counts(), (1, 0));
    }

    #[test]
    fn devices_with_deliveries_in_flight_are_not_evicted() {
        let windows = ReplayWindows::new(64);
        let (f, d) = ids("car-2");
        windows.observe_clock(&f, &d, 0, 0);
        windows.with(&f, &d, |w| w.reserve(1));
        assert_eq!(windows.evict_idle(10), 0);
        windows.with(&f, &d, |w| w.commit(1));
        assert_eq!(windows.evict_idle(10), 1);
    }

    #[test]
    fn merge_reaches_dormant_devices() {
        let windows = ReplayWindows::new(64);
        let (f, d) = ids("car-3");
        windows.merge(f.clone(), d.clone(), StateUpdate::settled(30, &[29]));
        assert_eq!(windows.counts(), (0, 1));
        windows.merge(f.clone(), d.clone(), StateUpdate::settled(40, &[]));
        assert_eq!(
            windows.with(&f, &d, |w| w.reserve(35)),
            SeqStatus::Duplicate
        );
        assert_eq!(
            windows.with(&f, &d, |w| w.reserve(29)),
            SeqStatus::Duplicate,
            "the newer record says 29 was stored"
        );
        assert_eq!(windows.with(&f, &d, |w| w.reserve(41)), SeqStatus::New);
    }

    #[test]
    fn clock_offset_is_smoothed() {
        let windows = ReplayWindows::new(64);
        let (f, d) = ids("car-4");
        assert_eq!(windows.observe_clock(&f, &d, 0, 1_000), 1_000.0);
        let next = windows.observe_clock(&f, &d, 1_000, 1_000);
        assert!((next - 800.0).abs() < 1e-9, "{next}");
        assert_eq!(windows.view(&f, &d).unwrap().clock_offset_ms, Some(next));
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

    proptest! {
        // After merging another node's record, nothing it stored is accepted here, and
        // everything it left unstored that this node had not seen stays acceptable.
        #[test]
        fn merge_never_reopens_or_wrongly_closes(
            local in proptest::collection::vec(1u64..300, 0..60),
            highest in 1u64..300,
            holes in proptest::collection::vec(1u64..300, 0..20),
        ) {
            let mut w = AntiReplayWindow::new(64);
            let mut seen = HashSet::new();
            for s in local {
                if w.reserve(s) == SeqStatus::New { w.commit(s); seen.insert(s); }
            }
            let holes: Vec<u64> = holes.into_iter().filter(|h| *h <= highest).collect();
            // The remote node's deliveries under way are a subset of its holes.
            let pending: Vec<u64> = holes.iter().copied().filter(|h| h % 2 == 0).collect();
            w.merge(highest, &holes, &pending, 1_000);
            let low = w.highest().saturating_sub(63).max(1);
            let in_window = |s: u64| s <= highest && s + 64 > highest;
            for s in low..=w.highest() {
                let stored_remote = in_window(s) && !holes.contains(&s);
                let status = w.status(s);
                if stored_remote || seen.contains(&s) {
                    prop_assert_eq!(status, SeqStatus::Duplicate, "seq {}", s);
                } else if in_window(s) && pending.contains(&s) {
                    prop_assert_eq!(status, SeqStatus::InFlight, "seq {} is in doubt", s);
                } else {
                    prop_assert_eq!(status, SeqStatus::New, "seq {}", s);
                }
            }
            // Doubts end at their TTL: what was only in doubt is acceptable again.
            w.expire_doubts(1_000);
            for s in low..=w.highest() {
                if !seen.contains(&s) && holes.contains(&s) && in_window(s) {
                    prop_assert_eq!(w.status(s), SeqStatus::New, "seq {} after TTL", s);
                }
            }
        }
    }

    #[test]
    fn another_nodes_pending_seqs_are_in_doubt_until_settled() {
        let mut w = AntiReplayWindow::new(64);
        w.merge(10, &[9, 10], &[9, 10], 5_000);
        assert_eq!(w.status(8), SeqStatus::Duplicate);
        assert_eq!(w.reserve(9), SeqStatus::InFlight, "a retry here must wait");
        assert_eq!(w.reserve(10), SeqStatus::InFlight);
        assert_eq!(w.pending(), vec![9, 10], "doubts are passed on");
        assert!(!w.has_local_in_flight());
        // The writer settles: 9 was stored, 10 failed.
        w.merge(10, &[10], &[], 0);
        assert_eq!(w.status(9), SeqStatus::Duplicate);
        assert_eq!(
            w.reserve(10),
            SeqStatus::New,
            "the failed one is retried here"
        );
        // A stale record that still calls 9 pending cannot reopen it.
        w.merge(10, &[9], &[9], 9_000);
        assert_eq!(w.status(9), SeqStatus::Duplicate);
    }

    #[test]
    fn doubts_expire_but_local_reservations_do_not() {
        let mut w = AntiReplayWindow::new(64);
        assert_eq!(w.reserve(3), SeqStatus::New);
        w.merge(4, &[3, 4], &[3, 4], 100);
        assert_eq!(w.status(4), SeqStatus::InFlight);
        assert_eq!(w.expire_doubts(99), 0);
        assert_eq!(w.expire_doubts(100), 1);
        assert_eq!(w.status(4), SeqStatus::New);
        assert_eq!(
            w.status(3),
            SeqStatus::InFlight,
            "own delivery still decides"
        );
        assert!(w.has_local_in_flight());
        w.commit(3);
        assert_eq!(w.status(3), SeqStatus::Duplicate);
    }

    #[test]
    fn a_pending_record_wakes_a_dormant_device_and_its_doubts_expire() {
        let windows = ReplayWindows::new(64);
        let (f, d) = ids("car-5");
        windows.merge(f.clone(), d.clone(), StateUpdate::settled(5, &[]));
        assert_eq!(windows.counts(), (0, 1));
        let update = StateUpdate {
            highest: 7,
            unstored: &[6, 7],
            pending: &[6, 7],
            doubt_until_ms: 50,
        };
        windows.merge(f.clone(), d.clone(), update);
        assert_eq!(windows.counts(), (1, 0));
        assert_eq!(windows.with(&f, &d, |w| w.reserve(6)), SeqStatus::InFlight);
        assert_eq!(windows.with(&f, &d, |w| w.reserve(5)), SeqStatus::Duplicate);
        assert_eq!(windows.evict_idle(i64::MAX), 0, "doubts keep the window");
        assert_eq!(windows.expire_doubts(50), 2);
        assert_eq!(windows.with(&f, &d, |w| w.reserve(6)), SeqStatus::New);
    }
}
