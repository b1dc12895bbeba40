//! Attack scenarios mixed into a replay: what each attacker sends and which reason
//! codes a correct ingest answers with. Each attacker uses its own certificate
//! (`attacker-<scenario>` in the replayed fleet), so honest devices are never
//! disturbed and must still lose nothing. Frames are built here, without I/O.

use std::fmt;
use std::str::FromStr;

use fleetgate_proto::{SessionContext, TelemetryBatch, TelemetryEvent};
use prost::Message;
use rand::SeedableRng;

use crate::generate::{SplitMix64, VehicleSim};

/// How far outside the freshness window the clock attacks are (ingest defaults: 5 min
/// past, 30 s future).
pub const CLOCK_SKEW_MS: i64 = 3_600_000;
/// Seq an attacker jumps to so that seq 1 falls below any anti-replay window
/// (ingest allows at most 2^20).
pub const FAR_SEQ: u64 = 4_000_000;

/// One scenario of `--attack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Attack {
    /// Re-send batches already accepted: inside the window, then far below it.
    ReplayedBatches,
    /// Timestamps an hour old.
    StaleClock,
    /// Timestamps an hour ahead.
    FutureClock,
    /// A payload claiming to come from another (honest) device.
    WrongDevice,
    /// A frame larger than ingest's frame limit.
    Oversized,
    /// Bytes that are not a protobuf batch.
    Malformed,
}

impl Attack {
    pub const ALL: [Attack; 6] = [
        Attack::ReplayedBatches,
        Attack::StaleClock,
        Attack::FutureClock,
        Attack::WrongDevice,
        Attack::Oversized,
        Attack::Malformed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Attack::ReplayedBatches => "replayed-batches",
            Attack::StaleClock => "stale-clock",
            Attack::FutureClock => "future-clock",
            Attack::WrongDevice => "wrong-device",
            Attack::Oversized => "oversized",
            Attack::Malformed => "malformed",
        }
    }

    /// Reason codes a correct ingest answers the probes with.
    pub const fn expected(self) -> &'static [&'static str] {
        match self {
            Attack::ReplayedBatches => &["duplicate", "replay_outside_window"],
            Attack::StaleClock => &["stale"],
            Attack::FutureClock => &["from_future"],
            Attack::WrongDevice => &["identity_mismatch"],
            Attack::Oversized => &["frame_too_large"],
            Attack::Malformed => &["decode_error"],
        }
    }

    /// The attacker's device id.
    pub fn device_id(self) -> String {
        format!("attacker-{}", self.as_str())
    }
}

impl fmt::Display for Attack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Attack {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Attack::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Attack::ALL.iter().map(|a| a.as_str()).collect();
                format!("unknown attack {s:?}: expected one of {}", names.join(", "))
            })
    }
}

/// Parses `a,b,c` (or `all`), dropping repeats.
pub fn parse_list(s: &str) -> Result<Vec<Attack>, String> {
    if s.trim() == "all" {
        return Ok(Attack::ALL.to_vec());
    }
    let mut out: Vec<Attack> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// One frame an attacker sends and whether its answers count as probe results
/// (setup frames must simply be accepted).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub frame: Vec<u8>,
    pub probe: bool,
}

/// A plausible batch of `seqs` from a vehicle, captured just before `now_ms`.
pub fn plausible_batch(
    seqs: &[u64],
    now_ms: i64,
    batch_id: u64,
    session: &SessionContext,
) -> TelemetryBatch {
    let mut rng = SplitMix64::seed_from_u64(batch_id);
    let mut sim = VehicleSim::new(&mut rng);
    let n = seqs.len() as i64;
    let events: Vec<TelemetryEvent> = seqs
        .iter()
        .enumerate()
        .map(|(i, &seq)| {
            let mut e = sim.step(&mut rng, i as u64 * 1_000, 1_000, seq);
            e.captured_at_ms = now_ms - (n - 1 - i as i64) * 1_000;
            e
        })
        .collect();
    TelemetryBatch {
        schema_version: 1,
        batch_id,
        sent_at_ms: now_ms,
        session: Some(session.clone()),
        events,
        ..Default::default()
    }
}

