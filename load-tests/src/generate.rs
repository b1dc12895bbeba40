//! Synthesizes a recording of a realistic fleet. Each vehicle starts near a city,
//! follows a drive cycle (stop → accelerate → cruise → brake → stop) within
//! 0–130 km/h, turns smoothly, moves by speed × dt on a spherical Earth, spends charge
//! with distance (and sometimes charges while parked), and warms and cools its battery.
//! Devices lose connectivity now and then and send the backlog in one batch when they
//! are back. Pure: the same [`GenerateSpec`] gives the same batches, byte for byte
//! (the random stream is [`SplitMix64`], whose output this crate fixes).

use fleetgate_proto::{
    signal::Value, Location, SessionContext, Signal, TelemetryBatch, TelemetryEvent,
};
use prost::Message;
use rand::{Rng, RngCore, SeedableRng};

use crate::recording::{RecordedBatch, RecordingHeader};

/// Mean Earth radius, metres (the sphere the generator and its tests share).
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;
/// Top speed of the drive cycle, km/h.
pub const MAX_SPEED_KPH: f64 = 130.0;
/// Longest connectivity gap; well inside ingest's default 300 s freshness window, so
/// a backlog replayed at speed 1 is still fresh.
pub const MAX_GAP_MS: u64 = 120_000;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateSpec {
    pub fleet_id: String,
    /// Device ids are `<prefix>-0000`, `<prefix>-0001`, ...
    pub device_prefix: String,
    pub devices: u32,
    pub duration_ms: u64,
    /// How often a connected device sends what it sampled.
    pub batch_interval_ms: u64,
    /// How often a vehicle samples its signals.
    pub sample_interval_ms: u64,
    pub seed: u64,
    /// Chance, per batch, that a connected device loses connectivity.
    pub gap_probability: f64,
    pub software_version: String,
    pub vehicle_config_id: String,
    /// Stored in the header only; 0 keeps the file a pure function of the spec.
    pub created_at_ms: i64,
}

impl GenerateSpec {
    /// Sensible defaults for `devices` vehicles over `duration_ms` of `fleet_id`.
    pub fn new(fleet_id: &str, devices: u32, duration_ms: u64, seed: u64) -> Self {
        Self {
            fleet_id: fleet_id.to_owned(),
            device_prefix: "car".into(),
            devices,
            duration_ms,
            batch_interval_ms: 1_000,
            sample_interval_ms: 1_000,
            seed,
            gap_probability: 0.004,
            software_version: "fw-1.4.2".into(),
            vehicle_config_id: format!("vc-{fleet_id}-2024a"),
            created_at_ms: 0,
        }
    }

    /// Why the spec cannot be generated, naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.devices == 0 {
            return Err("--devices must be at least 1".into());
        }
        if self.duration_ms == 0 {
            return Err("--duration must be positive".into());
        }
        if self.sample_interval_ms == 0 || self.sample_interval_ms > 60_000 {
            return Err("sample interval must be in 1 ms..=60 s".into());
        }
        if self.batch_interval_ms < self.sample_interval_ms || self.batch_interval_ms > 60_000 {
            return Err(format!(
                "--batch-interval must be between the sample interval ({} ms) and 60 s",
                self.sample_interval_ms
            ));
        }
        if !(0.0..=1.0).contains(&self.gap_probability) {
            return Err("gap probability must be in [0, 1]".into());
        }
        Ok(())
    }

    pub fn device_id(&self, index: u32) -> String {
        format!("{}-{index:04}", self.device_prefix)
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and its output is fixed by its
/// definition, so recordings stay byte-identical across `rand` upgrades.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl RngCore for SplitMix64 {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

impl SeedableRng for SplitMix64 {
    type Seed = [u8; 8];
    fn from_seed(seed: [u8; 8]) -> Self {
        Self(u64::from_le_bytes(seed))
    }
    fn seed_from_u64(state: u64) -> Self {
        Self(state)
    }
}

/// Start points: city centres a vehicle starts within ~15 km of.
const CITIES: [(f64, f64); 10] = [
    (52.520, 13.405), // Berlin
    (48.137, 11.575), // Munich
    (48.857, 2.352),  // Paris
    (40.417, -3.704), // Madrid
    (45.464, 9.190),  // Milan
    (52.370, 4.895),  // Amsterdam
    (52.230, 21.012), // Warsaw
    (59.329, 18.069), // Stockholm
    (47.498, 19.040), // Budapest
    (53.551, 9.994),  // Hamburg
];

/// Which part of the drive cycle a vehicle is in.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Standing; `charging` when plugged in. Ends at `until_ms`.
    Stopped { until_ms: u64, charging: bool },
    /// Speeding up at `accel` m/s² towards `target_kph`.
    Accelerating { target_kph: f64, accel: f64 },
    /// Holding around `target_kph` until `until_ms`.
    Cruising { target_kph: f64, until_ms: u64 },
    /// Slowing at `decel` m/s² to a stop.
    Braking { decel: f64 },
}

