//! The connections open on this node, by device: the one place that can tell a cloned
//! credential (the same identity connected twice at once) and that can close every
//! connection of a device whose certificate was just revoked.

use std::net::SocketAddr;
use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::connection::{ConnectionContext, Transport};
use crate::identity::{DeviceId, FleetId};

/// What to do when a device identity connects while it already has a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClonePolicy {
    /// Keep the new connection, close the older ones (a device that reconnected before
    /// its old connection timed out keeps working; a clone fights for the slot and is
    /// flagged every time).
    #[default]
    AllowNewest,
    /// Refuse the new connection while an older one is open.
    RejectSecond,
}

/// Why ingest closed a connection; a metric label and the QUIC close reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    CertRevoked,
    ClonedCredential,
}

impl CloseReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::CertRevoked => "cert_revoked",
            Self::ClonedCredential => "cloned_credential",
        }
    }
}

/// One other connection of the same identity, as evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub connection_id: Arc<str>,
    pub remote_addr: SocketAddr,
    pub transport: Transport,
}

/// The same identity is connected more than once on this node.
#[derive(Debug, Clone)]
pub struct CloneSuspected {
    pub policy: ClonePolicy,
    /// The connections that were already open.
    pub existing: Vec<Peer>,
}

impl CloneSuspected {
    /// Evidence for the audit record: every connection id and remote address.
    pub fn detail(&self, newcomer: &ConnectionContext) -> String {
        let existing = self
            .existing
            .iter()
            .map(|p| {
                format!(
                    "{} from {} ({})",
                    p.connection_id,
                    p.remote_addr,
                    p.transport.as_str()
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let action = match self.policy {
            ClonePolicy::AllowNewest => "older connection(s) closed",
            ClonePolicy::RejectSecond => "new connection refused",
        };
        format!(
            "certificate {} connected as {} from {} ({}) while open as {existing}; {action}",
            newcomer.identity.cert_serial,
            newcomer.connection_id,
            newcomer.remote_addr,
            newcomer.transport.as_str(),
        )
    }
}

struct Entry {
    peer: Peer,
    ctx: ConnectionContext,
    close: watch::Sender<Option<CloseReason>>,
}

type Key = (FleetId, DeviceId);

/// Open connections by device identity.
pub struct LiveConnections {
    policy: ClonePolicy,
    devices: DashMap<Key, Vec<Entry>>,
}

/// Held by a connection task for its lifetime; dropping it unregisters the connection.
/// `closed` turns to `Some(reason)` when ingest wants the connection closed.
pub struct Registration {
    registry: Arc<LiveConnections>,
    key: Key,
    connection_id: Arc<str>,
    pub closed: watch::Receiver<Option<CloseReason>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut e) = self.registry.devices.entry(self.key.clone()) {
            e.get_mut()
                .retain(|c| c.peer.connection_id != self.connection_id);
            if e.get().is_empty() {
                e.remove();
            }
        }
    }
}

impl LiveConnections {
    pub fn new(policy: ClonePolicy) -> Arc<Self> {
        Arc::new(Self {
            policy,
            devices: DashMap::new(),
        })
    }

    /// Registers a new authenticated connection. `Ok` carries the registration and,
    /// when the identity was already connected, what was seen (older connections are
    /// told to close under `AllowNewest`). `Err` means the policy refuses this
    /// connection; nothing was registered.
    pub fn register(
        self: &Arc<Self>,
        ctx: &ConnectionContext,
    ) -> Result<(Registration, Option<CloneSuspected>), CloneSuspected> {
        let key = (
            ctx.identity.fleet_id.clone(),
            ctx.identity.device_id.clone(),
        );
        let mut entries = self.devices.entry(key.clone()).or_default();
        let suspected = (!entries.is_empty()).then(|| CloneSuspected {
            policy: self.policy,
            existing: entries.iter().map(|e| e.peer.clone()).collect(),
        });
        if let Some(seen) = &suspected {
            match self.policy {
                ClonePolicy::RejectSecond => return Err(seen.clone()),
                ClonePolicy::AllowNewest => {
                    for old in entries.iter() {
                        old.close.send_replace(Some(CloseReason::ClonedCredential));
                    }
                }
            }
        }
        let (close, closed) = watch::channel(None);
        entries.push(Entry {
            peer: Peer {
                connection_id: ctx.connection_id.clone(),
                remote_addr: ctx.remote_addr,
                transport: ctx.transport,
            },
            ctx: ctx.clone(),
            close,
        });
        drop(entries);
        Ok((
            Registration {
                registry: self.clone(),
                key,
                connection_id: ctx.connection_id.clone(),
                closed,
            },
            suspected,
        ))
    }

    /// Tells every connection whose certificate serial is in `revoked` to close.
    /// Returns the connections told (each only once).
    pub fn close_revoked(
        &self,
        revoked: &std::collections::HashSet<String>,
    ) -> Vec<ConnectionContext> {
        let mut told = Vec::new();
        for entries in self.devices.iter() {
            for e in entries.iter() {
                if revoked.contains(&e.ctx.identity.cert_serial) && e.close.borrow().is_none() {
                    e.close.send_replace(Some(CloseReason::CertRevoked));
                    told.push(e.ctx.clone());
                }
            }
        }
        told
    }

