//! Device state that must outlive a node: each device's sequence high-water mark lives
//! on `fleet.device-state.v1` (Kafka is the only shared state, per DESIGN.md). A mark
//! is written only after the batch's events were acknowledged by Kafka, so it never
//! claims more than was stored; it is read back before ingest accepts connections, so a
//! restarted or different node still refuses replays of everything up to it.

use std::time::{Duration, Instant};

use fleetgate_proto::DeviceState;
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::identity::{DeviceId, FleetId};
use crate::publish::KafkaConfig;
use crate::replay::ReplayWindows;

/// Why device state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("topic {0} does not exist; create it (compacted) before starting ingest")]
    MissingTopic(String),
    #[error("device state not loaded within {0:?}")]
    Timeout(Duration),
}

/// Reads the topic from the beginning to its end and seeds `windows`. Returns how
/// many devices were restored. Blocking: call from a blocking thread at start-up.
pub fn load(
    cfg: &KafkaConfig,
    windows: &ReplayWindows,
    timeout: Duration,
) -> Result<usize, StateError> {
    let topic = &cfg.topics.device_state;
    let mut client = rdkafka::ClientConfig::new();
    client
        .set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("group.id", "fleetgate-ingest-state-loader")
        .set("enable.auto.commit", "false");
    for (k, v) in &cfg.properties {
        // Security settings apply to the consumer too; producer-only keys are skipped.
        if k.starts_with("security.") || k.starts_with("ssl.") || k.starts_with("sasl.") {
            client.set(k, v);
        }
    }
    let consumer: BaseConsumer = client.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions = metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().len() as i32)
        .unwrap_or(0);
    if partitions == 0 {
        return Err(StateError::MissingTopic(topic.clone()));
    }
    let mut ends = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let (_, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        ends.push(high);
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    let mut next = vec![0i64; partitions as usize];
    let mut restored = 0usize;
    // Some brokers report the end of a partition early (tansu 0.6 reports the last
    // record batch's base offset + 1), so keep reading until a quiet period too.
    let mut quiet_since = Instant::now();
    loop {
        let reached = next.iter().zip(&ends).all(|(n, e)| n >= e);
        if reached && quiet_since.elapsed() >= Duration::from_millis(500) {
            break;
        }
        if Instant::now() > deadline {
            return Err(StateError::Timeout(timeout));
        }
        let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let msg = msg?;
        quiet_since = Instant::now();
        if let Some(n) = next.get_mut(msg.partition() as usize) {
            *n = msg.offset() + 1;
        }
        let Some(state) = msg.payload().and_then(|p| DeviceState::decode(p).ok()) else {
            tracing::warn!(
                partition = msg.partition(),
                offset = msg.offset(),
                "undecodable device state"
            );
            continue;
        };
        let (Ok(fleet), Ok(device)) = (
            FleetId::parse(&state.fleet_id),
            DeviceId::parse(&state.device_id),
        ) else {
            continue;
        };
        windows.seed(fleet, device, state.highest_seq, &state.unstored_seqs);
        restored += 1;
    }
    Ok(restored)
}
