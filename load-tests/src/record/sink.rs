//! The single writer of a capture. Connections hand it decoded batches over one
//! bounded channel (a full channel makes devices wait: disk speed bounds the
//! recorder, nothing is dropped); it appends them to a body file next to the output,
//! and at the end writes header + body to `<out>.partial`, fsyncs it and renames it
//! into place, so `--out` is either absent or a complete recording. The header's
//! device count is only known at the end, which is why the body goes first.

use std::fs::File;
use std::io::{self, BufWriter, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use fleetgate_proto::TelemetryBatch;
use prost::Message;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::capture::{Capture, CaptureCounts};
use crate::recording::{RecordingError, RecordingWriter};

/// Batches waiting for the writer; beyond it connections wait to record.
pub const SINK_CAPACITY: usize = 1024;

/// A decodable batch as it arrived from an authenticated device.
#[derive(Debug)]
pub struct Captured {
    pub device_id: String,
    pub arrived: Instant,
    pub batch: TelemetryBatch,
}

/// Why the recording could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Recording {
        path: PathBuf,
        source: RecordingError,
    },
    #[error("recording writer task failed: {0}")]
    Task(String),
}

/// What ended up in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSummary {
    pub path: PathBuf,
    pub counts: CaptureCounts,
}

/// Where the capture goes and what its header says.
#[derive(Debug, Clone)]
pub struct SinkSpec {
    pub out: PathBuf,
    pub fleet_id: String,
    pub description: String,
    pub start: Instant,
    pub start_wall_ms: i64,
}

/// The writer; resolves when the recording is complete (or failed).
pub type SinkTask = JoinHandle<Result<SinkSummary, SinkError>>;

/// Creates the body file (so a bad `--out` fails before anything listens) and starts
/// the writer. It runs until every sender is dropped, then assembles the file.
pub fn spawn(spec: SinkSpec) -> Result<(mpsc::Sender<Captured>, SinkTask), SinkError> {
    let body_path = sibling(&spec.out, "body.partial");
    let body = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&body_path)
        .map_err(|source| SinkError::Io {
            path: body_path.clone(),
            source,
        })?;
    let (tx, rx) = mpsc::channel(SINK_CAPACITY);
    let task = tokio::task::spawn_blocking(move || {
        let result = write_all(&spec, body, &body_path, rx);
        let _ = std::fs::remove_file(&body_path);
        result
    });
    Ok((tx, task))
}

fn write_all(
    spec: &SinkSpec,
    body: File,
    body_path: &Path,
    mut rx: mpsc::Receiver<Captured>,
) -> Result<SinkSummary, SinkError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| SinkError::Io { path, source }
    };
    let mut capture = Capture::new(spec.start_wall_ms);
    let mut out = BufWriter::new(body);
    let mut scratch = Vec::new();
    while let Some(c) = rx.blocking_recv() {
        let since = c.arrived.saturating_duration_since(spec.start);
        let recorded = capture.record(&c.device_id, since, c.batch);
        scratch.clear();
        recorded
            .encode_length_delimited(&mut scratch)
            .expect("a Vec grows to fit any message");
        out.write_all(&scratch).map_err(io_err(body_path))?;
    }
    let mut body = out
        .into_inner()
        .map_err(|e| io_err(body_path)(e.into_error()))?;
    body.rewind().map_err(io_err(body_path))?;

    let partial = sibling(&spec.out, "partial");
    let file = File::create(&partial).map_err(io_err(&partial))?;
    let header = capture.header(&spec.fleet_id, &spec.description);
    let writer = RecordingWriter::new(BufWriter::new(file), &header)
        .and_then(RecordingWriter::finish)
        .map_err(|source| SinkError::Recording {
            path: partial.clone(),
            source,
        })?;
    let mut writer = writer;
    io::copy(&mut body, &mut writer).map_err(io_err(&partial))?;
    let file = writer
        .into_inner()
        .map_err(|e| io_err(&partial)(e.into_error()))?;
    file.sync_all().map_err(io_err(&partial))?;
    drop(file);
    std::fs::rename(&partial, &spec.out).map_err(io_err(&spec.out))?;
    // The rename itself must survive a crash too.
    if let Some(dir) = spec.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(SinkSummary {
        path: spec.out.clone(),
        counts: capture.counts(),
    })
}

/// `<out>.<suffix>` in the same directory (so the final rename never crosses
/// file systems).
fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    out.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::RecordingReader;
    use fleetgate_proto::TelemetryEvent;
    use std::time::Duration;

    fn batch(seq: u64) -> TelemetryBatch {
        TelemetryBatch {
            schema_version: 1,
            sent_at_ms: 1_000 + seq as i64,
            events: vec![TelemetryEvent {
                seq,
                captured_at_ms: 1_000,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn assembles_header_and_body_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cap.rec");
        let start = Instant::now();
        let spec = SinkSpec {
            out: out.clone(),
            fleet_id: "fleet-a".into(),
            description: "unit".into(),
            start,
            start_wall_ms: 1_000,
        };
        let (tx, task) = spawn(spec).unwrap();
        for (dev, seq, ms) in [("a", 1, 10), ("b", 1, 5), ("a", 2, 30)] {
            tx.send(Captured {
                device_id: dev.into(),
                arrived: start + Duration::from_millis(ms),
                batch: batch(seq),
            })
            .await
            .unwrap();
        }
        drop(tx);
        let summary = task.await.unwrap().unwrap();
        assert_eq!(
            summary.counts,
            CaptureCounts {
                devices: 2,
                batches: 3,
                events: 3
            }
        );
        let (header, batches) = RecordingReader::new(File::open(&out).unwrap())
            .and_then(RecordingReader::read_all)
            .unwrap();
        assert_eq!((header.fleet_id.as_str(), header.devices), ("fleet-a", 2));
        let got: Vec<(&str, u64)> = batches
            .iter()
            .map(|b| (b.device_id.as_str(), b.offset_ms))
            .collect();
        // "b" reached the writer after "a" though it arrived earlier: clamped.
        assert_eq!(got, [("a", 10), ("b", 10), ("a", 30)]);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["cap.rec"]);
    }

    #[tokio::test]
    async fn an_unwritable_destination_fails_at_start() {
        let err = spawn(SinkSpec {
            out: PathBuf::from("/nonexistent-dir/x.rec"),
            fleet_id: "f".into(),
            description: String::new(),
            start: Instant::now(),
            start_wall_ms: 0,
        })
        .unwrap_err();
        assert!(err
            .to_string()
            .contains("/nonexistent-dir/x.rec.body.partial"));
    }
}
