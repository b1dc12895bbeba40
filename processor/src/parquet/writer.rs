//! Writes one record batch as one Parquet file, atomically and durably: a hidden temp
//! file in the target directory, fsync, rename to the final name, fsync of the
//! directory chain. A reader sees the whole file or nothing, and once this returns
//! the file survives a power loss, so the caller may commit the Kafka offsets.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;

use super::layout::FileSpan;

/// Why a file could not be made durable.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("encoding {path}: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: ParquetError,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WriteError + 'a {
    move |source| WriteError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Snappy pages (pure Rust, fast to read back), statistics on, dictionary encoding for
/// the many repeated provenance strings.
pub fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by(format!("fleetgate-processor {}", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Writes `batch` to `root/rel_dir/<span>` and returns the final path and its size.
pub fn write_durable(
    root: &Path,
    rel_dir: &Path,
    span: FileSpan,
    batch: &RecordBatch,
    props: WriterProperties,
) -> Result<(PathBuf, u64), WriteError> {
    let dir = root.join(rel_dir);
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let tmp = dir.join(span.temp_name());
    let path = dir.join(span.to_string());
    let file = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    let encode = |source| WriteError::Encode {
        path: tmp.clone(),
        source,
    };
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(encode)?;
    writer.write(batch).map_err(encode)?;
    let file = writer.into_inner().map_err(encode)?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    let size = file.metadata().map_err(io_err("stat", &tmp))?.len();
    drop(file);
    std::fs::rename(&tmp, &path).map_err(io_err("renaming into", &path))?;
    // The rename and any directory created above are durable only once each directory
    // entry is, up to the output root.
    for d in rel_dir.ancestors().map(|a| root.join(a)) {
        File::open(&d)
            .and_then(|f| f.sync_all())
            .map_err(io_err("fsync", &d))?;
    }
    Ok((path, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parquet::schema::{default_signal_columns, EventSchema};

    #[test]
    fn writes_final_name_only_and_leaves_no_temp_file() {
        let root = tempfile::tempdir().unwrap();
        let schema = EventSchema::new(default_signal_columns()).unwrap();
        let batch = schema.to_batch("t", &[]).unwrap();
        let rel = Path::new("fleet=a/date=2024-01-01/hour=03");
        let span = FileSpan {
            partition: 0,
            first: 5,
            last: 9,
        };
        let (path, size) =
            write_durable(root.path(), rel, span, &batch, writer_properties()).unwrap();
        assert_eq!(path, root.path().join(rel).join("part-0-5-9.parquet"));
        assert!(size > 0);
        let names: Vec<_> = std::fs::read_dir(root.path().join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("part-0-5-9.parquet")]);
        // Parquet magic at both ends.
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..4], b"PAR1");
        assert_eq!(&bytes[bytes.len() - 4..], b"PAR1");
    }
}
