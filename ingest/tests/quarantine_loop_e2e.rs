//! The closed loop, with every component real: devices stream through ingest to a
//! tansu broker; `fleetgate-processor run` detects a misbehaving device (impossible
//! travel plus a replay storm) and quarantines it on `fleet.quarantine.v1`; ingest
//! diverts that device's events to `telemetry.quarantined.v1` while honest devices are
//! untouched; an operator's signed release through `fleetgate-quarantine` restores it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fleetgate_pki::OperatorCertSpec;
use fleetgate_proto::{BatchAck, Location, TelemetryEnvelope, Verdict};
use fleetgate_test_support::{decode, read_topic_until, workspace_bin, TRUST_DOMAIN};

struct Processor(Child);

impl Drop for Processor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_processor(bootstrap: &str, dir: &std::path::Path) -> Processor {
    let config = dir.join("processor.toml");
    std::fs::write(
        &config,
        format!(
            "processor_id = \"loop-1\"\nlog_format = \"text\"\n\
             [kafka]\nbootstrap_servers = \"{bootstrap}\"\ngroup_id = \"loop\"\n\
             commit_interval = \"200ms\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(workspace_bin("fleetgate-processor").unwrap())
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("processor.log")).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let ready = lines.next().and_then(Result::ok).unwrap_or_default();
    assert!(ready.starts_with("fleetgate-processor ready"), "{ready:?}");
    std::thread::spawn(move || lines.for_each(drop));
    Processor(child)
}

fn at(seq: u64, captured_at_ms: i64, lat: f64, lon: f64) -> fleetgate_proto::TelemetryEvent {
    let mut e = event(seq, 50.0);
    e.captured_at_ms = captured_at_ms;
    e.location = Some(Location {
        latitude_deg: lat,
        longitude_deg: lon,
        accuracy_m: 5.0,
        heading_deg: 0.0,
    });
    e
}

fn reason(ack: &BatchAck) -> (Verdict, String) {
    verdicts(ack)[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_device_is_quarantined_automatically_and_released_by_an_operator() {
    let stack = Stack::start("");
    let dir = tempfile::tempdir().unwrap();
    let _processor = spawn_processor(&stack.broker.bootstrap(), dir.path());

    let mut honest = Vec::new();
    for d in 0..3 {
        honest.push(
            stack
                .device_on(Wire::Grpc, "fleet-a", &format!("honest-{d}"))
                .await,
        );
    }
    let mut bad = stack.device_on(Wire::Quic, "fleet-a", "car-x").await;

    // Impossible travel: Berlin, then Paris two seconds later (~880 km).
    let t = now_ms() - 5_000;
    let offending_sent = Instant::now();
    let ack = bad
        .send(&batch(
            1,
            vec![
                at(2000, t, 52.52, 13.405),
                at(2001, t + 2_000, 48.8566, 2.3522),
            ],
        ))
        .await
        .unwrap();
    assert!(all_accepted(&ack), "{ack:?}");
    // Replay storm: 12 seqs far below the anti-replay window.
    for s in 1..=12u64 {
        let ack = bad.send(&batch(1 + s, vec![event(s, 1.0)])).await.unwrap();
        assert_eq!(
            reason(&ack),
            (Verdict::Rejected, "replay_outside_window".into())
        );
    }

    // Keep streaming; honest devices keep streaming too. Within seconds the bad
    // device's acks turn to `quarantined`; the honest ones never do.
    let mut seq = 2002u64;
    let mut honest_seq = 1u64;
    let enforced_after = loop {
        assert!(
            offending_sent.elapsed() < Duration::from_secs(30),
            "not quarantined within 30 s: {}",
            std::fs::read_to_string(dir.path().join("processor.log")).unwrap_or_default()
        );
        let ack = bad
            .send(&batch(seq, vec![at(seq, now_ms(), 48.8566, 2.3522)]))
            .await
            .unwrap();
        seq += 1;
        for h in honest.iter_mut() {
            let a = h
                .send(&batch(honest_seq, vec![event(honest_seq, 30.0)]))
                .await
                .unwrap();
            assert_eq!(reason(&a), (Verdict::Accepted, String::new()));
        }
        honest_seq += 1;
        match reason(&ack) {
            (Verdict::Accepted, r) if r == "quarantined" => break offending_sent.elapsed(),
            (Verdict::Accepted, r) if r.is_empty() => {}
            other => panic!("unexpected {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let first_diverted = seq - 1;
    eprintln!("offending event to enforcement (seen by the device): {enforced_after:?}");
    let latency_sum = stack
        .ingest
        .metric("fleetgate_quarantine_enforcement_latency_seconds_sum", &[])
        .unwrap();
    eprintln!("ingest-measured enforcement latency: {latency_sum:.3} s");
    assert!(latency_sum > 0.0 && latency_sum < 30.0, "{latency_sum}");

    // The operator releases it with a signed record.
    let operator = stack
        .pki
        .ca
        .issue_operator(&OperatorCertSpec::new(TRUST_DOMAIN, "alice"))
        .unwrap();
    let (cert, key) = operator.write(dir.path(), "alice").unwrap();
    let out = Command::new(workspace_bin("fleetgate-quarantine").unwrap())
        .args(["--bootstrap-servers", &stack.broker.bootstrap()])
        .arg("--ca")
        .arg(stack.pki.dir().join("ca.pem"))
        .arg("--operator-cert")
        .arg(&cert)
        .arg("--operator-key")
        .arg(&key)
        .args([
            "release",
            "--fleet",
            "fleet-a",
            "--device",
            "car-x",
            "--reason",
            "false positive: test rig",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let released_at = loop {
        assert!(
            offending_sent.elapsed() < Duration::from_secs(60),
            "release not enforced"
        );
        let ack = bad
            .send(&batch(seq, vec![at(seq, now_ms(), 48.8566, 2.3522)]))
            .await
            .unwrap();
        seq += 1;
        if reason(&ack) == (Verdict::Accepted, String::new()) {
            break seq - 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Diverted events are on the quarantine topic, not the main one.
    let quarantined = read_topic_until(
        &stack.broker.bootstrap(),
        "telemetry.quarantined.v1",
        Duration::from_secs(15),
        |m| m.len() as u64 >= released_at - first_diverted,
    )
    .unwrap();
    let q: Vec<u64> = quarantined
        .iter()
        .map(|m| {
            decode::<TelemetryEnvelope>(m)
                .unwrap()
                .provenance
                .unwrap()
                .seq
        })
        .collect();
    assert!(q.contains(&first_diverted), "{q:?}");
    let main = read_topic_until(
        &stack.broker.bootstrap(),
        "telemetry.events.v1",
        Duration::from_secs(15),
        |m| {
            let provs: Vec<_> = m
                .iter()
                .filter_map(|r| decode::<TelemetryEnvelope>(r).ok()?.provenance)
                .collect();
            provs
                .iter()
                .any(|p| p.device_id == "car-x" && p.seq == released_at)
                && provs
                    .iter()
                    .filter(|p| p.device_id.starts_with("honest-"))
                    .count() as u64
                    >= 3 * (honest_seq - 1)
        },
    )
    .unwrap();
    let bad_main: Vec<u64> = main
        .iter()
        .filter_map(|r| decode::<TelemetryEnvelope>(r).ok()?.provenance)
        .filter(|p| p.device_id == "car-x")
        .map(|p| p.seq)
        .collect();
    assert!(bad_main.contains(&released_at));
    assert!(
        bad_main.iter().all(|s| !q.contains(s)),
        "no event on both topics: main {bad_main:?} quarantined {q:?}"
    );
    let honest_main = main
        .iter()
        .filter_map(|r| decode::<TelemetryEnvelope>(r).ok()?.provenance)
        .filter(|p| p.device_id.starts_with("honest-"))
        .count() as u64;
    assert_eq!(
        honest_main,
        3 * (honest_seq - 1),
        "every honest event on the main topic"
    );
    bad.close().await;
}
