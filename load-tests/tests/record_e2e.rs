//! End to end: `fleetgate-loadgen record` runs as a process between real device
//! clients (`fleetgate_client::Device` over gRPC and over QUIC) and a real ingest
//! (spawned process, tansu broker, mTLS). Every event must be acked accepted through
//! the recorder and land in the events topic under the device's own identity; after
//! SIGTERM the recording must hold exactly the batches the devices sent; and the
//! recording must replay cleanly into a fresh ingest. A device of another fleet is
//! refused on both transports, and bad flags fail with a message, not a panic.
//!
//! Needs the ingest binary: run `cargo build -p fleetgate-ingest` first.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetgate_client::{ClientError, ClientTls, Device, GrpcDevice, QuicDevice, Target};
use fleetgate_loadgen::recording::RecordingReader;
use fleetgate_pki::Issued;
use fleetgate_proto::{
    signal::Value, SessionContext, Signal, TelemetryBatch, TelemetryEnvelope, TelemetryEvent,
};
use fleetgate_test_support::{
    decode, read_topic, ready_field, workspace_bin, Broker, Ingest, StdoutLines, TestPki,
    TRUST_DOMAIN,
};
use prost::Message;
use serde_json::Value as Json;

const LOADGEN: &str = env!("CARGO_BIN_EXE_fleetgate-loadgen");
const FLEET: &str = "fleet-rec";
const ROUNDS: u64 = 3;
const EVENTS_PER_ROUND: u64 = 4;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// A running `fleetgate-loadgen record` process.
struct Recorder {
    child: Child,
    grpc: SocketAddr,
    quic: SocketAddr,
    lines: StdoutLines,
    stderr: PathBuf,
}

