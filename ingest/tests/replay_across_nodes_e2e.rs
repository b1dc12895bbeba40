//! Anti-replay state lives in Kafka (`fleet.device-state.v1`): a restarted ingest node,
//! or another node, refuses replays of what was already stored, and holds back what
//! another node was still delivering.

mod common;

use std::time::Duration;

use common::*;
use fleetgate_proto::{DeviceState, Verdict};
use fleetgate_test_support::{read_topic, Broker, TestPki};
use prost::Message as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_refused_after_restart_and_on_another_node() {
    let broker = Broker::start().unwrap();
    let pki = TestPki::new().unwrap();
    let issued = pki.device("fleet-a", "car-1");
    let captured = batch(1, (1..=5).map(|s| event(s, 10.0)).collect());

    let node_a = spawn_ingest(&broker, &pki, "", &[]);
    let mut dev =
        fleetgate_client::GrpcDevice::connect(&node_a.endpoint(), &client_tls(&pki, Some(&issued)))
            .await
            .unwrap();
    assert!(all_accepted(&dev.send(&captured).await.unwrap()));
    // Seq 7 is stored, 6 is not: after a restart 6 must stay acceptable.
    assert!(all_accepted(
        &dev.send(&batch(2, vec![event(7, 1.0)])).await.unwrap()
    ));
    drop(dev);
    assert!(node_a.terminate().unwrap().success());

    // The same node restarted, and a second node: both restore the windows.
    let restarted = spawn_ingest(&broker, &pki, "", &[]);
    let other = spawn_ingest(&broker, &pki, "", &[("FLEETGATE_NODE_ID", "it-node-2")]);
    for node in [&restarted, &other] {
        let mut replayer = fleetgate_client::GrpcDevice::connect(
            &node.endpoint(),
            &client_tls(&pki, Some(&issued)),
        )
        .await
        .unwrap();
        let ack = replayer.send(&captured).await.unwrap();
        assert!(
            all_duplicates(&ack),
            "replay refused as duplicate (acked, not published): {ack:?}"
        );
        assert!(
            node.metric("fleetgate_device_state_records_restored", &[])
                .unwrap()
                >= 1.0
        );
    }
    let mut dev =
        fleetgate_client::GrpcDevice::connect(&other.endpoint(), &client_tls(&pki, Some(&issued)))
            .await
            .unwrap();
    let ack = dev
        .send(&batch(3, vec![event(6, 1.0), event(8, 1.0)]))
        .await
        .unwrap();
    assert!(
        all_accepted(&ack),
        "the never-stored seq 6 and a new seq 8 are accepted: {ack:?}"
    );

    let records = read_topic(
        &broker.bootstrap(),
        "telemetry.events.v1",
        9,
        Duration::from_secs(10),
    )
    .unwrap();
    let seqs = sorted_seqs(&records);
    assert_eq!(
        seqs,
        vec![1, 2, 3, 4, 5, 6, 7, 8],
        "no replay was published"
    );
}

/// A device-state record as a node writes it alongside a batch it is delivering, from a
/// node that then died before settling it.
fn publish_state(broker: &Broker, device: &str, highest: u64, unstored: &[u64], pending: &[u64]) {
    let state = DeviceState {
        fleet_id: "fleet-a".into(),
        device_id: device.into(),
        highest_seq: highest,
        updated_at_ms: now_ms(),
        ingest_node: "it-crashed-node".into(),
        unstored_seqs: unstored.to_vec(),
        pending_seqs: pending.to_vec(),
    };
    let key = format!("fleet-a/{device}");
    broker
        .produce("fleet.device-state.v1", &key, &state.encode_to_vec())
        .unwrap();
}

fn reasons(ack: &fleetgate_proto::BatchAck) -> Vec<(Verdict, &str)> {
    ack.events
        .iter()
        .map(|e| (e.verdict(), e.reason.as_str()))
        .collect()
}

// Seqs another node was still delivering when it wrote its record are neither accepted
// (they may be stored: a replay) nor acked as duplicates (they may be lost): the device
// is told to retry until a later record settles them, or until the in-doubt TTL ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqs_another_node_left_in_flight_wait_for_settlement_or_ttl() {
    let broker = Broker::start().unwrap();
    let pki = TestPki::new().unwrap();
    // Known at start-up: car-1's seqs 2 and 3 were being delivered.
    publish_state(&broker, "car-1", 3, &[2, 3], &[2, 3]);
    let node = spawn_ingest(
        &broker,
        &pki,
        "",
        &[
            ("FLEETGATE_KAFKA__DELIVERY_TIMEOUT", "1s"),
            ("FLEETGATE_SEQUENCE__IN_DOUBT_TTL", "6s"),
        ],
    );
    let tls = |d: &str| client_tls(&pki, Some(&pki.device("fleet-a", d)));
    let mut car1 = fleetgate_client::GrpcDevice::connect(&node.endpoint(), &tls("car-1"))
        .await
        .unwrap();
    let ack = car1
        .send(&batch(1, vec![event(1, 1.0), event(2, 1.0), event(4, 1.0)]))
        .await
        .unwrap();
    assert_eq!(
        reasons(&ack),
        vec![
            (Verdict::Accepted, "duplicate"),
            (Verdict::Retry, "duplicate_in_flight"),
            (Verdict::Accepted, ""),
        ],
        "1 was stored, 2 is in doubt, 4 is new"
    );

    // Learned live: car-2's seq 5 is in doubt, then the writer settles it as stored.
    let mut car2 = fleetgate_client::GrpcDevice::connect(&node.endpoint(), &tls("car-2"))
        .await
        .unwrap();
    let followed = || {
        node.metric("fleetgate_device_state_records_followed_total", &[])
            .unwrap_or(0.0)
    };
    publish_state(&broker, "car-2", 5, &[5], &[5]);
    eventually_at_least(1.0, followed).await;
    let ack = car2.send(&batch(1, vec![event(5, 1.0)])).await.unwrap();
    assert_eq!(reasons(&ack), vec![(Verdict::Retry, "duplicate_in_flight")]);
    publish_state(&broker, "car-2", 5, &[], &[]);
    eventually_at_least(2.0, followed).await;
    let ack = car2.send(&batch(2, vec![event(5, 1.0)])).await.unwrap();
    assert_eq!(
        reasons(&ack),
        vec![(Verdict::Accepted, "duplicate")],
        "settled as stored: acked, never republished"
    );

    // car-1's writer never settles: after the TTL the retry of 2 is accepted.
    let started = std::time::Instant::now();
    let accepted_after = loop {
        let ack = car1.send(&batch(2, vec![event(2, 1.0)])).await.unwrap();
        if all_accepted(&ack) && ack.events[0].reason.is_empty() {
            break started.elapsed();
        }
        assert_eq!(reasons(&ack), vec![(Verdict::Retry, "duplicate_in_flight")]);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "doubt never ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        accepted_after > Duration::from_secs(1),
        "{accepted_after:?}"
    );
    assert_eq!(
        node.metric("fleetgate_device_state_doubts_expired_total", &[])
            .unwrap(),
        2.0,
        "car-1's 2 and 3 expired; car-2's 5 was settled"
    );

    let records = read_topic(
        &broker.bootstrap(),
        "telemetry.events.v1",
        2,
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(
        sorted_seqs(&records),
        vec![2, 4],
        "only car-1's 4 and 2 were published"
    );
}
