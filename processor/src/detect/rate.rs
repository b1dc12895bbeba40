//! `rate_spike`: a device sending far more events than its own baseline (a flooding
//! or looping ECU, a stolen credential used for bulk injection).
//!
//! Arrivals are counted per `bucket` of ingest time. The baseline is an EWMA of past
//! bucket counts, each clamped at the threshold so one flood cannot teach the baseline
//! that floods are normal. Nothing fires before `warmup_buckets` buckets were seen; a
//! bucket fires at most once, as soon as its count exceeds
//! `max(baseline × factor, min_events)`. Backlog (events captured more than
//! `backlog_lag` before they arrived, e.g. uploaded after a tunnel) is not counted:
//! it is catching up, not a higher rate.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    positive, Coords, Detector, DetectorKind, FindingDraft, Observed, StateConfig, StateTable,
};
use crate::dedupe::DeviceKey;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateSpikeConfig {
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub bucket: Duration,
    /// EWMA weight of the newest bucket, in (0, 1].
    pub alpha: f64,
    pub warmup_buckets: u32,
    /// How many times the baseline a bucket must exceed.
    pub factor: f64,
    /// A bucket with at most this many events never fires.
    pub min_events: u32,
    #[serde(with = "humantime_serde")]
    pub backlog_lag: Duration,
}

impl Default for RateSpikeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bucket: Duration::from_secs(10),
            alpha: 0.2,
            warmup_buckets: 6,
            factor: 5.0,
            min_events: 50,
            backlog_lag: Duration::from_secs(30),
        }
    }
}

impl RateSpikeConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.bucket < Duration::from_millis(100) {
            return Err("detectors.rate_spike.bucket must be at least 100ms".into());
        }
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return Err("detectors.rate_spike.alpha must be in (0, 1]".into());
        }
        positive("detectors.rate_spike.factor", self.factor)
    }
}

#[derive(Debug)]
struct DeviceRate {
    bucket: i64,
    count: u32,
    baseline: f64,
    buckets_seen: u32,
    fired: bool,
    first: Option<(Coords, u64, i64)>,
}

/// Per-device arrival counts and baselines.
#[derive(Debug)]
pub struct RateSpike {
    cfg: RateSpikeConfig,
    devices: StateTable<DeviceKey, DeviceRate>,
}

impl RateSpike {
    pub fn new(cfg: RateSpikeConfig, state: &StateConfig) -> Self {
        Self {
            cfg,
            devices: state.table(),
        }
    }
}

impl Detector for RateSpike {
    fn kind(&self) -> DetectorKind {
        DetectorKind::RateSpike
    }

    fn tracked(&self) -> usize {
        self.devices.len()
    }

    fn observe(&mut self, obs: &Observed<'_>, out: &mut Vec<FindingDraft>) {
        let Some(event) = obs.event() else { return };
        let now = obs.received_at_ms();
        if now - event.captured_at_ms > self.cfg.backlog_lag.as_millis() as i64 {
            return;
        }
        let bucket_ms = self.cfg.bucket.as_millis() as i64;
        let idx = now.div_euclid(bucket_ms);
        let (alpha, factor, min_events) = (self.cfg.alpha, self.cfg.factor, self.cfg.min_events);
        let threshold = |baseline: f64| (baseline * factor).max(f64::from(min_events));
        let d = self.devices.entry(obs.device, now, || DeviceRate {
            bucket: idx,
            count: 0,
            baseline: 0.0,
            buckets_seen: 0,
            fired: false,
            first: None,
        });
        if idx > d.bucket {
            let done = f64::from(d.count).min(threshold(d.baseline));
            d.baseline = if d.buckets_seen == 0 {
                done
            } else {
                d.baseline + alpha * (done - d.baseline)
            };
            // Empty buckets in between pull the baseline towards zero.
            let empty = (idx - d.bucket - 1).min(i64::from(u16::MAX)) as i32;
            d.baseline *= (1.0 - alpha).powi(empty);
            d.buckets_seen = d.buckets_seen.saturating_add(1 + empty as u32);
            d.bucket = idx;
            d.count = 0;
            d.fired = false;
            d.first = None;
        }
        d.count = d.count.saturating_add(1);
        if d.first.is_none() {
            d.first = Some((obs.coords.clone(), obs.seq(), now));
        }
        let limit = threshold(d.baseline);
        if d.fired || d.buckets_seen < self.cfg.warmup_buckets || f64::from(d.count) <= limit {
            return;
        }
        d.fired = true;
        let count = f64::from(d.count);
        let mut evidence = Vec::with_capacity(2);
        let mut first_at = now;
        if let Some((coords, seq, at)) = &d.first {
            let mut e = obs.evidence(
                "events_per_bucket",
                count,
                limit,
                "first event of the bucket".into(),
            );
            e.topic = coords.topic.to_string();
            e.partition = coords.partition;
            e.offset = coords.offset;
            e.seq = *seq;
            evidence.push(e);
            first_at = *at;
        }
        evidence.push(obs.evidence(
            "events_per_bucket",
            count,
            limit,
            "event that crossed the threshold".into(),
        ));
        let baseline = d.baseline;
        out.push(FindingDraft::device(
            DetectorKind::RateSpike,
            obs,
            format!(
                "{count} events in {:?} vs baseline {baseline:.1} (limit {limit:.1})",
                self.cfg.bucket
            ),
            evidence,
            first_at,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testkit::*;

    fn detector() -> RateSpike {
        RateSpike::new(RateSpikeConfig::default(), &StateConfig::default())
    }

    /// `per_sec` events per second of device `dev` for `secs` seconds from `t0`.
    fn steady(dev: &str, t0: i64, secs: i64, per_sec: i64, seq0: u64) -> Vec<Rec> {
        (0..secs * per_sec)
            .map(|i| event(dev, seq0 + i as u64, t0 + i * 1000 / per_sec))
            .collect()
    }

    #[test]
    fn steady_rate_never_spikes() {
        let recs = steady("car", 0, 3600, 4, 0);
        assert!(run(&mut detector(), &recs).is_empty());
    }

    #[test]
    fn burst_after_warmup_fires_once_per_bucket() {
        let mut recs = steady("car", 0, 120, 1, 0);
        // 400 events within one second at t = 125 s.
        recs.extend((0..400).map(|i| event("car", 1000 + i, 125_000 + i as i64 * 2)));
        let f = run(&mut detector(), &recs);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].detector, DetectorKind::RateSpike);
        assert_eq!(f[0].evidence[0].seq, 1000);
        assert_eq!(f[0].evidence[1].value, 51.0);
    }

    #[test]
    fn no_finding_during_warmup() {
        let recs: Vec<_> = (0..400).map(|i| event("car", i, i as i64 * 2)).collect();
        assert!(run(&mut detector(), &recs).is_empty());
    }

    #[test]
    fn backlog_after_a_tunnel_is_not_a_spike() {
        let mut recs = steady("car", 0, 120, 1, 0);
        // Three minutes captured in the tunnel, uploaded within one second.
        recs.extend((0..180).map(|i| {
            event("car", 200 + i, 300_000 + i as i64 * 5).captured(120_000 + i as i64 * 1000)
        }));
        assert!(run(&mut detector(), &recs).is_empty());
    }
}
