//! `clock_drift`: a device whose clock stays off from ingest's by more than
//! `max_drift` (a device replaying recorded traffic, or a tampered RTC that lets it
//! steer freshness checks). Drift is `received_at − sent_at` (falling back to
//! `captured_at` when sent_at is missing): `captured_at` alone would also measure how
//! long an honest device buffered events in a tunnel. Only a sustained drift counts:
//! at least `min_events` consecutive events over at least `sustain` of ingest time.
//! One finding per streak; an in-limit event ends the streak.

use std::time::Duration;

use fleetgate_proto::Evidence;
use serde::{Deserialize, Serialize};

use super::{Detector, DetectorKind, FindingDraft, Observed, StateConfig, StateTable};
use crate::dedupe::DeviceKey;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockDriftConfig {
    pub enabled: bool,
    /// Largest tolerated |received_at − sent_at|.
    #[serde(with = "humantime_serde")]
    pub max_drift: Duration,
    pub min_events: u32,
    #[serde(with = "humantime_serde")]
    pub sustain: Duration,
}

impl Default for ClockDriftConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_drift: Duration::from_secs(15),
            min_events: 10,
            sustain: Duration::from_secs(60),
        }
    }
}

impl ClockDriftConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_drift.is_zero() {
            return Err("detectors.clock_drift.max_drift must be > 0".into());
        }
        if self.min_events == 0 {
            return Err("detectors.clock_drift.min_events must be >= 1".into());
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Streak {
    count: u32,
    started_at_ms: i64,
    first: Option<Evidence>,
    fired: bool,
}

/// The current out-of-limit streak per device.
#[derive(Debug)]
pub struct ClockDrift {
    cfg: ClockDriftConfig,
    streaks: StateTable<DeviceKey, Streak>,
}

impl ClockDrift {
    pub fn new(cfg: ClockDriftConfig, state: &StateConfig) -> Self {
        Self {
            cfg,
            streaks: state.table(),
        }
    }
}

impl Detector for ClockDrift {
    fn kind(&self) -> DetectorKind {
        DetectorKind::ClockDrift
    }

    fn tracked(&self) -> usize {
        self.streaks.len()
    }

    fn observe(&mut self, obs: &Observed<'_>, out: &mut Vec<FindingDraft>) {
        let Some(event) = obs.event() else { return };
        let p = obs.provenance;
        let device_time = if p.sent_at_ms != 0 {
            p.sent_at_ms
        } else {
            event.captured_at_ms
        };
        let now = obs.received_at_ms();
        let drift_s = (now - device_time) as f64 / 1000.0;
        let limit_s = self.cfg.max_drift.as_secs_f64();
        if drift_s.abs() <= limit_s {
            self.streaks.remove(obs.device);
            return;
        }
        let streak = self.streaks.entry(obs.device, now, Streak::default);
        let e = obs.evidence("clock_drift_s", drift_s, limit_s, String::new());
        if streak.count == 0 {
            streak.started_at_ms = now;
            streak.first = Some(e.clone());
        }
        streak.count = streak.count.saturating_add(1);
        let lasted = now - streak.started_at_ms;
        if streak.fired
            || streak.count < self.cfg.min_events
            || lasted < self.cfg.sustain.as_millis() as i64
        {
            return;
        }
        streak.fired = true;
        let evidence = streak.first.iter().cloned().chain([e]).collect();
        out.push(FindingDraft::device(
            DetectorKind::ClockDrift,
            obs,
            format!(
                "clock off by {drift_s:+.1} s for {} events over {:.0} s (limit ±{limit_s} s)",
                streak.count,
                lasted as f64 / 1000.0
            ),
            evidence,
            streak.started_at_ms,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testkit::*;

    fn detector() -> ClockDrift {
        ClockDrift::new(ClockDriftConfig::default(), &StateConfig::default())
    }

    #[test]
    fn sustained_offset_fires_once_per_streak() {
        let mut recs: Vec<_> = (0..120)
            .map(|i| {
                let t = i as i64 * 1000;
                event("car", i, t).captured(t - 40_000).sent(t - 40_000)
            })
            .collect();
        recs.push(event("car", 500, 200_000));
        recs.extend((0..70).map(|i| {
            let t = 300_000 + i as i64 * 1000;
            event("car", 600 + i, t)
                .captured(t + 20_000)
                .sent(t + 20_000)
        }));
        let f = run(&mut detector(), &recs);
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0].evidence[0].seq, 0);
        assert_eq!(f[0].evidence[1].seq, 60);
        assert_eq!(f[0].evidence[0].value, 40.0);
        assert_eq!(f[1].evidence[0].value, -20.0);
    }

    #[test]
    fn tunnel_backlog_sent_promptly_is_not_drift() {
        let recs: Vec<_> = (0..300)
            .map(|i| {
                let t = 600_000 + i as i64 * 10;
                event("car", i, t).captured(t - 300_000).sent(t - 20)
            })
            .collect();
        assert!(run(&mut detector(), &recs).is_empty());
    }

    #[test]
    fn brief_glitches_do_not_fire() {
        let recs: Vec<_> = (0..600)
            .map(|i| {
                let t = i as i64 * 1000;
                let off = if i % 5 == 0 { 0 } else { 60_000 };
                event("car", i, t).sent(t - off)
            })
            .collect();
        assert!(run(&mut detector(), &recs).is_empty());
    }
}
