//! The recorder's side towards the real ingest: each device is forwarded on a
//! connection of its own, authenticated with that device's certificate from the
//! load-tester's PKI dir (`devices/<fleet>/<device>.{pem,key}`, or issued in memory
//! from `ca.pem` + `ca.key` when missing: `crate::credentials`), so ingest sees the same
//! identity it would have seen without the recorder. Frames and acks travel as raw
//! bytes: what the device sent is what ingest gets, and ingest's ack reaches the
//! device byte for byte.

use std::net::SocketAddr;
use std::time::Duration;

use crate::credentials::DeviceCredentials;
use bytes::{Buf, BufMut, Bytes};
use fleetgate_client::{ClientTls, QuicDevice};
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
