//! `fleetgate-loadgen record`: a recording proxy. Real device clients connect to the
//! recorder instead of ingest (gRPC and/or QUIC, mTLS checked exactly as ingest checks
//! it); every batch is written to a recording when it arrives, then forwarded to the
//! real ingest on a connection authenticated as that device, and ingest's ack is
//! relayed back unchanged. Devices see real acks; the recording holds what they sent.
//! See docs/recordings.md, "Capturing live traffic".

pub mod capture;
mod grpc;
mod quic;
mod sink;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use fleetgate_ingest::identity::FleetId;
use fleetgate_ingest::quic::QuicConfig;
use fleetgate_ingest::tls::{peer_identity, ServerTls, TlsConfig};
use fleetgate_proto::TelemetryBatch;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_rustls::rustls::pki_types::CertificateDer;

use self::sink::{Captured, SinkSpec};
use self::upstream::UpstreamTargets;
use crate::credentials::{CredentialStore, DeviceCredentials};

/// Command-line arguments of `fleetgate-loadgen record`.
#[derive(clap::Args, Debug, Clone)]
pub struct RecordArgs {
    /// Address gRPC devices connect to instead of ingest, e.g. 0.0.0.0:7443 (port 0:
    /// any free port; the bound address is printed).
    #[arg(long)]
    pub listen_grpc: Option<SocketAddr>,
    /// Address QUIC devices connect to instead of ingest, e.g. 0.0.0.0:7444.
    #[arg(long)]
    pub listen_quic: Option<SocketAddr>,
    /// Ingest's gRPC endpoint, e.g. https://localhost:7443 (required with --listen-grpc).
    #[arg(long)]
    pub upstream_grpc: Option<String>,
    /// Ingest's QUIC address HOST:PORT (required with --listen-quic).
    #[arg(long)]
    pub upstream_quic: Option<String>,
    /// Name ingest's server certificate must carry.
    #[arg(long, default_value = "localhost")]
    pub upstream_server_name: String,
    /// CA of ingest's server certificate (default: <pki-dir>/ca.pem).
    #[arg(long)]
    pub upstream_ca: Option<PathBuf>,
    /// Directory made by `fleetgate-pki init`: ca.pem (device CA), server.pem/.key (the
    /// recorder's certificate), ca.key and devices/<fleet>/<device>.{pem,key} (the
    /// identities batches are forwarded with; missing ones are issued with ca.key).
    #[arg(long)]
    pub pki_dir: PathBuf,
    /// The recorder's server certificate (default: <pki-dir>/server.pem).
    #[arg(long)]
    pub server_cert: Option<PathBuf>,
    /// The recorder's server key (default: <pki-dir>/server.key).
    #[arg(long)]
    pub server_key: Option<PathBuf>,
    /// CA bundle device certificates must chain to (default: <pki-dir>/ca.pem).
    #[arg(long)]
    pub client_ca: Option<PathBuf>,
    /// SPIFFE trust domain of device certificates (and of those issued on the fly).
    #[arg(long, default_value = "fleetgate.local")]
    pub trust_domain: String,
    /// The fleet being recorded; devices of any other fleet are refused.
    #[arg(long)]
    pub fleet: String,
    /// Recording file to write (complete only after the recorder stops).
    #[arg(long)]
    pub out: PathBuf,
    /// Stop after this long (e.g. 10m); without it, stop on SIGINT or SIGTERM.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Stored in the header.
    #[arg(long, default_value = "captured by fleetgate-loadgen record")]
    pub description: String,
    /// Largest frame read from a device; above it the frame is neither recorded nor
    /// forwarded (ingest answers `frame_too_large` above its own, smaller limit).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_frame_bytes: usize,
    /// After the stop, how long batches already forwarded may take to be acked.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
}

