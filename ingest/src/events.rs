//! Every observable thing ingest does, as one function that emits its metric (and log
//! line where useful), so names and labels cannot drift between call sites.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::connection::Transport;
use crate::quic::StreamFailure;
use crate::reject::RejectReason;

pub const EVENTS_ACCEPTED: &str = "fleetgate_events_accepted_total";
pub const EVENTS_REJECTED: &str = "fleetgate_events_rejected_total";
pub const BATCHES_REJECTED: &str = "fleetgate_batches_rejected_total";
pub const KAFKA_ENQUEUE_FAILURES: &str = "fleetgate_kafka_enqueue_failures_total";
pub const BATCHES: &str = "fleetgate_batches_total";
pub const BATCH_LATENCY: &str = "fleetgate_batch_ack_latency_seconds";
pub const KAFKA_DELIVERY_LATENCY: &str = "fleetgate_kafka_delivery_latency_seconds";
pub const KAFKA_DELIVERY_FAILURES: &str = "fleetgate_kafka_delivery_failures_total";
pub const AUDIT_RECORDS_FAILED: &str = "fleetgate_audit_records_failed_total";
pub const HANDSHAKES: &str = "fleetgate_handshakes_total";
pub const CONNECTIONS_OPEN: &str = "fleetgate_connections_open";
pub const BYTES_RECEIVED: &str = "fleetgate_bytes_received_total";
pub const KAFKA_QUEUE: &str = "fleetgate_kafka_producer_queue_messages";
pub const KAFKA_PRODUCER_REPLACED: &str = "fleetgate_kafka_producer_replaced_total";
pub const QUIC_STREAMS_ACKED: &str = "fleetgate_quic_streams_acked_total";
pub const QUIC_STREAM_ERRORS: &str = "fleetgate_quic_stream_errors_total";
pub const QUIC_CONNECTIONS_REFUSED: &str = "fleetgate_quic_connections_refused_total";
pub const DEVICE_STATE_WRITE_FAILURES: &str = "fleetgate_device_state_write_failures_total";
pub const DEVICE_STATE_RESTORED: &str = "fleetgate_device_state_records_restored";
pub const BUILD_INFO: &str = "fleetgate_build_info";

/// Histogram buckets for latencies, in seconds (100 µs .. 30 s).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

pub fn events_accepted(transport: Transport, n: u64) {
    counter!(EVENTS_ACCEPTED, "transport" => transport.as_str()).increment(n);
}

pub fn event_rejected(transport: Transport, reason: RejectReason, n: u64) {
    counter!(EVENTS_REJECTED, "transport" => transport.as_str(), "reason" => reason.as_str())
        .increment(n);
}

/// A whole batch refused before it could be split into events.
pub fn batch_rejected(transport: Transport, reason: RejectReason) {
    counter!(BATCHES_REJECTED, "transport" => transport.as_str(), "reason" => reason.as_str())
        .increment(1);
}

pub fn kafka_enqueue_failed(error: &crate::publish::EnqueueError) {
    counter!(KAFKA_ENQUEUE_FAILURES).increment(1);
    tracing::warn!(%error, "record not enqueued");
}

/// Outcome label: `accepted` (all events), `partial`, `rejected` or `retry`.
pub fn batch_done(transport: Transport, outcome: &'static str, latency: Duration, bytes: usize) {
    counter!(BATCHES, "transport" => transport.as_str(), "outcome" => outcome).increment(1);
    counter!(BYTES_RECEIVED, "transport" => transport.as_str()).increment(bytes as u64);
    histogram!(BATCH_LATENCY, "transport" => transport.as_str()).record(latency.as_secs_f64());
}

pub fn kafka_delivered(latency: Duration) {
    histogram!(KAFKA_DELIVERY_LATENCY).record(latency.as_secs_f64());
}

pub fn kafka_delivery_failed(error: &str) {
    counter!(KAFKA_DELIVERY_FAILURES).increment(1);
    tracing::warn!(error, "kafka delivery failed");
}

