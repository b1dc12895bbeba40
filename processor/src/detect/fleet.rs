//! `fleet_shift`: a sudden change of behaviour across a whole fleet (a bad OTA
//! update, a fleet-wide credential leak feeding forged data, a broken upstream), reported
//! once for the fleet, never per device.
//!
//! Per fleet and per `bucket` of ingest time, the mean of each configured signal and
//! the event volume are compared with an EWMA baseline of past buckets (mean and
//! variance): `z = (x − μ) / max(σ, min_stddev)`. After `warmup_buckets` buckets,
//! `|z| ≥ z_threshold` is a finding, then that quantity is quiet for `cooldown`, while
//! the baseline keeps learning: a lasting shift becomes the new normal and is
//! reported once; a gradual drift is tracked by the baseline and never fires. A bucket
//! is judged when the fleet's first event of a later bucket arrives; the first
//! (partial) bucket and buckets with fewer than `min_samples` samples teach nothing.
//! With several processor instances each judges the share of the fleet on its
//! partitions.

use std::collections::HashMap;
use std::time::Duration;

use fleetgate_proto::Evidence;
use serde::{Deserialize, Serialize};

use super::{
    positive, signal_value, Detector, DetectorKind, FindingDraft, Observed, StateConfig, StateTable,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetShiftConfig {
    pub enabled: bool,
    /// Numeric signals whose per-bucket fleet mean is watched.
    pub signals: Vec<String>,
    /// Also watch the fleet's event count per bucket.
    pub volume: bool,
    #[serde(with = "humantime_serde")]
    pub bucket: Duration,
    /// EWMA weight of the newest bucket, in (0, 1).
    pub alpha: f64,
    pub warmup_buckets: u32,
    pub z_threshold: f64,
    /// Buckets with fewer samples of a quantity are neither judged nor learnt.
    pub min_samples: u32,
    /// Floor of σ, in the quantity's unit, so a very steady fleet does not fire on noise.
    pub min_stddev: f64,
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Most fleets with state.
    pub max_fleets: usize,
}

impl Default for FleetShiftConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            signals: vec![
                "speed_kph".into(),
                "battery_temp_c".into(),
                "soc_pct".into(),
            ],
            volume: true,
            bucket: Duration::from_secs(60),
            alpha: 0.1,
            warmup_buckets: 15,
            z_threshold: 6.0,
            min_samples: 20,
            min_stddev: 1.0,
            cooldown: Duration::from_secs(30 * 60),
            max_fleets: 100_000,
        }
    }
}

impl FleetShiftConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.bucket < Duration::from_secs(1) {
            return Err("detectors.fleet_shift.bucket must be at least 1s".into());
        }
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return Err("detectors.fleet_shift.alpha must be in (0, 1)".into());
        }
        positive("detectors.fleet_shift.z_threshold", self.z_threshold)?;
        positive("detectors.fleet_shift.min_stddev", self.min_stddev)
    }
}

/// Quantity name of the event volume.
pub const VOLUME: &str = "events_per_bucket";
/// Sample records kept per quantity and bucket, as evidence.
const SAMPLES: usize = 4;

/// Exponentially weighted mean and variance of one quantity's bucket values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ewma {
    pub mean: f64,
    pub var: f64,
    pub buckets: u32,
}

impl Ewma {
    /// Standard score of `x` against the baseline, before learning it.
    pub fn z(&self, x: f64, min_stddev: f64) -> f64 {
        (x - self.mean) / self.var.sqrt().max(min_stddev)
    }

    pub fn learn(&mut self, x: f64, alpha: f64) {
        if self.buckets == 0 {
            self.mean = x;
            self.var = 0.0;
        } else {
            let diff = x - self.mean;
            let incr = alpha * diff;
            self.mean += incr;
            self.var = (1.0 - alpha) * (self.var + diff * incr);
        }
        self.buckets = self.buckets.saturating_add(1);
    }
}

#[derive(Debug, Default)]
struct Accum {
    sum: f64,
    n: u32,
    samples: Vec<Evidence>,
    first_received_at_ms: i64,
}

