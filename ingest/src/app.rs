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
use crate::identity::{DeviceId, FleetId};
use crate::live::LiveConnections;
use crate::pipeline::Pipeline;
use crate::publish::KafkaSink;
use crate::quarantine::QuarantineTable;
use crate::quic;
use crate::quota::Admission;
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
    windows: Arc<ReplayWindows>,
    live: Arc<LiveConnections>,
}

/// What this node knows of one device: window, gaps, clock offset, open connections.
async fn device_view(
    State(h): State<Health>,
    axum::extract::Path((fleet, device)): axum::extract::Path<(String, String)>,
) -> (StatusCode, String) {
    let (Ok(fleet), Ok(device)) = (FleetId::parse(&fleet), DeviceId::parse(&device)) else {
        return (StatusCode::BAD_REQUEST, "invalid fleet or device id".into());
    };
    let Some(view) = h.windows.view(&fleet, &device) else {
        return (StatusCode::NOT_FOUND, "device not seen by this node".into());
    };
    let connections: Vec<serde_json::Value> = h
        .live
        .of(&fleet, &device)
        .into_iter()
        .map(|p| {
            serde_json::json!({
                "connection_id": &*p.connection_id,
                "remote_addr": p.remote_addr.to_string(),
                "transport": p.transport.as_str(),
            })
        })
        .collect();
    let body = serde_json::json!({
        "fleet_id": fleet.as_str(),
        "device_id": device.as_str(),
        "sequence": view,
        "connections": connections,
    });
    (StatusCode::OK, body.to_string())
}

/// Every 10 s: log the top rate-limited devices and publish the in-flight gauge; every
/// minute: forget idle limiter state.
async fn admission_housekeeping(handler: Arc<BatchHandler>, mut shutdown: watch::Receiver<bool>) {
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        ticks += 1;
        handler.log_top_offenders(10);
        events::events_in_flight(handler.admission().in_flight.in_flight());
        if ticks.is_multiple_of(6) {
            handler.admission().retain_recent();
        }
    }
}

/// On SIGHUP, re-reads the configuration and applies its `[quota]` section in place.
/// Other sections need a restart; changes to them are reported, not applied.
async fn reload_on_sighup(
    source: ConfigSource,
    running: IngestConfig,
    admission: Arc<Admission>,
    mut shutdown: watch::Receiver<bool>,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot install the SIGHUP handler; quota reload disabled");
            return;
        };
        let mut applied = running.quota.clone();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            let next = match source().and_then(|c| {
                c.validate().map_err(anyhow::Error::msg)?;
                Ok(c)
            }) {
                Ok(c) => c,
                Err(e) => {
                    events::quota_reloaded(false);
                    tracing::error!(error = %format!("{e:#}"), "reload refused; configuration unchanged");
                    continue;
                }
            };
            let mut rest = next.clone();
            rest.quota = running.quota.clone();
            if rest != running {
                tracing::warn!(
                    "reload: only [quota] applies without a restart; other changes ignored"
                );
            }
            if next.quota != applied {
                admission.reload(&next.quota);
                applied = next.quota;
                tracing::info!("quota configuration reloaded");
            } else {
                tracing::info!("reload: quota configuration unchanged");
            }
            events::quota_reloaded(true);
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (source, running, admission);
        let _ = shutdown.changed().await;
    }
}

/// Ends doubts past their TTL and frees the windows of devices idle longer than
/// `idle` (their marks are kept).
async fn evict_idle_devices(
    windows: Arc<ReplayWindows>,
    idle: Duration,
    in_doubt_ttl: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let tick = (idle / 4)
        .min(in_doubt_ttl / 4)
        .clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let now = crate::clock::unix_ms_now();
        let expired = windows.expire_doubts(now);
        if expired > 0 {
            events::device_state_doubts_expired(expired);
            tracing::info!(expired, "device-state doubts ended by TTL");
        }
        let cutoff = now - idle.as_millis() as i64;
        let evicted = windows.evict_idle(cutoff);
        let (active, dormant) = windows.counts();
        events::devices_tracked(active, dormant);
        if evicted > 0 {
            tracing::debug!(evicted, active, dormant, "idle device windows evicted");
        }
    }
}

/// Runs ingest until `shutdown` flips to true; `on_bound` is told the addresses once
/// listening.
/// Re-reads the configuration (file plus environment) when asked to reload.
pub type ConfigSource = Box<dyn Fn() -> anyhow::Result<IngestConfig> + Send + Sync>;

