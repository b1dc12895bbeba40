//! Device-side client for fleetgate ingest: connects with the device certificate,
//! keeps one `Publish` stream open, sends batches and returns their acks in order.
//! [`QuicDevice`] does the same over QUIC (one stream per batch).
//! Used by the load generator, the demo fleet and the integration tests.

mod device;
mod quic;

pub use device::{Device, FlushReport, Target};
pub use quic::{QuicDevice, ALPN as QUIC_ALPN};

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use fleetgate_proto::{BatchAck, TelemetryBatch};
use http::uri::PathAndQuery;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Status, Streaming};

/// Why the client could not send or got no ack.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("rpc: {0}")]
    Rpc(#[from] Status),
    #[error("stream closed before the ack arrived")]
    Closed,
    #[error("no ack within {0:?}")]
    Timeout(Duration),
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("pem: {0}")]
    Pem(std::io::Error),
    #[error("no PEM {0} found")]
    NoPem(&'static str),
    #[error("TLS config has no QUIC-capable cipher suite")]
    NoQuicCipher,
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("quic connect: {0}")]
    QuicConnect(#[from] quinn::ConnectError),
    #[error("quic connection: {0}")]
    QuicConnection(#[from] quinn::ConnectionError),
    #[error("quic write: {0}")]
    QuicWrite(#[from] quinn::WriteError),
    #[error("quic read: {0}")]
    QuicRead(#[from] quinn::ReadToEndError),
    #[error("undecodable ack: {0}")]
    BadAck(#[from] prost::DecodeError),
}

/// Trust anchors and (optionally) the device's own certificate.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// PEM of the CA that signed the ingest server certificate.
    pub server_ca_pem: String,
    /// Device certificate and key (PEM); `None` connects without a client certificate.
    pub identity: Option<(String, String)>,
    /// Name the server certificate must carry.
    pub server_name: String,
}

/// One device connection with one open `Publish` stream.
pub struct GrpcDevice {
    tx: mpsc::Sender<Bytes>,
    acks: Streaming<BatchAck>,
    ack_timeout: Duration,
}

impl GrpcDevice {
    /// Connects to `endpoint` (e.g. `https://127.0.0.1:7443`) and opens the stream.
    pub async fn connect(endpoint: &str, tls: &ClientTls) -> Result<Self, ClientError> {
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&tls.server_ca_pem))
            .domain_name(tls.server_name.clone());
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        let channel: Channel = Endpoint::from_shared(endpoint.to_owned())?
            .tls_config(config)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(64);
        let response = grpc
            .streaming(
                tonic::Request::new(ReceiverStream::new(rx)),
                PathAndQuery::from_static(fleetgate_proto::PUBLISH_PATH),
                ClientCodec,
            )
            .await?;
        Ok(Self {
            tx,
            acks: response.into_inner(),
            ack_timeout: Duration::from_secs(30),
        })
    }

    /// How long [`send`](Self::send) waits for an ack.
    pub fn set_ack_timeout(&mut self, timeout: Duration) {
        self.ack_timeout = timeout;
    }

    /// Sends one batch and waits for its ack.
    pub async fn send(&mut self, batch: &TelemetryBatch) -> Result<BatchAck, ClientError> {
        self.send_raw(Bytes::from(batch.encode_to_vec())).await
    }

    /// Sends arbitrary bytes as one message (for malformed-frame tests) and waits.
    pub async fn send_raw(&mut self, frame: Bytes) -> Result<BatchAck, ClientError> {
        self.enqueue_raw(frame).await?;
        self.next_ack().await
    }

    /// Sends without waiting; pair with [`next_ack`](Self::next_ack) to pipeline.
    pub async fn enqueue_raw(&mut self, frame: Bytes) -> Result<(), ClientError> {
        self.tx.send(frame).await.map_err(|_| ClientError::Closed)
    }

    /// The next ack on the stream (acks come in send order).
    pub async fn next_ack(&mut self) -> Result<BatchAck, ClientError> {
        match tokio::time::timeout(self.ack_timeout, self.acks.message()).await {
            Err(_) => Err(ClientError::Timeout(self.ack_timeout)),
            Ok(Ok(Some(ack))) => Ok(ack),
            Ok(Ok(None)) => Err(ClientError::Closed),
            Ok(Err(status)) => Err(ClientError::Rpc(status)),
        }
    }
}

/// Sends pre-encoded bytes, decodes acks.
#[derive(Debug, Clone, Copy, Default)]
struct ClientCodec;

impl Codec for ClientCodec {
    type Encode = Bytes;
    type Decode = BatchAck;
    type Encoder = RawEncoder;
    type Decoder = AckDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> AckDecoder {
        AckDecoder
    }
}

struct RawEncoder;
impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

struct AckDecoder;
impl Decoder for AckDecoder {
    type Item = BatchAck;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<BatchAck>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        BatchAck::decode(bytes)
            .map(Some)
            .map_err(|e| Status::internal(format!("undecodable ack: {e}")))
    }
}
