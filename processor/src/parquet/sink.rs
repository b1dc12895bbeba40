//! The sink's core, without Kafka: takes records with their coordinates, dedupes,
//! buffers them per (Kafka partition, Hive directory), rolls buffers into durable files
//! by rows, bytes and age, and says which offsets may be committed. Time is a
//! parameter so rolling is tested without clocks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleetgate_proto::TelemetryEnvelope;
use prost::Message;
use serde::Serialize;

use super::durable::DurableIndex;
use super::layout::{FileSpan, PartitionKey};
use super::offsets::CommitTracker;
use super::prior::{PriorError, PriorRows};
use super::schema::{EventSchema, Row};
use super::writer::{write_durable, writer_properties, WriteError};
use crate::dedupe::{Deduplicator, DeviceKey, Seen};

/// When a buffer becomes a file.
#[derive(Debug, Clone)]
pub struct RollPolicy {
    /// Rows per file at most.
    pub max_rows: usize,
    /// Encoded record bytes per file at most (an estimate of the file's raw size).
    pub max_bytes: u64,
    /// Age of a buffer's first row after which it is written regardless of size.
    pub max_age: Duration,
    /// Encoded bytes buffered over all open files; past it the oldest is written.
    pub max_buffered_bytes: u64,
}

impl Default for RollPolicy {
    fn default() -> Self {
        Self {
            max_rows: 100_000,
            max_bytes: 128 << 20,
            max_age: Duration::from_secs(60),
            max_buffered_bytes: 512 << 20,
        }
    }
}

/// Why the sink stopped.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("listing {dir}: {source}")]
    List {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("building record batch: {0}")]
    Batch(#[from] arrow_schema::ArrowError),
    #[error(transparent)]
    Prior(#[from] PriorError),
}

/// What happened to one consumed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Buffered,
    /// Already in a finished file (re-read after a crash before the commit).
    AlreadyDurable,
    /// Same `(fleet, device, seq)` as a record already taken.
    Duplicate,
    /// Too far behind its device's newest seq to be proven fresh; dropped like
    /// everywhere else in the processor.
    TooOld,
    /// Not a `TelemetryEnvelope` with provenance; counted and skipped.
    Undecodable,
}

/// Counters over the sink's life, printed as JSON on exit.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct SinkStats {
    pub records: u64,
    pub rows_written: u64,
    pub files_written: u64,
    pub bytes_written: u64,
    pub already_durable: u64,
    pub duplicates: u64,
    pub too_old: u64,
    pub undecodable: u64,
    pub dropped_on_revoke: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BufferKey {
    partition: i32,
    key: PartitionKey,
}

#[derive(Debug)]
struct Buffer {
    rows: Vec<Row>,
    bytes: u64,
    opened_at: Instant,
}

/// A file that was made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    pub path: PathBuf,
    pub rows: usize,
    pub bytes: u64,
}

/// Buffers, dedupe state and commit bookkeeping of one sink instance.
#[derive(Debug)]
pub struct ParquetSink {
    root: PathBuf,
    topic: String,
    schema: EventSchema,
    roll: RollPolicy,
    buffers: HashMap<BufferKey, Buffer>,
    buffered_bytes: u64,
    commits: CommitTracker,
    durable: DurableIndex,
    dedupe: Deduplicator,
    prior: PriorRows,
    stats: SinkStats,
}

impl ParquetSink {
    pub fn new(
        root: impl Into<PathBuf>,
        topic: &str,
        schema: EventSchema,
        roll: RollPolicy,
    ) -> Self {
        let root = root.into();
        Self {
            durable: DurableIndex::new(&root),
            root,
            topic: topic.to_owned(),
            schema,
            roll,
            buffers: HashMap::new(),
            buffered_bytes: 0,
            commits: CommitTracker::new(),
            dedupe: Deduplicator::new(),
            prior: PriorRows::default(),
            stats: SinkStats::default(),
        }
    }

    pub fn stats(&self) -> &SinkStats {
        &self.stats
    }

