//! One way to configure every fleetgate binary: built-in defaults, overlaid by a TOML
//! file, overlaid by `FLEETGATE_*` environment variables, then deserialized once into a
//! strict (`deny_unknown_fields`) struct so a typo fails at start-up, not in production.
//!
//! Environment keys: `FLEETGATE_KAFKA__BOOTSTRAP_SERVERS=...` sets `kafka.bootstrap_servers`
//! (`__` separates table levels, names are lower-cased). Values are parsed as TOML
//! literals when they are valid ones (`42`, `true`, `["a","b"]`) and as strings otherwise.

pub mod process;

use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Serialize};
use toml::{Table, Value};

/// Variables with the prefix that are not configuration overrides.
const RESERVED: &[&str] = &["FLEETGATE_LOG"];
/// Prefix of every configuration override.
pub const ENV_PREFIX: &str = "FLEETGATE_";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("environment variable {var}: {why}")]
    Env { var: String, why: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Loads `T` from defaults, an optional file and the process environment.
pub fn load<T>(file: Option<&Path>) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    load_with_env(file, std::env::vars())
}

/// Like [`load`], with the environment given explicitly (tests, embedding).
pub fn load_with_env<T>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    let mut merged = Table::try_from(T::default())
        .map_err(|e| ConfigError::Invalid(format!("defaults do not serialize: {e}")))?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let table: Table = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        merge(&mut merged, table);
    }
    let mut overrides: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !RESERVED.contains(&k.as_str()))
        .collect();
    overrides.sort();
    for (var, value) in overrides {
        apply_env(&mut merged, &var, &value)?;
    }
    T::deserialize(Value::Table(merged)).map_err(|e| ConfigError::Invalid(e.to_string()))
}

/// Renders the effective configuration, for `--print-config`.
pub fn render<T: Serialize>(config: &T) -> String {
    toml::to_string_pretty(config).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
}

fn merge(base: &mut Table, overlay: Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn apply_env(root: &mut Table, var: &str, raw: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect();
    if path.iter().any(String::is_empty) {
        return Err(ConfigError::Env {
            var: var.to_owned(),
            why: "empty key segment".into(),
        });
    }
    let (leaf, parents) = path
        .split_last()
        .expect("split yields at least one segment");
    let mut table = root;
    for key in parents {
        let entry = table
            .entry(key.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        table = match entry {
            Value::Table(t) => t,
            _ => {
                return Err(ConfigError::Env {
                    var: var.to_owned(),
                    why: format!("`{key}` is not a table"),
                })
            }
        };
    }
    table.insert(leaf.clone(), parse_literal(raw));
    Ok(())
}

fn parse_literal(raw: &str) -> Value {
    toml::from_str::<Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Kafka {
        bootstrap_servers: String,
        partitions: u32,
    }
    impl Default for Kafka {
        fn default() -> Self {
            Self {
                bootstrap_servers: "localhost:9092".into(),
                partitions: 1,
            }
        }
    }
    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Cfg {
        node_id: String,
        kafka: Kafka,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn file_then_env_override_defaults() {
        let dir = std::env::temp_dir().join(format!("fg-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "node_id = \"a\"\n[kafka]\npartitions = 3\n").unwrap();
        let cfg: Cfg = load_with_env(
            Some(&file),
            env(&[
                ("FLEETGATE_KAFKA__BOOTSTRAP_SERVERS", "b1:9092,b2:9092"),
                ("FLEETGATE_LOG", "debug"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.node_id, "a");
        assert_eq!(cfg.kafka.partitions, 3);
        assert_eq!(cfg.kafka.bootstrap_servers, "b1:9092,b2:9092");
    }

    #[test]
    fn env_numbers_are_typed() {
        let cfg: Cfg = load_with_env(None, env(&[("FLEETGATE_KAFKA__PARTITIONS", "12")])).unwrap();
        assert_eq!(cfg.kafka.partitions, 12);
    }

    #[test]
    fn unknown_keys_fail_loudly() {
        let err = load_with_env::<Cfg>(None, env(&[("FLEETGATE_KAFKA__BOOTSTRAP", "x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bootstrap"), "{err}");
    }

    #[test]
    fn render_round_trips() {
        let cfg = Cfg {
            node_id: "n".into(),
            kafka: Kafka::default(),
        };
        let back: Cfg = toml::from_str(&render(&cfg)).unwrap();
        assert_eq!(back, cfg);
    }
}
