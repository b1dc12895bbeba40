//! QUIC transport (ALPN `fleetgate/1`): a thin adapter around the shared
//! [`BatchHandler`]. Guarantees: identity is fixed by the mTLS handshake (0-RTT is
//! refused, it is replayable); each bidirectional stream carries exactly one
//! `TelemetryBatch` and gets exactly one `BatchAck`; a stream never buffers more than
//! `limits.max_frame_bytes + 1` bytes; a slow sender is reset after
//! `stream_read_timeout`; on shutdown no new connection or stream is taken and
//! in-flight streams are answered before the endpoint closes.
//!
//! Application error codes sent to devices: `0` shutdown, `0x10` stream read timeout,
//! `0x11` frame too large (STOP_SENDING on the rest of the frame, ack still sent),
//! `0x12` missing or wrong ALPN / identity, `0x13` certificate revoked while connected,
//! `0x14` cloned credential (another connection of the same identity won).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use prost::Message;
use quinn::crypto::rustls::{HandshakeData, QuicServerConfig};
use quinn::{ConnectionError, Endpoint, Incoming, ReadError, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use rustls::AlertDescription;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::connection::{ConnectionContext, SessionState, Transport};
use crate::events;
use crate::live::{admit, close_requested, CloseReason, LiveConnections};
use crate::service::BatchHandler;
use crate::tls::peer_identity;

/// The ALPN protocol id devices must offer.
pub const ALPN: &[u8] = b"fleetgate/1";

const CODE_SHUTDOWN: u32 = 0;
const CODE_READ_TIMEOUT: u32 = 0x10;
const CODE_FRAME_TOO_LARGE: u32 = 0x11;
const CODE_REFUSED: u32 = 0x12;
const CODE_CERT_REVOKED: u32 = 0x13;
const CODE_CLONED_CREDENTIAL: u32 = 0x14;

/// QUIC listener settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicConfig {
    pub listen: SocketAddr,
    /// Batches (streams) a device may have open at once; QUIC flow control makes the
    /// device wait beyond it.
    pub max_concurrent_streams_per_connection: u32,
    /// A connection with no traffic (keep-alives included) for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Server-side keep-alive, so NAT bindings of quiet devices survive.
    #[serde(with = "humantime_serde")]
    pub keep_alive_interval: Duration,
    /// Connections (handshaking included) beyond this are refused at once.
    pub max_connections: usize,
    /// A device must finish sending its batch within this time, or the stream is reset.
    #[serde(with = "humantime_serde")]
    pub stream_read_timeout: Duration,
    /// Kernel receive buffer of the UDP socket, in bytes. One socket takes every
    /// device's packets: the default (about 200 KiB) overflows under load and the
    /// dropped packets come back only after loss recovery (hundreds of ms). Linux caps
    /// it at `net.core.rmem_max`; a lower grant is logged at start-up. 0 keeps the
    /// kernel's default.
    pub socket_receive_buffer: usize,
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7444".parse().expect("literal address"),
            max_concurrent_streams_per_connection: 16,
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Duration::from_secs(10),
            max_connections: 10_000,
            stream_read_timeout: Duration::from_secs(10),
            socket_receive_buffer: 4 << 20,
        }
    }
}

impl QuicConfig {
    /// Checks what serde cannot; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_concurrent_streams_per_connection == 0 {
            return Err("quic.max_concurrent_streams_per_connection must be at least 1".into());
        }
        if self.max_connections == 0 {
            return Err("quic.max_connections must be at least 1".into());
        }
        if self.stream_read_timeout.is_zero() {
            return Err("quic.stream_read_timeout must be positive".into());
        }
        if self.idle_timeout.is_zero() || quinn::IdleTimeout::try_from(self.idle_timeout).is_err() {
            return Err("quic.idle_timeout must be positive and below 2^62 ms".into());
        }
        if self.keep_alive_interval >= self.idle_timeout {
            return Err("quic.keep_alive_interval must be shorter than quic.idle_timeout".into());
        }
        Ok(())
    }
}

/// Why a QUIC endpoint could not be created.
#[derive(Debug, thiserror::Error)]
pub enum QuicSetupError {
    #[error("TLS config has no QUIC-capable initial cipher suite")]
    NoInitialCipherSuite,
    #[error("quic.idle_timeout out of range")]
    IdleTimeout,
    #[error("binding quic.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds the UDP endpoint with `tls` (which must advertise [`ALPN`] and keep early
/// data disabled).
pub fn bind(cfg: &QuicConfig, tls: Arc<rustls::ServerConfig>) -> Result<Endpoint, QuicSetupError> {
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|_| QuicSetupError::NoInitialCipherSuite)?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(cfg.max_concurrent_streams_per_connection))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(cfg.idle_timeout)
                .map_err(|_| QuicSetupError::IdleTimeout)?,
        ))
        .keep_alive_interval(Some(cfg.keep_alive_interval))
        .datagram_receive_buffer_size(None);
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport));
    let bind_error = |source| QuicSetupError::Bind {
        addr: cfg.listen,
        source,
    };
    let socket = udp_socket(cfg).map_err(bind_error)?;
    Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_error)
}

