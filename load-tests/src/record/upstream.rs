//! The recorder's side towards the real ingest: each device is forwarded on a
//! connection of its own, authenticated with that device's certificate from the
//! load-tester's PKI dir (`devices/<fleet>/<device>.{pem,key}`, or issued in memory
//! from `ca.pem` + `ca.key` when missing, as `replay` does), so ingest sees the same
//! identity it would have seen without the recorder. Frames and acks travel as raw
//! bytes: what the device sent is what ingest gets, and ingest's ack reaches the
//! device byte for byte.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use fleetgate_client::{ClientTls, QuicDevice};
use fleetgate_pki::{DevCa, DeviceCertSpec, LoadedCa};
use http::uri::PathAndQuery;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Status, Streaming};

/// Frames a forwarded gRPC stream may have queued towards ingest.
const UPSTREAM_QUEUE: usize = 16;
/// Largest ack accepted from ingest over QUIC (acks are one entry per event).
pub const MAX_ACK_BYTES: usize = 4 * 1024 * 1024;

/// A device's certificate and key (PEM).
#[derive(Debug)]
pub struct DeviceCredentials {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Why a device's credentials could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no certificate for {fleet}/{device} in {dir} and no CA (ca.pem + ca.key) to issue one: {detail}")]
    NoCa {
        fleet: String,
        device: String,
        dir: PathBuf,
        detail: String,
    },
    #[error("issuing a certificate for {fleet}/{device}: {detail}")]
    Issue {
        fleet: String,
        device: String,
        detail: String,
    },
}

/// Credentials per device, read or issued once and kept for the recorder's life.
pub struct CredentialStore {
    pki_dir: PathBuf,
    fleet: String,
    trust_domain: String,
    state: Mutex<CredState>,
}

#[derive(Default)]
struct CredState {
    ca: Option<LoadedCa>,
    by_device: HashMap<String, Arc<DeviceCredentials>>,
    issued: u64,
}

impl CredentialStore {
    pub fn new(pki_dir: &Path, fleet: &str, trust_domain: &str) -> Self {
        Self {
            pki_dir: pki_dir.to_owned(),
            fleet: fleet.to_owned(),
            trust_domain: trust_domain.to_owned(),
            state: Mutex::new(CredState::default()),
        }
    }

    /// How many certificates were issued in memory so far.
    pub fn issued(&self) -> u64 {
        self.lock().issued
    }

    /// The credentials of `device` (synchronous: a file read or one signature).
    pub fn get(&self, device: &str) -> Result<Arc<DeviceCredentials>, CredentialError> {
        let mut state = self.lock();
        if let Some(c) = state.by_device.get(device) {
            return Ok(c.clone());
        }
        let dir = self.pki_dir.join("devices").join(&self.fleet);
        let (cert, key) = (
            dir.join(format!("{device}.pem")),
            dir.join(format!("{device}.key")),
        );
        let creds = if cert.is_file() && key.is_file() {
            let read = |p: &Path| {
                std::fs::read_to_string(p).map_err(|source| CredentialError::Read {
                    path: p.to_owned(),
                    source,
                })
            };
            DeviceCredentials {
                cert_pem: read(&cert)?,
                key_pem: read(&key)?,
            }
        } else {
            if state.ca.is_none() {
                state.ca = Some(
                    DevCa::load(&self.pki_dir).map_err(|e| CredentialError::NoCa {
                        fleet: self.fleet.clone(),
                        device: device.to_owned(),
                        dir: dir.clone(),
                        detail: e.to_string(),
                    })?,
                );
            }
            let spec = DeviceCertSpec::new(&self.trust_domain, &self.fleet, device);
            let issued = state
                .ca
                .as_ref()
                .expect("loaded just above")
                .issue_device(&spec)
                .map_err(|e| CredentialError::Issue {
                    fleet: self.fleet.clone(),
                    device: device.to_owned(),
                    detail: e.to_string(),
                })?;
            state.issued += 1;
            DeviceCredentials {
                cert_pem: issued.cert_pem,
                key_pem: issued.key_pem,
            }
        };
        let creds = Arc::new(creds);
        state.by_device.insert(device.to_owned(), creds.clone());
        Ok(creds)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CredState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where ingest is and how its certificate is checked.
#[derive(Debug, Clone)]
pub struct UpstreamTargets {
    /// `https://host:port`
    pub grpc: Option<String>,
    pub server_ca_pem: String,
    pub server_name: String,
}

impl UpstreamTargets {
    fn tls(&self, creds: &DeviceCredentials) -> ClientTls {
        ClientTls {
            server_ca_pem: self.server_ca_pem.clone(),
            identity: Some((creds.cert_pem.clone(), creds.key_pem.clone())),
            server_name: self.server_name.clone(),
        }
    }

    /// Connects to ingest over gRPC as the device (one HTTP/2 connection, shared by
    /// the device connection's `Publish` streams, as it would be without the recorder).
    pub async fn connect_grpc(&self, creds: &DeviceCredentials) -> Result<Channel, Status> {
        let url = self
            .grpc
            .as_deref()
            .ok_or_else(|| Status::unavailable("recorder has no --upstream-grpc"))?;
        let unavailable = |e: &dyn std::fmt::Display| {
            Status::unavailable(format!("recorder: upstream ingest {url}: {e}"))
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.server_ca_pem))
            .domain_name(self.server_name.clone())
            .identity(Identity::from_pem(&creds.cert_pem, &creds.key_pem));
        Endpoint::from_shared(url.to_owned())
            .map_err(|e| unavailable(&e))?
            .tls_config(tls)
            .map_err(|e| unavailable(&e))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| unavailable(&error_chain(&e)))
    }

