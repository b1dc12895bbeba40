//! `fleetgate-quarantine`: list, inspect, quarantine and release devices on
//! `fleet.quarantine.v1`. Every write is an operator-signed decision that stays in the
//! device's history as its own audit record; a credential that does not verify against
//! the fleet CA as an operator is refused before anything is written.

mod render;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use fleetgate_proto::{QuarantineDecision, QuarantineState};
use fleetgate_quarantine::{
    client_config, History, ListFilter, Publisher, ReadOptions, RecordValue, Registry, Signer,
    TopicReader, Verifier, DEFAULT_TOPIC,
};

#[derive(Parser)]
#[command(
    version,
    about = "Operator CLI for fleetgate quarantine decisions (fleet.quarantine.v1)"
)]
struct Cli {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        global = true,
        env = "FLEETGATE_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    bootstrap_servers: String,
    /// Quarantine decisions topic.
    #[arg(long, global = true, env = "FLEETGATE_QUARANTINE_TOPIC", default_value = DEFAULT_TOPIC)]
    topic: String,
    /// Fleet CA certificate (PEM): verifies operator signatures (`show`) and the
    /// operator credential (writes).
    #[arg(long, global = true, env = "FLEETGATE_CA")]
    ca: Option<PathBuf>,
    /// Operator certificate (PEM) with URI SAN spiffe://<td>/operator/<name>; required for writes.
    #[arg(long, global = true, env = "FLEETGATE_OPERATOR_CERT")]
    operator_cert: Option<PathBuf>,
    /// Private key (PKCS#8 PEM) of --operator-cert.
    #[arg(long, global = true, env = "FLEETGATE_OPERATOR_KEY")]
    operator_key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Devices quarantined now (with --all: every device's latest decision).
    List {
        #[arg(long)]
        fleet: Option<String>,
        /// Only decisions whose reason contains this text (case-insensitive).
        #[arg(long)]
        reason: Option<String>,
        /// Include released devices and expired quarantines.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// A device's full decision history with evidence and signature checks.
    Show {
        #[arg(long)]
        fleet: String,
        #[arg(long)]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Quarantine a device: its events are diverted until released or expired.
    Quarantine {
        #[arg(long)]
        fleet: String,
        #[arg(long)]
        device: String,
        /// Why (kept in the audit trail).
        #[arg(long)]
        reason: String,
        /// Lift the quarantine automatically after this long (e.g. 24h); default never.
        #[arg(long)]
        expires_in: Option<humantime::Duration>,
    },
    /// Release a device.
    Release {
        #[arg(long)]
        fleet: String,
        #[arg(long)]
        device: String,
        /// Why (kept in the audit trail).
        #[arg(long)]
        reason: String,
    },
}

fn main() -> std::process::ExitCode {
    // Operators read this: one line with the cause chain, no backtrace.
    match run(&Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The cause chain on one line, without causes already quoted by their parent.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::List {
            fleet,
            reason,
            all,
            json,
        } => {
            let registry = read_registry(cli)?;
            let filter = ListFilter {
                fleet: fleet.clone(),
                reason: reason.clone(),
                include_released: *all,
            };
            let now = now_ms();
            let rows = registry.list(&filter, now);
            if *json {
                println!("{}", render::list_json(&rows, now));
            } else {
                print!("{}", render::list_text(&rows, now, *all));
            }
        }
        Command::Show {
            fleet,
            device,
            json,
        } => {
            check_component("--fleet", fleet)?;
            check_component("--device", device)?;
            let verifier = match &cli.ca {
                Some(path) => Some(Verifier::from_ca_pem(&read(path)?)?),
                None => None,
            };
            let history = read_history(cli)?;
            let entries = history.of(fleet, device);
            let now = now_ms();
            if *json {
                println!(
                    "{}",
                    render::show_json(fleet, device, entries, verifier.as_ref(), now)
                );
            } else {
                print!(
                    "{}",
                    render::show_text(fleet, device, entries, verifier.as_ref(), now)
                );
            }
        }
        Command::Quarantine {
            fleet,
            device,
            reason,
            expires_in,
        } => {
            let now = now_ms();
            let expires_at_ms = match expires_in {
                None => 0,
                Some(d) => now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            };
            write(
                cli,
                fleet,
                device,
                QuarantineState::Quarantined,
                reason,
                expires_at_ms,
            )?;
        }
        Command::Release {
            fleet,
            device,
            reason,
        } => write(cli, fleet, device, QuarantineState::Released, reason, 0)?,
    }
    Ok(())
}

/// Builds, signs, self-verifies and publishes one operator decision.
fn write(
    cli: &Cli,
    fleet: &str,
    device: &str,
    state: QuarantineState,
    reason: &str,
    expires_at_ms: i64,
) -> anyhow::Result<()> {
    check_component("--fleet", fleet)?;
    check_component("--device", device)?;
    if reason.trim().is_empty() {
        bail!("--reason must not be empty: it is the audit trail's explanation");
    }
    let (Some(cert), Some(key)) = (&cli.operator_cert, &cli.operator_key) else {
        bail!(
            "writing a decision needs an operator credential: pass --operator-cert and \
             --operator-key (issue one with `fleetgate-pki operator`)"
        );
    };
    let Some(ca) = &cli.ca else {
        bail!("writing a decision needs --ca (the fleet CA) to check the operator credential");
    };
    let verifier = Verifier::from_ca_pem(&read(ca)?)
        .with_context(|| format!("loading CA {}", ca.display()))?;
    let signer = Signer::from_pem(&read(cert)?, &read(key)?)
        .with_context(|| format!("operator credential {} refused", cert.display()))?;
    let now = now_ms();
    let decision = QuarantineDecision {
        fleet_id: fleet.to_owned(),
        device_id: device.to_owned(),
        state: state as i32,
        reason: reason.trim().to_owned(),
        evidence: Vec::new(),
        decided_by: signer.operator().decided_by(),
        decided_at_ms: now,
        expires_at_ms,
        decision_id: hex::encode(rand::random::<[u8; 16]>()),
        first_offending_received_at_ms: 0,
        signer_cert_der: Vec::new(),
        signature: Vec::new(),
    };
    let signed = fleetgate_quarantine::sign(decision, &signer)?;
    // Publish only what `show` will verify: chain to --ca, operator SAN, signature.
    verifier
        .verify(&signed, now)
        .with_context(|| format!("operator credential {} refused", cert.display()))?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let publisher = Publisher::new(&client_config(&cli.bootstrap_servers), &cli.topic)?;
    let at = runtime
        .block_on(publisher.publish(&signed))
        .with_context(|| format!("publishing to {}", cli.topic))?;
    let verb = match state {
        QuarantineState::Quarantined => "quarantined",
        _ => "released",
    };
    let expiry = if expires_at_ms > 0 {
        format!(", expires {}", render::time(expires_at_ms))
    } else {
        String::new()
    };
    println!(
        "{verb} {fleet}/{device} by {} (decision {}{expiry}) at {} partition {} offset {}",
        signed.decided_by, signed.decision_id, cli.topic, at.partition, at.offset
    );
    Ok(())
}

fn reader(cli: &Cli) -> anyhow::Result<(TopicReader, ReadOptions)> {
    let opts = ReadOptions::default();
    let reader = TopicReader::open(
        &client_config(&cli.bootstrap_servers),
        &cli.topic,
        opts.request_timeout,
    )?;
    Ok((reader, opts))
}

fn read_registry(cli: &Cli) -> anyhow::Result<Registry> {
    let (mut reader, opts) = reader(cli)?;
    let mut registry = Registry::new();
    let mut skipped = 0usize;
    reader.catch_up(&opts, |record| {
        if let Err(e) = record.apply_to(&mut registry) {
            skipped += 1;
            eprintln!("warning: skipped a record of {}: {e}", cli.topic);
        }
    })?;
    if skipped > 0 {
        eprintln!("warning: {skipped} invalid record(s) skipped");
    }
    Ok(registry)
}

fn read_history(cli: &Cli) -> anyhow::Result<History> {
    let (mut reader, opts) = reader(cli)?;
    let mut history = History::new();
    reader.catch_up(&opts, |record| {
        if let RecordValue::Decision(d) = record.value {
            // Only valid decisions reach here; record() cannot refuse them.
            let _ = history.record(record.position, d);
        }
    })?;
    Ok(history)
}

/// Fleet and device ids are SPIFFE path segments; a `/` would also forge the key.
fn check_component(flag: &str, value: &str) -> anyhow::Result<()> {
    if value.is_empty()
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        bail!("{flag} {value:?}: use [A-Za-z0-9._-]");
    }
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as i64
}
