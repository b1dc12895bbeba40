//! Hot-path cost per event: decode + validate + freshness + anti-replay (the whole
//! `Pipeline::check` on a 100-event batch), the anti-replay window alone, and building
//! the provenance-tagged Kafka record. Run: `cargo bench -p fleetgate-benches`.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use fleetgate_ingest::catalog::{default_signals, SignalCatalog};
use fleetgate_ingest::connection::{ConnectionContext, SessionState, Transport};
use fleetgate_ingest::envelope::{batch_provenance, BatchRecords};
use fleetgate_ingest::freshness::{FreshnessConfig, FreshnessWindow};
use fleetgate_ingest::identity::{DeviceId, DeviceIdentity, FleetId};
use fleetgate_ingest::pipeline::{Checked, Limits, Pipeline};
use fleetgate_ingest::replay::{AntiReplayWindow, ReplayWindows};
use fleetgate_proto::{signal::Value, Location, Signal, TelemetryBatch, TelemetryEvent};
use prost::Message;

const NOW: i64 = 1_700_000_000_000;
const EVENTS: u64 = 100;

fn identity() -> DeviceIdentity {
    DeviceIdentity {
        device_id: DeviceId::parse("car-0001").expect("valid id"),
        fleet_id: FleetId::parse("fleet-a").expect("valid id"),
        cert_sha256: "ab".repeat(32),
        cert_serial: "1f".repeat(16),
    }
}

fn event(seq: u64) -> TelemetryEvent {
    let f = |name: &str, v: f64| Signal {
        name: name.into(),
        value: Some(Value::F64(v)),
    };
    TelemetryEvent {
        seq,
        captured_at_ms: NOW - 500,
        signals: vec![
            f("speed_kph", 87.5),
            f("odometer_km", 12_345.6),
            f("soc_pct", 64.0),
            f("battery_temp_c", 31.5),
            f("ambient_temp_c", 12.0),
        ],
        location: Some(Location {
            latitude_deg: 52.52,
            longitude_deg: 13.405,
            accuracy_m: 3.5,
            heading_deg: 270.0,
        }),
    }
}

fn frame(first_seq: u64) -> Vec<u8> {
    TelemetryBatch {
        schema_version: 1,
        batch_id: first_seq,
        sent_at_ms: NOW,
        events: (first_seq..first_seq + EVENTS).map(event).collect(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn pipeline_per_batch(c: &mut Criterion) {
    let pipeline = Pipeline::new(
        Limits::default(),
        SignalCatalog::new(default_signals()),
        FreshnessWindow::new(&FreshnessConfig::default()),
        ReplayWindows::new(1024),
    );
    let id = identity();
    let mut next = 1u64;
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(EVENTS));
    group.bench_function("check_100_event_batch", |b| {
        b.iter_batched(
            || {
                let f = frame(next);
                next += EVENTS;
                f
            },
            |f| {
                let out = pipeline.check(&id, &f, NOW);
                assert!(matches!(out, Checked::Events { .. }));
                // Commit so the window behaves as in steady state.
                pipeline.replay().with(&id.fleet_id, &id.device_id, |w| {
                    let h = w.highest();
                    (h + 1 - EVENTS..=h).for_each(|s| w.commit(s));
                });
                black_box(out)
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn window(c: &mut Criterion) {
    let mut w = AntiReplayWindow::new(1024);
    let mut seq = 0u64;
    c.bench_function("anti_replay/reserve_commit", |b| {
        b.iter(|| {
            seq += 1;
            black_box(w.reserve(seq));
            w.commit(seq);
        })
    });
}

fn envelope(c: &mut Criterion) {
    let conn = ConnectionContext::new(
        identity(),
        Transport::Grpc,
        "bench-node",
        "127.0.0.1:40000"
            .parse::<SocketAddr>()
            .expect("literal address"),
    );
    let session = SessionState {
        software_version: "fw-2.1.0".into(),
        vehicle_config_id: "cfg-eu-7".into(),
    };
    let base = batch_provenance("bench-node", &conn, &session, NOW, NOW, 1);
    let e = event(42);
    // Once per batch; amortised over its events (100 in the pipeline bench).
    c.bench_function("envelope/batch_records_new", |b| {
        b.iter(|| black_box(BatchRecords::new(base.clone())))
    });
    let records = BatchRecords::new(base);
    c.bench_function("envelope/event_record", |b| {
        b.iter(|| black_box(records.event_record(&e)))
    });
}

criterion_group!(benches, pipeline_per_batch, window, envelope);
criterion_main!(benches);
