//! Generated types of `fleetgate.telemetry.v1`, shared by ingest, clients and processors
//! so every component agrees on one schema.

#[allow(clippy::all, missing_docs)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/fleetgate.telemetry.v1.rs"));
}

pub use generated::*;

/// Encoded `FileDescriptorSet` of every schema, for gRPC reflection and schema registries.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fleetgate_descriptor.bin"));

/// gRPC service path of `Ingest/Publish`.
pub const PUBLISH_PATH: &str = "/fleetgate.telemetry.v1.Ingest/Publish";
/// Fully qualified gRPC service name.
pub const INGEST_SERVICE: &str = "fleetgate.telemetry.v1.Ingest";
