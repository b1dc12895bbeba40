//! Connection-level limits, checked before any telemetry is read: TLS handshakes per
//! second per source address and node-wide, concurrent connections per device and
//! node-wide, and batches awaiting their ack per connection. Counts are released by
//! dropping RAII permits, so an early return or a panic cannot leak a slot.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};

use super::rate::{DirectMeter, Grid, KeyedMeter, Prehashed};
use super::ConnectionLimits;

/// Why a handshake, connection or batch is refused before reaching the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnRefusal {
    #[error("too many handshakes from this address, retry after {retry_after:?}")]
    HandshakeRateLimitedIp { retry_after: Duration },
    #[error("too many handshakes on this node, retry after {retry_after:?}")]
    HandshakeRateLimited { retry_after: Duration },
    #[error("device already has the maximum number of connections")]
    TooManyConnectionsDevice,
    #[error("node has the maximum number of connections")]
    TooManyConnections,
    #[error("connection already has the maximum number of batches awaiting an ack")]
    TooManyBatchesInFlight,
}

impl ConnRefusal {
    /// Stable snake_case code for metrics labels and logs.
    pub const fn code(self) -> &'static str {
        match self {
            ConnRefusal::HandshakeRateLimitedIp { .. } => "handshake_rate_limited_ip",
            ConnRefusal::HandshakeRateLimited { .. } => "handshake_rate_limited",
            ConnRefusal::TooManyConnectionsDevice => "too_many_connections_device",
            ConnRefusal::TooManyConnections => "too_many_connections",
            ConnRefusal::TooManyBatchesInFlight => "too_many_batches_in_flight",
        }
    }
}

/// Handshake limiters built from one configuration.
struct Handshakes<C: Clock> {
    limits: (u32, u32, u32, u32),
    per_ip: Option<KeyedMeter<C>>,
    overall: Option<DirectMeter<C>>,
}

impl<C: Clock + Clone> Handshakes<C> {
    fn new(l: &ConnectionLimits, clock: &C) -> Self {
        Self {
            limits: Self::key(l),
            per_ip: Grid::new(l.handshakes_per_sec_per_ip, l.handshake_burst_per_ip)
                .map(|g| KeyedMeter::new(g, clock)),
            overall: Grid::new(l.handshakes_per_sec, l.handshake_burst)
                .map(|g| DirectMeter::new(g, clock)),
        }
    }

    fn key(l: &ConnectionLimits) -> (u32, u32, u32, u32) {
        (
            l.handshakes_per_sec_per_ip,
            l.handshake_burst_per_ip,
            l.handshakes_per_sec,
            l.handshake_burst,
        )
    }
}

/// Live counters shared by the gate and its permits; limits are atomics so a reload
/// applies to connections that are already open.
#[derive(Debug)]
struct Counts {
    per_device: DashMap<u64, u32, Prehashed>,
    total: AtomicUsize,
    max_per_device: AtomicU32,
    max_total: AtomicU32,
    max_batches: AtomicU32,
}

/// Admission of handshakes and connections for one ingest node (`Send + Sync`).
pub struct ConnectionGate<C: Clock = DefaultClock> {
    clock: C,
    hasher: RandomState,
    handshakes: RwLock<Arc<Handshakes<C>>>,
    counts: Arc<Counts>,
}

impl ConnectionGate<DefaultClock> {
    /// Gate on the real (monotonic) clock.
    pub fn new(limits: &ConnectionLimits) -> Self {
        Self::with_clock(limits, DefaultClock::default())
    }
}

impl<C: Clock + Clone> ConnectionGate<C> {
    /// Gate on a given clock (tests use `governor::clock::FakeRelativeClock`).
    pub fn with_clock(limits: &ConnectionLimits, clock: C) -> Self {
        let gate = Self {
            handshakes: RwLock::new(Arc::new(Handshakes::new(limits, &clock))),
            clock,
            hasher: RandomState::new(),
            counts: Arc::new(Counts {
                per_device: DashMap::default(),
                total: AtomicUsize::new(0),
                max_per_device: AtomicU32::new(0),
                max_total: AtomicU32::new(0),
                max_batches: AtomicU32::new(0),
            }),
        };
        gate.store_counts(limits);
        gate
    }

