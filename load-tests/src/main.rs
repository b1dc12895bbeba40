//! `fleetgate-loadgen`: synthetic fleets over real mTLS connections to ingest.

mod fleet;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use fleetgate_loadgen::report::Report;

use crate::fleet::{load_credentials, run_fleet, FleetPlan, Target};

#[derive(Parser)]
#[command(version, about = "Load generator for fleetgate ingest")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive N devices of one fleet concurrently, M batches of K events each.
    Fleet(FleetArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Transport {
    /// gRPC `Publish` stream over HTTP/2 (needs --endpoint).
    Grpc,
    /// QUIC, one stream per batch (needs --quic-addr).
    Quic,
}

#[derive(clap::Args)]
struct FleetArgs {
    #[arg(long, value_enum, default_value = "grpc")]
    transport: Transport,
    /// gRPC endpoint, e.g. https://localhost:7443 (for --transport grpc).
    #[arg(long)]
    endpoint: Option<String>,
    /// QUIC address HOST:PORT, e.g. 127.0.0.1:7444 (for --transport quic). A host name
    /// is resolved once and its first address used; the TLS name is --server-name.
    #[arg(long)]
    quic_addr: Option<String>,
    /// Directory made by `fleetgate-pki init` (ca.pem) and `fleetgate-pki device`.
    #[arg(long)]
    pki_dir: PathBuf,
    #[arg(long)]
    fleet: String,
    #[arg(long, default_value = "car")]
    device_prefix: String,
    #[arg(long, default_value_t = 10)]
    devices: usize,
    #[arg(long, default_value_t = 10)]
    batches: u64,
    #[arg(long, default_value_t = 50)]
    events_per_batch: u64,
    /// Name the ingest server certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Attempts per event when the server answers RETRY (first send included).
    #[arg(long, default_value_t = 5)]
    max_attempts: u32,
    /// Pause between a device's batches, in milliseconds.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    #[arg(long, default_value = "fw-1.4.2")]
    software_version: String,
    /// Defaults to `vc-<fleet>-2024a`.
    #[arg(long)]
    vehicle_config_id: Option<String>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Command::Fleet(args) = Cli::parse().command;
    if args.devices == 0
        || args.batches == 0
        || args.events_per_batch == 0
        || args.max_attempts == 0
    {
        bail!("--devices, --batches, --events-per-batch and --max-attempts must be at least 1");
    }
    let target = match args.transport {
        Transport::Grpc => Target::Grpc {
            endpoint: args
                .endpoint
                .context("--transport grpc needs --endpoint (e.g. https://localhost:7443)")?,
        },
        Transport::Quic => {
            let hostport = args
                .quic_addr
                .context("--transport quic needs --quic-addr HOST:PORT (e.g. 127.0.0.1:7444)")?;
            let addr = tokio::net::lookup_host(hostport.as_str())
                .await
                .with_context(|| format!("resolving --quic-addr {hostport}"))?
                .next()
                .with_context(|| format!("--quic-addr {hostport} resolves to no address"))?;
            Target::Quic { addr }
        }
    };
    let ca_path = args.pki_dir.join("ca.pem");
    let server_ca_pem = std::fs::read_to_string(&ca_path)
        .with_context(|| format!("reading {}", ca_path.display()))?;
    let devices = load_credentials(
        &args.pki_dir,
        &args.fleet,
        &args.device_prefix,
        args.devices,
    )?;
    let transport = target.transport();
    let plan = FleetPlan {
        target,
        server_name: args.server_name,
        batches: args.batches,
        events_per_batch: args.events_per_batch,
        max_attempts: args.max_attempts,
        interval: Duration::from_millis(args.interval_ms),
        software_version: args.software_version,
        vehicle_config_id: args
            .vehicle_config_id
            .unwrap_or_else(|| format!("vc-{}-2024a", args.fleet)),
    };

    let (outcomes, elapsed) = run_fleet(plan, server_ca_pem, devices).await;
    let report = Report::new(&args.fleet, transport, outcomes, elapsed);
    print!("{report}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !report.all_accepted() {
        bail!(
            "{} of {} events not accepted",
            report.events_sent - report.accepted,
            report.events_sent
        );
    }
    Ok(())
}
