//! Every observable thing ingest does, as one function that emits its metric (and log
//! line where useful), so names and labels cannot drift between call sites.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::connection::{ConnectionContext, Transport};
use crate::live::CloseReason;
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
pub const CRL_RELOADS: &str = "fleetgate_crl_reloads_total";
pub const CRL_REVOKED: &str = "fleetgate_crl_revoked_certificates";
pub const CONNECTIONS_CLOSED: &str = "fleetgate_connections_closed_total";
pub const CLONED_CREDENTIALS: &str = "fleetgate_cloned_credential_total";
pub const CLOCK_OFFSET: &str = "fleetgate_device_clock_offset_seconds";
pub const SEQUENCE_GAPS: &str = "fleetgate_sequence_gaps_total";
pub const DEVICES_TRACKED: &str = "fleetgate_devices_tracked";
pub const RATE_LIMITED: &str = "fleetgate_rate_limited_total";
pub const OVERLOAD_SHED: &str = "fleetgate_overload_shed_total";
pub const EVENTS_IN_FLIGHT: &str = "fleetgate_events_in_flight";
pub const SERVER_CERT_EXPIRY: &str = "fleetgate_server_cert_expiry_seconds";
pub const CONNECTIONS_REFUSED: &str = "fleetgate_connections_refused_total";
pub const QUOTA_RELOADS: &str = "fleetgate_quota_reloads_total";
pub const QUARANTINED_DEVICES: &str = "fleetgate_quarantined_devices";
pub const QUARANTINE_ENFORCEMENT: &str = "fleetgate_quarantine_enforcement_latency_seconds";
pub const DEVICE_STATE_FOLLOWED: &str = "fleetgate_device_state_records_followed_total";
pub const DEVICE_STATE_DOUBTS_EXPIRED: &str = "fleetgate_device_state_doubts_expired_total";

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

/// The CRL in force now revokes `serials` certificates.
pub fn crl_loaded(serials: usize) {
    counter!(CRL_RELOADS, "outcome" => "ok").increment(1);
    gauge!(CRL_REVOKED).set(serials as f64);
}

/// A changed CRL file could not be used; the previous list stays in force.
pub fn crl_reload_failed(error: &str) {
    counter!(CRL_RELOADS, "outcome" => "error").increment(1);
    tracing::error!(error, "CRL reload failed; previous revocation list kept");
}

/// Ingest closed a connection on purpose (`cert_revoked`, `cloned_credential`).
pub fn connection_closed_by_ingest(ctx: &ConnectionContext, reason: CloseReason) {
    counter!(CONNECTIONS_CLOSED, "transport" => ctx.transport.as_str(), "reason" => reason.as_str())
        .increment(1);
    tracing::warn!(
        device = %ctx.identity.device_id,
        fleet = %ctx.identity.fleet_id,
        connection = %ctx.connection_id,
        remote = %ctx.remote_addr,
        reason = reason.as_str(),
        "connection closed by ingest"
    );
}

/// The same identity connected while already connected; `action` is what the policy did.
pub fn cloned_credential(ctx: &ConnectionContext, action: &'static str, detail: &str) {
    counter!(CLONED_CREDENTIALS, "transport" => ctx.transport.as_str(), "action" => action)
        .increment(1);
    tracing::warn!(
        device = %ctx.identity.device_id,
        fleet = %ctx.identity.fleet_id,
        action,
        detail,
        "cloned credential suspected"
    );
}

/// A device's smoothed clock offset (server minus device), observed once per batch.
pub fn clock_offset(offset_ms: f64) {
    histogram!(CLOCK_OFFSET).record(offset_ms.abs() / 1000.0);
}

/// Sequence numbers skipped when devices' windows advanced.
pub fn sequence_gaps(n: u64) {
    counter!(SEQUENCE_GAPS).increment(n);
}

pub fn devices_tracked(active: usize, dormant: usize) {
    gauge!(DEVICES_TRACKED, "state" => "active").set(active as f64);
    gauge!(DEVICES_TRACKED, "state" => "dormant").set(dormant as f64);
}

/// A device-state record written by another node was folded into this node's windows.
pub fn device_state_followed() {
    counter!(DEVICE_STATE_FOLLOWED).increment(1);
}

