//! The pure half of recording: how a batch that arrived at the recorder becomes a
//! [`RecordedBatch`] (times rebased to the recording start, offsets that never go
//! backwards) and what the header says once the capture is over. No I/O, no clock:
//! callers pass the arrival time.

use std::collections::BTreeSet;
use std::time::Duration;

use fleetgate_proto::TelemetryBatch;
use prost::Message;

use crate::recording::{RecordedBatch, RecordingHeader};

/// Shifts every device timestamp of `batch` by the recording start (Unix ms, recorder
/// clock). A pure shift: the device's clock error and the network delay stay in the
/// file, so a replay shows ingest the same event ages ingest saw live.
pub fn rebase_to_recording(batch: &mut TelemetryBatch, start_wall_ms: i64) {
    batch.sent_at_ms = batch.sent_at_ms.saturating_sub(start_wall_ms);
    for e in &mut batch.events {
        e.captured_at_ms = e.captured_at_ms.saturating_sub(start_wall_ms);
    }
}

/// Turns arrivals into recorded batches and counts what the recording holds.
#[derive(Debug)]
pub struct Capture {
    start_wall_ms: i64,
    last_offset_ms: u64,
    devices: BTreeSet<String>,
    batches: u64,
    events: u64,
}

/// What a finished capture holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CaptureCounts {
    pub devices: u32,
    pub batches: u64,
    pub events: u64,
}

impl Capture {
    /// `start_wall_ms` is the Unix ms at the recording start (stored in the header).
    pub fn new(start_wall_ms: i64) -> Self {
        Self {
            start_wall_ms,
            last_offset_ms: 0,
            devices: BTreeSet::new(),
            batches: 0,
            events: 0,
        }
    }

    /// Records `batch` from `device_id` that arrived `since_start` after the
    /// recording start. Offsets never go backwards: two devices' batches can reach the
    /// single writer in a different order than they arrived, by at most the queueing
    /// delay, and the file format requires non-decreasing offsets.
    pub fn record(
        &mut self,
        device_id: &str,
        since_start: Duration,
        mut batch: TelemetryBatch,
    ) -> RecordedBatch {
        let arrived_ms = u64::try_from(since_start.as_millis()).unwrap_or(u64::MAX);
        self.last_offset_ms = self.last_offset_ms.max(arrived_ms);
        rebase_to_recording(&mut batch, self.start_wall_ms);
        if !self.devices.contains(device_id) {
            self.devices.insert(device_id.to_owned());
        }
        self.batches += 1;
        self.events += batch.events.len() as u64;
        RecordedBatch {
            device_id: device_id.to_owned(),
            offset_ms: self.last_offset_ms,
            batch: batch.encode_to_vec(),
        }
    }

    pub fn counts(&self) -> CaptureCounts {
        CaptureCounts {
            devices: u32::try_from(self.devices.len()).unwrap_or(u32::MAX),
            batches: self.batches,
            events: self.events,
        }
    }

    /// The header for what was recorded: the devices that sent at least one
    /// recorded batch, the start time, seed 0 (not generated).
    pub fn header(&self, fleet_id: &str, description: &str) -> RecordingHeader {
        RecordingHeader {
            fleet_id: fleet_id.to_owned(),
            devices: self.counts().devices,
            seed: 0,
            created_at_ms: self.start_wall_ms,
            description: description.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate_proto::TelemetryEvent;
    use proptest::prelude::*;

    const START: i64 = 1_700_000_000_000;

    fn batch(sent_at_ms: i64, captured: &[i64]) -> TelemetryBatch {
        TelemetryBatch {
            schema_version: 1,
            sent_at_ms,
            events: captured
                .iter()
                .enumerate()
                .map(|(i, c)| TelemetryEvent {
                    seq: i as u64 + 1,
                    captured_at_ms: *c,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn rebase_shifts_every_time_by_the_start() {
        let mut b = batch(START + 5_000, &[START + 4_000, START + 4_900]);
        rebase_to_recording(&mut b, START);
        assert_eq!(b.sent_at_ms, 5_000);
        let captured: Vec<i64> = b.events.iter().map(|e| e.captured_at_ms).collect();
        assert_eq!(captured, [4_000, 4_900]);
        // A device clock behind the recorder stays behind (negative offsets), and
        // nothing overflows at the extremes.
        let mut b = batch(START - 60_000, &[i64::MIN]);
        rebase_to_recording(&mut b, START);
        assert_eq!(
            (b.sent_at_ms, b.events[0].captured_at_ms),
            (-60_000, i64::MIN)
        );
    }

    #[test]
    fn record_counts_devices_batches_events_and_rebases() {
        let mut c = Capture::new(START);
        let r = c.record(
            "car-1",
            Duration::from_millis(1_500),
            batch(START + 1_490, &[START + 1_000]),
        );
        assert_eq!((r.device_id.as_str(), r.offset_ms), ("car-1", 1_500));
        let decoded = TelemetryBatch::decode(r.batch.as_slice()).unwrap();
        assert_eq!(decoded.sent_at_ms, 1_490);
        assert_eq!(decoded.events[0].captured_at_ms, 1_000);
        c.record("car-2", Duration::from_secs(2), batch(START, &[START; 3]));
        c.record("car-1", Duration::from_secs(3), batch(START, &[]));
        assert_eq!(
            c.counts(),
            CaptureCounts {
                devices: 2,
                batches: 3,
                events: 4
            }
        );
        let h = c.header("fleet-a", "bench");
        assert_eq!(
            h,
            RecordingHeader {
                fleet_id: "fleet-a".into(),
                devices: 2,
                seed: 0,
                created_at_ms: START,
                description: "bench".into(),
            }
        );
    }

    #[test]
    fn a_late_arrival_never_moves_the_offset_back() {
        let mut c = Capture::new(START);
        assert_eq!(
            c.record("a", Duration::from_millis(900), batch(0, &[]))
                .offset_ms,
            900
        );
        assert_eq!(
            c.record("b", Duration::from_millis(850), batch(0, &[]))
                .offset_ms,
            900
        );
        assert_eq!(
            c.record("a", Duration::from_millis(901), batch(0, &[]))
                .offset_ms,
            901
        );
    }

    #[test]
    fn empty_capture_has_no_devices() {
        let c = Capture::new(START);
        assert_eq!(c.header("f", "").devices, 0);
        assert_eq!(c.counts(), CaptureCounts::default());
    }

    proptest! {
        #[test]
        fn offsets_are_non_decreasing_and_shift_preserves_ages(
            arrivals in proptest::collection::vec((0u64..100_000, 0usize..4, -10_000i64..10_000), 0..50),
        ) {
            let mut c = Capture::new(START);
            let mut last = 0;
            for (ms, dev, skew) in arrivals {
                let sent = START + ms as i64 + skew;
                let b = batch(sent, &[sent - 250]);
                let r = c.record(&format!("d{dev}"), Duration::from_millis(ms), b);
                prop_assert!(r.offset_ms >= last);
                prop_assert!(r.offset_ms >= ms);
                last = r.offset_ms;
                let d = TelemetryBatch::decode(r.batch.as_slice()).unwrap();
                prop_assert_eq!(d.sent_at_ms, ms as i64 + skew);
                prop_assert_eq!(d.sent_at_ms - d.events[0].captured_at_ms, 250);
            }
        }
    }
}
