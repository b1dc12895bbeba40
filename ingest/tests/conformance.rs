//! Transport conformance suite: every test here is written once, as
//! `async fn name(wire: Wire)`, and runs against both device-facing transports (gRPC
//! and QUIC) on the real stack: a real tansu broker, real TLS 1.3 with real
//! certificates, the real `fleetgate-ingest` binary over loopback. Both transports
//! must behave the same for devices; metrics are always read for the transport
//! under test. Transport-specific behaviour lives in `quic_e2e.rs`.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use fleetgate_pki::DeviceCertSpec;
use fleetgate_proto::{signal::Value, RejectRecord, TelemetryEnvelope, Verdict};
use fleetgate_test_support::{decode, header, read_topic, Broker, TRUST_DOMAIN};
use prost::Message;
use rdkafka::Message as _;

const EVENTS: &str = "telemetry.events.v1";
const REJECTED: &str = "telemetry.rejected.v1";

/// `conformance!(name, ...)` turns each `async fn name(wire: Wire)` into
/// `name::grpc` and `name::quic` tests.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn grpc() {
                super::$name(super::Wire::Grpc).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn quic() {
                super::$name(super::Wire::Quic).await
            }
        }
    )*};
}

conformance!(
    valid_flow_reaches_kafka_in_order_with_provenance,
    bad_certificates_are_refused_at_the_handshake,
    each_bad_frame_gets_its_reason_an_audit_record_and_a_metric,
    broker_outage_means_no_ack_and_retries_lose_nothing,
    a_replayed_batch_is_acked_but_never_published_twice,
    skewed_device_clocks_get_stale_and_from_future,
    honest_devices_sending_concurrently_lose_nothing,
    sigterm_drains_and_exits_cleanly,
);

