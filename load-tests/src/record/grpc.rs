//! The recorder's gRPC face: the same `fleetgate.telemetry.v1.Ingest/Publish` devices
//! use against ingest, over TLS 1.3 with the device certificate checked by ingest's own
//! verifier. Each device connection gets one connection of its own to ingest, and each
//! `Publish` stream a stream on it: a frame is recorded when it is read, then
//! forwarded; ingest's acks come back unchanged and in order.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OnceCell};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::transport::server::Connected;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::upstream::{open_publish, RawCodec};
use super::Recorder;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Acks relayed to one device that it has not read yet.
const ACK_QUEUE: usize = 16;

/// Accepts TCP connections and completes TLS handshakes concurrently until `stop`.
/// A refused handshake (no certificate, unknown CA, foreign trust domain) is logged
/// and the connection dropped, as ingest does.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<Result<DeviceConn, io::Error>> {
    let (tx, rx) = mpsc::channel::<Result<DeviceConn, io::Error>>(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = super::stopped(&mut stop) => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        eprintln!("record: grpc accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(io)) => {
                        let certs = io.get_ref().1.peer_certificates().map(|c| c.to_vec());
                        let info = ConnInfo {
                            remote,
                            certs: certs.map(Arc::from),
                            upstream: Arc::new(OnceCell::new()),
                        };
                        let _ = tx.send(Ok(DeviceConn { io, info })).await;
                    }
                    Ok(Err(e)) => eprintln!("record: grpc handshake from {remote} refused: {e}"),
                    Err(_) => eprintln!("record: grpc handshake from {remote} timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// What the service learns about the connection a stream came on. The upstream
/// connection lives in it: one per device connection, opened by its first stream and
/// closed when the device connection and its streams are gone.
#[derive(Clone)]
pub struct ConnInfo {
    remote: SocketAddr,
    certs: Option<Arc<[CertificateDer<'static>]>>,
    upstream: Arc<OnceCell<Channel>>,
}

/// An accepted device connection (TLS done, identity not yet checked).
pub struct DeviceConn {
    io: TlsStream<TcpStream>,
    info: ConnInfo,
}

impl Connected for DeviceConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for DeviceConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for DeviceConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
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
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The `Ingest` service as the recorder offers it.
#[derive(Clone)]
pub struct RecordService(pub Arc<Recorder>);

impl NamedService for RecordService {
    const NAME: &'static str = fleetgate_proto::INGEST_SERVICE;
}

impl<B> tower_service::Service<http::Request<B>> for RecordService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let svc = self.clone();
        Box::pin(async move {
            if req.uri().path() != fleetgate_proto::PUBLISH_PATH {
                return Ok(Status::unimplemented("unknown method").into_http());
            }
            let mut grpc = Grpc::new(RawCodec).max_decoding_message_size(svc.0.max_frame_bytes);
            Ok(grpc.streaming(PublishRelay(svc.0), req).await)
        })
    }
}

struct PublishRelay(Arc<Recorder>);

impl StreamingService<Bytes> for PublishRelay {
    type Response = Bytes;
    type ResponseStream = ReceiverStream<Result<Bytes, Status>>;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let rec = self.0.clone();
        Box::pin(async move {
            let conn = request
                .extensions()
                .get::<ConnInfo>()
                .cloned()
                .ok_or_else(|| Status::unauthenticated("no device identity"))?;
            let device = rec
                .admit(conn.certs.as_deref(), "grpc", &conn.remote.to_string())
                .map_err(Status::permission_denied)?;
            let channel = conn
                .upstream
                .get_or_try_init(|| async {
                    let creds = rec.credentials_for(&device).map_err(Status::unavailable)?;
                    rec.upstream.connect_grpc(&creds).await.inspect_err(|s| {
                        rec.upstream_failed(&device, s.message());
                    })
                })
                .await?
                .clone();
            let (up_tx, up_acks) = open_publish(channel).await.inspect_err(|s| {
                rec.upstream_failed(&device, s.message());
            })?;
            let (tx, rx) = mpsc::channel(ACK_QUEUE);
            tokio::spawn(relay(rec, device, request.into_inner(), up_tx, up_acks, tx));
            Ok(Response::new(ReceiverStream::new(rx)))
        })
    }
}

/// Records and forwards the device's frames until it ends the stream, the stream
/// fails, or the recorder stops (then nothing new is read; acks of what was forwarded
/// still come back, and the device retries the rest elsewhere).
async fn relay(
    rec: Arc<Recorder>,
    device: String,
    mut input: Streaming<Bytes>,
    up_tx: mpsc::Sender<Bytes>,
    mut up_acks: Streaming<Bytes>,
    tx: mpsc::Sender<Result<Bytes, Status>>,
) {
    let acks = tokio::spawn(async move {
        loop {
            match up_acks.message().await {
                Ok(Some(ack)) => {
                    if tx.send(Ok(ack)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(status) => {
                    // Ingest's own refusal reaches the device as ingest sent it.
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
        }
    });
    let mut stop = rec.stop.clone();
    loop {
        let msg = tokio::select! {
            _ = super::stopped(&mut stop) => break,
            m = input.message() => m,
        };
        match msg {
            Ok(Some(frame)) => {
                if rec.capture(&device, &frame).await.is_err() {
                    break;
                }
                if up_tx.send(frame).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(status) => {
                eprintln!("record: grpc stream of {device} failed: {status}");
                break;
            }
        }
    }
    // Ends the upstream request stream; ingest answers what it has, then ends.
    drop(up_tx);
    let _ = acks.await;
}
