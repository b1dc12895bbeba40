//! Device state that must outlive a node: each device's sequence high-water mark lives
//! on `fleet.device-state.v1` (Kafka is the only shared state, per DESIGN.md). A record
//! goes out alongside each batch's events and names the seqs still being delivered as
//! pending, so it never claims more than was stored; it is read back before ingest
//! accepts connections, so a restarted or different node still refuses replays of
//! everything up to it, and holds pending seqs in doubt until they are settled.

use std::time::{Duration, Instant};

use fleetgate_proto::DeviceState;
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::identity::{DeviceId, FleetId};
use crate::publish::KafkaConfig;
use crate::replay::{ReplayWindows, StateUpdate};

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

/// A consumer over a state topic: read from the beginning to its end at start-up, then
/// kept to follow what other nodes (or processors, or operators) write next.
pub struct Follower {
    consumer: BaseConsumer,
    topic: String,
    ends: Vec<i64>,
}

impl Follower {
    /// Assigns every partition of `topic` from the beginning. Fails if the topic does
    /// not exist: state that cannot be read must stop start-up, not be assumed empty.
    pub fn open(cfg: &KafkaConfig, topic: &str, timeout: Duration) -> Result<Self, StateError> {
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
            return Err(StateError::MissingTopic(topic.to_owned()));
        }
        let mut ends = Vec::new();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let (_, high) = consumer.fetch_watermarks(topic, p, timeout)?;
            ends.push(high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
            ends,
        })
    }

    /// Reads up to the end captured at open, feeding each record to `apply`; returns
    /// how many records were read.
    pub fn catch_up(
        &mut self,
        timeout: Duration,
        mut apply: impl FnMut(&BorrowedMessage<'_>),
    ) -> Result<usize, StateError> {
        let deadline = Instant::now() + timeout;
        let mut next = vec![0i64; self.ends.len()];
        let mut read = 0usize;
        // Some brokers report the end of a partition early (tansu 0.6 reports the last
        // record batch's base offset + 1), so keep reading until a quiet period too.
        let mut quiet_since = Instant::now();
        loop {
            let reached = next.iter().zip(&self.ends).all(|(n, e)| n >= e);
            if reached && quiet_since.elapsed() >= Duration::from_millis(500) {
                return Ok(read);
            }
            if Instant::now() > deadline {
                return Err(StateError::Timeout(timeout));
            }
            let Some(msg) = self.consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let msg = msg?;
            quiet_since = Instant::now();
            if let Some(n) = next.get_mut(msg.partition() as usize) {
                *n = msg.offset() + 1;
            }
            read += 1;
            apply(&msg);
        }
    }

    /// Feeds every later record to `apply` until `stop` is set. Blocking.
    pub fn run(self, stop: &AtomicBool, mut apply: impl FnMut(&BorrowedMessage<'_>)) {
        while !stop.load(Ordering::Relaxed) {
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(msg)) => apply(&msg),
                Some(Err(e)) => {
                    tracing::warn!(topic = %self.topic, error = %e, "following state topic");
                    std::thread::sleep(Duration::from_millis(500));
                }
                None => {}
            }
        }
    }
}

/// Reads the device-state topic from the beginning to its end and seeds `windows`.
/// Returns how many records were restored, and the follower positioned after them.
/// Blocking: call from a blocking thread at start-up.
pub fn load(
    cfg: &KafkaConfig,
    windows: &ReplayWindows,
    in_doubt_ttl: Duration,
    timeout: Duration,
) -> Result<(usize, Follower), StateError> {
    let mut follower = Follower::open(cfg, &cfg.topics.device_state, timeout)?;
    let mut restored = 0usize;
    follower.catch_up(timeout, |msg| {
        if apply(msg, windows, None, in_doubt_ttl) {
            restored += 1;
        }
    })?;
    Ok((restored, follower))
}

/// Applies what other nodes write from now on, so a device that moves between live
/// nodes cannot replay what the first one stored. Blocking; returns when `stop` is set.
pub fn follow(
    follower: Follower,
    windows: &ReplayWindows,
    node_id: &str,
    in_doubt_ttl: Duration,
    stop: &AtomicBool,
) {
    follower.run(stop, |msg| {
        if apply(msg, windows, Some(node_id), in_doubt_ttl) {
            crate::events::device_state_followed();
        }
    });
}

/// Folds one record into `windows` unless it was written by `skip_node`; true if used.
/// Its pending seqs are in doubt until `in_doubt_ttl` after the record was written.
fn apply(
    msg: &BorrowedMessage<'_>,
    windows: &ReplayWindows,
    skip_node: Option<&str>,
    in_doubt_ttl: Duration,
) -> bool {
    let Some(state) = msg.payload().and_then(|p| DeviceState::decode(p).ok()) else {
        tracing::warn!(
            partition = msg.partition(),
            offset = msg.offset(),
            "undecodable device state"
        );
        return false;
    };
    if skip_node.is_some_and(|n| n == state.ingest_node) {
        return false;
    }
    let (Ok(fleet), Ok(device)) = (
        FleetId::parse(&state.fleet_id),
        DeviceId::parse(&state.device_id),
    ) else {
        return false;
    };
    let doubt_until_ms = state
        .updated_at_ms
        .saturating_add(in_doubt_ttl.as_millis() as i64);
    let pending: &[u64] = if doubt_until_ms > crate::clock::unix_ms_now() {
        &state.pending_seqs
    } else {
        &[]
    };
    let update = StateUpdate {
        highest: state.highest_seq,
        unstored: &state.unstored_seqs,
        pending,
        doubt_until_ms,
    };
    windows.merge(fleet, device, update);
    true
}
