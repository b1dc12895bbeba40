//! Wiring: builds every component from the config, runs the listeners, and shuts
//! down in order (stop accepting, drain in-flight batches, flush the producer).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::catalog::SignalCatalog;
use crate::config::IngestConfig;
use crate::events;
use crate::freshness::FreshnessWindow;
use crate::grpc::{self, IngestService};
use crate::pipeline::Pipeline;
use crate::publish::KafkaSink;
use crate::quic;
use crate::replay::ReplayWindows;
use crate::service::BatchHandler;
use crate::tls::ServerTls;

/// Addresses actually bound (ports may have been 0 in the config).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub quic: SocketAddr,
}

/// Installs the global Prometheus recorder with fleetgate's histogram buckets.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets(events::LATENCY_BUCKETS)
        .context("histogram buckets")?
        .install_recorder()
        .context("installing metrics recorder")
}

#[derive(Clone)]
struct Health {
    metrics: PrometheusHandle,
    ready: Arc<AtomicBool>,
}

/// Runs ingest until `shutdown` flips to true; `on_bound` is told the addresses once
/// listening.
pub async fn run(
    cfg: IngestConfig,
    metrics: PrometheusHandle,
    shutdown: watch::Receiver<bool>,
    on_bound: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    events::describe(&cfg.node_id);

    let tls = ServerTls::load(&cfg.tls).context("loading TLS material")?;
    let sink = Arc::new(KafkaSink::new(&cfg.kafka).context("creating Kafka producer")?);
    // Restore sequence windows before accepting any connection: replays of what
    // another (or an earlier) node stored are refused from the first batch on.
    let windows = ReplayWindows::new(cfg.sequence.window);
    let (kafka_cfg, loader_windows) = (cfg.kafka.clone(), windows.clone());
    let restored = tokio::task::spawn_blocking(move || {
        crate::device_state::load(&kafka_cfg, &loader_windows, Duration::from_secs(30))
    })
    .await
    .context("device state loader")?
    .context("restoring device state from Kafka")?;
    events::device_state_restored(restored);
    let pipeline = Pipeline::new(
        cfg.limits.clone(),
        SignalCatalog::new(cfg.catalog.signals.clone()),
        FreshnessWindow::new(&cfg.freshness),
        windows,
    );
    let handler = Arc::new(BatchHandler::new(
        pipeline,
        sink.clone(),
        &cfg.node_id,
        cfg.retry_after,
    ));

    let ready = Arc::new(AtomicBool::new(false));
    let readiness = tokio::spawn(watch_readiness(
        sink.clone(),
        ready.clone(),
        shutdown.clone(),
    ));

    let metrics_listener = TcpListener::bind(cfg.metrics.listen)
        .await
        .with_context(|| format!("binding metrics.listen {}", cfg.metrics.listen))?;
    let grpc_listener = TcpListener::bind(cfg.grpc.listen)
        .await
        .with_context(|| format!("binding grpc.listen {}", cfg.grpc.listen))?;
    let quic_endpoint = quic::bind(&cfg.quic, tls.server_config(&[quic::ALPN])?)?;
    let bound = Bound {
        grpc: grpc_listener.local_addr()?,
        metrics: metrics_listener.local_addr()?,
        quic: quic_endpoint.local_addr().context("quic local address")?,
    };

    let health = Health {
        metrics,
        ready: ready.clone(),
    };
    let http = axum::Router::new()
        .route(
            "/metrics",
            get(|State(h): State<Health>| async move { h.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(h): State<Health>| async move {
                if h.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "kafka unreachable")
                }
            }),
        )
        .with_state(health);
    let mut metrics_shutdown = shutdown.clone();
    let metrics_server = tokio::spawn(async move {
        axum::serve(metrics_listener, http)
            .with_graceful_shutdown(async move {
                let _ = metrics_shutdown.wait_for(|s| *s).await;
            })
            .await
    });

    let acceptor = TlsAcceptor::from(tls.server_config(&[b"h2"])?);
    let incoming = grpc::incoming(
        grpc_listener,
        acceptor,
        tls.trust_domain().to_owned(),
        Arc::from(cfg.node_id.as_str()),
        cfg.grpc.clone(),
        shutdown.clone(),
    );
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<IngestService>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fleetgate_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building reflection service")?;
    let quic_server = tokio::spawn(quic::serve(
        quic_endpoint.clone(),
        handler.clone(),
        Arc::from(tls.trust_domain()),
        Arc::from(cfg.node_id.as_str()),
        cfg.quic.clone(),
        shutdown.clone(),
    ));
    let ingest = IngestService::new(
        handler,
        cfg.grpc.max_in_flight_batches_per_stream,
        shutdown.clone(),
    );
    let mut grpc_shutdown = shutdown.clone();
    let grpc_server = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(ingest)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = grpc_shutdown.wait_for(|s| *s).await;
            }),
    );

    tracing::info!(grpc = %bound.grpc, quic = %bound.quic, metrics = %bound.metrics, node = %cfg.node_id, "ingest listening");
    on_bound(bound);

    let mut stop = shutdown.clone();
    let _ = stop.wait_for(|s| *s).await;
    tracing::info!("shutting down: draining in-flight batches");
    // Both transports drain concurrently (each watches `shutdown`) under one deadline.
    let deadline = tokio::time::Instant::now() + cfg.shutdown_grace;
    match tokio::time::timeout_at(deadline, grpc_server).await {
        Ok(r) => r.context("grpc task")?.context("grpc server")?,
        Err(_) => tracing::warn!("grace period over with gRPC batches still in flight"),
    }
    match tokio::time::timeout_at(deadline, quic_server).await {
        Ok(r) => r.context("quic task")?,
        Err(_) => tracing::warn!("grace period over with QUIC batches still in flight"),
    }
    // Idempotent after a clean drain; after a timeout it cuts what is left.
    quic_endpoint.close(0u32.into(), b"shutdown");
    let flush_sink = sink.clone();
    let grace = cfg.shutdown_grace;
    tokio::task::spawn_blocking(move || flush_sink.flush(grace))
        .await
        .context("flush task")?
        .context("flushing producer")?;
    let _ = metrics_server.await;
    readiness.abort();
    tracing::info!("ingest stopped");
    Ok(())
}

/// Ready = the Kafka cluster answers metadata requests.
async fn watch_readiness(
    sink: Arc<KafkaSink>,
    ready: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let s = sink.clone();
        let ok = tokio::task::spawn_blocking(move || s.reachable(Duration::from_secs(2)))
            .await
            .unwrap_or(false);
        ready.store(ok, Ordering::Relaxed);
        events::kafka_queue(sink.in_flight());
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(if ok { 5 } else { 1 })) => {}
        }
    }
}