    /// Admits one TLS handshake from `ip`: per-address first, so one address flooding
    /// is stopped before it spends the node-wide budget. IPv6 is limited per /64,
    /// since one host can hold a whole /64 and rotate through it.
    pub fn try_handshake(&self, ip: IpAddr) -> Result<(), ConnRefusal> {
        let h = Arc::clone(
            &self
                .handshakes
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if let Some(m) = &h.per_ip {
            m.check(self.hasher.hash_one(address_key(ip)), 1)
                .map_err(|d| ConnRefusal::HandshakeRateLimitedIp {
                    retry_after: d.retry_after(),
                })?;
        }
        if let Some(m) = &h.overall {
            m.check(1).map_err(|d| ConnRefusal::HandshakeRateLimited {
                retry_after: d.retry_after(),
            })?;
        }
        Ok(())
    }

    /// Counts a new authenticated connection of `device` in `fleet`; the slot is freed
    /// when the permit drops.
    pub fn try_connect(&self, fleet: &str, device: &str) -> Result<ConnectionPermit, ConnRefusal> {
        let c = &self.counts;
        let max_total = c.max_total.load(Ordering::Relaxed) as usize;
        c.total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (max_total == 0 || t < max_total).then_some(t + 1)
            })
            .map_err(|_| ConnRefusal::TooManyConnections)?;
        let key = self.hasher.hash_one((fleet, device));
        let max_device = c.max_per_device.load(Ordering::Relaxed);
        let admitted = match c.per_device.entry(key) {
            Entry::Occupied(mut o) if max_device == 0 || *o.get() < max_device => {
                *o.get_mut() += 1;
                true
            }
            Entry::Occupied(_) => false,
            Entry::Vacant(v) => {
                v.insert(1);
                true
            }
        };
        if !admitted {
            c.total.fetch_sub(1, Ordering::AcqRel);
            return Err(ConnRefusal::TooManyConnectionsDevice);
        }
        Ok(ConnectionPermit {
            counts: Arc::clone(c),
            device_key: key,
            batches: Arc::new(AtomicU32::new(0)),
        })
    }

    /// Open connections on this node.
    pub fn connections(&self) -> usize {
        self.counts.total.load(Ordering::Acquire)
    }

    /// Open connections of one device.
    pub fn device_connections(&self, fleet: &str, device: &str) -> u32 {
        let key = self.hasher.hash_one((fleet, device));
        self.counts.per_device.get(&key).map_or(0, |n| *n)
    }

    /// Applies new limits: counts apply at once (existing connections are never
    /// closed, new ones wait until under the limit); handshake buckets are rebuilt
    /// only if their spec changed.
    pub fn reload(&self, limits: &ConnectionLimits) {
        self.store_counts(limits);
        let mut h = self
            .handshakes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if h.limits != Handshakes::<C>::key(limits) {
            *h = Arc::new(Handshakes::new(limits, &self.clock));
        }
    }

    /// Forgets source addresses whose handshake bucket is full again.
    pub fn retain_recent(&self) {
        let h = Arc::clone(
            &self
                .handshakes
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if let Some(m) = &h.per_ip {
            m.retain_recent();
        }
    }

    fn store_counts(&self, l: &ConnectionLimits) {
        let c = &self.counts;
        c.max_per_device
            .store(l.max_connections_per_device, Ordering::Relaxed);
        c.max_total.store(l.max_connections, Ordering::Relaxed);
        c.max_batches.store(
            l.max_batches_in_flight_per_connection.max(1),
            Ordering::Relaxed,
        );
    }
}

/// IPv4 (and IPv4-mapped IPv6) per address; other IPv6 per /64.
fn address_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(u32::from(v4)),
            None => u128::from(v6) & !u128::from(u64::MAX),
        },
    }
}

/// One open connection; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionPermit {
    counts: Arc<Counts>,
    device_key: u64,
    batches: Arc<AtomicU32>,
}

