//! Reads a Kafka topic from its beginning to its end, then optionally follows it.
//!
//! Partitions are assigned directly (no consumer group, nothing committed), so any
//! number of ingest nodes, processors and CLIs read the whole topic without disturbing
//! each other. Catching up reads to the high watermarks captured when it starts, then
//! until no record arrived for a settle period: tansu 0.6 answers ListOffsets(latest)
//! with the base offset of the last batch plus one, which can stop short of records
//! that were already durable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

/// Why a topic could not be read; a missing topic is its own variant because state
/// that cannot be read must stop start-up, not be assumed empty.
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
    MissingTopic(String),
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
    #[error("{topic} not read to its end within {limit:?}")]
    TimedOut { topic: String, limit: Duration },
}

/// Timing of [`TopicReader::catch_up`], so each caller picks how long a topic may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOptions {
    /// How long reading goes on after the captured ends are reached, for records a
    /// broker reported short (tansu 0.6); later records are for `poll`/`follow`.
    pub settle: Duration,
    /// Give up when no record arrives for this long before the captured ends.
    pub idle_timeout: Duration,
    /// Metadata and watermark requests.
    pub request_timeout: Duration,
    /// Give up when catching up takes longer than this in total (`None`: no bound).
    pub limit: Option<Duration>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            settle: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            limit: None,
        }
    }
}

/// What catching up does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Read,
    Done,
    Stalled { remaining: usize },
    TimedOut { limit: Duration },
}

/// Progress of one catch-up, kept apart from I/O so the stop rule is tested with a
/// made-up clock.
#[derive(Debug, Clone)]
struct CatchUp {
    /// Captured end per partition not yet reached.
    pending: HashMap<i32, i64>,
    /// Every partition was empty when its end was captured: nothing can be short.
    empty: bool,
    started: Instant,
    last_record: Instant,
    /// When the last captured end was reached (`None` while some are pending, or when
    /// none was pending from the start).
    reached: Option<Instant>,
}

impl CatchUp {
    fn new(now: Instant) -> Self {
        Self {
            pending: HashMap::new(),
            empty: true,
            started: now,
            last_record: now,
            reached: None,
        }
    }

    /// Records a partition's watermarks; `next` is the offset after the last record
    /// already read from it, if any.
    fn capture(&mut self, partition: i32, low: i64, high: i64, next: Option<i64>) {
        if high > low {
            self.empty = false;
        }
        if high > next.unwrap_or(low) {
            self.pending.insert(partition, high);
        }
    }

    fn record(&mut self, partition: i32, offset: i64, now: Instant) {
        self.last_record = now;
        if self
            .pending
            .get(&partition)
            .is_some_and(|&end| offset + 1 >= end)
        {
            self.pending.remove(&partition);
            if self.pending.is_empty() {
                self.reached = Some(now);
            }
        }
    }

    fn step(&self, now: Instant, opts: &ReadOptions) -> Step {
        let quiet = now.saturating_duration_since(self.last_record);
        // A fixed window after the ends, not a quiet period: a topic written more often
        // than `settle` (device state under load) would never fall quiet.
        let since_ends = now.saturating_duration_since(self.reached.unwrap_or(self.started));
        if self.pending.is_empty() && (self.empty || since_ends >= opts.settle) {
            return Step::Done;
        }
        if let Some(limit) = opts.limit {
            if now.saturating_duration_since(self.started) > limit {
                return Step::TimedOut { limit };
            }
        }
        if !self.pending.is_empty() && quiet > opts.idle_timeout {
            return Step::Stalled {
                remaining: self.pending.len(),
            };
        }
        Step::Read
    }
}

/// A blocking reader over every partition of one topic: [`catch_up`](Self::catch_up)
/// to its end, then [`poll`](Self::poll) or [`follow`](Self::follow) what comes next.
/// Run it on a dedicated thread in async programs.
pub struct TopicReader {
    consumer: BaseConsumer,
    topic: String,
    partitions: Vec<i32>,
    /// Next offset to read per partition, once a record of it was read.
    next: HashMap<i32, i64>,
}

