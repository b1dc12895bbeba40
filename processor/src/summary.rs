//! What is on an events topic, counted once per `(device, seq)`. The builder is pure
//! (records in, counts out), so it is tested without a broker; [`crate::topic`] feeds
//! it from Kafka.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use fleetgate_proto::{Provenance, TelemetryEnvelope};
use prost::Message;
use serde::Serialize;

use crate::dedupe::{Deduplicator, DeviceKey, Seen};

/// Counts for one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceCounts {
    /// Distinct events after dedupe.
    pub events: u64,
    pub duplicates: u64,
    /// Records whose seq was lower than an earlier record of the same device in the
    /// same partition (ingest keys by device, so a device's records should be ordered).
    pub order_violations: u64,
}

/// The result of reading a topic once from beginning to end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub topic: String,
    /// Records read, including duplicates and undecodable ones.
    pub records: u64,
    /// Distinct `(device, seq)` events.
    pub events_total: u64,
    pub duplicates_dropped: u64,
    /// Records further behind a device's newest seq than the dedupe window.
    pub too_old_dropped: u64,
    pub undecodable: u64,
    pub order_violations: u64,
    /// Distinct events whose provenance names everything an investigator needs.
    pub complete_provenance: u64,
    pub per_fleet: BTreeMap<String, u64>,
    /// Keyed `fleet/device`.
    pub per_device: BTreeMap<String, DeviceCounts>,
}

/// Accumulates a [`Summary`] record by record, in partition order.
#[derive(Debug, Default)]
pub struct SummaryBuilder {
    summary: Summary,
    dedupe: Deduplicator,
    /// Highest seq seen per `(partition, device)`, for order checks.
    last_seq: HashMap<(i32, DeviceKey), u64>,
}

impl SummaryBuilder {
    pub fn new(topic: &str) -> Self {
        Self {
            summary: Summary {
                topic: topic.to_owned(),
                ..Summary::default()
            },
            ..Self::default()
        }
    }

    /// Adds one record value read from `partition`.
    pub fn record(&mut self, partition: i32, payload: Option<&[u8]>) {
        self.summary.records += 1;
        let envelope = match payload.map(TelemetryEnvelope::decode) {
            Some(Ok(e)) => e,
            _ => {
                self.summary.undecodable += 1;
                return;
            }
        };
        let Some(prov) = envelope.provenance.as_ref() else {
            self.summary.undecodable += 1;
            return;
        };
        // Provenance carries the seq; fall back to the event's if an old writer left it 0.
        let seq = match (prov.seq, envelope.event.as_ref()) {
            (0, Some(ev)) => ev.seq,
            (s, _) => s,
        };
        let key = DeviceKey::new(&prov.fleet_id, &prov.device_id);
        let label = format!("{}/{}", key.fleet_id, key.device_id);

        let last = self.last_seq.entry((partition, key.clone())).or_insert(0);
        let violated = seq < *last;
        *last = (*last).max(seq);

        let seen = self.dedupe.observe(&key, seq);
        let device = self.summary.per_device.entry(label).or_default();
        if violated {
            device.order_violations += 1;
            self.summary.order_violations += 1;
        }
        match seen {
            Seen::Fresh => {
                device.events += 1;
                self.summary.events_total += 1;
                *self
                    .summary
                    .per_fleet
                    .entry(key.fleet_id.clone())
                    .or_default() += 1;
                if provenance_complete(prov) {
                    self.summary.complete_provenance += 1;
                }
            }
            Seen::Duplicate => {
                device.duplicates += 1;
                self.summary.duplicates_dropped += 1;
            }
            Seen::TooOld => self.summary.too_old_dropped += 1,
        }
    }

    pub fn finish(self) -> Summary {
        self.summary
    }
}

/// Whether provenance answers who, with which certificate and software, through which
/// node and transport, and when.
pub fn provenance_complete(p: &Provenance) -> bool {
    !p.device_id.is_empty()
        && !p.fleet_id.is_empty()
        && !p.cert_sha256.is_empty()
        && !p.transport.is_empty()
        && !p.ingest_node.is_empty()
        && !p.software_version.is_empty()
        && p.received_at_ms != 0
        && p.seq != 0
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "topic {}", self.topic)?;
        writeln!(f, "  records read          {}", self.records)?;
        writeln!(f, "  events (deduped)      {}", self.events_total)?;
        writeln!(f, "  duplicates dropped    {}", self.duplicates_dropped)?;
        writeln!(f, "  too old dropped       {}", self.too_old_dropped)?;
        writeln!(f, "  undecodable           {}", self.undecodable)?;
        writeln!(f, "  seq order violations  {}", self.order_violations)?;
        writeln!(
            f,
            "  complete provenance   {} of {}",
            self.complete_provenance, self.events_total
        )?;
        writeln!(f, "  per fleet:")?;
        for (fleet, n) in &self.per_fleet {
            writeln!(f, "    {fleet:<24} {n}")?;
        }
        writeln!(f, "  per device:            events  dups  order")?;
        for (device, c) in &self.per_device {
            writeln!(
                f,
                "    {device:<24} {:>6} {:>5} {:>6}",
                c.events, c.duplicates, c.order_violations
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate_proto::TelemetryEvent;

    fn record(fleet: &str, device: &str, seq: u64, complete: bool) -> Vec<u8> {
        TelemetryEnvelope {
            event: Some(TelemetryEvent {
                seq,
                captured_at_ms: 1,
                ..Default::default()
            }),
            provenance: Some(Provenance {
                device_id: device.into(),
                fleet_id: fleet.into(),
                cert_sha256: "ab".into(),
                transport: "grpc".into(),
                ingest_node: "ingest-0".into(),
                received_at_ms: 2,
                seq,
                software_version: if complete {
                    "fw-1".into()
                } else {
                    String::new()
                },
                ..Default::default()
            }),
        }
        .encode_to_vec()
    }

    #[test]
    fn counts_dedupes_and_flags_order() {
        let mut b = SummaryBuilder::new("t");
        b.record(0, Some(&record("f1", "car-0", 1, true)));
        b.record(0, Some(&record("f1", "car-0", 2, true)));
        b.record(0, Some(&record("f1", "car-0", 2, true))); // redelivery
        b.record(0, Some(&record("f1", "car-0", 1, true))); // late duplicate: out of order
        b.record(1, Some(&record("f2", "car-0", 1, false)));
        b.record(1, Some(b"\xff\xff garbage"));
        b.record(1, None);
        let s = b.finish();
        assert_eq!(s.records, 7);
        assert_eq!(s.events_total, 3);
        assert_eq!(s.duplicates_dropped, 2);
        assert_eq!(s.undecodable, 2);
        assert_eq!(s.order_violations, 1);
        assert_eq!(s.complete_provenance, 2);
        assert_eq!(s.per_fleet.get("f1"), Some(&2));
        assert_eq!(s.per_fleet.get("f2"), Some(&1));
        assert_eq!(s.per_device["f1/car-0"].duplicates, 2);
        assert_eq!(s.per_device["f2/car-0"].events, 1);
        let text = s.to_string();
        assert!(text.contains("f1/car-0"));
        serde_json::to_string(&s).expect("summary serializes");
    }
}