impl ConnectionPermit {
    /// Admits one more batch awaiting its ack on this connection.
    pub fn try_start_batch(&self) -> Result<BatchPermit, ConnRefusal> {
        let max = self.counts.max_batches.load(Ordering::Relaxed);
        self.batches
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b < max).then_some(b + 1)
            })
            .map_err(|_| ConnRefusal::TooManyBatchesInFlight)?;
        Ok(BatchPermit {
            batches: Arc::clone(&self.batches),
        })
    }

    /// Batches of this connection awaiting their ack.
    pub fn batches_in_flight(&self) -> u32 {
        self.batches.load(Ordering::Acquire)
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if let Entry::Occupied(mut o) = self.counts.per_device.entry(self.device_key) {
            if *o.get() <= 1 {
                o.remove();
            } else {
                *o.get_mut() -= 1;
            }
        }
        self.counts.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One batch awaiting its ack; dropping it frees the slot (`Send + 'static`, so it
/// can travel with the batch into a delivery task).
#[derive(Debug)]
pub struct BatchPermit {
    batches: Arc<AtomicU32>,
}

impl Drop for BatchPermit {
    fn drop(&mut self) {
        self.batches.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            handshakes_per_sec_per_ip: 2,
            handshake_burst_per_ip: 2,
            handshakes_per_sec: 10,
            handshake_burst: 3,
            max_connections_per_device: 2,
            max_connections: 3,
            max_batches_in_flight_per_connection: 2,
        }
    }

    #[test]
    fn handshakes_are_limited_per_address_then_overall() {
        let clock = FakeRelativeClock::default();
        let gate = ConnectionGate::with_clock(&limits(), clock.clone());
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        gate.try_handshake(a).unwrap();
        gate.try_handshake(a).unwrap();
        let r = gate.try_handshake(a).unwrap_err();
        assert_eq!(
            r,
            ConnRefusal::HandshakeRateLimitedIp {
                retry_after: Duration::from_millis(500)
            }
        );
        assert_eq!(r.code(), "handshake_rate_limited_ip");
        gate.try_handshake(b).unwrap();
        let r = gate.try_handshake(b).unwrap_err();
        assert_eq!(r.code(), "handshake_rate_limited", "node burst of 3 spent");
        clock.advance(Duration::from_millis(500));
        gate.try_handshake(b).unwrap();
    }

    #[test]
    fn ipv6_addresses_of_one_slash_64_share_a_bucket() {
        let gate = ConnectionGate::with_clock(&limits(), FakeRelativeClock::default());
        let net = |host: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, host));
        gate.try_handshake(net(1)).unwrap();
        gate.try_handshake(net(2)).unwrap();
        assert_eq!(
            gate.try_handshake(net(3)).unwrap_err().code(),
            "handshake_rate_limited_ip"
        );
        let mapped: IpAddr = "::ffff:10.0.0.9".parse().unwrap();
        assert_eq!(
            address_key(mapped),
            address_key("10.0.0.9".parse().unwrap())
        );
    }

    #[test]
    fn connections_are_counted_and_released() {
        let gate = ConnectionGate::with_clock(&limits(), FakeRelativeClock::default());
        let p1 = gate.try_connect("f", "d1").unwrap();
        let p2 = gate.try_connect("f", "d1").unwrap();
        assert_eq!(
            gate.try_connect("f", "d1").unwrap_err(),
            ConnRefusal::TooManyConnectionsDevice
        );
        assert_eq!(gate.connections(), 2, "a refused connection holds no slot");
        let p3 = gate.try_connect("g", "d1").unwrap();
        assert_eq!(
            gate.try_connect("g", "d2").unwrap_err().code(),
            "too_many_connections"
        );
        drop(p1);
        assert_eq!(gate.device_connections("f", "d1"), 1);
        let p4 = gate.try_connect("g", "d2").unwrap();
        drop((p2, p3, p4));
        assert_eq!(gate.connections(), 0);
        assert_eq!(gate.device_connections("f", "d1"), 0);
        assert!(
            gate.counts.per_device.is_empty(),
            "no entry outlives its connections"
        );
    }

    #[test]
    fn batches_per_connection_are_bounded_and_released() {
        let gate = ConnectionGate::with_clock(&limits(), FakeRelativeClock::default());
        let conn = gate.try_connect("f", "d").unwrap();
        let b1 = conn.try_start_batch().unwrap();
        let _b2 = conn.try_start_batch().unwrap();
        assert_eq!(
            conn.try_start_batch().unwrap_err().code(),
            "too_many_batches_in_flight"
        );
        drop(b1);
        let _b3 = conn.try_start_batch().unwrap();
        assert_eq!(conn.batches_in_flight(), 2);
    }

    #[test]
    fn reload_applies_new_counts_to_open_connections() {
        let gate = ConnectionGate::with_clock(&limits(), FakeRelativeClock::default());
        let conn = gate.try_connect("f", "d").unwrap();
        let _b = conn.try_start_batch().unwrap();
        gate.reload(&ConnectionLimits {
            max_batches_in_flight_per_connection: 1,
            max_connections: 1,
            ..limits()
        });
        assert!(conn.try_start_batch().is_err());
        assert_eq!(
            gate.try_connect("f", "e").unwrap_err(),
            ConnRefusal::TooManyConnections
        );
    }
}
