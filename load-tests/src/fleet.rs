//! Drives one synthetic fleet: one task and one mTLS connection per device (gRPC or
//! QUIC), first connections all at once or paced at a fixed rate, batches sent in
//! order, RETRY verdicts re-sent after the server's hint with a bounded number of
//! attempts. Every connection stays open until the whole fleet is done.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use fleetgate_client::{ClientError, ClientTls, GrpcDevice, QuicDevice};
use fleetgate_loadgen::drive::Drive;
use fleetgate_loadgen::report::DeviceOutcome;
use fleetgate_proto::{BatchAck, SessionContext, TelemetryBatch, TelemetryEvent, Verdict};
use rand::{rngs::StdRng, SeedableRng};
use tokio::task::JoinSet;

use crate::progress::{ProgressMode, Reporter, RunCounters, RunShape, Tally};

/// Spacing of `captured_at_ms` between events of one batch.
const CAPTURE_SPACING_MS: i64 = 10;
/// Floor for the retry back-off when the server sends no hint.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(50);

/// Where and how devices connect to ingest.
#[derive(Debug, Clone)]
pub enum Target {
    /// gRPC `Publish` stream, e.g. `https://localhost:7443`.
    Grpc { endpoint: String },
    /// QUIC (ALPN `fleetgate/1`), one stream per batch.
    Quic { addr: SocketAddr },
}

impl Target {
    /// `grpc` or `quic`, as written in the report.
    pub fn transport(&self) -> &'static str {
        match self {
            Target::Grpc { .. } => "grpc",
            Target::Quic { .. } => "quic",
        }
    }
}

/// One device connection over either transport; the batch, ack and retry logic
/// above it is shared.
pub enum Conn {
    Grpc(GrpcDevice),
    Quic(QuicDevice),
}

impl Conn {
    pub async fn connect(target: &Target, tls: &ClientTls) -> Result<Self, ClientError> {
        Ok(match target {
            Target::Grpc { endpoint } => Conn::Grpc(GrpcDevice::connect(endpoint, tls).await?),
            Target::Quic { addr } => Conn::Quic(QuicDevice::connect(*addr, tls).await?),
        })
    }

    pub async fn send(&mut self, batch: &TelemetryBatch) -> Result<BatchAck, ClientError> {
        match self {
            Conn::Grpc(c) => c.send(batch).await,
            Conn::Quic(c) => c.send(batch).await,
        }
    }

    /// Sends arbitrary bytes as one frame (attack scenarios).
    pub async fn send_raw(&mut self, frame: bytes::Bytes) -> Result<BatchAck, ClientError> {
        match self {
            Conn::Grpc(c) => c.send_raw(frame).await,
            Conn::Quic(c) => c.send_raw(frame).await,
        }
    }

    /// Closes a QUIC connection gracefully; a gRPC stream just ends when dropped.
    pub async fn close(self) {
        match self {
            Conn::Grpc(_) => {}
            Conn::Quic(c) => c.close().await,
        }
    }
}

/// What every device of the fleet shares.
#[derive(Debug, Clone)]
pub struct FleetPlan {
    pub target: Target,
    pub server_name: String,
    pub batches: u64,
    pub events_per_batch: u64,
    pub max_attempts: u32,
    pub interval: Duration,
    pub software_version: String,
    pub vehicle_config_id: String,
    pub connect_pacing: ConnectPacing,
}

/// When each device opens its first connection: all at once, or `per_sec` devices a
/// second (device `i` at `i / per_sec` s), so a large fleet does not start with every
/// TLS handshake in the same instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectPacing {
    per_sec: u32,
}

impl ConnectPacing {
    /// `per_sec` devices started per second; 0 starts them all at once.
    pub fn per_sec(per_sec: u32) -> Self {
        Self { per_sec }
    }

    /// Delay from the run start to device `index`'s first connection attempt.
    pub fn start_offset(self, index: usize) -> Duration {
        if self.per_sec == 0 {
            return Duration::ZERO;
        }
        // Integer nanoseconds: exactly `per_sec` starts in every whole second.
        let nanos = index as u128 * 1_000_000_000 / u128::from(self.per_sec);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// When the last of `devices` starts.
    pub fn spread(self, devices: usize) -> Duration {
        self.start_offset(devices.saturating_sub(1))
    }
}

/// Certificate and key of one device, read before any connection is made.
pub struct DeviceCredentials {
    pub device_id: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Reads `<pki>/devices/<fleet>/<prefix>-NNNN.{pem,key}` for `count` devices.
pub fn load_credentials(
    pki_dir: &Path,
    fleet: &str,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<DeviceCredentials>> {
    let dir = pki_dir.join("devices").join(fleet);
    (0..count)
        .map(|i| {
            let device_id = format!("{prefix}-{i:04}");
            let read = |ext: &str| -> anyhow::Result<String> {
                let path: PathBuf = dir.join(format!("{device_id}.{ext}"));
                std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "reading {} (create with: fleetgate-pki device --dir {} --fleet {fleet} --device {prefix} --count {count})",
                        path.display(),
                        pki_dir.display()
                    )
                })
            };
            Ok(DeviceCredentials {
                cert_pem: read("pem")?,
                key_pem: read("key")?,
                device_id,
            })
        })
        .collect()
}

