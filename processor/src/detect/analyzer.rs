//! The processor's pure core: one Kafka record in (topic kind, coordinates, bytes),
//! findings and quarantine decisions out. Decodes, drops redelivered events by
//! `(device, seq)`, runs every detector, weighs findings with the policy. No I/O, so
//! the runner is only an adapter and everything here is tested without a broker.

use std::time::Duration;

use fleetgate_proto::{Finding, QuarantineDecision, RejectRecord, TelemetryEnvelope};
use prost::Message;
use serde::{Deserialize, Serialize};

use super::{
    Coords, Detector, DetectorKind, DetectorsConfig, FindingDraft, Observed, Record, StateConfig,
    StateTable,
};
use crate::dedupe::{Deduplicator, DeviceKey, Seen};
use crate::policy::{Policy, PolicyConfig};

/// Which input topic a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Events,
    Rejected,
}

impl InputKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Rejected => "rejected",
        }
    }
}

/// What happened to one input record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Processed,
    /// A redelivered event (same device and seq): dropped.
    Duplicate,
    /// Too far behind the device's newest seq to prove it is not a redelivery: dropped.
    TooOld,
    /// Not a valid record of its topic: skipped (and counted).
    Undecodable(String),
}

/// What one record produced, appended in order.
#[derive(Debug, Default)]
pub struct Outputs {
    /// Findings to publish.
    pub findings: Vec<Finding>,
    pub decisions: Vec<QuarantineDecision>,
    /// Detectors of findings over the per-device publishing limit: weighed by the
    /// policy (and kept as decision evidence) but not published on their own.
    pub suppressed: Vec<DetectorKind>,
}

/// Dedupe + detectors + policy.
pub struct Analyzer {
    processor_id: String,
    dedupe: Deduplicator,
    detectors: Vec<Box<dyn Detector>>,
    policy: Policy,
    drafts: Vec<FindingDraft>,
    limit: FindingLimitConfig,
    published: StateTable<DeviceKey, (i64, u32)>,
}

/// Bound of the findings one device can make this processor publish, so a device
/// sending garbage at line rate cannot flood the anomalies topic (fleet-wide findings
/// have their own cooldown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FindingLimitConfig {
    /// Most findings published per device within `window` (event time).
    pub max_per_device: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for FindingLimitConfig {
    fn default() -> Self {
        Self {
            max_per_device: 60,
            window: Duration::from_secs(60),
        }
    }
}

impl FindingLimitConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_per_device == 0 || self.window.is_zero() {
            return Err("findings.max_per_device and findings.window must be > 0".into());
        }
        Ok(())
    }
}

impl Analyzer {
    pub fn new(
        processor_id: &str,
        detectors: &DetectorsConfig,
        policy: PolicyConfig,
        limit: FindingLimitConfig,
        state: &StateConfig,
    ) -> Self {
        Self {
            processor_id: processor_id.to_owned(),
            dedupe: Deduplicator::new(),
            detectors: detectors.build(state),
            policy: Policy::new(policy, processor_id, state),
            drafts: Vec::new(),
            limit,
            published: state.table(),
        }
    }

    /// Devices with detector state, largest table first.
    pub fn tracked_devices(&self) -> usize {
        self.detectors
            .iter()
            .map(|d| d.tracked())
            .max()
            .unwrap_or(0)
    }

