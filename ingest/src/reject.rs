//! The closed set of reasons an event or batch is not accepted. One code per reject,
//! used identically in the ack, the `telemetry.rejected.v1` record, the metric label
//! and the log line.

use fleetgate_proto::Verdict;

/// Why ingest did not accept an event or a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    FrameTooLarge,
    DecodeError,
    SchemaUnknown,
    TooManyEvents,
    FieldOutOfRange,
    SignalUnknown,
    IdentityMismatch,
    /// Device timestamp older than the freshness window allows.
    Stale,
    /// Device timestamp further ahead than the freshness window allows.
    FromFuture,
    /// Seq already delivered: acknowledged as accepted, never published twice.
    Duplicate,
    /// Seq reserved by a delivery still under way; retry later.
    DuplicateInFlight,
    /// Seq below the anti-replay window: indistinguishable from a replay.
    ReplayOutsideWindow,
    /// Kafka's local queue is full; nothing was enqueued for this event.
    Overloaded,
    /// Kafka did not acknowledge the record in time; the device should retry.
    DeliveryFailed,
    /// The device's own events/s or bytes/s quota is spent; retry after the hint.
    RateLimitedDevice,
    /// The device's fleet quota is spent.
    RateLimitedFleet,
    /// The node-wide quota is spent.
    RateLimitedGlobal,
    /// The device is quarantined: the event was stored on the quarantine topic, not
    /// the main one (acknowledged, so the device does not retry forever).
    Quarantined,
    /// A connection-level audit: the same certificate connected twice at once.
    ClonedCredential,
    /// A connection-level audit: an open connection's certificate was revoked.
    CertRevoked,
}

impl RejectReason {
    pub const ALL: [RejectReason; 20] = [
        Self::FrameTooLarge,
        Self::DecodeError,
        Self::SchemaUnknown,
        Self::TooManyEvents,
        Self::FieldOutOfRange,
        Self::SignalUnknown,
        Self::IdentityMismatch,
        Self::Stale,
        Self::FromFuture,
        Self::Duplicate,
        Self::DuplicateInFlight,
        Self::ReplayOutsideWindow,
        Self::Overloaded,
        Self::DeliveryFailed,
        Self::RateLimitedDevice,
        Self::RateLimitedFleet,
        Self::RateLimitedGlobal,
        Self::Quarantined,
        Self::ClonedCredential,
        Self::CertRevoked,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::FrameTooLarge => "frame_too_large",
            Self::DecodeError => "decode_error",
            Self::SchemaUnknown => "schema_unknown",
            Self::TooManyEvents => "too_many_events",
            Self::FieldOutOfRange => "field_out_of_range",
            Self::SignalUnknown => "signal_unknown",
            Self::IdentityMismatch => "identity_mismatch",
            Self::Stale => "stale",
            Self::FromFuture => "from_future",
            Self::Duplicate => "duplicate",
            Self::DuplicateInFlight => "duplicate_in_flight",
            Self::ReplayOutsideWindow => "replay_outside_window",
            Self::Overloaded => "overloaded",
            Self::DeliveryFailed => "delivery_failed",
            Self::RateLimitedDevice => "rate_limited_device",
            Self::RateLimitedFleet => "rate_limited_fleet",
            Self::RateLimitedGlobal => "rate_limited_global",
            Self::Quarantined => "quarantined",
            Self::ClonedCredential => "cloned_credential",
            Self::CertRevoked => "cert_revoked",
        }
    }

    /// Whether the device should send the same event again later.
    pub const fn verdict(self) -> Verdict {
        match self {
            Self::Duplicate | Self::Quarantined => Verdict::Accepted,
            Self::Overloaded
            | Self::DeliveryFailed
            | Self::DuplicateInFlight
            | Self::RateLimitedDevice
            | Self::RateLimitedFleet
            | Self::RateLimitedGlobal => Verdict::Retry,
            _ => Verdict::Rejected,
        }
    }

    /// Whether an audit record goes to `telemetry.rejected.v1`. Retryable outcomes are
    /// not rejects of the content, and writing them while Kafka is failing cannot work.
    pub const fn audited(self) -> bool {
        matches!(self.verdict(), Verdict::Rejected)
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for r in RejectReason::ALL {
            let s = r.as_str();
            assert!(
                s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{s}"
            );
            assert!(seen.insert(s), "duplicate code {s}");
        }
    }
}
