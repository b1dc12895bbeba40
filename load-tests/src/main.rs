//! `fleetgate-loadgen`: synthetic fleets over real mTLS connections to ingest.

mod fleet;
mod progress;
mod replay;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use fleetgate_loadgen::report::Report;

use crate::fleet::{load_credentials, run_fleet, ConnectPacing, FleetPlan, Target};
use crate::progress::ProgressMode;

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
    /// Synthesize a recording of a realistic fleet (deterministic for a seed).
    Generate(GenerateArgs),
    /// Replay a recording against ingest, one connection and certificate per device.
    Replay(ReplayArgs),
    /// Produce a recording's events straight to Kafka (ingest's producer settings): the
    /// baseline end-to-end throughput is compared with.
    Raw(RawArgs),
    /// Capture live traffic: devices connect here, batches are forwarded to ingest
    /// and written to a recording.
    Record(fleetgate_loadgen::record::RecordArgs),
}

#[derive(clap::Args)]
struct RawArgs {
    #[arg(long)]
    recording: PathBuf,
    #[arg(long, env = "FLEETGATE_BOOTSTRAP_SERVERS")]
    bootstrap_servers: String,
    /// Topic to produce to (same broker, same partition count as the events topic).
    #[arg(long, default_value = "bench.raw.v1")]
    topic: String,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Recording file to write (see docs/recordings.md).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 10)]
    devices: u32,
    /// Recorded time span, e.g. 10m, 90s.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How often a connected device sends what it sampled.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    batch_interval: Duration,
    /// How often each vehicle samples its signals.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    sample_interval: Duration,
    #[arg(long, default_value = "fleet-sim")]
    fleet: String,
    #[arg(long, default_value = "car")]
    device_prefix: String,
    /// Chance per batch that a device loses connectivity for 10 s to 2 min.
    #[arg(long, default_value_t = 0.004)]
    gap_probability: f64,
    /// Unix ms stored in the header; default 0 keeps the file a function of the flags.
    #[arg(long, default_value_t = 0)]
    created_at_ms: i64,
}

#[derive(clap::Args)]
struct ReplayArgs {
    #[arg(long)]
    recording: PathBuf,
    #[command(flatten)]
    ingest: IngestArgs,
    /// Directory with ca.pem; device certificates are read from
    /// devices/<fleet>/<device>.{pem,key} or, when missing, issued with ca.key.
    #[arg(long)]
    pki_dir: PathBuf,
    /// Trust domain of certificates issued on the fly.
    #[arg(long, default_value = "fleetgate.local")]
    trust_domain: String,
    /// 1 = real time, N = N times faster, max = back to back.
    #[arg(long, default_value = "1")]
    speed: fleetgate_loadgen::replay_plan::Speed,
    /// Attempts per event when the server answers RETRY (first send included).
    #[arg(long, default_value_t = 5)]
    max_attempts: u32,
    /// Connection attempts per device after its connection fails (whole run).
    #[arg(long, default_value_t = 10)]
    max_reconnects: u32,
    /// Attack scenarios to mix in (comma-separated, or `all`): replayed-batches,
    /// stale-clock, future-clock, wrong-device, oversized, malformed.
    #[arg(long)]
    attack: Option<String>,
    /// Ingest's limits.max_frame_bytes (the oversized attack sends one byte more).
    #[arg(long, default_value_t = 1024 * 1024)]
    max_frame_bytes: usize,
    #[command(flatten)]
    progress: ProgressArgs,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Progress on stderr: bars on a terminal, plain lines when stderr is redirected.
#[derive(clap::Args)]
struct ProgressArgs {
    /// Interval of plain progress lines when stderr is not a terminal (0s: no progress
    /// at all). On a terminal, bars are redrawn several times a second instead.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    progress_every: Duration,
    /// No progress bars or lines (same as --progress-every 0s).
    #[arg(long)]
    no_progress: bool,
}

impl ProgressArgs {
    fn mode(&self) -> ProgressMode {
        ProgressMode::choose(
            self.progress_every,
            self.no_progress,
            std::io::stderr().is_terminal(),
        )
    }
}

/// Where ingest is, for the commands that drive devices against it.
#[derive(clap::Args)]
struct IngestArgs {
    #[arg(long, value_enum, default_value = "grpc")]
    transport: Transport,
    /// gRPC endpoint, e.g. https://localhost:7443 (for --transport grpc).
    #[arg(long)]
    endpoint: Option<String>,
    /// QUIC address HOST:PORT, e.g. 127.0.0.1:7444 (for --transport quic). A host name
    /// is resolved once and its first address used; the TLS name is --server-name.
    #[arg(long)]
    quic_addr: Option<String>,
    /// Name the ingest server certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
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
    #[command(flatten)]
    ingest: IngestArgs,
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
    /// Attempts per event when the server answers RETRY (first send included).
    #[arg(long, default_value_t = 5)]
    max_attempts: u32,
    /// Pause between a device's batches, in milliseconds.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Devices started per second: device i opens its first connection i/N s after
    /// the start (0: all at once).
    #[arg(long, default_value_t = 0)]
    connect_rate: u32,
    #[arg(long, default_value = "fw-1.4.2")]
    software_version: String,
    /// Defaults to `vc-<fleet>-2024a`.
    #[arg(long)]
    vehicle_config_id: Option<String>,
    #[command(flatten)]
    progress: ProgressArgs,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Fleet(args) => fleet_main(args).await,
        Command::Generate(args) => generate_main(args),
        Command::Replay(args) => replay_main(args).await,
        Command::Raw(args) => raw_main(args).await,
        Command::Record(args) => fleetgate_loadgen::record::run(args).await,
    }
}

