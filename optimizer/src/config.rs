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
    /// Static settings for every service (the `default` decision).
    #[serde(default)]
    pub defaults: Settings,
    /// Per-service changes to the defaults.
    #[serde(default)]
    pub services: BTreeMap<String, PartialSettings>,
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
        let c = Config::from_toml("[services.bulk]\nbuffer_size = \"256KiB\"\n").unwrap();
        assert_eq!(c.static_settings("bulk").buffer_size, 256 << 10);
        assert_eq!(c.static_settings("other"), Settings::default());
    }
}
