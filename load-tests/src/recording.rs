//! The recording file format (see `docs/recordings.md`): an 8-byte magic, a 4-byte
//! little-endian version, then length-delimited protobuf messages: one
//! [`RecordingHeader`] and any number of [`RecordedBatch`]es in non-decreasing
//! `offset_ms` order. Recordings exist so a load run is repeatable: the same file
//! replays the same fleet, byte for byte. The reader never panics on bad input; every
//! way a file can be wrong has its own [`RecordingError`].

use std::io::{self, Read, Write};

use prost::Message;

/// First bytes of every recording.
pub const MAGIC: [u8; 8] = *b"FGRECORD";
/// The only format version this build reads and writes.
pub const VERSION: u32 = 1;
/// Largest message the reader accepts, so a corrupt length cannot make it allocate
/// gigabytes (ingest's own frame limit is far below this).
pub const MAX_MESSAGE_BYTES: u64 = 64 * 1024 * 1024;

/// Describes the fleet a recording holds; written once, first.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RecordingHeader {
    #[prost(string, tag = "1")]
    pub fleet_id: String,
    /// Number of distinct devices in the recording.
    #[prost(uint32, tag = "2")]
    pub devices: u32,
    /// Seed the generator used (0 for recordings captured elsewhere).
    #[prost(uint64, tag = "3")]
    pub seed: u64,
    /// Unix ms when the recording was made; 0 when unset (generated files leave it
    /// unset by default so the same seed gives the same bytes).
    #[prost(int64, tag = "4")]
    pub created_at_ms: i64,
    #[prost(string, tag = "5")]
    pub description: String,
}

/// One batch as a device sent it, `offset_ms` after the recording started.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RecordedBatch {
    #[prost(string, tag = "1")]
    pub device_id: String,
    /// Send time relative to the recording start.
    #[prost(uint64, tag = "2")]
    pub offset_ms: u64,
    /// An encoded `fleetgate_proto::TelemetryBatch` whose `sent_at_ms` and events'
    /// `captured_at_ms` are also offsets from the recording start.
    #[prost(bytes = "vec", tag = "3")]
    pub batch: Vec<u8>,
}

/// Why a recording cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("not a fleetgate recording (bad magic {0:02x?})")]
    BadMagic(Vec<u8>),
    #[error("recording format version {0} is not supported (this build reads {VERSION})")]
    UnsupportedVersion(u32),
    #[error("recording truncated in {0}")]
    Truncated(&'static str),
    #[error("recording has no header")]
    MissingHeader,
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    MessageTooLarge(u64),
    #[error("message length prefix is not a valid varint")]
    BadLength,
    #[error("cannot decode {what}: {source}")]
    Decode {
        what: &'static str,
        source: prost::DecodeError,
    },
    #[error(
        "batch at offset {got} ms follows one at {previous} ms: batches must be in offset order"
    )]
    OutOfOrder { previous: u64, got: u64 },
}

/// Writes a recording: header on creation, then batches in offset order.
pub struct RecordingWriter<W: Write> {
    out: W,
    last_offset: u64,
    scratch: Vec<u8>,
}

impl<W: Write> RecordingWriter<W> {
    /// Writes the magic, the version and `header`.
    pub fn new(mut out: W, header: &RecordingHeader) -> Result<Self, RecordingError> {
        out.write_all(&MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        let mut w = Self {
            out,
            last_offset: 0,
            scratch: Vec::new(),
        };
        w.write_message(header)?;
        Ok(w)
    }

    /// Appends one batch; refuses one older than the previous.
    pub fn write_batch(&mut self, batch: &RecordedBatch) -> Result<(), RecordingError> {
        if batch.offset_ms < self.last_offset {
            return Err(RecordingError::OutOfOrder {
                previous: self.last_offset,
                got: batch.offset_ms,
            });
        }
        self.last_offset = batch.offset_ms;
        self.write_message(batch)
    }

    /// Flushes and returns the underlying writer.
    pub fn finish(mut self) -> Result<W, RecordingError> {
        self.out.flush()?;
        Ok(self.out)
    }

    fn write_message(&mut self, m: &impl Message) -> Result<(), RecordingError> {
        self.scratch.clear();
        m.encode_length_delimited(&mut self.scratch)
            .expect("a Vec grows to fit any message");
        self.out.write_all(&self.scratch)?;
        Ok(())
    }
}

/// Reads a recording written by [`RecordingWriter`].
pub struct RecordingReader<R: Read> {
    input: R,
    header: RecordingHeader,
    last_offset: u64,
}

impl<R: Read> RecordingReader<R> {
    /// Checks magic and version and reads the header.
    pub fn new(mut input: R) -> Result<Self, RecordingError> {
        let mut magic = [0u8; 8];
        let n = read_up_to(&mut input, &mut magic)?;
        if magic[..n] != MAGIC[..n] || n == 0 {
            return Err(RecordingError::BadMagic(magic[..n].to_vec()));
        }
        if n < magic.len() {
            return Err(RecordingError::Truncated("magic"));
        }
        let mut version = [0u8; 4];
        if read_up_to(&mut input, &mut version)? < version.len() {
            return Err(RecordingError::Truncated("version"));
        }
        let version = u32::from_le_bytes(version);
        if version != VERSION {
            return Err(RecordingError::UnsupportedVersion(version));
        }
        let header = read_message(&mut input, "header")?.ok_or(RecordingError::MissingHeader)?;
        Ok(Self {
            input,
            header,
            last_offset: 0,
        })
    }

