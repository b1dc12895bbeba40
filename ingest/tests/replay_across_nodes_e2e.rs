//! Anti-replay state lives in Kafka (`fleet.device-state.v1`): a restarted ingest node,
//! or another node, refuses replays of what was already stored.

mod common;

use std::time::Duration;

use common::*;
use fleetgate_proto::Verdict;
use fleetgate_test_support::{read_topic, Broker, TestPki};

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
            ack.events
                .iter()
                .all(|e| e.verdict() == Verdict::Accepted && e.reason == "duplicate"),
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
