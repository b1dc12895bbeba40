//! Reads a topic once, from the beginning to the end it had when reading started (see
//! [`summarize_topic`] for the settle period), and summarizes it. Partitions are assigned directly (no consumer group, nothing
//! committed), so summarizing never disturbs other consumers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::summary::{Summary, SummaryBuilder};

/// Why a topic could not be summarized.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("kafka client: {0}")]
    Client(#[source] KafkaError),
    #[error("metadata for {topic}: {source}")]
    Metadata {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("topic {0} does not exist or has no partitions")]
    NoPartitions(String),
    #[error("watermarks of {topic}/{partition}: {source}")]
    Watermarks {
        topic: String,
        partition: i32,
        #[source]
        source: KafkaError,
    },
    #[error("reading {topic}: {source}")]
    Read {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("no progress on {topic} for {idle:?}; {remaining} partition(s) not at their end")]
    Stalled {
        topic: String,
        idle: Duration,
        remaining: usize,
    },
}

/// Summarizes `topic` from its beginning to (at least) the high watermarks captured at
/// start, then keeps reading until no record arrived for `settle`.
///
/// The settle period exists because tansu 0.6 answers ListOffsets(latest) with the base
/// offset of the last record batch plus one, not the offset after its last record, so
/// the captured watermark can stop short of records that were already durable. Gives up
/// with [`TopicError::Stalled`] when no record arrives for `idle_timeout` before every
/// partition reached its captured end.
pub fn summarize_topic(
    bootstrap_servers: &str,
    topic: &str,
    settle: Duration,
    idle_timeout: Duration,
) -> Result<Summary, TopicError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", "fleetgate-processor-summary")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(TopicError::Client)?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|source| TopicError::Metadata {
            topic: topic.to_owned(),
            source,
        })?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(TopicError::NoPartitions(topic.to_owned()));
    }

    // Next offset to reach per partition; empty partitions are done already.
    let mut pending: HashMap<i32, i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|source| TopicError::Watermarks {
                topic: topic.to_owned(),
                partition: p,
                source,
            })?;
        if high > low {
            pending.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(TopicError::Client)?;
        }
    }

    let mut builder = SummaryBuilder::new(topic);
    if pending.is_empty() {
        return Ok(builder.finish());
    }
    consumer.assign(&tpl).map_err(TopicError::Client)?;
    let mut last_record = Instant::now();
    loop {
        let quiet = last_record.elapsed();
        if pending.is_empty() && quiet >= settle {
            return Ok(builder.finish());
        }
        if !pending.is_empty() && quiet > idle_timeout {
            return Err(TopicError::Stalled {
                topic: topic.to_owned(),
                idle: idle_timeout,
                remaining: pending.len(),
            });
        }
        let Some(result) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let msg = result.map_err(|source| TopicError::Read {
            topic: topic.to_owned(),
            source,
        })?;
        last_record = Instant::now();
        let partition = msg.partition();
        builder.record(partition, msg.payload());
        if pending
            .get(&partition)
            .is_some_and(|&end| msg.offset() + 1 >= end)
        {
            pending.remove(&partition);
        }
    }
}
