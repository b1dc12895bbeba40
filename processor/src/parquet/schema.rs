//! Column layout of the Parquet files and the mapping from [`TelemetryEnvelope`] to it.
//!
//! One row per accepted event: every provenance field, the Kafka coordinates the row
//! came from, the location, one nullable typed column per catalog signal, and
//! `signals_other` for every signal that has no column (unknown name, unexpected kind,
//! repeated name, missing value), so no sample a vehicle sent is dropped.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float32Builder, Float64Builder, Int32Builder, Int64Builder, ListBuilder,
    StringBuilder, StructBuilder, TimestampMillisecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{ArrowError, DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use fleetgate_proto::{signal, TelemetryEnvelope};

/// Value type of a catalog signal, as in the ingest signal catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalKind {
    F64,
    I64,
    Bool,
}

impl SignalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SignalKind::F64 => "f64",
            SignalKind::I64 => "i64",
            SignalKind::Bool => "bool",
        }
    }

    fn data_type(self) -> DataType {
        match self {
            SignalKind::F64 => DataType::Float64,
            SignalKind::I64 => DataType::Int64,
            SignalKind::Bool => DataType::Boolean,
        }
    }
}

/// A catalog signal that gets its own typed column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalColumn {
    pub name: String,
    pub kind: SignalKind,
}

impl SignalColumn {
    pub fn new(name: impl Into<String>, kind: SignalKind) -> Self {
        Self {
            name: name.into(),
            kind,
        }
    }
}

impl fmt::Display for SignalColumn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.kind.as_str())
    }
}

impl FromStr for SignalColumn {
    type Err = SchemaError;

    /// Parses `name:kind`, kind one of `f64`, `i64`, `bool`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, kind) = s
            .split_once(':')
            .ok_or_else(|| SchemaError::BadSignalSpec(s.to_owned()))?;
        let kind = match kind {
            "f64" => SignalKind::F64,
            "i64" => SignalKind::I64,
            "bool" => SignalKind::Bool,
            _ => return Err(SchemaError::BadSignalSpec(s.to_owned())),
        };
        Ok(SignalColumn::new(name, kind))
    }
}

/// The default signal catalog of ingest (`ingest/src/catalog.rs`), one column each.
pub fn default_signal_columns() -> Vec<SignalColumn> {
    use SignalKind::*;
    [
        ("speed_kph", F64),
        ("odometer_km", F64),
        ("soc_pct", F64),
        ("battery_temp_c", F64),
        ("battery_voltage_v", F64),
        ("ambient_temp_c", F64),
        ("engine_rpm", I64),
        ("tire_pressure_kpa", F64),
        ("charging", Bool),
        ("ignition_on", Bool),
    ]
    .into_iter()
    .map(|(n, k)| SignalColumn::new(n, k))
    .collect()
}

/// Why a signal column list cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("signal column {0:?}: expected NAME:KIND with KIND one of f64, i64, bool")]
    BadSignalSpec(String),
    #[error(
        "signal column {0:?}: names must be 1-64 characters of [a-z0-9_], starting with a letter"
    )]
    BadSignalName(String),
    #[error("signal column {0:?} collides with a fixed column or another signal column")]
    DuplicateColumn(String),
}

/// Fixed (non-signal) columns, in file order.
pub const FIXED_COLUMNS: [&str; 24] = [
    "device_id",
    "fleet_id",
    "cert_sha256",
    "cert_serial",
    "transport",
    "ingest_node",
    "connection_id",
    "received_at",
    "captured_at",
    "sent_at",
    "seq",
    "schema_version",
    "software_version",
    "vehicle_config_id",
    "ingest_version",
    "remote_addr",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "latitude_deg",
    "longitude_deg",
    "location_accuracy_m",
    "heading_deg",
    "signals_other",
];

/// Hive partition keys; a column with these names would clash with them on read.
const RESERVED: [&str; 3] = ["fleet", "date", "hour"];

/// One consumed record that passed dedupe: the decoded envelope and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub envelope: TelemetryEnvelope,
    pub partition: i32,
    pub offset: i64,
}

/// The arrow schema of the files plus the signal-name lookup used to fill it.
#[derive(Debug, Clone)]
pub struct EventSchema {
    schema: SchemaRef,
    signals: Vec<SignalColumn>,
    by_name: HashMap<String, usize>,
}

fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn other_fields() -> Fields {
    Fields::from(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("value", DataType::Utf8, true),
    ])
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl EventSchema {
    /// Builds the schema with one column per signal in `signals`, in that order.
    pub fn new(signals: Vec<SignalColumn>) -> Result<Self, SchemaError> {
        let mut by_name = HashMap::new();
        for (i, s) in signals.iter().enumerate() {
            if !valid_name(&s.name) {
                return Err(SchemaError::BadSignalName(s.name.clone()));
            }
            if FIXED_COLUMNS.contains(&s.name.as_str())
                || RESERVED.contains(&s.name.as_str())
                || by_name.insert(s.name.clone(), i).is_some()
            {
                return Err(SchemaError::DuplicateColumn(s.name.clone()));
            }
        }
        let utf8 = |n: &str| Field::new(n, DataType::Utf8, false);
        let mut fields = vec![
            utf8("device_id"),
            utf8("fleet_id"),
            utf8("cert_sha256"),
            utf8("cert_serial"),
            utf8("transport"),
            utf8("ingest_node"),
            utf8("connection_id"),
            Field::new("received_at", timestamp_type(), false),
            Field::new("captured_at", timestamp_type(), false),
            Field::new("sent_at", timestamp_type(), false),
            Field::new("seq", DataType::UInt64, false),
            Field::new("schema_version", DataType::UInt32, false),
            utf8("software_version"),
            utf8("vehicle_config_id"),
            utf8("ingest_version"),
            utf8("remote_addr"),
            utf8("kafka_topic"),
            Field::new("kafka_partition", DataType::Int32, false),
            Field::new("kafka_offset", DataType::Int64, false),
            Field::new("latitude_deg", DataType::Float64, true),
            Field::new("longitude_deg", DataType::Float64, true),
            Field::new("location_accuracy_m", DataType::Float32, true),
            Field::new("heading_deg", DataType::Float32, true),
        ];
        fields.extend(
            signals
                .iter()
                .map(|s| Field::new(&s.name, s.kind.data_type(), true)),
        );
        fields.push(Field::new(
            "signals_other",
            DataType::List(Arc::new(Field::new(
                "item",
                DataType::Struct(other_fields()),
                false,
            ))),
            false,
        ));
        Ok(Self {
            schema: Arc::new(Schema::new(fields)),
            signals,
            by_name,
        })
    }

    pub fn arrow(&self) -> SchemaRef {
        self.schema.clone()
    }

    pub fn signals(&self) -> &[SignalColumn] {
        &self.signals
    }

    /// Maps `rows` (all read from `topic`) to one record batch.
    pub fn to_batch(&self, topic: &str, rows: &[Row]) -> Result<RecordBatch, ArrowError> {
        let n = rows.len();
        let mut strings: Vec<StringBuilder> = (0..7).map(|_| StringBuilder::new()).collect();
        let mut tail_strings: Vec<StringBuilder> = (0..5).map(|_| StringBuilder::new()).collect();
        let ts = || TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
        let (mut received, mut captured, mut sent) = (ts(), ts(), ts());
        let mut seq = UInt64Builder::with_capacity(n);
        let mut schema_version = UInt32Builder::with_capacity(n);
        let mut partition = Int32Builder::with_capacity(n);
        let mut offset = Int64Builder::with_capacity(n);
        let mut lat = Float64Builder::with_capacity(n);
        let mut lon = Float64Builder::with_capacity(n);
        let mut accuracy = Float32Builder::with_capacity(n);
        let mut heading = Float32Builder::with_capacity(n);
        let mut signal_cols: Vec<SignalBuilder> = self
            .signals
            .iter()
            .map(|s| SignalBuilder::new(s.kind, n))
            .collect();
        let mut other = ListBuilder::new(StructBuilder::from_fields(other_fields(), 0)).with_field(
            Arc::new(Field::new("item", DataType::Struct(other_fields()), false)),
        );
        let mut filled = vec![false; self.signals.len()];

        for row in rows {
            let p = row.envelope.provenance.clone().unwrap_or_default();
            for (b, v) in strings.iter_mut().zip([
                &p.device_id,
                &p.fleet_id,
                &p.cert_sha256,
                &p.cert_serial,
                &p.transport,
                &p.ingest_node,
                &p.connection_id,
            ]) {
                b.append_value(v);
            }
            received.append_value(p.received_at_ms);
            captured.append_value(p.captured_at_ms);
            sent.append_value(p.sent_at_ms);
            seq.append_value(p.seq);
            schema_version.append_value(p.schema_version);
            for (b, v) in tail_strings.iter_mut().zip([
                p.software_version.as_str(),
                &p.vehicle_config_id,
                &p.ingest_version,
                &p.remote_addr,
                topic,
            ]) {
                b.append_value(v);
            }
            partition.append_value(row.partition);
            offset.append_value(row.offset);
            let event = row.envelope.event.as_ref();
            let loc = event.and_then(|e| e.location.as_ref());
            lat.append_option(loc.map(|l| l.latitude_deg));
            lon.append_option(loc.map(|l| l.longitude_deg));
            accuracy.append_option(loc.map(|l| l.accuracy_m));
            heading.append_option(loc.map(|l| l.heading_deg));

            filled.iter_mut().for_each(|f| *f = false);
            let others = other.values();
            for s in event.map(|e| e.signals.as_slice()).unwrap_or_default() {
                let column = self.by_name.get(&s.name).copied();
                let placed = match column {
                    Some(i) if !filled[i] => signal_cols[i].try_set(s.value.as_ref()),
                    _ => false,
                };
                if placed {
                    filled[column.expect("placed implies a column")] = true;
                    continue;
                }
                let (kind, value) = describe(s.value.as_ref());
                field::<StringBuilder>(others, 0).append_value(&s.name);
                field::<StringBuilder>(others, 1).append_value(kind);
                field::<StringBuilder>(others, 2).append_option(value);
                others.append(true);
            }
            other.append(true);
            for b in &mut signal_cols {
                b.finish_row();
            }
        }

        let mut columns: Vec<ArrayRef> = strings.iter_mut().map(|b| b.finish_arc()).collect();
        columns.push(Arc::new(received.finish()));
        columns.push(Arc::new(captured.finish()));
        columns.push(Arc::new(sent.finish()));
        columns.push(Arc::new(seq.finish()));
        columns.push(Arc::new(schema_version.finish()));
        columns.extend(tail_strings.iter_mut().map(|b| b.finish_arc()));
        columns.push(Arc::new(partition.finish()));
        columns.push(Arc::new(offset.finish()));
        columns.push(Arc::new(lat.finish()));
        columns.push(Arc::new(lon.finish()));
        columns.push(Arc::new(accuracy.finish()));
        columns.push(Arc::new(heading.finish()));
        columns.extend(signal_cols.iter_mut().map(SignalBuilder::finish));
        columns.push(Arc::new(other.finish()));
        RecordBatch::try_new(self.schema.clone(), columns)
    }
}

