//! `impossible_value`: a signal outside its physical bounds, or a location off the
//! globe. Ingest refuses these at the door with its own catalog; this is the second
//! line, with the processor's own bounds, so an ingest misconfiguration or a catalog
//! that lags a firmware change is still noticed.

use std::collections::HashMap;

use fleetgate_proto::signal::Value;
use serde::{Deserialize, Serialize};

use super::{Detector, DetectorKind, FindingDraft, Observed, MAX_EVIDENCE};

/// Physical bounds of one numeric signal (inclusive).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalBound {
    pub name: String,
    pub min: f64,
    pub max: f64,
}

impl SignalBound {
    fn new(name: &str, min: f64, max: f64) -> Self {
        Self {
            name: name.into(),
            min,
            max,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImpossibleValueConfig {
    pub enabled: bool,
    /// Signals without an entry are not checked; NaN is always out of bounds.
    pub signals: Vec<SignalBound>,
}

impl Default for ImpossibleValueConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            signals: vec![
                SignalBound::new("speed_kph", 0.0, 400.0),
                SignalBound::new("odometer_km", 0.0, 5_000_000.0),
                SignalBound::new("soc_pct", 0.0, 100.0),
                SignalBound::new("battery_temp_c", -60.0, 150.0),
                SignalBound::new("battery_voltage_v", 0.0, 1_500.0),
                SignalBound::new("ambient_temp_c", -80.0, 70.0),
                SignalBound::new("engine_rpm", 0.0, 20_000.0),
                SignalBound::new("tire_pressure_kpa", 0.0, 1_000.0),
            ],
        }
    }
}

impl ImpossibleValueConfig {
    pub fn validate(&self) -> Result<(), String> {
        for s in &self.signals {
            if s.min.is_nan() || s.max.is_nan() || s.min > s.max {
                return Err(format!(
                    "detectors.impossible_value.signals {:?}: min must be <= max (and numbers)",
                    s.name
                ));
            }
        }
        Ok(())
    }
}

/// Stateless bounds check of every event.
#[derive(Debug)]
pub struct ImpossibleValue {
    bounds: HashMap<String, (f64, f64)>,
}

impl ImpossibleValue {
    pub fn new(cfg: &ImpossibleValueConfig) -> Self {
        Self {
            bounds: cfg
                .signals
                .iter()
                .map(|s| (s.name.clone(), (s.min, s.max)))
                .collect(),
        }
    }
}

fn outside(v: f64, min: f64, max: f64) -> bool {
    // Also true for NaN, which is never a reading.
    !(min <= v && v <= max)
}

impl Detector for ImpossibleValue {
    fn kind(&self) -> DetectorKind {
        DetectorKind::ImpossibleValue
    }

    fn observe(&mut self, obs: &Observed<'_>, out: &mut Vec<FindingDraft>) {
        let Some(event) = obs.event() else { return };
        let mut evidence = Vec::new();
        let mut first = None;
        for s in &event.signals {
            let v = match s.value {
                Some(Value::F64(v)) => v,
                Some(Value::I64(v)) => v as f64,
                _ => continue,
            };
            let Some(&(min, max)) = self.bounds.get(&s.name) else {
                continue;
            };
            if outside(v, min, max) {
                let threshold = if v < min { min } else { max };
                first.get_or_insert_with(|| format!("{} = {v} outside [{min}, {max}]", s.name));
                evidence.push(obs.evidence(&s.name, v, threshold, String::new()));
            }
        }
        if let Some(loc) = &event.location {
            for (name, v, lim) in [
                ("latitude_deg", loc.latitude_deg, 90.0),
                ("longitude_deg", loc.longitude_deg, 180.0),
            ] {
                if outside(v, -lim, lim) {
                    first.get_or_insert_with(|| format!("{name} = {v} outside [-{lim}, {lim}]"));
                    evidence.push(obs.evidence(name, v, lim, String::new()));
                }
            }
        }
        let Some(mut summary) = first else { return };
        if evidence.len() > 1 {
            summary.push_str(&format!(" (+{} more)", evidence.len() - 1));
        }
        evidence.truncate(MAX_EVIDENCE);
        out.push(FindingDraft::device(
            DetectorKind::ImpossibleValue,
            obs,
            summary,
            evidence,
            obs.received_at_ms(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testkit::*;

    fn detector() -> ImpossibleValue {
        ImpossibleValue::new(&ImpossibleValueConfig::default())
    }

    #[test]
    fn values_at_and_inside_bounds_pass() {
        let recs = [
            event("car", 1, 0)
                .signal("speed_kph", 0.0)
                .signal("soc_pct", 100.0),
            event("car", 2, 1000)
                .signal("speed_kph", 399.9)
                .signal("battery_temp_c", -60.0)
                .signal("unlisted_signal", 1e12)
                .at(89.9, -179.9, 5.0),
        ];
        assert!(run(&mut detector(), &recs).is_empty());
    }

    #[test]
    fn out_of_bounds_nan_and_off_globe_are_reported_with_evidence() {
        let recs = [
            event("car", 7, 0)
                .signal("speed_kph", 900.0)
                .signal("soc_pct", f64::NAN),
            event("car", 8, 1000).at(91.0, 10.0, 5.0),
        ];
        let f = run(&mut detector(), &recs);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].evidence.len(), 2);
        assert_eq!(f[0].evidence[0].quantity, "speed_kph");
        assert_eq!(f[0].evidence[0].value, 900.0);
        assert_eq!(f[0].evidence[0].threshold, 400.0);
        assert_eq!(f[0].evidence[0].seq, 7);
        assert!(f[0].summary.contains("+1 more"), "{}", f[0].summary);
        assert_eq!(f[1].evidence[0].quantity, "latitude_deg");
        assert_eq!(f[1].device_id.as_deref(), Some("car"));
    }
}
