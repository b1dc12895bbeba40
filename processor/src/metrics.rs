//! Every observable thing the processor does, as one function that emits its metric
//! (and log line where useful), so names and labels cannot drift between call sites.

use ::metrics::{counter, describe_counter, describe_gauge, gauge};

use crate::detect::analyzer::InputKind;
use crate::detect::DetectorKind;

pub const RECORDS: &str = "fleetgate_processor_records_total";
pub const DUPLICATES: &str = "fleetgate_processor_duplicates_dropped_total";
pub const UNDECODABLE: &str = "fleetgate_processor_undecodable_total";
pub const FINDINGS: &str = "fleetgate_processor_findings_total";
pub const FINDINGS_SUPPRESSED: &str = "fleetgate_processor_findings_suppressed_total";
pub const DECISIONS: &str = "fleetgate_processor_quarantine_decisions_total";
pub const OUTPUT_FAILURES: &str = "fleetgate_processor_output_delivery_failures_total";
pub const COMMITS: &str = "fleetgate_processor_commits_total";
pub const COMMIT_FAILURES: &str = "fleetgate_processor_commit_failures_total";
pub const CONSUMER_LAG: &str = "fleetgate_processor_consumer_lag";
pub const ASSIGNED: &str = "fleetgate_processor_assigned_partitions";
pub const IN_FLIGHT: &str = "fleetgate_processor_outputs_in_flight";
pub const TRACKED: &str = "fleetgate_processor_tracked_devices";

/// Registers descriptions and zeroes the per-detector counters so dashboards see
/// every series from the start.
pub fn describe() {
    describe_counter!(RECORDS, "Input records read, by input (events, rejected).");
    describe_counter!(
        DUPLICATES,
        "Events dropped as redelivered (same device and seq) or too old to tell."
    );
    describe_counter!(
        UNDECODABLE,
        "Input records that are not valid records of their topic."
    );
    describe_counter!(FINDINGS, "Findings produced, by detector.");
    describe_counter!(
        FINDINGS_SUPPRESSED,
        "Findings over the per-device publishing limit: weighed by the policy, not published."
    );
    describe_counter!(DECISIONS, "Quarantine decisions produced.");
    describe_counter!(
        OUTPUT_FAILURES,
        "Findings or decisions the broker did not acknowledge."
    );
    describe_counter!(
        COMMITS,
        "Offset commits after all outputs were acknowledged."
    );
    describe_counter!(
        COMMIT_FAILURES,
        "Offset commits the group coordinator refused."
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Messages behind the partition end, per input partition."
    );
    describe_gauge!(ASSIGNED, "Input partitions assigned to this instance.");
    describe_gauge!(IN_FLIGHT, "Outputs produced but not yet acknowledged.");
    describe_gauge!(
        TRACKED,
        "Devices with detector state (largest detector table)."
    );
    for d in DetectorKind::ALL {
        counter!(FINDINGS, "detector" => d.as_str()).absolute(0);
    }
    counter!(DECISIONS).absolute(0);
    counter!(DUPLICATES).absolute(0);
    counter!(OUTPUT_FAILURES).absolute(0);
    counter!(COMMITS).absolute(0);
    counter!(COMMIT_FAILURES).absolute(0);
    for input in [InputKind::Events, InputKind::Rejected] {
        counter!(UNDECODABLE, "input" => input.as_str()).absolute(0);
        counter!(RECORDS, "input" => input.as_str()).absolute(0);
    }
}

pub fn record_read(kind: InputKind) {
    counter!(RECORDS, "input" => kind.as_str()).increment(1);
}

pub fn duplicate_dropped() {
    counter!(DUPLICATES).increment(1);
}

pub fn undecodable(kind: InputKind, topic: &str, partition: i32, offset: i64, why: &str) {
    counter!(UNDECODABLE, "input" => kind.as_str()).increment(1);
    tracing::warn!(topic, partition, offset, why, "skipping undecodable record");
}

pub fn finding(detector: &str, key: &str, summary: &str) {
    counter!(FINDINGS, "detector" => detector.to_owned()).increment(1);
    tracing::info!(detector, key, summary, "finding");
}

pub fn finding_suppressed(detector: &'static str) {
    counter!(FINDINGS_SUPPRESSED, "detector" => detector).increment(1);
}

pub fn decision(key: &str, reason: &str, decision_id: &str) {
    counter!(DECISIONS).increment(1);
    tracing::warn!(key, reason, decision_id, "device quarantined");
}

pub fn output_failed(error: &str) {
    counter!(OUTPUT_FAILURES).increment(1);
    tracing::error!(error, "output not acknowledged");
}

pub fn committed(partitions: usize) {
    counter!(COMMITS).increment(1);
    tracing::debug!(partitions, "offsets committed");
}

pub fn commit_failed(error: &str) {
    counter!(COMMIT_FAILURES).increment(1);
    tracing::warn!(
        error,
        "offset commit failed; input since the last commit may be reprocessed"
    );
}

pub fn consumer_lag(topic: &str, partition: i32, lag: i64) {
    gauge!(CONSUMER_LAG, "topic" => topic.to_owned(), "partition" => partition.to_string())
        .set(lag as f64);
}

pub fn assigned(partitions: usize) {
    gauge!(ASSIGNED).set(partitions as f64);
}

pub fn in_flight(n: usize) {
    gauge!(IN_FLIGHT).set(n as f64);
}

pub fn tracked_devices(n: usize) {
    gauge!(TRACKED).set(n as f64);
}
