//! Drives a [`ParquetSink`] from a Kafka consumer group: offsets are committed by hand
//! (`enable.auto.commit=false`), only after the files holding every row below them
//! were fsynced and renamed. Revoked partitions drop their unwritten rows, which their
//! next owner re-reads from the last commit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::schema::EventSchema;
use super::sink::{ParquetSink, RollPolicy, SinkError, SinkStats, WrittenFile};

/// Everything the `parquet` subcommand needs.
#[derive(Debug, Clone)]
pub struct ParquetSinkOptions {
    pub bootstrap_servers: String,
    pub group_id: String,
    pub topic: String,
    pub out: PathBuf,
    pub roll: RollPolicy,
    /// Flush, commit and return once no record arrived for this long after the
    /// partitions were assigned (batch jobs, tests).
    pub exit_when_idle: Option<Duration>,
    pub session_timeout: Duration,
    /// Fault injection for crash tests: abort the process right after this many
    /// files were renamed into place, before their offsets are committed.
    pub abort_after_files: Option<u64>,
}

/// Why the sink stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("kafka consumer: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("no partition of {topic} was assigned within {waited:?}")]
    NeverAssigned { topic: String, waited: Duration },
}

#[derive(Debug)]
enum Change {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// Collects rebalances seen inside `poll` so the loop applies them before the next
/// record; a revoked partition's rows must be dropped before anything else is written.
#[derive(Default)]
struct RebalanceLog(Mutex<Vec<Change>>);

impl ClientContext for RebalanceLog {}

impl ConsumerContext for RebalanceLog {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let partitions =
            |tpl: &TopicPartitionList| tpl.elements().iter().map(|e| e.partition()).collect();
        let change = match rebalance {
            Rebalance::Revoke(tpl) => Change::Revoked(partitions(tpl)),
            Rebalance::Assign(tpl) => Change::Assigned(partitions(tpl)),
            Rebalance::Error(e) => {
                eprintln!("fleetgate-processor parquet: rebalance error: {e}");
                return;
            }
        };
        self.0.lock().expect("rebalance log lock").push(change);
    }
}

/// How often buffers are checked against the roll age and offsets committed.
const TICK: Duration = Duration::from_millis(500);

/// Runs until `stop` is set or, with `exit_when_idle`, the topic went quiet; writes
/// and commits everything buffered before returning.
pub fn run_parquet_sink(
    opts: &ParquetSinkOptions,
    schema: EventSchema,
    stop: &AtomicBool,
) -> Result<SinkStats, RunError> {
    let consumer: BaseConsumer<RebalanceLog> = ClientConfig::new()
        .set("bootstrap.servers", &opts.bootstrap_servers)
        .set("group.id", &opts.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set(
            "session.timeout.ms",
            opts.session_timeout.as_millis().to_string(),
        )
        .create_with_context(RebalanceLog::default())?;
    consumer.subscribe(&[&opts.topic])?;
    let mut sink = ParquetSink::new(&opts.out, &opts.topic, schema, opts.roll.clone());
    let started = Instant::now();
    let mut assigned_at: Option<Instant> = None;
    let mut last_record = Instant::now();
    let mut last_tick = Instant::now();
    loop {
        let polled = consumer.poll(Duration::from_millis(100));
        let now = Instant::now();
        for change in std::mem::take(&mut *consumer.context().0.lock().expect("rebalance log")) {
            match change {
                Change::Assigned(partitions) => {
                    eprintln!("fleetgate-processor parquet: assigned partitions {partitions:?}");
                    sink.assigned();
                    assigned_at = Some(now);
                }
                Change::Revoked(partitions) => {
                    eprintln!("fleetgate-processor parquet: revoked partitions {partitions:?}");
                    sink.revoke(&partitions);
                }
            }
        }
        match polled {
            Some(Ok(msg)) => {
                last_record = now;
                let (_, written) = sink.offer(msg.partition(), msg.offset(), msg.payload(), now)?;
                log_written(&written, &sink, opts);
            }
            // librdkafka reports broker hiccups here and recovers by itself.
            Some(Err(KafkaError::MessageConsumption(code))) => {
                eprintln!("fleetgate-processor parquet: consumer error (retrying): {code}");
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if now.duration_since(last_tick) < TICK {
            continue;
        }
        last_tick = now;
        if let Some(idle) = opts.exit_when_idle {
            match assigned_at {
                // Idle only counts once this consumer owns every partition: right after
                // a crash the dead member may still hold some until its session expires.
                Some(at)
                    if now.duration_since(at.max(last_record)) >= idle
                        && owns_every_partition(&consumer, &opts.topic)? =>
                {
                    break
                }
                None if now.duration_since(started) >= idle + Duration::from_secs(60) => {
                    return Err(RunError::NeverAssigned {
                        topic: opts.topic.clone(),
                        waited: now.duration_since(started),
                    })
                }
                _ => {}
            }
        }
        let written = sink.flush_due(now)?;
        log_written(&written, &sink, opts);
        // A commit racing a rebalance fails harmlessly; the next tick retries.
        if let Err(e) = commit(&consumer, &mut sink, &opts.topic) {
            eprintln!("fleetgate-processor parquet: commit failed, will retry: {e}");
        }
    }
    let written = sink.flush_all()?;
    log_written(&written, &sink, opts);
    commit(&consumer, &mut sink, &opts.topic)?;
    Ok(sink.stats().clone())
}

fn owns_every_partition(
    consumer: &BaseConsumer<RebalanceLog>,
    topic: &str,
) -> Result<bool, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let total = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len());
    let owned = consumer.assignment()?.elements_for_topic(topic).len();
    Ok(owned >= total)
}

fn commit(
    consumer: &BaseConsumer<RebalanceLog>,
    sink: &mut ParquetSink,
    topic: &str,
) -> Result<(), KafkaError> {
    let pending = sink.pending_commits();
    if pending.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for &(p, offset) in &pending {
        tpl.add_partition_offset(topic, p, Offset::Offset(offset))?;
    }
    consumer.commit(&tpl, CommitMode::Sync)?;
    for (p, offset) in pending {
        sink.committed(p, offset);
    }
    Ok(())
}

fn log_written(files: &[WrittenFile], sink: &ParquetSink, opts: &ParquetSinkOptions) {
    for f in files {
        eprintln!(
            "fleetgate-processor parquet: wrote {} rows={} bytes={}",
            f.path.display(),
            f.rows,
            f.bytes
        );
    }
    if opts
        .abort_after_files
        .is_some_and(|n| sink.stats().files_written >= n)
    {
        eprintln!("fleetgate-processor parquet: aborting before commit (--abort-after-files)");
        std::process::abort();
    }
}

/// A flag set by SIGTERM or ctrl-c, so the loop writes and commits before exiting.
pub fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building the signal runtime");
        rt.block_on(async {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{signal, SignalKind};
                let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
        });
        flag.store(true, Ordering::Relaxed);
    });
    stop
}