impl Accum {
    fn add(&mut self, v: f64, obs: &Observed<'_>, quantity: &str) {
        if self.n == 0 {
            self.first_received_at_ms = obs.received_at_ms();
        }
        self.sum += v;
        self.n += 1;
        if self.samples.len() < SAMPLES {
            self.samples
                .push(obs.evidence(quantity, v, 0.0, String::new()));
        }
    }
}

#[derive(Debug, Default)]
struct Quantity {
    baseline: Ewma,
    bucket: Accum,
    quiet_until_ms: i64,
}

#[derive(Debug)]
struct FleetState {
    bucket: i64,
    /// The first bucket started mid-way: it teaches nothing.
    partial: bool,
    quantities: HashMap<String, Quantity>,
}

/// Per-fleet bucket accumulators and baselines.
#[derive(Debug)]
pub struct FleetShift {
    cfg: FleetShiftConfig,
    fleets: StateTable<String, FleetState>,
}

impl FleetShift {
    pub fn new(cfg: FleetShiftConfig, state: &StateConfig) -> Self {
        let fleets = StateTable::new(cfg.max_fleets, state.idle_ttl.as_millis() as i64);
        Self { cfg, fleets }
    }

    fn close_bucket(
        cfg: &FleetShiftConfig,
        fleet: &str,
        f: &mut FleetState,
        now: i64,
        out: &mut Vec<FindingDraft>,
    ) {
        let partial = std::mem::replace(&mut f.partial, false);
        for (name, q) in f.quantities.iter_mut() {
            let acc = std::mem::take(&mut q.bucket);
            if partial || acc.n < cfg.min_samples {
                continue;
            }
            let x = if name == VOLUME {
                f64::from(acc.n)
            } else {
                acc.sum / f64::from(acc.n)
            };
            let z = q.baseline.z(x, cfg.min_stddev);
            let judged = q.baseline.buckets >= cfg.warmup_buckets;
            if judged && z.abs() >= cfg.z_threshold && now >= q.quiet_until_ms {
                q.quiet_until_ms = now + cfg.cooldown.as_millis() as i64;
                let sigma = q.baseline.var.sqrt().max(cfg.min_stddev);
                let bound = q.baseline.mean + z.signum() * cfg.z_threshold * sigma;
                let what = if name == VOLUME { "count" } else { "mean" };
                let note = format!(
                    "bucket {what} {x:.2}, baseline {:.2} ± {sigma:.2}, z {z:.1}",
                    q.baseline.mean
                );
                let evidence = acc
                    .samples
                    .into_iter()
                    .map(|mut e| {
                        e.threshold = bound;
                        e.note = note.clone();
                        e
                    })
                    .collect();
                out.push(FindingDraft {
                    detector: DetectorKind::FleetShift,
                    fleet_id: fleet.to_owned(),
                    device_id: None,
                    summary: format!(
                        "fleet {fleet}: {name} per-{:?} {what} {x:.2} vs baseline {:.2} (z {z:.1}, limit ±{})",
                        cfg.bucket, q.baseline.mean, cfg.z_threshold
                    ),
                    evidence,
                    detected_at_ms: now,
                    first_offending_received_at_ms: acc.first_received_at_ms,
                });
            }
            q.baseline.learn(x, cfg.alpha);
        }
    }
}

impl Detector for FleetShift {
    fn kind(&self) -> DetectorKind {
        DetectorKind::FleetShift
    }

    fn tracked(&self) -> usize {
        self.fleets.len()
    }

