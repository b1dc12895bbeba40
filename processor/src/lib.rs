//! Consumers downstream of ingest. Ingest delivers at-least-once (a device retries an
//! event whose ack was lost), so everything here dedupes by `(device, seq)` before
//! counting.

pub mod config;
pub mod dedupe;
pub mod detect;
pub mod metrics;
pub mod parquet;
pub mod policy;
pub mod run;
pub mod summary;
pub mod topic;

pub use dedupe::{Deduplicator, DeviceKey, Seen};
pub use summary::{Summary, SummaryBuilder};
pub use topic::{summarize_topic, TopicError};
