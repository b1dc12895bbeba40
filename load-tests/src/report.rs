//! What a load run did, per device and in total, as text and JSON. Accepted plus
//! rejected plus unacknowledged always equals events sent.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// What happened to one device's events.
#[derive(Debug, Clone, Default)]
pub struct DeviceOutcome {
    pub batches: u64,
    pub events_sent: u64,
    pub accepted: u64,
    /// Reason code -> events not accepted for it (including retries given up on).
    pub rejected: BTreeMap<String, u64>,
    /// Events re-sent after a RETRY verdict.
    pub retried: u64,
    /// Times the device re-established its connection after it failed.
    pub reconnects: u64,
    /// Ack latency of every batch attempt.
    pub latencies: Vec<Duration>,
    /// Connection or stream failure that stopped this device early.
    pub error: Option<String>,
}

impl DeviceOutcome {
    /// Events not accepted, over every reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// Nearest-rank percentiles of `samples`.
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let rank = |q: f64| {
            let idx = ((q * samples.len() as f64).ceil() as usize).saturating_sub(1);
            samples.get(idx).copied().map_or(0.0, ms)
        };
        Self {
            samples: samples.len(),
            p50_ms: rank(0.50),
            p90_ms: rank(0.90),
            p99_ms: rank(0.99),
            max_ms: samples.last().copied().map_or(0.0, ms),
        }
    }
}

/// The final report of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub fleet: String,
    /// `grpc` or `quic`.
    pub transport: String,
    pub devices: usize,
    pub devices_failed: usize,
    pub batches: u64,
    pub events_sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub retried: u64,
    pub reconnects: u64,
    pub batch_ack_latency: Latency,
    pub elapsed_s: f64,
    pub events_per_s: f64,
    pub errors: Vec<String>,
    /// Attack scenarios mixed into a replay (absent when none ran).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attacks: Vec<AttackResult>,
}

/// What one attack scenario expected ingest to answer and what it answered.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AttackResult {
    pub scenario: String,
    /// Any of these reason codes is a correct answer.
    pub expected: Vec<String>,
    /// Reason code (or `accepted`) -> number of probe events or frames answered so.
    pub received: BTreeMap<String, u64>,
    /// Set when the attacker could not connect or a setup step failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AttackResult {
    /// True when every probe got one of the expected reasons (and at least one did).
    pub fn as_expected(&self) -> bool {
        self.error.is_none()
            && !self.received.is_empty()
            && self.received.keys().all(|r| self.expected.contains(r))
    }
}

impl Report {
    pub fn new(
        fleet: &str,
        transport: &str,
        outcomes: Vec<DeviceOutcome>,
        elapsed: Duration,
    ) -> Self {
        let mut r = Report {
            fleet: fleet.to_owned(),
            transport: transport.to_owned(),
            devices: outcomes.len(),
            elapsed_s: elapsed.as_secs_f64(),
            ..Report::default()
        };
        let mut latencies = Vec::new();
        for o in outcomes {
            r.batches += o.batches;
            r.events_sent += o.events_sent;
            r.accepted += o.accepted;
            r.retried += o.retried;
            r.reconnects += o.reconnects;
            for (reason, n) in o.rejected {
                r.rejected += n;
                *r.rejected_by_reason.entry(reason).or_default() += n;
            }
            latencies.extend(o.latencies);
            if let Some(e) = o.error {
                r.devices_failed += 1;
                r.errors.push(e);
            }
        }
        r.batch_ack_latency = Latency::of(&mut latencies);
        if r.elapsed_s > 0.0 {
            r.events_per_s = r.accepted as f64 / r.elapsed_s;
        }
        r
    }

    /// True when every event sent was accepted and no device failed.
    pub fn all_accepted(&self) -> bool {
        self.devices_failed == 0 && self.accepted == self.events_sent
    }

    /// True when every attack scenario got only its expected reasons.
    pub fn attacks_as_expected(&self) -> bool {
        self.attacks.iter().all(AttackResult::as_expected)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.batch_ack_latency;
        writeln!(f, "fleet {} over {}", self.fleet, self.transport)?;
        writeln!(
            f,
            "  devices        {} ({} failed)",
            self.devices, self.devices_failed
        )?;
        writeln!(f, "  batches        {}", self.batches)?;
        writeln!(f, "  events sent    {}", self.events_sent)?;
        writeln!(f, "  accepted       {}", self.accepted)?;
        writeln!(f, "  rejected       {}", self.rejected)?;
        for (reason, n) in &self.rejected_by_reason {
            writeln!(f, "    {reason:<20} {n}")?;
        }
        writeln!(f, "  retried        {}", self.retried)?;
        writeln!(f, "  reconnects     {}", self.reconnects)?;
        writeln!(
            f,
            "  ack latency    p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} batches)",
            l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.samples
        )?;
        writeln!(
            f,
            "  throughput     {:.0} events/s over {:.2} s",
            self.events_per_s, self.elapsed_s
        )?;
        for e in &self.errors {
            writeln!(f, "  error: {e}")?;
        }
        if !self.attacks.is_empty() {
            writeln!(
                f,
                "  attacks (honest loss {})",
                self.events_sent - self.accepted
            )?;
        }
        for a in &self.attacks {
            let got: Vec<String> = a.received.iter().map(|(r, n)| format!("{r}={n}")).collect();
            writeln!(
                f,
                "    {:<18} {:<4} expected {} got {}{}",
                a.scenario,
                if a.as_expected() { "ok" } else { "FAIL" },
                a.expected.join("|"),
                if got.is_empty() {
                    "nothing".into()
                } else {
                    got.join(",")
                },
                a.error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(&mut v);
        assert_eq!(
            (l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(Latency::of(&mut []), Latency::default());
    }

    #[test]
    fn totals_add_up_and_failures_are_not_all_accepted() {
        let ok = DeviceOutcome {
            batches: 2,
            events_sent: 10,
            accepted: 10,
            ..Default::default()
        };
        let mut bad = ok.clone();
        bad.accepted = 8;
        bad.rejected.insert("delivery_failed".into(), 2);
        let r = Report::new("f", "grpc", vec![ok.clone(), bad], Duration::from_secs(1));
        assert_eq!((r.events_sent, r.accepted, r.rejected), (20, 18, 2));
        assert!(!r.all_accepted());
        assert_eq!(r.transport, "grpc");
        assert!(Report::new("f", "quic", vec![ok], Duration::from_secs(1)).all_accepted());
    }

    #[test]
    fn attack_passes_only_with_expected_reasons() {
        let mut a = AttackResult {
            scenario: "stale-clock".into(),
            expected: vec!["stale".into()],
            ..Default::default()
        };
        assert!(!a.as_expected(), "no answer is not a pass");
        a.received.insert("stale".into(), 3);
        assert!(a.as_expected());
        a.received.insert("accepted".into(), 1);
        assert!(!a.as_expected());
    }
}
