//! `(device, seq)` of rows already in files when this process first touched their
//! directory, so a redelivered event whose original was written before a restart (and
//! whose Kafka record is not re-read) is still recognised as a duplicate.
//!
//! The in-memory [`crate::Deduplicator`] only knows what this process consumed. A
//! retry racing an ack is re-stamped by ingest moments later, so its original is in
//! the same or the previous hour's directory; both are read on first touch. Seqs are
//! kept sorted per device (8 bytes per prior row, only for directories that existed
//! at start-up or rebalance) and never advance the dedupe window, so loading newer
//! rows cannot make an older, unwritten record look too old.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::UInt64Type;
use arrow_array::Array;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use parquet::errors::ParquetError;

use super::layout::{FileSpan, PartitionKey};
use crate::dedupe::DeviceKey;

/// Why a directory's existing files could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PriorError {
    #[error("listing {path}: {source}")]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: ParquetError,
    },
    #[error("{path}: column {column} missing or of an unexpected type")]
    Column { path: PathBuf, column: &'static str },
}

/// Sorted seqs per device from files found on disk.
#[derive(Debug, Default)]
pub struct PriorRows {
    seqs: HashMap<DeviceKey, Vec<u64>>,
    loaded: HashSet<PartitionKey>,
}

impl PriorRows {
    /// Reads the finished files of `key`'s directory under `root` unless already done.
    pub fn load(&mut self, root: &Path, key: &PartitionKey) -> Result<(), PriorError> {
        if self.loaded.contains(key) {
            return Ok(());
        }
        self.loaded.insert(key.clone());
        let full = root.join(key.dir());
        let entries = match std::fs::read_dir(&full) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(PriorError::List { path: full, source }),
        };
        let mut touched = HashSet::new();
        for entry in entries {
            let entry = entry.map_err(|source| PriorError::List {
                path: full.clone(),
                source,
            })?;
            let name = entry.file_name();
            if name.to_str().and_then(FileSpan::parse).is_none() {
                continue;
            }
            for (key, seq) in read_keys(&entry.path())? {
                self.seqs.entry(key.clone()).or_default().push(seq);
                touched.insert(key);
            }
        }
        for key in touched {
            let seqs = self.seqs.get_mut(&key).expect("just inserted");
            seqs.sort_unstable();
            seqs.dedup();
        }
        Ok(())
    }

    pub fn contains(&self, device: &DeviceKey, seq: u64) -> bool {
        self.seqs
            .get(device)
            .is_some_and(|s| s.binary_search(&seq).is_ok())
    }

    /// Forgets everything (after a rebalance the files may have changed).
    pub fn clear(&mut self) {
        self.seqs.clear();
        self.loaded.clear();
    }
}

fn read_keys(path: &Path) -> Result<Vec<(DeviceKey, u64)>, PriorError> {
    let read = |source| PriorError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(|e| read(ParquetError::External(Box::new(e))))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(read)?;
    let mask = ProjectionMask::columns(builder.parquet_schema(), ["fleet_id", "device_id", "seq"]);
    let reader = builder.with_projection(mask).build().map_err(read)?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| read(ParquetError::ArrowError(e.to_string())))?;
        let column = |column: &'static str| {
            batch.column_by_name(column).ok_or(PriorError::Column {
                path: path.to_owned(),
                column,
            })
        };
        let bad = |column| PriorError::Column {
            path: path.to_owned(),
            column,
        };
        let fleets = column("fleet_id")?
            .as_string_opt::<i32>()
            .ok_or_else(|| bad("fleet_id"))?;
        let devices = column("device_id")?
            .as_string_opt::<i32>()
            .ok_or_else(|| bad("device_id"))?;
        let seqs = column("seq")?
            .as_primitive_opt::<UInt64Type>()
            .ok_or_else(|| bad("seq"))?;
        for i in 0..batch.num_rows() {
            if seqs.is_valid(i) {
                out.push((
                    DeviceKey::new(fleets.value(i), devices.value(i)),
                    seqs.value(i),
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parquet::schema::{default_signal_columns, EventSchema, Row};
    use crate::parquet::writer::{write_durable, writer_properties};
    use fleetgate_proto::{Provenance, TelemetryEnvelope};

    #[test]
    fn loads_device_seqs_from_finished_files_once() {
        let root = tempfile::tempdir().unwrap();
        let schema = EventSchema::new(default_signal_columns()).unwrap();
        let rows: Vec<Row> = [(7u64, "d1"), (3, "d1"), (9, "d2")]
            .iter()
            .enumerate()
            .map(|(i, (seq, dev))| Row {
                envelope: TelemetryEnvelope {
                    event: None,
                    provenance: Some(Provenance {
                        fleet_id: "a".into(),
                        device_id: dev.to_string(),
                        seq: *seq,
                        ..Default::default()
                    }),
                },
                partition: 0,
                offset: i as i64,
            })
            .collect();
        let key = PartitionKey::new("a", 0);
        let dir = &key.dir();
        let batch = schema.to_batch("t", &rows).unwrap();
        let span = FileSpan {
            partition: 0,
            first: 0,
            last: 2,
        };
        write_durable(root.path(), dir, span, &batch, writer_properties()).unwrap();

        let mut prior = PriorRows::default();
        prior.load(root.path(), &key).unwrap();
        prior
            .load(root.path(), &PartitionKey::new("a", 3_600_000))
            .unwrap();
        let d1 = DeviceKey::new("a", "d1");
        assert!(prior.contains(&d1, 3) && prior.contains(&d1, 7));
        assert!(!prior.contains(&d1, 9) && !prior.contains(&DeviceKey::new("b", "d1"), 3));
        assert!(prior.contains(&DeviceKey::new("a", "d2"), 9));
        // A second load of the same directory does not duplicate state.
        prior.load(root.path(), &key).unwrap();
        assert_eq!(prior.seqs[&d1], vec![3, 7]);
        prior.clear();
        assert!(!prior.contains(&d1, 3));
    }
}
