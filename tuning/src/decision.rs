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

/// Exploration parameters a data plane applies per connection (see [`crate::cohort::explore`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Exploration {
    /// Share of connections that try a neighbouring grid value (0–1).
    pub share: f64,
    /// Salt of the per-connection draw.
    pub salt: u64,
}

/// A per-client override inside a bucket answer: the data plane applies it to connections whose
/// client key matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientOverride {
    /// The client key it applies to.
    pub client_key: String,
    /// The settings it changes.
    pub settings: crate::PartialSettings,
}

/// A rollout in progress, as a data plane needs it to split connections into cohorts itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutAnswer {
    /// The rollout's id.
    pub id: i64,
    /// Salt of the cohort hash (per rollout).
    pub salt: u64,
    /// The service (part of the cohort hash).
    pub service: String,
    /// Share of clients in the canary, percent (0 during the shadow phase).
    pub percent: f64,
    /// Share of connections whose candidate choice is computed and logged, not applied.
    pub shadow_share: f64,
    /// The candidate model's decision for this bucket (reason `canary`, cohort `canary`).
    pub candidate: Decision,
}

/// The optimizer's answer for a context bucket: the decision and everything a data plane needs
/// to make each connection's own choice locally, exactly as the optimizer would.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BucketDecision {
    /// The decision for the bucket (for the requesting client, when it had a client key).
    pub decision: Decision,
    /// Exploration to apply per connection (model decisions only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exploration: Option<Exploration>,
    /// Per-client overrides that apply within this bucket.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_overrides: Vec<ClientOverride>,
    /// How long the data plane may reuse this answer, milliseconds.
    pub ttl_ms: u64,
    /// A rollout in progress for this bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutAnswer>,
}

impl BucketDecision {
    /// The decision for one connection: a matching client override wins (reason `override`);
    /// otherwise exploration is drawn from the connection id.
    pub fn for_connection(&self, client_key: Option<&str>, connection_id: &uuid::Uuid) -> Decision {
        let mut d = self.decision.clone();
        if d.reason == Reason::KillSwitch {
            return d;
        }
        if let Some(o) =
            client_key.and_then(|k| self.client_overrides.iter().find(|o| o.client_key == k))
        {
            let (s, _) = d.settings.with(&o.settings).clamp();
            d.settings = s;
            d.reason = Reason::Override;
            d.propensity = 1.0;
            d.explored = false;
            return d;
        }
        if let (Some(r), Reason::Model | Reason::Default) = (&self.rollout, d.reason) {
            // Cohorts are sticky per client; a connection without a client key is its own client.
            let id_key = connection_id.to_string();
            let key = client_key.unwrap_or(&id_key);
            if crate::cohort::in_canary(r.salt, &r.service, key, r.percent) {
                let mut c = r.candidate.clone();
                c.cohort = Cohort::Canary;
                c.reason = Reason::Canary;
                d = c;
            } else {
                d.cohort = Cohort::Control;
                let draw = crate::hash::unit(crate::cohort::connection_draw(
                    r.salt ^ 0x5348_4144_4f57,
                    connection_id,
                ));
                if draw < r.shadow_share {
                    d.shadow = Some(r.candidate.settings);
                }
            }
        }
        if let (Some(x), Reason::Model | Reason::Canary) = (self.exploration, d.reason) {
            let e = crate::cohort::explore(
                d.settings,
                x.share,
                crate::cohort::connection_draw(x.salt, connection_id),
            );
            d.settings = e.settings;
            d.propensity = e.propensity;
            d.explored = e.explored;
        }
        d
    }
}

#[cfg(test)]
mod bucket_tests {
    use super::*;
    use crate::{PartialSettings, Settings};

    #[test]
    fn client_override_wins_and_exploration_is_per_connection() {
        let mut base = Decision::fixed(Settings::default(), Reason::Model);
        base.model_version = Some("m1".into());
        let b = BucketDecision {
            decision: base,
            exploration: Some(Exploration {
                share: 0.5,
                salt: 9,
            }),
            client_overrides: vec![ClientOverride {
                client_key: "vip".into(),
                settings: PartialSettings {
                    idle_timeout: Some(900),
                    ..PartialSettings::default()
                },
            }],
            ttl_ms: 1000,
            rollout: None,
        };
        let vip = b.for_connection(Some("vip"), &uuid::Uuid::new_v4());
        assert_eq!(
            (vip.reason, vip.settings.idle_timeout, vip.propensity),
            (Reason::Override, 900, 1.0)
        );
        let mut explored = 0;
        for _ in 0..400 {
            let d = b.for_connection(Some("other"), &uuid::Uuid::new_v4());
            assert_eq!(d.reason, Reason::Model);
            if d.explored {
                explored += 1;
                assert!(d.propensity < 0.5);
            } else {
                assert_eq!(d.settings, Settings::default());
            }
        }
        assert!((120..280).contains(&explored), "{explored}");
        let id = uuid::Uuid::new_v4();
        assert_eq!(
            b.for_connection(None, &id),
            b.for_connection(None, &id),
            "stable per connection"
        );
    }
}

#[cfg(test)]
mod rollout_tests {
    use super::*;
    use crate::Settings;

    #[test]
    fn cohorts_split_by_client_and_shadow_is_logged_not_applied() {
        let control = Decision::fixed(Settings::default(), Reason::Default);
        let mut cand = Decision::fixed(
            Settings {
                buffer_size: 65536,
                ..Settings::default()
            },
            Reason::Canary,
        );
        cand.model_version = Some("cand".into());
        let mut b = BucketDecision {
            decision: control,
            exploration: None,
            client_overrides: vec![],
            ttl_ms: 1000,
            rollout: Some(RolloutAnswer {
                id: 1,
                salt: 77,
                service: "chat".into(),
                percent: 25.0,
                shadow_share: 1.0,
                candidate: cand,
            }),
        };
        let mut canary = 0;
        for i in 0..2000 {
            let key = format!("client-{i}");
            let a = b.for_connection(Some(&key), &uuid::Uuid::new_v4());
            let again = b.for_connection(Some(&key), &uuid::Uuid::new_v4());
            assert_eq!(a.cohort, again.cohort, "sticky");
            match a.cohort {
                Cohort::Canary => {
                    canary += 1;
                    assert_eq!(a.reason, Reason::Canary);
                    assert_eq!(a.settings.buffer_size, 65536);
                    assert_eq!(a.model_version.as_deref(), Some("cand"));
                }
                Cohort::Control => {
                    assert_eq!(a.settings, Settings::default());
                    assert_eq!(a.shadow.map(|s| s.buffer_size), Some(65536));
                }
                Cohort::None => panic!("in a rollout every connection has a cohort"),
            }
        }
        assert!((400..600).contains(&canary), "{canary}");
        // the kill switch and overrides are not split
        b.decision.reason = Reason::Override;
        assert_eq!(
            b.for_connection(Some("client-1"), &uuid::Uuid::new_v4())
                .cohort,
            Cohort::None
        );
    }
}
