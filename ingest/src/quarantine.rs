//! Quarantine enforcement: ingest follows `fleet.quarantine.v1` (latest record per
//! device wins) and diverts a quarantined device's accepted events to
//! `telemetry.quarantined.v1`. The device is still acked, so it does not retry forever,
//! and its events stay available for forensics; the main topic never sees them.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use fleetgate_proto::{QuarantineDecision, QuarantineState};
use prost::Message as _;
use rdkafka::message::{BorrowedMessage, Message};

use crate::device_state::{Follower, StateError};
use crate::events;
use crate::identity::{DeviceId, FleetId};
use crate::publish::KafkaConfig;

/// The decision in force for a quarantined device.
#[derive(Debug, Clone)]
pub struct ActiveQuarantine {
    pub decision_id: Arc<str>,
    /// 0 = until released.
    pub expires_at_ms: i64,
}

/// What applying one decision changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Quarantined,
    Released,
    /// Not a usable record (bad ids, unknown state); the table is unchanged.
    Ignored,
}

/// Quarantined devices, as of the last record read per device.
#[derive(Debug, Default)]
pub struct QuarantineTable {
    active: DashMap<(FleetId, DeviceId), ActiveQuarantine>,
}

impl QuarantineTable {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Applies one record of `fleet.quarantine.v1` (records must come in topic order
    /// per key, which one partition per key gives).
    pub fn apply(&self, d: &QuarantineDecision) -> Applied {
        let (Ok(fleet), Ok(device)) = (FleetId::parse(&d.fleet_id), DeviceId::parse(&d.device_id))
        else {
            return Applied::Ignored;
        };
        match d.state() {
            QuarantineState::Quarantined => {
                self.active.insert(
                    (fleet, device),
                    ActiveQuarantine {
                        decision_id: Arc::from(d.decision_id.as_str()),
                        expires_at_ms: d.expires_at_ms,
                    },
                );
                Applied::Quarantined
            }
            QuarantineState::Released => {
                self.active.remove(&(fleet, device));
                Applied::Released
            }
            QuarantineState::Unspecified => Applied::Ignored,
        }
    }

    /// The quarantine in force for the device at `now_ms`, if any.
    pub fn check(&self, fleet: &FleetId, device: &DeviceId, now_ms: i64) -> Option<Arc<str>> {
        if self.active.is_empty() {
            return None;
        }
        let q = self.active.get(&(fleet.clone(), device.clone()))?;
        (q.expires_at_ms == 0 || now_ms < q.expires_at_ms).then(|| q.decision_id.clone())
    }

    /// Devices quarantined at `now_ms` (expired decisions are dropped).
    pub fn count(&self, now_ms: i64) -> usize {
        self.active
            .retain(|_, q| q.expires_at_ms == 0 || now_ms < q.expires_at_ms);
        self.active.len()
    }
}

/// Reads the quarantine topic to its end into `table`; returns how many records were
/// applied and the follower positioned after them. Blocking.
pub fn load(
    cfg: &KafkaConfig,
    table: &QuarantineTable,
    timeout: Duration,
) -> Result<(usize, Follower), StateError> {
    let mut follower = Follower::open(cfg, &cfg.topics.quarantine, timeout)?;
    let mut applied = 0;
    follower.catch_up(timeout, |msg| {
        if apply_record(msg, table).is_some() {
            applied += 1;
        }
    })?;
    events::quarantined_devices(table.count(crate::clock::unix_ms_now()));
    Ok((applied, follower))
}

/// Enforces decisions as they are written, until `stop`. Blocking.
pub fn follow(follower: Follower, table: &QuarantineTable, stop: &AtomicBool) {
    follower.run(stop, |msg| {
        let Some((decision, applied)) = apply_record(msg, table) else {
            return;
        };
        let now = crate::clock::unix_ms_now();
        if applied == Applied::Quarantined {
            // From the first offending event (or, failing that, the decision) to the
            // moment this node diverts the device.
            let since = if decision.first_offending_received_at_ms > 0 {
                decision.first_offending_received_at_ms
            } else {
                decision.decided_at_ms
            };
            events::quarantine_enforced(now.saturating_sub(since).max(0));
        }
        tracing::warn!(
            fleet = %decision.fleet_id,
            device = %decision.device_id,
            state = ?decision.state(),
            decided_by = %decision.decided_by,
            decision = %decision.decision_id,
            reason = %decision.reason,
            "quarantine decision applied"
        );
        events::quarantined_devices(table.count(now));
    });
}

fn apply_record(
    msg: &BorrowedMessage<'_>,
    table: &QuarantineTable,
) -> Option<(QuarantineDecision, Applied)> {
    let Some(decision) = msg
        .payload()
        .and_then(|p| QuarantineDecision::decode(p).ok())
    else {
        tracing::warn!(
            partition = msg.partition(),
            offset = msg.offset(),
            "undecodable quarantine decision"
        );
        return None;
    };
    match table.apply(&decision) {
        Applied::Ignored => None,
        applied => Some((decision, applied)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(device: &str, state: QuarantineState, expires_at_ms: i64) -> QuarantineDecision {
        QuarantineDecision {
            fleet_id: "fleet-a".into(),
            device_id: device.into(),
            state: state as i32,
            reason: "test".into(),
            decision_id: format!("d-{device}-{}", state as i32),
            expires_at_ms,
            ..Default::default()
        }
    }

    fn ids(device: &str) -> (FleetId, DeviceId) {
        (
            FleetId::parse("fleet-a").unwrap(),
            DeviceId::parse(device).unwrap(),
        )
    }

    #[test]
    fn the_latest_record_wins() {
        let t = QuarantineTable::new();
        let (f, d) = ids("car-1");
        assert_eq!(
            t.apply(&decision("car-1", QuarantineState::Quarantined, 0)),
            Applied::Quarantined
        );
        assert_eq!(t.check(&f, &d, 1).as_deref(), Some("d-car-1-1"));
        assert_eq!(
            t.apply(&decision("car-1", QuarantineState::Released, 0)),
            Applied::Released
        );
        assert_eq!(t.check(&f, &d, 1), None);
        assert_eq!(t.count(1), 0);
    }

    #[test]
    fn expiry_ends_a_quarantine() {
        let t = QuarantineTable::new();
        let (f, d) = ids("car-2");
        t.apply(&decision("car-2", QuarantineState::Quarantined, 1_000));
        assert!(t.check(&f, &d, 999).is_some());
        assert!(t.check(&f, &d, 1_000).is_none());
        assert_eq!(t.count(999), 1);
        assert_eq!(t.count(1_000), 0);
    }

    #[test]
    fn unusable_records_change_nothing() {
        let t = QuarantineTable::new();
        let mut bad = decision("car-3", QuarantineState::Quarantined, 0);
        bad.device_id = "no spaces allowed".into();
        assert_eq!(t.apply(&bad), Applied::Ignored);
        assert_eq!(
            t.apply(&decision("car-3", QuarantineState::Unspecified, 0)),
            Applied::Ignored
        );
        assert_eq!(t.count(0), 0);
    }
}
