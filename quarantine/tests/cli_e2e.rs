//! The `fleetgate-quarantine` binary against a real tansu broker and a real dev CA:
//! signed writes, list/show, release with a reason, refused credentials that write
//! nothing, and expiry.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use fleetgate_pki::{DevCa, OperatorCertSpec};
use fleetgate_proto::{QuarantineDecision, QuarantineState};
use fleetgate_quarantine::{
    client_config, load, sign, Publisher, ReadOptions, RecordValue, Signer, TopicReader,
};
use fleetgate_test_support::{Broker, TestPki, TRUST_DOMAIN};
use serde_json::Value;

const TOPIC: &str = "fleet.quarantine.v1";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Runs the CLI against `broker` with `--ca` from `pki` and the given extra args.
fn cli(broker: &Broker, ca: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetgate-quarantine"))
        .args(["--bootstrap-servers", &broker.bootstrap()])
        .args(["--ca", ca.to_str().expect("utf-8 path")])
        .args(args)
        .env_remove("FLEETGATE_OPERATOR_CERT")
        .env_remove("FLEETGATE_OPERATOR_KEY")
        .output()
        .expect("running fleetgate-quarantine")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Asserts a non-zero exit and returns stderr.
fn refused(out: Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, got success\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).expect("utf-8 stderr")
}

fn json(out: Output) -> Value {
    serde_json::from_str(&ok(out)).expect("CLI printed JSON")
}

/// Every record on the topic, read to its end.
fn records(broker: &Broker) -> Vec<fleetgate_quarantine::TopicRecord> {
    let opts = ReadOptions::default();
    let mut reader = TopicReader::open(
        &client_config(&broker.bootstrap()),
        TOPIC,
        opts.request_timeout,
    )
    .expect("opening the topic");
    let mut out = Vec::new();
    reader
        .catch_up(&opts, |r| out.push(r))
        .expect("reading the topic");
    out
}

struct Credential {
    cert: PathBuf,
    key: PathBuf,
}

impl Credential {
    fn args(&self) -> Vec<&str> {
        vec![
            "--operator-cert",
            self.cert.to_str().expect("utf-8 path"),
            "--operator-key",
            self.key.to_str().expect("utf-8 path"),
        ]
    }
}

fn with<'a>(cred: &'a Credential, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = cred.args();
    v.extend_from_slice(args);
    v
}

