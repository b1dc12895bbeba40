//! A plausible vehicle on a drive: speed wanders within traffic limits, the odometer
//! only grows, state of charge only falls, and the position moves along the heading.
//! Every value stays inside ingest's signal catalog bounds, so a correct ingest
//! accepts every event this produces. Time is a parameter, never read here.

use fleetgate_proto::{signal::Value, Location, Signal, TelemetryEvent};
use rand::Rng;

/// Sampling interval between two events of one vehicle.
pub const SAMPLE_INTERVAL_MS: i64 = 1_000;

/// One simulated vehicle; `next_event` advances it by one sample.
#[derive(Debug, Clone)]
pub struct Drive {
    next_seq: u64,
    speed_kph: f64,
    odometer_km: f64,
    soc_pct: f64,
    battery_temp_c: f64,
    latitude_deg: f64,
    longitude_deg: f64,
    heading_deg: f64,
}

impl Drive {
    /// Starts somewhere around Berlin with some charge and mileage.
    pub fn new(rng: &mut impl Rng) -> Self {
        Self {
            next_seq: 1,
            speed_kph: rng.random_range(0.0..60.0),
            odometer_km: rng.random_range(1_000.0..150_000.0),
            soc_pct: rng.random_range(55.0..98.0),
            battery_temp_c: rng.random_range(18.0..30.0),
            latitude_deg: 52.52 + rng.random_range(-0.1..0.1),
            longitude_deg: 13.40 + rng.random_range(-0.1..0.1),
            heading_deg: rng.random_range(0.0..360.0),
        }
    }

    /// The seq the next event will carry (starts at 1).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Advances one sample and returns it stamped `captured_at_ms`.
    pub fn next_event(&mut self, rng: &mut impl Rng, captured_at_ms: i64) -> TelemetryEvent {
        let dt_h = SAMPLE_INTERVAL_MS as f64 / 3_600_000.0;
        self.speed_kph = (self.speed_kph + rng.random_range(-8.0..8.0)).clamp(0.0, 130.0);
        let km = self.speed_kph * dt_h;
        self.odometer_km += km;
        self.soc_pct = (self.soc_pct - km * 0.18).max(5.0);
        self.battery_temp_c =
            (self.battery_temp_c + rng.random_range(-0.05..0.08)).clamp(-20.0, 55.0);
        self.heading_deg = (self.heading_deg + rng.random_range(-10.0..10.0)).rem_euclid(360.0);
        let rad = self.heading_deg.to_radians();
        self.latitude_deg = (self.latitude_deg + km * rad.cos() / 111.0).clamp(-89.0, 89.0);
        let lon_scale = 111.0 * self.latitude_deg.to_radians().cos().max(0.01);
        self.longitude_deg = wrap_lon(self.longitude_deg + km * rad.sin() / lon_scale);

        let seq = self.next_seq;
        self.next_seq += 1;
        TelemetryEvent {
            seq,
            captured_at_ms,
            signals: vec![
                f64_signal("speed_kph", self.speed_kph),
                f64_signal("odometer_km", self.odometer_km),
                f64_signal("soc_pct", self.soc_pct),
                f64_signal("battery_temp_c", self.battery_temp_c),
                Signal {
                    name: "engine_rpm".into(),
                    value: Some(Value::I64((self.speed_kph * 30.0) as i64)),
                },
                Signal {
                    name: "charging".into(),
                    value: Some(Value::Bool(false)),
                },
            ],
            location: Some(Location {
                latitude_deg: self.latitude_deg,
                longitude_deg: self.longitude_deg,
                accuracy_m: rng.random_range(2.0..12.0),
                heading_deg: self.heading_deg as f32 % 360.0,
            }),
        }
    }
}

fn f64_signal(name: &str, v: f64) -> Signal {
    Signal {
        name: name.into(),
        value: Some(Value::F64(v)),
    }
}

fn wrap_lon(lon: f64) -> f64 {
    (lon + 180.0).rem_euclid(360.0) - 180.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    fn f64_of(e: &TelemetryEvent, name: &str) -> f64 {
        e.signals
            .iter()
            .find_map(|s| match (&s.name, &s.value) {
                (n, Some(Value::F64(v))) if n == name => Some(*v),
                _ => None,
            })
            .expect("signal present")
    }

    #[test]
    fn seqs_increase_odometer_grows_soc_falls_and_values_stay_in_bounds() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut drive = Drive::new(&mut rng);
        let mut prev = drive.next_event(&mut rng, 1_000);
        assert_eq!(prev.seq, 1);
        for i in 2..2_000u64 {
            let e = drive.next_event(&mut rng, 1_000 + i as i64);
            assert_eq!(e.seq, i);
            assert!(f64_of(&e, "odometer_km") >= f64_of(&prev, "odometer_km"));
            assert!(f64_of(&e, "soc_pct") <= f64_of(&prev, "soc_pct"));
            assert!((0.0..=400.0).contains(&f64_of(&e, "speed_kph")));
            let loc = e.location.expect("location");
            assert!((0.0..360.0).contains(&loc.heading_deg));
            assert!((-180.0..=180.0).contains(&loc.longitude_deg));
            prev = e;
        }
    }
}
