//! Which signals a vehicle may send and what values are physically possible. A value
//! outside its bounds is rejected at the door (`field_out_of_range`): a compromised ECU
//! on an authenticated channel must not poison downstream analytics.

use std::collections::HashMap;

use fleetgate_proto::signal::Value;
use serde::{Deserialize, Serialize};

/// The type a signal's value must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    F64,
    I64,
    Bool,
}

/// One catalog entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalSpec {
    pub name: String,
    pub kind: SignalKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

impl SignalSpec {
    fn new(name: &str, kind: SignalKind, min: f64, max: f64) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            min: Some(min),
            max: Some(max),
        }
    }
}

/// The default catalog: common connected-vehicle signals with physical bounds.
pub fn default_signals() -> Vec<SignalSpec> {
    use SignalKind::*;
    vec![
        SignalSpec::new("speed_kph", F64, 0.0, 400.0),
        SignalSpec::new("odometer_km", F64, 0.0, 5_000_000.0),
        SignalSpec::new("soc_pct", F64, 0.0, 100.0),
        SignalSpec::new("battery_temp_c", F64, -60.0, 150.0),
        SignalSpec::new("battery_voltage_v", F64, 0.0, 1_500.0),
        SignalSpec::new("ambient_temp_c", F64, -80.0, 70.0),
        SignalSpec::new("engine_rpm", I64, 0.0, 20_000.0),
        SignalSpec::new("tire_pressure_kpa", F64, 0.0, 1_000.0),
        SignalSpec::new("charging", Bool, 0.0, 1.0),
        SignalSpec::new("ignition_on", Bool, 0.0, 1.0),
    ]
}

/// Why a signal is not acceptable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SignalError {
    #[error("unknown signal {0:?}")]
    Unknown(String),
    #[error("signal {name:?} must be {expected:?}")]
    WrongKind { name: String, expected: SignalKind },
    #[error("signal {name:?} = {value} outside [{min}, {max}]")]
    OutOfRange {
        name: String,
        value: f64,
        min: f64,
        max: f64,
    },
    #[error("signal {0:?} has no value")]
    Missing(String),
}

/// Lookup table built once from the configured catalog.
#[derive(Debug, Clone)]
pub struct SignalCatalog {
    by_name: HashMap<String, SignalSpec>,
}

impl SignalCatalog {
    pub fn new(specs: impl IntoIterator<Item = SignalSpec>) -> Self {
        Self {
            by_name: specs.into_iter().map(|s| (s.name.clone(), s)).collect(),
        }
    }

    pub fn check(&self, name: &str, value: Option<&Value>) -> Result<(), SignalError> {
        let spec = self
            .by_name
            .get(name)
            .ok_or_else(|| SignalError::Unknown(truncate(name, 64)))?;
        let numeric = match (spec.kind, value) {
            (_, None) => return Err(SignalError::Missing(name.to_owned())),
            (SignalKind::F64, Some(Value::F64(v))) => *v,
            (SignalKind::I64, Some(Value::I64(v))) => *v as f64,
            (SignalKind::Bool, Some(Value::Bool(_))) => return Ok(()),
            (expected, Some(_)) => {
                return Err(SignalError::WrongKind {
                    name: name.to_owned(),
                    expected,
                })
            }
        };
        let min = spec.min.unwrap_or(f64::NEG_INFINITY);
        let max = spec.max.unwrap_or(f64::INFINITY);
        // `!(a <= v && v <= b)` is also true for NaN, which is never a valid reading.
        if !(min <= numeric && numeric <= max) {
            return Err(SignalError::OutOfRange {
                name: name.to_owned(),
                value: numeric,
                min,
                max,
            });
        }
        Ok(())
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> SignalCatalog {
        SignalCatalog::new(default_signals())
    }

    #[test]
    fn accepts_values_within_bounds() {
        let c = catalog();
        c.check("speed_kph", Some(&Value::F64(88.0))).unwrap();
        c.check("engine_rpm", Some(&Value::I64(3000))).unwrap();
        c.check("charging", Some(&Value::Bool(true))).unwrap();
    }

    #[test]
    fn rejects_out_of_bounds_nan_wrong_kind_unknown() {
        let c = catalog();
        assert!(matches!(
            c.check("speed_kph", Some(&Value::F64(401.0))),
            Err(SignalError::OutOfRange { .. })
        ));
        assert!(matches!(
            c.check("soc_pct", Some(&Value::F64(f64::NAN))),
            Err(SignalError::OutOfRange { .. })
        ));
        assert!(matches!(
            c.check("soc_pct", Some(&Value::F64(f64::INFINITY))),
            Err(SignalError::OutOfRange { .. })
        ));
        assert!(matches!(
            c.check("soc_pct", Some(&Value::I64(50))),
            Err(SignalError::WrongKind { .. })
        ));
        assert!(matches!(
            c.check("warp_factor", Some(&Value::F64(9.0))),
            Err(SignalError::Unknown(_))
        ));
        assert!(matches!(
            c.check("soc_pct", None),
            Err(SignalError::Missing(_))
        ));
    }
}
