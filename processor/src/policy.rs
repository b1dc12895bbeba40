//! Turns findings into quarantine decisions. Each detector has a weight; a device's
//! score is the sum of its findings' weights, halving every `half_life` of event time
//! (so a replayed backlog is judged by when things happened, not when they were read).
//! When the score reaches `threshold` the device is quarantined once: while a decision
//! this processor produced is in force (until its expiry, forever for expiry 0) no new
//! one is produced for that device, however many findings follow.
//! Fleet-wide findings never quarantine a device.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use fleetgate_proto::{Finding, QuarantineDecision, QuarantineState};
use serde::{Deserialize, Serialize};

use crate::dedupe::DeviceKey;
use crate::detect::{DetectorKind, StateConfig, StateTable};

/// Score added by one finding of each detector. `fleet_shift` has none on purpose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    pub impossible_value: f64,
    pub impossible_travel: f64,
    pub odometer_backwards: f64,
    pub soc_jump: f64,
    pub rate_spike: f64,
    pub repeated_rejects: f64,
    pub clock_drift: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            impossible_value: 0.5,
            impossible_travel: 0.5,
            odometer_backwards: 0.5,
            soc_jump: 0.3,
            rate_spike: 0.3,
            repeated_rejects: 1.0,
            clock_drift: 0.3,
        }
    }
}

impl Weights {
    pub fn of(&self, kind: DetectorKind) -> f64 {
        match kind {
            DetectorKind::ImpossibleValue => self.impossible_value,
            DetectorKind::ImpossibleTravel => self.impossible_travel,
            DetectorKind::OdometerBackwards => self.odometer_backwards,
            DetectorKind::SocJump => self.soc_jump,
            DetectorKind::RateSpike => self.rate_spike,
            DetectorKind::RepeatedRejects => self.repeated_rejects,
            DetectorKind::ClockDrift => self.clock_drift,
            DetectorKind::FleetShift => 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Score at which a device is quarantined.
    pub threshold: f64,
    #[serde(with = "humantime_serde")]
    pub half_life: Duration,
    /// Lifetime of a decision; 0 = until an operator releases the device.
    #[serde(with = "humantime_serde")]
    pub expiry: Duration,
    /// Most findings attached to a decision as evidence (the latest are kept).
    pub max_evidence_findings: usize,
    pub weights: Weights,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            threshold: 1.0,
            half_life: Duration::from_secs(600),
            expiry: Duration::from_secs(3600),
            max_evidence_findings: 16,
            weights: Weights::default(),
        }
    }
}

impl PolicyConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.threshold.is_finite() && self.threshold > 0.0) {
            return Err("policy.threshold must be a positive number".into());
        }
        if self.half_life.is_zero() {
            return Err("policy.half_life must be > 0".into());
        }
        if self.max_evidence_findings == 0 {
            return Err("policy.max_evidence_findings must be >= 1".into());
        }
        let w = &self.weights;
        for (name, v) in [
            ("impossible_value", w.impossible_value),
            ("impossible_travel", w.impossible_travel),
            ("odometer_backwards", w.odometer_backwards),
            ("soc_jump", w.soc_jump),
            ("rate_spike", w.rate_spike),
            ("repeated_rejects", w.repeated_rejects),
            ("clock_drift", w.clock_drift),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("policy.weights.{name} must be >= 0"));
            }
        }
        Ok(())
    }
}

/// `score` after `elapsed_ms` with the given half-life; never grows, never negative.
pub fn decayed(score: f64, elapsed_ms: i64, half_life: Duration) -> f64 {
    let hl = half_life.as_millis().max(1) as f64;
    score * 0.5f64.powf(elapsed_ms.max(0) as f64 / hl)
}

#[derive(Debug, Default)]
struct DeviceScore {
    score: f64,
    at_ms: i64,
    findings: VecDeque<Finding>,
    /// Expiry of the decision in force: `Some(0)` = no expiry, `None` = none in force.
    quarantined_until_ms: Option<i64>,
}

