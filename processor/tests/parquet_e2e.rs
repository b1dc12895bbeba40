//! End to end: TelemetryEnvelope records on a real tansu broker, the real
//! `fleetgate-processor parquet` binary, and pyarrow (an independent Parquet reader
//! from PyPI, via deploy/local/ensure-python.sh) reading the files back. Without
//! pyarrow these tests fail; they never skip.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use fleetgate_proto::{signal, Location, Provenance, Signal, TelemetryEnvelope, TelemetryEvent};
use fleetgate_test_support::Broker;
use prost::Message;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

const TOPIC: &str = "telemetry.events.v1";
const FLEETS: [&str; 2] = ["fleet-a", "fleet b/2"];
const DEVICES_PER_FLEET: usize = 5;
/// 2023-11-14T22:13:20Z; events are 10 s apart, so they cross two hours and a day.
const T0_MS: i64 = 1_700_000_000_000;

/// One distinct event: its record value and the row pyarrow should find for it.
struct Sent {
    key: String,
    value: Vec<u8>,
    expected: Value,
}

fn events(per_device: u64) -> Vec<Sent> {
    let mut out = Vec::new();
    for seq in 1..=per_device {
        for (f, fleet) in FLEETS.iter().enumerate() {
            for d in 0..DEVICES_PER_FLEET {
                let device = format!("car-{f}{d:03}");
                let n = out.len() as i64;
                let received_at_ms = T0_MS + n * 10_000;
                let prov = Provenance {
                    device_id: device.clone(),
                    fleet_id: fleet.to_string(),
                    cert_sha256: format!("{:064x}", f * 100 + d),
                    cert_serial: format!("{:x}", 0xabc0 + d),
                    transport: if d % 2 == 0 { "quic" } else { "grpc" }.into(),
                    ingest_node: format!("ingest-{}", d % 3),
                    connection_id: format!("conn-{device}-{}", seq / 20),
                    received_at_ms,
                    captured_at_ms: received_at_ms - 250,
                    sent_at_ms: received_at_ms - 100,
                    seq,
                    schema_version: 1,
                    software_version: format!("sw-1.{d}"),
                    vehicle_config_id: format!("cfg-{f}"),
                    ingest_version: "0.1.0".into(),
                    remote_addr: format!("10.0.{f}.{d}:40000"),
                };
                let speed = seq as f64 * 1.5;
                let envelope = TelemetryEnvelope {
                    event: Some(TelemetryEvent {
                        seq,
                        captured_at_ms: prov.captured_at_ms,
                        signals: vec![
                            Signal {
                                name: "speed_kph".into(),
                                value: Some(signal::Value::F64(speed)),
                            },
                            Signal {
                                name: "cabin_co2_ppm".into(),
                                value: Some(signal::Value::I64(700)),
                            },
                        ],
                        location: Some(Location {
                            latitude_deg: 48.0,
                            longitude_deg: 11.0,
                            accuracy_m: 5.0,
                            heading_deg: 0.0,
                        }),
                    }),
                    provenance: Some(prov.clone()),
                };
                let expected = json!({
                    "device_id": prov.device_id, "fleet_id": prov.fleet_id,
                    "cert_sha256": prov.cert_sha256, "cert_serial": prov.cert_serial,
                    "transport": prov.transport, "ingest_node": prov.ingest_node,
                    "connection_id": prov.connection_id, "received_at": prov.received_at_ms,
                    "captured_at": prov.captured_at_ms, "sent_at": prov.sent_at_ms,
                    "seq": prov.seq, "schema_version": prov.schema_version,
                    "software_version": prov.software_version,
                    "vehicle_config_id": prov.vehicle_config_id,
                    "ingest_version": prov.ingest_version, "remote_addr": prov.remote_addr,
                    "speed_kph": speed,
                });
                out.push(Sent {
                    key: device,
                    value: envelope.encode_to_vec(),
                    expected,
                });
            }
        }
    }
    out
}

/// Every event, then every `every`th one again (a retry racing an ack).
fn with_dups(sent: &[Sent], every: usize) -> (Vec<&Sent>, usize) {
    let dups: Vec<&Sent> = sent.iter().step_by(every).collect();
    let n = dups.len();
    (sent.iter().chain(dups).collect(), n)
}

/// Produces `records` one per record batch. tansu 0.6 returns nothing when a fetch
/// starts inside a batch (a consumer resuming from a commit in mid-batch would
/// stall there; real Kafka returns the batch and the client skips the head), so the
/// crash tests, which commit at arbitrary offsets, need every offset to start a batch.
fn produce(bootstrap: &str, records: &[&Sent]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "0")
        .create()
        .expect("producer");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        for s in records {
            let record = FutureRecord::to(TOPIC).key(&s.key).payload(&s.value);
            producer
                .send(record, Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)
                .expect("delivered");
        }
    });
}

