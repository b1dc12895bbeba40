//! Implausible jumps of monotone or slow signals: `odometer_backwards` (an odometer
//! that decreases: tampering or a replayed/forged stream) and `soc_jump` (state of
//! charge moving more than a battery can within a short window). Samples are ordered
//! by the device's `captured_at_ms`; an out-of-order sample is compared with nothing
//! and anchors nothing, so reordering in transit is not mistaken for a jump.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    positive, signal_value, Coords, Detector, DetectorKind, FindingDraft, Observed, StateConfig,
    StateTable,
};
use crate::dedupe::DeviceKey;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OdometerConfig {
    pub enabled: bool,
    pub signal: String,
    /// A decrease up to this much is tolerated (rounding, unit conversions), km.
    pub backwards_tolerance_km: f64,
}

impl Default for OdometerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            signal: "odometer_km".into(),
            backwards_tolerance_km: 0.5,
        }
    }
}

impl OdometerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.backwards_tolerance_km >= 0.0 && self.backwards_tolerance_km.is_finite()) {
            return Err("detectors.odometer_backwards.backwards_tolerance_km must be >= 0".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocJumpConfig {
    pub enabled: bool,
    pub signal: String,
    /// Largest believable change of state of charge within `window`, percentage points.
    /// DC fast charging adds roughly 1-3 points per minute.
    pub max_jump_pct: f64,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for SocJumpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            signal: "soc_pct".into(),
            max_jump_pct: 10.0,
            window: Duration::from_secs(60),
        }
    }
}