async fn raw_main(args: RawArgs) -> anyhow::Result<()> {
    use fleetgate_loadgen::recording::RecordingReader;
    let file = std::fs::File::open(&args.recording)
        .with_context(|| format!("opening {}", args.recording.display()))?;
    let (header, batches) = RecordingReader::new(std::io::BufReader::new(file))
        .and_then(RecordingReader::read_all)
        .with_context(|| format!("reading recording {}", args.recording.display()))?;
    let report = fleetgate_loadgen::raw::produce(
        &args.bootstrap_servers,
        &args.topic,
        &header.fleet_id,
        &batches,
    )
    .await?;
    println!(
        "raw producer: {} events to {} in {:.2} s: {:.0} events/s",
        report.events, report.topic, report.elapsed_s, report.events_per_s
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn generate_main(args: GenerateArgs) -> anyhow::Result<()> {
    use fleetgate_loadgen::generate::{generate, GenerateSpec};
    use fleetgate_loadgen::recording::RecordingWriter;
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let mut spec = GenerateSpec::new(&args.fleet, args.devices, ms(args.duration), args.seed);
    spec.device_prefix = args.device_prefix;
    spec.batch_interval_ms = ms(args.batch_interval);
    spec.sample_interval_ms = ms(args.sample_interval);
    spec.gap_probability = args.gap_probability;
    spec.created_at_ms = args.created_at_ms;
    if let Err(e) = spec.validate() {
        bail!("{e}");
    }
    let (header, batches) = generate(&spec);
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut w = RecordingWriter::new(std::io::BufWriter::new(file), &header)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let mut events = 0usize;
    for b in &batches {
        w.write_batch(b)
            .with_context(|| format!("writing {}", args.out.display()))?;
        events += <fleetgate_proto::TelemetryBatch as prost::Message>::decode(b.batch.as_slice())
            .map(|t| t.events.len())
            .unwrap_or(0);
    }
    w.finish()
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "wrote {}: fleet {}, {} devices, {} batches, {} events",
        args.out.display(),
        header.fleet_id,
        header.devices,
        batches.len(),
        events
    );
    Ok(())
}

async fn resolve_target(
    transport: Transport,
    endpoint: Option<String>,
    quic_addr: Option<String>,
) -> anyhow::Result<Target> {
    Ok(match transport {
        Transport::Grpc => Target::Grpc {
            endpoint: endpoint
                .context("--transport grpc needs --endpoint (e.g. https://localhost:7443)")?,
        },
        Transport::Quic => {
            let hostport = quic_addr
                .context("--transport quic needs --quic-addr HOST:PORT (e.g. 127.0.0.1:7444)")?;
            let addr = tokio::net::lookup_host(hostport.as_str())
                .await
                .with_context(|| format!("resolving --quic-addr {hostport}"))?
                .next()
                .with_context(|| format!("--quic-addr {hostport} resolves to no address"))?;
            Target::Quic { addr }
        }
    })
}

async fn replay_main(args: ReplayArgs) -> anyhow::Result<()> {
    use fleetgate_loadgen::recording::RecordingReader;
    use fleetgate_loadgen::replay_plan::plan_devices;
    if args.max_attempts == 0 {
        bail!("--max-attempts must be at least 1");
    }
    let file = std::fs::File::open(&args.recording)
        .with_context(|| format!("opening {}", args.recording.display()))?;
    let (header, batches) = RecordingReader::new(std::io::BufReader::new(file))
        .and_then(RecordingReader::read_all)
        .with_context(|| format!("reading recording {}", args.recording.display()))?;
    let plan = plan_devices(batches)?;
    if plan.is_empty() {
        bail!("{} holds no batches", args.recording.display());
    }
    let target = resolve_target(
        args.ingest.transport,
        args.ingest.endpoint,
        args.ingest.quic_addr,
    )
    .await?;
    let transport = target.transport();
    let ca_path = args.pki_dir.join("ca.pem");
    let server_ca_pem = std::fs::read_to_string(&ca_path)
        .with_context(|| format!("reading {}", ca_path.display()))?;
    let attacks = match &args.attack {
        Some(list) => fleetgate_loadgen::attack::parse_list(list)
            .map_err(|e| anyhow::anyhow!("--attack: {e}"))?,
        None => Vec::new(),
    };
    let mut ids: Vec<String> = plan.iter().map(|d| d.device_id.clone()).collect();
    ids.extend(attacks.iter().map(|a| a.device_id()));
    let (mut creds, issued) =
        replay::credentials(&args.pki_dir, &header.fleet_id, &args.trust_domain, &ids)?;
    if issued > 0 {
        eprintln!(
            "issued {issued} device certificates on the fly (trust domain {})",
            args.trust_domain
        );
    }
    let attacker_creds = creds.split_off(plan.len());
    eprintln!(
        "replaying {} devices of fleet {} at speed {} over {transport}",
        plan.len(),
        header.fleet_id,
        args.speed
    );
    let opts = replay::ReplayOptions {
        target,
        server_name: args.ingest.server_name,
        speed: args.speed,
        max_attempts: args.max_attempts,
        max_reconnects: args.max_reconnects,
        max_frame_bytes: args.max_frame_bytes,
        progress: args.progress.mode(),
    };
    let (outcomes, elapsed, attack_results) = replay::run_replay(
        opts,
        server_ca_pem,
        plan.into_iter().zip(creds).collect(),
        attacks.into_iter().zip(attacker_creds).collect(),
    )
    .await;
    let mut report = Report::new(&header.fleet_id, transport, outcomes, elapsed);
    report.attacks = attack_results;
    finish(report, args.json.as_deref())
}

/// Prints the report, writes the JSON file, and fails when anything was lost or an
/// attack was not answered as expected.
fn finish(report: Report, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    print!("{report}");
    if let Some(path) = json {
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
    if !report.attacks_as_expected() {
        bail!("an attack scenario was not answered as expected (see report)");
    }
    Ok(())
}

async fn fleet_main(args: FleetArgs) -> anyhow::Result<()> {
    if args.devices == 0
        || args.batches == 0
        || args.events_per_batch == 0
        || args.max_attempts == 0
    {
        bail!("--devices, --batches, --events-per-batch and --max-attempts must be at least 1");
    }
    let target = resolve_target(
        args.ingest.transport,
        args.ingest.endpoint,
        args.ingest.quic_addr,
    )
    .await?;
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
    let connect_pacing = ConnectPacing::per_sec(args.connect_rate);
    if args.connect_rate > 0 {
        eprintln!(
            "starting {} devices at {}/s: the last starts after {:.1} s",
            args.devices,
            args.connect_rate,
            connect_pacing.spread(args.devices).as_secs_f64()
        );
    }
    let plan = FleetPlan {
        target,
        server_name: args.ingest.server_name,
        batches: args.batches,
        events_per_batch: args.events_per_batch,
        max_attempts: args.max_attempts,
        interval: Duration::from_millis(args.interval_ms),
        software_version: args.software_version,
        vehicle_config_id: args
            .vehicle_config_id
            .unwrap_or_else(|| format!("vc-{}-2024a", args.fleet)),
        connect_pacing,
    };

    let (outcomes, elapsed) = run_fleet(plan, server_ca_pem, devices, args.progress.mode()).await;
    let report = Report::new(&args.fleet, transport, outcomes, elapsed);
    finish(report, args.json.as_deref())
}
