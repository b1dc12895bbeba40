//! Quotas and overload protection, as pure logic with no I/O: GCRA rate limits per
//! device, per fleet and per node on events/s and bytes/s ([`Quotas`]); handshake rate
//! and concurrent connection/batch limits ([`ConnectionGate`]); and a bound on events
//! between the transports and Kafka plus a delivery-latency signal ([`InFlight`]).
//!
//! Every refusal carries a stable snake_case code and, where waiting helps, the
//! `retry_after` at which the same request would next fit. All three types apply a new
//! configuration in place (`reload`; [`Admission`] bundles the three), so quota changes
//! need no restart.

mod gate;
mod limits;
mod overload;
mod rate;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::FleetId;

pub use gate::{BatchPermit, ConnRefusal, ConnectionGate, ConnectionPermit};
/// Clocks for [`Quotas`] and [`ConnectionGate`]: the real one, and a manual one for tests.
pub use governor::clock::{DefaultClock, FakeRelativeClock};
pub use limits::{Dimension, Limit, QuotaRefusal, Quotas};
pub use overload::{InFlight, InFlightPermit, OverloadCause};

const MIB: u32 = 1024 * 1024;

/// Everything this module enforces; reloadable as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// Limit of each device, unless its fleet has a `device` override.
    pub device: RateSpec,
    /// Limit of each fleet as a whole, unless it has a `fleet` override.
    pub fleet: RateSpec,
    /// Limit of this ingest node as a whole.
    pub global: RateSpec,
    /// Per-fleet overrides, keyed by fleet id (e.g. a commercial fleet gets 50x).
    pub fleets: BTreeMap<String, FleetQuota>,
    /// Handshake, connection and per-connection batch limits.
    pub connections: ConnectionLimits,
    /// When new batches are refused as `overloaded`.
    pub overload: OverloadConfig,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            device: RateSpec {
                events_per_sec: 1_000,
                event_burst: 20_000,
                bytes_per_sec: 4 * MIB,
                byte_burst: 16 * MIB,
            },
            fleet: RateSpec {
                events_per_sec: 50_000,
                event_burst: 200_000,
                bytes_per_sec: 64 * MIB,
                byte_burst: 256 * MIB,
            },
            global: RateSpec {
                events_per_sec: 100_000,
                event_burst: 400_000,
                bytes_per_sec: 256 * MIB,
                byte_burst: 1024 * MIB,
            },
            fleets: BTreeMap::new(),
            connections: ConnectionLimits::default(),
            overload: OverloadConfig::default(),
        }
    }
}

/// A GCRA limit on two dimensions; 0 per second means that dimension is unlimited.
/// All four keys are required where a spec is written (no silent partial defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSpec {
    /// Sustained events per second (0 = unlimited).
    pub events_per_sec: u32,
    /// Events admitted at once from a full bucket; must hold the largest batch.
    pub event_burst: u32,
    /// Sustained encoded bytes per second (0 = unlimited).
    pub bytes_per_sec: u32,
    /// Bytes admitted at once from a full bucket; must hold the largest frame.
    pub byte_burst: u32,
}

impl RateSpec {
    /// No limit on either dimension.
    pub const UNLIMITED: RateSpec = RateSpec {
        events_per_sec: 0,
        event_burst: 0,
        bytes_per_sec: 0,
        byte_burst: 0,
    };

    fn validate(
        &self,
        key: &str,
        max_events_per_batch: usize,
        max_frame_bytes: usize,
    ) -> Result<(), String> {
        if self.events_per_sec > 0 && (self.event_burst as usize) < max_events_per_batch.max(1) {
            return Err(format!(
                "{key}.event_burst ({}) must be at least limits.max_events_per_batch ({max_events_per_batch}): a full batch could never pass",
                self.event_burst
            ));
        }
        if self.bytes_per_sec > 0 && (self.byte_burst as usize) < max_frame_bytes.max(1) {
            return Err(format!(
                "{key}.byte_burst ({}) must be at least limits.max_frame_bytes ({max_frame_bytes}): a full frame could never pass",
                self.byte_burst
            ));
        }
        Ok(())
    }
}

/// Overrides for one fleet; an absent part falls back to the top-level spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetQuota {
    /// Limit of this fleet as a whole.
    pub fleet: Option<RateSpec>,
    /// Limit of each device of this fleet.
    pub device: Option<RateSpec>,
}

