//! `fleetgate-processor run` configuration: defaults, then a TOML file, then
//! `FLEETGATE_*` overrides (see fleetgate-config), validated once at start-up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::detect::{DetectorsConfig, FindingLimitConfig, StateConfig};
use crate::policy::PolicyConfig;

/// Everything a processor instance needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorConfig {
    /// Names this instance in findings (`processor_id`) and decisions
    /// (`decided_by = "processor:<id>"`); unique per instance.
    pub processor_id: String,
    /// `json` (default) or `text`.
    pub log_format: String,
    /// Longest wait for outstanding deliveries and the final commit on shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub kafka: KafkaConfig,
    pub metrics: MetricsConfig,
    pub state: StateConfig,
    pub detectors: DetectorsConfig,
    pub findings: FindingLimitConfig,
    pub policy: PolicyConfig,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            processor_id: "processor-0".into(),
            log_format: "json".into(),
            shutdown_grace: Duration::from_secs(15),
            kafka: KafkaConfig::default(),
            metrics: MetricsConfig::default(),
            state: StateConfig::default(),
            detectors: DetectorsConfig::default(),
            findings: FindingLimitConfig::default(),
            policy: PolicyConfig::default(),
        }
    }
}

/// Topic names; the defaults are the public contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topics {
    pub events: String,
    pub rejected: String,
    pub anomalies: String,
    pub quarantine: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            events: "telemetry.events.v1".into(),
            rejected: "telemetry.rejected.v1".into(),
            anomalies: "telemetry.anomalies.v1".into(),
            quarantine: "fleet.quarantine.v1".into(),
        }
    }
}

/// Consumer group and producer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    /// Instances with the same group share the input partitions.
    pub group_id: String,
    pub topics: Topics,
    /// Where a group without committed offsets starts: `earliest` or `latest`.
    pub auto_offset_reset: String,
    /// Offsets are committed this often, after every output produced so far is acked.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// A commit (awaiting outstanding deliveries first) is also forced once this many
    /// outputs are in flight: the bound of the delivery queue.
    pub max_in_flight_outputs: usize,
    /// How long the producer keeps trying one output (`message.timeout.ms`); a
    /// failed output stops the processor without committing its input.
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// How often librdkafka reports statistics (consumer lag); 0 disables.
    #[serde(with = "humantime_serde")]
    pub stats_interval: Duration,
    /// Extra librdkafka properties for both clients (e.g. `security.protocol`),
    /// applied before the settings the delivery contract depends on.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            group_id: "fleetgate-processor".into(),
            topics: Topics::default(),
            auto_offset_reset: "earliest".into(),
            commit_interval: Duration::from_secs(1),
            max_in_flight_outputs: 10_000,
            delivery_timeout: Duration::from_secs(30),
            stats_interval: Duration::from_secs(5),
            properties: BTreeMap::new(),
        }
    }
}

/// Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9465".parse().expect("literal address"),
        }
    }
}

impl ProcessorConfig {
    /// Checks what serde cannot; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        let id_ok = !self.processor_id.is_empty()
            && self
                .processor_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !id_ok {
            return Err(format!(
                "processor_id {:?}: use [A-Za-z0-9._-]+",
                self.processor_id
            ));
        }
        if !matches!(self.log_format.as_str(), "json" | "text") {
            return Err(format!(
                "log_format {:?}: use json or text",
                self.log_format
            ));
        }
        let k = &self.kafka;
        if k.bootstrap_servers.trim().is_empty() {
            return Err("kafka.bootstrap_servers must not be empty".into());
        }
        if k.group_id.trim().is_empty() {
            return Err("kafka.group_id must not be empty".into());
        }
        for (key, topic) in [
            ("kafka.topics.events", &k.topics.events),
            ("kafka.topics.rejected", &k.topics.rejected),
            ("kafka.topics.anomalies", &k.topics.anomalies),
            ("kafka.topics.quarantine", &k.topics.quarantine),
        ] {
            if topic.trim().is_empty() {
                return Err(format!("{key} must not be empty"));
            }
        }
        if k.topics.events == k.topics.rejected {
            return Err("kafka.topics.events and kafka.topics.rejected must differ".into());
        }
        if !matches!(k.auto_offset_reset.as_str(), "earliest" | "latest") {
            return Err(format!(
                "kafka.auto_offset_reset {:?}: use earliest or latest",
                k.auto_offset_reset
            ));
        }
        if k.commit_interval < Duration::from_millis(10) {
            return Err("kafka.commit_interval must be at least 10ms".into());
        }
        if k.max_in_flight_outputs == 0 {
            return Err("kafka.max_in_flight_outputs must be >= 1".into());
        }
        if k.delivery_timeout < Duration::from_millis(100) {
            return Err("kafka.delivery_timeout must be at least 100ms".into());
        }
        if self.state.max_devices == 0 {
            return Err("state.max_devices must be >= 1".into());
        }
        self.detectors.validate()?;
        self.findings.validate()?;
        self.policy.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let cfg = ProcessorConfig::default();
        cfg.validate().unwrap();
        let text = fleetgate_config::render(&cfg);
        let back: ProcessorConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn env_overrides_nested_thresholds() {
        let cfg: ProcessorConfig = fleetgate_config::load_with_env(
            None,
            vec![
                (
                    "FLEETGATE_DETECTORS__IMPOSSIBLE_TRAVEL__MAX_SPEED_KMH".to_string(),
                    "350".to_string(),
                ),
                ("FLEETGATE_POLICY__HALF_LIFE".to_string(), "2m".to_string()),
                ("FLEETGATE_KAFKA__GROUP_ID".to_string(), "g2".to_string()),
            ],
        )
        .unwrap();
        assert_eq!(cfg.detectors.impossible_travel.max_speed_kmh, 350.0);
        assert_eq!(cfg.policy.half_life, Duration::from_secs(120));
        assert_eq!(cfg.kafka.group_id, "g2");
    }

    #[test]
    fn typos_and_bad_values_are_named() {
        let err = fleetgate_config::load_with_env::<ProcessorConfig>(
            None,
            vec![("FLEETGATE_POLICY__TRESHOLD".to_string(), "2".to_string())],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("treshold"), "{err}");
        let mut cfg = ProcessorConfig::default();
        cfg.detectors.soc_jump.max_jump_pct = -1.0;
        assert!(cfg
            .validate()
            .unwrap_err()
            .contains("soc_jump.max_jump_pct"));
        let mut cfg = ProcessorConfig::default();
        cfg.kafka.topics.rejected = cfg.kafka.topics.events.clone();
        assert!(cfg.validate().unwrap_err().contains("kafka.topics"));
    }
}