trait FinishArc {
    fn finish_arc(&mut self) -> ArrayRef;
}

impl FinishArc for StringBuilder {
    fn finish_arc(&mut self) -> ArrayRef {
        Arc::new(self.finish())
    }
}

fn field<T: arrow_array::builder::ArrayBuilder>(b: &mut StructBuilder, i: usize) -> &mut T {
    b.field_builder::<T>(i)
        .expect("signals_other struct fields are (utf8, utf8, utf8)")
}

/// The kind label and textual value of a signal that has no typed column.
fn describe(value: Option<&signal::Value>) -> (&'static str, Option<String>) {
    match value {
        Some(signal::Value::F64(v)) => ("f64", Some(v.to_string())),
        Some(signal::Value::I64(v)) => ("i64", Some(v.to_string())),
        Some(signal::Value::Bool(v)) => ("bool", Some(v.to_string())),
        None => ("none", None),
    }
}

/// A typed signal column being filled row by row; a row without the signal is null.
enum SignalBuilder {
    F64(Float64Builder, Option<f64>),
    I64(Int64Builder, Option<i64>),
    Bool(BooleanBuilder, Option<bool>),
}

impl SignalBuilder {
    fn new(kind: SignalKind, n: usize) -> Self {
        match kind {
            SignalKind::F64 => Self::F64(Float64Builder::with_capacity(n), None),
            SignalKind::I64 => Self::I64(Int64Builder::with_capacity(n), None),
            SignalKind::Bool => Self::Bool(BooleanBuilder::with_capacity(n), None),
        }
    }