/// Connection-level limits, enforced before any telemetry is read; 0 = unlimited
/// except where noted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// TLS handshakes per second from one source address (IPv6: per /64).
    pub handshakes_per_sec_per_ip: u32,
    /// Handshakes at once from one source address.
    pub handshake_burst_per_ip: u32,
    /// TLS handshakes per second on this node.
    pub handshakes_per_sec: u32,
    /// Handshakes at once on this node.
    pub handshake_burst: u32,
    /// Concurrent connections of one device (both transports together).
    pub max_connections_per_device: u32,
    /// Concurrent connections on this node.
    pub max_connections: u32,
    /// Batches one connection may have awaiting their ack; at least 1.
    pub max_batches_in_flight_per_connection: u32,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            // Generous: carrier-grade NAT puts many vehicles behind one address.
            handshakes_per_sec_per_ip: 50,
            handshake_burst_per_ip: 200,
            handshakes_per_sec: 1_000,
            handshake_burst: 2_000,
            max_connections_per_device: 4,
            max_connections: 100_000,
            max_batches_in_flight_per_connection: 32,
        }
    }
}

/// Back-pressure from Kafka: what makes new batches get `overloaded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverloadConfig {
    /// Events admitted but not yet acknowledged by Kafka, node-wide; at least one batch.
    pub max_events_in_flight: u32,
    /// Refuse new batches while the smoothed delivery latency exceeds this (0s = off).
    #[serde(with = "humantime_serde")]
    pub max_delivery_latency: Duration,
    /// A latency sample older than this no longer counts, so refusals cannot outlive
    /// the evidence for them.
    #[serde(with = "humantime_serde")]
    pub latency_hold: Duration,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        Self {
            max_events_in_flight: 200_000,
            max_delivery_latency: Duration::from_secs(2),
            latency_hold: Duration::from_secs(5),
        }
    }
}

/// The three admission controls built from one [`QuotaConfig`], reloaded together.
pub struct Admission {
    pub quotas: Quotas,
    pub gate: ConnectionGate,
    pub in_flight: InFlight,
}

impl Admission {
    /// Builds every control on the real clock; `cfg` should have passed `validate`.
    pub fn new(cfg: &QuotaConfig) -> Self {
        Self {
            quotas: Quotas::new(cfg),
            gate: ConnectionGate::new(&cfg.connections),
            in_flight: InFlight::new(&cfg.overload),
        }
    }

    /// Applies a new (validated) configuration to all three without a restart.
    pub fn reload(&self, cfg: &QuotaConfig) {
        self.quotas.reload(cfg);
        self.gate.reload(&cfg.connections);
        self.in_flight.reload(&cfg.overload);
    }

    /// Forgets idle devices and source addresses; call periodically (e.g. every minute).
    pub fn retain_recent(&self) {
        self.quotas.retain_recent();
        self.gate.retain_recent();
    }
}

