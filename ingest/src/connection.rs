//! What ingest knows about a connection: who (from the certificate), how (transport),
//! from where, and what the device reported about its session.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fleetgate_proto::SessionContext;

use crate::identity::DeviceIdentity;

/// The transport a frame arrived on; a metric label and a provenance field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Grpc,
    Quic,
}

impl Transport {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Quic => "quic",
        }
    }
}

/// Fixed facts about one authenticated connection.
#[derive(Debug, Clone)]
pub struct ConnectionContext {
    pub identity: Arc<DeviceIdentity>,
    pub transport: Transport,
    /// Unique within this node's lifetime: `<node>-<counter>`.
    pub connection_id: Arc<str>,
    pub remote_addr: SocketAddr,
    /// This connection's slot under the connection limits (none in unit tests).
    pub slot: Option<Arc<crate::quota::ConnectionPermit>>,
}

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

impl ConnectionContext {
    pub fn new(
        identity: DeviceIdentity,
        transport: Transport,
        node_id: &str,
        remote_addr: SocketAddr,
    ) -> Self {
        let n = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
        Self {
            identity: Arc::new(identity),
            transport,
            connection_id: Arc::from(format!("{node_id}-{}-{n}", transport.as_str())),
            remote_addr,
            slot: None,
        }
    }
}

/// Session facts a device reports (software version, vehicle configuration); a batch
/// that omits them inherits the last ones seen on the same stream or connection.
#[derive(Debug, Clone, Default)]
pub struct SessionState {
    pub software_version: String,
    pub vehicle_config_id: String,
}

impl SessionState {
    pub fn update(&mut self, reported: Option<&SessionContext>) {
        if let Some(s) = reported {
            if !s.software_version.is_empty() {
                self.software_version = truncate(&s.software_version, 128);
            }
            if !s.vehicle_config_id.is_empty() {
                self.vehicle_config_id = truncate(&s.vehicle_config_id, 128);
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}
