//! gRPC transport: `fleetgate.telemetry.v1.Ingest/Publish` over HTTP/2 and TLS 1.3.
//! A thin adapter: it accepts mTLS connections (identity fixed at the handshake), hands
//! each raw message to the shared [`BatchHandler`], and streams acks back in order.
//! Messages reach the pipeline undecoded so a bad frame gets a reason code in its ack
//! and the stream keeps working.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use fleetgate_proto::BatchAck;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};

use crate::connection::{ConnectionContext, SessionState, Transport};
use crate::events;
use crate::live::{admit, close_requested, CloseReason, LiveConnections, Registration};
use crate::service::BatchHandler;
use crate::tls::{peer_identity, refusal_label};

/// gRPC listener settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    pub listen: SocketAddr,
    /// Batches of one stream being processed at once; beyond it ingest stops reading
    /// the stream and HTTP/2 flow control pushes back on the device.
    pub max_in_flight_batches_per_stream: usize,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; further connections wait in the accept queue.
    pub max_concurrent_handshakes: usize,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7443".parse().expect("literal address"),
            max_in_flight_batches_per_stream: 16,
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_handshakes: 256,
        }
    }
}

/// Frames up to this many times the pipeline's limit are read and answered with
/// `frame_too_large`; beyond it the stream is failed without buffering further.
const HARD_FRAME_FACTOR: usize = 4;

/// Decodes requests to raw bytes (the pipeline decodes) and encodes acks with prost.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawBatchCodec;

impl Codec for RawBatchCodec {
    type Encode = BatchAck;
    type Decode = Bytes;
    type Encoder = AckEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> Self::Encoder {
        AckEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

#[derive(Debug)]
pub struct AckEncoder;
impl Encoder for AckEncoder {
    type Item = BatchAck;
    type Error = Status;
    fn encode(&mut self, item: BatchAck, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding ack: {e}")))
    }
}

#[derive(Debug)]
pub struct RawDecoder;
impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The `Ingest` service.
#[derive(Clone)]
pub struct IngestService {
    handler: Arc<BatchHandler>,
    max_in_flight: usize,
    shutdown: watch::Receiver<bool>,
}

impl IngestService {
    pub fn new(
        handler: Arc<BatchHandler>,
        max_in_flight: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            handler,
            max_in_flight: max_in_flight.max(1),
            shutdown,
        }
    }
}

impl NamedService for IngestService {
    const NAME: &'static str = fleetgate_proto::INGEST_SERVICE;
}

impl<B> tower_service::Service<http::Request<B>> for IngestService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let svc = self.clone();
        Box::pin(async move {
            if req.uri().path() != fleetgate_proto::PUBLISH_PATH {
                return Ok(Status::unimplemented("unknown method").into_http());
            }
            let hard_cap = svc.handler.pipeline().limits().max_frame_bytes * HARD_FRAME_FACTOR;
            let mut grpc = Grpc::new(RawBatchCodec).max_decoding_message_size(hard_cap);
            Ok(grpc.streaming(PublishCall(svc), req).await)
        })
    }
}

struct PublishCall(IngestService);

impl StreamingService<Bytes> for PublishCall {
    type Response = BatchAck;
    type ResponseStream = ReceiverStream<Result<BatchAck, Status>>;
    type Future = futures::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let Some(conn) = request.extensions().get::<ConnectionContext>().cloned() else {
            return futures::future::ready(Err(Status::unauthenticated("no device identity")));
        };
        let (tx, rx) = mpsc::channel(self.0.max_in_flight);
        tokio::spawn(run_stream(self.0.clone(), conn, request.into_inner(), tx));
        futures::future::ready(Ok(Response::new(ReceiverStream::new(rx))))
    }
}

/// Reads batches, keeps at most `max_in_flight` awaiting Kafka, sends acks in order.
/// On shutdown it stops reading, drains what is in flight, and ends the stream.
async fn run_stream(
    svc: IngestService,
    conn: ConnectionContext,
    mut input: Streaming<Bytes>,
    tx: mpsc::Sender<Result<BatchAck, Status>>,
) {
    let mut session = SessionState::default();
    let mut pending = FuturesOrdered::new();
    let mut input_open = true;
    let mut shutdown = svc.shutdown.clone();
    let mut failure: Option<Status> = None;
    loop {
        tokio::select! {
            biased;
            Some(ack) = pending.next(), if !pending.is_empty() => {
                if tx.send(Ok(ack)).await.is_err() {
                    // The device went away; its unacked events are retried by it.
                    return;
                }
            }
            _ = shutdown.changed(), if input_open => {
                input_open = false;
            }
            msg = input.message(), if input_open && pending.len() < svc.max_in_flight => {
                match msg {
                    Ok(Some(frame)) => {
                        let received_at_ms = crate::clock::unix_ms_now();
                        pending.push_back(svc.handler.submit(&conn, &mut session, &frame, received_at_ms));
                    }
                    Ok(None) => input_open = false,
                    Err(status) => {
                        tracing::info!(connection = %conn.connection_id, %status, "publish stream failed");
                        input_open = false;
                        failure = Some(status);
                    }
                }
            }
            else => break,
        }
    }
    if let Some(status) = failure {
        let _ = tx.send(Err(status)).await;
    }
}

