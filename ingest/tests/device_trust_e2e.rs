//! Device trust beyond the handshake, over both transports and a real broker: cloned
//! credentials, revocation of connected devices by a CRL reload, replay to a second
//! live node, and the per-device clock offset.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fleetgate_proto::RejectRecord;
use fleetgate_test_support::{decode, http_get, read_topic_until, Broker, TestPki};

fn rejects_with_reason(broker: &Broker, reason: &str, min: usize) -> Vec<RejectRecord> {
    let records = read_topic_until(
        &broker.bootstrap(),
        "telemetry.rejected.v1",
        Duration::from_secs(15),
        |msgs| {
            msgs.iter()
                .filter_map(|m| decode::<RejectRecord>(m).ok())
                .filter(|r| r.reason == reason)
                .count()
                >= min
        },
    )
    .expect("reading rejected topic");
    records
        .iter()
        .filter_map(|m| decode::<RejectRecord>(m).ok())
        .filter(|r| r.reason == reason)
        .collect()
}

async fn cloned_credential_newest_wins(wire: Wire) {
    let stack = Stack::start("");
    let issued = stack.pki.device("fleet-a", "car-1");
    let mut first = stack.connect_on(wire, Some(&issued)).await.unwrap();
    assert!(all_accepted(
        &first.send(&batch(1, vec![event(1, 1.0)])).await.unwrap()
    ));

    let mut clone = stack.connect_on(wire, Some(&issued)).await.unwrap();
    assert!(
        all_accepted(&clone.send(&batch(2, vec![event(2, 1.0)])).await.unwrap()),
        "allow_newest keeps the new connection"
    );
    let flagged = eventually_at_least(1.0, || {
        stack.metric_on(
            wire,
            "fleetgate_cloned_credential_total",
            &[("action", "closed_older")],
        )
    })
    .await;
    assert!(flagged >= 1.0, "{flagged}");
    // The older connection was closed by ingest: nothing more gets through on it.
    let mut older_refused = false;
    for _ in 0..50 {
        if first.send(&batch(3, vec![event(3, 1.0)])).await.is_err() {
            older_refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(older_refused, "the older connection must be closed");
    let closed = eventually_at_least(1.0, || {
        stack.metric_on(
            wire,
            "fleetgate_connections_closed_total",
            &[("reason", "cloned_credential")],
        )
    })
    .await;
    assert_eq!(closed, 1.0);

    let records = rejects_with_reason(&stack.broker, "cloned_credential", 1);
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    let prov = r.provenance.as_ref().unwrap();
    assert_eq!(prov.device_id, "car-1");
    assert_eq!(prov.transport, wire.label());
    // Evidence names both connections and both remote addresses.
    assert!(r.detail.contains(&prov.connection_id), "{}", r.detail);
    assert!(r.detail.contains(&prov.remote_addr), "{}", r.detail);
    assert_eq!(r.detail.matches("127.0.0.1:").count(), 2, "{}", r.detail);
    assert_eq!(r.detail.matches("it-node-").count(), 2, "{}", r.detail);
    clone.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloned_credential_grpc() {
    cloned_credential_newest_wins(Wire::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloned_credential_quic() {
    cloned_credential_newest_wins(Wire::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_second_policy_refuses_the_clone_on_both_transports() {
    let stack = Stack::start("[identity]\nclone_policy = \"reject_second\"\n");
    for (n, wire) in [Wire::Grpc, Wire::Quic].into_iter().enumerate() {
        let issued = stack.pki.device("fleet-a", &format!("car-{n}"));
        let mut first = stack.connect_on(wire, Some(&issued)).await.unwrap();
        assert!(all_accepted(
            &first.send(&batch(1, vec![event(1, 1.0)])).await.unwrap()
        ));
        let refused = match stack.connect_on(wire, Some(&issued)).await {
            Err(_) => true,
            Ok(mut clone) => clone.send(&batch(2, vec![event(2, 1.0)])).await.is_err(),
        };
        assert!(
            refused,
            "{}: the second connection is refused",
            wire.label()
        );
        assert!(
            all_accepted(&first.send(&batch(3, vec![event(3, 1.0)])).await.unwrap()),
            "{}: the first connection keeps working",
            wire.label()
        );
        let flagged = eventually_at_least(1.0, || {
            stack.metric_on(
                wire,
                "fleetgate_cloned_credential_total",
                &[("action", "refused_new")],
            )
        })
        .await;
        // At least once: a gRPC client may retry the connection it was refused.
        assert!(flagged >= 1.0, "{}: {flagged}", wire.label());
        first.close().await;
    }
    let records = rejects_with_reason(&stack.broker, "cloned_credential", 2);
    assert!(records
        .iter()
        .all(|r| r.detail.contains("new connection refused")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_connected_device_closes_its_connections_within_seconds() {
    let broker = Broker::start().unwrap();
    let pki = TestPki::new().unwrap();
    let stolen_grpc = pki.device("fleet-a", "stolen-1");
    let stolen_quic = pki.device("fleet-a", "stolen-2");
    let honest = pki.device("fleet-a", "car-1");
    let crl = pki.write_crl(&[]);
    let ingest = spawn_ingest(
        &broker,
        &pki,
        "",
        &[
            ("FLEETGATE_TLS__CRL", &crl.display().to_string()),
            ("FLEETGATE_TLS__CRL_RELOAD_INTERVAL", "200ms"),
        ],
    );
    let stack = Stack {
        broker,
        pki,
        ingest,
    };
    let mut g = stack
        .connect_on(Wire::Grpc, Some(&stolen_grpc))
        .await
        .unwrap();
    let mut q = stack
        .connect_on(Wire::Quic, Some(&stolen_quic))
        .await
        .unwrap();
    let mut ok = stack.connect_on(Wire::Quic, Some(&honest)).await.unwrap();
    for d in [&mut g, &mut q, &mut ok] {
        assert!(all_accepted(
            &d.send(&batch(1, vec![event(1, 1.0)])).await.unwrap()
        ));
    }

    let revoked_at = Instant::now();
    stack.pki.write_crl(&[
        stolen_grpc.serial_hex.as_str(),
        stolen_quic.serial_hex.as_str(),
    ]);
    for wire in [Wire::Grpc, Wire::Quic] {
        let closed = eventually_at_least(1.0, || {
            stack.metric_on(
                wire,
                "fleetgate_connections_closed_total",
                &[("reason", "cert_revoked")],
            )
        })
        .await;
        assert_eq!(closed, 1.0, "{}: {}", wire.label(), stack.ingest.logs());
    }
    let took = revoked_at.elapsed();
    eprintln!("revocation to both connections closed: {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(g.send(&batch(2, vec![event(2, 1.0)])).await.is_err());
    assert!(q.send(&batch(2, vec![event(2, 1.0)])).await.is_err());
    // Reconnecting is refused at the handshake now; the honest device is untouched.
    let refused = match stack.connect_on(Wire::Grpc, Some(&stolen_grpc)).await {
        Err(_) => true,
        Ok(mut d) => d.send(&batch(3, vec![event(3, 1.0)])).await.is_err(),
    };
    assert!(refused);
    assert!(all_accepted(
        &ok.send(&batch(2, vec![event(2, 1.0)])).await.unwrap()
    ));
    assert_eq!(
        stack
            .ingest
            .metric("fleetgate_crl_revoked_certificates", &[])
            .unwrap(),
        2.0
    );

    let records = rejects_with_reason(&stack.broker, "cert_revoked", 2);
    let mut devices: Vec<_> = records
        .iter()
        .map(|r| r.provenance.as_ref().unwrap().device_id.clone())
        .collect();
    devices.sort();
    assert_eq!(devices, ["stolen-1", "stolen-2"]);

    // A CRL file that stops parsing keeps the old list in force.
    std::fs::write(
        &crl,
        "-----BEGIN X509 CRL-----\nnot a crl\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let failed = eventually_at_least(1.0, || {
        stack
            .ingest
            .metric("fleetgate_crl_reloads_total", &[("outcome", "error")])
            .unwrap()
    })
    .await;
    assert_eq!(failed, 1.0);
    let still_refused = match stack.connect_on(Wire::Quic, Some(&stolen_quic)).await {
        Err(_) => true,
        Ok(mut d) => d.send(&batch(4, vec![event(4, 1.0)])).await.is_err(),
    };
    assert!(still_refused, "a broken CRL must not un-revoke");
    ok.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_to_another_live_node_is_refused() {
    let broker = Broker::start().unwrap();
    let pki = TestPki::new().unwrap();
    let node_a = spawn_ingest(&broker, &pki, "", &[("FLEETGATE_NODE_ID", "node-a")]);
    let node_b = spawn_ingest(&broker, &pki, "", &[("FLEETGATE_NODE_ID", "node-b")]);
    let issued = pki.device("fleet-a", "car-1");
    let captured = batch(1, (1..=5).map(|s| event(s, 10.0)).collect());

    let mut dev =
        fleetgate_client::GrpcDevice::connect(&node_a.endpoint(), &client_tls(&pki, Some(&issued)))
            .await
            .unwrap();
    assert!(all_accepted(&dev.send(&captured).await.unwrap()));
    // Node B started before the batch existed: it can only know it by following.
    let followed = eventually_at_least(1.0, || {
        node_b
            .metric("fleetgate_device_state_records_followed_total", &[])
            .unwrap()
    })
    .await;
    assert!(followed >= 1.0, "{}", node_b.logs());

    let replayer =
        fleetgate_client::QuicDevice::connect(node_b.quic, &client_tls(&pki, Some(&issued)))
            .await
            .unwrap();
    let ack = replayer.send(&captured).await.unwrap();
    assert!(
        all_duplicates(&ack),
        "replay on node B refused as duplicate: {ack:?}"
    );
    let ack = replayer.send(&batch(2, vec![event(6, 1.0)])).await.unwrap();
    assert!(all_accepted(&ack));
    replayer.close().await;
    drop(dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_clock_offset_is_tracked_and_exposed() {
    let stack = Stack::start("");
    let mut dev = stack.device_on(Wire::Quic, "fleet-a", "slow-clock").await;
    for i in 0..5u64 {
        let mut b = batch(i + 1, vec![event(i + 1, 1.0)]);
        // The device clock runs 90 s behind: inside the 5 min window, and visible.
        b.sent_at_ms -= 90_000;
        b.events[0].captured_at_ms -= 90_000;
        assert!(all_accepted(&dev.send(&b).await.unwrap()));
    }
    let body = http_get(stack.ingest.metrics, "/devices/fleet-a/slow-clock").unwrap();
    let json: serde_json::Value =
        serde_json::from_str(body.split("\r\n\r\n").last().unwrap_or(&body)).unwrap_or_else(|e| {
            panic!("{e}: {body}");
        });
    let offset = json["sequence"]["clock_offset_ms"].as_f64().unwrap();
    assert!((89_000.0..92_000.0).contains(&offset), "{json}");
    assert_eq!(json["sequence"]["highest_seq"], 5);
    assert_eq!(json["connections"].as_array().unwrap().len(), 1, "{json}");
    let missing = http_get(stack.ingest.metrics, "/devices/fleet-a/never-seen").unwrap();
    assert!(missing.contains("404"), "{missing}");
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_with_its_own_ca_accepts_only_that_ca_and_that_ca_only_that_fleet() {
    let broker = Broker::start().unwrap();
    let pki = TestPki::new().unwrap();
    let fleet_b_ca = fleetgate_pki::DevCa::generate("fleet-b CA").unwrap();
    let ca_path = pki.dir().join("fleet-b-ca.pem");
    std::fs::write(&ca_path, fleet_b_ca.cert_pem()).unwrap();
    let ingest = spawn_ingest(
        &broker,
        &pki,
        &format!("[tls.fleet_cas]\nfleet-b = \"{}\"\n", ca_path.display()),
        &[],
    );
    let stack = Stack {
        broker,
        pki,
        ingest,
    };
    let spec = |fleet: &str, device: &str| {
        fleetgate_pki::DeviceCertSpec::new(fleetgate_test_support::TRUST_DOMAIN, fleet, device)
    };
    let own = fleet_b_ca.issue_device(&spec("fleet-b", "car-1")).unwrap();
    let from_shared = stack.pki.issue(&spec("fleet-b", "car-2"));
    let foreign = fleet_b_ca.issue_device(&spec("fleet-a", "car-3")).unwrap();
    let shared_ok = stack.pki.issue(&spec("fleet-a", "car-4"));

    for (wire, issued, allowed) in [
        (Wire::Grpc, &own, true),
        (Wire::Quic, &own, true),
        (Wire::Grpc, &from_shared, false),
        (Wire::Quic, &foreign, false),
        (Wire::Grpc, &foreign, false),
        (Wire::Quic, &shared_ok, true),
    ] {
        let got_through = match stack.connect_on(wire, Some(issued)).await {
            Ok(mut d) => {
                let ok = d
                    .send(&batch(1, vec![event(1, 1.0)]))
                    .await
                    .map(|a| all_accepted(&a))
                    .unwrap_or(false);
                d.close().await;
                ok
            }
            Err(_) => false,
        };
        assert_eq!(
            got_through,
            allowed,
            "{} {:?}",
            wire.label(),
            issued.serial_hex
        );
    }
    let refused = eventually_at_least(2.0, || {
        stack.metric_on(
            Wire::Grpc,
            "fleetgate_handshakes_total",
            &[("outcome", "fleet_ca_mismatch")],
        )
    })
    .await;
    assert!(refused >= 2.0, "{refused}");
}
