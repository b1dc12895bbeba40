//! Overload protection between the transports and Kafka: a node-wide bound on events
//! admitted but not yet acknowledged by Kafka, and a delivery-latency signal. When
//! either trips, new batches are refused with `overloaded` (the device retries later)
//! instead of queueing without bound.
//!
//! Guarantees: the in-flight count never exceeds its maximum (a batch larger than the
//! maximum is refused; `QuotaConfig::validate` makes the maximum hold the largest
//! batch), and returns to 0 when every permit is dropped. The latency signal cannot
//! refuse forever: it applies only while events are in flight and only for
//! `latency_hold` after the last delivery sample, so once the pipe drains new batches
//! are admitted and their deliveries refresh the signal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::OverloadConfig;

/// Smoothing of the latency average: each sample moves it by 1/8 of the difference.
const EWMA_SHIFT: u32 = 3;
/// `last_sample_ns` value meaning "no sample yet".
const NO_SAMPLE: u64 = u64::MAX;

/// Why a batch was refused as `overloaded` (a log detail; the reason code is always
/// `overloaded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OverloadCause {
    #[error("too many events awaiting Kafka acknowledgement")]
    InFlightFull,
    #[error("Kafka delivery latency is above the configured maximum")]
    DeliveryLatency,
}

impl OverloadCause {
    pub const fn as_str(self) -> &'static str {
        match self {
            OverloadCause::InFlightFull => "in_flight_full",
            OverloadCause::DeliveryLatency => "delivery_latency",
        }
    }
}

#[derive(Debug)]
struct Shared {
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    max_latency_ns: AtomicU64,
    hold_ns: AtomicU64,
    ewma_ns: AtomicU64,
    /// Time of the last sample, in ns since `epoch`.
    last_sample_ns: AtomicU64,
    epoch: Instant,
}

/// Events between the transports and Kafka, node-wide (`Send + Sync`, cheap to clone).
#[derive(Debug, Clone)]
pub struct InFlight {
    shared: Arc<Shared>,
}

impl InFlight {
    pub fn new(cfg: &OverloadConfig) -> Self {
        let this = Self {
            shared: Arc::new(Shared {
                in_flight: AtomicU64::new(0),
                max_in_flight: AtomicU64::new(0),
                max_latency_ns: AtomicU64::new(0),
                hold_ns: AtomicU64::new(0),
                ewma_ns: AtomicU64::new(0),
                last_sample_ns: AtomicU64::new(NO_SAMPLE),
                epoch: Instant::now(),
            }),
        };
        this.reload(cfg);
        this
    }

    /// Admits a batch of `events` unless the node is overloaded; hold the permit until
    /// Kafka has acknowledged (or failed) every event of the batch.
    pub fn admit(&self, events: u32, now: Instant) -> Result<InFlightPermit, OverloadCause> {
        if self.latency_overloaded(now) {
            return Err(OverloadCause::DeliveryLatency);
        }
        self.try_acquire(events).ok_or(OverloadCause::InFlightFull)
    }

    /// Reserves `events` in-flight slots if they fit under the maximum (count only, no
    /// latency check).
    pub fn try_acquire(&self, events: u32) -> Option<InFlightPermit> {
        let s = &self.shared;
        let max = s.max_in_flight.load(Ordering::Relaxed);
        let n = u64::from(events);
        s.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                cur.checked_add(n).filter(|&next| next <= max)
            })
            .ok()?;
        Some(InFlightPermit {
            shared: Arc::clone(s),
            events: n,
        })
    }

    /// Events admitted and not yet released (a gauge).
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Feeds one Kafka delivery latency (enqueue to acknowledgement) observed at `now`.
    pub fn record_delivery(&self, latency: Duration, now: Instant) {
        let s = &self.shared;
        let sample = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let first = s.last_sample_ns.load(Ordering::Acquire) == NO_SAMPLE;
        let _ = s
            .ewma_ns
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |avg| {
                Some(if first {
                    sample
                } else if sample >= avg {
                    avg + ((sample - avg) >> EWMA_SHIFT)
                } else {
                    avg - ((avg - sample) >> EWMA_SHIFT)
                })
            });
        s.last_sample_ns
            .store(self.since_epoch(now), Ordering::Release);
    }

    /// Smoothed delivery latency (a gauge).
    pub fn delivery_latency(&self) -> Duration {
        Duration::from_nanos(self.shared.ewma_ns.load(Ordering::Acquire))
    }

    /// Whether a new batch would be refused now, and why (without reserving anything).
    pub fn overloaded(&self, now: Instant) -> Option<OverloadCause> {
        let s = &self.shared;
        if self.latency_overloaded(now) {
            Some(OverloadCause::DeliveryLatency)
        } else if s.in_flight.load(Ordering::Acquire) >= s.max_in_flight.load(Ordering::Relaxed) {
            Some(OverloadCause::InFlightFull)
        } else {
            None
        }
    }

    /// Applies a new configuration. A lower maximum refuses new batches until the
    /// count drains below it; nothing already admitted is affected.
    pub fn reload(&self, cfg: &OverloadConfig) {
        let s = &self.shared;
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        s.max_in_flight
            .store(u64::from(cfg.max_events_in_flight), Ordering::Relaxed);
        s.max_latency_ns
            .store(ns(cfg.max_delivery_latency), Ordering::Relaxed);
        s.hold_ns.store(ns(cfg.latency_hold), Ordering::Relaxed);
    }

    fn latency_overloaded(&self, now: Instant) -> bool {
        let s = &self.shared;
        let max = s.max_latency_ns.load(Ordering::Relaxed);
        let last = s.last_sample_ns.load(Ordering::Acquire);
        max != 0
            && last != NO_SAMPLE
            && s.in_flight.load(Ordering::Acquire) > 0
            && self.since_epoch(now).saturating_sub(last) <= s.hold_ns.load(Ordering::Relaxed)
            && s.ewma_ns.load(Ordering::Acquire) > max
    }

    fn since_epoch(&self, now: Instant) -> u64 {
        let d = now.saturating_duration_since(self.shared.epoch);
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX - 1)
    }
}