async fn valid_flow_reaches_kafka_in_order_with_provenance(wire: Wire) {
    let stack = Stack::start("");
    let mut a = stack.device_on(wire, "fleet-a", "car-1").await;
    let mut b = stack.device_on(wire, "fleet-b", "van-9").await;

    let mut seq_a = 0;
    let mut seq_b = 0;
    for batch_no in 1..=5u64 {
        let events_a: Vec<_> = (0..4)
            .map(|i| {
                seq_a += 1;
                event(seq_a, 10.0 + i as f64)
            })
            .collect();
        let ack = a.send(&batch(batch_no, events_a)).await.unwrap();
        assert!(all_accepted(&ack), "{ack:?}");
        assert_eq!(ack.batch_id, batch_no);
        assert_eq!(ack.events.len(), 4);
        let events_b: Vec<_> = (0..3)
            .map(|_| {
                seq_b += 1;
                event(seq_b, 99.0)
            })
            .collect();
        let ack = b.send(&batch(100 + batch_no, events_b)).await.unwrap();
        assert!(all_accepted(&ack), "{ack:?}");
        assert_eq!(ack.batch_id, 100 + batch_no);
    }

    let records = read_topic(
        &stack.broker.bootstrap(),
        EVENTS,
        35,
        Duration::from_secs(20),
    )
    .unwrap();
    assert_eq!(
        records.len(),
        35,
        "exactly the accepted events, no more, no fewer"
    );
    let mut per_device: HashMap<String, Vec<(i32, i64, u64)>> = HashMap::new();
    let mut connections: HashMap<String, HashSet<String>> = HashMap::new();
    for r in &records {
        let env: TelemetryEnvelope = decode(r).unwrap();
        let p = env.provenance.clone().expect("provenance");
        let e = env.event.clone().expect("event");
        assert_eq!(
            std::str::from_utf8(r.key().unwrap()).unwrap(),
            p.device_id,
            "key = device id"
        );
        assert!(p.device_id == "car-1" || p.device_id == "van-9");
        assert_eq!(
            p.fleet_id,
            if p.device_id == "car-1" {
                "fleet-a"
            } else {
                "fleet-b"
            }
        );
        assert_eq!(p.cert_sha256.len(), 64);
        assert!(!p.cert_serial.is_empty());
        assert_eq!(p.transport, wire.label());
        assert_eq!(p.ingest_node, "it-node");
        assert!(
            p.connection_id
                .starts_with(&format!("it-node-{}-", wire.label())),
            "{}",
            p.connection_id
        );
        assert!(p.received_at_ms >= p.captured_at_ms && p.received_at_ms > 0);
        assert_eq!(p.seq, e.seq);
        assert_eq!(p.software_version, "fw-2.1.0");
        assert_eq!(p.vehicle_config_id, "cfg-eu-7");
        assert_eq!(p.schema_version, 1);
        assert!(!p.ingest_version.is_empty());
        // The same provenance is on the headers, for routing without decoding.
        assert_eq!(header(r, "fleetgate.device_id").unwrap(), p.device_id);
        assert_eq!(header(r, "fleetgate.cert_sha256").unwrap(), p.cert_sha256);
        assert_eq!(header(r, "fleetgate.seq").unwrap(), p.seq.to_string());
        assert_eq!(header(r, "fleetgate.transport").unwrap(), wire.label());
        connections
            .entry(p.device_id.clone())
            .or_default()
            .insert(p.connection_id.clone());
        per_device
            .entry(p.device_id)
            .or_default()
            .push((r.partition(), r.offset(), e.seq));
    }
    for (device, mut seen) in per_device {
        let partitions: HashSet<_> = seen.iter().map(|s| s.0).collect();
        assert_eq!(partitions.len(), 1, "{device}: one partition per device");
        seen.sort_by_key(|s| s.1);
        let seqs: Vec<u64> = seen.iter().map(|s| s.2).collect();
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, want, "{device}: Kafka order = send order");
        assert_eq!(connections[&device].len(), 1, "{device}: one connection");
    }
    assert_ne!(
        connections["car-1"], connections["van-9"],
        "each device has its own connection id"
    );
    assert_eq!(
        stack.metric_on(wire, "fleetgate_events_accepted_total", &[]),
        35.0
    );
    if wire == Wire::Quic {
        assert_eq!(
            stack
                .ingest
                .metric("fleetgate_quic_streams_acked_total", &[])
                .unwrap(),
            10.0,
            "one stream per batch"
        );
    }
    a.close().await;
    b.close().await;
}

