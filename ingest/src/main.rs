//! `fleetgate-ingest`: the device-facing ingest node.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use fleetgate_ingest::{app, config::IngestConfig};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    version,
    about = "fleetgate ingest node (gRPC and QUIC over mTLS -> Kafka)"
)]
struct Cli {
    /// TOML configuration file; FLEETGATE_* variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg: IngestConfig =
        fleetgate_config::load(cli.config.as_deref()).context("loading configuration")?;
    if cli.print_config {
        print!("{}", fleetgate_config::render(&cfg));
        return Ok(());
    }
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    init_logging(&cfg.log_format);
    let runtime = tokio::runtime::Runtime::new().context("starting runtime")?;
    runtime.block_on(async move {
        let metrics = app::install_metrics()?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            let _ = tx.send(true);
        });
        let path = cli.config.clone();
        let source: app::ConfigSource = Box::new(move || {
            fleetgate_config::load(path.as_deref()).context("re-reading configuration")
        });
        app::run(cfg, metrics, rx, Some(source), |bound| {
            // Machine-readable line for scripts and tests that bind port 0.
            println!(
                "fleetgate-ingest ready grpc={} metrics={} quic={}",
                bound.grpc, bound.metrics, bound.quic
            );
        })
        .await
    })
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEETGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
