//! fleetgate ingest: authenticates devices by certificate, validates their telemetry
//! and publishes it to Kafka with provenance. `pipeline` is the pure core; `grpc` and
//! `quic` are transport adapters; `publish` is the Kafka boundary; `app` wires them.

pub mod app;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod connection;
pub mod device_state;
pub mod envelope;
pub mod events;
pub mod freshness;
pub mod grpc;
pub mod identity;
pub mod live;
pub mod pipeline;
pub mod publish;
pub mod quarantine;
pub mod quic;
pub mod quota;
pub mod reject;
pub mod replay;
pub mod revocation;
pub mod service;
pub mod tls;
