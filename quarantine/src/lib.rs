//! Quarantine registry for fleetgate: decisions on `fleet.quarantine.v1` (key
//! `<fleet>/<device>`, latest record per key wins) folded into per-device state that
//! ingest enforces, operator signatures that make each manual decision attributable,
//! and the Kafka adapters both ingest and the `fleetgate-quarantine` CLI use.
//!
//! [`registry`] and [`signing`] are pure (time is a parameter); [`kafka`] does the I/O.

pub mod kafka;
pub mod registry;
pub mod signing;

pub use kafka::{
    client_config, load, publish, KafkaIoError, Publisher, ReadOptions, RecordError, RecordValue,
    TopicReader, TopicRecord, DEFAULT_TOPIC,
};
pub use registry::{
    is_active, key, validate, History, InvalidDecision, ListFilter, Position, Registry,
};
pub use signing::{
    operator_of, parse_operator_uri, sign, signed_bytes, verify, NotOperator, OperatorId,
    SignError, Signer, SignerIdentity, Verifier, VerifyError, OPERATOR_PREFIX,
};
