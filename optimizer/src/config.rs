//! The optimizer's configuration: one TOML file, validated once at startup.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use tuning::{PartialSettings, Settings};

/// The optimizer's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP API (decisions, overrides, models, health, metrics).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// PostgreSQL URL; when absent, the `DATABASE_URL` environment variable.
    #[serde(default)]
    pub database_url: Option<String>,
    /// Maximum PostgreSQL connections in the pool.
    #[serde(default = "default_pool")]
    pub database_pool: u32,
    /// The ONNX Runtime shared library; when absent, `ORT_DYLIB_PATH`.
    #[serde(default)]
    pub onnxruntime_library: Option<PathBuf>,
    /// The shipped model: used when the registry has no active model (validated like any
    /// other; absent or unusable: static defaults).
    #[serde(default)]
    pub shipped_model: Option<PathBuf>,
    /// Static settings for every service (the `default` decision).
    #[serde(default)]
    pub defaults: Settings,
    /// Per-service changes to the defaults.
    #[serde(default)]
    pub services: BTreeMap<String, PartialSettings>,
    /// Bearer tokens and their roles.
    #[serde(default)]
    pub tokens: Vec<crate::auth::TokenConfig>,
    /// Serve without tokens (every caller is an admin). Only for local demos.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// Share of model decisions that explore a neighbouring grid value.
    #[serde(default = "default_exploration")]
    pub exploration_share: f64,
    /// How long a data plane may reuse a decision, milliseconds (changes reach every data plane
    /// within about this long).
    #[serde(default = "default_ttl_ms")]
    pub decision_ttl_ms: u64,
    /// How often the rollout controller evaluates the running rollout, milliseconds.
    #[serde(default = "default_rollout_tick")]
    pub rollout_tick_ms: u64,
    /// The same, as a duration (derived).
    #[serde(skip, default = "default_ttl")]
    pub decision_ttl: std::time::Duration,
}

fn default_exploration() -> f64 {
    0.05
}

fn default_rollout_tick() -> u64 {
    5000
}

fn default_ttl_ms() -> u64 {
    1000
}

fn default_ttl() -> std::time::Duration {
    std::time::Duration::from_millis(default_ttl_ms())
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:8090".parse().expect("valid")
}

fn default_pool() -> u32 {
    10
}

impl Config {
    /// Parse and validate; every problem names its key and value.
    pub fn from_toml(text: &str) -> Result<Config, Vec<String>> {
        let c: Config = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
        let mut errors = Vec::new();
        for p in c.defaults.problems() {
            errors.push(format!("defaults.{p}"));
        }
        for (name, p) in &c.services {
            let s = c.defaults.with(p);
            for e in s.problems() {
                errors.push(format!("services.{name}.{e}"));
            }
        }
        if c.database_pool == 0 {
            errors.push("database_pool = 0 must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&c.exploration_share) {
            errors.push(format!(
                "exploration_share = {} must be between 0 and 1",
                c.exploration_share
            ));
        }
        if c.decision_ttl_ms == 0 || c.decision_ttl_ms > 3_600_000 {
            errors.push(format!(
                "decision_ttl_ms = {} must be between 1 and 3600000",
                c.decision_ttl_ms
            ));
        }
        if c.tokens.is_empty() && !c.allow_unauthenticated {
            errors.push(
                "tokens: no token is configured; add [[tokens]] or set allow_unauthenticated = true"
                    .into(),
            );
        }
        let mut c = c;
        c.decision_ttl = std::time::Duration::from_millis(c.decision_ttl_ms);
        if errors.is_empty() {
            Ok(c)
        } else {
            Err(errors)
        }
    }

    /// The static settings of a service.
    pub fn static_settings(&self, service: &str) -> Settings {
        self.services
            .get(service)
            .map_or(self.defaults, |p| self.defaults.with(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_named() {
        let e = Config::from_toml(
            "[defaults]\nbuffer_size = 1000\nping_interval = 30\nidle_timeout = 300\ncompression = false\nmode = \"zero_copy\"\n[services.chat]\ncompression = true\n",
        )
        .unwrap_err();
        assert!(e[0].starts_with("defaults.buffer_size = 1000"), "{e:?}");
        assert!(
            e.iter()
                .any(|x| x.starts_with("services.chat.compression = true")),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = Config::from_toml("listne = \"127.0.0.1:1\"").unwrap_err();
        assert!(e[0].contains("listne"), "{e:?}");
    }

    #[test]
    fn service_settings_layer_on_defaults() {
        let c = Config::from_toml(
            "allow_unauthenticated = true\n[services.bulk]\nbuffer_size = \"256KiB\"\n",
        )
        .unwrap();
        assert_eq!(c.static_settings("bulk").buffer_size, 256 << 10);
        assert_eq!(c.static_settings("other"), Settings::default());
    }
}