fn write_expected(dir: &Path, sent: &[Sent]) -> PathBuf {
    let path = dir.join("expected.jsonl");
    let lines: Vec<String> = sent.iter().map(|s| s.expected.to_string()).collect();
    std::fs::write(&path, lines.join("\n") + "\n").expect("writing expected rows");
    path
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv interpreter with pyarrow; panics (fails the test) if it cannot be had.
fn python() -> PathBuf {
    let script = repo_root().join("deploy/local/ensure-python.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "pyarrow is required for this test and could not be installed by {}:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Runs tests/pyarrow_check.py over `out` and returns its findings.
fn pyarrow_check(out: &Path, expected: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pyarrow_check.py");
    let res = Command::new(python())
        .arg(&script)
        .arg(out)
        .arg(expected)
        .output()
        .expect("running pyarrow_check.py");
    assert!(
        res.status.success(),
        "pyarrow_check.py failed:\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    serde_json::from_slice(&res.stdout).expect("pyarrow_check.py prints JSON")
}

fn sink(bootstrap: &str, group: &str, out: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fleetgate-processor"))
        .args([
            "parquet",
            "--bootstrap-servers",
            bootstrap,
            "--group-id",
            group,
        ])
        .args(["--topic", TOPIC, "--session-timeout", "6s"])
        .arg("--out")
        .arg(out)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning fleetgate-processor parquet")
}

fn wait(child: Child, timeout: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("waiting for the sink"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("sink did not exit within {timeout:?}");
        }
    }
}

/// Runs the sink to completion with `--exit-when-idle` and returns its stats.
fn run_until_idle(bootstrap: &str, group: &str, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["--exit-when-idle", "3s"];
    args.extend_from_slice(extra);
    let res = wait(sink(bootstrap, group, out, &args), Duration::from_secs(180));
    assert!(
        res.status.success(),
        "sink failed: {:?}\n{}",
        res.status,
        String::from_utf8_lossy(&res.stderr)
    );
    serde_json::from_slice(&res.stdout).unwrap_or_else(|e| {
        panic!(
            "sink stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&res.stdout)
        )
    })
}

fn parquet_files(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                n += 1;
            }
        }
    }
    n
}

fn assert_exactly_once(report: &Value, sent: &[Sent]) {
    let per_fleet: BTreeMap<String, u64> =
        serde_json::from_value(report["rows_per_fleet"].clone()).expect("rows_per_fleet");
    let want = (sent.len() / FLEETS.len()) as u64;
    let expected: BTreeMap<String, u64> = FLEETS.iter().map(|f| (f.to_string(), want)).collect();
    assert_eq!(per_fleet, expected, "rows per fleet; report: {report:#}");
    assert_eq!(report["rows"], json!(sent.len()), "{report:#}");
    for empty in [
        "more_than_once",
        "missing",
        "unexpected",
        "provenance_mismatches",
        "span_mismatches",
        "partition_mismatches",
        "stray_files",
    ] {
        assert_eq!(report[empty], json!([]), "{empty}; report: {report:#}");
    }
}

#[test]
fn parquet_files_hold_every_event_once_with_provenance() {
    let broker = Broker::start().expect("broker");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let sent = events(60);
    let (records, dups) = with_dups(&sent, 30);
    produce(&broker.bootstrap(), &records);

    let started = Instant::now();
    let stats = run_until_idle(
        &broker.bootstrap(),
        "parquet-e2e",
        &out,
        &["--roll-rows", "50"],
    );
    eprintln!("sink run took {:?}: {stats}", started.elapsed());
    assert_eq!(stats["records"], json!(sent.len() + dups), "{stats}");
    assert_eq!(stats["rows_written"], json!(sent.len()), "{stats}");
    // Runs 3 and 4 are fresh processes and the redeliveries' originals were committed
    // by run 2: only the files tell them apart, which the check below verifies.
    assert!(
        stats["duplicates"].as_u64().unwrap() <= dups as u64,
        "{stats}"
    );
    assert_eq!(stats["undecodable"], json!(0), "{stats}");

    let report = pyarrow_check(&out, &write_expected(work.path(), &sent));
    assert_exactly_once(&report, &sent);
    // 600 events 10 s apart cross three hours and two dates, per fleet.
    assert!(report["files"].as_u64().unwrap() >= 6, "{report:#}");
    let schema = &report["schema"];
    assert_eq!(schema["received_at"], json!("timestamp[ms, tz=UTC]"));
    assert_eq!(schema["seq"], json!("uint64"));
    assert_eq!(schema["kafka_offset"], json!("int64"));
    assert_eq!(schema["speed_kph"], json!("double"));
    assert_eq!(schema["engine_rpm"], json!("int64"));
    assert!(
        schema["signals_other"]
            .as_str()
            .unwrap()
            .starts_with("list<"),
        "{schema}"
    );

    // Everything was committed: a second run of the same group finds nothing new.
    let again = run_until_idle(&broker.bootstrap(), "parquet-e2e", &out, &[]);
    assert_eq!(again["records"], json!(0), "{again}");
    assert_eq!(
        parquet_files(&out) as u64,
        report["files"].as_u64().unwrap()
    );
}