/// An accepted, authenticated TLS connection; decrements the open gauge on drop.
/// Reads and writes fail once ingest asked for the connection to close (revoked
/// certificate, cloned credential), which makes the HTTP/2 server drop it.
pub struct DeviceConn {
    io: TlsStream<TcpStream>,
    ctx: ConnectionContext,
    _registration: Registration,
    close: Pin<Box<dyn std::future::Future<Output = CloseReason> + Send>>,
    closed: Option<CloseReason>,
}

impl DeviceConn {
    fn check_closed(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.closed.is_none() {
            if let Poll::Ready(reason) = self.close.as_mut().poll(cx) {
                events::connection_closed_by_ingest(&self.ctx, reason);
                self.closed = Some(reason);
            }
        }
        match self.closed {
            Some(reason) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                reason.as_str(),
            )),
            None => Ok(()),
        }
    }
}

impl Drop for DeviceConn {
    fn drop(&mut self) {
        events::connection_closed(Transport::Grpc);
    }
}

impl Connected for DeviceConn {
    type ConnectInfo = ConnectionContext;
    fn connect_info(&self) -> ConnectionContext {
        self.ctx.clone()
    }
}

impl AsyncRead for DeviceConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_closed(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for DeviceConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_closed(cx)?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_closed(cx)?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently (bounded),
/// yielding only connections whose certificate named a device.
/// What turns an authenticated TLS stream into a registered device connection.
pub struct Admission {
    pub trust_domain: String,
    pub node_id: Arc<str>,
    pub live: Arc<LiveConnections>,
    pub handler: Arc<BatchHandler>,
}

pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    admission: Admission,
    cfg: GrpcConfig,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverStream<Result<DeviceConn, io::Error>> {
    let Admission {
        trust_domain,
        node_id,
        live,
        handler,
    } = admission;
    let (tx, rx) = mpsc::channel(cfg.max_concurrent_handshakes.max(1));
    let permits = Arc::new(tokio::sync::Semaphore::new(
        cfg.max_concurrent_handshakes.max(1),
    ));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = shutdown.changed() => break,
                p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
            };
            let (tcp, remote) = tokio::select! {
                _ = shutdown.changed() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            if let Err(refusal) = handler.admission().gate.try_handshake(remote.ip()) {
                // Dropped before any TLS work: a handshake flood costs one accept each.
                events::handshake(Transport::Grpc, refusal.code());
                continue;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let trust_domain = trust_domain.clone();
            let node_id = node_id.clone();
            let timeout = cfg.handshake_timeout;
            let (live, handler) = (live.clone(), handler.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let outcome = tokio::time::timeout(timeout, acceptor.accept(tcp)).await;
                let tls = match outcome {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        let label = refusal_label(&e);
                        events::handshake(Transport::Grpc, label);
                        tracing::info!(%remote, reason = label, error = %e, "handshake refused");
                        return;
                    }
                    Err(_) => {
                        events::handshake(Transport::Grpc, "timeout");
                        return;
                    }
                };
                let identity =
                    match peer_identity(tls.get_ref().1.peer_certificates(), &trust_domain) {
                        Ok(id) => id,
                        Err(e) => {
                            // The verifier already enforced this; kept as a second lock.
                            events::handshake(Transport::Grpc, e.as_str());
                            return;
                        }
                    };
                events::handshake(Transport::Grpc, "ok");
                let mut ctx = ConnectionContext::new(identity, Transport::Grpc, &node_id, remote);
                let Some(registration) = admit(&live, &handler, &mut ctx) else {
                    // Refused by the clone policy: the TLS stream is dropped unserved.
                    return;
                };
                events::connection_opened(Transport::Grpc);
                tracing::debug!(%remote, device = %ctx.identity.device_id, connection = %ctx.connection_id, "connected");
                let mut closed = registration.closed.clone();
                let close = Box::pin(async move { close_requested(&mut closed).await });
                let conn = DeviceConn {
                    io: tls,
                    ctx,
                    _registration: registration,
                    close,
                    closed: None,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
