//! GCRA meters over `governor`: one dimension (events or bytes) of one scope, plus the
//! integer arithmetic that maps a configured rate onto governor's nanosecond grid.
//!
//! Guarantee: over any interval Δt a meter admits at most
//! `burst + unit - 1 + rate × Δt × 100/99` (events or bytes): governor's GCRA bound,
//! widened by at most one cell of rounding and by ≤ 1 % rate truncation, always on the
//! permissive side, so a sender at exactly the configured rate is never refused.

use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// Smallest replenish interval handed to governor. Governor counts time in whole
/// nanoseconds, so a finer interval would let truncation inflate the rate (1 GiB/s is
/// under 1 ns per byte); at ≥ 100 ns per cell the effective rate is at most 1 % above
/// the configured one. Coarser would mean bigger cells, i.e. more rounding per batch.
const MIN_INTERVAL_NS: u64 = 100;
const NANOS_PER_SEC: u64 = 1_000_000_000;

/// A configured `(per_sec, burst)` mapped onto governor cells of `unit` events or bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grid {
    quota: Quota,
    unit: u32,
}

impl Grid {
    /// `None` when `per_sec` is 0, which means "unlimited". A zero burst is treated as
    /// one cell (`validate()` refuses it anyway).
    pub(crate) fn new(per_sec: u32, burst: u32) -> Option<Self> {
        let per_sec = u64::from(per_sec);
        if per_sec == 0 {
            return None;
        }
        // Smallest power of two keeping the interval ≥ MIN_INTERVAL_NS; 1 for ≤ 1e7/s.
        let unit = per_sec
            .div_ceil(NANOS_PER_SEC / MIN_INTERVAL_NS)
            .next_power_of_two();
        // ≤ 1e9 × 512: no overflow; ≥ MIN_INTERVAL_NS by the choice of `unit`.
        let interval_ns = NANOS_PER_SEC * unit / per_sec;
        let burst_cells = u64::from(burst.max(1)).div_ceil(unit);
        let quota = Quota::with_period(Duration::from_nanos(interval_ns))
            .expect("interval is at least MIN_INTERVAL_NS")
            .allow_burst(
                NonZeroU32::new(u32::try_from(burst_cells).expect("burst/unit fits u32"))
                    .expect("burst is at least one cell"),
            );
        Some(Self {
            quota,
            unit: u32::try_from(unit).expect("unit ≤ 512"),
        })
    }

    /// Events or bytes per governor cell (1 unless the rate exceeds 1e7/s).
    #[cfg(test)]
    pub(crate) fn unit(&self) -> u32 {
        self.unit
    }

    /// Cells charged for `amount`, rounded up; `None` when there is nothing to charge.
    fn cells(&self, amount: u32) -> Option<NonZeroU32> {
        NonZeroU32::new(amount.div_ceil(self.unit))
    }
}

/// Why a meter refused an amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denied {
    /// Fits after this long (if nothing else is admitted meanwhile).
    Wait(Duration),
    /// Larger than the whole burst: can never fit. `validate()` keeps batches within
    /// pipeline limits out of this case; the wait is the time to refill the burst.
    Never(Duration),
}

impl Denied {
    pub(crate) fn retry_after(self) -> Duration {
        match self {
            Denied::Wait(d) | Denied::Never(d) => d,
        }
    }
}

/// Hasher for keys that are already a keyed SipHash of the identity: passes the `u64`
/// through instead of hashing it a second time.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `u64` keys; fold anything else so it stays a hash.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub(crate) type Prehashed = BuildHasherDefault<PrehashedHasher>;

type Keyed<C> =
    RateLimiter<u64, DashMapStateStore<u64, Prehashed>, C, NoOpMiddleware<<C as Clock>::Instant>>;
type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One GCRA state per key (device, fleet, source address), evictable when idle.
pub(crate) struct KeyedMeter<C: Clock> {
    grid: Grid,
    limiter: Keyed<C>,
    clock: C,
}

impl<C: Clock + Clone> KeyedMeter<C> {
    pub(crate) fn new(grid: Grid, clock: &C) -> Self {
        Self {
            grid,
            limiter: RateLimiter::dashmap_with_clock_and_hasher(
                grid.quota,
                clock.clone(),
                Prehashed::default(),
            ),
            clock: clock.clone(),
        }
    }