/// Events of one admitted batch; dropping it releases them.
#[derive(Debug)]
pub struct InFlightPermit {
    shared: Arc<Shared>,
    events: u64,
}

impl InFlightPermit {
    pub fn events(&self) -> u64 {
        self.events
    }
}

impl Drop for InFlightPermit {
    fn drop(&mut self) {
        self.shared
            .in_flight
            .fetch_sub(self.events, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(max: u32) -> OverloadConfig {
        OverloadConfig {
            max_events_in_flight: max,
            max_delivery_latency: Duration::from_millis(500),
            latency_hold: Duration::from_secs(5),
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire(u32),
        Release(usize),
    }

    proptest! {
        /// (d) Under any interleaving of acquires and releases the count equals the sum of
        /// live permits, never exceeds the maximum, and returns to 0.
        #[test]
        fn in_flight_never_exceeds_max_and_returns_to_zero(
            max in 1u32..10_000,
            ops in prop::collection::vec(
                prop_oneof![(0u32..12_000).prop_map(Op::Acquire), any::<usize>().prop_map(Op::Release)],
                0..200,
            ),
        ) {
            let f = InFlight::new(&cfg(max));
            let mut held: Vec<InFlightPermit> = Vec::new();
            for op in ops {
                match op {
                    Op::Acquire(n) => {
                        let before = f.in_flight();
                        match f.try_acquire(n) {
                            Some(p) => held.push(p),
                            None => prop_assert!(before + u64::from(n) > u64::from(max)),
                        }
                    }
                    Op::Release(i) if !held.is_empty() => {
                        held.swap_remove(i % held.len());
                    }
                    Op::Release(_) => {}
                }
                prop_assert!(f.in_flight() <= u64::from(max));
                prop_assert_eq!(f.in_flight(), held.iter().map(InFlightPermit::events).sum::<u64>());
            }
            drop(held);
            prop_assert_eq!(f.in_flight(), 0);
        }
    }

    #[test]
    fn concurrent_acquires_never_exceed_max() {
        let f = InFlight::new(&cfg(1_000));
        std::thread::scope(|scope| {
            for t in 0..4u32 {
                let f = f.clone();
                scope.spawn(move || {
                    for i in 0..20_000u32 {
                        if let Some(p) = f.try_acquire(1 + (i * 7 + t) % 300) {
                            assert!(f.in_flight() <= 1_000);
                            drop(p);
                        }
                    }
                });
            }
        });
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn full_in_flight_refuses_and_a_batch_larger_than_max_never_fits() {
        let f = InFlight::new(&cfg(100));
        let now = Instant::now();
        let p = f.admit(60, now).unwrap();
        assert_eq!(f.admit(41, now).unwrap_err(), OverloadCause::InFlightFull);
        let _q = f.admit(40, now).unwrap();
        assert_eq!(f.overloaded(now), Some(OverloadCause::InFlightFull));
        drop(p);
        assert_eq!(f.overloaded(now), None);
        drop(_q);
        assert!(f.try_acquire(101).is_none(), "refused even when empty");
    }

    #[test]
    fn slow_deliveries_refuse_only_while_events_are_in_flight() {
        let f = InFlight::new(&cfg(1_000));
        let t0 = Instant::now();
        let held = f.admit(10, t0).unwrap();
        f.record_delivery(Duration::from_secs(3), t0);
        assert_eq!(f.admit(10, t0).unwrap_err(), OverloadCause::DeliveryLatency);
        drop(held);
        // Drained: admit again so new deliveries can refresh the signal.
        let probe = f.admit(10, t0).unwrap();
        assert_eq!(f.overloaded(t0), Some(OverloadCause::DeliveryLatency));
        drop(probe);
    }

    #[test]
    fn latency_signal_expires_and_fast_deliveries_recover_it() {
        let f = InFlight::new(&cfg(1_000));
        let t0 = Instant::now();
        let _stuck = f.admit(10, t0).unwrap();
        f.record_delivery(Duration::from_secs(3), t0);
        assert!(
            f.overloaded(t0 + Duration::from_secs(5)).is_some(),
            "within hold"
        );
        assert_eq!(
            f.overloaded(t0 + Duration::from_secs(6)),
            None,
            "sample older than hold"
        );

        // Fast deliveries pull the average down: 3 s → under 500 ms in about 14 samples.
        let mut samples = 0;
        while f.overloaded(t0).is_some() {
            f.record_delivery(Duration::from_millis(20), t0);
            samples += 1;
            assert!(samples <= 16, "average stuck at {:?}", f.delivery_latency());
        }
        assert!(f.delivery_latency() <= Duration::from_millis(500));
    }

    #[test]
    fn zero_max_latency_disables_the_latency_signal() {
        let f = InFlight::new(&OverloadConfig {
            max_delivery_latency: Duration::ZERO,
            ..cfg(100)
        });
        let t0 = Instant::now();
        let _p = f.admit(1, t0).unwrap();
        f.record_delivery(Duration::from_secs(60), t0);
        assert!(f.admit(1, t0).is_ok());
    }
}
