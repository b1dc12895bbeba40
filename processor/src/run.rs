//! `fleetgate-processor run`: the detectors as a Kafka consumer group.
//!
//! Guarantee (at-least-once): an input offset is committed only after every finding
//! and decision produced from the input before it was acknowledged by the broker
//! (idempotent producer, acks=all). Commits happen every `commit_interval`, when
//! `max_in_flight_outputs` outputs are outstanding, and on shutdown. A failed output
//! stops the processor without committing, so a restart reprocesses that input;
//! redelivered events are dropped by `(device, seq)`. Offsets of partitions revoked by
//! a rebalance are not committed by this instance: their new owner re-reads since the
//! last commit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use axum::extract::State;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ProcessorConfig;
use crate::detect::analyzer::{decision_key, finding_key, InputKind};
use crate::detect::{Analyzer, Coords, Outcome, Outputs};
use crate::metrics;

/// Entry point of the `run` subcommand: config, logging, runtime, signals.
pub fn run_command(config: Option<&Path>, print_config: bool) -> anyhow::Result<()> {
    let cfg: ProcessorConfig = fleetgate_config::load(config).context("loading configuration")?;
    if print_config {
        print!("{}", fleetgate_config::render(&cfg));
        return Ok(());
    }
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    fleetgate_config::process::init_logging(&cfg.log_format);
    let runtime = tokio::runtime::Runtime::new().context("starting runtime")?;
    runtime.block_on(async move {
        let handle = PrometheusBuilder::new()
            .install_recorder()
            .context("installing metrics recorder")?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            fleetgate_config::process::shutdown_signal().await;
            let _ = tx.send(true);
        });
        run(cfg, handle, rx, |metrics| {
            // Machine-readable line for scripts and tests that bind port 0.
            println!("fleetgate-processor ready metrics={metrics}");
        })
        .await
    })
}