/// One simulated vehicle; [`VehicleSim::step`] advances it by one sample.
#[derive(Debug, Clone)]
pub struct VehicleSim {
    phase: Phase,
    speed_mps: f64,
    heading_deg: f64,
    /// Degrees per second; wanders slowly so turns are smooth.
    turn_rate: f64,
    lat_deg: f64,
    lon_deg: f64,
    odometer_km: f64,
    soc_pct: f64,
    battery_temp_c: f64,
    ambient_temp_c: f64,
    tire_kpa: f64,
    /// Usable battery energy, kWh, and consumption, kWh per km.
    capacity_kwh: f64,
    kwh_per_km: f64,
}

impl VehicleSim {
    pub fn new(rng: &mut impl Rng) -> Self {
        let (lat, lon) = CITIES[rng.random_range(0..CITIES.len())];
        let ambient = rng.random_range(-5.0..30.0);
        let mut sim = Self {
            phase: Phase::Stopped {
                until_ms: 0,
                charging: false,
            },
            speed_mps: 0.0,
            heading_deg: rng.random_range(0.0..360.0),
            turn_rate: 0.0,
            lat_deg: lat,
            lon_deg: lon,
            odometer_km: rng.random_range(500.0..180_000.0),
            soc_pct: rng.random_range(35.0..95.0),
            battery_temp_c: ambient + rng.random_range(2.0..10.0),
            ambient_temp_c: ambient,
            tire_kpa: rng.random_range(225.0..255.0),
            capacity_kwh: rng.random_range(55.0..90.0),
            kwh_per_km: rng.random_range(0.14..0.22),
        };
        // Start up to ~15 km from the centre.
        let d = rng.random_range(0.0..15_000.0);
        let b = rng.random_range(0.0..360.0);
        (sim.lat_deg, sim.lon_deg) = destination(sim.lat_deg, sim.lon_deg, b, d);
        sim
    }