    /// Takes one record; writes the files that became due because of it.
    pub fn offer(
        &mut self,
        partition: i32,
        offset: i64,
        payload: Option<&[u8]>,
        now: Instant,
    ) -> Result<(Outcome, Vec<WrittenFile>), SinkError> {
        self.stats.records += 1;
        self.commits.consumed(partition, offset);
        let envelope = payload.and_then(|p| TelemetryEnvelope::decode(p).ok());
        let Some(envelope) = envelope.filter(|e| e.provenance.is_some()) else {
            self.stats.undecodable += 1;
            return Ok((Outcome::Undecodable, Vec::new()));
        };
        let prov = envelope.provenance.as_ref().expect("filtered above");
        let key = PartitionKey::new(&prov.fleet_id, prov.received_at_ms);
        let device = DeviceKey::new(prov.fleet_id.as_str(), prov.device_id.as_str());
        let seq = prov.seq;
        let durable = self
            .durable
            .covers(&key, partition, offset)
            .map_err(|source| SinkError::List {
                dir: self.root.join(key.dir()),
                source,
            })?;
        if durable {
            // Still seen, so a later redelivery of the same event is dropped.
            self.dedupe.observe(&device, seq);
            self.stats.already_durable += 1;
            return Ok((Outcome::AlreadyDurable, Vec::new()));
        }
        // The original of a redelivery may be in a file written before a restart,
        // in this hour or the previous one.
        let previous = PartitionKey::new(
            &device.fleet_id,
            prov.received_at_ms.saturating_sub(3_600_000),
        );
        self.prior.load(&self.root, &key)?;
        self.prior.load(&self.root, &previous)?;
        if self.prior.contains(&device, seq) {
            self.stats.duplicates += 1;
            return Ok((Outcome::Duplicate, Vec::new()));
        }
        match self.dedupe.observe(&device, seq) {
            Seen::Fresh => {}
            Seen::Duplicate => {
                self.stats.duplicates += 1;
                return Ok((Outcome::Duplicate, Vec::new()));
            }
            Seen::TooOld => {
                self.stats.too_old += 1;
                return Ok((Outcome::TooOld, Vec::new()));
            }
        }
        let bytes = payload.map_or(0, |p| p.len() as u64);
        let bkey = BufferKey { partition, key };
        if !self.buffers.contains_key(&bkey) {
            self.commits.opened(partition, offset);
            let fresh = Buffer {
                rows: Vec::new(),
                bytes: 0,
                opened_at: now,
            };
            self.buffers.insert(bkey.clone(), fresh);
        }
        let buffer = self.buffers.get_mut(&bkey).expect("inserted above");
        buffer.rows.push(Row {
            envelope,
            partition,
            offset,
        });
        buffer.bytes += bytes;
        self.buffered_bytes += bytes;
        let full = buffer.rows.len() >= self.roll.max_rows || buffer.bytes >= self.roll.max_bytes;
        let mut written = Vec::new();
        if full {
            written.push(self.flush(&bkey)?);
        }
        while self.buffered_bytes > self.roll.max_buffered_bytes {
            let Some(oldest) = self.oldest() else { break };
            written.push(self.flush(&oldest)?);
        }
        Ok((Outcome::Buffered, written))
    }

    /// Writes every buffer older than the roll age.
    pub fn flush_due(&mut self, now: Instant) -> Result<Vec<WrittenFile>, SinkError> {
        let due: Vec<BufferKey> = self
            .buffers
            .iter()
            .filter(|(_, b)| now.saturating_duration_since(b.opened_at) >= self.roll.max_age)
            .map(|(k, _)| k.clone())
            .collect();
        due.iter().map(|k| self.flush(k)).collect()
    }

    /// Writes every buffer (shutdown, idle exit).
    pub fn flush_all(&mut self) -> Result<Vec<WrittenFile>, SinkError> {
        let all: Vec<BufferKey> = self.buffers.keys().cloned().collect();
        all.iter().map(|k| self.flush(k)).collect()
    }

    /// Offsets to commit now: per partition, nothing past an unwritten row.
    pub fn pending_commits(&self) -> Vec<(i32, i64)> {
        self.commits.pending_commits()
    }

    pub fn committed(&mut self, partition: i32, offset: i64) {
        self.commits.committed(partition, offset);
    }

