//! The real `fleetgate-processor run` against a real broker: crafted honest and
//! misbehaving devices on the input topics; findings and decisions read back from the
//! output topics; evidence checked against the actual input offsets; a restart with
//! the same group id does not reprocess committed input.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use fleetgate_test_support::proto::{
    signal, Finding, Location, Provenance, QuarantineDecision, QuarantineState, RejectRecord,
    Signal, TelemetryEnvelope, TelemetryEvent,
};
use fleetgate_test_support::{
    decode, http_get, metric_value, read_topic_until, ready_field, Broker, StdoutLines,
};
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const EVENTS: &str = "telemetry.events.v1";
const REJECTED: &str = "telemetry.rejected.v1";
const ANOMALIES: &str = "telemetry.anomalies.v1";
const QUARANTINE: &str = "fleet.quarantine.v1";
const FLEET: &str = "fleet-a";
const HONEST: [&str; 3] = ["car-1", "car-2", "car-3"];
const N: i64 = 40;

/// A spawned processor; SIGKILLed on drop unless terminated.
struct Processor {
    child: Child,
    metrics: SocketAddr,
    log: std::path::PathBuf,
}

impl Processor {
    fn spawn(config: &Path, log: std::path::PathBuf) -> anyhow::Result<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleetgate-processor"))
            .args(["run", "--config"])
            .arg(config)
            .env("FLEETGATE_LOG", "info,rdkafka=warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawning fleetgate-processor")?;
        let lines = StdoutLines::take(&mut child)?;
        let Some(line) = lines.wait_for("fleetgate-processor ready", Duration::from_secs(20))
        else {
            let _ = child.kill();
            bail!(
                "processor not ready: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Ok(Self {
            child,
            metrics: ready_field(&line, "metrics=")?,
            log,
        })
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        http_get(self.metrics, "/metrics")
            .ok()
            .and_then(|text| metric_value(&text, name, labels))
            .unwrap_or(0.0)
    }

    fn wait_metric(&self, name: &str, labels: &[(&str, &str)], min: f64, timeout: Duration) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric(name, labels);
            if v >= min || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for a clean exit.
    fn terminate(mut self) -> anyhow::Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("processor exited with {status}: {}", self.logs());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("processor did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Processor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

fn provenance(device: &str, seq: u64, received_at_ms: i64) -> Provenance {
    Provenance {
        device_id: device.into(),
        fleet_id: FLEET.into(),
        transport: "grpc".into(),
        ingest_node: "ingest-e2e".into(),
        received_at_ms,
        captured_at_ms: received_at_ms - 200,
        sent_at_ms: received_at_ms - 100,
        seq,
        schema_version: 1,
        ..Default::default()
    }
}

fn envelope(device: &str, seq: u64, received_at_ms: i64, lat: f64, lon: f64, odo: f64) -> Vec<u8> {
    let f64_signal = |name: &str, v: f64| Signal {
        name: name.into(),
        value: Some(signal::Value::F64(v)),
    };
    TelemetryEnvelope {
        event: Some(TelemetryEvent {
            seq,
            captured_at_ms: received_at_ms - 200,
            signals: vec![
                f64_signal("speed_kph", 100.0),
                f64_signal("odometer_km", odo),
                f64_signal("soc_pct", 80.0 - seq as f64 * 0.01),
            ],
            location: Some(Location {
                latitude_deg: lat,
                longitude_deg: lon,
                accuracy_m: 8.0,
                heading_deg: 0.0,
            }),
        }),
        provenance: Some(provenance(device, seq, received_at_ms)),
    }
    .encode_to_vec()
}

fn produce(bootstrap: &str, records: &[(&str, String, Vec<u8>)]) -> anyhow::Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()?;
    for (topic, key, payload) in records {
        producer
            .send(BaseRecord::to(topic).key(key).payload(payload))
            .map_err(|(e, _)| e)?;
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(20))?;
    Ok(())
}

/// Reads `topic` until `want` records arrived, then until 1.5 s pass without more.
fn read_settled(bootstrap: &str, topic: &str, want: usize, timeout: Duration) -> Vec<OwnedMessage> {
    let mut reached: Option<Instant> = None;
    let mut last_len = 0;
    let mut last_change = Instant::now();
    read_topic_until(bootstrap, topic, timeout, |r| {
        if r.len() != last_len {
            last_len = r.len();
            last_change = Instant::now();
        }
        if r.len() >= want {
            reached.get_or_insert_with(Instant::now);
        }
        reached.is_some() && last_change.elapsed() > Duration::from_millis(1500)
    })
    .expect("reading topic")
}