/// Runs every device concurrently (starts paced by `plan.connect_pacing`) and returns
/// their outcomes and the time from the first start until the last device had its
/// last ack (connection shutdown is not counted, the pacing spread is).
pub async fn run_fleet(
    plan: FleetPlan,
    server_ca_pem: String,
    devices: Vec<DeviceCredentials>,
    progress: ProgressMode,
) -> (Vec<DeviceOutcome>, Duration) {
    let counters = Arc::new(RunCounters::default());
    let shape = RunShape {
        label: "fleet",
        total_events: devices.len() as u64 * plan.batches * plan.events_per_batch,
        devices: Some(devices.len() as u64),
        timeline: None,
    };
    let started = Instant::now();
    let reporter = Reporter::start(progress, shape, counters.clone(), started);
    let mut tasks = JoinSet::new();
    for (i, creds) in devices.into_iter().enumerate() {
        let plan = plan.clone();
        let tls = ClientTls {
            server_ca_pem: server_ca_pem.clone(),
            identity: Some((creds.cert_pem, creds.key_pem)),
            server_name: plan.server_name.clone(),
        };
        let start_at = started + plan.connect_pacing.start_offset(i);
        tasks.spawn(run_device(
            plan,
            tls,
            creds.device_id,
            start_at,
            counters.clone(),
        ));
    }
    let (outcomes, conns) = join_devices(tasks).await;
    let elapsed = started.elapsed();
    reporter.finish().await;
    futures::future::join_all(conns.into_iter().map(Conn::close)).await;
    (outcomes, elapsed)
}

/// One device's run; the connection is handed back (when it was made) so the caller
/// can close it after timing the run.
async fn run_device(
    plan: FleetPlan,
    tls: ClientTls,
    device_id: String,
    start_at: Instant,
    counters: Arc<RunCounters>,
) -> (DeviceOutcome, Option<Conn>) {
    let planned = plan.batches * plan.events_per_batch;
    let mut out = DeviceOutcome {
        events_sent: planned,
        ..Default::default()
    };
    let mut reported = Tally::default();
    if start_at > Instant::now() {
        tokio::time::sleep_until(start_at.into()).await;
    }
    let connected = Conn::connect(&plan.target, &tls).await;
    counters.connect_result(connected.is_ok());
    let mut conn = match connected {
        Ok(c) => c,
        Err(e) => {
            out.error = Some(format!("{device_id}: {}", error_chain(&e)));
            out.rejected.insert("not_sent".into(), planned);
            counters.publish(&mut reported, &out);
            return (out, None);
        }
    };
    let mut rng = StdRng::from_os_rng();
    let mut drive = Drive::new(&mut rng);
    let session = SessionContext {
        software_version: plan.software_version.clone(),
        vehicle_config_id: plan.vehicle_config_id.clone(),
    };
    let mut next_batch_id = 1u64;
    for b in 0..plan.batches {
        let now = unix_ms_now();
        let k = plan.events_per_batch as i64;
        let events: Vec<TelemetryEvent> = (0..k)
            .map(|i| drive.next_event(&mut rng, now - (k - 1 - i) * CAPTURE_SPACING_MS))
            .collect();
        if let Err(e) = send_with_retries(
            &mut conn,
            plan.max_attempts,
            &session,
            events,
            &mut next_batch_id,
            &mut out,
        )
        .await
        {
            let unsent = (plan.batches - b - 1) * plan.events_per_batch;
            *out.rejected.entry("not_acked".into()).or_default() += e.unacked.len() as u64;
            out.error = Some(format!("{device_id}: {:#}", e.error));
            *out.rejected.entry("not_sent".into()).or_default() += unsent;
            counters.publish(&mut reported, &out);
            return (out, Some(conn));
        }
        counters.publish(&mut reported, &out);
        // The pause is between batches: none after the last one.
        if !plan.interval.is_zero() && b + 1 < plan.batches {
            tokio::time::sleep(plan.interval).await;
        }
    }
    (out, Some(conn))
}

/// Why a batch could not be sent: the connection or stream failed. `unacked` are the
/// events still without a verdict (not yet counted in the outcome), so the caller can
/// count them or re-send them on a new connection.
#[derive(Debug)]
pub struct SendFailure {
    pub error: anyhow::Error,
    pub unacked: Vec<TelemetryEvent>,
}

