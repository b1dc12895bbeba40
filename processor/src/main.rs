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
    /// Read a topic from beginning to its current end and summarize it, deduped.
    Summarize {
        #[arg(long, env = "FLEETGATE_BOOTSTRAP_SERVERS")]
        bootstrap_servers: String,
        #[arg(long, default_value = "telemetry.events.v1")]
        topic: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// After every partition reached its start-time end, keep reading until no
        /// record arrived for this many milliseconds.
        #[arg(long, default_value_t = 1000)]
        settle_ms: u64,
        /// Give up when no record arrives for this many seconds.
        #[arg(long, default_value_t = 30)]
        idle_timeout_secs: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
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
    }
    Ok(())
}