impl QuotaConfig {
    /// Refuses a configuration under which a valid batch could never pass or no batch
    /// could ever be admitted. Errors name the offending key under `quota.`.
    pub fn validate(
        &self,
        max_events_per_batch: usize,
        max_frame_bytes: usize,
    ) -> Result<(), String> {
        let (e, b) = (max_events_per_batch, max_frame_bytes);
        self.device.validate("quota.device", e, b)?;
        self.fleet.validate("quota.fleet", e, b)?;
        self.global.validate("quota.global", e, b)?;
        for (fleet, o) in &self.fleets {
            if FleetId::parse(fleet).is_err() {
                return Err(format!("quota.fleets.{fleet:?}: not a valid fleet id"));
            }
            if let Some(spec) = &o.fleet {
                spec.validate(&format!("quota.fleets.{fleet}.fleet"), e, b)?;
            }
            if let Some(spec) = &o.device {
                spec.validate(&format!("quota.fleets.{fleet}.device"), e, b)?;
            }
        }
        let c = &self.connections;
        if c.handshakes_per_sec_per_ip > 0 && c.handshake_burst_per_ip == 0 {
            return Err("quota.connections.handshake_burst_per_ip must be at least 1".into());
        }
        if c.handshakes_per_sec > 0 && c.handshake_burst == 0 {
            return Err("quota.connections.handshake_burst must be at least 1".into());
        }
        if c.max_batches_in_flight_per_connection == 0 {
            return Err(
                "quota.connections.max_batches_in_flight_per_connection must be at least 1".into(),
            );
        }
        let o = &self.overload;
        if (o.max_events_in_flight as usize) < e.max(1) {
            return Err(format!(
                "quota.overload.max_events_in_flight ({}) must be at least limits.max_events_per_batch ({e})",
                o.max_events_in_flight
            ));
        }
        if !o.max_delivery_latency.is_zero() && o.latency_hold.is_zero() {
            return Err(
                "quota.overload.latency_hold must be above 0s when max_delivery_latency is set"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCH: usize = 10_000;
    const FRAME: usize = 1024 * 1024;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let mut cfg = QuotaConfig::default();
        cfg.validate(BATCH, FRAME).unwrap();
        let commercial = RateSpec {
            events_per_sec: 50 * cfg.device.events_per_sec,
            ..cfg.device
        };
        cfg.fleets.insert(
            "acme".into(),
            FleetQuota {
                fleet: None,
                device: Some(commercial),
            },
        );
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(toml::from_str::<QuotaConfig>(&text).unwrap(), cfg);
    }

    #[test]
    fn fleet_override_parses_and_unknown_keys_fail() {
        let cfg: QuotaConfig = toml::from_str(
            r#"
            [fleets.acme.fleet]
            events_per_sec = 2500000
            event_burst = 10000000
            bytes_per_sec = 0
            byte_burst = 0
            [overload]
            max_delivery_latency = "750ms"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.fleets["acme"].fleet.unwrap().events_per_sec, 2_500_000);
        assert_eq!(cfg.fleets["acme"].device, None);
        assert_eq!(
            cfg.overload.max_delivery_latency,
            Duration::from_millis(750)
        );
        assert_eq!(cfg.device, QuotaConfig::default().device);
        cfg.validate(BATCH, FRAME).unwrap();

        let typo = toml::from_str::<QuotaConfig>("[device]\nevents_per_second = 5\n");
        assert!(typo.is_err());
        let partial = toml::from_str::<QuotaConfig>("[fleets.acme.device]\nevents_per_sec = 5\n");
        let err = partial.unwrap_err().to_string();
        assert!(err.contains("event_burst"), "{err}");
    }

    #[test]
    fn validate_names_the_offending_key() {
        let check = |f: &dyn Fn(&mut QuotaConfig), key: &str| {
            let mut cfg = QuotaConfig::default();
            f(&mut cfg);
            let err = cfg.validate(BATCH, FRAME).unwrap_err();
            assert!(err.contains(key), "{err:?} should name {key}");
        };
        check(
            &|c| c.device.event_burst = 9_999,
            "quota.device.event_burst",
        );
        check(&|c| c.global.byte_burst = 1000, "quota.global.byte_burst");
        check(
            &|c| {
                c.fleets.insert(
                    "acme".into(),
                    FleetQuota {
                        fleet: None,
                        device: Some(RateSpec {
                            event_burst: 1,
                            ..c.device
                        }),
                    },
                );
            },
            "quota.fleets.acme.device.event_burst",
        );
        check(
            &|c| {
                c.fleets.insert("bad/fleet".into(), FleetQuota::default());
            },
            "quota.fleets",
        );
        check(
            &|c| c.connections.max_batches_in_flight_per_connection = 0,
            "max_batches_in_flight_per_connection",
        );
        check(
            &|c| c.connections.handshake_burst = 0,
            "quota.connections.handshake_burst",
        );
        check(
            &|c| c.overload.max_events_in_flight = 9_999,
            "quota.overload.max_events_in_flight",
        );
        check(
            &|c| c.overload.latency_hold = Duration::ZERO,
            "quota.overload.latency_hold",
        );
    }

    #[test]
    fn admission_reload_reaches_all_three_controls() {
        let mut cfg = QuotaConfig::default();
        let a = Admission::new(&cfg);
        cfg.device.event_burst = 10_000;
        cfg.connections.max_connections = 1;
        cfg.overload.max_events_in_flight = 10_000;
        a.reload(&cfg);
        a.quotas.check("f", "d", 10_000, 0).unwrap();
        assert_eq!(
            a.quotas.check("f", "d", 1_000, 0).unwrap_err().limit,
            Limit::Device
        );
        let _conn = a.gate.try_connect("f", "d").unwrap();
        assert!(a.gate.try_connect("f", "e").is_err());
        assert!(a.in_flight.try_acquire(10_001).is_none());
    }

    #[test]
    fn an_unlimited_dimension_needs_no_burst() {
        let mut cfg = QuotaConfig {
            global: RateSpec::UNLIMITED,
            ..QuotaConfig::default()
        };
        cfg.fleet.bytes_per_sec = 0;
        cfg.fleet.byte_burst = 0;
        cfg.validate(BATCH, FRAME).unwrap();
    }
}