    pub fn header(&self) -> &RecordingHeader {
        &self.header
    }

    /// The next batch, or `None` at a clean end of file.
    pub fn next_batch(&mut self) -> Result<Option<RecordedBatch>, RecordingError> {
        let Some(batch) = read_message::<RecordedBatch>(&mut self.input, "batch")? else {
            return Ok(None);
        };
        if batch.offset_ms < self.last_offset {
            return Err(RecordingError::OutOfOrder {
                previous: self.last_offset,
                got: batch.offset_ms,
            });
        }
        self.last_offset = batch.offset_ms;
        Ok(Some(batch))
    }

    /// Reads every remaining batch.
    pub fn read_all(mut self) -> Result<(RecordingHeader, Vec<RecordedBatch>), RecordingError> {
        let mut batches = Vec::new();
        while let Some(b) = self.next_batch()? {
            batches.push(b);
        }
        Ok((self.header, batches))
    }
}

/// Reads until `buf` is full or EOF; returns how many bytes were read.
fn read_up_to(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// One length-delimited message; `None` when EOF comes before its first byte.
fn read_message<M: Message + Default>(
    input: &mut impl Read,
    what: &'static str,
) -> Result<Option<M>, RecordingError> {
    let mut len: u64 = 0;
    let mut shift = 0;
    let mut first = true;
    loop {
        let mut byte = [0u8; 1];
        if read_up_to(input, &mut byte)? == 0 {
            if first {
                return Ok(None);
            }
            return Err(RecordingError::Truncated(what));
        }
        first = false;
        if shift >= 64 {
            return Err(RecordingError::BadLength);
        }
        len |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    if len > MAX_MESSAGE_BYTES {
        return Err(RecordingError::MessageTooLarge(len));
    }
    let mut buf = vec![0u8; len as usize];
    if read_up_to(input, &mut buf)? < buf.len() {
        return Err(RecordingError::Truncated(what));
    }
    M::decode(buf.as_slice())
        .map(Some)
        .map_err(|source| RecordingError::Decode { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> RecordingHeader {
        RecordingHeader {
            fleet_id: "fleet-a".into(),
            devices: 2,
            seed: 42,
            created_at_ms: 0,
            description: "test".into(),
        }
    }

    fn encode(header: &RecordingHeader, batches: &[RecordedBatch]) -> Vec<u8> {
        let mut w = RecordingWriter::new(Vec::new(), header).unwrap();
        for b in batches {
            w.write_batch(b).unwrap();
        }
        w.finish().unwrap()
    }

    fn batch(device: &str, offset_ms: u64, bytes: &[u8]) -> RecordedBatch {
        RecordedBatch {
            device_id: device.into(),
            offset_ms,
            batch: bytes.to_vec(),
        }
    }

    #[test]
    fn starts_with_magic_and_version() {
        let bytes = encode(&header(), &[]);
        assert_eq!(&bytes[..8], b"FGRECORD");
        assert_eq!(&bytes[8..12], &1u32.to_le_bytes());
        let (h, b) = RecordingReader::new(bytes.as_slice())
            .unwrap()
            .read_all()
            .unwrap();
        assert_eq!((h, b.len()), (header(), 0));
    }

    #[test]
    fn bad_magic_and_version_are_named() {
        let mut bytes = encode(&header(), &[]);
        bytes[0] = b'X';
        assert!(matches!(
            RecordingReader::new(bytes.as_slice()),
            Err(RecordingError::BadMagic(_))
        ));
        assert!(matches!(
            RecordingReader::new(&b""[..]),
            Err(RecordingError::BadMagic(_))
        ));
        assert!(matches!(
            RecordingReader::new(&b"FGREC"[..]),
            Err(RecordingError::Truncated("magic"))
        ));
        let mut bytes = encode(&header(), &[]);
        bytes[8] = 9;
        assert!(matches!(
            RecordingReader::new(bytes.as_slice()),
            Err(RecordingError::UnsupportedVersion(9))
        ));
        let bytes = encode(&header(), &[]);
        assert!(matches!(
            RecordingReader::new(&bytes[..12]),
            Err(RecordingError::MissingHeader)
        ));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_short_read() {
        let bytes = encode(
            &header(),
            &[batch("a", 0, &[1, 2, 3]), batch("b", 5, &[4; 300])],
        );
        // Every strict prefix past the header either fails or yields fewer batches,
        // and a prefix cut inside a message is always an error.
        let full = RecordingReader::new(bytes.as_slice())
            .unwrap()
            .read_all()
            .unwrap();
        assert_eq!(full.1.len(), 2);
        let mut boundaries = 0;
        for cut in 0..bytes.len() {
            match RecordingReader::new(&bytes[..cut]).and_then(RecordingReader::read_all) {
                Ok((_, b)) => {
                    assert!(b.len() < 2, "cut {cut} read everything");
                    boundaries += 1;
                }
                Err(e) => assert!(
                    matches!(
                        e,
                        RecordingError::Truncated(_)
                            | RecordingError::MissingHeader
                            | RecordingError::BadMagic(_)
                    ),
                    "cut {cut}: {e}"
                ),
            }
        }
        // Only the two message boundaries after the header read cleanly.
        assert_eq!(boundaries, 2);
    }

    #[test]
    fn huge_length_and_out_of_order_are_refused() {
        let mut bytes = encode(&header(), &[]);
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x7f]);
        let mut r = RecordingReader::new(bytes.as_slice()).unwrap();
        assert!(matches!(
            r.next_batch(),
            Err(RecordingError::MessageTooLarge(_))
        ));

        let mut w = RecordingWriter::new(Vec::new(), &header()).unwrap();
        w.write_batch(&batch("a", 10, &[])).unwrap();
        assert!(matches!(
            w.write_batch(&batch("a", 9, &[])),
            Err(RecordingError::OutOfOrder {
                previous: 10,
                got: 9
            })
        ));
        // A hand-made file with batches out of order is refused by the reader too.
        let mut bytes = encode(&header(), &[batch("a", 10, &[])]);
        batch("a", 3, &[])
            .encode_length_delimited(&mut bytes)
            .unwrap();
        let r = RecordingReader::new(bytes.as_slice()).unwrap();
        assert!(matches!(
            r.read_all(),
            Err(RecordingError::OutOfOrder { .. })
        ));
    }

    #[test]
    fn garbage_message_is_a_decode_error() {
        let mut bytes = encode(&header(), &[]);
        bytes.extend_from_slice(&[3, 0xff, 0xff, 0xff]);
        let mut r = RecordingReader::new(bytes.as_slice()).unwrap();
        assert!(matches!(
            r.next_batch(),
            Err(RecordingError::Decode { what: "batch", .. })
        ));
    }

    proptest! {
        #[test]
        fn round_trips(
            fleet in "[a-z0-9-]{0,20}",
            seed in any::<u64>(),
            created in any::<i64>(),
            mut batches in proptest::collection::vec(
                ("[a-z0-9-]{1,12}", 0u64..1_000_000, proptest::collection::vec(any::<u8>(), 0..200)),
                0..30,
            ),
        ) {
            batches.sort_by_key(|b| b.1);
            let h = RecordingHeader { fleet_id: fleet, devices: 3, seed, created_at_ms: created, description: String::new() };
            let bs: Vec<RecordedBatch> = batches.iter().map(|(d, o, b)| batch(d, *o, b)).collect();
            let bytes = encode(&h, &bs);
            let (h2, bs2) = RecordingReader::new(bytes.as_slice()).unwrap().read_all().unwrap();
            prop_assert_eq!(h2, h);
            prop_assert_eq!(bs2, bs);
        }
    }
}