/// The frames of `attack`, stamped around `now_ms`. `victim` is an honest device id
/// (for `wrong-device`); `max_frame_bytes` is ingest's frame limit.
pub fn steps(
    attack: Attack,
    now_ms: i64,
    victim: &str,
    max_frame_bytes: usize,
    session: &SessionContext,
) -> Vec<Step> {
    let enc = |b: TelemetryBatch| b.encode_to_vec();
    let probe = |frame| Step { frame, probe: true };
    let setup = |frame| Step {
        frame,
        probe: false,
    };
    match attack {
        Attack::ReplayedBatches => {
            let first = enc(plausible_batch(&[1, 2, 3], now_ms, 1, session));
            vec![
                setup(first.clone()),
                // Same bytes again: inside the window, already delivered.
                probe(first.clone()),
                // Jump far ahead, then replay the first batch: below the window.
                setup(enc(plausible_batch(&[FAR_SEQ], now_ms, 2, session))),
                probe(first),
            ]
        }
        Attack::StaleClock => vec![probe(enc(plausible_batch(
            &[1, 2],
            now_ms - CLOCK_SKEW_MS,
            1,
            session,
        )))],
        Attack::FutureClock => vec![probe(enc(plausible_batch(
            &[1, 2],
            now_ms + CLOCK_SKEW_MS,
            1,
            session,
        )))],
        Attack::WrongDevice => {
            let mut b = plausible_batch(&[1, 2], now_ms, 1, session);
            b.device_id = victim.to_owned();
            vec![probe(enc(b))]
        }
        Attack::Oversized => vec![probe(vec![0u8; max_frame_bytes + 1])],
        // A field-5 length prefix pointing far past the end of the frame.
        Attack::Malformed => vec![probe(vec![0x2a, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x02])],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> SessionContext {
        SessionContext {
            software_version: "fw".into(),
            vehicle_config_id: "vc".into(),
        }
    }

    #[test]
    fn list_parses_names_and_all_and_refuses_unknown() {
        assert_eq!(parse_list("all").unwrap(), Attack::ALL.to_vec());
        assert_eq!(
            parse_list("malformed, stale-clock,malformed").unwrap(),
            vec![Attack::StaleClock, Attack::Malformed]
        );
        assert!(parse_list("stale-clock,teleport")
            .unwrap_err()
            .contains("teleport"));
    }

    #[test]
    fn frames_are_what_each_scenario_claims() {
        let now = 1_700_000_000_000;
        let s = session();
        let decode = |st: &Step| TelemetryBatch::decode(st.frame.as_slice());

        let r = steps(Attack::ReplayedBatches, now, "car-0000", 1024, &s);
        assert_eq!(r.iter().filter(|s| s.probe).count(), 2);
        assert_eq!(r[0].frame, r[1].frame);
        assert_eq!(r[1].frame, r[3].frame);
        assert_eq!(decode(&r[2]).unwrap().events[0].seq, FAR_SEQ);

        let stale = decode(&steps(Attack::StaleClock, now, "v", 1024, &s)[0]).unwrap();
        assert!(stale
            .events
            .iter()
            .all(|e| e.captured_at_ms <= now - CLOCK_SKEW_MS));
        let future = decode(&steps(Attack::FutureClock, now, "v", 1024, &s)[0]).unwrap();
        assert!(future.sent_at_ms >= now + CLOCK_SKEW_MS);

        let wrong = decode(&steps(Attack::WrongDevice, now, "car-0003", 1024, &s)[0]).unwrap();
        assert_eq!(wrong.device_id, "car-0003");

        assert_eq!(
            steps(Attack::Oversized, now, "v", 1024, &s)[0].frame.len(),
            1025
        );
        assert!(decode(&steps(Attack::Malformed, now, "v", 1024, &s)[0]).is_err());
    }
}
