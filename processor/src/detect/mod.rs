//! Anomaly detectors. Each is a pure, synchronous state machine fed one observed Kafka
//! record at a time; time comes from the records (ingest's `received_at_ms`, which a
//! device cannot forge), never from the wall clock, so replays of a topic give the same
//! findings and tests control every instant. Per-device state lives in bounded
//! [`StateTable`]s. Every threshold is a documented config field.

pub mod analyzer;
pub mod bounds;
pub mod drift;
pub mod fleet;
pub mod jumps;
pub mod rate;
pub mod rejects;
pub mod table;
pub mod travel;

use std::sync::Arc;

use fleetgate_proto::{Evidence, Provenance, RejectRecord, TelemetryEvent};
use serde::{Deserialize, Serialize};

use crate::dedupe::DeviceKey;
pub use analyzer::{Analyzer, FindingLimitConfig, Outcome, Outputs};
pub use table::StateTable;

/// Stable detector names: the `detector` field of findings, the metric label and the
/// policy weight key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DetectorKind {
    ImpossibleValue,
    ImpossibleTravel,
    OdometerBackwards,
    SocJump,
    RateSpike,
    RepeatedRejects,
    ClockDrift,
    FleetShift,
}

impl DetectorKind {
    pub const ALL: [DetectorKind; 8] = [
        Self::ImpossibleValue,
        Self::ImpossibleTravel,
        Self::OdometerBackwards,
        Self::SocJump,
        Self::RateSpike,
        Self::RepeatedRejects,
        Self::ClockDrift,
        Self::FleetShift,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ImpossibleValue => "impossible_value",
            Self::ImpossibleTravel => "impossible_travel",
            Self::OdometerBackwards => "odometer_backwards",
            Self::SocJump => "soc_jump",
            Self::RateSpike => "rate_spike",
            Self::RepeatedRejects => "repeated_rejects",
            Self::ClockDrift => "clock_drift",
            Self::FleetShift => "fleet_shift",
        }
    }
}

/// Where a record was read: what [`Evidence`] points back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coords {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

/// The decoded content of one input record.
#[derive(Debug, Clone, Copy)]
pub enum Record<'a> {
    Event(&'a TelemetryEvent),
    Reject(&'a RejectRecord),
}

/// One input record as detectors see it.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub device: &'a DeviceKey,
    pub provenance: &'a Provenance,
    pub record: Record<'a>,
    pub coords: &'a Coords,
}

impl Observed<'_> {
    /// Ingest's clock when the record arrived: the detectors' notion of "now".
    pub fn received_at_ms(&self) -> i64 {
        self.provenance.received_at_ms
    }

    pub fn seq(&self) -> u64 {
        match self.record {
            Record::Event(e) => e.seq,
            Record::Reject(r) => r.seq.unwrap_or(self.provenance.seq),
        }
    }

    pub fn event(&self) -> Option<&TelemetryEvent> {
        match self.record {
            Record::Event(e) => Some(e),
            Record::Reject(_) => None,
        }
    }

    /// Evidence pointing at this record.
    pub fn evidence(&self, quantity: &str, value: f64, threshold: f64, note: String) -> Evidence {
        Evidence {
            topic: self.coords.topic.to_string(),
            partition: self.coords.partition,
            offset: self.coords.offset,
            seq: self.seq(),
            quantity: quantity.to_owned(),
            value,
            threshold,
            note,
        }
    }
}

/// Value of a numeric signal (`f64` or `i64`) named `name` in `event`, if present.
pub fn signal_value(event: &TelemetryEvent, name: &str) -> Option<f64> {
    use fleetgate_proto::signal::Value;
    event
        .signals
        .iter()
        .find(|s| s.name == name)
        .and_then(|s| match s.value {
            Some(Value::F64(v)) => Some(v),
            Some(Value::I64(v)) => Some(v as f64),
            _ => None,
        })
}