    /// Processes one record. `now_ms` (wall clock) only stamps decisions.
    pub fn process(
        &mut self,
        kind: InputKind,
        coords: &Coords,
        payload: &[u8],
        now_ms: i64,
        out: &mut Outputs,
    ) -> Outcome {
        match kind {
            InputKind::Events => {
                let env = match TelemetryEnvelope::decode(payload) {
                    Ok(e) => e,
                    Err(e) => return Outcome::Undecodable(format!("TelemetryEnvelope: {e}")),
                };
                let (Some(event), Some(provenance)) = (&env.event, &env.provenance) else {
                    return Outcome::Undecodable("envelope without event or provenance".into());
                };
                let Some(device) = device_of(provenance) else {
                    return Outcome::Undecodable("provenance names no device".into());
                };
                match self.dedupe.observe(&device, event.seq) {
                    Seen::Fresh => {}
                    Seen::Duplicate => return Outcome::Duplicate,
                    Seen::TooOld => return Outcome::TooOld,
                }
                let obs = Observed {
                    device: &device,
                    provenance,
                    record: Record::Event(event),
                    coords,
                };
                self.analyze(&obs, now_ms, out);
            }
            InputKind::Rejected => {
                let reject = match RejectRecord::decode(payload) {
                    Ok(r) => r,
                    Err(e) => return Outcome::Undecodable(format!("RejectRecord: {e}")),
                };
                let Some(provenance) = &reject.provenance else {
                    return Outcome::Undecodable("reject without provenance".into());
                };
                let Some(device) = device_of(provenance) else {
                    return Outcome::Undecodable("provenance names no device".into());
                };
                let obs = Observed {
                    device: &device,
                    provenance,
                    record: Record::Reject(&reject),
                    coords,
                };
                self.analyze(&obs, now_ms, out);
            }
        }
        Outcome::Processed
    }

    /// Counts one published finding of `obs`'s device; false when over the limit.
    fn within_limit(&mut self, obs: &Observed<'_>) -> bool {
        let now = obs.received_at_ms();
        let window_ms = self.limit.window.as_millis() as i64;
        let (start, count) = self.published.entry(obs.device, now, || (now, 0));
        if now - *start >= window_ms {
            (*start, *count) = (now, 0);
        }
        *count = count.saturating_add(1);
        *count <= self.limit.max_per_device
    }

    fn analyze(&mut self, obs: &Observed<'_>, now_ms: i64, out: &mut Outputs) {
        self.drafts.clear();
        for d in &mut self.detectors {
            d.observe(obs, &mut self.drafts);
        }
        let mut drafts = std::mem::take(&mut self.drafts);
        for draft in drafts.drain(..) {
            let finding = Finding {
                detector: draft.detector.as_str().to_owned(),
                score: if draft.device_id.is_some() {
                    self.policy.weight(draft.detector)
                } else {
                    0.0
                },
                fleet_id: draft.fleet_id,
                device_id: draft.device_id.unwrap_or_default(),
                summary: draft.summary,
                evidence: draft.evidence,
                detected_at_ms: draft.detected_at_ms,
                processor_id: self.processor_id.clone(),
                first_offending_received_at_ms: draft.first_offending_received_at_ms,
            };
            if let Some(decision) = self.policy.observe(&finding, now_ms) {
                out.decisions.push(decision);
            }
            if finding.device_id.is_empty() || self.within_limit(obs) {
                out.findings.push(finding);
            } else {
                out.suppressed.push(draft.detector);
            }
        }
        self.drafts = drafts;
    }
}

fn device_of(p: &fleetgate_proto::Provenance) -> Option<DeviceKey> {
    (!p.device_id.is_empty() && !p.fleet_id.is_empty())
        .then(|| DeviceKey::new(&p.fleet_id, &p.device_id))
}

/// Kafka key of a finding: `<fleet>/<device>`, or `<fleet>` when fleet-wide.
pub fn finding_key(f: &Finding) -> String {
    if f.device_id.is_empty() {
        f.fleet_id.clone()
    } else {
        format!("{}/{}", f.fleet_id, f.device_id)
    }
}

