//! Where a row's file lives: `fleet=<fleet>/date=YYYY-MM-DD/hour=HH/` (Hive style, by
//! ingest receive time in UTC) and `part-<kafka partition>-<first offset>-<last
//! offset>.parquet`. Names are a pure function of the rows' Kafka coordinates, so a
//! file can be recognised after a restart as covering exactly those offsets.
//!
//! The fleet id is escaped Hive-style (`%XX` for every byte outside `[A-Za-z0-9_-]`
//! and for `.`), so no fleet id, however hostile, can name a path outside its
//! directory.

use std::fmt;
use std::path::PathBuf;

/// The Hive partition of a row.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    pub fleet_id: String,
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
    pub hour: u8,
}

impl PartitionKey {
    pub fn new(fleet_id: &str, received_at_ms: i64) -> Self {
        let hours = received_at_ms.div_euclid(3_600_000);
        Self {
            fleet_id: fleet_id.to_owned(),
            day: hours.div_euclid(24),
            hour: hours.rem_euclid(24) as u8,
        }
    }

    /// Directory relative to the output root.
    pub fn dir(&self) -> PathBuf {
        let (y, m, d) = civil_from_days(self.day);
        PathBuf::from(format!("fleet={}", escape_fleet(&self.fleet_id)))
            .join(format!("date={y:04}-{m:02}-{d:02}"))
            .join(format!("hour={:02}", self.hour))
    }
}

/// Hive's value for an empty partition value.
const EMPTY_VALUE: &str = "__HIVE_DEFAULT_PARTITION__";

/// Escapes a fleet id for use as one path segment (readers URI-decode it back).
pub fn escape_fleet(fleet_id: &str) -> String {
    if fleet_id.is_empty() {
        return EMPTY_VALUE.to_owned();
    }
    let mut out = String::with_capacity(fleet_id.len());
    for b in fleet_id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01; Howard
/// Hinnant's `civil_from_days`.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The Kafka coordinates a file covers: every row of its Hive partition read from
/// `partition` with an offset in `first..=last` is in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileSpan {
    pub partition: i32,
    pub first: i64,
    pub last: i64,
}

impl FileSpan {
    pub fn contains(&self, partition: i32, offset: i64) -> bool {
        self.partition == partition && (self.first..=self.last).contains(&offset)
    }

    /// Parses a finished file's name; anything else (temp files, foreign files) is `None`.
    pub fn parse(file_name: &str) -> Option<Self> {
        let rest = file_name.strip_prefix("part-")?.strip_suffix(".parquet")?;
        let mut it = rest.split('-');
        let span = Self {
            partition: it.next()?.parse().ok()?,
            first: it.next()?.parse().ok()?,
            last: it.next()?.parse().ok()?,
        };
        (it.next().is_none() && span.first <= span.last).then_some(span)
    }

    /// Name of the temp file written before the rename; hidden (leading dot) so
    /// dataset readers skip it.
    pub fn temp_name(&self) -> String {
        format!(".{self}.tmp")
    }
}

impl fmt::Display for FileSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "part-{}-{}-{}.parquet",
            self.partition, self.first, self.last
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hive_directory_from_fleet_and_receive_time() {
        // 2023-11-14T22:13:20.123Z
        let key = PartitionKey::new("fleet-a", 1_700_000_000_123);
        assert_eq!(
            key.dir(),
            PathBuf::from("fleet=fleet-a/date=2023-11-14/hour=22")
        );
        let epoch = PartitionKey::new("f", 0);
        assert_eq!(
            epoch.dir(),
            PathBuf::from("fleet=f/date=1970-01-01/hour=00")
        );
        let before = PartitionKey::new("f", -1);
        assert_eq!(
            before.dir(),
            PathBuf::from("fleet=f/date=1969-12-31/hour=23")
        );
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn hostile_fleet_ids_stay_one_segment() {
        assert_eq!(escape_fleet("../etc"), "%2E%2E%2Fetc");
        assert_eq!(escape_fleet("a=b/c"), "a%3Db%2Fc");
        assert_eq!(escape_fleet(""), EMPTY_VALUE);
        assert_eq!(escape_fleet("é"), "%C3%A9");
    }

    #[test]
    fn file_names_round_trip_and_foreign_names_are_ignored() {
        let span = FileSpan {
            partition: 2,
            first: 10,
            last: 57,
        };
        assert_eq!(span.to_string(), "part-2-10-57.parquet");
        assert_eq!(FileSpan::parse(&span.to_string()), Some(span));
        assert!(span.contains(2, 10) && span.contains(2, 57));
        assert!(!span.contains(2, 58) && !span.contains(1, 20));
        for name in [
            ".part-2-10-57.parquet.tmp",
            "part-2-10.parquet",
            "part-2-10-57-1.parquet",
            "part-2-57-10.parquet",
            "part-x-1-2.parquet",
            "_SUCCESS",
        ] {
            assert_eq!(FileSpan::parse(name), None, "{name}");
        }
    }

    proptest! {
        #[test]
        fn escaped_fleet_is_a_single_safe_segment(fleet in ".{0,40}") {
            let seg = escape_fleet(&fleet);
            prop_assert!(!seg.is_empty() && seg != "." && seg != "..");
            prop_assert!(seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-%".contains(&b)));
        }

        #[test]
        fn days_are_consecutive_calendar_dates(day in -800_000i64..800_000) {
            let (y, m, d) = civil_from_days(day);
            let (y2, m2, d2) = civil_from_days(day + 1);
            prop_assert!((1..=12).contains(&m) && (1..=31).contains(&d));
            let next_ok = (y2, m2, d2) == (y, m, d + 1)
                || (d2 == 1 && ((y2, m2) == (y, m + 1) || (y2, m2, m) == (y + 1, 1, 12)));
            prop_assert!(next_ok, "{:?} -> {:?}", (y, m, d), (y2, m2, d2));
        }
    }
}