async fn bad_certificates_are_refused_at_the_handshake(wire: Wire) {
    let stack = Stack::start("");
    let other_ca = fleetgate_pki::DevCa::generate("someone else's CA").unwrap();
    let foreign = other_ca
        .issue_device(&DeviceCertSpec::new(TRUST_DOMAIN, "fleet-a", "car-1"))
        .unwrap();
    let expired = stack
        .pki
        .issue(&DeviceCertSpec::new(TRUST_DOMAIN, "fleet-a", "car-2").expired());
    let wrong_domain = stack
        .pki
        .issue(&DeviceCertSpec::new("evil.example", "fleet-a", "car-3"));
    let mut no_san_spec = DeviceCertSpec::new(TRUST_DOMAIN, "fleet-a", "car-4");
    no_san_spec.spiffe_san = false;
    let no_san = stack.pki.issue(&no_san_spec);

    let cases: Vec<(&str, Option<&fleetgate_pki::Issued>)> = vec![
        ("no_client_cert", None),
        ("cert_unknown_issuer", Some(&foreign)),
        ("cert_expired", Some(&expired)),
        ("spiffe_trust_domain", Some(&wrong_domain)),
        ("spiffe_id_missing", Some(&no_san)),
    ];
    for (label, cert) in cases {
        let refusals_before = stack.handshake_refusals(wire);
        // TLS 1.3 clients finish before the server verifies them, so the refusal shows
        // as a failed connect or a failed first send; either way nothing is accepted.
        let outcome = match stack.connect_on(wire, cert).await {
            Err(e) => Err(e.to_string()),
            Ok(mut dev) => dev
                .send(&batch(1, vec![event(1, 5.0)]))
                .await
                .map_err(|e| e.to_string()),
        };
        assert!(
            outcome.is_err(),
            "{label}: must be refused, got {outcome:?}"
        );
        match wire {
            // gRPC sees the rustls error itself: the exact reason is the label. The
            // client library may retry a refused connection, so count >= 1.
            Wire::Grpc => {
                let refused = eventually_at_least(1.0, || {
                    stack.metric_on(wire, "fleetgate_handshakes_total", &[("outcome", label)])
                })
                .await;
                assert!(
                    refused >= 1.0,
                    "{label}: handshake refusal counted\n{}",
                    stack.ingest.scrape().unwrap()
                );
            }
            // quinn only exposes the TLS alert, which cannot tell every reason apart
            // (several map to certificate_unknown): any non-ok outcome counts.
            Wire::Quic => {
                let after =
                    eventually_at_least(refusals_before + 1.0, || stack.handshake_refusals(wire))
                        .await;
                assert!(
                    after > refusals_before,
                    "{label}: handshake refusal counted\n{}",
                    stack.ingest.scrape().unwrap()
                );
            }
        }
    }
    assert_eq!(
        stack.metric_on(wire, "fleetgate_handshakes_total", &[("outcome", "ok")]),
        0.0,
        "no refused device got an ok handshake"
    );
    // A valid device on the same node works, and only its event reached Kafka.
    let mut ok = stack.device_on(wire, "fleet-a", "car-5").await;
    assert!(all_accepted(
        &ok.send(&batch(1, vec![event(1, 5.0)])).await.unwrap()
    ));
    let records = read_topic(&stack.broker.bootstrap(), EVENTS, 2, Duration::from_secs(5)).unwrap();
    assert_eq!(records.len(), 1, "nothing from a refused device");
    let env: TelemetryEnvelope = decode(&records[0]).unwrap();
    assert_eq!(env.provenance.unwrap().device_id, "car-5");
    ok.close().await;
}