    /// Advances `dt_ms` (ending at `now_ms`) and returns the sample taken then.
    pub fn step(
        &mut self,
        rng: &mut impl Rng,
        now_ms: u64,
        dt_ms: u64,
        seq: u64,
    ) -> TelemetryEvent {
        let dt = dt_ms as f64 / 1_000.0;
        let v0 = self.speed_mps;
        self.advance_phase(rng, now_ms, dt);
        let v1 = self.speed_mps;
        // Trapezoidal distance over the step.
        let dist_m = (v0 + v1) / 2.0 * dt;

        if v1 > 0.5 {
            self.turn_rate = (self.turn_rate + rng.random_range(-0.6..0.6) * dt).clamp(-3.0, 3.0);
            // Slower vehicles turn tighter, but a highway curve stays gentle.
            let max_rate = if v1 > 25.0 { 1.0 } else { 3.0 };
            let rate = self.turn_rate.clamp(-max_rate, max_rate);
            self.heading_deg = (self.heading_deg + rate * dt).rem_euclid(360.0);
        }
        (self.lat_deg, self.lon_deg) =
            destination(self.lat_deg, self.lon_deg, self.heading_deg, dist_m);
        self.odometer_km += dist_m / 1_000.0;

        let charging = matches!(self.phase, Phase::Stopped { charging: true, .. });
        let energy_kwh = dist_m / 1_000.0 * self.kwh_per_km;
        self.soc_pct = (self.soc_pct - energy_kwh / self.capacity_kwh * 100.0).max(2.0);
        if charging {
            // ~50 kW DC charging, tapering above 80 %.
            let kw = if self.soc_pct < 80.0 { 50.0 } else { 15.0 };
            self.soc_pct =
                (self.soc_pct + kw * dt / 3_600.0 / self.capacity_kwh * 100.0).min(100.0);
        }
        // Battery heats with load and charging, relaxes towards ambient.
        let load_heat = v1 / 36.0 + if charging { 12.0 } else { 0.0 };
        let target = self.ambient_temp_c + 3.0 + load_heat;
        self.battery_temp_c += (target - self.battery_temp_c) * (dt / 600.0).min(1.0);
        self.battery_temp_c = self.battery_temp_c.clamp(-40.0, 65.0);
        self.ambient_temp_c =
            (self.ambient_temp_c + rng.random_range(-0.01..0.01) * dt).clamp(-40.0, 50.0);
        // Tyres warm a little when driving.
        let tire_target = 235.0 + v1 * 0.3;
        self.tire_kpa += (tire_target - self.tire_kpa) * (dt / 900.0).min(1.0);

        let moving = v1 > 0.0;
        let voltage = 340.0 + self.soc_pct * 0.6 + if charging { 8.0 } else { 0.0 };
        TelemetryEvent {
            seq,
            captured_at_ms: now_ms as i64,
            signals: vec![
                f64_signal("speed_kph", v1 * 3.6),
                f64_signal("odometer_km", self.odometer_km),
                f64_signal("soc_pct", self.soc_pct),
                f64_signal("battery_temp_c", self.battery_temp_c),
                f64_signal("battery_voltage_v", voltage),
                f64_signal("ambient_temp_c", self.ambient_temp_c),
                f64_signal("tire_pressure_kpa", self.tire_kpa),
                Signal {
                    name: "engine_rpm".into(),
                    // Single-speed EV gearbox: motor rpm proportional to speed.
                    value: Some(Value::I64((v1 * 3.6 * 70.0).round() as i64)),
                },
                Signal {
                    name: "charging".into(),
                    value: Some(Value::Bool(charging)),
                },
                Signal {
                    name: "ignition_on".into(),
                    value: Some(Value::Bool(moving || !charging)),
                },
            ],
            location: Some(Location {
                latitude_deg: self.lat_deg,
                longitude_deg: self.lon_deg,
                accuracy_m: rng.random_range(2.0..10.0),
                heading_deg: self.heading_deg as f32 % 360.0,
            }),
        }
    }

    fn advance_phase(&mut self, rng: &mut impl Rng, now_ms: u64, dt: f64) {
        let max_mps = MAX_SPEED_KPH / 3.6;
        self.phase = match self.phase {
            Phase::Stopped { until_ms, charging } => {
                self.speed_mps = 0.0;
                if now_ms < until_ms {
                    Phase::Stopped { until_ms, charging }
                } else {
                    // Urban, arterial or highway leg.
                    let target_kph = match rng.random_range(0..10) {
                        0..=4 => rng.random_range(30.0..55.0),
                        5..=7 => rng.random_range(55.0..95.0),
                        _ => rng.random_range(95.0..MAX_SPEED_KPH),
                    };
                    Phase::Accelerating {
                        target_kph,
                        accel: rng.random_range(1.0..2.5),
                    }
                }
            }
            Phase::Accelerating { target_kph, accel } => {
                let target = target_kph / 3.6;
                self.speed_mps = (self.speed_mps + accel * dt).min(target);
                if self.speed_mps >= target {
                    Phase::Cruising {
                        target_kph,
                        until_ms: now_ms + rng.random_range(20_000..240_000),
                    }
                } else {
                    Phase::Accelerating { target_kph, accel }
                }
            }
            Phase::Cruising {
                target_kph,
                until_ms,
            } => {
                let target = target_kph / 3.6;
                // Traffic: wander within ±10 % of the target.
                let wander = rng.random_range(-0.4..0.4) * dt;
                self.speed_mps =
                    (self.speed_mps + wander).clamp(target * 0.9, (target * 1.1).min(max_mps));
                if now_ms >= until_ms {
                    Phase::Braking {
                        decel: rng.random_range(1.5..3.5),
                    }
                } else {
                    Phase::Cruising {
                        target_kph,
                        until_ms,
                    }
                }
            }
            Phase::Braking { decel } => {
                self.speed_mps = (self.speed_mps - decel * dt).max(0.0);
                if self.speed_mps > 0.0 {
                    Phase::Braking { decel }
                } else {
                    let charging = self.soc_pct < 25.0 || rng.random_bool(0.08);
                    let stop_ms = if charging {
                        rng.random_range(120_000..900_000)
                    } else {
                        rng.random_range(5_000..60_000)
                    };
                    Phase::Stopped {
                        until_ms: now_ms + stop_ms,
                        charging,
                    }
                }
            }
        };
    }
}