/// The producer hit a fatal error and was replaced by a fresh one.
pub fn kafka_producer_replaced(error: &str) {
    counter!(KAFKA_PRODUCER_REPLACED).increment(1);
    tracing::error!(error, "kafka producer fatally failed; replaced");
}

/// A device's window could not be persisted: replay protection across restarts is
/// weaker for it until its next batch.
pub fn device_state_write_failed(error: &str) {
    counter!(DEVICE_STATE_WRITE_FAILURES).increment(1);
    tracing::warn!(error, "device state not persisted");
}

pub fn device_state_restored(records: usize) {
    gauge!(DEVICE_STATE_RESTORED).set(records as f64);
    tracing::info!(records, "device state restored");
}

pub fn audit_record_failed(reason: RejectReason, error: &str) {
    counter!(AUDIT_RECORDS_FAILED).increment(1);
    tracing::warn!(
        reason = reason.as_str(),
        error,
        "audit record not delivered"
    );
}

/// Handshake outcome: `ok` or a refusal label (`no_client_cert`, `cert_expired`, ...).
pub fn handshake(transport: Transport, outcome: &str) {
    counter!(HANDSHAKES, "transport" => transport.as_str(), "outcome" => outcome.to_owned())
        .increment(1);
}

pub fn connection_opened(transport: Transport) {
    gauge!(CONNECTIONS_OPEN, "transport" => transport.as_str()).increment(1.0);
}

pub fn connection_closed(transport: Transport) {
    gauge!(CONNECTIONS_OPEN, "transport" => transport.as_str()).decrement(1.0);
}

/// A QUIC stream carried one batch and its ack reached the device's stream.
pub fn quic_stream_acked() {
    counter!(QUIC_STREAMS_ACKED).increment(1);
}

/// A QUIC stream ended abnormally (timeout, reset, truncation, oversize, ...).
pub fn quic_stream_failed(kind: StreamFailure) {
    counter!(QUIC_STREAM_ERRORS, "kind" => kind.as_str()).increment(1);
}

/// A QUIC connection attempt refused before its handshake (e.g. `max_connections`).
pub fn quic_connection_refused(reason: &'static str) {
    counter!(QUIC_CONNECTIONS_REFUSED, "reason" => reason).increment(1);
    tracing::warn!(reason, "quic connection refused");
}

pub fn kafka_queue(depth: i32) {
    gauge!(KAFKA_QUEUE).set(depth as f64);
}

/// Registers every series at zero so dashboards and alerts see them before traffic.
pub fn describe(node_id: &str) {
    gauge!(BUILD_INFO, "version" => crate::envelope::INGEST_VERSION, "node" => node_id.to_owned())
        .set(1.0);
    for t in [Transport::Grpc, Transport::Quic] {
        counter!(EVENTS_ACCEPTED, "transport" => t.as_str()).absolute(0);
        for r in RejectReason::ALL {
            counter!(EVENTS_REJECTED, "transport" => t.as_str(), "reason" => r.as_str())
                .absolute(0);
            counter!(BATCHES_REJECTED, "transport" => t.as_str(), "reason" => r.as_str())
                .absolute(0);
        }
        gauge!(CONNECTIONS_OPEN, "transport" => t.as_str()).set(0.0);
    }
    counter!(KAFKA_DELIVERY_FAILURES).absolute(0);
    counter!(DEVICE_STATE_WRITE_FAILURES).absolute(0);
    counter!(KAFKA_ENQUEUE_FAILURES).absolute(0);
    counter!(KAFKA_PRODUCER_REPLACED).absolute(0);
    counter!(AUDIT_RECORDS_FAILED).absolute(0);
    counter!(QUIC_STREAMS_ACKED).absolute(0);
    for kind in StreamFailure::ALL {
        counter!(QUIC_STREAM_ERRORS, "kind" => kind.as_str()).absolute(0);
    }
    counter!(QUIC_CONNECTIONS_REFUSED, "reason" => "max_connections").absolute(0);
}