/// Kafka key of a decision: `<fleet>/<device>`.
pub fn decision_key(d: &QuarantineDecision) -> String {
    format!("{}/{}", d.fleet_id, d.device_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testkit::*;
    use fleetgate_proto::QuarantineState;

    fn analyzer() -> Analyzer {
        Analyzer::new(
            "p-test",
            &DetectorsConfig::default(),
            PolicyConfig::default(),
            FindingLimitConfig::default(),
            &StateConfig::default(),
        )
    }

    fn encode(r: &Rec) -> Vec<u8> {
        match (&r.event, &r.reject) {
            (Some(e), _) => TelemetryEnvelope {
                event: Some(e.clone()),
                provenance: Some(r.provenance.clone()),
            }
            .encode_to_vec(),
            (None, Some(j)) => j.encode_to_vec(),
            _ => unreachable!(),
        }
    }

    fn feed(a: &mut Analyzer, kind: InputKind, r: &Rec, out: &mut Outputs) -> Outcome {
        a.process(kind, &r.coords, &encode(r), 1_700_000_000_000, out)
    }

    #[test]
    fn redelivered_events_are_dropped_before_detectors() {
        let mut a = analyzer();
        let mut out = Outputs::default();
        let r1 = event("car", 1, 0).at(48.8566, 2.3522, 10.0);
        let r2 = event("car", 2, 10_000).at(52.52, 13.405, 10.0);
        assert_eq!(
            feed(&mut a, InputKind::Events, &r1, &mut out),
            Outcome::Processed
        );
        assert_eq!(
            feed(&mut a, InputKind::Events, &r2, &mut out),
            Outcome::Processed
        );
        assert_eq!(out.findings.len(), 1);
        // The same jump redelivered is not a second finding.
        assert_eq!(
            feed(&mut a, InputKind::Events, &r2, &mut out),
            Outcome::Duplicate
        );
        assert_eq!(out.findings.len(), 1);
        let f = &out.findings[0];
        assert_eq!(f.detector, "impossible_travel");
        assert_eq!(f.score, 0.5);
        assert_eq!(f.processor_id, "p-test");
        assert_eq!(finding_key(f), "fleet-a/car");
    }

    #[test]
    fn replay_storm_quarantines_once() {
        let mut a = analyzer();
        let mut out = Outputs::default();
        for i in 0..40 {
            let r = reject("car", i, "replay_outside_window", 1000 + i as i64);
            assert_eq!(
                feed(&mut a, InputKind::Rejected, &r, &mut out),
                Outcome::Processed
            );
        }
        assert_eq!(out.findings.len(), 4);
        assert_eq!(out.decisions.len(), 1);
        let d = &out.decisions[0];
        assert_eq!(d.state, QuarantineState::Quarantined as i32);
        assert_eq!(decision_key(d), "fleet-a/car");
        assert_eq!(d.first_offending_received_at_ms, 1000);
        assert_eq!(d.evidence[0].evidence.len(), 10);
    }

    #[test]
    fn a_flooding_device_is_limited_but_still_quarantined() {
        let mut a = analyzer();
        let mut out = Outputs::default();
        for i in 0..200 {
            let r = event("car", i + 1, i as i64 * 10).signal("speed_kph", 9_999.0);
            assert_eq!(
                feed(&mut a, InputKind::Events, &r, &mut out),
                Outcome::Processed
            );
        }
        assert_eq!(out.findings.len(), 60);
        assert_eq!(out.suppressed.len(), 140);
        assert_eq!(out.decisions.len(), 1);
        // A new window publishes again.
        let r = event("car", 500, 70_000).signal("speed_kph", 9_999.0);
        feed(&mut a, InputKind::Events, &r, &mut out);
        assert_eq!(out.findings.len(), 61);
    }

    #[test]
    fn garbage_is_reported_not_panicked_on() {
        let mut a = analyzer();
        let mut out = Outputs::default();
        let coords = event("x", 1, 0).coords;
        for kind in [InputKind::Events, InputKind::Rejected] {
            assert!(matches!(
                a.process(kind, &coords, &[0xff, 0xff, 0xff], 0, &mut out),
                Outcome::Undecodable(_)
            ));
            assert!(matches!(
                a.process(kind, &coords, &[], 0, &mut out),
                Outcome::Undecodable(_)
            ));
        }
        assert!(out.findings.is_empty());
    }
}