async fn each_bad_frame_gets_its_reason_an_audit_record_and_a_metric(wire: Wire) {
    let stack = Stack::start("[limits]\nmax_frame_bytes = 4096\n");
    let mut dev = stack.device_on(wire, "fleet-a", "car-1").await;
    let rejected = |reason: &str| {
        stack.metric_on(
            wire,
            "fleetgate_batches_rejected_total",
            &[("reason", reason)],
        ) + stack.metric_on(
            wire,
            "fleetgate_events_rejected_total",
            &[("reason", reason)],
        )
    };

    // Over the size limit (but under gRPC's hard transport cap): batch-level reject.
    let big = batch(1, (1..=100).map(|s| event(s, 1.0)).collect());
    assert!(big.encoded_len() > 4096 && big.encoded_len() < 4 * 4096);
    let ack = dev.send(&big).await.unwrap();
    assert_eq!(
        (ack.batch_verdict(), ack.batch_reason.as_str()),
        (Verdict::Rejected, "frame_too_large")
    );
    assert!(ack.events.is_empty());

    let ack = dev
        .send_raw(Bytes::from_static(&[0xff, 0xff, 0xff, 0x0f]))
        .await
        .unwrap();
    assert_eq!(
        (ack.batch_verdict(), ack.batch_reason.as_str()),
        (Verdict::Rejected, "decode_error")
    );

    let mut unknown_schema = batch(3, vec![event(1, 1.0)]);
    unknown_schema.schema_version = 42;
    let ack = dev.send(&unknown_schema).await.unwrap();
    assert_eq!(
        (ack.batch_id, ack.batch_verdict(), ack.batch_reason.as_str()),
        (3, Verdict::Rejected, "schema_unknown")
    );

    let mut impostor = batch(4, vec![event(1, 1.0)]);
    impostor.device_id = "car-2".into();
    let ack = dev.send(&impostor).await.unwrap();
    assert_eq!(
        (ack.batch_verdict(), ack.batch_reason.as_str()),
        (Verdict::Rejected, "identity_mismatch")
    );

    // One bad event among good ones: only it is rejected.
    let mut bad = event(2, 1.0);
    bad.signals[0].value = Some(Value::F64(1234.0));
    let ack = dev
        .send(&batch(5, vec![event(1, 1.0), bad, event(3, 1.0)]))
        .await
        .unwrap();
    assert_eq!(
        verdicts(&ack),
        vec![
            (Verdict::Accepted, String::new()),
            (Verdict::Rejected, "field_out_of_range".into()),
            (Verdict::Accepted, String::new()),
        ]
    );

    // The stream (gRPC) / connection (QUIC) still works after all of that.
    let ack = dev.send(&batch(6, vec![event(4, 1.0)])).await.unwrap();
    assert!(all_accepted(&ack), "{ack:?}");

    for reason in [
        "frame_too_large",
        "decode_error",
        "schema_unknown",
        "identity_mismatch",
        "field_out_of_range",
    ] {
        assert_eq!(rejected(reason), 1.0, "{reason} counted once");
    }
    let audit = read_topic(
        &stack.broker.bootstrap(),
        REJECTED,
        5,
        Duration::from_secs(20),
    )
    .unwrap();
    let mut reasons: Vec<String> = audit
        .iter()
        .map(|r| {
            let rec: RejectRecord = decode(r).unwrap();
            let p = rec.provenance.as_ref().unwrap();
            assert_eq!(p.device_id, "car-1", "audit names the authenticated device");
            assert_eq!(p.transport, wire.label());
            assert_eq!(header(r, "fleetgate.reject_reason").unwrap(), rec.reason);
            if rec.reason == "field_out_of_range" {
                assert_eq!(rec.seq, Some(2));
                assert!(rec.detail.contains("speed_kph"), "{}", rec.detail);
            }
            rec.reason
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            "decode_error",
            "field_out_of_range",
            "frame_too_large",
            "identity_mismatch",
            "schema_unknown"
        ]
    );
    let events = read_topic(
        &stack.broker.bootstrap(),
        EVENTS,
        4,
        Duration::from_secs(10),
    )
    .unwrap();
    let seqs = sorted_seqs(&events);
    assert_eq!(seqs, vec![1, 3, 4], "events 1, 3 and 4 only");
    dev.close().await;
}