impl SocJumpConfig {
    pub fn validate(&self) -> Result<(), String> {
        positive("detectors.soc_jump.max_jump_pct", self.max_jump_pct)?;
        if self.window.is_zero() {
            return Err("detectors.soc_jump.window must be > 0".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Sample {
    value: f64,
    captured_at_ms: i64,
    received_at_ms: i64,
    seq: u64,
    coords: Coords,
}

impl Sample {
    fn of(obs: &Observed<'_>, value: f64, captured_at_ms: i64) -> Self {
        Self {
            value,
            captured_at_ms,
            received_at_ms: obs.received_at_ms(),
            seq: obs.seq(),
            coords: obs.coords.clone(),
        }
    }

    fn evidence(
        &self,
        obs: &Observed<'_>,
        quantity: &str,
        threshold: f64,
    ) -> fleetgate_proto::Evidence {
        let mut e = obs.evidence(quantity, self.value, threshold, String::new());
        e.topic = self.coords.topic.to_string();
        e.partition = self.coords.partition;
        e.offset = self.coords.offset;
        e.seq = self.seq;
        e
    }
}

/// Last odometer reading per device.
#[derive(Debug)]
pub struct OdometerBackwards {
    cfg: OdometerConfig,
    last: StateTable<DeviceKey, Sample>,
}

impl OdometerBackwards {
    pub fn new(cfg: OdometerConfig, state: &StateConfig) -> Self {
        Self {
            cfg,
            last: state.table(),
        }
    }
}

impl Detector for OdometerBackwards {
    fn kind(&self) -> DetectorKind {
        DetectorKind::OdometerBackwards
    }

    fn tracked(&self) -> usize {
        self.last.len()
    }

    fn observe(&mut self, obs: &Observed<'_>, out: &mut Vec<FindingDraft>) {
        let Some(event) = obs.event() else { return };
        let Some(value) = signal_value(event, &self.cfg.signal).filter(|v| v.is_finite()) else {
            return;
        };
        let sample = Sample::of(obs, value, event.captured_at_ms);
        let last = self
            .last
            .entry(obs.device, obs.received_at_ms(), || sample.clone());
        if sample.captured_at_ms <= last.captured_at_ms {
            return;
        }
        let floor = last.value - self.cfg.backwards_tolerance_km;
        if value < floor {
            out.push(FindingDraft::device(
                DetectorKind::OdometerBackwards,
                obs,
                format!(
                    "{} went back from {} to {value} (tolerance {} km)",
                    self.cfg.signal, last.value, self.cfg.backwards_tolerance_km
                ),
                vec![
                    last.evidence(obs, &self.cfg.signal, floor),
                    sample.evidence(obs, &self.cfg.signal, floor),
                ],
                last.received_at_ms.min(sample.received_at_ms),
            ));
        }
        *last = sample;
    }
}

/// Recent state-of-charge samples per device (within `window`, at most [`SOC_SAMPLES`]).
#[derive(Debug)]
pub struct SocJump {
    cfg: SocJumpConfig,
    recent: StateTable<DeviceKey, VecDeque<Sample>>,
}

/// Bound of the per-device sample window.
pub const SOC_SAMPLES: usize = 128;

impl SocJump {
    pub fn new(cfg: SocJumpConfig, state: &StateConfig) -> Self {
        Self {
            cfg,
            recent: state.table(),
        }
    }
}

impl Detector for SocJump {
    fn kind(&self) -> DetectorKind {
        DetectorKind::SocJump
    }

    fn tracked(&self) -> usize {
        self.recent.len()
    }

    fn observe(&mut self, obs: &Observed<'_>, out: &mut Vec<FindingDraft>) {
        let Some(event) = obs.event() else { return };
        let Some(value) = signal_value(event, &self.cfg.signal).filter(|v| v.is_finite()) else {
            return;
        };
        let sample = Sample::of(obs, value, event.captured_at_ms);
        let window_ms = self.cfg.window.as_millis() as i64;
        let recent = self
            .recent
            .entry(obs.device, obs.received_at_ms(), VecDeque::new);
        if recent
            .back()
            .is_some_and(|b| sample.captured_at_ms <= b.captured_at_ms)
        {
            return;
        }
        while recent
            .front()
            .is_some_and(|f| sample.captured_at_ms - f.captured_at_ms > window_ms)
        {
            recent.pop_front();
        }
        // The sample in the window furthest from this one.
        let furthest = recent
            .iter()
            .max_by(|a, b| (a.value - value).abs().total_cmp(&(b.value - value).abs()));
        if let Some(other) = furthest.filter(|o| (o.value - value).abs() > self.cfg.max_jump_pct) {
            let delta = value - other.value;
            let secs = (sample.captured_at_ms - other.captured_at_ms) as f64 / 1000.0;
            out.push(FindingDraft::device(
                DetectorKind::SocJump,
                obs,
                format!(
                    "{} changed by {delta:+.1} points in {secs:.0} s (max {} within {:?})",
                    self.cfg.signal, self.cfg.max_jump_pct, self.cfg.window
                ),
                vec![
                    other.evidence(obs, &self.cfg.signal, self.cfg.max_jump_pct),
                    sample.evidence(obs, &self.cfg.signal, self.cfg.max_jump_pct),
                ],
                other.received_at_ms.min(sample.received_at_ms),
            ));
            // Start over from the new level: one jump is one finding.
            recent.clear();
        }
        if recent.len() == SOC_SAMPLES {
            recent.pop_front();
        }
        recent.push_back(sample);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testkit::*;

    fn odo() -> OdometerBackwards {
        OdometerBackwards::new(OdometerConfig::default(), &StateConfig::default())
    }

    fn soc() -> SocJump {
        SocJump::new(SocJumpConfig::default(), &StateConfig::default())
    }

    #[test]
    fn odometer_equal_or_slowly_increasing_is_fine() {
        let recs: Vec<_> = (0..100)
            .map(|i| {
                event("car", i, i as i64 * 1000)
                    .signal("odometer_km", 1000.0 + (i / 3) as f64 * 0.03)
            })
            .collect();
        assert!(run(&mut odo(), &recs).is_empty());
    }

    #[test]
    fn odometer_rounding_within_tolerance_and_reordered_samples_are_fine() {
        let recs = [
            event("car", 1, 1000).signal("odometer_km", 1000.4),
            event("car", 2, 2000).signal("odometer_km", 1000.0),
            // Captured earlier than what was seen: arrived late, not a rollback.
            event("car", 3, 3000)
                .captured(500)
                .signal("odometer_km", 900.0),
        ];
        assert!(run(&mut odo(), &recs).is_empty());
    }

    #[test]
    fn odometer_rollback_fires_once() {
        let recs = [
            event("car", 1, 1000).signal("odometer_km", 52_000.0),
            event("car", 2, 2000).signal("odometer_km", 12_000.0),
            event("car", 3, 3000).signal("odometer_km", 12_000.1),
        ];
        let f = run(&mut odo(), &recs);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].detector, DetectorKind::OdometerBackwards);
        assert_eq!(f[0].evidence[0].seq, 1);
        assert_eq!(f[0].evidence[1].value, 12_000.0);
        assert_eq!(f[0].evidence[1].threshold, 51_999.5);
    }

    #[test]
    fn charging_one_point_per_minute_is_fine() {
        // Sampled every 5 s for an hour: 0.0833 points per sample, 60 points total.
        let recs: Vec<_> = (0..720)
            .map(|i| event("car", i, i as i64 * 5000).signal("soc_pct", 20.0 + i as f64 / 12.0))
            .collect();
        assert!(run(&mut soc(), &recs).is_empty());
    }

    #[test]
    fn soc_gap_longer_than_window_is_not_a_jump() {
        let recs = [
            event("car", 1, 0).signal("soc_pct", 20.0),
            event("car", 2, 3_600_000).signal("soc_pct", 80.0),
        ];
        assert!(run(&mut soc(), &recs).is_empty());
    }

    #[test]
    fn soc_jump_fires_once_even_when_ramped_in_small_steps() {
        // 4 points per 5 s: each step is small, 24 points within the minute is not.
        let mut recs: Vec<_> = (0..6)
            .map(|i| event("car", i, i as i64 * 5000).signal("soc_pct", 40.0 + 4.0 * i as f64))
            .collect();
        recs.push(event("car", 6, 30_000).signal("soc_pct", 60.0));
        let f = run(&mut soc(), &recs);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].evidence[0].value, 40.0);
        assert_eq!(f[0].evidence[1].value, 52.0);
    }
}
