//! Device side of the QUIC transport (ALPN `fleetgate/1`): one connection per device,
//! one bidirectional stream per batch (write the batch, finish, read the ack). 0-RTT
//! is never used, so nothing a device sends can be replayed by the network.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetgate_proto::{BatchAck, TelemetryBatch};
use prost::Message;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, WriteError};
use rustls::RootCertStore;

use crate::{ClientError, ClientTls};

/// The ALPN protocol id of the fleetgate QUIC interface.
pub const ALPN: &[u8] = b"fleetgate/1";

/// Acks are small (one entry per event); anything larger is not an ack.
const MAX_ACK_BYTES: usize = 4 * 1024 * 1024;

/// One device connection over QUIC; each batch travels on its own stream, so batches
/// may also be sent concurrently from clones of a shared reference.
pub struct QuicDevice {
    endpoint: Endpoint,
    conn: Connection,
    ack_timeout: Duration,
}

impl QuicDevice {
    /// Connects to `addr` with TLS 1.3, trusting only `tls.server_ca_pem` and
    /// presenting `tls.identity` when given.
    pub async fn connect(addr: SocketAddr, tls: &ClientTls) -> Result<Self, ClientError> {
        let crypto = rustls_config(tls)?;
        let crypto =
            QuicClientConfig::try_from(Arc::new(crypto)).map_err(|_| ClientError::NoQuicCipher)?;
        let endpoint = Endpoint::client(local_addr_for(addr))?;
        let conn = endpoint
            .connect_with(
                quinn::ClientConfig::new(Arc::new(crypto)),
                addr,
                &tls.server_name,
            )?
            .await?;
        Ok(Self {
            endpoint,
            conn,
            ack_timeout: Duration::from_secs(30),
        })
    }

    /// How long [`send`](Self::send) waits for an ack.
    pub fn set_ack_timeout(&mut self, timeout: Duration) {
        self.ack_timeout = timeout;
    }

    /// Sends one batch on a new stream and waits for its ack.
    pub async fn send(&self, batch: &TelemetryBatch) -> Result<BatchAck, ClientError> {
        self.send_raw(Bytes::from(batch.encode_to_vec())).await
    }

    /// Sends arbitrary bytes as one batch (for malformed-frame tests) and waits.
    pub async fn send_raw(&self, frame: Bytes) -> Result<BatchAck, ClientError> {
        let exchange = async {
            let (mut send, mut recv) = self.conn.open_bi().await?;
            match send.write_all(&frame).await {
                Ok(()) => {
                    let _ = send.finish();
                }
                // The server refused the rest of an oversize frame; its ack says why.
                Err(WriteError::Stopped(_)) => {}
                Err(e) => return Err(ClientError::from(e)),
            }
            let ack = recv.read_to_end(MAX_ACK_BYTES).await?;
            Ok(BatchAck::decode(ack.as_slice())?)
        };
        tokio::time::timeout(self.ack_timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout(self.ack_timeout))?
    }

    /// Moves the connection to a fresh local UDP socket (as after a NAT rebinding or
    /// a network change); QUIC connection migration keeps the session.
    pub fn rebind(&self) -> Result<(), ClientError> {
        let peer = self.conn.remote_address();
        self.endpoint
            .rebind(UdpSocket::bind(local_addr_for(peer))?)?;
        Ok(())
    }

    /// The underlying connection, for callers that drive streams themselves (protocol
    /// tests: slow or aborted senders).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The local UDP address currently in use.
    pub fn local_addr(&self) -> Result<SocketAddr, ClientError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Closes the connection (code 0) and waits briefly for the server to learn it.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// An ephemeral local address of `peer`'s family; loopback for a loopback peer.
fn local_addr_for(peer: SocketAddr) -> SocketAddr {
    match (peer.is_ipv6(), peer.ip().is_loopback()) {
        (false, true) => (Ipv4Addr::LOCALHOST, 0).into(),
        (false, false) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        (true, _) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

fn rustls_config(tls: &ClientTls) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = RootCertStore::empty();
    for ca in pem_certs(&tls.server_ca_pem)? {
        roots.add(ca)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut config = match &tls.identity {
        Some((cert, key)) => {
            let key = rustls_pemfile::private_key(&mut key.as_bytes())
                .map_err(ClientError::Pem)?
                .ok_or(ClientError::NoPem("private key"))?;
            builder.with_client_auth_cert(pem_certs(cert)?, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

fn pem_certs(pem: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ClientError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(ClientError::Pem)?;
    if certs.is_empty() {
        return Err(ClientError::NoPem("certificate"));
    }
    Ok(certs)
}