/// A finding before the policy weighs it and the runner stamps it.
#[derive(Debug, Clone, PartialEq)]
pub struct FindingDraft {
    pub detector: DetectorKind,
    pub fleet_id: String,
    /// `None` for fleet-wide findings.
    pub device_id: Option<String>,
    pub summary: String,
    pub evidence: Vec<Evidence>,
    /// Event time of the record that completed the finding.
    pub detected_at_ms: i64,
    pub first_offending_received_at_ms: i64,
}

impl FindingDraft {
    /// A per-device finding about `obs`'s device.
    pub fn device(
        detector: DetectorKind,
        obs: &Observed<'_>,
        summary: String,
        evidence: Vec<Evidence>,
        first_offending_received_at_ms: i64,
    ) -> Self {
        Self {
            detector,
            fleet_id: obs.device.fleet_id.clone(),
            device_id: Some(obs.device.device_id.clone()),
            summary,
            evidence,
            detected_at_ms: obs.received_at_ms(),
            first_offending_received_at_ms,
        }
    }
}

/// Most evidence records attached to one finding.
pub const MAX_EVIDENCE: usize = 16;

/// One detector: consumes records, appends findings to `out`.
pub trait Detector: Send {
    fn kind(&self) -> DetectorKind;
    fn observe(&mut self, obs: &Observed<'_>, out: &mut Vec<FindingDraft>);
    /// Keys with state, for the tracked-devices gauge.
    fn tracked(&self) -> usize {
        0
    }
}

/// Bounds of every per-device and per-fleet state table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Most devices (or fleets) one detector keeps state for; the idlest go first.
    pub max_devices: usize,
    /// State of a device not seen for this long may be dropped.
    #[serde(with = "humantime_serde")]
    pub idle_ttl: std::time::Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            max_devices: 1_000_000,
            idle_ttl: std::time::Duration::from_secs(3600),
        }
    }
}

impl StateConfig {
    pub fn table<K: std::hash::Hash + Eq + Clone, T>(&self) -> StateTable<K, T> {
        StateTable::new(self.max_devices, self.idle_ttl.as_millis() as i64)
    }
}

/// Every detector's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorsConfig {
    pub impossible_value: bounds::ImpossibleValueConfig,
    pub impossible_travel: travel::ImpossibleTravelConfig,
    pub odometer_backwards: jumps::OdometerConfig,
    pub soc_jump: jumps::SocJumpConfig,
    pub rate_spike: rate::RateSpikeConfig,
    pub repeated_rejects: rejects::RepeatedRejectsConfig,
    pub clock_drift: drift::ClockDriftConfig,
    pub fleet_shift: fleet::FleetShiftConfig,
}

impl DetectorsConfig {
    /// Checks what serde cannot; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        self.impossible_value.validate()?;
        self.impossible_travel.validate()?;
        self.odometer_backwards.validate()?;
        self.soc_jump.validate()?;
        self.rate_spike.validate()?;
        self.repeated_rejects.validate()?;
        self.clock_drift.validate()?;
        self.fleet_shift.validate()
    }

    /// The enabled detectors.
    pub fn build(&self, state: &StateConfig) -> Vec<Box<dyn Detector>> {
        let mut d: Vec<Box<dyn Detector>> = Vec::new();
        if self.impossible_value.enabled {
            d.push(Box::new(bounds::ImpossibleValue::new(
                &self.impossible_value,
            )));
        }
        if self.impossible_travel.enabled {
            d.push(Box::new(travel::ImpossibleTravel::new(
                self.impossible_travel.clone(),
                state,
            )));
        }
        if self.odometer_backwards.enabled {
            d.push(Box::new(jumps::OdometerBackwards::new(
                self.odometer_backwards.clone(),
                state,
            )));
        }
        if self.soc_jump.enabled {
            d.push(Box::new(jumps::SocJump::new(self.soc_jump.clone(), state)));
        }
        if self.rate_spike.enabled {
            d.push(Box::new(rate::RateSpike::new(
                self.rate_spike.clone(),
                state,
            )));
        }
        if self.repeated_rejects.enabled {
            d.push(Box::new(rejects::RepeatedRejects::new(
                self.repeated_rejects.clone(),
                state,
            )));
        }
        if self.clock_drift.enabled {
            d.push(Box::new(drift::ClockDrift::new(
                self.clock_drift.clone(),
                state,
            )));
        }
        if self.fleet_shift.enabled {
            d.push(Box::new(fleet::FleetShift::new(
                self.fleet_shift.clone(),
                state,
            )));
        }
        d
    }
}

