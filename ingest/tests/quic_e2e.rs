//! QUIC-only acceptance tests: real tansu broker, real TLS 1.3 client certificates,
//! the real `fleetgate-ingest` binary, QUIC over loopback UDP. Behaviour both
//! transports share is tested once for both in `conformance.rs`; what is here has no
//! gRPC counterpart (mid-stream STOP of an oversize frame, connection migration,
//! per-stream read timeouts and resets).

mod common;

use std::time::Duration;

use common::*;
use fleetgate_proto::Verdict;
use fleetgate_test_support::{header, read_topic};
use prost::Message;

const EVENTS: &str = "telemetry.events.v1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_oversize_frame_is_stopped_midstream_and_answered() {
    let stack = Stack::start("[limits]\nmax_frame_bytes = 4096\n");
    let dev = stack.quic_device("fleet-a", "car-1").await;

    // Far beyond the limit: the server reads limit + 1 bytes, refuses the rest and
    // still answers on the same stream.
    let big = batch(2, (1..=2000).map(|s| event(s, 1.0)).collect());
    assert!(big.encoded_len() > 16 * 4096);
    let ack = dev.send(&big).await.unwrap();
    assert_eq!(
        (ack.batch_verdict(), ack.batch_reason.as_str()),
        (Verdict::Rejected, "frame_too_large")
    );
    assert!(ack.events.is_empty());

    let ack = dev.send(&batch(3, vec![event(1, 1.0)])).await.unwrap();
    assert!(all_accepted(&ack), "{ack:?}");

    let rejected = |reason: &str| {
        stack
            .ingest
            .metric(
                "fleetgate_batches_rejected_total",
                &[("transport", "quic"), ("reason", reason)],
            )
            .unwrap()
    };
    assert_eq!(rejected("frame_too_large"), 1.0);
    assert_eq!(
        stack
            .ingest
            .metric(
                "fleetgate_quic_stream_errors_total",
                &[("kind", "frame_too_large")]
            )
            .unwrap(),
        1.0
    );
    let events = read_topic(&stack.broker.bootstrap(), EVENTS, 2, Duration::from_secs(5)).unwrap();
    assert_eq!(events.len(), 1, "only the valid event");
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_changes_its_udp_socket_keeps_delivering() {
    let stack = Stack::start("");
    let dev = stack.quic_device("fleet-a", "car-1").await;
    let before = dev.local_addr().unwrap();
    let ack = dev
        .send(&batch(1, vec![event(1, 1.0), event(2, 1.0)]))
        .await
        .unwrap();
    assert!(all_accepted(&ack), "{ack:?}");

    dev.rebind().unwrap();
    assert_ne!(dev.local_addr().unwrap(), before, "a new UDP socket");
    let ack = dev
        .send(&batch(2, vec![event(3, 1.0), event(4, 1.0)]))
        .await
        .unwrap();
    assert!(all_accepted(&ack), "{ack:?}");

    let records = read_topic(
        &stack.broker.bootstrap(),
        EVENTS,
        4,
        Duration::from_secs(20),
    )
    .unwrap();
    let seqs = sorted_seqs(&records);
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    let connections: std::collections::HashSet<String> = records
        .iter()
        .map(|r| header(r, "fleetgate.connection_id").unwrap_or_default())
        .collect();
    assert_eq!(connections.len(), 1, "one connection across the rebind");
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_aborted_streams_are_reset_and_counted_without_hurting_the_connection() {
    let stack = Stack::start("[quic]\nstream_read_timeout = \"500ms\"\n");
    let dev = stack.quic_device("fleet-a", "car-1").await;
    let stream_errors = |kind: &str| {
        stack
            .ingest
            .metric("fleetgate_quic_stream_errors_total", &[("kind", kind)])
            .unwrap()
    };

    // A sender that starts a batch and never finishes it.
    let (mut send, mut recv) = dev.connection().open_bi().await.unwrap();
    send.write_all(&[0x08, 0x01]).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1024))
        .await
        .expect("server gives up within its read timeout");
    match read {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            assert_eq!(code.into_inner(), 0x10, "read-timeout error code")
        }
        other => panic!("expected a reset, got {other:?}"),
    }
    assert_eq!(stream_errors("read_timeout"), 1.0);

    // A sender that aborts its batch midway.
    let (mut send, _recv) = dev.connection().open_bi().await.unwrap();
    send.write_all(&[0x08, 0x01]).await.unwrap();
    send.reset(7u32.into()).unwrap();
    let mut counted = 0.0;
    for _ in 0..50 {
        counted = stream_errors("reset");
        if counted >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counted, 1.0);

    let ack = dev.send(&batch(1, vec![event(1, 1.0)])).await.unwrap();
    assert!(all_accepted(&ack), "{ack:?}");
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_and_the_slot_frees_up() {
    let stack = Stack::start("[quic]\nmax_connections = 1\n");
    let first = stack.quic_device("fleet-a", "car-1").await;
    assert!(all_accepted(
        &first.send(&batch(1, vec![event(1, 1.0)])).await.unwrap()
    ));

    let second = stack.pki.device("fleet-a", "car-2");
    let outcome = match stack.quic_connect(Some(&second)).await {
        Err(e) => Err(e.to_string()),
        Ok(d) => d
            .send(&batch(1, vec![event(1, 1.0)]))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    assert!(
        outcome.is_err(),
        "second connection must be refused: {outcome:?}"
    );
    assert!(
        stack
            .ingest
            .metric(
                "fleetgate_quic_connections_refused_total",
                &[("reason", "max_connections")]
            )
            .unwrap()
            >= 1.0
    );
    // The first device is unaffected; once it leaves, the slot is free again.
    assert!(all_accepted(
        &first.send(&batch(2, vec![event(2, 1.0)])).await.unwrap()
    ));
    first.close().await;
    let mut admitted = false;
    for _ in 0..50 {
        if let Ok(d) = stack.quic_connect(Some(&second)).await {
            if let Ok(ack) = d.send(&batch(1, vec![event(1, 1.0)])).await {
                admitted = all_accepted(&ack);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted, "a freed slot admits the next device");
}