    fn observe(&mut self, obs: &Observed<'_>, out: &mut Vec<FindingDraft>) {
        let Some(event) = obs.event() else { return };
        let now = obs.received_at_ms();
        let idx = now.div_euclid(self.cfg.bucket.as_millis() as i64);
        let cfg = &self.cfg;
        let fleet = &obs.device.fleet_id;
        let f = self.fleets.entry(fleet, now, || FleetState {
            bucket: idx,
            partial: true,
            quantities: HashMap::new(),
        });
        if idx < f.bucket {
            return; // Late arrival for a bucket already judged.
        }
        if idx > f.bucket {
            Self::close_bucket(cfg, fleet, f, now, out);
            f.bucket = idx;
        }
        if cfg.volume {
            let q = f.quantities.entry(VOLUME.to_owned()).or_default();
            q.bucket.add(1.0, obs, VOLUME);
        }
        for name in &cfg.signals {
            if let Some(v) = signal_value(event, name).filter(|v| v.is_finite()) {
                let q = match f.quantities.get_mut(name) {
                    Some(q) => q,
                    None => f.quantities.entry(name.clone()).or_default(),
                };
                q.bucket.add(v, obs, name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testkit::*;
    use proptest::prelude::*;

    fn cfg() -> FleetShiftConfig {
        FleetShiftConfig {
            volume: false,
            ..FleetShiftConfig::default()
        }
    }

    /// 30 devices, one event each per 10 s, for `minutes` minutes from minute `m0`;
    /// speed given by `speed(minute, device)`.
    fn fleet_traffic(m0: i64, minutes: i64, speed: impl Fn(i64, i64) -> f64) -> Vec<Rec> {
        let mut recs = Vec::new();
        for m in m0..m0 + minutes {
            for tick in 0..6 {
                for d in 0..30 {
                    let t = m * 60_000 + tick * 10_000 + d * 100;
                    recs.push(
                        event(&format!("car-{d}"), (m * 6 + tick) as u64, t)
                            .signal("speed_kph", speed(m, d)),
                    );
                }
            }
        }
        recs
    }

    fn noise(m: i64, d: i64) -> f64 {
        ((m * 31 + d * 17) % 21 - 10) as f64
    }

    #[test]
    fn stable_fleet_with_noise_does_not_fire() {
        let recs = fleet_traffic(0, 240, |m, d| 80.0 + noise(m, d));
        let mut det = FleetShift::new(cfg(), &StateConfig::default());
        assert!(run(&mut det, &recs).is_empty());
    }

    #[test]
    fn gradual_drift_does_not_fire() {
        // +0.5 km/h per minute for four hours: 80 -> 200 km/h mean.
        let recs = fleet_traffic(0, 240, |m, d| 80.0 + 0.5 * m as f64 + noise(m, d));
        let mut det = FleetShift::new(cfg(), &StateConfig::default());
        assert!(run(&mut det, &recs).is_empty());
    }

    #[test]
    fn sudden_lasting_shift_fires_exactly_once_for_the_fleet() {
        let recs = fleet_traffic(
            0,
            240,
            |m, d| if m < 60 { 80.0 } else { 140.0 } + noise(m, d),
        );
        let mut det = FleetShift::new(cfg(), &StateConfig::default());
        let f = run(&mut det, &recs);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].device_id, None);
        assert_eq!(f[0].fleet_id, FLEET);
        assert_eq!(f[0].detector, DetectorKind::FleetShift);
        assert_eq!(f[0].evidence.len(), SAMPLES);
        assert!(f[0].evidence[0].value > 120.0);
        assert_eq!(f[0].first_offending_received_at_ms, 60 * 60_000);
    }

    #[test]
    fn volume_jump_fires_once() {
        let mut c = cfg();
        c.volume = true;
        c.signals.clear();
        let mut recs = fleet_traffic(0, 60, |_, _| 80.0);
        // From minute 60 on, every device sends ten times as often.
        for m in 60..120i64 {
            for i in 0..600 {
                let t = m * 60_000 + i * 100;
                recs.push(event(
                    &format!("car-{}", i % 30),
                    10_000 + (m * 600 + i) as u64,
                    t,
                ));
            }
        }
        let mut det = FleetShift::new(c, &StateConfig::default());
        let f = run(&mut det, &recs);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].evidence[0].quantity, VOLUME);
    }

    proptest! {
        /// The EWMA variance never goes negative and the mean stays within the range
        /// of what it learnt.
        #[test]
        fn ewma_stays_in_range(xs in prop::collection::vec(-1e6f64..1e6, 1..200), alpha in 0.01f64..0.99) {
            let mut e = Ewma::default();
            for &x in &xs {
                e.learn(x, alpha);
                prop_assert!(e.var >= 0.0);
            }
            let lo = xs.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            prop_assert!(e.mean >= lo - 1e-6 && e.mean <= hi + 1e-6);
        }
    }
}