    /// The open connections of one device.
    pub fn of(&self, fleet: &FleetId, device: &DeviceId) -> Vec<Peer> {
        self.devices
            .get(&(fleet.clone(), device.clone()))
            .map(|v| v.iter().map(|e| e.peer.clone()).collect())
            .unwrap_or_default()
    }
}

/// Resolves once `closed` asks for the connection to close, with the reason.
pub async fn close_requested(closed: &mut watch::Receiver<Option<CloseReason>>) -> CloseReason {
    loop {
        if let Some(reason) = *closed.borrow_and_update() {
            return reason;
        }
        if closed.changed().await.is_err() {
            // The registry entry is gone; nothing will ever ask again.
            std::future::pending::<()>().await;
        }
    }
}

/// Admits an authenticated connection: the per-device and overall connection limits
/// (its slot goes into `ctx`), then the clone policy, auditing a suspected clone.
/// `None` when the connection must not be served.
pub fn admit(
    live: &Arc<LiveConnections>,
    handler: &crate::service::BatchHandler,
    ctx: &mut ConnectionContext,
) -> Option<Registration> {
    let id = &ctx.identity;
    crate::events::fleet_seen(id.fleet_id.as_str());
    match handler
        .admission()
        .gate
        .try_connect(id.fleet_id.as_str(), id.device_id.as_str())
    {
        Ok(slot) => ctx.slot = Some(Arc::new(slot)),
        Err(refusal) => {
            crate::events::connection_refused(ctx.transport, refusal.code());
            tracing::warn!(
                device = %id.device_id,
                fleet = %id.fleet_id,
                remote = %ctx.remote_addr,
                reason = refusal.code(),
                "connection refused by connection limits"
            );
            return None;
        }
    }
    match live.register(ctx) {
        Ok((registration, None)) => Some(registration),
        Ok((registration, Some(seen))) => {
            let detail = seen.detail(ctx);
            crate::events::cloned_credential(ctx, "closed_older", &detail);
            handler.audit_connection(ctx, crate::reject::RejectReason::ClonedCredential, detail);
            Some(registration)
        }
        Err(seen) => {
            let detail = seen.detail(ctx);
            crate::events::cloned_credential(ctx, "refused_new", &detail);
            handler.audit_connection(ctx, crate::reject::RejectReason::ClonedCredential, detail);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::DeviceIdentity;

    fn ctx(device: &str, serial: &str, port: u16) -> ConnectionContext {
        ConnectionContext::new(
            DeviceIdentity {
                device_id: DeviceId::parse(device).unwrap(),
                fleet_id: FleetId::parse("f").unwrap(),
                cert_sha256: "00".into(),
                cert_serial: serial.into(),
            },
            Transport::Quic,
            "n",
            SocketAddr::from(([127, 0, 0, 1], port)),
        )
    }

    #[test]
    fn a_second_connection_is_flagged_and_the_older_one_closed() {
        let live = LiveConnections::new(ClonePolicy::AllowNewest);
        let (first, none) = live.register(&ctx("car", "01", 1000)).unwrap();
        assert!(none.is_none());
        let second_ctx = ctx("car", "01", 2000);
        let (second, seen) = live.register(&second_ctx).unwrap();
        let seen = seen.expect("clone flagged");
        assert_eq!(seen.existing.len(), 1);
        assert_eq!(seen.existing[0].remote_addr.port(), 1000);
        let detail = seen.detail(&second_ctx);
        assert!(detail.contains("127.0.0.1:1000") && detail.contains("127.0.0.1:2000"));
        assert_eq!(*first.closed.borrow(), Some(CloseReason::ClonedCredential));
        assert_eq!(*second.closed.borrow(), None);
        drop(first);
        assert_eq!(
            live.of(
                &second_ctx.identity.fleet_id,
                &second_ctx.identity.device_id
            )
            .len(),
            1
        );
    }

    #[test]
    fn reject_second_refuses_and_registers_nothing() {
        let live = LiveConnections::new(ClonePolicy::RejectSecond);
        let c = ctx("car", "01", 1000);
        let (first, _) = live.register(&c).unwrap();
        let refused = live
            .register(&ctx("car", "01", 2000))
            .err()
            .expect("refused");
        assert_eq!(refused.existing.len(), 1);
        assert_eq!(*first.closed.borrow(), None);
        assert_eq!(
            live.of(&c.identity.fleet_id, &c.identity.device_id).len(),
            1
        );
        drop(first);
        assert!(live
            .of(&c.identity.fleet_id, &c.identity.device_id)
            .is_empty());
        assert!(live.register(&ctx("car", "01", 3000)).is_ok(), "free again");
    }

    #[test]
    fn revocation_closes_only_matching_serials() {
        let live = LiveConnections::new(ClonePolicy::AllowNewest);
        let (a, _) = live.register(&ctx("a", "0a", 1)).unwrap();
        let (b, _) = live.register(&ctx("b", "0b", 2)).unwrap();
        let revoked = ["0b".to_string()].into_iter().collect();
        assert_eq!(live.close_revoked(&revoked).len(), 1);
        assert!(live.close_revoked(&revoked).is_empty(), "told once");
        assert_eq!(*a.closed.borrow(), None);
        assert_eq!(*b.closed.borrow(), Some(CloseReason::CertRevoked));
    }

    #[tokio::test]
    async fn close_requested_resolves_with_the_reason() {
        let live = LiveConnections::new(ClonePolicy::AllowNewest);
        let (mut a, _) = live.register(&ctx("a", "0a", 1)).unwrap();
        let revoked = ["0a".to_string()].into_iter().collect();
        live.close_revoked(&revoked);
        assert_eq!(
            close_requested(&mut a.closed).await,
            CloseReason::CertRevoked
        );
    }
}