pub async fn run(
    cfg: IngestConfig,
    metrics: PrometheusHandle,
    shutdown: watch::Receiver<bool>,
    reload: Option<ConfigSource>,
    on_bound: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    events::describe(&cfg.node_id);

    let tls = ServerTls::load(&cfg.tls).context("loading TLS material")?;
    if let Some(not_after) = tls.server_not_after() {
        events::server_cert_expiry(not_after);
    }
    let admission = Arc::new(Admission::new(&cfg.quota));
    let sink = Arc::new(KafkaSink::new(&cfg.kafka).context("creating Kafka producer")?);
    // Restore sequence windows before accepting any connection: replays of what
    // another (or an earlier) node stored are refused from the first batch on.
    let windows = ReplayWindows::new(cfg.sequence.window);
    let (kafka_cfg, loader_windows) = (cfg.kafka.clone(), windows.clone());
    let in_doubt_ttl = cfg.sequence.in_doubt_ttl;
    let (restored, follower) = tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(30);
        crate::device_state::load(&kafka_cfg, &loader_windows, in_doubt_ttl, timeout)
    })
    .await
    .context("device state loader")?
    .context("restoring device state from Kafka")?;
    events::device_state_restored(restored);
    let stop_following = Arc::new(AtomicBool::new(false));
    let following = {
        let (windows, stop, node) = (windows.clone(), stop_following.clone(), cfg.node_id.clone());
        std::thread::Builder::new()
            .name("device-state-follower".into())
            .spawn(move || {
                crate::device_state::follow(follower, &windows, &node, in_doubt_ttl, &stop)
            })
            .context("spawning device state follower")?
    };
    let evictor = tokio::spawn(evict_idle_devices(
        windows.clone(),
        cfg.sequence.idle_evict_after,
        in_doubt_ttl,
        shutdown.clone(),
    ));
    let live = LiveConnections::new(cfg.identity.clone_policy);
    // Quarantine decisions in force before the first connection, then followed live.
    let quarantine = QuarantineTable::new();
    let (kafka_cfg, table) = (cfg.kafka.clone(), quarantine.clone());
    let (quarantined, q_follower) = tokio::task::spawn_blocking(move || {
        crate::quarantine::load(&kafka_cfg, &table, Duration::from_secs(30))
    })
    .await
    .context("quarantine loader")?
    .context("restoring quarantine decisions from Kafka")?;
    tracing::info!(decisions = quarantined, "quarantine decisions restored");
    let q_following = {
        let (table, stop) = (quarantine.clone(), stop_following.clone());
        std::thread::Builder::new()
            .name("quarantine-follower".into())
            .spawn(move || crate::quarantine::follow(q_follower, &table, &stop))
            .context("spawning quarantine follower")?
    };
    let pipeline = Pipeline::new(
        cfg.limits.clone(),
        SignalCatalog::new(cfg.catalog.signals.clone()),
        FreshnessWindow::new(&cfg.freshness),
        windows.clone(),
    );
    let handler = Arc::new(BatchHandler::new(
        pipeline,
        quarantine.clone(),
        admission.clone(),
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

    let housekeeping = tokio::spawn(admission_housekeeping(handler.clone(), shutdown.clone()));
    let reloader = reload.map(|source| {
        tokio::spawn(reload_on_sighup(
            source,
            cfg.clone(),
            admission.clone(),
            shutdown.clone(),
        ))
    });
    let crl_watch = cfg.tls.crl.clone().map(|path| {
        tokio::spawn(crate::revocation::watch_crl(
            path,
            cfg.tls.crl_reload_interval,
            tls.verifier.clone(),
            live.clone(),
            handler.clone(),
            shutdown.clone(),
        ))
    });
    let health = Health {
        metrics,
        ready: ready.clone(),
        windows: windows.clone(),
        live: live.clone(),
    };
    let http = axum::Router::new()
        .route(
            "/metrics",
            get(|State(h): State<Health>| async move { h.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/devices/{fleet}/{device}", get(device_view))
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
        grpc::Admission {
            trust_domain: tls.trust_domain().to_owned(),
            node_id: Arc::from(cfg.node_id.as_str()),
            live: live.clone(),
            handler: handler.clone(),
        },
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
        live.clone(),
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
    evictor.abort();
    housekeeping.abort();
    if let Some(r) = reloader {
        r.abort();
    }
    if let Some(w) = crl_watch {
        w.abort();
    }
    stop_following.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || (following.join(), q_following.join())).await;
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
