//! `impossible_travel`: two fixes of one device whose distance implies a speed no
//! vehicle reaches (a cloned credential used in two places, or forged positions).
//!
//! GPS noise and tiny time deltas make naive speed meaningless: two fixes 30 m apart
//! taken 100 ms apart "move" at 1 080 km/h. So the distance is reduced by both fixes'
//! accuracy radii, the time delta is at least `min_interval`, and the remaining jump
//! must also exceed `min_distance_m`. Hence the invariant (property-tested): a
//! trajectory whose raw implied speed never exceeds `max_speed_kmh` never fires.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    positive, Coords, Detector, DetectorKind, FindingDraft, Observed, StateConfig, StateTable,
};
use crate::dedupe::DeviceKey;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImpossibleTravelConfig {
    pub enabled: bool,
    /// Fastest believable ground speed, km/h.
    pub max_speed_kmh: f64,
    /// A jump shorter than this (after subtracting accuracy) is never reported, metres.
    pub min_distance_m: f64,
    /// Time deltas below this count as this much (clock granularity, batching).
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// Accuracy assumed when a fix reports none (0 or not finite), metres.
    pub default_accuracy_m: f64,
    /// Fixes less accurate than this are ignored entirely, metres.
    pub max_accuracy_m: f64,
}

impl Default for ImpossibleTravelConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_speed_kmh: 500.0,
            min_distance_m: 1_000.0,
            min_interval: Duration::from_secs(1),
            default_accuracy_m: 50.0,
            max_accuracy_m: 5_000.0,
        }
    }
}

impl ImpossibleTravelConfig {
    pub fn validate(&self) -> Result<(), String> {
        positive(
            "detectors.impossible_travel.max_speed_kmh",
            self.max_speed_kmh,
        )?;
        positive(
            "detectors.impossible_travel.min_distance_m",
            self.min_distance_m,
        )?;
        positive(
            "detectors.impossible_travel.default_accuracy_m",
            self.default_accuracy_m,
        )?;
        positive(
            "detectors.impossible_travel.max_accuracy_m",
            self.max_accuracy_m,
        )?;
        if self.min_interval.is_zero() {
            return Err("detectors.impossible_travel.min_interval must be > 0".into());
        }
        Ok(())
    }
}

const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Great-circle distance in metres.
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * a.sqrt().min(1.0).asin()
}

#[derive(Debug, Clone)]
struct Fix {
    lat: f64,
    lon: f64,
    accuracy_m: f64,
    captured_at_ms: i64,
    received_at_ms: i64,
    seq: u64,
    coords: Coords,
}

/// Last trusted fix per device.
#[derive(Debug)]
pub struct ImpossibleTravel {
    cfg: ImpossibleTravelConfig,
    last: StateTable<DeviceKey, Fix>,
}

impl ImpossibleTravel {
    pub fn new(cfg: ImpossibleTravelConfig, state: &StateConfig) -> Self {
        Self {
            cfg,
            last: state.table(),
        }
    }
}

impl Detector for ImpossibleTravel {
    fn kind(&self) -> DetectorKind {
        DetectorKind::ImpossibleTravel
    }

    fn tracked(&self) -> usize {
        self.last.len()
    }