/// Seqs another node left pending were accepted again because it never settled them.
pub fn device_state_doubts_expired(n: usize) {
    counter!(DEVICE_STATE_DOUBTS_EXPIRED).increment(n as u64);
}

/// A batch refused by a rate limit (`reason`), labelled by fleet (bounded: fleets are
/// few) and dimension (`events` or `bytes`); devices go to the top-offenders log.
pub fn rate_limited(reason: RejectReason, fleet: &str, dimension: &'static str) {
    counter!(RATE_LIMITED, "reason" => reason.as_str(), "fleet" => fleet.to_owned(), "dimension" => dimension)
        .increment(1);
}

/// Registers the per-fleet series at zero the first time a fleet connects, so rates
/// and alerts have a baseline before the first refusal (bounded: fleets are few).
pub fn fleet_seen(fleet: &str) {
    static SEEN: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if seen.contains(fleet) {
        return;
    }
    seen.insert(fleet.to_owned());
    for reason in [
        RejectReason::RateLimitedDevice,
        RejectReason::RateLimitedFleet,
        RejectReason::RateLimitedGlobal,
    ] {
        for dimension in ["events", "bytes"] {
            counter!(RATE_LIMITED, "reason" => reason.as_str(), "fleet" => fleet.to_owned(), "dimension" => dimension)
                .absolute(0);
        }
    }
}

/// A batch refused as `overloaded`; `cause` says which bound was hit.
pub fn overload_shed(cause: &'static str) {
    counter!(OVERLOAD_SHED, "cause" => cause).increment(1);
}

pub fn events_in_flight(n: u64) {
    gauge!(EVENTS_IN_FLIGHT).set(n as f64);
}

/// The server certificate's notAfter, as Unix seconds (alerts subtract `time()`).
pub fn server_cert_expiry(not_after_unix: i64) {
    gauge!(SERVER_CERT_EXPIRY).set(not_after_unix as f64);
}

/// A connection refused by a connection limit before it was served.
pub fn connection_refused(transport: Transport, code: &'static str) {
    counter!(CONNECTIONS_REFUSED, "transport" => transport.as_str(), "reason" => code).increment(1);
}

pub fn quota_reloaded(ok: bool) {
    counter!(QUOTA_RELOADS, "outcome" => if ok { "ok" } else { "error" }).increment(1);
}

pub fn quarantined_devices(n: usize) {
    gauge!(QUARANTINED_DEVICES).set(n as f64);
}

/// A quarantine took effect on this node `latency_ms` after its first offending event.
pub fn quarantine_enforced(latency_ms: i64) {
    histogram!(QUARANTINE_ENFORCEMENT).record(latency_ms as f64 / 1000.0);
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
    for t in [Transport::Grpc, Transport::Quic] {
        for r in [CloseReason::CertRevoked, CloseReason::ClonedCredential] {
            counter!(CONNECTIONS_CLOSED, "transport" => t.as_str(), "reason" => r.as_str())
                .absolute(0);
        }
        for action in ["closed_older", "refused_new"] {
            counter!(CLONED_CREDENTIALS, "transport" => t.as_str(), "action" => action).absolute(0);
        }
    }
    counter!(SEQUENCE_GAPS).absolute(0);
    for state in ["active", "dormant"] {
        gauge!(DEVICES_TRACKED, "state" => state).set(0.0);
    }
    gauge!(EVENTS_IN_FLIGHT).set(0.0);
    gauge!(QUARANTINED_DEVICES).set(0.0);
    // Registered now so the series exists (count 0) before the first quarantine.
    let _ = histogram!(QUARANTINE_ENFORCEMENT);
    for cause in [
        "in_flight_full",
        "delivery_latency",
        "too_many_batches_in_flight",
    ] {
        counter!(OVERLOAD_SHED, "cause" => cause).absolute(0);
    }
    for outcome in ["ok", "error"] {
        counter!(QUOTA_RELOADS, "outcome" => outcome).absolute(0);
    }
    counter!(DEVICE_STATE_FOLLOWED).absolute(0);
    counter!(DEVICE_STATE_DOUBTS_EXPIRED).absolute(0);
    for outcome in ["ok", "error"] {
        counter!(CRL_RELOADS, "outcome" => outcome).absolute(0);
    }
}
