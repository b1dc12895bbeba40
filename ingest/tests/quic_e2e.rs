//! QUIC transport acceptance tests: real tansu broker, real TLS 1.3 client
//! certificates, the real `fleetgate-ingest` binary, QUIC over loopback UDP.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use fleetgate_proto::{TelemetryEnvelope, Verdict};
use fleetgate_test_support::{decode, header, read_topic};
use prost::Message;
use rdkafka::Message as _;

const EVENTS: &str = "telemetry.events.v1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_events_reach_kafka_with_quic_provenance() {
    let stack = Stack::start("");
    let dev = stack.quic_device("fleet-a", "car-1").await;
    let mut seq = 0;
    for batch_no in 1..=3u64 {
        let events: Vec<_> = (0..4)
            .map(|i| {
                seq += 1;
                event(seq, 10.0 + i as f64)
            })
            .collect();
        let ack = dev.send(&batch(batch_no, events)).await.unwrap();
        assert!(all_accepted(&ack), "{ack:?}");
        assert_eq!(ack.batch_id, batch_no);
        assert_eq!(ack.events.len(), 4);
    }

    let records = read_topic(
        &stack.broker.bootstrap(),
        EVENTS,
        12,
        Duration::from_secs(20),
    )
    .unwrap();
    assert_eq!(records.len(), 12);
    let mut seqs = Vec::new();
    for r in &records {
        let env: TelemetryEnvelope = decode(r).unwrap();
        let p = env.provenance.expect("provenance");
        assert_eq!(std::str::from_utf8(r.key().unwrap()).unwrap(), "car-1");
        assert_eq!(
            (p.device_id.as_str(), p.fleet_id.as_str()),
            ("car-1", "fleet-a")
        );
        assert_eq!(p.cert_sha256.len(), 64);
        assert_eq!(p.transport, "quic");
        assert!(p.connection_id.starts_with("it-node-quic-"));
        assert_eq!(p.software_version, "fw-2.1.0");
        assert_eq!(header(r, "fleetgate.transport").unwrap(), "quic");
        seqs.push((r.offset(), p.seq));
    }
    seqs.sort();
    let got: Vec<u64> = seqs.iter().map(|s| s.1).collect();
    assert_eq!(
        got,
        (1..=12).collect::<Vec<_>>(),
        "one partition, send order"
    );
    assert_eq!(
        stack
            .ingest
            .metric("fleetgate_events_accepted_total", &[("transport", "quic")])
            .unwrap(),
        12.0
    );
    assert_eq!(
        stack
            .ingest
            .metric("fleetgate_quic_streams_acked_total", &[])
            .unwrap(),
        3.0
    );
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_oversize_frames_are_answered_and_the_connection_keeps_working() {
    let stack = Stack::start("[limits]\nmax_frame_bytes = 4096\n");
    let dev = stack.quic_device("fleet-a", "car-1").await;

    let ack = dev
        .send_raw(Bytes::from_static(&[0xff, 0xff, 0xff, 0x0f]))
        .await
        .unwrap();
    assert_eq!(
        (ack.batch_verdict(), ack.batch_reason.as_str()),
        (Verdict::Rejected, "decode_error")
    );

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
    assert_eq!(rejected("decode_error"), 1.0);
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
async fn a_device_without_a_certificate_is_refused() {
    let stack = Stack::start("");
    // TLS 1.3 clients finish before the server verifies them, so the refusal shows as
    // a failed connect or a failed first send.
    let outcome = match stack.quic_connect(None).await {
        Err(e) => Err(e.to_string()),
        Ok(dev) => dev
            .send(&batch(1, vec![event(1, 5.0)]))
            .await
            .map_err(|e| e.to_string()),
    };
    assert!(outcome.is_err(), "must be refused, got {outcome:?}");
    // The device may see the close before the server's handshake task has counted it.
    let mut refused = 0.0;
    for _ in 0..50 {
        refused = stack
            .ingest
            .metric(
                "fleetgate_handshakes_total",
                &[("transport", "quic"), ("outcome", "no_client_cert")],
            )
            .unwrap();
        if refused >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refused >= 1.0,
        "refusal counted\n{}",
        stack.ingest.scrape().unwrap()
    );
    let records = read_topic(&stack.broker.bootstrap(), EVENTS, 1, Duration::from_secs(3)).unwrap();
    assert!(records.is_empty(), "nothing reached Kafka");
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
    let mut seqs: Vec<u64> = records
        .iter()
        .map(|r| decode::<TelemetryEnvelope>(r).unwrap().event.unwrap().seq)
        .collect();
    seqs.sort();
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
async fn sigterm_with_a_quic_device_connected_exits_cleanly() {
    let stack = Stack::start("");
    let dev = stack.quic_device("fleet-a", "car-1").await;
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
    drop(broker);
}
