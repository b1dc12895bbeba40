//! Device state that must outlive a node: each device's sequence high-water mark lives
//! on `fleet.device-state.v1` (Kafka is the only shared state, per DESIGN.md). A record
//! goes out alongside each batch's events and names the seqs still being delivered as
//! pending, so it never claims more than was stored; it is read back before ingest
//! accepts connections, so a restarted or different node still refuses replays of
//! everything up to it, and holds pending seqs in doubt until they are settled.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use fleetgate_proto::DeviceState;
use fleetgate_topic::{ReadOptions, TopicError, TopicReader};
use prost::Message as _;
use rdkafka::message::{BorrowedMessage, Message};

use crate::identity::{DeviceId, FleetId};
use crate::publish::KafkaConfig;
use crate::replay::{ReplayWindows, StateUpdate};

/// Why device state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Kafka(TopicError),
    #[error("topic {0} does not exist; create it (compacted) before starting ingest")]
    MissingTopic(String),
    #[error("{topic} not read to its end within {limit:?}")]
    Timeout { topic: String, limit: Duration },
}

impl From<TopicError> for StateError {
    fn from(e: TopicError) -> Self {
        match e {
            TopicError::MissingTopic(topic) => Self::MissingTopic(topic),
            TopicError::TimedOut { topic, limit } => Self::Timeout { topic, limit },
            e => Self::Kafka(e),
        }
    }
}

/// A consumer over a state topic: read from the beginning to its end at start-up, then
/// kept to follow what other nodes (or processors, or operators) write next.
pub struct Follower {
    reader: TopicReader,
}

impl Follower {
    /// Assigns every partition of `topic` from the beginning. Fails if the topic does
    /// not exist: state that cannot be read must stop start-up, not be assumed empty.
    pub fn open(cfg: &KafkaConfig, topic: &str, timeout: Duration) -> Result<Self, StateError> {
        let mut client = rdkafka::ClientConfig::new();
        client
            .set("bootstrap.servers", &cfg.bootstrap_servers)
            .set("group.id", "fleetgate-ingest-state-loader");
        for (k, v) in &cfg.properties {
            // Security settings apply to the consumer too; producer-only keys are skipped.
            if k.starts_with("security.") || k.starts_with("ssl.") || k.starts_with("sasl.") {
                client.set(k, v);
            }
        }
        Ok(Self {
            reader: TopicReader::open(&client, topic, timeout)?,
        })
    }

    /// Reads up to the end captured now, then 500 ms more (some brokers report the end
    /// early), feeding each record to `apply`; gives up after `timeout` in all. Returns
    /// how many records were read.
    pub fn catch_up(
        &mut self,
        timeout: Duration,
        apply: impl FnMut(&BorrowedMessage<'_>),
    ) -> Result<usize, StateError> {
        let opts = ReadOptions {
            settle: Duration::from_millis(500),
            idle_timeout: timeout,
            request_timeout: timeout,
            limit: Some(timeout),
        };
        Ok(self.reader.catch_up(&opts, apply)?)
    }

    /// Feeds every later record to `apply` until `stop` is set. Blocking.
    pub fn run(mut self, stop: &AtomicBool, apply: impl FnMut(&BorrowedMessage<'_>)) {
        self.reader.follow(stop, apply);
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