/// Checks what clap cannot; the message names the offending flag.
pub fn check_args(args: &RecordArgs) -> Result<(), String> {
    if args.listen_grpc.is_none() && args.listen_quic.is_none() {
        return Err("give --listen-grpc ADDR and/or --listen-quic ADDR".into());
    }
    if args.listen_grpc.is_some() && args.upstream_grpc.is_none() {
        return Err("--listen-grpc needs --upstream-grpc https://HOST:PORT: gRPC devices are forwarded to ingest over gRPC".into());
    }
    if args.listen_quic.is_some() && args.upstream_quic.is_none() {
        return Err("--listen-quic needs --upstream-quic HOST:PORT: QUIC devices are forwarded to ingest over QUIC".into());
    }
    if let Some(url) = &args.upstream_grpc {
        let ok = url
            .parse::<http::Uri>()
            .is_ok_and(|u| u.scheme_str() == Some("https") && u.authority().is_some());
        if !ok {
            return Err(format!(
                "--upstream-grpc {url:?}: expected https://HOST:PORT"
            ));
        }
    }
    if let Err(e) = FleetId::parse(&args.fleet) {
        return Err(format!("--fleet: {e}"));
    }
    if args.max_frame_bytes == 0 {
        return Err("--max-frame-bytes must be at least 1".into());
    }
    if args.duration.is_some_and(|d| d.is_zero()) {
        return Err("--duration must be positive".into());
    }
    Ok(())
}

/// What every connection of the recorder shares.
pub(crate) struct Recorder {
    fleet: String,
    trust_domain: String,
    /// Taken at the stop; a connection that finds it gone forwards nothing more.
    sink: Mutex<Option<mpsc::Sender<Captured>>>,
    credentials: CredentialStore,
    upstream: UpstreamTargets,
    max_frame_bytes: usize,
    stop: watch::Receiver<bool>,
    undecodable: AtomicU64,
    refused: AtomicU64,
    upstream_failures: AtomicU64,
}

/// The recording no longer takes batches (stopping, or the writer failed).
#[derive(Debug)]
pub(crate) struct SinkClosed;

