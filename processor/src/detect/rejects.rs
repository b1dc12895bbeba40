//! `repeated_rejects`: a device whose traffic ingest keeps refusing for reasons that
//! point at an attacker rather than a bug (replays, stale or future timestamps, a
//! payload naming another device). One reject is noise; `count` of them within
//! `window` of ingest time is a finding, after which counting starts over.

use std::collections::VecDeque;
use std::time::Duration;

use fleetgate_proto::Evidence;
use serde::{Deserialize, Serialize};

use super::{
    Detector, DetectorKind, FindingDraft, Observed, Record, StateConfig, StateTable, MAX_EVIDENCE,
};
use crate::dedupe::DeviceKey;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepeatedRejectsConfig {
    pub enabled: bool,
    /// Reject reason codes that count (see ingest's reason list).
    pub reasons: Vec<String>,
    pub count: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for RepeatedRejectsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            reasons: [
                "replay_outside_window",
                "stale",
                "from_future",
                "identity_mismatch",
            ]
            .map(String::from)
            .to_vec(),
            count: 10,
            window: Duration::from_secs(60),
        }
    }
}

impl RepeatedRejectsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=10_000).contains(&self.count) {
            return Err("detectors.repeated_rejects.count must be in 1..=10000".into());
        }
        if self.window.is_zero() {
            return Err("detectors.repeated_rejects.window must be > 0".into());
        }
        Ok(())
    }
}

/// The last `count` counted rejects per device.
#[derive(Debug)]
pub struct RepeatedRejects {
    cfg: RepeatedRejectsConfig,
    recent: StateTable<DeviceKey, VecDeque<(i64, Evidence)>>,
}

impl RepeatedRejects {
    pub fn new(cfg: RepeatedRejectsConfig, state: &StateConfig) -> Self {
        Self {
            cfg,
            recent: state.table(),
        }
    }
}

impl Detector for RepeatedRejects {
    fn kind(&self) -> DetectorKind {
        DetectorKind::RepeatedRejects
    }

    fn tracked(&self) -> usize {
        self.recent.len()
    }

    fn observe(&mut self, obs: &Observed<'_>, out: &mut Vec<FindingDraft>) {
        let Record::Reject(reject) = obs.record else {
            return;
        };
        if !self.cfg.reasons.contains(&reject.reason) {
            return;
        }
        let now = obs.received_at_ms();
        let count = self.cfg.count as usize;
        let recent = self.recent.entry(obs.device, now, VecDeque::new);
        if recent.len() == count {
            recent.pop_front();
        }
        let note: String = reject.detail.chars().take(120).collect();
        let index = (recent.len() + 1) as f64;
        recent.push_back((now, obs.evidence(&reject.reason, index, count as f64, note)));
        let oldest = recent.front().map_or(now, |(t, _)| *t);
        if recent.len() < count || now - oldest > self.cfg.window.as_millis() as i64 {
            return;
        }
        let mut reasons: Vec<&str> = recent.iter().map(|(_, e)| e.quantity.as_str()).collect();
        reasons.sort_unstable();
        reasons.dedup();
        let summary = format!(
            "{count} rejects ({}) within {:.0} s (limit {count} per {:?})",
            reasons.join(", "),
            (now - oldest) as f64 / 1000.0,
            self.cfg.window
        );
        let skip = recent.len().saturating_sub(MAX_EVIDENCE);
        let evidence = recent.drain(..).skip(skip).map(|(_, e)| e).collect();
        out.push(FindingDraft::device(
            DetectorKind::RepeatedRejects,
            obs,
            summary,
            evidence,
            oldest,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testkit::*;

    fn detector() -> RepeatedRejects {
        RepeatedRejects::new(RepeatedRejectsConfig::default(), &StateConfig::default())
    }

    #[test]
    fn replay_storm_fires_once_per_count_with_evidence() {
        let recs: Vec<_> = (0..25)
            .map(|i| reject("car", i, "replay_outside_window", 1000 + i as i64 * 100))
            .collect();
        let f = run(&mut detector(), &recs);
        assert_eq!(f.len(), 2, "25 rejects = two full windows of 10");
        assert_eq!(f[0].evidence.len(), 10);
        assert_eq!(f[0].evidence[0].seq, 0);
        assert_eq!(f[0].evidence[9].seq, 9);
        assert_eq!(f[0].evidence[0].quantity, "replay_outside_window");
        assert_eq!(f[0].first_offending_received_at_ms, 1000);
        assert_eq!(f[1].evidence[0].seq, 10);
    }

    #[test]
    fn slow_trickle_and_uncounted_reasons_do_not_fire() {
        let mut recs: Vec<_> = (0..30)
            .map(|i| reject("car", i, "stale", i as i64 * 10_000))
            .collect();
        recs.extend((0..50).map(|i| reject("other", i, "rate_limited_device", i as i64)));
        recs.extend((0..50).map(|i| reject("third", i, "duplicate", i as i64)));
        assert!(run(&mut detector(), &recs).is_empty());
    }

    #[test]
    fn events_are_ignored() {
        let recs: Vec<_> = (0..50).map(|i| event("car", i, i as i64)).collect();
        assert!(run(&mut detector(), &recs).is_empty());
    }
}
