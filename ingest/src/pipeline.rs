//! The transport-agnostic core: from `(identity, frame bytes)` to a verdict per event.
//! Pure and synchronous, so it can be benchmarked and property-tested without I/O.
//! Guarantees: the size limit is applied before any decoding; identity comes only
//! from the caller (the certificate), and a payload naming another device or fleet
//! is refused as a whole; every refused event carries exactly one reason; an event
//! reaches the sequence stage only if it passed every other check, and is then
//! reserved in its device's anti-replay window (the caller commits or releases it).

use fleetgate_proto::{Location, TelemetryBatch, TelemetryEvent};
use prost::Message;
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::catalog::{SignalCatalog, SignalError};
use crate::freshness::FreshnessWindow;
use crate::identity::DeviceIdentity;
use crate::reject::RejectReason;
use crate::replay::{ReplayWindows, SeqStatus};

/// Structural limits applied to every frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest encoded batch accepted, checked before decoding.
    pub max_frame_bytes: usize,
    pub max_events_per_batch: usize,
    pub max_signals_per_event: usize,
    pub supported_schema_versions: Vec<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1024 * 1024,
            max_events_per_batch: 10_000,
            max_signals_per_event: 256,
            supported_schema_versions: vec![1],
        }
    }
}

/// A reject with its reason code and a human-readable detail (never secrets).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: RejectReason,
    pub detail: String,
}