    fn observe(&mut self, obs: &Observed<'_>, out: &mut Vec<FindingDraft>) {
        let Some(event) = obs.event() else { return };
        let Some(loc) = &event.location else { return };
        let (lat, lon) = (loc.latitude_deg, loc.longitude_deg);
        // Off-globe positions are `impossible_value`'s business; they anchor nothing.
        if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
            return;
        }
        let accuracy = f64::from(loc.accuracy_m);
        let accuracy_m = if accuracy.is_finite() && accuracy > 0.0 {
            accuracy
        } else {
            self.cfg.default_accuracy_m
        };
        if accuracy_m > self.cfg.max_accuracy_m {
            return;
        }
        let fix = Fix {
            lat,
            lon,
            accuracy_m,
            captured_at_ms: event.captured_at_ms,
            received_at_ms: obs.received_at_ms(),
            seq: event.seq,
            coords: obs.coords.clone(),
        };
        let now = obs.received_at_ms();
        let Some(prev) = self.last.get(obs.device).cloned() else {
            self.last.entry(obs.device, now, || fix);
            return;
        };
        let distance = haversine_m(prev.lat, prev.lon, lat, lon);
        let excess = distance - prev.accuracy_m - accuracy_m;
        let dt_ms = (fix.captured_at_ms - prev.captured_at_ms)
            .unsigned_abs()
            .max(self.cfg.min_interval.as_millis() as u64);
        let speed_kmh = excess / (dt_ms as f64 / 1000.0) * 3.6;
        if excess > self.cfg.min_distance_m && speed_kmh > self.cfg.max_speed_kmh {
            let limit = self.cfg.max_speed_kmh;
            let note = |f: &Fix| format!("fix {:.5},{:.5} ±{:.0} m", f.lat, f.lon, f.accuracy_m);
            let mut from = obs.evidence("speed_kmh_implied", speed_kmh, limit, note(&prev));
            from.topic = prev.coords.topic.to_string();
            from.partition = prev.coords.partition;
            from.offset = prev.coords.offset;
            from.seq = prev.seq;
            let to = obs.evidence("speed_kmh_implied", speed_kmh, limit, note(&fix));
            out.push(FindingDraft::device(
                DetectorKind::ImpossibleTravel,
                obs,
                format!(
                    "moved {:.1} km in {:.1} s: {speed_kmh:.0} km/h > {limit} km/h",
                    distance / 1000.0,
                    dt_ms as f64 / 1000.0
                ),
                vec![from, to],
                prev.received_at_ms.min(fix.received_at_ms),
            ));
        }
        // The newest fix becomes the anchor, so one forged jump is reported once on
        // the way out (and once on the way back), not on every later fix.
        if fix.captured_at_ms >= prev.captured_at_ms {
            *self.last.entry(obs.device, now, || prev.clone()) = fix;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testkit::*;
    use proptest::prelude::*;

    fn detector() -> ImpossibleTravel {
        ImpossibleTravel::new(ImpossibleTravelConfig::default(), &StateConfig::default())
    }

    /// Degrees of latitude for `m` metres.
    fn dlat(m: f64) -> f64 {
        m / 111_195.0
    }

    #[test]
    fn haversine_matches_known_distance() {
        // Paris - Berlin is about 878 km.
        let d = haversine_m(48.8566, 2.3522, 52.52, 13.405);
        assert!((d - 878_000.0).abs() < 5_000.0, "{d}");
    }

    #[test]
    fn highway_at_130_kmh_with_gps_noise_does_not_fire() {
        // 10 Hz fixes, 3.61 m per 100 ms northwards, ±15 m pseudo-random noise: the
        // naive speed between two fixes reaches ~1 200 km/h.
        let mut recs = Vec::new();
        for i in 0..6000i64 {
            let noise = ((i * 7919) % 31 - 15) as f64;
            let acc = if i % 10 == 0 { 0.0 } else { 15.0 };
            recs.push(event("car", i as u64, i * 100).at(
                48.0 + dlat(i as f64 * 3.61 + noise),
                11.0,
                acc,
            ));
        }
        assert!(run(&mut detector(), &recs).is_empty());
    }

    #[test]
    fn tunnel_gap_then_5_km_after_3_minutes_does_not_fire() {
        let recs = [
            event("car", 1, 0).at(48.0, 11.0, 10.0),
            event("car", 2, 180_000).at(48.0 + dlat(5_000.0), 11.0, 10.0),
        ];
        assert!(run(&mut detector(), &recs).is_empty());
    }

    #[test]
    fn same_timestamp_fixes_close_together_do_not_fire() {
        let recs = [
            event("car", 1, 0).at(48.0, 11.0, 0.0),
            event("car", 2, 0).at(48.0 + dlat(80.0), 11.0, 0.0),
        ];
        assert!(run(&mut detector(), &recs).is_empty());
    }

    #[test]
    fn paris_to_berlin_in_ten_seconds_fires_with_both_fixes_as_evidence() {
        let recs = [
            event("car", 1, 0).at(48.8566, 2.3522, 10.0),
            event("car", 2, 10_000).at(52.52, 13.405, 10.0),
            event("car", 3, 20_000).at(52.5201, 13.405, 10.0),
        ];
        let f = run(&mut detector(), &recs);
        assert_eq!(f.len(), 1, "{f:?}");
        let ev = &f[0].evidence;
        assert_eq!((ev[0].seq, ev[1].seq), (1, 2));
        assert_eq!((ev[0].offset, ev[1].offset), (1, 2));
        assert!(ev[1].value > 300_000.0, "{}", ev[1].value);
        assert_eq!(ev[1].threshold, 500.0);
        assert_eq!(f[0].first_offending_received_at_ms, 0);
    }

    #[test]
    fn poor_fixes_are_ignored_and_devices_are_independent() {
        let recs = [
            event("a", 1, 0).at(48.0, 11.0, 10.0),
            event("b", 1, 0).at(52.0, 13.0, 10.0),
            event("a", 2, 1000).at(40.0, 11.0, 9_000.0),
            event("a", 3, 2000).at(48.0001, 11.0, 10.0),
        ];
        assert!(run(&mut detector(), &recs).is_empty());
    }

    proptest! {
        /// Any trajectory whose raw speed between consecutive fixes stays within the
        /// limit never fires, whatever the accuracies and time steps.
        #[test]
        fn never_fires_below_the_speed_limit(
            steps in prop::collection::vec(
                (1i64..600_000, 0.0f64..1.0, 0.0f64..std::f64::consts::TAU, 0.0f32..200.0),
                1..60,
            )
        ) {
            let cfg = ImpossibleTravelConfig::default();
            let mut d = ImpossibleTravel::new(cfg.clone(), &StateConfig::default());
            let (mut lat, mut lon, mut t) = (47.0f64, 8.0f64, 0i64);
            let mut out = Vec::new();
            d.observe(&event("car", 0, t).at(lat, lon, 10.0).obs(), &mut out);
            for (i, (dt, frac, bearing, acc)) in steps.into_iter().enumerate() {
                t += dt;
                // Distance at `frac` of the maximum allowed for dt, 1% margin for the
                // flat-earth step below.
                let max_m = cfg.max_speed_kmh / 3.6 * dt as f64 / 1000.0 * 0.99;
                let m = frac * max_m;
                let nlat = lat + dlat(m * bearing.cos());
                let nlon = lon + dlat(m * bearing.sin()) / lat.to_radians().cos();
                prop_assume!(haversine_m(lat, lon, nlat, nlon) / (dt as f64 / 1000.0) * 3.6 <= cfg.max_speed_kmh);
                lat = nlat;
                lon = nlon;
                d.observe(&event("car", i as u64 + 1, t).at(lat, lon, acc).obs(), &mut out);
            }
            prop_assert!(out.is_empty(), "{out:?}");
        }
    }
}
