//! The baseline for the pipeline's cost: the same events a recording holds, produced
//! straight to the same broker with librdkafka and ingest's producer settings
//! (idempotent, acks=all, linger 2 ms), as `TelemetryEnvelope` records with
//! ingest-shaped provenance, encoded by ingest's own `BatchRecords` (same envelope
//! bytes, same 15 headers), in the same pattern as devices
//! (per device, one batch at a time, all devices at once). End-to-end throughput divided by
//! this is what authentication, validation, acks and state cost.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetgate_ingest::envelope::BatchRecords;
use fleetgate_proto::{Provenance, TelemetryBatch};
use prost::Message;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;

use crate::recording::RecordedBatch;

/// What producing the recording directly achieved.
#[derive(Debug, Clone, Serialize)]
pub struct RawReport {
    pub topic: String,
    pub events: u64,
    pub elapsed_s: f64,
    pub events_per_s: f64,
}

/// Produces every event of `batches` to `topic` and waits for every ack.
pub async fn produce(
    bootstrap: &str,
    topic: &str,
    fleet: &str,
    batches: &[RecordedBatch],
) -> anyhow::Result<RawReport> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "30000")
        .create()
        .context("creating producer")?;
    // Encode first: the baseline measures the producer and broker, not protobuf.
    // Records are grouped as the devices sent them: per device, batch by batch.
    let mut devices: BTreeMap<&str, Vec<Vec<Encoded>>> = BTreeMap::new();
    let mut events = 0u64;
    for b in batches {
        let batch = TelemetryBatch::decode(b.batch.as_slice())
            .with_context(|| format!("batch of {} does not decode", b.device_id))?;
        let encoder = BatchRecords::new(provenance(fleet, &b.device_id));
        let records: Vec<Encoded> = batch
            .events
            .iter()
            .map(|event| {
                let record = encoder.event_record(event);
                let headers = record.headers.iter().cloned().collect();
                (headers, record.payload)
            })
            .collect();
        events += records.len() as u64;
        devices
            .entry(b.device_id.as_str())
            .or_default()
            .push(records);
    }
    // Ingest's producer is warm (metadata fetched, producer id assigned); so is this
    // one before the clock starts: one record per device, acked, not counted.
    let warm = devices.iter().map(|(device, batches)| {
        let producer = producer.clone();
        let first = batches.first().and_then(|b| b.first()).cloned();
        async move {
            match first {
                Some(record) => send_batch(&producer, topic, device, &[record]).await,
                None => Ok(()),
            }
        }
    });
    for result in futures::future::join_all(warm).await {
        result.context("warming up the producer")?;
    }
    // Like a device, each sends its next batch when the previous one is acked; all
    // devices at once, sharing one producer as ingest does.
    let started = Instant::now();
    let sends = devices.into_iter().map(|(device, batches)| {
        let producer = producer.clone();
        async move {
            for batch in batches {
                send_batch(&producer, topic, device, &batch).await?;
            }
            anyhow::Ok(())
        }
    });
    for result in futures::future::join_all(sends).await {
        result?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(RawReport {
        topic: topic.to_owned(),
        events,
        elapsed_s: elapsed,
        events_per_s: events as f64 / elapsed,
    })
}

type Encoded = (Vec<(&'static str, String)>, Vec<u8>);

/// Enqueues every record of one batch, then waits until the broker acked all of them.
async fn send_batch(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    batch: &[Encoded],
) -> anyhow::Result<()> {
    let mut pending = Vec::with_capacity(batch.len());
    for (headers, value) in batch {
        let h = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        });
        let mut record = FutureRecord::to(topic).key(key).payload(value).headers(h);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The local queue drains as the broker acks; wait a moment.
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(e).context("enqueueing"),
            }
        }
    }
    for delivery in pending {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e).context("delivery"),
            Err(_) => anyhow::bail!("delivery cancelled"),
        }
    }
    Ok(())
}

/// Batch provenance with the sizes ingest writes (hex fingerprint, serial, ids,
/// versions); the record encoding is ingest's own, so seq and captured-at are added
/// exactly as ingest adds them.
fn provenance(fleet: &str, device: &str) -> Provenance {
    Provenance {
        device_id: device.to_owned(),
        fleet_id: fleet.to_owned(),
        cert_sha256: "0".repeat(64),
        cert_serial: "1".repeat(40),
        transport: "quic".into(),
        ingest_node: "raw-baseline".into(),
        connection_id: "raw-baseline-quic-1".into(),
        received_at_ms: 1,
        sent_at_ms: 1,
        schema_version: 1,
        software_version: "fw-1.4.2".into(),
        vehicle_config_id: "vc-2024a".into(),
        ingest_version: fleetgate_ingest::envelope::INGEST_VERSION.into(),
        remote_addr: "127.0.0.1:40000".into(),
        ..Default::default()
    }
}