/// Per-device scores and the decisions this processor produced.
#[derive(Debug)]
pub struct Policy {
    cfg: PolicyConfig,
    decided_by: String,
    devices: StateTable<DeviceKey, DeviceScore>,
}

impl Policy {
    pub fn new(cfg: PolicyConfig, processor_id: &str, state: &StateConfig) -> Self {
        // A quarantined device must stay remembered for as long as its decision
        // holds, or it would be quarantined again: idle eviction is off here.
        let devices = StateTable::new(state.max_devices, i64::MAX);
        Self {
            cfg,
            decided_by: format!("processor:{processor_id}"),
            devices,
        }
    }

    pub fn weight(&self, kind: DetectorKind) -> f64 {
        self.cfg.weights.of(kind)
    }

    /// The device's current score at event time `at_ms` (for tests and metrics).
    pub fn score(&self, device: &DeviceKey, at_ms: i64) -> f64 {
        self.devices.get(device).map_or(0.0, |d| {
            decayed(d.score, at_ms - d.at_ms, self.cfg.half_life)
        })
    }

    /// Adds a per-device finding; returns a decision when the device just crossed the
    /// threshold. `now_ms` is the wall clock, used for `decided_at`/`expires_at`.
    pub fn observe(&mut self, finding: &Finding, now_ms: i64) -> Option<QuarantineDecision> {
        if finding.device_id.is_empty() {
            return None;
        }
        let key = DeviceKey::new(&finding.fleet_id, &finding.device_id);
        let at = finding.detected_at_ms;
        let d = self.devices.entry(&key, now_ms, DeviceScore::default);
        if d.findings.is_empty() {
            d.at_ms = at;
        }
        // Out-of-order findings do not rewind the clock (and so cannot undo decay).
        d.score = decayed(d.score, at - d.at_ms, self.cfg.half_life) + finding.score;
        d.at_ms = d.at_ms.max(at);
        if d.findings.len() == self.cfg.max_evidence_findings {
            d.findings.pop_front();
        }
        d.findings.push_back(finding.clone());
        if let Some(until) = d.quarantined_until_ms {
            if until == 0 || now_ms < until {
                return None;
            }
            d.quarantined_until_ms = None;
        }
        if d.score < self.cfg.threshold {
            return None;
        }
        let expires_at_ms = if self.cfg.expiry.is_zero() {
            0
        } else {
            now_ms + self.cfg.expiry.as_millis() as i64
        };
        let evidence: Vec<Finding> = d.findings.drain(..).collect();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for f in &evidence {
            *counts.entry(f.detector.as_str()).or_default() += 1;
        }
        let detectors: Vec<String> = counts.iter().map(|(k, n)| format!("{k}×{n}")).collect();
        let reason = format!(
            "policy: score {:.2} ≥ {:.2} ({})",
            d.score,
            self.cfg.threshold,
            detectors.join(", ")
        );
        let first_offending_received_at_ms = evidence
            .iter()
            .map(|f| f.first_offending_received_at_ms)
            .filter(|&t| t > 0)
            .min()
            .unwrap_or(0);
        d.score = 0.0;
        d.quarantined_until_ms = Some(expires_at_ms);
        Some(QuarantineDecision {
            fleet_id: key.fleet_id,
            device_id: key.device_id,
            state: QuarantineState::Quarantined as i32,
            reason,
            evidence,
            decided_by: self.decided_by.clone(),
            decided_at_ms: now_ms,
            expires_at_ms,
            decision_id: hex::encode(rand::random::<[u8; 16]>()),
            first_offending_received_at_ms,
            signer_cert_der: Vec::new(),
            signature: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn finding(device: &str, detector: DetectorKind, score: f64, at_ms: i64) -> Finding {
        Finding {
            detector: detector.as_str().into(),
            fleet_id: "f".into(),
            device_id: device.into(),
            score,
            detected_at_ms: at_ms,
            first_offending_received_at_ms: at_ms - 5,
            ..Default::default()
        }
    }

    fn policy(expiry: Duration) -> Policy {
        let cfg = PolicyConfig {
            expiry,
            ..PolicyConfig::default()
        };
        Policy::new(cfg, "p1", &StateConfig::default())
    }

    #[test]
    fn crossing_the_threshold_quarantines_once_with_evidence() {
        let mut p = policy(Duration::from_secs(3600));
        let travel = DetectorKind::ImpossibleTravel;
        assert!(p
            .observe(&finding("car", travel, 0.5, 1000), 50_000)
            .is_none());
        let d = p
            .observe(&finding("car", travel, 0.5, 1000), 50_000)
            .expect("0.5 + 0.5 reaches 1.0");
        assert_eq!(d.state, QuarantineState::Quarantined as i32);
        assert_eq!(d.reason, "policy: score 1.00 ≥ 1.00 (impossible_travel×2)");
        assert_eq!(d.evidence.len(), 2);
        assert_eq!(d.decided_by, "processor:p1");
        assert_eq!(d.decided_at_ms, 50_000);
        assert_eq!(d.expires_at_ms, 50_000 + 3_600_000);
        assert_eq!(d.first_offending_received_at_ms, 995);
        assert_eq!(d.decision_id.len(), 32);
        assert!(d.signature.is_empty() && d.signer_cert_der.is_empty());
        // Still misbehaving while quarantined: no second decision.
        for i in 0..20 {
            assert!(p
                .observe(&finding("car", travel, 1.0, 2000 + i), 60_000)
                .is_none());
        }
        // After expiry, fresh evidence decides again.
        let again = p.observe(&finding("car", travel, 1.0, 9_000_000), 50_000 + 3_600_001);
        assert!(again.is_some());
        assert_ne!(again.unwrap().decision_id, d.decision_id);
    }

    #[test]
    fn expiry_zero_means_never_again() {
        let mut p = policy(Duration::ZERO);
        let k = DetectorKind::RepeatedRejects;
        let d = p.observe(&finding("car", k, 1.0, 0), 10).unwrap();
        assert_eq!(d.expires_at_ms, 0);
        assert!(p
            .observe(&finding("car", k, 5.0, 1), i64::MAX / 2)
            .is_none());
    }

    #[test]
    fn findings_far_apart_decay_below_the_threshold() {
        let mut p = policy(Duration::from_secs(3600));
        let k = DetectorKind::ImpossibleValue;
        // Half-life 10 min; one 0.5 finding per hour never accumulates to 1.0.
        for h in 0..24 {
            assert!(p
                .observe(&finding("car", k, 0.5, h * 3_600_000), 0)
                .is_none());
        }
        assert!(p.score(&DeviceKey::new("f", "car"), 24 * 3_600_000) < 0.5);
    }

    #[test]
    fn fleet_wide_findings_and_other_devices_do_not_count() {
        let mut p = policy(Duration::from_secs(3600));
        let k = DetectorKind::ImpossibleTravel;
        assert!(p
            .observe(&finding("", DetectorKind::FleetShift, 10.0, 0), 0)
            .is_none());
        assert!(p.observe(&finding("a", k, 0.5, 0), 0).is_none());
        assert!(p.observe(&finding("b", k, 0.5, 0), 0).is_none());
    }

    proptest! {
        #[test]
        fn decay_is_monotone_and_bounded(score in 0.0f64..1e6, a in 0i64..1_000_000_000, b in 0i64..1_000_000_000, hl in 1u64..100_000) {
            let hl = Duration::from_millis(hl);
            let (lo, hi) = (a.min(b), a.max(b));
            let s_lo = decayed(score, lo, hl);
            let s_hi = decayed(score, hi, hl);
            prop_assert!(s_hi <= s_lo);
            prop_assert!(s_lo <= score);
            prop_assert!(s_hi >= 0.0);
            prop_assert_eq!(decayed(score, -a, hl), score);
        }
    }
}
