//! `fleetgate-processor`: downstream consumers of the telemetry topics.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Consumers downstream of fleetgate ingest")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the anomaly detectors as a consumer group: findings to the anomalies topic,
    /// quarantine decisions to the quarantine topic.
    Run {
        /// TOML configuration file; FLEETGATE_* variables override it.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Print the effective configuration and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Read a topic from beginning to its current end and summarize it, deduped.
    Summarize {
        #[arg(long, env = "FLEETGATE_BOOTSTRAP_SERVERS")]
        bootstrap_servers: String,
        #[arg(long, default_value = "telemetry.events.v1")]
        topic: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// After every partition reached its start-time end, keep reading for this
        /// many milliseconds (for records a broker reported short).
        #[arg(long, default_value_t = 1000)]
        settle_ms: u64,
        /// Give up when no record arrives for this many seconds.
        #[arg(long, default_value_t = 30)]
        idle_timeout_secs: u64,
    },
    /// Write accepted events to Parquet files partitioned by fleet and hour; prints
    /// counters as JSON on exit.
    Parquet(fleetgate_processor::parquet::ParquetArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run {
            config,
            print_config,
        } => fleetgate_processor::run::run_command(config.as_deref(), print_config)?,
        Command::Summarize {
            bootstrap_servers,
            topic,
            json,
            settle_ms,
            idle_timeout_secs,
        } => {
            let summary = fleetgate_processor::summarize_topic(
                &bootstrap_servers,
                &topic,
                Duration::from_millis(settle_ms),
                Duration::from_secs(idle_timeout_secs),
            )
            .with_context(|| format!("summarizing {topic} at {bootstrap_servers}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{summary}");
            }
        }
        Command::Parquet(args) => {
            let (opts, schema) = args.into_options()?;
            let stop = fleetgate_processor::parquet::stop_on_signal();
            let stats = fleetgate_processor::parquet::run_parquet_sink(&opts, schema, &stop)
                .with_context(|| {
                    format!(
                        "parquet sink from {} into {}",
                        opts.topic,
                        opts.out.display()
                    )
                })?;
            println!("{}", serde_json::to_string(&stats)?);
        }
    }
    Ok(())
}