/// Sends `events` until each has a final verdict or attempts run out.
/// Waits for every device task: their outcomes (a task that panicked counts as a failed
/// device) and the connections still open, to be closed once the run is timed.
pub async fn join_devices(
    mut tasks: JoinSet<(DeviceOutcome, Option<Conn>)>,
) -> (Vec<DeviceOutcome>, Vec<Conn>) {
    let mut outcomes = Vec::new();
    let mut conns = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((outcome, conn)) => {
                outcomes.push(outcome);
                conns.extend(conn);
            }
            Err(e) => outcomes.push(DeviceOutcome {
                error: Some(format!("device task failed: {e}")),
                ..Default::default()
            }),
        }
    }
    (outcomes, conns)
}

pub async fn send_with_retries(
    conn: &mut Conn,
    max_attempts: u32,
    session: &SessionContext,
    mut pending: Vec<TelemetryEvent>,
    next_batch_id: &mut u64,
    out: &mut DeviceOutcome,
) -> Result<(), SendFailure> {
    let mut attempt = 1;
    loop {
        let batch = TelemetryBatch {
            schema_version: 1,
            batch_id: *next_batch_id,
            sent_at_ms: unix_ms_now(),
            session: Some(session.clone()),
            events: pending,
            ..Default::default()
        };
        *next_batch_id += 1;
        let started = Instant::now();
        let ack = match conn.send(&batch).await {
            Ok(ack) => ack,
            Err(e) => {
                return Err(SendFailure {
                    error: anyhow::Error::new(e).context("sending batch"),
                    unacked: batch.events,
                })
            }
        };
        out.latencies.push(started.elapsed());
        out.batches += 1;

        let mut retry = Vec::new();
        if ack.events.is_empty() {
            // The batch was refused (or deferred) as a whole.
            match Verdict::try_from(ack.batch_verdict) {
                Ok(Verdict::Retry) => retry = batch.events,
                Ok(Verdict::Accepted) if batch.events.is_empty() => {}
                _ => {
                    let reason = non_empty(&ack.batch_reason, "batch_refused");
                    *out.rejected.entry(reason).or_default() += batch.events.len() as u64;
                }
            }
        } else {
            let by_seq: HashMap<u64, _> = ack.events.iter().map(|a| (a.seq, a)).collect();
            for event in batch.events {
                match by_seq.get(&event.seq) {
                    None => *out.rejected.entry("missing_ack".into()).or_default() += 1,
                    Some(a) => match Verdict::try_from(a.verdict) {
                        Ok(Verdict::Accepted) => out.accepted += 1,
                        Ok(Verdict::Retry) => retry.push(event),
                        _ => {
                            let reason = non_empty(&a.reason, "rejected");
                            *out.rejected.entry(reason).or_default() += 1;
                        }
                    },
                }
            }
        }
        if retry.is_empty() {
            return Ok(());
        }
        if attempt >= max_attempts {
            *out.rejected.entry("retry_exhausted".into()).or_default() += retry.len() as u64;
            return Ok(());
        }
        attempt += 1;
        out.retried += retry.len() as u64;
        let hint = Duration::from_millis(u64::from(ack.retry_after_ms));
        tokio::time::sleep(hint.max(MIN_RETRY_DELAY)).await;
        pending = retry;
    }
}

fn non_empty(reason: &str, fallback: &str) -> String {
    if reason.is_empty() {
        fallback.to_owned()
    } else {
        reason.to_owned()
    }
}

/// `outer: inner: root`, since tonic's top-level messages alone say little.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

pub fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_rate_starts_everyone_at_once() {
        let p = ConnectPacing::per_sec(0);
        assert!((0..10_000).all(|i| p.start_offset(i).is_zero()));
        assert_eq!(p.spread(10_000), Duration::ZERO);
    }

    #[test]
    fn device_i_starts_at_i_over_rate() {
        let p = ConnectPacing::per_sec(100);
        let ms = |i| p.start_offset(i).as_millis();
        assert_eq!(
            (ms(0), ms(1), ms(99), ms(100), ms(150)),
            (0, 10, 990, 1_000, 1_500)
        );
        assert_eq!(p.spread(300), Duration::from_millis(2_990));
        assert_eq!(p.spread(0), Duration::ZERO);
        let third = ConnectPacing::per_sec(3);
        assert_eq!(third.start_offset(1), Duration::from_nanos(333_333_333));
    }

    proptest! {
        #[test]
        fn starts_never_exceed_the_rate_in_any_second(rate in 1u32..20_000, i in 0usize..1_000_000) {
            let p = ConnectPacing::per_sec(rate);
            prop_assert!(p.start_offset(i) <= p.start_offset(i + 1));
            // Device i + rate starts exactly one second after device i, so any window of
            // one second holds at most `rate` starts.
            prop_assert_eq!(
                p.start_offset(i + rate as usize) - p.start_offset(i),
                Duration::from_secs(1)
            );
        }
    }
}
