//! Reads a topic once, from the beginning to its end (see [`summarize_topic`] for the
//! settle period), and summarizes it. Reading is [`fleetgate_topic::TopicReader`]:
//! partitions are assigned directly and nothing is committed, so summarizing never
//! disturbs other consumers.

use std::time::Duration;

use fleetgate_topic::{ReadOptions, TopicReader};
use rdkafka::config::ClientConfig;
use rdkafka::message::Message;

pub use fleetgate_topic::TopicError;

use crate::summary::{Summary, SummaryBuilder};

/// Summarizes `topic` from its beginning to (at least) the high watermarks captured at
/// start, then keeps reading for `settle` more.
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
    let opts = ReadOptions {
        settle,
        idle_timeout,
        request_timeout: Duration::from_secs(10),
        limit: None,
    };
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", "fleetgate-processor-summary");
    let mut reader = TopicReader::open(&config, topic, opts.request_timeout)?;
    let mut builder = SummaryBuilder::new(topic);
    reader.catch_up(&opts, |msg| builder.record(msg.partition(), msg.payload()))?;
    Ok(builder.finish())
}
