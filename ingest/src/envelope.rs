//! Turns accepted events and rejects into Kafka records carrying full provenance, both
//! inside the protobuf value (the record of truth) and as headers (for routing).

use std::sync::Arc;

use fleetgate_proto::{DeviceState, Provenance, RejectRecord, TelemetryEvent};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, int64, message, uint64};
use prost::encoding::{key_len, WireType};
use prost::Message;

use crate::connection::{ConnectionContext, SessionState};
use crate::pipeline::Refusal;

/// Version of this ingest build, stamped on every record.
pub const INGEST_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Which configured topic a record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    Events,
    Rejected,
    DeviceState,
    /// Accepted events of quarantined devices (forensics, not the main stream).
    Quarantined,
}

/// A record ready for the producer. Key = device id, so per-device order holds.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub topic: TopicKind,
    pub key: String,
    pub headers: Headers,
    pub payload: Vec<u8>,
}

/// Record headers: the ones every record of a batch shares (built once per batch)
/// followed by the record's own.
#[derive(Debug, Clone, Default)]
pub struct Headers {
    shared: Option<Arc<[(&'static str, String)]>>,
    own: Vec<(&'static str, String)>,
}

impl Headers {
    pub fn iter(&self) -> impl Iterator<Item = &(&'static str, String)> {
        self.shared.iter().flat_map(|s| s.iter()).chain(&self.own)
    }

    pub fn len(&self) -> usize {
        self.shared.as_ref().map_or(0, |s| s.len()) + self.own.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn push(&mut self, header: (&'static str, String)) {
        self.own.push(header);
    }

    /// The value of the first header named `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// What every event record of one batch shares, prepared once: the batch provenance
/// (already encoded) and the batch-constant headers. Per event only the event, its
/// seq and captured-at are encoded, so the cost per event does not grow with the
/// provenance.
#[derive(Debug, Clone)]
pub struct BatchRecords {
    base: Provenance,
    provenance: Vec<u8>,
    headers: Arc<[(&'static str, String)]>,
}

impl BatchRecords {
    pub fn new(base: Provenance) -> Self {
        // `seq` and `captured_at_ms` are 0 in the base, so proto3 leaves them out here
        // and each event appends its own.
        let provenance = base.encode_to_vec();
        let headers = batch_headers(&base).into();
        Self {
            base,
            provenance,
            headers,
        }
    }

    pub fn base(&self) -> &Provenance {
        &self.base
    }

    /// The `telemetry.events.v1` record for an accepted event: the bytes of a
    /// `TelemetryEnvelope` whose provenance is the batch's plus the event's seq and
    /// captured-at (protobuf lets fields arrive in any order; decoders merge them).
    pub fn event_record(&self, event: &TelemetryEvent) -> OutRecord {
        let (captured, seq) = (event.captured_at_ms, event.seq);
        let mut prov_len = self.provenance.len();
        if captured != 0 {
            prov_len += int64::encoded_len(9, &captured);
        }
        if seq != 0 {
            prov_len += uint64::encoded_len(11, &seq);
        }
        let total = message::encoded_len(1, event)
            + key_len(2)
            + encoded_len_varint(prov_len as u64)
            + prov_len;
        let mut payload = Vec::with_capacity(total);
        message::encode(1, event, &mut payload);
        encode_key(2, WireType::LengthDelimited, &mut payload);
        encode_varint(prov_len as u64, &mut payload);
        payload.extend_from_slice(&self.provenance);
        if captured != 0 {
            int64::encode(9, &captured, &mut payload);
        }
        if seq != 0 {
            uint64::encode(11, &seq, &mut payload);
        }
        debug_assert_eq!(payload.len(), total);
        OutRecord {
            topic: TopicKind::Events,
            key: self.base.device_id.clone(),
            headers: Headers {
                shared: Some(self.headers.clone()),
                own: vec![
                    ("fleetgate.captured_at_ms", captured.to_string()),
                    ("fleetgate.seq", seq.to_string()),
                ],
            },
            payload,
        }
    }

    /// The record of an accepted event of a quarantined device: the same envelope, on
    /// the quarantine topic, with the decision that diverted it as a header.
    pub fn quarantined_record(&self, event: &TelemetryEvent, decision_id: &str) -> OutRecord {
        let mut record = self.event_record(event);
        record.topic = TopicKind::Quarantined;
        record
            .headers
            .push(("fleetgate.quarantine_decision", decision_id.to_owned()));
        record
    }
}

/// Batch-level provenance; per-event fields are filled in by [`event_record`].
pub fn batch_provenance(
    node_id: &str,
    conn: &ConnectionContext,
    session: &SessionState,
    received_at_ms: i64,
    sent_at_ms: i64,
    schema_version: u32,
) -> Provenance {
    let id = &conn.identity;
    Provenance {
        device_id: id.device_id.to_string(),
        fleet_id: id.fleet_id.to_string(),
        cert_sha256: id.cert_sha256.clone(),
        cert_serial: id.cert_serial.clone(),
        transport: conn.transport.as_str().to_owned(),
        ingest_node: node_id.to_owned(),
        connection_id: conn.connection_id.to_string(),
        received_at_ms,
        captured_at_ms: 0,
        sent_at_ms,
        seq: 0,
        schema_version,
        software_version: session.software_version.clone(),
        vehicle_config_id: session.vehicle_config_id.clone(),
        ingest_version: INGEST_VERSION.to_owned(),
        remote_addr: conn.remote_addr.to_string(),
    }
}

/// The `telemetry.rejected.v1` audit record for a rejected event or batch.
pub fn reject_record(
    base: &Provenance,
    event: Option<&TelemetryEvent>,
    refusal: &Refusal,
    frame_bytes: usize,
) -> OutRecord {
    let mut provenance = base.clone();
    if let Some(e) = event {
        provenance.seq = e.seq;
        provenance.captured_at_ms = e.captured_at_ms;
    }
    let mut headers = batch_headers(&provenance);
    headers.extend([
        (
            "fleetgate.captured_at_ms",
            provenance.captured_at_ms.to_string(),
        ),
        ("fleetgate.seq", provenance.seq.to_string()),
        (
            "fleetgate.reject_reason",
            refusal.reason.as_str().to_owned(),
        ),
    ]);
    let record = RejectRecord {
        reason: refusal.reason.as_str().to_owned(),
        detail: refusal.detail.clone(),
        provenance: Some(provenance),
        frame_bytes: frame_bytes as u64,
        seq: event.map(|e| e.seq),
    };
    OutRecord {
        topic: TopicKind::Rejected,
        key: base.device_id.clone(),
        headers: Headers {
            shared: None,
            own: headers,
        },
        payload: record.encode_to_vec(),
    }
}

/// The headers that are the same for every record of a batch. Header names are part
/// of the public contract (see docs); `captured_at_ms` and `seq` are added per record.
fn batch_headers(p: &Provenance) -> Vec<(&'static str, String)> {
    vec![
        ("fleetgate.device_id", p.device_id.clone()),
        ("fleetgate.fleet_id", p.fleet_id.clone()),
        ("fleetgate.cert_sha256", p.cert_sha256.clone()),
        ("fleetgate.cert_serial", p.cert_serial.clone()),
        ("fleetgate.transport", p.transport.clone()),
        ("fleetgate.ingest_node", p.ingest_node.clone()),
        ("fleetgate.connection_id", p.connection_id.clone()),
        ("fleetgate.received_at_ms", p.received_at_ms.to_string()),
        ("fleetgate.sent_at_ms", p.sent_at_ms.to_string()),
        ("fleetgate.schema_version", p.schema_version.to_string()),
        ("fleetgate.software_version", p.software_version.clone()),
        ("fleetgate.vehicle_config_id", p.vehicle_config_id.clone()),
        ("fleetgate.ingest_version", p.ingest_version.clone()),
    ]
}

/// The `fleet.device-state.v1` record: a device's highest seq, the seqs below it not
/// known to be stored, and which of those are still being delivered.
pub fn device_state_record(
    base: &Provenance,
    highest_seq: u64,
    unstored_seqs: Vec<u64>,
    pending_seqs: Vec<u64>,
    now_ms: i64,
) -> OutRecord {
    let state = DeviceState {
        fleet_id: base.fleet_id.clone(),
        device_id: base.device_id.clone(),
        highest_seq,
        updated_at_ms: now_ms,
        ingest_node: base.ingest_node.clone(),
        unstored_seqs,
        pending_seqs,
    };
    OutRecord {
        topic: TopicKind::DeviceState,
        key: format!("{}/{}", base.fleet_id, base.device_id),
        headers: Headers::default(),
        payload: state.encode_to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate_proto::{signal::Value, Location, Signal, TelemetryEnvelope};
    use proptest::prelude::*;

    fn base() -> Provenance {
        Provenance {
            device_id: "car-1".into(),
            fleet_id: "fleet-a".into(),
            cert_sha256: "ab".repeat(32),
            cert_serial: "01f3".into(),
            transport: "quic".into(),
            ingest_node: "node-1".into(),
            connection_id: "node-1-quic-7".into(),
            received_at_ms: 1_700_000_000_123,
            sent_at_ms: 1_700_000_000_100,
            schema_version: 1,
            software_version: "fw-2".into(),
            vehicle_config_id: "cfg".into(),
            ingest_version: INGEST_VERSION.into(),
            remote_addr: "127.0.0.1:4000".into(),
            ..Default::default()
        }
    }

    proptest! {
        // The per-batch encoding decodes to exactly the envelope a full per-event
        // encoding would produce, for any seq, time and signal values (zeros included).
        #[test]
        fn event_records_decode_to_the_full_envelope(
            seq in prop_oneof![Just(0u64), any::<u64>()],
            captured in prop_oneof![Just(0i64), any::<i64>()],
            speed in any::<f64>().prop_filter("comparable", |v| !v.is_nan()),
            with_location in any::<bool>(),
        ) {
            let event = TelemetryEvent {
                seq,
                captured_at_ms: captured,
                signals: vec![Signal { name: "speed_kph".into(), value: Some(Value::F64(speed)) }],
                location: with_location.then(|| Location { latitude_deg: 1.5, longitude_deg: -2.0, accuracy_m: 3.0, heading_deg: 4.0 }),
            };
            let records = BatchRecords::new(base());
            let record = records.event_record(&event);
            let decoded = TelemetryEnvelope::decode(record.payload.as_slice()).unwrap();
            let mut provenance = base();
            provenance.seq = seq;
            provenance.captured_at_ms = captured;
            let expected = TelemetryEnvelope { event: Some(event), provenance: Some(provenance) };
            prop_assert_eq!(decoded, expected);
            let (seq_text, captured_text) = (seq.to_string(), captured.to_string());
            prop_assert_eq!(record.headers.get("fleetgate.seq"), Some(seq_text.as_str()));
            prop_assert_eq!(record.headers.get("fleetgate.captured_at_ms"), Some(captured_text.as_str()));
            prop_assert_eq!(record.headers.get("fleetgate.device_id"), Some("car-1"));
            prop_assert_eq!(record.headers.len(), 15);
        }
    }
}