impl TopicReader {
    /// Assigns every partition of `topic` from its beginning. `config` carries
    /// `bootstrap.servers`, any security settings and, if wanted, a `group.id` (never
    /// committed; librdkafka requires one even for assign).
    pub fn open(config: &ClientConfig, topic: &str, timeout: Duration) -> Result<Self, TopicError> {
        let mut config = config.clone();
        if config.get("group.id").is_none() {
            config.set("group.id", "fleetgate-topic-reader");
        }
        config
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false");
        let consumer: BaseConsumer = config.create().map_err(TopicError::Client)?;
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
            return Err(TopicError::MissingTopic(topic.to_owned()));
        }
        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(TopicError::Client)?;
        }
        consumer.assign(&tpl).map_err(TopicError::Client)?;
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
            partitions,
            next: HashMap::new(),
        })
    }

    /// Reads until every partition reached the end it had when this call started and
    /// no record arrived for `opts.settle` (at once for a topic that was empty),
    /// handing each record to `each`. Returns how many records were read.
    pub fn catch_up(
        &mut self,
        opts: &ReadOptions,
        mut each: impl FnMut(&BorrowedMessage<'_>),
    ) -> Result<usize, TopicError> {
        let mut progress = CatchUp::new(Instant::now());
        for &p in &self.partitions {
            let (low, high) = self
                .consumer
                .fetch_watermarks(&self.topic, p, opts.request_timeout)
                .map_err(|source| TopicError::Watermarks {
                    topic: self.topic.clone(),
                    partition: p,
                    source,
                })?;
            progress.capture(p, low, high, self.next.get(&p).copied());
        }
        let mut read = 0;
        loop {
            match progress.step(Instant::now(), opts) {
                Step::Read => {}
                Step::Done => return Ok(read),
                Step::Stalled { remaining } => {
                    return Err(TopicError::Stalled {
                        topic: self.topic.clone(),
                        idle: opts.idle_timeout,
                        remaining,
                    })
                }
                Step::TimedOut { limit } => {
                    return Err(TopicError::TimedOut {
                        topic: self.topic.clone(),
                        limit,
                    })
                }
            }
            let Some(msg) = self.poll(Duration::from_millis(100))? else {
                continue;
            };
            progress.record(msg.partition(), msg.offset(), Instant::now());
            read += 1;
            each(&msg);
        }
    }

    /// The next record, if one arrives within `timeout`.
    pub fn poll(&mut self, timeout: Duration) -> Result<Option<BorrowedMessage<'_>>, TopicError> {
        match self.consumer.poll(timeout) {
            None => Ok(None),
            Some(Err(source)) => Err(TopicError::Read {
                topic: self.topic.clone(),
                source,
            }),
            Some(Ok(msg)) => {
                self.next.insert(msg.partition(), msg.offset() + 1);
                Ok(Some(msg))
            }
        }
    }

    /// Hands every later record to `each` until `stop` is set; read errors are logged
    /// and retried, since a follower must outlive a broker hiccup.
    pub fn follow(&mut self, stop: &AtomicBool, mut each: impl FnMut(&BorrowedMessage<'_>)) {
        while !stop.load(Ordering::Relaxed) {
            match self.poll(Duration::from_millis(200)) {
                Ok(Some(msg)) => each(&msg),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "following topic");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn opts() -> ReadOptions {
        ReadOptions {
            settle: 500 * MS,
            idle_timeout: 2000 * MS,
            request_timeout: 1000 * MS,
            limit: None,
        }
    }

    #[test]
    fn empty_topic_is_done_at_once() {
        let t0 = Instant::now();
        let mut p = CatchUp::new(t0);
        p.capture(0, 0, 0, None);
        p.capture(1, 5, 5, None);
        assert_eq!(p.step(t0, &opts()), Step::Done);
    }

    #[test]
    fn reaching_the_ends_still_waits_for_the_settle_period() {
        let t0 = Instant::now();
        let mut p = CatchUp::new(t0);
        p.capture(0, 0, 2, None);
        p.capture(1, 0, 1, None);
        assert_eq!(p.step(t0, &opts()), Step::Read);
        p.record(0, 1, t0 + 10 * MS);
        assert_eq!(p.step(t0 + 10 * MS, &opts()), Step::Read);
        p.record(1, 0, t0 + 20 * MS);
        // Every end reached, but the broker may have reported them short.
        assert_eq!(p.step(t0 + 519 * MS, &opts()), Step::Read);
        assert_eq!(p.step(t0 + 520 * MS, &opts()), Step::Done);
    }

    #[test]
    fn records_past_a_short_end_are_read_within_the_settle_period() {
        let t0 = Instant::now();
        let mut p = CatchUp::new(t0);
        p.capture(0, 0, 1, None);
        p.record(0, 0, t0);
        p.record(0, 1, t0 + 400 * MS);
        assert_eq!(p.step(t0 + 499 * MS, &opts()), Step::Read);
        assert_eq!(p.step(t0 + 500 * MS, &opts()), Step::Done);
    }

    #[test]
    fn a_topic_that_never_falls_quiet_still_finishes() {
        let t0 = Instant::now();
        let mut p = CatchUp::new(t0);
        p.capture(0, 0, 2, None);
        for i in 0..=20 {
            p.record(0, i, t0 + i as u32 * 50 * MS);
        }
        assert_eq!(
            p.step(t0 + 550 * MS, &opts()),
            Step::Done,
            "ends reached at 50 ms; a record every 50 ms after that does not matter"
        );
    }

    #[test]
    fn records_read_earlier_are_not_awaited_again_but_still_settle() {
        let t0 = Instant::now();
        let mut p = CatchUp::new(t0);
        p.capture(0, 0, 3, Some(3));
        assert_eq!(p.step(t0, &opts()), Step::Read);
        assert_eq!(p.step(t0 + 500 * MS, &opts()), Step::Done);
    }

    #[test]
    fn no_record_before_the_ends_is_a_stall() {
        let t0 = Instant::now();
        let mut p = CatchUp::new(t0);
        p.capture(0, 0, 4, None);
        p.capture(2, 0, 1, None);
        p.record(2, 0, t0 + 100 * MS);
        assert_eq!(p.step(t0 + 2100 * MS, &opts()), Step::Read);
        assert_eq!(
            p.step(t0 + 2101 * MS, &opts()),
            Step::Stalled { remaining: 1 }
        );
    }

    #[test]
    fn a_slow_catch_up_hits_the_limit() {
        let t0 = Instant::now();
        let opts = ReadOptions {
            limit: Some(1000 * MS),
            ..opts()
        };
        let mut p = CatchUp::new(t0);
        p.capture(0, 0, 100, None);
        for i in 0..=11 {
            p.record(0, i, t0 + i as u32 * 100 * MS);
        }
        assert_eq!(p.step(t0 + 1000 * MS, &opts), Step::Read);
        assert_eq!(
            p.step(t0 + 1101 * MS, &opts),
            Step::TimedOut { limit: 1000 * MS }
        );
        assert_eq!(
            p.step(
                t0 + 1101 * MS,
                &ReadOptions {
                    limit: None,
                    ..opts
                }
            ),
            Step::Read
        );
    }

    #[test]
    fn reader_can_move_to_a_dedicated_thread() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<TopicReader>();
    }
}
