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
        print!("{}", fleetgate_config::render(&redacted(&cfg)));
        return Ok(());
    }
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    fleetgate_config::process::init_logging(&cfg.log_format);
    let runtime = tokio::runtime::Runtime::new().context("starting runtime")?;
    runtime.block_on(async move {
        let metrics = app::install_metrics()?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            fleetgate_config::process::shutdown_signal().await;
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

/// The config with secret-looking Kafka properties masked, for `--print-config`.
fn redacted(cfg: &IngestConfig) -> IngestConfig {
    let mut shown = cfg.clone();
    for (key, value) in shown.kafka.properties.iter_mut() {
        let k = key.to_ascii_lowercase();
        if ["password", "secret", "token", "key"]
            .iter()
            .any(|s| k.contains(s))
            && !k.ends_with(".location")
        {
            *value = "<redacted>".into();
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn print_config_masks_secrets_but_not_file_locations() {
        let mut cfg = IngestConfig::default();
        for (k, v) in [
            ("sasl.password", "hunter2"),
            ("ssl.key.password", "k"),
            ("ssl.key.location", "/etc/kafka/client.key"),
            ("linger.ms", "5"),
        ] {
            cfg.kafka.properties.insert(k.into(), v.into());
        }
        let shown = redacted(&cfg).kafka.properties;
        assert_eq!(shown["sasl.password"], "<redacted>");
        assert_eq!(shown["ssl.key.password"], "<redacted>");
        assert_eq!(shown["ssl.key.location"], "/etc/kafka/client.key");
        assert_eq!(shown["linger.ms"], "5");
        assert_eq!(
            cfg.kafka.properties["sasl.password"], "hunter2",
            "running config untouched"
        );
    }
}
