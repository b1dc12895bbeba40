//! Device-trust acceptance tests over gRPC on the real stack: replayed batches,
//! replays below the window, and skewed device clocks. Each yields its reason code,
//! its metric and (for rejects) its audit record; nothing is published twice.

mod common;

use std::time::Duration;

use common::*;
use fleetgate_proto::{RejectRecord, TelemetryEnvelope, Verdict};
use fleetgate_test_support::{decode, read_topic};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_batch_is_acked_but_never_published_twice() {
    let stack = Stack::start("[sequence]\nwindow = 64\n");
    let mut dev = stack.device("fleet-a", "car-1").await;
    let original = batch(1, (1..=5).map(|s| event(s, 20.0)).collect());
    assert!(all_accepted(&dev.send(&original).await.unwrap()));

    // An attacker (or a retrying device) sends the very same bytes again.
    let ack = dev.send(&original).await.unwrap();
    assert!(
        ack.events
            .iter()
            .all(|e| e.verdict() == Verdict::Accepted && e.reason == "duplicate"),
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
        "telemetry.events.v1",
        20,
        Duration::from_secs(10),
    )
    .unwrap();
    let mut seqs: Vec<u64> = events
        .iter()
        .map(|r| decode::<TelemetryEnvelope>(r).unwrap().event.unwrap().seq)
        .collect();
    seqs.sort();
    assert_eq!(
        seqs,
        vec![1, 2, 3, 4, 5, 99, 100],
        "each accepted seq exactly once"
    );
    let m = |reason| {
        stack
            .ingest
            .metric("fleetgate_events_rejected_total", &[("reason", reason)])
            .unwrap()
    };
    assert_eq!(m("duplicate"), 5.0);
    assert_eq!(m("replay_outside_window"), 1.0);
    let audit = read_topic(
        &stack.broker.bootstrap(),
        "telemetry.rejected.v1",
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_device_clocks_get_stale_and_from_future() {
    let stack = Stack::start("[freshness]\nmax_past = \"60s\"\nmax_future = \"5s\"\n");
    let mut dev = stack.device("fleet-a", "car-1").await;

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
        stack
            .ingest
            .metric("fleetgate_events_rejected_total", &[("reason", reason)])
            .unwrap()
            + stack
                .ingest
                .metric("fleetgate_batches_rejected_total", &[("reason", reason)])
                .unwrap()
    };
    assert_eq!(m("stale"), 1.0);
    assert_eq!(m("from_future"), 2.0);
    let audit = read_topic(
        &stack.broker.bootstrap(),
        "telemetry.rejected.v1",
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_devices_sending_concurrently_lose_nothing() {
    let stack = Stack::start("");
    let mut tasks = Vec::new();
    for d in 0..6 {
        let mut dev = stack.device("fleet-a", &format!("car-{d}")).await;
        tasks.push(tokio::spawn(async move {
            for b in 0..10u64 {
                let events = (1..=10).map(|i| event(b * 10 + i, 30.0)).collect();
                let ack = dev.send(&batch(b, events)).await.unwrap();
                assert!(all_accepted(&ack), "{ack:?}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let events = read_topic(
        &stack.broker.bootstrap(),
        "telemetry.events.v1",
        600,
        Duration::from_secs(20),
    )
    .unwrap();
    assert_eq!(events.len(), 600);
}