fn f64_signal(name: &str, v: f64) -> Signal {
    Signal {
        name: name.into(),
        value: Some(Value::F64(v)),
    }
}

/// The point `dist_m` from (`lat`, `lon`) along initial bearing `bearing_deg` on the
/// sphere of radius [`EARTH_RADIUS_M`].
pub fn destination(lat: f64, lon: f64, bearing_deg: f64, dist_m: f64) -> (f64, f64) {
    let (phi1, lambda1, theta) = (lat.to_radians(), lon.to_radians(), bearing_deg.to_radians());
    let delta = dist_m / EARTH_RADIUS_M;
    let phi2 = (phi1.sin() * delta.cos() + phi1.cos() * delta.sin() * theta.cos()).asin();
    let lambda2 = lambda1
        + (theta.sin() * delta.sin() * phi1.cos()).atan2(delta.cos() - phi1.sin() * phi2.sin());
    let lon2 = (lambda2.to_degrees() + 540.0).rem_euclid(360.0) - 180.0;
    (phi2.to_degrees(), lon2)
}

/// Great-circle distance in metres (haversine).
pub fn distance_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * a.sqrt().asin()
}

/// The header and every batch of the recording `spec` describes, in offset order
/// (ties broken by device index).
pub fn generate(spec: &GenerateSpec) -> (RecordingHeader, Vec<RecordedBatch>) {
    let header = RecordingHeader {
        fleet_id: spec.fleet_id.clone(),
        devices: spec.devices,
        seed: spec.seed,
        created_at_ms: spec.created_at_ms,
        description: format!(
            "synthetic fleet: {} devices, {} ms, batch every {} ms, sample every {} ms",
            spec.devices, spec.duration_ms, spec.batch_interval_ms, spec.sample_interval_ms
        ),
    };
    let mut tagged: Vec<(u64, u32, RecordedBatch)> = Vec::new();
    for index in 0..spec.devices {
        // Independent stream per device, derived from the seed and the index only.
        let mut rng = SplitMix64::seed_from_u64(
            spec.seed ^ u64::from(index).wrapping_mul(0xd6e8_feb8_6659_fd93),
        );
        let device_id = spec.device_id(index);
        for (offset, batch) in device_batches(spec, &mut rng) {
            tagged.push((
                offset,
                index,
                RecordedBatch {
                    device_id: device_id.clone(),
                    offset_ms: offset,
                    batch: batch.encode_to_vec(),
                },
            ));
        }
    }
    tagged.sort_by_key(|(offset, index, _)| (*offset, *index));
    (header, tagged.into_iter().map(|(_, _, b)| b).collect())
}

