//! Pure parts of the load generator: synthetic vehicles, the recording format, the
//! fleet generator, replay timing and the run report. The network side of fleet and
//! replay lives in the binary so these stay testable without sockets; `record` (the
//! recording proxy) is the exception, with its pure core in `record::capture`.

pub mod attack;
pub mod credentials;
pub mod drive;
pub mod generate;
pub mod raw;
pub mod record;
pub mod recording;
pub mod replay_plan;
pub mod report;
