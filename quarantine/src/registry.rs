//! Folding `fleet.quarantine.v1` into per-device state. Pure: callers feed decisions in
//! topic order and pass the clock, so ingest, the CLI and tests share one definition of
//! "is this device quarantined right now".
//!
//! Guarantees: the latest applied decision per `<fleet>/<device>` is the device's state
//! (records of one key share a partition, so topic order is decision order); a device
//! is quarantined only while that decision says QUARANTINED and has not expired.

use std::collections::{BTreeMap, HashMap};

use fleetgate_proto::{QuarantineDecision, QuarantineState};

/// The record key of a device on `fleet.quarantine.v1`: `<fleet>/<device>`.
pub fn key(fleet: &str, device: &str) -> String {
    format!("{fleet}/{device}")
}

/// Why a decision cannot be part of the registry (it would name no device or no state).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDecision {
    #[error("decision has an empty fleet_id or device_id")]
    MissingDevice,
    #[error("decision {decision_id:?} for {key} has no state (QUARANTINED or RELEASED)")]
    UnknownState { key: String, decision_id: String },
}

/// Whether `d` names a device and a state; the registry ignores decisions that do not.
pub fn validate(d: &QuarantineDecision) -> Result<(), InvalidDecision> {
    if d.fleet_id.is_empty() || d.device_id.is_empty() {
        return Err(InvalidDecision::MissingDevice);
    }
    match QuarantineState::try_from(d.state) {
        Ok(QuarantineState::Quarantined | QuarantineState::Released) => Ok(()),
        _ => Err(InvalidDecision::UnknownState {
            key: key(&d.fleet_id, &d.device_id),
            decision_id: d.decision_id.clone(),
        }),
    }
}

/// Whether `d` quarantines its device at `now_ms` (QUARANTINED and not yet expired).
pub fn is_active(d: &QuarantineDecision, now_ms: i64) -> bool {
    d.state == QuarantineState::Quarantined as i32
        && (d.expires_at_ms == 0 || now_ms < d.expires_at_ms)
}

/// What [`Registry::list`] returns.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this fleet.
    pub fleet: Option<String>,
    /// Only decisions whose reason contains this (case-insensitive).
    pub reason: Option<String>,
    /// Also devices whose latest decision is a release or an expired quarantine.
    pub include_released: bool,
}

/// The latest decision per device: what ingest consults on every batch. Holds one
/// decision per device ever decided, nothing else (see [`History`] for the audit trail).
/// Lookups borrow the ids: no allocation on the enforcement path.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// fleet -> device -> latest decision.
    latest: HashMap<String, HashMap<String, QuarantineDecision>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `d` its device's state (it must come later in topic order than every
    /// decision applied before for that device). Invalid decisions change nothing.
    pub fn apply(&mut self, d: QuarantineDecision) -> Result<(), InvalidDecision> {
        validate(&d)?;
        self.latest
            .entry(d.fleet_id.clone())
            .or_default()
            .insert(d.device_id.clone(), d);
        Ok(())
    }

    /// Forgets a device (a tombstone, i.e. a null value, on the compacted topic).
    pub fn remove(&mut self, fleet: &str, device: &str) -> Option<QuarantineDecision> {
        let devices = self.latest.get_mut(fleet)?;
        let removed = devices.remove(device);
        if devices.is_empty() {
            self.latest.remove(fleet);
        }
        removed
    }

    /// The decision quarantining `fleet/device` at `now_ms`, if any.
    pub fn state(&self, fleet: &str, device: &str, now_ms: i64) -> Option<&QuarantineDecision> {
        self.latest(fleet, device).filter(|d| is_active(d, now_ms))
    }

    /// The latest decision for `fleet/device`, active or not.
    pub fn latest(&self, fleet: &str, device: &str) -> Option<&QuarantineDecision> {
        self.latest.get(fleet)?.get(device)
    }

    fn decisions(&self) -> impl Iterator<Item = &QuarantineDecision> {
        self.latest.values().flat_map(HashMap::values)
    }

    /// Latest decisions matching `filter`, ordered by fleet then device.
    pub fn list(&self, filter: &ListFilter, now_ms: i64) -> Vec<&QuarantineDecision> {
        let reason = filter.reason.as_ref().map(|r| r.to_lowercase());
        let mut out: Vec<&QuarantineDecision> = self
            .decisions()
            .filter(|d| filter.include_released || is_active(d, now_ms))
            .filter(|d| filter.fleet.as_ref().is_none_or(|f| *f == d.fleet_id))
            .filter(|d| {
                reason
                    .as_ref()
                    .is_none_or(|r| d.reason.to_lowercase().contains(r.as_str()))
            })
            .collect();
        out.sort_by(|a, b| (&a.fleet_id, &a.device_id).cmp(&(&b.fleet_id, &b.device_id)));
        out
    }

    /// How many devices are quarantined at `now_ms`.
    pub fn quarantined_count(&self, now_ms: i64) -> usize {
        self.decisions().filter(|d| is_active(d, now_ms)).count()
    }

    /// How many devices have a decision (active or not).
    pub fn len(&self) -> usize {
        self.latest.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }
}