    /// Partitions were revoked: their buffered rows are dropped unwritten (the next
    /// owner re-reads them from the last commit), and nothing is committed for them.
    pub fn revoke(&mut self, partitions: &[i32]) {
        let before = self.buffers.len();
        let mut dropped = 0;
        self.buffers.retain(|k, b| {
            let keep = !partitions.contains(&k.partition);
            if !keep {
                dropped += b.rows.len() as u64;
                self.buffered_bytes -= b.bytes;
            }
            keep
        });
        debug_assert!(self.buffers.len() <= before);
        self.stats.dropped_on_revoke += dropped;
        for &p in partitions {
            self.commits.forget(p);
        }
    }

    /// Partitions were assigned: files on disk may have changed under us.
    pub fn assigned(&mut self) {
        self.durable.clear();
        self.prior.clear();
    }

    fn oldest(&self) -> Option<BufferKey> {
        self.buffers
            .iter()
            .min_by_key(|(_, b)| b.opened_at)
            .map(|(k, _)| k.clone())
    }

    fn flush(&mut self, key: &BufferKey) -> Result<WrittenFile, SinkError> {
        let buffer = self
            .buffers
            .remove(key)
            .expect("flush is only called for open buffers");
        self.buffered_bytes -= buffer.bytes;
        let first = buffer.rows.first().map_or(0, |r| r.offset);
        let span = FileSpan {
            partition: key.partition,
            first,
            last: buffer.rows.last().map_or(first, |r| r.offset),
        };
        let batch = self.schema.to_batch(&self.topic, &buffer.rows)?;
        let (path, bytes) = write_durable(
            &self.root,
            &key.key.dir(),
            span,
            &batch,
            writer_properties(),
        )?;
        self.durable.add(&key.key, span);
        self.commits.closed(key.partition, first);
        self.stats.files_written += 1;
        self.stats.rows_written += buffer.rows.len() as u64;
        self.stats.bytes_written += bytes;
        Ok(WrittenFile {
            path,
            rows: buffer.rows.len(),
            bytes,
        })
    }

    /// Root directory of the files.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parquet::schema::default_signal_columns;
    use fleetgate_proto::{Provenance, TelemetryEvent};

    const HOUR: i64 = 3_600_000;

    fn payload(fleet: &str, device: &str, seq: u64, received_at_ms: i64) -> Vec<u8> {
        TelemetryEnvelope {
            event: Some(TelemetryEvent {
                seq,
                ..Default::default()
            }),
            provenance: Some(Provenance {
                fleet_id: fleet.into(),
                device_id: device.into(),
                seq,
                received_at_ms,
                ..Default::default()
            }),
        }
        .encode_to_vec()
    }

    fn sink(root: &Path, max_rows: usize) -> ParquetSink {
        let roll = RollPolicy {
            max_rows,
            max_age: Duration::from_secs(60),
            ..RollPolicy::default()
        };
        ParquetSink::new(
            root,
            "t",
            EventSchema::new(default_signal_columns()).unwrap(),
            roll,
        )
    }

