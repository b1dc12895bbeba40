//! Command-line arguments of `fleetgate-processor parquet`, kept beside the sink so
//! `main` only dispatches.

use std::path::PathBuf;
use std::time::Duration;

use super::consumer::ParquetSinkOptions;
use super::schema::{default_signal_columns, EventSchema, SchemaError, SignalColumn};
use super::sink::RollPolicy;

/// Write accepted events to Parquet files partitioned by fleet and hour.
#[derive(Debug, Clone, clap::Args)]
pub struct ParquetArgs {
    #[arg(long, env = "FLEETGATE_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: String,
    /// Consumer group; offsets are committed only for rows in durable files.
    #[arg(long, default_value = "fleetgate-parquet")]
    pub group_id: String,
    #[arg(long, default_value = "telemetry.events.v1")]
    pub topic: String,
    /// Output root; files go to fleet=F/date=YYYY-MM-DD/hour=HH/ below it.
    #[arg(long)]
    pub out: PathBuf,
    /// Rows per file at most.
    #[arg(long, default_value_t = 100_000)]
    pub roll_rows: usize,
    /// Encoded record bytes per file at most.
    #[arg(long, default_value_t = 128 << 20)]
    pub roll_bytes: u64,
    /// A file is written once its first row is this old, however small.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub roll_age: Duration,
    /// Bytes buffered over all open files at most; past it the oldest is written.
    #[arg(long, default_value_t = 512 << 20)]
    pub max_buffered_bytes: u64,
    /// Write, commit and exit once no record arrived for this long (batch jobs, tests).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub exit_when_idle: Option<Duration>,
    /// Consumer-group session timeout.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub session_timeout: Duration,
    /// Typed signal columns as NAME:KIND (f64, i64, bool), repeatable; replaces the
    /// default catalog. Other signals go to `signals_other`.
    #[arg(long = "signal", value_name = "NAME:KIND")]
    pub signals: Vec<SignalColumn>,
    /// Crash tests only: abort right after the Nth file is renamed, before its commit.
    #[arg(long, hide = true)]
    pub abort_after_files: Option<u64>,
}

impl ParquetArgs {
    /// Validates the arguments into sink options and the file schema.
    pub fn into_options(self) -> Result<(ParquetSinkOptions, EventSchema), ArgsError> {
        if self.roll_rows == 0 || self.roll_bytes == 0 || self.max_buffered_bytes == 0 {
            return Err(ArgsError::Zero);
        }
        if self.roll_age.is_zero() {
            return Err(ArgsError::ZeroAge);
        }
        let signals = if self.signals.is_empty() {
            default_signal_columns()
        } else {
            self.signals
        };
        let schema = EventSchema::new(signals)?;
        let opts = ParquetSinkOptions {
            bootstrap_servers: self.bootstrap_servers,
            group_id: self.group_id,
            topic: self.topic,
            out: self.out,
            roll: RollPolicy {
                max_rows: self.roll_rows,
                max_bytes: self.roll_bytes,
                max_age: self.roll_age,
                max_buffered_bytes: self.max_buffered_bytes,
            },
            exit_when_idle: self.exit_when_idle,
            session_timeout: self.session_timeout,
            abort_after_files: self.abort_after_files,
        };
        Ok((opts, schema))
    }
}

/// Why the arguments cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("--roll-rows, --roll-bytes and --max-buffered-bytes must be greater than 0")]
    Zero,
    #[error("--roll-age must be greater than 0")]
    ZeroAge,
    #[error("--signal: {0}")]
    Signal(#[from] SchemaError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parquet::schema::SignalKind;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ParquetArgs,
    }

    fn parse(extra: &[&str]) -> Result<(ParquetSinkOptions, EventSchema), ArgsError> {
        let base = ["x", "--bootstrap-servers", "k:9092", "--out", "/tmp/o"];
        let cli = Cli::try_parse_from(base.iter().chain(extra)).expect("clap accepts");
        cli.args.into_options()
    }

    #[test]
    fn defaults_and_overrides() {
        let (opts, schema) = parse(&[]).unwrap();
        assert_eq!(opts.topic, "telemetry.events.v1");
        assert_eq!(opts.roll.max_age, Duration::from_secs(60));
        assert_eq!(opts.exit_when_idle, None);
        assert_eq!(schema.signals(), default_signal_columns().as_slice());

        let (opts, schema) = parse(&[
            "--roll-age",
            "5m",
            "--exit-when-idle",
            "3s",
            "--signal",
            "co2_ppm:i64",
            "--signal",
            "door_open:bool",
        ])
        .unwrap();
        assert_eq!(opts.roll.max_age, Duration::from_secs(300));
        assert_eq!(opts.exit_when_idle, Some(Duration::from_secs(3)));
        assert_eq!(
            schema.signals(),
            [
                SignalColumn::new("co2_ppm", SignalKind::I64),
                SignalColumn::new("door_open", SignalKind::Bool)
            ]
        );
    }

    #[test]
    fn unusable_values_are_refused_with_the_flag_named() {
        let err = |extra: &[&str]| parse(extra).unwrap_err().to_string();
        assert!(err(&["--roll-rows", "0"]).contains("--roll-rows"));
        assert!(err(&["--roll-age", "0s"]).contains("--roll-age"));
        assert!(err(&["--signal", "seq:i64"]).contains("--signal"));
        assert!(Cli::try_parse_from([
            "x",
            "--out",
            "o",
            "--bootstrap-servers",
            "k",
            "--signal",
            "v:f32"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "x",
            "--out",
            "o",
            "--bootstrap-servers",
            "k",
            "--roll-age",
            "soon"
        ])
        .is_err());
    }
}
