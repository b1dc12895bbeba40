//! Freshness: device timestamps must fall inside a window around server time, so a
//! captured or replayed batch cannot be injected hours later, and a device with a
//! broken clock is visible. Separate limits for the past and the future.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::reject::RejectReason;

/// How far device timestamps may be from server time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FreshnessConfig {
    #[serde(with = "humantime_serde")]
    pub max_past: Duration,
    #[serde(with = "humantime_serde")]
    pub max_future: Duration,
}

impl Default for FreshnessConfig {
    fn default() -> Self {
        Self {
            max_past: Duration::from_secs(300),
            max_future: Duration::from_secs(30),
        }
    }
}

/// The window in milliseconds, checked per timestamp.
#[derive(Debug, Clone, Copy)]
pub struct FreshnessWindow {
    max_past_ms: i64,
    max_future_ms: i64,
}

impl FreshnessWindow {
    pub fn new(cfg: &FreshnessConfig) -> Self {
        Self {
            max_past_ms: cfg.max_past.as_millis().min(i64::MAX as u128) as i64,
            max_future_ms: cfg.max_future.as_millis().min(i64::MAX as u128) as i64,
        }
    }

    /// `Err(Stale | FromFuture)` when `t_ms` is outside the window around `now_ms`.
    pub fn check(&self, t_ms: i64, now_ms: i64) -> Result<(), RejectReason> {
        if t_ms < now_ms.saturating_sub(self.max_past_ms) {
            Err(RejectReason::Stale)
        } else if t_ms > now_ms.saturating_add(self.max_future_ms) {
            Err(RejectReason::FromFuture)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn accepts_exactly_the_window(offset in -1_000_000i64..1_000_000, now in 1_600_000_000_000i64..1_900_000_000_000) {
            let w = FreshnessWindow::new(&FreshnessConfig::default());
            let got = w.check(now + offset, now);
            let want = if offset < -300_000 { Err(RejectReason::Stale) }
                else if offset > 30_000 { Err(RejectReason::FromFuture) }
                else { Ok(()) };
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let w = FreshnessWindow::new(&FreshnessConfig::default());
        assert_eq!(w.check(i64::MIN, i64::MAX), Err(RejectReason::Stale));
        assert_eq!(w.check(i64::MAX, i64::MIN), Err(RejectReason::FromFuture));
    }
}
