//! A certificate listed in the configured CRL is refused at the handshake, on both
//! transports, while other devices of the same CA keep working.

mod common;

use std::time::Duration;

use common::*;
use fleetgate_client::QuicDevice;
use fleetgate_test_support::{read_topic, Broker, TestPki};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_certificates_are_refused_at_the_handshake() {
    let broker = Broker::start().unwrap();
    let pki = TestPki::new().unwrap();
    let revoked = pki.device("fleet-a", "stolen-car");
    let honest = pki.device("fleet-a", "car-1");
    let crl = pki.write_crl(&[revoked.serial_hex.as_str()]);
    // The fixture writes the [tls] section; the CRL path goes in by env override.
    let ingest = spawn_ingest(
        &broker,
        &pki,
        "",
        &[("FLEETGATE_TLS__CRL", &crl.display().to_string())],
    );

    let grpc = fleetgate_client::GrpcDevice::connect(
        &ingest.endpoint(),
        &client_tls(&pki, Some(&revoked)),
    )
    .await;
    let refused = match grpc {
        Err(_) => true,
        Ok(mut d) => d.send(&batch(1, vec![event(1, 1.0)])).await.is_err(),
    };
    assert!(
        refused,
        "revoked certificate must not get through over gRPC"
    );
    let quic = QuicDevice::connect(ingest.quic, &client_tls(&pki, Some(&revoked))).await;
    let refused = match quic {
        Err(_) => true,
        Ok(d) => d.send(&batch(1, vec![event(1, 1.0)])).await.is_err(),
    };
    assert!(
        refused,
        "revoked certificate must not get through over QUIC"
    );
    let mut counted = 0.0;
    for _ in 0..50 {
        counted = ingest
            .metric(
                "fleetgate_handshakes_total",
                &[("transport", "grpc"), ("outcome", "cert_revoked")],
            )
            .unwrap();
        if counted >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(counted >= 1.0, "{}", ingest.scrape().unwrap());

    let mut ok =
        fleetgate_client::GrpcDevice::connect(&ingest.endpoint(), &client_tls(&pki, Some(&honest)))
            .await
            .unwrap();
    assert!(all_accepted(
        &ok.send(&batch(1, vec![event(1, 1.0)])).await.unwrap()
    ));
    let records = read_topic(
        &broker.bootstrap(),
        "telemetry.events.v1",
        2,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(records.len(), 1, "only the honest device's event");
}