    /// Takes the value for the current row if it has this column's kind.
    fn try_set(&mut self, value: Option<&signal::Value>) -> bool {
        match (self, value) {
            (Self::F64(_, slot), Some(signal::Value::F64(v))) => *slot = Some(*v),
            (Self::I64(_, slot), Some(signal::Value::I64(v))) => *slot = Some(*v),
            (Self::Bool(_, slot), Some(signal::Value::Bool(v))) => *slot = Some(*v),
            _ => return false,
        }
        true
    }

    fn finish_row(&mut self) {
        match self {
            Self::F64(b, slot) => b.append_option(slot.take()),
            Self::I64(b, slot) => b.append_option(slot.take()),
            Self::Bool(b, slot) => b.append_option(slot.take()),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Self::F64(b, _) => Arc::new(b.finish()),
            Self::I64(b, _) => Arc::new(b.finish()),
            Self::Bool(b, _) => Arc::new(b.finish()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type, TimestampMillisecondType, UInt64Type};
    use arrow_array::{Array, StructArray};
    use fleetgate_proto::{Location, Provenance, Signal, TelemetryEvent};

    fn sig(name: &str, v: Option<signal::Value>) -> Signal {
        Signal {
            name: name.into(),
            value: v,
        }
    }

    fn row(seq: u64, signals: Vec<Signal>, location: Option<Location>) -> Row {
        Row {
            envelope: TelemetryEnvelope {
                event: Some(TelemetryEvent {
                    seq,
                    captured_at_ms: 1_000,
                    signals,
                    location,
                }),
                provenance: Some(Provenance {
                    device_id: format!("car-{seq}"),
                    fleet_id: "fleet-a".into(),
                    cert_sha256: "ab".repeat(32),
                    received_at_ms: 1_700_000_000_123,
                    captured_at_ms: 1_000,
                    sent_at_ms: 2_000,
                    seq,
                    schema_version: 1,
                    transport: "quic".into(),
                    ..Default::default()
                }),
            },
            partition: 2,
            offset: 40 + seq as i64,
        }
    }

    fn col<'a>(b: &'a RecordBatch, name: &str) -> &'a ArrayRef {
        b.column_by_name(name)
            .unwrap_or_else(|| panic!("column {name}"))
    }

    #[test]
    fn maps_provenance_coordinates_signals_and_location() {
        let schema = EventSchema::new(default_signal_columns()).unwrap();
        let rows = vec![
            row(
                1,
                vec![
                    sig("speed_kph", Some(signal::Value::F64(88.5))),
                    sig("engine_rpm", Some(signal::Value::I64(2100))),
                    sig("charging", Some(signal::Value::Bool(true))),
                ],
                Some(Location {
                    latitude_deg: 48.1,
                    longitude_deg: 11.5,
                    accuracy_m: 3.0,
                    heading_deg: 90.0,
                }),
            ),
            row(2, vec![], None),
        ];
        let b = schema.to_batch("telemetry.events.v1", &rows).unwrap();
        assert_eq!(b.num_rows(), 2);
        assert_eq!(b.schema(), schema.arrow());
        assert_eq!(col(&b, "device_id").as_string::<i32>().value(1), "car-2");
        assert_eq!(col(&b, "transport").as_string::<i32>().value(0), "quic");
        assert_eq!(
            col(&b, "kafka_topic").as_string::<i32>().value(0),
            "telemetry.events.v1"
        );
        assert_eq!(
            col(&b, "received_at")
                .as_primitive::<TimestampMillisecondType>()
                .value(0),
            1_700_000_000_123
        );
        assert_eq!(col(&b, "seq").as_primitive::<UInt64Type>().value(1), 2);
        assert_eq!(
            col(&b, "kafka_offset").as_primitive::<Int64Type>().value(1),
            42
        );
        let speed = col(&b, "speed_kph").as_primitive::<Float64Type>();
        assert_eq!(speed.value(0), 88.5);
        assert!(speed.is_null(1));
        assert_eq!(
            col(&b, "engine_rpm").as_primitive::<Int64Type>().value(0),
            2100
        );
        assert!(col(&b, "charging").as_boolean().value(0));
        assert!(col(&b, "soc_pct").is_null(0));
        let lat = col(&b, "latitude_deg").as_primitive::<Float64Type>();
        assert_eq!(lat.value(0), 48.1);
        assert!(lat.is_null(1));
        assert_eq!(col(&b, "signals_other").as_list::<i32>().value(0).len(), 0);
    }

