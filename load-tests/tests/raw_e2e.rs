//! `fleetgate-loadgen raw` produces exactly the recording's events, as decodable
//! `TelemetryEnvelope` records keyed by device, to a real broker.

use std::process::Command;
use std::time::Duration;

use fleetgate_proto::TelemetryEnvelope;
use fleetgate_test_support::{decode, read_topic, Broker};

#[test]
fn raw_produces_every_recorded_event_once() {
    let broker = Broker::start().unwrap();
    broker.create_topic("bench.raw.v1", 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let recording = dir.path().join("fleet.rec");
    let bin = env!("CARGO_BIN_EXE_fleetgate-loadgen");
    let out = Command::new(bin)
        .args([
            "generate",
            "--devices",
            "3",
            "--duration",
            "20s",
            "--fleet",
            "raw-test",
        ])
        .arg("--out")
        .arg(&recording)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = dir.path().join("raw.json");
    let out = Command::new(bin)
        .args(["raw", "--bootstrap-servers", &broker.bootstrap()])
        .arg("--recording")
        .arg(&recording)
        .arg("--json")
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let events = report["events"].as_u64().unwrap();
    let file = std::fs::File::open(&recording).unwrap();
    let (_, batches) = fleetgate_loadgen::recording::RecordingReader::new(file)
        .and_then(|r| r.read_all())
        .unwrap();
    let recorded: usize = batches
        .iter()
        .map(|b| {
            <fleetgate_proto::TelemetryBatch as prost::Message>::decode(b.batch.as_slice())
                .unwrap()
                .events
                .len()
        })
        .sum();
    assert!(recorded > 0);
    assert_eq!(
        events, recorded as u64,
        "the report counts the recording's events"
    );

    // One extra record per device warmed the producer up and is not counted.
    let records = read_topic(
        &broker.bootstrap(),
        "bench.raw.v1",
        events as usize + 3,
        Duration::from_secs(20),
    )
    .unwrap();
    assert_eq!(records.len() as u64, events + 3);
    let mut seen = std::collections::HashMap::<(String, u64), u32>::new();
    for r in &records {
        let envelope: TelemetryEnvelope = decode(r).unwrap();
        let p = envelope.provenance.unwrap();
        assert_eq!(p.fleet_id, "raw-test");
        *seen.entry((p.device_id, p.seq)).or_default() += 1;
    }
    assert_eq!(
        seen.len() as u64,
        events,
        "every recorded event is on the topic"
    );
    assert_eq!(
        seen.values().filter(|n| **n == 2).count(),
        3,
        "only the warm-up repeats"
    );
}
