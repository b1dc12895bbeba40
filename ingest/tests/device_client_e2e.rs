//! The device client keeps unacknowledged events through a broker outage and through
//! an ingest restart, honours retry-after, and delivers every event exactly once —
//! over gRPC and over QUIC.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use fleetgate_client::{Device, Target};
use fleetgate_proto::{signal::Value, SessionContext, Signal, TelemetryEnvelope};
use fleetgate_test_support::{decode, read_topic_until, Broker, TestPki};

fn sample(dev: &mut Device, n: usize) {
    for i in 0..n {
        dev.record(
            now_ms() - 10,
            vec![Signal {
                name: "speed_kph".into(),
                value: Some(Value::F64(40.0 + i as f64)),
            }],
            None,
        );
    }
}

async fn survives_outage_and_restart(quic: bool) {
    let broker = Broker::start().unwrap();
    let pki = TestPki::new().unwrap();
    let env = [
        ("FLEETGATE_KAFKA__DELIVERY_TIMEOUT", "1s"),
        ("FLEETGATE_RETRY_AFTER", "100ms"),
    ];
    let ingest = spawn_ingest(&broker, &pki, "", &env);
    let target = |i: &fleetgate_test_support::Ingest| {
        if quic {
            Target::Quic(i.quic)
        } else {
            Target::Grpc(i.endpoint())
        }
    };
    let issued = pki.device("fleet-a", "car-1");
    let session = SessionContext {
        software_version: "fw-3".into(),
        vehicle_config_id: "cfg".into(),
    };
    let mut dev = Device::new(target(&ingest), client_tls(&pki, Some(&issued)), session, 1);

    sample(&mut dev, 20);
    let r = dev.flush(Duration::from_secs(20)).await.unwrap();
    assert_eq!((r.accepted, dev.unacked()), (20, 0));

    // Broker hangs: every attempt is answered "retry", the device keeps its events.
    broker.freeze();
    sample(&mut dev, 10);
    assert!(dev.flush(Duration::from_secs(3)).await.is_err());
    assert_eq!(dev.unacked(), 10, "nothing dropped while Kafka is down");
    broker.thaw();
    let r = dev.flush(Duration::from_secs(30)).await.unwrap();
    assert_eq!((r.accepted, dev.unacked()), (10, 0));

    // Ingest restarts on the same addresses: the device reconnects and retransmits.
    let (grpc_port, quic_port) = (ingest.grpc.port(), ingest.quic.port());
    assert!(ingest.terminate().unwrap().success());
    sample(&mut dev, 5);
    assert!(
        dev.flush(Duration::from_secs(1)).await.is_err(),
        "no ingest, no ack"
    );
    assert_eq!(dev.unacked(), 5);
    let grpc_listen = format!("127.0.0.1:{grpc_port}");
    let quic_listen = format!("127.0.0.1:{quic_port}");
    let env2 = [
        ("FLEETGATE_GRPC__LISTEN", grpc_listen.as_str()),
        ("FLEETGATE_QUIC__LISTEN", quic_listen.as_str()),
    ];
    let _ingest2 = spawn_ingest(&broker, &pki, "", &env2);
    let r = dev.flush(Duration::from_secs(30)).await.unwrap();
    assert_eq!(dev.unacked(), 0);
    assert!(r.reconnects >= 1);

    // Retries that raced a timed-out delivery may leave duplicates in Kafka (the
    // delivery contract: removed downstream by (device, seq)); every seq must be there.
    let seq_of = |r: &rdkafka::message::OwnedMessage| {
        decode::<TelemetryEnvelope>(r).unwrap().event.unwrap().seq
    };
    let records = read_topic_until(
        &broker.bootstrap(),
        "telemetry.events.v1",
        Duration::from_secs(20),
        |rs| rs.iter().map(seq_of).collect::<BTreeSet<u64>>().len() >= 35,
    )
    .unwrap();
    let seqs: BTreeSet<u64> = records.iter().map(seq_of).collect();
    assert_eq!(
        seqs,
        (1..=35).collect::<BTreeSet<u64>>(),
        "every event delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_device_survives_outage_and_restart() {
    survives_outage_and_restart(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_device_survives_outage_and_restart() {
    survives_outage_and_restart(true).await;
}
