//! What decisions depend on, held in memory as one snapshot and reloaded from PostgreSQL on every
//! change notification (LISTEN/NOTIFY between replicas) and at least once a second. Nothing
//! lives only in one replica: the snapshot is a cache of the database.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tuning::{
    BucketDecision, ClientOverride, ConnectionContext, Decision, PartialSettings, Reason,
};

use crate::config::Config;

/// The notification channel every change is announced on.
pub const CHANNEL: &str = "trimtab_changes";

/// One override row.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct OverrideRow {
    /// Id.
    pub id: i64,
    /// Service it applies to.
    pub service: String,
    /// Route, when scoped to one.
    pub route: Option<String>,
    /// Client key, when scoped to one client.
    pub client_key: Option<String>,
    /// The settings it names.
    #[sqlx(json)]
    pub settings: PartialSettings,
    /// When it stops applying.
    pub expires_at: Option<DateTime<Utc>>,
    /// Why.
    pub comment: String,
    /// Who made it.
    pub created_by: String,
    /// When.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// What decisions are made from.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The kill switch is on.
    pub kill_switch: bool,
    /// Overrides in force.
    pub overrides: Vec<OverrideRow>,
    /// The active model, loaded and validated.
    pub model: Option<Arc<crate::models::LoadedModel>>,
    /// The rollout splitting traffic, with its candidate loaded.
    pub rollout: Option<(crate::rollout::RolloutRow, Arc<crate::models::LoadedModel>)>,
    /// Aggregates of recent profiles (model features), refreshed every minute.
    pub aggregates: Arc<tuning::aggregates::Aggregator>,
}

/// The shared, swappable snapshot.
#[derive(Debug, Default)]
pub struct State {
    snap: RwLock<Arc<Snapshot>>,
    /// ONNX Runtime, when available (without it, models are not loaded).
    pub runtime: Option<&'static crate::inference::Runtime>,
    /// The shipped model, loaded once at start.
    pub shipped: Option<Arc<crate::models::LoadedModel>>,
    /// Reloads run one at a time, so a reload that began before a change can never overwrite
    /// the snapshot of one that began after it.
    reloading: tokio::sync::Mutex<()>,
}

impl State {
    /// An empty state that loads models with `runtime`.
    pub fn with_runtime(runtime: Option<&'static crate::inference::Runtime>) -> State {
        State {
            snap: RwLock::default(),
            runtime,
            shipped: None,
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// The current snapshot.
    pub fn get(&self) -> Arc<Snapshot> {
        self.snap.read().expect("snapshot").clone()
    }

    /// Reload from the database.
    pub async fn reload(&self, db: &sqlx::PgPool) -> Result<(), sqlx::Error> {
        let _one_at_a_time = self.reloading.lock().await;
        let kill: bool = sqlx::query_scalar("select enabled from kill_switch where id")
            .fetch_optional(db)
            .await?
            .unwrap_or(false);
        let overrides: Vec<OverrideRow> = sqlx::query_as(
            "select id, service, route, client_key, settings, expires_at, comment, created_by, created_at, updated_at
               from overrides where expires_at is null or expires_at > now() order by id",
        )
        .fetch_all(db)
        .await?;
        let active: Option<String> =
            sqlx::query_scalar("select version from models where status = 'active'")
                .fetch_optional(db)
                .await?;
        let current = self.get().model.clone();
        let model = match (active, current) {
            (None, _) => self.shipped.clone(),
            (Some(v), Some(m)) if m.version == v => Some(m),
            (Some(v), _) => self.load_model(db, &v).await,
        };
        let rollout = match crate::rollout::active(db).await? {
            None => None,
            Some(r) => {
                let cached = self
                    .get()
                    .rollout
                    .as_ref()
                    .filter(|(old, m)| old.id == r.id && m.version == r.candidate_version)
                    .map(|(_, m)| m.clone());
                let m = match cached {
                    Some(m) => Some(m),
                    None => self.load_model(db, &r.candidate_version).await,
                };
                m.map(|m| (r, m))
            }
        };
        let aggregates = self.get().aggregates.clone();
        *self.snap.write().expect("snapshot") = Arc::new(Snapshot {
            kill_switch: kill,
            overrides,
            model,
            rollout,
            aggregates,
        });
        Ok(())
    }

    async fn load_model(
        &self,
        db: &sqlx::PgPool,
        version: &str,
    ) -> Option<Arc<crate::models::LoadedModel>> {
        let rt = self.runtime?;
        let bytes: Vec<u8> = match sqlx::query_scalar("select onnx from models where version = $1")
            .bind(version)
            .fetch_one(db)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(%version, error = %e, "reading the active model failed");
                return None;
            }
        };
        match crate::models::LoadedModel::load(rt, version, &bytes) {
            Ok(m) => {
                tracing::info!(%version, "active model loaded");
                Some(Arc::new(m))
            }
            Err(e) => {
                tracing::error!(%version, error = %e, "the active model is not usable: static defaults");
                None
            }
        }
    }

