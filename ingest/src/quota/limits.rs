//! Per-device, per-fleet and node-wide rate limits on events/s and bytes/s, with
//! per-fleet overrides, swapped in place on reload.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};

use super::rate::{Denied, DirectMeter, Grid, KeyedMeter};
use super::{QuotaConfig, RateSpec};

/// Which scope refused a batch; its `reason_code` is the reject reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    Device,
    Fleet,
    Global,
}

impl Limit {
    /// Stable reject reason: ack, `telemetry.rejected.v1`, metric label, log field.
    pub const fn reason_code(self) -> &'static str {
        match self {
            Limit::Device => "rate_limited_device",
            Limit::Fleet => "rate_limited_fleet",
            Limit::Global => "rate_limited_global",
        }
    }
}

/// Which quantity ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dimension {
    Events,
    Bytes,
}

impl Dimension {
    pub const fn as_str(self) -> &'static str {
        match self {
            Dimension::Events => "events",
            Dimension::Bytes => "bytes",
        }
    }
}

/// A batch that does not fit now. `retry_after` is when this same batch would next
/// fit the limit that refused it (other limits may still refuse it then).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{} {} quota exceeded, retry after {retry_after:?}", limit.reason_code(), dimension.as_str())]
pub struct QuotaRefusal {
    pub limit: Limit,
    pub dimension: Dimension,
    pub retry_after: Duration,
}

/// The rate limits of one ingest node, shared by all connections (`Send + Sync`).
///
/// A batch is charged to its device, then its fleet, then the node, each on events
/// then bytes, and admitted only if every limit has room. GCRA state cannot be refunded
/// and governor has no "peek", so a limit that refuses leaves the narrower limits
/// before it charged: a device refused by its fleet or the node has spent its own
/// tokens on that batch. The order is chosen so this cost falls on the requester: a
/// device over its own limit is stopped before it spends fleet or node capacity, so
/// one flooding device cannot starve its fleet or the node. The price is that under
/// fleet/node saturation a device's retries count twice against its own limit and may
/// come back as `rate_limited_device`; a device burst of at least two full batches (the
/// default 20 000 events vs 10 000 per batch) absorbs one such double charge.
///
/// Keys are a per-process keyed SipHash of `(fleet, device)`: no allocation per check,
/// collisions cannot be aimed (the key is random per process) and, at 2^-64 per pair,
/// would only make two devices share one limiter.
///
/// Memory: about 45 heap bytes per tracked device with the default configuration (two
/// limiter entries, events and bytes; measured over 100 000 devices by
/// `benches/benches/limiter.rs`), held until `retain_recent` finds its buckets full.
///
/// Limits above 1e7/s are kept in cells of `unit` events or bytes (a power of two: 32
/// for 256 MiB/s, 512 at most); each batch is charged whole cells, i.e. up to `unit - 1`
/// bytes extra (0.3 % of a 12 kB batch at 256 MiB/s). Rates are exact to within 1 %,
/// on the permissive side (see `rate`).
pub struct Quotas<C: Clock = DefaultClock> {
    clock: C,
    hasher: RandomState,
    current: RwLock<Arc<Limiters<C>>>,
}

/// One scope's two dimensions; `None` = unlimited.
struct Pair<M> {
    spec: RateSpec,
    events: Option<M>,
    bytes: Option<M>,
}

impl<C: Clock + Clone> Pair<KeyedMeter<C>> {
    fn keyed(spec: RateSpec, clock: &C) -> Arc<Self> {
        Arc::new(Pair {
            spec,
            events: Grid::new(spec.events_per_sec, spec.event_burst)
                .map(|g| KeyedMeter::new(g, clock)),
            bytes: Grid::new(spec.bytes_per_sec, spec.byte_burst)
                .map(|g| KeyedMeter::new(g, clock)),
        })
    }

    fn check(&self, key: u64, events: u32, bytes: u32) -> Result<(), (Dimension, Denied)> {
        if let Some(m) = &self.events {
            m.check(key, events).map_err(|d| (Dimension::Events, d))?;
        }
        if let Some(m) = &self.bytes {
            m.check(key, bytes).map_err(|d| (Dimension::Bytes, d))?;
        }
        Ok(())
    }

