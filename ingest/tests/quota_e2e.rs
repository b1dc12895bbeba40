//! Quotas and overload on a real ingest node and broker: a noisy device is throttled
//! while its fleet-mates are not, a noisy fleet while another fleet is not, handshake
//! floods are cut per source address, a full in-flight bound answers `overloaded`,
//! and quota changes apply on SIGHUP without a restart.

mod common;

use std::time::Duration;

use common::*;
use fleetgate_proto::{BatchAck, Verdict};

/// Small batches so small bursts are valid (a burst must hold the largest batch).
const SMALL: &str = "[limits]\nmax_events_per_batch = 50\n";

fn quota_toml(extra: &str) -> String {
    format!(
        "{SMALL}[quota.device]\nevents_per_sec = 20\nevent_burst = 100\nbytes_per_sec = 0\nbyte_burst = 0\n{extra}"
    )
}

fn events(first: u64, n: u64) -> Vec<fleetgate_proto::TelemetryEvent> {
    (first..first + n).map(|s| event(s, 1.0)).collect()
}

fn refused_with(ack: &BatchAck, reason: &str) -> bool {
    ack.batch_verdict() == Verdict::Retry && ack.batch_reason == reason && ack.retry_after_ms > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_device_is_throttled_and_its_fleet_mates_are_not() {
    let stack = Stack::start(&quota_toml(""));
    let mut noisy = stack.device_on(Wire::Grpc, "fleet-a", "noisy").await;
    let mut mate = stack.device_on(Wire::Quic, "fleet-a", "mate").await;

    // Burst 100 at 20 ev/s: two batches of 50 pass, the third is throttled.
    assert!(all_accepted(
        &noisy.send(&batch(1, events(1, 50))).await.unwrap()
    ));
    assert!(all_accepted(
        &noisy.send(&batch(2, events(51, 50))).await.unwrap()
    ));
    let ack = noisy.send(&batch(3, events(101, 50))).await.unwrap();
    assert!(refused_with(&ack, "rate_limited_device"), "{ack:?}");
    // The retry-after says when 50 events fit again at 20 ev/s: about 2.5 s.
    assert!((1_500..=2_600).contains(&ack.retry_after_ms), "{ack:?}");

    // The throttled batch's seqs were not consumed: after the wait they pass.
    assert!(all_accepted(
        &mate.send(&batch(1, events(1, 50))).await.unwrap()
    ));
    tokio::time::sleep(Duration::from_millis(u64::from(ack.retry_after_ms))).await;
    assert!(all_accepted(
        &noisy.send(&batch(4, events(101, 50))).await.unwrap()
    ));

    assert_eq!(
        stack
            .ingest
            .metric(
                "fleetgate_rate_limited_total",
                &[("reason", "rate_limited_device"), ("fleet", "fleet-a")],
            )
            .unwrap(),
        1.0
    );
    assert_eq!(
        stack.metric_on(
            Wire::Grpc,
            "fleetgate_batches_rejected_total",
            &[("reason", "rate_limited_device")]
        ),
        1.0
    );
    let records = fleetgate_test_support::read_topic(
        &stack.broker.bootstrap(),
        "telemetry.events.v1",
        200,
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(
        records.len(),
        200,
        "every accepted event stored, none twice"
    );
    mate.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_fleet_is_throttled_and_another_fleet_is_not() {
    // fleet-noisy as a whole may send 100 events at once; each device alone could send more.
    let stack = Stack::start(&format!(
        "{SMALL}[quota.fleets.fleet-noisy.fleet]\nevents_per_sec = 10\nevent_burst = 100\nbytes_per_sec = 0\nbyte_burst = 0\n"
    ));
    let mut outcomes = Vec::new();
    for d in 0..3 {
        let mut dev = stack
            .device_on(Wire::Grpc, "fleet-noisy", &format!("car-{d}"))
            .await;
        outcomes.push(dev.send(&batch(1, events(1, 50))).await.unwrap());
    }
    assert!(all_accepted(&outcomes[0]) && all_accepted(&outcomes[1]));
    assert!(
        refused_with(&outcomes[2], "rate_limited_fleet"),
        "{:?}",
        outcomes[2]
    );
    for d in 0..3 {
        let mut dev = stack
            .device_on(Wire::Quic, "fleet-quiet", &format!("car-{d}"))
            .await;
        assert!(
            all_accepted(&dev.send(&batch(1, events(1, 50))).await.unwrap()),
            "another fleet is not throttled"
        );
        dev.close().await;
    }
    assert_eq!(
        stack
            .ingest
            .metric(
                "fleetgate_rate_limited_total",
                &[("reason", "rate_limited_fleet"), ("fleet", "fleet-noisy")],
            )
            .unwrap(),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_changes_apply_on_sighup() {
    let stack = Stack::start(&quota_toml(""));
    let mut dev = stack.device_on(Wire::Quic, "fleet-a", "car-1").await;
    assert!(all_accepted(
        &dev.send(&batch(1, events(1, 50))).await.unwrap()
    ));
    assert!(all_accepted(
        &dev.send(&batch(2, events(51, 50))).await.unwrap()
    ));
    let ack = dev.send(&batch(3, events(101, 50))).await.unwrap();
    assert!(refused_with(&ack, "rate_limited_device"), "{ack:?}");

    // 50x for this fleet's devices, applied by SIGHUP to the running process.
    let config = std::fs::read_to_string(&stack.ingest.config).unwrap();
    std::fs::write(
        &stack.ingest.config,
        format!(
            "{config}\n[quota.fleets.fleet-a.device]\nevents_per_sec = 1000\nevent_burst = 5000\nbytes_per_sec = 0\nbyte_burst = 0\n"
        ),
    )
    .unwrap();
    stack.ingest.signal("HUP").unwrap();
    let reloaded = eventually_at_least(1.0, || {
        stack
            .ingest
            .metric("fleetgate_quota_reloads_total", &[("outcome", "ok")])
            .unwrap()
    })
    .await;
    assert_eq!(reloaded, 1.0, "{}", stack.ingest.logs());
    for b in 0..10u64 {
        let first = 101 + b * 50;
        let ack = dev.send(&batch(10 + b, events(first, 50))).await.unwrap();
        assert!(all_accepted(&ack), "batch {b} after reload: {ack:?}");
    }

    // A broken file is refused and the running limits stay.
    std::fs::write(
        &stack.ingest.config,
        format!("{config}\n[quota]\nnot_a_key = 1\n"),
    )
    .unwrap();
    stack.ingest.signal("HUP").unwrap();
    let failed = eventually_at_least(1.0, || {
        stack
            .ingest
            .metric("fleetgate_quota_reloads_total", &[("outcome", "error")])
            .unwrap()
    })
    .await;
    assert_eq!(failed, 1.0);
    let ack = dev.send(&batch(30, events(601, 50))).await.unwrap();
    assert!(all_accepted(&ack), "still the reloaded limits: {ack:?}");
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_floods_are_cut_per_source_address() {
    let stack = Stack::start(
        "[quota.connections]\nhandshakes_per_sec_per_ip = 1\nhandshake_burst_per_ip = 3\n",
    );
    let issued = stack.pki.device("fleet-a", "car-1");
    let mut refused = 0;
    for _ in 0..8 {
        match stack.connect_on(Wire::Quic, Some(&issued)).await {
            Ok(mut d) => {
                if d.send(&batch(1, vec![event(1, 1.0)])).await.is_err() {
                    refused += 1;
                }
                d.close().await;
            }
            Err(_) => refused += 1,
        }
    }
    assert!(
        refused >= 4,
        "only the burst of 3 (plus refill) gets through: {refused}"
    );
    let counted = stack.metric_on(
        Wire::Quic,
        "fleetgate_handshakes_total",
        &[("outcome", "handshake_rate_limited_ip")],
    );
    assert!(counted >= 4.0, "{counted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_in_flight_bound_answers_overloaded_instead_of_queueing() {
    let stack = Stack::start(&format!(
        "{SMALL}[quota.overload]\nmax_events_in_flight = 60\n"
    ));
    let mut slow = stack.device_on(Wire::Grpc, "fleet-a", "car-1").await;
    let mut other = stack.device_on(Wire::Quic, "fleet-a", "car-2").await;
    stack.broker.freeze();
    // 50 events wait for a frozen broker; the next 50 do not fit under 60.
    let pending = tokio::spawn(async move {
        let ack = slow.send(&batch(1, events(1, 50))).await;
        (slow, ack)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ack = other.send(&batch(1, events(1, 50))).await.unwrap();
    assert!(refused_with(&ack, "overloaded"), "{ack:?}");
    assert_eq!(
        stack
            .ingest
            .metric(
                "fleetgate_overload_shed_total",
                &[("cause", "in_flight_full")]
            )
            .unwrap(),
        1.0
    );
    stack.broker.thaw();
    let (_slow, first) = pending.await.unwrap();
    let first = first.unwrap();
    // Whatever the frozen broker did to the first batch, the second now gets through.
    let ack = other.send(&batch(2, events(1, 50))).await.unwrap();
    assert!(all_accepted(&ack), "{ack:?} (first batch: {first:?})");
    other.close().await;
}