impl Refusal {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// What the pipeline decided about one frame.
#[derive(Debug)]
pub enum Checked {
    /// Nothing in the frame is accepted. `batch_id` is known if the frame decoded.
    Refused { batch_id: u64, refusal: Refusal },
    /// The batch is sound; each event has its own verdict, in batch order.
    Events {
        batch: TelemetryBatch,
        verdicts: Vec<Result<(), Refusal>>,
    },
}

/// Decode, validation, freshness and sequence stages, configured once at start-up.
#[derive(Debug, Clone)]
pub struct Pipeline {
    limits: Limits,
    catalog: SignalCatalog,
    freshness: FreshnessWindow,
    replay: Arc<ReplayWindows>,
}

impl Pipeline {
    pub fn new(
        limits: Limits,
        catalog: SignalCatalog,
        freshness: FreshnessWindow,
        replay: Arc<ReplayWindows>,
    ) -> Self {
        Self {
            limits,
            catalog,
            freshness,
            replay,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The windows in which accepted events were reserved (commit/release them).
    pub fn replay(&self) -> &Arc<ReplayWindows> {
        &self.replay
    }

    /// Checks one frame received at server time `now_ms`.
    pub fn check(&self, identity: &DeviceIdentity, frame: &[u8], now_ms: i64) -> Checked {
        if frame.len() > self.limits.max_frame_bytes {
            return refused(
                0,
                RejectReason::FrameTooLarge,
                format!(
                    "{} bytes > limit {}",
                    frame.len(),
                    self.limits.max_frame_bytes
                ),
            );
        }
        let batch = match TelemetryBatch::decode(frame) {
            Ok(b) => b,
            Err(e) => return refused(0, RejectReason::DecodeError, e.to_string()),
        };
        // Observed before any refusal: a device whose clock is off is exactly the one
        // whose offset matters.
        let offset_ms = self.replay.observe_clock(
            &identity.fleet_id,
            &identity.device_id,
            batch.sent_at_ms,
            now_ms,
        );
        crate::events::clock_offset(offset_ms);
        if let Some(refusal) = self.check_batch(identity, &batch, now_ms) {
            return Checked::Refused {
                batch_id: batch.batch_id,
                refusal,
            };
        }
        let mut verdicts: Vec<Result<(), Refusal>> = batch
            .events
            .iter()
            .map(|e| {
                self.check_event(e)?;
                self.freshness.check(e.captured_at_ms, now_ms).map_err(|r| {
                    Refusal::new(
                        r,
                        format!("captured_at_ms {} vs server {now_ms}", e.captured_at_ms),
                    )
                })
            })
            .collect();
        self.replay
            .with(&identity.fleet_id, &identity.device_id, |window| {
                let gaps_before = window.gaps();
                for (event, verdict) in batch.events.iter().zip(verdicts.iter_mut()) {
                    if verdict.is_err() {
                        continue;
                    }
                    let reason = match window.reserve(event.seq) {
                        SeqStatus::New => continue,
                        SeqStatus::Duplicate => RejectReason::Duplicate,
                        SeqStatus::InFlight => RejectReason::DuplicateInFlight,
                        SeqStatus::TooOld => RejectReason::ReplayOutsideWindow,
                    };
                    *verdict = Err(Refusal::new(
                        reason,
                        format!("seq {} (highest seen {})", event.seq, window.highest()),
                    ));
                }
                let opened = window.gaps().saturating_sub(gaps_before);
                if opened > 0 {
                    crate::events::sequence_gaps(opened);
                }
            });
        Checked::Events { batch, verdicts }
    }

    fn check_batch(
        &self,
        identity: &DeviceIdentity,
        batch: &TelemetryBatch,
        now_ms: i64,
    ) -> Option<Refusal> {
        if !self
            .limits
            .supported_schema_versions
            .contains(&batch.schema_version)
        {
            return Some(Refusal::new(
                RejectReason::SchemaUnknown,
                format!("schema_version {}", batch.schema_version),
            ));
        }
        // A payload may repeat its identity, but never choose it.
        if !batch.device_id.is_empty() && batch.device_id != identity.device_id.as_str() {
            return Some(Refusal::new(
                RejectReason::IdentityMismatch,
                "payload device_id differs from certificate",
            ));
        }
        if !batch.fleet_id.is_empty() && batch.fleet_id != identity.fleet_id.as_str() {
            return Some(Refusal::new(
                RejectReason::IdentityMismatch,
                "payload fleet_id differs from certificate",
            ));
        }
        if batch.events.len() > self.limits.max_events_per_batch {
            return Some(Refusal::new(
                RejectReason::TooManyEvents,
                format!(
                    "{} events > limit {}",
                    batch.events.len(),
                    self.limits.max_events_per_batch
                ),
            ));
        }
        if let Err(reason) = self.freshness.check(batch.sent_at_ms, now_ms) {
            return Some(Refusal::new(
                reason,
                format!("sent_at_ms {} vs server {now_ms}", batch.sent_at_ms),
            ));
        }
        None
    }

    fn check_event(&self, event: &TelemetryEvent) -> Result<(), Refusal> {
        let out_of_range = |d: String| Refusal::new(RejectReason::FieldOutOfRange, d);
        if event.seq == 0 {
            return Err(out_of_range("seq must be >= 1".into()));
        }
        if event.captured_at_ms <= 0 {
            return Err(out_of_range("captured_at_ms missing".into()));
        }
        if event.signals.is_empty() && event.location.is_none() {
            return Err(out_of_range(
                "event has neither signals nor location".into(),
            ));
        }
        if event.signals.len() > self.limits.max_signals_per_event {
            return Err(out_of_range(format!(
                "{} signals > limit {}",
                event.signals.len(),
                self.limits.max_signals_per_event
            )));
        }
        for (i, signal) in event.signals.iter().enumerate() {
            if event.signals[..i].iter().any(|s| s.name == signal.name) {
                return Err(out_of_range(format!("signal {:?} repeated", signal.name)));
            }
            self.catalog
                .check(&signal.name, signal.value.as_ref())
                .map_err(|e| match e {
                    SignalError::Unknown(_) => {
                        Refusal::new(RejectReason::SignalUnknown, e.to_string())
                    }
                    _ => out_of_range(e.to_string()),
                })?;
        }
        if let Some(loc) = &event.location {
            check_location(loc).map_err(out_of_range)?;
        }
        Ok(())
    }
}

fn check_location(loc: &Location) -> Result<(), String> {
    let ok = (-90.0..=90.0).contains(&loc.latitude_deg)
        && (-180.0..=180.0).contains(&loc.longitude_deg)
        && (0.0..=100_000.0).contains(&loc.accuracy_m)
        && (0.0..360.0).contains(&loc.heading_deg);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "location ({}, {}) accuracy {} heading {} out of range",
            loc.latitude_deg, loc.longitude_deg, loc.accuracy_m, loc.heading_deg
        ))
    }
}

