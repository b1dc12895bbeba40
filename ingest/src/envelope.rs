//! Turns accepted events and rejects into Kafka records carrying full provenance, both
//! inside the protobuf value (the record of truth) and as headers (for routing).

use fleetgate_proto::{DeviceState, Provenance, RejectRecord, TelemetryEnvelope, TelemetryEvent};
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
    pub headers: Vec<(&'static str, String)>,
    pub payload: Vec<u8>,
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

/// The `telemetry.events.v1` record for an accepted event.
pub fn event_record(base: &Provenance, event: TelemetryEvent) -> OutRecord {
    let mut provenance = base.clone();
    provenance.seq = event.seq;
    provenance.captured_at_ms = event.captured_at_ms;
    let headers = headers(&provenance, None);
    let envelope = TelemetryEnvelope {
        event: Some(event),
        provenance: Some(provenance),
    };
    OutRecord {
        topic: TopicKind::Events,
        key: base.device_id.clone(),
        headers,
        payload: envelope.encode_to_vec(),
    }
}

/// The record of an accepted event of a quarantined device: the same envelope, on the
/// quarantine topic, with the decision that diverted it as a header.
pub fn quarantined_record(
    base: &Provenance,
    event: TelemetryEvent,
    decision_id: &str,
) -> OutRecord {
    let mut record = event_record(base, event);
    record.topic = TopicKind::Quarantined;
    record
        .headers
        .push(("fleetgate.quarantine_decision", decision_id.to_owned()));
    record
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
    let headers = headers(&provenance, Some(refusal.reason.as_str()));
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
        headers,
        payload: record.encode_to_vec(),
    }
}

/// Header names are part of the public contract (see docs).
fn headers(p: &Provenance, reason: Option<&str>) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("fleetgate.device_id", p.device_id.clone()),
        ("fleetgate.fleet_id", p.fleet_id.clone()),
        ("fleetgate.cert_sha256", p.cert_sha256.clone()),
        ("fleetgate.cert_serial", p.cert_serial.clone()),
        ("fleetgate.transport", p.transport.clone()),
        ("fleetgate.ingest_node", p.ingest_node.clone()),
        ("fleetgate.connection_id", p.connection_id.clone()),
        ("fleetgate.received_at_ms", p.received_at_ms.to_string()),
        ("fleetgate.captured_at_ms", p.captured_at_ms.to_string()),
        ("fleetgate.sent_at_ms", p.sent_at_ms.to_string()),
        ("fleetgate.seq", p.seq.to_string()),
        ("fleetgate.schema_version", p.schema_version.to_string()),
        ("fleetgate.software_version", p.software_version.clone()),
        ("fleetgate.vehicle_config_id", p.vehicle_config_id.clone()),
        ("fleetgate.ingest_version", p.ingest_version.clone()),
    ];
    if let Some(r) = reason {
        h.push(("fleetgate.reject_reason", r.to_owned()));
    }
    h
}

/// The `fleet.device-state.v1` record: a device's highest stored seq.
pub fn device_state_record(
    base: &Provenance,
    highest_seq: u64,
    unstored_seqs: Vec<u64>,
    now_ms: i64,
) -> OutRecord {
    let state = DeviceState {
        fleet_id: base.fleet_id.clone(),
        device_id: base.device_id.clone(),
        highest_seq,
        updated_at_ms: now_ms,
        ingest_node: base.ingest_node.clone(),
        unstored_seqs,
    };
    OutRecord {
        topic: TopicKind::DeviceState,
        key: format!("{}/{}", base.fleet_id, base.device_id),
        headers: Vec::new(),
        payload: state.encode_to_vec(),
    }
}
