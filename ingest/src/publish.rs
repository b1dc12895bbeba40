//! The producer boundary. The core hands records to a [`RecordSink`]; the Kafka sink is
//! an idempotent, `acks=all` rdkafka producer whose delivery future resolves only when
//! the broker has acknowledged the record: that is what "accepted" means to a device.
//! An idempotent producer can enter a fatal state (e.g. fenced after timed-out
//! in-flight requests); the sink then replaces it, so ingest heals instead of failing
//! every later record. Records in flight on the old producer fail and are retried by
//! their devices, which were never told they were accepted.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};

use crate::envelope::{OutRecord, TopicKind};

/// Why a record was not handed to the producer at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    #[error("producer queue full")]
    QueueFull,
    #[error("producer refused record: {0}")]
    Refused(String),
}

/// Why an enqueued record was not acknowledged by the broker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("delivery failed: {0}")]
pub struct DeliveryError(pub String);

/// Resolves when the record is durably stored (or definitely not).
pub type Delivery = Pin<Box<dyn Future<Output = Result<(), DeliveryError>> + Send>>;

/// Where records go. Enqueueing is synchronous so callers can preserve per-device order.
pub trait RecordSink: Send + Sync + 'static {
    fn enqueue(&self, record: OutRecord) -> Result<Delivery, EnqueueError>;
}

/// Topic names; data teams depend on the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topics {
    pub events: String,
    pub rejected: String,
    /// Per-device sequence high-water marks (should be compacted).
    pub device_state: String,
    /// Where a quarantined device's accepted events go instead of `events`.
    pub quarantined: String,
    /// Quarantine decisions ingest follows and enforces (compacted, key = fleet/device).
    pub quarantine: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            events: "telemetry.events.v1".into(),
            rejected: "telemetry.rejected.v1".into(),
            device_state: "fleet.device-state.v1".into(),
            quarantined: "telemetry.quarantined.v1".into(),
            quarantine: "fleet.quarantine.v1".into(),
        }
    }
}

/// Kafka connection and producer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    pub topics: Topics,
    /// How long the producer keeps trying before a record counts as not delivered
    /// (`message.timeout.ms`); the device then gets `delivery_failed` and retries.
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// Bound of the producer's local queue; beyond it events get `overloaded`.
    pub max_queued_messages: u32,
    /// Extra librdkafka properties (e.g. `linger.ms`, `security.protocol`), applied last
    /// except for the delivery guarantees, which cannot be weakened here.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            topics: Topics::default(),
            delivery_timeout: Duration::from_secs(10),
            max_queued_messages: 200_000,
            properties: BTreeMap::from([("linger.ms".to_owned(), "2".to_owned())]),
        }
    }
}

/// Producer settings that the delivery contract depends on.
const GUARANTEES: [(&str, &str); 3] = [
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("max.in.flight.requests.per.connection", "5"),
];

impl KafkaConfig {
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set(
                "message.timeout.ms",
                self.delivery_timeout.as_millis().to_string(),
            )
            .set(
                "queue.buffering.max.messages",
                self.max_queued_messages.to_string(),
            )
            .set("client.id", "fleetgate-ingest");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        for (k, v) in GUARANTEES {
            c.set(k, v);
        }
        c
    }
}

/// An rdkafka producer bound to the configured topics.
pub struct KafkaSink {
    producer: RwLock<FutureProducer>,
    client_config: ClientConfig,
    topics: Topics,
    /// Set by a failed delivery; the next enqueue checks for a fatal producer error.
    suspect: Arc<AtomicBool>,
}

impl KafkaSink {
    pub fn new(config: &KafkaConfig) -> Result<Self, KafkaError> {
        let client_config = config.client_config();
        Ok(Self {
            producer: RwLock::new(client_config.create()?),
            client_config,
            topics: config.topics.clone(),
            suspect: Arc::new(AtomicBool::new(false)),
        })
    }

    fn producer(&self) -> FutureProducer {
        self.producer
            .read()
            .expect("producer lock is never poisoned")
            .clone()
    }

    /// Replaces the producer if librdkafka declared it fatally failed.
    fn heal_if_fatal(&self) {
        if !self.suspect.swap(false, Ordering::AcqRel) {
            return;
        }
        let current = self.producer();
        let (code, reason) = current.client().fatal_error().unwrap_or((
            RDKafkaErrorCode::ProducerFenced,
            "producer state lost".into(),
        ));
        match self.client_config.create::<FutureProducer>() {
            Ok(fresh) => {
                let old = std::mem::replace(
                    &mut *self
                        .producer
                        .write()
                        .expect("producer lock is never poisoned"),
                    fresh,
                );
                crate::events::kafka_producer_replaced(&format!("{code:?}: {reason}"));
                // Dropping purges and briefly flushes: keep it off the async workers.
                std::thread::spawn(move || drop((old, current)));
            }
            Err(e) => {
                self.suspect.store(true, Ordering::Release);
                tracing::error!(error = %e, "cannot recreate Kafka producer");
            }
        }
    }

    /// Whether the cluster answers a metadata request (readiness).
    pub fn reachable(&self, timeout: Duration) -> bool {
        self.producer()
            .client()
            .fetch_metadata(Some(&self.topics.events), timeout)
            .is_ok()
    }

    /// Waits for queued records, for graceful shutdown.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer().flush(timeout)
    }

    pub fn in_flight(&self) -> i32 {
        self.producer().in_flight_count()
    }
}

impl RecordSink for KafkaSink {
    fn enqueue(&self, record: OutRecord) -> Result<Delivery, EnqueueError> {
        self.heal_if_fatal();
        let topic = match record.topic {
            TopicKind::Events => &self.topics.events,
            TopicKind::Rejected => &self.topics.rejected,
            TopicKind::DeviceState => &self.topics.device_state,
            TopicKind::Quarantined => &self.topics.quarantined,
        };
        let headers = record.headers.iter().fold(
            OwnedHeaders::new_with_capacity(record.headers.len()),
            |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                })
            },
        );
        let fr = FutureRecord::to(topic)
            .key(record.key.as_bytes())
            .payload(&record.payload)
            .headers(headers);
        let suspect = self.suspect.clone();
        match self.producer().send_result(fr) {
            Ok(delivery) => Ok(delivery
                .map(move |r| match r {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => {
                        if producer_state_lost(&e) {
                            suspect.store(true, Ordering::Release);
                        }
                        Err(DeliveryError(e.to_string()))
                    }
                    Err(_) => Err(DeliveryError("producer dropped".into())),
                })
                .boxed()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(EnqueueError::QueueFull)
            }
            Err((e, _)) => {
                if producer_state_lost(&e) {
                    self.suspect.store(true, Ordering::Release);
                }
                Err(EnqueueError::Refused(e.to_string()))
            }
        }
    }
}

/// Errors after which an idempotent producer cannot continue: its producer id or
/// epoch is no longer valid, so only a fresh producer can make progress.
fn producer_state_lost(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::ProducerFenced
                | C::InvalidProducerEpoch
                | C::UnknownProducerId
                | C::OutOfOrderSequenceNumber
                | C::InvalidProducerIdMapping
                | C::Fatal
                | C::Fenced
        )
    )
}