    fn files(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_owned()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p.strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn rolls_by_rows_and_commits_only_past_written_rows() {
        let root = tempfile::tempdir().unwrap();
        let mut s = sink(root.path(), 2);
        let now = Instant::now();
        // Partition 0 interleaves fleets a and b in the same hour.
        let (o, w) = s.offer(0, 0, Some(&payload("a", "d1", 1, 0)), now).unwrap();
        assert_eq!((o, w.len()), (Outcome::Buffered, 0));
        s.offer(0, 1, Some(&payload("b", "d2", 1, 0)), now).unwrap();
        assert_eq!(s.pending_commits(), vec![(0, 0)]);
        let (_, w) = s.offer(0, 2, Some(&payload("a", "d1", 2, 0)), now).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].rows, 2);
        // Fleet a's rows 0 and 2 are written, fleet b's row 1 is not: commit stays at 1.
        assert_eq!(s.pending_commits(), vec![(0, 1)]);
        s.committed(0, 1);
        let w = s.flush_all().unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(s.pending_commits(), vec![(0, 3)]);
        assert_eq!(
            files(root.path()),
            vec![
                "fleet=a/date=1970-01-01/hour=00/part-0-0-2.parquet",
                "fleet=b/date=1970-01-01/hour=00/part-0-1-1.parquet",
            ]
        );
    }

    #[test]
    fn hours_split_files_and_age_rolls_them() {
        let root = tempfile::tempdir().unwrap();
        let mut s = sink(root.path(), 100);
        let t0 = Instant::now();
        s.offer(1, 7, Some(&payload("a", "d1", 1, HOUR - 1)), t0)
            .unwrap();
        s.offer(
            1,
            8,
            Some(&payload("a", "d1", 2, HOUR)),
            t0 + Duration::from_secs(30),
        )
        .unwrap();
        assert!(s
            .flush_due(t0 + Duration::from_secs(59))
            .unwrap()
            .is_empty());
        let w = s.flush_due(t0 + Duration::from_secs(60)).unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0]
            .path
            .ends_with("fleet=a/date=1970-01-01/hour=00/part-1-7-7.parquet"));
        assert_eq!(s.pending_commits(), vec![(1, 8)]);
        let w = s.flush_due(t0 + Duration::from_secs(90)).unwrap();
        assert!(w[0]
            .path
            .ends_with("fleet=a/date=1970-01-01/hour=01/part-1-8-8.parquet"));
    }

    #[test]
    fn duplicates_garbage_and_rewrites_after_restart_are_skipped() {
        let root = tempfile::tempdir().unwrap();
        let now = Instant::now();
        let mut s = sink(root.path(), 2);
        s.offer(0, 0, Some(&payload("a", "d1", 1, 0)), now).unwrap();
        let (o, _) = s.offer(0, 1, Some(&payload("a", "d1", 1, 0)), now).unwrap();
        assert_eq!(o, Outcome::Duplicate);
        let (o, _) = s.offer(0, 2, Some(b"\xff\xff garbage"), now).unwrap();
        assert_eq!(o, Outcome::Undecodable);
        let (o, _) = s.offer(0, 3, None, now).unwrap();
        assert_eq!(o, Outcome::Undecodable);
        let (_, w) = s.offer(0, 4, Some(&payload("a", "d1", 2, 0)), now).unwrap();
        assert_eq!(w.len(), 1);
        // Crash before the commit: a new instance re-reads from offset 0.
        let mut s2 = sink(root.path(), 2);
        for (off, seq) in [(0, 1), (1, 1), (4, 2)] {
            let (o, _) = s2
                .offer(0, off, Some(&payload("a", "d1", seq, 0)), now)
                .unwrap();
            assert_ne!(o, Outcome::Buffered, "offset {off}");
        }
        let (o, _) = s2
            .offer(0, 5, Some(&payload("a", "d1", 3, 0)), now)
            .unwrap();
        assert_eq!(o, Outcome::Buffered);
        // Offset 1 (a duplicate) lies inside the written file's span, too.
        assert_eq!(s2.stats().already_durable, 3);
        assert_eq!(s2.pending_commits(), vec![(0, 5)]);
        // Committed past the file, then restarted: a late redelivery of a written event
        // is recognised from the file's rows, not from memory.
        let mut s3 = sink(root.path(), 2);
        let (o, _) = s3
            .offer(0, 6, Some(&payload("a", "d1", 2, 0)), now)
            .unwrap();
        assert_eq!(o, Outcome::Duplicate);
        let (o, _) = s3
            .offer(0, 7, Some(&payload("a", "d1", 3, 0)), now)
            .unwrap();
        assert_eq!(o, Outcome::Buffered);
    }

    #[test]
    fn memory_bound_writes_the_oldest_buffer_and_revoke_drops_rows() {
        let root = tempfile::tempdir().unwrap();
        let one = payload("a", "d1", 1, 0).len() as u64;
        let mut s = ParquetSink::new(
            root.path(),
            "t",
            EventSchema::new(default_signal_columns()).unwrap(),
            RollPolicy {
                max_buffered_bytes: 2 * one,
                ..RollPolicy::default()
            },
        );
        let t0 = Instant::now();
        s.offer(0, 0, Some(&payload("a", "d1", 1, 0)), t0).unwrap();
        s.offer(
            0,
            1,
            Some(&payload("b", "d1", 1, 0)),
            t0 + Duration::from_secs(1),
        )
        .unwrap();
        let (_, w) = s
            .offer(
                0,
                2,
                Some(&payload("c", "d1", 1, 0)),
                t0 + Duration::from_secs(2),
            )
            .unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].path.to_string_lossy().contains("fleet=a/"));
        s.revoke(&[0]);
        assert_eq!(s.stats().dropped_on_revoke, 2);
        assert!(s.pending_commits().is_empty());
        assert!(s.flush_all().unwrap().is_empty());
    }
}