#[test]
fn operator_quarantines_lists_shows_and_releases_with_signed_audit_trail() {
    let broker = Broker::start().expect("starting tansu");
    let pki = TestPki::new().expect("making a PKI");
    let ca = pki.dir().join("ca.pem");
    let alice = pki
        .ca
        .issue_operator(&OperatorCertSpec::new(TRUST_DOMAIN, "alice"))
        .expect("issuing an operator certificate");
    let (cert, key) = alice.write(pki.dir(), "alice").expect("writing alice");
    let alice_cred = Credential { cert, key };

    // Quarantine: a signed record by operator:alice.
    let out = ok(cli(
        &broker,
        &ca,
        &with(
            &alice_cred,
            &[
                "quarantine",
                "--fleet",
                "f1",
                "--device",
                "car-7",
                "--reason",
                "spoofed GPS",
            ],
        ),
    ));
    assert!(
        out.contains("quarantined f1/car-7 by operator:alice"),
        "{out}"
    );

    let text = ok(cli(&broker, &ca, &["list"]));
    assert!(
        text.contains("f1/car-7") && text.contains("spoofed GPS"),
        "{text}"
    );
    let list = json(cli(&broker, &ca, &["list", "--json"]));
    let rows = list.as_array().expect("array");
    assert_eq!(rows.len(), 1, "{list}");
    assert_eq!(rows[0]["state"], "quarantined");
    assert_eq!(rows[0]["decided_by"], "operator:alice");
    assert_eq!(rows[0]["signed"], true);
    let other_fleet = json(cli(&broker, &ca, &["list", "--json", "--fleet", "f2"]));
    assert_eq!(other_fleet.as_array().map(Vec::len), Some(0));

    let show = json(cli(
        &broker,
        &ca,
        &["show", "--fleet", "f1", "--device", "car-7", "--json"],
    ));
    assert_eq!(show["quarantined"], true);
    assert_eq!(
        show["history"][0]["signature"]["status"], "verified",
        "{show}"
    );
    assert_eq!(show["history"][0]["signature"]["operator"], "alice");
    assert_eq!(
        show["history"][0]["signature"]["cert_serial"],
        alice.serial_hex.as_str()
    );
    let show_text = ok(cli(
        &broker,
        &ca,
        &["show", "--fleet", "f1", "--device", "car-7"],
    ));
    assert!(
        show_text.contains("verified, signed by spiffe://fleetgate.test/operator/alice"),
        "{show_text}"
    );

    // Release needs a reason: missing or blank is refused and writes nothing.
    let err = refused(cli(
        &broker,
        &ca,
        &with(
            &alice_cred,
            &["release", "--fleet", "f1", "--device", "car-7"],
        ),
    ));
    assert!(err.contains("--reason"), "{err}");
    let err = refused(cli(
        &broker,
        &ca,
        &with(
            &alice_cred,
            &[
                "release", "--fleet", "f1", "--device", "car-7", "--reason", "  ",
            ],
        ),
    ));
    assert!(err.contains("--reason must not be empty"), "{err}");
    assert_eq!(records(&broker).len(), 1);

    ok(cli(
        &broker,
        &ca,
        &with(
            &alice_cred,
            &[
                "release",
                "--fleet",
                "f1",
                "--device",
                "car-7",
                "--reason",
                "GPS fixed by OTA 4.2",
            ],
        ),
    ));
    assert_eq!(
        json(cli(&broker, &ca, &["list", "--json"])),
        Value::Array(vec![])
    );
    assert!(ok(cli(&broker, &ca, &["list"])).contains("no devices quarantined"));
    let all = json(cli(&broker, &ca, &["list", "--all", "--json"]));
    assert_eq!(all[0]["state"], "released", "{all}");
    assert_eq!(all[0]["reason"], "GPS fixed by OTA 4.2");
    let show = json(cli(
        &broker,
        &ca,
        &["show", "--fleet", "f1", "--device", "car-7", "--json"],
    ));
    assert_eq!(show["quarantined"], false);
    let history = show["history"].as_array().expect("history");
    let states: Vec<&str> = history
        .iter()
        .map(|h| h["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["quarantined", "released"]);
    assert!(history
        .iter()
        .all(|h| h["signature"]["status"] == "verified"));

    // A time-limited quarantine carries its expiry.
    let before = now_ms();
    ok(cli(
        &broker,
        &ca,
        &with(
            &alice_cred,
            &[
                "quarantine",
                "--fleet",
                "f1",
                "--device",
                "car-8",
                "--reason",
                "investigating",
                "--expires-in",
                "1h",
            ],
        ),
    ));
    let list = json(cli(&broker, &ca, &["list", "--json"]));
    assert_eq!(list[0]["device_id"], "car-8", "{list}");
    let expires = list[0]["expires_at_ms"].as_i64().expect("expiry");
    assert!(
        (before + 3_600_000..=now_ms() + 3_600_000).contains(&expires),
        "{list}"
    );

    // The registry ingest loads agrees.
    let registry = load(&broker.bootstrap(), TOPIC).expect("loading the registry");
    assert!(registry.state("f1", "car-7", now_ms()).is_none());
    assert_eq!(
        registry.latest("f1", "car-7").map(|d| d.state),
        Some(QuarantineState::Released as i32)
    );
}

#[test]
fn refused_credentials_write_nothing() {
    let broker = Broker::start().expect("starting tansu");
    let pki = TestPki::new().expect("making a PKI");
    let ca = pki.dir().join("ca.pem");
    let write = [
        "quarantine",
        "--fleet",
        "f1",
        "--device",
        "car-9",
        "--reason",
        "x",
    ];

    // No credential at all.
    let err = refused(cli(&broker, &ca, &write));
    assert!(err.contains("operator credential"), "{err}");

    // A device certificate is not an operator credential.
    let device = pki.device("x", "y");
    let (cert, key) = device.write(pki.dir(), "device-y").expect("writing device");
    let err = refused(cli(&broker, &ca, &with(&Credential { cert, key }, &write)));
    assert!(
        err.contains("not an operator") && err.contains("spiffe://fleetgate.test/fleet/x/device/y"),
        "{err}"
    );

    // An operator certificate from another CA does not verify against --ca.
    let rogue = DevCa::generate("rogue CA").expect("rogue CA");
    let mallory = rogue
        .issue_operator(&OperatorCertSpec::new(TRUST_DOMAIN, "mallory"))
        .expect("rogue operator");
    let (cert, key) = mallory
        .write(pki.dir(), "mallory")
        .expect("writing mallory");
    let err = refused(cli(&broker, &ca, &with(&Credential { cert, key }, &write)));
    assert!(err.contains("not trusted"), "{err}");

    // An expired operator certificate from the right CA.
    let old = pki
        .ca
        .issue_operator(&OperatorCertSpec::new(TRUST_DOMAIN, "old").expired())
        .expect("expired operator");
    let (cert, key) = old.write(pki.dir(), "old").expect("writing old");
    let err = refused(cli(&broker, &ca, &with(&Credential { cert, key }, &write)));
    assert!(err.contains("not trusted"), "{err}");

    assert!(
        records(&broker).is_empty(),
        "a refused write reached the topic"
    );
}

#[test]
fn expired_decisions_are_not_active_and_tampered_records_do_not_verify() {
    let broker = Broker::start().expect("starting tansu");
    let pki = TestPki::new().expect("making a PKI");
    let ca = pki.dir().join("ca.pem");
    let bob = pki
        .ca
        .issue_operator(&OperatorCertSpec::new(TRUST_DOMAIN, "bob"))
        .expect("issuing bob");
    let signer = Signer::from_pem(&bob.cert_pem, &bob.key_pem).expect("bob signs");
    let now = now_ms();
    let decision = |device: &str, expires_at_ms: i64| QuarantineDecision {
        fleet_id: "f1".into(),
        device_id: device.into(),
        state: QuarantineState::Quarantined as i32,
        reason: "temporary hold".into(),
        decided_by: "operator:bob".into(),
        decided_at_ms: now - 60_000,
        expires_at_ms,
        decision_id: format!("{device}-1"),
        ..Default::default()
    };
    let expired = sign(decision("old-hold", now - 1_000), &signer).expect("signing");
    let current = sign(decision("new-hold", now + 3_600_000), &signer).expect("signing");
    let mut tampered = sign(decision("tampered", 0), &signer).expect("signing");
    tampered.reason = "something bob never said".into();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let publisher = Publisher::new(&client_config(&broker.bootstrap()), TOPIC).expect("producer");
    for d in [&expired, &current, &tampered] {
        runtime.block_on(publisher.publish(d)).expect("publishing");
    }

    let active = json(cli(&broker, &ca, &["list", "--json"]));
    let devices: Vec<&str> = active
        .as_array()
        .expect("array")
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(devices, ["new-hold", "tampered"], "{active}");
    let all = json(cli(
        &broker,
        &ca,
        &["list", "--all", "--json", "--reason", "HOLD"],
    ));
    let old = all
        .as_array()
        .expect("array")
        .iter()
        .find(|d| d["device_id"] == "old-hold")
        .expect("expired decision listed with --all");
    assert_eq!(old["state"], "expired");
    assert_eq!(old["active"], false);

    let registry = load(&broker.bootstrap(), TOPIC).expect("loading");
    assert!(registry.state("f1", "old-hold", now_ms()).is_none());
    assert!(registry.state("f1", "new-hold", now_ms()).is_some());

    // The topic trusts its producers (ACLs); the audit trail still exposes the edit.
    let show = json(cli(
        &broker,
        &ca,
        &["show", "--fleet", "f1", "--device", "tampered", "--json"],
    ));
    assert_eq!(
        show["history"][0]["signature"]["status"], "invalid",
        "{show}"
    );
    let show = ok(cli(
        &broker,
        &ca,
        &["show", "--fleet", "f1", "--device", "tampered"],
    ));
    assert!(show.contains("INVALID: signature does not match"), "{show}");
}

#[test]
fn reader_follows_decisions_published_after_catching_up() {
    let broker = Broker::start().expect("starting tansu");
    let config = client_config(&broker.bootstrap());
    let opts = ReadOptions::default();
    let mut reader = TopicReader::open(&config, TOPIC, opts.request_timeout).expect("open");
    let mut registry = fleetgate_quarantine::Registry::new();
    assert_eq!(
        reader
            .catch_up(&opts, |r| r.apply_to(&mut registry).expect("valid"))
            .expect("catch up"),
        0
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let publisher = Publisher::new(&config, TOPIC).expect("producer");
    let d = QuarantineDecision {
        fleet_id: "f9".into(),
        device_id: "d1".into(),
        state: QuarantineState::Quarantined as i32,
        reason: "impossible_travel score 1.4".into(),
        decided_by: "processor:p-1".into(),
        decided_at_ms: now_ms(),
        decision_id: "p-1-0001".into(),
        ..Default::default()
    };
    let at = runtime.block_on(publisher.publish(&d)).expect("publishing");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let record = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "decision never arrived"
        );
        if let Some(r) = reader
            .poll(std::time::Duration::from_millis(200))
            .expect("poll")
        {
            break r;
        }
    };
    assert_eq!(record.position, at);
    assert_eq!(record.key.as_deref(), Some("f9/d1"));
    assert_eq!(record.value, RecordValue::Decision(d));
    record.apply_to(&mut registry).expect("valid");
    assert!(registry.state("f9", "d1", now_ms()).is_some());

    // Invalid decisions are refused before they reach the topic.
    let err = runtime
        .block_on(publisher.publish(&QuarantineDecision::default()))
        .unwrap_err();
    assert!(err.to_string().contains("refusing to publish"), "{err}");
}