impl Recorder {
    fn spawn(dir: &Path, pki: &TestPki, upstream_grpc: &str, upstream_quic: &str) -> Self {
        let stderr = dir.join("record.log");
        let out = dir.join("capture.rec");
        let mut child = Command::new(LOADGEN)
            .args(["record", "--listen-grpc", "127.0.0.1:0", "--listen-quic"])
            .args(["127.0.0.1:0", "--upstream-grpc", upstream_grpc])
            .args(["--upstream-quic", upstream_quic, "--pki-dir"])
            .arg(pki.dir())
            .args(["--trust-domain", TRUST_DOMAIN, "--fleet", FLEET, "--out"])
            .arg(&out)
            .args(["--description", "record_e2e"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("log file"))
            .spawn()
            .expect("spawning fleetgate-loadgen record");
        let lines = StdoutLines::take(&mut child).expect("piped stdout");
        let Some(ready) = lines.wait_for("fleetgate-loadgen record ready", Duration::from_secs(20))
        else {
            let _ = child.kill();
            panic!(
                "recorder not ready: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        };
        let field = |name: &str| ready_field(&ready, name).expect("address in ready line");
        Self {
            grpc: field("grpc="),
            quic: field("quic="),
            child,
            lines,
            stderr,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM; waits for a clean exit and returns the summary line.
    fn terminate(self) -> String {
        self.stop_with("-TERM")
    }

    /// Sends `signal` (`-TERM`, `-INT`); waits for a clean exit; the summary line.
    fn stop_with(mut self, signal: &str) -> String {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill")
            .success());
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "recorder ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "recorder failed: {}", self.logs());
        self.lines
            .wait_for("", Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no summary line: {}", self.logs()))
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_ingest(broker: &Broker, pki: &TestPki, node: &str) -> Ingest {
    let toml = format!(
        "node_id = \"{node}\"\n{}\n[kafka]\nbootstrap_servers = \"{}\"\n",
        pki.tls_toml(),
        broker.bootstrap()
    );
    let bin = workspace_bin("fleetgate-ingest").expect("ingest binary built");
    Ingest::spawn_with_env(&bin, &toml, &[]).expect("ingest starts")
}

fn client_tls(pki: &TestPki, issued: &Issued) -> ClientTls {
    ClientTls {
        server_ca_pem: pki.ca.cert_pem(),
        identity: Some((issued.cert_pem.clone(), issued.key_pem.clone())),
        server_name: "localhost".into(),
    }
}

/// Sends ROUNDS batches of EVENTS_PER_ROUND events through `target`; every event
/// must be accepted on the first attempt (so the device sent exactly ROUNDS batches).
async fn drive(target: Target, tls: ClientTls) {
    let session = SessionContext {
        software_version: "fw-rec".into(),
        vehicle_config_id: "cfg-rec".into(),
    };
    let mut dev = Device::new(target, tls, session, 1);
    for round in 0..ROUNDS {
        for i in 0..EVENTS_PER_ROUND {
            dev.record(
                now_ms() - 20,
                vec![Signal {
                    name: "speed_kph".into(),
                    value: Some(Value::F64(30.0 + i as f64)),
                }],
                None,
            );
        }
        let r = dev.flush(Duration::from_secs(20)).await.expect("flush");
        // One connection for the whole run: no retransmission, one batch per round.
        assert_eq!(
            (r.accepted, r.rejected.len(), r.retries, r.reconnects),
            (EVENTS_PER_ROUND, 0, 0, u64::from(round == 0)),
            "{r:?}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[test]
fn records_live_grpc_and_quic_devices_and_the_capture_replays() {
    let broker = Broker::start().expect("broker starts");
    let pki = TestPki::new().expect("pki");
    let ingest = spawn_ingest(&broker, &pki, "record-it");
    let dir = tempfile::tempdir().expect("temp dir");

    // car-g1 and car-q1 have their certificates in the PKI dir (the recorder forwards
    // with exactly those); car-g2 and car-q2 do not (the recorder issues its own).
    let devices: BTreeMap<&str, (&str, Issued)> = [
        ("car-g1", "grpc"),
        ("car-g2", "grpc"),
        ("car-q1", "quic"),
        ("car-q2", "quic"),
    ]
    .into_iter()
    .map(|(d, t)| (d, (t, pki.device(FLEET, d))))
    .collect();
    let on_disk = pki.dir().join("devices").join(FLEET);
    std::fs::create_dir_all(&on_disk).expect("devices dir");
    for d in ["car-g1", "car-q1"] {
        devices[d]
            .1
            .write(&on_disk, d)
            .expect("writing device cert");
    }

    let rec = Recorder::spawn(
        dir.path(),
        &pki,
        &ingest.endpoint(),
        &ingest.quic.to_string(),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let runs = devices.values().map(|(transport, issued)| {
            let target = match *transport {
                "grpc" => Target::Grpc(format!("https://localhost:{}", rec.grpc.port())),
                _ => Target::Quic(rec.quic),
            };
            drive(target, client_tls(&pki, issued))
        });
        futures::future::join_all(runs).await;
    });

    // Ingest stored every event once, under the device's own identity.
    let total = devices.len() as u64 * ROUNDS * EVENTS_PER_ROUND;
    let stored = read_topic(
        &broker.bootstrap(),
        "telemetry.events.v1",
        total as usize + 1,
        Duration::from_secs(8),
    )
    .expect("reading events topic");
    assert_eq!(stored.len() as u64, total, "{}", ingest.logs());
    let mut seqs: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut conns: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in &stored {
        let env: TelemetryEnvelope = decode(m).expect("envelope");
        let p = env.provenance.expect("provenance");
        let (transport, issued) = &devices[p.device_id.as_str()];
        assert_eq!(
            (p.fleet_id.as_str(), p.transport.as_str()),
            (FLEET, *transport)
        );
        assert_eq!(p.software_version, "fw-rec");
        if p.device_id.ends_with('1') {
            assert_eq!(p.cert_serial, issued.serial_hex, "PKI-dir certificate used");
        } else {
            assert_ne!(p.cert_serial, issued.serial_hex, "issued by the recorder");
        }
        conns
            .entry(p.device_id.clone())
            .or_default()
            .insert(p.connection_id.clone());
        seqs.entry(p.device_id)
            .or_default()
            .insert(env.event.expect("event").seq);
    }
    let all: BTreeSet<u64> = (1..=ROUNDS * EVENTS_PER_ROUND).collect();
    assert!(seqs.values().all(|s| *s == all), "{seqs:?}");
    // One device connection through the recorder is one connection at ingest.
    assert!(conns.values().all(|c| c.len() == 1), "{conns:?}");

    let summary = rec.terminate();
    assert!(
        summary.contains(&format!(
            "fleet {FLEET}, 4 devices, 12 batches, {total} events"
        )),
        "{summary}"
    );
    assert!(summary.contains("0 connections refused"), "{summary}");

    // The recording holds exactly what the devices sent, in offset order.
    let path = dir.path().join("capture.rec");
    let (header, batches) = RecordingReader::new(std::fs::File::open(&path).expect("file"))
        .and_then(RecordingReader::read_all)
        .expect("recording reads back");
    assert_eq!((header.fleet_id.as_str(), header.devices), (FLEET, 4));
    assert_eq!(header.description, "record_e2e");
    assert!(header.created_at_ms > 0 && header.seed == 0);
    assert_eq!(batches.len() as u64, devices.len() as u64 * ROUNDS);
    assert!(batches.windows(2).all(|w| w[0].offset_ms <= w[1].offset_ms));
    let mut per_device: BTreeMap<&str, Vec<Vec<u64>>> = BTreeMap::new();
    for b in &batches {
        let t = TelemetryBatch::decode(b.batch.as_slice()).expect("recorded batch decodes");
        // Rebased: times are offsets from the start, close to the arrival offset.
        let offset = b.offset_ms as i64;
        assert!(
            (t.sent_at_ms - offset).abs() < 2_000,
            "{} vs {offset}",
            t.sent_at_ms
        );
        assert!(t
            .events
            .iter()
            .all(|e: &TelemetryEvent| e.captured_at_ms <= t.sent_at_ms));
        assert_eq!(
            t.session.as_ref().map(|s| s.software_version.as_str()),
            Some("fw-rec")
        );
        per_device
            .entry(b.device_id.as_str())
            .or_default()
            .push(t.events.iter().map(|e| e.seq).collect());
    }
    let expected: Vec<Vec<u64>> = (0..ROUNDS)
        .map(|r| {
            (1..=EVENTS_PER_ROUND)
                .map(|i| r * EVENTS_PER_ROUND + i)
                .collect()
        })
        .collect();
    assert_eq!(per_device.len(), devices.len());
    for (d, got) in &per_device {
        assert_eq!(got, &expected, "{d}");
    }
    drop(ingest);
    drop(broker);

    // The capture replays into a fresh broker and ingest: every event accepted.
    let broker2 = Broker::start().expect("second broker");
    let ingest2 = spawn_ingest(&broker2, &pki, "record-replay");
    let json = dir.path().join("replay.json");
    let out = Command::new(LOADGEN)
        .args(["replay", "--recording"])
        .arg(&path)
        .args([
            "--transport",
            "quic",
            "--quic-addr",
            &ingest2.quic.to_string(),
        ])
        .arg("--pki-dir")
        .arg(pki.dir())
        .args(["--trust-domain", TRUST_DOMAIN, "--speed", "max", "--json"])
        .arg(&json)
        .output()
        .expect("running replay");
    assert!(
        out.status.success(),
        "{}\n{}\n--- ingest\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        ingest2.logs()
    );
    let r: Json = serde_json::from_str(&std::fs::read_to_string(&json).expect("report"))
        .expect("report parses");
    assert_eq!(r["fleet"], FLEET);
    assert_eq!(r["devices"].as_u64(), Some(4), "{r}");
    assert_eq!(r["events_sent"].as_u64(), Some(total), "{r}");
    assert_eq!(r["accepted"].as_u64(), Some(total), "{r}");
    let replayed = read_topic(
        &broker2.bootstrap(),
        "telemetry.events.v1",
        total as usize + 1,
        Duration::from_secs(8),
    )
    .expect("reading replayed events");
    assert_eq!(replayed.len() as u64, total);
}

#[test]
fn refuses_devices_of_another_fleet_on_both_transports() {
    let pki = TestPki::new().expect("pki");
    let dir = tempfile::tempdir().expect("temp dir");
    // Nothing listens upstream: a refused device never gets that far, and an admitted
    // one is told ingest is unavailable.
    let rec = Recorder::spawn(dir.path(), &pki, "https://localhost:1", "127.0.0.1:1");
    let stranger = client_tls(&pki, &pki.device("other-fleet", "car-x"));
    let member = client_tls(&pki, &pki.device(FLEET, "car-1"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let endpoint = format!("https://localhost:{}", rec.grpc.port());
        match GrpcDevice::connect(&endpoint, &stranger).await {
            Err(ClientError::Rpc(s)) => {
                assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
                assert!(s.message().contains("records fleet fleet-rec"), "{s:?}");
                assert!(s.message().contains("other-fleet/car-x"), "{s:?}");
            }
            other => panic!("stranger over gRPC: {:?}", other.map(|_| ())),
        }
        match GrpcDevice::connect(&endpoint, &member).await {
            Err(ClientError::Rpc(s)) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                assert!(s.message().contains("upstream ingest"), "{s:?}");
            }
            other => panic!("member without ingest: {:?}", other.map(|_| ())),
        }
        let quic = QuicDevice::connect(rec.quic, &stranger)
            .await
            .expect("TLS handshake itself succeeds (same CA)");
        quic.send(&TelemetryBatch::default())
            .await
            .expect_err("stranger over QUIC is closed");
        // However far the stream got, the connection was closed with the reason.
        match quic.connection().close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                assert_eq!(u64::from(c.error_code), 0x12, "{c:?}");
                let reason = String::from_utf8_lossy(&c.reason);
                assert!(reason.contains("records fleet fleet-rec"), "{reason}");
            }
            other => panic!("stranger over QUIC: {other:?}"),
        }
    });
    let logs = rec.logs();
    assert_eq!(
        logs.matches("other-fleet/car-x refused").count(),
        2,
        "one log line per refused connection: {logs}"
    );
    let summary = rec.terminate();
    assert!(
        summary.contains("0 devices, 0 batches, 0 events")
            && summary.contains("2 connections refused"),
        "{summary}"
    );
    let (header, batches) =
        RecordingReader::new(std::fs::File::open(dir.path().join("capture.rec")).expect("file"))
            .and_then(RecordingReader::read_all)
            .expect("an empty recording is still complete");
    assert_eq!(
        (header.fleet_id.as_str(), header.devices, batches.len()),
        (FLEET, 0, 0)
    );
}

#[test]
fn bad_flags_and_missing_files_are_clear_errors() {
    let pki = TestPki::new().expect("pki");
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("x.rec");
    let run = |extra: &[&str], pki_dir: &Path| {
        let o = Command::new(LOADGEN)
            .args(["record", "--fleet", FLEET, "--pki-dir"])
            .arg(pki_dir)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("running record");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success(), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let grpc = [
        "--listen-grpc",
        "127.0.0.1:0",
        "--upstream-grpc",
        "https://localhost:1",
    ];
    assert!(run(&[], pki.dir()).contains("--listen-grpc ADDR and/or --listen-quic ADDR"));
    assert!(run(&["--listen-quic", "127.0.0.1:0"], pki.dir()).contains("--upstream-quic"));
    assert!(run(&["--listen-grpc", "nonsense"], pki.dir()).contains("--listen-grpc"));
    let missing = dir.path().join("no-pki");
    let err = run(&grpc, &missing);
    assert!(err.contains("server.pem"), "{err}");
    let err = run(
        &[
            &grpc[..],
            &[
                "--upstream-quic",
                "no-port-given",
                "--listen-quic",
                "127.0.0.1:0",
            ],
        ]
        .concat(),
        pki.dir(),
    );
    assert!(err.contains("--upstream-quic"), "{err}");
    assert!(!out.exists(), "nothing written on a failed start");
}

#[test]
fn a_stop_in_the_middle_of_traffic_leaves_a_complete_recording() {
    let broker = Broker::start().expect("broker starts");
    let pki = TestPki::new().expect("pki");
    let ingest = spawn_ingest(&broker, &pki, "record-stop");
    let dir = tempfile::tempdir().expect("temp dir");
    let rec = Recorder::spawn(
        dir.path(),
        &pki,
        &ingest.endpoint(),
        &ingest.quic.to_string(),
    );
    let tls = client_tls(&pki, &pki.device(FLEET, "car-busy"));
    let endpoint = format!("https://localhost:{}", rec.grpc.port());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    // Sends batches back to back until the recorder goes away; the seqs of acked
    // batches. SIGINT arrives once a few batches are through.
    let sender = rt.spawn(async move {
        let mut dev = GrpcDevice::connect(&endpoint, &tls).await.expect("connect");
        let mut acked = Vec::new();
        for seq in 1..=10_000u64 {
            let batch = TelemetryBatch {
                schema_version: 1,
                batch_id: seq,
                sent_at_ms: now_ms(),
                events: vec![TelemetryEvent {
                    seq,
                    captured_at_ms: now_ms() - 5,
                    signals: vec![Signal {
                        name: "speed_kph".into(),
                        value: Some(Value::F64(50.0)),
                    }],
                    location: None,
                }],
                ..Default::default()
            };
            match dev.send(&batch).await {
                Ok(_) => acked.push(seq),
                Err(_) => break,
            }
            if acked.len() == 20 {
                let _ = stop_tx.send(());
            }
        }
        acked
    });
    stop_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("20 batches through the recorder");
    let summary = rec.stop_with("-INT");
    let acked = rt.block_on(sender).expect("sender task");
    assert!(acked.len() >= 20 && acked.len() < 10_000, "{}", acked.len());

    let (header, batches) =
        RecordingReader::new(std::fs::File::open(dir.path().join("capture.rec")).expect("file"))
            .and_then(RecordingReader::read_all)
            .expect("a stopped recorder leaves a complete recording");
    let recorded: Vec<u64> = batches
        .iter()
        .map(|b| {
            let t = TelemetryBatch::decode(b.batch.as_slice()).expect("decodes");
            t.events[0].seq
        })
        .collect();
    // Everything acked was recorded; at most the batch in flight at the stop was
    // recorded without its ack reaching the device.
    assert_eq!(recorded[..acked.len()], acked[..], "{summary}");
    assert!(recorded.len() <= acked.len() + 1, "{summary}");
    assert_eq!((header.devices, batches.len()), (1, recorded.len()));
    assert!(
        summary.contains(&format!("{} batches", recorded.len())),
        "{summary}"
    );
}
