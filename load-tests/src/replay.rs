//! Replays a recording: one task, one mTLS connection and one certificate per
//! recorded device, batches sent at their recorded offsets divided by the speed (or
//! back to back at `max`), timestamps rebased to the wall clock, RETRY verdicts
//! honoured with bounded attempts. Optional attackers run alongside on their own
//! connections. Certificates missing from the PKI dir are issued in memory.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetgate_client::ClientTls;
use fleetgate_loadgen::attack::{self, Attack};
use fleetgate_loadgen::credentials::CredentialStore;
use fleetgate_loadgen::replay_plan::{rebase, DeviceReplay, Speed};
use fleetgate_loadgen::report::{AttackResult, DeviceOutcome};
use fleetgate_proto::{SessionContext, Verdict};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::fleet::{
    error_chain, join_devices, send_with_retries, unix_ms_now, Conn, DeviceCredentials, Target,
};
use crate::progress::{ProgressMode, Reporter, RunCounters, RunShape, Tally, Timeline};

/// How a replay runs.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub target: Target,
    pub server_name: String,
    pub speed: Speed,
    pub max_attempts: u32,
    /// Connection attempts a device may make after its connection failed, over the
    /// whole run (0: a failed connection ends the device's replay).
    pub max_reconnects: u32,
    /// Ingest's `limits.max_frame_bytes`, for the oversized attack.
    pub max_frame_bytes: usize,
    /// Bars, plain lines or nothing on stderr while the replay runs.
    pub progress: ProgressMode,
}