impl Recorder {
    /// The device id of an authenticated connection, or why it is refused (logged).
    fn admit(
        &self,
        certs: Option<&[CertificateDer<'_>]>,
        transport: &str,
        remote: &str,
    ) -> Result<String, String> {
        let reason = match peer_identity(certs, &self.trust_domain) {
            Ok(id) if id.fleet_id.as_str() == self.fleet => return Ok(id.device_id.to_string()),
            Ok(id) => format!(
                "device {}/{} refused: this recorder records fleet {}",
                id.fleet_id, id.device_id, self.fleet
            ),
            Err(e) => format!("no device identity: {e}"),
        };
        self.refused.fetch_add(1, Ordering::Relaxed);
        eprintln!("record: {transport} connection from {remote}: {reason}");
        Err(reason)
    }

    fn credentials_for(&self, device: &str) -> Result<Arc<DeviceCredentials>, String> {
        self.credentials.get(device).map_err(|e| {
            let msg = format!("recorder: no credentials to forward {device}: {e}");
            self.upstream_failed(device, &msg);
            msg
        })
    }

    fn upstream_failed(&self, device: &str, detail: &str) {
        self.upstream_failures.fetch_add(1, Ordering::Relaxed);
        eprintln!("record: forwarding {device} to ingest failed: {detail}");
    }

    /// Records `frame` if it decodes as a batch (undecodable frames are forwarded
    /// but only counted: a replay could not send them as batches anyway).
    async fn capture(&self, device: &str, frame: &[u8]) -> Result<(), SinkClosed> {
        let arrived = Instant::now();
        let sink = self
            .sink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(SinkClosed)?;
        match TelemetryBatch::decode(frame) {
            Ok(batch) => sink
                .send(Captured {
                    device_id: device.to_owned(),
                    arrived,
                    batch,
                })
                .await
                .map_err(|_| SinkClosed),
            Err(_) => {
                self.undecodable.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    fn close_sink(&self) {
        self.sink.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Runs the recorder until `--duration` passes or SIGINT/SIGTERM, then writes the
/// recording and prints a summary.
pub async fn run(args: RecordArgs) -> anyhow::Result<()> {
    check_args(&args).map_err(anyhow::Error::msg)?;
    let pki = &args.pki_dir;
    let tls = ServerTls::load(&TlsConfig {
        server_cert: args
            .server_cert
            .clone()
            .unwrap_or_else(|| pki.join("server.pem")),
        server_key: args
            .server_key
            .clone()
            .unwrap_or_else(|| pki.join("server.key")),
        client_ca: args.client_ca.clone().unwrap_or_else(|| pki.join("ca.pem")),
        trust_domain: args.trust_domain.clone(),
        ..TlsConfig::default()
    })
    .context(
        "loading the recorder's TLS material (--pki-dir, --server-cert/--server-key, --client-ca)",
    )?;
    let ca_path = args
        .upstream_ca
        .clone()
        .unwrap_or_else(|| pki.join("ca.pem"));
    let server_ca_pem = std::fs::read_to_string(&ca_path)
        .with_context(|| format!("reading ingest's CA {}", ca_path.display()))?;
    let upstream_quic = match &args.upstream_quic {
        Some(hostport) => Some(
            tokio::net::lookup_host(hostport.as_str())
                .await
                .with_context(|| format!("resolving --upstream-quic {hostport}"))?
                .next()
                .with_context(|| format!("--upstream-quic {hostport} resolves to no address"))?,
        ),
        None => None,
    };
    if !pki.join("ca.key").is_file() {
        eprintln!(
            "record: note: no {}: only devices with a certificate in {} can be forwarded",
            pki.join("ca.key").display(),
            pki.join("devices").join(&args.fleet).display()
        );
    }

    // Signal handlers are in place before the ready line: a stop sent as soon as the
    // recorder says it listens is a clean stop, not a kill.
    let mut signals = StopSignals::install()?;
    let start = Instant::now();
    let (sink_tx, mut sink_task) = sink::spawn(SinkSpec {
        out: args.out.clone(),
        fleet_id: args.fleet.clone(),
        description: args.description.clone(),
        start,
        start_wall_ms: unix_ms_now(),
    })
    .context("creating the recording (--out)")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let rec = Arc::new(Recorder {
        fleet: args.fleet.clone(),
        trust_domain: args.trust_domain.clone(),
        sink: Mutex::new(Some(sink_tx)),
        credentials: CredentialStore::new(pki, &args.fleet, &args.trust_domain),
        upstream: UpstreamTargets {
            grpc: args.upstream_grpc.clone(),
            server_ca_pem,
            server_name: args.upstream_server_name.clone(),
        },
        max_frame_bytes: args.max_frame_bytes,
        stop: stop_rx.clone(),
        undecodable: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        upstream_failures: AtomicU64::new(0),
    });

    let mut servers = tokio::task::JoinSet::new();
    let mut ready = String::from("fleetgate-loadgen record ready");
    if let Some(addr) = args.listen_grpc {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --listen-grpc {addr}"))?;
        ready.push_str(&format!(" grpc={}", listener.local_addr()?));
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config(&[b"h2"])?);
        let incoming = grpc::incoming(listener, acceptor, stop_rx.clone());
        let mut stop = stop_rx.clone();
        let server = tonic::transport::Server::builder()
            .add_service(grpc::RecordService(rec.clone()))
            .serve_with_incoming_shutdown(incoming, async move { stopped(&mut stop).await });
        servers.spawn(async move {
            if let Err(e) = server.await {
                eprintln!("record: grpc server failed: {e}");
            }
        });
    }
    let mut quic_endpoint = None;
    if let (Some(addr), Some(upstream)) = (args.listen_quic, upstream_quic) {
        let cfg = QuicConfig {
            listen: addr,
            ..QuicConfig::default()
        };
        let endpoint =
            fleetgate_ingest::quic::bind(&cfg, tls.server_config(&[fleetgate_ingest::quic::ALPN])?)
                .with_context(|| format!("--listen-quic {addr}"))?;
        ready.push_str(&format!(" quic={}", endpoint.local_addr()?));
        quic_endpoint = Some(endpoint.clone());
        servers.spawn(quic::serve(endpoint, rec.clone(), upstream));
    }
    println!("{ready}");
    eprintln!(
        "record: recording fleet {} to {}; stop with SIGINT/SIGTERM{}",
        args.fleet,
        args.out.display(),
        args.duration
            .map(|d| format!(" or after {}", humantime::format_duration(d)))
            .unwrap_or_default()
    );

    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let writer_failed = tokio::select! {
        _ = signals.recv() => None,
        _ = deadline => None,
        r = &mut sink_task => Some(r),
    };
    eprintln!("record: stopping: no new batches; draining forwarded ones");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(args.drain_timeout, async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        eprintln!(
            "record: drain timeout ({}) reached; cutting remaining connections",
            humantime::format_duration(args.drain_timeout)
        );
        servers.abort_all();
        if let Some(e) = &quic_endpoint {
            e.close(0u32.into(), b"shutdown");
        }
    }
    rec.close_sink();
    let written = match writer_failed {
        Some(r) => r,
        None => sink_task.await,
    };
    let summary = written
        .map_err(|e| sink::SinkError::Task(e.to_string()))
        .and_then(|r| r)
        .context("writing the recording")?;
    let c = summary.counts;
    println!(
        "recorded {}: fleet {}, {} devices, {} batches, {} events; {} undecodable frames forwarded unrecorded, {} connections refused, {} upstream failures, {} certificates issued",
        summary.path.display(),
        args.fleet,
        c.devices,
        c.batches,
        c.events,
        rec.undecodable.load(Ordering::Relaxed),
        rec.refused.load(Ordering::Relaxed),
        rec.upstream_failures.load(Ordering::Relaxed),
        rec.credentials.issued(),
    );
    Ok(())
}

/// SIGINT and SIGTERM, registered at creation (not at first poll).
struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolves once the recorder stops (the guard `wait_for` returns is not `Send`).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RecordArgs,
    }

    fn parse(extra: &[&str]) -> Result<RecordArgs, String> {
        let mut argv = vec![
            "record",
            "--pki-dir",
            "/p",
            "--fleet",
            "fleet-a",
            "--out",
            "x.rec",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv)
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    fn check(extra: &[&str]) -> Result<(), String> {
        check_args(&parse(extra)?)
    }

    #[test]
    fn a_listener_and_its_upstream_are_required() {
        assert!(check(&[])
            .unwrap_err()
            .contains("--listen-grpc ADDR and/or --listen-quic"));
        assert!(check(&["--listen-grpc", "127.0.0.1:0"])
            .unwrap_err()
            .contains("--upstream-grpc"));
        assert!(check(&[
            "--listen-quic",
            "127.0.0.1:0",
            "--upstream-grpc",
            "https://h:1"
        ])
        .unwrap_err()
        .contains("--upstream-quic"));
        check(&[
            "--listen-grpc",
            "127.0.0.1:0",
            "--upstream-grpc",
            "https://localhost:7443",
            "--listen-quic",
            "[::1]:0",
            "--upstream-quic",
            "localhost:7444",
        ])
        .unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        let base = ["--listen-grpc", "127.0.0.1:0", "--upstream-grpc"];
        for bad in ["http://localhost:7443", "localhost:7443", "https://", "::"] {
            let mut a = base.to_vec();
            a.push(bad);
            assert!(check(&a).unwrap_err().contains("--upstream-grpc"), "{bad}");
        }
        let err = parse(&["--listen-grpc", "localhost"]).unwrap_err();
        assert!(err.contains("--listen-grpc"), "{err}");
        let mut a = base.to_vec();
        a.push("https://h:1");
        let mut args = parse(&a).unwrap();
        args.fleet = "a/b".into();
        assert!(check_args(&args).unwrap_err().contains("--fleet"));
        let mut a = base.to_vec();
        a.extend(["https://h:1", "--duration", "0s"]);
        assert!(check(&a).unwrap_err().contains("--duration"));
    }
}
