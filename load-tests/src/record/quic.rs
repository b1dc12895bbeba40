//! The recorder's QUIC face (ALPN `fleetgate/1`, endpoint built by ingest's own
//! `quic::bind`, so 0-RTT is refused and the device certificate is checked by ingest's
//! verifier). Each device connection gets a connection of its own to ingest; each
//! device stream (one batch) is read whole, recorded, forwarded on its own upstream
//! stream, and answered with ingest's ack bytes.
//!
//! Close codes sent to devices, beyond ingest's (`0` shutdown, `0x11` frame too large,
//! `0x12` refused: wrong ALPN, no identity, or a device of another fleet):
//! `0x20` upstream ingest unreachable or lost. When ingest closes the upstream
//! connection with an application code (revoked, cloned credential) the device's
//! connection is closed with that same code and reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::HandshakeData;
use quinn::{ConnectionError, Endpoint, Incoming, ReadToEndError, RecvStream, SendStream, VarInt};
use tokio::task::JoinSet;
use tokio_rustls::rustls::pki_types::CertificateDer;

use super::upstream::quic_exchange;
use super::Recorder;

const CODE_SHUTDOWN: u32 = 0;
const CODE_READ_TIMEOUT: u32 = 0x10;
const CODE_FRAME_TOO_LARGE: u32 = 0x11;
const CODE_REFUSED: u32 = 0x12;
const CODE_UPSTREAM: u32 = 0x20;

/// A device must finish sending its batch within this time (ingest's default).
const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts device connections until the recorder stops, then lets streams in
/// flight finish and closes the endpoint. The caller bounds the wait.
pub async fn serve(endpoint: Endpoint, rec: Arc<Recorder>, upstream: SocketAddr) {
    let mut connections = JoinSet::new();
    let mut stop = rec.stop.clone();
    loop {
        tokio::select! {
            _ = super::stopped(&mut stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                connections.spawn(run_connection(incoming, rec.clone(), upstream));
            }
        }
    }
    endpoint.set_server_config(None);
    while connections.join_next().await.is_some() {}
    endpoint.close(VarInt::from_u32(CODE_SHUTDOWN), b"shutdown");
    endpoint.wait_idle().await;
}

async fn run_connection(incoming: Incoming, rec: Arc<Recorder>, upstream: SocketAddr) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("record: quic handshake from {remote} refused: {e}");
            return;
        }
    };
    let alpn_ok = conn
        .handshake_data()
        .and_then(|d| d.downcast::<HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == fleetgate_client::QUIC_ALPN);
    if !alpn_ok {
        eprintln!("record: quic connection from {remote} refused: ALPN is not fleetgate/1");
        conn.close(VarInt::from_u32(CODE_REFUSED), b"alpn");
        return;
    }
    let certs = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok());
    let device = match rec.admit(
        certs.as_deref().map(Vec::as_slice),
        "quic",
        &remote.to_string(),
    ) {
        Ok(d) => d,
        Err(reason) => {
            conn.close(VarInt::from_u32(CODE_REFUSED), reason.as_bytes());
            return;
        }
    };
    let up = match rec.credentials_for(&device) {
        Ok(creds) => rec
            .upstream
            .connect_quic(upstream, &creds)
            .await
            .map_err(|e| super::upstream::error_chain(&e)),
        Err(e) => Err(e),
    };
    let up = match up {
        Ok(up) => up,
        Err(e) => {
            rec.upstream_failed(&device, &e);
            conn.close(
                VarInt::from_u32(CODE_UPSTREAM),
                b"upstream ingest unavailable",
            );
            return;
        }
    };
    let up_conn = up.connection().clone();
    let mut streams = JoinSet::new();
    let mut stop = rec.stop.clone();
    loop {
        tokio::select! {
            _ = super::stopped(&mut stop) => break,
            lost = up_conn.closed() => {
                let (code, reason) = match &lost {
                    ConnectionError::ApplicationClosed(c) => (c.error_code, c.reason.to_vec()),
                    _ => (VarInt::from_u32(CODE_UPSTREAM), b"upstream ingest lost".to_vec()),
                };
                rec.upstream_failed(&device, &lost.to_string());
                conn.close(code, &reason);
                break;
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(run_stream(rec.clone(), device.clone(), up_conn.clone(), send, recv));
                }
                // The device closed or lost its connection.
                Err(_) => break,
            },
        }
    }
    while streams.join_next().await.is_some() {}
    if *rec.stop.borrow() {
        conn.close(VarInt::from_u32(CODE_SHUTDOWN), b"shutdown");
    }
    up.close().await;
}

async fn run_stream(
    rec: Arc<Recorder>,
    device: String,
    up: quinn::Connection,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let read =
        tokio::time::timeout(STREAM_READ_TIMEOUT, recv.read_to_end(rec.max_frame_bytes)).await;
    let frame = match read {
        Ok(Ok(frame)) => frame,
        Ok(Err(ReadToEndError::TooLong)) => {
            eprintln!(
                "record: quic frame of {device} over --max-frame-bytes {}: refused, not forwarded",
                rec.max_frame_bytes
            );
            let _ = recv.stop(VarInt::from_u32(CODE_FRAME_TOO_LARGE));
            let _ = send.reset(VarInt::from_u32(CODE_FRAME_TOO_LARGE));
            return;
        }
        Ok(Err(_)) => {
            // Reset or lost mid-batch: nothing complete arrived, nothing is recorded.
            let _ = send.reset(VarInt::from_u32(CODE_SHUTDOWN));
            return;
        }
        Err(_) => {
            let _ = recv.stop(VarInt::from_u32(CODE_READ_TIMEOUT));
            let _ = send.reset(VarInt::from_u32(CODE_READ_TIMEOUT));
            return;
        }
    };
    if rec.capture(&device, &frame).await.is_err() {
        let _ = send.reset(VarInt::from_u32(CODE_SHUTDOWN));
        return;
    }
    let ack = match quic_exchange(&up, &frame).await {
        Ok(ack) => ack,
        Err(e) => {
            // No ack from ingest: the device gets none either and retries.
            eprintln!("record: forwarding a quic batch of {device} failed: {e}");
            let _ = send.reset(VarInt::from_u32(CODE_UPSTREAM));
            return;
        }
    };
    if send.write_all(&ack).await.is_err() {
        return;
    }
    let _ = send.finish();
    // Bounded wait until the device has the ack, so a stop right after does not cut it.
    let _ = tokio::time::timeout(STREAM_READ_TIMEOUT, send.stopped()).await;
}
