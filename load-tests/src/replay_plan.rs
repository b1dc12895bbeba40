//! The pure half of replay: how fast to play a recording, how recorded offsets become
//! wall-clock timestamps, and which device sends which batch. The binary's replayer
//! only sleeps, connects and sends what this module says.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use fleetgate_proto::TelemetryBatch;
use prost::Message;

use crate::recording::RecordedBatch;

/// Playback speed: a factor of real time, or as fast as acks come back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// `1` is real time, `10` ten times faster.
    Factor(f64),
    /// No pacing: every device sends its next batch as soon as the previous is acked.
    Max,
}

impl FromStr for Speed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("max") {
            return Ok(Speed::Max);
        }
        match s.parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => Ok(Speed::Factor(f)),
            _ => Err(format!(
                "speed {s:?}: expected a positive number (1 = real time) or \"max\""
            )),
        }
    }
}

impl fmt::Display for Speed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Speed::Factor(x) => write!(f, "{x}x"),
            Speed::Max => f.write_str("max"),
        }
    }
}

impl Speed {
    /// When, after replay start, a batch recorded at `offset_ms` is due; `None` at max.
    pub fn due_after(self, offset_ms: u64) -> Option<Duration> {
        match self {
            Speed::Factor(f) => Some(Duration::from_secs_f64(offset_ms as f64 / 1e3 / f)),
            Speed::Max => None,
        }
    }

    /// How old, at replay, an event `age_ms` old at recorded send time appears. At
    /// max speed ages are kept as recorded (there is no timeline to compress them to).
    pub fn scale_age(self, age_ms: i64) -> i64 {
        match self {
            Speed::Factor(f) => (age_ms as f64 / f).round() as i64,
            Speed::Max => age_ms,
        }
    }
}

/// Rewrites a recorded batch (timestamps relative to the recording start, sent at
/// `offset_ms`) as if sent now, at `send_wall_ms`: `sent_at_ms` becomes the wall
/// clock, each event keeps its (speed-scaled) age relative to the send.
pub fn rebase(batch: &mut TelemetryBatch, offset_ms: u64, send_wall_ms: i64, speed: Speed) {
    batch.sent_at_ms = send_wall_ms;
    let offset = i64::try_from(offset_ms).unwrap_or(i64::MAX);
    for e in &mut batch.events {
        let age = offset.saturating_sub(e.captured_at_ms).max(0);
        e.captured_at_ms = send_wall_ms.saturating_sub(speed.scale_age(age));
    }
}

/// One device's part of a recording, in send order.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReplay {
    pub device_id: String,
    /// (recorded send offset, batch with recorded-relative timestamps).
    pub batches: Vec<(u64, TelemetryBatch)>,
}

impl DeviceReplay {
    pub fn events(&self) -> u64 {
        self.batches
            .iter()
            .map(|(_, b)| b.events.len() as u64)
            .sum()
    }
}

/// Why a recorded batch cannot be replayed.
#[derive(Debug, thiserror::Error)]
#[error("batch {index} of device {device_id:?} does not decode as a TelemetryBatch: {source}")]
pub struct BadRecordedBatch {
    pub index: usize,
    pub device_id: String,
    pub source: prost::DecodeError,
}

/// Splits a recording into per-device timelines, decoding every batch once up front
/// so a bad file fails before any connection is made. Devices are sorted by id.
pub fn plan_devices(batches: Vec<RecordedBatch>) -> Result<Vec<DeviceReplay>, BadRecordedBatch> {
    let mut by: BTreeMap<String, Vec<(u64, TelemetryBatch)>> = BTreeMap::new();
    for (index, b) in batches.into_iter().enumerate() {
        let batch =
            TelemetryBatch::decode(b.batch.as_slice()).map_err(|source| BadRecordedBatch {
                index,
                device_id: b.device_id.clone(),
                source,
            })?;
        by.entry(b.device_id)
            .or_default()
            .push((b.offset_ms, batch));
    }
    Ok(by
        .into_iter()
        .map(|(device_id, batches)| DeviceReplay { device_id, batches })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate_proto::TelemetryEvent;

    #[test]
    fn speed_parses_and_refuses_nonsense() {
        assert_eq!("max".parse::<Speed>(), Ok(Speed::Max));
        assert_eq!("1".parse::<Speed>(), Ok(Speed::Factor(1.0)));
        assert_eq!("2.5".parse::<Speed>(), Ok(Speed::Factor(2.5)));
        for bad in ["0", "-1", "fast", "inf", "NaN", ""] {
            assert!(bad.parse::<Speed>().is_err(), "{bad}");
        }
        assert_eq!(
            Speed::Factor(10.0).due_after(10_000),
            Some(Duration::from_secs(1))
        );
        assert_eq!(Speed::Max.due_after(10_000), None);
    }

    #[test]
    fn rebase_keeps_ages_scaled_by_speed() {
        let ev = |seq, t| TelemetryEvent {
            seq,
            captured_at_ms: t,
            ..Default::default()
        };
        let recorded = TelemetryBatch {
            sent_at_ms: 60_000,
            events: vec![ev(1, 40_000), ev(2, 59_000), ev(3, 60_000)],
            ..Default::default()
        };
        let now = 1_700_000_000_000;
        let mut b = recorded.clone();
        rebase(&mut b, 60_000, now, Speed::Factor(1.0));
        assert_eq!(b.sent_at_ms, now);
        let times: Vec<i64> = b.events.iter().map(|e| now - e.captured_at_ms).collect();
        assert_eq!(times, vec![20_000, 1_000, 0]);

        let mut b = recorded.clone();
        rebase(&mut b, 60_000, now, Speed::Factor(4.0));
        let times: Vec<i64> = b.events.iter().map(|e| now - e.captured_at_ms).collect();
        assert_eq!(times, vec![5_000, 250, 0]);

        let mut b = recorded;
        rebase(&mut b, 60_000, now, Speed::Max);
        let times: Vec<i64> = b.events.iter().map(|e| now - e.captured_at_ms).collect();
        assert_eq!(times, vec![20_000, 1_000, 0]);
    }

    #[test]
    fn plan_groups_by_device_in_order_and_names_bad_batches() {
        let enc = |id: u64| {
            TelemetryBatch {
                batch_id: id,
                ..Default::default()
            }
            .encode_to_vec()
        };
        let rb = |d: &str, o, batch| RecordedBatch {
            device_id: d.into(),
            offset_ms: o,
            batch,
        };
        let plan = plan_devices(vec![
            rb("b", 1, enc(1)),
            rb("a", 2, enc(1)),
            rb("b", 3, enc(2)),
        ])
        .unwrap();
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[0].device_id, "a");
        let ids: Vec<u64> = plan[1].batches.iter().map(|(_, b)| b.batch_id).collect();
        assert_eq!(ids, vec![1, 2]);

        let err = plan_devices(vec![rb("a", 0, enc(1)), rb("c", 1, vec![0xff, 0xff])]).unwrap_err();
        assert_eq!((err.index, err.device_id.as_str()), (1, "c"));
    }
}