#[test]
fn detectors_quarantine_misbehaving_devices_and_restart_does_not_reprocess() {
    let started = Instant::now();
    let broker = Broker::start().expect("starting tansu");
    let bootstrap = broker.bootstrap();
    let t0 = now_ms() - 10 * 60_000;

    // Honest devices: 100 km/h northwards, 1 Hz, odometer increasing. One redelivery.
    let mut records = Vec::new();
    for (d, device) in HONEST.iter().enumerate() {
        for i in 0..N {
            let lat = 48.0 + d as f64 + i as f64 * 27.8 / 111_195.0;
            let odo = 10_000.0 + i as f64 * 0.0278;
            records.push((
                EVENTS,
                device.to_string(),
                envelope(device, i as u64 + 1, t0 + i * 1000, lat, 11.0, odo),
            ));
        }
    }
    records.push(records[5].clone());
    // The bad device teleports between Paris and Berlin every 10 s.
    for i in 0..N {
        let (lat, lon) = if (i / 10) % 2 == 0 {
            (48.8566, 2.3522)
        } else {
            (52.52, 13.405)
        };
        records.push((
            EVENTS,
            "car-x".into(),
            envelope(
                "car-x",
                i as u64 + 1,
                t0 + i * 1000,
                lat,
                lon,
                5_000.0 + i as f64 * 0.01,
            ),
        ));
    }
    // A replay storm from car-r: 15 events below its anti-replay window within 7.5 s.
    for i in 0..15i64 {
        let reject = RejectRecord {
            reason: "replay_outside_window".into(),
            detail: "seq 3 below window".into(),
            provenance: Some(provenance("car-r", 3, t0 + i * 500)),
            frame_bytes: 120,
            seq: Some(3),
        };
        records.push((REJECTED, "car-r".into(), reject.encode_to_vec()));
    }
    produce(&bootstrap, &records).expect("producing input");
    let events_total = records.iter().filter(|r| r.0 == EVENTS).count();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("processor.toml");
    std::fs::write(
        &config,
        format!(
            "processor_id = \"e2e-1\"\nlog_format = \"text\"\n\
             [kafka]\nbootstrap_servers = \"{bootstrap}\"\ngroup_id = \"e2e-group\"\n\
             commit_interval = \"200ms\"\nstats_interval = \"1s\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
    .unwrap();

    let p = Processor::spawn(&config, dir.path().join("p1.log")).expect("spawning processor");
    // 3 travel findings for car-x (out, back, out) and 1 for car-r's storm.
    let anomalies = read_settled(&bootstrap, ANOMALIES, 4, Duration::from_secs(30));
    let decisions = read_settled(&bootstrap, QUARANTINE, 2, Duration::from_secs(10));
    let findings: Vec<Finding> = anomalies.iter().map(|m| decode(m).unwrap()).collect();
    assert_eq!(findings.len(), 4, "{findings:#?}\n{}", p.logs());

    // Evidence points at the real input records.
    let inputs: HashMap<(String, i32, i64), OwnedMessage> =
        read_settled(&bootstrap, EVENTS, events_total, Duration::from_secs(20))
            .into_iter()
            .chain(read_settled(
                &bootstrap,
                REJECTED,
                15,
                Duration::from_secs(20),
            ))
            .map(|m| ((m.topic().to_owned(), m.partition(), m.offset()), m))
            .collect();
    for (msg, f) in anomalies.iter().zip(&findings) {
        let key = String::from_utf8_lossy(msg.key().unwrap()).into_owned();
        assert_eq!(key, format!("{FLEET}/{}", f.device_id));
        assert!(
            HONEST.iter().all(|h| *h != f.device_id),
            "honest device flagged: {f:#?}"
        );
        assert_eq!(f.processor_id, "e2e-1");
        assert!(!f.evidence.is_empty());
        for e in &f.evidence {
            let rec = inputs
                .get(&(e.topic.clone(), e.partition, e.offset))
                .unwrap_or_else(|| panic!("evidence points nowhere: {e:?}"));
            let p = if e.topic == EVENTS {
                decode::<TelemetryEnvelope>(rec)
                    .unwrap()
                    .provenance
                    .unwrap()
            } else {
                decode::<RejectRecord>(rec).unwrap().provenance.unwrap()
            };
            assert_eq!(
                (p.device_id.as_str(), p.seq),
                (f.device_id.as_str(), e.seq),
                "{e:?}"
            );
        }
    }
    let count = |device: &str, detector: &str| {
        findings
            .iter()
            .filter(|f| f.device_id == device && f.detector == detector)
            .count()
    };
    assert_eq!(count("car-x", "impossible_travel"), 3);
    assert_eq!(count("car-r", "repeated_rejects"), 1);

    // Exactly one decision per bad device.
    assert_eq!(decisions.len(), 2, "{}", p.logs());
    let mut by_key: HashMap<String, QuarantineDecision> = HashMap::new();
    for m in &decisions {
        let key = String::from_utf8_lossy(m.key().unwrap()).into_owned();
        assert!(
            by_key.insert(key, decode(m).unwrap()).is_none(),
            "two decisions for one device"
        );
    }
    let x = &by_key[&format!("{FLEET}/car-x")];
    assert_eq!(x.state, QuarantineState::Quarantined as i32);
    assert_eq!(x.decided_by, "processor:e2e-1");
    // Two jumps 10 s apart decay to just under 1.0; the third crosses it.
    assert!(x.reason.starts_with("policy: score 1.4"), "{}", x.reason);
    assert!(
        x.reason.ends_with("≥ 1.00 (impossible_travel×3)"),
        "{}",
        x.reason
    );
    assert_eq!(x.evidence.len(), 3);
    // The first jump's anchor is car-x's 10th event.
    assert_eq!(x.first_offending_received_at_ms, t0 + 9 * 1000);
    assert!(x.expires_at_ms > x.decided_at_ms && x.decided_at_ms >= t0);
    assert_eq!(x.decision_id.len(), 32);
    let r = &by_key[&format!("{FLEET}/car-r")];
    assert_eq!(r.first_offending_received_at_ms, t0);
    assert!(r.reason.contains("repeated_rejects×1"), "{}", r.reason);

    // Metrics agree.
    let m = |name: &str, labels: &[(&str, &str)]| p.metric(name, labels);
    assert_eq!(
        m(
            "fleetgate_processor_findings_total",
            &[("detector", "impossible_travel")]
        ),
        3.0
    );
    assert_eq!(
        m(
            "fleetgate_processor_findings_total",
            &[("detector", "repeated_rejects")]
        ),
        1.0
    );
    assert_eq!(
        m("fleetgate_processor_quarantine_decisions_total", &[]),
        2.0
    );
    assert_eq!(m("fleetgate_processor_duplicates_dropped_total", &[]), 1.0);
    assert_eq!(
        m("fleetgate_processor_records_total", &[("input", "events")]),
        events_total as f64
    );
    assert_eq!(
        m(
            "fleetgate_processor_records_total",
            &[("input", "rejected")]
        ),
        15.0
    );
    assert!(
        p.wait_metric(
            "fleetgate_processor_commits_total",
            &[],
            1.0,
            Duration::from_secs(5)
        ) >= 1.0
    );
    // Lag per input partition, from librdkafka statistics (1 s interval here).
    let deadline = Instant::now() + Duration::from_secs(10);
    let lag = loop {
        let text = http_get(p.metrics, "/metrics").unwrap_or_default();
        let lag = metric_value(
            &text,
            "fleetgate_processor_consumer_lag",
            &[("topic", EVENTS)],
        );
        if lag.is_some() || Instant::now() > deadline {
            break lag;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("consumer lag over {EVENTS}: {lag:?}");
    assert!(lag.is_some(), "no consumer lag series: {}", p.logs());
    p.terminate().expect("clean shutdown");

    // Same group again: committed input is not read twice; new input is.
    let p2 = Processor::spawn(&config, dir.path().join("p2.log")).expect("respawning processor");
    let assigned = p2.wait_metric(
        "fleetgate_processor_assigned_partitions",
        &[],
        6.0,
        Duration::from_secs(30),
    );
    assert_eq!(assigned, 6.0, "{}", p2.logs());
    produce(
        &bootstrap,
        &[(
            EVENTS,
            "car-1".into(),
            envelope("car-1", 1000, t0 + 100_000, 48.3, 11.0, 10_002.0),
        )],
    )
    .unwrap();
    let read = p2.wait_metric(
        "fleetgate_processor_records_total",
        &[("input", "events")],
        1.0,
        Duration::from_secs(20),
    );
    assert_eq!(read, 1.0, "only the new event is read: {}", p2.logs());
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        p2.metric("fleetgate_processor_records_total", &[("input", "events")]),
        1.0
    );
    assert_eq!(
        p2.metric(
            "fleetgate_processor_records_total",
            &[("input", "rejected")]
        ),
        0.0
    );
    let decisions = read_settled(&bootstrap, QUARANTINE, 2, Duration::from_secs(10));
    assert_eq!(decisions.len(), 2, "no second decision after restart");
    p2.terminate().expect("clean shutdown");
    eprintln!("detect e2e took {:?}", started.elapsed());
}

#[test]
fn print_config_shows_effective_values_and_bad_config_is_named() {
    let bin = env!("CARGO_BIN_EXE_fleetgate-processor");
    let out = Command::new(bin)
        .args(["run", "--print-config"])
        .env("FLEETGATE_POLICY__THRESHOLD", "2.5")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("threshold = 2.5"), "{text}");
    assert!(text.contains("[detectors.impossible_travel]"), "{text}");
    assert!(
        text.contains("group_id = \"fleetgate-processor\""),
        "{text}"
    );

    let out = Command::new(bin)
        .args(["run"])
        .env("FLEETGATE_DETECTORS__SOC_JUMP__MAX_JUMP_PCT", "-3")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("detectors.soc_jump.max_jump_pct"), "{err}");
}

#[test]
fn two_instances_share_the_partitions_and_decide_once() {
    let broker = Broker::start().expect("starting tansu");
    let bootstrap = broker.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let config = |id: &str| {
        let path = dir.path().join(format!("{id}.toml"));
        std::fs::write(
            &path,
            format!(
                "processor_id = \"{id}\"\nlog_format = \"text\"\n\
                 [kafka]\nbootstrap_servers = \"{bootstrap}\"\ngroup_id = \"shared\"\n\
                 commit_interval = \"200ms\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n"
            ),
        )
        .unwrap();
        path
    };
    let a = Processor::spawn(&config("pa"), dir.path().join("pa.log")).unwrap();
    let b = Processor::spawn(&config("pb"), dir.path().join("pb.log")).unwrap();
    let assigned = "fleetgate_processor_assigned_partitions";
    let deadline = Instant::now() + Duration::from_secs(40);
    let split = loop {
        let (na, nb) = (a.metric(assigned, &[]), b.metric(assigned, &[]));
        if (na + nb == 6.0 && na > 0.0 && nb > 0.0) || Instant::now() > deadline {
            break (na, nb);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        split.0 + split.1 == 6.0 && split.0 > 0.0 && split.1 > 0.0,
        "partitions not shared: {split:?}\n{}\n{}",
        a.logs(),
        b.logs()
    );

    // Twelve devices, each replaying storms: they land on both instances' partitions.
    let t0 = now_ms() - 60_000;
    let mut records = Vec::new();
    for d in 0..12 {
        let device = format!("storm-{d}");
        for i in 0..10i64 {
            let reject = RejectRecord {
                reason: "replay_outside_window".into(),
                provenance: Some(provenance(&device, 1, t0 + i * 100)),
                seq: Some(1),
                ..Default::default()
            };
            records.push((REJECTED, device.clone(), reject.encode_to_vec()));
        }
    }
    produce(&bootstrap, &records).unwrap();
    let decisions = read_settled(&bootstrap, QUARANTINE, 12, Duration::from_secs(30));
    let mut keys: Vec<String> = decisions
        .iter()
        .map(|m| String::from_utf8_lossy(m.key().unwrap()).into_owned())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!((decisions.len(), keys.len()), (12, 12), "{keys:?}");
    let read_a = a.metric(
        "fleetgate_processor_records_total",
        &[("input", "rejected")],
    );
    let read_b = b.metric(
        "fleetgate_processor_records_total",
        &[("input", "rejected")],
    );
    assert_eq!(
        read_a + read_b,
        120.0,
        "each record read once: {read_a} + {read_b}"
    );
    assert!(read_a > 0.0 && read_b > 0.0, "{read_a} + {read_b}");
    a.terminate().unwrap();
    b.terminate().unwrap();
}
