//! Kafka adapters for `fleet.quarantine.v1`: a reader that replays the topic from the
//! beginning and can then follow it, and an idempotent, acks=all publisher.
//!
//! Reading is [`fleetgate_topic::TopicReader`] (partitions assigned directly, nothing
//! committed, caught up to the captured ends plus a settle period for tansu's short
//! ListOffsets); this module turns its records into [`TopicRecord`]s.

use std::time::Duration;

use fleetgate_proto::QuarantineDecision;
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};

pub use fleetgate_topic::ReadOptions;
use fleetgate_topic::TopicError;

use crate::registry::{key, validate, InvalidDecision, Position, Registry};

/// The production topic name (configurable everywhere it is used).
pub const DEFAULT_TOPIC: &str = "fleet.quarantine.v1";

/// Why reading or writing the topic failed.
#[derive(Debug, thiserror::Error)]
pub enum KafkaIoError {
    #[error("kafka client: {0}")]
    Client(#[source] KafkaError),
    #[error(transparent)]
    Read(#[from] TopicError),
    #[error("refusing to publish: {0}")]
    Invalid(#[from] InvalidDecision),
    #[error("delivering to {topic}: {source}")]
    Delivery {
        topic: String,
        #[source]
        source: KafkaError,
    },
}

/// Minimal client settings for `bootstrap`; add security settings before use.
pub fn client_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

/// Why a record is not a usable decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("not a QuarantineDecision: {0}")]
    Decode(String),
    #[error(transparent)]
    Invalid(#[from] InvalidDecision),
    /// Compaction keeps the latest record per *key*; a payload naming another device
    /// could survive compaction under the wrong key, so it is not trusted.
    #[error("record key {key:?} does not match its decision for {expected}")]
    KeyMismatch {
        key: Option<String>,
        expected: String,
    },
    #[error("tombstone without a <fleet>/<device> key: {0:?}")]
    BadTombstoneKey(Option<String>),
}

/// What a record on the topic says.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordValue {
    /// A valid decision whose key matches its device.
    Decision(QuarantineDecision),
    /// A null value: the device's state was deleted (compaction tombstone).
    Tombstone {
        fleet: String,
        device: String,
    },
    Invalid(RecordError),
}

/// One record of the topic.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicRecord {
    pub position: Position,
    pub key: Option<String>,
    pub value: RecordValue,
}

impl TopicRecord {
    /// Interprets a record's key and value (pure, so it is tested without a broker).
    pub fn parse(position: Position, key: Option<&[u8]>, value: Option<&[u8]>) -> Self {
        let key = key.map(|k| String::from_utf8_lossy(k).into_owned());
        let value = match value {
            None => match key.as_deref().and_then(|k| k.split_once('/')) {
                Some((fleet, device)) if !fleet.is_empty() && !device.is_empty() => {
                    RecordValue::Tombstone {
                        fleet: fleet.to_owned(),
                        device: device.to_owned(),
                    }
                }
                _ => RecordValue::Invalid(RecordError::BadTombstoneKey(key.clone())),
            },
            Some(bytes) => match QuarantineDecision::decode(bytes) {
                Err(e) => RecordValue::Invalid(RecordError::Decode(e.to_string())),
                Ok(d) => match validate(&d) {
                    Err(e) => RecordValue::Invalid(e.into()),
                    Ok(()) => {
                        let expected = crate::registry::key(&d.fleet_id, &d.device_id);
                        if key.as_deref() == Some(expected.as_str()) {
                            RecordValue::Decision(d)
                        } else {
                            RecordValue::Invalid(RecordError::KeyMismatch {
                                key: key.clone(),
                                expected,
                            })
                        }
                    }
                },
            },
        };
        Self {
            position,
            key,
            value,
        }
    }

    fn from_message(msg: &BorrowedMessage<'_>) -> Self {
        let position = Position {
            partition: msg.partition(),
            offset: msg.offset(),
        };
        Self::parse(position, msg.key(), msg.payload())
    }

    /// Applies this record to `registry`; an invalid record changes nothing and its
    /// error is returned so the caller can count or log it.
    pub fn apply_to(self, registry: &mut Registry) -> Result<(), RecordError> {
        match self.value {
            RecordValue::Decision(d) => Ok(registry.apply(d)?),
            RecordValue::Tombstone { fleet, device } => {
                registry.remove(&fleet, &device);
                Ok(())
            }
            RecordValue::Invalid(e) => Err(e),
        }
    }
}

/// Reads `fleet.quarantine.v1` from its beginning as [`TopicRecord`]s:
/// [`catch_up`](Self::catch_up) to the end, then [`poll`](Self::poll) for decisions as
/// they are published. Blocking: run it on a dedicated thread in async programs.
pub struct TopicReader {
    inner: fleetgate_topic::TopicReader,
}

impl TopicReader {
    /// Assigns every partition of `topic` from its beginning. `config` carries
    /// `bootstrap.servers` and any security settings (see [`client_config`]).
    pub fn open(
        config: &ClientConfig,
        topic: &str,
        timeout: Duration,
    ) -> Result<Self, KafkaIoError> {
        let mut config = config.clone();
        if config.get("group.id").is_none() {
            // Required by librdkafka even for assign(); nothing is ever committed.
            config.set("group.id", "fleetgate-quarantine-reader");
        }
        Ok(Self {
            inner: fleetgate_topic::TopicReader::open(&config, topic, timeout)?,
        })
    }

