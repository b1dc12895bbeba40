//! Helpers shared by this crate's integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use fleetgate_client::{ClientError, ClientTls, GrpcDevice};
use fleetgate_pki::Issued;
use fleetgate_proto::{
    signal::Value, BatchAck, Location, SessionContext, Signal, TelemetryBatch, TelemetryEvent,
    Verdict,
};
use fleetgate_test_support::{Broker, Ingest, TestPki};

pub fn ingest_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_fleetgate-ingest"))
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A broker, a PKI and an ingest node wired together.
pub struct Stack {
    pub broker: Broker,
    pub pki: TestPki,
    pub ingest: Ingest,
}

impl Stack {
    pub fn start(extra_toml: &str) -> Self {
        Self::start_on(Broker::start().expect("broker"), extra_toml)
    }

    pub fn start_on(broker: Broker, extra_toml: &str) -> Self {
        Self::start_with_env(broker, extra_toml, &[])
    }

    pub fn start_with_env(broker: Broker, extra_toml: &str, env: &[(&str, &str)]) -> Self {
        let pki = TestPki::new().expect("pki");
        let ingest = spawn_ingest(&broker, &pki, extra_toml, env);
        Self {
            broker,
            pki,
            ingest,
        }
    }

    pub async fn device(&self, fleet: &str, device: &str) -> GrpcDevice {
        let issued = self.pki.device(fleet, device);
        self.connect(Some(&issued)).await.expect("device connects")
    }

    pub async fn connect(
        &self,
        issued: Option<&Issued>,
    ) -> Result<GrpcDevice, fleetgate_client::ClientError> {
        GrpcDevice::connect(&self.ingest.endpoint(), &client_tls(&self.pki, issued)).await
    }
}

pub fn spawn_ingest(
    broker: &Broker,
    pki: &TestPki,
    extra_toml: &str,
    env: &[(&str, &str)],
) -> Ingest {
    let toml = format!(
        "node_id = \"it-node\"\n{extra_toml}\n{}\n[kafka]\nbootstrap_servers = \"{}\"\n",
        pki.tls_toml(),
        broker.bootstrap()
    );
    Ingest::spawn_with_env(ingest_bin(), &toml, env).expect("ingest starts")
}

pub fn client_tls(pki: &TestPki, issued: Option<&Issued>) -> ClientTls {
    ClientTls {
        server_ca_pem: pki.ca.cert_pem(),
        identity: issued.map(|i| (i.cert_pem.clone(), i.key_pem.clone())),
        server_name: "localhost".into(),
    }
}

pub fn event(seq: u64, speed: f64) -> TelemetryEvent {
    TelemetryEvent {
        seq,
        captured_at_ms: now_ms() - 50,
        signals: vec![
            Signal {
                name: "speed_kph".into(),
                value: Some(Value::F64(speed)),
            },
            Signal {
                name: "soc_pct".into(),
                value: Some(Value::F64(80.0)),
            },
        ],
        location: Some(Location {
            latitude_deg: 52.52,
            longitude_deg: 13.40,
            accuracy_m: 4.0,
            heading_deg: 90.0,
        }),
    }
}

pub fn batch(batch_id: u64, events: Vec<TelemetryEvent>) -> TelemetryBatch {
    TelemetryBatch {
        schema_version: 1,
        batch_id,
        sent_at_ms: now_ms(),
        session: Some(SessionContext {
            software_version: "fw-2.1.0".into(),
            vehicle_config_id: "cfg-eu-7".into(),
        }),
        events,
        device_id: String::new(),
        fleet_id: String::new(),
    }
}

/// The `seq` of every `TelemetryEnvelope` record, sorted (duplicates kept).
pub fn sorted_seqs(records: &[rdkafka::message::OwnedMessage]) -> Vec<u64> {
    let mut seqs: Vec<u64> = records
        .iter()
        .map(|r| {
            fleetgate_test_support::decode::<fleetgate_proto::TelemetryEnvelope>(r)
                .expect("events topic holds TelemetryEnvelope records")
                .event
                .expect("envelope carries its event")
                .seq
        })
        .collect();
    seqs.sort_unstable();
    seqs
}

pub fn verdicts(ack: &BatchAck) -> Vec<(Verdict, String)> {
    ack.events
        .iter()
        .map(|e| (e.verdict(), e.reason.clone()))
        .collect()
}