/// `name` must be positive and finite.
pub(crate) fn positive(name: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(format!("{name} must be a positive number, got {v}"))
    }
}

#[cfg(test)]
pub(crate) mod testkit {
    //! Builders for crafted record sequences.
    use super::*;
    use fleetgate_proto::{signal::Value, Location, Signal};

    pub const FLEET: &str = "fleet-a";

    /// An owned record plus what `Observed` borrows.
    pub struct Rec {
        pub device: DeviceKey,
        pub provenance: Provenance,
        pub event: Option<TelemetryEvent>,
        pub reject: Option<RejectRecord>,
        pub coords: Coords,
    }

    impl Rec {
        pub fn obs(&self) -> Observed<'_> {
            let record = match (&self.event, &self.reject) {
                (Some(e), _) => Record::Event(e),
                (None, Some(r)) => Record::Reject(r),
                (None, None) => unreachable!("a Rec holds one record"),
            };
            Observed {
                device: &self.device,
                provenance: &self.provenance,
                record,
                coords: &self.coords,
            }
        }
    }

    /// An event of `device` captured and received at `t_ms` (sent 50 ms before).
    pub fn event(device: &str, seq: u64, t_ms: i64) -> Rec {
        let provenance = Provenance {
            device_id: device.into(),
            fleet_id: FLEET.into(),
            received_at_ms: t_ms,
            captured_at_ms: t_ms,
            sent_at_ms: t_ms - 50,
            seq,
            ..Default::default()
        };
        Rec {
            device: DeviceKey::new(FLEET, device),
            provenance,
            event: Some(TelemetryEvent {
                seq,
                captured_at_ms: t_ms,
                signals: vec![],
                location: None,
            }),
            reject: None,
            coords: Coords {
                topic: Arc::from("telemetry.events.v1"),
                partition: 0,
                offset: seq as i64,
            },
        }
    }

    impl Rec {
        pub fn signal(mut self, name: &str, v: f64) -> Self {
            self.event.as_mut().expect("event").signals.push(Signal {
                name: name.into(),
                value: Some(Value::F64(v)),
            });
            self
        }

        pub fn at(mut self, lat: f64, lon: f64, accuracy_m: f32) -> Self {
            self.event.as_mut().expect("event").location = Some(Location {
                latitude_deg: lat,
                longitude_deg: lon,
                accuracy_m,
                heading_deg: 0.0,
            });
            self
        }

        pub fn captured(mut self, captured_ms: i64) -> Self {
            self.event.as_mut().expect("event").captured_at_ms = captured_ms;
            self.provenance.captured_at_ms = captured_ms;
            self
        }

        pub fn sent(mut self, sent_ms: i64) -> Self {
            self.provenance.sent_at_ms = sent_ms;
            self
        }
    }

    /// A reject audit record of `device` received at `t_ms`.
    pub fn reject(device: &str, seq: u64, reason: &str, t_ms: i64) -> Rec {
        let provenance = Provenance {
            device_id: device.into(),
            fleet_id: FLEET.into(),
            received_at_ms: t_ms,
            seq,
            ..Default::default()
        };
        Rec {
            device: DeviceKey::new(FLEET, device),
            provenance: provenance.clone(),
            event: None,
            reject: Some(RejectRecord {
                reason: reason.into(),
                detail: String::new(),
                provenance: Some(provenance),
                frame_bytes: 100,
                seq: Some(seq),
            }),
            coords: Coords {
                topic: Arc::from("telemetry.rejected.v1"),
                partition: 1,
                offset: seq as i64,
            },
        }
    }

    pub fn run(d: &mut dyn Detector, recs: &[Rec]) -> Vec<FindingDraft> {
        let mut out = Vec::new();
        for r in recs {
            d.observe(&r.obs(), &mut out);
        }
        out
    }
}