    fn retain_recent(&self) {
        self.events
            .iter()
            .chain(&self.bytes)
            .for_each(KeyedMeter::retain_recent);
    }

    fn len(&self) -> usize {
        self.events
            .iter()
            .chain(&self.bytes)
            .map(KeyedMeter::len)
            .max()
            .unwrap_or(0)
    }
}

impl<C: Clock + Clone> Pair<DirectMeter<C>> {
    fn direct(spec: RateSpec, clock: &C) -> Arc<Self> {
        Arc::new(Pair {
            spec,
            events: Grid::new(spec.events_per_sec, spec.event_burst)
                .map(|g| DirectMeter::new(g, clock)),
            bytes: Grid::new(spec.bytes_per_sec, spec.byte_burst)
                .map(|g| DirectMeter::new(g, clock)),
        })
    }

    fn check(&self, events: u32, bytes: u32) -> Result<(), (Dimension, Denied)> {
        if let Some(m) = &self.events {
            m.check(events).map_err(|d| (Dimension::Events, d))?;
        }
        if let Some(m) = &self.bytes {
            m.check(bytes).map_err(|d| (Dimension::Bytes, d))?;
        }
        Ok(())
    }
}

/// Limiters of one overridden fleet; `None` parts use the shared defaults.
struct FleetLimiters<C: Clock> {
    fleet: Option<Arc<Pair<DirectMeter<C>>>>,
    device: Option<Arc<Pair<KeyedMeter<C>>>>,
}

/// Everything built from one configuration; replaced whole on reload.
struct Limiters<C: Clock> {
    device: Arc<Pair<KeyedMeter<C>>>,
    fleet: Arc<Pair<KeyedMeter<C>>>,
    global: Arc<Pair<DirectMeter<C>>>,
    overrides: HashMap<Box<str>, FleetLimiters<C>>,
}

impl<C: Clock + Clone> Limiters<C> {
    /// Builds limiters for `cfg`, reusing (and so keeping the state of) every limiter
    /// of `old` whose spec is unchanged.
    fn build(cfg: &QuotaConfig, clock: &C, old: Option<&Limiters<C>>) -> Self {
        fn reuse<M>(
            old: Option<&Arc<Pair<M>>>,
            spec: RateSpec,
            make: impl FnOnce() -> Arc<Pair<M>>,
        ) -> Arc<Pair<M>> {
            match old {
                Some(o) if o.spec == spec => Arc::clone(o),
                _ => make(),
            }
        }
        let overrides = cfg
            .fleets
            .iter()
            .map(|(name, o)| {
                let prev = old.and_then(|l| l.overrides.get(name.as_str()));
                let limiters = FleetLimiters {
                    fleet: o.fleet.map(|spec| {
                        reuse(prev.and_then(|p| p.fleet.as_ref()), spec, || {
                            Pair::direct(spec, clock)
                        })
                    }),
                    device: o.device.map(|spec| {
                        reuse(prev.and_then(|p| p.device.as_ref()), spec, || {
                            Pair::keyed(spec, clock)
                        })
                    }),
                };
                (name.as_str().into(), limiters)
            })
            .collect();
        Limiters {
            device: reuse(old.map(|l| &l.device), cfg.device, || {
                Pair::keyed(cfg.device, clock)
            }),
            fleet: reuse(old.map(|l| &l.fleet), cfg.fleet, || {
                Pair::keyed(cfg.fleet, clock)
            }),
            global: reuse(old.map(|l| &l.global), cfg.global, || {
                Pair::direct(cfg.global, clock)
            }),
            overrides,
        }
    }
}