#[test]
fn crashes_before_commit_neither_lose_nor_duplicate_rows() {
    let broker = Broker::start().expect("broker");
    let bootstrap = broker.bootstrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let sent = events(100);
    let (first_half, second_half) = sent.split_at(sent.len() / 2);
    let group = "parquet-crash";
    let small = ["--roll-rows", "25", "--roll-age", "60s"];

    // 1: dies right after renaming its third file, before committing anything past it.
    produce(&bootstrap, &first_half.iter().collect::<Vec<_>>());
    let mut args = small.to_vec();
    args.extend(["--abort-after-files", "3"]);
    let res = wait(
        sink(&bootstrap, group, &out, &args),
        Duration::from_secs(120),
    );
    assert!(!res.status.success(), "expected an abort: {res:?}");
    assert_eq!(parquet_files(&out), 3);

    // 2: resumes, recognises the three files, writes and commits the rest.
    let stats = run_until_idle(&bootstrap, group, &out, &["--roll-rows", "25"]);
    eprintln!("after abort: {stats}");
    // Up to 75 (3 files of 25): fewer if run 1 committed past some of their rows.
    let durable = stats["already_durable"].as_u64().unwrap();
    assert!((1..=75).contains(&durable), "{stats}");
    let report = pyarrow_check(&out, &write_expected(work.path(), first_half));
    assert_exactly_once(&report, first_half);

    // 3: new events plus redeliveries of events written (and committed) in run 2;
    // SIGKILLed after writing a few files, with rows of every partition still buffered.
    let files_before = parquet_files(&out);
    let (redelivered, dups) = with_dups(first_half, 25);
    let mut later: Vec<&Sent> = second_half.iter().collect();
    later.extend(&redelivered[first_half.len()..]);
    produce(&bootstrap, &later);
    let mut child = sink(&bootstrap, group, &out, &small);
    let deadline = Instant::now() + Duration::from_secs(120);
    while parquet_files(&out) < files_before + 6 {
        assert!(Instant::now() < deadline, "third run wrote no files");
        let exited = child.try_wait().unwrap();
        assert!(exited.is_none(), "third run exited early: {exited:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let a few commit ticks pass: rows still buffered must not be committed.
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    child.wait().unwrap();

    // 4: runs to the end; the redeliveries' originals are only in files by now.
    let stats = run_until_idle(&bootstrap, group, &out, &small);
    eprintln!("final run: {stats}");
    assert!(stats["already_durable"].as_u64().unwrap() > 0, "{stats}");
    // Runs 3 and 4 are fresh processes and the redeliveries' originals were committed
    // by run 2: only the files tell them apart, which the check below verifies.
    assert!(
        stats["duplicates"].as_u64().unwrap() <= dups as u64,
        "{stats}"
    );

    let report = pyarrow_check(&out, &write_expected(work.path(), &sent));
    assert_exactly_once(&report, &sent);
}

/// docs/consuming.md's Python example, run as documented against the broker.
#[test]
fn example_consumer_reads_every_event_once() {
    let broker = Broker::start().expect("broker");
    let sent = events(20);
    let (records, dups) = with_dups(&sent, 10);
    produce(&broker.bootstrap(), &records);
    let script = repo_root().join("examples/consume.py");
    let mut child = Command::new(python())
        .arg(&script)
        .args(["--bootstrap-servers", &broker.bootstrap()])
        .args(["--group-id", "example", "--exit-when-idle", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running examples/consume.py");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    let res = wait(child, Duration::from_secs(120));
    let stdout = reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "consume.py failed:\n{stderr}");
    let summary: Value = serde_json::from_str(stderr.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("summary line ({e}):\n{stderr}"));
    assert_eq!(summary["records"], json!(sent.len() + dups), "{summary}");
    assert_eq!(summary["events"], json!(sent.len()), "{summary}");
    assert_eq!(summary["duplicates"], json!(dups), "{summary}");
    let mut keys: Vec<(String, String, u64)> = stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("JSON line");
            (
                v["fleet_id"].as_str().unwrap().to_owned(),
                v["device_id"].as_str().unwrap().to_owned(),
                v["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    keys.sort();
    let mut want: Vec<(String, String, u64)> = sent
        .iter()
        .map(|s| {
            let e = &s.expected;
            (
                e["fleet_id"].as_str().unwrap().to_owned(),
                e["device_id"].as_str().unwrap().to_owned(),
                e["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    want.sort();
    assert_eq!(keys, want);
}