fn refused(batch_id: u64, reason: RejectReason, detail: String) -> Checked {
    Checked::Refused {
        batch_id,
        refusal: Refusal::new(reason, detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::default_signals;
    use crate::identity::{DeviceId, FleetId};
    use fleetgate_proto::{signal::Value, Signal};
    use proptest::prelude::*;

    fn identity() -> DeviceIdentity {
        DeviceIdentity {
            device_id: DeviceId::parse("d1").unwrap(),
            fleet_id: FleetId::parse("f1").unwrap(),
            cert_sha256: "00".repeat(32),
            cert_serial: "01".into(),
        }
    }

    const NOW: i64 = 1_700_000_000_000;

    fn pipeline() -> Pipeline {
        with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Pipeline {
        Pipeline::new(
            limits,
            SignalCatalog::new(default_signals()),
            FreshnessWindow::new(&crate::freshness::FreshnessConfig::default()),
            ReplayWindows::new(1024),
        )
    }

    fn event(seq: u64, speed: f64) -> TelemetryEvent {
        TelemetryEvent {
            seq,
            captured_at_ms: NOW - 1_000,
            signals: vec![Signal {
                name: "speed_kph".into(),
                value: Some(Value::F64(speed)),
            }],
            location: None,
        }
    }

    fn batch(events: Vec<TelemetryEvent>) -> TelemetryBatch {
        TelemetryBatch {
            schema_version: 1,
            batch_id: 7,
            sent_at_ms: NOW,
            events,
            ..Default::default()
        }
    }

    fn reasons(checked: &Checked) -> Vec<Option<RejectReason>> {
        match checked {
            Checked::Refused { refusal, .. } => vec![Some(refusal.reason)],
            Checked::Events { verdicts, .. } => verdicts
                .iter()
                .map(|v| v.as_ref().err().map(|r| r.reason))
                .collect(),
        }
    }

    #[test]
    fn valid_events_pass_and_bad_ones_get_their_own_reason() {
        let b = batch(vec![event(1, 50.0), event(2, 999.0), event(3, 60.0)]);
        let out = pipeline().check(&identity(), &b.encode_to_vec(), NOW);
        assert_eq!(
            reasons(&out),
            vec![None, Some(RejectReason::FieldOutOfRange), None]
        );
    }

    #[test]
    fn size_limit_applies_before_decoding() {
        let limits = Limits {
            max_frame_bytes: 16,
            ..Default::default()
        };
        let p = with_limits(limits);
        // Garbage that would be a decode error if it were decoded.
        let out = p.check(&identity(), &[0xff; 17], NOW);
        assert_eq!(reasons(&out), vec![Some(RejectReason::FrameTooLarge)]);
    }

    #[test]
    fn batch_level_refusals() {
        let p = pipeline();
        assert_eq!(
            reasons(&p.check(&identity(), &[0xff, 0xff, 0xff], NOW)),
            vec![Some(RejectReason::DecodeError)]
        );
        let mut b = batch(vec![event(1, 1.0)]);
        b.schema_version = 9;
        assert_eq!(
            reasons(&p.check(&identity(), &b.encode_to_vec(), NOW)),
            vec![Some(RejectReason::SchemaUnknown)]
        );
        let mut b = batch(vec![event(1, 1.0)]);
        b.device_id = "someone-else".into();
        assert_eq!(
            reasons(&p.check(&identity(), &b.encode_to_vec(), NOW)),
            vec![Some(RejectReason::IdentityMismatch)]
        );
        let mut b = batch(vec![event(1, 1.0)]);
        b.fleet_id = "other-fleet".into();
        assert_eq!(
            reasons(&p.check(&identity(), &b.encode_to_vec(), NOW)),
            vec![Some(RejectReason::IdentityMismatch)]
        );
        let mut b = batch(vec![event(1, 1.0)]);
        b.device_id = "d1".into();
        b.fleet_id = "f1".into();
        assert_eq!(
            reasons(&p.check(&identity(), &b.encode_to_vec(), NOW)),
            vec![None]
        );
    }

    #[test]
    fn event_level_refusals() {
        let p = pipeline();
        let mut unknown = event(1, 1.0);
        unknown.signals[0].name = "flux".into();
        let mut repeated = event(2, 1.0);
        repeated.signals.push(repeated.signals[0].clone());
        let mut bad_loc = event(3, 1.0);
        bad_loc.location = Some(Location {
            latitude_deg: 91.0,
            ..Default::default()
        });
        let zero_seq = event(0, 1.0);
        let out = p.check(
            &identity(),
            &batch(vec![unknown, repeated, bad_loc, zero_seq]).encode_to_vec(),
            NOW,
        );
        assert_eq!(
            reasons(&out),
            vec![
                Some(RejectReason::SignalUnknown),
                Some(RejectReason::FieldOutOfRange),
                Some(RejectReason::FieldOutOfRange),
                Some(RejectReason::FieldOutOfRange),
            ]
        );
    }

    #[test]
    fn freshness_and_sequence_stages() {
        let p = pipeline();
        let mut old = event(1, 1.0);
        old.captured_at_ms = NOW - 301_000;
        let mut future = event(2, 1.0);
        future.captured_at_ms = NOW + 31_000;
        let out = p.check(
            &identity(),
            &batch(vec![old, future, event(3, 1.0), event(3, 1.0)]).encode_to_vec(),
            NOW,
        );
        assert_eq!(
            reasons(&out),
            vec![
                Some(RejectReason::Stale),
                Some(RejectReason::FromFuture),
                None,
                Some(RejectReason::DuplicateInFlight),
            ]
        );
        p.replay()
            .with(&identity().fleet_id, &identity().device_id, |w| w.commit(3));
        let again = p.check(
            &identity(),
            &batch(vec![event(3, 1.0), event(2, 1.0)]).encode_to_vec(),
            NOW,
        );
        assert_eq!(
            reasons(&again),
            vec![Some(RejectReason::Duplicate), None],
            "rejected seq 2 was never reserved"
        );
        let mut stale_batch = batch(vec![event(9, 1.0)]);
        stale_batch.sent_at_ms = NOW - 3_600_000;
        assert_eq!(
            reasons(&p.check(&identity(), &stale_batch.encode_to_vec(), NOW)),
            vec![Some(RejectReason::Stale)]
        );
    }

    proptest! {
        // Whatever bytes arrive, the pipeline answers with a verdict and never panics;
        // and a refused frame never yields accepted events.
        #[test]
        fn arbitrary_bytes_never_panic(frame in proptest::collection::vec(any::<u8>(), 0..2048)) {
            match pipeline().check(&identity(), &frame, NOW) {
                Checked::Refused { .. } => {}
                Checked::Events { batch, verdicts } => prop_assert_eq!(batch.events.len(), verdicts.len()),
            }
        }

        // An in-range speed is accepted and an out-of-range one refused, for any value.
        #[test]
        fn speed_bounds_are_exact(speed in -1000.0f64..1000.0) {
            let out = pipeline().check(&identity(), &batch(vec![event(1, speed)]).encode_to_vec(), NOW);
            let ok = (0.0..=400.0).contains(&speed);
            prop_assert_eq!(reasons(&out), vec![if ok { None } else { Some(RejectReason::FieldOutOfRange) }]);
        }
    }
}