impl Quotas<DefaultClock> {
    /// Limits on the real (monotonic) clock.
    pub fn new(cfg: &QuotaConfig) -> Self {
        Self::with_clock(cfg, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Quotas<C> {
    /// Limits on a given clock (tests use `governor::clock::FakeRelativeClock`).
    pub fn with_clock(cfg: &QuotaConfig, clock: C) -> Self {
        let limiters = Limiters::build(cfg, &clock, None);
        Self {
            clock,
            hasher: RandomState::new(),
            current: RwLock::new(Arc::new(limiters)),
        }
    }

    /// Admits a batch of `events` events and `bytes` encoded bytes from `device` of
    /// `fleet`, charging every limit, or says which limit refused and when to retry.
    pub fn check(
        &self,
        fleet: &str,
        device: &str,
        events: u32,
        bytes: u32,
    ) -> Result<(), QuotaRefusal> {
        // Held for the few atomic operations below; never across an await.
        let l = self.current.read().unwrap_or_else(PoisonError::into_inner);
        let fleet_override = if l.overrides.is_empty() {
            None
        } else {
            l.overrides.get(fleet)
        };
        let refused = |limit| {
            move |(dimension, denied): (Dimension, Denied)| QuotaRefusal {
                limit,
                dimension,
                retry_after: denied.retry_after(),
            }
        };

        let device_limits = fleet_override
            .and_then(|o| o.device.as_ref())
            .unwrap_or(&l.device);
        device_limits
            .check(self.hasher.hash_one((fleet, device)), events, bytes)
            .map_err(refused(Limit::Device))?;
        match fleet_override.and_then(|o| o.fleet.as_ref()) {
            Some(own) => own.check(events, bytes),
            None => l.fleet.check(self.hasher.hash_one(fleet), events, bytes),
        }
        .map_err(refused(Limit::Fleet))?;
        l.global
            .check(events, bytes)
            .map_err(refused(Limit::Global))
    }

    /// Applies a new configuration at once. Limiters whose spec is unchanged keep their
    /// state; changed or new ones start with a full bucket.
    pub fn reload(&self, cfg: &QuotaConfig) {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        *current = Arc::new(Limiters::build(cfg, &self.clock, Some(&current)));
    }

    /// Forgets devices and fleets whose buckets are full again (lossless: they are
    /// indistinguishable from new ones). O(tracked keys), locking one map shard at a
    /// time: call it from a periodic task (e.g. every minute), not per batch.
    pub fn retain_recent(&self) {
        let l = self.limiters();
        l.device.retain_recent();
        l.fleet.retain_recent();
        for o in l.overrides.values() {
            if let Some(d) = &o.device {
                d.retain_recent();
            }
        }
    }

    /// Devices with limiter state (a gauge for memory; see `retain_recent`).
    pub fn tracked_devices(&self) -> usize {
        let l = self.limiters();
        l.device.len()
            + l.overrides
                .values()
                .filter_map(|o| o.device.as_ref())
                .map(|d| d.len())
                .sum::<usize>()
    }

    fn limiters(&self) -> Arc<Limiters<C>> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::FleetQuota;
    use governor::clock::FakeRelativeClock;
    use proptest::prelude::*;

    fn events_only(per_sec: u32, burst: u32) -> RateSpec {
        RateSpec {
            events_per_sec: per_sec,
            event_burst: burst,
            bytes_per_sec: 0,
            byte_burst: 0,
        }
    }

    /// Only the device limit is finite.
    fn device_only(spec: RateSpec) -> QuotaConfig {
        QuotaConfig {
            device: spec,
            fleet: RateSpec::UNLIMITED,
            global: RateSpec::UNLIMITED,
            ..QuotaConfig::default()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Events admitted in 1 s after the burst is spent, sending 10-event batches.
    fn sustained_per_sec(
        q: &Quotas<FakeRelativeClock>,
        clock: &FakeRelativeClock,
        fleet: &str,
    ) -> u32 {
        while q.check(fleet, "car", 10, 0).is_ok() {}
        let mut admitted = 0;
        for _ in 0..1000 {
            clock.advance(ms(1));
            while q.check(fleet, "car", 10, 0).is_ok() {
                admitted += 10;
            }
        }
        admitted
    }

    #[test]
    fn fleet_override_gives_fifty_times_the_device_limit() {
        let mut cfg = device_only(events_only(1_000, 10_000));
        cfg.fleets.insert(
            "acme".into(),
            FleetQuota {
                fleet: None,
                device: Some(events_only(50_000, 500_000)),
            },
        );
        let clock = FakeRelativeClock::default();
        let q = Quotas::with_clock(&cfg, clock.clone());
        assert_eq!(sustained_per_sec(&q, &clock, "private"), 1_000);
        assert_eq!(sustained_per_sec(&q, &clock, "acme"), 50_000);
    }

    #[test]
    fn fleet_and_global_limits_refuse_with_their_reason() {
        let clock = FakeRelativeClock::default();
        let cfg = QuotaConfig {
            device: events_only(1_000, 1_000),
            fleet: events_only(1_000, 1_500),
            global: events_only(1_000, 2_000),
            ..QuotaConfig::default()
        };
        let q = Quotas::with_clock(&cfg, clock.clone());
        q.check("a", "d1", 1_000, 0).unwrap();
        let r = q.check("a", "d2", 1_000, 0).unwrap_err();
        assert_eq!((r.limit, r.dimension), (Limit::Fleet, Dimension::Events));
        assert_eq!(r.limit.reason_code(), "rate_limited_fleet");
        q.check("b", "d3", 1_000, 0).unwrap();
        let r = q.check("c", "d4", 1_000, 0).unwrap_err();
        assert_eq!(r.limit.reason_code(), "rate_limited_global");
        let r = q.check("a", "d1", 1, 0).unwrap_err();
        assert_eq!(r.limit.reason_code(), "rate_limited_device");
    }

    #[test]
    fn byte_limit_refuses_on_the_bytes_dimension() {
        let clock = FakeRelativeClock::default();
        let spec = RateSpec {
            events_per_sec: 1_000,
            event_burst: 1_000,
            bytes_per_sec: 4 * 1024 * 1024,
            byte_burst: 1024 * 1024,
        };
        let q = Quotas::with_clock(&device_only(spec), clock.clone());
        q.check("f", "d", 1, 1024 * 1024).unwrap();
        let r = q.check("f", "d", 1, 1024).unwrap_err();
        assert_eq!((r.limit, r.dimension), (Limit::Device, Dimension::Bytes));
        // 1 KiB at 4 MiB/s refills in ~244 µs.
        assert!(
            r.retry_after > Duration::from_micros(200)
                && r.retry_after < Duration::from_micros(300),
            "{:?}",
            r.retry_after
        );
    }

    #[test]
    fn retry_after_is_when_the_refused_batch_next_fits() {
        let clock = FakeRelativeClock::default();
        let q = Quotas::with_clock(&device_only(events_only(100, 500)), clock.clone());
        q.check("f", "d", 500, 0).unwrap();
        clock.advance(ms(1_000)); // 100 refilled
        let r = q.check("f", "d", 300, 0).unwrap_err();
        assert_eq!(r.retry_after, ms(2_000), "200 more at 100/s");
        clock.advance(r.retry_after - Duration::from_nanos(1));
        assert!(
            q.check("f", "d", 300, 0).is_err(),
            "1 ns early still refused"
        );
        clock.advance(Duration::from_nanos(1));
        q.check("f", "d", 300, 0).unwrap();
    }

    #[test]
    fn reload_changes_limits_and_keeps_unchanged_state() {
        let clock = FakeRelativeClock::default();
        let mut cfg = QuotaConfig {
            device: events_only(100, 100),
            fleet: events_only(1_000, 1_000),
            global: RateSpec::UNLIMITED,
            ..QuotaConfig::default()
        };
        let q = Quotas::with_clock(&cfg, clock.clone());
        q.check("f", "d1", 100, 0).unwrap();
        q.check("f", "d2", 100, 0).unwrap();
        assert_eq!(q.check("f", "d1", 1, 0).unwrap_err().limit, Limit::Device);

        cfg.device = events_only(1_000, 1_000);
        q.reload(&cfg);
        // New device spec: fresh buckets. Fleet spec unchanged: 200 of 1000 still spent.
        q.check("f", "d1", 800, 0).unwrap();
        assert_eq!(q.check("f", "d2", 1, 0).unwrap_err().limit, Limit::Fleet);

        cfg.fleets.insert(
            "f".into(),
            FleetQuota {
                fleet: Some(events_only(10, 10)),
                device: None,
            },
        );
        q.reload(&cfg);
        q.check("f", "d3", 10, 0).unwrap();
        assert_eq!(q.check("f", "d4", 1, 0).unwrap_err().limit, Limit::Fleet);
    }

    #[test]
    fn idle_devices_are_forgotten() {
        let clock = FakeRelativeClock::default();
        let q = Quotas::with_clock(&device_only(events_only(100, 1_000)), clock.clone());
        for d in 0..50 {
            q.check("f", &format!("d{d}"), 10, 0).unwrap();
        }
        q.check("f", "busy", 1_000, 0).unwrap();
        assert_eq!(q.tracked_devices(), 51);
        clock.advance(ms(500));
        q.retain_recent();
        assert_eq!(
            q.tracked_devices(),
            1,
            "only the device whose bucket is not full yet"
        );
    }

    #[derive(Debug, Clone)]
    struct Req {
        gap_ns: u64,
        events: u32,
    }

    fn reqs(max_events: u32, max_gap_ns: u64) -> impl Strategy<Value = Vec<Req>> {
        prop::collection::vec(
            (0..max_gap_ns, 1..=max_events).prop_map(|(gap_ns, events)| Req { gap_ns, events }),
            1..150,
        )
    }

    proptest! {
        /// (a) Over every interval [t_i, t_j] of a request sequence, the events admitted
        /// are at most burst + rate × (t_j − t_i), up to one cell of rounding and the
        /// ≤ 1 % nanosecond truncation (see `rate`).
        #[test]
        fn admitted_never_exceeds_burst_plus_rate_times_interval(
            per_sec in 1u32..40_000_000,
            burst in 1u32..50_000,
            seq in reqs(60_000, 50_000_000),
        ) {
            let clock = FakeRelativeClock::default();
            let q = Quotas::with_clock(&device_only(events_only(per_sec, burst)), clock.clone());
            let unit = Grid::new(per_sec, burst).unwrap().unit();
            let mut admitted = Vec::new(); // (t_ns, events)
            let mut t = 0u64;
            for r in &seq {
                clock.advance(Duration::from_nanos(r.gap_ns));
                t += r.gap_ns;
                if q.check("f", "d", r.events, 0).is_ok() {
                    admitted.push((t, r.events));
                }
            }
            for i in 0..admitted.len() {
                let mut sum = 0u64;
                for j in i..admitted.len() {
                    sum += u64::from(admitted[j].1);
                    let dt = (admitted[j].0 - admitted[i].0) as f64 / 1e9;
                    let bound = f64::from(burst) + f64::from(unit - 1)
                        + f64::from(per_sec) * dt * 100.0 / 99.0;
                    prop_assert!(sum as f64 <= bound + 1e-6,
                        "admitted {sum} in {dt}s > bound {bound}");
                }
            }
        }

        /// (b) A device whose batches are spaced by at least batch/rate is never refused.
        #[test]
        fn a_device_within_its_rate_is_never_refused(
            per_sec in 1u32..10_000_000,
            burst in 1u32..50_000,
            seq in reqs(50_000, 10_000_000),
        ) {
            let clock = FakeRelativeClock::default();
            let q = Quotas::with_clock(&device_only(events_only(per_sec, burst)), clock.clone());
            for r in seq {
                let n = r.events.min(burst);
                let spacing = (u64::from(n) * 1_000_000_000).div_ceil(u64::from(per_sec));
                prop_assert!(q.check("f", "d", n, 0).is_ok());
                clock.advance(Duration::from_nanos(spacing + r.gap_ns));
            }
        }

        /// (c) A flooding device in one fleet never causes refusals for a well-behaved
        /// device of another fleet while fleet and node limits are ample.
        #[test]
        fn one_device_never_limits_a_device_of_another_fleet(
            flood in prop::collection::vec((0u64..5_000_000, 1u32..20_000), 1..100),
        ) {
            let clock = FakeRelativeClock::default();
            let cfg = QuotaConfig {
                device: events_only(1_000, 10_000),
                fleet: events_only(1_000_000, 10_000_000),
                global: events_only(3_000_000, 30_000_000),
                ..QuotaConfig::default()
            };
            let q = Quotas::with_clock(&cfg, clock.clone());
            for (gap_ns, n) in flood {
                let _ = q.check("noisy", "attacker", n, 0);
                // The victim sends 1 event per 1 ms: exactly its 1000/s.
                prop_assert!(q.check("quiet", "victim", 1, 0).is_ok());
                clock.advance(Duration::from_nanos(gap_ns.max(1_000_000)));
            }
        }
    }
}