    /// Charges `amount` to `key` if all of it fits now; charges nothing otherwise.
    pub(crate) fn check(&self, key: u64, amount: u32) -> Result<(), Denied> {
        let Some(n) = self.grid.cells(amount) else {
            return Ok(());
        };
        match self.limiter.check_key_n(&key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Denied::Wait(not_until.wait_time_from(self.clock.now()))),
            Err(_) => Err(Denied::Never(self.grid.quota.burst_size_replenished_in())),
        }
    }

    /// Drops keys whose state equals a fresh one (bucket full): lossless eviction.
    pub(crate) fn retain_recent(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub(crate) fn len(&self) -> usize {
        self.limiter.len()
    }
}

/// A single GCRA state (one fleet, the whole node).
pub(crate) struct DirectMeter<C: Clock> {
    grid: Grid,
    limiter: Direct<C>,
    clock: C,
}

impl<C: Clock + Clone> DirectMeter<C> {
    pub(crate) fn new(grid: Grid, clock: &C) -> Self {
        Self {
            grid,
            limiter: RateLimiter::direct_with_clock(grid.quota, clock.clone()),
            clock: clock.clone(),
        }
    }

    /// Charges `amount` if all of it fits now; charges nothing otherwise.
    pub(crate) fn check(&self, amount: u32) -> Result<(), Denied> {
        let Some(n) = self.grid.cells(amount) else {
            return Ok(());
        };
        match self.limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Denied::Wait(not_until.wait_time_from(self.clock.now()))),
            Err(_) => Err(Denied::Never(self.grid.quota.burst_size_replenished_in())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use proptest::prelude::*;

    #[test]
    fn unit_is_one_up_to_ten_million_per_second() {
        assert_eq!(Grid::new(10_000_000, 10).unwrap().unit(), 1);
        assert_eq!(Grid::new(1, 1).unwrap().unit(), 1);
        assert_eq!(Grid::new(10_000_001, 10).unwrap().unit(), 2);
        assert_eq!(Grid::new(u32::MAX, 10).unwrap().unit(), 512);
        assert!(Grid::new(0, 10).is_none());
    }

    proptest! {
        /// The nanosecond grid never drifts more than 1 % above the configured rate,
        /// and never below it.
        #[test]
        fn grid_rate_is_within_a_tenth_of_a_percent(per_sec in 1u32.., burst in 1u32..) {
            let g = Grid::new(per_sec, burst).unwrap();
            let t = g.quota.replenish_interval().as_nanos() as f64;
            let effective = f64::from(g.unit()) * 1e9 / t;
            prop_assert!(t >= MIN_INTERVAL_NS as f64);
            prop_assert!(effective >= f64::from(per_sec));
            prop_assert!(effective <= f64::from(per_sec) * 100.0 / 99.0);
            let burst_raw = u64::from(g.quota.burst_size().get()) * u64::from(g.unit());
            prop_assert!(burst_raw >= u64::from(burst));
            prop_assert!(burst_raw < u64::from(burst) + u64::from(g.unit()));
        }
    }

    #[test]
    fn oversized_amount_is_never_admitted() {
        let clock = FakeRelativeClock::default();
        let m = DirectMeter::new(Grid::new(10, 5).unwrap(), &clock);
        assert_eq!(
            m.check(6),
            Err(Denied::Never(Duration::from_millis(500))),
            "6 > burst 5"
        );
        assert_eq!(m.check(5), Ok(()), "the refusal charged nothing");
    }

    #[test]
    fn keyed_meter_evicts_only_idle_keys() {
        let clock = FakeRelativeClock::default();
        let m = KeyedMeter::new(Grid::new(10, 10).unwrap(), &clock);
        m.check(1, 10).unwrap();
        m.check(2, 1).unwrap();
        assert_eq!(m.len(), 2);
        // After 0.5 s key 2 (1 cell spent) is full again; key 1 (10 spent) is not.
        clock.advance(Duration::from_millis(500));
        m.retain_recent();
        assert_eq!(m.len(), 1);
        assert!(
            m.check(1, 6).is_err(),
            "key 1 kept its state: only 5 refilled"
        );
    }
}