/// Reads `<pki>/devices/<fleet>/<id>.{pem,key}` for each id, issuing (in memory, from
/// `<pki>/ca.pem` + `ca.key`) the ones that are missing. Returns the credentials and
/// how many were issued.
pub fn credentials(
    pki_dir: &Path,
    fleet: &str,
    trust_domain: &str,
    ids: &[String],
) -> anyhow::Result<(Vec<DeviceCredentials>, usize)> {
    let store = CredentialStore::new(pki_dir, fleet, trust_domain);
    let out = ids
        .iter()
        .map(|id| {
            let c = store.get(id)?;
            Ok(DeviceCredentials {
                device_id: id.clone(),
                cert_pem: c.cert_pem.clone(),
                key_pem: c.key_pem.clone(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((out, store.issued() as usize))
}

/// Runs every device (and attacker) and returns the honest outcomes, the time from
/// the common start to the last honest ack, and the attack results.
pub async fn run_replay(
    opts: ReplayOptions,
    server_ca_pem: String,
    devices: Vec<(DeviceReplay, DeviceCredentials)>,
    attackers: Vec<(Attack, DeviceCredentials)>,
) -> (Vec<DeviceOutcome>, Duration, Vec<AttackResult>) {
    let total_events: u64 = devices.iter().map(|(d, _)| d.events()).sum();
    let span_ms = devices
        .iter()
        .flat_map(|(d, _)| d.batches.iter().map(|(offset, _)| *offset))
        .max()
        .unwrap_or(0);
    let shape = RunShape {
        label: "replay",
        total_events,
        devices: None,
        timeline: match opts.speed {
            Speed::Factor(speed) => Some(Timeline {
                span: Duration::from_millis(span_ms),
                speed,
            }),
            Speed::Max => None,
        },
    };
    let victim = devices
        .first()
        .map(|(d, _)| d.device_id.clone())
        .unwrap_or_default();
    let tls_for = |creds: &DeviceCredentials| ClientTls {
        server_ca_pem: server_ca_pem.clone(),
        identity: Some((creds.cert_pem.clone(), creds.key_pem.clone())),
        server_name: opts.server_name.clone(),
    };
    // Everyone connects first, then all start together.
    let barrier = Arc::new(Barrier::new(devices.len() + 1));
    let progress = Arc::new(RunCounters::default());
    let mut tasks = JoinSet::new();
    for (replay, creds) in devices {
        let tls = tls_for(&creds);
        tasks.spawn(run_device(
            opts.clone(),
            tls,
            replay,
            barrier.clone(),
            progress.clone(),
        ));
    }
    let mut attack_tasks = JoinSet::new();
    for (a, creds) in attackers {
        let tls = tls_for(&creds);
        let (opts, victim) = (opts.clone(), victim.clone());
        attack_tasks.spawn(async move { run_attack(&opts, &tls, a, &victim).await });
    }
    barrier.wait().await;
    let started = Instant::now();
    let reporter = Reporter::start(opts.progress, shape, progress.clone(), started);
    let (outcomes, conns) = join_devices(tasks).await;
    let elapsed = started.elapsed();
    reporter.finish().await;
    let mut results = Vec::new();
    while let Some(joined) = attack_tasks.join_next().await {
        results.push(joined.unwrap_or_else(|e| AttackResult {
            scenario: "unknown".into(),
            error: Some(format!("attack task failed: {e}")),
            ..Default::default()
        }));
    }
    results.sort_by(|a, b| a.scenario.cmp(&b.scenario));
    futures::future::join_all(conns.into_iter().map(Conn::close)).await;
    (outcomes, elapsed, results)
}

async fn run_device(
    opts: ReplayOptions,
    tls: ClientTls,
    replay: DeviceReplay,
    barrier: Arc<Barrier>,
    progress: Arc<RunCounters>,
) -> (DeviceOutcome, Option<Conn>) {
    let planned = replay.events();
    let mut out = DeviceOutcome {
        events_sent: planned,
        ..Default::default()
    };
    let mut reported = Tally::default();
    let device_id = replay.device_id;
    let conn = Conn::connect(&opts.target, &tls).await;
    barrier.wait().await;
    let started = Instant::now();
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => {
            out.error = Some(format!("{device_id}: {}", error_chain(&e)));
            out.rejected.insert("not_sent".into(), planned);
            progress.publish(&mut reported, &out);
            return (out, None);
        }
    };
    let mut next_batch_id = 1u64;
    let mut remaining = planned;
    let mut reconnects_left = opts.max_reconnects;
    for (offset, mut batch) in replay.batches {
        if let Some(due) = opts.speed.due_after(offset) {
            tokio::time::sleep_until((started + due).into()).await;
        }
        rebase(&mut batch, offset, unix_ms_now(), opts.speed);
        let n = batch.events.len() as u64;
        remaining -= n;
        let session = batch.session.take().unwrap_or_default();
        let mut pending = batch.events;
        loop {
            let failure = match send_with_retries(
                &mut conn,
                opts.max_attempts,
                &session,
                pending,
                &mut next_batch_id,
                &mut out,
            )
            .await
            {
                Ok(()) => break,
                Err(f) => f,
            };
            match reconnect(&opts.target, &tls, &mut reconnects_left).await {
                Some(new_conn) => {
                    // Events of the failed batch may have been stored before the
                    // connection broke; re-sent, they are acked `duplicate` (accepted).
                    // The broken connection is dropped, not closed gracefully.
                    drop(std::mem::replace(&mut conn, new_conn));
                    out.reconnects += 1;
                    pending = failure.unacked;
                }
                None => {
                    *out.rejected.entry("not_acked".into()).or_default() +=
                        failure.unacked.len() as u64;
                    out.error = Some(format!("{device_id}: {:#}", failure.error));
                    *out.rejected.entry("not_sent".into()).or_default() += remaining;
                    progress.publish(&mut reported, &out);
                    return (out, Some(conn));
                }
            }
        }
        progress.publish(&mut reported, &out);
    }
    (out, Some(conn))
}

/// A new connection, trying with exponential back-off (250 ms doubling to 4 s) while
/// the budget lasts; `None` when it is spent.
async fn reconnect(target: &Target, tls: &ClientTls, budget: &mut u32) -> Option<Conn> {
    let mut delay = Duration::from_millis(250);
    while *budget > 0 {
        *budget -= 1;
        tokio::time::sleep(delay).await;
        if let Ok(c) = Conn::connect(target, tls).await {
            return Some(c);
        }
        delay = (delay * 2).min(Duration::from_secs(4));
    }
    None
}

/// Runs one attacker on its own connection and collects the reasons its probes got.
async fn run_attack(
    opts: &ReplayOptions,
    tls: &ClientTls,
    a: Attack,
    victim: &str,
) -> AttackResult {
    let mut result = AttackResult {
        scenario: a.as_str().into(),
        expected: a.expected().iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let mut conn = match Conn::connect(&opts.target, tls).await {
        Ok(c) => c,
        Err(e) => {
            result.error = Some(format!("connect: {}", error_chain(&e)));
            return result;
        }
    };
    let session = SessionContext {
        software_version: "fw-attacker".into(),
        vehicle_config_id: "vc-attacker".into(),
    };
    for step in attack::steps(a, unix_ms_now(), victim, opts.max_frame_bytes, &session) {
        let ack = match conn.send_raw(step.frame.into()).await {
            Ok(ack) => ack,
            Err(e) => {
                result.error = Some(format!("send: {}", error_chain(&e)));
                break;
            }
        };
        let reasons = ack_reasons(&ack);
        if step.probe {
            for r in reasons {
                *result.received.entry(r).or_default() += 1;
            }
        } else if let Some(bad) = reasons.iter().find(|r| *r != "accepted") {
            result.error = Some(format!("setup batch not accepted: {bad}"));
            break;
        }
    }
    conn.close().await;
    result
}

/// One reason per event of the ack (or one for a whole-batch verdict); `accepted` for
/// an acceptance without a reason code.
fn ack_reasons(ack: &fleetgate_proto::BatchAck) -> Vec<String> {
    let name = |verdict: i32, reason: &str| -> String {
        if !reason.is_empty() {
            return reason.to_owned();
        }
        match Verdict::try_from(verdict) {
            Ok(Verdict::Accepted) => "accepted".into(),
            Ok(Verdict::Retry) => "retry".into(),
            _ => "rejected".into(),
        }
    };
    if ack.events.is_empty() {
        return vec![name(ack.batch_verdict, &ack.batch_reason)];
    }
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for e in &ack.events {
        *counts.entry(name(e.verdict, &e.reason)).or_default() += 1;
    }
    counts
        .into_iter()
        .flat_map(|(r, n)| std::iter::repeat_n(r, n as usize))
        .collect()
}
