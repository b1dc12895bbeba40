//! End to end: `fleetgate-loadgen generate` writes a recording, `fleetgate-loadgen
//! replay` plays it at max speed against a real ingest (spawned process, real tansu
//! broker, real mTLS) over QUIC and over gRPC, with every attack scenario mixed in.
//! Every honest event must be accepted, the JSON report must add up, every attack must
//! get its expected reason, and the events topic must hold exactly the accepted
//! events (a replayed batch is acknowledged but not stored twice).
//!
//! Needs the ingest binary: run `cargo build --workspace` (or `cargo build -p
//! fleetgate-ingest`) before `cargo test -p fleetgate-loadgen`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fleetgate_loadgen::attack::Attack;
use fleetgate_loadgen::recording::RecordingReader;
use fleetgate_proto::TelemetryBatch;
use fleetgate_test_support::{
    free_port, read_topic, workspace_bin, Broker, Ingest, TestPki, TRUST_DOMAIN,
};
use prost::Message;
use serde_json::Value;

const LOADGEN: &str = env!("CARGO_BIN_EXE_fleetgate-loadgen");
const DEVICES: u64 = 5;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(LOADGEN)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("running fleetgate-loadgen");
    let text = format!(
        "$ fleetgate-loadgen {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Writes a recording of `fleet` and returns (batches, events) it holds.
fn generate(dir: &Path, fleet: &str, seed: u64) -> (std::path::PathBuf, u64, u64) {
    let path = dir.join(format!("{fleet}.rec"));
    let (ok, text) = run(&[
        "generate",
        "--out",
        path.to_str().expect("utf-8 path"),
        "--devices",
        &DEVICES.to_string(),
        "--duration",
        "20s",
        "--seed",
        &seed.to_string(),
        "--fleet",
        fleet,
    ]);
    assert!(ok, "{text}");
    let file = std::fs::File::open(&path).expect("recording written");
    let (header, batches) = RecordingReader::new(file)
        .and_then(RecordingReader::read_all)
        .expect("recording reads back");
    assert_eq!(
        (header.fleet_id.as_str(), u64::from(header.devices)),
        (fleet, DEVICES)
    );
    let events = batches
        .iter()
        .map(|b| {
            TelemetryBatch::decode(b.batch.as_slice())
                .expect("recorded batch decodes")
                .events
                .len() as u64
        })
        .sum();
    assert!(events >= DEVICES * 15, "only {events} events in 5 x 20 s");
    (path, batches.len() as u64, events)
}

/// Replays `recording` at `speed` with the `attack` list (empty: none); the JSON report.
fn replay(
    dir: &Path,
    ingest: &Ingest,
    pki: &TestPki,
    recording: &Path,
    transport: &str,
    speed: &str,
    attack: &str,
) -> Value {
    let json = dir.join(format!("{transport}-{speed}.json"));
    let target = match transport {
        "quic" => vec!["--quic-addr".to_owned(), ingest.quic.to_string()],
        _ => vec!["--endpoint".to_owned(), ingest.endpoint()],
    };
    let mut args = vec![
        "replay",
        "--recording",
        recording.to_str().expect("utf-8 path"),
        "--transport",
        transport,
        "--pki-dir",
        pki.dir().to_str().expect("utf-8 path"),
        "--trust-domain",
        TRUST_DOMAIN,
        "--speed",
        speed,
        "--json",
        json.to_str().expect("utf-8 path"),
    ];
    if !attack.is_empty() {
        args.extend(["--attack", attack]);
    }
    args.extend(target.iter().map(String::as_str));
    let (ok, text) = run(&args);
    eprintln!("{text}");
    assert!(ok, "{text}\n--- ingest\n{}", ingest.logs());
    assert!(
        text.contains("issued"),
        "certificates were not issued on the fly: {text}"
    );
    serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON report written"))
        .expect("JSON report parses")
}

#[test]
fn replays_a_generated_fleet_over_quic_and_grpc_with_attacks() {
    let broker = Broker::start().expect("broker starts");
    let pki = TestPki::new().expect("pki");
    let toml = format!(
        "node_id = \"loadgen-it\"\n{}\n[kafka]\nbootstrap_servers = \"{}\"\n",
        pki.tls_toml(),
        broker.bootstrap()
    );
    let bin = workspace_bin("fleetgate-ingest").expect("ingest binary built");
    let ingest = Ingest::spawn_with_env(&bin, &toml, &[]).expect("ingest starts");
    let dir = tempfile::tempdir().expect("temp dir");

    let mut stored_expected = 0;
    for (transport, fleet, seed) in [("quic", "fleet-q", 1), ("grpc", "fleet-g", 2)] {
        let (rec, batches, events) = generate(dir.path(), fleet, seed);
        let r = replay(dir.path(), &ingest, &pki, &rec, transport, "max", "all");
        let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
        assert_eq!(r["fleet"], fleet);
        assert_eq!(r["transport"], transport);
        assert_eq!(n("devices"), DEVICES);
        assert_eq!(n("devices_failed"), 0, "{r}");
        assert_eq!(n("events_sent"), events, "{r}");
        assert_eq!(n("accepted"), events, "{r}");
        assert_eq!(n("rejected"), 0, "{r}");
        // At max speed nothing should need more than one attempt per batch, but a
        // RETRY is allowed; every recorded batch got at least one ack.
        assert!(n("batches") >= batches, "{r}");
        let lat = &r["batch_ack_latency"];
        assert_eq!(lat["samples"].as_u64(), Some(n("batches")));
        for k in ["p50_ms", "p90_ms", "p99_ms"] {
            assert!(lat[k].as_f64().unwrap() <= lat["max_ms"].as_f64().unwrap());
        }
        assert!(r["events_per_s"].as_f64().unwrap() > 0.0, "{r}");

        let attacks = r["attacks"].as_array().expect("attack results");
        assert_eq!(attacks.len(), Attack::ALL.len(), "{r}");
        for a in attacks {
            let expected: Vec<&str> = a["expected"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let received = a["received"].as_object().unwrap();
            assert!(
                !received.is_empty() && received.keys().all(|k| expected.contains(&k.as_str())),
                "{transport} {}: expected {expected:?}, got {received:?}",
                a["scenario"]
            );
            assert!(a.get("error").is_none(), "{a}");
        }
        // Honest events plus the replayed-batches attacker's 4 accepted setup events.
        stored_expected += events + 4;
    }

    // Paced replay: at 10x, the last batch (recorded near 20 s) goes out after ~2 s.
    let (rec, _, events) = generate(dir.path(), "fleet-paced", 3);
    let file = std::fs::File::open(&rec).expect("recording");
    let (_, batches) = RecordingReader::new(file)
        .and_then(RecordingReader::read_all)
        .expect("recording reads");
    let last_offset_s = batches.last().expect("batches").offset_ms as f64 / 1e3;
    let r = replay(dir.path(), &ingest, &pki, &rec, "grpc", "10", "");
    assert_eq!(r["accepted"].as_u64(), Some(events), "{r}");
    let elapsed = r["elapsed_s"].as_f64().expect("elapsed_s");
    assert!(
        elapsed >= last_offset_s / 10.0 - 0.05 && elapsed < last_offset_s / 10.0 + 5.0,
        "10x replay of {last_offset_s} s took {elapsed} s"
    );
    assert!(r.get("attacks").is_none(), "{r}");
    stored_expected += events;

    let stored = read_topic(
        &broker.bootstrap(),
        "telemetry.events.v1",
        stored_expected as usize + 1,
        Duration::from_secs(8),
    )
    .expect("reading events topic");
    assert_eq!(
        stored.len() as u64,
        stored_expected,
        "events topic must hold each accepted event exactly once"
    );
}

/// Not a correctness test: replays a larger generated fleet over both transports and
/// prints the reports, for measuring. Sizes from `LOADGEN_DEVICES` (default 200) and
/// `LOADGEN_DURATION` (default 60s), `LOADGEN_SPEED` (default max),
/// `LOADGEN_GAP_PROBABILITY` (default 0.004).
/// `cargo test -p fleetgate-loadgen --test replay_e2e -- --ignored --nocapture`
#[test]
#[ignore = "measurement run; prints numbers"]
fn measure_max_speed_replay() {
    let devices = std::env::var("LOADGEN_DEVICES").unwrap_or_else(|_| "200".into());
    let duration = std::env::var("LOADGEN_DURATION").unwrap_or_else(|_| "60s".into());
    let speed = std::env::var("LOADGEN_SPEED").unwrap_or_else(|_| "max".into());
    let gap = std::env::var("LOADGEN_GAP_PROBABILITY").unwrap_or_else(|_| "0.004".into());
    let broker = Broker::start().expect("broker starts");
    let pki = TestPki::new().expect("pki");
    let toml = format!(
        "node_id = \"loadgen-measure\"\n{}\n[kafka]\nbootstrap_servers = \"{}\"\n",
        pki.tls_toml(),
        broker.bootstrap()
    );
    let bin = workspace_bin("fleetgate-ingest").expect("ingest binary built");
    let ingest = Ingest::spawn_with_env(&bin, &toml, &[]).expect("ingest starts");
    let dir = tempfile::tempdir().expect("temp dir");
    for (transport, fleet) in [("quic", "measure-q"), ("grpc", "measure-g")] {
        let rec = dir.path().join(format!("{fleet}.rec"));
        let (ok, text) = run(&[
            "generate",
            "--out",
            rec.to_str().expect("utf-8 path"),
            "--devices",
            &devices,
            "--duration",
            &duration,
            "--fleet",
            fleet,
            "--gap-probability",
            &gap,
        ]);
        assert!(ok, "{text}");
        eprintln!("{text}");
        let r = replay(dir.path(), &ingest, &pki, &rec, transport, &speed, "");
        assert_eq!(r["accepted"], r["events_sent"], "{r}");
    }
}

/// An ingest restart in the middle of a paced replay: every device reconnects (with
/// back-off, while the new process starts on the same ports) and re-sends what had
/// no verdict, so nothing is lost, over both transports at once.
#[test]
fn replay_reconnects_through_an_ingest_restart() {
    let broker = Broker::start().expect("broker starts");
    let pki = TestPki::new().expect("pki");
    let toml = format!(
        "node_id = \"loadgen-restart\"\n{}\n[kafka]\nbootstrap_servers = \"{}\"\n",
        pki.tls_toml(),
        broker.bootstrap()
    );
    let listen = |port: u16| format!("127.0.0.1:{port}");
    let (grpc, quic, metrics) = (
        listen(free_port()),
        listen(free_port()),
        listen(free_port()),
    );
    let env = [
        ("FLEETGATE_GRPC__LISTEN", grpc.as_str()),
        ("FLEETGATE_QUIC__LISTEN", quic.as_str()),
        ("FLEETGATE_METRICS__LISTEN", metrics.as_str()),
    ];
    let bin = workspace_bin("fleetgate-ingest").expect("ingest binary built");
    let ingest = Ingest::spawn_with_env(&bin, &toml, &env).expect("ingest starts");
    let dir = tempfile::tempdir().expect("temp dir");

    let mut runs = Vec::new();
    for (transport, fleet, seed) in [("quic", "restart-q", 4), ("grpc", "restart-g", 5)] {
        let (rec, _, events) = generate(dir.path(), fleet, seed);
        let json = dir.path().join(format!("{fleet}.json"));
        let target = match transport {
            "quic" => ["--quic-addr".to_owned(), ingest.quic.to_string()],
            _ => ["--endpoint".to_owned(), ingest.endpoint()],
        };
        let child = Command::new(LOADGEN)
            .args(["replay", "--recording"])
            .arg(&rec)
            .args(["--transport", transport, "--pki-dir"])
            .arg(pki.dir())
            .args(["--trust-domain", TRUST_DOMAIN, "--speed", "4", "--json"])
            .arg(&json)
            .args(target)
            .env_remove("RUST_BACKTRACE")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawning replay");
        runs.push((transport, events, json, child));
    }
    // 20 s at 4x is ~5 s: restart ingest after ~2 s.
    std::thread::sleep(Duration::from_secs(2));
    let status = ingest.terminate().expect("ingest stops");
    assert!(status.success(), "ingest exit: {status}");
    let ingest = Ingest::spawn_with_env(&bin, &toml, &env).expect("ingest restarts");

    for (transport, events, json, child) in runs {
        let out = child.wait_with_output().expect("replay finishes");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{transport}:\n{text}");
        assert!(
            out.status.success(),
            "{transport}: {text}\n--- ingest\n{}",
            ingest.logs()
        );
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("report"))
            .expect("report parses");
        assert_eq!(r["accepted"].as_u64(), Some(events), "{r}");
        assert_eq!(r["events_sent"].as_u64(), Some(events), "{r}");
        assert!(
            r["reconnects"].as_u64().expect("reconnects") >= 1,
            "{transport}: the restart went unnoticed: {r}"
        );
    }
}
