//! Runtime CRL reload: revocation must not wait for a restart. The CRL file is polled;
//! when its content changes it is parsed, swapped into the handshake verifier, and
//! every open connection whose certificate serial is now revoked is told to close.
//! A file that does not parse keeps the previous list in force (and is counted).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::connection::ConnectionContext;
use crate::events;
use crate::live::LiveConnections;
use crate::reject::RejectReason;
use crate::service::BatchHandler;
use crate::tls::{load_crls, revoked_serials, SpiffeClientVerifier, TlsError};

/// Reloads `path` into `verifier` whenever its content changes, until shutdown.
pub async fn watch_crl(
    path: PathBuf,
    interval: Duration,
    verifier: Arc<SpiffeClientVerifier>,
    live: Arc<LiveConnections>,
    handler: Arc<BatchHandler>,
    mut shutdown: watch::Receiver<bool>,
) {
    // The file as loaded at start-up is the baseline; its serials are enforced already
    // at the handshake, and no connection exists yet.
    let mut loaded = digest(&path);
    if let Ok(crls) = load_crls(&path) {
        if let Ok(serials) = revoked_serials(&path, &crls) {
            events::crl_loaded(serials.len());
        }
    }
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let now = digest(&path);
        if now.is_none() || now == loaded {
            continue;
        }
        match reload(&path, &verifier, &live) {
            Ok((serials, closed)) => {
                loaded = now;
                events::crl_loaded(serials);
                tracing::info!(path = %path.display(), revoked = serials, closed = closed.len(), "CRL reloaded");
                for ctx in closed {
                    let detail = format!(
                        "certificate {} revoked by {}; connection closed",
                        ctx.identity.cert_serial,
                        path.display()
                    );
                    handler.audit_connection(&ctx, RejectReason::CertRevoked, detail);
                }
            }
            Err(e) => {
                // Retried on the next tick only if the content changes again.
                loaded = now;
                events::crl_reload_failed(&e.to_string());
            }
        }
    }
}

fn reload(
    path: &std::path::Path,
    verifier: &SpiffeClientVerifier,
    live: &LiveConnections,
) -> Result<(usize, Vec<ConnectionContext>), TlsError> {
    let crls = load_crls(path)?;
    if crls.is_empty() {
        // A truncated or half-written file must not silently un-revoke everyone; an
        // operator who wants no revocations publishes an empty CRL.
        return Err(TlsError::BadCrl {
            path: path.to_owned(),
            detail: "no CRL in file".into(),
        });
    }
    let serials = revoked_serials(path, &crls)?;
    verifier.set_crls(crls)?;
    let closed = live.close_revoked(&serials);
    Ok((serials.len(), closed))
}

fn digest(path: &std::path::Path) -> Option<[u8; 32]> {
    std::fs::read(path).ok().map(|b| Sha256::digest(&b).into())
}