async fn broker_outage_means_no_ack_and_retries_lose_nothing(wire: Wire) {
    let broker = Broker::start().unwrap();
    let stack = Stack::start_with_env(
        broker,
        "retry_after = \"200ms\"\n",
        &[("FLEETGATE_KAFKA__DELIVERY_TIMEOUT", "2s")],
    );
    let mut dev = stack.device_on(wire, "fleet-a", "car-1").await;
    assert!(all_accepted(
        &dev.send(&batch(1, vec![event(1, 1.0), event(2, 1.0)]))
            .await
            .unwrap()
    ));

    stack.broker.freeze();
    let during = batch(2, vec![event(3, 1.0), event(4, 1.0)]);
    let ack = dev.send(&during).await.unwrap();
    assert_eq!(ack.events.len(), 2, "{ack:?}");
    assert!(
        ack.events
            .iter()
            .all(|e| e.verdict() == Verdict::Retry && e.reason == "delivery_failed"),
        "nothing is acked as accepted while Kafka is down: {ack:?}"
    );
    assert!(ack.retry_after_ms > 0);

    stack.broker.thaw();
    // The device retries the same events until they are accepted.
    let mut accepted = false;
    for attempt in 0..40 {
        let ack = dev
            .send(&batch(3 + attempt, during.events.clone()))
            .await
            .unwrap();
        if all_accepted(&ack) {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        accepted,
        "retried events accepted once the broker is back\n--- ingest\n{}\n--- broker\n{}",
        stack.ingest.logs(),
        stack.broker.logs()
    );
    let records = read_topic(
        &stack.broker.bootstrap(),
        EVENTS,
        4,
        Duration::from_secs(20),
    )
    .unwrap();
    let mut seqs: Vec<u64> = records
        .iter()
        .map(|r| {
            TelemetryEnvelope::decode(r.payload().unwrap())
                .unwrap()
                .event
                .unwrap()
                .seq
        })
        .collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(
        seqs,
        vec![1, 2, 3, 4],
        "every event the device was told is accepted is in Kafka"
    );
    dev.close().await;
}

async fn a_replayed_batch_is_acked_but_never_published_twice(wire: Wire) {
    let stack = Stack::start("[sequence]\nwindow = 64\n");
    let mut dev = stack.device_on(wire, "fleet-a", "car-1").await;
    let original = batch(1, (1..=5).map(|s| event(s, 20.0)).collect());
    assert!(all_accepted(&dev.send(&original).await.unwrap()));

    // An attacker (or a retrying device) sends the very same bytes again.
    let ack = dev.send(&original).await.unwrap();
    assert_eq!(ack.events.len(), 5, "{ack:?}");
    assert!(
        all_duplicates(&ack),
        "duplicates are acknowledged (idempotent retry): {ack:?}"
    );

    // Move the window far ahead, then replay an event below its low edge.
    assert!(all_accepted(
        &dev.send(&batch(2, vec![event(100, 1.0)])).await.unwrap()
    ));
    let ack = dev
        .send(&batch(3, vec![event(6, 1.0), event(99, 1.0)]))
        .await
        .unwrap();
    assert_eq!(
        verdicts(&ack),
        vec![
            (Verdict::Rejected, "replay_outside_window".into()),
            (Verdict::Accepted, String::new()),
        ],
        "100 - 64 = 36 is the low edge: 6 is refused, 99 (unseen, in window) accepted"
    );

    let events = read_topic(
        &stack.broker.bootstrap(),
        EVENTS,
        20,
        Duration::from_secs(10),
    )
    .unwrap();
    let seqs = sorted_seqs(&events);
    assert_eq!(
        seqs,
        vec![1, 2, 3, 4, 5, 99, 100],
        "each accepted seq exactly once"
    );
    let m = |reason| {
        stack.metric_on(
            wire,
            "fleetgate_events_rejected_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(m("duplicate"), 5.0);
    assert_eq!(m("replay_outside_window"), 1.0);
    let audit = read_topic(
        &stack.broker.bootstrap(),
        REJECTED,
        2,
        Duration::from_secs(10),
    )
    .unwrap();
    let reasons: Vec<String> = audit
        .iter()
        .map(|r| decode::<RejectRecord>(r).unwrap().reason)
        .collect();
    assert_eq!(
        reasons,
        vec!["replay_outside_window"],
        "duplicates are not audited as attacks; replays are"
    );
    dev.close().await;
}

async fn skewed_device_clocks_get_stale_and_from_future(wire: Wire) {
    let stack = Stack::start("[freshness]\nmax_past = \"60s\"\nmax_future = \"5s\"\n");
    let mut dev = stack.device_on(wire, "fleet-a", "car-1").await;

    let mut old = event(1, 1.0);
    old.captured_at_ms = now_ms() - 120_000;
    let mut ahead = event(2, 1.0);
    ahead.captured_at_ms = now_ms() + 60_000;
    let ack = dev
        .send(&batch(1, vec![old, ahead, event(3, 1.0)]))
        .await
        .unwrap();
    assert_eq!(
        verdicts(&ack),
        vec![
            (Verdict::Rejected, "stale".into()),
            (Verdict::Rejected, "from_future".into()),
            (Verdict::Accepted, String::new()),
        ]
    );

    // A whole batch from a device whose clock runs an hour fast.
    let mut skewed = batch(2, vec![event(4, 1.0)]);
    skewed.sent_at_ms = now_ms() + 3_600_000;
    let ack = dev.send(&skewed).await.unwrap();
    assert_eq!(
        (ack.batch_verdict(), ack.batch_reason.as_str()),
        (Verdict::Rejected, "from_future")
    );

    // The refused seqs were never reserved: once the clock is fixed, they are accepted.
    let ack = dev
        .send(&batch(3, vec![event(1, 1.0), event(2, 1.0), event(4, 1.0)]))
        .await
        .unwrap();
    assert!(all_accepted(&ack), "{ack:?}");

    let m = |reason| {
        stack.metric_on(
            wire,
            "fleetgate_events_rejected_total",
            &[("reason", reason)],
        ) + stack.metric_on(
            wire,
            "fleetgate_batches_rejected_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(m("stale"), 1.0);
    assert_eq!(m("from_future"), 2.0);
    let audit = read_topic(
        &stack.broker.bootstrap(),
        REJECTED,
        3,
        Duration::from_secs(10),
    )
    .unwrap();
    let mut reasons: Vec<String> = audit
        .iter()
        .map(|r| decode::<RejectRecord>(r).unwrap().reason)
        .collect();
    reasons.sort();
    assert_eq!(reasons, vec!["from_future", "from_future", "stale"]);
    let events = read_topic(
        &stack.broker.bootstrap(),
        EVENTS,
        5,
        Duration::from_secs(10),
    )
    .unwrap();
    let seqs = sorted_seqs(&events);
    assert_eq!(seqs, vec![1, 2, 3, 4], "each accepted seq exactly once");
    dev.close().await;
}

async fn honest_devices_sending_concurrently_lose_nothing(wire: Wire) {
    let stack = Stack::start("");
    let mut tasks = Vec::new();
    for d in 0..6 {
        let mut dev = stack.device_on(wire, "fleet-a", &format!("car-{d}")).await;
        tasks.push(tokio::spawn(async move {
            for b in 0..10u64 {
                let events = (1..=10).map(|i| event(b * 10 + i, 30.0)).collect();
                let ack = dev.send(&batch(b, events)).await.unwrap();
                assert!(all_accepted(&ack), "{ack:?}");
            }
            dev.close().await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let events = read_topic(
        &stack.broker.bootstrap(),
        EVENTS,
        600,
        Duration::from_secs(20),
    )
    .unwrap();
    assert_eq!(events.len(), 600, "every event");
    let distinct: HashSet<(String, u64)> = events
        .iter()
        .map(|r| {
            let env: TelemetryEnvelope = decode(r).unwrap();
            (env.provenance.unwrap().device_id, env.event.unwrap().seq)
        })
        .collect();
    assert_eq!(distinct.len(), 600, "no duplicates");
    assert_eq!(
        stack.metric_on(wire, "fleetgate_events_accepted_total", &[]),
        600.0
    );
}

async fn sigterm_drains_and_exits_cleanly(wire: Wire) {
    let stack = Stack::start("");
    let mut dev = stack.device_on(wire, "fleet-a", "car-1").await;
    assert!(all_accepted(
        &dev.send(&batch(1, vec![event(1, 1.0)])).await.unwrap()
    ));
    let Stack { ingest, broker, .. } = stack;
    let status = tokio::task::spawn_blocking(move || ingest.terminate())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        dev.send(&batch(2, vec![event(2, 1.0)])).await.is_err(),
        "no batch accepted after shutdown"
    );
    let records = read_topic(&broker.bootstrap(), EVENTS, 2, Duration::from_secs(5)).unwrap();
    assert_eq!(
        records.len(),
        1,
        "the acked event was delivered before exit"
    );
    drop(broker);
}