/// One device's batches with their send offsets. Batches go out every
/// `batch_interval_ms` (phase-shifted per device) unless the device is in a
/// connectivity gap; the first batch after a gap carries the whole backlog.
fn device_batches(spec: &GenerateSpec, rng: &mut SplitMix64) -> Vec<(u64, TelemetryBatch)> {
    let mut sim = VehicleSim::new(rng);
    let session = SessionContext {
        software_version: spec.software_version.clone(),
        vehicle_config_id: spec.vehicle_config_id.clone(),
    };
    let phase = rng.random_range(0..spec.batch_interval_ms);
    let mut next_sample = rng.random_range(0..spec.sample_interval_ms);
    let mut next_send = phase + spec.batch_interval_ms;
    let mut gap_until: Option<u64> = None;
    let mut pending: Vec<TelemetryEvent> = Vec::new();
    let mut out = Vec::new();
    let mut seq = 1;
    let mut batch_id = 1;
    let mut last_sample: Option<u64> = None;
    while next_send < spec.duration_ms || next_sample < spec.duration_ms {
        if next_sample <= next_send && next_sample < spec.duration_ms {
            let dt = last_sample.map_or(spec.sample_interval_ms, |t| next_sample - t);
            pending.push(sim.step(rng, next_sample, dt, seq));
            seq += 1;
            last_sample = Some(next_sample);
            next_sample += spec.sample_interval_ms;
            continue;
        }
        if next_send >= spec.duration_ms {
            break;
        }
        let now = next_send;
        next_send += spec.batch_interval_ms;
        if gap_until.is_some_and(|until| now < until) {
            continue;
        }
        gap_until = None;
        if !pending.is_empty() {
            out.push((
                now,
                TelemetryBatch {
                    schema_version: 1,
                    batch_id,
                    sent_at_ms: now as i64,
                    session: Some(session.clone()),
                    events: std::mem::take(&mut pending),
                    ..Default::default()
                },
            ));
            batch_id += 1;
        }
        if rng.random_bool(spec.gap_probability) {
            gap_until = Some(now + rng.random_range(10_000..MAX_GAP_MS - spec.batch_interval_ms));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::{RecordingReader, RecordingWriter};
    use std::collections::HashMap;

    /// (name, min, max) of ingest's default catalog (ingest/src/catalog.rs).
    const CATALOG: [(&str, f64, f64); 10] = [
        ("speed_kph", 0.0, 400.0),
        ("odometer_km", 0.0, 5_000_000.0),
        ("soc_pct", 0.0, 100.0),
        ("battery_temp_c", -60.0, 150.0),
        ("battery_voltage_v", 0.0, 1_500.0),
        ("ambient_temp_c", -80.0, 70.0),
        ("engine_rpm", 0.0, 20_000.0),
        ("tire_pressure_kpa", 0.0, 1_000.0),
        ("charging", 0.0, 1.0),
        ("ignition_on", 0.0, 1.0),
    ];

    fn encode(spec: &GenerateSpec) -> Vec<u8> {
        let (h, batches) = generate(spec);
        let mut w = RecordingWriter::new(Vec::new(), &h).unwrap();
        for b in &batches {
            w.write_batch(b).unwrap();
        }
        w.finish().unwrap()
    }

    fn num(e: &TelemetryEvent, name: &str) -> f64 {
        e.signals
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| match s.value {
                Some(Value::F64(v)) => Some(v),
                Some(Value::I64(v)) => Some(v as f64),
                Some(Value::Bool(b)) => Some(f64::from(u8::from(b))),
                None => None,
            })
            .unwrap_or_else(|| panic!("signal {name} missing"))
    }

    /// Every device's events in seq order, decoded from the recording.
    fn events_by_device(spec: &GenerateSpec) -> HashMap<String, Vec<(u64, TelemetryEvent)>> {
        let (_, batches) = generate(spec);
        let mut by: HashMap<String, Vec<(u64, TelemetryEvent)>> = HashMap::new();
        for b in batches {
            let batch = TelemetryBatch::decode(b.batch.as_slice()).unwrap();
            assert_eq!(batch.sent_at_ms as u64, b.offset_ms);
            for e in batch.events {
                assert!(
                    e.captured_at_ms as u64 <= b.offset_ms,
                    "captured after sent"
                );
                by.entry(b.device_id.clone())
                    .or_default()
                    .push((b.offset_ms, e));
            }
        }
        by
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let spec = GenerateSpec::new("fleet-a", 4, 120_000, 7);
        let a = encode(&spec);
        assert_eq!(a, encode(&spec));
        let other = GenerateSpec::new("fleet-a", 4, 120_000, 8);
        assert_ne!(a, encode(&other));
        // And the file reads back.
        let (h, b) = RecordingReader::new(a.as_slice())
            .unwrap()
            .read_all()
            .unwrap();
        assert_eq!((h.devices, h.seed, h.fleet_id.as_str()), (4, 7, "fleet-a"));
        assert!(!b.is_empty());
    }

    #[test]
    fn seqs_start_at_one_and_increase_by_one_with_every_sample() {
        let mut spec = GenerateSpec::new("f", 3, 300_000, 11);
        spec.gap_probability = 0.0;
        let by = events_by_device(&spec);
        assert_eq!(by.len(), 3);
        for (dev, events) in by {
            // 300 samples each, less those taken after the last batch went out.
            assert!(
                (298..=300).contains(&events.len()),
                "{dev}: {}",
                events.len()
            );
            for (i, (_, e)) in events.iter().enumerate() {
                assert_eq!(e.seq, i as u64 + 1, "{dev}");
            }
        }
    }

    #[test]
    fn physically_plausible_and_inside_catalog_bounds() {
        let mut spec = GenerateSpec::new("f", 20, 1_800_000, 3);
        spec.gap_probability = 0.01;
        let by = events_by_device(&spec);
        let mut max_kph: f64 = 0.0;
        let mut moved_km = 0.0;
        let mut saw_gap = false;
        let mut saw_charging = false;
        for (dev, events) in &by {
            for (_, e) in events {
                for s in &e.signals {
                    let (_, min, max) = CATALOG
                        .iter()
                        .find(|(n, _, _)| *n == s.name)
                        .unwrap_or_else(|| panic!("{} not in catalog", s.name));
                    let v = num(e, &s.name);
                    assert!(
                        v.is_finite() && *min <= v && v <= *max,
                        "{dev} {} = {v}",
                        s.name
                    );
                }
                let speed = num(e, "speed_kph");
                assert!(speed <= MAX_SPEED_KPH + 1e-9, "{dev} speed {speed}");
                max_kph = max_kph.max(speed);
            }
            for pair in events.windows(2) {
                let ((o1, a), (o2, b)) = (&pair[0], &pair[1]);
                saw_gap |= o2 - o1 > 5_000;
                let dt_h = (b.captured_at_ms - a.captured_at_ms) as f64 / 3_600_000.0;
                assert!(dt_h > 0.0);
                let (la, lb) = (a.location.unwrap(), b.location.unwrap());
                let km = distance_m(
                    la.latitude_deg,
                    la.longitude_deg,
                    lb.latitude_deg,
                    lb.longitude_deg,
                ) / 1_000.0;
                assert!(
                    km / dt_h <= MAX_SPEED_KPH + 5.0,
                    "{dev}: implied {} km/h",
                    km / dt_h
                );
                let odo = num(b, "odometer_km") - num(a, "odometer_km");
                assert!(odo >= 0.0, "{dev}: odometer went back");
                // The odometer follows the path (which is never shorter than the chord).
                assert!(odo + 1e-6 >= km, "{dev}: odometer {odo} km < moved {km} km");
                assert!(odo / dt_h <= MAX_SPEED_KPH + 1e-6);
                let charging = num(b, "charging") == 1.0;
                if charging {
                    assert_eq!(num(b, "speed_kph"), 0.0, "{dev}: charging while driving");
                    saw_charging |= num(b, "soc_pct") > num(a, "soc_pct");
                } else {
                    assert!(
                        num(b, "soc_pct") <= num(a, "soc_pct") + 1e-9,
                        "{dev}: soc rose without charging"
                    );
                }
                assert!((num(b, "battery_temp_c") - num(a, "battery_temp_c")).abs() < 1.0);
                moved_km += odo;
            }
        }
        assert!(
            max_kph > 90.0,
            "no vehicle ever got on a highway: {max_kph}"
        );
        assert!(moved_km > 100.0, "fleet barely moved: {moved_km} km");
        assert!(
            saw_gap,
            "no connectivity gap in 20 devices x 30 min at p=0.01"
        );
        assert!(saw_charging, "no vehicle charged in 20 devices x 30 min");
    }

    #[test]
    fn backlogs_stay_inside_the_freshness_window() {
        let mut spec = GenerateSpec::new("f", 10, 1_200_000, 5);
        spec.gap_probability = 0.02;
        let (_, batches) = generate(&spec);
        let mut biggest = 0;
        for b in batches {
            let batch = TelemetryBatch::decode(b.batch.as_slice()).unwrap();
            let oldest = batch.events.iter().map(|e| e.captured_at_ms).min().unwrap();
            let age = b.offset_ms - oldest as u64;
            assert!(
                age <= MAX_GAP_MS + 2 * spec.batch_interval_ms,
                "backlog age {age} ms"
            );
            biggest = biggest.max(batch.events.len());
        }
        assert!(biggest > 5, "no backlog batch was produced");
    }

    #[test]
    fn destination_and_distance_agree() {
        for (lat, lon) in CITIES {
            for bearing in [0.0, 45.0, 90.0, 200.0, 359.0] {
                let (la, lo) = destination(lat, lon, bearing, 1_000.0);
                assert!((distance_m(lat, lon, la, lo) - 1_000.0).abs() < 1e-3);
            }
        }
        // 1 km north is ~0.009 degrees of latitude.
        let (la, _) = destination(0.0, 0.0, 0.0, 1_000.0);
        assert!((la - 0.008_993).abs() < 1e-5);
    }

    #[test]
    fn bad_specs_are_refused() {
        let ok = GenerateSpec::new("f", 1, 1_000, 0);
        assert!(ok.validate().is_ok());
        let mut s = ok.clone();
        s.devices = 0;
        assert!(s.validate().unwrap_err().contains("--devices"));
        let mut s = ok.clone();
        s.batch_interval_ms = 10;
        assert!(s.validate().unwrap_err().contains("--batch-interval"));
    }
}
