//! The only place ingest reads the wall clock; everything below the adapters takes
//! time as a parameter so tests control it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, server clock.
pub fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