/// The listening UDP socket, with the receive buffer `cfg` asks for (or the most the
/// kernel grants, logged when less).
fn udp_socket(cfg: &QuicConfig) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(cfg.listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if cfg.listen.is_ipv6() {
        // Devices may reach a `[::]` listener over IPv4 too.
        let _ = socket.set_only_v6(false);
    }
    if cfg.socket_receive_buffer > 0 {
        socket.set_recv_buffer_size(cfg.socket_receive_buffer)?;
        // Linux reports twice what it grants (bookkeeping overhead included).
        let granted = socket.recv_buffer_size()? / 2;
        if granted < cfg.socket_receive_buffer {
            tracing::warn!(
                requested = cfg.socket_receive_buffer,
                granted,
                "QUIC socket receive buffer capped by the kernel; raise net.core.rmem_max"
            );
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&cfg.listen.into())?;
    Ok(socket.into())
}

/// What every connection task needs.
struct Shared {
    handler: Arc<BatchHandler>,
    live: Arc<LiveConnections>,
    trust_domain: Arc<str>,
    node_id: Arc<str>,
    cfg: QuicConfig,
}

/// Accepts connections until `shutdown` turns true, then stops accepting, lets
/// in-flight streams finish, and closes the endpoint. The caller bounds the wait.
pub async fn serve(
    endpoint: Endpoint,
    handler: Arc<BatchHandler>,
    live: Arc<LiveConnections>,
    trust_domain: Arc<str>,
    node_id: Arc<str>,
    cfg: QuicConfig,
    shutdown: watch::Receiver<bool>,
) {
    let shared = Arc::new(Shared {
        handler,
        live,
        trust_domain,
        node_id,
        cfg,
    });
    let mut connections = JoinSet::new();
    let mut stop = shutdown.clone();
    let stopping = stop.wait_for(|s| *s);
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            _ = &mut stopping => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "quic connection task failed");
                }
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                if connections.len() >= shared.cfg.max_connections {
                    events::quic_connection_refused("max_connections");
                    incoming.refuse();
                    continue;
                }
                let ip = incoming.remote_address().ip();
                if let Err(refusal) = shared.handler.admission().gate.try_handshake(ip) {
                    events::handshake(Transport::Quic, refusal.code());
                    incoming.refuse();
                    continue;
                }
                connections.spawn(run_connection(incoming, shared.clone(), shutdown.clone()));
            }
        }
    }
    // New connection attempts are refused from here on; established ones drain.
    endpoint.set_server_config(None);
    while let Some(done) = connections.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "quic connection task failed");
        }
    }
    endpoint.close(VarInt::from_u32(CODE_SHUTDOWN), b"shutdown");
    endpoint.wait_idle().await;
}

/// Decrements the open-connections gauge however the connection task ends.
struct OpenConnection;

impl Drop for OpenConnection {
    fn drop(&mut self) {
        events::connection_closed(Transport::Quic);
    }
}