pub fn all_accepted(ack: &BatchAck) -> bool {
    ack.batch_verdict() == Verdict::Accepted
        && ack.events.iter().all(|e| e.verdict() == Verdict::Accepted)
}

/// Every event acknowledged as an already-stored duplicate (accepted, never republished).
pub fn all_duplicates(ack: &BatchAck) -> bool {
    !ack.events.is_empty()
        && ack
            .events
            .iter()
            .all(|e| e.verdict() == Verdict::Accepted && e.reason == "duplicate")
}

/// QUIC counterparts of [`Stack::device`] and [`Stack::connect`].
impl Stack {
    pub async fn quic_device(&self, fleet: &str, device: &str) -> fleetgate_client::QuicDevice {
        let issued = self.pki.device(fleet, device);
        self.quic_connect(Some(&issued))
            .await
            .expect("device connects over QUIC")
    }

    pub async fn quic_connect(
        &self,
        issued: Option<&Issued>,
    ) -> Result<fleetgate_client::QuicDevice, fleetgate_client::ClientError> {
        fleetgate_client::QuicDevice::connect(self.ingest.quic, &client_tls(&self.pki, issued))
            .await
    }
}

/// The device-facing transports; the conformance suite runs every test on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Grpc,
    Quic,
}

impl Wire {
    /// The `transport` label on metrics, provenance and record headers.
    pub fn label(self) -> &'static str {
        match self {
            Wire::Grpc => "grpc",
            Wire::Quic => "quic",
        }
    }
}

/// A device connected over either transport.
pub enum AnyDevice {
    Grpc(GrpcDevice),
    Quic(fleetgate_client::QuicDevice),
}

impl AnyDevice {
    pub async fn send(&mut self, batch: &TelemetryBatch) -> Result<BatchAck, ClientError> {
        match self {
            AnyDevice::Grpc(d) => d.send(batch).await,
            AnyDevice::Quic(d) => d.send(batch).await,
        }
    }

    pub async fn send_raw(&mut self, frame: bytes::Bytes) -> Result<BatchAck, ClientError> {
        match self {
            AnyDevice::Grpc(d) => d.send_raw(frame).await,
            AnyDevice::Quic(d) => d.send_raw(frame).await,
        }
    }

    /// Closes a QUIC connection politely; a gRPC device is simply dropped.
    pub async fn close(self) {
        if let AnyDevice::Quic(d) = self {
            d.close().await;
        }
    }
}

/// Transport-generic counterparts of [`Stack::device`] and [`Stack::connect`].
impl Stack {
    pub async fn device_on(&self, wire: Wire, fleet: &str, device: &str) -> AnyDevice {
        let issued = self.pki.device(fleet, device);
        self.connect_on(wire, Some(&issued))
            .await
            .unwrap_or_else(|e| panic!("device connects over {}: {e}", wire.label()))
    }

    pub async fn connect_on(
        &self,
        wire: Wire,
        issued: Option<&Issued>,
    ) -> Result<AnyDevice, ClientError> {
        match wire {
            Wire::Grpc => self.connect(issued).await.map(AnyDevice::Grpc),
            Wire::Quic => self.quic_connect(issued).await.map(AnyDevice::Quic),
        }
    }

    /// A series of `name` restricted to `wire`'s transport label (plus `labels`).
    pub fn metric_on(&self, wire: Wire, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut all = vec![("transport", wire.label())];
        all.extend_from_slice(labels);
        self.ingest.metric(name, &all).expect("metrics scrape")
    }

    /// Handshakes on `wire` with any outcome other than `ok`.
    pub fn handshake_refusals(&self, wire: Wire) -> f64 {
        let total = self.metric_on(wire, "fleetgate_handshakes_total", &[]);
        total - self.metric_on(wire, "fleetgate_handshakes_total", &[("outcome", "ok")])
    }
}

/// Polls `f` (every 100 ms, up to 5 s) until it returns at least `min`; returns the
/// last value. Server-side counters may lag what the client already observed.
pub async fn eventually_at_least(min: f64, mut f: impl FnMut() -> f64) -> f64 {
    let mut v = f();
    for _ in 0..50 {
        if v >= min {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        v = f();
    }
    v
}