/// Runs until `shutdown` flips to true (then commits what was processed) or an output
/// fails. `on_ready` is told the metrics address once subscribed.
pub async fn run(
    cfg: ProcessorConfig,
    metrics_handle: PrometheusHandle,
    shutdown: watch::Receiver<bool>,
    on_ready: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    metrics::describe();

    let listener = TcpListener::bind(cfg.metrics.listen)
        .await
        .with_context(|| format!("binding metrics.listen {}", cfg.metrics.listen))?;
    let metrics_addr = listener.local_addr()?;
    let http = axum::Router::new()
        .route(
            "/metrics",
            get(|State(h): State<PrometheusHandle>| async move { h.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(metrics_handle);
    let mut http_stop = shutdown.clone();
    let http_server = tokio::spawn(async move {
        axum::serve(listener, http)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });

    let context = GroupContext::default();
    let revoked = context.revoked.clone();
    let consumer: StreamConsumer<GroupContext> = consumer_config(&cfg)
        .create_with_context(context)
        .context("creating Kafka consumer")?;
    let topics = &cfg.kafka.topics;
    consumer
        .subscribe(&[topics.events.as_str(), topics.rejected.as_str()])
        .context("subscribing to the input topics")?;
    let producer: FutureProducer = producer_config(&cfg)
        .create()
        .context("creating Kafka producer")?;
    tracing::info!(
        processor = %cfg.processor_id,
        group = %cfg.kafka.group_id,
        metrics = %metrics_addr,
        "processor consuming {} and {}",
        topics.events,
        topics.rejected
    );
    on_ready(metrics_addr);

    let mut runner = Runner {
        analyzer: Analyzer::new(
            &cfg.processor_id,
            &cfg.detectors,
            cfg.policy.clone(),
            cfg.findings.clone(),
            &cfg.state,
        ),
        consumer: Arc::new(consumer),
        producer,
        revoked,
        events_topic: Arc::from(topics.events.as_str()),
        rejected_topic: Arc::from(topics.rejected.as_str()),
        anomalies_topic: Arc::from(topics.anomalies.as_str()),
        quarantine_topic: Arc::from(topics.quarantine.as_str()),
        pending: Vec::new(),
        offsets: HashMap::new(),
        outputs: Outputs::default(),
        max_in_flight: cfg.kafka.max_in_flight_outputs,
    };
    let result = runner.consume(shutdown, cfg.kafka.commit_interval).await;
    let result = match result {
        // Shutdown: commit what was processed, under the grace period.
        Ok(()) => match tokio::time::timeout(cfg.shutdown_grace, runner.commit()).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!(
                "outputs still unacknowledged after shutdown_grace; input not committed"
            )),
        },
        Err(e) => Err(e),
    };
    let producer = runner.producer.clone();
    let grace = cfg.shutdown_grace;
    let _ = tokio::task::spawn_blocking(move || producer.flush(grace)).await;
    drop(runner);
    let _ = http_server.await;
    tracing::info!("processor stopped");
    result
}

/// Consumer-group callbacks: rebalance bookkeeping and lag from librdkafka statistics.
#[derive(Default)]
struct GroupContext {
    revoked: Arc<Mutex<Vec<(String, i32)>>>,
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        for (name, topic) in &statistics.topics {
            for (&partition, p) in &topic.partitions {
                // -1 is librdkafka's internal "unassigned" partition; lag -1 = unknown.
                if partition >= 0 && p.consumer_lag >= 0 {
                    metrics::consumer_lag(name, partition, p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut revoked = self.revoked.lock().expect("revoked list lock poisoned");
            for e in tpl.elements() {
                revoked.push((e.topic().to_owned(), e.partition()));
            }
            tracing::info!(partitions = tpl.count(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Error(e) = rebalance {
            tracing::warn!(error = %e, "rebalance error");
        }
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        metrics::assigned(assigned);
        tracing::info!(assigned, "partitions assigned");
    }
}

struct Runner {
    analyzer: Analyzer,
    consumer: Arc<StreamConsumer<GroupContext>>,
    producer: FutureProducer,
    revoked: Arc<Mutex<Vec<(String, i32)>>>,
    events_topic: Arc<str>,
    rejected_topic: Arc<str>,
    anomalies_topic: Arc<str>,
    quarantine_topic: Arc<str>,
    /// Outputs produced since the last commit, bounded by `max_in_flight`.
    pending: Vec<DeliveryFuture>,
    /// Next offset to commit per input partition.
    offsets: HashMap<(Arc<str>, i32), i64>,
    outputs: Outputs,
    max_in_flight: usize,
}

impl Runner {
    async fn consume(
        &mut self,
        shutdown: watch::Receiver<bool>,
        commit_interval: Duration,
    ) -> anyhow::Result<()> {
        let mut stop = shutdown;
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        tokio::pin!(stopped);
        // A handle of our own, so a borrowed message does not borrow `self`.
        let consumer = self.consumer.clone();
        let mut tick = tokio::time::interval(commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = &mut stopped => return Ok(()),
                _ = tick.tick() => self.commit().await?,
                msg = consumer.recv() => {
                    self.forget_revoked();
                    match msg {
                        Ok(m) => self.handle(&m)?,
                        Err(e) => {
                            tracing::warn!(error = %e, "consumer error");
                            continue;
                        }
                    }
                    if self.pending.len() >= self.max_in_flight {
                        self.commit().await?;
                    }
                }
            }
        }
    }

    fn handle(&mut self, m: &impl Message) -> anyhow::Result<()> {
        let topic = m.topic();
        let (kind, topic) = if topic == &*self.events_topic {
            (InputKind::Events, self.events_topic.clone())
        } else if topic == &*self.rejected_topic {
            (InputKind::Rejected, self.rejected_topic.clone())
        } else {
            tracing::warn!(topic, "record from a topic not subscribed to");
            return Ok(());
        };
        let coords = Coords {
            topic,
            partition: m.partition(),
            offset: m.offset(),
        };
        metrics::record_read(kind);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut out = std::mem::take(&mut self.outputs);
        match self.analyzer.process(
            kind,
            &coords,
            m.payload().unwrap_or_default(),
            now_ms,
            &mut out,
        ) {
            Outcome::Processed => {}
            Outcome::Duplicate | Outcome::TooOld => metrics::duplicate_dropped(),
            Outcome::Undecodable(why) => {
                metrics::undecodable(kind, &coords.topic, coords.partition, coords.offset, &why)
            }
        }
        for f in out.findings.drain(..) {
            let key = finding_key(&f);
            self.send(&self.anomalies_topic.clone(), &key, &f.encode_to_vec())?;
            metrics::finding(&f.detector, &key, &f.summary);
        }
        for d in out.decisions.drain(..) {
            let key = decision_key(&d);
            self.send(&self.quarantine_topic.clone(), &key, &d.encode_to_vec())?;
            metrics::decision(&key, &d.reason, &d.decision_id);
        }
        for d in out.suppressed.drain(..) {
            metrics::finding_suppressed(d.as_str());
        }
        self.outputs = out;
        metrics::in_flight(self.pending.len());
        self.offsets
            .insert((coords.topic, coords.partition), coords.offset + 1);
        Ok(())
    }

    fn send(&mut self, topic: &str, key: &str, payload: &[u8]) -> anyhow::Result<()> {
        let record = FutureRecord::to(topic).key(key).payload(payload);
        match self.producer.send_result(record) {
            Ok(delivery) => {
                self.pending.push(delivery);
                Ok(())
            }
            Err((e, _)) => {
                metrics::output_failed(&e.to_string());
                bail!("enqueueing output to {topic}: {e}")
            }
        }
    }

    /// Drops stored offsets of partitions revoked since the last call. Rebalance
    /// callbacks run inside `recv()`, so calling this after every `recv()` separates
    /// offsets stored before a revocation from those of a re-assignment after it.
    fn forget_revoked(&mut self) {
        let mut revoked = self.revoked.lock().expect("revoked list lock poisoned");
        for (topic, partition) in revoked.drain(..) {
            self.offsets
                .retain(|(t, p), _| !(**t == *topic && *p == partition));
        }
    }

    /// Awaits every outstanding output, then commits the input offsets behind them.
    async fn commit(&mut self) -> anyhow::Result<()> {
        self.forget_revoked();
        metrics::tracked_devices(self.analyzer.tracked_devices());
        for delivery in self.pending.drain(..) {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    metrics::output_failed(&e.to_string());
                    bail!("output not acknowledged: {e}; input since the last commit stays uncommitted");
                }
                Err(_) => bail!("producer dropped an output's delivery report"),
            }
        }
        metrics::in_flight(0);
        if self.offsets.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in self.offsets.drain() {
            tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))
                .context("building commit list")?;
        }
        let consumer = &self.consumer;
        match tokio::task::block_in_place(|| consumer.commit(&tpl, CommitMode::Sync)) {
            Ok(()) => metrics::committed(tpl.count()),
            Err(e) => metrics::commit_failed(&e.to_string()),
        }
        Ok(())
    }
}

/// Bootstrap servers and this instance's client id, common to its consumer and producer.
fn client_config(cfg: &ProcessorConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.bootstrap_servers)
        .set(
            "client.id",
            format!("fleetgate-processor-{}", cfg.processor_id),
        );
    c
}

fn consumer_config(cfg: &ProcessorConfig) -> ClientConfig {
    let k = &cfg.kafka;
    let mut c = client_config(cfg);
    c.set("auto.offset.reset", &k.auto_offset_reset)
        .set("enable.partition.eof", "false");
    if !k.stats_interval.is_zero() {
        c.set(
            "statistics.interval.ms",
            k.stats_interval.as_millis().to_string(),
        );
    }
    for (key, v) in &k.properties {
        c.set(key, v);
    }
    // The commit discipline above depends on these; properties cannot weaken them.
    c.set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    c
}

fn producer_config(cfg: &ProcessorConfig) -> ClientConfig {
    let k = &cfg.kafka;
    let mut c = client_config(cfg);
    c.set("linger.ms", "5").set(
        "queue.buffering.max.messages",
        (k.max_in_flight_outputs.saturating_mul(2) + 1000).to_string(),
    );
    for (key, v) in &k.properties {
        c.set(key, v);
    }
    c.set(
        "message.timeout.ms",
        k.delivery_timeout.as_millis().to_string(),
    )
    .set("enable.idempotence", "true")
    .set("acks", "all");
    c
}