    /// Rebuild the aggregates from the profiles of the last 24 hours (at most 200 000 rows),
    /// with `tuning`'s aggregator, the one the trainer uses.
    pub async fn refresh_aggregates(&self, db: &sqlx::PgPool) -> Result<usize, sqlx::Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "select {} from profiles where started_at > now() - interval '24 hours'
              order by started_at desc limit 200000",
            tuning::sql::PROFILE_COLUMNS
        )))
        .fetch_all(db)
        .await?;
        let mut agg = tuning::aggregates::Aggregator::default();
        for r in rows.iter().rev() {
            agg.observe(&tuning::sql::profile_from_row(r)?);
        }
        let n = rows.len();
        let _one_at_a_time = self.reloading.lock().await;
        let mut snap = (*self.get()).clone();
        snap.aggregates = Arc::new(agg);
        *self.snap.write().expect("snapshot") = Arc::new(snap);
        Ok(n)
    }

    /// Keep the snapshot fresh: reload on every notification, and every `every` regardless.
    pub async fn keep_fresh(self: Arc<Self>, db: sqlx::PgPool, every: Duration) {
        let mut listener = None;
        let mut tick = tokio::time::interval(every);
        let mut last_aggregates = std::time::Instant::now();
        loop {
            if last_aggregates.elapsed() >= Duration::from_secs(60) {
                last_aggregates = std::time::Instant::now();
                if let Err(e) = self.refresh_aggregates(&db).await {
                    tracing::warn!(error = %e, "refreshing aggregates failed");
                }
            }
            if listener.is_none() {
                match sqlx::postgres::PgListener::connect_with(&db).await {
                    Ok(mut l) => match l.listen(CHANNEL).await {
                        Ok(()) => listener = Some(l),
                        Err(e) => tracing::warn!(error = %e, "LISTEN failed; polling only"),
                    },
                    Err(e) => tracing::warn!(error = %e, "listener connect failed; polling only"),
                }
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = notified => if r.is_err() { listener = None; },
                _ = tick.tick() => {}
            }
            if let Err(e) = self.reload(&db).await {
                tracing::warn!(error = %e, "reloading decisions state failed");
            }
        }
    }
}

/// Announce a change to every replica.
pub async fn notify(db: &sqlx::PgPool, what: &str) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(what)
        .execute(db)
        .await
        .map(|_| ())
}

