//! `fleetgate-ingest` configuration: one TOML file, `FLEETGATE_*` overrides, validated
//! once at start-up.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::catalog::{default_signals, SignalSpec};
use crate::freshness::FreshnessConfig;
use crate::grpc::GrpcConfig;
use crate::pipeline::Limits;
use crate::publish::KafkaConfig;
use crate::quic::QuicConfig;
use crate::tls::TlsConfig;

/// Everything an ingest node needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Names this node in provenance and connection ids; unique per node.
    pub node_id: String,
    /// Hint sent with every retry verdict.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// Longest wait for in-flight batches on shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// `json` (default) or `text`.
    pub log_format: String,
    pub grpc: GrpcConfig,
    pub quic: QuicConfig,
    pub tls: TlsConfig,
    pub limits: Limits,
    pub freshness: FreshnessConfig,
    pub sequence: SequenceConfig,
    pub identity: IdentityConfig,
    /// Rate limits, connection limits and overload bounds; reloaded on SIGHUP.
    pub quota: crate::quota::QuotaConfig,
    pub kafka: KafkaConfig,
    pub metrics: MetricsConfig,
    pub catalog: CatalogConfig,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            node_id: "ingest-0".into(),
            retry_after: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(15),
            log_format: "json".into(),
            grpc: GrpcConfig::default(),
            quic: QuicConfig::default(),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            freshness: FreshnessConfig::default(),
            sequence: SequenceConfig::default(),
            identity: IdentityConfig::default(),
            quota: crate::quota::QuotaConfig::default(),
            kafka: KafkaConfig::default(),
            metrics: MetricsConfig::default(),
            catalog: CatalogConfig::default(),
        }
    }
}

/// Prometheus and health endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".parse().expect("literal address"),
        }
    }
}

/// Per-device anti-replay window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SequenceConfig {
    /// Sequence numbers remembered per device (rounded up to a multiple of 64).
    pub window: u64,
    /// A device silent this long keeps only its high-water mark (its window is freed).
    #[serde(with = "humantime_serde")]
    pub idle_evict_after: Duration,
    /// How long another node's deliveries still under way (per its device-state
    /// record) are refused here before they are accepted again; longer than
    /// `kafka.delivery_timeout`, so a live node always settles them first.
    #[serde(with = "humantime_serde")]
    pub in_doubt_ttl: Duration,
}

impl Default for SequenceConfig {
    fn default() -> Self {
        Self {
            window: 1024,
            idle_evict_after: Duration::from_secs(600),
            in_doubt_ttl: Duration::from_secs(30),
        }
    }
}

/// How a device identity may be used across connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// `allow_newest` (close older connections of the same certificate) or
    /// `reject_second` (refuse the newcomer); either way the event is flagged.
    pub clone_policy: crate::live::ClonePolicy,
}

/// The signal catalog: names, kinds and physical bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    pub signals: Vec<SignalSpec>,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self {
            signals: default_signals(),
        }
    }
}

impl IngestConfig {
    /// Checks what serde cannot; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        let id_ok = !self.node_id.is_empty()
            && self
                .node_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !id_ok {
            return Err(format!("node_id {:?}: use [A-Za-z0-9._-]+", self.node_id));
        }
        if self.limits.max_frame_bytes == 0 || self.limits.max_frame_bytes > 64 * 1024 * 1024 {
            return Err("limits.max_frame_bytes must be in 1..=64MiB".into());
        }
        self.quic.validate()?;
        self.quota.validate(
            self.limits.max_events_per_batch,
            self.limits.max_frame_bytes,
        )?;
        if self.limits.supported_schema_versions.is_empty() {
            return Err("limits.supported_schema_versions must not be empty".into());
        }
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return Err("kafka.bootstrap_servers must not be empty".into());
        }
        if self.kafka.delivery_timeout < Duration::from_millis(100) {
            return Err("kafka.delivery_timeout must be at least 100ms".into());
        }
        if !(64..=1 << 20).contains(&self.sequence.window) {
            return Err("sequence.window must be in 64..=1048576".into());
        }
        if self.sequence.idle_evict_after < Duration::from_secs(1) {
            return Err("sequence.idle_evict_after must be at least 1s".into());
        }
        if self.sequence.in_doubt_ttl <= self.kafka.delivery_timeout {
            return Err("sequence.in_doubt_ttl must be longer than kafka.delivery_timeout".into());
        }
        if self.tls.crl_reload_interval < Duration::from_millis(100) {
            return Err("tls.crl_reload_interval must be at least 100ms".into());
        }
        if !matches!(self.log_format.as_str(), "json" | "text") {
            return Err(format!(
                "log_format {:?}: use json or text",
                self.log_format
            ));
        }
        for s in &self.catalog.signals {
            if let (Some(min), Some(max)) = (s.min, s.max) {
                if min > max {
                    return Err(format!("catalog signal {:?}: min > max", s.name));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_render() {
        let cfg = IngestConfig::default();
        cfg.validate().unwrap();
        let text = fleetgate_config::render(&cfg);
        let back: IngestConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn env_overrides_nested_durations() {
        let cfg: IngestConfig = fleetgate_config::load_with_env(
            None,
            vec![(
                "FLEETGATE_KAFKA__DELIVERY_TIMEOUT".to_string(),
                "3s".to_string(),
            )],
        )
        .unwrap();
        assert_eq!(cfg.kafka.delivery_timeout, Duration::from_secs(3));
    }

    #[test]
    fn bad_values_are_named() {
        let cfg = IngestConfig {
            node_id: "a b".into(),
            ..Default::default()
        };
        assert!(cfg.validate().unwrap_err().contains("node_id"));
    }

    #[test]
    fn a_doubt_must_outlive_the_delivery_it_waits_for() {
        let mut cfg = IngestConfig::default();
        cfg.sequence.in_doubt_ttl = cfg.kafka.delivery_timeout;
        assert!(cfg.validate().unwrap_err().contains("in_doubt_ttl"));
        cfg.sequence.in_doubt_ttl += Duration::from_secs(1);
        cfg.validate().unwrap();
    }
}
