//! Ingest enforces `fleet.quarantine.v1`: a quarantined device's events are acked but
//! diverted to `telemetry.quarantined.v1`; a release restores normal flow; other
//! devices are unaffected. Decisions already on the topic at start-up apply at once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fleetgate_proto::{QuarantineDecision, QuarantineState, TelemetryEnvelope, Verdict};
use fleetgate_test_support::{decode, header, read_topic_until, Broker};
use prost::Message as _;

fn publish(broker: &Broker, device: &str, state: QuarantineState, id: &str) {
    let decision = QuarantineDecision {
        fleet_id: "fleet-a".into(),
        device_id: device.into(),
        state: state as i32,
        reason: "test decision".into(),
        decided_by: "operator:it".into(),
        decided_at_ms: now_ms(),
        decision_id: id.into(),
        ..Default::default()
    };
    let key = format!("fleet-a/{device}");
    broker
        .produce("fleet.quarantine.v1", &key, &decision.encode_to_vec())
        .unwrap();
}

fn reasons(ack: &fleetgate_proto::BatchAck) -> Vec<(Verdict, String)> {
    verdicts(ack)
}

/// Sends single-event batches until one is acked with `reason` (or 10 s pass); returns
/// the seqs sent and how long it took.
async fn send_until(dev: &mut AnyDevice, next_seq: &mut u64, reason: &str) -> (Vec<u64>, Duration) {
    let started = Instant::now();
    let mut sent = Vec::new();
    while started.elapsed() < Duration::from_secs(10) {
        let seq = *next_seq;
        *next_seq += 1;
        let ack = dev.send(&batch(seq, vec![event(seq, 5.0)])).await.unwrap();
        sent.push(seq);
        let r = reasons(&ack);
        assert_eq!(r[0].0, Verdict::Accepted, "{r:?}");
        if r[0].1 == reason {
            return (sent, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no ack with reason {reason:?} within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_diverts_and_release_restores() {
    let broker = Broker::start().unwrap();
    // A decision that exists before ingest starts applies from the first batch.
    publish(&broker, "car-pre", QuarantineState::Quarantined, "d-pre");
    let stack = Stack::start_on(broker, "");
    let mut pre = stack.device_on(Wire::Grpc, "fleet-a", "car-pre").await;
    let ack = pre.send(&batch(1, vec![event(1, 1.0)])).await.unwrap();
    assert_eq!(
        reasons(&ack),
        vec![(Verdict::Accepted, "quarantined".into())]
    );

    let mut bad = stack.device_on(Wire::Quic, "fleet-a", "car-bad").await;
    let mut honest = stack.device_on(Wire::Grpc, "fleet-a", "car-ok").await;
    let mut seq = 1u64;
    let (normal, _) = send_until(&mut bad, &mut seq, "").await;
    assert_eq!(normal, vec![1]);

    publish(
        &stack.broker,
        "car-bad",
        QuarantineState::Quarantined,
        "d-1",
    );
    let (before_divert, took) = send_until(&mut bad, &mut seq, "quarantined").await;
    eprintln!("quarantine decision to enforcement: {took:?}");
    let diverted_first = *before_divert.last().unwrap();
    for i in 0..3 {
        let s = seq + i;
        let ack = bad.send(&batch(s, vec![event(s, 5.0)])).await.unwrap();
        assert_eq!(
            reasons(&ack),
            vec![(Verdict::Accepted, "quarantined".into())]
        );
    }
    seq += 3;
    assert!(all_accepted(
        &honest.send(&batch(1, vec![event(1, 1.0)])).await.unwrap()
    ));
    assert_eq!(
        reasons(&honest.send(&batch(2, vec![event(2, 1.0)])).await.unwrap()),
        vec![(Verdict::Accepted, String::new())],
        "honest fleet-mates are not diverted"
    );

    publish(&stack.broker, "car-bad", QuarantineState::Released, "d-2");
    let (after, _) = send_until(&mut bad, &mut seq, "").await;
    let released_at = *after.last().unwrap();

    // The main topic has car-bad's seqs before the quarantine and after the release,
    // never one in between; the quarantine topic has exactly the diverted ones.
    let events = read_topic_until(
        &stack.broker.bootstrap(),
        "telemetry.events.v1",
        Duration::from_secs(15),
        |m| {
            m.iter().any(|r| {
                decode::<TelemetryEnvelope>(r)
                    .map(|e| {
                        let p = e.provenance.unwrap();
                        p.device_id == "car-bad" && p.seq == released_at
                    })
                    .unwrap_or(false)
            })
        },
    )
    .unwrap();
    let main_bad: Vec<u64> = events
        .iter()
        .filter_map(|r| decode::<TelemetryEnvelope>(r).ok())
        .filter_map(|e| e.provenance)
        .filter(|p| p.device_id == "car-bad")
        .map(|p| p.seq)
        .collect();
    assert!(
        main_bad
            .iter()
            .all(|s| *s < diverted_first || *s >= released_at),
        "{main_bad:?}"
    );
    assert!(main_bad.contains(&released_at));
    assert!(!events
        .iter()
        .any(|r| header(r, "fleetgate.device_id").as_deref() == Some("car-pre")));

    let quarantined = read_topic_until(
        &stack.broker.bootstrap(),
        "telemetry.quarantined.v1",
        Duration::from_secs(15),
        // Everything car-bad sent from the first diverted seq until the release took
        // effect, plus car-pre's one event.
        |m| m.len() as u64 > released_at - diverted_first,
    )
    .unwrap();
    let mut q: Vec<(String, u64, String)> = quarantined
        .iter()
        .map(|r| {
            let e = decode::<TelemetryEnvelope>(r).unwrap();
            let p = e.provenance.unwrap();
            (
                p.device_id,
                p.seq,
                header(r, "fleetgate.quarantine_decision").unwrap_or_default(),
            )
        })
        .collect();
    q.sort();
    let bad_q: Vec<u64> = q.iter().filter(|x| x.0 == "car-bad").map(|x| x.1).collect();
    assert_eq!(bad_q, (diverted_first..released_at).collect::<Vec<_>>());
    assert!(q.iter().filter(|x| x.0 == "car-bad").all(|x| x.2 == "d-1"));
    assert!(q.iter().any(|x| x.0 == "car-pre" && x.2 == "d-pre"));

    assert_eq!(
        stack
            .ingest
            .metric("fleetgate_quarantined_devices", &[])
            .unwrap(),
        1.0
    );
    assert!(
        stack
            .ingest
            .metric(
                "fleetgate_quarantine_enforcement_latency_seconds_count",
                &[]
            )
            .unwrap()
            >= 1.0
    );
    bad.close().await;
}