async fn run_connection(
    incoming: Incoming,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            let label = refusal_label(&e);
            events::handshake(Transport::Quic, label);
            tracing::info!(%remote, reason = label, error = %e, "quic handshake refused");
            return;
        }
    };
    let alpn_ok = conn
        .handshake_data()
        .and_then(|d| d.downcast::<HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == ALPN);
    if !alpn_ok {
        events::handshake(Transport::Quic, "alpn_mismatch");
        conn.close(VarInt::from_u32(CODE_REFUSED), b"alpn");
        return;
    }
    let certs = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok());
    let identity = match peer_identity(certs.as_deref().map(Vec::as_slice), &shared.trust_domain) {
        Ok(id) => id,
        Err(e) => {
            // The verifier already enforced this; kept as a second lock.
            events::handshake(Transport::Quic, e.as_str());
            conn.close(VarInt::from_u32(CODE_REFUSED), b"identity");
            return;
        }
    };
    events::handshake(Transport::Quic, "ok");
    let mut ctx = ConnectionContext::new(identity, Transport::Quic, &shared.node_id, remote);
    let Some(mut registration) = admit(&shared.live, &shared.handler, &mut ctx) else {
        conn.close(VarInt::from_u32(CODE_REFUSED), b"refused");
        return;
    };
    let ctx = Arc::new(ctx);
    events::connection_opened(Transport::Quic);
    let _open = OpenConnection;
    tracing::debug!(%remote, device = %ctx.identity.device_id, connection = %ctx.connection_id, "quic connected");
    // Shared by the connection's streams; only locked inside the synchronous submit.
    let session = Arc::new(Mutex::new(SessionState::default()));
    let mut streams = JoinSet::new();
    let stopping = shutdown.wait_for(|s| *s);
    tokio::pin!(stopping);
    let closed_by_us = loop {
        tokio::select! {
            _ = &mut stopping => break true,
            reason = close_requested(&mut registration.closed) => {
                events::connection_closed_by_ingest(&ctx, reason);
                let code = match reason {
                    CloseReason::CertRevoked => CODE_CERT_REVOKED,
                    CloseReason::ClonedCredential => CODE_CLONED_CREDENTIAL,
                };
                // Streams in flight are cut: their events are not acked, so the
                // device (if it is honest) retries them elsewhere.
                conn.close(VarInt::from_u32(code), reason.as_str().as_bytes());
                break false;
            }
            Some(done) = streams.join_next(), if !streams.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(connection = %ctx.connection_id, error = %e, "quic stream task failed");
                }
            }
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(run_stream(shared.clone(), ctx.clone(), session.clone(), send, recv));
                }
                Err(e) => {
                    tracing::debug!(connection = %ctx.connection_id, error = %e, "quic connection ended");
                    break false;
                }
            },
        }
    };
    while let Some(done) = streams.join_next().await {
        if let Err(e) = done {
            tracing::error!(connection = %ctx.connection_id, error = %e, "quic stream task failed");
        }
    }
    if closed_by_us {
        conn.close(VarInt::from_u32(CODE_SHUTDOWN), b"shutdown");
    }
}

/// How a stream can fail; the `kind` label of `fleetgate_quic_stream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFailure {
    /// The device did not finish its batch within `stream_read_timeout`.
    ReadTimeout,
    /// The device reset the stream before finishing the batch.
    Reset,
    /// The connection was lost mid-batch (truncated frame).
    ConnectionLost,
    /// The frame exceeded the limit; the rest was refused with STOP_SENDING.
    FrameTooLarge,
    /// The ack could not be delivered.
    WriteFailed,
    /// Any other stream read error.
    ReadFailed,
}

impl StreamFailure {
    pub const ALL: [Self; 6] = [
        Self::ReadTimeout,
        Self::Reset,
        Self::ConnectionLost,
        Self::FrameTooLarge,
        Self::WriteFailed,
        Self::ReadFailed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ReadTimeout => "read_timeout",
            Self::Reset => "reset",
            Self::ConnectionLost => "connection_lost",
            Self::FrameTooLarge => "frame_too_large",
            Self::WriteFailed => "write_failed",
            Self::ReadFailed => "read_failed",
        }
    }
}

/// A frame as read: complete, or cut at the limit (the rest was never buffered).
enum Frame {
    Complete(BytesMut),
    Oversize(BytesMut),
}

async fn run_stream(
    shared: Arc<Shared>,
    ctx: Arc<ConnectionContext>,
    session: Arc<Mutex<SessionState>>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    // One byte past the limit is enough for the pipeline to refuse (and audit) the
    // frame as `frame_too_large` exactly like on gRPC.
    let limit = shared.handler.pipeline().limits().max_frame_bytes + 1;
    let read =
        tokio::time::timeout(shared.cfg.stream_read_timeout, read_frame(&mut recv, limit)).await;
    let frame = match read {
        Ok(Ok(Frame::Complete(f))) => f,
        Ok(Ok(Frame::Oversize(prefix))) => {
            let _ = recv.stop(VarInt::from_u32(CODE_FRAME_TOO_LARGE));
            stream_failed(&ctx, StreamFailure::FrameTooLarge);
            prefix
        }
        Ok(Err(e)) => {
            let failure = match e {
                ReadError::Reset(_) => StreamFailure::Reset,
                ReadError::ConnectionLost(_) => StreamFailure::ConnectionLost,
                _ => StreamFailure::ReadFailed,
            };
            stream_failed(&ctx, failure);
            let _ = send.reset(VarInt::from_u32(CODE_SHUTDOWN));
            return;
        }
        Err(_) => {
            stream_failed(&ctx, StreamFailure::ReadTimeout);
            let _ = recv.stop(VarInt::from_u32(CODE_READ_TIMEOUT));
            let _ = send.reset(VarInt::from_u32(CODE_READ_TIMEOUT));
            return;
        }
    };
    let received_at_ms = crate::clock::unix_ms_now();
    let pending = {
        // A panic elsewhere cannot make the session unusable: its data is plain fields.
        let mut session = session.lock().unwrap_or_else(|p| p.into_inner());
        shared
            .handler
            .submit(&ctx, &mut session, &frame, received_at_ms)
    };
    let ack = pending.await.encode_to_vec();
    if let Err(e) = send.write_all(&ack).await {
        tracing::debug!(connection = %ctx.connection_id, error = %e, "quic ack not delivered");
        stream_failed(&ctx, StreamFailure::WriteFailed);
        return;
    }
    let _ = send.finish();
    // Wait (bounded) until the device has the ack, so a shutdown right after this
    // task ends does not cut it off.
    let _ = tokio::time::timeout(shared.cfg.stream_read_timeout, send.stopped()).await;
    events::quic_stream_acked();
}