/// Where a decision sits on the topic, so an audit entry can be found again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// Every decision per device in topic order: the audit trail `show` prints. Separate
/// from [`Registry`] so enforcement does not hold history it never reads.
#[derive(Debug, Clone, Default)]
pub struct History {
    entries: BTreeMap<String, Vec<(Position, QuarantineDecision)>>,
}

impl History {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `d` to its device's history; invalid decisions are not recorded.
    pub fn record(&mut self, at: Position, d: QuarantineDecision) -> Result<(), InvalidDecision> {
        validate(&d)?;
        self.entries
            .entry(key(&d.fleet_id, &d.device_id))
            .or_default()
            .push((at, d));
        Ok(())
    }

    /// The decisions for `fleet/device`, oldest first.
    pub fn of(&self, fleet: &str, device: &str) -> &[(Position, QuarantineDecision)] {
        self.entries
            .get(&key(fleet, device))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decision(
        fleet: &str,
        device: &str,
        state: QuarantineState,
        reason: &str,
    ) -> QuarantineDecision {
        QuarantineDecision {
            fleet_id: fleet.into(),
            device_id: device.into(),
            state: state as i32,
            reason: reason.into(),
            decided_by: "operator:alice".into(),
            decided_at_ms: 1_000,
            decision_id: format!("{fleet}-{device}-{reason}"),
            ..Default::default()
        }
    }

    #[test]
    fn key_is_fleet_slash_device() {
        assert_eq!(key("f1", "car-7"), "f1/car-7");
    }

    #[test]
    fn latest_decision_wins() {
        let mut r = Registry::new();
        r.apply(decision("f", "d", QuarantineState::Quarantined, "spoofing"))
            .unwrap();
        assert_eq!(r.state("f", "d", 5_000).unwrap().reason, "spoofing");
        assert_eq!(r.quarantined_count(5_000), 1);
        r.apply(decision(
            "f",
            "d",
            QuarantineState::Released,
            "false positive",
        ))
        .unwrap();
        assert!(r.state("f", "d", 5_000).is_none());
        assert_eq!(r.latest("f", "d").unwrap().reason, "false positive");
        assert_eq!(r.quarantined_count(5_000), 0);
        r.apply(decision("f", "d", QuarantineState::Quarantined, "again"))
            .unwrap();
        assert_eq!(r.state("f", "d", 5_000).unwrap().reason, "again");
        assert!(r.state("f", "other", 5_000).is_none());
        assert!(r.state("g", "d", 5_000).is_none());
    }

    #[test]
    fn expired_quarantine_is_not_active() {
        let mut r = Registry::new();
        let mut d = decision("f", "d", QuarantineState::Quarantined, "temp");
        d.expires_at_ms = 10_000;
        r.apply(d).unwrap();
        assert!(r.state("f", "d", 9_999).is_some());
        assert!(r.state("f", "d", 10_000).is_none());
        assert_eq!(r.quarantined_count(10_000), 0);
        assert!(r.list(&ListFilter::default(), 10_000).is_empty());
        let all = ListFilter {
            include_released: true,
            ..Default::default()
        };
        assert_eq!(r.list(&all, 10_000).len(), 1);
    }

    #[test]
    fn invalid_decisions_change_nothing() {
        let mut r = Registry::new();
        r.apply(decision("f", "d", QuarantineState::Quarantined, "x"))
            .unwrap();
        let err = r
            .apply(decision("f", "d", QuarantineState::Unspecified, "y"))
            .unwrap_err();
        assert!(matches!(err, InvalidDecision::UnknownState { .. }));
        let mut bogus = decision("f", "d", QuarantineState::Released, "z");
        bogus.state = 42;
        assert!(r.apply(bogus).is_err());
        assert_eq!(
            r.apply(decision("", "d", QuarantineState::Released, "z")),
            Err(InvalidDecision::MissingDevice)
        );
        assert_eq!(r.state("f", "d", 0).unwrap().reason, "x");
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn tombstone_forgets_the_device() {
        let mut r = Registry::new();
        r.apply(decision("f", "d", QuarantineState::Quarantined, "x"))
            .unwrap();
        assert!(r.remove("f", "d").is_some());
        assert!(r.state("f", "d", 0).is_none());
        assert!(r.is_empty());
    }

    #[test]
    fn list_filters_by_fleet_reason_and_state() {
        let mut r = Registry::new();
        r.apply(decision(
            "f1",
            "a",
            QuarantineState::Quarantined,
            "Impossible travel",
        ))
        .unwrap();
        r.apply(decision("f1", "b", QuarantineState::Released, "cleared"))
            .unwrap();
        r.apply(decision(
            "f2",
            "c",
            QuarantineState::Quarantined,
            "replay storm",
        ))
        .unwrap();
        let ids = |v: Vec<&QuarantineDecision>| -> Vec<String> {
            v.iter().map(|d| key(&d.fleet_id, &d.device_id)).collect()
        };
        assert_eq!(ids(r.list(&ListFilter::default(), 0)), ["f1/a", "f2/c"]);
        let f1 = ListFilter {
            fleet: Some("f1".into()),
            ..Default::default()
        };
        assert_eq!(ids(r.list(&f1, 0)), ["f1/a"]);
        let f1_all = ListFilter {
            include_released: true,
            ..f1
        };
        assert_eq!(ids(r.list(&f1_all, 0)), ["f1/a", "f1/b"]);
        let travel = ListFilter {
            reason: Some("TRAVEL".into()),
            ..Default::default()
        };
        assert_eq!(ids(r.list(&travel, 0)), ["f1/a"]);
    }

    #[test]
    fn history_keeps_every_decision_in_order() {
        let mut h = History::new();
        let at = |offset| Position {
            partition: 1,
            offset,
        };
        h.record(at(0), decision("f", "d", QuarantineState::Quarantined, "a"))
            .unwrap();
        h.record(at(1), decision("f", "e", QuarantineState::Quarantined, "b"))
            .unwrap();
        h.record(at(2), decision("f", "d", QuarantineState::Released, "c"))
            .unwrap();
        let reasons: Vec<_> = h
            .of("f", "d")
            .iter()
            .map(|(p, d)| (p.offset, d.reason.as_str()))
            .collect();
        assert_eq!(reasons, [(0, "a"), (2, "c")]);
        assert!(h.of("f", "zz").is_empty());
    }

    proptest! {
        /// Whatever the sequence, the state is exactly what the last valid decision
        /// for the device says at that time.
        #[test]
        fn state_matches_last_valid_decision(
            ops in prop::collection::vec((0u8..3, 0i32..4, 0i64..100), 0..40),
            now in 0i64..120,
        ) {
            let mut r = Registry::new();
            let mut last: BTreeMap<String, (i32, i64)> = BTreeMap::new();
            for (i, (device, state, expires)) in ops.into_iter().enumerate() {
                let d = QuarantineDecision {
                    fleet_id: "f".into(),
                    device_id: format!("d{device}"),
                    state,
                    expires_at_ms: expires,
                    decision_id: i.to_string(),
                    ..Default::default()
                };
                if r.apply(d).is_ok() {
                    last.insert(format!("d{device}"), (state, expires));
                }
            }
            let mut active = 0;
            for device in 0u8..3 {
                let name = format!("d{device}");
                let expect = last.get(&name).is_some_and(|&(s, e)| s == 1 && (e == 0 || now < e));
                active += usize::from(expect);
                prop_assert_eq!(r.state("f", &name, now).is_some(), expect);
            }
            prop_assert_eq!(r.quarantined_count(now), active);
        }
    }
}