    /// Connects to ingest at `addr` over QUIC as the device.
    pub async fn connect_quic(
        &self,
        addr: SocketAddr,
        creds: &DeviceCredentials,
    ) -> Result<QuicDevice, fleetgate_client::ClientError> {
        QuicDevice::connect(addr, &self.tls(creds)).await
    }
}

/// Opens a `Publish` stream on `channel`: frames sent on the returned sender reach
/// ingest unchanged; ingest's acks come back undecoded.
pub async fn open_publish(
    channel: Channel,
) -> Result<(mpsc::Sender<Bytes>, Streaming<Bytes>), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("recorder: upstream ingest: {e}")))?;
    let (tx, rx) = mpsc::channel(UPSTREAM_QUEUE);
    let acks = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            PathAndQuery::from_static(fleetgate_proto::PUBLISH_PATH),
            RawCodec,
        )
        .await?
        .into_inner();
    Ok((tx, acks))
}

/// Forwards one frame on its own stream of `conn` and returns ingest's ack bytes.
pub async fn quic_exchange(
    conn: &quinn::Connection,
    frame: &[u8],
) -> Result<Vec<u8>, fleetgate_client::ClientError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    match send.write_all(frame).await {
        Ok(()) => {
            let _ = send.finish();
        }
        // Ingest refused the rest of an oversize frame; its ack says why.
        Err(quinn::WriteError::Stopped(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(recv.read_to_end(MAX_ACK_BYTES).await?)
}

/// `error: cause: cause`, since tonic's transport errors hide the useful part.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Passes messages through as bytes in both directions: the recorder neither
/// re-encodes what a device sent nor what ingest answered.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_the_pki_dir_or_are_issued_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("record test CA").unwrap();
        ca.write(dir.path()).unwrap();
        let on_disk = ca
            .issue_device(&DeviceCertSpec::new("td", "fleet-a", "car-1"))
            .unwrap();
        let devdir = dir.path().join("devices/fleet-a");
        std::fs::create_dir_all(&devdir).unwrap();
        on_disk.write(&devdir, "car-1").unwrap();

        let store = CredentialStore::new(dir.path(), "fleet-a", "td");
        assert_eq!(store.get("car-1").unwrap().cert_pem, on_disk.cert_pem);
        let issued = store.get("car-2").unwrap();
        assert_eq!(store.issued(), 1);
        assert!(Arc::ptr_eq(&issued, &store.get("car-2").unwrap()));
        assert_eq!(store.issued(), 1, "cached, not issued twice");
    }

    #[test]
    fn missing_ca_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::new(dir.path(), "fleet-a", "td");
        let err = store.get("car-9").unwrap_err().to_string();
        assert!(
            err.contains("fleet-a/car-9") && err.contains("ca.pem"),
            "{err}"
        );
    }
}