/// The decision for a context, by DESIGN.md's precedence: kill switch > per-client/route
/// override > per-service override > active model > static default. (Rollouts and models come
/// with the model registry; until then the last two steps are the static default.)
pub fn decide(config: &Config, snap: &Snapshot, ctx: &ConnectionContext) -> BucketDecision {
    let ttl_ms = config.decision_ttl.as_millis() as u64;
    let defaults = config.static_settings(&ctx.service);
    if snap.kill_switch {
        return BucketDecision {
            decision: Decision::fixed(defaults, Reason::KillSwitch),
            exploration: None,
            client_overrides: Vec::new(),
            ttl_ms,
            rollout: None,
        };
    }
    let mut decision = Decision::fixed(defaults, Reason::Default);
    let mut exploration = None;
    if let Some(m) = &snap.model {
        match m.settings(ctx, &snap.aggregates.get(ctx), defaults) {
            Ok((settings, _clamped)) => {
                decision = Decision {
                    settings,
                    reason: Reason::Model,
                    model_version: Some(m.version.clone()),
                    cohort: tuning::Cohort::None,
                    propensity: (1.0 - config.exploration_share) as f32,
                    explored: false,
                    shadow: None,
                };
                if config.exploration_share > 0.0 {
                    exploration = Some(tuning::Exploration {
                        share: config.exploration_share,
                        salt: tuning::hash::stable_hash(&[b"explore", m.version.as_bytes()]),
                    });
                }
            }
            Err(e) => tracing::warn!(error = %e, "model inference failed: static default"),
        }
    }
    let applies = |o: &&OverrideRow| {
        o.service == ctx.service && o.route.as_ref().is_none_or(|r| *r == ctx.route)
    };
    // Least specific first, so that more specific fields win.
    let mut scoped: Vec<&OverrideRow> = snap
        .overrides
        .iter()
        .filter(applies)
        .filter(|o| o.client_key.is_none())
        .collect();
    scoped.sort_by_key(|o| o.route.is_some());
    for o in &scoped {
        decision.settings = decision.settings.with(&o.settings);
        decision.reason = Reason::Override;
        decision.propensity = 1.0;
        exploration = None;
    }
    decision.settings = decision.settings.clamp().0;
    // Per-client overrides travel with the answer; route-scoped ones first (they win).
    let mut clients: Vec<&OverrideRow> = snap
        .overrides
        .iter()
        .filter(applies)
        .filter(|o| o.client_key.is_some())
        .collect();
    clients.sort_by_key(|o| o.route.is_none());
    let client_overrides: Vec<ClientOverride> = clients
        .iter()
        .map(|o| ClientOverride {
            client_key: o.client_key.clone().unwrap_or_default(),
            // Merge with the scoped overrides' fields so a client override is "on top".
            settings: o.settings,
        })
        .collect();
    // A rollout splits what the model (or the default) would decide, never an override.
    let rollout = match (&snap.rollout, decision.reason) {
        (Some((r, m)), Reason::Model | Reason::Default) => {
            match m.settings(ctx, &snap.aggregates.get(ctx), defaults) {
                Ok((settings, _)) => Some(tuning::RolloutAnswer {
                    id: r.id,
                    salt: r.salt as u64,
                    service: ctx.service.clone(),
                    percent: r.percent(),
                    shadow_share: if r.state == "shadow" {
                        f64::from(r.shadow_share)
                    } else {
                        0.0
                    },
                    candidate: Decision {
                        settings,
                        reason: Reason::Canary,
                        model_version: Some(m.version.clone()),
                        cohort: tuning::Cohort::Canary,
                        propensity: (1.0 - config.exploration_share) as f32,
                        explored: false,
                        shadow: None,
                    },
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "candidate inference failed: no canary for this bucket");
                    None
                }
            }
        }
        _ => None,
    };
    if rollout.is_some() && exploration.is_none() && config.exploration_share > 0.0 {
        // Canary decisions explore like model decisions do.
        exploration = snap.rollout.as_ref().map(|(r, _)| tuning::Exploration {
            share: config.exploration_share,
            salt: r.salt as u64,
        });
    }
    let bucket = BucketDecision {
        decision,
        exploration,
        client_overrides,
        ttl_ms,
        rollout,
    };
    // A caller that named its client gets that client's decision directly.
    let mut b = bucket.clone();
    if ctx.client_key.is_some() {
        b.decision = bucket.for_connection(ctx.client_key.as_deref(), &uuid_nil());
    }
    b
}

fn uuid_nil() -> uuid::Uuid {
    uuid::Uuid::nil()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tuning::{ClientClass, Protocol};

    fn ctx(client: Option<&str>) -> ConnectionContext {
        ConnectionContext {
            service: "chat".into(),
            route: "/ws".into(),
            protocol: Protocol::Websocket,
            subprotocol: None,
            offers_deflate: false,
            client_class: ClientClass::Browser,
            client_region: "eu".into(),
            hour_of_week: 1,
            client_key: client.map(str::to_owned),
        }
    }

    fn ov(id: i64, route: Option<&str>, client: Option<&str>, p: PartialSettings) -> OverrideRow {
        OverrideRow {
            id,
            service: "chat".into(),
            route: route.map(str::to_owned),
            client_key: client.map(str::to_owned),
            settings: p,
            expires_at: None,
            comment: String::new(),
            created_by: "t".into(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn precedence_is_kill_switch_then_client_route_service_then_default() {
        let config = Config::from_toml("allow_unauthenticated = true").unwrap();
        let idle = |s: u32| PartialSettings {
            idle_timeout: Some(s),
            ..PartialSettings::default()
        };
        let buf = PartialSettings {
            buffer_size: Some(65536),
            ..PartialSettings::default()
        };
        let mut snap = Snapshot::default();
        assert_eq!(
            decide(&config, &snap, &ctx(None)).decision.reason,
            Reason::Default
        );
        snap.overrides = vec![
            ov(1, None, None, idle(60)),
            ov(2, Some("/ws"), None, idle(120)),
            ov(3, None, None, buf),
            ov(4, Some("/ws"), Some("vip"), idle(900)),
            ov(5, Some("/other"), None, idle(30)),
        ];
        let d = decide(&config, &snap, &ctx(None)).decision;
        assert_eq!(d.reason, Reason::Override);
        assert_eq!(d.settings.idle_timeout, 120, "route beats service");
        assert_eq!(d.settings.buffer_size, 65536, "fields of both apply");
        let d = decide(&config, &snap, &ctx(Some("vip"))).decision;
        assert_eq!(d.settings.idle_timeout, 900, "client beats route");
        snap.kill_switch = true;
        let d = decide(&config, &snap, &ctx(Some("vip"))).decision;
        assert_eq!(d.reason, Reason::KillSwitch);
        assert_eq!(d.settings, config.static_settings("chat"));
    }
}
