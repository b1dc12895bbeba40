//! Parquet sink for data teams: accepted events from `telemetry.events.v1` as Parquet
//! files partitioned by fleet and hour, with typed signal columns and every
//! provenance column (see `docs/parquet.md`).
//!
//! Guarantee: every record read is written to exactly one finished file, or counted
//! as a duplicate / undecodable, across crashes at any point. Files appear atomically
//! (temp file, fsync, rename, fsync directory); Kafka offsets are committed only up
//! to the first row not yet in a durable file ([`offsets`]); rows re-read after a
//! crash that are already in a file are recognised by its name ([`durable`]);
//! redeliveries of events written before a restart are recognised from the files
//! themselves ([`prior`]).

pub mod cli;
pub mod consumer;
pub mod durable;
pub mod layout;
pub mod offsets;
pub mod prior;
pub mod schema;
pub mod sink;
pub mod writer;

pub use cli::ParquetArgs;
pub use consumer::{run_parquet_sink, stop_on_signal, ParquetSinkOptions, RunError};
pub use schema::{default_signal_columns, EventSchema, SignalColumn, SignalKind};
pub use sink::{Outcome, ParquetSink, RollPolicy, SinkStats};
