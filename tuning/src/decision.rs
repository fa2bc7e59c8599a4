//! A decision: the settings for one connection and why they were chosen.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::settings::Settings;

/// Why a connection got its settings, in precedence order (first wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The kill switch is on: static defaults for everyone.
    KillSwitch,
    /// A per-client, per-route or per-service override.
    Override,
    /// The connection is in a rollout's canary cohort: the candidate model decided.
    Canary,
    /// The active model decided.
    Model,
    /// No model: the service's static settings.
    Default,
    /// The data plane had no decision at hand (cache miss, optimizer unreachable) and used the
    /// service's static settings without waiting.
    Fallback,
}

impl Reason {
    /// The name used in JSON, SQL and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::KillSwitch => "kill_switch",
            Reason::Override => "override",
            Reason::Canary => "canary",
            Reason::Model => "model",
            Reason::Default => "default",
            Reason::Fallback => "fallback",
        }
    }

    /// Parse the name used in JSON and SQL.
    pub fn parse(s: &str) -> Option<Reason> {
        [
            Reason::KillSwitch,
            Reason::Override,
            Reason::Canary,
            Reason::Model,
            Reason::Default,
            Reason::Fallback,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which side of a rollout a connection is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cohort {
    /// No rollout is running.
    #[default]
    None,
    /// In a rollout, not in the canary: the active model (or default) decided.
    Control,
    /// In a rollout's canary: the candidate decided.
    Canary,
}

impl Cohort {
    /// The name used in JSON, SQL and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Cohort::None => "none",
            Cohort::Control => "control",
            Cohort::Canary => "canary",
        }
    }
}

/// The settings for one connection and everything needed to learn from it afterwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// What to apply.
    pub settings: Settings,
    /// Why.
    pub reason: Reason,
    /// The model that decided, when one did.
    #[serde(default)]
    pub model_version: Option<String>,
    /// The rollout cohort.
    #[serde(default)]
    pub cohort: Cohort,
    /// Probability with which this policy picks these settings for this context (1.0 when
    /// deterministic; lower when exploration was possible). Needed for off-policy evaluation.
    pub propensity: f32,
    /// Whether exploration changed the model's choice.
    #[serde(default)]
    pub explored: bool,
    /// In a shadow rollout: what the candidate would have chosen (not applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Settings>,
}

impl Decision {
    /// A deterministic decision with no model and no cohort.
    pub fn fixed(settings: Settings, reason: Reason) -> Decision {
        Decision {
            settings,
            reason,
            model_version: None,
            cohort: Cohort::None,
            propensity: 1.0,
            explored: false,
            shadow: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_their_names() {
        for r in [
            Reason::KillSwitch,
            Reason::Override,
            Reason::Canary,
            Reason::Model,
            Reason::Default,
            Reason::Fallback,
        ] {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
            let j = serde_json::to_string(&r).unwrap();
            assert_eq!(j, format!("\"{}\"", r.as_str()));
        }
        assert_eq!(Reason::parse("nope"), None);
    }

    #[test]
    fn decision_json_round_trips() {
        let d = Decision::fixed(Settings::default(), Reason::Fallback);
        let j = serde_json::to_string(&d).unwrap();
        let back: Decision = serde_json::from_str(&j).unwrap();
        assert_eq!(back, d);
        assert!(!j.contains("shadow"));
    }
}