    #[test]
    fn signals_without_a_column_land_in_signals_other() {
        let schema = EventSchema::new(default_signal_columns()).unwrap();
        let rows = vec![row(
            1,
            vec![
                sig("speed_kph", Some(signal::Value::F64(10.0))),
                // Repeated name: the first fills the column, the second is kept aside.
                sig("speed_kph", Some(signal::Value::F64(11.0))),
                // Catalog name with the wrong kind.
                sig("engine_rpm", Some(signal::Value::F64(1.5))),
                sig("cabin_co2_ppm", Some(signal::Value::I64(800))),
                sig("mystery", None),
            ],
            None,
        )];
        let b = schema.to_batch("t", &rows).unwrap();
        assert_eq!(
            col(&b, "speed_kph").as_primitive::<Float64Type>().value(0),
            10.0
        );
        assert!(col(&b, "engine_rpm").is_null(0));
        let list = col(&b, "signals_other").as_list::<i32>().value(0);
        let entries: &StructArray = list.as_struct();
        let text = |i: usize| entries.column(i).as_string::<i32>().clone();
        let (names, kinds, values) = (text(0), text(1), text(2));
        let got: Vec<(String, String, Option<String>)> = (0..entries.len())
            .map(|i| {
                (
                    names.value(i).to_owned(),
                    kinds.value(i).to_owned(),
                    (!values.is_null(i)).then(|| values.value(i).to_owned()),
                )
            })
            .collect();
        let s = |v: &str| v.to_owned();
        assert_eq!(
            got,
            vec![
                (s("speed_kph"), s("f64"), Some(s("11"))),
                (s("engine_rpm"), s("f64"), Some(s("1.5"))),
                (s("cabin_co2_ppm"), s("i64"), Some(s("800"))),
                (s("mystery"), s("none"), None),
            ]
        );
    }

    #[test]
    fn signal_specs_parse_and_bad_columns_are_refused() {
        assert_eq!(
            "cabin_co2_ppm:i64".parse::<SignalColumn>().unwrap(),
            SignalColumn::new("cabin_co2_ppm", SignalKind::I64)
        );
        assert!("speed".parse::<SignalColumn>().is_err());
        assert!("speed:f32".parse::<SignalColumn>().is_err());
        let bad = |s: &str| EventSchema::new(vec![s.parse().unwrap()]).unwrap_err();
        assert_eq!(bad("seq:i64"), SchemaError::DuplicateColumn("seq".into()));
        assert_eq!(bad("hour:i64"), SchemaError::DuplicateColumn("hour".into()));
        assert_eq!(bad("Speed:f64"), SchemaError::BadSignalName("Speed".into()));
        assert_eq!(bad("a/b:f64"), SchemaError::BadSignalName("a/b".into()));
        let dup = EventSchema::new(vec![
            SignalColumn::new("x", SignalKind::F64),
            SignalColumn::new("x", SignalKind::I64),
        ]);
        assert_eq!(dup.unwrap_err(), SchemaError::DuplicateColumn("x".into()));
    }

    #[test]
    fn custom_catalog_changes_the_columns() {
        let schema = EventSchema::new(vec![SignalColumn::new("x", SignalKind::Bool)]).unwrap();
        let arrow = schema.arrow();
        assert!(arrow.field_with_name("x").is_ok());
        assert!(arrow.field_with_name("speed_kph").is_err());
        let b = schema
            .to_batch(
                "t",
                &[row(
                    1,
                    vec![sig("speed_kph", Some(signal::Value::F64(1.0)))],
                    None,
                )],
            )
            .unwrap();
        assert_eq!(col(&b, "signals_other").as_list::<i32>().value(0).len(), 1);
    }
}
