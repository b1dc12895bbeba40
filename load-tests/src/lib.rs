//! Pure parts of the load generator: synthetic vehicles and the run report. The
//! network side lives in the binary so these stay testable without sockets.

pub mod drive;
pub mod report;