    /// Reads until every partition reached the end it had when this call started, then
    /// for `opts.settle` more, handing each record to `each`. Returns how many records
    /// were read.
    pub fn catch_up(
        &mut self,
        opts: &ReadOptions,
        mut each: impl FnMut(TopicRecord),
    ) -> Result<usize, KafkaIoError> {
        Ok(self
            .inner
            .catch_up(opts, |msg| each(TopicRecord::from_message(msg)))?)
    }

    /// The next record, if one arrives within `timeout`.
    pub fn poll(&mut self, timeout: Duration) -> Result<Option<TopicRecord>, KafkaIoError> {
        Ok(self
            .inner
            .poll(timeout)?
            .map(|msg| TopicRecord::from_message(&msg)))
    }
}

/// Reads the whole topic with default [`ReadOptions`] and folds it into a registry;
/// invalid records are skipped. Blocking.
pub fn load(bootstrap: &str, topic: &str) -> Result<Registry, KafkaIoError> {
    let opts = ReadOptions::default();
    let mut reader = TopicReader::open(&client_config(bootstrap), topic, opts.request_timeout)?;
    let mut registry = Registry::new();
    reader.catch_up(&opts, |record| {
        let _ = record.apply_to(&mut registry);
    })?;
    Ok(registry)
}

/// Publishes decisions with an idempotent, acks=all producer; each call returns once
/// the broker acknowledged the record.
pub struct Publisher {
    producer: FutureProducer,
    topic: String,
    queue_timeout: Duration,
}

impl Publisher {
    /// `config` carries `bootstrap.servers` and any security settings.
    pub fn new(config: &ClientConfig, topic: &str) -> Result<Self, KafkaIoError> {
        let mut config = config.clone();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000");
        Ok(Self {
            producer: config.create().map_err(KafkaIoError::Client)?,
            topic: topic.to_owned(),
            queue_timeout: Duration::from_secs(5),
        })
    }

    /// Publishes `d` under key `<fleet>/<device>` and waits for the acknowledgement.
    pub async fn publish(&self, d: &QuarantineDecision) -> Result<Position, KafkaIoError> {
        validate(d)?;
        let key = key(&d.fleet_id, &d.device_id);
        let payload = d.encode_to_vec();
        let record = FutureRecord::to(&self.topic).key(&key).payload(&payload);
        let delivery = self
            .producer
            .send(record, self.queue_timeout)
            .await
            .map_err(|(source, _)| KafkaIoError::Delivery {
                topic: self.topic.clone(),
                source,
            })?;
        Ok(Position {
            partition: delivery.partition,
            offset: delivery.offset,
        })
    }
}

/// Publishes one decision with a fresh [`Publisher`] (for one-shot tools).
pub async fn publish(
    bootstrap: &str,
    topic: &str,
    d: &QuarantineDecision,
) -> Result<Position, KafkaIoError> {
    Publisher::new(&client_config(bootstrap), topic)?
        .publish(d)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate_proto::QuarantineState;

    const AT: Position = Position {
        partition: 0,
        offset: 7,
    };

    fn decision() -> QuarantineDecision {
        QuarantineDecision {
            fleet_id: "f".into(),
            device_id: "d".into(),
            state: QuarantineState::Quarantined as i32,
            reason: "r".into(),
            ..Default::default()
        }
    }

    #[test]
    fn decision_with_matching_key_is_accepted() {
        let bytes = decision().encode_to_vec();
        let r = TopicRecord::parse(AT, Some(b"f/d"), Some(&bytes));
        assert_eq!(r.value, RecordValue::Decision(decision()));
        let mut reg = Registry::new();
        r.apply_to(&mut reg).unwrap();
        assert!(reg.state("f", "d", 0).is_some());
    }

    #[test]
    fn key_mismatch_undecodable_and_stateless_records_are_invalid() {
        let bytes = decision().encode_to_vec();
        let mut reg = Registry::new();
        for (key, value) in [
            (Some(&b"f/other"[..]), Some(bytes.clone())),
            (None, Some(bytes.clone())),
            (Some(&b"f/d"[..]), Some(vec![0xff, 0xff, 0xff])),
            (
                Some(&b"f/d"[..]),
                Some(
                    QuarantineDecision {
                        state: 0,
                        ..decision()
                    }
                    .encode_to_vec(),
                ),
            ),
            (Some(&b"nokey"[..]), None),
            (None, None),
        ] {
            let r = TopicRecord::parse(AT, key, value.as_deref());
            assert!(matches!(r.value, RecordValue::Invalid(_)), "{r:?}");
            assert!(r.apply_to(&mut reg).is_err());
        }
        assert!(reg.is_empty());
    }

    #[test]
    fn reader_and_registry_can_move_to_a_dedicated_thread() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<TopicReader>();
        send_sync::<Registry>();
        send_sync::<Publisher>();
        send_sync::<crate::Signer>();
    }

    #[test]
    fn tombstone_removes_the_device() {
        let mut reg = Registry::new();
        reg.apply(decision()).unwrap();
        let r = TopicRecord::parse(AT, Some(b"f/d"), None);
        assert_eq!(
            r.value,
            RecordValue::Tombstone {
                fleet: "f".into(),
                device: "d".into()
            }
        );
        r.apply_to(&mut reg).unwrap();
        assert!(reg.is_empty());
    }
}
