//! Which rows are already in a finished file, read from file names on disk.
//!
//! After a crash between a file's rename and the offset commit, the records it holds
//! are consumed again. A file named `part-<p>-<first>-<last>.parquet` in a Hive
//! directory holds every row of that directory read from partition `p` within
//! `first..=last` (rows of one partition and directory are buffered in order into
//! one buffer at a time), so such a record is skipped instead of written twice.
//! Directories are listed lazily, once, when a record first needs them; leftover
//! temp files of an interrupted write found there are deleted.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use super::layout::{FileSpan, PartitionKey};

/// Spans of finished files per Hive directory.
#[derive(Debug)]
pub struct DurableIndex {
    root: PathBuf,
    dirs: HashMap<PartitionKey, Vec<FileSpan>>,
}

impl DurableIndex {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            dirs: HashMap::new(),
        }
    }

    /// Whether the record at `(partition, offset)` belonging in `key`'s directory is
    /// in a file.
    pub fn covers(&mut self, key: &PartitionKey, partition: i32, offset: i64) -> io::Result<bool> {
        if !self.dirs.contains_key(key) {
            let spans = scan(&self.root.join(key.dir()))?;
            self.dirs.insert(key.clone(), spans);
        }
        Ok(self.dirs[key].iter().any(|s| s.contains(partition, offset)))
    }

    /// Records a file this process just made durable.
    pub fn add(&mut self, key: &PartitionKey, span: FileSpan) {
        if let Some(spans) = self.dirs.get_mut(key) {
            spans.push(span);
        }
    }

    /// Forgets everything listed: after a rebalance another consumer may have written
    /// files for partitions this one now owns.
    pub fn clear(&mut self) {
        self.dirs.clear();
    }
}

fn scan(dir: &Path) -> io::Result<Vec<FileSpan>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut spans = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(span) = FileSpan::parse(name) {
            spans.push(span);
        } else if name.starts_with(".part-") && name.ends_with(".tmp") {
            // An interrupted write; its rows were never committed and will be rewritten.
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_files_cover_their_span_and_temp_files_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let key = PartitionKey::new("a", 0);
        let dir = &key.dir();
        std::fs::create_dir_all(root.path().join(dir)).unwrap();
        std::fs::write(root.path().join(dir).join("part-1-10-20.parquet"), b"").unwrap();
        let tmp = root.path().join(dir).join(".part-1-21-30.parquet.tmp");
        std::fs::write(&tmp, b"").unwrap();

        let mut index = DurableIndex::new(root.path());
        assert!(index.covers(&key, 1, 10).unwrap());
        assert!(index.covers(&key, 1, 20).unwrap());
        assert!(!index.covers(&key, 1, 21).unwrap());
        assert!(!index.covers(&key, 0, 15).unwrap());
        assert!(!tmp.exists());
        let other = PartitionKey::new("b", 0);
        assert!(!index.covers(&other, 1, 15).unwrap());

        index.add(
            &key,
            FileSpan {
                partition: 1,
                first: 21,
                last: 30,
            },
        );
        assert!(index.covers(&key, 1, 25).unwrap());
    }
}