/// Reads until the device finishes the stream, never holding more than `limit` bytes.
async fn read_frame(recv: &mut RecvStream, limit: usize) -> Result<Frame, ReadError> {
    let mut buf = BytesMut::new();
    loop {
        let room = limit - buf.len();
        match recv.read_chunk(room, true).await? {
            None => return Ok(Frame::Complete(buf)),
            Some(chunk) => {
                buf.extend_from_slice(&chunk.bytes);
                if buf.len() >= limit {
                    return Ok(Frame::Oversize(buf));
                }
            }
        }
    }
}

fn stream_failed(ctx: &ConnectionContext, failure: StreamFailure) {
    events::quic_stream_failed(failure);
    tracing::info!(
        device = %ctx.identity.device_id,
        connection = %ctx.connection_id,
        kind = failure.as_str(),
        "quic stream failed"
    );
}

/// Stable metric label for a failed QUIC handshake. quinn keeps only the TLS alert
/// (not the `rustls::Error`), so the label comes from the alert rustls sent.
pub fn refusal_label(err: &ConnectionError) -> &'static str {
    match err {
        ConnectionError::TransportError(te) => {
            let code = u64::from(te.code);
            if !(0x100..=0x1ff).contains(&code) {
                return "tls_error";
            }
            alert_label((code & 0xff) as u8)
        }
        ConnectionError::TimedOut => "timeout",
        ConnectionError::ConnectionClosed(_)
        | ConnectionError::ApplicationClosed(_)
        | ConnectionError::Reset => "aborted",
        _ => "tls_error",
    }
}

fn alert_label(alert: u8) -> &'static str {
    match AlertDescription::from(alert) {
        AlertDescription::CertificateRequired => "no_client_cert",
        AlertDescription::CertificateExpired => "cert_expired",
        AlertDescription::CertificateRevoked => "cert_revoked",
        AlertDescription::UnknownCA => "cert_unknown_issuer",
        AlertDescription::NoApplicationProtocol => "alpn_mismatch",
        // SpiffeClientVerifier's identity errors surface as certificate_unknown.
        AlertDescription::CertificateUnknown | AlertDescription::BadCertificate => "cert_invalid",
        AlertDescription::ProtocolVersion | AlertDescription::HandshakeFailure => "incompatible",
        _ => "tls_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        QuicConfig::default().validate().unwrap();
    }

    #[test]
    fn the_socket_gets_the_receive_buffer_asked_for() {
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(usize::MAX);
        let asked = rmem_max.min(1 << 20);
        let cfg = QuicConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            socket_receive_buffer: asked,
            ..QuicConfig::default()
        };
        let socket = socket2::Socket::from(udp_socket(&cfg).unwrap());
        assert!(socket.recv_buffer_size().unwrap() / 2 >= asked);
        assert!(
            socket.nonblocking().unwrap(),
            "quinn needs a non-blocking socket"
        );
        assert_ne!(socket.local_addr().unwrap().as_socket().unwrap().port(), 0);
    }

    #[test]
    fn bad_values_are_named() {
        let cfg = QuicConfig {
            keep_alive_interval: Duration::from_secs(60),
            ..Default::default()
        };
        assert!(cfg.validate().unwrap_err().contains("keep_alive_interval"));
        let cfg = QuicConfig {
            max_concurrent_streams_per_connection: 0,
            ..Default::default()
        };
        assert!(cfg.validate().unwrap_err().contains("streams"));
    }

    #[test]
    fn alerts_map_to_handshake_labels() {
        assert_eq!(alert_label(116), "no_client_cert");
        assert_eq!(alert_label(48), "cert_unknown_issuer");
        assert_eq!(alert_label(45), "cert_expired");
        assert_eq!(refusal_label(&ConnectionError::TimedOut), "timeout");
    }
}
